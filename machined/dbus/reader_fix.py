"""Read one message per wakeup of the event loop instead of reading until the socket is empty.

On a connection that passes file descriptors, dbus-fast's reader reads message after
message until a read fails with EAGAIN. So every call the daemon answers costs one more
``recvmsg`` and an exception (an OSError with its strerror, a traceback frame in the
compiled reader) only to learn that nothing else came: measured on the daemon's own
dispatcher, 10-30 % of its CPU time per lookup. asyncio's epoll is level-triggered: a
reader that returns after each message is called again at once while more is waiting.
dbus-fast reads such a connection exactly, message by message (the fixed header, then
the rest), so nothing of a next message is ever left in its buffer when it returns.
Connections without descriptor passing read greedily and stop at an empty buffer already;
they keep dbus-fast's reader. Applied once, at start-up, before connecting.

dbus-fast lets go of a message's bytes when it starts on the next one: so that a large
request does not stay in memory while the bus is quiet, the reader makes that start (one
read, EAGAIN as a rule) a quarter of a second after the last message it read.

Reading ahead: while more bytes wait on the socket (the kernel says how many, without a failing
read), one wakeup reads up to READ_AHEAD messages. dbus-daemon queues messages for us in
arrival order, so a peer flooding us would otherwise put every other call behind all of its own
in dbus-daemon's queue; read ahead, the calls wait in the dispatcher's queues instead, where
senders are served in turn (machined.dbus.fair).

This module is the one place that touches dbus-fast's internals on the reading side; apply()
first checks they have the shape it knows, and leaves dbus-fast's reader in place if not.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import socket
import termios
from collections.abc import Callable
from typing import Any

from dbus_fast.aio import message_bus as _aio

log = logging.getLogger(__name__)

try:  # dbus-fast's internals this reader is built on (checked by apply())
    from dbus_fast._private.unmarshaller import Unmarshaller
    from dbus_fast.aio.message_reader import _message_reader, build_message_reader

    _dbus_fasts = build_message_reader
    _IMPORTED = True
except ImportError:  # pragma: no cover (another dbus-fast: its own reader stays)
    _IMPORTED = False

SWEEP_AFTER = 0.25  # seconds after a message: its bytes are let go of
READ_AHEAD = 512  # messages read in one wakeup at most, while more is waiting
_FOUR = bytes(4)


def _waiting(fd: int) -> int:
    """Bytes waiting to be read on socket *fd* (0 when it cannot be told)."""
    try:
        return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, _FOUR), "little")
    except OSError:
        return 0


class _Reader:
    """dbus-fast's reader, told to return after each message (its flag for connections that read
    greedily) while its unmarshaller still reads descriptors and exact lengths."""

    __slots__ = ("finalize", "finalize_once", "finished", "loop", "process", "sock", "sweep", "unmarshaller")

    def __init__(self, sock: socket.socket, process: Callable[[Any], None],
                 finalize: Callable[[Exception | None], None]) -> None:  # fmt: skip
        self.sock = sock
        self.unmarshaller = Unmarshaller(None, sock, True)
        self.process = process
        self.finalize = finalize
        self.finished = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sweep: asyncio.TimerHandle | None = None
        self.finalize_once = self._finalize  # bound once: the reader runs for every message

    def _finalize(self, e: Exception | None) -> None:
        self.finished = True
        if self.sweep is not None:
            self.sweep.cancel()
            self.sweep = None
        self.finalize(e)

    def __call__(self) -> None:
        _message_reader(self.unmarshaller, self.process, self.finalize_once, False)
        sock = self.sock
        for _ in range(READ_AHEAD - 1):  # more waiting: read on (a message at a time)
            if self.finished:
                return
            fd = sock.fileno()
            if fd < 0 or not _waiting(fd):
                break
            _message_reader(self.unmarshaller, self.process, self.finalize_once, False)
        if self.sweep is None:
            self._arm()

    def _arm(self) -> None:
        if self.finished:
            return
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        self.sweep = self.loop.call_later(SWEEP_AFTER, self._sweep)

    def _sweep(self) -> None:
        """Start on the next message: the last one's bytes go; one that came is served."""
        self.sweep = None
        if self.finished or self.sock.fileno() < 0:  # finished, or closed by the bus (disconnect)
            return
        try:
            message = self.unmarshaller.unmarshall()
        except Exception as e:  # noqa: BLE001 (the connection failed: as dbus-fast's reader)
            self._finalize(e)
            return
        if message is not None:
            try:
                self.process(message)
            except Exception:
                log.exception("Unexpected error processing message")


def one_message_per_wakeup(sock: socket.socket | None, process: Callable[[Any], None],
                           finalize: Callable[[Exception | None], None],
                           negotiate_unix_fd: bool) -> Callable[[], None]:  # fmt: skip
    if not negotiate_unix_fd or sock is None:
        return _dbus_fasts(sock, process, finalize, negotiate_unix_fd)
    return _Reader(sock, process, finalize)


def internals_known() -> bool:
    """Whether dbus-fast has the internals this reader uses (pinned series: dbus-fast 2 to 5)."""
    if not _IMPORTED or not callable(_message_reader):
        return False
    if not callable(getattr(_aio, "build_message_reader", None)):
        return False
    return callable(getattr(Unmarshaller, "unmarshall", None)) and hasattr(Unmarshaller, "message")


def apply() -> bool:
    """Install the reader; False (dbus-fast's reader stays) if dbus-fast is not as expected."""
    if not internals_known():
        log.warning("dbus-fast's reader is not as expected: it reads the bus as it does (no reading ahead)")
        return False
    _aio.build_message_reader = one_message_per_wakeup  # type: ignore[attr-defined]
    return True

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
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

from dbus_fast._private.unmarshaller import Unmarshaller
from dbus_fast.aio import message_bus as _aio
from dbus_fast.aio.message_reader import _message_reader, build_message_reader

_dbus_fasts = build_message_reader
log = logging.getLogger(__name__)


SWEEP_AFTER = 0.25  # seconds after a message: its bytes are let go of


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


def apply() -> None:
    _aio.build_message_reader = one_message_per_wakeup  # type: ignore[attr-defined]

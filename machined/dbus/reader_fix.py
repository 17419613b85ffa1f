"""The bus connection read in large chunks, its messages parsed out of them, a bounded number a turn.

dbus-fast reads a connection that passes file descriptors exactly, message by message: the
fixed header, then the rest, each a ``recvmsg`` (and, at the end of what came, one more that
fails with EAGAIN and an exception). Those system calls are most of the cost of a message:
8.5 µs a small message read that way against 1 µs from a buffer, measured here. Under a flood
(a peer writing NO_REPLY_EXPECTED calls as fast as dbus-daemon forwards them) that decides
whether the daemon keeps up with dbus-daemon: dbus-daemon queues every message for our one
connection in arrival order, so when we fall behind, every other sender's calls wait behind
all of the flood's (seconds, measured).

So this reader takes what is waiting with one ``recvmsg`` of up to CHUNK bytes a wakeup of the
event loop (epoll said there is something: the read never fails), and dbus-fast's unmarshaller
parses the messages out of that buffer (its stream mode: it reads exact lengths from an object
with ``read()``), at most READ_AHEAD messages or READ_SECONDS a turn; the calls then wait in the
dispatcher's queues, where senders are served in turn (machined.dbus.fair). What is left in
the buffer is parsed at the next turn of the loop.

Descriptors: the kernel ends a read right after the bytes that carried descriptors, and
dbus-daemon sends a message's descriptors with its first bytes (one message a write). So the
descriptors of one read belong to the message that starts within it and ends at or after its
end; they are given to that message (descriptors that fit no message are closed). A
message's bytes are let go of as soon as the next is parsed (at once, not at the next message).

Connections without descriptor passing keep dbus-fast's reader (it reads greedily already).
This module is the one place that touches dbus-fast's internals on the reading side; apply()
first checks they have the shape it knows, and leaves dbus-fast's reader in place if not.
Applied once, at start-up, before connecting.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from dbus_fast.aio import message_bus as _aio

log = logging.getLogger(__name__)

try:  # dbus-fast's internals this reader is built on (checked by apply())
    from dbus_fast._private.unmarshaller import Unmarshaller
    from dbus_fast.aio.message_reader import build_message_reader

    _dbus_fasts = build_message_reader
    _IMPORTED = True
except ImportError:  # pragma: no cover (another dbus-fast: its own reader stays)
    _IMPORTED = False

CHUNK = 64 << 10  # bytes taken from the socket in one read at most (more if a message needs it;
# under malloc's mmap threshold: a read costs no fresh pages)
READ_AHEAD = 512  # messages parsed in one turn of the event loop at most...
READ_SECONDS = 0.001  # ... and for about this long
LARGE = 1 << 20  # a message at least this large: its buffer goes with it
_FD_SPACE = socket.CMSG_SPACE(253 * 4)  # the kernel passes at most 253 descriptors a message


class _Stream:
    """The socket as the unmarshaller reads it: exact lengths out of what one ``recvmsg`` brought.

    Offsets count bytes since the connection began: *received* what came from the socket,
    *consumed* what was handed to the unmarshaller. *fds* holds, per read that brought
    descriptors, (its first offset, its end, the descriptors)."""

    __slots__ = ("consumed", "data", "fds", "may_read", "pos", "received", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = b""
        self.pos = 0
        self.received = 0
        self.consumed = 0
        self.may_read = False  # one socket read a wakeup
        self.fds: deque[tuple[int, int, list[int]]] = deque()

    def buffered(self) -> int:
        return len(self.data) - self.pos

    def read(self, n: int) -> bytes | None:
        """Up to *n* bytes; None when nothing is there now, b"" at the end of the connection."""
        data, pos = self.data, self.pos
        if pos >= len(data):
            # Nothing left here: one read from the socket (a message's rest at once if it can).
            if not self.may_read:
                return None
            self.may_read = False
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(max(CHUNK, n), _FD_SPACE)
            except (BlockingIOError, InterruptedError):
                return None
            if ancdata:
                self._keep_fds(ancdata, len(data))
            if not data:
                return b""  # the bus hung up
            self.received += len(data)
            self.data, pos = data, 0
        chunk = data[pos : pos + n]
        pos += len(chunk)
        if pos >= len(data):  # all handed over: not kept here
            self.data, self.pos = b"", 0
        else:
            self.pos = pos
        self.consumed += len(chunk)
        return chunk

    def _keep_fds(self, ancdata: list[tuple[int, int, bytes]], length: int) -> None:
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
        if fds:
            self.fds.append((self.received, self.received + length, fds))

    def close(self) -> None:
        for _start, _end, fds in self.fds:
            _close(fds)
        self.fds.clear()
        self.data = b""


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class _Reader:
    """Reads the socket once a wakeup and hands the messages it brings to *process*, a bounded
    number a turn of the event loop (the rest at the next turn)."""

    __slots__ = ("again", "finalize", "finished", "loop", "next_start", "process", "sock", "stream", "unmarshaller")

    def __init__(self, sock: socket.socket, process: Callable[[Any], None],
                 finalize: Callable[[Exception | None], None]) -> None:  # fmt: skip
        self.sock = sock
        self.stream = _Stream(sock)
        self.unmarshaller = Unmarshaller(self.stream, None, False)  # type: ignore[arg-type]
        self.process = process
        self.finalize = finalize
        self.finished = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.next_start = 0  # where the next message begins
        self.again = False  # a turn without a wakeup is due

    def _finalize(self, e: Exception | None) -> None:
        self.finished = True
        self.stream.close()
        self.finalize(e)

    def __call__(self) -> None:
        """The socket is readable: a turn, unless one is due anyway (it reads then)."""
        if not self.again:
            self._turn()

    def _turn(self) -> None:
        if self.finished or self.sock.fileno() < 0:  # finished, or closed by the bus (disconnect)
            return
        stream, unmarshaller = self.stream, self.unmarshaller
        stream.may_read = True
        until = time.perf_counter() + READ_SECONDS
        for _ in range(READ_AHEAD):
            try:
                message = unmarshaller.unmarshall()
            except Exception as e:  # noqa: BLE001 (the connection failed: as dbus-fast's reader)
                self._finalize(e)
                return
            if message is None:
                break
            start, end = self.next_start, stream.consumed
            self.next_start = end
            if stream.fds:
                self._give_fds(message, start, end)
            try:
                self.process(message)
            except Exception:
                log.exception("Unexpected error processing message")
            if self.finished:
                return
            if end - start > LARGE:
                # The unmarshaller keeps its buffer at the size of the largest message it read
                # (dbus-fast deletes a message's bytes from the front of it): a fresh one lets
                # a large message's memory go at once.
                unmarshaller = self.unmarshaller = Unmarshaller(stream, None, False)  # type: ignore[arg-type]
            if time.perf_counter() > until:
                break
        if message is not None and stream.buffered() and not self.again:
            # Stopped with messages left in the buffer: on at the next turn of the loop (epoll
            # would not wake us for them).
            if self.loop is None:
                self.loop = asyncio.get_running_loop()
            self.again = True
            self.loop.call_soon(self._again)

    def _again(self) -> None:
        self.again = False
        self._turn()

    def _give_fds(self, message: Any, start: int, end: int) -> None:
        """The descriptors of the reads that ended within this message: its own if it began
        within that read, else closed (they fit no message)."""
        fds = self.stream.fds
        while fds and fds[0][1] <= end:
            first, last, got = fds.popleft()
            if first <= start < last:
                message.unix_fds = list(message.unix_fds) + got if message.unix_fds else got
            else:
                log.warning("Descriptors in the middle of a message from the bus: closed")
                _close(got)


def one_message_per_wakeup(sock: socket.socket | None, process: Callable[[Any], None],
                           finalize: Callable[[Exception | None], None],
                           negotiate_unix_fd: bool) -> Callable[[], None]:  # fmt: skip
    if not negotiate_unix_fd or sock is None:
        return _dbus_fasts(sock, process, finalize, negotiate_unix_fd)
    return _Reader(sock, process, finalize)


def internals_known() -> bool:
    """Whether dbus-fast has what this reader uses (pinned series: dbus-fast 2 to 5): the
    asyncio bus builds its reader through build_message_reader, and the unmarshaller reads a
    stream's ``read()`` and gives a message's descriptors as a public list."""
    if not _IMPORTED or not callable(getattr(_aio, "build_message_reader", None)):
        return False
    if not callable(getattr(Unmarshaller, "unmarshall", None)):
        return False
    try:
        from dbus_fast import Message

        probe = Message(destination="a.b", path="/", interface="a.b", member="C", signature="s", body=["x"], serial=1)
        wire = bytes(probe._marshall(False))
        # Given in pieces, with nothing in between, as the socket gives it: a message at the end.
        pieces: list[bytes | None] = [wire[:10], None, wire[10:30], None, wire[30:]]

        class Pieces:
            def read(self, n: int) -> bytes | None:
                piece = pieces.pop(0) if pieces else None
                if piece is not None and len(piece) > n:
                    pieces.insert(0, piece[n:])
                    piece = piece[:n]
                return piece

        unmarshaller = Unmarshaller(Pieces(), None, False)  # type: ignore[arg-type]
        got = None
        for _ in range(10):
            got = unmarshaller.unmarshall()
            if got is not None:
                break
        if got is None or got.member != "C" or got.body != ["x"] or unmarshaller.message is not got:
            return False
        got.unix_fds = [5]
        return got.unix_fds == [5]
    except Exception:  # noqa: BLE001 (not as expected: dbus-fast's reader stays)
        return False


def apply() -> bool:
    """Install the reader; False (dbus-fast's reader stays) if dbus-fast is not as expected."""
    if not internals_known():
        log.warning("dbus-fast's reader is not as expected: it reads the bus as it does (no reading ahead)")
        return False
    _aio.build_message_reader = one_message_per_wakeup  # type: ignore[attr-defined]
    return True

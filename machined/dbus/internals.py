"""Every use of dbus-fast's private internals, in one place, behind one start-up check.

dbus-fast (pinned to the series tested, 5.2: pyproject.toml) is used through its public API
everywhere else; what it offers only privately is here:

- **the reader**: the bus connection read in large chunks, its messages parsed out of them, a
  bounded number a turn (its asyncio bus's ``build_message_reader`` replaced; its
  ``Unmarshaller`` in stream mode);
- **the writer**: a write callback that waits when the socket is full instead of dropping the
  connection (its ``_MessageWriter.write_callback`` replaced), and replies written straight to
  the socket when nothing waits in the writer's queue (:func:`send`);
- **marshalling**: a message's bytes (:func:`marshal`, for the raw connections children make
  inside a container), a body's bytes (:func:`marshal_body`), and replies whose body is already
  marshalled (:class:`MarshalledReturn`: only the header is marshalled).

:func:`install` runs once at start-up, before the bus is connected: it checks that each of these
has the shape this module knows (by running it on probes) and installs the reader and the writer;
whatever does not match falls back to dbus-fast's own path (one warning names what): its reader,
its writer, every reply through its queue, GetAll marshalled each time (:func:`marshalling_known`
says whether the marshalling tricks may be used). :func:`marshal` and :class:`MarshalledReturn`
have no public counterpart in dbus-fast (it marshals only as it sends); the check then warns that
they are not as expected.

The reader, in detail. dbus-fast reads a connection that passes file descriptors exactly,
message by message: the fixed header, then the rest, each a ``recvmsg`` (and, at the end of what
came, one more that fails with EAGAIN and an exception). Those system calls are most of the cost
of a message: 8.5 µs a small message read that way against 1 µs from a buffer, measured here.
Under a flood (a peer writing NO_REPLY_EXPECTED calls as fast as dbus-daemon forwards them) that
decides whether the daemon keeps up with dbus-daemon: dbus-daemon queues every message for our
one connection in arrival order, so when we fall behind, every other sender's calls wait behind
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

The writer, in detail. dbus-fast's asyncio writer (as dbus-next's, issue #153 there) treats
EAGAIN from ``send()`` as a fatal error and drops the connection. That happens when a large
message is still being written and another one is queued: the writer tries to send at once, the
kernel buffer is full, and the daemon loses the bus. The replacement callback waits for the
socket to become writable instead.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import message_bus as _aio

log = logging.getLogger(__name__)

try:  # dbus-fast's internals this module is built on (checked by install())
    from dbus_fast._private.marshaller import Marshaller
    from dbus_fast._private.unmarshaller import Unmarshaller
    from dbus_fast.aio.message_reader import build_message_reader

    _stock_reader = build_message_reader
    _IMPORTED = True
except ImportError:  # pragma: no cover (another dbus-fast: its own paths stay)
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
        return _stock_reader(sock, process, finalize, negotiate_unix_fd)
    return _Reader(sock, process, finalize)


def _reader_as_expected() -> bool:
    """Whether dbus-fast has what this reader uses (the pinned series: dbus-fast 5.2): the
    asyncio bus builds its reader through build_message_reader, and the unmarshaller reads a
    stream's ``read()`` and gives a message's descriptors as a public list."""
    if not _IMPORTED or not callable(getattr(_aio, "build_message_reader", None)):
        return False
    if not callable(getattr(Unmarshaller, "unmarshall", None)):
        return False
    try:
        probe = Message(destination="a.b", path="/", interface="a.b", member="C", signature="s", body=["x"], serial=1)
        wire = marshal(probe, False)
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


# -- marshalling ---------------------------------------------------------------------------------


def marshal(message: Message, negotiate_unix_fd: bool = True) -> bytes:
    """*message* as it goes on the wire (dbus-fast marshals only as it sends; raw connections,
    such as a child's to a container's bus, need the bytes)."""
    return bytes(message._marshall(negotiate_unix_fd))


def marshal_body(signature: str, body: list[Any]) -> bytes:
    """A body's bytes (little-endian, as dbus-fast writes it)."""
    return bytes(Marshaller(signature, body).marshall())


class MarshalledReturn(Message):
    """A method return whose body is already marshalled (*marshalled*: with ``data``, its bytes):
    dbus-fast marshals the header with an empty body of the same signature (``[[]]`` for an
    array, ``[{}]`` for a dict) in place of the real one, whose length and bytes are put in then."""

    marshalled: Any

    def _marshall(self, negotiate_unix_fd: bool) -> bytearray:
        out: bytearray = Message._marshall(self, negotiate_unix_fd)
        fields = int.from_bytes(out[12:16], "little")
        header = out[: (16 + fields + 7) & ~7]
        data: bytes = self.marshalled.data
        header[4:8] = len(data).to_bytes(4, "little")
        header += data
        return header


_FIXED = {"y": ("B", 1), "b": ("I", 4), "n": ("h", 2), "q": ("H", 2), "i": ("i", 4), "u": ("I", 4), "x": ("q", 8),
          "t": ("Q", 8), "d": ("d", 8), "h": ("I", 4)}  # fmt: skip
_ALIGN = {**{c: size for c, (_, size) in _FIXED.items()}, "s": 4, "o": 4, "a": 4, "(": 8, "{": 8}


def unmarshal_body(signature: str, data: bytes) -> list[Any]:
    """A little-endian body back to values as dbus-fast gives them (structs as tuples, variants as
    Variant), without dbus-fast's internals: the fallback for replies marshalled ahead when
    dbus-fast's marshalling is not as expected."""
    pos = 0

    def complete(sig: str, i: int) -> int:  # the end of the complete type starting at sig[i]
        c = sig[i]
        if c == "a":
            return complete(sig, i + 1)
        if c in "({":
            depth, i = 1, i + 1
            while depth:
                depth += {"(": 1, "{": 1, ")": -1, "}": -1}.get(sig[i], 0)
                i += 1
            return i
        return i + 1

    def types(sig: str) -> list[str]:
        out, i = [], 0
        while i < len(sig):
            end = complete(sig, i)
            out.append(sig[i:end])
            i = end
        return out

    def align(n: int) -> None:
        nonlocal pos
        pos += -pos % n

    def read(sig: str) -> Any:
        nonlocal pos
        c = sig[0]
        if c in _FIXED:
            code, size = _FIXED[c]
            align(size)
            (value,) = struct.unpack_from("<" + code, data, pos)
            pos += size
            return bool(value) if c == "b" else value
        if c in "sog":
            if c == "g":
                n = data[pos]
                pos += 1
            else:
                align(4)
                n = int.from_bytes(data[pos : pos + 4], "little")
                pos += 4
            text = data[pos : pos + n].decode()
            pos += n + 1
            return text
        if c == "v":
            inner = read("g")
            return Variant(inner, read(inner), False)
        if c == "(":
            align(8)
            return tuple(read(t) for t in types(sig[1:-1]))
        if c == "a":
            align(4)
            n = int.from_bytes(data[pos : pos + 4], "little")
            pos += 4
            element = sig[1:]
            if element == "y":  # bytes, as dbus-fast gives them
                pos += n
                return bytes(data[pos - n : pos])
            align(_ALIGN.get(element[0], 1))  # the first element's padding, even with none
            end = pos + n
            if element[0] == "{":
                key, value = types(element[1:-1])
                entries: dict[Any, Any] = {}
                while pos < end:
                    align(8)
                    k = read(key)
                    entries[k] = read(value)
                return entries
            items = []
            while pos < end:
                items.append(read(element))
            return items
        raise ValueError(f"unknown type {sig!r}")

    return [read(t) for t in types(signature)]


def _marshalling_as_expected() -> bool:
    """Whether a message marshals as this module assumes: little-endian, the fixed header with
    the body's length at 4 and the header fields' at 12, the body after the fields padded to 8;
    and a MarshalledReturn's bytes are those of the same return marshalled whole."""
    try:
        body = [[("a", "bc"), ("def", "")]]
        whole = Message(message_type=MessageType.METHOD_RETURN, reply_serial=3, destination=":1.2", serial=4,
                        signature="a(ss)", body=body)  # fmt: skip
        wire = marshal(whole)
        fields = int.from_bytes(wire[12:16], "little")
        start = (16 + fields + 7) & ~7
        if wire[:1] != b"l" or wire[3] != 1 or int.from_bytes(wire[4:8], "little") != len(wire) - start:
            return False
        if wire[start:] != marshal_body("a(ss)", body):
            return False
        probe = MarshalledReturn(message_type=MessageType.METHOD_RETURN, reply_serial=3, destination=":1.2", serial=4,
                                 signature="a(ss)", body=[[]])  # fmt: skip
        probe.marshalled = SimpleNamespace(data=wire[start:])
        return marshal(probe) == wire
    except Exception:  # noqa: BLE001 (not as expected)
        return False


# -- the writer ----------------------------------------------------------------------------------

_WRITER_FIELDS = ("buf", "messages", "offset", "unix_fds", "fut", "sock", "fd", "loop", "negotiate_unix_fd", "bus")


def _write_callback(self: Any, remove_writer: bool = True) -> None:
    sock = self.sock
    try:
        while True:
            if self.buf is None:
                if not self.messages:
                    if remove_writer:
                        self.loop.remove_writer(self.fd)
                    return
                buf, unix_fds, fut = self.messages.popleft()
                self.unix_fds = unix_fds
                self.buf = memoryview(buf)
                self.offset = 0
                self.fut = fut
            try:
                if self.unix_fds and self.negotiate_unix_fd:
                    ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", self.unix_fds))]
                    self.offset += sock.sendmsg([self.buf[self.offset :]], ancdata)
                    self.unix_fds = None
                else:
                    self.offset += sock.send(self.buf[self.offset :])
            except BlockingIOError:
                # Full for now: continue when the loop says the socket is writable again.
                self.loop.add_writer(self.fd, self.write_callback)
                return
            if self.offset < len(self.buf):
                self.loop.add_writer(self.fd, self.write_callback)
                return
            self.buf = None
            if self.fut is not None and not self.fut.done():
                self.fut.set_result(None)
    except Exception as e:
        if self.fut is not None and not self.fut.done():
            if self.bus._user_disconnect:
                self.fut.set_result(None)
            else:
                self.fut.set_exception(e)
                # Sends are often not awaited (signals, replies): the connection's end is
                # reported by the bus itself, not as "Future exception was never retrieved".
                self.fut.exception()
        self.bus._finalize(e)


def _writer_as_expected() -> bool:
    """Whether dbus-fast's asyncio writer has the shape the write callback and :func:`send` know:
    the fields its constructor sets, the callback it schedules, and the bus's fields they use."""
    try:
        writer_class = getattr(_aio, "_MessageWriter", None)
        bus_class = getattr(_aio, "MessageBus", None)
        if writer_class is None or bus_class is None or not callable(getattr(writer_class, "write_callback", None)):
            return False
        if not all(hasattr(bus_class, n) for n in ("_writer", "_user_disconnect", "_finalize", "next_serial")):
            return False
        fake = SimpleNamespace(_negotiate_unix_fd=True, _sock=None, _loop=None, _fd=-1)
        writer = writer_class(fake)
        return all(hasattr(writer, n) for n in _WRITER_FIELDS) and writer.buf is None and not writer.messages
    except Exception:  # noqa: BLE001 (not as expected)
        return False


def direct_writes(bus: Any) -> bool:
    """Whether replies may be written on *bus* past dbus-fast's writer queue (:func:`send`)."""
    writer = getattr(bus, "_writer", None)
    return (
        _known().get("writer", False)
        and writer is not None
        and all(hasattr(writer, n) for n in _WRITER_FIELDS)
        and hasattr(bus, "next_serial")
    )


def send(bus: Any, reply: Message, direct: bool) -> asyncio.Future[None] | None:
    """Write *reply* to the socket right away when *direct* (:func:`direct_writes`) and nothing
    else waits to be written (the common case: no future, no trip through dbus-fast's queue);
    else, or with descriptors to pass, through dbus-fast's writer. None when written (or left
    to the writer)."""
    writer = getattr(bus, "_writer", None)
    if reply.unix_fds or writer is None or not direct or writer.buf is not None or writer.messages:
        return bus.send(reply)  # type: ignore[no-any-return]
    reply.serial = bus.next_serial()
    data = reply._marshall(writer.negotiate_unix_fd)
    try:
        written = writer.sock.send(data)
    except BlockingIOError:
        written = 0
    except OSError:
        return bus.send(reply)  # type: ignore[no-any-return]  # the writer fails the connection as it does
    if written < len(data):  # the rest when the socket takes it, before anything else
        writer.buf = memoryview(data)
        writer.offset = written
        writer.unix_fds = None
        writer.fut = None
        writer.loop.add_writer(writer.fd, writer.write_callback)
    return None


# -- the check -----------------------------------------------------------------------------------

_checked: dict[str, bool] = {}


def _known() -> dict[str, bool]:
    if not _checked:
        _checked.update(check())
    return _checked


def check() -> dict[str, bool]:
    """What of dbus-fast's internals has the shape this module knows: reader, writer, marshalling."""
    return {
        "reader": _reader_as_expected(),
        "writer": _writer_as_expected(),
        "marshalling": _marshalling_as_expected(),
    }


def marshalling_known() -> bool:
    """Whether replies may be built from bodies marshalled ahead (the GetAll cache)."""
    return _known().get("marshalling", False)


_installed: dict[str, bool] = {}
_FALLBACK = {
    "reader": "reading the bus (message by message)",
    "writer": "writing to the bus (every reply through its queue; a full socket drops the connection)",
    "marshalling": "GetAll (marshalled each time; other marshalled replies and children's messages unchecked)",
}


def install() -> dict[str, bool]:
    """The start-up check, once: installs the reader and the writer where dbus-fast is as
    expected, leaves its own paths for the rest (one warning). Returns what is in use."""
    if _installed:
        return dict(_installed)
    _checked.clear()
    known = _known()
    if known["writer"]:
        _aio._MessageWriter.write_callback = _write_callback  # type: ignore[method-assign]
    if known["reader"]:
        _aio.build_message_reader = one_message_per_wakeup  # type: ignore[attr-defined]
    stock = [name for name, ok in known.items() if not ok]
    if stock:
        log.warning("dbus-fast's internals are not as expected (%s): its own path in use for %s", ", ".join(stock),
                    "; ".join(_FALLBACK[n] for n in stock))  # fmt: skip
    _installed.update(known)
    return dict(known)

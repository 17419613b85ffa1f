"""An asyncio varlink server: NUL-terminated JSON messages on Unix stream sockets.

What sd-varlink (systemd 262) does on the wire, and clients depend on:

- one method call at a time per connection, answered in order; a message that is not
  a call (:func:`parse_call`), that sd-json would not read (:func:`decode`) or that
  overflows the buffer closes that connection;
- ``parameters`` null or missing means ``{}``; empty parameters are left out of replies;
- a call is checked against the interface description first (``ExpectedMore``,
  ``InvalidParameter`` naming the first bad field), then its handler runs;
- a method called with ``more`` may answer with several replies; all but the last carry
  ``"continues": true``; one that has nothing to say answers its *sentinel* error;
- errors carry parameters (``{"parameter": "name"}``; ``io.systemd.System`` with the errno);
- file descriptors travel with a reply (SCM_RIGHTS on its first byte);
- the peer's UID, GID and PID are read once from ``SO_PEERCRED`` and its process is pinned
  with ``SO_PEERPIDFD`` (or ``pidfd_open`` of that PID on older kernels);
- ``org.varlink.service.GetInfo`` and ``GetInterfaceDescription`` are built in.

Against hostile local users (the sockets are world-connectable; README, "Varlink server"):
128 connections per user, 64 MiB of one user's unread input, no descriptors taken, fair
turns of the event loop per user, and a call whose peer hangs up is cancelled at once.

Handlers run in a task of their own with :data:`machined.caller.current` set to the peer;
they are cancelled when the peer hangs up.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import select
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from itertools import accumulate
from typing import Any

from machined import caller, errors
from machined.caller import PolkitSubject
from machined.errors import BusError
from machined.process import ProcessRef, start_time
from machined.varlink import idl, sdjson
from machined.varlink.nulls import refused_null

log = logging.getLogger(__name__)

BUFFER_MAX = 16 * 1024 * 1024  # (sd-varlink's: a message that does not fit closes the connection)
READ_SIZE = 64 * 1024
SO_PEERPIDFD = 77
SO_PASSRIGHTS = 83  # (Linux 6.16: 0 refuses file descriptors sent to the socket, EPERM for the sender)
CONNECTIONS_MAX = 4096  # (sd-varlink's default)
CONNECTIONS_PER_UID_MAX = 128  # (what systemd-machined 262 keeps per user; the rest are closed at once)
UID_PINNED_MAX = 4 * BUFFER_MAX  # (tighter than sd-varlink: what one user's unread messages may pin, root aside)
UNPINNED_UIDS = frozenset({0})
DEPTH_MAX = 2048  # (sd-json's nesting limit: deeper closes the connection)
DEPTH_MAX_252 = 2049  # (systemd 252's json parser lets one more level through)
MESSAGES_PER_TURN = 2  # (messages of one user begun per event-loop iteration, oneway ones included)
EXPENSIVE = 0.005  # (seconds: a message that took the loop longer to read makes its user pause...)
EXPENSIVE_PAUSE = 4  # (...this many times as long before its next message: at most ~1/5 of the loop)
# Methods that systemd-machined 262 answers with io.systemd.System EUCLEAN when called with
# "upgrade" (after checking their parameters); every other method ignores the flag.
UPGRADE_REFUSED = frozenset({"io.systemd.Machine.List", "io.systemd.MachineImage.List"})
_UCRED = struct.Struct("3i")


# ----- messages as sd-json reads them ------------------------------------------------------


class _Repeated(dict[str, Any]):
    """A JSON object in which a key occurs more than once (the last value kept, as a dict);
    *pairs* are all of them in order."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.pairs = pairs


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    return value if len(value) == len(pairs) else _Repeated(pairs)


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _integer(text: str) -> int | float:
    # systemd 252 keeps what fits 64 bits as an integer, the rest as a real (so: not an integer)
    value = int(text) if len(text) <= 20 else float(text)
    return value if -(1 << 63) <= value < (1 << 64) else float(text)


# Numbers as 262's sd-json reads them (sdjson: the same double for the same text, not the
# nearest one: 2.003500000000000000000e+04 is not an integer); the hooks are called for reals
# and (the _LONG decoders, for messages with 19 digits in a row) integers only, so ordinary
# messages cost nothing more. Under 252 (long doubles), Python's nearest doubles as before.
_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_constant, parse_float=sdjson.real)
_DECODER_LONG = json.JSONDecoder(
    object_pairs_hook=_object, parse_constant=_constant, parse_float=sdjson.real, parse_int=sdjson.integer
)
_DECODER_252 = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_constant)
_DECODER_LONG_252 = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_constant, parse_int=_integer)
# Escapes sd-json refuses: \u0000, lone surrogates and noncharacters (U+FDD0..U+FDEF and
# U+xFFFE/U+xFFFF of every plane); what may be one, to look closer; escapes one by one.
_MAYBE_BAD_ESCAPE = re.compile(r"\\u(?:[dD][89a-fA-F]|0000|[fF][dD][dDeE]|[fF]{3}[eEfF])")
_ESCAPE = re.compile(
    r"\\(?:(u[dD][89abAB][37bfBF][fF]\\u[dD][fF][fF][eEfF])"  # (a pair that makes a noncharacter)
    r"|u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"  # (a pair)
    r"|(u[dD][89a-fA-F][0-9a-fA-F]{2}|u0000|u[fF][dD][dDeE][0-9a-fA-F]|u[fF]{3}[eEfF])"
    r"|.)",
    re.DOTALL,
)
# The same noncharacters in valid UTF-8 (searched in bytes: faster): U+FDD0..U+FDEF, U+FFFE and
# U+FFFF (three bytes, EF first), and U+xFFFE/U+xFFFF of the other planes (four bytes).
_NONCHARACTER_3 = re.compile(rb"\xef(?:\xb7[\x90-\xaf]|\xbf[\xbe\xbf])")
_NONCHARACTER_4 = re.compile(rb"[\xf0-\xf4][\x8f\x9f\xaf\xbf]\xbf[\xbe\xbf]")
_DIGITS = bytes.maketrans(b"123456789", b"000000000")
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[{]}"))


def _noncharacter(raw: bytes) -> bool:
    """Whether valid UTF-8 *raw* holds DEL or a noncharacter."""
    if b"\x7f" in raw:
        return True
    if raw.isascii():
        return False
    if b"\xef" in raw and _NONCHARACTER_3.search(raw):
        return True
    return any(lead in raw for lead in (b"\xf0", b"\xf1", b"\xf2", b"\xf3", b"\xf4")) and bool(
        _NONCHARACTER_4.search(raw)
    )


def _depth(raw: bytes, limit: int) -> int:
    """How deep *raw*'s arrays and objects nest (exactly when it is valid JSON), or 0 when
    they cannot nest deeper than *limit*."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return 0
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS).translate(_BRACKETS)
    return max(accumulate(memoryview(brackets).cast("b")), default=0)


def decode(raw: bytes, depth_max: int = DEPTH_MAX, as_252: bool = False) -> Any:
    """One message as sd-json parses it, or ValueError where sd-json refuses it: invalid
    UTF-8 (a byte order mark too), lone surrogates, noncharacters, \\u0000, NaN and
    Infinity, control characters (DEL too) in strings, nesting deeper than 2048. Integers that do not fit 64 bits are
    reals, as in sd-json; reals are the doubles 262's sd-json makes of them (:mod:`sdjson`;
    *as_252*: the nearest ones), an infinite one null; repeated keys are kept (as
    :class:`_Repeated`) for the caller."""
    text = raw.decode("utf-8")  # (strict: UnicodeDecodeError is a ValueError)
    if _noncharacter(raw):  # (DEL too: sd-json refuses it as other control characters)
        raise ValueError("a noncharacter or DEL")
    if _MAYBE_BAD_ESCAPE.search(text):
        for match in _ESCAPE.finditer(text):
            if match.group(1) or match.group(2):
                raise ValueError("\\u0000, a lone surrogate or a noncharacter")
    depth = _depth(raw, depth_max)
    if depth > depth_max:
        raise ValueError("nested too deeply")
    long = b"0" * 19 in raw.translate(_DIGITS)  # (19 digits may not fit 64 bits)
    if as_252:
        decoder = _DECODER_LONG_252 if long else _DECODER_252
    else:
        decoder = _DECODER_LONG if long else _DECODER
    if depth == 0:
        try:
            return decoder.decode(text)
        except RecursionError:
            pass
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + DEPTH_MAX + 100)
    try:
        return decoder.decode(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    finally:
        sys.setrecursionlimit(limit)


def encode(message: dict[str, Any]) -> bytes:
    """*message* as sent: compact JSON, UTF-8, its NUL; nested as deep as what is read."""
    try:
        text = json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except RecursionError:
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(limit + DEPTH_MAX + 100)
        try:
            text = json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except RecursionError:
            raise ValueError("nested too deeply") from None
        finally:
            sys.setrecursionlimit(limit)
    return text.encode() + b"\0"  # (UnicodeEncodeError, a ValueError, for a lone surrogate)


def parse_call(message: Any, upgrade_known: bool = True) -> tuple[str, dict[str, Any], bool, bool, bool] | None:
    """(method, parameters, more, oneway, upgrade) of a call, as sd-varlink reads one; None
    for what makes it close the connection: not an object, a key other than ``method``,
    ``parameters``, ``more``, ``oneway`` and ``upgrade`` (252: no ``upgrade``), ``method`` or
    ``parameters`` twice or of the wrong type, a flag that is not a boolean or that comes
    after a flag set true."""
    flags = ("more", "oneway", "upgrade") if upgrade_known else ("more", "oneway")
    if not isinstance(message, dict):
        return None
    method: str | None = None
    parameters: dict[str, Any] | None = None
    seen_parameters = False
    more = oneway = upgrade = False
    pairs = message.pairs if isinstance(message, _Repeated) else message.items()
    for key, value in pairs:
        if key == "method":
            if method is not None or not isinstance(value, str):
                return None
            method = value
        elif key == "parameters":
            if seen_parameters or not (value is None or isinstance(value, dict)):
                return None
            seen_parameters = True
            parameters = value
        elif key in flags:
            if more or oneway or upgrade or not isinstance(value, bool):
                return None
            if key == "more":
                more = value
            elif key == "oneway":
                oneway = value
            else:
                upgrade = value
        else:
            return None
    if method is None:
        return None
    return method, parameters if parameters is not None else {}, more, oneway, upgrade


def repeated_field(parameters: dict[str, Any]) -> str | None:
    """The parameter that InvalidParameter names for a key given twice: the key itself at
    the top, or the parameter inside which an object repeats one (sd-json's dispatch)."""
    if isinstance(parameters, _Repeated):
        seen: set[str] = set()
        for key, _ in parameters.pairs:
            if key in seen:
                return key
            seen.add(key)
    for key, value in parameters.items():
        stack = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, _Repeated):
                return key
            if isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
    return None


class _Turns:
    """Fair shares of the event loop: at most MESSAGES_PER_TURN messages of one user are
    begun per loop iteration, however many connections it has; every message yields once;
    a user whose message took the loop long to read (a big one) waits EXPENSIVE_PAUSE
    times as long before its next one begins, so that it gets a bounded share of the loop."""

    def __init__(self) -> None:
        self.used: dict[int, int] = {}
        self.waiting: dict[int, deque[asyncio.Future[None]]] = {}
        self.scheduled = False
        self.not_before: dict[int, float] = {}

    def cost(self, uid: int, seconds: float) -> None:
        """The loop spent *seconds* at once on a message of *uid*'s."""
        if seconds > EXPENSIVE:
            self.not_before[uid] = max(self.not_before.get(uid, 0.0), time.monotonic()) + seconds * EXPENSIVE_PAUSE

    async def take(self, uid: int) -> None:
        await asyncio.sleep(0)
        pause = self.not_before.get(uid, 0.0) - time.monotonic()
        if pause > 0:
            await asyncio.sleep(pause)
        elif uid in self.not_before:
            del self.not_before[uid]
        while self.used.get(uid, 0) >= MESSAGES_PER_TURN:
            future = asyncio.get_running_loop().create_future()
            self.waiting.setdefault(uid, deque()).append(future)
            self._schedule()
            try:
                await future
            finally:
                if not future.done():
                    future.cancel()
        self.used[uid] = self.used.get(uid, 0) + 1
        self._schedule()

    def _schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self.scheduled = False
        self.used.clear()
        for uid in list(self.waiting):
            waiting = self.waiting[uid]
            woken = 0
            while waiting and woken < MESSAGES_PER_TURN:
                future = waiting.popleft()
                if not future.done():
                    future.set_result(None)
                    woken += 1
            if not waiting:
                del self.waiting[uid]
        if self.waiting:
            self._schedule()


class VarlinkError(Exception):
    """A varlink error reply: its name and parameters."""

    def __init__(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        super().__init__(name)
        self.name = name
        self.parameters = parameters or {}


def system_error_252(code: int) -> tuple[str, dict[str, Any]]:
    """``io.systemd.System`` as systemd 252's sd-varlink sends it: the errno alone."""
    return errors.VL_SYSTEM, {"errno": code}


def invalid_parameter(name: str) -> VarlinkError:
    return VarlinkError(errors.VL_INVALID_PARAMETER, {"parameter": name})


class Reply:
    """Reply parameters with file descriptors; each fd is sent once, then closed."""

    def __init__(self, parameters: dict[str, Any], fds: list[int] | None = None) -> None:
        self.parameters = parameters
        self.fds = fds or []


class Peer:
    """The process at the other end of a connection, as the kernel vouches for it."""

    def __init__(self, sock: socket.socket) -> None:
        # (pid_value and uid_value: pid() and uid() are the Requester's methods)
        self.pid_value, self.uid_value, self.gid = -1, -1, -1
        self.pidfd = -1
        try:
            self.pid_value, self.uid_value, self.gid = _UCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            )
        except OSError:
            pass
        try:
            self.pidfd = _UCRED_FD.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
        except OSError:
            if self.pid_value > 0:  # older kernels: pin the PID; then check it still is the peer's
                try:
                    self.pidfd = os.pidfd_open(self.pid_value)
                except OSError:
                    self.pidfd = -1
        self.pidfd_id = 0
        if self.pidfd >= 0:
            try:
                self.pidfd_id = os.fstat(self.pidfd).st_ino
            except OSError:
                pass

    async def uid(self) -> int:
        return self.uid_value

    async def pid(self) -> int:
        return self.pid_value

    def process_ref(self) -> ProcessRef | None:
        """The peer's process, pinned by a duplicate of its pidfd (None if it has none)."""
        if self.pidfd < 0:
            return None
        ref = ProcessRef(self.pid_value, pidfd=os.dup(self.pidfd), pidfd_id=self.pidfd_id)
        ref.start_time = start_time(self.pid_value)
        return ref

    def polkit_subject(self) -> PolkitSubject:
        return PolkitSubject("unix-process", pidfd=self.pidfd, uid=self.uid_value)

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


_UCRED_FD = struct.Struct("i")


class Call:
    """One method call being served."""

    def __init__(self, connection: Connection, method: str, parameters: dict[str, Any], more: bool,
                 oneway: bool) -> None:  # fmt: skip
        self.connection = connection
        self.method = method
        self.parameters = parameters
        self.more = more
        self.oneway = oneway
        self.peer = connection.peer
        self._previous: Reply | None = None

    @property
    def allow_interactive_authentication(self) -> bool:
        return self.parameters.get("allowInteractiveAuthentication") is True

    async def notify(self, parameters: dict[str, Any], fds: list[int] | None = None) -> None:
        """One of several replies to a ``more`` call; sent with ``continues`` once the next one is known."""
        if not self.more:
            _close_all(fds or [])
            raise VarlinkError(errors.VL_EXPECTED_MORE)
        if self._previous is not None:
            await self.connection.send_reply(self._previous, continues=True)
        self._previous = Reply(parameters, fds)

    async def _finish(self, final: Reply | None, sentinel: str | None) -> None:
        if final is not None:
            if self._previous is not None:
                await self.connection.send_reply(self._previous, continues=True)
                self._previous = None
            await self.connection.send_reply(final)
        elif self._previous is not None:
            previous, self._previous = self._previous, None
            await self.connection.send_reply(previous)
        elif sentinel is not None:
            await self.connection.send_error(sentinel, {})
        else:
            await self.connection.send_reply(Reply({}))

    async def _fail(self, name: str, parameters: dict[str, Any]) -> None:
        if self._previous is not None:
            previous, self._previous = self._previous, None
            await self.connection.send_reply(previous, continues=True)
        await self.connection.send_error(name, parameters)


# A handler gets the call and returns the reply's parameters (or a Reply with fds, or None for
# "{}" or, after notify(), "the last notified one is the last reply"); it may raise VarlinkError
# or BusError.
Handler = Callable[[Call], Awaitable[dict[str, Any] | Reply | None]]


class MethodSpec:
    def __init__(self, handler: Handler, sentinel: str | None = None) -> None:
        self.handler = handler
        self.sentinel = sentinel


class Service:
    """Interfaces and their method handlers, served on one or more sockets."""

    def __init__(self, vendor: str = "", product: str = "", version: str = "", url: str = "",
                 introspection: bool = True, as_252: bool = False) -> None:  # fmt: skip
        self.vendor, self.product, self.version, self.url = vendor, product, version, url
        # Served as systemd 252's sd-varlink does (its only varlink service there: the user
        # database): no "upgrade" key, one more level of nesting, descriptors taken (and
        # closed), errors always with their parameters, a key twice fails with ENOTUNIQ.
        self.as_252 = as_252
        self.interfaces: dict[str, idl.Interface] = {}
        self.methods: dict[str, MethodSpec] = {}
        if introspection:
            from machined.varlink.interfaces import IO_SYSTEMD, ORG_VARLINK_SERVICE

            self.add_interface(ORG_VARLINK_SERVICE)
            self.add_interface(IO_SYSTEMD)
            self.bind("org.varlink.service.GetInfo", self._get_info)
            self.bind("org.varlink.service.GetInterfaceDescription", self._get_interface_description)

    def add_interface(self, interface: idl.Interface) -> None:
        self.interfaces[interface.name] = interface

    def bind(self, method: str, handler: Handler, sentinel: str | None = None) -> None:
        self.methods[method] = MethodSpec(handler, sentinel)

    def declaration(self, method: str) -> tuple[idl.Interface, idl.Method] | None:
        interface_name, _, name = method.rpartition(".")
        interface = self.interfaces.get(interface_name)
        if interface is None:
            return None
        declared = interface.method(name)
        return (interface, declared) if declared is not None else None

    async def _get_info(self, call: Call) -> dict[str, Any]:
        return {"vendor": self.vendor, "product": self.product, "version": self.version, "url": self.url,
                "interfaces": sorted(self.interfaces)}  # fmt: skip

    async def _get_interface_description(self, call: Call) -> dict[str, Any]:
        name = call.parameters.get("interface")
        interface = self.interfaces.get(name) if isinstance(name, str) else None
        if interface is None:
            raise VarlinkError(errors.VL_INTERFACE_NOT_FOUND, {"interface": name})
        return {"description": interface.describe()}


class Connection:
    def __init__(self, server: VarlinkServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.peer = Peer(sock)
        self.loop = asyncio.get_running_loop()
        self.buffer = bytearray()
        self.task: asyncio.Task[None] | None = None
        self._scanned = 0  # (no NUL in buffer[:_scanned])
        self._charged = 0  # (what this connection's buffer counts in its UID's pinned bytes)

    async def serve(self) -> None:
        try:
            while True:
                message = await self._next_message()
                if message is None:
                    return
                await self.server.turns.take(self.peer.uid_value)
                if not await self._dispatch(message):
                    return
        except (ConnectionError, OSError):
            return
        finally:
            self.buffer = bytearray()
            self._charge()
            self.peer.close()
            self.sock.close()

    # ----- reading -------------------------------------------------------------------------

    def _charge(self) -> bool:
        """Count the buffer in its UID's pinned bytes; False once the UID is over its share."""
        size = len(self.buffer)
        if size != self._charged:
            self.server.pin(self.peer.uid_value, size - self._charged)
            self._charged = size
        return not self.server.over_pinned(self.peer.uid_value)

    async def _next_message(self) -> bytes | None:
        """The next NUL-terminated message; None to close (the peer's end, an overflow)."""
        end = self.buffer.find(0, self._scanned)
        while end < 0:
            self._scanned = len(self.buffer)
            over = not self._charge() and len(self.buffer) > 0  # (the user's share is full, and this adds to it)
            if len(self.buffer) > BUFFER_MAX or over:
                return None
            data = await self.loop.sock_recv(self.sock, READ_SIZE)
            if not data:
                return None
            self.buffer += data
            end = self.buffer.find(0, self._scanned)
        message = bytes(self.buffer[:end])
        del self.buffer[: end + 1]
        self._scanned = 0
        self._charge()
        return message

    async def _run(self, handler: Handler, call: Call) -> dict[str, Any] | Reply | None:
        """Run *handler*; if the peer hangs up meanwhile, cancel it (its subscriptions,
        descriptors and waits are let go of at once) and end the connection."""
        task: asyncio.Future[dict[str, Any] | Reply | None] = asyncio.ensure_future(handler(call))
        hangup: asyncio.Future[None] = self.loop.create_future()
        fd = self.sock.fileno()
        self.server.hangups.watch(fd, hangup)
        try:
            await asyncio.wait((task, hangup), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            self.server.hangups.unwatch(fd)
            if not hangup.done():
                hangup.cancel()
        if not task.done():
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: BLE001 (whatever it ends with: the peer is gone)
                pass
            raise ConnectionResetError("the peer hung up during a call")
        result: dict[str, Any] | Reply | None = task.result()
        return result

    # ----- calls ---------------------------------------------------------------------------

    async def _dispatch(self, raw: bytes) -> bool:
        """Serve one message; False to close the connection (a protocol violation)."""
        start = time.monotonic()
        as_252 = self.server.service.as_252
        try:
            message = decode(raw, DEPTH_MAX_252 if as_252 else DEPTH_MAX, as_252)
        except ValueError:
            return False
        finally:
            self.server.turns.cost(self.peer.uid_value, time.monotonic() - start)
        parsed = parse_call(message, upgrade_known=not as_252)
        if parsed is None:
            return False
        method, parameters, more, oneway, upgrade = parsed
        call = Call(self, method, parameters, more, oneway)
        spec = self.server.service.methods.get(method)
        if spec is None:
            if not oneway:
                await self.send_error(errors.VL_METHOD_NOT_FOUND, {"method": method})
            return True
        declared = self.server.service.declaration(method)
        bad: str | None = None
        if declared is not None:
            try:
                idl.validate_call(declared[0], declared[1], call.parameters, more)
            except idl.ExpectedMore:
                if not oneway:
                    await self.send_error(errors.VL_EXPECTED_MORE, {})
                return True
            except idl.Invalid as e:
                bad = e.field or method
        if bad is None and not as_252:
            bad = refused_null(method, call.parameters)
        if bad is not None:
            if not oneway:
                await self.send_error(errors.VL_INVALID_PARAMETER, {"parameter": bad})
            return True
        repeated = repeated_field(parameters)
        if repeated is not None:  # (262: sd-json's dispatch names it; 252's fails the call with ENOTUNIQ)
            if not oneway:
                await self.send_error(*(
                    (errors.VL_INVALID_PARAMETER, {"parameter": repeated}) if not self.server.service.as_252
                    else system_error_252(errno.ENOTUNIQ)
                ))  # fmt: skip
            return True
        if upgrade and method in UPGRADE_REFUSED:
            await self.send_error(*errors.system_error(errno.EUCLEAN))
            return True
        token = caller.current.set(self.peer)
        try:
            result = await self._run(spec.handler, call)
        except VarlinkError as e:
            if not oneway:
                await call._fail(e.name, e.parameters)
            return True
        except BusError as e:
            if not oneway:
                await call._fail(*errors.varlink_error(e))
            return True
        except ConnectionResetError:  # (the peer hung up, or the handler ended the connection)
            raise
        except OSError as e:
            if not oneway:
                await call._fail(*errors.system_error(e.errno or errno.EIO))
            return True
        except Exception:
            log.exception("varlink method %s failed", method)
            if not oneway:
                await call._fail(*errors.system_error(errno.EIO))
            return True
        finally:
            caller.current.reset(token)
        if oneway:
            if isinstance(result, Reply):
                _close_all(result.fds)
            return True
        if isinstance(result, dict):
            result = Reply(result)
        await call._finish(result, spec.sentinel if more else None)
        return True

    # ----- writing -------------------------------------------------------------------------

    async def send_reply(self, reply: Reply, continues: bool = False) -> None:
        message: dict[str, Any] = {}
        if reply.parameters:
            message["parameters"] = reply.parameters
        if continues:
            message["continues"] = True
        try:
            await self._send(message, reply.fds)
        finally:
            _close_all(reply.fds)

    async def send_error(self, name: str, parameters: dict[str, Any]) -> None:
        message: dict[str, Any] = {"error": name}
        if parameters or self.server.service.as_252:  # (252 always sends them, {} if none)
            message["parameters"] = parameters
        await self._send(message, [])

    async def _send(self, message: dict[str, Any], fds: list[int]) -> None:
        try:
            data = encode(message)
        except ValueError as e:  # (not JSON as sd-json writes it: nothing is sent)
            log.warning("varlink reply not sent, closing the connection: %s", e)
            raise ConnectionResetError("unencodable reply") from None
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
            while True:
                try:
                    sent = self.sock.sendmsg([data], ancillary)
                    break
                except BlockingIOError:
                    await self._writable()
            data = data[sent:]
        if data:
            await self.loop.sock_sendall(self.sock, data)

    async def _writable(self) -> None:
        future = self.loop.create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        self.loop.add_writer(self.sock.fileno(), wake)
        try:
            await future
        finally:
            self.loop.remove_writer(self.sock.fileno())


def _refuse_descriptors(sock: socket.socket) -> None:
    """Nothing we serve takes file descriptors: sending one fails at the sender's sendmsg()
    (EPERM), as with sd-varlink 262 (252 takes them and closes them unread, as we do there and
    on kernels before 6.16)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS, 0)
    except OSError:
        pass


def _reap(live: set[Connection]) -> None:
    """A user at its limit: its connections whose peers hung up are ended now (with what they
    had sent and is not served yet), not once that is read, so that they leave their slots."""
    poller = select.poll()
    by_fd = {}
    for connection in live:
        fd = connection.sock.fileno()
        if fd >= 0:
            poller.register(fd, 0)
            by_fd[fd] = connection
    for fd, events in poller.poll(0):
        connection = by_fd[fd]
        if events & (select.POLLHUP | select.POLLERR) and connection.task is not None:
            connection.task.cancel()
            live.discard(connection)


class _Hangups:
    """Peers that hang up while one of their calls runs: one epoll instance for all of a
    server's connections, each watched for EPOLLHUP only while a call of it runs (what it
    sends meanwhile is not read, as in sd-varlink; a peer that only shuts its sending side
    still gets its answer)."""

    def __init__(self) -> None:
        self.epoll: select.epoll | None = None
        self.waiting: dict[int, asyncio.Future[None]] = {}

    def watch(self, fd: int, hangup: asyncio.Future[None]) -> None:
        if self.epoll is None:
            self.epoll = (
                select.epoll(flags=select.EPOLL_CLOEXEC) if hasattr(select, "EPOLL_CLOEXEC") else select.epoll()
            )
            asyncio.get_running_loop().add_reader(self.epoll.fileno(), self._ready)
        try:
            self.epoll.register(fd, select.EPOLLRDHUP)
        except OSError:
            return
        self.waiting[fd] = hangup

    def unwatch(self, fd: int) -> None:
        if self.waiting.pop(fd, None) is not None and self.epoll is not None:
            try:
                self.epoll.unregister(fd)
            except OSError:
                pass

    def _ready(self) -> None:
        assert self.epoll is not None
        for fd, events in self.epoll.poll(0):
            hangup = self.waiting.get(fd)
            if hangup is not None and events & (select.EPOLLHUP | select.EPOLLERR) and not hangup.done():
                hangup.set_result(None)
            self.unwatch(fd)

    def close(self) -> None:
        if self.epoll is not None:
            try:
                asyncio.get_running_loop().remove_reader(self.epoll.fileno())
            except RuntimeError:
                pass
            self.epoll.close()
            self.epoll = None
        self.waiting.clear()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class VarlinkServer:
    """Serves a :class:`Service` on Unix socket paths it binds, or on sockets it is handed
    (socket activation)."""

    def __init__(self, service: Service, paths: list[str] | None = None, mode: int = 0o666,
                 sockets: list[socket.socket] | None = None) -> None:  # fmt: skip
        self.service = service
        self.paths = list(paths or [])
        self.mode = mode
        self._given = list(sockets or [])
        self._listeners: list[socket.socket] = []
        self._bound: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting: list[asyncio.Task[None]] = []
        self._by_uid: dict[int, set[Connection]] = {}
        self._pinned: dict[int, int] = {}
        self.turns = _Turns()
        self.hangups = _Hangups()

    def pin(self, uid: int, size: int) -> None:
        """Count *size* more (or fewer) bytes of unread input for *uid*."""
        left = self._pinned.get(uid, 0) + size
        if left > 0:
            self._pinned[uid] = left
        else:
            self._pinned.pop(uid, None)

    def over_pinned(self, uid: int) -> bool:
        return uid not in UNPINNED_UIDS and self._pinned.get(uid, 0) > UID_PINNED_MAX

    @property
    def path(self) -> str:
        return self.paths[0]

    async def start(self) -> None:
        for path in self.paths:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            try:
                os.unlink(path)  # a socket left by an earlier instance
            except FileNotFoundError:
                pass
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.bind(path)
                os.chmod(path, self.mode)
                sock.listen(socket.SOMAXCONN)
            except OSError:
                sock.close()
                raise
            self._bound.append(path)
            self._listeners.append(sock)
        self._listeners.extend(self._given)
        for sock in self._listeners:
            sock.setblocking(False)
            if not self.service.as_252:
                _refuse_descriptors(sock)  # (connections inherit it before they are accepted)
            self._accepting.append(asyncio.get_running_loop().create_task(self._accept(sock)))

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await asyncio.sleep(0.1)  # out of descriptors: let others finish first
                    continue
                raise
            await asyncio.sleep(0)  # (a flood of connections takes its turn as messages do)
            if len(self._tasks) >= CONNECTIONS_MAX:
                sock.close()
                continue
            sock.setblocking(False)
            if not self.service.as_252:
                _refuse_descriptors(sock)
            connection = Connection(self, sock)
            uid = connection.peer.uid_value
            live = self._by_uid.setdefault(uid, set())
            if len(live) >= CONNECTIONS_PER_UID_MAX:
                _reap(live)
            if len(live) >= CONNECTIONS_PER_UID_MAX:
                connection.peer.close()
                sock.close()
                continue
            live.add(connection)
            connection.task = loop.create_task(connection.serve())
            self._tasks.add(connection.task)
            connection.task.add_done_callback(self._tasks.discard)

            def forget(_task: asyncio.Task[None], connection: Connection = connection, uid: int = uid) -> None:
                live = self._by_uid.get(uid)
                if live is not None:
                    live.discard(connection)
                    if not live:
                        del self._by_uid[uid]

            connection.task.add_done_callback(forget)

    async def stop(self) -> None:
        for task in self._accepting:
            task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._accepting, *self._tasks, return_exceptions=True)
        for sock in self._listeners:
            sock.close()
        for path in self._bound:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._listeners.clear()
        self._bound.clear()
        self.hangups.close()


SD_LISTEN_FDS_START = 3


def listen_fds(name: str) -> list[socket.socket]:
    """The listening sockets systemd passed us for *name* (``FileDescriptorName=``), as sockets.

    Follows sd_listen_fds(): ``LISTEN_PID`` must be us; descriptors from 3 on, named by
    ``LISTEN_FDNAMES``. The variables stay for other names; the descriptors taken are marked
    close-on-exec."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    out = []
    for i in range(count):
        if (names[i] if i < len(names) else "unknown") != name:
            continue
        fd = SD_LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
            out.append(socket.socket(fileno=fd))
        except OSError:
            continue
    return out

"""Routing of incoming method calls to objects, with sd-bus's generic behaviour.

dbus-fast's ``ServiceInterface`` cannot tell a method who called it, cannot
resolve objects on demand from the path (machine objects, ``/machine/self``),
and answers errors with its own names. So every method call addressed to us is
handled here: Peer on any path; Introspectable and Properties (``GetAll("")``
included, hidden properties for Get only) on known objects; argument
signatures checked against the interface XML; errors named and worded as
sd-bus does. A call that never waits (lookups, lists, properties) is answered
on the spot; one whose handler waits is answered when the handler finishes.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import functools
import inspect
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from types import CoroutineType
from typing import Any, Protocol, final

from dbus_fast import Message, MessageFlag, MessageType, SignatureTree, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.signature import get_signature_tree

from machined import caller, errors
from machined.clients.bus import call_bus_daemon
from machined.dbus import internals
from machined.dbus.fair import FairQueue, estimated_size
from machined.dbus.introspection import Interface, Method, Property, introspect_xml
from machined.errors import BusError

log = logging.getLogger(__name__)

PEER = "org.freedesktop.DBus.Peer"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
PROPERTIES = "org.freedesktop.DBus.Properties"


@dataclass(frozen=True)
class Credentials:
    pid: int
    uid: int


class CredentialCache:
    """Credentials by unique bus name. A bus never reuses a unique name, and a connection's
    credentials are fixed when it connects, so an entry never goes stale; the cache is bounded."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._entries: OrderedDict[str, Credentials] = OrderedDict()
        self.learned: Callable[[str, Credentials], None] | None = None  # told of each new entry

    def get(self, sender: str) -> Credentials | None:
        creds = self._entries.get(sender)
        if creds is not None:
            self._entries.move_to_end(sender)
        return creds

    def put(self, sender: str, creds: Credentials) -> None:
        self._entries[sender] = creds
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)
        if self.learned is not None:
            self.learned(sender, creds)


class Call:
    """One incoming method call, with what handlers may need to know of its sender."""

    transport = "dbus"  # (see machined.caller.over_dbus)

    def __init__(self, bus: MessageBus, message: Message, cache: CredentialCache | None = None) -> None:
        self.bus = bus
        self.message = message
        self._cache = cache
        self._credentials: Credentials | None = None

    @property
    def sender(self) -> str:
        return self.message.sender or ""

    @property
    def allow_interactive_authorization(self) -> bool:
        return bool(self.message.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)

    def known_credentials(self) -> Credentials | None:
        """The sender's credentials if known without asking the bus (cached), else None."""
        if self._credentials is None and self._cache is not None:
            self._credentials = self._cache.get(self.sender)
        return self._credentials

    async def credentials(self) -> Credentials:
        """The sender's PID and UID, as the bus daemon knows them (never from arguments)."""
        if self._credentials is None and self._cache is not None:
            self._credentials = self._cache.get(self.sender)
        if self._credentials is None:
            try:
                (creds,) = await call_bus_daemon(self.bus, "GetConnectionCredentials", "s", [self.sender])
            except BusError:
                raise BusError.from_errno(errno.ESRCH, "Failed to get credentials of the caller") from None
            self._credentials = Credentials(pid=int(creds["ProcessID"].value), uid=int(creds["UnixUserID"].value))
            if self._cache is not None and self.sender:
                self._cache.put(self.sender, self._credentials)
        return self._credentials

    async def uid(self) -> int:
        """The requester's UID (:class:`machined.caller.Requester`)."""
        return (await self.credentials()).uid

    async def pid(self) -> int:
        """The requester's PID (:class:`machined.caller.Requester`)."""
        return (await self.credentials()).pid


class FdReply:
    """Out-arguments carrying file descriptors: each ``h`` value is an index into *fds*.

    The dispatcher sends the descriptors with the reply and then closes them.
    """

    def __init__(self, body: list[Any], fds: list[int]) -> None:
        self.body = body
        self.fds = fds


Handler = Callable[..., Any]
# The value of a property, or an awaitable of it (for one that must be read off the event loop).
PropertyGetter = Callable[..., Any]


class MarshalledBody:
    """Out-arguments already on the wire (little-endian, as dbus-fast writes), for large replies
    assembled from cached parts. *empty* is the same signature's body with no elements (``[[]]``
    for an array), which dbus-fast marshals to build the header."""

    __slots__ = ("data", "empty")

    def __init__(self, data: bytes, empty: list[Any]) -> None:
        self.data = data
        self.empty = empty


@dataclass(eq=False)
class BusObject:
    """What one object path offers: interfaces, their handlers and property values.

    Handlers are plain functions for calls that never wait (lookups, lists: answered without
    a coroutine or task) or coroutine functions; either returns the list of out-arguments
    (None when there are none), an :class:`FdReply` or a :class:`MarshalledBody`.

    Objects of one kind (every machine) share tables built once: their *target* (the
    machine) is then passed first to every handler, getter and setter. With no target,
    the tables' callables are bound to their object already.
    """

    interfaces: list[Interface] = field(default_factory=list)
    # (interface, member) → function([target,] call, *args).
    methods: dict[tuple[str, str], Handler] = field(default_factory=dict)
    # (interface, property) → getter([target]) of the plain value (or an awaitable of it).
    properties: dict[tuple[str, str], PropertyGetter] = field(default_factory=dict)
    # Answer Get but stay out of GetAll and introspection: (iface, prop) → (signature, getter).
    hidden_properties: dict[tuple[str, str], tuple[str, PropertyGetter]] = field(default_factory=dict)
    # (interface, property) → coroutine function([target,] call, value) for writable properties.
    setters: dict[tuple[str, str], Handler] = field(default_factory=dict)
    children: list[str] = field(default_factory=list)
    target: Any = None

    def interface(self, name: str) -> Interface | None:
        for iface in self.interfaces:
            if iface.name == name:
                return iface
        return None


class Later:
    """Returned by :meth:`ObjectTree.lookup_now` when only an awaited lookup can tell."""


LATER = Later()


class ObjectTree(Protocol):
    async def lookup(self, path: str, call: Call) -> BusObject | None:
        """The object at *path* as *call*'s sender sees it, or None if there is none."""

    # Optional: def lookup_now(self, path: str, call: Call) -> BusObject | None | Later
    # answers without waiting when it can (most paths), LATER when lookup() must be awaited.


METHOD_CALL = MessageType.METHOD_CALL
METHOD_RETURN = MessageType.METHOD_RETURN
ERROR = MessageType.ERROR
NO_REPLY_EXPECTED = MessageFlag.NO_REPLY_EXPECTED
_NO_REPLY_EXPECTED = int(MessageFlag.NO_REPLY_EXPECTED)
_PEER_MEMBERS = ("Ping", "GetMachineId")
_PROPERTIES_MEMBERS = ("Get", "GetAll", "Set")
_EMPTY = get_signature_tree("")
_STRING = get_signature_tree("s")
_VARIANT = get_signature_tree("v")
_DICT = get_signature_tree("a{sv}")
LIMITS_EXCEEDED = "org.freedesktop.DBus.Error.LimitsExceeded"
# Calls answered as they arrive in one turn of the event loop while none wait (the common case:
# no queue, no extra turn); after that, or while any wait, calls go to their sender's queue.
INLINE_PER_TURN = 8
TURN_CALLS = 64  # calls served from the queues in one turn of the event loop at most...
TURN_SECONDS = 0.00025  # ... and for about this long, before the loop (and the bus reader) runs again
# Calls of one connection (not root's) that wait at once (for polkit, systemd, a thread, a child);
# its next calls wait their turn in its queue until one of those is answered.
MAX_WAITING_CALLS = 4


def _return(msg: Message, signature: SignatureTree = _EMPTY, body: list[Any] | None = None,
            unix_fds: list[int] | None = None) -> Message:  # fmt: skip
    """A method return as sd-bus builds one (flagged as expecting no reply). Not validated:
    the destination is the caller's unique name as the bus gave it, the signature ours."""
    return Message(message_type=METHOD_RETURN, reply_serial=msg.serial, destination=msg.sender,
                   flags=NO_REPLY_EXPECTED, signature=signature, body=body if body is not None else [],
                   unix_fds=unix_fds if unix_fds is not None else [], validate=False)  # fmt: skip


def _error(msg: Message, e: BaseException) -> Message:
    """The error reply for exception *e*; call it from the ``except`` block that caught *e*."""
    if isinstance(e, BusError):
        name, text = e.name, e.message
    elif isinstance(e, OSError):
        code = e.errno or errno.EIO
        name, text = errors.errno_error_name(code), e.strerror or str(e)
    else:  # never a traceback to the client, never a crash
        log.exception("Internal error while handling %s.%s", msg.interface, msg.member)
        name, text = errors.FAILED, "Internal error"
    # sd-bus flags every reply (and error) it sends as expecting no reply.
    return Message(message_type=ERROR, reply_serial=msg.serial, destination=msg.sender, flags=NO_REPLY_EXPECTED,
                   error_name=name, signature=_STRING, body=[text], validate=False)  # fmt: skip


def _is_awaitable(value: Any) -> bool:
    return type(value) is CoroutineType or (
        value is not None and type(value) not in _PLAIN and inspect.isawaitable(value)
    )


_PLAIN = frozenset({list, tuple, str, int, bool, bytes, dict, float, FdReply, MarshalledBody})


Finish = Callable[[Any], Message]


@final
class _Later:
    """A reply that must wait: for *awaitable*, whose result *finish* turns into the reply
    (without *finish*, the result is the reply)."""

    __slots__ = ("awaitable", "finish")

    def __init__(self, awaitable: Awaitable[Any], finish: Finish | None = None) -> None:
        self.awaitable = awaitable
        self.finish = finish

    def __await__(self) -> Any:
        return _settle(self).__await__()


async def _settle(outcome: Message | _Later) -> Message:
    if type(outcome) is not _Later:
        return outcome
    value = await outcome.awaitable
    return outcome.finish(value) if outcome.finish is not None else value


def _finish(msg: Message, finish: Finish | None, value: Any) -> Message:
    """The reply from a waited-for result; call it outside any ``except`` block."""
    if finish is None:
        reply: Message = value
        return reply
    try:
        return finish(value)
    except Exception as e:
        return _error(msg, e)


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


class Dispatcher:
    """Answers every method call that reaches our connection.

    A call is answered right where dbus-fast hands it over when nothing on its way waits
    (lookups, lists, properties): no coroutine, task or context. A call whose handler
    (or object lookup) waits, for systemd, polkit or a child process, continues as a
    coroutine in a context of its own, where it is the current requester, and as a task
    from where it first waits.
    """

    def __init__(self, bus: MessageBus, tree: ObjectTree, machine_id: str) -> None:
        self.bus = bus
        self.tree = tree
        self.machine_id = machine_id
        self._lookup_now = getattr(tree, "lookup_now", None)
        # dbus-fast's writer as machined.dbus.internals knows it: replies may bypass its queue.
        self._direct_writes = internals.direct_writes(bus)
        self._tasks: set[asyncio.Task[None]] = set()
        self.credentials = CredentialCache()
        # Calls wait until the registry is loaded, so nobody sees half of it.
        self.ready = asyncio.Event()
        # Told of every call answered: (interface, member, error name or None, seconds).
        self.observe: Callable[[str | None, str | None, str | None, float], None] | None = None
        # Calls waiting to be served, per sender (machined.dbus.fair).
        self.queue: FairQueue[tuple[Message, float]] = FairQueue()
        self._inline = INLINE_PER_TURN
        self._turn: asyncio.Handle | None = None
        self._warned: OrderedDict[str, None] = OrderedDict()
        self._waiting: dict[str, int] = {}  # calls that wait (tasks), per sender not root
        self._privileged_uids = (0, os.geteuid())
        self.credentials.learned = self._learned

    def install(self) -> None:
        self.bus.add_message_handler(self._on_message)

    def _on_message(self, message: Message) -> bool:
        if message.message_type is not METHOD_CALL:
            return False
        started = time.perf_counter()
        queue = self.queue
        sender = message.sender or ""
        if not queue and self._inline and not (self._waiting and queue.held(sender)):
            self._inline -= 1
            if not self._inline:
                self._next_turn()
            self._serve(message, started)
            return True
        creds = self.credentials.get(sender)
        root = creds is not None and creds.uid in self._privileged_uids
        no_reply = bool(message.flags.value & _NO_REPLY_EXPECTED)
        if queue.push(sender, (message, started), estimated_size(message.body), root, no_reply):
            self._next_turn()
        else:
            self._over_bound(message, started)
        return True

    def _next_turn(self) -> None:
        if self._turn is None:
            self._turn = asyncio.get_running_loop().call_soon(self._serve_turn)

    def _serve_turn(self) -> None:
        """Serve waiting calls, one per sender in turn, until the turn's share is used."""
        self._turn = None
        self._inline = INLINE_PER_TURN
        queue = self.queue
        if not queue.ready():
            return
        until = time.perf_counter() + TURN_SECONDS
        for _ in range(TURN_CALLS):
            message, started = queue.pop()
            self._serve(message, started)
            if not queue.ready() or time.perf_counter() > until:
                break
        if queue.ready():
            self._next_turn()

    def _over_bound(self, message: Message, started: float) -> None:
        """A call from a sender with too many waiting: an error if it expects a reply, else dropped."""
        sender = message.sender or ""
        if sender not in self._warned:
            log.warning("%s has %d calls waiting: more are refused (or dropped if they expect no reply)",
                        sender, self.queue.waiting(sender))  # fmt: skip
            self._warned[sender] = None
            if len(self._warned) > 1024:
                self._warned.popitem(last=False)
            if self.credentials.get(sender) is None:  # learn whose it is: root's are never bounded
                task = asyncio.get_running_loop().create_task(self._learn(message))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        if message.flags.value & _NO_REPLY_EXPECTED:
            message.body = []
            if self.observe is not None:
                self.observe(message.interface, message.member, LIMITS_EXCEEDED, time.perf_counter() - started)
            return
        try:
            raise BusError(LIMITS_EXCEEDED, "Too many calls from this connection are waiting to be served.")
        except BusError as e:
            self._answer(message, _error(message, e), started)

    async def _learn(self, message: Message) -> None:
        """Ask the bus whose connection sent *message* (cached for its next calls); best effort."""
        try:
            await Call(self.bus, message, self.credentials).credentials()
        except Exception:  # noqa: BLE001 (gone, or the bus could not say: it stays bounded)
            pass

    def _serve(self, message: Message, started: float) -> None:
        call = Call(self.bus, message, self.credentials)
        if self.ready.is_set():
            try:
                outcome = self._dispatch(call)
            except Exception as e:
                outcome = _error(message, e)
            if type(outcome) is not _Later:
                self._answer(message, outcome, started)
                return
        else:
            outcome = _Later(self._dispatch_when_ready(call))
        # A call that waits runs in a context of its own, where it is the current requester;
        # as far as it goes without waiting, right here, then as a task.
        awaitable, finish = outcome.awaitable, outcome.finish
        coro = awaitable if type(awaitable) is CoroutineType else _await(awaitable)
        context = contextvars.copy_context()
        context.run(caller.current.set, call)
        try:
            waiting_on = context.run(coro.send, None)
        except StopIteration as done:
            self._answer(message, _finish(message, finish, done.value), started)
            return
        except Exception as e:
            self._answer(message, _error(message, e), started)
            return
        task = asyncio.get_running_loop().create_task(
            self._answer_later(coro, waiting_on, finish, message, started), context=context
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        sender = message.sender or ""
        creds = self.credentials.get(sender)
        if creds is None or creds.uid not in self._privileged_uids:
            waiting = self._waiting[sender] = self._waiting.get(sender, 0) + 1
            if waiting >= MAX_WAITING_CALLS:
                self.queue.hold(sender)
            task.add_done_callback(functools.partial(self._answered, sender))

    def _learned(self, sender: str, creds: Credentials) -> None:
        """A sender turned out to be root's: from now on first, never bounded nor held."""
        if creds.uid not in self._privileged_uids:
            return
        self._waiting.pop(sender, None)
        self.queue.promote(sender)
        if self.queue.held(sender):
            self.queue.release(sender)
            self._next_turn()

    def _answered(self, sender: str, _task: asyncio.Task[None]) -> None:
        """One of *sender*'s calls that waited is answered: its next may be served."""
        waiting = self._waiting.pop(sender, 1) - 1
        if waiting > 0:
            self._waiting[sender] = waiting
        if waiting < MAX_WAITING_CALLS and self.queue.held(sender):
            self.queue.release(sender)
            self._next_turn()

    async def _answer_later(self, coro: Coroutine[Any, Any, Any], waiting_on: Any, finish: Finish | None,
                            message: Message, started: float) -> None:  # fmt: skip
        try:
            value = await _resume(coro, waiting_on)
        except Exception as e:
            reply = _error(message, e)
        else:
            reply = _finish(message, finish, value)
        self._answer(message, reply, started)

    async def _dispatch_when_ready(self, call: Call) -> Message:
        await self.ready.wait()
        return await _settle(self._dispatch(call))

    def _answer(self, message: Message, reply: Message, started: float) -> None:
        fds = reply.unix_fds
        sent = None
        if not message.flags.value & _NO_REPLY_EXPECTED:
            try:
                sent = self._send(reply)
            except Exception as e:  # a reply that cannot be marshalled: the caller gets an error
                try:
                    sent = self._send(_error(message, e))
                except Exception:
                    log.exception("Failed to send reply to %s", message.sender)
        if fds:
            # The descriptors go out with the reply: close them once it is written.
            if sent is None or sent.done():
                _close_all(fds)
            else:
                sent.add_done_callback(lambda _f: _close_all(fds))
        # The connection's reader keeps the last message it read until the next one
        # comes: drop the arguments now, or one large call stays in memory for long.
        message.body = []
        if self.observe is not None:
            self.observe(message.interface, message.member, reply.error_name, time.perf_counter() - started)

    def _send(self, reply: Message) -> asyncio.Future[None] | None:
        """Write *reply* (past dbus-fast's queue when nothing waits in it: machined.dbus.internals).
        None when written (or left to the writer)."""
        return internals.send(self.bus, reply, self._direct_writes)

    def _dispatch(self, call: Call) -> Message | _Later:
        """The reply, or how to get it when something on the way must wait."""
        msg = call.message
        iface, member = msg.interface, msg.member
        if iface == PEER or (iface is None and member in _PEER_MEMBERS):
            return self._peer(msg)
        obj = self._lookup_now(msg.path, call) if self._lookup_now is not None else LATER
        if obj is LATER:
            return _Later(self._dispatch_after_lookup(call))
        return self._dispatch_to(call, obj)  # type: ignore[arg-type]

    async def _dispatch_after_lookup(self, call: Call) -> Message:
        path = call.message.path
        assert path is not None  # the bus daemon delivers no method call without a path
        obj = await self.tree.lookup(path, call)
        return await _settle(self._dispatch_to(call, obj))

    def _dispatch_to(self, call: Call, obj: BusObject | None) -> Message | _Later:
        msg = call.message
        iface, member = msg.interface, msg.member
        if obj is None:
            raise BusError(errors.UNKNOWN_OBJECT, f"Unknown object '{msg.path}'.")
        if iface == INTROSPECTABLE or (iface is None and member == "Introspect"):
            if member == "Introspect":
                _check_signature(msg, INTROSPECTABLE, "")
                return _return(msg, _STRING, [introspect_xml(obj.interfaces, obj.children)])
        elif iface == PROPERTIES or (iface is None and member in _PROPERTIES_MEMBERS):
            if member in _PROPERTIES_MEMBERS:
                return self._properties(call, obj)
        else:
            target = obj.interface(iface) if iface else _find_member(obj, member)
            if target is not None and member in target.methods:
                spec = target.methods[member]
                if spec.privileged:
                    return _Later(self._call_privileged(call, obj, target, spec))
                return self._call(call, obj, target, spec)
        raise BusError(errors.UNKNOWN_METHOD, f"Unknown method {member} or interface {iface}.")

    def _call(self, call: Call, obj: BusObject, iface: Interface, spec: Method) -> Message | _Later:
        msg = call.message
        _check_signature(msg, iface.name, spec.in_signature, spec.name)
        handler = obj.methods.get((iface.name, spec.name))
        if handler is None:
            raise BusError(errors.NOT_SUPPORTED, f"{spec.name} is not implemented yet")
        if obj.target is None:
            result = handler(call, *msg.body)
        else:
            result = handler(obj.target, call, *msg.body)
        if _is_awaitable(result):
            return _Later(result, lambda value: _method_return(msg, spec, value))
        return _method_return(msg, spec, result)

    async def _call_privileged(self, call: Call, obj: BusObject, iface: Interface, spec: Method) -> Message:
        if (await call.credentials()).uid not in (0, os.geteuid()):  # (sd-bus: the bus owner's user is privileged)
            raise BusError(errors.ACCESS_DENIED, f"Access to {iface.name}.{spec.name}() not permitted.")
        return await _settle(self._call(call, obj, iface, spec))

    def _peer(self, msg: Message) -> Message:
        if msg.member == "Ping":
            _check_signature(msg, PEER, "")
            return _return(msg)
        if msg.member == "GetMachineId":
            _check_signature(msg, PEER, "")
            return _return(msg, _STRING, [self.machine_id])
        raise BusError(errors.UNKNOWN_METHOD, f"Unknown method {msg.member} or interface {msg.interface}.")

    def _properties(self, call: Call, obj: BusObject) -> Message | _Later:
        msg = call.message
        target = obj.target
        if msg.member == "Get":
            _check_signature(msg, PROPERTIES, "ss")
            iface_name, prop = msg.body
            iface = obj.interface(iface_name)
            if iface is not None and prop in iface.properties:
                spec = iface.properties[prop]
                getter = obj.properties[(iface_name, prop)]
                value = getter() if target is None else getter(target)
                if _is_awaitable(value):
                    return _Later(value, lambda v: _return(msg, _VARIANT, [Variant(spec.type, v)]))
                return _return(msg, _VARIANT, [Variant(spec.type, value, False)])
            hidden = obj.hidden_properties.get((iface_name, prop))
            if hidden is not None:
                value = hidden[1]() if target is None else hidden[1](target)
                if _is_awaitable(value):
                    return _Later(value, lambda v: _return(msg, _VARIANT, [Variant(hidden[0], v)]))
                return _return(msg, _VARIANT, [Variant(hidden[0], value)])
            raise BusError(errors.UNKNOWN_PROPERTY, f"Unknown interface {iface_name} or property {prop}.")
        if msg.member == "GetAll":
            _check_signature(msg, PROPERTIES, "s")
            (iface_name,) = msg.body
            if iface_name:
                iface = obj.interface(iface_name)
                if iface is None:
                    raise BusError(errors.UNKNOWN_INTERFACE, f"Unknown interface '{iface_name}'.")
                selected = [iface]
            else:
                selected = obj.interfaces
            properties = obj.properties
            if target is not None and hasattr(target, "get_all_cache") and internals.marshalling_known():
                cached = _get_all_cached(msg, target, selected, properties)
                if cached is not None:
                    return cached
            values: dict[str, Any] = {}
            pending: list[tuple[str, Property, Any]] = []
            for i in selected:
                name = i.name
                for p in i.properties.values():
                    getter = properties[(name, p.name)]
                    value = getter() if target is None else getter(target)
                    if _is_awaitable(value):
                        pending.append((p.name, p, value))
                        values[p.name] = None  # keeps the order
                    else:
                        values[p.name] = Variant(p.type, value, False)
            if pending:
                return _Later(_get_all_later(msg, values, pending))
            return _return(msg, _DICT, [values])
        return _Later(self._set(call, obj))

    async def _set(self, call: Call, obj: BusObject) -> Message:
        msg = call.message
        _check_signature(msg, PROPERTIES, "ssv")
        iface_name, prop, value = msg.body
        iface = obj.interface(iface_name)
        if iface is None or prop not in iface.properties:
            raise BusError(errors.UNKNOWN_PROPERTY, f"Unknown interface {iface_name} or property {prop}.")
        spec = iface.properties[prop]
        setter = obj.setters.get((iface_name, prop))
        if not spec.writable or setter is None:
            raise BusError(errors.PROPERTY_READ_ONLY, f"Property '{prop}' is not writable.")
        if value.signature != spec.signature:
            raise BusError(
                errors.INVALID_ARGS,
                f"Incorrect signature when setting property '{prop}', "
                f"expected '{spec.signature}', got '{value.signature}'.",
            )
        if obj.target is None:
            await setter(call, value.value)
        else:
            await setter(obj.target, call, value.value)
        return _return(msg)


_EMPTY_DICT: list[Any] = [{}]


def _get_all_cached(msg: Message, target: Any, selected: list[Interface],
                    properties: dict[tuple[str, str], PropertyGetter]) -> Message | None:  # fmt: skip
    """GetAll of an object of a shared kind (a machine) from its body as last marshalled, as long
    as every value is what it was then; None if a getter returns an awaitable."""
    names = tuple(i.name for i in selected)
    specs = _GET_ALL_SPECS.get(names)
    if specs is None:
        specs = _GET_ALL_SPECS[names] = [(i.name, p) for i in selected for p in i.properties.values()]
    key = (names, *[properties[(name, p.name)](target) for name, p in specs])
    cache = target.get_all_cache
    if cache is None or cache[0] != key:
        values = key[1:]
        if not all(type(v) in _PLAIN for v in values):
            for v in values:
                if type(v) is CoroutineType:
                    v.close()
            return None
        body = internals.marshal_body(
            "a{sv}", [{p.name: Variant(p.type, v, False) for (_, p), v in zip(specs, values, strict=True)}]
        )
        cache = target.get_all_cache = (key, MarshalledBody(body, _EMPTY_DICT))
    reply = internals.MarshalledReturn(message_type=METHOD_RETURN, reply_serial=msg.serial, destination=msg.sender,
                              flags=NO_REPLY_EXPECTED, signature=_DICT, body=_EMPTY_DICT, validate=False)  # fmt: skip
    reply.marshalled = cache[1]
    return reply


_GET_ALL_SPECS: dict[tuple[str, ...], list[tuple[str, Property]]] = {}


async def _get_all_later(msg: Message, values: dict[str, Any], pending: list[tuple[str, Property, Any]]) -> Message:
    for name, spec, value in pending:
        values[name] = Variant(spec.type, await value)
    return _return(msg, _DICT, [values])


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def new_signal(path: str, interface: str, member: str, signature: str = "", body: list[Any] | None = None) -> Message:
    """A signal as sd-bus builds one: flagged as expecting no reply."""
    message = Message.new_signal(path, interface, member, signature, body or [])
    message.flags = MessageFlag.NO_REPLY_EXPECTED
    return message


async def _resume(coro: Coroutine[Any, Any, Any], waiting_on: Any) -> Any:
    """Drive *coro*, suspended on future *waiting_on*, to its end, as a task would; its result."""
    while True:
        if waiting_on is None:
            await asyncio.sleep(0)  # a bare yield: just let the loop run once
        else:
            try:
                await asyncio.shield(waiting_on)
            except asyncio.CancelledError:
                if not waiting_on.cancelled():
                    coro.close()
                    raise
            except BaseException:
                pass  # the coroutine sees the future's outcome itself when resumed
        try:
            waiting_on = coro.send(None)
        except StopIteration as done:
            return done.value


def _find_member(obj: BusObject, member: str | None) -> Interface | None:
    for iface in obj.interfaces:
        if member in iface.methods:
            return iface
    return None


def _check_signature(msg: Message, iface: str, expected: str, member: str | None = None) -> None:
    if msg.signature != expected:
        raise BusError(
            errors.INVALID_ARGS,
            f"Invalid arguments '{msg.signature}' to call {iface}.{member or msg.member}(), expecting '{expected}'.",
        )


def _method_return(msg: Message, spec: Method, result: Any) -> Message:
    """Handlers return the list of out-arguments (None when there are none), an FdReply or a
    MarshalledBody."""
    if not spec.out_signature:
        return _return(msg)
    if isinstance(result, FdReply):
        return _return(msg, spec.out_tree, result.body, result.fds)
    if isinstance(result, MarshalledBody):
        if not internals.marshalling_known():  # dbus-fast's own path: the values, marshalled by it
            return _return(msg, spec.out_tree, internals.unmarshal_body(spec.out_signature, result.data))
        reply = internals.MarshalledReturn(message_type=METHOD_RETURN, reply_serial=msg.serial, destination=msg.sender,
                                  flags=NO_REPLY_EXPECTED, signature=spec.out_tree, body=result.empty,
                                  validate=False)  # fmt: skip
        reply.marshalled = result
        return reply
    return _return(msg, spec.out_tree, list(result))

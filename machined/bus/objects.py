"""Routing of incoming method calls to objects, with sd-bus's generic behaviour.

dbus-fast's ``ServiceInterface`` cannot tell a method who called it, cannot
resolve objects on demand from the path (machine objects, ``/machine/self``),
and answers errors with its own names. So every method call addressed to us is
handled here: Peer on any path; Introspectable and Properties (``GetAll("")``
included, hidden properties for Get only) on known objects; argument
signatures checked against the interface XML; errors named and worded as
sd-bus does. Handlers are coroutines; a reply is sent when they finish.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import inspect
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from machined import caller, errors
from machined.bus.client import call_bus_daemon
from machined.bus.introspection import Interface, introspect_xml
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

    def get(self, sender: str) -> Credentials | None:
        creds = self._entries.get(sender)
        if creds is not None:
            self._entries.move_to_end(sender)
        return creds

    def put(self, sender: str, creds: Credentials) -> None:
        self._entries[sender] = creds
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)


class Call:
    """One incoming method call, with what handlers may need to know of its sender."""

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

    async def credentials(self) -> Credentials:
        """The sender's PID and UID, as the bus daemon knows them (never from arguments)."""
        if self._credentials is None and self._cache is not None:
            self._credentials = self._cache.get(self.sender)
        if self._credentials is None:
            try:
                (creds,) = await call_bus_daemon(self.bus, "GetConnectionCredentials", "s", [self.sender])
            except BusError:
                raise BusError.from_errno(errno.ESRCH, "Failed to get credentials of the caller") from None
            self._credentials = Credentials(
                pid=int(creds["ProcessID"].value), uid=int(creds["UnixUserID"].value)
            )
            if self._cache is not None and self.sender:
                self._cache.put(self.sender, self._credentials)
        return self._credentials

    async def uid(self) -> int:
        """The requester's UID (:class:`machined.caller.Requester`)."""
        return (await self.credentials()).uid


class FdReply:
    """Out-arguments carrying file descriptors: each ``h`` value is an index into *fds*.

    The dispatcher sends the descriptors with the reply and then closes them.
    """

    def __init__(self, body: list[Any], fds: list[int]) -> None:
        self.body = body
        self.fds = fds


Handler = Callable[..., Awaitable[Any]]
# The value of a property, or an awaitable of it (for one that must be read off the event loop).
PropertyGetter = Callable[[], Any]


@dataclass
class BusObject:
    """What one object path offers: interfaces, their handlers and property values."""

    interfaces: list[Interface] = field(default_factory=list)
    # (interface, member) → coroutine function(call, *args) returning the list of out-args.
    methods: dict[tuple[str, str], Handler] = field(default_factory=dict)
    # (interface, property) → getter of the plain value.
    properties: dict[tuple[str, str], PropertyGetter] = field(default_factory=dict)
    # Answer Get but stay out of GetAll and introspection: (iface, prop) → (signature, getter).
    hidden_properties: dict[tuple[str, str], tuple[str, PropertyGetter]] = field(default_factory=dict)
    # (interface, property) → coroutine function(call, value) for writable properties.
    setters: dict[tuple[str, str], Handler] = field(default_factory=dict)
    children: list[str] = field(default_factory=list)

    def interface(self, name: str) -> Interface | None:
        for iface in self.interfaces:
            if iface.name == name:
                return iface
        return None


class ObjectTree(Protocol):
    async def lookup(self, path: str, call: Call) -> BusObject | None:
        """The object at *path* as *call*'s sender sees it, or None if there is none."""


class Dispatcher:
    """Answers every method call that reaches our connection."""

    def __init__(self, bus: MessageBus, tree: ObjectTree, machine_id: str) -> None:
        self.bus = bus
        self.tree = tree
        self.machine_id = machine_id
        self._tasks: set[asyncio.Task[None]] = set()
        self.credentials = CredentialCache()
        # Calls wait until the registry is loaded, so nobody sees half of it.
        self.ready = asyncio.Event()
        # Told of every call answered: (interface, member, error name or None, seconds).
        self.observe: Callable[[str | None, str | None, str | None, float], None] | None = None

    def install(self) -> None:
        self.bus.add_message_handler(self._on_message)

    def _on_message(self, message: Message) -> bool:
        if message.message_type is not MessageType.METHOD_CALL:
            return False
        # Run the handler at once: most calls (lookups, properties, lists) never wait,
        # and finish here without the cost of a task. One that waits (for systemd, polkit,
        # a child process) continues as a task from where it stopped.
        # Each call runs in a context of its own, where it is the current requester.
        call = Call(self.bus, message, self.credentials)
        context = contextvars.copy_context()
        context.run(caller.current.set, call)
        coro = self._handle(call)
        try:
            waiting_on = context.run(coro.send, None)
        except StopIteration:
            return True
        task = asyncio.get_running_loop().create_task(_resume(coro, waiting_on), context=context)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _handle(self, call: Call) -> None:
        message = call.message
        started = time.perf_counter()
        if not self.ready.is_set():
            await self.ready.wait()
        try:
            reply = await self._dispatch(call)
        except BusError as e:
            reply = Message.new_error(message, e.name, e.message)
        except OSError as e:
            code = e.errno or errno.EIO
            reply = Message.new_error(message, errors.errno_error_name(code), e.strerror or str(e))
        except Exception:  # never a traceback to the client, never a crash
            log.exception("Internal error while handling %s.%s", message.interface, message.member)
            reply = Message.new_error(message, errors.FAILED, "Internal error")
        # sd-bus flags every reply (and error) it sends as expecting no reply.
        reply.flags = MessageFlag.NO_REPLY_EXPECTED
        try:
            if not message.flags & MessageFlag.NO_REPLY_EXPECTED:
                await self.bus.send(reply)
        except Exception:
            log.exception("Failed to send reply to %s", message.sender)
        finally:
            for fd in reply.unix_fds:
                os.close(fd)
            # The connection's reader keeps the last message it read until the next one
            # comes: drop the arguments now, or one large call stays in memory for long.
            message.body = []
        if self.observe is not None:
            self.observe(message.interface, message.member, reply.error_name, time.perf_counter() - started)

    async def _dispatch(self, call: Call) -> Message:
        msg = call.message
        iface, member, path = msg.interface, msg.member, msg.path
        if iface == PEER or (iface is None and member in ("Ping", "GetMachineId")):
            return self._peer(msg)
        obj = await self.tree.lookup(path, call)
        if obj is None:
            raise BusError(errors.UNKNOWN_OBJECT, f"Unknown object '{path}'.")
        if iface == INTROSPECTABLE or (iface is None and member == "Introspect"):
            if member == "Introspect":
                _check_signature(msg, INTROSPECTABLE, "")
                return Message.new_method_return(msg, "s", [introspect_xml(obj.interfaces, obj.children)])
        elif iface == PROPERTIES or (iface is None and member in ("Get", "GetAll", "Set")):
            if member in ("Get", "GetAll", "Set"):
                return await self._properties(call, obj)
        else:
            target = obj.interface(iface) if iface else _find_member(obj, member)
            if target is not None and member in target.methods:
                spec = target.methods[member]
                if spec.privileged and (await call.credentials()).uid != 0:
                    raise BusError(errors.ACCESS_DENIED, f"Access to {target.name}.{member}() not permitted.")
                _check_signature(msg, target.name, spec.in_signature, member)
                handler = obj.methods.get((target.name, member))
                if handler is None:
                    raise BusError(errors.NOT_SUPPORTED, f"{member} is not implemented yet")
                result = await handler(call, *msg.body)
                return _method_return(msg, spec.out_signature, result)
        raise BusError(errors.UNKNOWN_METHOD, f"Unknown method {member} or interface {iface}.")

    def _peer(self, msg: Message) -> Message:
        if msg.member == "Ping":
            _check_signature(msg, PEER, "")
            return Message.new_method_return(msg)
        if msg.member == "GetMachineId":
            _check_signature(msg, PEER, "")
            return Message.new_method_return(msg, "s", [self.machine_id])
        raise BusError(errors.UNKNOWN_METHOD, f"Unknown method {msg.member} or interface {msg.interface}.")

    async def _properties(self, call: Call, obj: BusObject) -> Message:
        msg = call.message
        if msg.member == "Get":
            _check_signature(msg, PROPERTIES, "ss")
            iface_name, prop = msg.body
            iface = obj.interface(iface_name)
            if iface is not None and prop in iface.properties:
                getter = obj.properties[(iface_name, prop)]
                value = Variant(iface.properties[prop].signature, await _value(getter))
                return Message.new_method_return(msg, "v", [value])
            hidden = obj.hidden_properties.get((iface_name, prop))
            if hidden is not None:
                return Message.new_method_return(msg, "v", [Variant(hidden[0], await _value(hidden[1]))])
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
            values = {
                p.name: Variant(p.signature, await _value(obj.properties[(i.name, p.name)]))
                for i in selected
                for p in i.properties.values()
            }
            return Message.new_method_return(msg, "a{sv}", [values])
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
        await setter(call, value.value)
        return Message.new_method_return(msg)


def new_signal(path: str, interface: str, member: str, signature: str = "", body: list[Any] | None = None) -> Message:
    """A signal as sd-bus builds one: flagged as expecting no reply."""
    message = Message.new_signal(path, interface, member, signature, body or [])
    message.flags = MessageFlag.NO_REPLY_EXPECTED
    return message


async def _resume(coro: Coroutine[Any, Any, None], waiting_on: Any) -> None:
    """Drive *coro*, suspended on future *waiting_on*, to its end, as a task would."""
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
        except StopIteration:
            return


async def _value(getter: PropertyGetter) -> Any:
    """A property's value; only a getter that returns an awaitable costs a suspension."""
    value = getter()
    return await value if inspect.isawaitable(value) else value


def _find_member(obj: BusObject, member: str) -> Interface | None:
    for iface in obj.interfaces:
        if member in iface.methods:
            return iface
    return None


def _check_signature(msg: Message, iface: str, expected: str, member: str | None = None) -> None:
    if msg.signature != expected:
        raise BusError(
            errors.INVALID_ARGS,
            f"Invalid arguments '{msg.signature}' to call {iface}.{member or msg.member}(), "
            f"expecting '{expected}'.",
        )


def _method_return(msg: Message, signature: str, result: Any) -> Message:
    """Handlers return the list of out-arguments (None when there are none), or an FdReply."""
    if not signature:
        return Message.new_method_return(msg)
    if isinstance(result, FdReply):
        return Message.new_method_return(msg, signature, result.body, result.fds)
    return Message.new_method_return(msg, signature, list(result))

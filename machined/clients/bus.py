"""Calling other services on the bus: one place that turns error replies into BusError."""

from __future__ import annotations

from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from machined import errors
from machined.errors import BusError

DBUS = ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus")


async def call_method(bus: MessageBus, destination: str, path: str, interface: str, member: str,
                      signature: str = "", body: list[Any] | None = None,
                      unix_fds: list[int] | None = None) -> list[Any]:  # fmt: skip
    """The reply's body; an error reply (or none) raises BusError with the callee's name and text."""
    reply = await bus.call(
        Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body or [],
            unix_fds=unix_fds or [],
        )  # fmt: skip
    )
    if reply is None:
        raise BusError(errors.NO_REPLY, "No reply")
    if reply.message_type is MessageType.ERROR:
        text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        raise BusError(reply.error_name or errors.FAILED, text)
    return reply.body


async def call_bus_daemon(
    bus: MessageBus, member: str, signature: str = "", body: list[Any] | None = None
) -> list[Any]:
    """A call to org.freedesktop.DBus itself."""
    return await call_method(bus, *DBUS, member, signature, body)

"""Authorization of callers, as systemd-machined 252 does it.

Root (the bus says so, never the arguments) is always allowed. Everybody else
is asked about at org.freedesktop.PolicyKit1 with the action id and details of
the method, honouring the message's allow-interactive-authorization flag. No
polkit on the bus means no.
"""

from __future__ import annotations

import errno

from dbus_fast import Message, MessageType, Variant

from machined import errors
from machined.bus.objects import Call
from machined.errors import BusError

AUTHORITY = "org.freedesktop.PolicyKit1"
AUTHORITY_PATH = "/org/freedesktop/PolicyKit1/Authority"
AUTHORITY_IFACE = "org.freedesktop.PolicyKit1.Authority"
ACTION_PREFIX = "org.freedesktop.machine1."
_SERVICE_UNKNOWN = ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner")


async def authorize(call: Call, action: str, details: dict[str, str] | None = None) -> None:
    """Return if the caller may do *action* (short id, e.g. ``manage-machines``); else raise."""
    creds = await call.credentials()
    if creds.uid == 0:
        return
    subject = ("system-bus-name", {"name": Variant("s", call.sender)})
    flags = 1 if call.allow_interactive_authorization else 0
    reply = await call.bus.call(
        Message(
            destination=AUTHORITY,
            path=AUTHORITY_PATH,
            interface=AUTHORITY_IFACE,
            member="CheckAuthorization",
            signature="(sa{sv})sa{ss}us",
            body=[subject, ACTION_PREFIX + action, details or {}, flags, ""],
        )
    )
    if reply is None:
        raise BusError.from_errno(errno.EACCES)
    if reply.message_type is MessageType.ERROR:
        if reply.error_name in _SERVICE_UNKNOWN:
            raise BusError(errors.ACCESS_DENIED, "Permission denied")
        raise BusError(reply.error_name or errors.ACCESS_DENIED, reply.body[0] if reply.body else "")
    authorized, challenge, _ = reply.body[0]
    if authorized:
        return
    if challenge:
        raise BusError(errors.INTERACTIVE_AUTHORIZATION_REQUIRED, "Interactive authentication required.")
    raise BusError(errors.ACCESS_DENIED, "Permission denied")

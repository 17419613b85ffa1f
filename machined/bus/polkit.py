"""Authorization of callers, as systemd-machined 252 does it.

Root (the bus says so, never the arguments) is always allowed. Everybody else
is asked about at org.freedesktop.PolicyKit1 with the action id and details of
the method, honouring the message's allow-interactive-authorization flag. No
polkit on the bus means no.

Questions to polkit are pending replies on our bus connection, which dbus-daemon
caps at 128: at most 32 are in flight, handed out fairly between users (8 per
user at once, 64 more waiting, then ``LimitsExceeded``), so that one user's
flood never takes the slots that root's calls to PID 1 need.
"""

from __future__ import annotations

import errno

from dbus_fast import Variant

from machined import errors
from machined.bus.client import call_method
from machined.bus.objects import Call
from machined.errors import BusError
from machined.limits import FairLimiter

AUTHORITY = "org.freedesktop.PolicyKit1"
AUTHORITY_PATH = "/org/freedesktop/PolicyKit1/Authority"
AUTHORITY_IFACE = "org.freedesktop.PolicyKit1.Authority"
ACTION_PREFIX = "org.freedesktop.machine1."
CHECKS_MAX = 32
CHECKS_PER_USER = 8
CHECKS_QUEUE_MAX = 128
checks = FairLimiter("polkit", CHECKS_MAX, CHECKS_PER_USER, CHECKS_QUEUE_MAX,
                     "Too many pending authorization requests, try again later.")  # fmt: skip
_SERVICE_UNKNOWN = ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner")


async def authorize(call: Call, action: str, details: dict[str, str] | None = None) -> None:
    """Return if the caller may do *action* (short id, e.g. ``manage-machines``); else raise."""
    creds = await call.credentials()
    if creds.uid == 0:
        return
    subject = ("system-bus-name", {"name": Variant("s", call.sender)})
    flags = 1 if call.allow_interactive_authorization else 0
    release = await checks.acquire(creds.uid, of_caller=False)
    try:
        (result,) = await call_method(
            call.bus, AUTHORITY, AUTHORITY_PATH, AUTHORITY_IFACE, "CheckAuthorization", "(sa{sv})sa{ss}us",
            [subject, ACTION_PREFIX + action, details or {}, flags, ""],
        )  # fmt: skip
    except BusError as e:
        if e.name in _SERVICE_UNKNOWN or e.name == errors.NO_REPLY:
            raise BusError.from_errno(errno.EACCES) from None
        raise  # polkit's own errors go to the caller as they are
    finally:
        release()
    authorized, challenge, _ = result
    if authorized:
        return
    if challenge:
        raise BusError(errors.INTERACTIVE_AUTHORIZATION_REQUIRED, "Interactive authentication required.")
    raise BusError(errors.ACCESS_DENIED, "Permission denied")

"""Authorization of callers at org.freedesktop.PolicyKit1, as systemd-machined does it.

Root (the transport says so, never the arguments) is always allowed. Everybody
else is asked about at polkit with the action id and details of the method:

- a D-Bus caller as ``system-bus-name`` (its unique name), honouring the message's
  allow-interactive-authorization flag (252);
- a varlink peer as ``unix-process`` with its pidfd and UID, honouring the call's
  ``allowInteractiveAuthentication`` (262); a peer whose pidfd is unknown is refused.

No polkit on the bus means no.

Questions to polkit are pending replies on our bus connection, which dbus-daemon
caps at 128: at most 32 are in flight, handed out fairly between users (8 per
user at once, 64 more waiting, then ``LimitsExceeded``), so that one user's
flood never takes the slots that root's calls to PID 1 need.
"""

from __future__ import annotations

import errno
from typing import Any

from dbus_fast import Variant
from dbus_fast.aio import MessageBus

from machined import errors, personality
from machined.caller import PolkitSubject
from machined.clients.bus import call_method
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
# False in the per-user instance: 262 asks polkit nothing there (whoever can reach its socket or
# the user's bus is served).
ask_polkit = True
_SERVICE_UNKNOWN = ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner")


INTERACTIVE_REQUIRED_252 = "Interactive authentication required."
INTERACTIVE_REQUIRED_262 = (
    "Access denied as the requested operation requires interactive authentication. "
    "However, interactive authentication has not been enabled by the calling program."
)


def interactive_required_message() -> str:
    """What polkit's "only with interactive authentication" answer reads as, 252's or 262's."""
    return INTERACTIVE_REQUIRED_262 if personality.is_262() else INTERACTIVE_REQUIRED_252


async def authorize(call: Any, action: str, details: dict[str, str] | None = None) -> None:
    """Return if the D-Bus caller of *call* may do *action* (short id, e.g. ``manage-machines``);
    else raise."""
    creds = await call.credentials()
    subject = PolkitSubject("system-bus-name", bus_name=call.sender)
    await check(call.bus, subject, creds.uid, action, details, call.allow_interactive_authorization)


async def check(bus: MessageBus | None, subject: PolkitSubject, uid: int, action: str,
                details: dict[str, str] | None, interactive: bool) -> None:  # fmt: skip
    """Return if *subject* (of user *uid*) may do *action*; else raise AccessDenied,
    InteractiveAuthorizationRequired or polkit's own error."""
    if uid == 0 or not ask_polkit:
        return
    fds: list[int] = []
    if subject.kind == "system-bus-name":
        wire_subject = ("system-bus-name", {"name": Variant("s", subject.bus_name)})
    elif subject.pidfd < 0 and subject.pid > 0 and subject.start_time > 0:  # (a polkit without pidfd subjects)
        process = {"pid": Variant("u", subject.pid), "start-time": Variant("t", subject.start_time)}
        wire_subject = ("unix-process", {**process, "uid": Variant("i", subject.uid)})
    else:
        if subject.pidfd < 0:  # 262: without a pidfd the peer cannot be identified securely
            raise BusError.from_errno(errno.EPERM)
        fds = [subject.pidfd]
        wire_subject = ("unix-process", {"pidfd": Variant("h", 0), "uid": Variant("i", subject.uid)})
    if bus is None:
        raise BusError.from_errno(errno.EACCES)
    release = await checks.acquire(uid, of_caller=False)
    try:
        (result,) = await call_method(
            bus, AUTHORITY, AUTHORITY_PATH, AUTHORITY_IFACE, "CheckAuthorization", "(sa{sv})sa{ss}us",
            [wire_subject, ACTION_PREFIX + action, details or {}, 1 if interactive else 0, ""], fds,
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
        raise BusError(errors.INTERACTIVE_AUTHORIZATION_REQUIRED, interactive_required_message())
    raise BusError(errors.ACCESS_DENIED, "Permission denied")

"""Who the work at hand is for: the client whose request is being served.

A front-end (D-Bus, varlink) sets :data:`current` for the duration of each
request; shared resources (child processes, calls to PID 1 and polkit) use it
to serve users fairly. Work the daemon does on its own behalf (garbage
collection, restart recovery) has no requester.

Each transport vouches for its caller in its own way (the bus daemon's
``GetConnectionCredentials`` for a D-Bus sender; ``SO_PEERCRED`` and
``SO_PEERPIDFD`` for a varlink peer), never through arguments. What polkit is
asked about differs too (:class:`PolkitSubject`): a D-Bus caller is its unique
bus name, a varlink peer its process, pinned by pidfd, and its UID.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class PolkitSubject:
    """What polkit is asked about: ``system-bus-name`` (*bus_name*) or ``unix-process``
    (*pidfd* and *uid*, as systemd 262 asks for a varlink peer; or, for a polkit older than
    pidfd subjects, *pid* and its *start_time* in clock ticks, as polkit's own clients did)."""

    kind: str
    bus_name: str = ""
    pidfd: int = -1
    uid: int = -1
    pid: int = -1
    start_time: int = 0


class Requester(Protocol):
    async def uid(self) -> int:
        """The requesting user's UID, as the transport vouches for it (never from arguments)."""

    async def pid(self) -> int:
        """The requesting process's PID, as the transport vouches for it."""


# Asks whether the current caller may do an action (short polkit id, e.g. "manage-machines",
# with upstream's details); returns if so, raises BusError (AccessDenied, ...) if not.
Authorize = Callable[[str, dict[str, str]], Awaitable[None]]

current: ContextVar[Requester | None] = ContextVar("machined_requester", default=None)


async def current_uid() -> int | None:
    """The current requester's UID; None for the daemon's own work."""
    requester = current.get()
    if requester is None:
        return None
    try:
        return await requester.uid()
    except Exception:
        return -1  # unknown: treated as an unprivileged user of its own


def over_dbus() -> bool:
    """Whether the current request came over D-Bus (262's per-user instance looks up a leader's
    unit differently for D-Bus and varlink registrations)."""
    return getattr(current.get(), "transport", "") == "dbus"

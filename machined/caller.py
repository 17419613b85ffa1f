"""Who the work at hand is for: the client whose request is being served.

A front-end (D-Bus, varlink) sets :data:`current` for the duration of each
request; shared resources (child processes, calls to PID 1 and polkit) use it
to serve users fairly. Work the daemon does on its own behalf (garbage
collection, restart recovery) has no requester.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Protocol


class Requester(Protocol):
    async def uid(self) -> int:
        """The requesting user's UID, as the transport vouches for it (never from arguments)."""


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

"""What children count against: one fair limit for all, and the cap on long operations.

Apart from :mod:`machined.children.client` so that the daemon loads the client (the fork
server's end, children, deadlines) only at the first job: the looks share :data:`children`
with the children, and the registry holds an :class:`Operations`, from the start.
"""

from __future__ import annotations

from typing import Any

from machined.children.jobs import Job
from machined.errors import BusError
from machined.limits import LIMITS_EXCEEDED, FairLimiter

OPERATIONS_MAX = 64
CHILDREN_MAX = 64
CHILDREN_PER_USER = 4
CHILDREN_QUEUE_MAX = 64

# Every child, and every blocking look in a thread (machined.inside.lookthreads), holds a slot.
children = FairLimiter(
    "children", CHILDREN_MAX, CHILDREN_PER_USER, CHILDREN_QUEUE_MAX, "Too many ongoing operations, try again later."
)


class Operations:
    """Long-running children bound to pending requests, at most 64 at once."""

    def __init__(self, limit: int = OPERATIONS_MAX) -> None:
        self.limit = limit
        self.running = 0

    async def run(self, job: Job, limit_message: str = "Too many ongoing operations.", **kwargs: Any) -> Any:
        if self.running >= self.limit:
            raise BusError(LIMITS_EXCEEDED, limit_message)
        self.running += 1
        try:
            from machined.children.client import run_worker  # at the first job, not at start

            return await run_worker(job, **kwargs)
        finally:
            self.running -= 1

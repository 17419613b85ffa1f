"""Bounded, fair use of what the daemon shares between its callers.

Three things must never be exhausted by one caller's load: the child
processes the daemon starts, the method calls it has in flight on its bus
connection (dbus-daemon refuses more than 128 pending replies per connection),
and the jobs it asks PID 1 to run (each live job costs PID 1 one match rule,
and dbus-daemon disconnects PID 1 past 512).

A :class:`FairLimiter` hands out at most ``limit`` slots. Waiters are served
privileged first (root, or the daemon itself), then round-robin across the
other users, so that a flood from one user delays only that user. A user
other than root holds at most ``per_user`` slots at once and may have at most
``queue_max`` waiters; one more fails at once with ``LimitsExceeded``.

The requester of the work at hand is found through :mod:`machined.caller`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from machined import caller
from machined.errors import BusError

LIMITS_EXCEEDED = "org.freedesktop.DBus.Error.LimitsExceeded"

Release = Callable[[], None]


class FairLimiter:
    def __init__(self, name: str, limit: int, per_user: int | None = None, queue_max: int | None = None,
                 message: str = "Too many requests, try again later.") -> None:  # fmt: skip
        self.name = name
        self.limit = limit
        self.per_user = per_user if per_user is not None else limit
        self.queue_max = queue_max
        self.message = message
        self.running = 0
        self._by_user: dict[int | None, int] = {}
        self._waiting: dict[int | None, deque[asyncio.Future[None]]] = {}
        self._turns: deque[int | None] = deque()  # unprivileged users with waiters, round-robin

    # ----- accounting --------------------------------------------------------------

    @staticmethod
    def _privileged(user: int | None) -> bool:
        return user is None or user == 0

    def _may_run(self, user: int | None) -> bool:
        if self.running >= self.limit:
            return False
        return self._privileged(user) or self._by_user.get(user, 0) < self.per_user

    def _count(self, user: int | None) -> None:
        self.running += 1
        self._by_user[user] = self._by_user.get(user, 0) + 1

    def _releaser(self, user: int | None) -> Release:
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.running -= 1
            left = self._by_user[user] - 1
            if left:
                self._by_user[user] = left
            else:
                del self._by_user[user]
            self._wake()

        return release

    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    # ----- acquiring ---------------------------------------------------------------

    async def acquire(self, user: int | None = None, *, of_caller: bool = True) -> Release:
        """A slot for *user* (by default the current requester); call the result to give it back."""
        if of_caller and user is None:
            user = await caller.current_uid()
        if (
            not self._waiting.get(user)
            and self._may_run(user)
            and (self._privileged(user) or not self._privileged_waiting())
        ):
            self._count(user)
            return self._releaser(user)
        queue = self._waiting.setdefault(user, deque())
        if self.queue_max is not None and not self._privileged(user) and len(queue) >= self.queue_max:
            if not queue:
                del self._waiting[user]
            raise BusError(LIMITS_EXCEEDED, self.message)
        if not self._privileged(user) and user not in self._turns:
            self._turns.append(user)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._releaser(user)()  # a slot was handed to us as we went away: pass it on
            else:
                self._forget(user, waiter)
            raise
        return self._releaser(user)  # counted for us when it was handed over

    def _privileged_waiting(self) -> bool:
        return bool(self._waiting.get(0)) or bool(self._waiting.get(None))

    def _forget(self, user: int | None, waiter: asyncio.Future[None]) -> None:
        queue = self._waiting.get(user)
        if queue is None:
            return
        try:
            queue.remove(waiter)
        except ValueError:
            pass
        if not queue:
            del self._waiting[user]
            if user in self._turns:
                self._turns.remove(user)

    def _pop(self, user: int | None) -> bool:
        """Hand the next free slot to *user*'s oldest waiter; False if it has none."""
        queue = self._waiting.get(user)
        while queue:
            waiter = queue.popleft()
            if not queue:
                del self._waiting[user]
                if user in self._turns:
                    self._turns.remove(user)
            if not waiter.done():
                self._count(user)
                waiter.set_result(None)
                return True
            queue = self._waiting.get(user)
        return False

    def _wake(self) -> None:
        while self.running < self.limit:
            if self._pop(None) or self._pop(0):
                continue
            for _ in range(len(self._turns)):
                user = self._turns[0]
                self._turns.rotate(-1)
                if self._by_user.get(user, 0) < self.per_user and self._pop(user):
                    break
            else:
                return

"""Blocking looks inside machines, run in a few threads of the daemon under deadlines.

A look reads from a container's file systems (its os-release, its root directory) or
dumps its addresses. Such a read can block for as long as the container wants: a FUSE
file whose server is stopped, a file system that hangs. None of it runs in the event
loop: each look is a *job* run by one of at most :data:`THREADS_MAX` threads, and each
caller waits for its job's outcome under its own deadline. A caller whose deadline
passes gets ``Timeout``; the daemon and every other caller carry on. The job itself may
stay blocked in its thread; identical jobs (same key: the same look at the same machine)
join the one in flight instead of taking another thread, so one hostile container holds
at most one thread per kind of look. Every job holds a slot of the fair limit on
children (:data:`machined.children.limits.children`: per user, round-robin, root first) from
when it is queued until its thread has finished it, as a child holds one until it has
exited.

Threads are started on demand and end after :data:`THREAD_IDLE` seconds without work;
they are daemon threads, so a thread stuck in a read never holds up the daemon's exit.
"""

from __future__ import annotations

import asyncio
import errno
import threading
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from machined import caller
from machined.errors import BusError

THREADS_MAX = 8
THREAD_IDLE = 10.0
TIMEOUT_MESSAGE = "Timed out waiting for the machine"

_T = TypeVar("_T")


Work = tuple[Callable[[], _T], Callable[[], None]]  # what a job runs; what it lets go of after


class _Job:
    __slots__ = ("func", "done", "future", "loop", "release")

    def __init__(self, work: Work[Any], loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]) -> None:
        self.func, self.done = work
        self.loop = loop
        self.future = future
        self.release: Callable[[], None] | None = None


def _settle(job: _Job, ok: bool, value: Any) -> None:
    """In the event loop: the job's outcome to its waiters, its slot back."""
    if job.release is not None:
        job.release()
        job.release = None
    if job.future.done():
        return
    if ok:
        job.future.set_result(value)
    else:
        job.future.set_exception(value)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # outcomes nobody waits for any more are not "never retrieved"


class LookThreads:
    """At most *limit* threads running jobs; see the module's description."""

    def __init__(self, limit: int = THREADS_MAX, idle: float = THREAD_IDLE) -> None:
        self.limit = limit
        self.idle = idle
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._queue: deque[_Job] = deque()
        self._threads = 0
        self._idle = 0  # threads waiting for a job
        self._jobs: dict[object, asyncio.Future[Any]] = {}

    def threads(self) -> int:
        """Threads alive now (busy or waiting for work)."""
        with self._lock:
            return self._threads

    async def run(self, key: Hashable, start: Callable[[], Work[_T]], timeout: float,
                  orphan: Callable[[_T], None] | None = None) -> _T:  # fmt: skip
        """The result (or the exception) of a job run in a thread; ``Timeout`` after *timeout* s.

        A job with the same *key* still in flight (even one whose callers all gave up) is
        joined instead of starting another; else *start* says what to run (and what to let go
        of once it ran, or if it never runs): called at once, before any await. A job whose
        result must be let go of when its caller gave up (an fd) gives *orphan*, which does
        that; such a job is never joined.
        """
        loop = asyncio.get_running_loop()
        full_key = (id(loop), key) if orphan is None else object()
        future = self._jobs.get(full_key)
        if future is None:
            work = start()  # (may raise: then nothing is registered)
            future = loop.create_future()
            future.add_done_callback(_retrieve)
            self._jobs[full_key] = future
            future.add_done_callback(lambda f: self._forget(full_key, f))
            job = _Job(work, loop, future)
            starting = loop.create_task(self._submit(job))
            starting.add_done_callback(_retrieve)
        try:
            result: _T = await asyncio.wait_for(asyncio.shield(future), timeout)
            return result
        except BaseException as e:
            if orphan is not None:
                future.add_done_callback(lambda f: orphan(f.result()) if not f.cancelled() and f.exception() is None
                                         else None)  # fmt: skip
            if isinstance(e, TimeoutError):
                raise BusError.from_errno(errno.ETIMEDOUT, TIMEOUT_MESSAGE) from None
            raise

    def _forget(self, key: object, future: asyncio.Future[Any]) -> None:
        if self._jobs.get(key) is future:
            del self._jobs[key]

    async def _submit(self, job: _Job) -> None:
        from machined.children.limits import children  # (the limit children and these threads share)

        try:
            user = await caller.current_uid()
            release = await children.acquire(user, of_caller=False)
        except BaseException as e:  # LimitsExceeded: the job's waiters learn it
            job.done()
            if not job.future.done():
                job.future.set_exception(e if isinstance(e, Exception) else BusError.from_errno(errno.ECANCELED))
            raise
        job.release = release
        if job.future.done():  # (cannot happen: nothing else settles it) — give the slot back
            _settle(job, True, None)
            return
        with self._lock:
            self._queue.append(job)
            if self._idle:
                self._ready.notify()
            elif self._threads < self.limit:
                self._threads += 1
                threading.Thread(target=self._work, name="machined-look", daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._idle += 1
                    self._ready.wait(self.idle)
                    self._idle -= 1
                    if not self._queue:
                        self._threads -= 1
                        return
                job = self._queue.popleft()
            try:
                outcome: tuple[bool, Any] = (True, job.func())
            except BaseException as e:  # noqa: BLE001 (handed to the waiters)
                outcome = (False, e)
            finally:
                job.done()
            try:
                job.loop.call_soon_threadsafe(_settle, job, *outcome)
            except RuntimeError:  # its event loop is closed (tests)
                pass


threads = LookThreads()

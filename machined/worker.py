"""Run a function in a child process, with a deadline; the daemon never forks itself.

Work that enters another namespace (setns affects a whole thread, and the daemon
is threaded), or that takes long (copies, image removal), runs as
``python -m machined.worker MODULE:FUNCTION`` with keyword arguments as JSON
on stdin. The child prints ``{"result": ...}`` or ``{"errno": N, "message": ...}``
or ``{"error": NAME, "message": ...}``. A child that dies or hangs costs only
its caller an error.

Every child counts against one limit, :data:`children` (64 at once, served
root first and round-robin across users; one unprivileged user runs at most 4
at once and queues at most 64 more, then gets ``LimitsExceeded``). Children
started for unprivileged users run at a lower CPU priority, so that a flood
never slows the daemon itself. Identical read-only probes in flight at the same
time share one child. A deadline covers the wait for a slot too.

:class:`Operations` caps how many long-running children run at once (64, as
upstream's ``OPERATIONS_MAX``) and refuses more at once, as upstream does.
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import json
import os
import socket
import sys
from typing import Any

from machined import caller, errors
from machined.errors import BusError
from machined.limits import LIMITS_EXCEEDED, FairLimiter

OPERATIONS_MAX = 64
CHILDREN_MAX = 64
CHILDREN_PER_USER = 4
CHILDREN_QUEUE_MAX = 64
UNPRIVILEGED_NICENESS = 10

__all__ = ["LIMITS_EXCEEDED", "Operations", "children", "run_worker", "run_worker_with_fd", "send_fd"]

children = FairLimiter(
    "children", CHILDREN_MAX, CHILDREN_PER_USER, CHILDREN_QUEUE_MAX, "Too many ongoing operations, try again later."
)
_shared: dict[str, asyncio.Future[Any]] = {}


async def run_worker_with_fd(target: str, timeout: float | None = None, **kwargs: Any) -> tuple[Any, int]:
    """Like :func:`run_worker`; the function gets ``fd_socket`` and sends one fd back over it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        result = await run_worker(target, timeout, pass_fds=(theirs.fileno(),), fd_socket=theirs.fileno(), **kwargs)
        theirs.close()
        ours.setblocking(False)
        try:
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        except BlockingIOError:
            fds = []
        if not fds:
            raise BusError(errors.FAILED, "Child failed.")
        return result, fds[0]
    finally:
        theirs.close()
        ours.close()


def send_fd(fd_socket: int, fd: int) -> None:
    """In a worker: hand *fd* to the daemon (see :func:`run_worker_with_fd`)."""
    sock = socket.socket(fileno=os.dup(fd_socket))
    try:
        socket.send_fds(sock, [b"F"], [fd])
    finally:
        sock.close()


async def run_worker(target: str, timeout: float | None = None, pass_fds: tuple[int, ...] = (),
                     shared: bool = False, **kwargs: Any) -> Any:  # fmt: skip
    """Call ``MODULE:FUNCTION(**kwargs)`` in a child; return its result or raise its error.

    With *shared*, a call identical to one in flight waits for that one's outcome instead of
    starting a child of its own (for read-only probes).
    """
    if not shared or pass_fds:
        return await _run_limited(target, timeout, pass_fds, kwargs)
    key = target + json.dumps(kwargs, sort_keys=True)
    future = _shared.get(key)
    if future is None:
        future = asyncio.ensure_future(_run_limited(target, timeout, pass_fds, kwargs))
        _shared[key] = future
        future.add_done_callback(lambda f: (_shared.pop(key, None), f.cancelled() or f.exception()))
    return await asyncio.shield(future)


async def _run_limited(target: str, timeout: float | None, pass_fds: tuple[int, ...], kwargs: dict[str, Any]) -> Any:
    user = await caller.current_uid()

    async def run() -> Any:
        release = await children.acquire(user, of_caller=False)
        try:
            return await _run_child(target, pass_fds, kwargs, user not in (None, 0))
        finally:
            release()

    # (wait_for, not asyncio.timeout: handlers start outside any task, see bus.objects)
    try:
        return await asyncio.wait_for(run(), timeout)
    except TimeoutError:
        raise BusError.from_errno(errno.ETIMEDOUT, "Timed out waiting for the child process") from None


async def _run_child(target: str, pass_fds: tuple[int, ...], kwargs: dict[str, Any], background: bool) -> Any:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "machined.worker", target,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        pass_fds=pass_fds,
    )  # fmt: skip
    if background:
        try:
            os.setpriority(os.PRIO_PROCESS, proc.pid, UNPRIVILEGED_NICENESS)
        except OSError:
            pass
    try:
        out, _ = await proc.communicate(json.dumps(kwargs).encode())
    except BaseException:  # deadline or cancellation: the child goes with its caller
        if proc.returncode is None:
            proc.kill()
            await asyncio.shield(proc.wait())
        raise
    try:
        data = json.loads(out or b"null")
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise BusError(errors.FAILED, "Child died abnormally.")
    if "result" in data:
        return data["result"]
    if "errno" in data:
        raise OSError(int(data["errno"]), str(data.get("message", "")))
    if "error" in data:
        raise BusError(str(data["error"]), str(data.get("message", "")))
    raise BusError(errors.FAILED, "Child failed.")


class Operations:
    """Long-running children bound to pending requests, at most 64 at once."""

    def __init__(self, limit: int = OPERATIONS_MAX) -> None:
        self.limit = limit
        self.running = 0

    async def run(self, target: str, limit_message: str = "Too many ongoing operations.", **kwargs: Any) -> Any:
        if self.running >= self.limit:
            raise BusError(LIMITS_EXCEEDED, limit_message)
        self.running += 1
        try:
            return await run_worker(target, **kwargs)
        finally:
            self.running -= 1


def main() -> int:
    target = sys.argv[1]
    module_name, _, func_name = target.partition(":")
    try:
        kwargs = json.loads(sys.stdin.read() or "{}")
        func = getattr(importlib.import_module(module_name), func_name)
        result = func(**kwargs)
    except BusError as e:
        print(json.dumps({"error": e.name, "message": e.message}))
        return 1
    except OSError as e:
        print(json.dumps({"errno": e.errno or errno.EIO, "message": e.strerror or str(e)}))
        return 1
    print(json.dumps({"result": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The worker child runner: results, errors, fds and the 64-operations cap."""

from __future__ import annotations

import asyncio
import errno
import os
import time

import pytest

from machined.children.client import run_worker, run_worker_with_fd
from machined.children.jobs import Job
from machined.children.limits import Operations
from machined.children.wire import send_fd
from machined.errors import BusError


def nap(seconds: float) -> str:
    time.sleep(seconds)
    return "rested"


def fail_with(code: int) -> None:
    raise OSError(code, os.strerror(code))


def fail_named() -> None:
    raise BusError("org.example.Error", "named failure")


def hand_over(fd_socket: int, path: str) -> str:
    send_fd(fd_socket, os.open(path, os.O_RDONLY))
    return "sent"


async def test_result_and_errors_come_back() -> None:
    assert await run_worker(Job("tests.unit.test_worker", "nap"), seconds=0) == "rested"
    with pytest.raises(OSError) as e:
        await run_worker(Job("tests.unit.test_worker", "fail_with"), code=errno.ENOENT)
    assert e.value.errno == errno.ENOENT
    with pytest.raises(BusError) as b:
        await run_worker(Job("tests.unit.test_worker", "fail_named"))
    assert (b.value.name, b.value.message) == ("org.example.Error", "named failure")


async def test_deadline_kills_the_child() -> None:
    t = time.monotonic()
    with pytest.raises(BusError) as e:
        await run_worker(Job("tests.unit.test_worker", "nap"), timeout=0.5, seconds=30)
    assert e.value.name == "org.freedesktop.DBus.Error.Timeout"
    assert time.monotonic() - t < 5


async def test_a_file_descriptor_comes_back(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "f").write_text("content")
    result, fd = await run_worker_with_fd(Job("tests.unit.test_worker", "hand_over"), path=str(tmp_path / "f"))
    try:
        assert result == "sent" and os.read(fd, 100) == b"content"
    finally:
        os.close(fd)


async def test_operations_are_capped() -> None:
    ops = Operations(limit=2)
    running = [asyncio.ensure_future(ops.run(Job("tests.unit.test_worker", "nap"), seconds=1.5)) for _ in range(2)]
    await asyncio.sleep(0.3)
    with pytest.raises(BusError) as e:
        await ops.run(Job("tests.unit.test_worker", "nap"), "Too many ongoing copies.", seconds=0)
    assert (e.value.name, e.value.message) == ("org.freedesktop.DBus.Error.LimitsExceeded", "Too many ongoing copies.")
    assert await asyncio.gather(*running) == ["rested", "rested"]
    assert ops.running == 0


def my_pid() -> int:
    time.sleep(0.3)
    return os.getpid()


class _Requester:
    def __init__(self, uid: int) -> None:
        self._uid = uid

    async def uid(self) -> int:
        return self._uid


async def _as_user(uid: int, coro):  # type: ignore[no-untyped-def]
    from machined import caller

    caller.current.set(_Requester(uid))
    return await coro


async def test_identical_probes_in_flight_share_one_child() -> None:
    pids = await asyncio.gather(
        *(run_worker(Job("tests.unit.test_worker", "my_pid"), 10, shared=True) for _ in range(20))
    )
    assert len(set(pids)) == 1
    # not shared: one child each
    pids = await asyncio.gather(*(run_worker(Job("tests.unit.test_worker", "my_pid"), 10) for _ in range(3)))
    assert len(set(pids)) == 3


async def test_one_unprivileged_user_runs_at_most_four_children_and_root_is_not_held_up() -> None:
    from machined.children import limits

    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, limits.children._by_user.get(65534, 0))
            await asyncio.sleep(0.01)

    watcher = asyncio.ensure_future(watch())
    flood = [asyncio.ensure_future(_as_user(65534, run_worker(Job("tests.unit.test_worker", "nap"), 30, seconds=0.5)))
             for _ in range(12)]  # fmt: skip
    await asyncio.sleep(0.2)
    t = time.monotonic()
    assert await _as_user(0, run_worker(Job("tests.unit.test_worker", "nap"), 30, seconds=0)) == "rested"
    root_took = time.monotonic() - t
    assert await asyncio.gather(*flood) == ["rested"] * 12
    watcher.cancel()
    assert peak == limits.CHILDREN_PER_USER
    assert root_took < 1.0  # root never waited for nobody's queue of three rounds of 0.5 s
    # A child's slot is given back when it has exited, just after its result came.
    for _ in range(200):
        if limits.children.running == 0:
            break
        await asyncio.sleep(0.01)
    assert limits.children.running == 0

"""FairLimiter: bounded slots, root first, round-robin between users, per-user caps and queues."""

from __future__ import annotations

import asyncio

import pytest

from machined.errors import BusError
from machined.limits import LIMITS_EXCEEDED, FairLimiter


async def test_limit_is_never_exceeded_and_every_slot_comes_back() -> None:
    lim = FairLimiter("t", 3)
    peak = 0

    async def work(user: int) -> None:
        nonlocal peak
        release = await lim.acquire(user, of_caller=False)
        peak = max(peak, lim.running)
        await asyncio.sleep(0.01)
        release()
        release()  # twice is harmless

    await asyncio.gather(*(work(u % 5) for u in range(40)))
    assert peak == 3 and lim.running == 0 and lim.waiting() == 0


async def test_root_is_served_before_queued_users_and_users_take_turns() -> None:
    lim = FairLimiter("t", 1)
    order: list[int] = []
    first = await lim.acquire(1000, of_caller=False)

    async def work(user: int) -> None:
        release = await lim.acquire(user, of_caller=False)
        order.append(user)
        await asyncio.sleep(0)
        release()

    tasks = [asyncio.ensure_future(work(u)) for u in (1000, 1000, 1000, 1001, 1001, 0)]
    await asyncio.sleep(0.01)
    first()
    await asyncio.gather(*tasks)
    assert order[0] == 0
    assert order[1:] == [1000, 1001, 1000, 1001, 1000]


async def test_per_user_cap_and_queue_limit() -> None:
    lim = FairLimiter("t", 10, per_user=2, queue_max=2, message="busy")
    held = [await lim.acquire(7, of_caller=False) for _ in range(2)]
    queued = [asyncio.ensure_future(lim.acquire(7, of_caller=False)) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(BusError) as e:
        await lim.acquire(7, of_caller=False)
    assert (e.value.name, e.value.message) == (LIMITS_EXCEEDED, "busy")
    other = await lim.acquire(8, of_caller=False)  # another user is not held up
    root = [await lim.acquire(0, of_caller=False) for _ in range(5)]  # neither is root
    assert lim.running == 8
    held[0]()
    got = await queued[0]
    assert lim.running == 8 and not queued[1].done()
    for release in (got, held[1], other, *root):
        release()
    (await queued[1])()
    assert lim.running == 0 and lim.waiting() == 0


async def test_a_cancelled_waiter_leaks_nothing() -> None:
    lim = FairLimiter("t", 1)
    release = await lim.acquire(5, of_caller=False)
    waiter = asyncio.ensure_future(lim.acquire(6, of_caller=False))
    await asyncio.sleep(0)
    waiter.cancel()
    release()  # may hand the slot to the cancelled waiter, which must pass it on
    await asyncio.sleep(0)
    assert lim.running == 0 and lim.waiting() == 0
    (await lim.acquire(7, of_caller=False))()
    assert lim.running == 0

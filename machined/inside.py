"""Looking inside a container: addresses, OS release, UID shift.

Anything that must enter the container's namespaces runs in a child process
(:mod:`machined.nsprobe` through :mod:`machined.worker`) under a deadline; what can be read from /proc is
read directly.
"""

from __future__ import annotations

import errno
import os

from machined.addresses import Address
from machined.errors import BusError
from machined.worker import run_worker

PROBE_TIMEOUT = 10.0


def same_netns(leader: int) -> bool:
    """Whether *leader* shares our network namespace (no private networking)."""
    try:
        return os.stat(f"/proc/{leader}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except FileNotFoundError:
        raise BusError.from_errno(errno.ESRCH) from None


async def container_addresses(leader: int) -> list[Address]:
    data = await run_worker("machined.nsprobe:addresses", timeout=PROBE_TIMEOUT, shared=True, leader=leader)
    assert isinstance(data, list)
    return [Address(int(f), 0, 0, bytes.fromhex(a)) for f, a in data]


async def container_os_release(leader: int) -> dict[str, str]:
    data = await run_worker("machined.nsprobe:os_release", timeout=PROBE_TIMEOUT, shared=True, leader=leader)
    assert isinstance(data, dict)
    return {str(k): str(v) for k, v in data.items()}


def uid_shift(leader: int) -> int | None:
    """The container's UID shift from /proc/LEADER/{uid,gid}_map; None if the mapping is complex."""
    try:
        with open(f"/proc/{leader}/uid_map", encoding="ascii") as f:
            uid_lines = f.read().split("\n")
    except FileNotFoundError:
        if os.path.exists(f"/proc/{leader}"):
            return 0  # kernel without user namespaces
        raise BusError.from_errno(errno.ESRCH) from None
    uid_lines = [line.split() for line in uid_lines if line.strip()]
    if len(uid_lines) != 1 or len(uid_lines[0]) != 3:
        return None
    inside, outside, count = (int(x) for x in uid_lines[0])
    if inside != 0 or count < 65534:
        return None
    with open(f"/proc/{leader}/gid_map", encoding="ascii") as f:
        gid_lines = [line.split() for line in f.read().split("\n") if line.strip()]
    if len(gid_lines) != 1 or [int(x) for x in gid_lines[0]] != [inside, outside, count]:
        return None
    return outside

"""Looking inside a container: addresses, OS release, a PTY, the root directory, the UID shift.

Anything that must enter the container's namespaces runs in a child under a
deadline, never in the daemon. The cheap looks go to the container's *helper*: a
child of the fork server that entered the container once, through the leader's
pidfd (:func:`machined.nsprobe.resident`), and answers them one at a time, so
that a look costs a message, not a fork and a setns. A helper is started at the
first look, leaves when its leader exits, and is let go after a minute without
looks (at most :data:`machined.worker.HELPERS_MAX` of them live at once). A look
that passes its deadline kills the helper: the next look starts a new one. What
can be read from /proc is read directly.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from typing import Any

from machined.addresses import Address, from_rows
from machined.errors import BusError
from machined.machine import Machine
from machined.process import start_time
from machined.worker import HelperPool, run_helper

PROBE_TIMEOUT = 10.0

helpers = HelperPool("machined.nsprobe:resident")


def same_netns(leader: int) -> bool:
    """Whether *leader* shares our network namespace (no private networking)."""
    try:
        return os.stat(f"/proc/{leader}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except FileNotFoundError:
        raise BusError.from_errno(errno.ESRCH) from None


@contextlib.contextmanager
def leader_pidfd(machine: Machine) -> Iterator[int]:
    """A pidfd of the machine's pinned leader, for the duration of a call into its namespaces.

    The one taken at registration if there is one; else (no pidfd could be had then) a
    new one, if the PID still names the process pinned by start time.
    """
    ref = machine.leader_ref
    if ref is not None and ref.pidfd is not None:
        yield ref.pidfd  # copied by the worker before the first await; the machine keeps its own
        return
    if ref is None or ref.start_time is None:
        raise BusError.from_errno(errno.ESRCH)
    try:
        fd = os.pidfd_open(machine.leader)
    except OSError:
        raise BusError.from_errno(errno.ESRCH) from None
    try:
        if start_time(machine.leader) != ref.start_time:
            raise BusError.from_errno(errno.ESRCH)
        yield fd
    finally:
        os.close(fd)


async def look(machine: Machine, op: str, timeout: float = PROBE_TIMEOUT, *, shared: bool = False,
               want_fd: bool = False) -> tuple[Any, list[int]]:  # fmt: skip
    """*op* (see :data:`machined.nsprobe.LOOKS`) answered by the machine's helper: (result, fds)."""
    ref = machine.leader_ref
    key = (machine.leader, ref.start_time if ref is not None else None, ref.pidfd_id if ref is not None else 0)
    with leader_pidfd(machine) as fd:
        return await run_helper(
            helpers, key, op, timeout=timeout, start_kwargs={"leader": machine.leader},
            start_fds={"leader_fd": fd}, shared=shared, want_fd=want_fd,
        )  # fmt: skip


async def container_addresses(machine: Machine) -> list[Address]:
    data, _ = await look(machine, "addresses", shared=True)
    return from_rows(data)


async def container_os_release(machine: Machine) -> dict[str, str]:
    data, _ = await look(machine, "os_release", shared=True)
    assert isinstance(data, dict)
    return {str(k): str(v) for k, v in data.items()}


async def open_pty(machine: Machine, timeout: float) -> tuple[int, str]:
    """A PTY master allocated inside the container, and its slave's path there."""
    path, fds = await look(machine, "open_pty", timeout, want_fd=True)
    return _one_fd(fds), str(path)


async def open_root_directory(machine: Machine, timeout: float) -> int:
    _, fds = await look(machine, "open_root_directory", timeout, want_fd=True)
    return _one_fd(fds)


def _one_fd(fds: list[int]) -> int:
    if not fds:
        raise BusError("org.freedesktop.DBus.Error.Failed", "Child failed.")
    for extra in fds[1:]:
        os.close(extra)
    return fds[0]


def uid_shift(leader: int) -> int | None:
    """The container's UID shift from /proc/LEADER/{uid,gid}_map; None if the mapping is complex."""
    try:
        with open(f"/proc/{leader}/uid_map", encoding="ascii") as f:
            uid_lines = f.read().split("\n")
    except FileNotFoundError:
        if os.path.exists(f"/proc/{leader}"):
            return 0  # kernel without user namespaces
        raise BusError.from_errno(errno.ESRCH) from None
    uid_rows = [line.split() for line in uid_lines if line.strip()]
    if len(uid_rows) != 1 or len(uid_rows[0]) != 3:
        return None
    inside, outside, count = (int(x) for x in uid_rows[0])
    if inside != 0 or count < 65534:
        return None
    with open(f"/proc/{leader}/gid_map", encoding="ascii") as f:
        gid_lines = [line.split() for line in f.read().split("\n") if line.strip()]
    if len(gid_lines) != 1 or [int(x) for x in gid_lines[0]] != [inside, outside, count]:
        return None
    return outside

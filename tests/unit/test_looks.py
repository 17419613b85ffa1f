"""Looks inside machines without a process: os-release read confined to a root, hostile files
refused, blocking reads cost only their caller, addresses parsed as `ip` shows them."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from machined import personality
from machined.children import limits
from machined.errors import BusError, errno_error_name
from machined.inside import looks
from machined.inside.addresses import read_addresses
from machined.inside.looks import OS_RELEASE_MAX, read_os_release_at
from machined.inside.lookthreads import LookThreads


@pytest.fixture(params=["openat2", "walk"])
def root(tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, int]]:
    """A tree with usr/lib/os-release; its paths resolved with openat2() or, as where a seccomp
    filter says ENOSYS to it, component by component."""
    monkeypatch.setattr(looks, "_openat2", [request.param == "openat2"])
    (tmp_path / "etc").mkdir()
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "usr/lib/os-release").write_text('ID=fallback\nNAME="Fallback"\n')
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        yield tmp_path, fd
    finally:
        os.close(fd)


@pytest.fixture(params=["252", "262"])
def as_version(request: pytest.FixtureRequest) -> Iterator[str]:
    before = personality.current()
    personality.set_personality(request.param)
    try:
        yield str(request.param)
    finally:
        personality.set_personality(before)


def refused(fd: int) -> tuple[str, str]:
    with pytest.raises(BusError) as e:
        read_os_release_at(fd)
    return e.value.name, e.value.message


def test_etc_then_usr_lib(root: tuple[Path, int]) -> None:
    path, fd = root
    assert read_os_release_at(fd) == {"ID": "fallback", "NAME": "Fallback"}
    (path / "etc/os-release").write_text("ID=etc\n")
    assert read_os_release_at(fd) == {"ID": "etc"}
    (path / "etc/os-release").unlink()
    (path / "usr/lib/os-release").unlink()
    with pytest.raises(FileNotFoundError):
        read_os_release_at(fd)


def test_symlinks_stay_inside_the_root(root: tuple[Path, int], tmp_path_factory: pytest.TempPathFactory) -> None:
    """As upstream's child, chrooted, sees them: an absolute or ../ link resolves inside the root
    (a dangling one falls back to usr/lib, as ENOENT does)."""
    path, fd = root
    outside = tmp_path_factory.mktemp("outside") / "secret"
    outside.write_text("ID=secret\n")
    (path / "etc/os-release").symlink_to(f"/../../../../{outside}")
    assert read_os_release_at(fd) == {"ID": "fallback", "NAME": "Fallback"}
    (path / "etc/os-release").unlink()
    (path / "etc/os-release").symlink_to("../" * 20 + str(outside).lstrip("/"))
    assert read_os_release_at(fd) == {"ID": "fallback", "NAME": "Fallback"}
    within = path / str(outside).lstrip("/")
    within.parent.mkdir(parents=True)
    within.write_text("ID=inside\n")
    assert read_os_release_at(fd) == {"ID": "inside"}
    (path / "etc/os-release").unlink()
    (path / "etc/os-release").symlink_to("os-release")  # a loop
    assert refused(fd)[1].endswith(("Child died abnormally.", "Too many levels of symbolic links"))
    (path / "etc/os-release").unlink()
    (path / "etc/os-release").symlink_to("/etc/../etc/./sub/../../usr/lib/../lib/os-release")
    (path / "etc/sub").mkdir()
    assert read_os_release_at(fd) == {"ID": "fallback", "NAME": "Fallback"}
    (path / "etc/os-release").unlink()
    (path / "etc/os-release").symlink_to("/proc/self/root/etc/passwd")  # never the host's /proc
    (path / "proc").mkdir()
    assert read_os_release_at(fd) == {"ID": "fallback", "NAME": "Fallback"}


def test_what_is_not_a_regular_file_is_refused_without_opening_it(root: tuple[Path, int], as_version: str) -> None:
    """A FIFO (upstream's child blocks on it, and its daemon with it), a device node, a directory:
    the error upstream gives for what its child cannot read, at once."""
    path, fd = root
    expected = (
        (errno_error_name(errno.ESHUTDOWN), "Failed to get OS release: Cannot send after transport endpoint shutdown")
        if as_version == "262"
        else ("org.freedesktop.DBus.Error.Failed", "Child died abnormally.")
    )
    os.mkfifo(path / "etc/os-release")
    t = time.monotonic()
    assert refused(fd) == expected
    assert time.monotonic() - t < 1
    (path / "etc/os-release").unlink()
    (path / "etc/os-release").mkdir()
    assert refused(fd) == expected
    (path / "etc/os-release").rmdir()
    if os.geteuid() == 0:
        os.mknod(path / "etc/os-release", 0o600 | 0o020000, os.makedev(1, 5))  # /dev/zero
        assert refused(fd) == expected


def test_sizes_and_nul_bytes(root: tuple[Path, int], as_version: str) -> None:
    path, fd = root
    prefix = "Failed to get OS release: " if as_version == "262" else ""
    f = path / "etc/os-release"
    f.write_bytes(b"ID=a\n" + b"X=" + b"y" * (OS_RELEASE_MAX - 100) + b"\n")
    assert read_os_release_at(fd)["ID"] == "a"
    with open(f, "wb") as out:
        out.truncate(1 << 30)  # 1 GiB of NUL bytes, sparse: upstream says EBADMSG too
    t = time.monotonic()
    assert refused(fd) == (errno_error_name(errno.EBADMSG), prefix + "Bad message")
    assert time.monotonic() - t < 2
    f.write_bytes(b"ID=" + b"a" * (OS_RELEASE_MAX + 10) + b"\n")
    assert refused(fd) == (errno_error_name(errno.EFBIG), prefix + "File too large")


async def test_a_blocked_look_costs_only_its_caller() -> None:
    """One job never ends: its callers (and those joining it) get Timeout; other jobs run in
    other threads; it holds one slot of the limit on children until it ends."""
    pool = LookThreads(limit=4, idle=0.5)
    stuck = threading.Event()
    started = threading.Event()

    def blocked() -> str:
        started.set()
        stuck.wait(30)
        return "late"

    before = limits.children.running
    t = time.monotonic()
    with pytest.raises(BusError) as e:
        await pool.run("hung", lambda: (blocked, lambda: None), 0.3)
    assert e.value.name == "org.freedesktop.DBus.Error.Timeout"
    assert 0.25 < time.monotonic() - t < 2
    assert started.is_set() and limits.children.running == before + 1
    results = await asyncio.gather(*(pool.run(i, lambda i=i: (lambda: i * 2, lambda: None), 2) for i in range(20)))
    assert results == [i * 2 for i in range(20)]
    with pytest.raises(BusError):  # joined, not another thread
        await pool.run("hung", lambda: pytest.fail("a second job for the same key"), 0.1)
    assert pool.threads() <= 4
    stuck.set()
    for _ in range(200):
        if limits.children.running == before:
            break
        await asyncio.sleep(0.01)
    assert limits.children.running == before
    assert await pool.run("hung", lambda: (lambda: "again", lambda: None), 2) == "again"
    await asyncio.sleep(1.0)
    assert pool.threads() == 0  # idle threads end


async def test_a_job_that_cannot_start_leaves_nothing_behind() -> None:
    pool = LookThreads()

    def cannot() -> tuple[object, object]:
        raise BusError.from_errno(errno.ESRCH)

    for _ in range(2):
        with pytest.raises(BusError):
            await pool.run("gone", cannot, 1)  # type: ignore[arg-type]
    assert await pool.run("gone", lambda: (lambda: 1, lambda: None), 1) == 1


async def test_an_fd_nobody_waits_for_is_closed() -> None:
    pool = LookThreads()
    go = threading.Event()
    opened: list[int] = []

    def open_late() -> int:
        go.wait(10)
        fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
        opened.append(fd)
        return fd

    with pytest.raises(BusError):
        await pool.run("x", lambda: (open_late, lambda: None), 0.1, orphan=os.close)
    go.set()
    for _ in range(200):
        if opened:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    with pytest.raises(OSError):
        os.fstat(opened[0])


def test_addresses_as_ip_shows_them() -> None:
    """The struct parser against `ip -j address` of this namespace, IPv6 and interface index too."""
    out = json.loads(subprocess.run(["ip", "-j", "address"], check=True, capture_output=True, text=True).stdout)
    shown = {
        (a["local"], link["ifindex"])
        for link in out
        for a in link.get("addr_info", [])
        if a.get("scope") not in ("host", "nowhere") and not a.get("deprecated")
    }
    got = read_addresses()
    assert {(socket.inet_ntop(a.family, a.address), a.ifindex) for a in got} == shown
    families = [a.family for a in got]
    assert families == sorted(families, key=lambda f: f != socket.AF_INET)  # IPv4 first


async def test_no_os_release_answered_as_each_version(
    as_version: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container with neither /etc/os-release nor /usr/lib/os-release: 252 says Failed "Machine
    does not contain OS release information", 262 passes its reader's ENOENT on by errno."""
    from machined.inside.access import MachineAccess
    from machined.machine import Machine, MachineClass, Timestamp, host_machine
    from machined.manager import MachineManager
    from machined.statefile import StateDir

    async def missing(machine: Machine) -> dict[str, str]:
        raise FileNotFoundError(errno.ENOENT, "none")

    monkeypatch.setattr(looks, "container_os_release", missing)
    access = MachineAccess(MachineManager(host_machine(b"", Timestamp()), StateDir(str(tmp_path))))
    monkeypatch.setattr(access, "check_may_enter", lambda machine, what: None)
    machine = Machine(name="c", machine_class=MachineClass.CONTAINER, leader=os.getpid())
    with pytest.raises(BusError) as e:
        await access.os_release(machine)
    if as_version == "262":
        assert (e.value.name, e.value.message) == (
            "org.freedesktop.DBus.Error.FileNotFound",
            "Failed to get OS release: No such file or directory",
        )
    else:
        assert (e.value.name, e.value.message) == (
            "org.freedesktop.DBus.Error.Failed",
            "Machine does not contain OS release information",
        )

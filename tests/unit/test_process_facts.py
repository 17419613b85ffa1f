"""Facts about other processes the daemon reads with psutil: a leader's owner (who may register
it), the process that holds the bus name (in the start-up error)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from machined import daemon
from machined.errors import BusError
from machined.lifecycle import process_owner

NO_BUS: Any = None  # the bus daemon is faked


def _gone_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_process_owner_is_the_real_uid() -> None:
    assert process_owner(os.getpid()) == os.getuid()
    assert process_owner(_gone_pid()) is None
    assert process_owner(0) is None and process_owner(-1) is None and process_owner(2**40) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process with another real UID")
def test_process_owner_is_not_the_effective_uid() -> None:
    child = subprocess.Popen(["sleep", "30"], preexec_fn=lambda: os.setresuid(4242, 0, 0))
    try:
        assert process_owner(child.pid) == 4242
    finally:
        child.kill()
        child.wait()


def _owner_is(monkeypatch: pytest.MonkeyPatch, pid: int | None) -> None:
    async def call_bus_daemon(bus: Any, member: str, signature: str, body: list[Any]) -> list[Any]:
        assert (member, signature, body) == ("GetConnectionUnixProcessID", "s", ["org.freedesktop.machine1"])
        if pid is None:
            raise BusError("org.freedesktop.DBus.Error.NameHasNoOwner", "no owner")
        return [pid]

    monkeypatch.setattr(daemon, "call_bus_daemon", call_bus_daemon)


async def test_describe_owner_names_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    comm = Path(f"/proc/{os.getpid()}/comm").read_text().strip()
    _owner_is(monkeypatch, os.getpid())
    assert await daemon._describe_owner(NO_BUS, "org.freedesktop.machine1") == f" by PID {os.getpid()} ({comm})"
    gone = _gone_pid()
    _owner_is(monkeypatch, gone)
    assert await daemon._describe_owner(NO_BUS, "org.freedesktop.machine1") == f" by PID {gone}"
    _owner_is(monkeypatch, None)
    assert await daemon._describe_owner(NO_BUS, "org.freedesktop.machine1") == ""

"""Smaller things a client or an operator can see, as systemd-machined 252 does them:
message flags, the exit status when the bus goes away, memory after large requests,
temporaries of state files left by a killed writer. On a private dbus-daemon, no root.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

from dbus_fast import Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus

from machined.machine import Machine, MachineClass
from machined.statefile import StateDir, serialize
from tests.unit.test_daemon_private_bus import DEST, MANAGER, call, daemon, private_bus, start_daemon  # noqa: F401

MANAGER_IFACE = "org.freedesktop.machine1.Manager"


async def test_replies_and_errors_expect_no_reply_as_sd_bus_flags_them(
    private_bus: str,  # noqa: F811
    daemon: subprocess.Popen[str],  # noqa: F811
) -> None:
    ret = await call(private_bus, MANAGER, MANAGER_IFACE, "GetMachine", "s", [".host"])
    err = await call(private_bus, MANAGER, MANAGER_IFACE, "GetMachine", "s", ["nope"])
    ping = await call(private_bus, MANAGER, "org.freedesktop.DBus.Peer", "Ping")
    assert (ret.message_type, err.message_type, ping.message_type) == (
        MessageType.METHOD_RETURN, MessageType.ERROR, MessageType.METHOD_RETURN,
    )  # fmt: skip
    for reply in (ret, err, ping):
        assert reply.flags == MessageFlag.NO_REPLY_EXPECTED


def test_losing_the_bus_exits_with_status_0_as_252(tmp_path: Path) -> None:
    """252 ends 'inactive (success)' when the bus goes away; bus activation starts it again."""
    address = f"unix:path={tmp_path}/bus"
    bus = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", f"--address={address}", "--nopidfile"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            if (tmp_path / "bus").exists():
                break
            time.sleep(0.02)
        proc = start_daemon(address, tmp_path / "machines")
        for _ in range(200):
            r = subprocess.run(["busctl", f"--address={address}", "status", DEST], capture_output=True)
            if r.returncode == 0:
                break
            time.sleep(0.05)
    finally:
        bus.terminate()
        bus.wait(timeout=10)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Lost the connection to the bus" in err
    assert "Traceback" not in err


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def _large_calls(address: str, sizes_mib: list[int]) -> None:
    bus = await MessageBus(bus_address=address).connect()
    try:
        for i, size in enumerate(sizes_mib):
            n = size << 20
            if i % 2:  # echoed back in the error: a large reply too
                body, sig = ["x" * n], "s"
            else:  # wrong signature: a short error
                body, sig = [b"x" * n], "ay"
            reply = await bus.call(
                Message(destination=DEST, path=MANAGER, interface=MANAGER_IFACE, member="GetMachine",
                        signature=sig, body=body)
            )  # fmt: skip
            assert reply is not None and reply.message_type is MessageType.ERROR
    finally:
        bus.disconnect()


def test_memory_returns_near_idle_after_30_mib_requests(
    private_bus: str,  # noqa: F811
    daemon: subprocess.Popen[str],  # noqa: F811
) -> None:
    # Sizes vary, as they would: glibc's moving mmap threshold kept such blocks in the heap.
    asyncio.run(_large_calls(private_bus, [1]))
    time.sleep(0.3)
    idle = _rss_mib(daemon.pid)
    asyncio.run(_large_calls(private_bus, [30, 30, 20, 25, 10, 5, 29, 15]))
    time.sleep(0.5)
    after = _rss_mib(daemon.pid)
    assert after - idle < 10, f"idle {idle:.1f} MiB, after large requests {after:.1f} MiB"


def _machine(name: str, leader: int) -> Machine:
    m = Machine(name=name)
    m.leader = leader
    m.machine_class = MachineClass.VM
    m.unit = f"machine-{name}.scope"
    return m


def test_stale_temporaries_are_removed_at_start_and_state_still_loads(tmp_path: Path) -> None:
    state = StateDir(str(tmp_path))
    state.save(_machine("good", os.getpid()))
    # A writer killed between creating its temporary and renaming it (ours and upstream's names).
    (tmp_path / ".#goodx1y2z3a4").write_text(serialize(_machine("good", 12345))[:40])
    (tmp_path / ".#other0123456789abcdef").write_text("")
    (tmp_path / ".#dangling").symlink_to("/nonexistent")
    (tmp_path / ".hidden-not-ours").write_text("keep")
    loaded = state.load_all()
    assert [m.name for m in loaded] == ["good"] and loaded[0].leader == os.getpid()
    assert sorted(os.listdir(tmp_path)) == [".hidden-not-ours", "good", "unit:machine-good.scope"]

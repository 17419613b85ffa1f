"""Restart recovery with many machines: state files read back, machines checked side by side,
files left alone when unchanged; the quick reading of plain state files equals the full one."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from machined.envfile import parse_env_file
from machined.machine import Machine, MachineClass, Timestamp, host_machine
from machined.manager import RECOVERY_CONCURRENCY, MachineManager
from machined.process import ProcessRef
from machined.statefile import StateDir, _parse_plain, serialize


@settings(max_examples=3000)
@given(st.text(st.sampled_from(list("AB_1x= \t\n#;é.-/:")), max_size=80))
def test_plain_state_files_read_as_the_env_file_reader_reads_them(text: str) -> None:
    assert _parse_plain(text) == parse_env_file(text)


def test_quoted_or_escaped_files_take_the_full_reader() -> None:
    for text in ('A="x y"\n', "A='x'\n", "A=x\\ y\n", "A=x\r\n"):
        assert _parse_plain(text) is None


class FakeSystemd:
    """PID 1 as GC asks it: which units are active; how many questions at once."""

    def __init__(self, inactive: set[str]) -> None:
        self.inactive = inactive
        self.asked: list[str] = []
        self.batches: list[list[str]] = []
        self.in_flight = self.most_in_flight = 0

    async def unit_is_active(self, unit: str) -> bool:
        self.asked.append(unit)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0.001)
        self.in_flight -= 1
        return unit not in self.inactive

    async def job_is_active(self, job: str) -> bool:
        return False

    async def stop_unit(self, unit: str) -> str:
        return ""


class BatchingSystemd(FakeSystemd):
    """One that also answers for many units at once (ListUnitsByNames), though not for m5's."""

    async def units_active(self, units: list[str]) -> dict[str, bool]:
        self.batches.append(list(units))
        return {u: u not in self.inactive for u in units if u != "machine-m5.scope"}


@pytest.mark.parametrize("batching", [False, True])
async def test_restart_drops_the_gone_starts_the_living_and_rewrites_only_what_changed(
    tmp_path: Path, batching: bool
) -> None:
    leaders = [subprocess.Popen(["sleep", "1000"]) for _ in range(60)]
    try:
        state = StateDir(str(tmp_path))
        for i, p in enumerate(leaders):
            m = Machine(name=f"m{i}", machine_class=MachineClass.VM, leader=p.pid, unit=f"machine-m{i}.scope",
                        timestamp=Timestamp(1_700_000_000_000_000, 1000), leader_ref=ProcessRef.take(p.pid))  # fmt: skip
            state.save(m)
            m.leader_ref.release()
        # One file as another writer left it (no LEADER_PIDFDID): rewritten in our form.
        (tmp_path / "m1").write_text(serialize(Machine(name="m1", machine_class=MachineClass.VM, leader=leaders[1].pid,
                                                       unit="machine-m1.scope", timestamp=Timestamp(5, 6))))  # fmt: skip
        inodes = {f"m{i}": os.stat(tmp_path / f"m{i}").st_ino for i in range(60)}
        systemd = (BatchingSystemd if batching else FakeSystemd)(inactive={"machine-m0.scope", "machine-m7.scope"})
        announced: list[tuple[str, str]] = []
        manager = MachineManager(host_machine(b"\1" * 16, Timestamp(1, 0)), StateDir(str(tmp_path)), systemd=systemd,
                                 announce=lambda signal, m: announced.append((signal, m.name)))  # fmt: skip
        await manager.load_state()
        names = [m.name for m in manager.machines()]
        assert names[0] == ".host" and sorted(names[1:]) == sorted(f"m{i}" for i in range(60) if i not in (0, 7))
        assert sorted(n for s, n in announced if s == "MachineNew") == sorted(names[1:])
        assert not (tmp_path / "m0").exists() and not (tmp_path / "unit:machine-m0.scope").exists()
        if batching:
            # Asked for all units at once; one by one only where that did not tell, and after stopping.
            assert len(systemd.batches) == 1 and sorted(systemd.batches[0]) == sorted(
                f"machine-m{i}.scope" for i in range(60)
            )
            assert sorted(systemd.asked) == ["machine-m0.scope", "machine-m5.scope", "machine-m7.scope"]
        else:
            # GC asked once per living machine, again after stopping a gone one; side by side, bounded.
            expected = [f"machine-m{i}.scope" for i in range(60)] + ["machine-m0.scope", "machine-m7.scope"]
            assert sorted(systemd.asked) == sorted(expected)
            assert 1 < systemd.most_in_flight <= RECOVERY_CONCURRENCY
        unchanged = [n for n in names[1:] if os.stat(tmp_path / n).st_ino == inodes[n]]
        assert sorted(unchanged) == sorted(n for n in names[1:] if n != "m1")
        assert "LEADER_PIDFDID=" in (tmp_path / "m1").read_text()
        for n in names[1:]:
            assert os.readlink(tmp_path / f"unit:machine-{n}.scope") == n
        # A later save writes again.
        m2 = manager.registry.get("m2")
        assert m2 is not None
        m2.stopping = True
        manager._save(m2)
        assert os.stat(tmp_path / "m2").st_ino != inodes["m2"]
    finally:
        for p in leaders:
            p.kill()
            p.wait()


class StoppingSystemd(FakeSystemd):
    async def stop_unit(self, unit: str) -> str:
        return "/org/freedesktop/systemd1/job/9"


async def test_a_stop_job_done_is_an_inactive_unit_without_asking_again(tmp_path: Path) -> None:
    systemd = StoppingSystemd(inactive=set())  # it would still say "active" if asked
    manager = MachineManager(host_machine(b"\1" * 16, Timestamp(1, 0)), StateDir(str(tmp_path)), systemd=systemd)
    m = Machine(name="s1", machine_class=MachineClass.VM, leader=os.getpid(), unit="machine-s1.scope", started=True)
    manager.registry.add(m)
    manager.registry.index_unit(m)
    await manager.terminate(m)
    assert m.stopping and m.scope_job == "/org/freedesktop/systemd1/job/9"
    manager.job_removed("/org/freedesktop/systemd1/job/9", "machine-s1.scope", "done")
    await manager.gc(drop_not_started=True)
    assert manager.registry.get("s1") is None and systemd.asked == []
    # A stop job that failed proves nothing: systemd is asked.
    m2 = Machine(name="s2", machine_class=MachineClass.VM, leader=os.getpid(), unit="machine-s2.scope", started=True)
    manager.registry.add(m2)
    manager.registry.index_unit(m2)
    await manager.terminate(m2)
    manager.job_removed("/org/freedesktop/systemd1/job/9", "machine-s2.scope", "failed")
    await manager.gc(drop_not_started=True)
    assert manager.registry.get("s2") is m2 and systemd.asked == ["machine-s2.scope"]

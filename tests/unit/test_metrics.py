"""Metrics for Prometheus: cgroup readers on fixture trees of each layout, the collectors'
output parsed with prometheus_client's own parser, the textfile writer, the HTTP
endpoint, the command line, and the daemon on a private bus counting its calls.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from machined import cli, metrics
from machined.cgroup import HYBRID, LEGACY, UNIFIED
from machined.cgroupstats import (
    NAME_SYSTEMD,
    V2,
    CgroupReader,
    CgroupStats,
    fallback_paths,
    parse_blkio,
    parse_flat_keyed,
    parse_int,
    parse_io_stat,
    unit_paths,
)
from machined.daemon import known_methods
from machined.limits import FairLimiter
from machined.machine import Machine, MachineClass, Timestamp, host_machine
from machined.manager import MachineManager
from machined.metrics import Metrics
from machined.statefile import StateDir

# ----- file parsers ---------------------------------------------------------------------

CPU_STAT = "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\nnr_periods 0\n"
IO_STAT = (
    "8:0 rbytes=4096 wbytes=1024 rios=1 wios=1 dbytes=0 dios=0\n"
    "253:1 rbytes=100 wbytes=200 rios=2 wios=3 dbytes=0 dios=0\n"
)
BLKIO = (
    "8:0 Read 4096\n8:0 Write 1024\n8:0 Sync 5120\n8:0 Async 0\n8:0 Discard 0\n8:0 Total 5120\n"
    "253:1 Read 100\n253:1 Write 200\n253:1 Total 300\nTotal 5420\n"
)


def test_parsers() -> None:
    assert parse_flat_keyed(CPU_STAT, "usage_usec") == 2500000
    assert parse_flat_keyed(CPU_STAT, "nope") is None
    assert parse_io_stat(IO_STAT) == (4196, 1224)
    assert parse_io_stat("") == (0, 0)
    assert parse_blkio(BLKIO) == (4196, 1224)  # Sync/Async/Total are not counted twice
    assert parse_int("1234\n") == 1234
    assert parse_int("max\n") is None
    assert parse_int("") is None


def test_unit_paths_cut_after_the_unit_in_every_hierarchy() -> None:
    text = (
        "12:pids:/machine.slice/machine-a.scope/payload\n"
        "5:cpu,cpuacct:/machine.slice/machine-a.scope\n"
        "4:memory:/machine.slice\n"  # memory not enabled for the unit: left out
        "1:name=systemd:/machine.slice/machine-a.scope/payload\n"
        "0::/machine.slice/machine-a.scope/payload (deleted)\n"
    )
    assert unit_paths(text, "machine-a.scope") == {
        "pids": "/machine.slice/machine-a.scope",
        "cpu": "/machine.slice/machine-a.scope",
        "cpuacct": "/machine.slice/machine-a.scope",
        NAME_SYSTEMD: "/machine.slice/machine-a.scope",
        V2: "/machine.slice/machine-a.scope",
    }
    # Any slice (libvirt's partitions), and a process that is not in the unit at all.
    assert unit_paths("0::/machine.slice/machine-qemu.slice/vm.scope/emulator\n", "vm.scope") == {
        V2: "/machine.slice/machine-qemu.slice/vm.scope"
    }
    assert unit_paths("0::/user.slice/user-0.slice/session-1.scope\n", "machine-a.scope") == {}
    assert fallback_paths("machine-a.scope")[V2] == "/machine.slice/machine-a.scope"


# ----- readers on fixture trees -----------------------------------------------------------

UNIT = "machine-a.scope"
REL = f"/machine.slice/{UNIT}"
PATHS = fallback_paths(UNIT)


def write(root: Path, rel: str, files: dict[str, str]) -> Path:
    d = root / rel.lstrip("/")
    d.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (d / name).write_text(content)
    return d


def test_unified_reads_every_file(tmp_path: Path) -> None:
    write(tmp_path, REL, {
        "cpu.stat": CPU_STAT, "memory.current": "1048576\n", "memory.peak": "2097152\n",
        "pids.current": "7\n", "io.stat": IO_STAT, "cgroup.threads": "1\n",
    })  # fmt: skip
    stats = CgroupReader(UNIFIED, str(tmp_path)).read(PATHS)
    assert stats == CgroupStats(
        cpu_seconds=2.5, memory_bytes=1048576, memory_peak_bytes=2097152, tasks=7,
        io_read_bytes=4196, io_write_bytes=1224,
    )  # fmt: skip


def test_unified_without_controllers_counts_threads_of_the_whole_subtree(tmp_path: Path) -> None:
    # No memory/pids/io controller enabled: only what cgroup2 always has.
    write(tmp_path, REL, {"cpu.stat": CPU_STAT, "cgroup.threads": "", "cgroup.procs": ""})
    write(tmp_path, REL + "/payload", {"cgroup.threads": "10\n11\n12\n", "cgroup.procs": "10\n"})
    write(tmp_path, REL + "/supervisor", {"cgroup.threads": "20\n", "cgroup.procs": "20\n"})
    stats = CgroupReader(UNIFIED, str(tmp_path)).read(PATHS)
    assert stats == CgroupStats(cpu_seconds=2.5, tasks=4)


def test_hybrid_prefers_v1_controllers(tmp_path: Path) -> None:
    write(tmp_path, "unified" + REL, {"cpu.stat": CPU_STAT, "cgroup.threads": "1\n2\n"})
    write(tmp_path, "cpuacct" + REL, {"cpuacct.usage": "3000000000\n"})
    write(tmp_path, "memory" + REL, {"memory.usage_in_bytes": "4096\n", "memory.max_usage_in_bytes": "8192\n"})
    write(tmp_path, "pids" + REL, {"pids.current": "5\n"})
    write(tmp_path, "blkio" + REL, {"blkio.throttle.io_service_bytes_recursive": BLKIO,
                                    "blkio.throttle.io_service_bytes": "8:0 Read 1\n"})  # fmt: skip
    stats = CgroupReader(HYBRID, str(tmp_path)).read(PATHS)
    assert stats == CgroupStats(
        cpu_seconds=3.0, memory_bytes=4096, memory_peak_bytes=8192, tasks=5, io_read_bytes=4196, io_write_bytes=1224
    )


def test_hybrid_without_v1_controllers_falls_back_to_cgroup2(tmp_path: Path) -> None:
    # As in the sandbox: v1 controller hierarchies not mounted, cgroup2 at unified/.
    write(tmp_path, "unified" + REL, {"cpu.stat": CPU_STAT, "cgroup.threads": "1\n2\n"})
    write(tmp_path, "unified" + REL + "/payload", {"cgroup.threads": "3\n"})
    stats = CgroupReader(HYBRID, str(tmp_path)).read(PATHS)
    assert stats == CgroupStats(cpu_seconds=2.5, tasks=3)


def test_hybrid_uses_each_hierarchys_own_path(tmp_path: Path) -> None:
    text = "7:memory:/other/place/machine-a.scope/x\n0::/machine.slice/machine-a.scope\n"
    write(tmp_path, "memory/other/place/" + UNIT, {"memory.usage_in_bytes": "77\n"})
    write(tmp_path, "unified" + REL, {"cpu.stat": CPU_STAT})
    stats = CgroupReader(HYBRID, str(tmp_path)).read(unit_paths(text, UNIT))
    assert (stats.memory_bytes, stats.cpu_seconds) == (77, 2.5)


def test_legacy_counts_tasks_in_name_systemd(tmp_path: Path) -> None:
    write(tmp_path, "systemd" + REL, {"tasks": "1\n"})
    write(tmp_path, "systemd" + REL + "/payload", {"tasks": "2\n3\n"})
    write(tmp_path, "cpuacct" + REL, {"cpuacct.usage": "500000000\n"})
    write(tmp_path, "blkio" + REL, {"blkio.throttle.io_service_bytes": BLKIO})
    stats = CgroupReader(LEGACY, str(tmp_path)).read(PATHS)
    assert stats == CgroupStats(cpu_seconds=0.5, tasks=3, io_read_bytes=4196, io_write_bytes=1224)


def test_missing_or_garbage_files_are_left_out(tmp_path: Path) -> None:
    assert CgroupReader(UNIFIED, str(tmp_path)).read(PATHS) == CgroupStats()
    assert CgroupReader(HYBRID, str(tmp_path)).read(PATHS) == CgroupStats()
    write(tmp_path, REL, {"cpu.stat": "garbage\n", "memory.current": "x\n", "pids.current": "max\n"})
    (tmp_path / REL.lstrip("/") / "memory.peak").mkdir()  # EISDIR: unreadable, not fatal
    stats = CgroupReader(UNIFIED, str(tmp_path)).read(PATHS)
    assert (stats.cpu_seconds, stats.memory_bytes, stats.memory_peak_bytes) == (None, None, None)


def test_real_cgroupfs_of_this_process() -> None:
    """The kernel's own files, where this process sits in a cgroup below the root of some
    hierarchy (its last path component standing in for a unit)."""
    from machined.cgroup import cgroup_layout

    text = Path("/proc/self/cgroup").read_text()
    reader = CgroupReader(cgroup_layout())
    checked = 0
    for line in text.splitlines():
        path = line.split(":", 2)[2]
        if path.strip("/"):
            stats = reader.read(unit_paths(line, path.rstrip("/").rsplit("/", 1)[1]))
            read = [v for v in vars(stats).values() if v is not None]
            assert all(v >= 0 for v in read)
            checked += len(read)
            if stats.memory_bytes is not None:
                assert stats.memory_bytes > 0
            if stats.tasks is not None:
                assert stats.tasks >= 1  # this thread at least
    if not checked:
        pytest.skip("this process is in no cgroup below a hierarchy's root")


# ----- collectors -------------------------------------------------------------------------


def families(text: str) -> dict[str, list]:
    """name → samples (name, labels, value), parsed as Prometheus does."""
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(fams: dict[str, list], sample: str, **labels: str) -> float | None:
    for fam in fams.values():
        for s in fam:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def make_machine(name: str, unit: str, cls: MachineClass = MachineClass.CONTAINER, leader: int = 0) -> Machine:
    return Machine(name=name, machine_class=cls, service="nspawn", leader=leader, unit=unit, started=True)


@pytest.fixture
def manager(tmp_path: Path) -> MachineManager:
    return MachineManager(host_machine(b"", Timestamp()), StateDir(str(tmp_path / "state")))


def test_machine_collector_output(tmp_path: Path, manager: MachineManager, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cg"
    write(root, REL, {"cpu.stat": CPU_STAT, "memory.current": "1048576\n", "pids.current": "3\n", "io.stat": IO_STAT})
    # b is in a slice of its own, found through its leader's /proc/PID/cgroup.
    write(root, "/vms.slice/b.scope", {"cpu.stat": "usage_usec 1000000\n", "cgroup.threads": "1\n2\n"})
    leader_cgroup = {4242: "0::/vms.slice/b.scope/emulator\n"}
    monkeypatch.setattr(metrics, "read_proc_cgroup", lambda pid: leader_cgroup.get(pid))
    manager.registry.add(make_machine("a", UNIT))
    manager.registry.add(make_machine("b", "b.scope", MachineClass.VM, leader=4242))
    manager.registry.add(make_machine("opening", ""))  # no unit yet: info only
    m = Metrics(manager, FairLimiter("t", 4), known_methods(), reader=CgroupReader(UNIFIED, str(root)))
    fams = families(generate_latest(m.registry).decode())

    info = {s.labels["name"]: s.labels for s in fams["machined_machine_info"]}
    assert info["a"] == {"name": "a", "class": "container", "service": "nspawn", "state": "running", "unit": UNIT}
    assert info[".host"]["class"] == "host" and info["b"]["class"] == "vm"
    assert set(info) == {".host", "a", "b", "opening"}
    assert value(fams, "machined_machine_cpu_seconds_total", name="a", **{"class": "container"}) == 2.5
    assert value(fams, "machined_machine_memory_bytes", name="a") == 1048576
    assert value(fams, "machined_machine_tasks", name="a") == 3
    assert value(fams, "machined_machine_io_read_bytes_total", name="a") == 4196
    assert value(fams, "machined_machine_io_write_bytes_total", name="a") == 1224
    assert value(fams, "machined_machine_cpu_seconds_total", name="b") == 1.0
    assert value(fams, "machined_machine_tasks", name="b") == 2
    # What is missing is left out, never an error; .host has no resource samples.
    assert value(fams, "machined_machine_memory_bytes", name="b") is None
    assert fams["machined_machine_memory_peak_bytes"] == []
    assert value(fams, "machined_machine_cpu_seconds_total", name=".host") is None
    assert value(fams, "machined_machines") == 4
    # The leader's path was kept; a machine that goes away is forgotten.
    assert m.machine_collector._paths == {("b", "b.scope", 4242): {V2: "/vms.slice/b.scope"}}
    manager.registry.remove(manager.registry.get("b"))
    fams = families(generate_latest(m.registry).decode())
    assert "b" not in {s.labels["name"] for s in fams["machined_machine_info"]}
    assert m.machine_collector._paths == {}


async def test_daemon_collector_and_hooks(manager: MachineManager) -> None:
    children = FairLimiter("children", 4)
    m = Metrics(manager, children, known_methods(), reader=CgroupReader(UNIFIED, "/nonexistent"))
    release = await children.acquire(0, of_caller=False)
    manager.operations.running = 2
    await manager.gc(drop_not_started=True)
    await manager.gc(drop_not_started=True)
    m.observe_call("org.freedesktop.machine1.Manager", "ListMachines", None, 0.0002)
    m.observe_call("org.freedesktop.machine1.Manager", "ListMachines", None, 0.0003)
    m.observe_call("org.freedesktop.machine1.Manager", "GetMachine", "org.freedesktop.machine1.NoSuchMachine", 0.001)
    m.observe_call(None, "ListMachines", None, 0.0001)  # sd-bus allows calls without an interface
    m.observe_call("org.example.Nope", "Nope", "org.freedesktop.DBus.Error.UnknownMethod", 0.0001)
    m.observe_call("org.freedesktop.machine1.Manager", "x" * 100, "org.freedesktop.DBus.Error.UnknownMethod", 0.0001)
    vm = make_machine("v", "v.scope", MachineClass.VM)
    m.announced("MachineNew", vm)
    m.announced("MachineNew", make_machine("c", "c.scope"))
    m.announced("MachineRemoved", vm)
    fams = families(generate_latest(m.registry).decode())
    release()

    manager_iface = "org.freedesktop.machine1.Manager"
    assert value(fams, "machined_calls_total", interface=manager_iface, method="ListMachines", result="ok") == 2
    assert value(fams, "machined_calls_total", interface="", method="ListMachines", result="ok") == 1
    assert value(fams, "machined_calls_total", interface=manager_iface, method="GetMachine",
                 result="org.freedesktop.machine1.NoSuchMachine") == 1  # fmt: skip
    # Names that do not exist never become labels of their own.
    assert value(fams, "machined_calls_total", interface="other", method="other",
                 result="org.freedesktop.DBus.Error.UnknownMethod") == 2  # fmt: skip
    assert {s.labels["method"] for s in fams["machined_calls"]} == {"ListMachines", "GetMachine", "other"}
    assert value(fams, "machined_call_duration_seconds_count", interface=manager_iface, method="ListMachines") == 2
    assert value(fams, "machined_call_duration_seconds_bucket", interface=manager_iface, method="ListMachines",
                 le="0.00025") == 1  # fmt: skip
    assert value(fams, "machined_call_duration_seconds_sum", interface=manager_iface, method="ListMachines") == (
        pytest.approx(0.0005)
    )
    assert value(fams, "machined_registrations_total", **{"class": "vm"}) == 1
    assert value(fams, "machined_registrations_total", **{"class": "container"}) == 1
    assert value(fams, "machined_removals_total", **{"class": "vm"}) == 1
    assert value(fams, "machined_removals_total", **{"class": "container"}) == 0
    assert value(fams, "machined_children_running") == 1
    assert value(fams, "machined_children_waiting") == 0
    assert value(fams, "machined_operations_running") == 2
    assert value(fams, "machined_gc_passes_total") == 2
    assert value(fams, "process_resident_memory_bytes") > 0
    assert not any(name.endswith("_created") for fam in fams.values() for name in [s.name for s in fam])


# ----- ways out -----------------------------------------------------------------------------


def test_http_endpoint(manager: MachineManager) -> None:
    m = Metrics(manager, FairLimiter("t", 4), known_methods(), reader=CgroupReader(UNIFIED, "/nonexistent"))
    m.serve("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=10) as r:
            fams = families(r.read().decode())
        assert value(fams, "machined_machine_info", name=".host") == 1
    finally:
        m.stop()


def test_textfile_is_written_and_replaced_atomically(tmp_path: Path, manager: MachineManager) -> None:
    m = Metrics(manager, FairLimiter("t", 4), known_methods(), reader=CgroupReader(UNIFIED, "/nonexistent"))
    path = tmp_path / "machined.prom"
    m.start_textfile(str(path), interval=0.05)
    try:
        assert path.exists()  # written at once
        first = path.stat().st_ino
        fams = families(path.read_text())
        assert value(fams, "machined_gc_passes_total") == 0
        manager.gc_passes = 5
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and value(families(path.read_text()), "machined_gc_passes_total") != 5:
            time.sleep(0.02)
        assert value(families(path.read_text()), "machined_gc_passes_total") == 5
        assert path.stat().st_ino != first  # a new file renamed over the old one, never rewritten in place
    finally:
        m.stop()
    assert os.listdir(tmp_path) == ["machined.prom"]  # no temporaries left


def test_textfile_in_a_missing_directory_fails_at_start(tmp_path: Path, manager: MachineManager) -> None:
    m = Metrics(manager, FairLimiter("t", 4), known_methods(), reader=CgroupReader(UNIFIED, "/nonexistent"))
    with pytest.raises(OSError):
        m.start_textfile(str(tmp_path / "nope" / "m.prom"))
    m.stop()


def test_concurrent_scrapes_while_machines_come_and_go(tmp_path: Path, manager: MachineManager) -> None:
    root = tmp_path / "cg"
    m = Metrics(manager, FairLimiter("t", 4), known_methods(), reader=CgroupReader(UNIFIED, str(root)))
    stop = threading.Event()
    errors: list[BaseException] = []

    def scrape() -> None:
        while not stop.is_set():
            try:
                families(generate_latest(m.registry).decode())
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return

    threads = [threading.Thread(target=scrape) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(2000):
        machine = make_machine(f"m{i % 50}", f"machine-m{i}.scope")
        if i < 100:
            write(root, f"/machine.slice/machine-m{i}.scope", {"cpu.stat": CPU_STAT})
        old = manager.registry.get(machine.name)
        if old is not None:
            manager.registry.remove(old)
        manager.registry.add(machine)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []


# ----- command line and cost ------------------------------------------------------------------


def test_listen_addresses() -> None:
    assert cli.listen_address("9100") == ("127.0.0.1", 9100)
    assert cli.listen_address("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert cli.listen_address("[::1]:9100") == ("::1", 9100)
    assert cli.listen_address("localhost:9100") == ("localhost", 9100)
    for bad in (":9100", "::1:9100", "host:port", "host:70000", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.listen_address(bad)


def test_prometheus_client_is_not_imported_without_metrics() -> None:
    code = (
        "import sys, machined.cli, machined.daemon\n"
        "d = machined.daemon.Daemon(state_dir='/nonexistent')\n"
        "d._start_metrics()\n"
        "print(d.metrics, 'prometheus_client' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "False"]


# ----- the daemon on a private bus ---------------------------------------------------------------

pytest.importorskip("dbus_fast")
from tests.unit.test_daemon_private_bus import call, private_bus  # noqa: E402,F401  (fixture)

DEST = "org.freedesktop.machine1"
MANAGER = "/org/freedesktop/machine1"
MANAGER_IFACE = "org.freedesktop.machine1.Manager"


@pytest.fixture
def daemon_with_metrics(private_bus: str, tmp_path: Path) -> Iterator[tuple[int, Path]]:  # noqa: F811
    textfile = tmp_path / "machined.prom"
    proc = subprocess.Popen(
        [sys.executable, "-m", "machined", "--bus-address", private_bus, "--state-dir", str(tmp_path / "machines"),
         "--userdb-socket", "", "--metrics-listen", "127.0.0.1:0", "--metrics-textfile", str(textfile),
         "--metrics-interval", "0.2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "INVOCATION_ID")},
    )  # fmt: skip
    try:
        port = 0
        assert proc.stderr is not None
        for line in proc.stderr:
            m = re.search(r"Serving metrics on http://127\.0\.0\.1:(\d+)/metrics", line)
            if m:
                port = int(m.group(1))
            if "Serving org.freedesktop.machine1" in line:
                break
        assert port, "the daemon did not say where it serves metrics"
        yield port, textfile
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_daemon_counts_its_calls(daemon_with_metrics: tuple[int, Path], private_bus: str) -> None:  # noqa: F811
    port, textfile = daemon_with_metrics
    for _ in range(3):
        await call(private_bus, MANAGER, MANAGER_IFACE, "ListMachines")
    await call(private_bus, MANAGER, MANAGER_IFACE, "GetMachine", "s", ["nope"])
    await call(private_bus, MANAGER, "org.freedesktop.DBus.Peer", "Ping")

    def scrape() -> dict[str, list]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return families(r.read().decode())

    fams = await asyncio.to_thread(scrape)
    assert value(fams, "machined_calls_total", interface=MANAGER_IFACE, method="ListMachines", result="ok") == 3
    assert value(fams, "machined_calls_total", interface=MANAGER_IFACE, method="GetMachine",
                 result="org.freedesktop.machine1.NoSuchMachine") == 1  # fmt: skip
    assert value(fams, "machined_calls_total", interface="org.freedesktop.DBus.Peer", method="Ping", result="ok") == 1
    assert value(fams, "machined_call_duration_seconds_count", interface=MANAGER_IFACE, method="ListMachines") == 3
    assert value(fams, "machined_machine_info", name=".host", state="running") == 1
    assert value(fams, "machined_gc_passes_total") >= 1  # the one after loading the state files
    # The textfile catches up within its interval.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = textfile.read_text() if textfile.exists() else ""
        if value(families(text), "machined_calls_total", method="ListMachines") == 3:
            break
        await asyncio.sleep(0.05)
    assert value(families(textfile.read_text()), "machined_calls_total", method="ListMachines") == 3

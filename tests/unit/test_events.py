"""Machine events: emitted once by the core to every subscriber (the D-Bus announcements, the
varlink watchers), in order, numbered; and io.machined.Machine.Watch on a real Unix socket: the
snapshot first, then the events; a watcher that does not read is told it overflowed and is
disconnected, without delaying the manager; a watcher that leaves is forgotten."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from machined.addrwatch import AddressWatch, subscribe_addresses
from machined.events import Event
from machined.inside.addresses import Address
from machined.machine import Machine, MachineClass, Timestamp, host_machine
from machined.manager import MachineManager
from machined.registration import RegistrationRequest
from machined.statefile import StateDir
from machined.varlink import VarlinkServer, ours


class FakeSystemd:
    """PID 1: start jobs finish after a moment, stop jobs too; units active until stopped."""

    def __init__(self) -> None:
        self.manager: MachineManager | None = None
        self.stopped: set[str] = set()
        self.jobs = 0

    def _job(self, unit: str) -> str:
        self.jobs += 1
        job = f"/org/freedesktop/systemd1/job/{self.jobs}"
        assert self.manager is not None
        asyncio.get_running_loop().call_later(0.005, self.manager.job_removed, job, unit, "done")
        return job

    async def start_transient_unit(self, name: str, properties: list[Any]) -> str:
        self.stopped.discard(name)
        return self._job(name)

    async def stop_unit(self, unit: str) -> str:
        self.stopped.add(unit)
        return self._job(unit)

    async def unit_is_active(self, unit: str) -> bool:
        return unit not in self.stopped

    async def job_is_active(self, job: str) -> bool:
        return False


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[MachineManager]:
    systemd = FakeSystemd()
    m = MachineManager(host_machine(bytes(range(16)), Timestamp(1, 1)), StateDir(str(tmp_path / "state")),
                       systemd=systemd)  # fmt: skip
    systemd.manager = m
    m.start_gc()
    yield m
    await m.stop_gc()


@pytest.fixture
def leader() -> Any:
    p = subprocess.Popen(["sleep", "1000"])
    yield p
    p.kill()
    p.wait()


@pytest.fixture
def leader2() -> Any:
    p = subprocess.Popen(["sleep", "1000"])
    yield p
    p.kill()
    p.wait()


def request(name: str, pid: int) -> RegistrationRequest:
    return RegistrationRequest(name=name, id=b"", service="test", machine_class=MachineClass.CONTAINER, leader=pid,
                               root_directory="")  # fmt: skip


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_a_machine_life_is_new_running_closing_removed_numbered_in_order(
    manager: MachineManager, leader: Any
) -> None:
    seen: list[tuple[Event, Machine]] = []
    announced: list[tuple[str, str]] = []
    manager.events.subscribe(lambda e, m: seen.append((e, m)))
    # (the announce adapter: D-Bus's MachineNew/MachineRemoved from the same events)
    from machined.manager import _announcer

    manager.events.subscribe(_announcer(lambda s, m: announced.append((s, m.name))))
    machine = await manager.create(request("c1", leader.pid), [])
    await until(lambda: len(seen) >= 2)
    await manager.terminate(machine)
    await until(lambda: len(seen) >= 4)
    kinds = [(e.kind, e.state) for e, _ in seen]
    assert kinds == [("new", "opening"), ("state", "running"), ("state", "closing"), ("removed", "closing")]
    assert [e.sequence for e, _ in seen] == [1, 2, 3, 4]
    assert all(e.name == "c1" and e.machine_class == "container" and e.leader == leader.pid for e, _ in seen)
    assert all(e.unit == "machine-c1.scope" and e.service == "test" for e, _ in seen)
    assert all(m is machine for _, m in seen)
    times = [e.monotonic for e, _ in seen]
    assert times == sorted(times) and all(e.realtime > 1_700_000_000_000_000 for e, _ in seen)
    assert announced == [("MachineNew", "c1"), ("MachineRemoved", "c1")]
    assert manager.events.sequence == 4


async def test_unregister_passes_closing_and_a_failing_subscriber_stops_nobody(
    manager: MachineManager, leader: Any, leader2: Any
) -> None:
    def broken(event: Event, machine: Machine) -> None:
        raise RuntimeError("subscriber bug")

    seen: list[str] = []
    manager.events.subscribe(broken)
    unsubscribe = manager.events.subscribe(lambda e, m: seen.append(e.kind + ":" + e.state))
    machine = await manager.create(request("c2", leader.pid), [])
    await manager.unregister(machine)
    assert seen == ["new:opening", "state:running", "state:closing", "removed:closing"] or seen == [
        "new:opening", "state:closing", "removed:closing"
    ]  # fmt: skip
    unsubscribe()
    await manager.create(request("c3", leader2.pid), [])
    assert "new:opening" in seen and len([s for s in seen if s.startswith("new")]) == 1


def test_changed_names_what_changed() -> None:
    from machined.events import Events

    events = Events()
    got: list[Event] = []
    events.subscribe(lambda e, m: got.append(e))
    m = Machine(name="v", machine_class=MachineClass.VM, leader=10, unit="a.scope", started=True)
    events.update(m)  # never announced: nothing
    events.machine_new(m)
    events.update(m)  # unchanged: nothing
    m.leader, m.unit = 11, "b.scope"
    events.update(m)
    m.stopping = True
    m.unit = "c.scope"
    events.update(m)
    events.machine_removed(m)
    events.machine_removed(m)  # once only
    assert [(e.sequence, e.kind, e.changed) for e in got] == [
        (1, "new", ()), (2, "changed", ("leader", "unit")), (3, "state", ()), (4, "changed", ("unit",)),
        (5, "removed", ()),
    ]  # fmt: skip


# ----- io.machined.Machine.Watch ------------------------------------------------------------


@pytest.fixture
async def served(manager: MachineManager, tmp_path: Path) -> AsyncIterator[tuple[str, ours.OursService]]:
    service = ours.OursService(manager)
    path = str(tmp_path / "io.machined.Machine")
    server = VarlinkServer(service.service, [path])
    await server.start()
    yield path, service
    service.close()
    await server.stop()


class Client:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.buffer = b""

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\0")

    async def read(self, timeout: float = 5.0) -> dict[str, Any] | None:
        loop = asyncio.get_running_loop()
        while b"\0" not in self.buffer:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), timeout)
            if not data:
                return None
            self.buffer += data
        raw, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(raw)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.sock.close()


async def test_watch_sends_what_exists_then_each_event(
    manager: MachineManager, leader: Any, leader2: Any, served: tuple[str, ours.OursService]
) -> None:
    path, service = served
    first = await manager.create(request("old", leader.pid), [])
    await until(lambda: first.state == "running")
    client = Client(path)
    client.send({"method": "io.machined.Machine.Watch", "more": True})
    replies = [await client.read(), await client.read()]
    assert [r["parameters"]["name"] for r in replies if r] == [".host", "old"]
    assert all(r and r["continues"] and r["parameters"]["type"] == "existing" for r in replies)
    assert all(r and r["parameters"]["sequence"] == manager.events.sequence for r in replies)
    base = manager.events.sequence
    machine = await manager.create(request("new1", leader2.pid), [])
    await manager.terminate(machine)
    got = []
    for _ in range(4):
        r = await client.read()
        assert r is not None and r["continues"] is True
        got.append(r["parameters"])
    assert [(p["type"], p["state"], p["sequence"]) for p in got] == [
        ("new", "opening", base + 1), ("state", "running", base + 2), ("state", "closing", base + 3),
        ("removed", "closing", base + 4),
    ]  # fmt: skip
    assert got[0]["unit"] == "machine-new1.scope" and got[0]["leader"] == leader2.pid and got[0]["class"] == "container"
    assert set(got[0]["timestamp"]) == {"realtime", "monotonic"}
    # without "more": ExpectedMore, as sd-varlink answers
    other = Client(path)
    other.send({"method": "io.machined.Machine.Watch"})
    assert await other.read() == {"error": "org.varlink.service.ExpectedMore"}
    # a watcher that leaves is forgotten without any event to send it
    assert len(service.watchers) == 1
    client.close()
    await until(lambda: not service.watchers)
    other.close()


async def test_a_stalled_watcher_overflows_is_told_and_disconnected_without_delaying_anybody(
    manager: MachineManager, served: tuple[str, ours.OursService], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, service = served
    client = Client(path)
    client.send({"method": "io.machined.Machine.Watch", "more": True})
    await until(lambda: len(service.watchers) == 1)
    m = Machine(name="x" * 60, machine_class=MachineClass.VM, leader=1, unit="machine-x.scope", started=True)
    started = time.monotonic()
    manager.events.machine_new(m)
    for _ in range(3000):  # far more than the queue and the socket hold, the watcher's task running between
        m.stopping = not m.stopping
        manager.events.update(m)
        await asyncio.sleep(0)
    assert time.monotonic() - started < 3.0  # never waited for the watcher
    await asyncio.sleep(0.1)
    lost = None
    sequences = []
    while True:
        r = await client.read()
        if r is None:
            break
        if "error" in r:
            assert r["error"] == "io.machined.Machine.Overflow"
            lost = r["parameters"]["lostSequence"]
            continue
        sequences.append(r["parameters"]["sequence"])
    assert lost is not None and sequences
    # what it got: the snapshot's number, then consecutive events up to just before the lost one
    events = sequences[1:]
    assert events == list(range(events[0], events[0] + len(events)))
    assert events[-1] == lost - 1  # nothing silently dropped: the notice names the first one missed
    assert not service.watchers
    client.close()


async def test_many_watchers_each_get_the_event(manager: MachineManager, served: tuple[str, ours.OursService]) -> None:
    path, service = served
    clients = []
    for _ in range(100):  # (the server keeps 128 connections per user)
        c = Client(path)
        c.send({"method": "io.machined.Machine.Watch", "more": True})
        clients.append(c)
    await until(lambda: len(service.watchers) == 100)
    m = Machine(name="y", machine_class=MachineClass.VM, leader=1, unit="machine-y.scope", started=True)
    manager.events.machine_new(m)
    for c in clients:
        r = await c.read()
        while r is not None and r["parameters"]["type"] == "existing":
            r = await c.read()
        assert r is not None and r["parameters"]["name"] == "y"
    for c in clients:
        c.close()
    await until(lambda: not service.watchers)


def test_the_interface_describes_itself() -> None:
    text = ours.INTERFACE.describe()
    assert text.startswith("interface io.machined.Machine\n")
    assert "# [Requires 'more' flag]\nmethod Watch() -> (\n\tsequence: int," in text
    assert "error Overflow(\n\tlostSequence: int\n)" in text


def test_the_event_core_and_our_interface_load_no_dbus() -> None:
    import subprocess
    import sys

    code = (
        "import sys, machined.events, machined.varlink.ours; print(sorted(m for m in sys.modules"
        " if m.split('.')[0] == 'dbus_fast' or m.startswith(('machined.dbus', 'machined.clients'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----- address changes (machined.addrwatch) ---------------------------------------------------


class FakeNetwork:
    """Each machine's "netlink socket" is one end of a datagram socket pair (the test writes
    notices on the other end); its addresses are what the test sets."""

    def __init__(self) -> None:
        self.peers: dict[str, socket.socket] = {}
        self.ours: dict[str, socket.socket] = {}
        self.addresses: dict[str, list[Address]] = {}
        self.reads = 0

    async def opener(self, machine: Machine) -> socket.socket:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        a.setblocking(False)
        self.peers[machine.name], self.ours[machine.name] = b, a
        return a

    async def reader(self, machine: Machine) -> list[Address]:
        self.reads += 1
        return list(self.addresses.get(machine.name, []))

    def notify(self, name: str, count: int = 1) -> None:
        for _ in range(count):
            self.peers[name].send(b"\x14\0\0\0 RTM_NEWADDR")


def _addr(ifindex: int, last: int) -> Address:
    return Address(socket.AF_INET, 0, ifindex, bytes((10, 0, 0, last)))


async def test_address_changes_one_event_per_burst_only_while_watched(manager: MachineManager, leader: Any) -> None:
    net = FakeNetwork()
    watch = AddressWatch(manager, coalesce=0.02, opener=net.opener, reader=net.reader, eligible=lambda m: True)
    seen: list[Event] = []
    manager.events.subscribe(lambda e, m: seen.append(e))
    machine = await manager.create(request("a", leader.pid), [])
    await until(lambda: machine.state == "running")
    assert not net.ours  # nobody watches: no socket
    net.addresses["a"] = [_addr(2, 1)]
    watch.start()
    await until(lambda: "a" in net.ours and net.reads == 2)  # .host's and a's baselines
    before = len(seen)
    net.addresses["a"] = [_addr(2, 1), _addr(3, 2), _addr(3, 3)]
    net.notify("a", 5)  # a burst: one read, one event
    await until(lambda: len(seen) > before)
    await asyncio.sleep(0.1)
    assert [(e.kind, e.name, e.changed, e.addresses) for e in seen[before:]] == [
        ("changed", "a", ("addresses",), (_addr(2, 1), _addr(3, 2), _addr(3, 3)))
    ]
    assert seen[-1].sequence == seen[before - 1].sequence + 1
    params = ours.event_parameters(seen[-1])
    assert params["changed"] == ["addresses"]
    assert params["addresses"][1] == {"ifindex": 3, "family": socket.AF_INET, "address": [10, 0, 0, 2]}
    # a notice that changes nothing (the list is the same): no event
    net.notify("a")
    await asyncio.sleep(0.1)
    assert len(seen) == before + 1
    # the last address gone: an empty list
    net.addresses["a"] = []
    net.notify("a")
    await until(lambda: len(seen) == before + 2)
    assert seen[-1].addresses == () and ours.event_parameters(seen[-1])["addresses"] == []
    # the machine goes: its socket is closed; the watch stops: .host's too
    await manager.terminate(machine)
    await until(lambda: net.ours["a"].fileno() == -1)
    assert net.ours[".host"].fileno() != -1
    watch.stop()
    assert net.ours[".host"].fileno() == -1 and not watch.sources


async def test_the_first_watcher_opens_the_sockets_and_the_last_one_closes_them(
    manager: MachineManager, served: tuple[str, ours.OursService]
) -> None:
    path, service = served
    net = FakeNetwork()
    service.addresses = AddressWatch(manager, coalesce=0.01, opener=net.opener, reader=net.reader,
                                     eligible=lambda m: True)  # fmt: skip
    clients = [Client(path) for _ in range(2)]
    for c in clients:
        c.send({"method": "io.machined.Machine.Watch", "more": True})
        assert (await c.read() or {})["parameters"]["name"] == ".host"
    await until(lambda: net.reads == 1)
    assert list(net.ours) == [".host"]
    net.addresses[".host"] = [_addr(1, 9)]
    net.notify(".host", 3)
    for c in clients:
        r = await c.read()
        assert r is not None and r["parameters"]["type"] == "changed"
        assert r["parameters"]["changed"] == ["addresses"]
        assert r["parameters"]["addresses"] == [{"ifindex": 1, "family": socket.AF_INET, "address": [10, 0, 0, 9]}]
    clients[0].close()
    await until(lambda: len(service.watchers) == 1)
    assert net.ours[".host"].fileno() != -1  # one watcher is left
    clients[1].close()
    await until(lambda: not service.watchers)
    assert net.ours[".host"].fileno() == -1 and not service.addresses.sources


def test_a_real_netlink_socket_is_subscribed_to_the_address_groups() -> None:
    from machined.inside.addresses import netlink_socket

    with netlink_socket() as sock:
        subscribe_addresses(sock)
        assert sock.getblocking() is False
        with pytest.raises(BlockingIOError):
            sock.recv(65536)  # nothing yet (and never a block)

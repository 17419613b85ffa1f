"""The fork server: where children come from, restart, kills, fds, namespaces, zombies, lingering."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from machined.children import client, limits
from machined.children.client import run_worker, run_worker_with_fd
from machined.children.jobs import PING, Job
from machined.children.wire import send_fd
from machined.errors import BusError
from machined.inside import nsprobe

REPO = Path(__file__).resolve().parents[2]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root")


# ----- functions the children run -------------------------------------------------------------


def parent() -> int:
    return os.getppid()


def pid_then_nap(path: str, seconds: float) -> None:
    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)


def read_and_hand_back(source: int, fd_socket: int, path: str) -> str:
    data = os.read(source, 100).decode()
    send_fd(fd_socket, os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    return data


def net_namespace_through(leader_fd: int) -> int:
    nsprobe.setns(leader_fd, nsprobe.CLONE_NEWNET)
    return os.stat("/proc/self/ns/net").st_ino


# ----- helpers of the tests ---------------------------------------------------------------------


def exited(pidfd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))


def children_of(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def state_and_name(pid: int) -> tuple[str, str]:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # (the latter: reaped while being read)
        return "gone", ""
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    return stat[stat.rindex(")") + 2], name


async def wait_for_file(path: Path) -> int:
    for _ in range(500):
        if path.exists() and path.read_text():
            return int(path.read_text())
        await asyncio.sleep(0.01)
    raise AssertionError(f"{path} never written")


# ----- the tests -------------------------------------------------------------------------------


async def test_children_come_from_the_fork_server_which_keeps_spares() -> None:
    assert await run_worker(Job("tests.unit.test_forkserver", "parent")) == client.forkserver_pid()
    server = client.forkserver_pid()
    assert server is not None and state_and_name(server)[1] == "machined-fork"
    for _ in range(200):  # spares are asked for as they are taken
        if len(client._server.stock) == client.SPARES:
            break
        await asyncio.sleep(0.01)
    names = [state_and_name(p)[1] for p in children_of(server)]
    assert names.count("machined-spare") == client.SPARES


async def test_a_dead_fork_server_fails_its_children_and_is_started_again(tmp_path: Path) -> None:
    await run_worker(PING)
    first = client.forkserver_pid()
    assert first is not None
    job = asyncio.ensure_future(
        run_worker(Job("tests.unit.test_forkserver", "pid_then_nap"), 30, path=str(tmp_path / "pid"), seconds=30)
    )
    child = os.pidfd_open(await wait_for_file(tmp_path / "pid"))
    try:
        os.kill(first, signal.SIGKILL)
        with pytest.raises(BusError) as e:
            await job
        assert (e.value.name, e.value.message) == ("org.freedesktop.DBus.Error.Failed", "Child died abnormally.")
        assert exited(child, 5), "the child outlived its fork server"
    finally:
        os.close(child)
    assert await run_worker(Job("tests.unit.test_forkserver", "parent")) == client.forkserver_pid() != first


async def test_the_deadline_kills_the_child_and_nothing_is_left(tmp_path: Path) -> None:
    job = asyncio.ensure_future(
        run_worker(Job("tests.unit.test_forkserver", "pid_then_nap"), 1.0, path=str(tmp_path / "pid"), seconds=30)
    )
    pid = await wait_for_file(tmp_path / "pid")
    child = os.pidfd_open(pid)
    try:
        with pytest.raises(BusError) as e:
            await job
        assert e.value.name == "org.freedesktop.DBus.Error.Timeout"
        assert exited(child, 5)
    finally:
        os.close(child)
    for _ in range(200):  # reaped by the fork server: no zombie
        if state_and_name(pid)[0] == "gone":
            break
        await asyncio.sleep(0.01)
    assert state_and_name(pid)[0] == "gone"
    for _ in range(200):
        if limits.children.running == 0:
            break
        await asyncio.sleep(0.01)
    assert limits.children.running == 0  # its slot came back


async def test_fds_go_both_ways(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("back")
    r, w = os.pipe()
    os.write(w, b"there")
    os.close(w)
    try:
        result, fd = await run_worker_with_fd(
            Job("tests.unit.test_forkserver", "read_and_hand_back"), 10, fds={"source": r}, path=str(tmp_path / "f")
        )
    finally:
        os.close(r)  # the caller's own: the worker passed a copy
    try:
        assert result == "there" and os.read(fd, 10) == b"back"
    finally:
        os.close(fd)


async def test_no_zombies_after_many_children(tmp_path: Path) -> None:
    await asyncio.gather(*(run_worker(PING) for _ in range(20)))
    with pytest.raises(BusError):
        await run_worker(Job("tests.unit.test_forkserver", "pid_then_nap"), 0.3, path=str(tmp_path / "p"), seconds=30)
    server = client.forkserver_pid()
    assert server is not None
    for _ in range(300):
        kids = [state_and_name(p) for p in children_of(server)]
        if all(name == "machined-spare" for _, name in kids):
            break
        await asyncio.sleep(0.01)
    assert all(state != "Z" and name == "machined-spare" for state, name in kids), kids
    assert len(kids) <= client.SPARES + 1


async def test_the_exec_path_when_the_fork_server_cannot_start(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = client._ForkServer()
    broken.failed_at = time.monotonic()  # just failed: the exec path serves for a while
    monkeypatch.setattr(client, "_server", broken)
    assert await run_worker(Job("tests.unit.test_forkserver", "parent")) == os.getpid()
    (result, fd) = await run_worker_with_fd(Job("tests.unit.test_forkserver", "read_and_hand_back"), 30,
                                            fds={"source": os.open("/dev/null", os.O_RDONLY)}, path="/dev/null")  # fmt: skip
    os.close(fd)
    assert result == ""


def test_the_fork_server_and_its_children_go_with_the_daemon() -> None:
    script = (
        "import asyncio, os\n"
        "from machined.children import client, jobs\n"
        "async def main():\n"
        "    await client.run_worker(jobs.PING)\n"
        "    await asyncio.sleep(0.5)\n"  # spares come
        "    print(client.forkserver_pid(), flush=True)\n"
        "    os._exit(0)\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    server = int(out.stdout)
    for _ in range(500):
        state, name = state_and_name(server)
        if state in ("gone", "Z") or name != "machined-fork":
            break
        time.sleep(0.01)
    assert state in ("gone", "Z") or name != "machined-fork", "the fork server outlived the daemon"


async def test_the_fork_server_lingers_then_goes_with_its_spares(monkeypatch: pytest.MonkeyPatch) -> None:
    """It does not stand by: once its last child has exited it stays FORKSERVER_LINGER seconds
    (an operation meanwhile keeps it), then it and its spares exit; the next operation starts
    another."""
    monkeypatch.setattr(client, "FORKSERVER_LINGER", 0.5)
    assert await run_worker(Job("tests.unit.test_forkserver", "parent")) == client.forkserver_pid()
    first = client.forkserver_pid()
    assert first is not None
    await asyncio.sleep(0.3)
    assert await run_worker(Job("tests.unit.test_forkserver", "parent")) == first  # still there: re-armed
    await asyncio.sleep(0.3)
    assert client.forkserver_pid() == first
    spares = children_of(first)
    pidfds = [os.pidfd_open(p) for p in [first, *spares]]
    try:
        for _ in range(300):  # (the event loop must run for the timer to fire)
            if client.forkserver_pid() is None:
                break
            await asyncio.sleep(0.01)
        for pidfd in pidfds:
            assert exited(pidfd, 5), "the idle fork server (or a spare) stayed"
    finally:
        for pidfd in pidfds:
            os.close(pidfd)
    assert client.forkserver_pid() is None
    for _ in range(200):  # reaped
        if state_and_name(first)[0] == "gone":
            break
        await asyncio.sleep(0.01)
    assert state_and_name(first)[0] == "gone"
    assert await run_worker(Job("tests.unit.test_forkserver", "parent")) == client.forkserver_pid() != first


@needs_root
async def test_a_child_enters_a_namespace_through_the_pidfd() -> None:
    leader = subprocess.Popen(["unshare", "--net", "sleep", "30"])
    try:
        own = os.stat("/proc/self/ns/net").st_ino
        for _ in range(200):  # unshare execs sleep once the namespace is there
            if os.stat(f"/proc/{leader.pid}/ns/net").st_ino != own:
                break
            time.sleep(0.01)
        theirs = os.stat(f"/proc/{leader.pid}/ns/net").st_ino
        pidfd = os.pidfd_open(leader.pid)
        try:
            ns = await run_worker(
                Job("tests.unit.test_forkserver", "net_namespace_through"), 10, fds={"leader_fd": pidfd}
            )
        finally:
            os.close(pidfd)
        assert ns == theirs != own
    finally:
        leader.kill()
        leader.wait()


@needs_root
async def test_looks_start_no_process_and_a_pty_comes_from_a_child() -> None:
    from machined.envfile import read_os_release
    from machined.inside import looks
    from machined.machine import Machine, MachineClass
    from machined.process import ProcessRef

    leader = subprocess.Popen(["unshare", "--mount", "--net", "--user", "--map-root-user", "sleep", "30"])
    try:
        for _ in range(200):
            if os.readlink(f"/proc/{leader.pid}/ns/user") != os.readlink("/proc/self/ns/user"):
                break
            time.sleep(0.01)
        machine = Machine(name="t", machine_class=MachineClass.CONTAINER, leader=leader.pid,
                          leader_ref=ProcessRef.take(leader.pid))  # fmt: skip
        before = set(children_of(os.getpid()))
        server = client.forkserver_pid()
        assert await looks.container_os_release(machine) == read_os_release("/")
        assert await looks.container_addresses(machine) == []  # only lo: host scope
        root = await looks.open_root_directory(machine, 10)
        try:
            assert os.fstat(root).st_ino == os.stat(f"/proc/{leader.pid}/root").st_ino
        finally:
            os.close(root)
        assert set(children_of(os.getpid())) == before and client.forkserver_pid() == server  # no process
        master, path = await looks.open_pty(machine, 10)
        os.close(master)
        assert path.startswith("/dev/pts/")
        assert client.forkserver_pid() is not None
        leader.kill()
        leader.wait()
        with pytest.raises(BusError) as e:
            await looks.container_os_release(machine)
        assert e.value.name == "org.freedesktop.DBus.Error.UnixProcessIdUnknown"  # ESRCH
    finally:
        leader.kill()
        leader.wait()


def test_the_synchronous_container_bus_client(tmp_path: Path) -> None:
    """Calls (with and without fds) and error replies through nsprobe's minimal client."""
    address = tmp_path / "bus"
    daemon = subprocess.Popen(["dbus-daemon", "--session", "--nofork", f"--address=unix:path={address}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(500):
            if address.exists():
                break
            time.sleep(0.01)
        bus = nsprobe.ContainerBus("c", str(address))
        try:
            bus.call(nsprobe.DBUS, nsprobe.DBUS_PATH, nsprobe.DBUS, "ListNames", "", [])
            with pytest.raises(BusError) as e:
                bus.call(nsprobe.DBUS, nsprobe.DBUS_PATH, nsprobe.DBUS, "NoSuchMethod", "", [])
            assert e.value.name == "org.freedesktop.DBus.Error.UnknownMethod" and "NoSuchMethod" in e.value.message
        finally:
            bus.close()
        with open(os.devnull, "rb") as f:  # fds go out only once the bus agreed to take them
            bus = nsprobe.ContainerBus("c", str(address))
            try:
                with pytest.raises(BusError) as e:
                    bus.call(nsprobe.DBUS, nsprobe.DBUS_PATH, nsprobe.DBUS, "NoSuchMethod", "h", [0], [f.fileno()])
                assert e.value.name == "org.freedesktop.DBus.Error.UnknownMethod"
            finally:
                bus.close()
        with pytest.raises(BusError) as e:
            nsprobe.ContainerBus("c", str(tmp_path / "nothing"))
        assert e.value.message == "There is no system bus in container c."
    finally:
        daemon.kill()
        daemon.wait()


def _ip_addresses(*prefix: str) -> set[tuple[str, int]]:
    """What `ip -j -4 address` shows (of the namespace *prefix* runs it in): global and link
    scope addresses, with their interface index (IPv4 only: IPv6 link-local ones come and go)."""
    import json

    out = subprocess.run([*prefix, "ip", "-j", "-4", "address"], check=True, capture_output=True, text=True).stdout
    return {
        (a["local"], link["ifindex"])
        for link in json.loads(out)
        for a in link.get("addr_info", [])
        if a.get("scope") not in ("host", "nowhere") and not a.get("deprecated")
    }


@needs_root
async def test_addresses_of_a_container_and_of_the_host_as_ip_shows_them() -> None:
    """Dumped by the daemon itself, on a socket a thread opened in the container's namespace (and,
    for .host, in its own): no process, and no pyroute2."""
    import ipaddress
    import socket

    from machined.inside import looks
    from machined.inside.access import MachineAccess
    from machined.inside.addresses import Address
    from machined.machine import Machine, MachineClass
    from machined.process import ProcessRef

    def v4(addresses: list[Address]) -> list[Address]:
        return [a for a in addresses if a.family == socket.AF_INET]

    setup = (
        "ip link add v0 type veth peer name v1 && ip addr add 192.0.2.7/24 dev v0 && ip link set v1 up"
        " && ip link set v0 up && exec sleep 30"
    )
    leader = subprocess.Popen(["unshare", "--mount", "--net", "sh", "-c", setup])
    try:
        ns = ["nsenter", "-t", str(leader.pid), "-n"]
        for _ in range(200):
            if any(a == "192.0.2.7" for a, _ in _ip_addresses(*ns)):
                break
            time.sleep(0.02)
        container = Machine(name="t", machine_class=MachineClass.CONTAINER, leader=leader.pid,
                            leader_ref=ProcessRef.take(leader.pid))  # fmt: skip
        before = set(children_of(os.getpid()))
        own_ns = os.stat("/proc/self/ns/net").st_ino
        for _ in range(2):
            got = await looks.container_addresses(container)
            assert {(str(ipaddress.ip_address(a.address)), a.ifindex) for a in v4(got)} == _ip_addresses(*ns)
        assert [str(ipaddress.ip_address(a.address)) for a in got][0] == "192.0.2.7"
        assert os.stat("/proc/thread-self/ns/net").st_ino == own_ns  # the daemon's threads stay home

        host = Machine(name=".host", machine_class=MachineClass.HOST, leader=1)
        got = await MachineAccess(None).addresses(host)  # type: ignore[arg-type]  # .host needs no manager
        assert {(str(ipaddress.ip_address(a.address)), a.ifindex) for a in v4(got)} == _ip_addresses()
        assert set(children_of(os.getpid())) == before
        assert "pyroute2" not in sys.modules
    finally:
        leader.kill()
        leader.wait()

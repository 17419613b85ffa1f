"""io.systemd.Machine over varlink, served on a real Unix socket in a temporary directory: the
wire format (NUL-terminated JSON, ``continues``, errors with parameters), 262's checks and
error names, and the same manager calls the D-Bus adapters make (against a fake PID 1)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from machined.caller import PolkitSubject
from machined.machine import Timestamp, host_machine
from machined.manager import MachineManager
from machined.statefile import StateDir
from machined.varlink import VarlinkServer
from machined.varlink.machine import machine_service, varlink_authorizer
from machined.varlink.server import Call

MACHINE_ID = bytes(range(16))


class FakeSystemd:
    """PID 1 as the manager sees it: start jobs finish at once, units are active until stopped."""

    def __init__(self) -> None:
        self.manager: MachineManager | None = None
        self.started: list[tuple[str, list[Any]]] = []
        self.stopped: list[str] = []
        self.killed: list[tuple[str, int]] = []
        self.jobs = 0

    async def start_transient_unit(self, name: str, properties: list[Any]) -> str:
        self.started.append((name, properties))
        self.jobs += 1
        job = f"/org/freedesktop/systemd1/job/{self.jobs}"
        assert self.manager is not None
        asyncio.get_running_loop().call_later(0.01, self.manager.job_removed, job, name, "done")
        return job

    async def stop_unit(self, unit: str) -> str:
        self.stopped.append(unit)
        return ""

    async def kill_unit(self, unit: str, sig: int) -> None:
        self.killed.append((unit, sig))

    async def unit_is_active(self, unit: str) -> bool:
        return unit not in self.stopped

    async def job_is_active(self, job: str) -> bool:
        return False


class Client:
    """A varlink client speaking the raw protocol."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: str) -> Client:
        return cls(*await asyncio.open_unix_connection(path))

    async def send(self, message: dict[str, Any]) -> None:
        self.writer.write(json.dumps(message).encode() + b"\0")
        await self.writer.drain()

    async def read(self) -> dict[str, Any]:
        return json.loads((await asyncio.wait_for(self.reader.readuntil(b"\0"), 5))[:-1])

    async def call(self, method: str, parameters: dict[str, Any] | None = None, **flags: Any) -> list[dict]:
        """Every reply to one call: several for ``more``, until one without ``continues``."""
        message: dict[str, Any] = {"method": method, **flags}
        if parameters is not None:
            message["parameters"] = parameters
        await self.send(message)
        replies = [await self.read()]
        while replies[-1].get("continues"):
            replies.append(await self.read())
        return replies

    async def one(self, method: str, parameters: dict[str, Any] | None = None, **flags: Any) -> dict[str, Any]:
        (reply,) = await self.call(method, parameters, **flags)
        return reply

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def served(tmp_path: Path):  # type: ignore[no-untyped-def]
    fake = FakeSystemd()
    manager = MachineManager(host_machine(MACHINE_ID, Timestamp(1_000_000, 0)), StateDir(str(tmp_path / "m")),
                             systemd=fake)  # fmt: skip
    fake.manager = manager
    path = str(tmp_path / "machine" / "io.systemd.Machine")
    server = VarlinkServer(machine_service(manager, version="test"), [path])
    await server.start()
    client = await Client.connect(path)
    try:
        yield manager, fake, client, path
    finally:
        client.close()
        await server.stop()
        for machine in manager.machines():
            if machine.leader_ref is not None:
                machine.leader_ref.release()


@pytest.fixture
def child():  # type: ignore[no-untyped-def]
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


L = "io.systemd.Machine."


async def test_socket_is_world_accessible_and_removed_on_stop(tmp_path: Path) -> None:
    manager = MachineManager(host_machine(b"", Timestamp()), StateDir(str(tmp_path / "m")))
    path = str(tmp_path / "io.systemd.Machine")
    server = VarlinkServer(machine_service(manager), [path])
    await server.start()
    assert oct(os.stat(path).st_mode & 0o777) == "0o666"
    await server.stop()
    assert not os.path.exists(path)


async def test_list_without_more_or_key_expects_more(served) -> None:  # type: ignore[no-untyped-def]
    _, _, client, _ = served
    assert await client.one(L + "List", {}) == {"error": "org.varlink.service.ExpectedMore"}
    assert await client.one(L + "List") == {"error": "org.varlink.service.ExpectedMore"}  # no parameters: {}


async def test_list_host_by_name(served) -> None:  # type: ignore[no-untyped-def]
    _, _, client, _ = served
    reply = await client.one(L + "List", {"name": ".host"})
    params = reply["parameters"]
    assert list(reply) == ["parameters"]
    assert list(params)[:3] == ["name", "id", "class"]
    assert params["name"] == ".host" and params["id"] == MACHINE_ID.hex() and params["class"] == "host"
    assert params["rootDirectory"] == "/" and params["unit"] == "-.slice"
    assert params["leader"]["pid"] == 1
    assert params["timestamp"] == {"realtime": 1_000_000, "monotonic": 0}
    assert "service" not in params  # empty strings are left out


async def test_list_with_more_streams_every_machine(served, child) -> None:  # type: ignore[no-untyped-def]
    _, fake, client, _ = served
    for name in ("a1", "b2"):
        assert await client.one(L + "Register", {"name": name, "class": "container", "leader": child.pid
                                                 if name == "a1" else None, "allocateUnit": True,
                                                 "service": "test"}) == {}  # fmt: skip
    replies = await client.call(L + "List", {}, more=True)
    assert [r["parameters"]["name"] for r in replies] == [".host", "a1", "b2"]
    assert [r.get("continues") for r in replies] == [True, True, None]
    a1 = replies[1]["parameters"]
    assert a1["class"] == "container" and a1["service"] == "test" and a1["unit"] == "machine-a1.scope"
    assert a1["leader"]["pid"] == child.pid and a1["leader"]["pidfdId"] > 0
    assert replies[2]["parameters"]["leader"]["pid"] == os.getpid()  # no leader: the caller
    # the registrant supervises a leader other than itself; both registered by root
    assert a1["supervisor"]["pid"] == os.getpid() and a1["supervisor"]["pidfdId"] > 0
    assert "supervisor" not in replies[2]["parameters"]
    assert [r["parameters"]["UID"] for r in replies] == [0, 0, 0]
    assert [name for name, _ in fake.started] == [
        "machine-a1.scope",
        "machine-b2.scope",
    ]
    # with a key and "more", one reply without "continues"
    assert await client.call(L + "List", {"name": "a1"}, more=True) == [{"parameters": a1}]
    # by process: the leader's ProcessId
    assert (await client.one(L + "List", {"pid": {"pid": child.pid}}))["parameters"]["name"] == "a1"
    # pid 0: the caller's own machine (b2's leader is this process)
    assert (await client.one(L + "List", {"pid": {"pid": 0}}))["parameters"]["name"] == "b2"
    # name and pid naming different machines
    assert await client.one(L + "List", {"name": "a1", "pid": {"pid": 0}}) == {
        "error": "io.systemd.Machine.NoSuchMachine"}  # fmt: skip


@pytest.mark.parametrize(
    ("parameters", "error"),
    [
        ({"name": "nope"}, {"error": "io.systemd.Machine.NoSuchMachine"}),
        ({"name": "under_score"}, {"error": "org.varlink.service.InvalidParameter", "parameters": {"parameter": "name"}}),
        ({"name": 5}, {"error": "org.varlink.service.InvalidParameter", "parameters": {"parameter": "name"}}),
        ({"bogus": 1}, {"error": "org.varlink.service.InvalidParameter", "parameters": {"parameter": "bogus"}}),
        ({"name": ".host", "acquireMetadata": "maybe"},
         {"error": "org.varlink.service.InvalidParameter", "parameters": {"parameter": "acquireMetadata"}}),
        ({"pid": 5}, {"error": "org.varlink.service.InvalidParameter", "parameters": {"parameter": "pid"}}),
        ({"pid": {"pid": 1 << 30}}, {"error": "io.systemd.Machine.NoSuchMachine"}),  # no such process (262)
        ({"pid": {"pid": 1 << 31}}, {"error": "org.varlink.service.InvalidParameter", "parameters": {"parameter": "pid"}}),
    ],
)  # fmt: skip
async def test_list_errors(served, parameters: dict, error: dict) -> None:  # type: ignore[no-untyped-def]
    _, _, client, _ = served
    assert await client.one(L + "List", parameters) == error


async def test_register_checks_as_262(served, child) -> None:  # type: ignore[no-untyped-def]
    manager, fake, client, _ = served

    def invalid(field: str) -> dict:
        return {
            "error": "org.varlink.service.InvalidParameter",
            "parameters": {"parameter": field},
        }

    base = {"name": "c1", "class": "container", "leader": child.pid}
    assert await client.one(L + "Register", {"class": "container"}) == invalid("name")  # mandatory
    assert await client.one(L + "Register", {**base, "name": "-bad"}) == invalid("name")
    assert await client.one(L + "Register", {**base, "class": "host"}) == invalid("class")
    assert await client.one(L + "Register", {**base, "class": ""}) == invalid("class")
    assert await client.one(L + "Register", {**base, "leader": 1}) == invalid("leader")
    assert await client.one(L + "Register", {**base, "id": "xyz"}) == invalid("id")
    assert await client.one(L + "Register", {**base, "rootDirectory": "rel"}) == invalid("rootDirectory")
    assert await client.one(L + "Register", {**base, "ifIndices": [0]}) == invalid("ifIndices")
    assert await client.one(L + "Register", {**base, "vSockCid": 2}) == invalid("vSockCid")
    assert await client.one(L + "Register", {**base, "leaderProcessId": {"pid": os.getpid()}}) == invalid(
        "leaderProcessId")  # fmt: skip
    assert fake.started == [] and "c1" not in manager.registry
    # without a unit of its own, the leader's unit is taken from its cgroup: none here
    reply = await client.one(L + "Register", base)
    assert reply["error"] == "io.systemd.System" and reply["parameters"]["origin"] == "linux"
    assert "c1" not in manager.registry
    assert await client.one(L + "Register", {**base, "allocateUnit": True, "id": MACHINE_ID.hex()}) == {}
    assert manager.registry.get("c1").id == MACHINE_ID
    assert await client.one(L + "Register", {**base, "allocateUnit": True}) == {
        "error": "io.systemd.Machine.MachineExists"}  # fmt: skip


async def test_kill_terminate_unregister(served, child) -> None:  # type: ignore[no-untyped-def]
    manager, fake, client, _ = served
    assert await client.one(L + "Register", {"name": "k1", "class": "vm", "leader": child.pid,
                                             "allocateUnit": True}) == {}  # fmt: skip
    invalid_signal = {
        "error": "org.varlink.service.InvalidParameter",
        "parameters": {"parameter": "signal"},
    }
    assert await client.one(L + "Kill", {"name": "k1", "signal": 0}) == invalid_signal
    assert await client.one(L + "Kill", {"name": "k1"}) == invalid_signal  # mandatory
    assert await client.one(L + "Kill", {"name": "k1", "signal": 15, "whom": "everybody"}) == {
        "error": "org.varlink.service.InvalidParameter", "parameters": {"parameter": "whom"}}  # fmt: skip
    assert await client.one(L + "Kill", {"name": "nope", "signal": 15}) == {"error": "io.systemd.Machine.NoSuchMachine"}
    assert await client.one(L + "Kill", {"signal": 15}) == {"error": "io.systemd.Machine.NoSuchMachine"}
    assert await client.one(L + "Kill", {"name": "k1", "signal": 9}) == {}
    assert fake.killed == [("machine-k1.scope", 9)]
    assert await client.one(L + "Kill", {"name": "k1", "signal": 15, "whom": "leader"}) == {}
    assert child.wait(5) == -signal.SIGTERM
    # the host cannot be terminated: the errno, as 262's varlink answers it
    assert await client.one(L + "Terminate", {"name": ".host"}) == {
        "error": "io.systemd.System",
        "parameters": {"origin": "linux", "errno": 95, "errnoName": "EOPNOTSUPP"},
    }
    assert await client.one(L + "Terminate", {"name": "k1"}) == {}
    assert fake.stopped == ["machine-k1.scope"] and manager.registry.get("k1").stopping
    assert await client.one(L + "Unregister", {"name": "k1"}) == {}
    assert "k1" not in manager.registry
    assert await client.one(L + "List", {"name": "k1"}) == {"error": "io.systemd.Machine.NoSuchMachine"}


async def test_introspection_and_protocol(served) -> None:  # type: ignore[no-untyped-def]
    _, _, client, path = served
    info = (await client.one("org.varlink.service.GetInfo"))["parameters"]
    assert info["interfaces"] == [
        "io.systemd",
        "io.systemd.Machine",
        "io.systemd.MachineImage",
        "io.systemd.service",
        "org.varlink.service",
    ]
    description = (await client.one("org.varlink.service.GetInterfaceDescription",
                                    {"interface": "io.systemd.Machine"}))["parameters"]["description"]  # fmt: skip
    assert description.startswith("interface io.systemd.Machine\n\n# The class of a machine\ntype MachineClass(\n")
    assert (
        "\n# [Supports 'more' flag]\nmethod List(\n\t# If non-null the name of a machine.\n\tname: ?string,"
        in description
    )
    assert "\nerror NoSuchMachine()\n" in description
    assert await client.one("org.varlink.service.GetInterfaceDescription", {"interface": "x.y"}) == {
        "error": "org.varlink.service.InterfaceNotFound", "parameters": {"interface": "x.y"}}  # fmt: skip
    assert await client.one(L + "Nope") == {"error": "org.varlink.service.MethodNotFound",
                                            "parameters": {"method": L + "Nope"}}  # fmt: skip
    assert await client.one("io.systemd.service.Ping", {}) == {}
    # oneway: no reply at all; the next call is answered
    await client.send({"method": "io.systemd.service.Ping", "oneway": True})
    assert await client.one("io.systemd.service.Ping") == {}
    # a message that is no call closes the connection
    await client.send({"method": "io.systemd.service.Ping", "bogus": True})
    assert await asyncio.wait_for(client.reader.read(), 5) == b""


async def test_peer_credentials_and_polkit_subject(tmp_path: Path) -> None:
    seen: list[Any] = []

    async def check(
        bus: Any,
        subject: PolkitSubject,
        uid: int,
        action: str,
        details: dict,
        interactive: bool,
    ) -> None:
        seen.append((subject.kind, subject.pidfd >= 0, uid, action, details, interactive))

    from machined.varlink.server import Service

    service = Service()
    peers: list[Any] = []

    async def ask(call: Call) -> None:
        peers.append(call.peer)
        authorize = varlink_authorizer(check, None, call)
        call.peer.uid_value = 1000  # as if an unprivileged user had called
        await authorize("manage-machines", {"machine": "m", "verb": "kill"})

    service.bind("x.y.Ask", ask)
    server = VarlinkServer(service, [str(tmp_path / "s")])
    await server.start()
    client = await Client.connect(str(tmp_path / "s"))
    try:
        assert await client.one("x.y.Ask", {"allowInteractiveAuthentication": True}) == {}
    finally:
        client.close()
        await server.stop()
    (peer,) = peers
    assert peer.pid_value == os.getpid() and peer.gid == os.getgid()
    assert await peer.pid() == os.getpid()  # a caller.Requester
    assert peer.pidfd_id > 0  # pinned by SO_PEERPIDFD (or pidfd_open of its PID)
    # asked about the process (pidfd) and its UID; 262 calls the machine "name" in the details
    assert seen == [
        (
            "unix-process",
            True,
            1000,
            "manage-machines",
            {"name": "m", "verb": "kill"},
            True,
        )
    ]


async def test_error_after_streamed_replies_keeps_them(tmp_path: Path) -> None:
    """A failing ``more`` call first sends what it had, with ``continues``, then the error."""
    from machined.varlink.server import Service, VarlinkError

    service = Service()

    async def stream(call: Call) -> None:
        await call.notify({"n": 1})
        await call.notify({"n": 2})
        raise VarlinkError("x.y.Failed", {"why": "because"})

    service.bind("x.y.Stream", stream)
    server = VarlinkServer(service, [str(tmp_path / "s")])
    await server.start()
    client = await Client.connect(str(tmp_path / "s"))
    try:
        await client.send({"method": "x.y.Stream", "more": True})
        replies = [await client.read() for _ in range(3)]
    finally:
        client.close()
        await server.stop()
    assert replies == [{"parameters": {"n": 1}, "continues": True}, {"parameters": {"n": 2}, "continues": True},
                       {"error": "x.y.Failed", "parameters": {"why": "because"}}]  # fmt: skip


async def test_file_descriptors_travel_with_the_reply(tmp_path: Path) -> None:
    from machined.varlink.server import Reply, Service

    service = Service()

    async def give(call: Call) -> Reply:
        return Reply({"fileDescriptor": 0}, [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)])

    service.bind("x.y.Give", give)
    server = VarlinkServer(service, [str(tmp_path / "s")])
    await server.start()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await asyncio.get_running_loop().sock_connect(sock, str(tmp_path / "s"))
        sock.sendall(b'{"method":"x.y.Give"}\0')
        data, fds, _, _ = await asyncio.to_thread(socket.recv_fds, sock, 4096, 4)
    finally:
        sock.close()
        await server.stop()
    assert data == b'{"parameters":{"fileDescriptor":0}}\0'
    assert len(fds) == 1 and os.readlink(f"/proc/self/fd/{fds[0]}") == "/dev/null"
    os.close(fds[0])


async def test_inside_methods_on_the_host_and_refusals(served) -> None:  # type: ignore[no-untyped-def]
    _, _, client, path = served
    not_supported = {"error": "io.systemd.Machine.NotSupported"}
    # the host's root directory and a PTY, passed with the reply
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await asyncio.get_running_loop().sock_connect(sock, path)
        sock.sendall(b'{"method":"io.systemd.Machine.OpenRootDirectory","parameters":{"name":".host"}}\0')
        data, fds, _, _ = await asyncio.to_thread(socket.recv_fds, sock, 4096, 4)
        assert data == b'{"parameters":{"fileDescriptor":0}}\0'
        assert os.readlink(f"/proc/self/fd/{fds[0]}") == "/"
        os.close(fds[0])
        sock.sendall(b'{"method":"io.systemd.Machine.Open","parameters":{"name":".host","mode":"tty"}}\0')
        data, fds, _, _ = await asyncio.to_thread(socket.recv_fds, sock, 4096, 4)
        reply = json.loads(data[:-1])
        assert reply["parameters"]["ptyFileDescriptor"] == 0 and reply["parameters"]["ptyPath"].startswith("/dev/pts/")
        assert os.readlink(f"/proc/self/fd/{fds[0]}") == "/dev/ptmx"
        os.close(fds[0])
    finally:
        sock.close()
    assert await client.one(L + "Open", {"name": ".host", "mode": "bogus"}) == {
        "error": "org.varlink.service.InvalidParameter",
        "parameters": {"parameter": "mode"},
    }
    assert await client.one(L + "Open", {"name": ".host", "mode": "shell", "path": "bin/sh"}) == {
        "error": "org.varlink.service.InvalidParameter",
        "parameters": {"parameter": "path"},
    }
    assert await client.one(L + "BindMount", {"name": ".host", "source": "/tmp"}) == not_supported
    assert await client.one(L + "BindMount", {"name": ".host", "source": "tmp"}) == {
        "error": "org.varlink.service.InvalidParameter",
        "parameters": {"parameter": "source"},
    }
    assert await client.one(L + "CopyTo", {"name": ".host", "source": "/etc/hostname"}) == not_supported
    assert await client.one(L + "CopyFrom", {"name": "nope", "source": "/a", "destination": "/b"}) == {
        "error": "io.systemd.Machine.NoSuchMachine"
    }
    assert await client.one(L + "MapFrom", {"name": ".host", "uid": 5}) == not_supported
    assert await client.one(L + "MapTo", {"uid": 100}) == {"error": "io.systemd.Machine.UserInHostRange"}
    assert await client.one(L + "MapTo", {"gid": 65534}) == {"error": "io.systemd.Machine.GroupInHostRange"}
    assert await client.one(L + "MapTo", {"uid": 300000}) == {"error": "io.systemd.Machine.NoSuchUser"}
    assert await client.one(L + "MapTo", {}) == {"error": "io.systemd.Machine.NoSuchMachine"}
    assert await client.one(L + "MapTo", {"uid": 4294967295}) == {
        "error": "org.varlink.service.InvalidParameter",
        "parameters": {"parameter": "uid"},
    }


async def test_user_mapping_of_a_container(served) -> None:  # type: ignore[no-untyped-def]
    """A leader in a user namespace mapping container 0..65535 to host 200000..: MapFrom and MapTo."""
    _, _, client, _ = served
    process = subprocess.Popen(["unshare", "--user", "sleep", "60"])
    try:
        for _ in range(100):
            if os.readlink(f"/proc/{process.pid}/ns/user") != os.readlink("/proc/self/ns/user"):
                break
            await asyncio.sleep(0.02)
        for kind in ("uid", "gid"):
            with open(f"/proc/{process.pid}/{kind}_map", "w") as f:
                f.write("0 200000 65536\n")
        assert (
            await client.one(
                L + "Register", {"name": "ns1", "class": "container", "leader": process.pid, "allocateUnit": True}
            )
            == {}
        )
        assert await client.one(L + "MapFrom", {"name": "ns1", "uid": 5, "gid": 7}) == {
            "parameters": {"uid": 200005, "gid": 200007}
        }
        assert await client.one(L + "MapFrom", {"name": "ns1", "uid": 70000}) == {
            "error": "io.systemd.Machine.NoSuchUser"
        }
        assert await client.one(L + "MapTo", {"uid": 200005, "gid": 200007}) == {
            "parameters": {"uid": 5, "gid": 7, "machineName": "ns1"}
        }
        reply = await client.one(L + "List", {"name": "ns1", "acquireMetadata": "graceful"})
        assert reply["parameters"]["UIDShift"] == 200000
    finally:
        process.kill()
        process.wait()


async def test_one_user_cannot_take_every_connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from machined.varlink import server as server_module

    monkeypatch.setattr(server_module, "CONNECTIONS_PER_UID_MAX", 2)
    manager = MachineManager(host_machine(b"", Timestamp()), StateDir(str(tmp_path / "m")))
    server = VarlinkServer(machine_service(manager), [str(tmp_path / "s")])
    await server.start()
    clients = [await Client.connect(str(tmp_path / "s")) for _ in range(3)]
    try:
        assert await clients[0].one("io.systemd.service.Ping") == {}
        assert await clients[1].one("io.systemd.service.Ping") == {}
        try:  # closed at once: the call fails to go out, or goes unanswered
            await clients[2].send({"method": "io.systemd.service.Ping"})
            assert await asyncio.wait_for(clients[2].reader.read(), 5) == b""
        except ConnectionError:
            pass
        clients[0].close()
        await asyncio.sleep(0.1)
        late = await Client.connect(str(tmp_path / "s"))  # a slot is free again
        assert await late.one("io.systemd.service.Ping") == {}
        late.close()
    finally:
        for client in clients:
            client.close()
        await server.stop()

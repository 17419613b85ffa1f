"""--register-oci: scope names, the name rule, the configuration file, the runtimes' readers (against
files laid out as podman 4.3 and docker 20.10 lay them out, and an HTTP server on a unix socket), and
the manager's rules for containers' machines (clash, terminate, gone, restart) with a fake PID 1."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from machined import config, errors
from machined.errors import BusError
from machined.machine import Machine, MachineClass, Timestamp, host_machine
from machined.manager import MachineManager
from machined.naming import hostname_is_valid
from machined.oci import (
    DOCKER,
    PODMAN,
    ContainerRef,
    Facts,
    escape,
    fallback_name,
    machine_name,
    parse_scope,
    sanitize,
)
from machined.oci.docker import DockerReader
from machined.oci.http import HTTPError, request
from machined.oci.podman import PodmanReader, read_storage_conf
from machined.oci.watcher import OciWatcher
from machined.registration import RegistrationRequest
from machined.statefile import StateDir

DATA = Path(__file__).parent / "data" / "oci"
PID = "5fc6c5fc8189124e7ab789dc7f9ecd194caba4e7a91e1f755134f73c732f47e6"  # the real example's ID
DID = "d" * 64

# ----- scope names and the name rule ------------------------------------------------------------


def test_scopes_of_containers_and_not_of_monitors() -> None:
    assert parse_scope(f"libpod-{PID}.scope") == ContainerRef(PODMAN, PID)
    assert parse_scope(f"docker-{DID}.scope") == ContainerRef(DOCKER, DID)
    assert parse_scope(f"libpod-{PID}.scope").scope == f"libpod-{PID}.scope"  # type: ignore[union-attr]
    for unit in (f"libpod-conmon-{PID}.scope", f"libpod-{PID[:12]}.scope", f"docker-{DID}.service",
                 f"machine-{PID}.scope", f"libpod-{PID.upper()}.scope", "docker.service", ""):  # fmt: skip
        assert parse_scope(unit) is None, unit


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("web", "web"),
        ("web-1.example", "web-1.example"),
        ("/d1", "d1"),  # docker's leading '/'
        ("my_app", "podman-5fc6c5fc8189"),  # '_' kept by the rule, refused by the machine-name check
        ("a\nb", "a-b"),
        ("a  b!!c", "a-b-c"),
        ("x" * 300, "x" * 64),
        ("..", "podman-5fc6c5fc8189"),
        ("a..b", "a.b"),
        (".host", "host"),
        ("-.-", "podman-5fc6c5fc8189"),
        ("", "podman-5fc6c5fc8189"),
        ("ünï", "n"),
        ("a" * 63 + "-b", "a" * 63),  # cut to 64, then the trailing '-' goes
    ],
)
def test_name_rule(name: str, expected: str) -> None:
    ref = ContainerRef(PODMAN, PID)
    got = machine_name(name.removeprefix("/") if name.startswith("/") else name, ref)
    assert got == expected
    assert hostname_is_valid(got) and got != ".host"


def test_name_rule_docker_slash_taken_and_host() -> None:
    ref = ContainerRef(DOCKER, DID)
    assert machine_name("/d1", ref) == "d1"
    assert machine_name("/d1", ref, {"d1"}) == "docker-dddddddddddd" == fallback_name(DOCKER, DID)
    assert machine_name(".host", ref, {"host"}) == "docker-dddddddddddd"
    assert sanitize("..host..") == ".host".strip(".") or sanitize("..host..") == "host"


def test_escape_keeps_log_lines_whole() -> None:
    assert escape("a\nb\x1b[31m") == "a\\nb\\x1b[31m"
    assert "\n" not in escape("\n" * 300) and escape("x" * 300).endswith("...") and len(escape("x" * 300)) == 83
    assert escape("a\\b") == "a\\\\b"
    assert escape("ü\u2028\ud800") == "\\xfc\\u2028\\ud800" and escape("ü\u2028\ud800").isascii()


# ----- configuration ----------------------------------------------------------------------------


def test_config_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert config.load(str(tmp_path / "none.conf")) == config.Config(register_oci=False)
    with pytest.raises(config.ConfigError, match="No such file"):
        config.load(str(tmp_path / "none.conf"), required=True)
    conf = tmp_path / "machined.conf"
    for value, expected in (("yes", True), ("1", True), ("on", True), ("no", False), ("false", False)):
        conf.write_text(f"# comment\n[Machined]\nRegisterOCI={value}\n")
        assert config.load(str(conf)).register_oci is expected
    # as systemd's own files: what cannot be used is logged and ignored, the defaults stand
    with caplog.at_level(logging.WARNING):
        conf.write_text("[Machined]\nRegisterOCI=maybe\n")
        assert config.load(str(conf)).register_oci is False
        conf.write_text("RegisterOCI=yes\n")  # no section
        assert config.load(str(conf)).register_oci is False
        conf.write_bytes(b"[Machined]\nRegisterOCI=\xff\n")
        assert config.load(str(conf)).register_oci is False
    assert "'maybe' is not a boolean" in caplog.text and caplog.text.count("ignoring it") == 2
    caplog.clear()
    conf.write_text("[Machined]\nRegisterOCI=yes\nBogus=1\n[Other]\nx=1\n")
    with caplog.at_level(logging.WARNING):
        assert config.load(str(conf)).register_oci is True
    assert "Bogus" in caplog.text and "[Other]" in caplog.text


def test_command_line_wins_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from machined import cli

    seen: list[bool] = []

    class FakeDaemon:
        def __init__(self, **kwargs: object) -> None:
            seen.append(bool(kwargs["register_oci"]))

        async def run(self) -> int:
            return 0

    monkeypatch.setattr(cli, "Daemon", FakeDaemon)
    conf = tmp_path / "machined.conf"
    conf.write_text("[Machined]\nRegisterOCI=yes\n")
    assert cli.main(["--config", str(conf)]) == 0
    assert cli.main(["--config", str(conf), "--no-register-oci"]) == 0
    assert cli.main(["--config", str(tmp_path / "empty.conf"), "--register-oci"]) == 1  # a named file must exist
    (tmp_path / "empty.conf").write_text("")
    assert cli.main(["--config", str(tmp_path / "empty.conf")]) == 0
    assert cli.main(["--config", str(tmp_path / "empty.conf"), "--register-oci"]) == 0
    assert seen == [True, False, False, True]


# ----- podman's files ---------------------------------------------------------------------------


def lay_out_podman(tmp_path: Path, driver: str = "vfs", pid: int | None = 4242, conf_driver: bool = True) -> Path:
    """podman 4.3's layout (copied from a real one, trimmed): storage.conf, containers.json, userdata."""
    graph, run = tmp_path / "graph", tmp_path / "run"
    conf = tmp_path / "storage.conf"
    conf.write_text(f'[storage]\n{"driver = " + json.dumps(driver) if conf_driver else ""}\n'
                    f'graphroot = "{graph}"\nrunroot = "{run}"\n')  # fmt: skip
    containers = graph / f"{driver}-containers"
    (containers / PID / "userdata").mkdir(parents=True)
    shutil.copy(DATA / "podman-containers.json", containers / "containers.json")
    spec = json.loads((DATA / "podman-config.json").read_text())
    spec["root"]["path"] = str(graph / driver / "dir" / "layer")
    (containers / PID / "userdata" / "config.json").write_text(json.dumps(spec))
    (run / f"{driver}-containers" / PID / "userdata").mkdir(parents=True)
    (run / f"{driver}-containers" / PID / "userdata" / "conmon.pid").write_text("999")
    if pid is not None:
        (run / f"{driver}-containers" / PID / "userdata" / "pidfile").write_text(str(pid))
    return conf


def test_podman_reader_on_real_layout(tmp_path: Path) -> None:
    conf = lay_out_podman(tmp_path)
    reader = PodmanReader(str(conf))
    ref = ContainerRef(PODMAN, PID)
    assert reader.read(ref) == Facts(name="web_1", pid=4242, root_directory=str(tmp_path / "graph/vfs/dir/layer"))
    assert reader.read(ContainerRef(PODMAN, "0" * 64)) is None  # not podman's
    storage = read_storage_conf(str(conf))
    assert (storage.graphroot, storage.runroot, storage.driver) == (str(tmp_path / "graph"), str(tmp_path / "run"),
                                                                    "vfs")  # fmt: skip


def test_podman_reader_without_driver_pidfile_or_files(tmp_path: Path) -> None:
    conf = lay_out_podman(tmp_path, driver="overlay", pid=None, conf_driver=False)
    ref = ContainerRef(PODMAN, PID)
    assert PodmanReader(str(conf)).read(ref) == Facts("web_1", 0, str(tmp_path / "graph/overlay/dir/layer"))
    (tmp_path / "graph/overlay-containers/containers.json").write_text("{not json")
    assert PodmanReader(str(conf)).read(ref) is None
    assert PodmanReader(str(tmp_path / "missing.conf")).read(ref) is None or True  # defaults: the host's own storage
    assert read_storage_conf(str(tmp_path / "missing.conf")).graphroot == "/var/lib/containers/storage"
    (tmp_path / "bad.conf").write_text("[storage\n")
    assert read_storage_conf(str(tmp_path / "bad.conf")).runroot == "/run/containers/storage"


# ----- docker: its API over a unix socket, its files --------------------------------------------

INSPECT = {
    "Id": DID,
    "Name": "/d1",
    "State": {"Status": "running", "Running": True, "Pid": 5151},
    "GraphDriver": {"Data": {"MergedDir": "/var/lib/docker/overlay2/abc/merged"}, "Name": "overlay2"},
}


class FakeDockerAPI:
    """An HTTP/1.1 server on a unix socket answering as dockerd does (what it is asked, recorded)."""

    def __init__(self, path: str, chunked: bool = False) -> None:
        self.path = path
        self.chunked = chunked
        self.requests: list[str] = []
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> FakeDockerAPI:
        self.server = await asyncio.start_unix_server(self.serve, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        line = head.split(b"\r\n")[0].decode()
        self.requests.append(line)
        method, target, _ = line.split(" ")
        if method == "GET" and target == f"/containers/{DID}/json":
            body, status = json.dumps(INSPECT).encode(), "200 OK"
        elif method == "POST" and target.startswith(f"/containers/{DID}/stop"):
            body, status = b"", "204 No Content"
        else:
            body, status = b'{"message":"No such container"}', "404 Not Found"
        if self.chunked and body:
            half = len(body) // 2
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:half], body[half:]))
            writer.write(f"HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + chunks + b"0\r\n\r\n")
        else:
            writer.write(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        writer.close()


@pytest.mark.parametrize("chunked", [False, True])
async def test_docker_reader_through_the_api(tmp_path: Path, chunked: bool) -> None:
    sock = str(tmp_path / "docker.sock")
    async with FakeDockerAPI(sock, chunked) as api:
        reader = DockerReader(sock, str(tmp_path / "daemon.json"))
        assert await reader.read(ContainerRef(DOCKER, DID)) == Facts("/d1", 5151, "/var/lib/docker/overlay2/abc/merged")
        assert await reader.read(ContainerRef(DOCKER, "e" * 64)) is None
        assert await reader.stop(ContainerRef(DOCKER, DID)) is True
    assert api.requests == [f"GET /containers/{DID}/json HTTP/1.1", f"GET /containers/{'e' * 64}/json HTTP/1.1",
                            f"POST /containers/{DID}/stop?t=10 HTTP/1.1"]  # fmt: skip


async def test_docker_reader_from_files_when_the_api_does_not_answer(tmp_path: Path) -> None:
    root = tmp_path / "docker-root"
    (tmp_path / "daemon.json").write_text(json.dumps({"data-root": str(root)}))
    (root / "containers" / DID).mkdir(parents=True)
    v2 = {"ID": DID, "Name": "/d1", "State": {"Running": True, "Pid": 5151}, "Driver": "overlay2"}
    (root / "containers" / DID / "config.v2.json").write_text(json.dumps(v2))
    reader = DockerReader(str(tmp_path / "no.sock"), str(tmp_path / "daemon.json"))
    assert await reader.read(ContainerRef(DOCKER, DID)) == Facts("/d1", 5151, "")
    v2["State"] = {"Running": False, "Pid": 0}
    (root / "containers" / DID / "config.v2.json").write_text(json.dumps(v2))
    assert (await reader.read(ContainerRef(DOCKER, DID))).pid == 0  # type: ignore[union-attr]
    with pytest.raises(HTTPError):
        await reader.stop(ContainerRef(DOCKER, DID))


async def test_http_client_against_garbage_and_silence(tmp_path: Path) -> None:
    sock = str(tmp_path / "s.sock")

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-nope\r\n\r\n")
        writer.close()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    for handler in (garbage, silent):
        server = await asyncio.start_unix_server(handler, sock)
        with pytest.raises(HTTPError):
            await request(sock, "GET", "/x", timeout=0.3)
        server.close()
        await server.wait_closed()
        os.unlink(sock)


# ----- the manager with containers' machines ------------------------------------------------------


class FakeSystemd:
    """PID 1 as the manager asks it: scopes' activity, stops (recorded), starts of new scopes."""

    def __init__(self) -> None:
        self.inactive: set[str] = set()
        self.stopped: list[str] = []
        self.started: list[str] = []

    async def unit_is_active(self, unit: str) -> bool:
        return unit not in self.inactive

    async def job_is_active(self, job: str) -> bool:
        return False

    async def stop_unit(self, unit: str) -> str:
        self.stopped.append(unit)
        return ""

    async def start_transient_unit(self, name: str, properties: list[object]) -> str:
        self.started.append(name)
        return ""

    async def kill_unit(self, unit: str, signal: int) -> None:
        self.stopped.append(f"kill {unit} {signal}")


class FakeReader:
    def __init__(self, runtime: str) -> None:
        self.runtime = runtime
        self.facts: dict[str, Facts] = {}
        self.reads = 0

    def read(self, ref: ContainerRef) -> Facts | None:
        self.reads += 1
        return self.facts.get(ref.id)


@pytest.fixture
def leaders() -> Iterator[list[int]]:
    procs = [subprocess.Popen(["sleep", "1000"]) for _ in range(3)]
    yield [p.pid for p in procs]
    for p in procs:
        p.kill()
        p.wait()


def make(tmp_path: Path, stoppers: dict[str, object] | None = None):  # type: ignore[no-untyped-def]
    systemd = FakeSystemd()
    announced: list[tuple[str, str]] = []
    manager = MachineManager(host_machine(b"\1" * 16, Timestamp(1, 0)), StateDir(str(tmp_path)), systemd=systemd,
                             announce=lambda signal, m: announced.append((signal, m.name)))  # fmt: skip
    readers = {PODMAN: FakeReader(PODMAN), DOCKER: FakeReader(DOCKER)}
    watcher = OciWatcher(manager, readers=readers, stoppers=stoppers or {},  # type: ignore[arg-type]
                         retry_delays=(0.0, 0.01, 0.01))  # fmt: skip
    watcher.in_scope = lambda pid, scope: scope not in systemd.inactive  # a gone scope holds no process
    return manager, systemd, readers, watcher, announced


async def test_a_scope_becomes_a_machine_and_goes_with_it(tmp_path: Path, leaders: list[int]) -> None:
    manager, systemd, readers, watcher, announced = make(tmp_path)
    readers[PODMAN].facts[PID] = Facts("web", leaders[0], "/srv/web")
    readers[DOCKER].facts[DID] = Facts("/d\n1", leaders[1], "")
    scope, dscope = f"libpod-{PID}.scope", f"docker-{DID}.scope"
    manager.unit_new(scope)
    manager.unit_new(scope)  # the same scope again (UnitNew, then PropertiesChanged): one registration
    manager.unit_changed(dscope)
    manager.unit_new(f"libpod-conmon-{PID}.scope")
    manager.unit_new("foo.service")
    await watcher.settle()
    web, d1 = manager.get("web"), manager.get("d-1")
    assert (web.service, web.machine_class, web.leader, web.unit, web.root_directory, web.runtime) == (
        "podman",
        MachineClass.CONTAINER,
        leaders[0],
        scope,
        "/srv/web",
        "podman",
    )
    assert (d1.service, d1.unit, d1.runtime, d1.subgroup) == ("docker", dscope, "docker", "")
    assert systemd.started == [] and announced == [("MachineNew", "web"), ("MachineNew", "d-1")]
    state = (tmp_path / "web").read_text()
    assert f"SCOPE={scope}\n" in state and "SERVICE=podman\n" in state and "CLASS=container\n" in state
    assert os.readlink(tmp_path / f"unit:{scope}") == "web"
    assert readers[PODMAN].reads == 1
    # the scope goes: the machine goes at once, its scope never stopped by us
    systemd.inactive.add(scope)
    manager.unit_changed(scope)
    await manager.gc(drop_not_started=True)
    assert "web" not in manager.registry and not (tmp_path / "web").exists()
    assert not os.path.lexists(tmp_path / f"unit:{scope}") and systemd.stopped == []
    assert announced[-1] == ("MachineRemoved", "web")
    await watcher.settle()  # its scope looked at once more: gone, so nothing comes back
    assert "web" not in manager.registry and announced[-1] == ("MachineRemoved", "web")


async def test_runtime_state_late_and_never(tmp_path: Path, leaders: list[int]) -> None:
    manager, _systemd, readers, watcher, _ = make(tmp_path)
    scope = f"libpod-{PID}.scope"
    readers[PODMAN].facts[PID] = Facts("web", 0)  # no pidfile yet
    manager.unit_new(scope)
    await asyncio.sleep(0)
    readers[PODMAN].facts[PID] = Facts("web", leaders[0])  # written a moment later
    await watcher.settle()
    assert manager.get("web").leader == leaders[0]
    manager.unit_new(f"docker-{DID}.scope")  # docker never heard of it: given up after the retries
    await watcher.settle()
    assert readers[DOCKER].reads == 3 and len(manager.registry) == 2
    systemd = manager.systemd
    systemd.inactive.add(f"docker-{DID}.scope")  # a scope that went (UnitRemoved): one look, no retries
    manager.unit_changed(f"docker-{DID}.scope")
    await watcher.settle()
    assert readers[DOCKER].reads == 4
    systemd.inactive.clear()
    watcher.in_scope = lambda pid, scope: False  # a PID that is not in the scope is never a leader
    readers[DOCKER].facts[DID] = Facts("d1", leaders[1])
    manager.unit_new(f"docker-{DID}.scope")
    await watcher.settle()
    assert "d1" not in manager.registry


async def test_clash_ordinary_registration_wins(tmp_path: Path, leaders: list[int],
                                                caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    manager, systemd, readers, watcher, announced = make(tmp_path)
    # a machine registered the ordinary way holds "db": the container gets its fallback name
    await manager.create(RegistrationRequest("db", b"", "nspawn", MachineClass.CONTAINER, leaders[2], ""), [])
    readers[DOCKER].facts[DID] = Facts("/db", leaders[1])
    with caplog.at_level(logging.WARNING):
        manager.unit_new(f"docker-{DID}.scope")
        await watcher.settle()
    assert manager.get("docker-dddddddddddd").runtime == "docker"
    assert caplog.text.count("Machine name db is taken") == 1
    # an ordinary registration asking for a container's name succeeds; the container moves
    readers[PODMAN].facts[PID] = Facts("web", leaders[0])
    manager.unit_new(f"libpod-{PID}.scope")
    await watcher.settle()
    assert manager.get("web").runtime == "podman"
    announced.clear()
    other = subprocess.Popen(["sleep", "1000"])
    try:
        m = await manager.create(RegistrationRequest("web", b"", "nspawn", MachineClass.CONTAINER, other.pid, ""), [])
        await asyncio.sleep(0)
        await watcher.settle()
        assert manager.get("web") is m and m.runtime == "" and m.unit == "machine-web.scope"
        moved = manager.get("podman-5fc6c5fc8189")
        assert (moved.runtime, moved.unit, moved.leader) == ("podman", f"libpod-{PID}.scope", leaders[0])
        assert announced == [("MachineRemoved", "web"), ("MachineNew", "web"), ("MachineNew", "podman-5fc6c5fc8189")]
        assert os.readlink(tmp_path / f"unit:libpod-{PID}.scope") == "podman-5fc6c5fc8189"
    finally:
        other.kill()
        other.wait()


async def test_terminate_goes_through_the_runtime_or_is_refused(tmp_path: Path, leaders: list[int]) -> None:
    asked: list[str] = []

    async def docker_stop(ref: ContainerRef) -> bool:
        asked.append(ref.id)
        return True

    async def podman_stop(ref: ContainerRef) -> bool:
        raise HTTPError("/run/podman/podman.sock: [Errno 2] No such file or directory")

    manager, systemd, readers, watcher, _ = make(tmp_path, {DOCKER: docker_stop, PODMAN: podman_stop})
    readers[PODMAN].facts[PID] = Facts("web", leaders[0])
    readers[DOCKER].facts[DID] = Facts("/my_db", leaders[1])
    manager.unit_new(f"libpod-{PID}.scope")
    manager.unit_new(f"docker-{DID}.scope")
    await watcher.settle()
    await manager.terminate(manager.get("docker-dddddddddddd"))
    assert asked == [DID] and systemd.stopped == []
    with pytest.raises(BusError) as e:
        await manager.terminate(manager.get("web"))
    assert e.value.name == errors.errno_error_name(errno.EOPNOTSUPP) == "org.freedesktop.DBus.Error.NotSupported"
    assert e.value.message == "Machine web is a podman container: stop it with 'podman stop web'"
    assert systemd.stopped == [] and not manager.get("web").stopping
    # kill signals the scope, as for any container
    await manager.kill(manager.get("web"), "all", 15)
    assert systemd.stopped == [f"kill libpod-{PID}.scope 15"]
    # and a machine whose name is not the container's own is named by its ID
    manager.get("docker-dddddddddddd")
    watcher.stoppers = {}
    with pytest.raises(BusError) as e:
        await manager.terminate(manager.get("docker-dddddddddddd"))
    assert e.value.message.endswith("stop it with 'docker stop dddddddddddd'")


async def test_restart_adopts_and_duplicates_nothing(tmp_path: Path, leaders: list[int]) -> None:
    manager, systemd, readers, watcher, _ = make(tmp_path)
    readers[PODMAN].facts[PID] = Facts("web", leaders[0])
    manager.unit_new(f"libpod-{PID}.scope")
    await watcher.settle()
    for m in manager.machines():
        if m.leader_ref is not None:
            m.leader_ref.release()
    # a new daemon reads the state file back, then lists the scopes
    manager2, systemd2, readers2, watcher2, announced2 = make(tmp_path)
    readers2[PODMAN].facts[PID] = Facts("web", leaders[0])
    scopes = [(f"libpod-{PID}.scope", "active"), (f"libpod-conmon-{PID}.scope", "active"),
              (f"docker-{DID}.scope", "inactive")]  # fmt: skip

    async def list_units(patterns: list[str]) -> list[tuple[str, str]]:
        assert patterns == ["libpod-*.scope", "docker-*.scope"]
        return scopes

    watcher2.list_units = list_units
    await manager2.load_state()
    await watcher2.scan()
    await watcher2.settle()
    assert [m.name for m in manager2.machines()] == [".host", "web"]
    assert manager2.get("web").runtime == "podman" and readers2[PODMAN].reads == 0
    assert announced2 == [("MachineNew", "web")] and systemd2.stopped == []
    # its scope gone while the daemon was down: dropped, not stopped
    manager3, systemd3, _r, _w, _a = make(tmp_path)
    systemd3.inactive.add(f"libpod-{PID}.scope")
    await manager3.load_state()
    assert "web" not in manager3.registry and systemd3.stopped == []


async def test_off_by_default_nothing_of_oci_is_loaded(tmp_path: Path) -> None:
    code = ("import sys; from machined import cli, daemon, manager; "
            "print(sorted(m for m in sys.modules if m.startswith('machined.oci')))")  # fmt: skip
    out = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    manager = MachineManager(host_machine(b"", Timestamp()), StateDir(str(tmp_path)), systemd=FakeSystemd())
    manager.unit_new(f"libpod-{PID}.scope")  # no watcher: nothing happens
    assert manager.external is None and len(manager.registry) == 1


def test_hostile_names_never_reach_a_state_file(tmp_path: Path) -> None:
    ref = ContainerRef(PODMAN, PID)
    for hostile in ("a\nNAME=evil", "x" * 300, "..", ".host", "../../etc/passwd", "\x00\x07", "a b\tc"):
        name = machine_name(hostile, ref)
        assert hostname_is_valid(name) and name != ".host" and "/" not in name and "\n" not in name
        StateDir(str(tmp_path)).save(Machine(name=name, machine_class=MachineClass.CONTAINER, unit=ref.scope))
    assert all("\n" not in p.name and p.parent == tmp_path for p in tmp_path.iterdir())


async def test_metrics_count_containers_per_runtime(tmp_path: Path, leaders: list[int]) -> None:
    from prometheus_client import generate_latest

    from machined.limits import FairLimiter
    from machined.metrics import Metrics

    manager, _systemd, readers, watcher, _ = make(tmp_path)
    readers[PODMAN].facts[PID] = Facts("web", leaders[0])
    readers[DOCKER].facts[DID] = Facts("/d1", leaders[1])
    manager.unit_new(f"libpod-{PID}.scope")
    manager.unit_new(f"docker-{DID}.scope")
    await watcher.settle()
    metrics = Metrics(manager, FairLimiter("t", 4))
    text = generate_latest(metrics.registry).decode()
    assert 'machined_oci_machines{runtime="podman"} 1.0' in text
    assert 'machined_oci_machines{runtime="docker"} 1.0' in text
    manager.external = None  # off: no such metric at all
    assert "machined_oci_machines" not in generate_latest(metrics.registry).decode()


def test_unit_new_is_matched_only_when_asked_and_reaches_the_manager() -> None:
    from dbus_fast import Message, MessageType

    from machined.clients import systemd1

    assert not any("UnitNew" in rule for rule in systemd1.MATCH_RULES)  # off: no match rule for it
    assert "member='UnitNew'" in systemd1.UNIT_NEW_RULE

    class Listener:
        def __init__(self) -> None:
            self.new: list[str] = []
            self.changed: list[str] = []

        def job_removed(self, job: str, unit: str, result: str) -> None: ...
        def manager_reloaded(self) -> None: ...

        def unit_new(self, unit: str) -> None:
            self.new.append(unit)

        def unit_changed(self, unit: str) -> None:
            self.changed.append(unit)

    sd = systemd1.Systemd(object())  # type: ignore[arg-type]
    listener = Listener()
    sd.listener = listener
    sd.owner = ":1.1"
    path = "/org/freedesktop/systemd1/unit/x"
    for sender, member in ((":1.1", "UnitNew"), (":1.9", "UnitNew"), (":1.1", "UnitRemoved")):
        msg = Message(message_type=MessageType.SIGNAL, path=systemd1.SYSTEMD_PATH, interface=systemd1.SYSTEMD_MANAGER,
                      member=member, signature="so", body=[f"libpod-{PID}.scope", path], sender=sender)  # fmt: skip
        sd._on_signal(msg)
    assert listener.new == [f"libpod-{PID}.scope"] and listener.changed == [f"libpod-{PID}.scope"]


def test_refused_terminate_over_varlink_is_262s_errno_error() -> None:
    error = BusError.from_errno(errno.EOPNOTSUPP, "Machine web is a podman container: stop it with 'podman stop web'")
    assert errors.varlink_error(error) == ("io.systemd.System",
                                           {"origin": "linux", "errno": 95, "errnoName": "EOPNOTSUPP"})  # fmt: skip


async def test_restarted_container_in_a_scope_of_the_same_name(tmp_path: Path, leaders: list[int]) -> None:
    """``docker restart``: the init exits and the next run's scope (same name) is active before GC
    looks: the machine goes with its init and comes back with the new one."""
    manager, systemd, readers, watcher, announced = make(tmp_path)
    first = subprocess.Popen(["sleep", "1000"])
    readers[DOCKER].facts[DID] = Facts("/d1", first.pid)
    manager.unit_new(f"docker-{DID}.scope")
    await watcher.settle()
    assert manager.get("d1").leader == first.pid
    first.kill()
    first.wait()
    readers[DOCKER].facts[DID] = Facts("/d1", leaders[1])  # the next run, its scope active
    manager.unit_changed(f"docker-{DID}.scope")
    await manager.gc(drop_not_started=True)
    await watcher.settle()
    assert manager.get("d1").leader == leaders[1] and systemd.stopped == []
    assert announced == [("MachineNew", "d1"), ("MachineRemoved", "d1"), ("MachineNew", "d1")]


async def test_settle_waits_at_most_its_timeout_and_leaves_the_rest_running(tmp_path: Path, leaders: list[int]) -> None:
    manager, _systemd, readers, watcher, _ = make(tmp_path)
    watcher.retry_delays = (0.0, 0.3)
    readers[PODMAN].facts[PID] = Facts("web", 0)  # found on the second look, 0.3 s later
    manager.unit_new(f"libpod-{PID}.scope")
    loop = asyncio.get_running_loop()
    start = loop.time()
    await watcher.settle(0.05)
    assert loop.time() - start < 0.25 and "web" not in manager.registry
    readers[PODMAN].facts[PID] = Facts("web", leaders[0])
    await watcher.settle(2.0)
    assert manager.get("web").leader == leaders[0]

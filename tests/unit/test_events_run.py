"""machined run's pure parts: where a runner goes (the leader's cgroup in each hierarchy mounted
and visible here) and who it runs as (the machine's own /etc/passwd and /etc/group)."""

from __future__ import annotations

import array
import asyncio
import json
import os
import socket
from pathlib import Path

import pytest

from machined import run
from machined.errors import BusError

LEADER = """9:name=systemd:/machine.slice/machine-c.scope/payload
4:memory:/machine.slice/machine-c.scope
1:cpu,cpuacct:/machine.slice/machine-c.scope
0::/machine.slice/machine-c.scope/payload
"""


def _mkcg(root: Path, *parts: str) -> str:
    d = root.joinpath(*parts)
    d.mkdir(parents=True, exist_ok=True)
    (d / "cgroup.procs").write_text("")
    return str(d / "cgroup.procs")


def test_unified_takes_the_cgroup2_line_only(tmp_path: Path) -> None:
    want = _mkcg(tmp_path, "machine.slice", "machine-c.scope", "payload")
    mounts = [("cgroup2", frozenset(), "/", str(tmp_path))]
    assert run.cgroup_procs_files(LEADER, mounts) == [want]


def test_hybrid_takes_every_mounted_hierarchy(tmp_path: Path) -> None:
    systemd = _mkcg(tmp_path / "systemd", "machine.slice", "machine-c.scope", "payload")
    unified = _mkcg(tmp_path / "unified", "machine.slice", "machine-c.scope", "payload")
    memory = _mkcg(tmp_path / "memory", "machine.slice", "machine-c.scope")
    cpu = _mkcg(tmp_path / "cpu,cpuacct", "machine.slice", "machine-c.scope")
    mounts = [
        ("cgroup", frozenset({"name=systemd"}), "/", str(tmp_path / "systemd")),
        ("cgroup2", frozenset(), "/", str(tmp_path / "unified")),
        ("cgroup", frozenset({"memory"}), "/", str(tmp_path / "memory")),
        ("cgroup", frozenset({"cpu", "cpuacct"}), "/", str(tmp_path / "cpu,cpuacct")),
    ]
    assert sorted(run.cgroup_procs_files(LEADER, mounts)) == sorted([systemd, unified, memory, cpu])


def test_a_mount_of_a_subtree_and_a_missing_cgroup(tmp_path: Path) -> None:
    # a cgroup2 mounted from /machine.slice (a container's view): paths below its root only
    want = _mkcg(tmp_path, "machine-c.scope", "payload")
    mounts = [("cgroup2", frozenset(), "/machine.slice", str(tmp_path))]
    assert run.cgroup_procs_files(LEADER, mounts) == [want]
    # a hierarchy whose cgroup is not there (mounted elsewhere, hidden): skipped, not an error
    assert run.cgroup_procs_files(LEADER, [("cgroup2", frozenset(), "/", str(tmp_path / "none"))]) == []
    # a v1 line needs all of its controllers in the mount
    assert run.cgroup_procs_files("1:cpu,cpuacct:/x\n", [("cgroup", frozenset({"cpu"}), "/", str(tmp_path))]) == []


def test_the_visible_cgroup_mounts_of_this_process() -> None:
    mounts = run._cgroup_mounts()
    points = [m[3] for m in mounts]
    assert len(points) == len(set(points))  # what a later mount hid is gone
    assert all(kind in ("cgroup", "cgroup2") for kind, *_ in mounts)


def test_users_from_the_machine_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n# comment\nalice:x:1000:100::/home/alice:/bin/zsh\n")
    (etc / "group").write_text("users:x:100:\nwheel:x:10:alice,bob\naudio:x:29:bob\n")
    real_open = open

    def chrooted(path: str, *args: object, **kwargs: object) -> object:
        return real_open(str(tmp_path) + path if path.startswith("/etc/") else path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", chrooted)
    alice = run.lookup_user("alice")
    assert (alice.uid, alice.gid, alice.home, alice.shell, alice.groups) == (1000, 100, "/home/alice", "/bin/zsh",
                                                                             [10, 100])  # fmt: skip
    assert run.lookup_user("1000").name == "alice"
    assert (run.lookup_user("").uid, run.lookup_user("").home) == (0, "/root")
    stranger = run.lookup_user("4242")  # a UID without an entry: itself, in /
    assert (stranger.uid, stranger.gid, stranger.home) == (4242, 4242, "/")
    with pytest.raises(BusError) as e:
        run.lookup_user("mallory")
    assert e.value.name == "io.machined.Machine.NoSuchUser"


# ----- .host as another user: PID 1 runs it ----------------------------------------------------


class FakePid1:
    """run_service as PID 1 would answer it: ends when told (or is cancelled: stopped)."""

    def __init__(self, outcome: tuple[int, int, str] = (1, 7, "exit-code")) -> None:
        self.outcome = outcome
        self.calls: list[tuple[str, list[tuple[str, str, object]], int, bool]] = []
        self.end = asyncio.Event()
        self.stopped = False

    async def run_service(self, name: str, properties: list[tuple[str, str, object]], unix_fds: list[int],
                          wait: bool = True, sent: object = None) -> tuple[int, int, str]:  # fmt: skip
        self.calls.append((name, properties, len(unix_fds), wait))
        if callable(sent):
            sent()
        if not wait:
            return 0, 0, ""
        try:
            await self.end.wait()
        except asyncio.CancelledError:
            self.stopped = True
            raise
        return self.outcome


def _client(fd: int) -> socket.socket:
    control = socket.socket(fileno=fd)
    r, w = os.pipe()
    control.sendmsg([b"stdio"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w, w]))])
    os.close(r)
    os.close(w)
    return control


async def _until(predicate: object) -> None:
    for _ in range(500):
        if callable(predicate) and predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def test_host_user_status_comes_from_the_service_and_a_caller_gone_stops_it() -> None:
    pid1 = FakePid1()
    control = _client(await run.start_on_host(pid1, ["sh", "-c", "exit 7"], "nobody", ["A=1"], "", False))
    await _until(lambda: pid1.calls)
    name, props, nfds, wait = pid1.calls[0]
    assert name.startswith("machined-run-") and name.endswith(".service") and nfds == 3 and wait
    p = {k: v for k, _, v in props}
    assert p["User"] == "nobody" and p["Environment"] == ["A=1"] and p["WorkingDirectory"] == "-~"
    assert p["ExecStartEx"] == [("sh", ["sh", "-c", "exit 7"], ["no-env-expand"])]
    assert (p["StandardInputFileDescriptor"], p["StandardOutputFileDescriptor"], p["StandardErrorFileDescriptor"]) == (
        0, 1, 2)  # fmt: skip
    control.send(b"more")  # (not a hang-up: dropped)
    await asyncio.sleep(0.05)
    assert not pid1.stopped
    pid1.end.set()
    loop = asyncio.get_running_loop()
    control.setblocking(False)
    assert json.loads(await asyncio.wait_for(loop.sock_recv(control, 4096), 5)) == {"exit": 7}
    control.close()
    # the caller goes away first: the service is stopped (cancelled), nothing is sent
    pid1 = FakePid1()
    control = _client(await run.start_on_host(pid1, ["sleep", "100"], "nobody", [], "/tmp", False))
    await _until(lambda: pid1.calls)
    control.close()
    await _until(lambda: pid1.stopped)
    await _until(lambda: not run._host_runs)
    # --detach: started without waiting
    pid1 = FakePid1()
    control = _client(await run.start_on_host(pid1, ["sleep", "100"], "nobody", [], "", True))
    await _until(lambda: pid1.calls)
    assert pid1.calls[0][3] is False
    control.close()


async def test_host_user_unknown_is_no_such_user() -> None:
    with pytest.raises(BusError) as e:
        await run.start_on_host(FakePid1(), ["true"], "no-such-user-here", [], "", False)
    assert e.value.name == run.NO_SUCH_USER


def test_host_outcomes_as_the_runner_words_them() -> None:
    argv = ["/x"]
    assert run.host_outcome(1, 0, "success", argv, "") == {"exit": 0}
    assert run.host_outcome(1, 7, "exit-code", argv, "") == {"exit": 7}
    assert run.host_outcome(2, 10, "signal", argv, "") == {"signal": 10}
    assert run.host_outcome(3, 6, "core-dump", argv, "") == {"signal": 6}
    assert run.host_outcome(1, 203, "exit-code", argv, "")["exit"] == 127
    assert run.host_outcome(1, 200, "exit-code", argv, "/nope")["exit"] == 126
    assert run.host_outcome(0, 0, "resources", argv, "")["exit"] == 127
    assert run.host_outcome(0, 0, "success", argv, "") == {}
    assert run.is_host_user("nobody") and not run.is_host_user("") and not run.is_host_user("root")

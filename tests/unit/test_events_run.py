"""machined run's pure parts: where a runner goes (the leader's cgroup in each hierarchy mounted
and visible here) and who it runs as (the machine's own /etc/passwd and /etc/group)."""

from __future__ import annotations

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

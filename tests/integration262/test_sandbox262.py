"""The systemd-262 sandbox: it boots the cached forky root, real systemd-machined 262 serves
D-Bus and varlink in it, ours replaces it, containers and machines register with both,
and the host and the cached tree are never written."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from machined.sandbox import Sandbox
from machined.sandbox.core import PROJECT_ROOT, STATE_ROOT
from machined.sandbox.forky import HOST_LIBS
from machined.sandbox.root import cached_root

BUSCTL_MANAGER = ["busctl", "--json=short", "call", "org.freedesktop.machine1", "/org/freedesktop/machine1",
                  "org.freedesktop.machine1.Manager"]  # fmt: skip
VARLINK = "/run/systemd/machine/io.systemd.Machine"
# Properties both 252-compatible machined and 262 have (262 adds more: Supervisor, VSockCID, ...).
SHOW = ["-p", "Name", "-p", "Class", "-p", "Service", "-p", "RootDirectory", "-p", "Unit", "-p", "State"]


def _host_mounts() -> list[str]:
    return sorted(line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())


def _fingerprint(top: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every entry under *top* with its mode, size, mtime and ctime (any write changes one)."""
    result = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames + ["."]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            result[os.path.relpath(path, top)] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return result


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _registered(sb: Sandbox, name: str) -> bool:
    return sb.run(["machinectl", "show", name, "-p", "Name"], check=False).returncode == 0


def _list_machines(sb: Sandbox) -> list[list[str]]:
    reply = json.loads(sb.run([*BUSCTL_MANAGER, "ListMachines"]).stdout)
    return sorted(row[:3] for row in reply["data"][0])


def _varlink_list(sb: Sandbox) -> list[dict]:
    out = sb.run(["varlinkctl", "--json=short", "call", "--more", VARLINK, "io.systemd.Machine.List", "{}"]).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _version_line(sb: Sandbox) -> str:
    return sb.run(["systemctl", "--version"]).stdout.splitlines()[0]


def test_both_boot_systemd_262_on_cgroup2_from_an_overlay(real262: Sandbox, ours262: Sandbox) -> None:
    root = cached_root()
    assert root is not None
    assert root.systemd_version.split(".")[0].split("~")[0] == "262", root.manifest.get("systemd_version")
    ids = set()
    for sb in (real262, ours262):
        assert sb.systemd == "262" and sb.cgroup == "unified"
        assert sb.run(["systemctl", "is-system-running"]).stdout.strip() == "running"
        assert _version_line(sb).startswith("systemd 262 ")
        assert sb.run(["stat", "-f", "-c", "%T", "/sys/fs/cgroup"]).stdout.strip() == "cgroup2fs"
        fs = sb.run(["findmnt", "-n", "-o", "FSTYPE,OPTIONS", "/"]).stdout.split()
        assert fs[0] == "overlay" and f"lowerdir={root.rootfs}" in fs[1]
        assert sb.run(["hostname"]).stdout.strip() == f"sandbox-{sb.id}"
        assert sb.run(["systemctl", "--failed", "--no-legend"]).stdout.strip() == ""
        for private in ("/tmp", "/var/tmp", "/run", "/var/lib/machines", "/dev/shm"):
            assert sb.run(["findmnt", "-n", "-o", "FSTYPE", private]).stdout.strip() == "tmpfs", private
        ids.add(sb.run(["cat", "/etc/machine-id"]).stdout.strip())
    assert len(ids) == 2  # each sandbox is a machine of its own


def test_real_machined_262_serves_dbus_and_varlink(real262: Sandbox) -> None:
    assert _list_machines(real262) == [[".host", "host", ""]]  # (activates it: busctl status does not)
    status = real262.run(["busctl", "status", "org.freedesktop.machine1"]).stdout
    assert "Exe=/usr/lib/systemd/systemd-machined" in status and "Unit=systemd-machined.service" in status
    assert real262.run(["systemctl", "is-active", "systemd-machined.socket"]).stdout.strip() == "active"
    real262.run(["test", "-S", VARLINK])
    rows = _varlink_list(real262)
    assert [(m["name"], m["class"]) for m in rows] == [(".host", "host")]
    # List is a "more" method in 262: a plain call is refused.
    plain = real262.run(["varlinkctl", "call", VARLINK, "io.systemd.Machine.List", "{}"], check=False)
    assert plain.returncode != 0 and "more" in plain.stderr
    assert "No machines." in real262.run(["machinectl", "list"]).stdout


def test_ours_replaces_machined_in_262(ours262: Sandbox) -> None:
    assert _list_machines(ours262) == [[".host", "host", ""]]  # (activates it: busctl status does not)
    status = ours262.run(["busctl", "status", "org.freedesktop.machine1"]).stdout
    assert "Unit=machined.service" in status and "-m machined" in status
    for unit in ("systemd-machined.service", "systemd-machined.socket"):
        assert ours262.run(["systemctl", "show", "-p", "LoadState", "--value", unit]).stdout.strip() == "masked"
    env = ours262.run(["systemctl", "show", "-p", "Environment", "--value", "machined.service"]).stdout
    assert f"LD_LIBRARY_PATH={HOST_LIBS}" in env
    # The root's own programs keep the root's libraries.
    assert "LD_LIBRARY_PATH" not in ours262.run(["systemctl", "show", "-p", "Environment", "dbus.service"]).stdout
    assert ours262.run(["systemctl", "is-active", "machined.service"]).stdout.strip() == "active"
    # The host's virtualenv runs inside with what python_env() adds.
    probe = "import machined.daemon, dbus_fast, psutil, ctypes, ssl, sqlite3; print('ok')"
    r = ours262.run([sys.executable, "-c", probe], env=ours262.python_env())
    assert r.stdout.strip() == "ok", r.stderr


@pytest.mark.parametrize("impl", ["real", "ours"])
def test_nspawn_container_registers_and_terminates(impl: str, request: pytest.FixtureRequest) -> None:
    sb: Sandbox = request.getfixturevalue(f"{impl}262")
    name = f"ns-{impl}"
    sb.run(["systemd-run", "--quiet", f"--unit={name}", "systemd-nspawn", "-q", "-D", "/", "--volatile=yes",
            "-M", name, "/bin/sleep", "2999"])  # fmt: skip
    try:
        _wait(lambda: _registered(sb, name), f"{name} to register")
        assert [name, "container", "systemd-nspawn"] in _list_machines(sb)
        listing = sb.run(["machinectl", "list"]).stdout
        assert any(line.split()[:3] == [name, "container", "systemd-nspawn"] for line in listing.splitlines())
        if impl == "real":
            rows = {m["name"]: m for m in _varlink_list(sb)}
            assert rows[name]["class"] == "container" and rows[name]["service"] == "systemd-nspawn"
        leader = sb.run(["machinectl", "show", name, "-p", "Leader", "--value"]).stdout.strip()
        assert sb.run(["ps", "-o", "machine=", "-p", leader]).stdout.strip() == name
    finally:
        sb.run(["machinectl", "terminate", name], check=False)
    _wait(lambda: not _registered(sb, name), f"{name} to go away")
    _wait(
        lambda: sb.run(["systemctl", "is-active", f"{name}.service"], check=False).stdout.strip() != "active",
        f"{name}.service to stop",
    )


def _create_vm(sb: Sandbox, name: str) -> dict[str, str]:
    """CreateMachine for a sleeping leader (as libvirt does); what the clients then say."""
    sb.run(["systemd-run", "--quiet", f"--unit={name}-leader", "/bin/sleep", "2997"])
    pid = sb.run(["systemctl", "show", "-p", "MainPID", "--value", f"{name}-leader"]).stdout.strip()
    created = json.loads(
        sb.run([*BUSCTL_MANAGER, "CreateMachine", "sayssusa(sv)", name, "0", "demo", "vm", pid, "", "0"]).stdout
    )
    by_pid = json.loads(sb.run([*BUSCTL_MANAGER, "GetMachineByPID", "u", pid]).stdout)
    result = {
        "created": json.dumps(created),
        "by_pid": json.dumps(by_pid),
        "list": json.dumps(_list_machines(sb)),
        "show": sb.run(["machinectl", "show", name, *SHOW]).stdout,
        "ps": sb.run(["ps", "-o", "machine=", "-p", pid]).stdout.strip(),
    }
    sb.run([*BUSCTL_MANAGER, "TerminateMachine", "s", name])
    _wait(lambda: not _registered(sb, name), f"{name} to go away")
    _wait(
        lambda: sb.run(["systemctl", "is-active", f"{name}-leader"], check=False).stdout.strip() != "active",
        f"{name}-leader to stop with its machine",
    )
    result["after"] = json.dumps(_list_machines(sb))
    return result


def test_create_machine_over_dbus_same_as_262(real262: Sandbox, ours262: Sandbox) -> None:
    real = _create_vm(real262, "vm262")
    ours = _create_vm(ours262, "vm262")
    assert real["created"] == json.dumps({"type": "o", "data": ["/org/freedesktop/machine1/machine/vm262"]})
    assert "Class=vm" in real["show"] and "Service=demo" in real["show"] and real["ps"] == "vm262"
    assert ours == real


def test_host_and_cached_tree_untouched_and_teardown_complete() -> None:
    root = cached_root()
    assert root is not None
    before = _fingerprint(root.path)
    mounts_before = _host_mounts()
    canary = Path("/tmp") / f"machined-canary-{secrets.token_hex(4)}"
    canary.write_text("keep me")
    tag = secrets.token_hex(4)
    try:
        with Sandbox("ours", systemd="262") as sb:
            assert canary.name not in sb.run(["ls", "-a", "/tmp"]).stdout.split()
            writes = (
                f"echo x > /tmp/inside-{tag} && echo x > /etc/inside-{tag} && echo x >> /usr/lib/os-release"
                f" && rm /etc/hostname && mkdir /var/lib/inside-{tag} && echo x > /var/cache/inside-{tag}"
            )
            sb.run(["sh", "-c", writes])
            for bound in (str(PROJECT_ROOT), sys.base_prefix, sys.prefix):
                r = sb.run(["touch", f"{bound}/inside-{tag}"], check=False)
                assert r.returncode != 0 and "Read-only file system" in r.stderr, bound
            # Nothing of the host but the binds: not even the tree's cache.
            assert sb.run(["test", "-e", str(root.rootfs)], check=False).returncode != 0
            cgroups = [Path(c) for c in sb.info.cgroups]
            assert all(c.is_dir() for c in cgroups)
            pid = sb.init_pid
            state = sb.state_dir
            assert not os.path.ismount(state / "root")  # the overlay is mounted in the sandbox only
        for c in cgroups:
            assert not c.exists(), f"cgroup {c} left behind"
        assert not Path(f"/proc/{pid}").exists()
        assert not state.exists() and not (STATE_ROOT / sb.id).exists()
        assert _host_mounts() == mounts_before
        assert canary.read_text() == "keep me"
        for path in (f"/tmp/inside-{tag}", f"/etc/inside-{tag}", f"/var/lib/inside-{tag}", f"/var/cache/inside-{tag}"):
            assert not Path(path).exists()
        for bound in (str(PROJECT_ROOT), sys.base_prefix, sys.prefix):
            assert not Path(f"{bound}/inside-{tag}").exists()
        assert _fingerprint(root.path) == before  # the cached tree: not one entry changed
    finally:
        canary.unlink()


def test_cli_262(tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "machined.sandbox.cli"]
    built = subprocess.run([*cli, "build-root"], capture_output=True, text=True, check=True).stdout
    assert ": cached; systemd 262" in built
    refused = subprocess.run(
        [*cli, "start", "--systemd", "262", "--cgroup", "hybrid"], capture_output=True, text=True, check=False
    )
    assert refused.returncode == 1 and "cgroup2 only" in refused.stderr
    sid = subprocess.run([*cli, "start", "--systemd", "262", "--impl", "real"], capture_output=True, text=True,
                         check=True).stdout.strip()  # fmt: skip
    try:
        listing = subprocess.run([*cli, "list"], capture_output=True, text=True, check=True).stdout
        row = next(line.split() for line in listing.splitlines() if line.split()[:1] == [sid])
        assert row[1:4] == ["real", "unified", "262"] and row[-1] == "running"
        out = subprocess.run(
            [*cli, "exec", sid, "--", "systemctl", "--version"], capture_output=True, text=True, check=False
        )
        assert out.returncode == 0 and out.stdout.startswith("systemd 262 ")
    finally:
        stopped = subprocess.run([*cli, "stop", sid], capture_output=True, text=True, check=False)
    assert stopped.returncode == 0 and f"stopped {sid}" in stopped.stdout
    assert not (STATE_ROOT / sid).exists()

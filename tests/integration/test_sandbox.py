"""The sandbox itself: isolation from the host, several at once, complete teardown."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

from machined.sandbox import Sandbox, SandboxError
from machined.sandbox.core import STATE_ROOT


def _host_mounts() -> list[str]:
    return sorted(line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())


def test_host_tmp_survives_and_sandbox_tmp_is_private() -> None:
    canary = Path("/tmp") / f"machined-canary-{secrets.token_hex(4)}"
    canary.write_text("keep me")
    try:
        with Sandbox("real") as sb:
            inside = sb.run(["ls", "-a", "/tmp"]).stdout.split()
            assert canary.name not in inside  # a private /tmp
            sb.run(["sh", "-c", "echo x > /tmp/from-inside"])
            # the sandbox sees the host's / read-only
            r = sb.run(["touch", "/etc/machined-sandbox-write-test"], check=False)
            assert r.returncode != 0 and "Read-only file system" in r.stderr
        assert canary.read_text() == "keep me"
        assert not Path("/tmp/from-inside").exists()
        assert not Path("/etc/machined-sandbox-write-test").exists()
    finally:
        canary.unlink()


def test_two_sandboxes_run_at_once_and_leave_nothing_behind() -> None:
    mounts_before = _host_mounts()
    a, b = Sandbox("ours"), Sandbox("real")
    with a, b:
        assert a.id != b.id and a.init_pid != b.init_pid
        assert a.alive() and b.alive()
        for sb in (a, b):
            assert sb.run(["machinectl", "list", "--all"]).stdout.startswith("MACHINE")
        status_a = a.run(["busctl", "status", "org.freedesktop.machine1"]).stdout
        status_b = b.run(["busctl", "status", "org.freedesktop.machine1"]).stdout
        assert "-m machined" in status_a and "systemd-machined" in status_b
        # each sees only its own processes
        assert a.run(["sh", "-c", "pgrep -c systemd-machine || true"]).stdout.strip() == "0"
        cgroups = [Path(c) for c in a.info.cgroups + b.info.cgroups]
        assert all(c.is_dir() for c in cgroups)
        pids = [a.init_pid, b.init_pid]
    for c in cgroups:
        assert not c.exists(), f"cgroup {c} left behind"
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    assert not (STATE_ROOT / a.id).exists() and not (STATE_ROOT / b.id).exists()
    assert _host_mounts() == mounts_before


def test_failed_test_body_still_tears_down() -> None:
    sb = Sandbox("ours")
    try:
        with sb:
            cgroups = list(sb.info.cgroups)
            raise RuntimeError("test failure")
    except RuntimeError:
        pass
    assert not any(Path(c).exists() for c in cgroups)
    assert not sb.alive()


def test_cli_lists_execs_and_stops() -> None:
    cli = [sys.executable, "-m", "machined.sandbox.cli"]
    sid = subprocess.run([*cli, "start", "--impl", "real"], capture_output=True, text=True, check=True).stdout.strip()
    try:
        listing = subprocess.run([*cli, "list"], capture_output=True, text=True, check=True).stdout
        assert any(line.split()[:2] == [sid, "real"] and line.endswith("running") for line in listing.splitlines())
        out = subprocess.run([*cli, "exec", sid, "--", "machinectl", "list", "--all"], capture_output=True, text=True)
        assert out.returncode == 0 and "1 machines listed." in out.stdout
    finally:
        stop = subprocess.run([*cli, "stop", sid], capture_output=True, text=True)
    assert stop.returncode == 0 and f"stopped {sid}" in stop.stdout
    assert not (STATE_ROOT / sid).exists()
    run = subprocess.run([*cli, "run", "--", "sh", "-c", "machinectl list --no-legend; exit 3"],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 3 and ".host" not in run.stdout


def test_clear_errors_not_tracebacks() -> None:
    cli = [sys.executable, "-m", "machined.sandbox.cli"]
    nobody = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cli, "start"],
        capture_output=True, text=True, env={**os.environ, "HOME": "/"},
    )  # fmt: skip
    assert nobody.returncode == 1
    assert "must run as root" in nobody.stderr and "Traceback" not in nobody.stderr
    missing = subprocess.run([*cli, "exec", "nosuchid", "--", "true"], capture_output=True, text=True)
    assert missing.returncode == 1 and "no sandbox 'nosuchid'" in missing.stderr


def test_boot_failure_shows_systemds_last_lines(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MACHINED_SANDBOX_SYSTEMD", "/bin/false")
    sb = Sandbox("real")
    try:
        sb.start()
    except SandboxError as e:
        assert "systemd exited during boot" in str(e)
    else:
        sb.stop()
        raise AssertionError("a sandbox whose systemd exits must not start")
    assert not any(Path(c).exists() for c in sb.info.cgroups)


def _descends(pid: int, ancestor: int) -> bool:
    for _ in range(8):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        pid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return False


def test_ctrl_c_tears_the_sandbox_down() -> None:
    import signal
    import time

    before = {info.id for info, _ in Sandbox.list()}
    cli = subprocess.Popen([sys.executable, "-m", "machined.sandbox.cli", "run", "--", "sleep", "60"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    new: set[str] = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not new:
        # this CLI's sandbox, not one that another test run started meanwhile
        new = {info.id for info, alive in Sandbox.list() if alive and _descends(info.init_pid, cli.pid)} - before
        time.sleep(0.1)
    assert new, "the sandbox did not come up"
    (sid,) = new
    cgroups = Sandbox.attach(sid).info.cgroups
    time.sleep(0.5)  # inside the command now
    cli.send_signal(signal.SIGINT)
    _, err = cli.communicate(timeout=180)  # poweroff takes seconds; more on a loaded machine
    assert "Traceback" not in err
    assert not (STATE_ROOT / sid).exists()
    assert not any(Path(c).exists() for c in cgroups)

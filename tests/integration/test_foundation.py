"""Foundation: machined answers real clients exactly as systemd-machined 252 does.

Every comparison runs the same client command in a sandbox with the real
systemd-machined and in one with ours, and compares the outputs.
"""

from __future__ import annotations

import difflib
import json
import re
import time

import pytest

from machined.sandbox import Sandbox
from tests.integration.conftest import mask

DEST = "org.freedesktop.machine1"
MANAGER = "/org/freedesktop/machine1"
HOST = "/org/freedesktop/machine1/machine/_2ehost"


def both(ours: Sandbox, real: Sandbox, args: list[str]) -> tuple[str, str]:
    a = real.run(args, check=False)
    b = ours.run(args, check=False)
    return mask(a.stdout + a.stderr), mask(b.stdout + b.stderr)


@pytest.mark.parametrize(
    "args",
    [
        ["machinectl", "list"],
        ["machinectl", "list", "--all"],
        ["machinectl", "show"],
        ["machinectl", "status", "-n0", ".host"],
        ["busctl", "call", DEST, MANAGER, "org.freedesktop.machine1.Manager", "ListMachines"],
        ["busctl", "call", DEST, MANAGER, "org.freedesktop.machine1.Manager", "GetMachine", "s", ".host"],
        ["busctl", "call", DEST, HOST, "org.freedesktop.DBus.Properties", "GetAll", "s", ""],
        ["busctl", "call", DEST, MANAGER, "org.freedesktop.DBus.Properties", "GetAll", "s", ""],
        ["busctl", "call", DEST, HOST, "org.freedesktop.DBus.Properties", "Get", "ss",
         "org.freedesktop.machine1.Machine", "Scope"],
        ["busctl", "call", DEST, MANAGER, "org.freedesktop.machine1.Manager", "GetMachineOSRelease", "s", ".host"],
        ["busctl", "call", DEST, MANAGER, "org.freedesktop.machine1.Manager", "GetMachineAddresses", "s", ".host"],
        ["busctl", "call", DEST, MANAGER, "org.freedesktop.machine1.Manager", "GetMachineUIDShift", "s", ".host"],
        ["busctl", "introspect", DEST, MANAGER],
        ["busctl", "introspect", DEST, HOST],
        ["busctl", "call", DEST, MANAGER, "org.freedesktop.DBus.Peer", "GetMachineId"],
    ],
    ids=lambda a: " ".join(a[:2] + a[4:6] if a[0] == "busctl" and a[1] == "call" else a),
)  # fmt: skip
def test_client_output_matches_real(ours: Sandbox, real: Sandbox, args: list[str]) -> None:
    expected, got = both(ours, real, args)
    diff = "".join(difflib.unified_diff(expected.splitlines(True), got.splitlines(True), "real", "ours"))
    assert got == expected, diff


def test_introspection_xml_is_identical(ours: Sandbox, real: Sandbox) -> None:
    for path in ("/", "/org", "/org/freedesktop", MANAGER, HOST, "/org/freedesktop/machine1/machine"):
        args = ["busctl", "call", "--json=short", DEST, path, "org.freedesktop.DBus.Introspectable", "Introspect"]
        expected, got = both(ours, real, args)
        assert json.loads(got) == json.loads(expected), path


@pytest.mark.parametrize(
    "call",
    [
        [MANAGER, "org.freedesktop.machine1.Manager.GetMachine", "string:nope"],
        [MANAGER, "org.freedesktop.machine1.Manager.GetMachine", "uint32:5"],
        [MANAGER, "org.freedesktop.machine1.Manager.Nope"],
        [MANAGER, "org.foo.Bar.Nope"],
        [MANAGER, "org.freedesktop.machine1.Manager.GetMachineByPID", "uint32:1"],
        [MANAGER, "org.freedesktop.machine1.Manager.GetMachineAddresses", "string:nope"],
        [MANAGER, "org.freedesktop.DBus.Properties.GetAll", "string:org.foo"],
        [MANAGER, "org.freedesktop.DBus.Properties.Get", "string:org.freedesktop.machine1.Manager", "string:Nope"],
        [MANAGER, "org.freedesktop.DBus.Properties.Get", "string:", "string:PoolPath"],
        [MANAGER, "org.freedesktop.DBus.Properties.Set", "string:org.freedesktop.machine1.Manager",
         "string:PoolPath", "variant:string:x"],
        ["/org/freedesktop/machine1/machine/foo", "org.freedesktop.DBus.Properties.GetAll", "string:"],
        ["/org/freedesktop/machine1/machine/foo", "org.freedesktop.DBus.Introspectable.Introspect"],
        ["/org/freedesktop/machine1/machine/self", "org.freedesktop.DBus.Properties.GetAll", "string:"],
        ["/org/freedesktop/machine1/machine/foo", "org.freedesktop.DBus.Peer.Ping"],
        ["/nonexistent", "org.freedesktop.DBus.Introspectable.Introspect"],
        ["/org/freedesktop/machine1/machine", "org.freedesktop.DBus.Properties.GetAll", "string:"],
        [HOST, "org.freedesktop.DBus.Properties.GetAll", "string:org.freedesktop.machine1.Manager"],
        [HOST, "org.freedesktop.machine1.Manager.ListMachines"],
    ],
    ids=lambda c: " ".join(c),
)  # fmt: skip
def test_errors_match_real(ours: Sandbox, real: Sandbox, call: list[str]) -> None:
    args = ["dbus-send", "--system", "--print-reply", f"--dest={DEST}", *call]
    expected, got = both(ours, real, args)
    assert got == expected


def test_our_daemon_serves_the_name(ours: Sandbox) -> None:
    ours.run(["machinectl", "list"])  # bus activation
    status = ours.run(["busctl", "status", DEST]).stdout
    assert "CommandLine=" in status and "-m machined" in status
    assert "Unit=machined.service" in status
    show = ours.run(["systemctl", "show", "machined.service", "-p", "Type,StatusText,ActiveState"]).stdout
    assert "Type=notify" in show and "ActiveState=active" in show
    assert "StatusText=Serving org.freedesktop.machine1." in show
    hardening = ours.run(
        [
            "systemctl",
            "show",
            "machined.service",
            "-p",
            "WatchdogUSec,Restart,NoNewPrivileges,MemoryDenyWriteExecute,CapabilityBoundingSet",
        ]
    ).stdout
    assert "WatchdogUSec=3min" in hardening and "Restart=on-failure" in hardening
    assert "NoNewPrivileges=yes" in hardening and "MemoryDenyWriteExecute=yes" in hardening
    assert "cap_sys_admin" in hardening and "cap_net_admin" not in hardening
    # real systemd-machined is masked and never ran
    assert ours.run(["systemctl", "is-active", "systemd-machined.service"], check=False).stdout.strip() == "inactive"


def test_activation_by_bus_name_and_clean_stop() -> None:
    with Sandbox("ours") as sb:
        state = sb.run(["systemctl", "is-active", "machined.service"], check=False).stdout.strip()
        assert state == "inactive"  # nobody asked yet
        names = sb.run(["busctl", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                        "org.freedesktop.DBus", "ListActivatableNames"]).stdout  # fmt: skip
        assert '"org.freedesktop.machine1"' in names  # what libvirt probes
        assert sb.run(["machinectl", "list"]).returncode == 0
        assert sb.run(["systemctl", "is-active", "machined.service"], check=False).stdout.strip() == "active"
        assert sb.run(["test", "-d", "/run/systemd/machines"], check=False).returncode == 0
        journal = sb.run(["journalctl", "-u", "machined.service", "-o", "cat", "--no-pager"]).stdout
        assert "Serving org.freedesktop.machine1 on the bus." in journal
        sb.run(["systemctl", "stop", "machined.service"])
        result = sb.run(["systemctl", "show", "machined.service", "-p", "Result,ActiveState"]).stdout
        assert "Result=success" in result and "ActiveState=inactive" in result


def test_name_taken_exits_with_clear_message(ours: Sandbox) -> None:
    ours.run(["machinectl", "list"])  # make sure ours owns the name
    r = ours.run(["python3", "-c", "import sys; print(sys.executable)"], check=False)
    unit = ours.run(["systemctl", "cat", "machined.service"]).stdout
    execstart = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = execstart.removeprefix("ExecStart=").split()
    second = ours.run(argv, check=False, timeout=30)
    assert r.returncode == 0
    assert second.returncode == 1
    assert "org.freedesktop.machine1 is already owned on this bus by PID" in second.stderr
    assert "Traceback" not in second.stderr


def test_real_reference_is_systemd_machined(real: Sandbox) -> None:
    status = real.run(["busctl", "status", DEST]).stdout
    assert "Exe=/usr/lib/systemd/systemd-machined" in status


def test_log_control_differs_only_in_our_identifier(ours: Sandbox, real: Sandbox) -> None:
    args = ["busctl", "introspect", DEST, "/org/freedesktop/LogControl1"]
    expected, got = both(ours, real, args)

    def words(text: str) -> list[str]:
        return text.split()

    assert words(got) == words(expected.replace('"systemd-machined"', '"machined"'))
    ours.run(["busctl", "set-property", DEST, "/org/freedesktop/LogControl1", "org.freedesktop.LogControl1",
              "LogLevel", "s", "debug"])  # fmt: skip
    level = ours.run(["busctl", "get-property", DEST, "/org/freedesktop/LogControl1", "org.freedesktop.LogControl1",
                      "LogLevel"]).stdout  # fmt: skip
    assert level.strip() == 's "debug"'


@pytest.mark.parametrize(
    "call",
    [
        ["org.freedesktop.machine1.Manager.RegisterMachine", "string:x", "array:byte:", "string:", "string:vm",
         "uint32:0", "string:"],
        ["org.freedesktop.machine1.Manager.OpenMachinePTY", "string:.host"],
        ["org.freedesktop.machine1.Manager.ListMachines"],
        ["org.freedesktop.machine1.Manager.GetMachine", "string:.host"],
    ],
    ids=lambda c: c[0].rsplit(".", 1)[1],
)  # fmt: skip
def test_bus_policy_for_unprivileged_callers_matches_real(ours: Sandbox, real: Sandbox, call: list[str]) -> None:
    """Our policy file is in place and dbus-daemon judges callers by it as by upstream's."""
    assert "machined" in ours.run(["cat", "/usr/share/dbus-1/system.d/org.freedesktop.machine1.conf"]).stdout
    args = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "dbus-send", "--system", "--print-reply", f"--dest={DEST}", MANAGER, *call]  # fmt: skip
    expected, got = both(ours, real, args)
    # the message names the destination's command line: ours is python
    for pattern, repl in ((r"pid=\d+", "pid=N"), (r'comm="[^"]*machined[^"]*"', 'comm="MACHINED"')):
        expected, got = re.sub(pattern, repl, expected), re.sub(pattern, repl, got)
    assert got == expected


def test_watchdog_is_fed_from_the_event_loop() -> None:
    with Sandbox("ours") as sb:
        sb.run(["mkdir", "-p", "/run/systemd/system/machined.service.d"])
        sb.run(["sh", "-c", "printf '[Service]\\nWatchdogSec=1s\\n' > /run/systemd/system/machined.service.d/wd.conf"])
        sb.run(["systemctl", "daemon-reload"])
        sb.run(["machinectl", "list"])
        time.sleep(3.5)
        show = sb.run(["systemctl", "show", "machined.service", "-p",
                       "WatchdogUSec,NRestarts,ActiveState,WatchdogTimestampMonotonic"]).stdout  # fmt: skip
    assert "WatchdogUSec=1s" in show and "NRestarts=0" in show and "ActiveState=active" in show
    assert "WatchdogTimestampMonotonic=0" not in show

"""org.freedesktop.machine1 on D-Bus as systemd-machined 262 serves it (machined's 262
personality, chosen from PID 1's version): introspection, 262's Machine properties and state
file keys, CreateMachineEx/RegisterMachineEx, GetSSHInfo, checks and polkit's wording,
compared with real 262 in the same script.

Ex calls with a pidfd and the error names busctl does not show go through dbus_calls.py
(run inside the sandbox with the checkout's virtualenv)."""

from __future__ import annotations

import difflib
import json
import re
import sys
from pathlib import Path

import pytest

from machined.sandbox import Sandbox

HERE = Path(__file__).resolve().parent
CALLS = HERE / "dbus_calls.py"
M = "/org/freedesktop/machine1"
I = "org.freedesktop.machine1.Manager"  # noqa: E741


def _wake(sb: Sandbox) -> None:
    sb.run(["busctl", "call", "org.freedesktop.machine1", M, "org.freedesktop.DBus.Peer", "Ping"])


_NUMERIC = ("Leader|LeaderPIDFDId|Supervisor|SupervisorPIDFDId|TimestampMonotonic|LEADER|LEADER_PIDFDID|SUPERVISOR|"
            "SUPERVISOR_PIDFDID|REALTIME|MONOTONIC")  # fmt: skip


def _mask(text: str) -> str:
    """PIDs, pidfd ids and times differ between sandboxes: masked (0 stays 0)."""
    text = re.sub(rf"^({_NUMERIC})=([1-9]\d*)$", r"\1=N", text, flags=re.M)
    text = re.sub(r"^Timestamp=.*$", "Timestamp=T", text, flags=re.M)
    text = re.sub(r"^Id=(?!0102)[0-9a-f]{32}$", "Id=<machine-id>", text, flags=re.M)  # (each sandbox its own)
    text = re.sub(r'"(pidfdId|realtime|monotonic)":\d+', r'"\1":N', text)
    text = re.sub(r'"(bootId)":"[0-9a-f]{32}"', r'"\1":"<id>"', text)
    text = re.sub(r'"pid":\d+', '"pid":P', text)
    text = re.sub(r"process \d+ ", "process P ", text)
    text = re.sub(r"^\s*(Since|Leader|Superv\.):.*$", r"\1: X", text, flags=re.M)
    text = re.sub(r"^(\s*[└├│─ ]*)\d+ ", r"\1P ", text, flags=re.M)
    return text


def _script(sb: Sandbox, script: str, calls: list[list[object]] | None = None) -> str:
    """Run *script* (bash) with $CALLS (run dbus_calls.py with JSON on stdin) and $PY."""
    prelude = f"PY={sys.executable}\nCALLS={CALLS}\nM={M}\nI={I}\n"
    _wake(sb)
    r = sb.run(["bash", "-c", prelude + script], check=False, timeout=300,
               input=json.dumps(calls) if calls is not None else None)  # fmt: skip
    return _mask(r.stdout + "\n" + r.stderr)


def _same(real262: Sandbox, ours262: Sandbox, script: str) -> str:
    real, ours = (_script(sb, script) for sb in (real262, ours262))
    if ours != real:
        diff = "".join(difflib.unified_diff(real.splitlines(True), ours.splitlines(True), "real", "ours"))
        pytest.fail(f"outputs differ:\n{diff}")
    return ours


INTROSPECT = r"""
systemd-run -q --unit=in-l1 sleep 2990; P=$(systemctl show -P MainPID in-l1)
busctl call org.freedesktop.machine1 $M $I RegisterMachine sayssus in1 0 '' container $P ''
for p in $M $M/machine/_2ehost $M/machine/in1 $M/image/_2ehost; do
  echo "== $p"; busctl call org.freedesktop.machine1 $p org.freedesktop.DBus.Introspectable Introspect --json=pretty
done
busctl get-property org.freedesktop.machine1 $M/machine/_2ehost org.freedesktop.machine1.Machine \
  Subgroup Supervisor SupervisorPIDFDId VSockCID SSHAddress SSHPrivateKeyPath UID Unit
busctl get-property org.freedesktop.machine1 $M/machine/_2ehost org.freedesktop.machine1.Machine LeaderPIDFDId \
  | grep -c -v '^t 0$'
"""


def test_introspection_as_262(real262: Sandbox, ours262: Sandbox) -> None:
    out = _same(real262, ours262, INTROSPECT)
    assert "CreateMachineEx" in out and "GetSSHInfo" in out and "SupervisorPIDFDId" in out, out
    # 262 lets anybody call CreateMachine*/RegisterMachine*/OpenMachinePTY (polkit decides)
    assert "org.freedesktop.systemd1.Privileged" not in out


REGISTRATIONS = r"""
B="busctl call org.freedesktop.machine1 $M $I"
show() {
  echo "=== $1"; machinectl show "$1"; echo "--- state file"; cat /run/systemd/machines/$1
  ls /run/systemd/machines | grep -x "unit:.*" | while read l; do [ "$(readlink /run/systemd/machines/$l)" = "$1" ] && echo "$l"; done
  busctl call org.freedesktop.machine1 $M/machine/$1 org.freedesktop.machine1.Machine GetSSHInfo 2>&1
  busctl get-property org.freedesktop.machine1 $M/machine/$1 org.freedesktop.machine1.Machine VSockCID UID Subgroup
}
for n in 1 2 3 4; do systemd-run -q --unit=rg-l$n sleep 299$n; done
sleep 2995 >/dev/null 2>&1 & C1=$!
sleep 2996 >/dev/null 2>&1 & C2=$!
export P1=$(systemctl show -P MainPID rg-l1) P2=$(systemctl show -P MainPID rg-l2) P3=$(systemctl show -P MainPID rg-l3)
export P4=$(systemctl show -P MainPID rg-l4) C2
$B RegisterMachine sayssus r1 0 'my svc' container $P1 /
$B CreateMachine 'sayssusa(sv)' c1 16 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 svc vm $C1 '/root dir' 1 Description s custom
$B RegisterMachineWithNetwork sayssusai n1 0 '' vm $P2 '' 2 7 8
$PY $CALLS <<'EOF'
[["/org/freedesktop/machine1","org.freedesktop.machine1.Manager","RegisterMachineEx","sa(sv)",["x1",[
   ["Class",{"v":["s","vm"]}],["LeaderPID",{"v":["u",{"pid":"$P3"}]}],["LeaderPIDFDID",{"v":["t",{"pidfdid":{"pid":"$P3"}}]}],
   ["Id",{"v":["ay",{"bytes":[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16]}]}],["Service",{"v":["s","my svc"]}],
   ["RootDirectory",{"v":["s","/a b"]}],["NetworkInterfaces",{"v":["ai",[3,4]]}],["VSockCID",{"v":["u",77]}],
   ["SSHAddress",{"v":["s","vsock%77"]}],["SSHPrivateKeyPath",{"v":["s","/k\"e$y"]}]]]],
 ["/org/freedesktop/machine1","org.freedesktop.machine1.Manager","CreateMachineEx","sa(sv)a(sv)",["x2",[
   ["Class",{"v":["s","container"]}],["LeaderPIDFD",{"v":["h",{"pidfd":{"pid":"$C2"}}]}],["SSHAddress",{"v":["s","abc"]}]],
   [["Description",{"v":["s","ex scope"]}]]]],
 ["/org/freedesktop/machine1","org.freedesktop.machine1.Manager","GetMachineSSHInfo","s",["x1"]],
 ["/org/freedesktop/machine1","org.freedesktop.machine1.Manager","GetMachineSSHInfo","s",["x2"]],
 ["/org/freedesktop/machine1","org.freedesktop.machine1.Manager","GetMachineSSHInfo","s",["nope"]],
 ["/org/freedesktop/machine1","org.freedesktop.machine1.Manager","GetMachineSSHInfo","s",[".host"]]
]
EOF
V=/run/systemd/machine/io.systemd.Machine
varlinkctl --json=short call $V io.systemd.Machine.Register \
  "{\"name\":\"v1\",\"class\":\"vm\",\"leader\":$P4,\"vSockCid\":99,\"sshAddress\":\"vsock/99\",\"sshPrivateKeyPath\":\"/run/k y\",\"controlAddress\":\"/run/c\"}"
varlinkctl --json=short call $V io.systemd.Machine.Register "{\"name\":\"v2\",\"class\":\"vm\",\"leader\":$P4,\"controlAddress\":\"unix:/run/c\"}"
varlinkctl --json=short call $V io.systemd.Machine.List '{"name":"v1"}'
varlinkctl --json=short call $V io.systemd.Machine.List '{"name":"x1"}'
for m in r1 c1 n1 x1 x2 v1; do show $m; done
systemctl show -P Description machine-c1.scope machine-x2.scope
"""


def test_registrations_properties_and_state_files_as_262(real262: Sandbox, ours262: Sandbox) -> None:
    out = _same(real262, ours262, REGISTRATIONS)
    for expected in ('NETIF=" 7 8"', 'SSH_PRIVATE_KEY_PATH="/k\\"e\\$y"', "VSOCK_CID=77", "SUPERVISOR=N",
                     'ss "vsock%77" "/k\\"e$y"', "VSockCID=99"):  # fmt: skip
        assert expected in out, out


def _call(member: str, signature: str, *body: object) -> list[object]:
    return [M, I, member, signature, list(body)]


def _ex(name: str, *props: tuple[str, str, object]) -> list[object]:
    return _call("RegisterMachineEx", "sa(sv)", name, [[k, {"v": [s, v]}] for k, s, v in props])


PIDFD_P = {"pidfd": {"pid": "$P"}}
BAD_INPUTS = [
    _ex("b1", ("Class", "s", "host"), ("Bogus", "s", "a")),
    _ex("b1", ("Class", "s", "host")),
    _ex("b1", ("Id", "ay", {"bytes": [1, 2, 3]}), ("Bogus", "s", "a")),
    _ex("b_1", ("Bogus", "s", "a")),
    _ex("b1", ("Class", "u", 3)),
    _ex("b1", ("LeaderPIDFDID", "s", "3")),
    _ex("b1", ("VSockCID", "u", 2), ("Bogus", "s", "a")),
    _ex("b1", ("VSockCID", "u", 4294967295)),
    _ex("b1", ("VSockCID", "u", 0)),
    _ex("b1", ("RootDirectory", "s", "rel"), ("Bogus", "s", "a")),
    _ex("b1", ("RootDirectory", "s", "rel")),
    _ex("b1", ("NetworkInterfaces", "ai", [1, 0]), ("Bogus", "s", "a")),
    _ex("b1", ("ControlAddress", "s", "x")),
    _ex("b1", ("Subgroup", "s", "x")),
    _ex("b1", ("LeaderPID", "u", {"pid": "$P"})),
    _ex("b1", ("LeaderPIDFDID", "t", 5)),
    _ex("b1", ("LeaderPID", "u", 0), ("LeaderPIDFDID", "t", 5)),
    _ex("b1", ("LeaderPID", "u", 1), ("LeaderPIDFDID", "t", {"pidfdid": 1})),
    _ex("b1", ("LeaderPID", "u", 999999), ("LeaderPIDFDID", "t", 5)),
    _ex("b1", ("LeaderPID", "u", {"pid": "$P"}), ("LeaderPIDFDID", "t", 5)),
    _ex("b1", ("LeaderPIDFD", "h", {"pidfd": 1})),
    _ex("b1", ("LeaderPIDFD", "h", PIDFD_P), ("LeaderPID", "u", {"pid": "$Q"})),
    _ex("b1", ("LeaderPIDFD", "h", PIDFD_P), ("LeaderPIDFDID", "t", 5)),
    _ex("b1", ("LeaderPIDFD", "h", PIDFD_P), ("Class", "s", "")),
    _ex("b1", ("LeaderPIDFD", "h", PIDFD_P), ("Class", "s", "host")),
    _ex("b1", ("LeaderPIDFD", "h", PIDFD_P), ("Class", "s", "vm"), ("RootDirectory", "s", "rel")),
    _ex(
        "b1", ("Class", "s", "vm"), ("RootDirectory", "s", "rel"), ("LeaderPID", "u", 999999), ("LeaderPIDFDID", "t", 5)
    ),
    _ex("b1", ("Class", "s", "nope"), ("LeaderPID", "u", 999999), ("LeaderPIDFDID", "t", 5)),
    _ex("b1"),  # the caller as leader: not in a unit of its own here
    _ex("b2", ("LeaderPIDFD", "h", PIDFD_P), ("Class", "s", "vm")),
    _ex("b2", ("LeaderPIDFD", "h", {"pidfd": {"pid": "$Q"}}), ("Class", "s", "vm")),
    _call("CreateMachineEx", "sa(sv)a(sv)", "b4", [["Bogus", {"v": ["s", "x"]}]], []),
    _call("CreateMachineEx", "sa(sv)a(sv)", "b4", [["Class", {"v": ["s", "vm"]}]], [["Bogus", {"v": ["s", "x"]}]]),
    _call("RegisterMachine", "sayssus", "b5", {"bytes": []}, "", "container", 999999, ""),
    _call("RegisterMachine", "sayssus", "b5", {"bytes": []}, "", "host", {"pid": "$Q"}, ""),
    _call("RegisterMachine", "sayssus", "b5", {"bytes": []}, "", "", {"pid": "$Q"}, ""),
    _call("RegisterMachine", "sayssus", "b5", {"bytes": []}, "", "vm", 1, ""),
    _call("RegisterMachine", "sayssus", "b5", {"bytes": []}, "", "vm", {"pid": "$P"}, "rel"),
    _call("CreateMachine", "sayssusa(sv)", "b2", {"bytes": []}, "", "vm", {"pid": "$Q"}, "", []),
    _call("CreateMachineWithNetwork", "sayssusaia(sv)", "b6", {"bytes": []}, "", "vm", {"pid": "$R"}, "", [0], []),
    _call(
        "CreateMachine",
        "sayssusa(sv)",
        "b6",
        {"bytes": []},
        "",
        "vm",
        {"pid": "$R"},
        "",
        [["Bogus", {"v": ["s", "x"]}]],
    ),
    _call("GetMachineSSHInfo", "s", "b2"),
    _call("GetMachineSSHInfo", "s", "b_2"),
]

BAD_SCRIPT = r"""
systemd-run -q --unit=bd-l1 sleep 2990; systemd-run -q --unit=bd-l2 sleep 2991
sleep 2992 >/dev/null 2>&1 & export R=$!
export P=$(systemctl show -P MainPID bd-l1) Q=$(systemctl show -P MainPID bd-l2)
$PY $CALLS
# b4's leader was the caller, gone now: its scope empties and the machine goes
for i in $(seq 100); do machinectl show b4 -p Name >/dev/null 2>&1 || break; sleep 0.05; done
machinectl list --no-legend | sort
systemctl show -P Description machine-b6.scope
"""


def test_bad_inputs_as_262(real262: Sandbox, ours262: Sandbox) -> None:
    """Left out: a second machine with the leader of another (FileExists), after which 262
    terminates the first machine and sends SIGTERM to the caller (it stops the failed machine
    through its supervisor); machined answers FileExists and leaves both alone."""
    real, ours = (_script(sb, BAD_SCRIPT, BAD_INPUTS) for sb in (real262, ours262))
    assert real.count("ERROR") > 30, real
    if ours != real:
        diff = "".join(difflib.unified_diff(real.splitlines(True), ours.splitlines(True), "real", "ours"))
        pytest.fail(f"outputs differ:\n{diff}")


UNPRIVILEGED = r"""
systemd-run -q --unit=up-l1 sleep 2990; P=$(systemctl show -P MainPID up-l1)
busctl call org.freedesktop.machine1 $M $I RegisterMachine sayssus up1 0 '' container $P ''
N="setpriv --reuid=65534 --regid=65534 --clear-groups"
D="dbus-send --system --print-reply --dest=org.freedesktop.machine1"
$N $D $M $I.TerminateMachine string:up1
$N $D $M $I.KillMachine string:up1 string:all int32:0
$N $D $M $I.OpenMachinePTY string:up1
$N $D $M $I.OpenMachineShell string:up1 string: string: array:string: array:string:
$N $D $M $I.GetMachineSSHInfo string:up1
$N $D $M/machine/up1 org.freedesktop.machine1.Machine.Terminate
$N busctl call org.freedesktop.machine1 $M $I TerminateMachine s up1
$N busctl --allow-interactive-authorization=no call org.freedesktop.machine1 $M $I TerminateMachine s up1
machinectl list --no-legend
"""


def test_unprivileged_callers_as_262(real262: Sandbox, ours262: Sandbox) -> None:
    """polkit's answer without an agent (interactive authentication required) in 262's words.

    CreateMachine*/RegisterMachine* are left out: 262 asks polkit about create-machine and
    register-machine, actions the polkit policy machined ships (252's) does not define."""
    out = _same(real262, ours262, UNPRIVILEGED)
    assert "However, interactive authentication has not been enabled by the calling program." in out, out


RESTART = r"""
B="busctl call org.freedesktop.machine1 $M $I"
for n in 1 2 3; do systemd-run -q --unit=rs-l$n sleep 298$n; done
sleep 2984 >/dev/null 2>&1 & C1=$!
export P1=$(systemctl show -P MainPID rs-l1) P2=$(systemctl show -P MainPID rs-l2) P3=$(systemctl show -P MainPID rs-l3)
$B RegisterMachine sayssus s1 0 'my svc' container $P1 /
$B CreateMachine 'sayssusa(sv)' s2 0 '' vm $C1 '' 0
$PY $CALLS <<'EOF'
[["/org/freedesktop/machine1","org.freedesktop.machine1.Manager","RegisterMachineEx","sa(sv)",["s3",[
   ["Class",{"v":["s","vm"]}],["LeaderPIDFD",{"v":["h",{"pidfd":{"pid":"$P2"}}]}],["NetworkInterfaces",{"v":["ai",[5]]}],
   ["SSHAddress",{"v":["s","a b"]}],["SSHPrivateKeyPath",{"v":["s","/k"]}]]]],
 ["/org/freedesktop/machine1","org.freedesktop.machine1.Manager","RegisterMachineEx","sa(sv)",["s4",[
   ["Class",{"v":["s","container"]}],["LeaderPIDFD",{"v":["h",{"pidfd":{"pid":"$P3"}}]}],["VSockCID",{"v":["u",12345]}]]]]
]
EOF
systemctl show machine-s2.scope -p Slice,Description,Delegate,TasksMax,CollectMode,User
for round in before after; do
  echo "##### $round restart"
  for m in s1 s2 s3 s4; do echo "== $m"; machinectl show $m; cat /run/systemd/machines/$m; done
  busctl call org.freedesktop.machine1 $M $I GetMachineSSHInfo s s3
  [ $round = before ] || break
  U=$(systemctl show -P Id dbus-org.freedesktop.machine1.service)
  systemctl restart $U
  busctl call org.freedesktop.machine1 $M org.freedesktop.DBus.Peer Ping
done
"""


def test_state_survives_a_restart_as_262(real262: Sandbox, ours262: Sandbox) -> None:
    """What 262 reads back from its state files after a restart (an Ex registration without
    VSockCID writes none and reads back VMADDR_CID_ANY)."""
    out = _same(real262, ours262, RESTART)
    assert out.count("== s4") == 2 and "VSOCK_CID=12345" in out, out

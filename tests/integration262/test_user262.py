"""The per-user instance (262's ``systemd-machined --user``): ours against real 262's, both
started by a test user's service manager in a 262 sandbox (socket-activated on
``$XDG_RUNTIME_DIR/systemd/machine/io.systemd.Machine``, bus-activated on the user's bus),
driven by that user with 262's own clients (varlinkctl, busctl --user, machinectl --user,
systemctl --user).

What 262 does there, and these tests compare: no ``.host`` machine or image; the pool in
``~/.local/state/machines``; varlink Register takes the system's unit of the leader (the user's
``user@UID.service``) with the cgroup below as the machine's subgroup, which Terminate refuses
(ESRCH) and which goes when its leader exits; D-Bus RegisterMachine takes the unit of the
user's manager; allocateUnit makes a scope in the user's ``machine.slice``; state files in
``$XDG_RUNTIME_DIR/systemd/machines``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator

import pytest

from machined.sandbox import Sandbox

pytestmark = pytest.mark.timeout(600)

UID = 1500
USER = "mtuser"
RUN = f"/run/user/{UID}"


def _setup(sb: Sandbox) -> None:
    """A user with a running service manager (and its bus: the sandbox's user dbus units)."""
    # The host's interpreter (ours) lives below /root: let the user reach it (overlay only).
    sb.run(["chmod", "0711", "/root"])
    sb.run(["useradd", "-m", "-u", str(UID), USER])
    sb.run(["systemctl", "start", f"user@{UID}.service"])


@pytest.fixture(scope="module")
def users(ours262: Sandbox, real262: Sandbox) -> Iterator[tuple[Sandbox, Sandbox]]:
    for sb in (ours262, real262):
        _setup(sb)
    yield ours262, real262


PRELUDE = r"""
V=$XDG_RUNTIME_DIR/systemd/machine/io.systemd.Machine
MP=/org/freedesktop/machine1
vl() { varlinkctl --json=short call "$@" 2>&1; echo "rc=$?"; }
vlm() { varlinkctl --json=short call --more "$@" 2>&1 | sort; }
bc() { busctl --user call org.freedesktop.machine1 $MP org.freedesktop.machine1.Manager "$@" 2>&1; echo "rc=$?"; }
lead() { systemd-run --user -q --unit="$1" sleep 1000; systemctl --user show -P MainPID "$1"; }
gone() { for i in $(seq 150); do machinectl --user list | grep -q "^$1 " || return 0; sleep 0.1; done; echo "still there: $1"; }
"""


def _run_as_user(sb: Sandbox, script: str) -> str:
    env = [f"XDG_RUNTIME_DIR={RUN}", f"DBUS_SESSION_BUS_ADDRESS=unix:path={RUN}/bus", "SYSTEMD_COLORS=0"]
    r = sb.run(["runuser", "-u", USER, "--", "env", *env, "sh", "-c", PRELUDE + script], check=False, timeout=180)
    return r.stdout + r.stderr


def _mask(text: str) -> str:
    text = re.sub(r'"(pidfdId|realtime|monotonic)":\d+', r'"\1":N', text)
    text = re.sub(r'"bootId":"[0-9a-f]{32}"', '"bootId":"<id>"', text)
    return re.sub(r'"pid":\d+', '"pid":P', text)


def assert_same_as_user(ours: Sandbox, real: Sandbox, script: str) -> str:
    expected, got = _mask(_run_as_user(real, script)), _mask(_run_as_user(ours, script))
    if got != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), got.splitlines(True), "real", "ours"))
        pytest.fail(f"outputs differ:\n{diff}")
    return got


def test_user_instance_without_machines(users: tuple[Sandbox, Sandbox]) -> None:
    out = assert_same_as_user(
        *users,
        r"""
stat -c '%F %a %U' $V
readlink $XDG_RUNTIME_DIR/systemd/machine/io.systemd.MachineImage $XDG_RUNTIME_DIR/varlink/registry/io.systemd.Machine \
  $XDG_RUNTIME_DIR/varlink/registry/io.systemd.MachineImage
ls $XDG_RUNTIME_DIR/systemd $XDG_RUNTIME_DIR/varlink/registry
varlinkctl list-interfaces $V
varlinkctl list-methods $V io.systemd.Machine io.systemd.MachineImage
vl --more $V io.systemd.Machine.List '{}'
vl $V io.systemd.Machine.List '{"name":".host"}'
vl $V io.systemd.Machine.List '{"pid":{"pid":0}}'
vl --more $V io.systemd.MachineImage.List '{}'
vl $V io.systemd.MachineImage.List '{"name":".host"}'
vl $V io.systemd.service.Ping '{}'
bc ListMachines
bc GetMachine s .host
bc GetMachineByPID u 1
bc ListImages
bc GetImage s .host
busctl --user get-property org.freedesktop.machine1 $MP org.freedesktop.machine1.Manager PoolPath PoolUsage PoolLimit
machinectl --user list
machinectl --user list-images
busctl --user tree org.freedesktop.machine1
busctl --user introspect org.freedesktop.machine1 $MP
busctl --user get-property org.freedesktop.machine1 /org/freedesktop/LogControl1 org.freedesktop.LogControl1 LogLevel LogTarget
test -d $XDG_RUNTIME_DIR/systemd/machines && ls -A $XDG_RUNTIME_DIR/systemd/machines
""",
    )
    assert "socket 600 mtuser" in out
    assert f's "/home/{USER}/.local/state/machines"' in out
    assert "No machine '.host' known" in out


def test_user_instance_registers_in_the_users_manager(users: tuple[Sandbox, Sandbox]) -> None:
    out = assert_same_as_user(
        *users,
        r"""
P1=$(lead um1-l); P2=$(lead um2-l); P3=$(lead um3-l)
echo "== varlink Register: the leader's system unit, and the cgroup below it"
vl $V io.systemd.Machine.Register "{\"name\":\"um1\",\"class\":\"container\",\"leader\":$P1}"
vl $V io.systemd.Machine.Register "{\"name\":\"um1\",\"class\":\"container\",\"leader\":$P1}"
echo "== varlink Register with allocateUnit: a scope of the user's manager"
vl $V io.systemd.Machine.Register "{\"name\":\"um2\",\"class\":\"vm\",\"leader\":$P2,\"allocateUnit\":true}"
echo "== D-Bus RegisterMachine: the leader's unit in the user's manager"
bc RegisterMachine sayssus um3 0 svc container $P3 ""
vlm $V io.systemd.Machine.List '{}'
vl $V io.systemd.Machine.List '{"name":"um1"}'
machinectl --user list
for m in um1 um2 um3; do machinectl --user show $m -p Name -p Class -p Service -p Unit -p Subgroup -p State -p UID; done
ls $XDG_RUNTIME_DIR/systemd/machines
systemctl --user show machine-um2.scope -p Slice,Description,Delegate,CollectMode,ActiveState
echo "== Kill (SIGWINCH): the leader of a machine in a subgroup, not its unit"
vl $V io.systemd.Machine.Kill '{"name":"um1","signal":28,"whom":"all"}'
bc KillMachine ssi um1 all 28
bc KillMachine ssi um1 leader 28
vl $V io.systemd.Machine.Kill '{"name":"um2","signal":28}'
echo "== Terminate"
vl $V io.systemd.Machine.Terminate '{"name":"um1"}'
bc TerminateMachine s um1
vl $V io.systemd.Machine.Terminate '{"name":"um2"}'
gone um2
bc TerminateMachine s um3
gone um3
systemctl --user is-active machine-um2.scope um3-l um1-l
machinectl --user list
ls $XDG_RUNTIME_DIR/systemd/machines
echo "== a machine in a subgroup goes with its leader"
systemctl --user stop um1-l
gone um1
machinectl --user list
ls -A $XDG_RUNTIME_DIR/systemd/machines
""",
    )
    assert '"unit":"user@1500.service","subgroup":"app.slice/um1-l.service"' in out
    assert "Unit=machine-um2.scope" in out and "Unit=um3-l.service" in out and "Subgroup=app.slice/um1-l.service" in out
    assert "UID=1500" in out and "Slice=machine.slice" in out
    assert "still there" not in out


def test_root_reaches_a_users_instance(users: tuple[Sandbox, Sandbox]) -> None:
    """Root may use a user's instance (the socket's mode keeps other users out): it registers
    the user's processes without polkit, and the machine is root's."""
    ours, real = users
    env = f"XDG_RUNTIME_DIR={RUN} DBUS_SESSION_BUS_ADDRESS=unix:path={RUN}/bus"
    script = PRELUDE.replace("$XDG_RUNTIME_DIR", RUN) + (
        f'asuser() {{ runuser -u {USER} -- env {env} "$@"; }}\n'
        + r"""
asuser systemd-run --user -q --unit=rootl sleep 1000
P=$(asuser systemctl --user show -P MainPID rootl)
vl $V io.systemd.Machine.Register "{\"name\":\"rm1\",\"class\":\"container\",\"leader\":$P}"
vl $V io.systemd.Machine.List '{"name":"rm1"}'
vl $V io.systemd.Machine.Register '{"name":"rm2","class":"container","leader":1}'
vl $V io.systemd.Machine.Unregister '{"name":"rm1"}'
for i in $(seq 50); do varlinkctl call $V io.systemd.Machine.List '{"name":"rm1"}' >/dev/null 2>&1 || break; sleep 0.1; done
vl $V io.systemd.Machine.List '{"name":"rm1"}'
asuser systemctl --user stop rootl
"""
    )
    outputs = [_mask((r := sb.run(["sh", "-c", script], check=False)).stdout + r.stderr) for sb in (real, ours)]
    if outputs[1] != outputs[0]:
        diff = "".join(difflib.unified_diff(outputs[0].splitlines(True), outputs[1].splitlines(True), "real", "ours"))
        pytest.fail(f"outputs differ:\n{diff}")
    assert '"name":"rm1"' in outputs[0] and '"UID":0' in outputs[0]


def test_other_users_are_not_refused_when_they_reach_it(users: tuple[Sandbox, Sandbox]) -> None:
    """262's user instance asks polkit nothing and refuses nobody: only the modes of the user's
    runtime directory and socket keep other users out. Opened up, another user is served."""
    ours, real = users
    other = "mtother"
    script = (
        f"V={RUN}/systemd/machine/io.systemd.Machine\n"
        f"id {other} >/dev/null 2>&1 || useradd -m -u {UID + 1} {other}\n"
        f"chmod 0711 {RUN}; chmod 0666 $V\n"
        + r"""
vl() { varlinkctl --json=short call "$@" 2>&1; echo "rc=$?"; }
runuser -u OTHER -- sh -c '
vl() { varlinkctl --json=short call "$@" 2>&1; echo "rc=$?"; }
vl --more '$V' io.systemd.Machine.List "{}"
sleep 100 & P=$!
vl '$V' io.systemd.Machine.Register "{\"name\":\"o1\",\"class\":\"container\",\"leader\":$P}"
vl '$V' io.systemd.Machine.Register "{\"name\":\"o2\",\"class\":\"container\",\"leader\":1}"
vl '$V' io.systemd.Machine.Kill "{\"name\":\"o1\",\"signal\":9}"
vl '$V' io.systemd.MachineImage.List "{\"name\":\"o1\"}"
kill $P'
"""
        + f"chmod 0700 {RUN}; chmod 0600 $V\n"
    ).replace("OTHER", other)
    outputs = [_mask((r := sb.run(["sh", "-c", script], check=False)).stdout + r.stderr) for sb in (real, ours)]
    if outputs[1] != outputs[0]:
        diff = "".join(difflib.unified_diff(outputs[0].splitlines(True), outputs[1].splitlines(True), "real", "ours"))
        pytest.fail(f"outputs differ:\n{diff}")


def test_user_instance_restarts_with_its_machines(users: tuple[Sandbox, Sandbox]) -> None:
    """State files in the user's runtime directory bring the machines back after a restart. 262
    writes no SUBGROUP: a machine in a subgroup comes back as its unit's (user@UID.service, which
    the user's manager does not know), kept as long as its leader runs, and then still kept
    (nothing tells 262 that it went)."""
    assert_same_as_user(
        *users,
        r"""
P1=$(lead rs1-l); P2=$(lead rs2-l)
vl $V io.systemd.Machine.Register "{\"name\":\"rs1\",\"class\":\"container\",\"leader\":$P1}"
vl $V io.systemd.Machine.Register "{\"name\":\"rs2\",\"class\":\"vm\",\"leader\":$P2,\"allocateUnit\":true}"
SVC=$(systemctl --user show -P Id dbus-org.freedesktop.machine1.service)
systemctl --user restart $SVC
sleep 1
vlm $V io.systemd.Machine.List '{}'
machinectl --user list
ls $XDG_RUNTIME_DIR/systemd/machines
vl $V io.systemd.Machine.Terminate '{"name":"rs2"}'
gone rs2
systemctl --user stop rs1-l rs2-l
gone rs1
machinectl --user list
""",
    )


def test_user_images(users: tuple[Sandbox, Sandbox]) -> None:
    """Images of the user's directories (the pool ~/.local/state/machines first), no .host."""
    assert_same_as_user(
        *users,
        r"""
mkdir -p ~/.local/state/machines/img1/etc ~/.local/lib/machines/vend1 $XDG_RUNTIME_DIR/machines
echo 'ID=test' > ~/.local/state/machines/img1/etc/os-release
echo x > ~/.local/state/machines/raw1.raw
machinectl --user list-images | sed 's/  *[A-Z][a-z][a-z] [0-9-]* [0-9:]* [A-Z]*//g'
vlm $V io.systemd.MachineImage.List '{}' | sed -E 's/"(creationTimestamp|modificationTimestamp)":[0-9]+/"\1":N/g'
bc GetImage s img1
bc GetImage s vend1
machinectl --user clone img1 img2; echo rc=$?
machinectl --user rename img2 img3; echo rc=$?
machinectl --user read-only img3; echo rc=$?
machinectl --user remove img3; echo rc=$?
machinectl --user read-only img3 no; echo rc=$?
machinectl --user remove img3; echo rc=$?
machinectl --user remove vend1; echo rc=$?
machinectl --user clean; echo rc=$?
ls -A ~/.local/state/machines ~/.local/lib/machines
rm -rf ~/.local/state/machines ~/.local/lib/machines
""",
    )


def test_user_create_machine_over_dbus(users: tuple[Sandbox, Sandbox]) -> None:
    """CreateMachine on the user's bus: a scope of the user's manager, in its machine.slice."""
    out = assert_same_as_user(
        *users,
        r"""
P=$(lead cm1-l)
bc CreateMachine sayssusa\(sv\) cm1 0 svc container $P "" 1 Description s "my cm1"
machinectl --user show cm1 -p Name -p Class -p Service -p Unit -p Subgroup -p State -p UID
systemctl --user show machine-cm1.scope -p Slice -p Description -p Delegate -p ActiveState
bc GetMachineByPID u $P
bc TerminateMachine s cm1
gone cm1
systemctl --user is-active machine-cm1.scope
machinectl --user list
""",
    )
    assert "Unit=machine-cm1.scope" in out and "Slice=machine.slice" in out and "Description=my cm1" in out

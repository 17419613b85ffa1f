"""The unit of a process comes from the cgroup line systemd itself tracks it in (issue 9).

Runs on both layouts (``make test`` runs the suite with MACHINED_TEST_CGROUP=hybrid and
=unified). On both, /proc/PID/cgroup lists a ``name=systemd`` line, because the host
has that hierarchy:

* hybrid: systemd tracks in cgroup2 (the ``0::`` line) and updates the name=systemd
  copy afterwards, so right after a move that line can still name the previous unit;
* unified: nothing moves processes in name=systemd, its line says ``/`` for good.

Each scenario runs against systemd-machined 252 too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from machined.sandbox import Sandbox
from machined.sandbox.core import cgroup_layout
from tests.integration.test_lifecycle import assert_same

# Run inside the sandbox, in a scope of its own (the caller's scope): N times, fork a
# leader and a helper (both in the caller's scope), ask systemd to move them into a
# fresh scope, wait only until systemd tracks the leader there (its cgroup2 line), then
# register the leader at once and look at what the registry recorded; terminate it.
RACE = r"""
import asyncio, json, os, subprocess, sys, time
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

N, TAG = int(sys.argv[1]), sys.argv[2]
M, MP, MI = "org.freedesktop.machine1", "/org/freedesktop/machine1", "org.freedesktop.machine1.Manager"
S, SP, SI = "org.freedesktop.systemd1", "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager"
PROPS = "org.freedesktop.DBus.Properties"


def cgroup_lines(pid):
    lines = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            hier, ctrl, path = line.rstrip("\n").split(":", 2)
            lines["0::" if hier == "0" else ctrl] = path
    return lines


def moved(pid, scope):
    # wait until systemd tracks pid in scope: its cgroup2 line (hierarchy 0)
    deadline = time.monotonic() + 10
    while not cgroup_lines(pid)["0::"].endswith("/" + scope):
        assert time.monotonic() < deadline, f"systemd never moved {pid} into {scope}"


async def main():
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()

    async def call(dest, path, iface, member, sig="", body=()):
        msg = Message(destination=dest, path=path, interface=iface, member=member, signature=sig, body=list(body))
        try:
            reply = await asyncio.wait_for(bus.call(msg), 30)
        except asyncio.TimeoutError:
            raise RuntimeError(f"{member}{tuple(body)} got no reply within 30 s") from None
        if reply.message_type == MessageType.ERROR:
            raise RuntimeError(f"{member}: {reply.error_name}: {reply.body}")
        return reply.body

    async def unit_id(path):
        return (await call(S, path, PROPS, "Get", "ss", ["org.freedesktop.systemd1.Unit", "Id"]))[0].value

    caller = await unit_id((await call(S, SP, SI, "GetUnitByPID", "u", [os.getpid()]))[0])
    rows, error, procs, wrong, keep = [], None, [], [], []
    try:
        for i in range(N):
            name = f"{TAG}{i}"
            scope = f"{name}-l.scope"
            quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            leader = subprocess.Popen(["sleep", "999996"], **quiet)
            helper = subprocess.Popen(["sleep", "999995"], **quiet)
            procs = [leader, helper]
            await call(S, SP, SI, "StartTransientUnit", "ssa(sv)a(sa(sv))",
                       [scope, "fail", [["PIDs", Variant("au", [leader.pid, helper.pid])]], []])
            moved(leader.pid, scope)
            stale = scope not in cgroup_lines(leader.pid).get("name=systemd", "")
            path = (await call(M, MP, MI, "RegisterMachine", "sayssus",
                               [name, b"", "layout-test", "container", leader.pid, ""]))[0]
            unit = (await call(M, path, PROPS, "Get", "ss", ["org.freedesktop.machine1.Machine", "Unit"]))[0].value
            moved(helper.pid, scope)  # moved after the leader
            try:
                by_pid = (await call(M, MP, MI, "GetMachineByPID", "u", [helper.pid]))[0] == path
            except RuntimeError as e:
                by_pid = str(e)
            systemd_says = await unit_id((await call(S, SP, SI, "GetUnitByPID", "u", [leader.pid]))[0])
            row = {"scope": scope, "unit": unit, "systemd": systemd_says, "stale": stale, "by_pid": by_pid}
            rows.append(row)
            if unit != scope:
                wrong.append(name)  # terminated last: it may take this process with it
                keep += procs
                procs = []
                continue
            await call(M, MP, MI, "TerminateMachine", "s", [name])
            row["codes"] = [leader.wait(timeout=30), helper.wait(timeout=30)]
            procs = []
    except Exception as e:
        error = f"iteration {len(rows)}: {type(e).__name__}: {e}"
    for p in procs:
        p.kill()
        p.wait()
    print(json.dumps({"caller": caller, "rows": rows, "error": error}), flush=True)
    for name in wrong:
        try:
            await call(M, MP, MI, "TerminateMachine", "s", [name])
        except RuntimeError as e:
            print(e, flush=True)
    print("caller survived", flush=True)
    for p in keep:
        p.kill()
        p.wait()


asyncio.run(main())
"""

ITERATIONS = 150


def race(sb: Sandbox, tag: str) -> dict:
    args = ["systemd-run", "--quiet", "--scope", f"--unit={tag}caller", "--",
            sys.executable, "-c", RACE, str(ITERATIONS), tag]  # fmt: skip
    r = sb.run(args, check=False, timeout=200)
    lines = r.stdout.splitlines()
    results = [line for line in lines if line.startswith("{")]
    if not results:
        pytest.fail(
            f"the caller failed in {sb.info.impl} (status {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-4000:]}"
        )
    res = json.loads(results[0])
    res["survived"] = lines[-1:] == ["caller survived"]
    return res


def test_sandbox_layout_is_the_requested_one(ours: Sandbox, real: Sandbox, layout: str) -> None:
    """What systemd decides from (the file system at /sys/fs/cgroup), and the name=systemd
    line that is listed in /proc/PID/cgroup either way."""
    fs = {"hybrid": "tmpfs", "unified": "cgroup2fs"}[layout]
    host_layout = cgroup_layout()
    for sb in (ours, real):
        assert sb.cgroup == layout
        out = sb.run(["sh", "-c", "stat -f -c %T /sys/fs/cgroup; cat /proc/1/cgroup"]).stdout
        assert out.splitlines()[0] == fs
        assert "0::/init.scope" in out.splitlines()
        # listed either way on a hybrid host; only systemd on hybrid moves processes there
        if host_layout == "hybrid":
            expect = {"hybrid": ":name=systemd:/init.scope", "unified": ":name=systemd:/"}[layout]
            assert any(line.endswith(expect) for line in out.splitlines()), out
        if layout == "hybrid":
            assert sb.run(["stat", "-f", "-c", "%T", "/sys/fs/cgroup/unified"]).stdout.strip() == "cgroup2fs"


def test_register_right_after_the_move_records_the_new_scope(ours: Sandbox, real: Sandbox, layout: str) -> None:
    """RegisterMachine as soon as systemd tracks the leader in its new scope: the machine's
    unit is that scope every time (never the caller's), GetMachineByPID of another process
    of the scope finds it, and TerminateMachine stops only the machine, never the caller."""
    results = {"real": race(real, "rr"), "ours": race(ours, "ro")}
    for impl, res in results.items():
        rows = res["rows"]
        assert res["error"] is None, f"{impl}: {res['error']}"
        assert len(rows) == ITERATIONS, impl
        assert res["caller"].endswith("caller.scope")
        # systemd moved each leader: its own view (GetUnitByPID) is the new scope
        assert [r["systemd"] for r in rows] == [r["scope"] for r in rows], impl
        wrong = [(r["scope"], r["unit"]) for r in rows if r["unit"] != r["scope"]]
        fate = "survived" if res["survived"] else "was killed by TerminateMachine of such a machine"
        assert not wrong and res["survived"], (
            f"{impl}: {len(wrong)} of {ITERATIONS} machines got another unit: {wrong[:5]}; the caller {fate}"
        )
        missed = [r["by_pid"] for r in rows if r["by_pid"] is not True]
        assert not missed, f"{impl}: GetMachineByPID of another process of the scope: {missed[:3]}"
        # TerminateMachine ended leader and helper (SIGTERM from the scope), not the caller
        assert all(r["codes"] == [-15, -15] for r in rows), impl
        if layout == "unified":
            assert all(r["stale"] for r in rows), f"{impl}: name=systemd should never follow the moves"
    # On hybrid, make sure the race was there: a stale name=systemd line right before
    # some of the calls (median staleness is tens of µs, 5 ms at worst, here).
    if layout == "hybrid":
        assert sum(r["stale"] for res in results.values() for r in res["rows"]) > 0
    for sb in (ours, real):
        listed = sb.run(["machinectl", "list", "--no-legend"]).stdout.splitlines()
        assert not [line for line in listed if line.split()[0].startswith(("rr", "ro"))], listed


def test_nspawn_keep_unit_and_machinectl_start_register(ours: Sandbox, real: Sandbox, layout: str) -> None:
    """systemd-nspawn --keep-unit and `machinectl start` (systemd-nspawn@.service) register
    their own unit; GetMachineByPID finds the machine from nspawn's supervisor process."""
    out = assert_same(
        ours,
        real,
        r"""
systemd-run --quiet --unit=lk-ns systemd-nspawn -q --keep-unit -D / --volatile=yes -M lk-ns /bin/sleep 999994
until_listed lk-ns
L=$(machinectl show lk-ns -p Leader --value); pid L $L; until_comm $L sleep
N=$(systemctl show -p MainPID --value lk-ns.service); pid N $N
machinectl show lk-ns -p Unit -p Class -p Service
call GetMachineByPID $L
call GetMachineByPID $N
grep -E '^0::' /proc/$N/cgroup
ps -o pid,machine,cmd -p $N
machinectl terminate lk-ns; gone lk-ns
systemctl is-active lk-ns.service

d=/var/lib/machines/lk-start
mkdir -p $d/usr $d/etc $d/proc $d/sys $d/dev $d/run $d/tmp $d/var /run/systemd/nspawn
cp /etc/os-release $d/etc/os-release
for l in bin sbin lib lib64; do ln -s usr/$l $d/$l; done
printf '[Exec]\nBoot=no\nParameters=/usr/bin/sleep 999993\nPrivateUsers=no\n[Files]\nBindReadOnly=/usr\n[Network]\nVirtualEthernet=no\n' > /run/systemd/nspawn/lk-start.nspawn
machinectl start lk-start; echo "start $?"
until_listed lk-start
S=$(machinectl show lk-start -p Leader --value); pid S $S; until_comm $S sleep
machinectl show lk-start -p Unit -p Class -p Service
call GetMachineByPID $(systemctl show -p MainPID --value systemd-nspawn@lk-start.service)
machinectl list --no-legend
machinectl terminate lk-start; gone lk-start
rm -rf $d /run/systemd/nspawn/lk-start.nspawn
""",
        timeout=180,
    )
    assert "Unit=lk-ns.service" in out
    assert out.count("(objectpath '/org/freedesktop/machine1/machine/lk_2dns',)") == 2
    assert "start 0" in out and "Unit=systemd-nspawn@lk-start.service" in out
    assert "(objectpath '/org/freedesktop/machine1/machine/lk_2dstart',)" in out
    assert "never registered" not in out


@pytest.mark.parametrize("choice", ["hybrid", "unified"])
def test_cli_cgroup_choice_and_complete_teardown(choice: str) -> None:
    """`machined-sandbox start --cgroup X` boots systemd on that layout; stop removes every
    cgroup directory the sandbox and its systemd made, on the host, in both hierarchies."""
    if choice == "hybrid" and cgroup_layout() != "hybrid":
        pytest.skip("a hybrid sandbox needs a hybrid host")
    cli = [sys.executable, "-m", "machined.sandbox.cli"]
    sid = subprocess.run([*cli, "start", "--impl", "real", "--cgroup", choice],
                         capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    try:
        info = Sandbox.attach(sid).info
        listing = subprocess.run([*cli, "list"], capture_output=True, text=True, check=True).stdout
        assert any(line.split()[:3] == [sid, "real", choice] for line in listing.splitlines()), listing
        probe = (
            "stat -f -c %T /sys/fs/cgroup; systemctl is-system-running; "
            "systemd-run --quiet --unit=cli-probe sleep 999992; systemctl show -p ControlGroup --value cli-probe"
        )
        out = subprocess.run([*cli, "exec", sid, "--", "sh", "-c", probe], capture_output=True, text=True, check=False)
        fs = {"hybrid": "tmpfs", "unified": "cgroup2fs"}[choice]
        assert out.stdout.split() == [fs, "running", "/system.slice/cli-probe.service"], out.stdout + out.stderr
        # the unit's cgroup exists on the host, below the sandbox's own cgroup
        made = [Path(cg) / "system.slice" / "cli-probe.service" for cg in info.cgroups]
        assert any(p.is_dir() for p in made)
    finally:
        subprocess.run([*cli, "stop", sid], capture_output=True, text=True, check=False)
    assert info.cgroups and not any(Path(cg).exists() for cg in info.cgroups)

"""Authorization and hardening: who may do what (as strict as systemd-machined 252),
hostile input, PID reuse, and faults — nothing lost, nobody let in.
"""

from __future__ import annotations

import re
import sys

from machined.sandbox import Sandbox
from tests.integration.differential import normalize, run
from tests.integration.test_lifecycle import assert_same

# Every Manager and Machine method, with plausible arguments, called as user nobody.
MANAGER_CALLS = [
    "GetMachine au1", "GetImage .host", "GetMachineByPID 1", "ListImages",
    "CreateMachine x1 '[]' '' vm 0 '' '@a(sv) []'",
    "CreateMachineWithNetwork x1 '[]' '' vm 0 '' '@ai []' '@a(sv) []'",
    "RegisterMachine x1 '[]' '' vm 0 ''", "RegisterMachineWithNetwork x1 '[]' '' vm 0 '' '@ai []'",
    "UnregisterMachine au1", "TerminateMachine au1", "KillMachine au1 all 18", "KillMachine au1 bogus 18",
    "GetMachineAddresses auc", "GetMachineOSRelease auc", "GetMachineUIDShift auc",
    "OpenMachinePTY auc", "OpenMachineLogin auc", "OpenMachineShell auc '' '' '@as []' '@as []'",
    "BindMountMachine auc /tmp /mnt false false", "CopyFromMachine auc /etc/hostname /tmp/h",
    "CopyToMachine auc /etc/hostname /tmp/h", "CopyFromMachineWithFlags auc /etc/hostname /tmp/h 0",
    "CopyToMachineWithFlags auc /etc/hostname /tmp/h 0", "OpenMachineRootDirectory auc",
    "OpenMachineLogin .host", "OpenMachineShell .host '' '' '@as []' '@as []'", "OpenMachinePTY .host",
    "RemoveImage nope", "RenameImage nope nope2", "CloneImage nope nope2 false", "MarkImageReadOnly nope true",
    "GetImageHostname .host", "GetImageMachineID .host", "GetImageMachineInfo .host", "GetImageOSRelease .host",
    "SetPoolLimit 1000000", "SetImageLimit nope 1000000", "CleanPool hidden",
    "MapFromMachineUser auc 5", "MapToMachineUser 70000", "MapFromMachineGroup auc 5", "MapToMachineGroup 70000",
]  # fmt: skip
MACHINE_CALLS = [
    "Terminate", "Kill all 18", "GetAddresses", "GetOSRelease", "GetUIDShift", "OpenPTY", "OpenLogin",
    "OpenShell '' '' '@as []' '@as []'", "BindMount /tmp /mnt false false", "CopyFrom /etc/hostname /tmp/h",
    "CopyTo /etc/hostname /tmp/h", "CopyFromWithFlags /etc/hostname /tmp/h 0",
    "CopyToWithFlags /etc/hostname /tmp/h 0", "OpenRootDirectory",
]  # fmt: skip

AS_NOBODY = "runuser -u nobody -- gdbus call --system --dest $M"


def _mask_bus_denials(text: str) -> str:
    # dbus-daemon names the sender's and destination's PIDs and command lines.
    text = re.sub(r"pid=\d+", "pid=N", text)
    return re.sub(r'comm="[^"]*"', 'comm="C"', text)


def test_unprivileged_callers_get_what_upstream_gives(ours: Sandbox, real: Sandbox) -> None:
    lines = [f'echo "> {c}"; {AS_NOBODY} --object-path $MP --method $MI.{c} 2>&1' for c in MANAGER_CALLS]
    lines += [
        f'echo "> Machine.{c}"; {AS_NOBODY} --object-path $MP/machine/auc '
        f"--method org.freedesktop.machine1.Machine.{c} 2>&1"
        for c in MACHINE_CALLS
    ]
    script = "\n".join([
        "P=$(leader au-l); pid L $P",
        "call CreateMachine au1 '[]' '' vm $P '' '@a(sv) []' >/dev/null",
        "systemd-run --quiet --unit=auc-ns systemd-nspawn -q -D / --volatile=yes -M auc /bin/sleep 999999",
        "until_listed auc",
        *lines,
        "runuser -u nobody -- machinectl list",
        "call TerminateMachine au1; gone au1; machinectl terminate auc; gone auc",
    ])  # fmt: skip
    expected, got = (_mask_bus_denials(normalize(run(sb, script, timeout=300))) for sb in (real, ours))
    assert got == expected
    assert "Interactive authentication required." in got and "Rejected send message" in got


POLKIT_RULE = """
polkit.addRule(function(action, subject) {
    if (action.id == "org.freedesktop.machine1.manage-machines" && subject.user == "nobody")
        return polkit.Result.YES;
});
"""


def test_polkit_grant_path(ours: Sandbox, real: Sandbox) -> None:
    out = assert_same(
        ours,
        real,
        rf"""
P=$(leader pk-l); pid L $P
call CreateMachine pk1 '[]' '' vm $P '' '@a(sv) []' >/dev/null
{AS_NOBODY} --object-path $MP --method $MI.KillMachine pk1 all 18 2>&1
mount -t tmpfs tmpfs /etc/polkit-1/rules.d
cat > /etc/polkit-1/rules.d/50-machined-test.rules <<'RULE'
{POLKIT_RULE}
RULE
systemctl restart polkit
{AS_NOBODY} --object-path $MP --method $MI.KillMachine pk1 all 18 2>&1
{AS_NOBODY} --object-path $MP --method $MI.OpenMachineLogin .host 2>&1
{AS_NOBODY} --object-path $MP --method $MI.OpenMachineShell .host '' '' '@as []' '@as []' 2>&1
{AS_NOBODY} --object-path $MP --method $MI.SetPoolLimit 1000 2>&1
{AS_NOBODY} --object-path $MP --method $MI.TerminateMachine pk1 2>&1
gone pk1
umount /etc/polkit-1/rules.d
systemctl restart polkit
""",
    )
    # granted manage-machines: kill and terminate work; shell (another action) stays refused
    assert out.count("()\n") >= 2 and "Interactive authentication required." in out


FUZZER = r"""
import asyncio, json, os, random, sys, time
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from machined.dbus import internals  # the fuzzer's own big messages need its writer as much as the daemon
internals.install()

random.seed(int(sys.argv[1]))
CALLS = int(sys.argv[2])
M, MP, MI = "org.freedesktop.machine1", "/org/freedesktop/machine1", "org.freedesktop.machine1.Manager"
NAMES = ["fz1", "fz2", ".host", "", "a" * 65, "bad_name", "ü", "x" * 100000, "-a", "a..b", "self", "nope"]

def rname():
    return random.choice(NAMES + ["".join(random.choice("ab.-_/\\x00é") for _ in range(random.randint(0, 12)))])

def rvalue(sig):
    c = sig[0]
    if c == "s": return rname()
    if c == "o": return random.choice(["/", MP, MP + "/machine/fz1"])
    if c in "ui": return random.choice([0, 1, 2**31 - 1, 4_000_000 + random.randint(0, 1000), 65535])
    if c == "t": return random.choice([0, 1, 2**63, 2**64 - 1])
    if c == "b": return random.random() < 0.5
    if c == "h": return 0
    if sig == "ay": return bytes(random.randint(0, 3) * 8)
    if sig == "ai": return [random.randint(-3, 3) for _ in range(random.randint(0, 4))]
    if sig == "as": return [rname() for _ in range(random.randint(0, 3))]
    if sig == "a(sv)":
        n = random.choice([0, 1, 3, 5000])
        return [[random.choice(["Slice", "Description", "TasksMax", "Bogus", "After"]),
                 random.choice([Variant("s", "x"), Variant("t", 5), Variant("as", ["a"]), Variant("v", Variant("s", "deep"))])]
                for _ in range(n)]
    return rname()

MANAGER = {
    "GetMachine": "s", "GetImage": "s", "GetMachineByPID": "u", "ListMachines": "", "ListImages": "",
    "CreateMachine": "sayssusa(sv)", "CreateMachineWithNetwork": "sayssusaia(sv)", "RegisterMachine": "sayssus",
    "RegisterMachineWithNetwork": "sayssusai", "UnregisterMachine": "s", "TerminateMachine": "s",
    "KillMachine": "ssi", "GetMachineAddresses": "s", "GetMachineOSRelease": "s", "GetMachineUIDShift": "s",
    "OpenMachinePTY": "s", "OpenMachineRootDirectory": "s", "BindMountMachine": "sssbb",
    "CopyFromMachine": "sss", "CopyToMachineWithFlags": "ssst", "MapFromMachineUser": "su",
    "MapToMachineUser": "u", "MapFromMachineGroup": "su", "MapToMachineGroup": "u", "SetPoolLimit": "t",
    "CleanPool": "s", "RemoveImage": "s", "RenameImage": "ss", "GetImageOSRelease": "s", "Bogus": "s",
}
SIGS = ["", "s", "u", "ss", "su", "i", "as", "a(sv)", "ssi", "sayssusa(sv)", "b", "t"]

def split(sig):
    from dbus_fast.signature import SignatureTree
    return [t.signature for t in SignatureTree(sig).types] if sig else []

def make_message():
    r = random.random()
    if r < 0.7:
        member = random.choice(list(MANAGER))
        sig = MANAGER[member] if random.random() < 0.8 else random.choice(SIGS)
        # leaders: never 0 (the fuzzer itself) nor a small PID of the sandbox's own services
        body = [rvalue(t) for t in split(sig)]
        return Message(destination=M, path=MP, interface=MI, member=member, signature=sig, body=body)
    if r < 0.85:
        path = random.choice([MP, MP + "/machine/fz1", MP + "/machine/_2ehost", MP + "/machine/self", "/",
                              MP + "/machine/" + random.choice(["x", "_", "_zz", "a_2e"]), MP + "/image/_2ehost"])
        member = random.choice(["Get", "GetAll", "Set"])
        sig = {"Get": "ss", "GetAll": "s", "Set": "ssv"}[member] if random.random() < 0.8 else random.choice(SIGS)
        body = [random.choice(["", "org.freedesktop.machine1.Machine", "org.freedesktop.machine1.Manager", "x"])
                if t == "s" else rvalue(t) for t in split(sig)]
        if sig == "ssv":
            body[2] = Variant("s", "v")
        return Message(destination=M, path=path, interface="org.freedesktop.DBus.Properties", member=member,
                       signature=sig, body=body)
    path = random.choice([MP + "/machine/fz1", MP + "/machine/_2ehost", "/nope"])
    member = random.choice(["Terminate", "Kill", "GetAddresses", "GetUIDShift", "Introspect", "Ping"])
    iface = {"Introspect": "org.freedesktop.DBus.Introspectable", "Ping": "org.freedesktop.DBus.Peer"}.get(
        member, "org.freedesktop.machine1.Machine")
    sig = {"Kill": "si"}.get(member, "") if random.random() < 0.8 else random.choice(SIGS)
    return Message(destination=M, path=path, interface=iface, member=member, signature=sig,
                   body=[rvalue(t) for t in split(sig)])

BAD_ERRORS = ("com.dubstepdish", "org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NoReply")

async def main():
    bus = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()
    stats = {"return": 0, "error": 0, "bad": [], "hang": 0}
    sem = asyncio.Semaphore(16)
    async def one():
        msg = make_message()
        for i, t in enumerate(split(msg.signature)):
            if t in ("u", "i") and msg.member in ("CreateMachine", "CreateMachineWithNetwork", "RegisterMachine",
                                                  "RegisterMachineWithNetwork") and i == 4:
                msg.body[i] = random.choice([1, 4_000_000 + random.randint(0, 1000)])
        async with sem:
            try:
                reply = await asyncio.wait_for(bus.call(msg), 30)
            except asyncio.TimeoutError:
                stats["hang"] += 1
                return
        if reply.message_type is MessageType.METHOD_RETURN:
            stats["return"] += 1
            for fd in reply.unix_fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        else:
            stats["error"] += 1
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            if not reply.error_name or reply.error_name.startswith(BAD_ERRORS) or text == "Internal error":
                stats["bad"].append([msg.member, msg.signature, reply.error_name, text[:100]])
    await asyncio.gather(*(one() for _ in range(CALLS)))
    print(json.dumps(stats))

asyncio.run(main())
"""


def _rss_kb(sb: Sandbox) -> tuple[int, int]:
    pid = int(sb.run(["systemctl", "show", "-p", "MainPID", "--value", "machined.service"]).stdout.strip())
    status = sb.run(["cat", f"/proc/{pid}/status"]).stdout
    return pid, int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


def test_fuzzing_10000_calls_never_crashes_or_hangs_and_memory_stays_bounded() -> None:
    import json

    with Sandbox("ours") as sb:
        run(
            sb,
            r"""
for n in fz1 fz2; do P=$(leader $n-l); call CreateMachine $n '[]' '' vm $P '' '@a(sv) []' >/dev/null; done
""",
        )
        sb.run(["sh", "-c", f"cat > /tmp/fuzz.py <<'EOF'\n{FUZZER}\nEOF"])
        warm = sb.run([sys.executable, "/tmp/fuzz.py", "1", "1500"], timeout=600)
        pid_before, rss_before = _rss_kb(sb)
        result = sb.run([sys.executable, "/tmp/fuzz.py", "2", "10000"], timeout=1200)
        pid_after, rss_after = _rss_kb(sb)
        stats = json.loads(result.stdout.strip().splitlines()[-1])
        journal = sb.run(["journalctl", "-u", "machined.service", "-o", "cat", "--no-pager"]).stdout
    assert json.loads(warm.stdout.strip().splitlines()[-1])["hang"] == 0
    assert stats["hang"] == 0, stats
    assert stats["bad"] == [], stats["bad"][:20]
    assert stats["return"] + stats["error"] == 10000
    assert pid_before == pid_after, "the daemon restarted (crashed) during the fuzz run"
    assert "Traceback" not in journal
    assert rss_after <= rss_before * 1.2, (rss_before, rss_after)


def test_pid_reuse_never_hits_the_newcomer() -> None:
    """A dead leader's PID taken by another process: Kill and GetMachineByPID leave the newcomer alone."""
    with Sandbox("ours") as sb:
        out = normalize(
            run(
                sb,
                r"""
# the machine's unit outlives its leader: the service's shell reaps the leader and goes on
systemd-run --quiet --unit=reuse-svc bash -c 'sleep 999998 & echo $! > /tmp/reuse-leader; wait; exec sleep 999997'
sleep 0.3; P=$(cat /tmp/reuse-leader); pid L $P
call RegisterMachine reuse '[]' '' container $P ''
echo "pidfd ids persisted: $(grep -c '^LEADER_PIDFDID=[0-9]' /run/systemd/machines/reuse)"
kill -9 $P; sleep 0.3
# make the next process get the same PID: a newcomer outside any machine
python3 -c "
import os, sys
with open('/proc/sys/kernel/ns_last_pid', 'w') as f:
    f.write(str($P - 1))
if os.fork() == 0:
    os.execvp('sleep', ['sleep', '1000'])
" &
sleep 0.3
kill -0 $P 2>/dev/null && [ "$(cat /proc/$P/comm)" = sleep ] && echo "newcomer took the leader's PID"
call GetMachineByPID $P
call KillMachine reuse leader 9
sleep 0.2
kill -0 $P && echo "newcomer alive"
machinectl show reuse -p Leader --value | sed "s/^$P$/same PID/"
call TerminateMachine reuse; gone reuse
kill $P
""",
            )
        )
    assert "pidfd ids persisted: 1" in out
    assert "newcomer took the leader's PID" in out
    assert "NoMachineForPID" in out
    assert "UnixProcessIdUnknown" in out
    assert "newcomer alive" in out


def _registry_matches_scopes(sb: Sandbox, prefix: str) -> tuple[list[str], list[str]]:
    machines = run(sb, f"machinectl list --no-legend | awk '{{print $1}}' | grep '^{prefix}' | sort").split()
    scopes = run(
        sb,
        f"systemctl list-units --no-legend --state=active 'machine-{prefix}*.scope' | awk '{{print $1}}' "
        f"| sed 's/^machine-//; s/.scope$//' | sort",
    ).split()
    return machines, scopes


def test_sigkill_during_a_registration_storm_loses_nothing() -> None:
    with Sandbox("ours") as sb:
        run(
            sb,
            r"""
for i in $(seq 60); do systemd-run --quiet --unit=kst-$i sleep 999998 & done; wait
machinectl list >/dev/null
for i in $(seq 60); do
  P=$(systemctl show -p MainPID --value kst-$i)
  gdbus call --system --dest $M --object-path $MP --method $MI.CreateMachine kst$i '[]' '' vm $P '' '@a(sv) []' >/dev/null 2>&1 &
done
sleep 0.15
systemctl kill -s KILL machined.service
wait
sleep 2
machinectl list >/dev/null
""",
            timeout=300,
        )
        state = run(sb, "systemctl show machined.service -p NRestarts,ActiveState")
        machines, scopes = _registry_matches_scopes(sb, "kst")
        files = run(sb, "ls /run/systemd/machines | grep '^kst' | sort").split()
    assert "ActiveState=active" in state
    assert machines == scopes, "a scope without a machine (leak) or a machine without a scope (ghost)"
    assert files == machines
    assert machines, "nothing was registered before the kill: the test did not test"


def test_daemon_reexec_and_reload_during_load_keep_the_registry_exact() -> None:
    with Sandbox("ours") as sb:
        out = run(
            sb,
            r"""
for i in $(seq 40); do systemd-run --quiet --unit=rx-$i sleep 999998 & done; wait
machinectl list >/dev/null
for i in $(seq 40); do
  P=$(systemctl show -p MainPID --value rx-$i)
  gdbus call --system --dest $M --object-path $MP --method $MI.CreateMachine rx$i '[]' '' vm $P '' '@a(sv) []' >/dev/null 2>&1 &
  [ $i = 10 ] && systemctl daemon-reexec &
  [ $i = 25 ] && systemctl daemon-reload &
done
wait
sleep 1
# after reexec we must still follow systemd: stopping a scope removes its machine
systemctl stop machine-rx1.scope; gone rx1
echo done
""",
            timeout=300,
        )
        machines, scopes = _registry_matches_scopes(sb, "rx")
    assert "still registered" not in out
    assert machines == scopes
    assert "rx1" not in machines and len(machines) >= 30


def test_bus_restart_and_corrupt_state_files() -> None:
    with Sandbox("ours") as sb:
        out = normalize(
            run(
                sb,
                r"""
P=$(leader br-l); pid L $P
call CreateMachine br1 '[]' '' vm $P '' '@a(sv) []' >/dev/null
printf 'garbage\x00\xff\n' > /run/systemd/machines/corrupt1
printf '# This is private data. Do not parse.\nNAME=trunc\nSCO' > /run/systemd/machines/trunc
systemctl restart dbus.service
# as 252: the daemon exits 0 when the bus goes away (no restart), bus activation brings it back
for _ in $(seq 100); do [ "$(systemctl show -p ActiveState --value machined.service)" = inactive ] && break; sleep 0.1; done
systemctl show machined.service -p ActiveState,Result,ExecMainStatus,NRestarts | sort | paste -sd' ' | sed 's/^/after bus restart: /'
machinectl list --no-legend
systemctl show machined.service -p ActiveState
journalctl -u machined.service -o cat --no-pager | grep -E 'Skipping state file|Lost the connection' | sed 's/:.*//' | sort -u
ls /run/systemd/machines | sort
call TerminateMachine br1; gone br1
""",
                timeout=120,
            )
        )
    assert "br1 vm - - - -" in out.replace("  ", " ")
    assert "after bus restart: ActiveState=inactive ExecMainStatus=0 NRestarts=0 Result=success" in out
    assert "ActiveState=active" in out
    assert "Skipping state file /run/systemd/machines/corrupt1" in out
    assert "Skipping state file /run/systemd/machines/trunc" in out
    assert "Lost the connection to the bus; exiting." in out
    assert "Traceback" not in out

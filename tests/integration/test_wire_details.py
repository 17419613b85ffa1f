"""Smaller differences from systemd-machined 252, each compared with the real daemon:
message flags, errno error names, bind mounts onto symlinks, memory after large
requests, stale state-file temporaries, the end of the unit when the bus restarts.
"""

from __future__ import annotations

import re
import sys

from machined.sandbox import Sandbox
from tests.integration.differential import normalize, run
from tests.integration.test_lifecycle import assert_same


def test_replies_errors_and_signals_carry_sd_bus_flags(ours: Sandbox, real: Sandbox) -> None:
    out = assert_same(
        ours,
        real,
        r"""
machines >/dev/null  # started (by activation)
OWNER=$(busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus GetNameOwner s $M | cut -d'"' -f2)
busctl monitor --json=short $M > /tmp/wire.json 2>/dev/null & MON=$!
sleep 1
P=$(leader wf-l); pid L $P
call GetMachine .host >/dev/null
call GetMachine nope >/dev/null
busctl call $M $MP org.freedesktop.DBus.Peer Ping
busctl get-property $M $MP $MI PoolPath >/dev/null
call CreateMachine wf1 '[]' '' vm $P '' '@a(sv) []' >/dev/null
call TerminateMachine wf1 >/dev/null; gone wf1
sleep 0.5; kill $MON; wait $MON 2>/dev/null
# what machined sent, other than its own calls: type, call or signal, error, flags
python3 - "$OWNER" <<'EOF'
import json, sys
calls, seen = {}, set()
for line in open("/tmp/wire.json"):
    m = json.loads(line)
    if m["type"] == "method_call" and m.get("destination") == "org.freedesktop.machine1":
        calls[(m["sender"], m["cookie"])] = m["member"]
    elif m.get("sender") == sys.argv[1] and m["type"] != "method_call":
        what = m.get("member") or calls.get((m.get("destination"), m.get("reply_cookie")), "?")
        if what == "GetAll":  # gone's 'machinectl show' polls: how often it ran is a matter of timing
            continue
        seen.add(f'{m["type"]} {what} {m.get("error_name", "-")} flags={m["flags"]}')
print("\n".join(sorted(seen)))
EOF
""",
    )
    assert "signal MachineNew - flags=1" in out
    assert "error GetMachine org.freedesktop.machine1.NoSuchMachine flags=1" in out
    assert "method_return Ping - flags=1" in out


def test_errno_error_names_as_sd_bus(ours: Sandbox, real: Sandbox) -> None:
    out = assert_same(
        ours,
        real,
        r"""
# a leader in no unit: ENXIO from cg_pid_get_unit()
sleep 999997 & S=$!; pid S $S
call RegisterMachine nx1 '[]' '' container $S ''
kill $S
# an image that is a symlink: ELOOP when marking it read-only
mkdir -p /tmp/symimg-target/etc; ln -sfn /tmp/symimg-target /var/lib/machines/symimg
call MarkImageReadOnly symimg true
mcall $MP/image/symimg org.freedesktop.machine1.Image.MarkReadOnly false
machinectl read-only symimg; echo "rc=$?"
rm /var/lib/machines/symimg
""",
    )
    assert "System.Error.ENXIO: Failed to determine unit of process <S> : No such device or address" in out
    assert "System.Error.ELOOP: Too many levels of symbolic links" in out


def test_bind_mount_onto_symlinks(ours: Sandbox, real: Sandbox) -> None:
    out = assert_same(
        ours,
        real,
        r"""
boot_container bms
mkdir -p /tmp/bindsrc; echo bound > /tmp/bindsrc/hello; echo filebind > /tmp/onefile
machinectl shell bms /bin/sh -c 'ln -s /nonexistent /mnt/dangling; ln -s /nonexistent2 /mnt/dangling2; mkdir /mnt/realdir; ln -s /mnt/realdir /mnt/dirlink' >/dev/null 2>&1
call BindMountMachine bms /tmp/bindsrc /mnt/dangling false false
call BindMountMachine bms /tmp/bindsrc /mnt/dangling2 false true
machinectl bind bms /tmp/bindsrc /mnt/dirlink; echo "rc=$?"
machinectl bind bms /tmp/onefile /mnt/dangling; echo "rc=$?"
machinectl bind bms /tmp/bindsrc /nonexistent-dir/x; echo "rc=$?"
machinectl shell bms /bin/sh -c 'stat -c "%F %N" /mnt/*; cat /mnt/dangling; grep " /mnt/" /proc/self/mountinfo | cut -d" " -f5' 2>&1 | tr -d '\r' | grep -v '^Conn'
ls /run/systemd/nspawn/propagate/bms
stop_container bms
""",
        timeout=180,
    )
    assert "BindMountMachine" not in out  # (the calls print their errors)
    assert "InvalidArgs: Failed to mount /tmp/bindsrc on /mnt/dangling in machine's namespace: Invalid argument" in out
    assert "on /mnt/dangling2 in machine's namespace: Invalid argument" in out
    assert "on /nonexistent-dir/x in machine's namespace: No such file or directory" in out


LARGE_CALLS = r"""
import asyncio, sys
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

async def main():
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    for i, mib in enumerate(int(a) for a in sys.argv[1:]):
        n = mib << 20
        # a short error (wrong signature), then one that echoes the argument back
        sig, body = ("s", ["x" * n]) if i % 2 else ("ay", [b"x" * n])
        reply = await bus.call(Message(destination="org.freedesktop.machine1", path="/org/freedesktop/machine1",
                                       interface="org.freedesktop.machine1.Manager", member="GetMachine",
                                       signature=sig, body=body))
        assert reply.message_type is MessageType.ERROR, reply
    bus.disconnect()

asyncio.run(main())
"""


def _rss_mib(sb: Sandbox, unit: str) -> float:
    pid = sb.run(["systemctl", "show", "-p", "MainPID", "--value", unit]).stdout.strip()
    status = sb.run(["cat", f"/proc/{pid}/status"]).stdout
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


def _memory_around_large_calls(sb: Sandbox, unit: str) -> tuple[float, float]:
    sb.run(["sh", "-c", f"cat > /tmp/large_calls.py <<'EOF'\n{LARGE_CALLS}\nEOF"])
    sb.run([sys.executable, "/tmp/large_calls.py", "1"])
    sb.run(["sleep", "0.5"])
    idle = _rss_mib(sb, unit)
    # 30 MiB requests (the system bus takes up to 32 MiB), of varying sizes
    sb.run([sys.executable, "/tmp/large_calls.py", "30", "30", "20", "25", "10", "5", "29", "15"], timeout=300)
    sb.run(["sleep", "1"])
    return idle, _rss_mib(sb, unit)


def test_memory_returns_near_idle_after_30_mib_requests(ours: Sandbox, real: Sandbox) -> None:
    idle, after = _memory_around_large_calls(ours, "machined.service")
    real_idle, real_after = _memory_around_large_calls(real, "systemd-machined.service")
    figures = f"ours {idle:.1f} → {after:.1f} MiB, 252 {real_idle:.1f} → {real_after:.1f} MiB"
    print(figures)
    assert after - idle < 10, figures


def test_stale_state_temporaries_are_removed_at_start() -> None:
    """A SIGKILL between writing a state file's temporary and renaming it: gone after the restart
    (252 leaves them forever), and the machines are all still there."""
    with Sandbox("ours") as sb:
        out = normalize(
            run(
                sb,
                r"""
P=$(leader st-l); pid L $P
call CreateMachine st1 '[]' '' vm $P '' '@a(sv) []' >/dev/null
printf '# This is private data. Do not parse.\nNAME=st1\nSCO' > "/run/systemd/machines/.#st1Ab3dEf"
printf '' > "/run/systemd/machines/.#st2a1b2c3d4e5f6a7b8"
systemctl kill -s KILL machined.service
for _ in $(seq 100); do [ "$(systemctl show -p ActiveState --value machined.service)" = active ] && break; sleep 0.1; done
machinectl list --no-legend
ls -A /run/systemd/machines
journalctl -u machined.service -o cat --no-pager | grep -c 'Removed stale temporary file'
call TerminateMachine st1; gone st1
""",
            )
        )
    assert "st1 vm - - - -" in re.sub(r" +", " ", out)
    assert ".#" not in out
    assert "st1\nunit:machine-st1.scope\n2\n" in out


def test_bus_restart_ends_the_unit_as_252(ours: Sandbox, real: Sandbox) -> None:
    """Last in this module: the bus restarts. 252 exits 0 (inactive, success) and is
    activated again by the next call, with its machines."""
    out = assert_same(
        ours,
        real,
        r"""
P=$(leader brs-l); pid L $P
call CreateMachine brs1 '[]' '' vm $P '' '@a(sv) []' >/dev/null
systemctl restart dbus.service
for _ in $(seq 100); do [ "$(systemctl show -p ActiveState --value $SVC)" = inactive ] && break; sleep 0.1; done
systemctl show $SVC -p ActiveState,SubState,Result,ExecMainStatus,NRestarts
machinectl list --no-legend
systemctl show $SVC -p ActiveState,NRestarts
call TerminateMachine brs1; gone brs1
""",
        timeout=120,
    )
    first = out.split("brs1 vm")[0]
    for line in ("ActiveState=inactive", "SubState=dead", "Result=success", "ExecMainStatus=0", "NRestarts=0"):
        assert line in first.splitlines(), first
    assert "brs1 vm - - - -" in re.sub(r" +", " ", out)

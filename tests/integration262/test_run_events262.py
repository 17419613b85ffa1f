"""io.machined.Machine (this project's own interface) under systemd 262: ``machined events`` and
``machined run`` with real systemd-nspawn containers, one booted and one not (with -U), and
what upstream answers the same unprivileged caller for the shell it would open (real 262).

Upstream's objects and sockets are not touched (test_varlink262 and test_dbus262 compare them
with real 262's): ours is a socket of its own, /run/machined/io.machined.Machine.
"""

from __future__ import annotations

import json
import re
import secrets
import sys
from pathlib import Path

from machined.sandbox import Sandbox
from machined.sandbox.containers import BASH_FUNCTIONS

M = f"{sys.executable} -m machined"
LOADCLIENT = f"{sys.executable} {Path(__file__).parents[1] / 'integration' / 'loadclient.py'}"
SOCKET = "/run/machined/io.machined.Machine"
# the booted container's name, new each run: its veth (ve-NAME) lives in the host's network, shared
# by every sandbox on the machine
BOOTED = f"rb{secrets.token_hex(2)}"
NOBODY = "setpriv --reuid=65534 --regid=65534 --clear-groups"


def _run(sb: Sandbox, script: str, timeout: float = 240) -> str:
    r = sb.run(["bash", "-c", BASH_FUNCTIONS + f"M='{M}'\n" + script], check=False, timeout=timeout)
    return r.stdout + r.stderr


def _file(path: str, text: str) -> str:
    """Shell lines that write *text* to *path* inside."""
    return f"cat > {path} <<'PYEOF'\n{text}\nPYEOF\n"


def _values(out: str, key: str) -> list[str]:
    return re.findall(rf"^{key}=(.*)$", out, re.M)


def _value(out: str, key: str) -> str:
    found = _values(out, key)
    assert found, f"no {key}= in:\n{out}"
    return found[0]


# A watcher that reads nothing (until told to), then everything it was sent, one JSON per line.
STALLED = r"""
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(sys.argv[1])
s.sendall(json.dumps({"method": "io.machined.Machine.Watch", "more": True}).encode() + b"\0")
open(sys.argv[2], "w").close()
while not open(sys.argv[2]).read():
    time.sleep(0.1)
buf = b""
while True:
    d = s.recv(65536)
    if not d:
        break
    buf += d
for m in buf.split(b"\0")[:-1]:
    print(m.decode())
"""

EVENTS = r"""
rm -f /tmp/ev.json /tmp/stalled.go
machinectl list >/dev/null
for _ in $(seq 100); do [ -S /run/machined/io.machined.Machine ] && break; sleep 0.05; done
$M events --json > /tmp/ev.json 2>&1 & W=$!
/work-python /tmp/stalled.py /run/machined/io.machined.Machine /tmp/stalled.go > /tmp/stalled.out 2>&1 & S=$!
for _ in $(seq 100); do [ -e /tmp/stalled.go ] && [ -s /tmp/ev.json ] && break; sleep 0.05; done
# a container's life: nspawn start, terminate
systemd-run --quiet --unit=ev-ns systemd-nspawn -q -D / --volatile=yes -M evns /bin/sleep 2999
until_listed evns
machinectl terminate evns; gone evns
# 200 CreateMachine at once, then 200 TerminateMachine at once, while one watcher reads nothing
echo "create=$(LOADCLIENT create st 200 --conns 4 --concurrency 200 | grep -o '"outcomes": {[^}]*}')"
sleep 0.5
echo "lists=$(LOADCLIENT calls ListMachines '["", []]' 100 --concurrency 1 | head -c 200)"
echo "terminate=$(LOADCLIENT terminate st 200 --conns 4 --concurrency 200 | grep -o '"outcomes": {[^}]*}')"
for i in $(seq 1 200); do gone st$i >/dev/null; done
echo "left=$(machinectl list --no-legend | grep -c '^st')"
sleep 1
echo go > /tmp/stalled.go; wait $S
echo "lists0=$(LOADCLIENT calls ListMachines '["", []]' 100 --concurrency 1 | head -c 200)"
kill $W
"""


def test_events_whole_life_a_storm_and_a_stalled_watcher(ours262: Sandbox) -> None:
    script = EVENTS.replace("LOADCLIENT", LOADCLIENT).replace("/work-python", sys.executable)
    out = _run(ours262, _file("/tmp/stalled.py", STALLED) + script, timeout=300)
    events = [json.loads(line) for line in ours262.run(["cat", "/tmp/ev.json"]).stdout.splitlines()]
    # first every current machine, then the events with consecutive numbers
    assert events[0]["type"] == "existing" and events[0]["name"] == ".host", events[:3]
    stream = [e for e in events if e["type"] != "existing"]
    assert [e["sequence"] for e in stream] == list(range(events[0]["sequence"] + 1,
                                                         events[0]["sequence"] + 1 + len(stream)))  # fmt: skip
    life = [(e["type"], e["state"]) for e in stream if e["name"] == "evns"]
    assert life == [("new", "running"), ("state", "closing"), ("removed", "closing")], life
    first = next(e for e in stream if e["name"] == "evns")
    assert first["class"] == "container" and first["service"] == "systemd-nspawn" and first["leader"] > 1
    assert first["unit"] and set(first["timestamp"]) == {"realtime", "monotonic"}
    storm = [e for e in stream if e["name"].startswith("st")]
    by_name: dict[str, list[str]] = {}
    for e in storm:
        by_name.setdefault(e["name"], []).append(e["type"] + ":" + e["state"])
    assert len(by_name) == 200, out
    assert all(v == ["new:opening", "state:running", "state:closing", "removed:closing"] for v in by_name.values()), [
        v for v in by_name.values() if len(v) != 4
    ][:3]  # fmt: skip
    assert _value(out, "create") == _value(out, "terminate") == '"outcomes": {"ok": 200}', out
    assert _value(out, "left") == "0"
    # root's calls while the stalled watcher held its socket full: no slower than without it
    lists, lists0 = json.loads(_value(out, "lists")), json.loads(_value(out, "lists0"))
    assert lists["outcomes"] == lists0["outcomes"] == {"ok": 100}, out
    assert lists["slowest"] < max(0.25, 5 * lists0["slowest"]), out
    # the stalled watcher: what fit, in order and consecutive, then the overflow notice, then the end
    stalled = [json.loads(line) for line in ours262.run(["cat", "/tmp/stalled.out"]).stdout.splitlines()]
    assert stalled[-1]["error"] == "io.machined.Machine.Overflow", stalled[-3:]
    got = [m["parameters"]["sequence"] for m in stalled[:-1] if m["parameters"]["type"] != "existing"]
    assert got == list(range(got[0], got[0] + len(got))) and got[-1] == stalled[-1]["parameters"]["lostSequence"] - 1
    assert got[0] == stream[0]["sequence"]


IDLE = r"""
import json, os, socket, sys, time
path, pid = sys.argv[1], int(sys.argv[2])
def rss():
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
def watch(n):
    conns = []
    for i in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(path)
        s.sendall(json.dumps({"method": "io.machined.Machine.Watch", "more": True}).encode() + b"\0")
        conns.append(s)
    first = None
    for s in conns:
        buf = b""
        while b"\0" not in buf:
            buf += s.recv(65536)
        first = first or json.loads(buf.split(b"\0")[0])
    return conns, first
warm, _ = watch(20)  # (what any watcher costs once: code paths, first allocations)
for s in warm:
    s.close()
time.sleep(1)
before = rss()
# 1,000 watchers of 8 users (the server keeps 128 connections per user, as 262)
ready_r, ready_w = os.pipe()
done_r, done_w = os.pipe()
kids = []
for k in range(8):
    p = os.fork()
    if p == 0:
        os.setgid(60000 + k); os.setuid(60000 + k)
        conns, first = watch(125)
        os.write(ready_w, (first["parameters"]["type"] + "\n").encode())
        os.read(done_r, 1)
        os._exit(0)
    kids.append(p)
got = b""
while got.count(b"\n") < 8:
    got += os.read(ready_r, 100)
time.sleep(1)
after = rss()
os.write(done_w, b"x" * 8)
for p in kids:
    os.waitpid(p, 0)
print(f"before={before}")
print(f"after={after}")
print(f"first={sorted(set(got.decode().split()))}")
"""


def test_a_thousand_idle_watchers_cost_less_than_10_mib(ours262: Sandbox) -> None:
    out = _run(ours262, f"""
ulimit -n 4096
machinectl list >/dev/null
P=$(systemctl show -p MainPID --value machined.service)
{_file("/tmp/idle.py", IDLE)}
{sys.executable} /tmp/idle.py {SOCKET} $P
""")  # fmt: skip
    assert _value(out, "first") == "['existing']", out
    grown = int(_value(out, "after")) - int(_value(out, "before"))
    assert grown < 10 * 1024, out  # kB


RUN = r"""
boot_container rb18
systemd-run --quiet --unit=run-nb systemd-nspawn -q -D / --volatile=yes -U --bind-ro=/etc/passwd \
  --bind-ro=/etc/group -M rp18 /bin/sleep 2999
until_listed rp18
for c in rb18 rp18; do
  L=$(machinectl show $c -p Leader --value)
  echo "$c stdin=$(echo piped-in | $M run $c -- cat)"
  $M run $c -- sh -c 'echo to-out; echo to-err >&2' > /tmp/o 2> /tmp/e; echo "$c rc0=$? out=$(cat /tmp/o) err=$(cat /tmp/e)"
  $M run $c -- sh -c 'exit 7'; echo "$c rc7=$?"
  $M run $c -- sh -c 'kill -USR1 $$'; echo "$c rcsig=$?"
  echo "$c env=$($M run --setenv=FOO=bar --setenv=X=1 --chdir=/usr/lib $c -- sh -c 'echo $FOO.$X.$(pwd).$USER.$HOME')"
  # the caller's descriptors themselves, not copies: the same pipe inside as outside
  echo | { echo "$c fd-out=$(readlink /proc/self/fd/0)"; echo "$c fd-in=$($M run $c -- readlink /proc/self/fd/0)"; }
  # every namespace and the cgroup of the leader
  $M run $c -- sleep 3001 & R=$!
  for _ in $(seq 100); do C=$(pgrep -n -f '^sleep 3001') && break; sleep 0.05; done
  for ns in mnt pid net ipc uts user cgroup; do
    echo "$c ns-$ns=$([ "$(readlink /proc/$C/ns/$ns)" = "$(readlink /proc/$L/ns/$ns)" ] && echo same || echo differs)"
  done
  echo "$c root=$([ "$(stat -L -c %d:%i /proc/$C/root)" = "$(stat -L -c %d:%i /proc/$L/root)" ] && echo same || echo differs)"
  echo "$c cgroup=$(grep ^0:: /proc/$C/cgroup | cut -d: -f3) leader-cgroup=$(grep ^0:: /proc/$L/cgroup | cut -d: -f3)"
  kill $C; wait $R
  # a caller killed mid-run leaves nothing behind
  $M run $c -- sh -c 'sleep 3002 & sleep 3003' & R=$!
  for _ in $(seq 100); do pgrep -f '^sleep 3003' >/dev/null && break; sleep 0.05; done
  kill -9 $R; wait $R 2>/dev/null; sleep 4
  echo "$c left=$(pgrep -c -f '^sleep 300[23]')"
  $M run --detach $c -- sleep 3004; echo "$c detach-rc=$?"; sleep 0.5; echo "$c detached=$(pgrep -c -f '^sleep 3004')"
  pkill -x -f 'sleep 3004'
done
echo "rp18 uid=$($M run --uid=daemon rp18 -- id -un)"
$M run --uid=daemon rp18 -- sleep 3005 & sleep 1; C=$(pgrep -n -f '^sleep 3005')
echo "rp18 host-uid=$(awk '/^Uid:/{print $2}' /proc/$C/status) shift=$(awk '{print $2}' /proc/$(machinectl show rp18 -p Leader --value)/uid_map)"
# terminate ends a command running in the machine
machinectl terminate rp18; wait; gone rp18; echo "after-terminate=$(pgrep -c -f '^sleep 3005')"
echo "host=$($M run .host -- sh -c 'echo $(id -u)')"
echo "host-uid=$($M run --uid=daemon .host -- id -un)"
$M run rp18 -- true; echo "gone-rc=$?"
# a VM is refused, clearly
systemd-run --quiet --unit=run-vm sleep 2998; V=$(systemctl show -p MainPID --value run-vm)
busctl call org.freedesktop.machine1 /org/freedesktop/machine1 org.freedesktop.machine1.Manager RegisterMachine \
  'sayssus' rvm 0 test vm $V "" >/dev/null
$M run rvm -- true; echo "vm-rc=$?"
$M run rb18 -- /nonexistent; echo "enoent-rc=$?"
$M run --uid=nosuch rb18 -- true; echo "nouser-rc=$?"
machinectl terminate rvm; stop_container rb18
"""


def test_run_in_a_booted_and_a_plain_container(ours262: Sandbox) -> None:
    out = _run(ours262, RUN.replace("rb18", BOOTED), timeout=300)
    for c in (BOOTED, "rp18"):
        assert f"{c} stdin=piped-in" in out, out
        assert f"{c} rc0=0 out=to-out err=to-err" in out, out
        assert f"{c} rc7=7" in out and f"{c} rcsig={128 + 10}" in out, out
        assert f"{c} env=bar.1./usr/lib.root./root" in out, out
        outside, inside = _value(out, f"{c} fd-out"), _value(out, f"{c} fd-in")
        assert outside.startswith("pipe:[") and inside == outside, out
        for ns in ("mnt", "pid", "net", "ipc", "uts", "user", "cgroup", "root"):
            assert _value(out, f"{c} ns-{ns}" if ns != "root" else f"{c} root") == "same", (ns, out)
        cgroup = re.search(rf"^{c} cgroup=(\S+) leader-cgroup=(\S+)$", out, re.M)
        assert cgroup and cgroup.group(1) == cgroup.group(2) and "/machine.slice/" in cgroup.group(1), out
        assert _value(out, f"{c} left") == "0", out
        assert _value(out, f"{c} detach-rc") == "0" and _value(out, f"{c} detached") == "1", out
    assert _value(out, "rp18 uid") == "daemon", out
    host_uid, shift = _value(out, "rp18 host-uid").split(" shift=")
    assert int(shift) > 0 and int(host_uid) == int(shift) + 1, out
    assert _value(out, "after-terminate") == "0", out
    assert _value(out, "host") == "0" and _value(out, "gone-rc") == "125", out
    # (another user on .host: PID 1 starts it, machined's unit cannot change UIDs; see test_run_on_the_host_...)
    assert _value(out, "host-uid") == "daemon", out
    assert _value(out, "vm-rc") == "125" and "'rvm' is a virtual machine" in out, out
    assert _value(out, "enoent-rc") == "127" and "/nonexistent: No such file or directory" in out, out
    assert _value(out, "nouser-rc") == "125" and f"No user 'nosuch' in machine '{BOOTED}'" in out, out


UNPRIVILEGED = r"""
systemd-run --quiet --unit=np-ns systemd-nspawn -q -D / --volatile=yes -M np /bin/sleep 2997
until_listed np
NB="setpriv --reuid=65534 --regid=65534 --clear-groups"
$NB varlinkctl --json=short call /run/systemd/machine/io.systemd.Machine io.systemd.Machine.Open \
  '{"name":"np","mode":"shell","path":"/bin/true"}' 2>&1; echo "open-rc=$?"
$NB varlinkctl --json=short call /run/systemd/machine/io.systemd.Machine io.systemd.Machine.Open \
  '{"name":".host","mode":"shell","path":"/bin/true"}' 2>&1; echo "open-host-rc=$?"
if [ -S /run/machined/io.machined.Machine ]; then
  $NB varlinkctl --json=short call /run/machined/io.machined.Machine io.machined.Machine.Run \
    '{"name":"np","command":["/bin/true"]}' 2>&1; echo "run-rc=$?"
  $NB varlinkctl --json=short call /run/machined/io.machined.Machine io.machined.Machine.Run \
    '{"name":".host","command":["/bin/true"]}' 2>&1; echo "run-host-rc=$?"
  $NB timeout 2 varlinkctl --json=short call --more /run/machined/io.machined.Machine io.machined.Machine.Watch '{}' \
    | head -c 200; echo
  stat -c '%A %U' /run/machined/io.machined.Machine
  varlinkctl introspect /run/machined/io.machined.Machine io.machined.Machine | grep -E '^(method|error|interface)'
fi
machinectl terminate np; gone np
"""


def test_nobody_is_refused_as_upstream_refuses_its_shell_and_may_watch(real262: Sandbox, ours262: Sandbox) -> None:
    real, ours = (_run(sb, UNPRIVILEGED, timeout=120) for sb in (real262, ours262))
    # upstream's answer to nobody's shell (its polkit: interactive authentication required)...
    refusal = re.findall(r"^Method call io.systemd.Machine.Open\(\) failed: (\S+)$", real, re.M)
    assert refusal == ["io.systemd.InteractiveAuthenticationRequired"] * 2, real
    assert re.findall(r"^Method call io.systemd.Machine.Open\(\) failed: (\S+)$", ours, re.M) == refusal, ours
    # ... is ours to nobody's Run, for a container and for .host
    assert re.findall(r"^Method call io.machined.Machine.Run\(\) failed: (\S+)$", ours, re.M) == refusal, ours
    assert _value(ours, "run-rc") == _value(real, "open-rc") == "1"
    assert '{"sequence":' in ours and '"type":"existing"' in ours, ours  # anybody may watch
    assert "srw-rw-rw- root" in ours
    for line in ("interface io.machined.Machine", "method Watch() -> (", "method Run(", "error Overflow(",
                 "error NotSupported()"):  # fmt: skip
        assert line in ours, ours
    assert "/run/machined" not in real


# A watcher, a container with a network namespace of its own: three addresses added at once (one
# burst), one removed; the daemon's fds before, while and after watching.
ADDRESSES = r"""
systemd-run --quiet --unit=ad-ns systemd-nspawn -q -D / --volatile=yes --private-network -M adns /bin/sleep 2996
until_listed adns
D=$(systemctl show -P MainPID machined.service)
L=$(machinectl show -p Leader --value adns)
# the daemon's NETLINK_ROUTE sockets subscribed to multicast groups, in its namespace and the container's
nl() {
  ls -l /proc/$D/fd | sed -n 's/.*socket:\[\([0-9]*\)\]$/\1/p' > /tmp/ad.inodes
  cat /proc/$D/net/netlink /proc/$L/net/netlink | awk 'NR==FNR {w[$1]=1; next} $2=="0" && $4!="00000000" && ($NF in w) {n++}
    END {print n+0}' /tmp/ad.inodes -
}
# (a first watcher, so that what the varlink server keeps once used is in the base: its epoll
# instance for the hang-ups of callers whose calls run)
timeout 1 $M events --json >/dev/null; sleep 0.5
echo "fds-before=$(ls /proc/$D/fd | wc -l) nl=$(nl)"
$M events --json > /tmp/ad.json 2>&1 & W=$!
for _ in $(seq 100); do grep -q '"adns"' /tmp/ad.json && break; sleep 0.05; done
sleep 0.5
echo "fds-watching=$(ls /proc/$D/fd | wc -l) nl=$(nl)"
nsenter -t $L -n ip -batch - <<'IP'
link add v0 type veth peer name v1
addr add 10.9.8.7/24 dev v0
addr add 10.9.8.8/24 dev v0
addr add 10.9.8.9/24 dev v1
IP
echo "add-rc=$?"
for _ in $(seq 100); do grep -q '10, 9, 8, 9\|10,9,8,9' /tmp/ad.json && break; sleep 0.05; done
sleep 0.5
nsenter -t $L -n ip addr del 10.9.8.9/24 dev v1; echo "del-rc=$?"
sleep 1
echo "ifindex=$(nsenter -t $L -n ip -o link show v0 | cut -d: -f1) $(nsenter -t $L -n ip -o link show v1 | cut -d: -f1)"
kill $W; wait $W 2>/dev/null
sleep 0.5
echo "fds-after=$(ls /proc/$D/fd | wc -l) nl=$(nl)"
machinectl terminate adns; gone adns
"""


def check_address_events(out: str, events: list[dict[str, object]]) -> None:
    """The address events a watcher saw of ADDRESSES's container (262 and 252 alike)."""
    assert _value(out, "add-rc") == "0" and _value(out, "del-rc") == "0", out
    v0, v1 = (int(i) for i in _value(out, "ifindex").split())
    changes = [e for e in events if e.get("name") == "adns" and e.get("changed") == ["addresses"]]
    seen = [[(a.get("ifindex"), a["family"], ".".join(map(str, a["address"]))) for a in e["addresses"]]  # type: ignore[attr-defined]
            for e in changes]  # fmt: skip
    three = [(v0, 2, "10.9.8.7"), (v0, 2, "10.9.8.8"), (v1, 2, "10.9.8.9")]
    # the burst (a link and three addresses from one process): one event (two if the reads fell
    # between its notices), the last with all three; then the one removed
    three.sort(key=lambda a: a[0])  # (ordered as List orders them: by interface, then address)
    assert 2 <= len(seen) <= 3 and seen[-2] == three, (seen, out)
    assert seen[-1] == [a for a in three if a[2] != "10.9.8.9"], (seen, out)
    assert all(e["type"] == "changed" and e["state"] == "running" and e["class"] == "container" for e in changes)
    numbers = [e["sequence"] for e in events if e.get("type") != "existing"]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers  # type: ignore[call-overload]
    # two subscribed netlink sockets while watched (.host's, the container's), none after; no fd
    # left behind (the total may also drop: what earlier tests left the daemon winds down meanwhile)
    (before, nl0), (_, nl1), (after, nl2) = (
        (int(n) for n in re.fullmatch(r"(\d+) nl=(\d+)", _value(out, f"fds-{w}")).groups())  # type: ignore[union-attr]
        for w in ("before", "watching", "after"))  # fmt: skip
    assert (nl0, nl1, nl2) == (0, 2, 0) and after <= before, out


def test_address_changes_are_events_while_watched(ours262: Sandbox) -> None:
    out = _run(ours262, ADDRESSES, timeout=120)
    events = [json.loads(line) for line in ours262.run(["cat", "/tmp/ad.json"]).stdout.splitlines()]
    check_address_events(out, events)


# .host as another user: PID 1 runs the command (a transient service with the caller's
# descriptors), machined waits for its end without a process of its own.
HOST_USER = r"""
echo "hu-id=$($M run --uid=nobody .host -- id -u)"
echo "hu-env=$($M run --uid=nobody --setenv=FOO=bar --chdir=/tmp .host -- sh -c 'echo $FOO.$(pwd).$USER')"
echo "hu-stdin=$(echo piped-in | $M run --uid=nobody .host -- cat)"
$M run --uid=nobody .host -- sh -c 'echo to-out; echo to-err >&2; exit 7' >/tmp/hu.out 2>/tmp/hu.err
echo "hu-rc7=$? out=$(cat /tmp/hu.out) err=$(cat /tmp/hu.err)"
$M run --uid=65534 .host -- sh -c 'kill -USR1 $$'; echo "hu-rcsig=$?"
$M run --uid=nosuchuser .host -- true; echo "hu-nouser-rc=$?"
$M run --uid=nobody .host -- /nonexistent; echo "hu-enoent-rc=$?"
$M run --uid=nobody .host -- sleep 2991 & R=$!
for _ in $(seq 100); do pgrep -u nobody -f '^sleep 2991' >/dev/null && break; sleep 0.05; done
D=$(systemctl show -P MainPID machined.service)
echo "hu-running=$(pgrep -c -u nobody -f '^sleep 2991') daemon-children=$(pgrep -c -P $D)"
kill -9 $R; wait $R 2>/dev/null; sleep 2
echo "hu-left=$(pgrep -c -f '^sleep 2991') units=$(systemctl list-units --all --no-legend 'machined-run-*' | wc -l)"
$M run --detach --uid=nobody .host -- sleep 2990; echo "hu-detach-rc=$?"
sleep 1; echo "hu-detached=$(pgrep -c -u nobody -f '^sleep 2990')"
systemctl stop 'machined-run-*'
sleep 0.5; echo "hu-units=$(systemctl list-units --all --no-legend 'machined-run-*' | wc -l)"
"""


def check_host_user(out: str) -> None:
    assert _value(out, "hu-id") == "65534", out
    assert _value(out, "hu-env") == "bar./tmp.nobody", out
    assert _value(out, "hu-stdin") == "piped-in", out
    assert _value(out, "hu-rc7") == "7 out=to-out err=to-err", out
    assert _value(out, "hu-rcsig") == str(128 + 10), out
    assert _value(out, "hu-nouser-rc") == "125" and "No user 'nosuchuser' in machine '.host'" in out, out
    assert _value(out, "hu-enoent-rc") == "127", out
    assert _value(out, "hu-running") == "1 daemon-children=0", out  # (PID 1's child, not ours)
    assert _value(out, "hu-left") == "0 units=0", out
    assert _value(out, "hu-detach-rc") == "0" and _value(out, "hu-detached") == "1", out
    assert _value(out, "hu-units") == "0", out


def test_run_on_the_host_as_another_user_through_pid1(ours262: Sandbox) -> None:
    check_host_user(_run(ours262, HOST_USER, timeout=120))

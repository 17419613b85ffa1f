"""io.machined.Machine (this project's own interface) on a systemd 252 host, on both cgroup
layouts (``make test`` runs this directory once with each): ``machined events`` through a
booted container's whole life (252's nspawn creates its scope through CreateMachine: opening,
then running), ``machined run`` in a booted container and in a plain -U one, in the leader's
cgroup of every hierarchy mounted (v1 ones too on the hybrid layout); and the unprivileged
caller refused as real 252 refuses its OpenMachineShell.
"""

from __future__ import annotations

import json
import re
import secrets
import sys

from machined.sandbox import Sandbox
from machined.sandbox.containers import BASH_FUNCTIONS
from tests.integration262.test_run_events262 import ADDRESSES, HOST_USER, check_address_events, check_host_user

M = f"{sys.executable} -m machined"
SOCKET = "/run/machined/io.machined.Machine"
# the booted container's name, new each run: its veth (ve-NAME) lives in the host's network, shared
# by every sandbox on the machine
BOOTED = f"rb{secrets.token_hex(2)}"


def _run(sb: Sandbox, script: str, timeout: float = 300) -> str:
    r = sb.run(["bash", "-c", BASH_FUNCTIONS + f"M='{M}'\n" + script], check=False, timeout=timeout)
    return r.stdout + r.stderr


def _value(out: str, key: str) -> str:
    found = re.findall(rf"^{re.escape(key)}=(.*)$", out, re.M)
    assert found, f"no {key}= in:\n{out}"
    return found[0]


SCENARIO = r"""
machinectl list >/dev/null
for _ in $(seq 100); do [ -S /run/machined/io.machined.Machine ] && break; sleep 0.05; done
$M events --json > /tmp/ev.json 2>&1 & W=$!
for _ in $(seq 100); do [ -s /tmp/ev.json ] && break; sleep 0.05; done
boot_container rb18
machinectl show rb18 >/dev/null 2>&1 || journalctl -u boot-rb18 --no-pager | tail -20
systemd-run --quiet --unit=run-nb systemd-nspawn -q -D / --volatile=yes -U --private-users-ownership=off --bind-ro=/etc/passwd \
  --bind-ro=/etc/group -M rp18 /bin/sleep 2999
until_listed rp18
for c in rb18 rp18; do
  L=$(machinectl show $c -p Leader --value)
  echo "$c stdin=$(echo piped-in | $M run $c -- cat)"
  $M run $c -- sh -c 'echo to-out; echo to-err >&2' > /tmp/o 2> /tmp/e; echo "$c rc0=$? out=$(cat /tmp/o) err=$(cat /tmp/e)"
  $M run $c -- sh -c 'exit 7'; echo "$c rc7=$?"
  $M run $c -- sh -c 'kill -TERM $$'; echo "$c rcsig=$?"
  echo "$c env=$($M run --setenv=FOO=bar --chdir=/usr/lib $c -- sh -c 'echo $FOO.$(pwd).$USER')"
  $M run $c -- sleep 3001 & R=$!
  for _ in $(seq 100); do C=$(pgrep -n -f '^sleep 3001') && break; sleep 0.05; done
  for ns in mnt pid net ipc uts user; do
    echo "$c ns-$ns=$([ "$(readlink /proc/$C/ns/$ns)" = "$(readlink /proc/$L/ns/$ns)" ] && echo same || echo differs)"
  done
  echo "$c cgroup2=$([ "$(grep ^0:: /proc/$C/cgroup)" = "$(grep ^0:: /proc/$L/cgroup)" ] && echo same || echo differs)"
  echo "$c cgroup-all=$(cmp -s /proc/$C/cgroup /proc/$L/cgroup && echo same || echo differs)"
  echo "$c in-machine=$(grep -c machine.slice /proc/$C/cgroup)"
  kill $C; wait $R
  $M run $c -- sh -c 'sleep 3002 & sleep 3003' & R=$!
  for _ in $(seq 100); do pgrep -f '^sleep 3003' >/dev/null && break; sleep 0.05; done
  kill -9 $R; wait $R 2>/dev/null; sleep 4
  echo "$c left=$(pgrep -c -f '^sleep 300[23]')"
done
echo "rp18 uid=$($M run --uid=daemon rp18 -- id -un)"
echo "layout=$(stat -f -c %T /sys/fs/cgroup)"
machinectl terminate rp18; gone rp18
stop_container rb18
sleep 0.5
kill $W
"""


def test_events_and_run_in_a_booted_and_a_plain_container(ours: Sandbox) -> None:
    out = _run(ours, SCENARIO.replace("rb18", BOOTED))
    for c in (BOOTED, "rp18"):
        assert f"{c} stdin=piped-in" in out, out
        assert f"{c} rc0=0 out=to-out err=to-err" in out, out
        assert f"{c} rc7=7" in out and f"{c} rcsig={128 + 15}" in out, out
        assert f"{c} env=bar./usr/lib.root" in out, out
        for ns in ("mnt", "pid", "net", "ipc", "uts", "user"):
            assert _value(out, f"{c} ns-{ns}") == "same", (ns, out)
        assert _value(out, f"{c} cgroup2") == "same", out
        if _value(out, "layout") == "tmpfs":  # hybrid: the v1 hierarchies (name=systemd, controllers) too
            assert _value(out, f"{c} cgroup-all") == "same", out
        assert int(_value(out, f"{c} in-machine")) >= 1, out
        assert _value(out, f"{c} left") == "0", out
    assert _value(out, "rp18 uid") == "daemon", out
    events = [json.loads(line) for line in ours.run(["cat", "/tmp/ev.json"]).stdout.splitlines()]
    stream = [e for e in events if e["type"] != "existing"]
    assert [e["sequence"] for e in stream] == list(range(stream[0]["sequence"], stream[0]["sequence"] + len(stream)))
    for name in (BOOTED, "rp18"):
        life = [(e["type"], e["state"]) for e in stream if e["name"] == name]
        assert life == [("new", "opening"), ("state", "running"), ("state", "closing"), ("removed", "closing")], (
            name, life,
        )  # fmt: skip
    booted = next(e for e in stream if e["name"] == BOOTED)
    assert booted["unit"] == f"machine-{BOOTED}.scope" and booted["service"] == "systemd-nspawn", booted


# A raw varlink call by the system's python (an unprivileged user cannot run the project's).
RAW = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(sys.argv[1])
s.sendall(json.dumps({"method": sys.argv[2], "parameters": json.loads(sys.argv[3]),
                      **({"more": True} if sys.argv[4:] else {})}).encode() + b"\0")
buf = b""
while b"\0" not in buf:
    buf += s.recv(65536)
print(buf.split(b"\0")[0].decode())
"""

UNPRIVILEGED = r"""
cat > /tmp/raw.py <<'PYEOF'
RAWTEXT
PYEOF
systemd-run --quiet --unit=np-ns systemd-nspawn -q -D / --volatile=yes -M np /bin/sleep 2997
until_listed np
NB="setpriv --reuid=65534 --regid=65534 --clear-groups"
echo "shell=$($NB busctl call org.freedesktop.machine1 /org/freedesktop/machine1 \
  org.freedesktop.machine1.Manager OpenMachineShell sssasas np root /bin/true 0 0 2>&1)"
if [ -S /run/machined/io.machined.Machine ]; then
  echo "run=$($NB /usr/bin/python3 /tmp/raw.py /run/machined/io.machined.Machine io.machined.Machine.Run \
    '{"name":"np","command":["/bin/true"]}')"
  echo "watch=$($NB /usr/bin/python3 /tmp/raw.py /run/machined/io.machined.Machine io.machined.Machine.Watch '{}' more)"
fi
machinectl terminate np; gone np
"""

# What upstream's D-Bus refusal is over varlink (as systemd 262's Open answers what its OpenMachineShell does).
AS_VARLINK = {
    "Interactive authentication required.": "io.systemd.InteractiveAuthenticationRequired",
    "Access denied": "org.varlink.service.PermissionDenied",
}


def test_nobody_is_refused_as_upstream_refuses_its_shell(ours: Sandbox, real: Sandbox) -> None:
    script = UNPRIVILEGED.replace("RAWTEXT", RAW)
    real_out, ours_out = (_run(sb, script, timeout=120) for sb in (real, ours))
    refusal = _value(real_out, "shell")
    assert _value(ours_out, "shell") == refusal  # (upstream's own call: ours answers it as 252)
    expected = next((v for k, v in AS_VARLINK.items() if k in refusal), None)
    assert expected is not None, refusal
    assert json.loads(_value(ours_out, "run")) == {"error": expected}, ours_out
    watch = json.loads(_value(ours_out, "watch"))
    assert watch["parameters"]["type"] == "existing" and watch["continues"] is True, ours_out


def test_address_changes_are_events_while_watched(ours: Sandbox) -> None:
    """As under 262 (test_run_events262): a burst of three addresses in a container's own network
    namespace makes one event, a removal another; the daemon's fds go back to their base."""
    out = _run(ours, ADDRESSES, timeout=120)
    events = [json.loads(line) for line in ours.run(["cat", "/tmp/ad.json"]).stdout.splitlines()]
    check_address_events(out, events)


def test_run_on_the_host_as_another_user_through_pid1(ours: Sandbox) -> None:
    """As under 262: .host as nobody, started by PID 1 (a transient service with the caller's
    descriptors); statuses, a signal, the caller killed, --detach."""
    check_host_user(_run(ours, HOST_USER, timeout=120))

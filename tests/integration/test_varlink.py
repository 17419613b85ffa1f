"""io.systemd.Machine over varlink in a sandbox with a real systemd, next to D-Bus: machines
registered over one transport are seen, and terminated, over the other (one core, two
front-ends). 252 has no such service, so ours is checked against 262's documented answers."""

from __future__ import annotations

from machined.sandbox import Sandbox
from tests.integration.differential import run

# vl METHOD JSON [more]: one varlink call on machined's socket, every reply on a line of its own.
CLIENT = r"""
vl() { python3 - "$@" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("/run/systemd/machine/io.systemd.Machine")
call = {"method": "io.systemd.Machine." + sys.argv[1], "parameters": json.loads(sys.argv[2])}
if len(sys.argv) > 3:
    call["more"] = True
s.sendall(json.dumps(call).encode() + b"\0")
buf = b""
while True:
    while b"\0" not in buf:
        data = s.recv(65536)
        if not data:
            sys.exit("connection closed")
        buf += data
    raw, buf = buf.split(b"\0", 1)
    reply = json.loads(raw)
    print(json.dumps(reply, sort_keys=True))
    if not reply.get("continues"):
        break
PY
}
"""


def test_varlink_and_dbus_share_one_registry(ours: Sandbox) -> None:
    out = run(
        ours,
        CLIENT
        + r"""
# machined is bus-activated here (the sandbox installs no machined.socket): wake it first
busctl call org.freedesktop.machine1 /org/freedesktop/machine1 org.freedesktop.DBus.Peer Ping >/dev/null
for _ in $(seq 100); do [ -S /run/systemd/machine/io.systemd.Machine ] && break; sleep 0.05; done
stat -c "%a %F" /run/systemd/machine/io.systemd.Machine; readlink /run/systemd/machine/io.systemd.MachineImage
readlink /run/varlink/registry/io.systemd.Machine
P=$(leader vl-l1)
vl Register "{\"name\":\"vl1\",\"class\":\"container\",\"leader\":$P,\"allocateUnit\":true,\"service\":\"t\"}"
vl Register "{\"name\":\"vl1\",\"class\":\"container\",\"leader\":$P,\"allocateUnit\":true}"
vl Register '{"name":"bad_name","class":"container"}'
echo "scope: $(systemctl is-active machine-vl1.scope) $(grep -q machine-vl1.scope /proc/$P/cgroup && echo leader-inside)"
machines
Q=$(leader vl-l2)
vl Register "{\"name\":\"vl2\",\"class\":\"vm\",\"leader\":$Q}"
vl List '{"name":"vl2"}' | python3 -c 'import json,sys; p=json.load(sys.stdin)["parameters"]; print(p["unit"], p["class"], p["leader"]["pid"] == '$Q')'
vl List '{}' more | python3 -c 'import json,sys; r=[json.loads(l) for l in sys.stdin]; print(sorted(x["parameters"]["name"] for x in r), [x.get("continues") for x in r])'
vl List '{}'
vl Kill '{"name":"vl1","signal":0}'
vl Terminate '{"name":"vl1"}'
for _ in $(seq 100); do busctl call org.freedesktop.machine1 /org/freedesktop/machine1 org.freedesktop.machine1.Manager GetMachine s vl1 >/dev/null 2>&1 || break; sleep 0.1; done
echo "after varlink Terminate: $(call GetMachine vl1)"
call UnregisterMachine vl2
vl List '{"name":"vl2"}'
vl Unregister '{"name":"vl2"}'
""",
    )
    lines = out.splitlines()
    assert lines[0] == "666 socket" and lines[1] == "/run/systemd/machine/io.systemd.Machine", out
    assert lines[2] == "/run/systemd/machine/io.systemd.Machine", out
    assert lines[3] == "{}", out
    assert lines[4] == '{"error": "io.systemd.Machine.MachineExists"}', out
    assert lines[5] == '{"error": "org.varlink.service.InvalidParameter", "parameters": {"parameter": "name"}}', out
    assert "scope: active leader-inside" in out, out
    assert "vl1 container t /org/freedesktop/machine1/machine/vl1" in out, out  # D-Bus ListMachines
    assert "vl-l2.service vm True" in out, out  # the leader's own unit, taken as it is
    assert "['.host', 'vl1', 'vl2'] [True, True, None]" in out, out
    assert '{"error": "org.varlink.service.ExpectedMore"}' in out, out
    assert '{"error": "org.varlink.service.InvalidParameter", "parameters": {"parameter": "signal"}}' in out, out
    assert "after varlink Terminate: Error: GDBus.Error:org.freedesktop.machine1.NoSuchMachine" in out, out
    assert out.rstrip().endswith(
        '{"error": "io.systemd.Machine.NoSuchMachine"}\n{"error": "io.systemd.Machine.NoSuchMachine"}'.split("\n")[-1]
    ), out
    assert out.count('{"error": "io.systemd.Machine.NoSuchMachine"}') == 2, out

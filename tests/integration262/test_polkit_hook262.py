"""262's polkit actions for unprivileged callers, io.systemd.Resolve.Hook, and socket activation:
ours against systemd-machined 262, with 262's own clients (varlinkctl, busctl, pkaction).

- An unprivileged caller (user nobody, no polkit agent) gets what 262 answers for varlink
  Register (register-machine, or create-machine with ``allocateUnit``), List with
  ``acquireMetadata`` (inspect-machines), image List with ``acquireMetadata`` (inspect-images)
  and D-Bus CreateMachine / RegisterMachine (which 262's bus policy lets through to polkit).
- The resolve hook answers A/AAAA for a container with addresses of its own, nothing for
  unknown names, NXDOMAIN below a machine's name, 262's errors for a VM and for a container
  without private networking, and pushes filter updates to a subscriber.
- Ours is started by the first varlink client through our socket unit, as 262's is by
  systemd-machined.socket.
"""

from __future__ import annotations

import difflib
import json
import re

import pytest

from machined.sandbox import Sandbox

V = "/run/systemd/machine/io.systemd.Machine"
H = "/run/systemd/resolve.hook/io.systemd.Machine"


def _mask(text: str) -> str:
    text = re.sub(r'"(pidfdId|realtime|monotonic|creationTimestamp|modificationTimestamp)":\d+', r'"\1":N', text)
    text = re.sub(r'"(id|bootId|machineId)":"[0-9a-f]{32}"', r'"\1":"<id>"', text)
    text = re.sub(r'"ifindex":\d+', '"ifindex":N', text)
    text = re.sub(r"sandbox-[0-9a-f]{8}", "sandbox-ID", text)
    return re.sub(r'"pid":\d+', '"pid":P', text)


def _sorted_filters(text: str) -> str:
    """filterDomains come in hash order (262's hashmap): compare them sorted."""

    def ordered(match: re.Match[str]) -> str:
        return '"filterDomains":[' + ",".join(sorted(match.group(1).split(","))) + "]"

    return re.sub(r'"filterDomains":\[([^\]]*)\]', ordered, text)


def _same(real262: Sandbox, ours262: Sandbox, script: str) -> str:
    outputs = []
    for sb in (real262, ours262):
        r = sb.run(["bash", "-c", script], check=False, timeout=300)
        outputs.append(_sorted_filters(_mask(r.stdout + "\n" + r.stderr)))
    real, ours = outputs
    if ours != real:
        diff = "".join(difflib.unified_diff(real.splitlines(True), ours.splitlines(True), "real", "ours"))
        pytest.fail(f"outputs differ:\n{diff}")
    return ours


def test_polkit_actions_as_262(real262: Sandbox, ours262: Sandbox) -> None:
    actions = [sb.run(["pkaction"]).stdout.split() for sb in (real262, ours262)]
    assert [a for a in actions[1] if "machine1" in a] == [a for a in actions[0] if "machine1" in a]
    for action in ("create-machine", "register-machine", "inspect-machines", "inspect-images", "manage-machines"):
        details = [sb.run(["pkaction", "--verbose", "--action-id", f"org.freedesktop.machine1.{action}"]).stdout
                   for sb in (real262, ours262)]  # fmt: skip
        keep = [
            [line for line in d.splitlines() if re.match(r"\s*(implicit|org\.freedesktop\.policykit\.imply)", line)]
            for d in details
        ]
        assert keep[1] == keep[0] and keep[0], details


UNPRIVILEGED = r"""
N="setpriv --reuid=nobody --regid=nogroup --clear-groups"
vc() { $N varlinkctl --json=short call "$@"; echo "rc=$?"; }
V=/run/systemd/machine/io.systemd.Machine
systemd-run --quiet --uid=nobody --unit=pk-l /bin/sleep 300; P=$(systemctl show -p MainPID --value pk-l)
vc $V io.systemd.Machine.Register "{\"name\":\"pk1\",\"class\":\"container\",\"leader\":$P}"
vc $V io.systemd.Machine.Register "{\"name\":\"pk1\",\"class\":\"vm\",\"leader\":$P,\"allocateUnit\":true}"
vc $V io.systemd.Machine.Register "{\"name\":\"pk1\",\"class\":\"container\",\"leader\":$P,\"allowInteractiveAuthentication\":true}"
vc $V io.systemd.Machine.List '{"name":".host","acquireMetadata":"yes"}'
vc $V io.systemd.Machine.List '{"name":"nope","acquireMetadata":"graceful"}'
vc $V io.systemd.Machine.List '{"name":"bad_name","acquireMetadata":"yes"}'
vc $V io.systemd.Machine.List '{"name":".host","acquireMetadata":"no"}'
vc --more $V io.systemd.Machine.List '{"acquireMetadata":"yes"}'
vc $V io.systemd.MachineImage.List '{"name":".host","acquireMetadata":"yes"}'
vc $V io.systemd.MachineImage.List '{"name":"nope","acquireMetadata":"graceful"}'
vc $V io.systemd.MachineImage.List '{"name":".host"}'
vc --more $V io.systemd.MachineImage.List '{"acquireMetadata":"graceful"}'
B="$N busctl call org.freedesktop.machine1 /org/freedesktop/machine1 org.freedesktop.machine1.Manager"
$B CreateMachine 'sayssusa(sv)' pk2 0 "" container $P "" 0; echo "rc=$?"
$B RegisterMachine sayssus pk2 0 "" vm $P ""; echo "rc=$?"
$B CreateMachineWithNetwork 'sayssusaia(sv)' pk2 0 "" container $P "" 0 0; echo "rc=$?"
$B RegisterMachineWithNetwork sayssusai pk2 0 "" container $P "" 0; echo "rc=$?"
$N busctl --allow-interactive-authorization=no call org.freedesktop.machine1 /org/freedesktop/machine1 \
  org.freedesktop.machine1.Manager RegisterMachine sayssus pk2 0 "" container $P ""; echo "rc=$?"
systemctl stop pk-l
machinectl list --no-legend
"""


def test_unprivileged_registration_and_metadata_as_262(real262: Sandbox, ours262: Sandbox) -> None:
    out = _same(real262, ours262, UNPRIVILEGED)
    assert out.count("io.systemd.InteractiveAuthenticationRequired") == 10, out
    assert out.count("interactive authentication has not been enabled by the calling program") == 5, out


HOOK = r"""
H=/run/systemd/resolve.hook/io.systemd.Machine
V=/run/systemd/machine/io.systemd.Machine
vc() { varlinkctl --json=short call "$@" 2>&1; echo "rc=$?"; }
rr() { vc $H io.systemd.Resolve.Hook.ResolveRecord "{\"question\":[$1]}"; }
varlinkctl call $V io.systemd.service.Ping '{}'
ls -l $H | cut -c1-10
varlinkctl --json=short info $H | sed 's/.*"interfaces"/"interfaces"/'
vc $H io.systemd.Resolve.Hook.QueryFilter '{}'
(timeout 6 varlinkctl --json=short call --more $H io.systemd.Resolve.Hook.QueryFilter '{}' > /tmp/sub.out; echo "sub rc=$?" >> /tmp/sub.out) &
sleep 1
# a container with a network namespace and addresses of its own
systemd-run --quiet --unit=hk-l1 unshare --net /bin/sleep 2990
for _ in $(seq 50); do P=$(systemctl show -p MainPID --value hk-l1); [ "$(readlink /proc/$P/ns/net)" != "$(readlink /proc/1/ns/net)" ] && break; sleep 0.1; done
T=$(cut -c1-6 /proc/sys/kernel/random/uuid)
ip link add hk$T type veth peer name hp$T
ip link set hp$T netns /proc/$P/ns/net
nsenter -t $P -n sh -c "ip link set lo up; ip link set hp$T name host0; ip link set host0 up; ip addr add 10.77.0.2/24 dev host0; ip addr add 10.77.0.3/24 dev host0; ip -6 addr add fd00:77::2/64 dev host0 nodad"
IDX=$(cat /sys/class/net/hk$T/ifindex)
vc $V io.systemd.Machine.Register "{\"name\":\"hk1\",\"class\":\"container\",\"leader\":$P,\"ifIndices\":[$IDX]}"
# a VM, and a container on the host's network
systemd-run --quiet --unit=hk-l2 /bin/sleep 2991; Q=$(systemctl show -p MainPID --value hk-l2)
vc $V io.systemd.Machine.Register "{\"name\":\"hk2\",\"class\":\"vm\",\"leader\":$Q}"
systemd-run --quiet --unit=hk-l3 /bin/sleep 2992; R=$(systemctl show -p MainPID --value hk-l3)
vc $V io.systemd.Machine.Register "{\"name\":\"hk3\",\"class\":\"container\",\"leader\":$R}"
vc $H io.systemd.Resolve.Hook.QueryFilter '{}'
# what List tells of the same addresses (with the interface index inside the container)
vc $V io.systemd.Machine.List '{"name":"hk1","acquireMetadata":"yes"}'
vc $V io.systemd.Machine.List '{"name":".host","acquireMetadata":"yes"}'
rr '{"key":{"class":1,"type":1,"name":"hk1"}},{"key":{"class":1,"type":28,"name":"hk1"}}'
rr '{"key":{"type":28,"name":"hk1"}},{"key":{"type":1,"name":"hk1"}},{"key":{"type":1,"name":"hk1"}}'
for n in hk1 HK1 hk1. a.hk1 a.b.hk1 nope "" . -a a_b 'a\\\\065' hk2 hk3 .host a..b; do
  echo "name=[$n]"; rr "{\"key\":{\"type\":1,\"name\":\"$n\"}}"
done
for k in '{"type":16,"name":"hk1"}' '{"type":16,"name":"hk2"}' '{"class":255,"type":1,"name":"hk1"}' \
         '{"type":0,"name":"x"}' '{"type":65536,"name":"x"}' '{"type":-1,"name":"x"}' '{"type":"28","name":"hk1"}' \
         '{"type":"x","name":"hk1"}' '{"class":null,"type":1,"name":"hk1"}' '{"type":1}' '{"type":1,"name":"x","y":2}'; do
  echo "key=$k"; rr "{\"key\":$k}"
done
vc $H io.systemd.Resolve.Hook.ResolveRecord '{"question":[]}'
vc $H io.systemd.Resolve.Hook.ResolveRecord '{}'
vc $H io.systemd.Resolve.Hook.ResolveRecord '{"question":null}'
vc $H io.systemd.Resolve.Hook.ResolveRecord '{"question":[{"foo":1}]}'
vc $H io.systemd.Resolve.Hook.ResolveRecord '{"question":[{"key":{"type":1,"name":"hk1"}}],"x":1}'
vc --more $H io.systemd.Resolve.Hook.ResolveRecord '{"question":[{"key":{"type":1,"name":"hk1"}}]}'
vc $H io.systemd.Resolve.Hook.QueryFilter '{"x":1}'
vc --oneway $H io.systemd.Resolve.Hook.QueryFilter '{}'
vc $H io.systemd.Resolve.Hook.Nope '{}'
vc $H io.systemd.service.Ping '{}'
vc $H io.systemd.Machine.List '{}'
for m in hk1 hk2 hk3; do vc $V io.systemd.Machine.Unregister "{\"name\":\"$m\"}"; sleep 0.3; done
wait
echo "== subscription"; cat /tmp/sub.out
systemctl stop hk-l1 hk-l2 hk-l3
ip link del hk$T 2>/dev/null
vc $H io.systemd.Resolve.Hook.QueryFilter '{}'
"""


def test_resolve_hook_as_262(real262: Sandbox, ours262: Sandbox) -> None:
    out = _same(real262, ours262, HOOK)
    assert '"address":[10,77,0,2]},"raw":"A2hrMQAAAQABAAAAAAAECk0AAg=="' in out, out
    assert '{"ifindex":N,"family":2,"address":[10,77,0,2]}' in out, out
    assert '{"rcode":3}' in out and "EOPNOTSUPP" in out and "ENONET" in out, out
    assert '{"filterDomains":["hk1","hk2","hk3"]}' in out, out
    # the subscriber heard of each machine coming and going
    subscription = out.split("== subscription")[1]
    assert subscription.count("filterDomains") >= 6 and "sub rc=124" in subscription, out


def test_interface_description_of_the_hook_as_262(real262: Sandbox, ours262: Sandbox) -> None:
    texts = []
    for sb in (real262, ours262):
        sb.run(["varlinkctl", "call", V, "io.systemd.service.Ping", "{}"])
        text = sb.run(["varlinkctl", "introspect", H, "io.systemd.Resolve.Hook"]).stdout
        # upstream's comments are prose, not API: compare everything else
        texts.append("\n".join(line for line in text.splitlines()
                               if not re.fullmatch(r"\t*# (?!\[(Supports|Requires) ).*", line)))  # fmt: skip
    assert texts[1] == texts[0] and "method ResolveRecord(" in texts[0]
    info = [json.loads(sb.run(["varlinkctl", "--json=short", "info", H]).stdout)["interfaces"]
            for sb in (real262, ours262)]  # fmt: skip
    assert info[1] == info[0] == ["io.systemd", "io.systemd.Resolve.Hook", "org.varlink.service"]


ACTIVATION = r"""
systemctl stop {service}
systemctl is-active {service} || true
systemctl is-active {socket}
ls -l /run/systemd/machine/ /run/varlink/registry/ | grep -i machine | sed 's/.* \(io\.systemd\)/\1/'
varlinkctl --json=short call --more /run/systemd/machine/io.systemd.Machine io.systemd.Machine.List '{{}}' \
  | sed 's/"id":"[0-9a-f]*",//; s/"pidfdId":[0-9]*,"bootId":"[0-9a-f]*"//; s/"realtime":[0-9]*/"realtime":N/; s/"monotonic":[0-9]*/"monotonic":N/'
systemctl is-active {service}
varlinkctl --json=short call /run/systemd/machine/io.systemd.MachineImage io.systemd.MachineImage.List '{{"name":".host"}}' \
  | sed 's/"creationTimestamp":[0-9]*/"creationTimestamp":N/'
busctl call org.freedesktop.machine1 /org/freedesktop/machine1 org.freedesktop.machine1.Manager ListMachines
"""


def test_started_by_socket_activation_as_262(real262: Sandbox, ours262: Sandbox) -> None:
    """A varlink client starts the daemon through the socket unit; the socket stays systemd's."""
    outputs = []
    for sb, service, sock in ((real262, "systemd-machined.service", "systemd-machined.socket"),
                              (ours262, "machined.service", "machined.socket")):  # fmt: skip
        r = sb.run(["bash", "-c", ACTIVATION.format(service=service, socket=sock)], check=False)
        outputs.append((r.stdout + r.stderr).replace(service, "SERVICE").replace(sock, "SOCKET"))
        started = sb.run(["systemctl", "show", "-P", "TriggeredBy", service]).stdout.split()
        assert sock in started, started
    assert outputs[1] == outputs[0], outputs
    assert outputs[0].splitlines()[:2] == ["inactive", "active"] and "\nactive\n" in outputs[0], outputs[0]


WITHOUT_SOCKET = r"""
systemctl stop {socket} {service}
rm -f /run/systemd/machine/*
busctl call org.freedesktop.machine1 /org/freedesktop/machine1 org.freedesktop.DBus.Peer Ping
echo "service $(systemctl is-active {service}), socket $(systemctl is-active {socket})"
ls -l /run/systemd/machine/ | sed -n 's/^\(.\).* \(io\.systemd\.[A-Za-z]*\).*/\1 \2/p'
for p in /run/systemd/machine/io.systemd.Machine /run/systemd/machine/io.systemd.MachineImage; do
  varlinkctl --json=short info $p | sed 's/.*"interfaces"/"interfaces"/'
  varlinkctl --json=short call $p io.systemd.MachineImage.List '{{"name":".host"}}' | sed 's/"creationTimestamp":[0-9]*/N/'
done
varlinkctl --json=short call /run/systemd/resolve.hook/io.systemd.Machine io.systemd.Resolve.Hook.QueryFilter '{{}}'
systemctl stop {service}
rm -f /run/systemd/machine/*
systemctl start {socket}
echo "service $(systemctl is-active {service}), socket $(systemctl is-active {socket})"
varlinkctl call /run/systemd/machine/io.systemd.Machine io.systemd.service.Ping '{{}}'; echo "ping rc=$?"
"""


def test_binds_its_sockets_itself_without_the_socket_unit_as_262(real262: Sandbox, ours262: Sandbox) -> None:
    """Started by the bus with the socket unit stopped, the daemon binds both names itself
    (two sockets, as 262), and the hook's; the socket unit takes over again afterwards."""
    outputs = []
    for sb, service, sock in ((real262, "systemd-machined.service", "systemd-machined.socket"),
                              (ours262, "machined.service", "machined.socket")):  # fmt: skip
        r = sb.run(["bash", "-c", WITHOUT_SOCKET.format(service=service, socket=sock)], check=False)
        outputs.append((r.stdout + r.stderr).replace(service, "SERVICE").replace(sock, "SOCKET"))
    assert outputs[1] == outputs[0], outputs
    lines = outputs[0].splitlines()
    assert lines[:3] == ["service active, socket inactive", "s io.systemd.Machine", "s io.systemd.MachineImage"]
    assert lines[-2:] == ["service inactive, socket active", "ping rc=0"], outputs[0]

"""Where ours answered unlike systemd-machined 262 (issue 20), and the classes of calls those
answers stand for, each compared with the real daemon in the 262 sandbox:

- every way io.systemd.Machine's lookups take a process (``pid``: a ProcessId with or without
  pidfd id and boot id, stale, foreign, absent, malformed), by List and the other lookups;
- Register's field checks and the pairs of fields it refuses together, in the order the
  caller sends them (262 dispatches the JSON object in its own order);
- looks inside a machine (OS release, addresses, UID shift, metadata) by an unprivileged
  caller over varlink, D-Bus and machinectl, with polkit saying no and saying yes, and the
  details polkit is asked with;
- ResolveRecord about several machines in one question (each machine's own addresses);
- image metadata errors for disk images that cannot be read (ENOPKG, ENXIO, ENOMEDIUM);
- ``.host``'s vsock CID (with /dev/vsock) and ``addresses`` left out when there are none;
- the interface description of every varlink interface served, byte for byte.

GetInfo's vendor, product, version and url are ours (README) and are left out of the comparison.
"""

from __future__ import annotations

import difflib
import json
import re
import sys

import pytest

from machined.sandbox import Sandbox

V = "/run/systemd/machine/io.systemd.Machine"

PRELUDE = r"""
V=/run/systemd/machine/io.systemd.Machine
busctl call org.freedesktop.machine1 /org/freedesktop/machine1 org.freedesktop.DBus.Peer Ping >/dev/null
for i in $(seq 100); do [ -S $V ] && break; sleep 0.05; done
vl() { echo "> $1 $2" | sed -E "s/\b$P\b/P/g; s/\b${Q:-QQ}\b/Q/g; s/\b${S:-SS}\b/S/g; s/\b${F:-FF}\b/F/g"; varlinkctl --json=short call $V "io.systemd.Machine.$1" "$2" 2>&1; echo "rc=$?"; }
raw() { # a call sent as written (varlinkctl sends a real as %.21e, which 262 reads back as an
  # integer or not depending on the value: 1.234560000000000000000e+05 is 123456.00000000001)
  echo "> $1 $2" | sed -E "s/\b$P\b/P/g; s/\b${Q:-QQ}\b/Q/g"
  "PYTHON" -c 'import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b"{\"method\":\"io.systemd.Machine.%s\",\"parameters\":%s}\0" % (sys.argv[2].encode(), sys.argv[3].encode()))
d = b""
while not d.endswith(b"\0"):
    c = s.recv(65536)
    if not c:
        break
    d += c
print(d.rstrip(b"\0").decode())' $V "$1" "$2"; }
leader() { systemd-run --quiet --unit=$1 "${@:2}"; for i in $(seq 100); do L=$(systemctl show -p MainPID --value $1); [ "$L" != 0 ] && break; sleep 0.05; done; }
""".replace("PYTHON", sys.executable)


def _mask(text: str) -> str:
    """Values that differ between any two runs masked; the calls ("> …" lines) are kept as sent."""
    return "".join(line if line.startswith("> ") else _mask_line(line) for line in text.splitlines(True))


def _mask_line(text: str) -> str:
    text = re.sub(r'"(pidfdId|realtime|monotonic|creationTimestamp|modificationTimestamp)":\d+', r'"\1":N', text)
    text = re.sub(r'"(id|bootId|machineId)":"[0-9a-f]{32}"', r'"\1":"<id>"', text)
    text = re.sub(r'"(pid|ifindex)":\d+', r'"\1":N', text)
    text = re.sub(r"sandbox-[0-9a-f]{8}", "sandbox-ID", text)
    text = re.sub(r"\.host\([0-9a-f]{32}\)", ".host(ID)", text)
    text = re.sub(r"^(\s+)(Since|Leader|Superv\.|Unit|Timestamp):.*", r"\1\2: X", text)
    text = re.sub(r"^\s+[└├│].*\n", "", text)  # machinectl status: the processes of the unit
    return text


def _same(real262: Sandbox, ours262: Sandbox, script: str, timeout: int = 240, retry_on: str = "") -> str:
    """*script*'s masked output, the same from both daemons (else the test fails with the diff).
    If it differs while *retry_on* shows in either (a resource other tests share and hold for a
    while), it is run once more; still so, the test is skipped, saying why."""
    for attempt in (1, 2):
        outputs = []
        for sb in (real262, ours262):
            r = sb.run(["bash", "-c", PRELUDE + script], check=False, timeout=timeout)
            outputs.append(_mask(r.stdout + "\n" + r.stderr))
        real, ours = outputs
        if ours == real or not retry_on or retry_on not in real + ours:
            break
        if attempt == 2:
            pytest.skip(f"{retry_on} in both runs (a resource shared with other tests was busy)")
    if ours != real:
        diff = "".join(difflib.unified_diff(real.splitlines(True), ours.splitlines(True), "real", "ours"))
        pytest.fail(f"outputs differ:\n{diff}")
    return ours


BOOT1 = "00000000000000000000000000000001"

LOOKUPS = r"""
leader px-l /bin/sleep 2990; P=$L
leader px-o /bin/sleep 2991; S=$L
vl Register "{\"name\":\"px1\",\"class\":\"container\",\"leader\":$P}"
F=$(varlinkctl --json=short call $V io.systemd.Machine.List '{"name":"px1"}' | grep -o '"pidfdId":[0-9]*' | head -1 | cut -d: -f2)
B=$(tr -d - < /proc/sys/kernel/random/boot_id)
for p in "{\"pid\":$P}" "{\"pid\":$P,\"pidfdId\":$F}" "{\"pid\":$P,\"pidfdId\":12345}" "{\"pid\":$P,\"bootId\":\"$B\"}" \
  "{\"pid\":$P,\"bootId\":\"BOOT1\"}" "{\"pid\":$P,\"pidfdId\":$F,\"bootId\":\"BOOT1\"}" \
  "{\"pid\":$P,\"pidfdId\":12345,\"bootId\":\"$B\"}" "{\"pid\":$P,\"bootId\":\"00000000-0000-0000-0000-000000000000\"}" \
  "{\"pid\":$P,\"bootId\":\"$(cat /proc/sys/kernel/random/boot_id)\"}" "{\"pid\":$P,\"bootId\":null}" \
  "{\"pid\":$P,\"pidfdId\":null}" "{\"pid\":$P,\"pidfdId\":0}" "{\"pid\":$P,\"pidfdId\":\"$F\"}" "{\"pid\":\"$P\"}" \
  '{"pid":999999}' '{"pid":999999,"pidfdId":5}' '{"pid":4194305}' '{"pid":2147483647}' '{"pid":2147483648}' \
  '{"pid":0}' '{"pid":0,"pidfdId":0}' '{"pid":0,"pidfdId":5}' "{\"pid\":0,\"bootId\":\"$B\"}" '{"pid":-1}' '{"pid":1}' \
  "$P" "\"$P\"" 0 '"x"' '[]' '{}' '{"pidfdId":3}' "{\"pid\":$P,\"bootId\":\"zz\"}" "{\"pid\":$P,\"bootId\":5}" \
  "{\"pid\":$P,\"pidfdId\":-1}" "{\"pid\":$P,\"pidfdId\":\"x\"}" "{\"pid\":$P,\"x\":1}" "{\"pid\":$S}" "{\"pid\":null}"; do
  vl List "{\"pid\":$p}"
done
vl List "{\"name\":\"px1\",\"pid\":{\"pid\":$S}}"
vl List "{\"name\":\".host\",\"pid\":{\"pid\":$P}}"
vl List "{\"name\":\"px1\",\"pid\":{\"pid\":$P,\"bootId\":\"BOOT1\"}}"
vl List "{\"name\":\"px1\",\"pid\":{\"pid\":999999}}"
vl List "{\"name\":\"px1\",\"pid\":{\"pid\":$P,\"pidfdId\":12345}}"
vl Kill "{\"pid\":{\"pid\":999999},\"signal\":0}"
vl Kill "{\"pid\":{\"pid\":$P,\"bootId\":\"BOOT1\"},\"signal\":18}"
vl Kill "{\"pid\":{\"pid\":$P,\"pidfdId\":12345},\"signal\":18}"
vl MapFrom "{\"pid\":{\"pid\":999999},\"uid\":0}"
vl Open "{\"pid\":{\"pid\":999999},\"mode\":\"tty\"}"
raw List "{\"pid\":{\"pid\":$P.0}}"
raw List "{\"pid\":{\"pid\":$P.0e0}}"
vl List "{\"pid\":{\"pid\":$P.5}}"
vl List '{"pid":{"pid":123456.0}}'
vl List '{"pid":{"pid":103866.0}}'
vl List '{"pid":{"pid":20035.0}}'
vl Kill "{\"name\":\"px1\",\"signal\":18.0}"
vl Kill "{\"name\":\"px1\",\"signal\":1.8e1}"
vl Kill "{\"name\":\"px1\",\"signal\":18.5}"
vl MapTo '{"uid":1e6}'
vl Terminate "{\"pid\":{\"pid\":$P,\"bootId\":\"BOOT1\"}}"
vl Unregister "{\"pid\":{\"pid\":$P,\"pidfdId\":12345}}"
vl List "{\"pid\":{\"pid\":$P}}"
systemctl stop px-l px-o
""".replace("BOOT1", BOOT1)


def test_process_lookups_as_262(real262: Sandbox, ours262: Sandbox) -> None:
    out = _same(real262, ours262, LOOKUPS)
    # the rows of the issue: a wrong pidfd id still finds the process's machine, another boot's
    # process none, a PID without a process is no machine (not a bad parameter)
    blocks = dict(re.findall(r"> List (\{.*\})\n(.*)\n", out))
    assert blocks['{"pid":{"pid":P,"pidfdId":12345}}'].startswith('{"name":"px1"'), out
    assert blocks['{"pid":{"pid":P,"bootId":"' + BOOT1 + '"}}'].endswith("NoSuchMachine"), out
    assert blocks['{"pid":{"pid":999999}}'].endswith("NoSuchMachine"), out
    assert blocks['{"pid":{"pid":0,"pidfdId":5}}'].endswith("Invalid argument"), out
    # an integral real sent as written finds the process's machine; varlinkctl sends reals as
    # %.21e, which sd-json reads back digit by digit: for these PIDs not an integer, a bad
    # parameter (for $P.0 it would depend on the PID, about one in seven refused, so that the
    # two sandboxes' answers differed: the PID is sent raw)
    assert blocks['{"pid":{"pid":P.0}}'].startswith('{"parameters":{"name":"px1"'), out
    assert blocks['{"pid":{"pid":P.0e0}}'].startswith('{"parameters":{"name":"px1"'), out
    assert blocks['{"pid":{"pid":123456.0}}'].endswith("Invalid argument"), out
    assert blocks['{"pid":{"pid":103866.0}}'].endswith("Invalid argument"), out
    assert blocks['{"pid":{"pid":20035.0}}'].endswith("NoSuchMachine"), out


REGISTER = r"""
leader rg-m /bin/sleep 2991; Q=$L
B=$(tr -d - < /proc/sys/kernel/random/boot_id)
R() { leader rg-$1 /bin/sleep 2990; P=$L; local t=${2//@P/$P}; t=${t//@Q/$Q}; t=${t//@B/$B}
  ${3:-vl} Register "{\"name\":\"rg$1\",\"class\":\"container\"$t}"
  varlinkctl --json=short call --more $V io.systemd.Machine.List '{}' 2>&1 | grep -o '"name":"[^".]*"' | tr '\n' ' '; echo
  for m in $(machinectl list --no-legend | awk '{print $1}' | grep -v '^\.host$'); do
    varlinkctl call $V io.systemd.Machine.Unregister "{\"name\":\"$m\"}"; done
  systemctl stop rg-$1; }
R 1 ',"leader":@P,"leaderProcessId":{"pid":@Q}'
R 2 ',"leaderProcessId":{"pid":@Q},"leader":@P'
R 3 ',"leader":@P,"leaderProcessId":{"pid":@P}'
R 4 ',"leaderProcessId":{"pid":@P,"pidfdId":12345}'
R 5 ',"leaderProcessId":{"pid":@P,"bootId":"00000000000000000000000000000001"}'
R 6 ',"leaderProcessId":{"pid":@P,"bootId":"@B"}'
R 7 ',"leaderProcessId":{"pid":999999}'
R 8 ',"leader":999999'
R 9 ',"leader":"@P"'
R 10 ',"leader":{"pid":@P}'
R 11 ',"leader":0'
R 12 ',"leaderProcessId":{"pid":0}'
R 13 ',"leader":-5'
R 14 ',"leader":1'
R 15 ',"leaderProcessId":{"pid":1}'
R 16 ',"leader":@P,"leaderProcessId":null'
R 17 ',"leader":null,"leaderProcessId":{"pid":@P}'
R 18 ',"leaderProcessId":{"pid":@P},"leader":null'
R 19 ',"leaderProcessId":{"pid":"@P"}'
R 20 ',"leaderProcessId":{"pid":@P,"bootId":null}'
R 21 ',"leaderProcessId":{"pid":@P,"pidfdId":null}'
R 22 ',"leaderProcessId":{"pid":@P,"x":1}'
R 23 ',"leaderProcessId":5'
R 24 ',"leader":@P,"supervisor":@Q,"supervisorProcessId":{"pid":999999,"bootId":"x"}'
R 25 ',"leader":@P,"supervisor":"x"'
R 26 ',"leader":@P,"service":"a\u0001b\n\t"'
R 27 ',"leader":@P,"service":""'
R 28 ',"leader":@P,"rootDirectory":"rel"'
R 29 ',"leader":@P,"rootDirectory":"/a/../b"'
R 30 ',"leader":@P,"rootDirectory":"/a//b"'
R 31 ',"leader":@P,"rootDirectory":""'
R 32 ',"leader":@P,"rootDirectory":"/a/./b"'
R 33 ',"leader":@P,"rootDirectory":"/a/b/"'
R 34 ',"leader":@P,"vSockCid":0'
R 35 ',"leader":@P,"vSockCid":2'
R 36 ',"leader":@P,"vSockCid":3'
R 37 ',"leader":@P,"vSockCid":4294967295'
R 38 ',"leader":@P,"vSockCid":4294967296'
R 39 ',"leader":@P,"vSockCid":-1'
R 40 ',"leader":@P,"vSockCid":"7"'
R 41 ',"leader":@P,"sshPrivateKeyPath":"rel/key"'
R 42 ',"leader":@P,"sshPrivateKeyPath":"/a/../key"'
R 43 ',"leader":@P,"sshPrivateKeyPath":""'
R 44 ',"leader":@P,"sshPrivateKeyPath":"/a//key/"'
R 45 ',"leader":@P,"ifIndices":[0]'
R 46 ',"leader":@P,"ifIndices":[2147483647]'
R 47 ',"leader":@P,"ifIndices":[2147483648]'
R 48 ',"leader":@P,"ifIndices":["1"]'
R 49 ',"leader":@P,"ifIndices":[]'
R 50 ',"leader":@P,"ifIndices":5'
R 51 ',"leader":@P,"controlAddress":"rel"'
R 52 ',"leader":@P,"controlAddress":"/a//b"'
R 53 ',"leader":@P,"controlAddress":""'
R 54 ',"leader":@P,"id":"zz"'
R 55 ',"leader":@P,"id":""'
R 56 ',"leader":@P,"id":"00000000-0000-0000-0000-000000000001"'
R 57 ',"leader":@P,"allocateUnit":"yes"'
R 58 ',"leader":@P,"extra":1'
R 59 ',"leader":@P,"sshAddress":5'
R 60 ',"vSockCid":0,"rootDirectory":"rel","leader":@P'
R 61 ',"rootDirectory":"rel","vSockCid":0,"leader":@P'
R 62 ',"vSockCid":0,"leader":999999'
R 63 ',"leader":999999,"vSockCid":0'
R 64 ',"leader":@P.0,"vSockCid":1e1,"ifIndices":[1e0]' raw  # (varlinkctl: P.0 sent as %.21e, refused for some P)
R 65 ',"leader":@P,"ifIndices":[1.5]'
i=70
for f in id service rootDirectory ifIndices vSockCid sshAddress sshPrivateKeyPath controlAddress allocateUnit \
         supervisor supervisorProcessId leaderProcessId allowInteractiveAuthentication; do
  i=$((i+1)); R $i ',"leader":@P,"'$f'":null'
done
leader rg-x /bin/sleep 2990; P=$L
vl Register "{\"id\":\"zz\",\"name\":\"x_y\",\"class\":\"container\"}"
vl Register "{\"class\":\"nope\",\"name\":\"x_y\",\"leader\":$P}"
vl Register "{\"name\":\"x_y\",\"class\":\"host\",\"leader\":$P}"
vl Register "{\"class\":\"host\",\"name\":\"x_y\",\"leader\":$P}"
vl Register "{\"leader\":$P,\"ifIndices\":[0],\"name\":\"x\",\"class\":\"vm\"}"
vl Register "{\"name\":\"$(printf 'a%.0s' $(seq 65))\",\"class\":\"container\",\"leader\":$P}"
vl Register "{\"name\":\"-a\",\"class\":\"container\",\"leader\":$P}"
vl Register "{\"name\":\".host\",\"class\":\"container\",\"leader\":$P}"
vl Register "{\"name\":\"a..b\",\"class\":\"container\",\"leader\":$P}"
vl Register "{\"name\":\"\",\"class\":\"container\",\"leader\":$P}"
vl Register "{\"name\":\"x\",\"class\":\"container\",\"leader\":$P,\"service\":\"a b\\u007f\"}"
systemctl stop rg-x rg-m
"""


def test_register_checks_as_262(real262: Sandbox, ours262: Sandbox) -> None:
    out = _same(real262, ours262, REGISTER, timeout=400)
    assert 'leaderProcessId":{"pid":Q}}\nMethod call io.systemd.Machine.Register() failed: Invalid argument\n' \
           '{"parameter":"leaderProcessId"}' in out, out  # fmt: skip
    assert out.count('"name":"rg') >= 10, out  # some registrations are accepted


IMAGES = r"""
I=/run/systemd/machine/io.systemd.MachineImage
cd /var/lib/machines
# no loop device to be had at all (other tests hold them): say so, the test is skipped
head -c 1048576 /dev/zero > probe.img; D=$(losetup -f --show probe.img 2>/dev/null) && losetup -d $D || echo NO-LOOP
rm -f probe.img
head -c 1048576 /dev/zero > zero.raw
: > empty.raw
head -c 1048576 /dev/urandom > rand.raw
head -c 8388608 /dev/zero > ext4.raw; mkfs.ext4 -q ext4.raw
head -c 8388608 /dev/zero > gpt.raw; echo 'label: gpt' | sfdisk -q gpt.raw
head -c 8388608 /dev/zero > os.raw; mkfs.ext4 -q os.raw; mkdir -p /tmp/m; mount -o loop os.raw /tmp/m
mkdir -p /tmp/m/etc; printf 'ID=test\nNAME=Test\n' > /tmp/m/etc/os-release; echo testhost > /tmp/m/etc/hostname; umount /tmp/m
for n in zero empty rand ext4 gpt os; do for m in yes graceful; do
  echo "> $n $m"; varlinkctl --json=short call $I io.systemd.MachineImage.List "{\"name\":\"$n\",\"acquireMetadata\":\"$m\"}" 2>&1 \
    | sed -E 's/"(usage|usageExclusive)":[0-9]+/"\1":N/g'; echo "rc=$?"
done; done
# (262 dissects in a child; a second look at once may find the image still busy: EBUSY)
for n in zero empty rand ext4 gpt os; do
  sleep 1; echo "> $n"
  busctl call org.freedesktop.machine1 /org/freedesktop/machine1 org.freedesktop.machine1.Manager GetImageOSRelease s $n 2>&1
done
rm -f /var/lib/machines/*.raw
"""


def test_image_metadata_errors_as_262(real262: Sandbox, ours262: Sandbox) -> None:
    # (disk images need loop devices, which the sandboxes share with the host and its other
    # tests: when none is free both daemons answer EBUSY, not necessarily at the same calls.
    # Run before the looks below: after them, in the same sandboxes, loop devices were busy
    # for both daemons every time; why is not known)
    out = _same(real262, ours262, IMAGES, retry_on="EBUSY")
    if "NO-LOOP" in out or ("EBUSY" in out and '"errnoName":"ENOPKG"' not in out):  # (alike: no loop device free)
        pytest.skip("no loop device free: both daemons answered EBUSY throughout")
    for errno_name in ("ENOPKG", "ENXIO", "ENOMEDIUM"):
        assert f'"errnoName":"{errno_name}"' in out, out
    assert '"hostname":"testhost"' in out, out


LOOKS = r"""
N="setpriv --reuid=nobody --regid=nogroup --clear-groups"
M="org.freedesktop.machine1 /org/freedesktop/machine1 org.freedesktop.machine1.Manager"
r() { echo "> $*" | sed "s/$N/N/; s/\b$P\b/P/g"; "$@" 2>&1 | sed -E '/CGroup:/,$d'; echo "rc=${PIPESTATUS[0]}"; }
leader lk-l unshare --net /bin/sleep 2990; P=$L
for i in $(seq 50); do [ "$(readlink /proc/$P/ns/net)" != "$(readlink /proc/1/ns/net)" ] && break; sleep 0.1; done
varlinkctl call $V io.systemd.Machine.Register "{\"name\":\"lk1\",\"class\":\"container\",\"leader\":$P}"
leader lk-v /bin/sleep 2990; Q=$L
varlinkctl call $V io.systemd.Machine.Register "{\"name\":\"lk2\",\"class\":\"vm\",\"leader\":$Q}"
looks() {
  r $N machinectl list
  r $N machinectl status lk1
  r $N machinectl status lk2
  for m in lk1 lk2 .host nope; do
    for a in yes graceful; do r $N varlinkctl --json=short call $V io.systemd.Machine.List "{\"name\":\"$m\",\"acquireMetadata\":\"$a\"}"; done
    r $N busctl call $M GetMachineOSRelease s $m
    r $N busctl call $M GetMachineUIDShift s $m
  done
  r $N busctl call $M GetMachineAddresses s lk1
  r $N busctl call $M GetMachineAddresses s .host
  r $N machinectl status .host
  r $N busctl call $M GetMachineAddresses s lk2
  r $N busctl --allow-interactive-authorization=no call org.freedesktop.machine1 /org/freedesktop/machine1/machine/lk1 org.freedesktop.machine1.Machine GetOSRelease
  r $N busctl call org.freedesktop.machine1 /org/freedesktop/machine1/machine/lk1 org.freedesktop.machine1.Machine GetUIDShift
  r $N varlinkctl --json=short call --more $V io.systemd.Machine.List '{"acquireMetadata":"graceful"}' | sort
  r $N varlinkctl --json=short call $V io.systemd.Machine.List "{\"pid\":{\"pid\":$P},\"acquireMetadata\":\"yes\"}"
  r $N varlinkctl --json=short call /run/systemd/machine/io.systemd.MachineImage io.systemd.MachineImage.List '{"name":".host","acquireMetadata":"yes"}'
  r $N busctl call $M GetImageOSRelease s .host
}
echo "=== polkit says no"
looks
mount -t tmpfs tmpfs /etc/polkit-1/rules.d
cat > /etc/polkit-1/rules.d/00-inspect.rules <<'RULE'
polkit.addRule(function(action, subject) {
    if (subject.user != "nobody" || action.id.indexOf("org.freedesktop.machine1.inspect-") != 0) return;
    polkit.spawn(["/usr/bin/logger", "-t", "pkasked", action.id + " machine=" + action.lookup("machine") +
                  " name=" + action.lookup("name") + " verb=" + action.lookup("verb")]);
    return polkit.Result.YES;
});
RULE
systemctl restart polkit
echo "=== polkit says yes"
T=$(date +%s)
looks
sleep 1
echo "=== asked"
journalctl --no-pager -q -t pkasked --since=@$T -o cat | sort  # (machinectl asks for all machines at once)
umount /etc/polkit-1/rules.d; systemctl restart polkit
varlinkctl call $V io.systemd.Machine.Unregister '{"name":"lk1"}'; varlinkctl call $V io.systemd.Machine.Unregister '{"name":"lk2"}'
systemctl stop lk-l lk-v
"""


def test_unprivileged_looks_inside_as_262(real262: Sandbox, ours262: Sandbox) -> None:
    out = _same(real262, ours262, LOOKS, timeout=300)
    no, yes = out.split("=== polkit says yes")
    # refused: no OS in machinectl's table, D-Bus OS release asks polkit first (a VM too)
    assert "lk1     container -       -  -       -" in no, out
    assert no.count("interactive authentication has not been enabled by the calling program") >= 4, out
    assert "lk1     container -       debian" in yes, out
    asked = yes.split("=== asked")[1]
    assert "inspect-machines machine=lk1 name=undefined verb=get_os_release" in asked, out
    assert "inspect-machines machine=undefined name=n/a verb=undefined" in asked, out
    assert "inspect-images machine=undefined name=.host verb=undefined" in asked, out


HOOK = r"""
H=/run/systemd/resolve.hook/io.systemd.Machine
rr() { echo "> $1"; varlinkctl --json=short call $H io.systemd.Resolve.Hook.ResolveRecord "{\"question\":[$1]}" 2>&1; echo "rc=$?"; }
mk() { # name unit address: a container with a network of its own
  leader $2 unshare --net /bin/sleep 2990
  for _ in $(seq 50); do [ "$(readlink /proc/$L/ns/net)" != "$(readlink /proc/1/ns/net)" ] && break; sleep 0.1; done
  T=$(cut -c1-6 /proc/sys/kernel/random/uuid)
  ip link add h$T type veth peer name p$T
  ip link set p$T netns /proc/$L/ns/net
  nsenter -t $L -n sh -c "ip link set lo up; ip link set p$T name host0; ip link set host0 up; ip addr add $3/24 dev host0"
  varlinkctl call $V io.systemd.Machine.Register \
    "{\"name\":\"$1\",\"class\":\"container\",\"leader\":$L,\"ifIndices\":[$(cat /sys/class/net/h$T/ifindex)]}"
}
mk ha ha-l 10.78.0.2
mk hb hb-l 10.79.0.2
leader hc-l unshare --net /bin/sleep 2990; sleep 0.3
varlinkctl call $V io.systemd.Machine.Register "{\"name\":\"hc\",\"class\":\"container\",\"leader\":$L}"
leader hd-l /bin/sleep 2990
varlinkctl call $V io.systemd.Machine.Register "{\"name\":\"hd\",\"class\":\"vm\",\"leader\":$L}"
rr '{"key":{"type":1,"name":"ha"}},{"key":{"type":1,"name":"hb"}}'
rr '{"key":{"type":1,"name":"hb"}},{"key":{"type":1,"name":"ha"}}'
rr '{"key":{"type":16,"name":"ha"}},{"key":{"type":1,"name":"hb"}}'
rr '{"key":{"type":1,"name":"ha"}},{"key":{"type":1,"name":"nope"}},{"key":{"type":1,"name":"x.hb"}}'
rr '{"key":{"type":1,"name":"hc"}},{"key":{"type":1,"name":"ha"}}'
rr '{"key":{"type":1,"name":"ha"}},{"key":{"type":1,"name":"hd"}}'
rr '{"key":{"type":16,"name":"hd"}},{"key":{"type":16,"name":"ha"}}'
rr '{"key":{"type":1,"name":"x.ha"}},{"key":{"type":1,"name":"x.hb"}}'
# a container without addresses: no "addresses" key, whether asked for metadata or gracefully
vl List '{"name":"hc","acquireMetadata":"yes"}'
vl List '{"name":"hc","acquireMetadata":"graceful"}'
vl List '{"name":"hd","acquireMetadata":"graceful"}'
for m in ha hb hc hd; do varlinkctl call $V io.systemd.Machine.Unregister "{\"name\":\"$m\"}"; done
systemctl stop ha-l hb-l hc-l hd-l
"""


def test_resolve_record_for_several_machines_as_262(real262: Sandbox, ours262: Sandbox) -> None:
    out = _same(real262, ours262, HOOK)
    assert '"name":"hb"},"address":[10,79,0,2]}' in out and '"name":"ha"},"address":[10,78,0,2]}' in out, out
    assert '"errnoName":"EOPNOTSUPP"' in out and '"addresses"' not in out, out


HOST = r"""
vl List '{"name":".host"}'
vl List '{"name":".host","acquireMetadata":"graceful"}' | grep -o '"vSockCid":[0-9]*'
busctl get-property org.freedesktop.machine1 /org/freedesktop/machine1/machine/_2ehost org.freedesktop.machine1.Machine VSockCID
"""


def test_host_vsock_cid_as_262(real262: Sandbox, ours262: Sandbox) -> None:
    """With AF_VSOCK (/dev/vsock made in the sandbox, the daemon restarted) ``.host`` has the
    loopback CID 1; without it none."""
    outputs = []
    for sb, unit in ((real262, "systemd-machined"), (ours262, "machined")):
        parts = []
        for prepare in (f"rm -f /dev/vsock; systemctl stop {unit}",
                        f"mknod /dev/vsock c 10 258; systemctl stop {unit}",
                        f"rm -f /dev/vsock; systemctl stop {unit}"):  # fmt: skip
            sb.run(["bash", "-c", prepare], check=False)
            parts.append(_mask(sb.run(["bash", "-c", PRELUDE + HOST], check=False).stdout))
        outputs.append(parts)
    assert outputs[1] == outputs[0]
    without, with_vsock, _ = outputs[0]
    assert '"vSockCid":1' in with_vsock and "u 1" in with_vsock, with_vsock
    assert '"vSockCid"' not in without and "u 4294967295" in without, without


DESCRIPTIONS = r"""
H=/run/systemd/resolve.hook/io.systemd.Machine
U=/run/systemd/userdb/io.systemd.Machine
for p in $V /run/systemd/machine/io.systemd.MachineImage $H $U; do
  varlinkctl --json=short info $p | sed 's/.*"interfaces"/"interfaces"/'
  for i in $(varlinkctl --json=short info $p | grep -o '"interfaces":\[[^]]*' | cut -d[ -f2 | tr -d '"' | tr , ' '); do
    echo "== $p $i"
    varlinkctl --json=short call $p org.varlink.service.GetInterfaceDescription "{\"interface\":\"$i\"}"
    varlinkctl introspect $p $i | md5sum
  done
done
"""


def test_interface_descriptions_byte_for_byte_as_262(real262: Sandbox, ours262: Sandbox) -> None:
    out = _same(real262, ours262, DESCRIPTIONS)
    descriptions = [json.loads(line)["description"] for line in out.splitlines() if line.startswith('{"description"')]
    assert len(descriptions) == 16, out  # 5 on each of the two machine sockets, 3 on the hook's, 3 on userdb's
    assert all("\n# " in "\n" + d for d in descriptions), out  # comments included
    infos = []
    for sb in (real262, ours262):
        info = json.loads(sb.run(["varlinkctl", "--json=short", "info", V]).stdout)
        infos.append(info)
    assert infos[1]["interfaces"] == infos[0]["interfaces"]
    assert infos[1]["vendor"] == "machined" and infos[1]["url"].startswith("https://"), infos[1]


USER_LOOKS = r"""
P=$(lead uo-l)
vl $V io.systemd.Machine.Register "{\"name\":\"uo1\",\"class\":\"container\",\"leader\":$P}"
systemd-run --user -q --unit=uo-n unshare -r -n -m sleep 1000; sleep 0.5; Q=$(systemctl --user show -P MainPID uo-n)
vl $V io.systemd.Machine.Register "{\"name\":\"uo2\",\"class\":\"container\",\"leader\":$Q}"
for m in uo1 uo2; do
  bc GetMachineOSRelease s $m
  bc GetMachineAddresses s $m
  bc GetMachineUIDShift s $m
  for a in yes graceful; do vl $V io.systemd.Machine.List "{\"name\":\"$m\",\"acquireMetadata\":\"$a\"}"; done
done
machinectl --user list
systemctl --user stop uo-l uo-n
"""


def test_user_instance_cannot_look_inside_as_262(real262: Sandbox, ours262: Sandbox) -> None:
    """262's per-user instance runs unprivileged: it cannot enter a container's namespaces, so
    its OS release and addresses fail with EPERM (left out under graceful metadata)."""
    from tests.integration262 import test_user262 as user

    for sb in (real262, ours262):
        user._setup(sb)
    out = user.assert_same_as_user(ours262, real262, USER_LOOKS)
    assert out.count("Access denied") >= 3 and '"errnoName":"EPERM"' in out, out
    assert "uo1     container -       -  -" in out, out


USERDB = r"""
U=/run/systemd/userdb/io.systemd.Machine
M='"service":"io.systemd.Machine"'
ask() { echo "> $1 $2"; varlinkctl --json=short call $U io.systemd.UserDatabase.$1 "$2" 2>&1; echo "rc=$?"; }
for m in GetUserRecord GetGroupRecord GetMemberships; do
  for p in "{}" "{$M}" "{$M,\"x\":1}" "{\"service\":5}" "{\"service\":\"x\"}" "{$M,\"userName\":5}" "{$M,\"groupName\":[]}" \
           "{$M,\"uid\":0}" "{$M,\"uid\":1000000}" "{$M,\"userName\":\"vu-x-0\"}" "{$M,\"gid\":5}" "{$M,\"groupName\":\"vg-x-0\"}" \
           "{$M,\"uid\":\"5\"}" "{$M,\"uid\":-1}" "{$M,\"fuzzyNames\":[\"x\"]}" "{$M,\"dispositionMask\":[\"container\"]}" \
           "{$M,\"uidMin\":1,\"uidMax\":5}" "{$M,\"gidMin\":1}" "{$M,\"uuid\":\"x\"}" "{$M,\"userName\":null}" "{$M,\"groupName\":null}"; do
    ask $m "$p"
  done
done
for n in "a/b" "a:b" "" "." ".." "1000" "a b" "-a" "a.b" "ä" "a\\tb" "$(printf 'a%.0s' $(seq 300))" "_x" "a@b"; do
  ask GetUserRecord "{$M,\"userName\":\"$n\"}"; ask GetGroupRecord "{$M,\"groupName\":\"$n\"}"
  ask GetMemberships "{$M,\"userName\":\"$n\"}"
done
for u in 65535 4294967295 4294967294 65534 1.5 1e3 18446744073709551615 18446744073709551616; do
  ask GetUserRecord "{$M,\"uid\":$u}"; ask GetGroupRecord "{$M,\"gid\":$u}"
done
"""


def test_user_database_parameters_as_262(real262: Sandbox, ours262: Sandbox) -> None:
    """Under 262 the user database's calls are checked against its declaration first (missing
    or mistyped service, unknown fields: InvalidParameter), then as machined dispatches them:
    fields it does not take (fuzzyNames, dispositionMask, uidMin, uuid…), names that are none,
    UIDs that are not valid ones as JSON numbers (1e3 is 1000)."""
    out = _same(real262, ours262, USERDB)
    assert out.count('{"parameter":"service"}') >= 6 and '{"parameter":"x"}' in out, out
    assert '{"parameter":"fuzzyNames"}' in out and '{"parameter":"userName"}' in out, out

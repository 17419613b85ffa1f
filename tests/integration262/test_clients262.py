"""systemd 262's own clients against ours and against systemd-machined 262, differential: the same
script runs in both sandboxes and what machinectl, varlinkctl, nspawn, userdbctl, getent and
systemd-ssh-proxy show must be the same once PIDs, IDs, times and the sandbox's name are masked.

A sandbox has no network namespace of its own: a booted container's veth (``ve-NAME``) is seen by
every sandbox on the machine, so the scenarios run one after the other and always stop their
containers, and a container with a veth gets a name of its own for each run.
"""

from __future__ import annotations

import difflib
import re
import secrets

import pytest

from machined.sandbox import Sandbox
from tests.integration.differential import normalize, run
from tests.integration262.test_varlink262 import _wake


def _mask(text: str) -> str:
    text = re.sub(r"sandbox-[0-9a-f]{8}", "sandbox-ID", text)
    text = re.sub(r"\w{3} \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \w+(; [^\n]* ago)?", "DATE", text)
    text = re.sub(r'"(creationTimestamp|modificationTimestamp|pidfdId|realtime|monotonic)":\d+', r'"\1":N', text)
    # processes of a booted container's cgroup tree (systemctl status, machinectl status)
    text = re.sub(r"(?m)^(\s*[│├└─ ]*)\d+ (/\S+)", r"\1N \2", text)
    # machinectl clean names removed images in hash order
    lines = text.splitlines(True)
    removed = iter(sorted(line for line in lines if line.startswith("Removed image '")))
    return "".join(next(removed) if line.startswith("Removed image '") else line for line in lines)


def assert_same(ours: Sandbox, real: Sandbox, script: str, timeout: float = 300, unique: str = "") -> str:
    """Run *script* (bash, after differential's prelude) in real 262, then in ours; the same output.

    *unique*: a name in the script that is made unique for this run (a container's veth is seen by
    every sandbox on the machine, so two test sessions must not boot the same name at once)."""
    renamed = f"{unique[:2]}{secrets.token_hex(3)}" if unique else ""
    outputs = []
    for sb in (real, ours):
        _wake(sb)
        text = run(sb, script.replace(unique, renamed) if unique else script, timeout)
        outputs.append(_mask(normalize(text.replace(renamed, unique) if unique else text)))
    expected, got = outputs
    if got != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), got.splitlines(True), "real", "ours"))
        pytest.fail(f"outputs differ:\n{diff}")
    return got


def test_machinectl_on_a_booted_container(ours262: Sandbox, real262: Sandbox) -> None:
    """list, status, show, shell, login, bind, copy-to/from, kill, reboot, poweroff; nss-mymachines 262."""
    out = assert_same(
        ours262,
        real262,
        r"""
boot_container mc262
L=$(machinectl show mc262 -p Leader --value); pid L $L
S=$(machinectl show mc262 -p Supervisor --value); pid S $S
machinectl list
machinectl status -n0 mc262
machinectl show mc262 | grep -v -E '^(Timestamp|Id|LeaderPIDFDId|SupervisorPIDFDId)' | sort
machinectl shell mc262 /bin/echo hello; echo "rc=$?"
machinectl shell mc262 /usr/bin/env | grep -E '^(TERM|USER|HOME|SHELL|LOGNAME)=' | sort
machinectl shell --setenv=FOO=bar mc262 /bin/sh -c 'echo $FOO; tty'
machinectl shell nobody@mc262 /usr/bin/id -un
machinectl shell .host /bin/echo on-the-host
login_prompt mc262
mkdir -p /tmp/bindsrc; echo bound > /tmp/bindsrc/hello
machinectl bind --mkdir mc262 /tmp/bindsrc /mnt/bound; echo "bind rc=$?"
machinectl shell mc262 /bin/cat /mnt/bound/hello
machinectl bind --read-only --mkdir mc262 /tmp/bindsrc /mnt/ro; echo "bind ro rc=$?"
machinectl shell mc262 /bin/sh -c 'touch /mnt/ro/x; grep -c " /mnt/ro " /proc/self/mountinfo'
machinectl bind mc262 /tmp/nonexistent /mnt/x; echo "rc=$?"
mkdir -p /tmp/src/dir/sub; echo one > /tmp/src/dir/a; echo two > /tmp/src/dir/sub/b; echo file > /tmp/src/f
machinectl copy-to mc262 /tmp/src/dir /root/dir; echo "copy-to rc=$?"
machinectl copy-to mc262 /tmp/src/f /root/f; echo "rc=$?"
machinectl copy-to mc262 /tmp/src/f /root/f; echo "again rc=$?"
machinectl copy-to --force mc262 /tmp/src/f /root/f; echo "force rc=$?"
machinectl shell mc262 /bin/sh -c 'cd /root; find dir f | sort; cat f'
machinectl copy-from mc262 /root/dir /tmp/back; echo "copy-from rc=$?"; find /tmp/back | sort
machinectl copy-from mc262 /root/nonexistent /tmp/x; echo "rc=$?"
machinectl copy-to mc262 /nonexistent /root/x; echo "rc=$?"
machinectl copy-to nope /tmp/src/f /root/x; echo "rc=$?"
machinectl shell mc262 /bin/sh -c 'ip addr add 198.51.100.2/24 dev host0 && ip link set host0 up' >/dev/null 2>&1
for _ in $(seq 100); do machinectl status -n0 mc262 | grep -q 'Address: 198' && break; sleep 0.1; done
machinectl status -n0 mc262 | grep -E '^\s+(Address|Iface|OS):' | grep -v fe80
cp /etc/nsswitch.conf /tmp/nsswitch.conf && sed -i 's/^hosts:.*/hosts: files mymachines/' /tmp/nsswitch.conf
mount --bind /tmp/nsswitch.conf /etc/nsswitch.conf
getent hosts mc262 | grep -v fe80
getent hosts no-such-machine; echo "getent rc=$?"
umount /etc/nsswitch.conf
machinectl kill mc262 --signal=SIGCONT; echo "kill rc=$?"
machinectl kill mc262 --kill-whom=leader --signal=SIGCONT; echo "kill leader rc=$?"
machinectl kill mc262 --kill-whom=bogus; echo "rc=$?"
machinectl kill nope; echo "rc=$?"
machinectl reboot mc262; echo "reboot rc=$?"
for _ in $(seq 600); do N=$(machinectl show mc262 -p Leader --value 2>/dev/null); [ -n "$N" ] && [ "$N" != "$L" ] && break; sleep 0.1; done
for _ in $(seq 600); do case "$(systemctl -M mc262 is-system-running 2>/dev/null)" in running|degraded) break;; esac; sleep 0.1; done
echo "rebooted: $(machinectl show mc262 -p State --value)"
machinectl poweroff mc262; echo "poweroff rc=$?"
gone mc262
machinectl list
machinectl poweroff nope; echo "rc=$?"
machinectl reboot nope; echo "rc=$?"
stop_container mc262
""",
        unique="mc262",
    )
    assert "hello\nrc=0" in out and "login:" in out and "bound\n" in out and "198.51.100.2 mc262" in out
    assert "rebooted: running" in out and "poweroff rc=0" in out


def test_machinectl_and_varlink_on_images(ours262: Sandbox, real262: Sandbox) -> None:
    """list-images, image-status, show-image, clone, rename, read-only, remove, clean; then the same
    through io.systemd.MachineImage on its own socket. 262 reports hidden images (``.host`` too) as
    read-only and refuses to change their flag; its D-Bus Rename says "Failed to rename image"."""
    out = assert_same(
        ours262,
        real262,
        r"""
lsi() { machinectl list-images --all --no-legend | awk '{print $1, $2, $3, ($4 ~ /^[A-Z][a-z][a-z]$/ ? "-" : $4)}'; }
mkdirimg() {
  mkdir -p "$1/etc" "$1/usr/lib"; echo "$2" > "$1/etc/hostname"
  printf 'NAME="Dir OS"\nPRETTY_NAME="Dir OS %s"\nID=diros\n' "$2" > "$1/usr/lib/os-release"
  echo 00112233445566778899aabbccddeeff > "$1/etc/machine-id"
}
(cd /var/lib/machines && rm -rf -- * .[!.]* 2>/dev/null)
mkdirimg /var/lib/machines/d1 d1host; echo '[Exec]' > /var/lib/machines/d1.nspawn
mkdir -p /var/lib/machines/.hid1
machinectl list-images | sed -E 's/\w{3} [0-9-]+ [0-9:]+ \w+/DATE/g'
lsi
machinectl image-status d1 | sed -E 's/\w{3} [0-9-]+ [0-9:]+ \w+(; [^\n]* ago)?/DATE/g'
machinectl image-status .host | grep -E '^\s+(Path|Type|RO|Hostname|OS):'
machinectl image-status nope; echo "rc=$?"
machinectl show-image d1 | grep -v -E '^(CreationTimestamp|ModificationTimestamp)='
machinectl clone d1 d2; echo "clone rc=$?"
machinectl clone d1 d3 --read-only; echo "clone ro rc=$?"
machinectl clone d1 d2; echo "rc=$?"; machinectl clone nope x; echo "rc=$?"; machinectl clone d1 'a/b'; echo "rc=$?"
lsi; ls -A /var/lib/machines
machinectl rename d2 d2renamed; echo "rename rc=$?"
machinectl rename d2renamed d1; echo "rc=$?"; machinectl rename .host foo; echo "rc=$?"; machinectl rename nope x; echo "rc=$?"
lsi; ls -A /var/lib/machines
machinectl read-only d1; echo "ro rc=$?"; lsi
machinectl read-only d1 false; echo "rw rc=$?"; lsi
machinectl read-only .host; echo "rc=$?"; machinectl read-only nope; echo "rc=$?"
machinectl remove d3; echo "remove rc=$?"
machinectl read-only .hid1; echo "rc=$?"; machinectl read-only .hid1 false; echo "rc=$?"
machinectl rename .hid1 .hid2; echo "rc=$?"; machinectl clone .hid2 hidclone; echo "rc=$?"; lsi
machinectl remove .hid2 hidclone; echo "rc=$?"; mkdir /var/lib/machines/.hid1
machinectl remove .host; echo "rc=$?"; machinectl remove nope; echo "rc=$?"
lsi; ls -A /var/lib/machines
machinectl clean; echo "clean rc=$?"; lsi; ls -A /var/lib/machines
machinectl clean --all; echo "clean all rc=$?"; lsi; ls -A /var/lib/machines
I=/run/systemd/machine/io.systemd.MachineImage
vi() { varlinkctl --json=short call ${3:-} $I "io.systemd.MachineImage.$1" "$2" 2>&1 | sed -E 's/"(creationTimestamp|modificationTimestamp)":[0-9]+/"\1":N/g'; echo "rc=${PIPESTATUS[0]}"; }
mkdirimg /var/lib/machines/v1 v1host
vi List '{}' --more | sort  # (hash order)
vi List '{"name":"v1"}'
vi List '{"name":"v1","acquireMetadata":true}'
vi List '{"name":"v1","acquireMetadata":"graceful"}'
vi List '{"name":"nope"}'
vi Update '{"name":"v1","newName":"v2"}'
vi Update '{"name":"v2","readOnly":true}'
vi List '{"name":"v2"}'
vi Update '{"name":"v2","readOnly":false}'
vi Clone '{"name":"v2","newName":"v3"}'
vi Clone '{"name":"v2","newName":"v3"}'
vi Remove '{"name":"v3"}'
vi Remove '{"name":"v3"}'
vi CleanPool '{"mode":"all"}' --more
vi CleanPool '{"mode":"bogus"}' --more
vi CleanPool '{"mode":"bogus"}'
vi SetPoolLimit '{"limit":1000000}'
ls -A /var/lib/machines
varlinkctl introspect $I io.systemd.MachineImage | grep -c method
""",
    )
    assert ".host directory yes -" in out and ".hid1 directory yes -" in out
    assert "Could not rename image: Failed to rename image: File exists" in out


def test_nspawn_keep_unit_and_machinectl_start_register_over_varlink(ours262: Sandbox, real262: Sandbox) -> None:
    """systemd-nspawn 262 with --keep-unit, and booted by `machinectl start` (systemd-nspawn@.service):
    both register through io.systemd.Machine, never RegisterMachine or CreateMachine on the bus."""
    out = assert_same(
        ours262,
        real262,
        r"""
dbus-monitor --system "type='method_call',destination='org.freedesktop.machine1'" > /tmp/mon.txt 2>&1 &
MON=$!
for _ in $(seq 100); do grep -q NameAcquired /tmp/mon.txt 2>/dev/null && break; sleep 0.05; done
# --keep-unit: nspawn registers the service it runs in (no scope of its own)
systemd-run --quiet --unit=ku262 -p Delegate=yes systemd-nspawn -q --keep-unit -D / --volatile=yes -M ku262 /bin/sleep 2999
until_listed ku262
machinectl list --no-legend
machinectl show ku262 -p Name -p Class -p Service -p Unit -p RootDirectory -p State
systemctl stop ku262.service; gone ku262; systemctl reset-failed ku262.service 2>/dev/null
# machinectl start: systemd-nspawn@.service (--keep-unit) boots the image, settings from a trusted .nspawn file
d=/var/lib/machines/ms262 o=/tmp/ov-ms262
mkdir -p $d $o/upper/etc/systemd/system $o/work /etc/systemd/nspawn
printf '[Unit]\nDescription=Sandbox container target\nWants=dbus.socket systemd-logind.service\nAfter=dbus.socket\n' > $o/upper/etc/systemd/system/sandbox-container.target
mountpoint -q $d || mount -t overlay overlay -o lowerdir=/,upperdir=$o/upper,workdir=$o/work $d
printf '[Exec]\nBoot=yes\nPrivateUsers=no\nParameters=systemd.unit=sandbox-container.target\n[Network]\nVirtualEthernet=no\nPrivate=no\n' > /etc/systemd/nspawn/ms262.nspawn
machinectl start ms262; echo "start rc=$?"
until_listed ms262
for _ in $(seq 600); do case "$(systemctl -M ms262 is-system-running 2>/dev/null)" in running|degraded) break;; esac; sleep 0.1; done
machinectl list --no-legend
machinectl show ms262 -p Name -p Class -p Service -p Unit -p RootDirectory -p State
systemctl is-active systemd-nspawn@ms262.service
machinectl shell ms262 /bin/echo inside; echo "rc=$?"
machinectl stop ms262; echo "stop rc=$?"; gone ms262
for _ in $(seq 600); do case $(systemctl show -p ActiveState --value systemd-nspawn@ms262.service) in inactive|failed) break;; esac; sleep 0.05; done
systemctl show systemd-nspawn@ms262.service -p ActiveState -p Result
machinectl start nope262; echo "rc=$?"
umount $d; rm -f /etc/systemd/nspawn/ms262.nspawn
kill $MON; wait $MON 2>/dev/null
# nspawn 262 registers over varlink only: no RegisterMachine*/CreateMachine* on the bus
echo "D-Bus registrations: $(grep -c -E 'member=(Register|Create)Machine' /tmp/mon.txt)"
""",
    )
    assert "Unit=ku262.service" in out and "Unit=systemd-nspawn@ms262.service" in out and "inside\nrc=0" in out
    assert "D-Bus registrations: 0" in out


def test_varlinkctl_on_both_sockets(ours262: Sandbox, real262: Sandbox) -> None:
    """Each socket serves both interfaces: info, list-interfaces, list-methods, introspect, calls and
    their errors (unknown interfaces and methods, bad parameters, bad JSON, oneway)."""
    out = assert_same(
        ours262,
        real262,
        r"""
V=/run/systemd/machine/io.systemd.Machine
I=/run/systemd/machine/io.systemd.MachineImage
ls -l --time-style=+ $V $I | awk '{print $1, $NF}'
ls /run/varlink/registry/ 2>&1 | grep -i machine
for s in $V $I; do
  echo "== $s"
  varlinkctl --json=short info $s | python3 -c 'import json,sys; print(json.load(sys.stdin)["interfaces"])' 2>/dev/null || varlinkctl info $s | grep -A9 Interfaces
  varlinkctl list-interfaces $s
  varlinkctl list-methods $s io.systemd.MachineImage; echo "rc=$?"
  varlinkctl introspect $s io.systemd.MachineImage | grep -v -E '^\s*# (\w|\()'
  varlinkctl introspect $s io.systemd.Nope; echo "rc=$?"
  varlinkctl --json=short call $s org.varlink.service.GetInterfaceDescription '{"interface":"io.systemd.Nope"}'; echo "rc=$?"
  varlinkctl --json=short call $s org.varlink.service.GetInterfaceDescription '{}'; echo "rc=$?"
  varlinkctl --json=short call --more $s io.systemd.Machine.List '{"name":".host"}' | sed -E 's/"(pidfdId|realtime|monotonic)":[0-9]+/"\1":N/g; s/"(id|bootId)":"[0-9a-f]+"/"\1":"X"/g; s/"pid":[0-9]+/"pid":P/g'; echo "rc=$?"
  varlinkctl --json=short call --more $s io.systemd.MachineImage.List '{"name":".host"}' | sed -E 's/"(creationTimestamp|modificationTimestamp)":[0-9]+/"\1":N/g'; echo "rc=$?"
  varlinkctl --json=short call $s io.systemd.MachineImage.Nope '{}'; echo "rc=$?"
  varlinkctl --json=short call $s io.systemd.MachineImage.List '{"name":1}'; echo "rc=$?"
  varlinkctl --json=short call $s io.systemd.MachineImage.List '{"name":"..."}'; echo "rc=$?"
  varlinkctl --json=short call $s io.systemd.MachineImage.List '[]'; echo "rc=$?"
  varlinkctl --json=short call $s io.systemd.MachineImage.List 'nojson'; echo "rc=$?"
  varlinkctl --json=short call $s io.systemd.MachineImage.Clone '{"name":".host"}'; echo "rc=$?"
  varlinkctl --json=short call $s io.systemd.MachineImage.Update '{"name":".host","newName":"a/b"}'; echo "rc=$?"
  varlinkctl --json=short call $s io.systemd.MachineImage.Update '{"name":".host","limit":"x"}'; echo "rc=$?"
  varlinkctl --json=short call --oneway $s io.systemd.service.Ping '{}'; echo "rc=$?"
  varlinkctl --json=short call $s io.systemd.service.Ping '{}'; echo "rc=$?"
  varlinkctl --json=short call $s io.systemd.UserDatabase.GetUserRecord '{"service":"io.systemd.Machine"}'; echo "rc=$?"
  varlinkctl --json=short call $s io.systemd.Resolve.Hook.QueryFilter '{}'; echo "rc=$?"
  varlinkctl --json=short call $s io.systemd.Machine.Open '{"name":".host","mode":"shell"}' | sed -E 's|/dev/pts/[0-9]+|/dev/pts/N|'; echo "rc=${PIPESTATUS[0]}"
  varlinkctl --json=short call $s io.systemd.Machine.MapFrom '{"name":".host","uid":0}'; echo "rc=$?"
  varlinkctl --json=short call $s io.systemd.Machine.MapTo '{"uid":0}'; echo "rc=$?"
done
""",
    )
    assert out.count("io.systemd.MachineImage.NoSuchImage") == 2 and out.count("UserInHostRange") == 2


def test_userdbctl_and_getent_for_a_machine_with_private_users(ours262: Sandbox, real262: Sandbox) -> None:
    """A machine registered over varlink with a user namespace: its users and groups through
    io.systemd.Machine's user database (userdbctl 262) and nss-systemd (getent)."""
    out = assert_same(
        ours262,
        real262,
        r"""
systemd-run --quiet --unit=udb-l unshare --user sleep 999999
P=$(systemctl show -p MainPID --value udb-l); pid L $P
for _ in $(seq 100); do [ "$(readlink /proc/$P/ns/user)" != "$(readlink /proc/1/ns/user)" ] && break; sleep 0.05; done
echo '0 200000 65536' > /proc/$P/uid_map; echo '0 200000 65536' > /proc/$P/gid_map
varlinkctl --json=short call /run/systemd/machine/io.systemd.Machine io.systemd.Machine.Register "{\"name\":\"udb262\",\"class\":\"container\",\"leader\":$P}"; echo "rc=$?"
ls -l --time-style=+ /run/systemd/userdb/ | awk 'NF>2 {print $1, $NF}' | grep -i machine
userdbctl user 200005 -j --no-pager 2>&1
userdbctl user vu-udb262-7 -j --no-pager 2>&1
userdbctl group 200009 -j 2>&1
userdbctl group vg-udb262-9 -j 2>&1
userdbctl user vu-udb262-999999 2>&1; echo "rc=$?"
userdbctl user vu-nope-5 2>&1; echo "rc=$?"
userdbctl user --no-pager --no-legend -s io.systemd.Machine 2>&1; echo "rc=$?"
userdbctl group --no-pager --no-legend -s io.systemd.Machine 2>&1; echo "rc=$?"
userdbctl user 200005 --no-pager 2>&1 | grep -v -E 'Last|Disk'
getent passwd 200005 vu-udb262-6; echo "rc=$?"
getent group vg-udb262-12 200013; echo "rc=$?"
getent passwd vu-udb262-70000; echo "rc=$?"
varlinkctl --json=short call /run/systemd/userdb/io.systemd.Machine io.systemd.UserDatabase.GetUserRecord '{"uid":200005,"service":"io.systemd.Machine"}'; echo "rc=$?"
varlinkctl --json=short call /run/systemd/userdb/io.systemd.Machine io.systemd.UserDatabase.GetUserRecord '{"uid":200005,"service":"nope"}'; echo "rc=$?"
varlinkctl --json=short call /run/systemd/userdb/io.systemd.Machine io.systemd.UserDatabase.GetGroupRecord '{"groupName":"vg-udb262-3","service":"io.systemd.Machine"}'; echo "rc=$?"
varlinkctl --json=short call /run/systemd/userdb/io.systemd.Machine io.systemd.UserDatabase.GetMemberships '{"service":"io.systemd.Machine"}'; echo "rc=$?"
machinectl terminate udb262; gone udb262
userdbctl user 200005 2>&1; echo "rc=$?"
getent passwd 200005; echo "rc=$?"
""",
    )
    assert "vu-udb262-5:x:200005:65534:UID 5 of Container udb262:/:/usr/sbin/nologin" in out


def test_register_root_directory_as_262(ours262: Sandbox, real262: Sandbox) -> None:
    """varlink Register takes an absolute, normalized rootDirectory (no "//", "." or "..", names of 255
    bytes at most), as 262's JSON path dispatcher; anything else is InvalidParameter."""
    out = assert_same(
        ours262,
        real262,
        r"""
V=/run/systemd/machine/io.systemd.Machine
n=0
for a in '/a//b' '/a/./b' '/a/../b' '/a/b/' '/' '' 'rel' "/$(printf 'x%.0s' $(seq 256))" "/$(printf 'x%.0s' $(seq 255))"; do
  n=$((n+1))
  systemd-run --quiet --unit=pp-l$n /bin/sleep 2990
  P=$(systemctl show -p MainPID --value pp-l$n)
  varlinkctl --json=short call $V io.systemd.Machine.Register "{\"name\":\"pp$n\",\"class\":\"vm\",\"leader\":$P,\"rootDirectory\":\"$a\"}" 2>&1 | tr '\n' ' '; echo " rc=${PIPESTATUS[0]} [$a]" | cut -c1-40
done
machinectl list --no-legend | sort
for u in $(systemctl list-units --plain --no-legend "pp-l*" | cut -d" " -f1); do systemctl stop $u; done
""",
    )
    assert out.count('{"parameter":"rootDirectory"}') == 6


def test_ssh_proxy_resolution(ours262: Sandbox, real262: Sandbox) -> None:
    """systemd-ssh-proxy 262 (the ProxyCommand of `ssh machine/NAME`) looks NAME up with
    io.systemd.Machine.List, the user's machined first: what it makes of a container, the host,
    unknown and bad names."""
    out = assert_same(
        ours262,
        real262,
        r"""
systemd-run --quiet --unit=sp262-l /bin/sleep 2990
P=$(systemctl show -p MainPID --value sp262-l); pid L $P
varlinkctl call /run/systemd/machine/io.systemd.Machine io.systemd.Machine.Register "{\"name\":\"sp262\",\"class\":\"container\",\"leader\":$P}"; echo "rc=$?"
proxy() { SYSTEMD_LOG_TARGET=console /usr/lib/systemd/systemd-ssh-proxy "$@" </dev/null 2>&1 | head -3; echo "$1 rc=${PIPESTATUS[0]}"; }
# root has no user instance: without XDG_RUNTIME_DIR ssh-proxy gives up silently, with one it asks
# the user's machined first; here that is the system's socket (linked), then the system's
proxy machine/sp262 22
mkdir -p /tmp/xdg262/systemd/machine; ln -sf /run/systemd/machine/io.systemd.Machine /tmp/xdg262/systemd/machine/
export XDG_RUNTIME_DIR=/tmp/xdg262
for h in machine/sp262 machine/.host machine/nope262 machine/bad_name machine/ machine%sp262 'machine/a b'; do proxy "$h" 22; done
unset XDG_RUNTIME_DIR
machinectl terminate sp262; gone sp262
""",
    )
    assert "Don't know how to SSH into '(null)' container sp262." in out


def test_vmspawn_registration_and_ssh_proxy(ours262: Sandbox, real262: Sandbox) -> None:
    """As systemd-vmspawn registers: varlink Register with class vm, vSockCid, sshAddress,
    sshPrivateKeyPath and controlAddress; then machinectl list/status/show, List, the state file,
    GetMachineSSHInfo and what systemd-ssh-proxy (`ssh machine/NAME`) makes of it."""
    out = assert_same(
        ours262,
        real262,
        r"""
V=/run/systemd/machine/io.systemd.Machine
vl() { varlinkctl --json=short call $V "io.systemd.Machine.$1" "$2" 2>&1 | sed -E 's/"(pidfdId|realtime|monotonic)":[0-9]+/"\1":N/g'; echo "rc=${PIPESTATUS[0]}"; }
systemd-run --quiet --unit=vm262-l /bin/sleep 2990
P=$(systemctl show -p MainPID --value vm262-l); pid L $P
sup() { sed -E 's/(Superv\.: |Supervisor=|SUPERVISOR=|"supervisor":\{"pid":)[0-9]+/\1S/'; }
vl Register "{\"name\":\"vm262\",\"class\":\"vm\",\"leader\":$P,\"vSockCid\":1234,\"sshAddress\":\"vsock/1234\",\"sshPrivateKeyPath\":\"/run/vm262/key\",\"controlAddress\":\"/run/vm262/control\",\"allocateUnit\":true,\"service\":\"systemd-vmspawn\"}"
vl Register "{\"name\":\"vm262b\",\"class\":\"vm\",\"leader\":$P,\"vSockCid\":1,\"allocateUnit\":true}"
vl Register "{\"name\":\"vm262b\",\"class\":\"vm\",\"leader\":$P,\"vSockCid\":-5,\"allocateUnit\":true}"
vl Register "{\"name\":\"vm262b\",\"class\":\"vm\",\"leader\":$P,\"sshAddress\":5}"
vl Register "{\"name\":\"vm262b\",\"class\":\"vm\",\"leader\":$P,\"sshPrivateKeyPath\":\"relative/key\"}"
for a in "unix:/run/x" "/run//x" "/run/./x" "@abstract" ""; do vl Register "{\"name\":\"vm262b\",\"class\":\"vm\",\"leader\":$P,\"controlAddress\":\"$a\"}"; done
vl Register "{\"name\":\"vm262b\",\"class\":\"vm\",\"leader\":$P,\"sshPrivateKeyPath\":\"/$(printf 'x%.0s' $(seq 256))\"}"
vl List '{"name":"vm262"}' | sup
machinectl list --no-legend
machinectl status -n0 vm262 | grep -v -E '^\s+Since' | sup
machinectl show vm262 | grep -v -E '^(Timestamp|Id|LeaderPIDFDId|SupervisorPIDFDId)' | sort | sup
grep -v -E '^(REALTIME|MONOTONIC|LEADER_PIDFDID|SUPERVISOR_PIDFDID|ID)=' /run/systemd/machines/vm262 | sort | sup
busctl call org.freedesktop.machine1 /org/freedesktop/machine1 org.freedesktop.machine1.Manager GetMachineSSHInfo s vm262 2>&1
busctl call org.freedesktop.machine1 /org/freedesktop/machine1 org.freedesktop.machine1.Manager GetMachineSSHInfo s .host 2>&1
# systemd-ssh-proxy: what `ssh machine/NAME` resolves through machined's varlink List
/usr/lib/systemd/systemd-ssh-proxy machine/vm262 22 </dev/null 2>&1 | head -3; echo "rc=${PIPESTATUS[0]}"
/usr/lib/systemd/systemd-ssh-proxy machine/.host 22 </dev/null 2>&1 | head -3; echo "rc=${PIPESTATUS[0]}"
/usr/lib/systemd/systemd-ssh-proxy machine/nope262 22 </dev/null 2>&1 | head -3; echo "rc=${PIPESTATUS[0]}"
/usr/lib/systemd/systemd-ssh-proxy machine/bad_name 22 </dev/null 2>&1 | head -3; echo "rc=${PIPESTATUS[0]}"
grep -h -A3 'machine/' /etc/ssh/ssh_config.d/*systemd* 2>/dev/null | head -8
# (machinectl 262 terminates a machine with a control address through that socket: there is none here)
machinectl terminate vm262; echo "rc=$?"
vl Terminate '{"name":"vm262"}'; gone vm262
systemctl is-active vm262-l.service
vl List '{"name":"vm262"}'
""",
    )
    assert '"vSockCid":1234,"sshAddress":"vsock/1234"' in out and "VSockCID=1234" in out


def test_subgroup_of_a_unit_as_262(ours262: Sandbox, real262: Sandbox) -> None:
    """A leader in a cgroup below its unit (registered over D-Bus, or nspawn --keep-unit's payload):
    262 keeps that cgroup as the machine's subgroup (no unit: link), kills only it
    (KillUnitSubgroup), terminates the machine by SIGTERM to its supervisor and never stops the unit."""
    out = assert_same(
        ours262,
        real262,
        r"""
V=/run/systemd/machine/io.systemd.Machine
m() { sed -E 's/"(pidfdId|realtime|monotonic)":[0-9]+/"\1":N/g; s/"pid":[0-9]+/"pid":P/g; s/^(SUPERVISOR|LEADER)=[0-9]+/\1=P/'; }
# a leader in a cgroup below its unit, registered over D-Bus: 262 keeps that cgroup as the subgroup
systemd-run --quiet --unit=sg262 -p Delegate=yes bash -c 'c=/sys/fs/cgroup/system.slice/sg262.service; mkdir $c/inner $c/sup; echo $$ > $c/sup/cgroup.procs; sleep 2000 & echo $! > $c/inner/cgroup.procs; echo $! > /tmp/sg262.pid; wait'
for _ in $(seq 100); do [ -s /tmp/sg262.pid ] && break; sleep 0.05; done
P=$(cat /tmp/sg262.pid); pid P $P
busctl call org.freedesktop.machine1 /org/freedesktop/machine1 org.freedesktop.machine1.Manager RegisterMachine sayssus sg262 0 svc container $P ""
machinectl show sg262 -p Unit -p Subgroup -p State
grep -E '^(SCOPE|SUBGROUP)=' /run/systemd/machines/sg262; ls /run/systemd/machines
varlinkctl --json=short call $V io.systemd.Machine.List '{"name":"sg262"}' | m
machinectl kill sg262 --signal=SIGCONT; echo "kill rc=$?"
# terminate: SIGTERM to the supervisor (busctl, gone: ESRCH), the unit is left alone
machinectl terminate sg262; echo "terminate rc=$?"
systemctl is-active sg262.service
kill $P; gone sg262
systemctl stop sg262.service
# nspawn --keep-unit: the payload is a subgroup of the service, nspawn the supervisor
systemd-run --quiet --unit=kus262 -p Delegate=yes systemd-nspawn -q --keep-unit -D / --volatile=yes -M kus262 /bin/sleep 2999
until_listed kus262
machinectl show kus262 -p Unit -p Subgroup
varlinkctl --json=short call $V io.systemd.Machine.List '{"name":"kus262"}' | m
machinectl kill kus262 --signal=SIGCONT; echo "kill rc=$?"
machinectl kill kus262 --kill-whom=supervisor --signal=SIGCONT; echo "kill supervisor rc=$?"
machinectl terminate kus262; echo "terminate rc=$?"; gone kus262
for _ in $(seq 600); do case $(systemctl show -p ActiveState --value kus262.service) in inactive|failed) break;; esac; sleep 0.05; done
systemctl show kus262.service -p ActiveState -p Result
systemctl reset-failed kus262.service 2>/dev/null
""",
    )
    assert "Subgroup=inner" in out and "Subgroup=payload" in out, out

"""systemd 262's own clients against ours and against systemd-machined 262, differential: the same
script runs in both sandboxes and what machinectl, varlinkctl, nspawn, userdbctl, getent and
systemd-ssh-proxy show must be the same once PIDs, IDs, times and the sandbox's name are masked.

A sandbox has no network namespace of its own: a booted container's veth (``ve-NAME``) is seen by
every sandbox on the machine, so the scenarios run one after the other and always stop their
containers, and the names are unlikely to be used by other tests (``mc262``...).
"""

from __future__ import annotations

import difflib
import re

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


def assert_same(ours: Sandbox, real: Sandbox, script: str, timeout: float = 300) -> str:
    """Run *script* (bash, after differential's prelude) in real 262, then in ours; the same output."""
    outputs = []
    for sb in (real, ours):
        _wake(sb)
        outputs.append(_mask(normalize(run(sb, script, timeout))))
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
S=$(machinectl show mc262 -p Supervisor --value 2>/dev/null); [ -n "$S" ] && pid S $S
machinectl list
# (Superv.: needs the Supervisor property, 262's D-Bus additions; compared in the vmspawn test)
machinectl status -n0 mc262 | grep -v 'Superv\.:'
machinectl show mc262 -p Name -p Class -p Service -p RootDirectory -p Unit -p State -p Leader -p NetworkInterfaces
machinectl shell mc262 /bin/echo hello; echo "rc=$?"
machinectl shell mc262 /usr/bin/env | grep -E '^(TERM|USER|HOME|SHELL|LOGNAME)=' | sort
machinectl shell --setenv=FOO=bar mc262 /bin/sh -c 'echo $FOO; tty'
machinectl shell nobody@mc262 /usr/bin/id -un
machinectl shell .host /bin/echo on-the-host
timeout 10 script -qec "machinectl login mc262" /dev/null < /dev/null | tr -d '\r' | grep -a -m1 -o 'login:'
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

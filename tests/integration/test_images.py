"""The image pool, differential: each scenario runs against systemd-machined 252 and against
machined, and what machinectl, busctl and gdbus show must be the same.

Masked beyond the usual: dates and "… ago" (creation times are those of files the
scenario creates a moment apart in two sandboxes), and the order of ``machinectl clean``'s
lines (upstream replies in hash-table order). Sizes are not masked: the same commands
produce the same files, so usage and quota numbers agree.
"""

from __future__ import annotations

import difflib
import re
import shutil
import subprocess
import sys

import pytest

from machined.sandbox import Sandbox
from tests.integration.differential import compare, run

# Shell helpers of the scenarios (added after differential.PRELUDE).
IMAGES_PRELUDE = r"""
# lsi: list-images without the date columns
lsi() { machinectl list-images --all --no-legend | awk '{print $1, $2, $3, ($4 ~ /^[A-Z][a-z][a-z]$/ ? "-" : $4)}'; }
# mkraw NAME HOSTNAME FILE: a GPT disk image with one ext4 root partition holding a tiny OS tree
mkraw() {
  local d=/tmp/tree-$1
  rm -rf $d; mkdir -p $d/etc $d/usr/lib
  echo "$2" > $d/etc/hostname
  echo 0123456789abcdef0123456789abcdef > $d/etc/machine-id
  printf 'PRETTY_NAME="Raw OS %s"\nID=rawos\nVERSION_ID=1\n' "$1" > $d/usr/lib/os-release
  printf 'CHASSIS=vm\nDEPLOYMENT=test\n' > $d/etc/machine-info
  rm -f /tmp/fs-$1.img
  mkfs.ext4 -q -E root_owner=0:0 -U 11111111-2222-3333-4444-555555555555 -d $d /tmp/fs-$1.img 8M
  truncate -s 10M "$3"
  echo 'label: gpt
start=2048, size=16384, type=4f68bce3-e8cd-4db1-96e7-fbcaf984b709, uuid=aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee' | sfdisk -q "$3"
  dd if=/tmp/fs-$1.img of="$3" bs=512 seek=2048 conv=notrunc status=none
}
# mkdirimg PATH HOSTNAME: a directory image with an /etc/hostname (through a symlink) and os-release
mkdirimg() {
  mkdir -p "$1/etc" "$1/usr/lib"; echo "$2" > "$1/etc/hostname.real"; ln -sf /etc/hostname.real "$1/etc/hostname"
  printf 'NAME="Dir OS"\nPRETTY_NAME="Dir OS %s"\nID=diros\n' "$2" > "$1/usr/lib/os-release"; ln -sf ../usr/lib/os-release "$1/etc/os-release"
  echo 00112233445566778899aabbccddeeff > "$1/etc/machine-id"
}
# clean_pool: empty the pool (and what the scenarios mount into the search path)
clean_pool() { (cd /var/lib/machines && rm -rf -- * .[!.]* 2>/dev/null); rm -rf /run/machines; }
"""


def mask(text: str) -> str:
    text = re.sub(r"\w{3} \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \w+(; [^\n]* ago)?", "DATE", text)
    lines = text.splitlines(True)
    removed = sorted(line for line in lines if line.startswith("Removed image '"))
    it = iter(removed)
    return "".join(next(it) if line.startswith("Removed image '") else line for line in lines)


def assert_same(ours: Sandbox, real: Sandbox, script: str, timeout: float = 180) -> str:
    expected, got = (mask(t) for t in compare(ours, real, IMAGES_PRELUDE + script, timeout))
    if got != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), got.splitlines(True), "real", "ours"))
        pytest.fail(f"outputs differ:\n{diff}")
    return got


@pytest.fixture(scope="module", autouse=True)
def vendor_dir() -> None:
    """/usr/lib/machines must exist on the host so that sandboxes can mount a tmpfs on it."""
    subprocess.run(["mkdir", "-p", "/usr/lib/machines"], check=True)


def test_discovery_listing_and_properties(ours: Sandbox, real: Sandbox) -> None:
    out = assert_same(
        ours,
        real,
        r"""
clean_pool
mkdirimg /var/lib/machines/dir1 dirhost
mkraw r1 rawhost /var/lib/machines/r1.raw >/dev/null
mkdir /var/lib/machines/.hidden1 /var/lib/machines/.#notanimage /var/lib/machines/r1   # r1: the directory wins
touch /var/lib/machines/plainfile /var/lib/machines/.#tmp.raw
mkdir -p /run/machines/runimg /run/machines/shadow; mkdirimg /var/lib/machines/shadow poolshadow  # /run comes first
mountpoint -q /usr/lib/machines || mount -t tmpfs -o size=16m tmpfs /usr/lib/machines
mkdirimg /usr/lib/machines/vend vendhost
machinectl list-images
lsi
for i in .host dir1 r1 .hidden1 runimg shadow vend; do machinectl image-status $i; machinectl show-image $i; done
rmdir /var/lib/machines/r1
machinectl image-status r1; machinectl show-image r1
machinectl show-image
busctl call --json=short $M $MP $MI ListImages | python3 -c 'import json,sys; [print(*r[:3], r[5], r[6]) for r in sorted(json.load(sys.stdin)["data"][0])]'
busctl introspect $M $MP/image | sort
busctl introspect $M $MP/image/dir1
busctl introspect $M $MP/image/_2ehost | grep -e Name -e Path -e Type -e ReadOnly
busctl get-property $M $MP/image/r1 org.freedesktop.machine1.Image Type Path ReadOnly Usage Limit UsageExclusive LimitExclusive
call GetImage dir1; call GetImage .host; call GetImage vend
for i in dir1 r1 .host; do
  mcall $(call GetImage "'$i'" | sed "s/.*'\(.*\)'.*/\1/") org.freedesktop.machine1.Image.GetMachineID
done
call GetImageHostname "'dir1'"; call GetImageMachineID "'dir1'"; call GetImageMachineInfo "'r1'"; call GetImageOSRelease "'dir1'"
call GetImageOSRelease "'r1'"; call GetImageHostname "'r1'"; call GetImageHostname "'.hidden1'"; call GetImageMachineInfo "'.hidden1'"
mcall $MP/image/nope org.freedesktop.DBus.Properties.GetAll "''"
umount /usr/lib/machines; clean_pool
""",
    )
    assert "dir1 directory no" in out and "r1 directory no" in out and "vend directory yes" in out
    assert "Path: /run/machines/shadow" in out and "poolshadow" not in out
    assert "Hostname: rawhost" in out and "OS: Raw OS r1" in out and "Hostname: dirhost" in out
    assert "OS: Dir OS vendhost" in out and "Usage=8429568" in out


def test_bad_names_and_unknown_images(ours: Sandbox, real: Sandbox) -> None:
    assert_same(
        ours,
        real,
        r"""
clean_pool; mkdir -p /var/lib/machines/ok1
for n in '..' '.' 'a/b' '.#x' "$(printf 'a\tb')" "$(printf 'a\177')" "$(printf 'x%.0s' $(seq 256))" '' nope; do
  for m in GetImage RemoveImage GetImageHostname GetImageOSRelease; do busctl call $M $MP $MI $m s "$n" 2>&1; done
  busctl call $M $MP $MI RenameImage ss "$n" x 2>&1; busctl call $M $MP $MI CloneImage ssb "$n" x false 2>&1
  busctl call $M $MP $MI RenameImage ss ok1 "$n" 2>&1; busctl call $M $MP $MI CloneImage ssb ok1 "$n" true 2>&1
  busctl call $M $MP $MI MarkImageReadOnly sb "$n" true 2>&1; busctl call $M $MP $MI SetImageLimit st "$n" 1 2>&1
done
busctl call $M $MP/image/ok1 org.freedesktop.machine1.Image Rename s "a/b" 2>&1
busctl call $M $MP/image/ok1 org.freedesktop.machine1.Image Clone sb ".#y" false 2>&1
busctl call $M $MP/image/ok1 org.freedesktop.machine1.Image Rename i 1 2>&1
busctl call $M $MP/image/nope org.freedesktop.machine1.Image Remove 2>&1
busctl call $M $MP/image/_2e_2e org.freedesktop.machine1.Image Remove 2>&1
busctl call $M $MP $MI CleanPool s bogus 2>&1; busctl call $M $MP $MI SetPoolLimit t 9223372036854775808 2>&1
busctl call $M $MP $MI SetImageLimit st ok1 9223372036854775808 2>&1
machinectl start nope; machinectl image-status nope; machinectl remove nope ok1; ls /var/lib/machines
runuser -u nobody -- busctl call $M $MP $MI ListImages >/dev/null; echo list=$?
runuser -u nobody -- busctl call $M $MP $MI RemoveImage s ok1 2>&1
runuser -u nobody -- busctl call $M $MP $MI CleanPool s all 2>&1
runuser -u nobody -- busctl call $M $MP $MI SetPoolLimit t 1 2>&1
runuser -u nobody -- busctl call $M $MP/image/ok1 org.freedesktop.machine1.Image MarkReadOnly b true 2>&1
runuser -u nobody -- busctl call $M $MP/image/ok1 org.freedesktop.machine1.Image GetHostname 2>&1
clean_pool
""",
    )


def test_directory_and_raw_operations(ours: Sandbox, real: Sandbox) -> None:
    out = assert_same(
        ours,
        real,
        r"""
clean_pool
mkdirimg /var/lib/machines/d1 d1host; echo '[Exec]' > /var/lib/machines/d1.nspawn; echo abc > /var/lib/machines/d1.roothash
ln /var/lib/machines/d1/etc/machine-id /var/lib/machines/d1/etc/machine-id.link; mkfifo /var/lib/machines/d1/fifo
mkraw r1 rawhost /var/lib/machines/r1.raw >/dev/null
mkdir -p /run/systemd/nspawn; echo '[Files]' > /run/systemd/nspawn/r1.nspawn
machinectl clone d1 d2; echo rc=$?; machinectl clone d1 d3 --read-only; echo rc=$?
machinectl clone r1 r2; machinectl clone r1 r3 --read-only; echo rc=$?
lsi; ls -lA /var/lib/machines /run/systemd/nspawn | awk 'NF>2 {print $1, $2, $NF}'
lsattr -d /var/lib/machines/d1 /var/lib/machines/d3
ls -lA /var/lib/machines/d2 /var/lib/machines/d2/etc | awk 'NF>2 {print $1, $2, $NF}'
machinectl image-status d2 r2 r3
cmp /var/lib/machines/r1.raw /var/lib/machines/r2.raw && echo same-bytes
machinectl clone d1 d2; machinectl clone d1 r1; machinectl clone d1 .host; machinectl clone nope x; machinectl clone d1 'a/b'
machinectl rename d2 d2renamed; machinectl rename r2 r2renamed; machinectl rename r1 r1renamed; lsi
ls -A /var/lib/machines /run/systemd/nspawn
machinectl rename d2renamed d1; machinectl rename d2renamed r3; machinectl rename d2renamed .host
machinectl rename .host foo; machinectl rename d2renamed '..'
machinectl read-only d1; lsattr -d /var/lib/machines/d1; machinectl read-only r1renamed; stat -c '%a %n' /var/lib/machines/r1renamed.raw; lsi
machinectl rename d1 d1ro; lsattr -d /var/lib/machines/d1ro; machinectl rename d1ro d1
machinectl read-only d1 false; machinectl read-only r1renamed false; lsi; stat -c '%a %n' /var/lib/machines/r1renamed.raw
machinectl read-only d3 false; machinectl read-only r3 false; lsi
machinectl read-only .host; machinectl read-only .host false
machinectl set-limit d1 1G; machinectl set-limit r1renamed 1G; machinectl set-limit .host 1G; machinectl set-limit 1G
call SetImageLimit "'d1'" 'uint64 18446744073709551615'
machinectl remove d3 r3; echo rc=$?; lsi
machinectl read-only d1; machinectl remove d1; echo rc=$?; lsi; ls -A /var/lib/machines /run/systemd/nspawn
machinectl remove .host; machinectl remove nope
mkdir /var/lib/machines/.hid1 /var/lib/machines/.hid2; touch /var/lib/machines/.hid3.raw
machinectl clean; echo rc=$?; lsi
machinectl clean --all; echo rc=$?; lsi; ls -A /var/lib/machines
call CleanPool "'all'"
clean_pool
""",
    )
    assert "d3 directory yes" in out and "r3 raw yes" in out and "same-bytes" in out
    assert "Could not remove image: Read-only file system" in out


def test_block_device_image(ours: Sandbox, real: Sandbox) -> None:
    assert_same(
        ours,
        real,
        r"""
clean_pool
truncate -s 8M /tmp/blk.img; DEV=$(losetup -f --show /tmp/blk.img)
ln -s $DEV /var/lib/machines/blk1
lsi; machinectl show-image blk1
machinectl read-only blk1; blockdev --getro $DEV; lsi; machinectl read-only blk1 false; blockdev --getro $DEV
machinectl clone blk1 blk2; machinectl set-limit blk1 1G
machinectl rename blk1 blk3; ls -A /var/lib/machines; machinectl remove blk3; ls -A /var/lib/machines
losetup -d $DEV; rm -f /tmp/blk.img
""",
    )


def test_read_only_file_system_and_vendor_images(ours: Sandbox, real: Sandbox) -> None:
    out = assert_same(
        ours,
        real,
        r"""
clean_pool
mountpoint -q /usr/lib/machines || mount -t tmpfs -o size=16m tmpfs /usr/lib/machines
mkdirimg /usr/lib/machines/vend vendhost
mkdir -p /run/machines; mount -t tmpfs -o size=16m tmpfs /run/machines
mkdir -p /run/machines/rofs; truncate -s 1M /run/machines/rofsraw.raw; mount -o remount,ro /run/machines
lsi
machinectl image-status vend rofs rofsraw
machinectl remove vend; machinectl rename vend v2; machinectl read-only vend false; machinectl set-limit vend 1G
machinectl remove rofs; machinectl rename rofs rofs2; machinectl read-only rofs; machinectl read-only rofsraw false
machinectl clone vend vendc; machinectl clone rofsraw rawc --read-only; lsi
machinectl image-status vendc rawc
machinectl remove vendc rawc; umount /run/machines; umount /usr/lib/machines
mount -t tmpfs -o size=16m tmpfs /run/machines; mkdir /run/machines/stuck; mount -o remount,ro /run/machines
machinectl clean --all; call CleanPool "'all'"; lsi
umount /run/machines; clean_pool
""",
    )
    assert "vend directory yes" in out and "vendc directory no" in out and "rofs directory yes" in out
    assert "Failed to remove image stuck: Read-only file system" in out


def test_image_in_use_by_nspawn(ours: Sandbox, real: Sandbox) -> None:
    out = assert_same(
        ours,
        real,
        r"""
clean_pool
mkdir -p /var/lib/machines/lk/{usr,etc,proc,sys,dev,run,tmp,var}
for l in bin lib lib64 sbin; do ln -s usr/$l /var/lib/machines/lk/$l; done
systemd-nspawn -q -D /var/lib/machines/lk --bind-ro=/usr --register=no sleep 60 >/tmp/nspawn.log 2>&1 &
NS=$!
for _ in $(seq 200); do [ -e /var/lib/machines/.#lk.lck ] && break; sleep 0.05; done
ls -A /var/lib/machines; ls /run/systemd/nspawn/locks | sed 's/[0-9]\+:[0-9]\+/N/'
machinectl remove lk; machinectl rename lk lk2; machinectl read-only lk; machinectl clean --all
machinectl clone lk lkc; echo rc=$?
call GetImageHostname "'lk'"
lsi
kill $NS; wait $NS 2>/dev/null
ls -A /var/lib/machines
machinectl rename lk lk2; machinectl remove lk2 lkc; echo rc=$?
ls -A /var/lib/machines; ls /run/systemd/nspawn/locks
clean_pool
""",
    )
    assert out.count("Device or resource busy") >= 4 and "rc=0" in out


def test_nspawn_refuses_an_image_we_hold(ours: Sandbox) -> None:
    """Our locks are nspawn's: while we hold an image, systemd-nspawn cannot run from it."""
    script = r"""
rm -rf /var/lib/machines/held; mkdir -p /var/lib/machines/held
"$PYTHON" - <<'EOF'
import subprocess
from machined.images.lock import image_name_lock, image_path_lock
with image_path_lock("/var/lib/machines/held", exclusive=True), image_name_lock("held"):
    r = subprocess.run(["systemd-nspawn", "-q", "-D", "/var/lib/machines/held", "--register=no", "true"],
                       capture_output=True, text=True)
    print(r.returncode, r.stderr.strip())
EOF
ls -A /var/lib/machines; rm -rf /var/lib/machines/held
"""
    r = ours.run(["bash", "-s"], input=f"PYTHON={sys.executable}\n" + script, check=False, timeout=60)
    assert "Directory tree /var/lib/machines/held is currently busy." in r.stdout, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1] == "held"  # our lock files are gone again


@pytest.mark.skipif(shutil.which("mkfs.btrfs") is None, reason="btrfs-progs is not installed (make deps)")
def test_btrfs_subvolumes_snapshots_and_quota(ours: Sandbox, real: Sandbox) -> None:
    probe = run(real, "grep -qw btrfs /proc/filesystems && echo btrfs-ok")
    if "btrfs-ok" not in probe:
        pytest.skip("this kernel has no btrfs")
    out = assert_same(
        ours,
        real,
        r"""
clean_pool
rm -f /tmp/btrfs.img; truncate -s 256M /tmp/btrfs.img; mkfs.btrfs -q /tmp/btrfs.img >/dev/null 2>&1
mount -o loop /tmp/btrfs.img /var/lib/machines || echo "MOUNT FAILED"
machinectl show-image
btrfs subvolume create /var/lib/machines/sv1 >/dev/null; mkdirimg /var/lib/machines/sv1 svhost
btrfs subvolume create /var/lib/machines/sv1/nested >/dev/null; echo x > /var/lib/machines/sv1/nested/file
mkdirimg /var/lib/machines/plain plainhost
lsi; machinectl image-status sv1
machinectl set-limit sv1 50M; echo rc=$?
machinectl set-limit 200M; echo rc=$?
machinectl show-image
machinectl set-limit sv1 50M; echo rc=$?
sync; btrfs quota rescan -w /var/lib/machines >/dev/null
lsi; machinectl show-image sv1
machinectl clone sv1 sv2; machinectl clone sv1 sv3 --read-only; machinectl clone plain plainc; machinectl clone plain plainro --read-only
lsi
btrfs subvolume list /var/lib/machines | awk '{print $NF}' | sort
for s in sv3 sv3/nested plainro plainc; do echo "$s $(btrfs property get /var/lib/machines/$s ro)"; done
cat /var/lib/machines/sv3/nested/file /var/lib/machines/plainc/etc/hostname.real
btrfs qgroup show /var/lib/machines 2>/dev/null | awk 'NR>2 {print $1}' | sort
machinectl read-only sv2; lsi; machinectl read-only sv2 false; btrfs property get /var/lib/machines/sv2 ro
machinectl set-limit sv2 30M; machinectl show-image sv2 | grep -e Limit -e Type
machinectl set-limit sv2 none; machinectl show-image sv2 | grep -e Limit
machinectl set-limit plain 10M; machinectl set-limit .host 10M
machinectl rename sv3 sv3r; machinectl remove sv2; echo rc=$?
lsi
btrfs subvolume list /var/lib/machines | awk '{print $NF}' | sort
machinectl clean --all; lsi
btrfs subvolume list /var/lib/machines | awk '{print $NF}' | sort
btrfs qgroup show /var/lib/machines 2>/dev/null | awk 'NR>2 {print $1}' | sort
machinectl show-image
umount /var/lib/machines; rm -f /tmp/btrfs.img
""",
        timeout=300,
    )
    assert "MOUNT FAILED" not in out
    assert "sv1 subvolume no" in out and "sv3 subvolume yes" in out and "plainc subvolume no" in out
    assert "Limit=52428800" in out and "Limit=31457280" in out

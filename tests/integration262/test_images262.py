"""The image pool as systemd-machined 262 sees it, differential against the real one: ``.mstack``
images (what ``importctl pull-oci`` stores), versioned ``NAME.v`` / ``NAME.raw.v`` /
``NAME.mstack.v`` directories (the version vpick picks), symlinked images, vendor images, through
machinectl, busctl and varlinkctl, and what clone, rename, read-only, remove and clean do to them.

Every image is made by the scenario itself in the sandbox's /var/lib/machines (a private tmpfs).
"""

from __future__ import annotations

from machined.sandbox import Sandbox
from tests.integration262.test_clients262 import assert_same

COMMON = r"""
cd /var/lib/machines; chattr -R -i . 2>/dev/null; rm -rf -- * .[!.]* /srv/*
mkdirimg() {
  mkdir -p "$1/etc" "$1/usr/lib"; echo "$2" > "$1/etc/hostname"
  printf 'NAME="Dir OS"\nPRETTY_NAME="Dir OS %s"\nID=diros\n' "$2" > "$1/usr/lib/os-release"
}
lsi() { machinectl list-images --all --no-legend | awk '{print $1, $2, $3, ($4 ~ /^[A-Z][a-z][a-z]$/ ? "-" : $4)}'; }
lsa() { find /var/lib/machines -mindepth 1 -maxdepth 2 -printf '%P %y\n' | sort | tr '\n' ' '; echo; }
bm() { busctl call org.freedesktop.machine1 $MP $MI "$@" 2>&1; echo "rc=$?"; }
bi() { local o=$1; shift; busctl call org.freedesktop.machine1 $MP/image/$o org.freedesktop.machine1.Image "$@" 2>&1; echo "rc=$?"; }
I=/run/systemd/machine/io.systemd.MachineImage
vi() { varlinkctl --json=short call ${3:-} $I "io.systemd.MachineImage.$1" "$2" 2>&1 | sed -E 's/"(creationTimestamp|modificationTimestamp)":[0-9]+/"\1":N/g'; echo "rc=${PIPESTATUS[0]}"; }
"""


def test_discovery_of_mstack_and_versioned_images(ours262: Sandbox, real262: Sandbox) -> None:
    """Which images 262 lists and finds, under which name, at which path, of which type and
    read-only state: stacks of every shape (layers, rw, root, bind mounts, .raw and .v layers,
    broken ones), versions with and without tries left and architecture suffixes, symlinks."""
    out = assert_same(
        ours262,
        real262,
        COMMON
        + r"""
mkdir -p oci1.mstack/layer@0001 oci1.mstack/layer@0002 oci1.mstack/rw; mkdirimg oci1.mstack/layer@0001 ocihost
mkdir -p foo.v; mkdirimg foo.v/foo_1 foo1; mkdirimg foo.v/foo_2 foo2
mkdir -p bar.raw.v; truncate -s 1M bar.raw.v/bar_1.raw bar.raw.v/bar_3.raw; mkfs.ext4 -q bar.raw.v/bar_3.raw
mkdir -p baz.v; mkdirimg baz.v/baz_1 b1; mkdirimg baz.v/baz_2+0-3 b2; mkdirimg baz.v/baz_1.5+3 b15
mkdir e0.mstack lay2.mstack lay2.mstack/layer@1 lay2.mstack/layer@2 bad.mstack bad.mstack/layer@1 bad.mstack/junk
mkdir -p one.mstack/layer@1 onlyrw.mstack/rw .hid.mstack/rw root.mstack/root
mkdir -p bind.mstack/layer@1 bind.mstack/bind@usr bind.mstack/robind@-
touch rawlayer.mstack; mkdir -p rl.mstack; truncate -s 1M rl.mstack/layer@1.raw rl.mstack/layer@2.raw
mkdir -p vlay.mstack/layer@1.v/layer@1_1 vlay.mstack/layer@1.v/layer@1_2 vlay.mstack/layer@2
mkdir -p rw2.mstack/rw rw2.mstack/rw.v rv.mstack/rw.v/rw_1
mkdir -p rt.mstack/root rt.mstack/layer@1/usr rt2.mstack/root rt2.mstack/layer@1
mkdir -p b2.mstack/bind@usr b2.mstack/robind@usr b3.mstack/bind@x\\x2dy b3.mstack/layer@1 b3.mstack/layer@2
mkdir -p b4.mstack/robind@-x b4.mstack/layer@1 b4.mstack/layer@2
mkdir -p dot.mstack/.junk dot.mstack/layer@1 dot.mstack/layer@2 la.mstack/layer@ la.mstack/layer@1 la.mstack/layer@2
mkdir -p rawv.mstack/layer@1.raw.v rawv.mstack/layer@2; truncate -s 1M rawv.mstack/layer@1.raw.v/layer@1_3.raw
mkdir -p empty.raw.v q2.v/q2 q2.v/other dirv.raw.v/dirv_1.raw x.mstack.v/x_1.mstack/rw x.mstack.v/x_2.mstack/layer@1
mkdir -p qux.v/qux_1_arm64 qux.v/qux_1_x86-64 qux.v/qux_2_arm64 qux.v/qux_0_x86
mkdir -p t.v/t_1+0 t.v/t_0+1 tr.v/tr_3+2-1 tr.v/tr_3+5 tr.v/tr_3+2 tr.v/tr_2 y.v/y_1+0 y.v/y_1+0-5 y.v/y_0
mkdir -p z.v/z_1+0 z.v/z_1+0-5 mixed.v/mixed_1.mstack/rw mixed.v/mixed_0 .hv.v/.hv_1 abc.raw
mkdir -p ver.v/ver_1.10 ver.v/ver_1.9 ver.v/ver_1.10~rc ver.v/ver_1.10-1 w.v/w_1 w.v/w_1.0 w.v/w_01 w.v/w_1a w.v/w_1.a
mkdir -p arch.v/arch_5 arch.v/arch_5_x86-64 arch.v/arch_5_x86 ar2.v/ar2_5 ar2.v/ar2_5_x86
touch file.v
n=0; for c in '1~rc' '1^p' '1%' '1:2' '1@2' '1,2' '1 2' '1_2' 'a' '-1' '.1' '1+x' '1+2-x' '1_2_3' \
    '1+99999999999' '1+4294967295' '1+-1' '1+' '1_x86-64+1-2' '1+1_x86-64'; do n=$((n+1)); mkdir -p "v$n.v/v${n}_$c"; done
mkdir -p /srv/tgt/etc /srv/lv1 /srv/stack.mstack/rw; ln -s /srv/tgt lnk; ln -s /srv/stack.mstack sl.mstack
ln -s /srv/stack.mstack slp; mkdir lnk.v lk2.v lk2.v/lk2_1; ln -s /srv/lv1 lnk.v/lnk_1; ln -s /nonexistent lnk.v/lnk_2
ln -s /nonexistent lk2.v/lk2_2
mkdir -p /usr/lib/machines/ven.v/ven_1 /usr/lib/machines/vm.mstack/rw
echo "== machinectl"
machinectl list-images --no-legend | sed -E 's/ +/ /g'
lsi
machinectl image-status oci1 foo bar baz .hid; echo "rc=$?"
machinectl show-image oci1 | grep -v -E '^(CreationTimestamp|ModificationTimestamp)='
machinectl show-image bar | grep -v -E '^(CreationTimestamp|ModificationTimestamp)='
echo "== busctl"
busctl --json=short call org.freedesktop.machine1 $MP $MI ListImages | jq -c '.data[0][] | .[3] = "T" | .[4] = (.[4] > 0)' | sort
for n in $(machinectl list-images --all --no-legend | awk '{print $1}') oci1.mstack abc.raw bar.raw foo_2 v3 q2 empty rawlayer file ew; do
  printf '%s: ' "$n"; o=$(busctl call org.freedesktop.machine1 $MP $MI GetImage s "$n" 2>&1) || { echo "$o"; continue; }
  o=${o#o \"}; o=${o%\"}; echo "$o $(busctl get-property org.freedesktop.machine1 $o org.freedesktop.machine1.Image Name Path Type ReadOnly Usage Limit ModificationTimestamp | tr '\n' ' ')"
done
busctl introspect org.freedesktop.machine1 $MP/image/oci1 org.freedesktop.machine1.Image | grep -v Timestamp
echo "== varlink"
vi List '{}' --more | sort
vi List '{"name":"oci1"}'
vi List '{"name":"bar","acquireMetadata":"graceful"}'
vi List '{"name":"oci1","acquireMetadata":"graceful"}'
vi List '{"name":"oci1","acquireMetadata":"yes"}'
vi List '{"name":"foo","acquireMetadata":"yes"}'
vi List '{"name":"oci1.mstack"}'
vi List '{"name":"q2"}'
rm -rf /usr/lib/machines/ven.v /usr/lib/machines/vm.mstack
""",
    )
    assert '["oci1","mstack",false,"T",false,N,"/org/freedesktop/machine1/image/oci1"]' in out
    assert (
        '"name":"foo","path":"/var/lib/machines/foo.v/foo_2"' in out
        and "Path: /var/lib/machines/baz.v/baz_1.5+3" in out
    )


def test_operations_on_mstack_and_versioned_images(ours262: Sandbox, real262: Sandbox) -> None:
    """clone, rename, read-only, set-limit, remove and clean on stacks (most are not supported
    there), on versions (they act on the picked version, in its .v directory) and on foreign-owned
    trees, through machinectl, the Manager's and the image objects' D-Bus methods and varlink's
    Update, Clone, Remove and CleanPool: results, errors and the pool's files after each."""
    out = assert_same(
        ours262,
        real262,
        COMMON
        + r"""
mk() {
  mkdir -p oci1.mstack/layer@0001 oci1.mstack/layer@0002 oci1.mstack/rw; mkdirimg oci1.mstack/layer@0001 ocihost
  mkdir -p foo.v; mkdirimg foo.v/foo_1 foo1; mkdirimg foo.v/foo_2 foo2; echo '[Exec]' > foo.v/foo.nspawn
  mkdir -p bar.raw.v; truncate -s 1M bar.raw.v/bar_1.raw; truncate -s 2M bar.raw.v/bar_3+2.raw; mkfs.ext4 -q bar.raw.v/bar_1.raw
  mkdir -p .hid.mstack/layer@1 lay.mstack/layer@1 lay.mstack/layer@2
}
mk; lsi
echo "== machinectl on a stack"
machinectl clone oci1 oci2; echo "rc=$?"
machinectl rename oci1 oci3; echo "rc=$?"
machinectl rename oci1 foo; echo "rc=$?"
machinectl read-only oci1; echo "rc=$?"
machinectl read-only oci1 false; echo "rc=$?"
machinectl read-only lay false; echo "rc=$?"
machinectl read-only .hid; echo "rc=$?"
machinectl set-limit oci1 1G; echo "rc=$?"
machinectl clone foo oci1; echo "rc=$?"
echo "== busctl on a stack"
bi oci1 Clone sb oci2 false
bi oci1 Rename s oci3
bi oci1 MarkReadOnly b true
bi oci1 SetLimit t 1000000
bi oci1 GetOSRelease
bi oci1 GetHostname
bm CloneImage ssb oci1 oci2 false
bm RenameImage ss oci1 oci3
bm MarkImageReadOnly sb oci1 true
bm GetImageHostname s oci1
bm GetImageMachineInfo s oci1
bm GetImageOSRelease s foo
bm GetImage s oci1.v
echo "== varlink on a stack"
vi Update '{"name":"oci1","newName":"oci3"}'
vi Update '{"name":"oci1","readOnly":true}'
vi Clone '{"name":"oci1","newName":"oci2"}'
lsa
echo "== versions"
machinectl image-status foo bar | grep -v -E '^\s+(Created|Modified):'
machinectl read-only foo; echo "rc=$?"; lsi; lsattr -d foo.v/foo_2 | cut -c1-22
machinectl read-only foo false; echo "rc=$?"
machinectl read-only bar; echo "rc=$?"; stat -c '%n %a' bar.raw.v/*; lsi
machinectl read-only bar false; echo "rc=$?"; stat -c '%n %a' bar.raw.v/*
machinectl clone foo fooc; echo "rc=$?"
machinectl clone bar barc; echo "rc=$?"
machinectl clone bar barc2 --read-only; echo "rc=$?"
machinectl rename foo foor; echo "rc=$?"
machinectl rename bar barr; echo "rc=$?"
lsi; lsa
bm RenameImage ss foo foo_9
bm RenameImage ss bar fooc
lsi; lsa
vi Update '{"name":"foo","newName":"foo_0","readOnly":true}'
lsattr -d foo.v/foo_0 | cut -c1-22
vi Update '{"name":"foo","readOnly":false}'
vi Clone '{"name":"foo","newName":"vc"}'
vi List '{"name":"vc"}'
lsi; lsa
machinectl remove foo; echo "rc=$?"; lsi; lsa
vi Remove '{"name":"foo"}'; lsi; lsa
bi bar Remove; lsi; lsa
bm RemoveImage s bar; lsi; lsa
echo "== foreign-owned trees"
mkdir -p fo/etc fu.v/fu_1/etc fl.mstack/layer@1/etc; echo hi > fo/etc/hostname; echo hu > fu.v/fu_1/etc/hostname
chown -R 2147418112:2147418112 fo fu.v/fu_1 fl.mstack/layer@1
machinectl clone fo foc; echo "rc=$?"; machinectl clone fu fuc; echo "rc=$?"; machinectl clone fl flc; echo "rc=$?"
find foc fuc -printf '%P %u %g %m\n' | sort
machinectl remove fo fu fl foc fuc; echo "rc=$?"; lsa
echo "== files that follow an image"
mkdir -p d/etc /usr/lib/systemd/nspawn /etc/systemd/nspawn /run/systemd/nspawn; truncate -s 1M r.raw
for x in nspawn oci-config roothash roothash.p7s usrhash usrhash.p7s verity raw.sig; do echo $x > d.$x; echo $x > r.$x; done
for dd in /usr/lib/systemd/nspawn /etc/systemd/nspawn /run/systemd/nspawn; do echo x > $dd/d.nspawn; done
machinectl rename d e; machinectl rename r s; lsa; ls /usr/lib/systemd/nspawn /etc/systemd/nspawn /run/systemd/nspawn
machinectl clone e f; machinectl clone s t; stat -c '%n %a' f.* t.*; ls /usr/lib/systemd/nspawn /etc/systemd/nspawn
machinectl remove e f s t; lsa; ls /usr/lib/systemd/nspawn /etc/systemd/nspawn /run/systemd/nspawn
rm -rf /usr/lib/systemd/nspawn /etc/systemd/nspawn/* d.* r.*
echo "== remove and clean"
machinectl remove oci1; echo "rc=$?"; lsi; lsa
mk
machinectl clean; echo "rc=$?"; lsi; lsa
machinectl clean --all; echo "rc=$?"; lsi; lsa
mk
vi CleanPool '{"mode":"all"}' --more | sort
lsi; lsa
""",
    )
    assert "Could not clone image: Operation not supported" in out and "foo.v/foor d" in out


def test_nspawn_on_a_version_and_on_a_stack(ours262: Sandbox, real262: Sandbox) -> None:
    """systemd-nspawn 262 -M NAME finds a versioned image and a stack as machined lists them and
    registers the container; while it runs, nspawn's lock keeps the image from being removed or
    renamed. ``machinectl start`` boots both."""
    out = assert_same(
        ours262,
        real262,
        COMMON
        + r"""
mkdir -p foo.v/foo_1 foo.v/foo_2 oci1.mstack/layer@1 oci1.mstack/rw
mount --bind -o ro / foo.v/foo_2; mount --bind -o ro / oci1.mstack/layer@1
systemd-run --quiet --unit=nsv262 systemd-nspawn -q -M foo --volatile=yes /bin/sleep 999
systemd-run --quiet --unit=nsm262 systemd-nspawn -q -M oci1 /bin/sleep 999
until_listed foo; until_listed oci1
machinectl list --no-legend | awk '{print $1, $2, $3}'
machinectl show foo -p Name -p Class -p Service -p RootDirectory -p State
machinectl show oci1 -p Name -p Class -p Service -p RootDirectory -p State
varlinkctl --json=short call /run/systemd/machine/io.systemd.Machine io.systemd.Machine.List '{"name":"oci1"}' \
  | jq -c '{name,class,service,rootDirectory,unit}'
machinectl remove foo; echo "rc=$?"; machinectl remove oci1; echo "rc=$?"
machinectl rename foo bar; echo "rc=$?"; machinectl read-only foo; echo "rc=$?"
vi Remove '{"name":"oci1"}'
machinectl terminate foo oci1; gone foo; gone oci1
systemctl stop nsv262 nsm262 2>/dev/null; systemctl reset-failed nsv262 nsm262 2>/dev/null
umount -l foo.v/foo_2 oci1.mstack/layer@1 2>/dev/null; lsi; lsa
# machinectl start (systemd-nspawn@.service) boots a versioned image and a stack (its upper layer
# holds the sandbox's container target, its lower one is the sandbox's root)
for n in msv oms; do
mkdir -p /tmp/ov-$n/upper/etc/systemd/system /tmp/ov-$n/work /etc/systemd/nspawn
printf '[Unit]\nDescription=Sandbox container target\nWants=dbus.socket systemd-logind.service\nAfter=dbus.socket\n' > /tmp/ov-$n/upper/etc/systemd/system/sandbox-container.target
printf '[Exec]\nBoot=yes\nPrivateUsers=no\nParameters=systemd.unit=sandbox-container.target\n[Network]\nVirtualEthernet=no\nPrivate=no\n' > /etc/systemd/nspawn/$n.nspawn
done
mkdir -p msv.v/msv_1 msv.v/msv_2 oms.mstack/layer@1 oms.mstack/layer@2
mount -t overlay overlay -o lowerdir=/,upperdir=/tmp/ov-msv/upper,workdir=/tmp/ov-msv/work msv.v/msv_2
mount --bind -o ro / oms.mstack/layer@1; cp -a /tmp/ov-oms/upper/. oms.mstack/layer@2/
for n in msv oms; do
machinectl start $n; echo "start rc=$?"
until_listed $n
for _ in $(seq 300); do case "$(systemctl -M $n is-system-running 2>/dev/null)" in running|degraded) break;; esac; sleep 0.1; done
machinectl show $n -p Name -p Class -p Service -p Unit -p RootDirectory -p State
machinectl shell $n /bin/echo inside; echo "rc=$?"
machinectl stop $n; echo "stop rc=$?"; gone $n
done
umount -l msv.v/msv_2 oms.mstack/layer@1 2>/dev/null; rm -f /etc/systemd/nspawn/msv.nspawn /etc/systemd/nspawn/oms.nspawn; rm -rf /tmp/ov-msv /tmp/ov-oms
lsi; lsa
""",
    )
    assert out.count("inside\nrc=0") == 2 and "RootDirectory=/var/lib/machines/msv.v/msv_2" in out

"""What looks inside machines cost the service: no process, and a hostile container costs only
its caller (252, both cgroup layouts; tests/integration262/test_weight262.py runs the same on 262).

- A burst of looks (OS release and addresses of several containers, `machinectl list`)
  answers as the real daemon does and leaves no process in the service's cgroup besides the
  daemon (upstream forks per look and waits for its child; ours starts none).
- A container whose os-release is a FIFO, a device node, an oversized file, or a FUSE file
  whose server is stopped (a read that blocks for ever) costs only the caller asking for it
  an error (at once; for the FUSE file after the deadline), while other callers are answered
  at once. The real daemon hangs on a FIFO (its child blocks, and it waits for its child), so
  those run against ours only; the cases where the real one answers (a directory, /dev/null,
  symlinks out of the root, NUL bytes) are compared with it.
"""

from __future__ import annotations

import sys
import time

from machined.sandbox import Sandbox
from tests.integration.differential import run
from tests.integration.test_lifecycle import assert_same

# SVCPROCS: the processes in the cgroup of the unit serving org.freedesktop.machine1 (either layout)
SVCPROCS = r"""
svcprocs() {
  local cg; cg=$(systemctl show -p ControlGroup --value $SVC)
  for d in /sys/fs/cgroup/systemd /sys/fs/cgroup; do
    [ -e "$d$cg/cgroup.procs" ] && { wc -l < "$d$cg/cgroup.procs"; return; }
  done
  echo "no cgroup $cg"
}
"""

BURST = (
    SVCPROCS
    + r"""
for i in 1 2 3 4; do
  systemd-run --quiet --unit=wc$i systemd-nspawn -q -D / --volatile=yes --private-network -M wc$i /bin/sleep 999990
done
for i in 1 2 3 4; do
  until_listed wc$i
  L=$(machinectl show wc$i -p Leader --value)
  for _ in $(seq 100); do [ "$(cat /proc/$L/comm)" = sleep ] && break; sleep 0.05; done
  nsenter -t $L -n ip addr add 198.51.100.$i/24 dev lo
  nsenter -t $L -n ip addr add 2001:db8::$i/64 dev lo nodad
done
echo "registered: $(svcprocs)"
for i in 1 2 3 4; do
  call GetMachineOSRelease wc$i | grep -o "'ID': <\?'[a-z]*'"
  call GetMachineAddresses wc$i
  mcall $MP/machine/wc$i org.freedesktop.machine1.Machine.GetAddresses
done
echo "after looks: $(svcprocs)"
machinectl list | sed -E 's/ +/ /g'
echo "after machinectl list: $(svcprocs)"
call GetMachineAddresses .host > /dev/null && echo ".host addresses: ok"
echo "after .host: $(svcprocs)"
for i in 1 2 3 4; do systemctl stop wc$i; done
for i in 1 2 3 4; do gone wc$i; done
"""
)

# r1: a container of a leader chrooted into /tmp/r1 (own mount and network namespaces), its
# os-release at /proc/LEADER/root/etc/os-release, changed from the host between looks
HOSTILE_SETUP = r"""
mkdir -p /tmp/r1/etc /tmp/r1/usr /tmp/r1/proc /tmp/r1/tmp
for l in bin lib lib64 sbin; do [ -e /usr/$l ] && ln -sfn usr/$l /tmp/r1/$l; done
systemd-run --quiet --unit=r1 unshare --mount --net sh -c \
  'mount --rbind /usr /tmp/r1/usr; mount -t proc proc /tmp/r1/proc; exec chroot /tmp/r1 /usr/bin/sleep 999991'
for _ in $(seq 100); do P=$(systemctl show -p MainPID --value r1); [ "$(cat /proc/$P/comm 2>/dev/null)" = sleep ] && break; sleep 0.05; done
call RegisterMachine r1 '[]' '' container $P /tmp/r1 > /dev/null
E=/proc/$P/root/etc/os-release
os() { echo "== $1"; call GetMachineOSRelease r1 | grep -o "'ID': <\?'[a-z]*'\|^[A-Za-z].*"; }
"""

HOSTILE_COMPARED = (
    HOSTILE_SETUP
    + r"""
os none
printf 'ID=foo\nNAME="Foo"\n' > $E; os regular
rm -f $E; mkdir $E; os directory
rmdir $E; echo 'ID=secret' > /tmp/secret; ln -s /../../../tmp/secret $E; os symlink-out-absolute
rm -f $E; ln -s ../../../../../../tmp/secret $E; os symlink-out-relative
echo 'ID=inside' > /tmp/r1/tmp/secret; os symlink-to-inside
rm -f $E; mknod $E c 1 3; os devnull
rm -f $E; truncate -s 64M $E; os nul-bytes
rm -f $E /tmp/r1/tmp/secret /tmp/secret
call TerminateMachine r1; gone r1
"""
)

# ours only: each asked in the background while other callers are served
HOSTILE_OURS = (
    SVCPROCS
    + HOSTILE_SETUP
    + r"""
systemd-run --quiet --unit=r2 systemd-nspawn -q -D / --volatile=yes --private-network -M r2 /bin/sleep 999992
until_listed r2
others() {  # other callers, while r1's look is pending: how long they took
  local t0 t1; t0=$(date +%s%N)
  call GetMachineOSRelease r2 | grep -o "'ID': <\?'[a-z]*'"
  busctl call $M $MP $MI ListMachines > /dev/null && echo "listed"
  call GetMachineAddresses r2
  t1=$(date +%s%N); echo "others took $(( (t1 - t0) / 1000000 )) ms" >&2
  [ $(( (t1 - t0) / 1000000 )) -lt 3000 ] && echo "others quick"
}
hostile() {  # NAME: r1's os-release asked in the background, others meanwhile, then its answer
  echo "== $1"
  local t0; t0=$(date +%s%N)
  call GetMachineOSRelease r1 > /tmp/hostile.out &
  local bg=$!
  sleep 0.3
  others
  wait $bg
  sed -E 's/^[(]//' /tmp/hostile.out
  echo "its caller waited $(( ($(date +%s%N) - t0) / 1000000 )) ms" >&2
}
rm -f $E; mkfifo $E; hostile fifo
rm -f $E; mknod $E c 1 5; hostile devzero
rm -f $E; head -c 5000000 /dev/zero | tr '\0' a | sed 's/^/ID=/' > $E; hostile oversized
rm -f $E; touch $E
L=$P
# a FUSE file system mounted on r1's os-release (in its mount namespace) whose server never
# answers, not even FUSE_INIT, and is stopped: every request to it blocks until it dies
FUSE=$(nsenter -t $L -m PYTHON -c '
import ctypes, os, signal, sys
fd = os.open("/dev/fuse", os.O_RDWR)
libc = ctypes.CDLL(None, use_errno=True)
opts = f"fd={fd},rootmode=100644,user_id=0,group_id=0".encode()
if libc.mount(b"stuck", b"/tmp/r1/etc/os-release", b"fuse", 0, opts) != 0:
    print("fuse mount failed", os.strerror(ctypes.get_errno()), flush=True)
    os._exit(1)
pid = os.fork()
if pid == 0:
    os.setsid()
    os.closerange(0, 3)
    os.kill(os.getpid(), signal.SIGSTOP)
    os._exit(0)
print(pid, flush=True)
os._exit(0)
')
echo "$FUSE" | grep -q '^[0-9]*$' && [ -n "$FUSE" ] && echo "fuse mounted" || { echo "$FUSE"; FUSE=; }
hostile fuse-stopped
echo "again, while it still blocks:"; call GetMachineOSRelease r1 | sed -E 's/^[(]//'
[ -n "${FUSE:-}" ] && kill -KILL $FUSE
sleep 0.5
echo "its server gone:"; call GetMachineOSRelease r1 | sed -E 's/^[(]//'
nsenter -t $L -m umount -l /tmp/r1/etc/os-release
rm -f $E; printf 'ID=back\n' > $E; os back
echo "after all: $(svcprocs)"
call TerminateMachine r1; gone r1
systemctl stop r2; gone r2
"""
)


def hostile_ours_script() -> str:
    return HOSTILE_OURS.replace("PYTHON", sys.executable)


def check_hostile(out: str, version: str) -> None:
    """The answers of HOSTILE_OURS: each hostile file costs its caller an error, others are quick."""
    sections = out.split("== ")
    by_name = {s.split("\n", 1)[0]: s for s in sections[1:]}
    unreadable = (
        "System.Error.ESHUTDOWN: Failed to get OS release: Cannot send after transport endpoint shutdown"
        if version == "262"
        else "org.freedesktop.DBus.Error.Failed: Child died abnormally."
    )
    for name in ("fifo", "devzero", "oversized", "fuse-stopped"):
        section = by_name.get(name, "")
        assert section.count("others quick") == 1, (name, out)
        assert "'ID': " in section and "listed" in section, (name, out)
    assert unreadable in by_name["fifo"] and unreadable in by_name["devzero"], out
    too_big = "Failed to get OS release: File too large" if version == "262" else "File too large"
    assert too_big in by_name["oversized"], out
    if "fuse mounted" in out:
        assert "org.freedesktop.DBus.Error.Timeout" in by_name["fuse-stopped"], out
        after = out.split("again, while it still blocks:", 1)[1]
        assert "org.freedesktop.DBus.Error.Timeout" in after.split("its server gone:")[0], out
        assert "Timeout" not in after.split("its server gone:")[1].split("\n")[1], out
    assert "'ID': 'back'" in out.split("== back", 1)[1] or "'ID': <'back'>" in out.split("== back", 1)[1], out
    assert "after all: 1\n" in out, out


def test_a_burst_of_looks_leaves_only_the_daemon(ours: Sandbox, real: Sandbox) -> None:
    out = assert_same(ours, real, BURST, timeout=240)
    assert "[byte 0xc6, 0x33, 0x64, 0x04]" in out and "198.51.100.4" in out, out
    for moment in ("after looks", "after machinectl list", "after .host"):
        assert f"{moment}: 1\n" in out, out


def test_unreadable_os_release_files_answered_as_upstream(ours: Sandbox, real: Sandbox) -> None:
    out = assert_same(ours, real, HOSTILE_COMPARED, timeout=120)
    assert "'ID': 'foo'" in out or "'ID': <'foo'>" in out, out


def test_hostile_os_release_files_cost_only_their_caller(ours: Sandbox) -> None:
    t = time.monotonic()
    out = run(ours, hostile_ours_script(), timeout=180)
    check_hostile(out, "252")
    assert time.monotonic() - t < 150, out


def test_children_only_on_demand(ours: Sandbox) -> None:
    """No fork server when a container registers, nor for looks; one for an operation that needs
    the container's mount namespace (a PTY, a copy), gone with its spares FORKSERVER_LINGER (5) s
    after its last child."""
    script = (
        SVCPROCS
        + r"""
systemd-run --quiet --unit=od1 systemd-nspawn -q -D / --volatile=yes --private-network -M od1 /bin/sleep 999993
until_listed od1
sleep 1; echo "registered: $(svcprocs)"
call GetMachineOSRelease od1 | grep -o "'ID': <\?'[a-z]*'"; machinectl list > /dev/null
echo "after looks: $(svcprocs)"
busctl call $M $MP $MI OpenMachinePTY s od1 | sed 's/[0-9]*"$/N"/'
echo "a PTY opened: $(svcprocs)"
echo x > /tmp/od-src; machinectl copy-to od1 /tmp/od-src /tmp/od-dst; echo "copy rc=$?"
for _ in $(seq 100); do [ "$(svcprocs)" = 1 ] && break; sleep 0.1; done
echo "10 s later at most: $(svcprocs)"
systemctl stop od1; gone od1
"""
    )
    out = run(ours, script, timeout=120)
    assert "registered: 1\n" in out and "after looks: 1\n" in out, out
    assert "'ID': 'debian'" in out or "'ID': <'debian'>" in out, out
    assert '"/dev/pts/N"' in out and "copy rc=0" in out, out
    opened = int(out.split("a PTY opened: ", 1)[1].split()[0])
    assert opened > 1, out  # the fork server (and its spares) lingering
    assert "10 s later at most: 1\n" in out, out

"""``machined install`` / ``uninstall`` on a running system: a live takeover, both ways.

The sandbox starts with the real systemd-machined 252 (``Sandbox("real")``); the
installer itself (the virtualenv's ``machined`` console script) puts machined in place,
with machines running, and takes it out again. The sandbox sees the host's /etc and
/var/lib read-only, so the fixture first lays a tmpfs-backed overlay over both, inside
the sandbox only (mounts below them are bound back): the installer then writes where it
would on a real host, and the host is never touched.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from machined.sandbox import Sandbox
from tests.integration.differential import normalize, run

pytestmark = pytest.mark.integration

MACHINED = Path(sys.executable).parent / "machined"  # the console script pip installed

HELPERS = r"""
exec 2>&1  # errors where they happen, not after the last section
MACHINED=%(machined)s
# writable DIR: an overlay on DIR whose writes go to /run (tmpfs); mounts below DIR are kept
writable() {
  local d=$1 k=/run/writable/$(echo "$1" | tr / _) i=0 sub t nested top=()
  mkdir -p $k/upper $k/work $k/keep
  for sub in $(findmnt -rn -o TARGET | grep "^$d/" | sort -u); do
    nested=0; for t in "${top[@]}"; do case $sub in $t/*) nested=1;; esac; done
    [ $nested = 0 ] && top+=("$sub")
  done
  for sub in "${top[@]}"; do mkdir -p $k/keep/$i; mount --rbind "$sub" $k/keep/$i; i=$((i+1)); done
  mount -t overlay overlay -o lowerdir=$d,upperdir=$k/upper,workdir=$k/work $d
  i=0; for sub in "${top[@]}"; do mount --rbind $k/keep/$i "$sub"; i=$((i+1)); done
}
# snap: every file install may touch: names, types, modes, owners, link targets, mtimes, contents
snap() {
  local d
  for d in /etc/systemd/system /etc/dbus-1/system.d /usr/local/share/dbus-1/system-services \
           /usr/share/dbus-1/system-services /lib/dbus-1/system-services /usr/share/polkit-1/actions /var/lib/machined; do
    [ -e $d ] || { echo "absent $d"; continue; }
    find $d -printf '%%p %%y %%m %%u:%%g %%l\n' | sort
    find $d -type f -printf '%%p %%T@\n' | sort
    find $d -type f -exec sha256sum {} + | sort -k2
  done
}
# nspawn NAME: a container registered by systemd-nspawn itself
nspawn() {
  systemd-run --quiet --unit=$1 systemd-nspawn -q -D / --volatile=yes -M $1 /bin/sleep 999999; until_listed $1
  until_comm $(machinectl show -p Leader --value $1) sleep  # the payload execs late
}
# vm NAME: a VM-class machine registered with CreateMachine, its leader a service's sleep
vm() { local p=$(leader $1-l); call CreateMachine $1 '[]' '' vm $p '' '@a(sv) []' >/dev/null; until_listed $1; }
# provider: who serves org.freedesktop.machine1
provider() { busctl status org.freedesktop.machine1 | grep -E '^(Comm|Unit)='; }
# picture NAME...: what clients show of these machines
picture() {
  local n
  machinectl list
  machines
  for n in "$@"; do
    echo "--- $n"
    machinectl show $n
    machinectl status -n0 $n
    ps -o machine= -p $(machinectl show -p Leader --value $n)
    call GetMachineByPID $(machinectl show -p Leader --value $n)
    cat /run/systemd/machines/$n | grep -v '^LEADER_PIDFDID='
  done
}
"""


def script(text: str) -> str:
    return HELPERS % {"machined": MACHINED} + text


def sh(sb: Sandbox, text: str, timeout: float = 180) -> str:
    return run(sb, script(text), timeout=timeout)


def sections(text: str) -> dict[str, str]:
    """The output of a script split at its ``=== NAME`` lines."""
    result: dict[str, str] = {}
    name = ""
    for line in text.splitlines(True):
        m = re.fullmatch(r"=== (\S+)\n", line)
        if m:
            name = m.group(1)
            result[name] = ""
        else:
            result[name] = result.get(name, "") + line
    return result


def same(before: str, after: str, what: str) -> None:
    # The status' "Since: ...; 5s ago" and the like: masked as in the differential tests.
    before, after = normalize(before), normalize(after)
    if before != after:
        diff = "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True), "before", "after"))
        pytest.fail(f"{what} changed:\n{diff}")


@pytest.fixture(scope="module")
def sb() -> Iterator[Sandbox]:
    if not MACHINED.exists():
        pytest.skip(f"no console script at {MACHINED}")
    with Sandbox("real") as sandbox:
        out = sh(
            sandbox, "writable /etc; writable /var/lib; touch /etc/.w /var/lib/.w && rm /etc/.w /var/lib/.w && echo ok"
        )
        assert out.strip().endswith("ok"), out
        yield sandbox


def test_takeover_from_systemd_machined_and_back_with_machines_running(sb: Sandbox) -> None:
    # An administrator's own copy of the bus policy: install must put it back byte for byte.
    out = sh(sb, r"""
cp -p /usr/share/dbus-1/system.d/org.freedesktop.machine1.conf /etc/dbus-1/system.d/
touch -d '2020-01-02 03:04:05' /etc/dbus-1/system.d/org.freedesktop.machine1.conf
snap > /run/snap.before
nspawn ns-a; vm vm-a; vm vm-b
echo "=== provider.real"; provider
echo "=== picture.real"; picture ns-a vm-a vm-b
echo "=== install"; $MACHINED install; echo "rc=$?"
echo "=== provider.ours"; provider
echo "=== picture.ours"; picture ns-a vm-a vm-b
echo "=== terminate.ours"
machinectl terminate vm-a; gone vm-a; systemctl is-active 'machine-vm\x2da.scope'; machinectl list --no-legend
ls /run/systemd/machines
echo "=== register.ours"
nspawn ns-b; vm vm-c
echo "=== picture.ours2"; picture ns-a vm-b ns-b vm-c
echo "=== uninstall"; $MACHINED uninstall; echo "rc=$?"
echo "=== provider.back"; provider
echo "=== picture.back"; picture ns-a vm-b ns-b vm-c
echo "=== terminate.back"
for n in ns-a vm-b ns-b vm-c; do machinectl terminate $n; gone $n; done
systemctl is-active 'machine-ns\x2da.scope' 'machine-vm\x2db.scope' 'machine-ns\x2db.scope' 'machine-vm\x2dc.scope'
systemctl is-active ns-a ns-b
machinectl list --no-legend; ls /run/systemd/machines
echo "=== files"; snap | diff /run/snap.before - && echo "files as before"
""", timeout=300)  # fmt: skip
    s = sections(out)

    assert s["provider.real"] == "Comm=systemd-machine\nUnit=systemd-machined.service\n", out
    assert "rc=0" in s["install"] and "stopped systemd-machined.service" in s["install"], s["install"]
    assert "replaced /etc/dbus-1/system.d/org.freedesktop.machine1.conf (bus policy)" in s["install"]
    assert s["provider.ours"] == "Comm=machined\nUnit=machined.service\n", out
    # Machines registered with systemd-machined: the same for every client after the switch.
    same(s["picture.real"], s["picture.ours"], "what clients show after the takeover")
    for name, cls in (("ns-a", "container"), ("vm-a", "vm"), ("vm-b", "vm")):
        assert f"Name={name}\n" in s["picture.ours"] and f"Class={cls}\n" in s["picture.ours"]
        assert re.search(rf"(?m)^{name}\s*$", s["picture.ours"]), f"ps -o machine: {name}"  # attributed
    # ... and terminable by machined.
    assert s["terminate.ours"].splitlines()[0] == "inactive", s["terminate.ours"]
    assert "vm-a" not in s["terminate.ours"]

    assert "rc=0" in s["uninstall"] and "started systemd-machined.service" in s["uninstall"], s["uninstall"]
    assert "stopped machined.service" in s["uninstall"]
    assert s["provider.back"] == "Comm=systemd-machine\nUnit=systemd-machined.service\n", out
    # Machines from before, and those machined registered: the same for 252 after the switch back.
    same(s["picture.ours2"], s["picture.back"], "what clients show after the switch back")
    for name in ("ns-b", "vm-c"):
        assert re.search(rf"(?m)^{name}\s*$", s["picture.back"]), f"ps -o machine: {name}"
    term = s["terminate.back"].splitlines()
    assert term[:4] == ["inactive"] * 4, s["terminate.back"]
    assert "still registered" not in s["terminate.back"]
    assert set(term[4:6]) <= {"inactive", "failed"}, s["terminate.back"]  # the containers ended
    assert s["files"] == "files as before\n", s["files"]


def test_install_twice_lazy_start_and_uninstall_twice(sb: Sandbox) -> None:
    out = sh(sb, r"""
snap > /run/snap.before2
vm lazy
systemctl is-active systemd-machined
# the bus's answers name the sender and processes, times, serials, and how many rules matched (more with two policies)
nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@" 2>&1 | sed -E 's/pid=[0-9]+/pid=N/g; s/comm="[^"]*"/comm=C/g; s/:1\.[0-9]+/:1.N/g; s/[0-9]+ matched rules/N matched rules/; s/time=[0-9.]+/time=T/; s/ serial=[0-9]+/ serial=S/'; }
dest="--dest=org.freedesktop.machine1 /org/freedesktop/machine1 org.freedesktop.machine1.Manager"
echo "=== policy.real"
nobody dbus-send --system --print-reply $dest.RegisterMachine string:x array:byte: string: string:vm uint32:1 string:
nobody dbus-send --system --print-reply $dest.GetMachine string:lazy
echo "=== install"; $MACHINED install --no-start; echo "rc=$?"
systemctl is-active systemd-machined machined
echo "=== activated"; machinectl list --no-legend; provider
echo "=== policy.ours"
nobody dbus-send --system --print-reply $dest.RegisterMachine string:x array:byte: string: string:vm uint32:1 string:
nobody dbus-send --system --print-reply $dest.GetMachine string:lazy
echo "=== again"; $MACHINED install; echo "rc=$?"
echo "=== uninstall"; $MACHINED uninstall --no-start; echo "rc=$?"
systemctl is-active machined systemd-machined
echo "=== back"; machinectl list --no-legend; provider
echo "=== uninstall.again"; $MACHINED uninstall; echo "rc=$?"
machinectl terminate lazy; gone lazy
echo "=== files"; snap | diff /run/snap.before2 - && echo "files as before"
""")  # fmt: skip
    s = sections(out)
    assert s[""].strip().endswith("active"), out  # systemd-machined runs before install
    assert "rc=0" in s["install"] and "stopped systemd-machined.service" in s["install"], s["install"]
    assert "started machined.service" not in s["install"]
    assert s["install"].endswith("inactive\ninactive\n"), s["install"]  # nobody serves...
    assert s["activated"].startswith("lazy vm") and "Unit=machined.service" in s["activated"]  # ... until asked
    # dbus-daemon judges unprivileged callers by our policy as by upstream's.
    assert s["policy.ours"] == s["policy.real"] and "AccessDenied" in s["policy.ours"], out
    assert 'object path "/org/freedesktop/machine1/machine/lazy"' in s["policy.ours"]
    assert sum(line.startswith("unchanged ") for line in s["again"].splitlines()) == 4, s["again"]
    assert "machined.service is running" in s["again"] and "rc=0" in s["again"]
    assert "stopped machined.service" in s["uninstall"] and s["uninstall"].endswith("inactive\ninactive\n")
    assert s["back"].startswith("lazy vm") and "Unit=systemd-machined.service" in s["back"], s["back"]
    assert "machined is not installed here" in s["uninstall.again"] and "rc=0" in s["uninstall.again"]
    assert s["files"] == "files as before\n", s["files"]


def test_install_that_would_not_take_effect_is_undone(sb: Sandbox) -> None:
    """A transient unit named machined.service outranks /etc/systemd/system."""
    out = sh(sb, r"""
systemctl is-active systemd-machined || machinectl list >/dev/null  # 252 runs
systemd-run --quiet --unit=machined.service sleep 999997
snap > /run/snap.before3
$MACHINED install; echo "rc=$?"
provider
echo "=== files"; snap | diff /run/snap.before3 - && echo "files as before"
systemctl stop machined.service
""")  # fmt: skip
    s = sections(out)
    assert "rc=1" in s[""] and "from /run/systemd/transient/machined.service" in s[""], out
    assert "the installation does not take effect; undoing it" in s[""]
    assert "stopped" not in s[""] and "Unit=systemd-machined.service" in s[""]  # 252 serves on
    assert s["files"] == "files as before\n", s["files"]

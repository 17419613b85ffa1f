"""``machined install`` / ``uninstall`` on systemd 262, live: real systemd-machined 262 (socket-activated)
first, with a machine registered; install takes over (our socket unit enabled, upstream's socket and
service masked and stopped, the machine adopted); a varlink client starts ours through our socket;
uninstall gives everything back, byte for byte, and systemd-machined 262 serves the machine again.

The forky root is an overlay with its upper layer on a tmpfs: the installer writes where it would
on a real host, and nothing outlives the sandbox. The only addition is an administrator's drop-in
for our unit naming the host libraries the root lacks for the virtualenv's interpreter.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from machined.sandbox import Sandbox
from machined.sandbox.forky import HOST_LIBS

MACHINED = Path(sys.executable).parent / "machined"  # the console script pip installed

SCRIPT = r"""exec 2>&1
M=%(machined)s
snap() {
  local d
  for d in /etc/systemd/system /etc/dbus-1/system.d /usr/local/share/dbus-1/system-services \
           /usr/share/dbus-1/system-services /usr/share/polkit-1/actions /var/lib/machined; do
    [ -e $d ] || { echo "absent $d"; continue; }
    find $d -printf '%%p %%y %%m %%u:%%g %%l\n' | sort
    find $d -type f -exec sha256sum {} + | sort -k2
  done
}
state() { for u in systemd-machined.socket systemd-machined.service machined.socket machined.service; do echo "$u $(systemctl is-active $u)"; done; }
varlinkctl call /run/systemd/machine/io.systemd.Machine io.systemd.service.Ping '{}'
systemd-run --quiet --unit=in-l1 /bin/sleep 2990; P=$(systemctl show -p MainPID --value in-l1)
varlinkctl call /run/systemd/machine/io.systemd.Machine io.systemd.Machine.Register "{\"name\":\"in1\",\"class\":\"container\",\"leader\":$P}"
snap > /tmp/snap.before
mkdir -p /etc/systemd/system/machined.service.d
printf '[Service]\nEnvironment=LD_LIBRARY_PATH=%(libs)s\n' > /etc/systemd/system/machined.service.d/host-python.conf
echo "=== install"
LD_LIBRARY_PATH=%(libs)s $M install
echo "=== after-install"
state
busctl status org.freedesktop.machine1 | grep -E '^(Comm|Unit)='
machinectl list --no-legend
varlinkctl --json=short call /run/systemd/machine/io.systemd.Machine io.systemd.Machine.List '{"name":"in1"}' | sed 's/,"leader.*//'
systemctl stop machined.service
echo "stopped: $(systemctl is-active machined.service)"
varlinkctl --json=short call /run/systemd/machine/io.systemd.Machine io.systemd.Machine.List '{"name":"in1"}' | sed 's/,"leader.*//'
echo "activated: $(systemctl is-active machined.service) by $(systemctl show -P TriggeredBy machined.service)"
echo "=== uninstall"
LD_LIBRARY_PATH=%(libs)s $M uninstall
echo "=== after-uninstall"
state
rm -r /etc/systemd/system/machined.service.d
systemctl daemon-reload
busctl status org.freedesktop.machine1 | grep -E '^(Comm|Unit)='
varlinkctl --json=short call /run/systemd/machine/io.systemd.Machine io.systemd.Machine.List '{"name":"in1"}' | sed 's/,"leader.*//'
snap > /tmp/snap.after
echo "=== snapshot"
diff /tmp/snap.before /tmp/snap.after && echo same
systemctl stop in-l1
"""


def sections(text: str) -> dict[str, str]:
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


def test_install_and_uninstall_on_262(real262: Sandbox) -> None:
    if not MACHINED.exists():
        pytest.skip(f"no console script at {MACHINED}")
    r = real262.run(["bash", "-c", SCRIPT % {"machined": MACHINED, "libs": HOST_LIBS}], check=False, timeout=600)
    out = r.stdout + r.stderr
    s = sections(out)
    assert "created /etc/systemd/system/machined.socket (socket unit)" in s["install"], out
    assert "created /etc/systemd/system/systemd-machined.socket -> /dev/null" in s["install"], out
    assert "kept /usr/share/polkit-1/actions/org.freedesktop.machine1.policy" in s["install"], out
    assert s["install"].index("stopped systemd-machined.socket") < s["install"].index("started machined.socket"), out
    assert s["after-install"].splitlines()[:6] == [
        "systemd-machined.socket inactive", "systemd-machined.service inactive", "machined.socket active",
        "machined.service active", "Comm=machined", "Unit=machined.service",
    ], out  # fmt: skip
    listed = '{"name":"in1","class":"container","unit":"in-l1.service"'
    assert "in1 container" in s["after-install"] and s["after-install"].count(listed) == 2, out
    assert "activated: active by machined.socket" in s["after-install"], out
    assert s["after-uninstall"].splitlines()[:6] == [
        "systemd-machined.socket active", "systemd-machined.service active", "machined.socket inactive",
        "machined.service inactive", "Comm=systemd-machine", "Unit=systemd-machined.service",
    ], out  # fmt: skip
    assert listed in s["after-uninstall"], out
    assert s["snapshot"].strip() == "same", out

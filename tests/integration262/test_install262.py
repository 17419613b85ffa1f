"""``machined install`` / ``uninstall`` on systemd 262, live: real systemd-machined 262 (socket-activated)
first, with a machine registered; install takes over (our socket unit enabled, upstream's socket and
service masked and stopped, the machine adopted); a varlink client starts ours through our socket;
uninstall gives everything back, byte for byte, and systemd-machined 262 serves the machine again.
The same for a user's per-user instance (262's ``systemd-machined --user``): a service manager
running during install keeps upstream's; started again, it starts ours (through our user socket,
for the user's varlink call) and, after uninstall, upstream's again.

The forky root is an overlay with its upper layer on a tmpfs: the installer writes where it would
on a real host, and nothing outlives the sandbox. The only additions are an administrator's drop-ins
for our units (system and user) naming the host libraries the root lacks for the virtualenv's
interpreter.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from machined.sandbox import Sandbox
from machined.sandbox.forky import HOST_LIBS
from tests.integration.test_install import sections

MACHINED = Path(sys.executable).parent / "machined"  # the console script pip installed

SCRIPT = r"""exec 2>&1
M=%(machined)s
snap() {
  local d
  for d in /etc/systemd/system /etc/systemd/user /etc/dbus-1/system.d /usr/local/share/dbus-1/system-services \
           /usr/share/dbus-1/system-services /usr/share/polkit-1/actions /var/lib/machined; do
    [ -e $d ] || { echo "absent $d"; continue; }
    find $d -printf '%%p %%y %%m %%u:%%g %%l\n' | sort
    find $d -type f -exec sha256sum {} + | sort -k2
  done
}
state() { for u in systemd-machined.socket systemd-machined.service machined.socket machined.service; do echo "$u $(systemctl is-active $u)"; done; }
U() { runuser -u mtuser -- env XDG_RUNTIME_DIR=/run/user/1500 DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/1500/bus "$@"; }
# the user's varlink call, then who served it: the active one of the two user services, its command line
user() {
  local u pid
  U varlinkctl --json=short call --more /run/user/1500/systemd/machine/io.systemd.Machine io.systemd.Machine.List '{}'
  echo "rc=$?"
  for u in systemd-machined.socket machined.socket; do echo "user $u $(U systemctl --user is-active $u)"; done
  for u in systemd-machined.service machined.service; do
    pid=$(U systemctl --user show -P MainPID $u)
    [ "$pid" = 0 ] || echo "served by $u: $(tr '\0' ' ' < /proc/$pid/cmdline)"
  done
  U busctl --user status org.freedesktop.machine1 | grep -E '^(Comm|UserUnit)='
}
varlinkctl call /run/systemd/machine/io.systemd.Machine io.systemd.service.Ping '{}'
systemd-run --quiet --unit=in-l1 /bin/sleep 2990; P=$(systemctl show -p MainPID --value in-l1)
varlinkctl call /run/systemd/machine/io.systemd.Machine io.systemd.Machine.Register "{\"name\":\"in1\",\"class\":\"container\",\"leader\":$P}"
chmod 0711 /root  # (the host's interpreter is below /root: let the user reach it; overlay only)
useradd -m -u 1500 mtuser
systemctl start user@1500.service
echo "=== user-before"
user
snap > /tmp/snap.before
mkdir -p /etc/systemd/system/machined.service.d /etc/systemd/user/machined.service.d
printf '[Service]\nEnvironment=LD_LIBRARY_PATH=%(libs)s\n' > /etc/systemd/system/machined.service.d/host-python.conf
cp /etc/systemd/system/machined.service.d/host-python.conf /etc/systemd/user/machined.service.d/
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
echo "=== user-running-during-install"
user
systemctl restart user@1500.service
echo "=== user-after-install"
user
echo "=== uninstall"
LD_LIBRARY_PATH=%(libs)s $M uninstall
echo "=== after-uninstall"
state
rm -r /etc/systemd/system/machined.service.d /etc/systemd/user/machined.service.d
systemctl daemon-reload
busctl status org.freedesktop.machine1 | grep -E '^(Comm|Unit)='
varlinkctl --json=short call /run/systemd/machine/io.systemd.Machine io.systemd.Machine.List '{"name":"in1"}' | sed 's/,"leader.*//'
systemctl restart user@1500.service
echo "=== user-after-uninstall"
user
snap > /tmp/snap.after
systemctl stop user@1500.service
echo "=== snapshot"
diff /tmp/snap.before /tmp/snap.after && echo same
systemctl stop in-l1
"""


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
    # the user's instance: upstream's before and while its manager runs on, ours once it restarts
    assert "created /etc/systemd/user/machined.service (per-user unit)" in s["install"], out
    assert "created /etc/systemd/user/systemd-machined.socket -> /dev/null" in s["install"], out
    assert "users' service managers running now keep systemd-machined --user" in s["install"], out
    upstream = [
        "user systemd-machined.socket active", "user machined.socket inactive",
        "served by systemd-machined.service: /usr/lib/systemd/systemd-machined --user",
        "Comm=systemd-machine", "UserUnit=systemd-machined.service",
    ]  # fmt: skip
    ours = [
        "user systemd-machined.socket inactive", "user machined.socket active",
        f"served by machined.service: {MACHINED.read_text().splitlines()[0].removeprefix('#!')} {MACHINED} --user",
        "Comm=machined", "UserUnit=machined.service",
    ]  # fmt: skip
    before = s["user-before"].splitlines()
    listing = before[: next(i for i, line in enumerate(before) if line.startswith("rc=")) + 1]  # (either's answer)
    for name, expected in (("user-before", upstream), ("user-running-during-install", upstream),
                           ("user-after-install", ours), ("user-after-uninstall", upstream)):  # fmt: skip
        assert [line.rstrip() for line in s[name].splitlines()] == listing + expected, (name, out)
    assert s["snapshot"].strip() == "same", out

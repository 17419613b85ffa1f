"""``make run``: a sandbox with machined in place, machines registered, real clients asked."""

from __future__ import annotations

import sys
import time

from machined.sandbox.containers import BASH_FUNCTIONS
from machined.sandbox.core import Sandbox

# A booted container with a private network, an address on its side of the veth
# (TEST-NET-2, never routed anywhere), and nss-mymachines in the sandbox's nsswitch.conf,
# so that `machinectl shell/login demo-os` and `getent hosts demo-os` have something to act on.
BOOTED = (
    BASH_FUNCTIONS
    + r"""
boot_container demo-os
machinectl shell demo-os /bin/sh -c 'ip addr add 198.51.100.2/24 dev host0 && ip link set host0 up' \
  >/dev/null 2>&1 </dev/null
sed 's/^hosts:.*/hosts: files mymachines dns/' /etc/nsswitch.conf > /run/nsswitch.conf
mount --bind /run/nsswitch.conf /etc/nsswitch.conf
"""
)

SETUP = [
    # A container: systemd-nspawn registers itself (CreateMachineWithNetwork).
    ["systemd-run", "--quiet", "--unit=demo-container", "systemd-nspawn", "-q", "-D", "/", "--volatile=yes",
     "-M", "demo-container", "/bin/sleep", "infinity"],
    # A VM-class machine: a sleeping leader registered with CreateMachine, as libvirt does.
    ["systemd-run", "--quiet", "--unit=demo-vm-leader", "/bin/sleep", "infinity"],
    ["sh", "-c", "busctl call org.freedesktop.machine1 /org/freedesktop/machine1 "
     "org.freedesktop.machine1.Manager CreateMachine 'sayssusa(sv)' demo-vm 0 demo vm "
     "$(systemctl show -p MainPID --value demo-vm-leader) '' 0 >/dev/null"],
    # Two images in the pool: a directory tree and a raw disk image.
    ["sh", "-c", "mkdir -p /var/lib/machines/demo-tree/etc && cp /etc/os-release /var/lib/machines/demo-tree/etc/ "
     "&& echo demo-tree > /var/lib/machines/demo-tree/etc/hostname "
     "&& truncate -s 64M /var/lib/machines/demo-disk.raw"],
]  # fmt: skip

STEPS = [
    ("machinectl list --all", ["machinectl", "list", "--all"]),
    ("busctl status org.freedesktop.machine1 (who serves the name)", ["sh", "-c",
     "busctl status org.freedesktop.machine1 | grep -E '^(PID|Comm|CommandLine|Unit)='"]),
    ("machinectl status -n0 demo-os (a booted container)", ["machinectl", "status", "-n0", "demo-os"]),
    ("machinectl shell demo-os /bin/echo hello", ["machinectl", "-q", "shell", "demo-os", "/bin/echo", "hello"]),
    ("getent hosts demo-os (nss-mymachines)", ["getent", "hosts", "demo-os"]),
    ("machinectl status -n0 demo-container", ["machinectl", "status", "-n0", "demo-container"]),
    ("machinectl status -n0 demo-vm", ["machinectl", "status", "-n0", "demo-vm"]),
    ("ps -eo pid,machine,cmd (machine column read by procps from the state files)", ["sh", "-c",
     "ps -eo pid,machine,cmd | grep -v ' - '"]),
    ("systemd-cgls --no-pager /machine.slice", ["systemd-cgls", "--no-pager", "/machine.slice"]),
    ("ls -l /run/systemd/machines", ["ls", "-l", "/run/systemd/machines"]),
    ("machinectl list-images", ["machinectl", "list-images"]),
    ("machinectl image-status demo-tree", ["machinectl", "image-status", "demo-tree"]),
    ("busctl tree org.freedesktop.machine1", ["busctl", "tree", "org.freedesktop.machine1"]),
]  # fmt: skip


def show(sb: Sandbox, title: str, args: list[str]) -> None:
    print(f"\n$ {title}")
    r = sb.run(args, check=False)
    sys.stdout.write(r.stdout)
    sys.stdout.write(r.stderr)


def wait_for_machine(sb: Sandbox, name: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sb.run(["machinectl", "show", name], check=False).returncode == 0:
            return
        time.sleep(0.1)


# With systemd 262: what its clients ask over varlink.
STEPS_262 = [
    ("varlinkctl call --more /run/systemd/machine/io.systemd.Machine io.systemd.Machine.List '{}'", ["varlinkctl",
     "call", "--more", "/run/systemd/machine/io.systemd.Machine", "io.systemd.Machine.List", "{}"]),
    ("varlinkctl info /run/systemd/machine/io.systemd.Machine", ["varlinkctl", "info",
     "/run/systemd/machine/io.systemd.Machine"]),
]  # fmt: skip


def demo(id_file: str | None, systemd: str | None = None) -> int:
    sb = Sandbox("ours", systemd=systemd or "252").start()
    if id_file:
        with open(id_file, "w", encoding="utf-8") as f:
            f.write(sb.id + "\n")
    version = sb.run(["systemctl", "--version"], check=False).stdout.split("\n")[0]
    print(
        f"Sandbox {sb.id} booted {version} (PID {sb.init_pid} on the host) with machined in place of systemd-machined."
    )
    for args in SETUP:
        sb.run(args, check=False)
    sb.run(["bash", "-c", BOOTED], check=False, timeout=120)
    wait_for_machine(sb, "demo-container")
    for title, args in STEPS + (STEPS_262 if systemd == "262" else []):
        show(sb, title, args)
    print(
        f"\nThe sandbox keeps running. Enter it with 'make shell' (or: machined-sandbox shell {sb.id}),"
        " then try: machinectl shell demo-os, machinectl login demo-os, getent hosts demo-os,"
        " machinectl copy-to demo-os /etc/hostname /root/, machinectl list-images."
        " Stop it with 'make stop'."
    )
    return 0

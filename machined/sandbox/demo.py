"""``make run``: a sandbox with machined in place, and real clients answered by it."""

from __future__ import annotations

import sys

from machined.sandbox.core import Sandbox

STEPS = [
    ("machinectl list --all", ["machinectl", "list", "--all"]),
    ("busctl status org.freedesktop.machine1 (who serves the name)", ["sh", "-c",
     "busctl status org.freedesktop.machine1 | grep -E '^(PID|Comm|CommandLine|Unit)='"]),
    ("machinectl status -n0 .host", ["machinectl", "status", "-n0", ".host"]),
    ("busctl tree org.freedesktop.machine1", ["busctl", "tree", "org.freedesktop.machine1"]),
]  # fmt: skip


def show(sb: Sandbox, title: str, args: list[str]) -> None:
    print(f"\n$ {title}")
    r = sb.run(args, check=False)
    sys.stdout.write(r.stdout)
    sys.stdout.write(r.stderr)


def demo(id_file: str | None) -> int:
    sb = Sandbox("ours").start()
    if id_file:
        with open(id_file, "w", encoding="utf-8") as f:
            f.write(sb.id + "\n")
    print(f"Sandbox {sb.id} booted systemd (PID {sb.init_pid} on the host) with machined "
          "in place of systemd-machined.")
    for title, args in STEPS:
        show(sb, title, args)
    print(f"\nThe sandbox keeps running. Enter it with 'make shell' "
          f"(or: machined-sandbox shell {sb.id}); stop it with 'make stop'.")
    return 0

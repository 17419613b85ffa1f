"""Which systemd unit a process belongs to, from its cgroup path."""

from __future__ import annotations

_UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap", ".device", ".target", ".timer", ".path")


def cgroup_path_get_unit(path: str) -> str | None:
    """The unit of a cgroup path: its first component that is not a slice.

    ``/machine.slice/machine-foo.scope/payload`` → ``machine-foo.scope``;
    ``/user.slice`` → None.
    """
    for part in path.strip("/").split("/"):
        if not part or part.endswith(".slice"):
            continue
        return part if part.endswith(_UNIT_SUFFIXES) else None
    return None


def parse_proc_cgroup(text: str) -> str | None:
    """The systemd cgroup path in a ``/proc/PID/cgroup`` text.

    On a hybrid host systemd tracks processes in the ``name=systemd``
    hierarchy; on a unified host in the ``0::`` line.
    """
    unified = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[1] == "name=systemd":
            return parts[2]
        if parts[0] == "0" and parts[1] == "":
            unified = parts[2]
    return unified


def pid_cgroup(pid: int) -> str | None:
    """The systemd cgroup path of *pid*, or None if the process does not exist."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
            return parse_proc_cgroup(f.read())
    except (FileNotFoundError, ProcessLookupError):
        return None


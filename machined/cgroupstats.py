"""Resource use of a unit's cgroup (CPU, memory, tasks, IO), read from cgroupfs; no D-Bus.

Where a unit's cgroup lives depends on the layout (:func:`machined.cgroup.cgroup_layout`):

* *unified*: one cgroup2 tree at /sys/fs/cgroup.
* *hybrid*: systemd tracks units in cgroup2 at /sys/fs/cgroup/unified, but the
  resource controllers (cpuacct, memory, pids, blkio) are v1 hierarchies at
  /sys/fs/cgroup/<controller>, each with the unit at the same relative path.
* *legacy*: v1 hierarchies only; name=systemd at /sys/fs/cgroup/systemd.

Each value is taken from the first file that exists among its sources, in the
layout's order (v1 controller first on hybrid and legacy, then cgroup2), so a
controller that is not enabled, not mounted or not delegated just leaves the
value out (None); nothing here raises for a missing or unreadable file.
Every value covers the unit's whole subtree (delegated units such as nspawn's
scopes keep their processes in sub-cgroups).

The relative paths come from the ``/proc/PID/cgroup`` of a process in the unit
(its leader), cut after the unit's own component; that finds units in any slice,
and inside a cgroup namespace, without guessing. Without such a process the
unit is looked for at ``/machine.slice/<unit>``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from machined.cgroup import CGROUP_ROOT, HYBRID, LEGACY, UNIFIED

V2 = ""  # the key of the cgroup2 hierarchy in a path map (its /proc/PID/cgroup line is "0::")
NAME_SYSTEMD = "name=systemd"
FALLBACK_SLICE = "machine.slice"


@dataclass
class CgroupStats:
    """What could be read; None where the file does not exist (or cannot be read)."""

    cpu_seconds: float | None = None
    memory_bytes: int | None = None
    memory_peak_bytes: int | None = None
    tasks: int | None = None
    io_read_bytes: int | None = None
    io_write_bytes: int | None = None


# ----- parsers of file contents (pure) ------------------------------------------------


def parse_int(text: str) -> int | None:
    """A file holding one number (``memory.current``, ``pids.current``…); None for ``max``/garbage."""
    try:
        return int(text.strip())
    except ValueError:
        return None


def parse_flat_keyed(text: str, key: str) -> int | None:
    """The value of *key* in a ``key value`` per line file (``cpu.stat``)."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            return parse_int(parts[1])
    return None


def parse_io_stat(text: str) -> tuple[int, int]:
    """(read bytes, written bytes) over all devices of a cgroup2 ``io.stat``.

    ``8:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0`` per device."""
    read = written = 0
    for line in text.splitlines():
        for field in line.split()[1:]:
            key, _, value = field.partition("=")
            if key == "rbytes":
                read += parse_int(value) or 0
            elif key == "wbytes":
                written += parse_int(value) or 0
    return read, written


def parse_blkio(text: str) -> tuple[int, int]:
    """(read bytes, written bytes) over all devices of a v1 ``blkio.*io_service_bytes*`` file.

    ``8:0 Read 4096`` / ``8:0 Write 512`` / … per device and operation, then ``Total N``."""
    read = written = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue  # the "Total N" line, blank lines
        if parts[1] == "Read":
            read += parse_int(parts[2]) or 0
        elif parts[1] == "Write":
            written += parse_int(parts[2]) or 0
    return read, written


def count_lines(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.strip())


def unit_paths(proc_cgroup: str, unit: str) -> dict[str, str]:
    """Each hierarchy's path of *unit*, from the ``/proc/PID/cgroup`` text of a process in it.

    Keys: :data:`V2` for the cgroup2 line, each controller of a v1 line (``cpu,cpuacct``
    gives ``cpu`` and ``cpuacct``; named hierarchies keep their ``name=``). A line whose
    path does not go through *unit* is left out (the process is elsewhere there).
    """
    paths: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        path = parts[2].removesuffix(" (deleted)")
        components = path.strip("/").split("/")
        if unit not in components:
            continue
        cut = "/" + "/".join(components[: components.index(unit) + 1])
        if parts[0] == "0" and not parts[1]:
            paths[V2] = cut
        else:
            for controller in parts[1].split(","):
                if controller:
                    paths[controller] = cut
    return paths


def fallback_paths(unit: str) -> dict[str, str]:
    """Where a unit of machine.slice is, when no process tells us: the same path everywhere."""
    path = f"/{FALLBACK_SLICE}/{unit}"
    return {V2: path, "cpuacct": path, "memory": path, "pids": path, "blkio": path, NAME_SYSTEMD: path}


# ----- the reader ---------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:  # missing (controller off), gone (unit stopped), EACCES, ENODEV…
        return None


class CgroupReader:
    """Reads :class:`CgroupStats` of units, for one layout and cgroupfs root."""

    def __init__(self, layout: str, root: str = CGROUP_ROOT) -> None:
        self.layout = layout
        self.root = root
        if layout == UNIFIED:
            self.v2_root: str | None = root
        elif layout == HYBRID:
            self.v2_root = os.path.join(root, "unified")
        else:
            self.v2_root = None

    # where files are

    def v2_dir(self, paths: dict[str, str]) -> str | None:
        rel = paths.get(V2)
        if self.v2_root is None or rel is None:
            return None
        return self.v2_root + rel

    def v1_dir(self, controller: str, paths: dict[str, str]) -> str | None:
        if self.layout not in (HYBRID, LEGACY):
            return None
        rel = paths.get(controller)
        if rel is None:
            return None
        mount = "systemd" if controller == NAME_SYSTEMD else controller
        return os.path.join(self.root, mount) + rel

    def _v1(self, controller: str, paths: dict[str, str], name: str) -> str | None:
        where = self.v1_dir(controller, paths)
        return _read(os.path.join(where, name)) if where else None

    def _v2(self, paths: dict[str, str], name: str) -> str | None:
        where = self.v2_dir(paths)
        return _read(os.path.join(where, name)) if where else None

    # what is in them

    def read(self, paths: dict[str, str]) -> CgroupStats:
        """Everything that can be read of the unit at *paths* (see :func:`unit_paths`)."""
        io = self.io_bytes(paths)
        return CgroupStats(
            cpu_seconds=self.cpu_seconds(paths),
            memory_bytes=self.memory_bytes(paths),
            memory_peak_bytes=self.memory_peak_bytes(paths),
            tasks=self.tasks(paths),
            io_read_bytes=io[0] if io is not None else None,
            io_write_bytes=io[1] if io is not None else None,
        )

    def cpu_seconds(self, paths: dict[str, str]) -> float | None:
        text = self._v1("cpuacct", paths, "cpuacct.usage")
        if text is not None and (ns := parse_int(text)) is not None:
            return ns / 1e9
        text = self._v2(paths, "cpu.stat")  # cgroup2 keeps usage_usec even without the cpu controller
        if text is not None and (us := parse_flat_keyed(text, "usage_usec")) is not None:
            return us / 1e6
        return None

    def memory_bytes(self, paths: dict[str, str]) -> int | None:
        text = self._v1("memory", paths, "memory.usage_in_bytes")
        if text is None:
            text = self._v2(paths, "memory.current")
        return parse_int(text) if text is not None else None

    def memory_peak_bytes(self, paths: dict[str, str]) -> int | None:
        text = self._v1("memory", paths, "memory.max_usage_in_bytes")
        if text is None:
            text = self._v2(paths, "memory.peak")  # kernel 5.19 and later
        return parse_int(text) if text is not None else None

    def tasks(self, paths: dict[str, str]) -> int | None:
        """Tasks (threads) in the subtree: ``pids.current``, else the thread lists counted."""
        text = self._v1("pids", paths, "pids.current")
        if text is None:
            text = self._v2(paths, "pids.current")
        if text is not None and (n := parse_int(text)) is not None:
            return n
        where = self.v2_dir(paths)
        if where is not None:
            return _count_tree(where, ("cgroup.threads", "cgroup.procs"))
        where = self.v1_dir(NAME_SYSTEMD, paths)
        if where is not None:
            return _count_tree(where, ("tasks",))
        return None

    def io_bytes(self, paths: dict[str, str]) -> tuple[int, int] | None:
        for name in ("blkio.throttle.io_service_bytes_recursive", "blkio.throttle.io_service_bytes"):
            text = self._v1("blkio", paths, name)
            if text is not None:
                return parse_blkio(text)
        text = self._v2(paths, "io.stat")
        return parse_io_stat(text) if text is not None else None


def _count_tree(top: str, names: tuple[str, ...]) -> int | None:
    """Lines of the first readable file of *names* in *top* and every cgroup below it."""
    total = 0
    found = False
    for dirpath, _, _ in os.walk(top):
        for name in names:
            text = _read(os.path.join(dirpath, name))
            if text is not None:
                total += count_lines(text)
                found = True
                break
    return total if found else None


def read_proc_cgroup(pid: int) -> str | None:
    return _read(f"/proc/{pid}/cgroup") if pid > 0 else None

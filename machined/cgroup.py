"""Which systemd unit a process belongs to, from its cgroup path.

systemd keeps track of units in one cgroup hierarchy only, and which one depends on
how /sys/fs/cgroup is set up. It decides that from the file system types mounted
there (``cg_unified_cached()`` in systemd's cgroup-util.c), never from what
``/proc/PID/cgroup`` happens to list:

* cgroup2 at /sys/fs/cgroup: the *unified* layout; the ``0::`` line.
* tmpfs at /sys/fs/cgroup with cgroup2 at ``unified/`` (or, as systemd 232 did, at
  ``systemd/``): the *hybrid* layout; systemd tracks in cgroup2, the ``0::`` line.
  The v1 ``name=systemd`` hierarchy is only a compatibility copy, written after the
  cgroup2 one, so it can be stale.
* tmpfs with a v1 ``name=systemd`` hierarchy at ``systemd/``: the *legacy* layout;
  the line whose controllers include ``name=systemd``.

A ``name=systemd`` line may be present in every layout (the kernel lists every
hierarchy mounted anywhere, e.g. by a container manager), so its presence decides
nothing. The decision is made once per process, as systemd caches it.
"""

from __future__ import annotations

import ctypes
import logging
import os

from machined.fs.libc import libc

log = logging.getLogger(__name__)

UNIFIED = "unified"
HYBRID = "hybrid"
LEGACY = "legacy"

CGROUP2_SUPER_MAGIC = 0x63677270
CGROUP_SUPER_MAGIC = 0x0027E0EB
TMPFS_MAGIC = 0x01021994
SYSFS_MAGIC = 0x62656572

CGROUP_ROOT = "/sys/fs/cgroup"

_UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap", ".device", ".target", ".timer", ".path")


class CgroupLayoutError(OSError):
    """/sys/fs/cgroup holds nothing systemd would recognise."""


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


def cgroup_path_get_unit_full(path: str) -> tuple[str | None, str]:
    """The unit of a cgroup path and the path below the unit's own cgroup (262's subgroup):
    ``/user.slice/user-1000.slice/user@1000.service/app.slice/x.service`` →
    ``("user@1000.service", "app.slice/x.service")``; no unit → ``(None, "")``."""
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        if part.endswith(".slice"):
            continue
        if not part.endswith(_UNIT_SUFFIXES):
            return None, ""
        return part, "/".join(parts[i + 1 :])
    return None, ""


def cgroup_path_get_user_unit_full(path: str) -> tuple[str | None, str]:
    """As :func:`cgroup_path_get_unit_full`, for the unit in a user's service manager: the path
    below that manager's ``user@UID.service`` (None when the path is not below one)."""
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        if part.endswith(".slice"):
            continue
        if not (part.startswith("user@") and part.endswith(".service")):
            return None, ""
        return cgroup_path_get_unit_full("/".join(parts[i + 1 :]))
    return None, ""


def layout_from_fs_types(root: int | None, unified: int | None, systemd: int | None) -> str:
    """The layout, given the file system types (statfs ``f_type``, None: not a mount
    point we can stat) of /sys/fs/cgroup, /sys/fs/cgroup/unified and
    /sys/fs/cgroup/systemd. The rules of systemd's ``cg_unified_cached()``."""
    if root == CGROUP2_SUPER_MAGIC:
        return UNIFIED
    if root == TMPFS_MAGIC:
        if unified == CGROUP2_SUPER_MAGIC:
            return HYBRID
        if systemd is None:
            raise CgroupLayoutError("tmpfs at /sys/fs/cgroup without a name=systemd hierarchy")
        if systemd == CGROUP2_SUPER_MAGIC:
            return HYBRID  # systemd 232's variant: cgroup2 at systemd/
        return LEGACY  # systemd treats any other type there as legacy too
    if root == SYSFS_MAGIC or root is None:
        raise CgroupLayoutError("no file system is mounted on /sys/fs/cgroup")
    raise CgroupLayoutError(f"unknown file system type {root:#x} mounted on /sys/fs/cgroup")


_STATFS_SIZE = 256  # struct statfs is 120 bytes on 64-bit Linux; room to spare


def fs_type(path: str) -> int | None:
    """statfs(*path*).f_type, or None if *path* does not exist."""
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if libc.statfs(os.fsencode(path), buf) != 0:
        code = ctypes.get_errno()
        if code in (2, 20):  # ENOENT, ENOTDIR
            return None
        raise OSError(code, os.strerror(code), path)
    # f_type is the first member (__fsword_t, a long); magic numbers are positive.
    return ctypes.c_long.from_buffer_copy(buf.raw[: ctypes.sizeof(ctypes.c_long)]).value & 0xFFFFFFFF


def detect_layout(root: str = CGROUP_ROOT) -> str:
    """The cgroup layout of this system, from the file systems mounted at *root*."""
    top = fs_type(root)
    unified = systemd = None
    if top == TMPFS_MAGIC:
        unified = fs_type(os.path.join(root, "unified"))
        if unified != CGROUP2_SUPER_MAGIC:
            systemd = fs_type(os.path.join(root, "systemd"))
    return layout_from_fs_types(top, unified, systemd)


_layout: str | None = None


def cgroup_layout() -> str:
    """The layout, detected once per process (a failed detection is retried next time)."""
    global _layout
    if _layout is None:
        try:
            _layout = detect_layout()
        except OSError as e:
            # systemd itself would not run here; read the cgroup2 line, as on any
            # system made since systemd 233, without caching the guess.
            log.warning("Cannot determine the cgroup layout (%s); assuming cgroup2 tracks units.", e)
            return UNIFIED
        log.debug("cgroup layout: %s", _layout)
    return _layout


def parse_proc_cgroup(text: str, layout: str) -> str | None:
    """The cgroup path systemd tracks the process in, from a ``/proc/PID/cgroup`` text.

    *layout* (UNIFIED, HYBRID or LEGACY) says which line that is: on the unified and
    hybrid layouts the cgroup2 line (hierarchy 0), on the legacy layout the line whose
    controllers include ``name=systemd``. None if the text has no such line.
    """
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if layout == LEGACY:
            if "name=systemd" not in parts[1].split(","):
                continue
        elif parts[0] != "0":
            continue
        return parts[2].removesuffix(" (deleted)")  # a zombie's
    return None


def pid_cgroup(pid: int, layout: str | None = None) -> str | None:
    """The systemd cgroup path of *pid*, or None if the process does not exist."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return parse_proc_cgroup(text, layout or cgroup_layout())

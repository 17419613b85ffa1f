"""Inner stage of a sandbox: runs as PID 1 of fresh namespaces and execs systemd.

It is started by ``unshare`` (see :mod:`machined.sandbox.core`) with a JSON spec
on standard input. Everything it mounts lives in the sandbox's private mount
namespace; the host's view of its file systems is never changed. The order
matters: mount points that may be missing are created first (empty directories
on the host are harmless), then every inherited mount is made read-only *in this
namespace*, then private writable tmpfs mounts are put where systemd, dbus and
machined must write.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

# Inherited mounts below these stay as they are (new procfs, devices, sysfs).
_KEEP_WRITABLE_PREFIXES = ("/proc", "/sys", "/dev")


def _mount(*args: str, pass_fds: tuple[int, ...] = ()) -> None:
    subprocess.run(["mount", *args], check=True, pass_fds=pass_fds)


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _mountpoints() -> list[str]:
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            points.append(point)
    return points


def _make_inherited_mounts_read_only() -> None:
    for point in dict.fromkeys(_mountpoints()):
        if point != "/" and point.startswith(_KEEP_WRITABLE_PREFIXES):
            continue
        # A bind remount only changes this namespace's per-mount flags.
        r = subprocess.run(
            ["mount", "-o", "remount,bind,ro", point],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if r.returncode != 0 and point == "/":
            raise SystemExit("sandbox: could not make / read-only in the sandbox")


def _write_file(path: str, content: str | None, mode: int, symlink: str | None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if symlink is not None:
        os.symlink(symlink, path)
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(content or "")
    os.chmod(path, mode)


def boot(spec: dict[str, Any]) -> None:
    """Set up the namespace described by *spec* and exec systemd (never returns)."""
    tmpfs: list[dict[str, Any]] = spec["tmpfs"]
    overlays: list[str] = spec.get("overlays", [])
    for entry in tmpfs:
        if not any(_under(entry["path"], top) for top in overlays):  # (those are made in the overlay)
            os.makedirs(entry["path"], exist_ok=True)
    for bind in spec["binds"]:
        if not os.path.exists(bind["dst"]):
            raise SystemExit(f"sandbox: bind target {bind['dst']} does not exist on this host")

    _mount("-t", "proc", "-o", "nosuid,nodev,noexec", "proc", "/proc")
    # Keep systemd's console and kernel-log writes away from the host's devices
    # (before /run, where the log file lives, is covered by a tmpfs).
    _mount("--bind", spec["console_log"], "/dev/console")
    _mount("--bind", "/dev/null", "/dev/kmsg")
    if spec.get("read_only_root", True):
        _make_inherited_mounts_read_only()

    # Paths the sandbox needs (the project, its virtualenv) that a private tmpfs
    # would hide, e.g. a checkout under /tmp: keep a handle, bind them back after.
    preserved: list[tuple[str, int]] = []
    for path in spec.get("preserve", []):
        if any(_under(path, kept) for kept, _ in preserved):
            continue  # visible through its preserved parent
        if any(_under(path, entry["path"]) for entry in tmpfs) and os.path.isdir(path):
            preserved.append((path, os.open(path, os.O_PATH | os.O_DIRECTORY)))

    # Host directories made writable in the sandbox only: an overlay each, the host's
    # directory below and a private tmpfs above (e.g. /var/lib for the container runtimes).
    if overlays:
        staging = spec["overlay_staging"]
        _mount("-t", "tmpfs", "-o", "mode=700", "tmpfs", staging)
        for i, path in enumerate(overlays):
            upper, work = f"{staging}/{i}/upper", f"{staging}/{i}/work"
            os.makedirs(upper)
            os.makedirs(work)
            _mount("-t", "overlay", "-o", f"lowerdir={path},upperdir={upper},workdir={work}", "overlay", path)

    for entry in tmpfs:
        os.makedirs(entry["path"], exist_ok=True)
        _mount("-t", "tmpfs", "-o", entry["options"], "tmpfs", entry["path"])

    for path, fd in preserved:
        os.makedirs(path, exist_ok=True)
        _mount("--no-canonicalize", "--bind", f"/proc/self/fd/{fd}", path, pass_fds=(fd,))
        _mount("-o", "remount,bind,ro", path)
        os.close(fd)

    # cgroups: thanks to the cgroup namespace only our own subtree is visible. The v1
    # controller hierarchies of the host stay hidden. systemd decides the layout from
    # the file system type at /sys/fs/cgroup: tmpfs with unified/ is hybrid, cgroup2 is
    # unified (then /proc/PID/cgroup still lists the host's name=systemd hierarchy).
    if spec["cgroup_layout"] == "hybrid":
        _mount("-t", "tmpfs", "-o", "mode=755,nosuid,nodev,noexec", "tmpfs", "/sys/fs/cgroup")
        for sub, args in (
            ("systemd", ["-t", "cgroup", "-o", "none,name=systemd,nosuid,nodev,noexec"]),
            ("unified", ["-t", "cgroup2", "-o", "nosuid,nodev,noexec"]),
        ):
            os.mkdir(f"/sys/fs/cgroup/{sub}")
            _mount(*args, "cgroup", f"/sys/fs/cgroup/{sub}")
        _mount("-o", "remount,ro", "/sys/fs/cgroup")
    else:
        _mount("-t", "cgroup2", "-o", "nosuid,nodev,noexec", "cgroup2", "/sys/fs/cgroup")

    for bind in spec["binds"]:
        _mount("--bind", bind["src"], bind["dst"])
        if bind.get("ro", True):
            _mount("-o", "remount,bind,ro", bind["dst"])

    for f in spec["files"]:
        _write_file(f["path"], f.get("content"), int(f.get("mode", "644"), 8), f.get("symlink"))

    # Like a host booted by the kernel (systemd only does this itself outside containers):
    # shared propagation, which nspawn's bind-mount propagation needs. The peer groups
    # are new ones of this namespace, so nothing propagates to the host.
    _mount("--make-rshared", "/")

    subprocess.run(["hostname", spec["hostname"]], check=False)
    # Start the sandbox's PIDs high, so that no PID reads like a small number in outputs
    # (tests mask PIDs by value) and PID-reuse tests have room below.
    exec_systemd(spec)


def exec_systemd(spec: dict[str, Any]) -> None:
    """Become the sandbox's systemd (PIDs from ``first_pid`` on, stdin from /dev/null)."""
    if spec.get("first_pid"):
        with open("/proc/sys/kernel/ns_last_pid", "w", encoding="ascii") as f:
            f.write(str(spec["first_pid"] - 1))
    env = {
        "container": "machined-sandbox",
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
    }
    stdin = os.open("/dev/null", os.O_RDONLY)
    os.dup2(stdin, 0)
    os.execve(
        spec["systemd"],
        [spec["systemd"], "--system", f"--unit={spec['unit']}", "--show-status=no"],
        env,
    )


def run_as_pid1(boot: Callable[[dict[str, Any]], None]) -> None:
    """The boot stage's entry point: the spec on stdin, *boot* it as PID 1."""
    spec = json.load(sys.stdin)
    if os.getpid() != 1:
        raise SystemExit("sandbox: the boot stage must run as PID 1 of a new pid namespace")
    boot(spec)


def main() -> None:
    run_as_pid1(boot)


if __name__ == "__main__":
    main()

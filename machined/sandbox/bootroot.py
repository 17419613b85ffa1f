"""Inner stage of a systemd-262 sandbox: PID 1 of fresh namespaces, boots the cached root.

Started by ``unshare`` (see :mod:`machined.sandbox.forky`) with a JSON spec on standard
input. It builds the sandbox's root in its private mount namespace and never changes
the host's view: a tmpfs (the *staging* directory) holds an overlay whose lower layer is
the cached Debian tree (never written) and whose upper layer takes every write; then a
fresh proc, a read-only sysfs with only cgroup2 (the sandbox's own subtree) at
/sys/fs/cgroup, a private /dev of bind-mounted device nodes with its own devpts, private
tmpfs mounts, read-only binds of the host paths the sandbox needs (the project, its
virtualenv, the interpreter, the libraries the root lacks), and the sandbox's files. Then
``pivot_root`` into it (the host's tree is detached: ``nsenter -m`` lands in the root) and
exec the root's systemd.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
from typing import Any

from machined.sandbox.boot import exec_systemd, run_as_pid1

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
MNT_DETACH = 2
MS_REC = 0x4000
MS_SHARED = 1 << 20


def _mount(*args: str) -> None:
    subprocess.run(["mount", "--no-canonicalize", *args], check=True)


def _bind(src: str, dst: str, *, read_only: bool) -> None:
    _mount("--bind", src, dst)
    if read_only:
        _mount("-o", "remount,bind,ro", dst)


def _mount_point(path: str, *, is_dir: bool) -> None:
    """An empty directory or file to mount on (in the overlay or a tmpfs, never the host)."""
    if is_dir:
        os.makedirs(path, exist_ok=True)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.lexists(path):
        with open(path, "w"):
            pass


def _in(root: str, path: str) -> str:
    return root + "/" + path.lstrip("/")


def _write_file(path: str, content: str | None, mode: int, symlink: str | None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.lexists(path):
        os.unlink(path)  # a file of the lower layer: replaced in the upper one
    if symlink is not None:
        os.symlink(symlink, path)
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(content or "")
    os.chmod(path, mode)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise SystemExit(f"sandbox: {what}: {os.strerror(err)}")


def _populate_dev(root: str, spec: dict[str, Any]) -> None:
    dev = _in(root, "/dev")
    _mount("-t", "tmpfs", "-o", "mode=755,nosuid,size=4m", "tmpfs", dev)
    for node in spec["dev_nodes"]:
        if not os.path.exists(node):
            continue
        target = _in(root, node)
        _mount_point(target, is_dir=False)
        _bind(node, target, read_only=False)
    pts = _in(root, "/dev/pts")
    os.makedirs(pts)
    _mount("-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=0620,gid=5,nosuid,noexec", "devpts", pts)
    os.symlink("pts/ptmx", _in(root, "/dev/ptmx"))
    os.makedirs(_in(root, "/dev/shm"))
    _mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev,size=64m", "tmpfs", _in(root, "/dev/shm"))
    os.makedirs(_in(root, "/dev/mqueue"))
    os.makedirs(_in(root, "/dev/hugepages"))
    # systemd's console and kernel-log writes: to the sandbox's log, and nowhere.
    for name, src in (("console", spec["console_log"]), ("kmsg", "/dev/null")):
        _mount_point(_in(root, f"/dev/{name}"), is_dir=False)
        _bind(src, _in(root, f"/dev/{name}"), read_only=False)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("core", "/proc/kcore"),
    ):
        os.symlink(target, _in(root, f"/dev/{name}"))


def boot(spec: dict[str, Any]) -> None:
    """Assemble the root described by *spec*, pivot into it and exec systemd (never returns)."""
    staging = spec["staging"]
    _mount("-t", "tmpfs", "-o", f"mode=700,size={spec['staging_size']}", "tmpfs", staging)
    for sub in ("upper", "work", "root"):
        os.mkdir(f"{staging}/{sub}")
    root = f"{staging}/root"
    # The tree is the overlay's lower layer, which the kernel never writes; read-only
    # besides (in this namespace only), so nothing before the pivot can write it either.
    _bind(spec["lower"], spec["lower"], read_only=True)
    _mount(
        "-t", "overlay", "overlay", "-o",
        f"lowerdir={spec['lower']},upperdir={staging}/upper,workdir={staging}/work",
        root,
    )  # fmt: skip

    _mount("-t", "proc", "-o", "nosuid,nodev,noexec", "proc", _in(root, "/proc"))
    _mount("-t", "sysfs", "-o", "ro,nosuid,nodev,noexec", "sysfs", _in(root, "/sys"))
    # Only cgroup2, and thanks to the cgroup namespace only the sandbox's own subtree.
    _mount("-t", "cgroup2", "-o", "nosuid,nodev,noexec", "cgroup2", _in(root, "/sys/fs/cgroup"))
    _populate_dev(root, spec)

    for entry in spec["tmpfs"]:
        os.makedirs(_in(root, entry["path"]), exist_ok=True)
        _mount("-t", "tmpfs", "-o", entry["options"], "tmpfs", _in(root, entry["path"]))
    for path in spec.get("dirs", []):
        os.makedirs(_in(root, path), exist_ok=True)
    # Host paths at the same place inside, read-only (after the tmpfs mounts, which would hide them).
    for bind in spec["binds"]:
        target = _in(root, bind["dst"])
        _mount_point(target, is_dir=os.path.isdir(bind["src"]))
        _bind(bind["src"], target, read_only=bind.get("ro", True))
    for f in spec["files"]:
        _write_file(_in(root, f["path"]), f.get("content"), int(f.get("mode", "644"), 8), f.get("symlink"))

    socket.sethostname(spec["hostname"])

    # pivot_root(".", "."): the old root ends up on top of the new one and is detached at once.
    os.chdir(root)
    number = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise SystemExit(f"sandbox: pivot_root: unknown architecture {os.uname().machine}")
    _check(_libc.syscall(number, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "detaching the host's tree")
    os.chdir("/")
    # Like a host booted by the kernel: shared propagation (nspawn's bind-mount propagation
    # needs it); the peer groups are new ones of this namespace, nothing reaches the host.
    _check(_libc.mount(None, b"/", None, MS_REC | MS_SHARED, None), "making / shared")

    exec_systemd(spec)


def main() -> None:
    run_as_pid1(boot)


if __name__ == "__main__":
    main()

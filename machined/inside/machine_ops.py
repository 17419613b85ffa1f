"""Copying files into and out of a container, and bind mounting host paths into it.

These functions run in a worker child (:mod:`machined.children`): they join the
container's mount namespace, which must never happen in the daemon itself, through
the leader's pidfd (*leader_fd*, see :mod:`machined.inside.nsprobe`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import struct
import tempfile

from machined.errors import BusError, errno_error_name
from machined.fs import libc
from machined.fs.copy import CopyOptions, copy_tree_at
from machined.inside.nsprobe import CLONE_NEWNS, join_mount_namespace, open_leader_file, setns

# ----- copying ----------------------------------------------------------------------------


def _open_parent(path: str) -> tuple[int, str]:
    parent, name = os.path.split(path.rstrip("/"))
    if not name:
        raise OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))
    return os.open(parent or "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), name


def copy(leader: int, leader_fd: int, copy_from: bool, host_path: str, container_path: str, uid_shift: int,
         replace: bool) -> None:  # fmt: skip
    """Copy *container_path* to *host_path* (copy_from) or the other way round."""
    try:
        host_dir, host_name = _open_parent(host_path)
    except OSError as e:
        raise BusError(
            errno_error_name(e.errno or errno.EIO),
            f"Failed to open host directory {host_path}: {os.strerror(e.errno or errno.EIO)}",
        ) from None
    join_mount_namespace(leader_fd)
    container_dir, container_name = _open_parent(container_path)
    # As upstream (COPY_REFLINK|COPY_MERGE|COPY_HARDLINKS): with a UID shift, what arrives
    # belongs to root on its side.
    owner = None if uid_shift == 0 else (0 if copy_from else uid_shift)
    options = CopyOptions(uid=owner, gid=owner, merge=True)
    if copy_from:
        copy_tree_at(container_dir, container_name, host_dir, host_name, options, replace)
    else:
        copy_tree_at(host_dir, host_name, container_dir, container_name, options, replace)


# ----- bind mounts ------------------------------------------------------------------------


def _make_mount_point(path: str, is_dir: bool) -> None:
    if is_dir:
        os.mkdir(path, 0o700)
    else:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))


def _remove_mount_point(path: str, is_dir: bool) -> None:
    try:
        os.rmdir(path) if is_dir else os.unlink(path)
    except OSError:
        pass


def bind_mount(leader: int, leader_fd: int, name: str, source: str, destination: str, read_only: bool,
               mkdir: bool, new_api: bool = False) -> None:  # fmt: skip
    """Bind *source* (host) onto *destination* in the container, through nspawn's propagation directory.

    The new mount is prepared in a private playground, moved into
    ``/run/systemd/nspawn/propagate/NAME`` (a shared mount that shows up as
    ``/run/host/incoming`` inside), and from there moved onto the destination
    inside the container's mount namespace.
    """
    mntns = open_leader_file(leader, leader_fd, "ns/mnt", os.O_RDONLY)
    try:
        if os.fstat(mntns).st_ino == os.stat("/proc/self/ns/mnt").st_ino:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    finally:
        os.close(mntns)
    propagate = f"/run/systemd/nspawn/propagate/{name}"
    if not os.path.isdir(propagate + "/"):
        if not new_api:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        # 262, a container nspawn did not start (no propagation directory): a detached copy of
        # the source mount (open_tree), moved in from inside the container's mount namespace.
        _bind_mount_detached(leader_fd, source, destination, read_only, mkdir)
        return
    real_source = os.path.realpath(source, strict=True)
    is_dir = stat.S_ISDIR(os.stat(real_source).st_mode)

    playground = tempfile.mkdtemp(prefix="propagate.", dir="/tmp")
    outside = None
    try:
        libc.mount(playground, playground, libc.MS_BIND)
        try:
            libc.mount(None, playground, libc.MS_SLAVE)
            staged = os.path.join(playground, "mount")
            _make_mount_point(staged, is_dir)
            libc.mount(real_source, staged, libc.MS_BIND)
            if read_only:
                libc.mount(None, staged, libc.MS_BIND | libc.MS_REMOUNT | libc.MS_RDONLY)
            outside = tempfile.mkdtemp(dir=propagate) if is_dir else tempfile.mkstemp(dir=propagate)[1]
            libc.mount(staged, outside, libc.MS_MOVE)
            _remove_mount_point(staged, is_dir)
        finally:
            libc.umount_detach(playground)
        _move_into_container(leader_fd, os.path.basename(outside), destination, is_dir, mkdir)
    finally:
        if outside is not None:
            libc.umount_detach(outside)
            _remove_mount_point(outside, is_dir)
        try:
            os.rmdir(playground)
        except OSError:
            pass


SYS_open_tree = 428  # the same numbers on every architecture (new syscalls are unified)
SYS_move_mount = 429
SYS_mount_setattr = 442
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_EMPTY_PATH = 0x1000
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_RDONLY = 0x1


def _syscall(number: int, *args: object) -> int:
    # (integers as C longs: a variadic call would pass them as 32-bit ints, -100 not sign-extended)
    values = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    ret: int = libc.libc.syscall(ctypes.c_long(number), *values)
    if ret < 0:
        raise libc.last_error()
    return ret


def _bind_mount_detached(leader_fd: int, source: str, destination: str, read_only: bool, mkdir: bool) -> None:
    """Bind *source* onto *destination* in the container with the new mount API: the source's
    mount cloned detached in the host (not recursive, as the old way), made read-only if asked,
    then attached onto the destination from inside the container's mount namespace."""
    real_source = os.path.realpath(source, strict=True)
    is_dir = stat.S_ISDIR(os.stat(real_source).st_mode)
    tree = _syscall(SYS_open_tree, libc.AT_FDCWD, real_source.encode(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)
    try:
        if read_only:
            attr = ctypes.create_string_buffer(struct.pack("=QQQQ", MOUNT_ATTR_RDONLY, 0, 0, 0))
            _syscall(SYS_mount_setattr, tree, b"", AT_EMPTY_PATH, attr, 32)
        host = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            join_mount_namespace(leader_fd)
            try:
                if mkdir:
                    _make_destination(destination, is_dir)
                target = os.open(destination, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    _syscall(SYS_move_mount, tree, b"", target, b"", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH)
                finally:
                    os.close(target)
            finally:
                setns(host, CLONE_NEWNS)
        finally:
            os.close(host)
    finally:
        os.close(tree)


def _make_destination(destination: str, is_dir: bool) -> None:
    """As upstream: best effort, whatever is in the way stays and the move decides."""
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(destination), 0o755, exist_ok=True)
    with contextlib.suppress(OSError):
        if is_dir:
            os.mkdir(destination, 0o700)
        else:
            os.mknod(destination, stat.S_IFREG | 0o600)


def _move_into_container(leader_fd: int, entry: str, destination: str, is_dir: bool, mkdir: bool) -> None:
    """Join the container's mount namespace, move the incoming mount in place, come back.

    (This process is a disposable child, root in the host's user namespace: it may go
    back to the host's mount namespace, where the caller cleans up, without a fork.)
    """
    host = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        join_mount_namespace(leader_fd)
        try:
            if mkdir:
                _make_destination(destination, is_dir)
            # Onto the destination itself, never where a symlink there points (upstream's
            # mount_nofollow(): a symlink, dangling or not, gets EINVAL for a directory).
            target = os.open(destination, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                libc.move_mount_onto_fd(f"/run/host/incoming/{entry}", target)
            finally:
                os.close(target)
        finally:
            setns(host, CLONE_NEWNS)
    finally:
        os.close(host)

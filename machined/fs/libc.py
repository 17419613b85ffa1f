"""The C library calls Python's ``os`` module lacks, written once, through one handle.

Each wrapper fails with an ``OSError`` carrying the call's errno, as ``os`` does.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

libc = ctypes.CDLL(None, use_errno=True)

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EACCESS = 0x200
AT_EMPTY_PATH = 0x1000
AT_STATX_DONT_SYNC = 0x4000
RENAME_NOREPLACE = 1
STATX_BTIME = 0x800
STATX_MNT_ID = 0x1000
MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_SLAVE = 1 << 19
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8
MOVE_MOUNT_F_SYMLINKS = 0x01
MOVE_MOUNT_T_EMPTY_PATH = 0x40
SYS_move_mount = 429  # the same number on every architecture (new syscalls are unified)

_STATX_SIZE = 256
_STATX_BTIME_OFFSET = 80  # struct statx_timestamp stx_btime: i64 seconds, u32 nanoseconds
_STATX_MNT_ID_OFFSET = 144
_STATFS_SIZE = 256  # struct statfs is 120 bytes on 64-bit Linux; room to spare


def last_error(filename: str | None = None) -> OSError:
    """The errno of the call that just failed, as an ``OSError``."""
    code = ctypes.get_errno()
    return OSError(code, os.strerror(code)) if filename is None else OSError(code, os.strerror(code), filename)


def _check(ret: int, filename: str | None = None) -> int:
    if ret < 0:
        raise last_error(filename)
    return ret


def ioctl(fd: int, request: int, arg: bytes) -> int:
    """ioctl(2) with a struct argument (a copy of *arg*), returning the call's value
    (``fcntl.ioctl`` returns the struct instead)."""
    buf = ctypes.create_string_buffer(arg, len(arg))
    return _check(libc.ioctl(fd, ctypes.c_ulong(request), buf))


# --- file status ---------------------------------------------------------------------


def statx(dir_fd: int, path: str, flags: int, mask: int) -> bytes:
    """The raw ``struct statx`` of *path* in *dir_fd* ("" with ``AT_EMPTY_PATH``: *dir_fd* itself)."""
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    _check(libc.statx(dir_fd, os.fsencode(path), flags, mask, buf), path or None)
    return buf.raw


def birth_time(target: int | str) -> int | None:
    """Birth time in µs of an fd or a path (symlinks followed), None where unknown."""
    try:
        if isinstance(target, int):
            raw = statx(target, "", AT_EMPTY_PATH | AT_STATX_DONT_SYNC, STATX_BTIME)
        else:
            raw = statx(AT_FDCWD, target, AT_STATX_DONT_SYNC, STATX_BTIME)
    except OSError:
        return None
    (mask,) = struct.unpack_from("I", raw, 0)
    sec: int
    nsec: int
    sec, nsec = struct.unpack_from("qI", raw, _STATX_BTIME_OFFSET)
    if not mask & STATX_BTIME or sec == 0:
        return None
    return sec * 1_000_000 + nsec // 1000


def mount_id(dir_fd: int, name: str) -> int:
    """The mount id of *name* in *dir_fd* ("" for the directory itself), symlinks not followed."""
    raw = statx(dir_fd, name, AT_SYMLINK_NOFOLLOW | (0 if name else AT_EMPTY_PATH), STATX_MNT_ID)
    return int(struct.unpack_from("Q", raw, _STATX_MNT_ID_OFFSET)[0])


def fs_type_fd(fd: int) -> int:
    """fstatfs(*fd*).f_type (the file system's magic number)."""
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    _check(libc.fstatfs(fd, buf))
    # f_type is the first member (__fsword_t, a long); magic numbers are 32 bits.
    return ctypes.c_long.from_buffer_copy(buf.raw[: ctypes.sizeof(ctypes.c_long)]).value & 0xFFFFFFFF


def on_read_only_fs(path: str) -> bool:
    """Whether writing to *path* fails for being on a read-only file system (access(2), effective IDs)."""
    ctypes.set_errno(0)
    if libc.faccessat(AT_FDCWD, os.fsencode(path), os.W_OK, AT_EACCESS) == 0:
        return False
    return ctypes.get_errno() == errno.EROFS


# --- names -----------------------------------------------------------------------------


def rename_noreplace(old: str, new: str) -> None:
    """rename(2) that fails with EEXIST instead of replacing *new*."""
    if libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), RENAME_NOREPLACE) == 0:
        return
    code = ctypes.get_errno()
    if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        raise OSError(code, os.strerror(code), old)
    if os.path.lexists(new):
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
    os.rename(old, new)


def link_tmpfile(fd: int, dst: str) -> None:
    """Give the anonymous ``O_TMPFILE`` *fd* its name *dst* (EEXIST if taken)."""
    if libc.linkat(fd, b"", AT_FDCWD, os.fsencode(dst), AT_EMPTY_PATH) == 0:
        return
    code = ctypes.get_errno()
    if code not in (errno.ENOENT, errno.EPERM):
        raise OSError(code, os.strerror(code), dst)
    os.link(f"/proc/self/fd/{fd}", dst, follow_symlinks=True)


# --- mounts ----------------------------------------------------------------------------


def mount(source: str | None, target: str, flags: int) -> None:
    """mount(2) without a file system type or data: binds, moves, remounts, propagation."""
    _check(libc.mount(source.encode() if source else None, target.encode(), None, flags, None))


def umount_detach(target: str) -> None:
    """Lazily unmount *target*, never through a symlink; errors are ignored."""
    libc.umount2(target.encode(), MNT_DETACH | UMOUNT_NOFOLLOW)


def move_mount_onto_fd(source: str, target_fd: int) -> None:
    """Move the mount at *source* onto the file *target_fd* was opened on (``O_PATH``).

    move_mount() with an empty target path: upstream mounts onto /proc/self/fd/N, but a
    process outside a container's PID namespace cannot resolve /proc/self inside it.
    """
    args = (AT_FDCWD, source.encode(), target_fd, b"", MOVE_MOUNT_F_SYMLINKS | MOVE_MOUNT_T_EMPTY_PATH)
    if hasattr(libc, "move_mount"):  # glibc 2.36+
        _check(libc.move_mount(*args))
    else:
        _check(libc.syscall(SYS_move_mount, *args))


# --- namespaces and confined opens -------------------------------------------------------

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
SYS_openat2 = 437  # the same number on every architecture (new syscalls are unified)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15

_OPEN_HOW = struct.Struct("=QQQ")  # struct open_how: flags, mode, resolve


def setns(fd: int, nstype: int) -> None:
    """setns(2) on a namespace fd or, with a mask of CLONE_NEW* flags, a pidfd (of the calling
    thread only, for the namespaces a thread may switch alone: not the mount namespace of a
    threaded process)."""
    _check(libc.setns(fd, nstype))


def openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int:
    """openat2(2): *path* opened from *dir_fd* under the RESOLVE_* rules *resolve* (with
    ``RESOLVE_IN_ROOT``, every symlink and ``..`` stays inside *dir_fd*)."""
    how = ctypes.create_string_buffer(_OPEN_HOW.pack(flags | os.O_CLOEXEC, 0, resolve), _OPEN_HOW.size)
    fd = libc.syscall(SYS_openat2, dir_fd, os.fsencode(path), how, ctypes.c_size_t(_OPEN_HOW.size))
    return _check(fd, path)


def prctl(option: int, arg: int | bytes) -> None:
    """prctl(2) with one argument (the others 0)."""
    _check(libc.prctl(option, arg, 0, 0, 0))

"""Attributes of inodes beyond stat(2): chattr flags, creation time, block devices' read-only flag and size.

(ioctl numbers are the x86-64 values of <linux/fs.h>.)
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

from machined.fs import libc

UINT64_MAX = 2**64 - 1
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x10
FS_NOCOW_FL = 0x800000
BLKROSET = 0x125D
BLKROGET = 0x125E
BLKGETSIZE64 = 0x80081272
CRTIME_XATTR = "user.crtime_usec"
_OPEN_FOR_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NOFOLLOW | os.O_NONBLOCK


def ioctl_int(fd: int, request: int, fmt: str, default: int = 0) -> int:
    """The integer an ioctl reads into its argument, *default* if it fails."""
    try:
        return int(struct.unpack(fmt, fcntl.ioctl(fd, request, bytes(struct.calcsize(fmt))))[0])
    except OSError:
        return default


# --- inode flags (chattr) -----------------------------------------------------------


def file_attrs(fd: int) -> int:
    """The inode flags (chattr) of *fd*, 0 where the file system has none."""
    return ioctl_int(fd, FS_IOC_GETFLAGS, "I")


def file_attrs_at(path: str) -> int:
    """The inode flags of *path* (not followed if a symlink), 0 if it cannot be opened."""
    try:
        fd = os.open(path, _OPEN_FOR_FLAGS)
    except OSError:
        return 0
    try:
        return file_attrs(fd)
    finally:
        os.close(fd)


def chattr_fd(fd: int, value: int, mask: int) -> None:
    """Set the inode flags in *mask* to *value*."""
    (old,) = struct.unpack("I", fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(4)))
    new = (old & ~mask) | (value & mask)
    if new != old:
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("I", new))


def chattr(path: str, value: int, mask: int, ignore_errors: bool = False) -> None:
    """Set the inode flags in *mask* to *value* on *path* (not followed if a symlink)."""
    try:
        fd = os.open(path, _OPEN_FOR_FLAGS)
        try:
            chattr_fd(fd, value, mask)
        finally:
            os.close(fd)
    except OSError:
        if not ignore_errors:
            raise


# --- creation time --------------------------------------------------------------------


def crtime(target: int | str) -> int:
    """Birth time in µs of an fd or a path (symlinks followed): the older of statx's btime and
    the ``user.crtime_usec`` xattr systemd records where btime is missing; 0 if neither."""
    born = libc.birth_time(target)
    try:
        raw = os.getxattr(target, CRTIME_XATTR)
    except OSError:
        return born or 0
    if len(raw) != 8:
        return born or 0
    stored: int
    (stored,) = struct.unpack("<Q", raw)
    if stored in (0, UINT64_MAX):
        return born or 0
    return min(born, stored) if born else stored


def set_crtime(fd: int, usec: int) -> None:
    """Record *usec* as the creation time of *fd*, the way systemd does (an xattr)."""
    os.setxattr(fd, CRTIME_XATTR, struct.pack("<Q", usec))


# --- block devices ----------------------------------------------------------------------


def block_device_info(path: str) -> tuple[bool, int] | None:
    """(read-only flag, size in bytes or UINT64_MAX) of the block device at *path*;
    None if it cannot be opened, ENOTTY if it is no block device."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return None
    try:
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
        return bool(ioctl_int(fd, BLKROGET, "i")), ioctl_int(fd, BLKGETSIZE64, "Q", UINT64_MAX)
    finally:
        os.close(fd)


def set_block_device_read_only(path: str, read_only: bool) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
        fcntl.ioctl(fd, BLKROSET, struct.pack("i", int(read_only)))
    finally:
        os.close(fd)

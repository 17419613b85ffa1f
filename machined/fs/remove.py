"""Removing a whole tree, btrfs subvolumes inside it included, never crossing into other mounts."""

from __future__ import annotations

import errno
import os
import stat

from machined.fs import btrfs, libc
from machined.fs.fds import opened, opened_at


def rm_rf(path: str) -> None:
    """Remove *path* and everything below it; a mount point below it stays (and so does its parent)."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    with opened(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC) as fd:
        _rm_children(fd)
    try:
        os.rmdir(path)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTEMPTY, errno.EBUSY) or st.st_ino != btrfs.BTRFS_FIRST_FREE_OBJECTID:
            raise
        btrfs.remove_subvolume(path)


def _rm_children(fd: int) -> None:
    mount = libc.mount_id(fd, "")
    for entry in os.scandir(fd):
        name = entry.name
        if not entry.is_dir(follow_symlinks=False):
            os.unlink(name, dir_fd=fd)
            continue
        if libc.mount_id(fd, name) != mount:
            continue  # a mount point: leave it alone
        if entry.stat(follow_symlinks=False).st_ino == btrfs.BTRFS_FIRST_FREE_OBJECTID:
            with opened_at(fd, name) as child:
                is_subvolume = btrfs.is_btrfs(child)
            if is_subvolume:
                btrfs.remove_subvolume_at(fd, name)
                continue
        with opened_at(fd, name) as child:
            _rm_children(child)
        os.rmdir(name, dir_fd=fd)

"""Copies: one recursive tree copier for container copies and image clones, atomic file copies,
and clones of image trees (a btrfs snapshot where possible, else a copy).

The tree copier keeps what systemd's ``copy_tree_at()`` keeps: file contents
(reflinked where the file system shares extents), hard links, symlinks, device
nodes, FIFOs and sockets, modes, times and owners (or one owner for all), and
with :attr:`CopyOptions.xattrs` extended attributes. :class:`CopyOptions` are
upstream's ``COPY_*`` flags that the two users differ in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import stat

from machined.fs import attrs, btrfs, libc
from machined.fs.fds import opened, opened_at
from machined.fs.remove import rm_rf

FICLONE = 0x40049409
_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS, errno.EAFNOSUPPORT, errno.EPFNOSUPPORT,
                  errno.EPROTONOSUPPORT, errno.ESOCKTNOSUPPORT)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class CopyOptions:
    """How a tree copy meets the destination, and what it keeps beyond contents, modes and times."""

    uid: int | None = None  # owner of every copy; None: the source's
    gid: int | None = None
    merge: bool = False  # COPY_MERGE: into existing directories, whatever is there already stays
    same_mount: bool = False  # COPY_SAME_MOUNT: directories on other mounts are left out
    xattrs: bool = False  # COPY_ALL_XATTRS: extended attributes of files and directories


# What a clone of a directory image keeps (upstream's snapshot fallback copy).
IMAGE_CLONE = CopyOptions(same_mount=True, xattrs=True)


def copy_tree_at(src_dir: int, src_name: str, dst_dir: int, dst_name: str, options: CopyOptions,
                 replace: bool = False) -> None:  # fmt: skip
    """Copy *src_name* of *src_dir* (a directory with all below it, or any other file) to *dst_name*
    of *dst_dir*. An existing destination is an error (EEXIST), unless both are directories and
    *options* merge, or *replace* is set: then the copy is made under a temporary name and
    renamed over it."""
    src_st = os.stat(src_name, dir_fd=src_dir, follow_symlinks=False)
    try:
        dst_st = os.stat(dst_name, dir_fd=dst_dir, follow_symlinks=False)
    except FileNotFoundError:
        dst_st = None
    mount = libc.mount_id(src_dir, src_name) if options.same_mount else None
    copier = _TreeCopier(dst_dir, options, mount)
    if dst_st is not None and replace and not (stat.S_ISDIR(src_st.st_mode) and stat.S_ISDIR(dst_st.st_mode)):
        tmp = f".#{dst_name}{os.urandom(8).hex()}"
        copier.entry(src_dir, src_name, dst_dir, tmp, tmp)
        os.rename(tmp, dst_name, src_dir_fd=dst_dir, dst_dir_fd=dst_dir)
        return
    copier.entry(src_dir, src_name, dst_dir, dst_name, dst_name)


def copy_directory_into(sfd: int, dfd: int, options: CopyOptions, top_attributes: bool = True) -> None:
    """Copy what directory *sfd* holds into the existing, empty directory *dfd*, then give *dfd*
    the attributes of *sfd* (upstream's ``COPY_MERGE_EMPTY``), unless not *top_attributes*."""
    copier = _TreeCopier(dfd, options, libc.mount_id(sfd, "") if options.same_mount else None)
    copier.children(sfd, dfd, "")
    if top_attributes:
        copier.attributes_fd(sfd, dfd, os.fstat(sfd))


class _TreeCopier:
    """One copy in progress: its options and the hard links seen so far (paths relative to *root*)."""

    def __init__(self, root: int, options: CopyOptions, mount: int | None) -> None:
        self.root = root
        self.options = options
        self.mount = mount
        self.links: dict[tuple[int, int], str] = {}

    def entry(self, sfd: int, name: str, dfd: int, dst_name: str, rel: str) -> None:
        """Copy entry *name* of *sfd* to *dst_name* of *dfd*, which is *rel* below the root."""
        st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            if self.mount is None or libc.mount_id(sfd, name) == self.mount:
                self._directory(sfd, name, dfd, dst_name, st, rel)
            return
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self.links:
            os.link(self.links[key], dst_name, src_dir_fd=self.root, dst_dir_fd=dfd, follow_symlinks=False)
            return
        if stat.S_ISREG(st.st_mode):
            self._file(sfd, name, dfd, dst_name, st)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=sfd), dst_name, dir_fd=dfd)
            self._attributes_at(dfd, dst_name, st)
        elif stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) \
                or stat.S_ISSOCK(st.st_mode):  # fmt: skip
            os.mknod(dst_name, st.st_mode, st.st_rdev, dir_fd=dfd)
            self._attributes_at(dfd, dst_name, st)
        else:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        if st.st_nlink > 1:
            self.links[key] = rel

    def children(self, sfd: int, dfd: int, rel: str) -> None:
        """Copy every entry of directory *sfd* into directory *dfd* (*rel* below the root)."""
        for name in sorted(os.listdir(sfd)):
            try:
                self.entry(sfd, name, dfd, name, f"{rel}/{name}" if rel else name)
            except FileExistsError:
                if not self.options.merge:
                    raise  # merging: what is already there stays, as upstream's COPY_MERGE does

    def _directory(self, sfd: int, name: str, dfd: int, dst_name: str, st: os.stat_result, rel: str) -> None:
        try:
            os.mkdir(dst_name, 0o700, dir_fd=dfd)
            created = True
        except FileExistsError:
            if not self.options.merge or not stat.S_ISDIR(os.stat(dst_name, dir_fd=dfd, follow_symlinks=False).st_mode):
                raise
            created = False  # merge into the existing directory, leaving its attributes alone
        with opened_at(sfd, name) as child_s, opened_at(dfd, dst_name) as child_d:
            self.children(child_s, child_d, rel)
            if created:
                self.attributes_fd(child_s, child_d, st)

    def _file(self, sfd: int, name: str, dfd: int, dst_name: str, st: os.stat_result) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with opened(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY, dir_fd=sfd) as src:
            fd = os.open(dst_name, flags, 0o600, dir_fd=dfd)
            try:
                copy_bytes(src, fd)
                self.attributes_fd(src, fd, st)
            finally:
                os.close(fd)

    def _owner(self, st: os.stat_result) -> tuple[int, int]:
        uid, gid = self.options.uid, self.options.gid
        return (st.st_uid if uid is None else uid), (st.st_gid if gid is None else gid)

    def attributes_fd(self, sfd: int, dfd: int, st: os.stat_result) -> None:
        """Owner, mode, extended attributes (if asked for) and times of *sfd* (as in *st*) on *dfd*."""
        os.fchown(dfd, *self._owner(st))
        os.fchmod(dfd, stat.S_IMODE(st.st_mode))
        if self.options.xattrs:
            copy_xattrs(sfd, dfd)
        os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))

    def _attributes_at(self, dfd: int, name: str, st: os.stat_result) -> None:
        """Owner, mode and times of a symlink or special file *name* in *dfd*."""
        os.chown(name, *self._owner(st), dir_fd=dfd, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dfd)
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)


# --- contents -------------------------------------------------------------------------


def copy_bytes(sfd: int, dfd: int) -> None:
    """All of *sfd* into *dfd*: a reflink where the file system shares extents, else a kernel copy,
    else through a buffer."""
    try:
        fcntl.ioctl(dfd, FICLONE, sfd)
        return
    except OSError:
        pass
    while True:
        try:
            n = os.copy_file_range(sfd, dfd, 1 << 30)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
                raise
            _copy_by_reading(sfd, dfd)
            return
        if n == 0:
            return


def _copy_by_reading(sfd: int, dfd: int) -> None:
    while chunk := os.read(sfd, 1 << 20):
        view = memoryview(chunk)
        while view:
            view = view[os.write(dfd, view) :]


def copy_xattrs(sfd: int, dfd: int, user_only: bool = False) -> None:
    """Extended attributes of *sfd* onto *dfd* (best effort), only ``user.*`` ones with *user_only*."""
    try:
        names = os.listxattr(sfd)
    except OSError:
        return
    for name in names:
        if user_only and not name.startswith("user."):
            continue
        with contextlib.suppress(OSError):
            os.setxattr(dfd, name, os.getxattr(sfd, name))


def copy_file_atomic(src: str, dst: str, mode: int, nocow: bool = False, keep_crtime: bool = False) -> None:
    """Copy a regular file to *dst* (which must not exist) as a whole: it appears only when complete."""
    with opened(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY) as sfd:
        st = os.fstat(sfd)
        if not stat.S_ISREG(st.st_mode):
            code = errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EBADFD
            raise OSError(code, os.strerror(code))
        dfd = os.open(os.path.dirname(dst) or ".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            if nocow:
                with contextlib.suppress(OSError):
                    attrs.chattr_fd(dfd, attrs.FS_NOCOW_FL, attrs.FS_NOCOW_FL)
            copy_bytes(sfd, dfd)
            os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
            copy_xattrs(sfd, dfd, user_only=True)
            if keep_crtime:
                with contextlib.suppress(OSError):
                    attrs.set_crtime(dfd, attrs.crtime(sfd))
            os.fchmod(dfd, mode)
            libc.link_tmpfile(dfd, dst)
        finally:
            os.close(dfd)


# --- clones of image trees --------------------------------------------------------------


def clone_tree(src: str, dst: str, read_only: bool) -> None:
    """Snapshot subvolume *src* (nested subvolumes and quota setup too) to *dst*; a plain directory
    is copied into a new subvolume, or a new directory where btrfs is not (upstream's snapshot
    with ``FALLBACK_COPY|FALLBACK_DIRECTORY``). Read-only: the subvolume flag, or chattr +i."""
    with opened(src) as sfd:
        if btrfs.is_subvolume(sfd):
            btrfs.snapshot_subvolume(sfd, dst, read_only)
            return
        plain = False
        try:
            btrfs.make_subvolume(dst)
        except OSError as e:
            if e.errno not in _NOT_SUPPORTED:
                raise
            os.mkdir(dst, 0o755)
            plain = True
        try:
            with opened(dst, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC) as dfd:
                # the new top directory stays as made (root's, 0755, its own times): real 252 and 262
                copy_directory_into(sfd, dfd, IMAGE_CLONE, top_attributes=False)
            if read_only and plain:
                attrs.chattr(dst, attrs.FS_IMMUTABLE_FL, attrs.FS_IMMUTABLE_FL, ignore_errors=True)
            elif read_only:
                btrfs.set_subvolume_read_only(dst, True)
        except BaseException:
            with contextlib.suppress(OSError):
                rm_rf(dst)
            raise

"""Operations that change images: remove, rename, clone, read-only, quota limits, clean the pool.

The public functions take the image as the daemon discovered it
(``Image.to_dict()``, so that they can cross into a worker child as JSON):
remove, clone and clean_pool run in a child (``machined.worker``), the short
ones in a thread of the daemon. Each takes systemd-nspawn's locks itself and
fails with an ``OSError`` (the bus turns it into sd-bus's errno error) or a
:class:`~machined.errors.BusError`, as systemd-machined 252 does. btrfs images
are handled with btrfs's own ioctls: snapshots for clones, the subvolume
read-only flag, qgroups for limits.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator
from typing import Any

from machined import errors
from machined import images as pool
from machined.errors import BusError
from machined.images import Image, image_name_is_valid, image_name_lock, image_path_lock

FICLONE = 0x40049409
FS_NOCOW_FL = 0x800000
BLKROSET = 0x125D
BTRFS_IOC_SUBVOL_CREATE = 0x5000940E
BTRFS_IOC_SNAP_CREATE_V2 = 0x50009417
BTRFS_IOC_SNAP_DESTROY = 0x5000940F
BTRFS_IOC_SUBVOL_GETFLAGS = 0x80089419
BTRFS_IOC_SUBVOL_SETFLAGS = 0x4008941A
BTRFS_IOC_QUOTA_CTL = 0xC0109428
BTRFS_IOC_QGROUP_ASSIGN = 0x40189429
BTRFS_IOC_QGROUP_CREATE = 0x4010942A
BTRFS_IOC_QGROUP_LIMIT = 0x8030942B
BTRFS_IOC_QUOTA_RESCAN = 0x4040942C
BTRFS_IOC_QUOTA_RESCAN_WAIT = 0x942E
BTRFS_IOC_DEFRAG = 0x50009402
BTRFS_SUBVOL_RDONLY = 2
BTRFS_QUOTA_CTL_ENABLE = 1
BTRFS_LAST_FREE_OBJECTID = 2**64 - 256
RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100
_AT_EMPTY_PATH = 0x1000
_STATX_MNT_ID = 0x1000
_STATX_MNT_ID_OFFSET = 144
_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS, errno.EAFNOSUPPORT, errno.EPFNOSUPPORT,
                  errno.EPROTONOSUPPORT, errno.ESOCKTNOSUPPORT)  # fmt: skip

_libc = ctypes.CDLL(None, use_errno=True)


def _fail(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _refuse_vendor_and_host(img: Image) -> None:
    if img.is_vendor or img.is_host:
        raise _fail(errno.EROFS)


# --- the operations (worker entry points) ------------------------------------


def remove(image: dict[str, Any]) -> None:
    """Remove an image and its ``.nspawn``/``.roothash`` companions (EBUSY while in use)."""
    _remove(Image.from_dict(image))


def rename(image: dict[str, Any], new_name: str) -> None:
    """Rename an image in its directory, companions included (EEXIST if the name is taken anywhere)."""
    img = Image.from_dict(image)
    if not image_name_is_valid(new_name):
        raise _fail(errno.EINVAL)
    _refuse_vendor_and_host(img)
    with image_path_lock(img.path, exclusive=True), image_name_lock(new_name):
        if pool.find(new_name) is not None:
            raise _fail(errno.EEXIST)
        new_path = _renamed_path(img, new_name)
        immutable = img.type == "directory" and _attrs(img.path) & pool.FS_IMMUTABLE_FL
        if immutable:  # an immutable directory cannot be renamed: lift the flag meanwhile
            _chattr(img.path, 0, pool.FS_IMMUTABLE_FL, ignore_errors=True)
        try:
            rename_noreplace(img.path, new_path)
        finally:
            if immutable:
                where = img.path if os.path.lexists(img.path) else new_path
                _chattr(where, pool.FS_IMMUTABLE_FL, pool.FS_IMMUTABLE_FL, ignore_errors=True)
        for old, suffix in _companions(img):
            with contextlib.suppress(OSError):
                rename_noreplace(old, os.path.join(os.path.dirname(old), new_name + suffix))


def clone(image: dict[str, Any], new_name: str, read_only: bool) -> None:
    """Copy an image into the pool as *new_name*: a btrfs snapshot where possible, else a copy."""
    img = Image.from_dict(image)
    if not image_name_is_valid(new_name):
        raise _fail(errno.EINVAL)
    with image_name_lock(new_name):
        if pool.find(new_name) is not None:
            raise _fail(errno.EEXIST)
        if img.type in ("directory", "subvolume"):
            new_path = os.path.join(pool.POOL_PATH, new_name)
            snapshot(img.path, new_path, read_only)
            with contextlib.suppress(OSError):
                auto_qgroup_path(new_path, insert_intermediary=True)
        elif img.type == "raw":
            new_path = os.path.join(pool.POOL_PATH, f"{new_name}.raw")
            copy_file_atomic(img.path, new_path, 0o444 if read_only else 0o644, nocow=True, keep_crtime=True)
        else:
            raise _fail(errno.EOPNOTSUPP)
        for old, suffix in _companions(img):
            with contextlib.suppress(OSError):
                copy_file_atomic(old, os.path.join(os.path.dirname(old), new_name + suffix), 0o664)


def mark_read_only(image: dict[str, Any], read_only: bool) -> None:
    """Make an image read-only or writable: subvolume flag, immutable directory, write bits, BLKROSET."""
    img = Image.from_dict(image)
    _refuse_vendor_and_host(img)
    with image_path_lock(img.path, exclusive=True):
        if img.type == "subvolume":
            set_subvolume_read_only(img.path, read_only)
        elif img.type == "directory":
            _chattr(img.path, pool.FS_IMMUTABLE_FL if read_only else 0, pool.FS_IMMUTABLE_FL)
        elif img.type == "raw":
            mode = os.stat(img.path).st_mode
            os.chmod(img.path, (mode & 0o444) | (0 if read_only else 0o200))
            if read_only:
                _defrag(img.path)
        elif img.type == "block":
            _set_block_read_only(img.path, read_only)
        else:
            raise _fail(errno.EOPNOTSUPP)


def set_limit(image: dict[str, Any], limit: int) -> None:
    """Set a subvolume image's quota limit (its own qgroup and its subtree qgroup)."""
    img = Image.from_dict(image)
    _refuse_vendor_and_host(img)
    if img.type != "subvolume":
        raise _fail(errno.EOPNOTSUPP)
    fd = os.open(img.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):
            qgroup_limit(fd, pool.subvolume_id(fd), limit)
        with contextlib.suppress(OSError):
            auto_qgroup(fd, insert_intermediary=True)
        qgroup, _ = pool.subtree_qgroup(fd, pool.subvolume_id(fd))
        qgroup_limit(fd, qgroup, limit)
    finally:
        os.close(fd)


def set_pool_limit(limit: int) -> None:
    """Set the quota limit of the whole pool, turning btrfs quota on first (NotSupported off btrfs)."""
    _setup_pool()
    try:
        fd = os.open(pool.POOL_PATH, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            with contextlib.suppress(OSError):
                qgroup_limit(fd, pool.subvolume_id(fd), limit)
            qgroup, _ = pool.subtree_qgroup(fd, pool.subvolume_id(fd))
            qgroup_limit(fd, qgroup, limit)
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno == errno.ENOTTY:
            raise BusError(errors.NOT_SUPPORTED, "Quota is only supported on btrfs.") from None
        raise _named(e, "Failed to adjust quota limit") from None


def clean_pool(mode: str) -> list[list[Any]]:
    """Remove every image of the pool (``all``) or the hidden ones (``hidden``); busy ones are kept.

    Returns [name, exclusive usage] of each removed image; vendor and host images stay.
    """
    removed: list[list[Any]] = []
    for img in pool.discover().values():
        if img.is_vendor or img.is_host or (mode == "hidden" and not img.is_hidden):
            continue
        try:
            _remove(img)
        except OSError as e:
            if e.errno == errno.EBUSY:
                continue
            raise _named(e, f"Failed to remove image {img.name}") from None
        removed.append([img.name, img.usage_exclusive])
    return removed


def _named(e: OSError, what: str) -> BusError:
    code = e.errno or errno.EIO
    return BusError(errors.errno_error_name(code), f"{what}: {os.strerror(code)}")


# --- helpers of the operations -----------------------------------------------


def _remove(img: Image) -> None:
    _refuse_vendor_and_host(img)
    with image_path_lock(img.path, exclusive=True):
        if img.type == "subvolume":
            try:
                os.unlink(img.path)  # a symlink to the subvolume is enough to drop
            except OSError:
                remove_subvolume(img.path)
        elif img.type == "directory":
            _chattr(img.path, 0, pool.FS_IMMUTABLE_FL, ignore_errors=True)
            rm_rf(img.path)
        elif img.type == "raw" or (img.type == "block" and not pool.path_startswith(img.path, "/dev")):
            os.unlink(img.path)
        elif img.type != "block":
            raise _fail(errno.EOPNOTSUPP)
        for path, _ in _companions(img):
            with contextlib.suppress(OSError):
                os.unlink(path)


def _companions(img: Image) -> list[tuple[str, str]]:
    """(path, suffix) of the settings and root-hash files that travel with an image."""
    return [(p, ".nspawn") for p in img.settings_paths()] + [(img.sibling(f"{img.name}.roothash"), ".roothash")]


def _renamed_path(img: Image, new_name: str) -> str:
    directory = os.path.dirname(img.path)
    if img.type in ("directory", "subvolume"):
        return os.path.join(directory, new_name)
    if img.type == "block":
        if pool.path_startswith(img.path, "/dev"):
            raise _fail(errno.EROFS)  # device names belong to udev
        return os.path.join(directory, new_name)
    if img.type == "raw":
        return os.path.join(directory, f"{new_name}.raw")
    raise _fail(errno.EOPNOTSUPP)


def rename_noreplace(old: str, new: str) -> None:
    """rename(2) that fails with EEXIST instead of replacing *new*."""
    if _libc.renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), RENAME_NOREPLACE) == 0:
        return
    code = ctypes.get_errno()
    if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        raise OSError(code, os.strerror(code), old)
    if os.path.lexists(new):
        raise _fail(errno.EEXIST)
    os.rename(old, new)


def _attrs(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return 0
    try:
        return pool.file_attrs(fd)
    finally:
        os.close(fd)


def _chattr(path: str, value: int, mask: int, ignore_errors: bool = False) -> None:
    """Set the inode flags in *mask* to *value* (chattr)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            _chattr_fd(fd, value, mask)
        finally:
            os.close(fd)
    except OSError:
        if not ignore_errors:
            raise


def _chattr_fd(fd: int, value: int, mask: int) -> None:
    (old,) = struct.unpack("I", fcntl.ioctl(fd, pool.FS_IOC_GETFLAGS, bytes(4)))
    new = (old & ~mask) | (value & mask)
    if new != old:
        fcntl.ioctl(fd, pool.FS_IOC_SETFLAGS, struct.pack("I", new))


def _defrag(path: str) -> None:
    """Defragment a raw image that just became read-only (btrfs only; best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY | os.O_NOFOLLOW)
        try:
            fcntl.ioctl(fd, BTRFS_IOC_DEFRAG, 0)
        finally:
            os.close(fd)


def _set_block_read_only(path: str, read_only: bool) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            raise _fail(errno.ENOTTY)
        fcntl.ioctl(fd, BLKROSET, struct.pack("i", int(read_only)))
    finally:
        os.close(fd)


def _setup_pool() -> None:
    """On btrfs, make the pool a subvolume with quota and its own subtree qgroup (best effort)."""
    if not _pool_on_btrfs():
        return
    with contextlib.suppress(OSError):
        make_subvolume(pool.POOL_PATH)
    with contextlib.suppress(OSError):
        fd = os.open(pool.POOL_PATH, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            quota_enable(fd)
        finally:
            os.close(fd)
    with contextlib.suppress(OSError):
        auto_qgroup_path(pool.POOL_PATH, insert_intermediary=True)


def _pool_on_btrfs() -> bool:
    """Whether the pool (or, while it does not exist, its parent) lives on btrfs."""
    try:
        try:
            return _statfs_is_btrfs(pool.POOL_PATH)
        except FileNotFoundError:
            return _statfs_is_btrfs(os.path.dirname(pool.POOL_PATH))
    except OSError as e:
        raise _named(e, f"Failed to determine whether {pool.POOL_PATH} is located on btrfs") from None


def _statfs_is_btrfs(path: str) -> bool:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        return pool.is_btrfs(fd)
    finally:
        os.close(fd)


# --- removal of trees --------------------------------------------------------


def rm_rf(path: str) -> None:
    """Remove *path* and everything below it, subvolumes included, never crossing into other mounts."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _rm_children(fd)
    finally:
        os.close(fd)
    try:
        os.rmdir(path)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTEMPTY, errno.EBUSY) or st.st_ino != pool.BTRFS_FIRST_FREE_OBJECTID:
            raise
        remove_subvolume(path)


def _rm_children(fd: int) -> None:
    mount = _mount_id(fd, "")
    for entry in os.scandir(fd):
        name = entry.name
        if not entry.is_dir(follow_symlinks=False):
            os.unlink(name, dir_fd=fd)
            continue
        if _mount_id(fd, name) != mount:
            continue  # a mount point: leave it alone
        st = entry.stat(follow_symlinks=False)
        if st.st_ino == pool.BTRFS_FIRST_FREE_OBJECTID:
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            try:
                is_subvol = pool.is_btrfs(child)
            finally:
                os.close(child)
            if is_subvol:
                _remove_subvolume_at(fd, name)
                continue
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        try:
            _rm_children(child)
        finally:
            os.close(child)
        os.rmdir(name, dir_fd=fd)


def _mount_id(dir_fd: int, name: str) -> int:
    """The mount id of *name* in *dir_fd* ("" for the directory itself), via statx."""
    buf = ctypes.create_string_buffer(256)
    flags = _AT_SYMLINK_NOFOLLOW | (0 if name else _AT_EMPTY_PATH)
    if _libc.statx(dir_fd, os.fsencode(name), flags, _STATX_MNT_ID, buf) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), name)
    return struct.unpack_from("Q", buf.raw, _STATX_MNT_ID_OFFSET)[0]


# --- copies --------------------------------------------------------------------


def copy_file_atomic(src: str, dst: str, mode: int, nocow: bool = False, keep_crtime: bool = False) -> None:
    """Copy a regular file to *dst* (which must not exist) as a whole: it appears only when complete."""
    directory = os.path.dirname(dst) or "."
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(sfd)
        if not stat.S_ISREG(st.st_mode):
            raise _fail(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EBADFD)
        dfd = os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            if nocow:
                with contextlib.suppress(OSError):
                    _chattr_fd(dfd, FS_NOCOW_FL, FS_NOCOW_FL)
            _copy_bytes(sfd, dfd)
            os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
            _copy_xattrs(sfd, dfd, user_only=True)
            if keep_crtime:
                with contextlib.suppress(OSError):
                    pool.set_crtime(dfd, pool.crtime(sfd))
            os.fchmod(dfd, mode)
            _link_tmpfile(dfd, dst)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _link_tmpfile(fd: int, dst: str) -> None:
    """Give the anonymous O_TMPFILE *fd* its name *dst* (EEXIST if taken)."""
    if _libc.linkat(fd, b"", _AT_FDCWD, os.fsencode(dst), _AT_EMPTY_PATH) == 0:
        return
    code = ctypes.get_errno()
    if code not in (errno.ENOENT, errno.EPERM):
        raise OSError(code, os.strerror(code), dst)
    os.link(f"/proc/self/fd/{fd}", dst, follow_symlinks=True)


def _copy_bytes(sfd: int, dfd: int) -> None:
    """All of *sfd* into *dfd*: a reflink where the file system shares extents, else a kernel copy."""
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


def _copy_xattrs(sfd: int, dfd: int, user_only: bool = False) -> None:
    try:
        names = os.listxattr(sfd)
    except OSError:
        return
    for name in names:
        if user_only and not name.startswith("user."):
            continue
        with contextlib.suppress(OSError):
            os.setxattr(dfd, name, os.getxattr(sfd, name))


def copy_tree(sfd: int, dst: str) -> None:
    """Copy the directory *sfd* into the existing empty directory *dst*, keeping owners, modes,
    times, extended attributes, hard links and special files; other mounts are skipped."""
    dfd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _copy_children(sfd, dfd, dst, _mount_id(sfd, ""), {})
        _copy_inode_attrs(sfd, dfd, os.fstat(sfd))
    finally:
        os.close(dfd)


def _copy_children(sfd: int, dfd: int, dst: str, mount: int, links: dict[tuple[int, int], str]) -> None:
    for entry in os.scandir(sfd):
        name = entry.name
        st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
        target = os.path.join(dst, name)
        if stat.S_ISDIR(st.st_mode):
            if _mount_id(sfd, name) != mount:
                continue
            os.mkdir(name, 0o700, dir_fd=dfd)
            child_s = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sfd)
            child_d = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                _copy_children(child_s, child_d, target, mount, links)
                _copy_inode_attrs(child_s, child_d, st)
            finally:
                os.close(child_s)
                os.close(child_d)
            continue
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in links:
            os.link(links[key], target, follow_symlinks=False)
            continue
        _copy_entry(sfd, dfd, name, st)
        if st.st_nlink > 1:
            links[key] = target


def _copy_entry(sfd: int, dfd: int, name: str, st: os.stat_result) -> None:
    """One non-directory entry: file contents, symlink target or device node, with its attributes."""
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=sfd), name, dir_fd=dfd)
        os.chown(name, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)
        return
    if stat.S_ISREG(st.st_mode):
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY, dir_fd=sfd)
        try:
            dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            try:
                _copy_bytes(src, dst)
                _copy_inode_attrs(src, dst, st)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        return
    os.mknod(name, st.st_mode, st.st_rdev, dir_fd=dfd)
    os.chown(name, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
    os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dfd)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)


def _copy_inode_attrs(sfd: int, dfd: int, st: os.stat_result) -> None:
    os.fchown(dfd, st.st_uid, st.st_gid)
    os.fchmod(dfd, stat.S_IMODE(st.st_mode))
    _copy_xattrs(sfd, dfd)
    os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))


# --- btrfs (changing) --------------------------------------------------------


def _subvolume_name(name: str) -> bytes:
    raw = os.fsencode(name)
    if not raw or len(raw) > 255 or b"/" in raw or name in (".", ".."):
        raise _fail(errno.EINVAL)
    return raw


def _vol_args(name: str) -> bytearray:
    """struct btrfs_ioctl_vol_args: fd, then the name."""
    args = bytearray(4096)
    raw = _subvolume_name(name)
    args[8 : 8 + len(raw)] = raw
    return args


def _vol_args_v2(name: str, fd: int, flags: int) -> bytearray:
    """struct btrfs_ioctl_vol_args_v2: fd, transid, flags, a union, then the name."""
    args = bytearray(4096)
    struct.pack_into("qQQ", args, 0, fd, 0, flags)
    raw = _subvolume_name(name)
    args[56 : 56 + len(raw)] = raw
    return args


@contextlib.contextmanager
def _parent_dir(path: str) -> Iterator[tuple[int, str]]:
    """(fd of the directory holding *path*, last component of *path*)."""
    directory, name = os.path.split(os.path.normpath(path))
    fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd, name
    finally:
        os.close(fd)


@contextlib.contextmanager
def _directory(path: str) -> Iterator[int]:
    """An fd of directory *path*, closed afterwards."""
    fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def make_subvolume(path: str) -> None:
    """Create *path* as a btrfs subvolume (ENOTTY where btrfs is not)."""
    with _parent_dir(path) as (fd, name):
        fcntl.ioctl(fd, BTRFS_IOC_SUBVOL_CREATE, _vol_args(name))


def set_subvolume_read_only(path: str, read_only: bool) -> None:
    with _directory(path) as fd:
        _set_subvolume_read_only_fd(fd, read_only)


def _set_subvolume_read_only_fd(fd: int, read_only: bool) -> None:
    if os.fstat(fd).st_ino != pool.BTRFS_FIRST_FREE_OBJECTID:
        raise _fail(errno.EINVAL)
    (flags,) = struct.unpack("Q", fcntl.ioctl(fd, BTRFS_IOC_SUBVOL_GETFLAGS, bytes(8)))
    new = (flags | BTRFS_SUBVOL_RDONLY) if read_only else (flags & ~BTRFS_SUBVOL_RDONLY)
    if new != flags:
        fcntl.ioctl(fd, BTRFS_IOC_SUBVOL_SETFLAGS, struct.pack("Q", new))


def _child_subvolumes(fd: int, subvol: int) -> Iterator[tuple[int, int, str]]:
    """(id, directory inode, name) of the subvolumes directly inside subvolume *subvol*."""
    lo = (pool.BTRFS_FIRST_FREE_OBJECTID, pool.BTRFS_ROOT_BACKREF_KEY, subvol)
    hi = (BTRFS_LAST_FREE_OBJECTID, pool.BTRFS_ROOT_BACKREF_KEY, subvol)
    for objectid, type_, offset, data in pool.tree_search(fd, pool.BTRFS_ROOT_TREE_OBJECTID, lo, hi):
        if type_ != pool.BTRFS_ROOT_BACKREF_KEY or offset != subvol:
            continue
        dirid, _, name_len = struct.unpack_from("<QQH", data)
        yield objectid, dirid, data[18 : 18 + name_len].decode("utf-8", "surrogateescape")


def _subvolume_parent(fd: int, subvol: int) -> int | None:
    lo = (subvol, pool.BTRFS_ROOT_BACKREF_KEY, 0)
    hi = (subvol, pool.BTRFS_ROOT_BACKREF_KEY, pool.UINT64_MAX)
    for objectid, type_, offset, _ in pool.tree_search(fd, pool.BTRFS_ROOT_TREE_OBJECTID, lo, hi):
        if objectid == subvol and type_ == pool.BTRFS_ROOT_BACKREF_KEY:
            return offset
    return None


def remove_subvolume(path: str) -> None:
    """Delete the subvolume at *path*, nested subvolumes and qgroups included."""
    with _parent_dir(path) as (fd, name):
        _remove_subvolume_at(fd, name)


def _remove_subvolume_at(parent: int, name: str, subvol: int = 0) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
    try:
        if not pool.is_subvolume(fd):
            raise _fail(errno.ENOTTY)
        subvol = subvol or pool.subvolume_id(fd)
        try:
            fcntl.ioctl(parent, BTRFS_IOC_SNAP_DESTROY, _vol_args(name))
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise
            _remove_nested_subvolumes(fd, subvol)
            fcntl.ioctl(parent, BTRFS_IOC_SNAP_DESTROY, _vol_args(name))
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        qgroup_destroy_recursive(parent, subvol)


def _remove_nested_subvolumes(fd: int, subvol: int) -> None:
    made_writable = False
    for child, dirid, child_name in list(_child_subvolumes(fd, subvol)):
        if not made_writable:
            _set_subvolume_read_only_fd(fd, False)
            made_writable = True
        where = pool.ino_lookup(fd, subvol, dirid)
        if not where:
            _remove_subvolume_at(fd, child_name, child)
            continue
        holder = os.open(where, os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        try:
            _remove_subvolume_at(holder, child_name, child)
        finally:
            os.close(holder)


def snapshot(src: str, dst: str, read_only: bool) -> None:
    """Snapshot subvolume *src* (nested subvolumes and quota setup too) to *dst*; a plain
    directory is copied into a new subvolume, or a new directory where btrfs is not."""
    sfd = os.open(src, os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC | os.O_DIRECTORY)
    try:
        if pool.is_subvolume(sfd):
            with _parent_dir(dst) as (parent, name):
                _snapshot_subvolume(sfd, parent, name, 0, read_only)
            return
        plain = False
        try:
            make_subvolume(dst)
        except OSError as e:
            if e.errno not in _NOT_SUPPORTED:
                raise
            os.mkdir(dst, 0o755)
            plain = True
        try:
            copy_tree(sfd, dst)
            if read_only and plain:
                _chattr(dst, pool.FS_IMMUTABLE_FL, pool.FS_IMMUTABLE_FL, ignore_errors=True)
            elif read_only:
                set_subvolume_read_only(dst, True)
        except BaseException:
            with contextlib.suppress(OSError):
                rm_rf(dst)
            raise
    finally:
        os.close(sfd)


def _snapshot_subvolume(sfd: int, parent: int, name: str, old_id: int, read_only: bool) -> None:
    flags = BTRFS_SUBVOL_RDONLY if read_only else 0
    fcntl.ioctl(parent, BTRFS_IOC_SNAP_CREATE_V2, _vol_args_v2(name, sfd, flags))
    old_id = old_id or pool.subvolume_id(sfd)
    new_fd = os.open(name, os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
    try:
        new_id = pool.subvolume_id(new_fd)
        with contextlib.suppress(OSError):
            _copy_quota_hierarchy(parent, old_id, new_id)
        for child, dirid, child_name in list(_child_subvolumes(sfd, old_id)):
            if child == new_id:
                continue
            _snapshot_nested(sfd, new_fd, old_id, child, dirid, child_name, read_only)
    finally:
        os.close(new_fd)
    with contextlib.suppress(OSError):
        _copy_subtree_limits(parent, old_id, new_id)


def _snapshot_nested(
    sfd: int, new_fd: int, old_id: int, child: int, dirid: int, name: str, read_only: bool
) -> None:
    """Put a snapshot of nested subvolume *child* where the new snapshot shows an empty directory."""
    where = pool.ino_lookup(sfd, old_id, dirid)
    flags = os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC | os.O_DIRECTORY | os.O_NOFOLLOW
    old_child = os.open(os.path.join(where, name) if where else name, flags, dir_fd=sfd)
    holder = os.open(where or ".", flags, dir_fd=new_fd)
    try:
        if read_only:
            _set_subvolume_read_only_fd(new_fd, False)
        try:
            os.rmdir(name, dir_fd=holder)
            _snapshot_subvolume(old_child, holder, name, child, read_only)
        finally:
            if read_only:
                _set_subvolume_read_only_fd(new_fd, True)
    finally:
        os.close(old_child)
        os.close(holder)


# --- btrfs quota ---------------------------------------------------------------


def quota_enable(fd: int) -> None:
    if not pool.is_btrfs(fd):
        raise _fail(errno.ENOTTY)
    fcntl.ioctl(fd, BTRFS_IOC_QUOTA_CTL, struct.pack("QQ", BTRFS_QUOTA_CTL_ENABLE, 0))


def _retrying_busy(fd: int, request: int, args: bytes) -> int:
    """ioctl(2) with a struct argument, returning its value; while a quota rescan keeps btrfs
    busy, wait for the rescan and retry (10 times)."""
    for attempt in range(11):
        buf = ctypes.create_string_buffer(args, len(args))
        ret = _libc.ioctl(fd, ctypes.c_ulong(request), buf)
        if ret >= 0:
            return ret
        code = ctypes.get_errno()
        if code != errno.EBUSY or attempt == 10:
            raise OSError(code, os.strerror(code))
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, BTRFS_IOC_QUOTA_RESCAN_WAIT, 0)
    raise AssertionError("unreachable")


def qgroup_limit(fd: int, qgroup: int, referenced_max: int) -> None:
    """Limit what *qgroup* may reference (UINT64_MAX lifts the limit)."""
    if not pool.is_btrfs(fd):
        raise _fail(errno.ENOTTY)
    args = struct.pack("6Q", qgroup, pool.BTRFS_QGROUP_LIMIT_MAX_RFER, referenced_max, 0, 0, 0)
    _retrying_busy(fd, BTRFS_IOC_QGROUP_LIMIT, args)


def qgroup_create(fd: int, qgroup: int, create: bool = True) -> None:
    if not pool.is_btrfs(fd):
        raise _fail(errno.ENOTTY)
    try:
        _retrying_busy(fd, BTRFS_IOC_QGROUP_CREATE, struct.pack("QQ", int(create), qgroup))
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOTCONN):
            raise _fail(errno.ENOTCONN) from None  # quota is off
        raise


def qgroup_assign(fd: int, child: int, parent: int, assign: bool = True) -> None:
    if not pool.is_btrfs(fd):
        raise _fail(errno.ENOTTY)
    if _retrying_busy(fd, BTRFS_IOC_QGROUP_ASSIGN, struct.pack("3Q", int(assign), child, parent)) > 0:
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, BTRFS_IOC_QUOTA_RESCAN, bytes(64))


def qgroup_destroy_recursive(fd: int, qgroup: int) -> None:
    """Destroy *qgroup* after leaving its parents; parents with the same id part go too."""
    _, subvol = pool.qgroup_split(qgroup)
    for parent in pool.qgroup_parents(fd, qgroup):
        qgroup_assign(fd, qgroup, parent, assign=False)
        if pool.qgroup_split(parent)[1] == subvol:
            with contextlib.suppress(OSError):
                qgroup_destroy_recursive(fd, parent)
    qgroup_create(fd, qgroup, create=False)


def auto_qgroup_path(path: str, insert_intermediary: bool) -> None:
    with _directory(path) as fd:
        auto_qgroup(fd, insert_intermediary)


def auto_qgroup(fd: int, insert_intermediary: bool, subvol: int = 0) -> None:
    """Account a subvolume with its parent's qgroups; with *insert_intermediary*, also give it a
    higher-level qgroup of its own (level one below the parent's lowest, 255 if none) that
    holds its whole subtree. Nothing happens if it already belongs to a qgroup."""
    if not subvol:
        if not pool.is_subvolume(fd):
            raise _fail(errno.ENOTTY)
        subvol = pool.subvolume_id(fd)
    if pool.qgroup_parents(fd, subvol):
        return
    parent = _subvolume_parent(fd, subvol)
    inherited = pool.qgroup_parents(fd, parent) if parent is not None else []
    if not insert_intermediary:
        for qgroup in inherited:
            _assign_tolerating_existing(fd, subvol, qgroup)
        return
    lowest = min([pool.qgroup_split(q)[0] for q in inherited] + [256])
    if lowest <= 1:
        raise _fail(errno.EBUSY)
    own = ((lowest - 1) << pool.BTRFS_QGROUP_LEVEL_SHIFT) | subvol
    created = _create_tolerating_existing(fd, own)
    try:
        for qgroup in inherited:
            _assign_tolerating_existing(fd, own, qgroup)
        _assign_tolerating_existing(fd, subvol, own)
    except OSError:
        if created:
            with contextlib.suppress(OSError):
                qgroup_destroy_recursive(fd, own)
        raise


def _create_tolerating_existing(fd: int, qgroup: int) -> bool:
    try:
        qgroup_create(fd, qgroup)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise
        return False
    return True


def _assign_tolerating_existing(fd: int, child: int, parent: int) -> None:
    try:
        qgroup_assign(fd, child, parent)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise


def _copy_quota_hierarchy(fd: int, old_id: int, new_id: int) -> None:
    """Give a snapshot the qgroup layout of its origin (own subtree qgroup, or the parent's qgroups)."""
    old_parents = pool.qgroup_parents(fd, old_id)
    if not old_parents:
        return
    origin_parent = _subvolume_parent(fd, old_id)
    shared = set(pool.qgroup_parents(fd, origin_parent)) if origin_parent is not None else set()
    intermediary = any(pool.qgroup_split(q)[1] == old_id for q in old_parents)
    if intermediary or shared.intersection(old_parents):
        auto_qgroup(fd, intermediary, subvol=new_id)


def _copy_qgroup_limits(fd: int, old: int, new: int) -> bool:
    """Give qgroup *new* the limits of qgroup *old*; False if *old* has none."""
    limit_key = pool.BTRFS_QGROUP_LIMIT_KEY
    for objectid, type_, offset, data in pool.quota_items(fd, limit_key, limit_key, 0, old):
        if objectid != 0 or type_ != limit_key or offset != old:
            continue
        flags, *limits = struct.unpack_from("<5Q", data)
        _retrying_busy(fd, BTRFS_IOC_QGROUP_LIMIT, struct.pack("6Q", new, flags & 0xF, *limits))
        return True
    return False


def _copy_subtree_limits(fd: int, old_id: int, new_id: int) -> None:
    _copy_qgroup_limits(fd, old_id, new_id)
    old_subtree, has_old = pool.subtree_qgroup(fd, old_id)
    new_subtree, has_new = pool.subtree_qgroup(fd, new_id)
    if has_old and has_new:
        _copy_qgroup_limits(fd, old_subtree, new_subtree)

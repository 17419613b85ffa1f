"""The image pool: which machine images exist, what they are, and who may touch them.

Discovery walks systemd's search path for machine images (first hit of a name
wins), recognises directories, btrfs subvolumes, ``NAME.raw`` files and block
devices, always adds the ``.host`` image, and reports each image's attributes
(read-only, creation/modification time, usage and limit) as systemd-machined
252 computes them. Locks are the very files systemd-nspawn takes, so that
neither side changes an image the other uses. Reading an image's metadata
(hostname, machine ID, machine-info, os-release) happens here too; it runs in a
worker child. Everything here is synchronous and may block: callers keep it
off the event loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import json
import os
import stat
import struct
import subprocess
from collections.abc import Iterator
from typing import Any

from machined.envfile import parse_env_file
from machined.errors import BusError
from machined.naming import hostname_is_valid, image_object_path

UINT64_MAX = 2**64 - 1
NAME_MAX = 255
HOST_IMAGE = ".host"
POOL_PATH = "/var/lib/machines"

SEARCH_PATH = (
    "/etc/machines",
    "/run/machines",
    "/var/lib/machines",
    "/var/lib/container",
    "/usr/local/lib/machines",
    "/usr/lib/machines",
)

LOCK_DIR = "/run/systemd/nspawn/locks"
NSPAWN_SETTINGS_DIRS = ("/etc/systemd/nspawn", "/run/systemd/nspawn")

# ioctl numbers and flags (x86-64 values of <linux/fs.h>, <linux/btrfs.h>).
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x10
BLKROGET = 0x125E
BLKGETSIZE64 = 0x80081272
BTRFS_SUPER_MAGIC = 0x9123683E
BTRFS_FIRST_FREE_OBJECTID = 256
BTRFS_IOC_TREE_SEARCH = 0xD0009411
BTRFS_IOC_INO_LOOKUP = 0xD0009412
BTRFS_IOC_GET_SUBVOL_INFO = 0x81F8943C
BTRFS_IOC_QUOTA_RESCAN_STATUS = 0x8040942D
BTRFS_ROOT_TREE_OBJECTID = 1
BTRFS_QUOTA_TREE_OBJECTID = 8
BTRFS_ROOT_BACKREF_KEY = 144
BTRFS_QGROUP_INFO_KEY = 242
BTRFS_QGROUP_LIMIT_KEY = 244
BTRFS_QGROUP_RELATION_KEY = 246
BTRFS_QGROUP_LIMIT_MAX_RFER = 1
BTRFS_QGROUP_LIMIT_MAX_EXCL = 2
BTRFS_QGROUP_LEVEL_SHIFT = 48
_ROOT_SUBVOL_RDONLY = 1

_AT_FDCWD = -100
_AT_EACCESS = 0x200

_libc = ctypes.CDLL(None, use_errno=True)


# --- names -------------------------------------------------------------------


def image_name_is_valid(name: str) -> bool:
    """Upstream's rule: a valid file name, no control characters, not a ``.#`` temporary."""
    raw = name.encode("utf-8", "surrogateescape")
    if not raw or name in (".", "..") or "/" in name or len(raw) > NAME_MAX:
        return False
    if any(b < 0x20 or b == 0x7F for b in raw):
        return False
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return not name.startswith(".#")


# --- the image ---------------------------------------------------------------


@dataclasses.dataclass
class Image:
    """One discovered image and its attributes (times in µs, sizes in bytes)."""

    name: str
    path: str
    type: str  # directory, subvolume, raw, block
    read_only: bool
    crtime: int = 0
    mtime: int = 0
    usage: int = UINT64_MAX
    usage_exclusive: int = UINT64_MAX
    limit: int = UINT64_MAX
    limit_exclusive: int = UINT64_MAX

    @property
    def is_vendor(self) -> bool:
        return path_startswith(self.path, "/usr")

    @property
    def is_host(self) -> bool:
        return self.name == HOST_IMAGE or os.path.normpath(self.path) == "/"

    @property
    def is_hidden(self) -> bool:
        return self.name.startswith(".")

    @property
    def object_path(self) -> str:
        return image_object_path(self.name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Image":
        return cls(**data)

    def settings_paths(self) -> list[str]:
        """The ``NAME.nspawn`` files that belong to the image (they follow it around)."""
        fn = f"{self.name}.nspawn"
        return [os.path.join(d, fn) for d in NSPAWN_SETTINGS_DIRS] + [self.sibling(fn)]

    def sibling(self, filename: str) -> str:
        """*filename* in the directory holding the image (``NAME.roothash``...)."""
        return os.path.join(os.path.dirname(self.path), filename)


def path_startswith(path: str, prefix: str) -> bool:
    """Whether *path* is *prefix* or below it, component by component."""
    parts = [p for p in path.split("/") if p]
    want = [p for p in prefix.split("/") if p]
    return parts[: len(want)] == want


# --- discovery ---------------------------------------------------------------


def discover() -> dict[str, Image]:
    """Every image of the search path by name, ``.host`` included."""
    found: dict[str, Image] = {}
    for directory in _search_dirs():
        for entry in os.scandir(directory):
            try:
                st = os.stat(entry.path)
            except FileNotFoundError:
                continue
            name = _image_name(entry.name, st)
            if name is None or not image_name_is_valid(name) or name in found:
                continue
            image = _make(name, directory, entry.name, st)
            if image is not None:
                found[name] = image
    if HOST_IMAGE not in found:
        found[HOST_IMAGE] = host_image()
    return found


def find(name: str) -> Image | None:
    """The image called *name*, as the first directory of the search path holding it has it."""
    if not image_name_is_valid(name):
        return None
    for directory in _search_dirs():
        located = _locate(directory, name)
        if located is None:
            continue
        image = _make(name, directory, *located)
        if image is not None:
            return image
    return host_image() if name == HOST_IMAGE else None


def host_image() -> Image:
    """The host's own root directory, always an image called ``.host``."""
    image = _make(HOST_IMAGE, None, "/", os.stat("/"))
    assert image is not None
    return image


def _search_dirs() -> Iterator[str]:
    """The search path with symlinks resolved; missing directories are skipped."""
    for directory in SEARCH_PATH:
        try:
            resolved = os.path.realpath(directory, strict=True)
        except FileNotFoundError:
            continue
        if not os.path.isdir(resolved):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), directory)
        yield resolved


def _image_name(filename: str, st: os.stat_result) -> str | None:
    if stat.S_ISREG(st.st_mode):
        return filename[: -len(".raw")] if filename.endswith(".raw") else None
    if stat.S_ISDIR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return filename
    return None


def _locate(directory: str, name: str) -> tuple[str, os.stat_result] | None:
    """(file name, stat) of image *name* in *directory*: ``NAME`` (directory or device), else ``NAME.raw``."""
    try:
        st = os.stat(os.path.join(directory, name))
    except FileNotFoundError:
        raw = f"{name}.raw"
        try:
            st = os.stat(os.path.join(directory, raw))
        except FileNotFoundError:
            return None
        return (raw, st) if stat.S_ISREG(st.st_mode) else None
    if stat.S_ISDIR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return name, st
    return None


def _make(name: str, directory: str | None, filename: str, st: os.stat_result) -> Image | None:
    """The image at *directory*/*filename*, or None if it vanished or is no image type."""
    path = os.path.normpath(os.path.join(directory or "/", filename))
    read_only = (directory is not None and path_startswith(directory, "/usr")) or _on_read_only_fs(path)
    try:
        if stat.S_ISDIR(st.st_mode):
            return _make_directory(name, path, st, read_only)
        if stat.S_ISREG(st.st_mode) and filename.endswith(".raw"):
            return _make_raw(name, path, st, read_only)
        if stat.S_ISBLK(st.st_mode):
            return _make_block(name, path, st, read_only)
    except FileNotFoundError:
        return None
    return None


def _on_read_only_fs(path: str) -> bool:
    """Whether writing to *path* fails for being on a read-only file system (access(2), effective IDs)."""
    ctypes.set_errno(0)
    if _libc.faccessat(_AT_FDCWD, os.fsencode(path), os.W_OK, _AT_EACCESS) == 0:
        return False
    return ctypes.get_errno() == errno.EROFS


def _make_directory(name: str, path: str, st: os.stat_result, read_only: bool) -> Image:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        if st.st_ino == BTRFS_FIRST_FREE_OBJECTID and is_btrfs(fd):
            info = subvolume_info(fd)
            image = Image(name, path, "subvolume", info.read_only or read_only, crtime=info.otime)
            if not (image.is_vendor or image.is_host):
                _update_quota(image, fd)
            return image
        immutable = bool(file_attrs(fd) & FS_IMMUTABLE_FL)
        # The mtime of the top directory says nothing about the tree: upstream reports 0.
        return Image(name, path, "directory", read_only or immutable, crtime=crtime(fd))
    finally:
        os.close(fd)


def _make_raw(name: str, path: str, st: os.stat_result, read_only: bool) -> Image:
    created = crtime(path)
    used = st.st_blocks * 512
    return Image(
        name, path, "raw", not (st.st_mode & 0o222) or read_only,
        crtime=created, mtime=st.st_mtime_ns // 1000,
        usage=used, usage_exclusive=used, limit=st.st_size, limit_exclusive=st.st_size,
    )  # fmt: skip


def _make_block(name: str, path: str, st: os.stat_result, read_only: bool) -> Image:
    size = UINT64_MAX
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        fd = -1
    if fd >= 0:
        try:
            st = os.fstat(fd)
            if not stat.S_ISBLK(st.st_mode):
                raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
            read_only = read_only or bool(_ioctl_int(fd, BLKROGET, "i"))
            size = _ioctl_int(fd, BLKGETSIZE64, "Q", UINT64_MAX)
        finally:
            os.close(fd)
    image = Image(name, path, "block", not (st.st_mode & 0o222) or read_only)
    if size not in (0, UINT64_MAX):
        image.usage = image.usage_exclusive = image.limit = image.limit_exclusive = size
    return image


def _ioctl_int(fd: int, request: int, fmt: str, default: int = 0) -> int:
    try:
        return struct.unpack(fmt, fcntl.ioctl(fd, request, bytes(struct.calcsize(fmt))))[0]
    except OSError:
        return default


def file_attrs(fd: int) -> int:
    """The inode flags (chattr) of *fd*, 0 where the file system has none."""
    return _ioctl_int(fd, FS_IOC_GETFLAGS, "I")


# --- creation time -----------------------------------------------------------

_STATX_BTIME = 0x800
_AT_EMPTY_PATH = 0x1000
_AT_STATX_DONT_SYNC = 0x4000
_STATX_SIZE = 256
_STATX_BTIME_OFFSET = 80


def crtime(target: int | str) -> int:
    """Birth time in µs of an fd or a path (symlinks followed): the older of statx's btime and
    the ``user.crtime_usec`` xattr systemd records where btime is missing; 0 if neither."""
    born = _statx_btime(target)
    try:
        raw = os.getxattr(target, "user.crtime_usec")
    except OSError:
        return born or 0
    if len(raw) != 8:
        return born or 0
    (stored,) = struct.unpack("<Q", raw)
    if stored in (0, UINT64_MAX):
        return born or 0
    return min(born, stored) if born else stored


def _statx_btime(target: int | str) -> int | None:
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if isinstance(target, int):
        ret = _libc.statx(target, b"", _AT_EMPTY_PATH | _AT_STATX_DONT_SYNC, _STATX_BTIME, buf)
    else:
        ret = _libc.statx(_AT_FDCWD, os.fsencode(target), _AT_STATX_DONT_SYNC, _STATX_BTIME, buf)
    if ret != 0:
        return None
    (mask,) = struct.unpack_from("I", buf.raw, 0)
    sec, nsec = struct.unpack_from("qI", buf.raw, _STATX_BTIME_OFFSET)
    if not mask & _STATX_BTIME or sec == 0:
        return None
    return sec * 1_000_000 + nsec // 1000


def set_crtime(fd: int, usec: int) -> None:
    """Record *usec* as the creation time of *fd*, the way systemd does (an xattr)."""
    os.setxattr(fd, "user.crtime_usec", struct.pack("<Q", usec))


# --- btrfs (reading) ---------------------------------------------------------


@dataclasses.dataclass
class SubvolumeInfo:
    subvol_id: int
    read_only: bool
    otime: int


@dataclasses.dataclass
class Quota:
    referenced: int = UINT64_MAX
    exclusive: int = UINT64_MAX
    referenced_max: int = UINT64_MAX
    exclusive_max: int = UINT64_MAX


def is_btrfs(fd: int) -> bool:
    buf = ctypes.create_string_buffer(128)
    if _libc.fstatfs(fd, buf) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return ctypes.c_long.from_buffer_copy(buf.raw[: ctypes.sizeof(ctypes.c_long)]).value == BTRFS_SUPER_MAGIC


def is_subvolume(fd: int) -> bool:
    return os.fstat(fd).st_ino == BTRFS_FIRST_FREE_OBJECTID and is_btrfs(fd)


def subvolume_id(fd: int) -> int:
    """The id of the subvolume *fd* lives in (ENOTTY if not on btrfs)."""
    if not is_btrfs(fd):
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
    args = bytearray(4096)
    struct.pack_into("QQ", args, 0, 0, BTRFS_FIRST_FREE_OBJECTID)
    fcntl.ioctl(fd, BTRFS_IOC_INO_LOOKUP, args)
    return struct.unpack_from("Q", args, 0)[0]


def ino_lookup(fd: int, tree_id: int, objectid: int) -> str:
    """Path of directory *objectid* inside subvolume *tree_id*, relative to it ("" at its top)."""
    args = bytearray(4096)
    struct.pack_into("QQ", args, 0, tree_id, objectid)
    fcntl.ioctl(fd, BTRFS_IOC_INO_LOOKUP, args)
    return bytes(args[16:]).split(b"\0", 1)[0].decode("utf-8", "surrogateescape").rstrip("/")


def subvolume_info(fd: int) -> SubvolumeInfo:
    args = bytearray(504)
    fcntl.ioctl(fd, BTRFS_IOC_GET_SUBVOL_INFO, args)
    (tree_id,) = struct.unpack_from("Q", args, 0)
    (flags,) = struct.unpack_from("Q", args, 288)
    sec, nsec = struct.unpack_from("QI", args, 392)
    return SubvolumeInfo(tree_id, bool(flags & _ROOT_SUBVOL_RDONLY), sec * 1_000_000 + nsec // 1000)


Key = tuple[int, int, int]  # a btrfs key: (objectid, type, offset)
Item = tuple[int, int, int, bytes]  # a tree item: its key and its data


def tree_search(fd: int, tree_id: int, min_key: Key, max_key: Key) -> Iterator[Item]:
    """Items (objectid, type, offset, data) of a btrfs tree between two (objectid, type, offset) keys."""
    objectid, type_, offset = min_key
    while (objectid, type_, offset) <= max_key:
        args = bytearray(4096)
        struct.pack_into(
            "7Q3I", args, 0, tree_id, objectid, max_key[0], offset, max_key[2], 0, UINT64_MAX, type_, max_key[1], 256
        )
        fcntl.ioctl(fd, BTRFS_IOC_TREE_SEARCH, args)
        (count,) = struct.unpack_from("I", args, 64)
        if count == 0:
            return
        pos = 104
        for _ in range(count):
            _, objectid, offset, type_, length = struct.unpack_from("QQQII", args, pos)
            yield objectid, type_, offset, bytes(args[pos + 32 : pos + 32 + length])
            pos += 32 + length
        # Continue after the last key seen.
        if offset < UINT64_MAX:
            offset += 1
        elif type_ < 255:
            type_, offset = type_ + 1, 0
        elif objectid < UINT64_MAX:
            objectid, type_, offset = objectid + 1, 0, 0
        else:
            return


def quota_items(fd: int, type_lo: int, type_hi: int, objectid: int = 0, offset: int | None = None) -> Iterator[Item]:
    """Items of the quota tree; nothing when quota is disabled (no quota tree)."""
    lo = (objectid, type_lo, 0 if offset is None else offset)
    hi = (objectid, type_hi, UINT64_MAX if offset is None else offset)
    try:
        yield from tree_search(fd, BTRFS_QUOTA_TREE_OBJECTID, lo, hi)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise


def qgroup_parents(fd: int, qgroup: int) -> list[int]:
    """The qgroups *qgroup* is assigned to."""
    return [
        offset
        for objectid, type_, offset, _ in quota_items(fd, BTRFS_QGROUP_RELATION_KEY, BTRFS_QGROUP_RELATION_KEY, qgroup)
        if type_ == BTRFS_QGROUP_RELATION_KEY and objectid == qgroup and offset >= objectid
    ]


def qgroup_split(qgroup: int) -> tuple[int, int]:
    """(level, id) of a qgroup id."""
    return qgroup >> BTRFS_QGROUP_LEVEL_SHIFT, qgroup & ((1 << BTRFS_QGROUP_LEVEL_SHIFT) - 1)


def subtree_qgroup(fd: int, subvol: int) -> tuple[int, bool]:
    """The lowest-level qgroup sharing *subvol*'s id, or (subvol, False) if it has none."""
    candidates = [q for q in qgroup_parents(fd, subvol) if qgroup_split(q)[1] == subvol]
    if not candidates:
        return subvol, False
    return min(candidates, key=lambda q: qgroup_split(q)[0]), True


def qgroup_quota(fd: int, qgroup: int) -> Quota:
    """Usage and limits of *qgroup* (ENODATA if quota knows nothing of it)."""
    quota = Quota()
    found = False
    for objectid, type_, offset, data in quota_items(fd, BTRFS_QGROUP_INFO_KEY, BTRFS_QGROUP_LIMIT_KEY, 0, qgroup):
        if objectid != 0 or offset != qgroup:
            continue
        if type_ == BTRFS_QGROUP_INFO_KEY:
            _, quota.referenced, _, quota.exclusive, _ = struct.unpack_from("<5Q", data)
            found = True
        elif type_ == BTRFS_QGROUP_LIMIT_KEY:
            flags, max_rfer, max_excl, _, _ = struct.unpack_from("<5Q", data)
            quota.referenced_max = max_rfer if flags & BTRFS_QGROUP_LIMIT_MAX_RFER else UINT64_MAX
            quota.exclusive_max = max_excl if flags & BTRFS_QGROUP_LIMIT_MAX_EXCL else UINT64_MAX
            found = True
    if not found:
        raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
    return quota


def subtree_quota(fd: int) -> Quota:
    """Quota of the subvolume *fd* and everything below it."""
    qgroup, _ = subtree_qgroup(fd, subvolume_id(fd))
    return qgroup_quota(fd, qgroup)


def quota_rescan_ongoing(fd: int) -> bool:
    args = bytearray(64)
    fcntl.ioctl(fd, BTRFS_IOC_QUOTA_RESCAN_STATUS, args)
    return struct.unpack_from("Q", args, 0)[0] != 0


def _update_quota(image: Image, fd: int) -> None:
    """Usage and limits of a subvolume image from its subtree qgroup, if quota is on and settled."""
    try:
        if quota_rescan_ongoing(fd):
            return
        quota = subtree_quota(fd)
    except OSError:
        return
    image.usage, image.usage_exclusive = quota.referenced, quota.exclusive
    image.limit, image.limit_exclusive = quota.referenced_max, quota.exclusive_max


def _pool_quota(pool_path: str) -> Quota:
    try:
        fd = os.open(pool_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return Quota()
    try:
        return subtree_quota(fd)
    except OSError:
        return Quota()
    finally:
        os.close(fd)


def pool_usage(pool_path: str) -> int:
    """Bytes referenced by the pool (btrfs quota), UINT64_MAX if unknown."""
    return _pool_quota(pool_path).referenced


def pool_limit(pool_path: str) -> int:
    """The pool's quota limit in bytes, UINT64_MAX if none or unknown."""
    return _pool_quota(pool_path).referenced_max


# --- locks shared with systemd-nspawn ----------------------------------------

_F_OFD_SETLK = 37
_FLOCK = "hhqqi4x"  # struct flock: l_type, l_whence, l_start, l_len, l_pid


class LockFile:
    """A lock on a file, released by :meth:`release` (which removes the file when it may)."""

    def __init__(self, path: str, fd: int, exclusive: bool) -> None:
        self.path, self.fd, self.exclusive = path, fd, exclusive

    @classmethod
    def acquire(cls, path: str, exclusive: bool) -> "LockFile":
        """Lock *path* without waiting (EBUSY if taken), creating it if needed."""
        while True:
            fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY, 0o600)
            try:
                _lock(fd, exclusive)
                alive = os.fstat(fd).st_nlink > 0
            except BaseException:
                os.close(fd)
                raise
            if alive:
                return cls(path, fd, exclusive)
            os.close(fd)  # the previous owner removed it under us: try again

    def release(self) -> None:
        if not self.exclusive:
            with contextlib.suppress(OSError):
                _lock(self.fd, True)
                self.exclusive = True
        if self.exclusive:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self.fd)


def _lock(fd: int, exclusive: bool) -> None:
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, struct.pack(_FLOCK, kind, os.SEEK_SET, 0, 0, 0))
    except OSError as e:
        if e.errno == errno.EINVAL:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                return
            except OSError as f:
                e = f
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY)) from None
        raise


def _locking_enabled() -> bool:
    value = os.environ.get("SYSTEMD_NSPAWN_LOCK", "").strip().lower()
    return value not in ("0", "no", "n", "false", "f", "off")


def _make_lock_dir() -> None:
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(LOCK_DIR), 0o755, exist_ok=True)
    with contextlib.suppress(OSError):
        os.mkdir(LOCK_DIR, 0o700)


def _global_lock_path(path: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    if stat.S_ISBLK(st.st_mode):
        return f"{LOCK_DIR}/block-{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
        return f"{LOCK_DIR}/inode-{st.st_dev}:{st.st_ino}"
    raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))


@contextlib.contextmanager
def image_path_lock(path: str, exclusive: bool) -> Iterator[None]:
    """Hold nspawn's locks on the image at *path*: ``.#NAME.lck`` beside it and the inode lock in /run.

    EBUSY if someone (a running container, another operation) holds them.
    The host's root can be locked shared (a no-op) but never exclusively.
    """
    if not os.path.isabs(path):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    if not _locking_enabled():
        yield
        return
    if os.path.normpath(path) == "/":
        if exclusive:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        yield
        return
    global_path = _global_lock_path(path)
    locks: list[LockFile] = []
    try:
        if not path_startswith(path, "/dev"):
            local = _local_lock(path, exclusive)
            if local is not None:
                locks.append(local)
        if global_path is not None:
            _make_lock_dir()
            locks.append(LockFile.acquire(global_path, exclusive))
        yield
    finally:
        for lock in reversed(locks):
            lock.release()


def _local_lock(path: str, exclusive: bool) -> LockFile | None:
    directory, filename = os.path.split(os.path.normpath(path))
    if not filename or filename in (".", "..") or len(filename.encode()) > NAME_MAX:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    try:
        return LockFile.acquire(os.path.join(directory, f".#{filename}.lck"), exclusive)
    except OSError as e:
        if not exclusive and e.errno == errno.EROFS:
            return None
        raise


@contextlib.contextmanager
def image_name_lock(name: str) -> Iterator[None]:
    """Hold nspawn's exclusive lock on an image *name*, whatever its path (``.host``: EBUSY)."""
    if name == HOST_IMAGE:
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
    if not image_name_is_valid(name):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    if not _locking_enabled():
        yield
        return
    _make_lock_dir()
    lock = LockFile.acquire(f"{LOCK_DIR}/name-{name}", True)
    try:
        yield
    finally:
        lock.release()


# --- metadata (runs in a worker child) ---------------------------------------


def read_metadata(image: dict[str, Any]) -> dict[str, Any]:
    """Hostname, machine ID (hex or ""), machine-info and os-release of an image, under a shared lock."""
    img = Image.from_dict(image)
    with image_path_lock(img.path, exclusive=False):
        if img.type in ("directory", "subvolume"):
            return _tree_metadata(img.path)
        if img.type in ("raw", "block"):
            return _dissected_metadata(img.path)
    raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))


def _tree_metadata(root: str) -> dict[str, Any]:
    return {
        "hostname": _hostname(_read_in(root, "/etc/hostname")),
        "machine_id": _machine_id(_read_in(root, "/etc/machine-id")),
        "machine_info": parse_env_file(_read_in(root, "/etc/machine-info") or ""),
        "os_release": parse_env_file(
            _read_in(root, "/etc/os-release") or _read_in(root, "/usr/lib/os-release") or ""
        ),
    }


def _read_in(root: str, path: str) -> str | None:
    """Text of *path* inside the tree at *root* (symlinks resolved inside it), None if unreadable."""
    try:
        with open(chase(root, path), encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError:
        return None


def chase(root: str, path: str, max_links: int = 32) -> str:
    """Resolve *path* as if *root* were ``/``: absolute symlinks and ``..`` stay inside *root*."""
    resolved: list[str] = []
    todo = [p for p in path.split("/") if p]
    while todo:
        part = todo.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        if os.path.islink(candidate):
            max_links -= 1
            if max_links < 0:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            todo = [p for p in target.split("/") if p] + todo
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)


def _hostname(text: str | None) -> str:
    """The first hostname line of /etc/hostname, normalized as systemd does ("" if none or invalid)."""
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        cleaned = _hostname_cleanup(line)
        return cleaned if hostname_is_valid(cleaned) else ""
    return ""


def _hostname_cleanup(text: str) -> str:
    out: list[str] = []
    after_dot, after_hyphen = True, True
    for ch in text:
        if len(out) >= 64:
            break
        if ch == ".":
            if after_dot or after_hyphen:
                continue
            after_dot, after_hyphen = True, False
        elif ch == "-":
            if after_dot:
                continue
            after_dot, after_hyphen = False, True
        elif ch.isascii() and ch.isalnum():
            after_dot, after_hyphen = False, False
        else:
            continue
        out.append(ch)
    if out and out[-1] in "-.":
        out.pop()
    return "".join(out)


def _machine_id(text: str | None) -> str:
    """The 32 hex digits of a machine-id file, "" if it holds none."""
    if text is None:
        return ""
    value = text[:-1] if text.endswith("\n") else text
    if len(value) == 32 and all(c in "0123456789abcdefABCDEF" for c in value):
        return value.lower()
    return ""


def _dissected_metadata(path: str) -> dict[str, Any]:
    """Metadata of a disk image through its partitions, as systemd-dissect finds them."""
    proc = subprocess.run(
        ["systemd-dissect", "--json=short", "--read-only", path],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise BusError.from_errno(errno.EIO, f"Failed to read image metadata: {proc.stderr.strip()}")
    data = json.loads(proc.stdout)
    return {
        "hostname": data.get("hostname") or "",
        "machine_id": data.get("machineId") or "",
        "machine_info": _pairs(data.get("machineInfo")),
        "os_release": _pairs(data.get("osRelease")),
    }


def _pairs(assignments: list[str] | None) -> dict[str, str]:
    """``KEY=VALUE`` strings (as systemd-dissect prints them) as a dict."""
    return dict(a.split("=", 1) for a in assignments or [] if "=" in a)

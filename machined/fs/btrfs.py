"""Every btrfs ioctl machined makes: subvolumes (info, create, snapshot, delete, read-only flag),
searches of btrfs's trees, and quota (qgroups: usage, limits, hierarchy), as systemd's btrfs-util.

Functions take an fd of a file on btrfs (or a path) and fail with an ``OSError``;
ENOTTY where the file system is not btrfs. (ioctl numbers and struct layouts are
the x86-64 ones of <linux/btrfs.h>.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import struct
from collections.abc import Callable, Iterator

from machined.fs import libc
from machined.fs.fds import opened, opened_at, parent_dir

UINT64_MAX = 2**64 - 1
BTRFS_SUPER_MAGIC = 0x9123683E
BTRFS_FIRST_FREE_OBJECTID = 256
BTRFS_LAST_FREE_OBJECTID = 2**64 - 256
BTRFS_ROOT_TREE_OBJECTID = 1
BTRFS_QUOTA_TREE_OBJECTID = 8
BTRFS_ROOT_BACKREF_KEY = 144
BTRFS_QGROUP_INFO_KEY = 242
BTRFS_QGROUP_LIMIT_KEY = 244
BTRFS_QGROUP_RELATION_KEY = 246
BTRFS_QGROUP_LIMIT_MAX_RFER = 1
BTRFS_QGROUP_LIMIT_MAX_EXCL = 2
BTRFS_QGROUP_LEVEL_SHIFT = 48
BTRFS_SUBVOL_RDONLY = 2
BTRFS_QUOTA_CTL_ENABLE = 1
_ROOT_SUBVOL_RDONLY = 1

BTRFS_IOC_DEFRAG = 0x50009402
BTRFS_IOC_SUBVOL_CREATE = 0x5000940E
BTRFS_IOC_SNAP_DESTROY = 0x5000940F
BTRFS_IOC_TREE_SEARCH = 0xD0009411
BTRFS_IOC_INO_LOOKUP = 0xD0009412
BTRFS_IOC_SNAP_CREATE_V2 = 0x50009417
BTRFS_IOC_SUBVOL_GETFLAGS = 0x80089419
BTRFS_IOC_SUBVOL_SETFLAGS = 0x4008941A
BTRFS_IOC_QUOTA_CTL = 0xC0109428
BTRFS_IOC_QGROUP_ASSIGN = 0x40189429
BTRFS_IOC_QGROUP_CREATE = 0x4010942A
BTRFS_IOC_QGROUP_LIMIT = 0x8030942B
BTRFS_IOC_QUOTA_RESCAN = 0x4040942C
BTRFS_IOC_QUOTA_RESCAN_STATUS = 0x8040942D
BTRFS_IOC_QUOTA_RESCAN_WAIT = 0x942E
BTRFS_IOC_GET_SUBVOL_INFO = 0x81F8943C

_NOT_BTRFS = errno.ENOTTY


def _fail(code: int) -> OSError:
    return OSError(code, os.strerror(code))


# --- what is btrfs ------------------------------------------------------------------


def is_btrfs(fd: int) -> bool:
    return libc.fs_type_fd(fd) == BTRFS_SUPER_MAGIC


def is_btrfs_path(path: str) -> bool:
    """Whether *path* (followed) lives on btrfs."""
    with opened(path, os.O_PATH | os.O_CLOEXEC) as fd:
        return is_btrfs(fd)


def is_subvolume(fd: int) -> bool:
    return os.fstat(fd).st_ino == BTRFS_FIRST_FREE_OBJECTID and is_btrfs(fd)


def _require_btrfs(fd: int) -> None:
    if not is_btrfs(fd):
        raise _fail(_NOT_BTRFS)


# --- reading: subvolumes and trees ------------------------------------------------------


@dataclasses.dataclass
class SubvolumeInfo:
    subvol_id: int
    read_only: bool
    otime: int  # creation time in µs


def subvolume_id(fd: int) -> int:
    """The id of the subvolume *fd* lives in (ENOTTY if not on btrfs)."""
    _require_btrfs(fd)
    args = bytearray(4096)
    struct.pack_into("QQ", args, 0, 0, BTRFS_FIRST_FREE_OBJECTID)
    fcntl.ioctl(fd, BTRFS_IOC_INO_LOOKUP, args)
    return int(struct.unpack_from("Q", args, 0)[0])


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


def _root_backrefs(fd: int, lo: Key, hi: Key) -> Iterator[Item]:
    for item in tree_search(fd, BTRFS_ROOT_TREE_OBJECTID, lo, hi):
        if item[1] == BTRFS_ROOT_BACKREF_KEY:
            yield item


def child_subvolumes(fd: int, subvol: int) -> Iterator[tuple[int, int, str]]:
    """(id, directory inode, name) of the subvolumes directly inside subvolume *subvol*."""
    lo = (BTRFS_FIRST_FREE_OBJECTID, BTRFS_ROOT_BACKREF_KEY, subvol)
    hi = (BTRFS_LAST_FREE_OBJECTID, BTRFS_ROOT_BACKREF_KEY, subvol)
    for objectid, _, offset, data in _root_backrefs(fd, lo, hi):
        if offset != subvol:
            continue
        dirid, _, name_len = struct.unpack_from("<QQH", data)
        yield objectid, dirid, data[18 : 18 + name_len].decode("utf-8", "surrogateescape")


def subvolume_parent(fd: int, subvol: int) -> int | None:
    for objectid, _, offset, _ in _root_backrefs(fd, (subvol, BTRFS_ROOT_BACKREF_KEY, 0),
                                                 (subvol, BTRFS_ROOT_BACKREF_KEY, UINT64_MAX)):  # fmt: skip
        if objectid == subvol:
            return offset
    return None


# --- changing subvolumes --------------------------------------------------------------


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


def make_subvolume(path: str) -> None:
    """Create *path* as a btrfs subvolume (ENOTTY where btrfs is not)."""
    with parent_dir(path) as (fd, name):
        fcntl.ioctl(fd, BTRFS_IOC_SUBVOL_CREATE, _vol_args(name))


def set_subvolume_read_only(path: str, read_only: bool) -> None:
    with opened(path) as fd:
        set_subvolume_read_only_fd(fd, read_only)


def set_subvolume_read_only_fd(fd: int, read_only: bool) -> None:
    if os.fstat(fd).st_ino != BTRFS_FIRST_FREE_OBJECTID:
        raise _fail(errno.EINVAL)
    (flags,) = struct.unpack("Q", fcntl.ioctl(fd, BTRFS_IOC_SUBVOL_GETFLAGS, bytes(8)))
    new = (flags | BTRFS_SUBVOL_RDONLY) if read_only else (flags & ~BTRFS_SUBVOL_RDONLY)
    if new != flags:
        fcntl.ioctl(fd, BTRFS_IOC_SUBVOL_SETFLAGS, struct.pack("Q", new))


def remove_subvolume(path: str) -> None:
    """Delete the subvolume at *path*, nested subvolumes and qgroups included."""
    with parent_dir(path) as (fd, name):
        remove_subvolume_at(fd, name)


def remove_subvolume_at(parent: int, name: str, subvol: int = 0) -> None:
    """Delete subvolume *name* of directory *parent* (ENOTTY if it is none), nested ones first."""
    with opened_at(parent, name) as fd:
        if not is_subvolume(fd):
            raise _fail(errno.ENOTTY)
        subvol = subvol or subvolume_id(fd)
        try:
            fcntl.ioctl(parent, BTRFS_IOC_SNAP_DESTROY, _vol_args(name))
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise
            _remove_nested_subvolumes(fd, subvol)
            fcntl.ioctl(parent, BTRFS_IOC_SNAP_DESTROY, _vol_args(name))
    with contextlib.suppress(OSError):
        qgroup_destroy_recursive(parent, subvol)


def _remove_nested_subvolumes(fd: int, subvol: int) -> None:
    made_writable = False
    for child, dirid, child_name in list(child_subvolumes(fd, subvol)):
        if not made_writable:
            set_subvolume_read_only_fd(fd, False)
            made_writable = True
        where = ino_lookup(fd, subvol, dirid)
        if not where:
            remove_subvolume_at(fd, child_name, child)
            continue
        with opened_at(fd, where) as holder:
            remove_subvolume_at(holder, child_name, child)


def snapshot_subvolume(src_fd: int, dst: str, read_only: bool) -> None:
    """Snapshot the subvolume *src_fd* to the new path *dst*, nested subvolumes and quota setup too."""
    with parent_dir(dst) as (parent, name):
        _snapshot_at(src_fd, parent, name, 0, read_only)


def _snapshot_at(sfd: int, parent: int, name: str, old_id: int, read_only: bool) -> None:
    flags = BTRFS_SUBVOL_RDONLY if read_only else 0
    fcntl.ioctl(parent, BTRFS_IOC_SNAP_CREATE_V2, _vol_args_v2(name, sfd, flags))
    old_id = old_id or subvolume_id(sfd)
    with opened_at(parent, name) as new_fd:
        new_id = subvolume_id(new_fd)
        with contextlib.suppress(OSError):
            _copy_quota_hierarchy(parent, old_id, new_id)
        for child, dirid, child_name in list(child_subvolumes(sfd, old_id)):
            if child == new_id:
                continue
            _snapshot_nested(sfd, new_fd, old_id, child, dirid, child_name, read_only)
    with contextlib.suppress(OSError):
        _copy_subtree_limits(parent, old_id, new_id)


def _snapshot_nested(sfd: int, new_fd: int, old_id: int, child: int, dirid: int, name: str, read_only: bool) -> None:
    """Put a snapshot of nested subvolume *child* where the new snapshot shows an empty directory."""
    where = ino_lookup(sfd, old_id, dirid)
    with opened_at(sfd, os.path.join(where, name) if where else name) as old_child, \
            opened_at(new_fd, where or ".") as holder:  # fmt: skip
        if read_only:
            set_subvolume_read_only_fd(new_fd, False)
        try:
            os.rmdir(name, dir_fd=holder)
            _snapshot_at(old_child, holder, name, child, read_only)
        finally:
            if read_only:
                set_subvolume_read_only_fd(new_fd, True)


def defragment(path: str) -> None:
    """Defragment a file (best effort: nothing happens off btrfs or on failure)."""
    with contextlib.suppress(OSError), opened(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY | os.O_NOFOLLOW) as fd:
        fcntl.ioctl(fd, BTRFS_IOC_DEFRAG, 0)


# --- quota: reading -------------------------------------------------------------------


@dataclasses.dataclass
class Quota:
    referenced: int = UINT64_MAX
    exclusive: int = UINT64_MAX
    referenced_max: int = UINT64_MAX
    exclusive_max: int = UINT64_MAX


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


def _qgroup_items(fd: int, qgroup: int, type_lo: int, type_hi: int) -> Iterator[tuple[int, bytes]]:
    """(type, data) of the items quota keeps about *qgroup* itself."""
    for objectid, type_, offset, data in quota_items(fd, type_lo, type_hi, 0, qgroup):
        if objectid == 0 and offset == qgroup and type_lo <= type_ <= type_hi:
            yield type_, data


def qgroup_quota(fd: int, qgroup: int) -> Quota:
    """Usage and limits of *qgroup* (ENODATA if quota knows nothing of it)."""
    quota = Quota()
    found = False
    for type_, data in _qgroup_items(fd, qgroup, BTRFS_QGROUP_INFO_KEY, BTRFS_QGROUP_LIMIT_KEY):
        if type_ == BTRFS_QGROUP_INFO_KEY:
            _, quota.referenced, _, quota.exclusive, _ = struct.unpack_from("<5Q", data)
            found = True
        elif type_ == BTRFS_QGROUP_LIMIT_KEY:
            flags, max_rfer, max_excl, _, _ = struct.unpack_from("<5Q", data)
            quota.referenced_max = max_rfer if flags & BTRFS_QGROUP_LIMIT_MAX_RFER else UINT64_MAX
            quota.exclusive_max = max_excl if flags & BTRFS_QGROUP_LIMIT_MAX_EXCL else UINT64_MAX
            found = True
    if not found:
        raise _fail(errno.ENODATA)
    return quota


def subtree_quota(fd: int) -> Quota:
    """Quota of the subvolume *fd* and everything below it."""
    qgroup, _ = subtree_qgroup(fd, subvolume_id(fd))
    return qgroup_quota(fd, qgroup)


def subtree_quota_path(path: str) -> Quota:
    """Quota of the subvolume at *path* and below; unknown (all UINT64_MAX) when it cannot be read."""
    try:
        with opened(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) as fd:
            return subtree_quota(fd)
    except OSError:
        return Quota()


def quota_rescan_ongoing(fd: int) -> bool:
    args = bytearray(64)
    fcntl.ioctl(fd, BTRFS_IOC_QUOTA_RESCAN_STATUS, args)
    return int(struct.unpack_from("Q", args, 0)[0]) != 0


# --- quota: changing ------------------------------------------------------------------


def quota_enable(fd: int) -> None:
    _require_btrfs(fd)
    fcntl.ioctl(fd, BTRFS_IOC_QUOTA_CTL, struct.pack("QQ", BTRFS_QUOTA_CTL_ENABLE, 0))


def _retrying_busy(fd: int, request: int, args: bytes) -> int:
    """ioctl(2) with a struct argument, returning its value; while a quota rescan keeps btrfs
    busy, wait for the rescan and retry (10 times)."""
    for attempt in range(11):
        try:
            return libc.ioctl(fd, request, args)
        except OSError as e:
            if e.errno != errno.EBUSY or attempt == 10:
                raise
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, BTRFS_IOC_QUOTA_RESCAN_WAIT, 0)
    raise AssertionError("unreachable")


def qgroup_limit(fd: int, qgroup: int, referenced_max: int) -> None:
    """Limit what *qgroup* may reference (UINT64_MAX lifts the limit)."""
    _require_btrfs(fd)
    args = struct.pack("6Q", qgroup, BTRFS_QGROUP_LIMIT_MAX_RFER, referenced_max, 0, 0, 0)
    _retrying_busy(fd, BTRFS_IOC_QGROUP_LIMIT, args)


def subtree_limit(fd: int, limit: int, add_subtree_qgroup: bool = False) -> None:
    """Limit the subvolume *fd*: its own qgroup (best effort) and its subtree qgroup, which
    *add_subtree_qgroup* creates first where missing (best effort)."""
    with contextlib.suppress(OSError):
        qgroup_limit(fd, subvolume_id(fd), limit)
    if add_subtree_qgroup:
        with contextlib.suppress(OSError):
            auto_qgroup(fd, insert_intermediary=True)
    qgroup, _ = subtree_qgroup(fd, subvolume_id(fd))
    qgroup_limit(fd, qgroup, limit)


def qgroup_create(fd: int, qgroup: int, create: bool = True) -> None:
    _require_btrfs(fd)
    try:
        _retrying_busy(fd, BTRFS_IOC_QGROUP_CREATE, struct.pack("QQ", int(create), qgroup))
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOTCONN):
            raise _fail(errno.ENOTCONN) from None  # quota is off
        raise


def qgroup_assign(fd: int, child: int, parent: int, assign: bool = True) -> None:
    _require_btrfs(fd)
    if _retrying_busy(fd, BTRFS_IOC_QGROUP_ASSIGN, struct.pack("3Q", int(assign), child, parent)) > 0:
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, BTRFS_IOC_QUOTA_RESCAN, bytes(64))


def qgroup_destroy_recursive(fd: int, qgroup: int) -> None:
    """Destroy *qgroup* after leaving its parents; parents with the same id part go too."""
    _, subvol = qgroup_split(qgroup)
    for parent in qgroup_parents(fd, qgroup):
        qgroup_assign(fd, qgroup, parent, assign=False)
        if qgroup_split(parent)[1] == subvol:
            with contextlib.suppress(OSError):
                qgroup_destroy_recursive(fd, parent)
    qgroup_create(fd, qgroup, create=False)


def auto_qgroup_path(path: str, insert_intermediary: bool) -> None:
    with opened(path) as fd:
        auto_qgroup(fd, insert_intermediary)


def auto_qgroup(fd: int, insert_intermediary: bool, subvol: int = 0) -> None:
    """Account a subvolume with its parent's qgroups; with *insert_intermediary*, also give it a
    higher-level qgroup of its own (level one below the parent's lowest, 255 if none) that
    holds its whole subtree. Nothing happens if it already belongs to a qgroup."""
    if not subvol:
        if not is_subvolume(fd):
            raise _fail(_NOT_BTRFS)
        subvol = subvolume_id(fd)
    if qgroup_parents(fd, subvol):
        return
    parent = subvolume_parent(fd, subvol)
    inherited = qgroup_parents(fd, parent) if parent is not None else []
    if not insert_intermediary:
        for qgroup in inherited:
            _tolerating_existing(qgroup_assign, fd, subvol, qgroup)
        return
    lowest = min([qgroup_split(q)[0] for q in inherited] + [256])
    if lowest <= 1:
        raise _fail(errno.EBUSY)
    own = ((lowest - 1) << BTRFS_QGROUP_LEVEL_SHIFT) | subvol
    created = _tolerating_existing(qgroup_create, fd, own)
    try:
        for qgroup in inherited:
            _tolerating_existing(qgroup_assign, fd, own, qgroup)
        _tolerating_existing(qgroup_assign, fd, subvol, own)
    except OSError:
        if created:
            with contextlib.suppress(OSError):
                qgroup_destroy_recursive(fd, own)
        raise


def _tolerating_existing(change: Callable[..., None], *args: int) -> bool:
    """*change*(*args*); False if what it makes exists already (EEXIST)."""
    try:
        change(*args)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise
        return False
    return True


def _copy_quota_hierarchy(fd: int, old_id: int, new_id: int) -> None:
    """Give a snapshot the qgroup layout of its origin (own subtree qgroup, or the parent's qgroups)."""
    old_parents = qgroup_parents(fd, old_id)
    if not old_parents:
        return
    origin_parent = subvolume_parent(fd, old_id)
    shared = set(qgroup_parents(fd, origin_parent)) if origin_parent is not None else set()
    intermediary = any(qgroup_split(q)[1] == old_id for q in old_parents)
    if intermediary or shared.intersection(old_parents):
        auto_qgroup(fd, intermediary, subvol=new_id)


def _copy_qgroup_limits(fd: int, old: int, new: int) -> bool:
    """Give qgroup *new* the limits of qgroup *old*; False if *old* has none."""
    for _, data in _qgroup_items(fd, old, BTRFS_QGROUP_LIMIT_KEY, BTRFS_QGROUP_LIMIT_KEY):
        flags, *limits = struct.unpack_from("<5Q", data)
        _retrying_busy(fd, BTRFS_IOC_QGROUP_LIMIT, struct.pack("6Q", new, flags & 0xF, *limits))
        return True
    return False


def _copy_subtree_limits(fd: int, old_id: int, new_id: int) -> None:
    _copy_qgroup_limits(fd, old_id, new_id)
    old_subtree, has_old = subtree_qgroup(fd, old_id)
    new_subtree, has_new = subtree_qgroup(fd, new_id)
    if has_old and has_new:
        _copy_qgroup_limits(fd, old_subtree, new_subtree)

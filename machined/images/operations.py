"""Operations that change images: remove, rename, clone, read-only, quota limits, clean the pool.

Each takes systemd-nspawn's locks itself and fails with an ``OSError`` (the bus
turns it into sd-bus's errno error) or a :class:`~machined.errors.BusError`, as
systemd-machined 252 does. They take an :class:`~machined.images.pool.Image` as
discovery made it and trust the new names they are given (the use cases in
:mod:`machined.images.service` check them). Which of them run in a worker child
is decided there too; ``*_in_child`` are their worker targets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
from typing import Any

from machined import errors, personality
from machined.errors import BusError
from machined.fs import attrs, btrfs
from machined.fs.copy import clone_tree, copy_file_atomic
from machined.fs.fds import opened
from machined.fs.libc import rename_noreplace
from machined.fs.remove import rm_rf
from machined.images import pool
from machined.images.lock import image_name_lock, image_path_lock
from machined.images.pool import Image


def _fail(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _refuse_vendor_and_host(img: Image) -> None:
    if img.is_vendor or img.is_host:
        raise _fail(errno.EROFS)


def remove(img: Image) -> None:
    """Remove an image and its ``.nspawn``/``.roothash`` companions (EBUSY while in use)."""
    _refuse_vendor_and_host(img)
    with image_path_lock(img.path, exclusive=True):
        if img.type == "subvolume":
            try:
                os.unlink(img.path)  # a symlink to the subvolume is enough to drop
            except OSError:
                btrfs.remove_subvolume(img.path)
        elif img.type == "directory":
            attrs.chattr(img.path, 0, attrs.FS_IMMUTABLE_FL, ignore_errors=True)
            rm_rf(img.path)
        elif img.type == "mstack":
            rm_rf(img.path)
        elif img.type == "raw" or (img.type == "block" and not pool.path_startswith(img.path, "/dev")):
            os.unlink(img.path)
        elif img.type != "block":
            raise _fail(errno.EOPNOTSUPP)
        for path, _ in _companions(img):
            with contextlib.suppress(OSError):
                os.unlink(path)


def rename(img: Image, new_name: str) -> Image:
    """Rename an image in its directory, companions included (EEXIST if the name is taken anywhere).
    Returns the image as renamed (a version of a versioned image stays in its ``.v`` directory,
    where it may no longer be found by its new name)."""
    _refuse_vendor_and_host(img)
    with image_path_lock(img.path, exclusive=True), image_name_lock(new_name):
        if pool.find(new_name) is not None:
            raise _fail(errno.EEXIST)
        new_path = _renamed_path(img, new_name)
        immutable = img.type == "directory" and attrs.file_attrs_at(img.path) & attrs.FS_IMMUTABLE_FL
        if immutable:  # an immutable directory cannot be renamed: lift the flag meanwhile
            attrs.chattr(img.path, 0, attrs.FS_IMMUTABLE_FL, ignore_errors=True)
        try:
            rename_noreplace(img.path, new_path)
        finally:
            if immutable:
                where = img.path if os.path.lexists(img.path) else new_path
                attrs.chattr(where, attrs.FS_IMMUTABLE_FL, attrs.FS_IMMUTABLE_FL, ignore_errors=True)
        for old, suffix in _companions(img):
            with contextlib.suppress(OSError):
                rename_noreplace(old, os.path.join(os.path.dirname(old), new_name + suffix))
    return dataclasses.replace(img, name=new_name, path=new_path)


def clone(img: Image, new_name: str, read_only: bool) -> None:
    """Copy an image into the pool as *new_name*: a btrfs snapshot where possible, else a copy."""
    with image_name_lock(new_name):
        if pool.find(new_name) is not None:
            raise _fail(errno.EEXIST)
        if img.is_tree:
            new_path = os.path.join(pool.POOL_PATH, new_name)
            clone_tree(img.path, new_path, read_only)
            with contextlib.suppress(OSError):
                btrfs.auto_qgroup_path(new_path, insert_intermediary=True)
        elif img.type == "raw":
            new_path = os.path.join(pool.POOL_PATH, f"{new_name}.raw")
            copy_file_atomic(img.path, new_path, 0o444 if read_only else 0o644, nocow=True, keep_crtime=True)
        else:
            raise _fail(errno.EOPNOTSUPP)
        for old, suffix in _companions(img):
            with contextlib.suppress(OSError):
                copy_file_atomic(old, os.path.join(os.path.dirname(old), new_name + suffix), 0o664)


def mark_read_only(img: Image, read_only: bool) -> None:
    """Make an image read-only or writable: subvolume flag, immutable directory, write bits, BLKROSET.
    262 refuses hidden images too (it always reports them read-only)."""
    _refuse_vendor_and_host(img)
    if img.is_hidden and personality.is_262():
        raise _fail(errno.EROFS)
    with image_path_lock(img.path, exclusive=True):
        if img.type == "subvolume":
            btrfs.set_subvolume_read_only(img.path, read_only)
        elif img.type == "directory":
            attrs.chattr(img.path, attrs.FS_IMMUTABLE_FL if read_only else 0, attrs.FS_IMMUTABLE_FL)
        elif img.type == "raw":
            mode = os.stat(img.path).st_mode
            os.chmod(img.path, (mode & 0o444) | (0 if read_only else 0o200))
            if read_only:
                btrfs.defragment(img.path)
        elif img.type == "block":
            attrs.set_block_device_read_only(img.path, read_only)
        else:
            raise _fail(errno.EOPNOTSUPP)


def set_limit(img: Image, limit: int) -> None:
    """Set a subvolume image's quota limit (its own qgroup and its subtree qgroup)."""
    _refuse_vendor_and_host(img)
    if img.type != "subvolume":
        raise _fail(errno.EOPNOTSUPP)
    with opened(img.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) as fd:
        btrfs.subtree_limit(fd, limit, add_subtree_qgroup=True)


def set_pool_limit(limit: int) -> None:
    """Set the quota limit of the whole pool, turning btrfs quota on first (NotSupported off btrfs)."""
    _setup_pool()
    try:
        with opened(pool.POOL_PATH, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW) as fd:
            btrfs.subtree_limit(fd, limit)
    except OSError as e:
        if e.errno == errno.ENOTTY:
            raise BusError(errors.NOT_SUPPORTED, "Quota is only supported on btrfs.") from None
        raise _named(e, "Failed to adjust quota limit") from None


def clean_pool(mode: str, v262: bool = False) -> list[list[Any]]:
    """Remove every image of the pool (``all``) or the hidden ones (``hidden``); busy ones are kept.

    Returns [name, exclusive usage] of each removed image; vendor and host images stay.
    (A worker target as it is: *v262* says which personality's discovery to use there.)
    """
    _personality(v262)
    removed: list[list[Any]] = []
    for img in pool.discover().values():
        if img.is_vendor or img.is_host or (mode == "hidden" and not img.is_hidden):
            continue
        try:
            remove(img)
        except OSError as e:
            if e.errno == errno.EBUSY:
                continue
            raise _named(e, f"Failed to remove image {img.name}") from None
        removed.append([img.name, img.usage_exclusive])
    return removed


# --- worker targets: the image arrives as its fields ---------------------------------


# (*v262*: a worker child is a fresh interpreter, told which personality's discovery to use)


def remove_in_child(image: dict[str, Any], v262: bool = False) -> None:
    _personality(v262)
    remove(Image(**image))


def clone_in_child(image: dict[str, Any], new_name: str, read_only: bool, v262: bool = False) -> None:
    _personality(v262)
    clone(Image(**image), new_name, read_only)


def _personality(v262: bool) -> None:
    if v262:
        personality.set_personality(personality.V262)


# --- helpers ---------------------------------------------------------------------------


def _named(e: OSError, what: str) -> BusError:
    code = e.errno or errno.EIO
    return BusError(errors.errno_error_name(code), f"{what}: {os.strerror(code)}")


def _companions(img: Image) -> list[tuple[str, str]]:
    """(path, suffix) of the settings and root-hash files that travel with an image (262: also
    the usr hash, verity data, their signatures and an OCI image's config beside it)."""
    found = [(p, ".nspawn") for p in img.settings_paths()]
    suffixes = pool.AUXILIARY_SUFFIXES_262 if personality.is_262() else (".roothash",)
    for suffix in suffixes:
        path = img.sibling(img.name + suffix)
        if all(path != known for known, _ in found):
            found.append((path, suffix))
    return found


def _renamed_path(img: Image, new_name: str) -> str:
    directory = os.path.dirname(img.path)
    if img.is_tree:
        return os.path.join(directory, new_name)
    if img.type == "block":
        if pool.path_startswith(img.path, "/dev"):
            raise _fail(errno.EROFS)  # device names belong to udev
        return os.path.join(directory, new_name)
    if img.type == "raw":
        return os.path.join(directory, f"{new_name}.raw")
    raise _fail(errno.EOPNOTSUPP)


def _setup_pool() -> None:
    """On btrfs, make the pool a subvolume with quota and its own subtree qgroup (best effort)."""
    if not _pool_on_btrfs():
        return
    with contextlib.suppress(OSError):
        btrfs.make_subvolume(pool.POOL_PATH)
    with contextlib.suppress(OSError), opened(pool.POOL_PATH, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW) as fd:
        btrfs.quota_enable(fd)
    with contextlib.suppress(OSError):
        btrfs.auto_qgroup_path(pool.POOL_PATH, insert_intermediary=True)


def _pool_on_btrfs() -> bool:
    """Whether the pool (or, while it does not exist, its parent) lives on btrfs."""
    try:
        try:
            return btrfs.is_btrfs_path(pool.POOL_PATH)
        except FileNotFoundError:
            return btrfs.is_btrfs_path(os.path.dirname(pool.POOL_PATH))
    except OSError as e:
        raise _named(e, f"Failed to determine whether {pool.POOL_PATH} is located on btrfs") from None

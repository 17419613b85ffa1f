"""Which machine images exist and what they are: the search path, discovery, lookup by name.

Discovery walks systemd's search path for machine images (first hit of a name
wins), recognises directories, btrfs subvolumes, ``NAME.raw`` files and block
devices, always adds the ``.host`` image, and reports each image's attributes
(read-only, creation/modification time, usage and limit) as systemd-machined
252 computes them. Under 262 it also knows what 262's discovery adds: ``NAME.mstack``
directories (type ``mstack``), versioned ``NAME.v``/``NAME.raw.v``/``NAME.mstack.v``
directories (the version :mod:`machined.images.vpick` picks, called NAME), and it reports
paths with symlinks resolved. The rule for image names lives here, once. Everything here
is synchronous and may block: callers keep it off the event loop.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from collections.abc import Iterator
from typing import Any

from machined import personality
from machined.fs import attrs, btrfs, libc
from machined.fs.fds import opened
from machined.images import mstack, vpick
from machined.naming import image_object_path

UINT64_MAX = 2**64 - 1
NAME_MAX = 255
HOST_IMAGE = ".host"
POOL_PATH = "/var/lib/machines"

SEARCH_PATH: tuple[str, ...] = (
    "/etc/machines",
    "/run/machines",
    "/var/lib/machines",
    "/var/lib/container",
    "/usr/local/lib/machines",
    "/usr/lib/machines",
)

NSPAWN_SETTINGS_DIRS = ("/etc/systemd/nspawn", "/run/systemd/nspawn")
NSPAWN_VENDOR_SETTINGS_DIR = "/usr/lib/systemd/nspawn"  # 262's system instance looks here too
# Files beside an image that follow it (rename, clone, remove): 252 knows one, 262 these.
AUXILIARY_SUFFIXES_262 = (".nspawn", ".oci-config", ".roothash", ".roothash.p7s", ".usrhash", ".usrhash.p7s", ".verity")

# The per-user instance's search path (pool second), no ``.host`` image: set by the daemon
# through the environment, so that its worker children (a fresh interpreter) see it too.
USER_SEARCH_PATH_ENV = "MACHINED_USER_IMAGE_PATH"
INCLUDE_HOST = True


def use_user_search_path(search_path: tuple[str, ...], pool_path: str) -> None:
    """Look for images where a user's instance does (262): *search_path*, the pool *pool_path*."""
    global SEARCH_PATH, POOL_PATH, INCLUDE_HOST
    SEARCH_PATH, POOL_PATH, INCLUDE_HOST = tuple(search_path), pool_path, False
    os.environ[USER_SEARCH_PATH_ENV] = ":".join([pool_path, *search_path])


if os.environ.get(USER_SEARCH_PATH_ENV):
    _pool, *_search = os.environ[USER_SEARCH_PATH_ENV].split(":")
    SEARCH_PATH, POOL_PATH, INCLUDE_HOST = tuple(_search), _pool, False


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


def path_startswith(path: str, prefix: str) -> bool:
    """Whether *path* is *prefix* or below it, component by component."""
    parts = [p for p in path.split("/") if p]
    want = [p for p in prefix.split("/") if p]
    return parts[: len(want)] == want


# --- the image ---------------------------------------------------------------


@dataclasses.dataclass
class Image:
    """One discovered image and its attributes (times in µs, sizes in bytes)."""

    name: str
    path: str
    type: str  # directory, subvolume, raw, block, mstack (262)
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
    def shown_read_only(self) -> bool:
        """Read-only as clients are told (ListImages, ReadOnly, varlink List): 262 reports every
        hidden image (``.host`` included) read-only, whatever its files are; 252 the files' state."""
        return self.read_only or (personality.is_262() and self.is_hidden)

    @property
    def is_tree(self) -> bool:
        """A directory or subvolume (its files are readable as they are), not a disk image."""
        return self.type in ("directory", "subvolume")

    @property
    def object_path(self) -> str:
        return image_object_path(self.name)

    def fields(self) -> dict[str, Any]:
        """The image as JSON can carry it into a worker child (``Image(**fields)`` there)."""
        return dataclasses.asdict(self)

    def settings_paths(self) -> list[str]:
        """The ``NAME.nspawn`` files that belong to the image (they follow it around)."""
        fn = f"{self.name}.nspawn"
        dirs = list(NSPAWN_SETTINGS_DIRS)
        if personality.is_262() and INCLUDE_HOST:
            dirs.append(NSPAWN_VENDOR_SETTINGS_DIR)
        return [os.path.join(d, fn) for d in dirs] + [self.sibling(fn)]

    def sibling(self, filename: str) -> str:
        """*filename* in the directory holding the image (``NAME.roothash``...)."""
        return os.path.join(os.path.dirname(self.path), filename)


# --- discovery ---------------------------------------------------------------


def discover() -> dict[str, Image]:
    """Every image of the search path by name, ``.host`` included."""
    if personality.is_262():
        return _discover_262()
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
    if HOST_IMAGE not in found and INCLUDE_HOST:
        found[HOST_IMAGE] = host_image()
    return found


def find(name: str) -> Image | None:
    """The image called *name*, as the first directory of the search path holding it has it
    (None for a name that is no image name, as upstream's ``image_find()``)."""
    if not image_name_is_valid(name):
        return None
    if personality.is_262():
        return _find_262(name)
    for directory in _search_dirs():
        located = _locate(directory, name)
        if located is None:
            continue
        image = _make(name, directory, *located)
        if image is not None:
            return image
    return host_image() if name == HOST_IMAGE and INCLUDE_HOST else None


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
    read_only = (directory is not None and path_startswith(directory, "/usr")) or libc.on_read_only_fs(path)
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


def _make_directory(name: str, path: str, st: os.stat_result, read_only: bool) -> Image:
    with opened(path) as fd:
        if st.st_ino == btrfs.BTRFS_FIRST_FREE_OBJECTID and btrfs.is_btrfs(fd):
            info = btrfs.subvolume_info(fd)
            image = Image(name, path, "subvolume", info.read_only or read_only, crtime=info.otime)
            if not (image.is_vendor or image.is_host):
                _update_quota(image, fd)
            return image
        immutable = bool(attrs.file_attrs(fd) & attrs.FS_IMMUTABLE_FL)
        # The mtime of the top directory says nothing about the tree: upstream reports 0.
        return Image(name, path, "directory", read_only or immutable, crtime=attrs.crtime(fd))


def _make_mstack(name: str, path: str, read_only: bool) -> Image:
    """A stack of layers (262): read-only if it has no writable part or makes no sense."""
    return Image(name, path, "mstack", read_only or mstack.is_read_only(path), crtime=attrs.crtime(path))


def _make_raw(name: str, path: str, st: os.stat_result, read_only: bool) -> Image:
    created = attrs.crtime(path)
    used = st.st_blocks * 512
    return Image(
        name, path, "raw", not (st.st_mode & 0o222) or read_only,
        crtime=created, mtime=st.st_mtime_ns // 1000,
        usage=used, usage_exclusive=used, limit=st.st_size, limit_exclusive=st.st_size,
    )  # fmt: skip


def _make_block(name: str, path: str, st: os.stat_result, read_only: bool) -> Image:
    info = attrs.block_device_info(path)
    size = UINT64_MAX
    if info is not None:
        device_read_only, size = info
        read_only = read_only or device_read_only
    image = Image(name, path, "block", not (st.st_mode & 0o222) or read_only)
    if size not in (0, UINT64_MAX):
        image.usage = image.usage_exclusive = image.limit = image.limit_exclusive = size
    return image


# --- discovery as 262 does it ------------------------------------------------


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None  # vanished, or a dangling symlink: no image


def _versioned(directory: str, filename: str, name: str, suffix: str) -> tuple[str, os.stat_result] | None:
    """The version of versioned image *name* (``NAME{suffix}.v``) to use: its resolved path and stat."""
    types = vpick.RAW if suffix.endswith(".raw") else vpick.DIRECTORY
    try:
        picked = vpick.pick(os.path.join(directory, filename), name, suffix, types)
    except OSError:
        return None
    return None if picked is None else (os.path.realpath(picked[0]), picked[1])


def _entry_262(directory: str, filename: str) -> tuple[str, str, os.stat_result] | None:
    """(name, resolved path, stat) of the image a search directory's entry stands for, or None."""
    path = os.path.join(directory, filename)
    st = _stat(path)
    if st is None:
        return None
    if stat.S_ISREG(st.st_mode):
        name = filename[: -len(".raw")] if filename.endswith(".raw") else ""
    elif stat.S_ISDIR(st.st_mode) and filename.endswith(".v"):
        stem = filename[: -len(".v")]
        suffix = next((s for s in (".raw", ".mstack") if stem.endswith(s)), "")
        name = stem[: len(stem) - len(suffix)]
        if not image_name_is_valid(name):
            return None
        picked = _versioned(directory, filename, name, suffix)
        return None if picked is None else (name, *picked)
    elif stat.S_ISDIR(st.st_mode):
        name = filename[: -len(".mstack")] if filename.endswith(".mstack") else filename
    elif stat.S_ISBLK(st.st_mode):
        name = filename
    else:
        return None
    if not image_name_is_valid(name):
        return None
    return name, os.path.realpath(path), st


def _discover_262() -> dict[str, Image]:
    found: dict[str, Image] = {}
    for directory in _search_dirs():
        for entry in os.scandir(directory):
            located = _entry_262(directory, entry.name)
            if located is None or located[0] in found:
                continue
            name, path, st = located
            image = _make_262(name, path, st)
            if image is not None:
                found[name] = image
    if HOST_IMAGE not in found and INCLUDE_HOST:
        found[HOST_IMAGE] = host_image()
    return found


def _find_262(name: str) -> Image | None:
    """Image *name* as 262 looks it up: in each directory of the search path ``NAME``, ``NAME.raw``,
    ``NAME.mstack``, then the versioned ``NAME.v``, ``NAME.raw.v``, ``NAME.mstack.v``."""
    candidates = [name + fmt + v for v in ("", ".v") for fmt in ("", ".raw", ".mstack")]
    for directory in _search_dirs():
        for filename in candidates:
            st = _stat(os.path.join(directory, filename))
            if st is None:
                continue
            if filename.endswith(".raw"):
                if not stat.S_ISREG(st.st_mode):
                    continue
            elif filename.endswith(".mstack"):
                if not stat.S_ISDIR(st.st_mode):
                    continue
            elif filename.endswith(".v"):
                if not stat.S_ISDIR(st.st_mode) or filename == name:
                    continue  # (a name that itself ends in .v makes systemd-machined 262 abort)
                picked = _versioned(directory, filename, name, filename[len(name) : -len(".v")])
                if picked is None:
                    continue
                path, st = picked
                image = _make_262(name, path, st)
                if image is not None:
                    return image
                continue
            elif not (stat.S_ISDIR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                continue
            image = _make_262(name, os.path.realpath(os.path.join(directory, filename)), st)
            if image is not None:
                return image
    return host_image() if name == HOST_IMAGE and INCLUDE_HOST else None


def _make_262(name: str, path: str, st: os.stat_result) -> Image | None:
    """The image at the resolved *path*: its type follows from what it is and how it ends."""
    read_only = path_startswith(path, "/usr") or libc.on_read_only_fs(path)
    try:
        if stat.S_ISDIR(st.st_mode):
            if path.endswith(".mstack"):
                return _make_mstack(name, path, read_only)
            return _make_directory(name, path, st, read_only)
        if stat.S_ISREG(st.st_mode) and path.endswith(".raw"):
            return _make_raw(name, path, st, read_only)
        if stat.S_ISBLK(st.st_mode):
            return _make_block(name, path, st, read_only)
    except FileNotFoundError:
        return None
    return None


def _update_quota(image: Image, fd: int) -> None:
    """Usage and limits of a subvolume image from its subtree qgroup, if quota is on and settled."""
    try:
        if btrfs.quota_rescan_ongoing(fd):
            return
        quota = btrfs.subtree_quota(fd)
    except OSError:
        return
    image.usage, image.usage_exclusive = quota.referenced, quota.exclusive
    image.limit, image.limit_exclusive = quota.referenced_max, quota.exclusive_max


def pool_quota(pool_path: str) -> tuple[int, int]:
    """(bytes referenced, quota limit) of the pool, each UINT64_MAX if unknown or none (btrfs quota)."""
    quota = btrfs.subtree_quota_path(pool_path)
    return quota.referenced, quota.referenced_max

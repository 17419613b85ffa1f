"""The locks systemd-nspawn takes on images, taken the same way, so that neither side changes
an image the other uses: ``.#NAME.lck`` beside the image, ``inode-DEV:INO`` (or
``block-MAJ:MIN``) and ``name-NAME`` in /run/systemd/nspawn/locks; open file
description locks (BSD locks where those are missing), never waited for (EBUSY).
``$SYSTEMD_NSPAWN_LOCK=0`` turns locking off, as for nspawn.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator

from machined.images.pool import HOST_IMAGE, NAME_MAX, image_name_is_valid, path_startswith

# A user's instance (262) locks in $XDG_RUNTIME_DIR/systemd/nspawn/locks: set by the daemon
# through the environment, so that its worker children see it too.
USER_LOCK_DIR_ENV = "MACHINED_USER_LOCK_DIR"
LOCK_DIR = os.environ.get(USER_LOCK_DIR_ENV) or "/run/systemd/nspawn/locks"
_F_OFD_SETLK = 37
_FLOCK = "hhqqi4x"  # struct flock: l_type, l_whence, l_start, l_len, l_pid


class LockFile:
    """A lock on a file, released by :meth:`release` (which removes the file when it may)."""

    def __init__(self, path: str, fd: int, exclusive: bool) -> None:
        self.path, self.fd, self.exclusive = path, fd, exclusive

    @classmethod
    def acquire(cls, path: str, exclusive: bool) -> LockFile:
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


def use_user_lock_dir(path: str) -> None:
    global LOCK_DIR
    LOCK_DIR = path
    os.environ[USER_LOCK_DIR_ENV] = path


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

"""Copying files into and out of a container, and bind mounting host paths into it.

These functions run in a worker child (:mod:`machined.worker`): they join the
container's mount namespace, which must never happen in the daemon itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import tempfile

from machined.errors import BusError, errno_error_name
from machined.nsprobe import CLONE_NEWNS, setns

_libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_SLAVE = 1 << 19
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8
AT_FDCWD = -100
MOVE_MOUNT_F_SYMLINKS = 0x01
MOVE_MOUNT_T_EMPTY_PATH = 0x40
SYS_move_mount = 429  # the same number on every architecture (new syscalls are unified)


def _move_mount(*args: object) -> int:
    if hasattr(_libc, "move_mount"):  # glibc 2.36+
        return _libc.move_mount(*args)
    return _libc.syscall(SYS_move_mount, *args)


# ----- copying ----------------------------------------------------------------------------


class _Copier:
    """Recursive copy between two directory fds: merges into existing directories,
    keeps hard links, symlinks, modes, times and (optionally overridden) ownership."""

    def __init__(self, dst_root: int, uid: int | None, gid: int | None) -> None:
        self.dst_root = dst_root
        self.uid = uid
        self.gid = gid
        self.links: dict[tuple[int, int], str] = {}

    def copy(self, src_dir: int, src_name: str, dst_dir: int, dst_name: str, rel: str) -> None:
        st = os.stat(src_name, dir_fd=src_dir, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            self._copy_dir(src_dir, src_name, dst_dir, dst_name, st, rel)
            return
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self.links:
            os.link(self.links[key], dst_name, src_dir_fd=self.dst_root, dst_dir_fd=dst_dir, follow_symlinks=False)
            return
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src_name, dir_fd=src_dir), dst_name, dir_fd=dst_dir)
        elif stat.S_ISREG(st.st_mode):
            self._copy_file(src_dir, src_name, dst_dir, dst_name, st)
        elif stat.S_ISFIFO(st.st_mode):
            os.mkfifo(dst_name, st.st_mode & 0o7777, dir_fd=dst_dir)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISSOCK(st.st_mode):
            os.mknod(dst_name, st.st_mode, st.st_rdev, dir_fd=dst_dir)
        else:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        self._attributes(dst_dir, dst_name, st)
        if st.st_nlink > 1:
            self.links[key] = rel

    def _copy_file(self, src_dir: int, src_name: str, dst_dir: int, dst_name: str, st: os.stat_result) -> None:
        src = os.open(src_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
        try:
            dst = os.open(dst_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dst_dir)
            try:
                _copy_data(src, dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    def _copy_dir(self, src_dir: int, src_name: str, dst_dir: int, dst_name: str, st: os.stat_result,
                  rel: str) -> None:  # fmt: skip
        try:
            os.mkdir(dst_name, 0o700, dir_fd=dst_dir)
            created = True
        except FileExistsError:
            existing = os.stat(dst_name, dir_fd=dst_dir, follow_symlinks=False)
            if not stat.S_ISDIR(existing.st_mode):
                raise
            created = False  # merge into the existing directory
        sfd = os.open(src_name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
        dfd = os.open(dst_name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dst_dir)
        try:
            for entry in sorted(os.listdir(sfd)):
                try:
                    self.copy(sfd, entry, dfd, entry, f"{rel}/{entry}")
                except FileExistsError:
                    pass  # merging: what is already there stays, as upstream's COPY_MERGE does
        finally:
            os.close(sfd)
            os.close(dfd)
        if created:
            self._attributes(dst_dir, dst_name, st)

    def _attributes(self, dst_dir: int, name: str, st: os.stat_result) -> None:
        uid = st.st_uid if self.uid is None else self.uid
        gid = st.st_gid if self.gid is None else self.gid
        os.chown(name, uid, gid, dir_fd=dst_dir, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dst_dir)
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_dir, follow_symlinks=False)


def _copy_data(src: int, dst: int) -> None:
    """All of *src* into *dst*: in-kernel when the file systems allow, else through a buffer."""
    try:
        while os.copy_file_range(src, dst, 1 << 30):
            pass
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    while chunk := os.read(src, 1 << 20):
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view):]


def _open_parent(path: str) -> tuple[int, str]:
    parent, name = os.path.split(path.rstrip("/"))
    if not name:
        raise OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))
    return os.open(parent or "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), name


def _copy_tree(src_dir: int, src_name: str, dst_dir: int, dst_name: str, uid: int | None, gid: int | None,
               replace: bool) -> None:  # fmt: skip
    src_st = os.stat(src_name, dir_fd=src_dir, follow_symlinks=False)
    try:
        dst_st = os.stat(dst_name, dir_fd=dst_dir, follow_symlinks=False)
    except FileNotFoundError:
        dst_st = None
    copier = _Copier(dst_dir, uid, gid)
    if dst_st is not None and replace and not (stat.S_ISDIR(src_st.st_mode) and stat.S_ISDIR(dst_st.st_mode)):
        # Replace: build the copy under a temporary name, then rename it over the destination.
        tmp = f".#{dst_name}{os.urandom(8).hex()}"
        copier.copy(src_dir, src_name, dst_dir, tmp, tmp)
        os.rename(tmp, dst_name, src_dir_fd=dst_dir, dst_dir_fd=dst_dir)
        return
    copier.copy(src_dir, src_name, dst_dir, dst_name, dst_name)


def copy(leader: int, copy_from: bool, host_path: str, container_path: str, uid_shift: int,
         replace: bool) -> None:  # fmt: skip
    """Copy *container_path* to *host_path* (copy_from) or the other way round."""
    try:
        host_dir, host_name = _open_parent(host_path)
    except OSError as e:
        raise BusError(errno_error_name(e.errno or errno.EIO),
                       f"Failed to open host directory {host_path}: {os.strerror(e.errno or errno.EIO)}") from None  # fmt: skip
    setns(f"/proc/{leader}/ns/mnt", CLONE_NEWNS)
    container_dir, container_name = _open_parent(container_path)
    if copy_from:
        owner = None if uid_shift == 0 else 0
        _copy_tree(container_dir, container_name, host_dir, host_name, owner, owner, replace)
    else:
        owner = None if uid_shift == 0 else uid_shift
        _copy_tree(host_dir, host_name, container_dir, container_name, owner, owner, replace)


# ----- bind mounts ------------------------------------------------------------------------


def _mount(source: str | None, target: str, flags: int) -> None:
    if _libc.mount(source.encode() if source else None, target.encode(), None, flags, None) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _move_mount_onto_fd(source: str, target_fd: int) -> None:
    """mount(source, target, MS_MOVE) onto the file *target_fd* was opened on (O_PATH).

    move_mount() with an empty target path: upstream mounts onto /proc/self/fd/N, but this
    process is outside the container's PID namespace, where /proc/self does not resolve.
    """
    if _move_mount(AT_FDCWD, source.encode(), target_fd, b"", MOVE_MOUNT_F_SYMLINKS | MOVE_MOUNT_T_EMPTY_PATH) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _umount(target: str) -> None:
    _libc.umount2(target.encode(), MNT_DETACH | UMOUNT_NOFOLLOW)


def _make_mount_point(path: str, is_dir: bool) -> None:
    if is_dir:
        os.mkdir(path, 0o700)
    else:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))


def _remove_mount_point(path: str, is_dir: bool) -> None:
    try:
        os.rmdir(path) if is_dir else os.unlink(path)
    except OSError:
        pass


def bind_mount(leader: int, name: str, source: str, destination: str, read_only: bool, mkdir: bool) -> None:
    """Bind *source* (host) onto *destination* in the container, through nspawn's propagation directory.

    The new mount is prepared in a private playground, moved into
    ``/run/systemd/nspawn/propagate/NAME`` (a shared mount that shows up as
    ``/run/host/incoming`` inside), and from there moved onto the destination
    inside the container's mount namespace.
    """
    if os.stat(f"/proc/{leader}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    propagate = f"/run/systemd/nspawn/propagate/{name}"
    if not os.path.isdir(propagate + "/"):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
    real_source = os.path.realpath(source, strict=True)
    is_dir = stat.S_ISDIR(os.stat(real_source).st_mode)

    playground = tempfile.mkdtemp(prefix="propagate.", dir="/tmp")
    outside = None
    try:
        _mount(playground, playground, MS_BIND)
        try:
            _mount(None, playground, MS_SLAVE)
            staged = os.path.join(playground, "mount")
            _make_mount_point(staged, is_dir)
            _mount(real_source, staged, MS_BIND)
            if read_only:
                _mount(None, staged, MS_BIND | MS_REMOUNT | MS_RDONLY)
            outside = tempfile.mkdtemp(dir=propagate) if is_dir else tempfile.mkstemp(dir=propagate)[1]
            _mount(staged, outside, MS_MOVE)
            _remove_mount_point(staged, is_dir)
        finally:
            _umount(playground)
        _move_into_container(leader, os.path.basename(outside), destination, is_dir, mkdir)
    finally:
        if outside is not None:
            _umount(outside)
            _remove_mount_point(outside, is_dir)
        try:
            os.rmdir(playground)
        except OSError:
            pass


def _move_into_container(leader: int, entry: str, destination: str, is_dir: bool, mkdir: bool) -> None:
    """In a child that joins the container's mount namespace: move the incoming mount in place."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(read_end)
            setns(f"/proc/{leader}/ns/mnt", CLONE_NEWNS)
            if mkdir:
                # As upstream: best effort, whatever is in the way stays and the move decides.
                with contextlib.suppress(OSError):
                    os.makedirs(os.path.dirname(destination), 0o755, exist_ok=True)
                with contextlib.suppress(OSError):
                    if is_dir:
                        os.mkdir(destination, 0o700)
                    else:
                        os.mknod(destination, stat.S_IFREG | 0o600)
            # Onto the destination itself, never where a symlink there points (upstream's
            # mount_nofollow(): a symlink, dangling or not, gets EINVAL for a directory).
            target = os.open(destination, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            _move_mount_onto_fd(f"/run/host/incoming/{entry}", target)
        except OSError as e:
            code = e.errno or errno.EIO
        os.write(write_end, code.to_bytes(4, "little"))
        os._exit(0)
    os.close(write_end)
    data = os.read(read_end, 4)
    os.close(read_end)
    os.waitpid(pid, 0)
    code = int.from_bytes(data, "little") if len(data) == 4 else errno.EIO
    if code:
        raise OSError(code, os.strerror(code))

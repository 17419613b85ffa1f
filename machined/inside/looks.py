"""Looking inside a container: addresses, OS release, the root directory, the UID shift; a PTY.

The looks start no process. Each is read by the daemon itself, through the leader its
machine pinned at registration (its pidfd), without ever entering the container's mount
namespace:

- OS release: the leader's root, ``/proc/LEADER/root``, opened as a directory fd (an
  ``O_PATH`` open, which asks no file system anything) and proven to be the pinned
  leader's by checking its pidfd after the open; ``etc/os-release``, else
  ``usr/lib/os-release``, opened from it with ``openat2()`` and ``RESOLVE_IN_ROOT |
  RESOLVE_NO_MAGICLINKS`` (every symlink and ``..`` stays inside the container's root, no
  /proc magic link leads out), first as ``O_PATH``: only a regular file is then opened for
  reading (through our own /proc/self/fd, ``O_NONBLOCK``), never a FIFO or a device, and
  only :data:`OS_RELEASE_MAX` bytes of it are read;
- addresses: a short-lived thread joins only the leader's network namespace (``setns()`` on
  its pidfd, which one thread of a threaded process may do), creates a NETLINK_ROUTE socket
  there, and goes back; the socket stays in the container's namespace, and the daemon dumps
  the addresses on it (:func:`machined.inside.addresses.read_addresses`). ``.host``'s are dumped on
  a socket of the daemon's own namespace;
- the root directory (OpenMachineRootDirectory): ``/proc/LEADER/root`` opened as a directory
  (as upstream's child opens ``/`` inside: read-only), checked after opening as above;
- the UID shift: ``/proc/LEADER/{uid,gid}_map``.

Whatever may block (a FUSE file whose server is stopped, a hung file system) runs in one
of a few threads under a deadline (:mod:`machined.inside.lookthreads`): only its caller gets an
error, never the event loop and never another caller. Only a PTY needs the container's
devpts from inside: it is opened by a child (:func:`machined.inside.nsprobe.open_pty`) started
for it, as login, shell, copies and binds are (:mod:`machined.inside.access`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from machined import personality
from machined.envfile import parse_env_file
from machined.errors import FAILED, BusError
from machined.fs import libc
from machined.inside.addresses import Address, netlink_socket, read_addresses
from machined.inside.lookthreads import threads
from machined.machine import Machine
from machined.process import start_time

PROBE_TIMEOUT = 10.0
OS_RELEASE_MAX = 4 << 20  # bytes of an os-release file read at most (upstream reads any size)
OS_RELEASE_PATHS = ("etc/os-release", "usr/lib/os-release")

CONFINED = libc.RESOLVE_IN_ROOT | libc.RESOLVE_NO_MAGICLINKS  # how paths inside a container's root are resolved

_T = TypeVar("_T")

__all__ = [
    "PROBE_TIMEOUT", "container_addresses", "container_os_release", "host_addresses", "leader_pidfd", "open_pty",
    "open_root_directory", "same_netns", "uid_shift",
]  # fmt: skip


def same_netns(leader: int) -> bool:
    """Whether *leader* shares our network namespace (no private networking)."""
    try:
        return os.stat(f"/proc/{leader}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except FileNotFoundError:
        raise BusError.from_errno(errno.ESRCH) from None


@contextlib.contextmanager
def leader_pidfd(machine: Machine) -> Iterator[int]:
    """A pidfd of the machine's pinned leader, for the duration of a call into its namespaces.

    The one taken at registration if there is one; else (no pidfd could be had then) a
    new one, if the PID still names the process pinned by start time.
    """
    ref = machine.leader_ref
    if ref is not None and ref.pidfd is not None:
        yield ref.pidfd  # copied by whoever keeps it past an await; the machine keeps its own
        return
    if ref is None or ref.start_time is None:
        raise BusError.from_errno(errno.ESRCH)
    try:
        fd = os.pidfd_open(machine.leader)
    except OSError:
        raise BusError.from_errno(errno.ESRCH) from None
    try:
        if start_time(machine.leader) != ref.start_time:
            raise BusError.from_errno(errno.ESRCH)
        yield fd
    finally:
        os.close(fd)


def pidfd_pid(pidfd: int) -> int:
    """The PID *pidfd* names (in our PID namespace); -1 once its process was reaped."""
    with open(f"/proc/self/fdinfo/{pidfd}", "rb") as f:
        for line in f:
            if line.startswith(b"Pid:"):
                return int(line.split()[1])
    raise OSError(errno.EBADF, "not a pidfd")


def _leader_key(machine: Machine) -> tuple[int, int | None, int]:
    """What names the pinned leader (not a later process with its PID) in keys of looks."""
    ref = machine.leader_ref
    return (machine.leader, ref.start_time if ref is not None else None, ref.pidfd_id if ref is not None else 0)


def _open_root(leader: int, pidfd: int, flags: int) -> int:
    """``/proc/LEADER/root`` opened with *flags*, proven to be the pinned leader's: a PID is not
    reused before its process was reaped, and a reaped process's pidfd names no PID."""
    try:
        fd = os.open(f"/proc/{leader}/root", flags | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        raise BusError.from_errno(errno.ESRCH) from None
    try:
        if pidfd_pid(pidfd) != leader:
            raise BusError.from_errno(errno.ESRCH)
    except BaseException:
        os.close(fd)
        raise
    return fd


_Look = Callable[[int, int], _T]  # given the leader's PID and a pidfd of it


async def _in_thread(machine: Machine, what: str, look: _Look[_T], timeout: float,
                     orphan: Callable[[_T], None] | None = None) -> _T:  # fmt: skip
    """*look* run in a look thread (or the same look in flight joined), with its own copy of
    the leader's pidfd: the machine may be gone, and its pidfd closed, before the look ends."""
    leader = machine.leader

    def start() -> tuple[Callable[[], _T], Callable[[], None]]:
        with leader_pidfd(machine) as fd:
            pidfd = os.dup(fd)
        return (lambda: look(leader, pidfd)), (lambda: os.close(pidfd))

    return await threads.run((what, _leader_key(machine)), start, timeout, orphan)


# ----- OS release --------------------------------------------------------------------------


def _os_release_failed(code: int) -> BusError:
    """What upstream answers when its child could not read os-release: 252 "Child died
    abnormally." for what it could not open (a directory, a device: its child fails; a FIFO
    blocks it, and the whole daemon, for ever), 262 the error by name."""
    if personality.is_262():
        if code in (errno.EISDIR, errno.ENXIO, errno.EINVAL, errno.EBADFD):
            code = errno.ESHUTDOWN  # its child is gone before it wrote: the pipe says so
        return BusError.from_errno(code, f"Failed to get OS release: {os.strerror(code)}")
    if code in (errno.EBADMSG, errno.EFBIG):  # what 252's daemon finds parsing what its child sent
        return BusError.from_errno(code)
    return BusError(FAILED, "Child died abnormally.")


SYMLINKS_MAX = 32  # symlinks followed in one path, as the kernel's limit (then ELOOP)
_openat2 = [True]  # whether openat2() is there (a seccomp filter that predates it says ENOSYS)


def open_confined(root: int, path: str) -> int:
    """An ``O_PATH`` fd of *path* resolved inside the directory *root*, as a process chrooted
    there would resolve it: every symlink and ``..`` stays inside, no /proc magic link leads out.

    With ``openat2()`` and ``RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`` where the kernel (and
    the service's seccomp filter: systemd 252's answers ENOSYS) allows it; else component by
    component, each opened ``O_PATH | O_NOFOLLOW`` from the one before, symlinks read and
    resolved in turn, ``..`` going back to the directory walked through (never opened: it
    cannot lead above *root*, whatever is renamed meanwhile).
    """
    if _openat2[0]:
        try:
            return libc.openat2(root, path, os.O_PATH, CONFINED)
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
            _openat2[0] = False
    return _walk(root, path)


def _walk(root: int, path: str) -> int:
    stack: list[int] = []  # fds of the directories below root walked through, innermost last
    todo = [p for p in path.split("/") if p not in ("", ".")]
    todo.reverse()
    links = 0
    try:
        while todo:
            name = todo.pop()
            if name == "..":
                if stack:
                    os.close(stack.pop())
                continue
            here = stack[-1] if stack else root
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=here)
            if not stat.S_ISLNK(os.fstat(fd).st_mode):
                if todo and not stat.S_ISDIR(os.fstat(fd).st_mode):
                    os.close(fd)
                    raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
                stack.append(fd)
                continue
            links += 1
            try:
                target = os.readlink("", dir_fd=fd)  # readlinkat(fd, ""): the text of the link fd is
            finally:
                os.close(fd)
            if links > SYMLINKS_MAX:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
            if target.startswith("/"):
                for d in stack:
                    os.close(d)
                stack = []
            todo.extend(reversed([p for p in target.split("/") if p not in ("", ".")]))
        if not stack:
            return os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root)
        return stack.pop()
    finally:
        for d in stack:
            os.close(d)


def read_os_release_at(root: int) -> dict[str, str]:
    """The os-release of the tree whose root is the directory fd *root* (blocking: in a thread)."""
    for path in OS_RELEASE_PATHS:
        try:
            pinned = open_confined(root, path)
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            continue  # a file where a directory on the way should be: no such file, as upstream sees it
        except OSError as e:
            raise _os_release_failed(e.errno or errno.EIO) from None
        try:
            st = os.fstat(pinned)
            if not stat.S_ISREG(st.st_mode):
                raise _os_release_failed(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.ENXIO)
            # Reopened through our own /proc (not the path again, which may have changed meanwhile).
            fd = os.open(f"/proc/self/fd/{pinned}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as e:
            raise _os_release_failed(e.errno or errno.EIO) from None
        finally:
            os.close(pinned)
        try:
            data = _read_capped(fd)
        finally:
            os.close(fd)
        if b"\0" in data:
            raise _os_release_failed(errno.EBADMSG)
        return parse_env_file(data.decode("utf-8", errors="replace"))
    raise FileNotFoundError(errno.ENOENT, "Machine does not contain OS release information")


def _read_capped(fd: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = os.read(fd, min(1 << 16, OS_RELEASE_MAX + 1 - size))
        except BlockingIOError:
            raise _os_release_failed(errno.EAGAIN) from None
        except OSError as e:
            raise _os_release_failed(e.errno or errno.EIO) from None
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > OS_RELEASE_MAX:
            data = b"".join(chunks)
            # what upstream stops at first, if it is there: a NUL byte; else too big for us
            raise _os_release_failed(errno.EBADMSG if b"\0" in data else errno.EFBIG)


def _os_release_of(leader: int, pidfd: int) -> dict[str, str]:
    root = _open_root(leader, pidfd, os.O_PATH)
    try:
        return read_os_release_at(root)
    finally:
        os.close(root)


async def container_os_release(machine: Machine, timeout: float = PROBE_TIMEOUT) -> dict[str, str]:
    """The container's os-release; FileNotFoundError if it has none."""
    return await _in_thread(machine, "os-release", _os_release_of, timeout)


# ----- addresses ---------------------------------------------------------------------------


def _netlink_socket_in(pidfd: int) -> socket.socket:
    """A NETLINK_ROUTE socket created in the network namespace of the process *pidfd* pins, by a
    thread of its own that joins that namespace only, creates the socket and leaves; if it cannot
    go back, it ends there with the thread (which ran nothing else)."""
    box: list[socket.socket | OSError] = []

    def enter() -> None:
        host = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                libc.setns(pidfd, libc.CLONE_NEWNET)
                box.append(netlink_socket())
            except OSError as e:
                box.append(e)
            finally:
                libc.setns(host, libc.CLONE_NEWNET)  # a failure ends this thread, which is all it taints
        finally:
            os.close(host)

    thread = threading.Thread(target=enter, name="machined-netns", daemon=True)
    thread.start()
    thread.join()
    if not box:
        raise OSError(errno.EIO, "could not join the network namespace")
    if isinstance(box[0], OSError):
        if box[0].errno == errno.ESRCH:  # the leader exited
            raise BusError.from_errno(errno.ESRCH)
        raise box[0]
    return box[0]


def _addresses_of(leader: int, pidfd: int) -> list[Address]:
    with _netlink_socket_in(pidfd) as sock:
        return read_addresses(sock, PROBE_TIMEOUT)


async def container_addresses(machine: Machine, timeout: float = PROBE_TIMEOUT) -> list[Address]:
    return await _in_thread(machine, "addresses", _addresses_of, timeout)


async def host_addresses(timeout: float = PROBE_TIMEOUT) -> list[Address]:
    """``.host``'s addresses: those of the daemon's own network namespace."""
    return await threads.run(("addresses", ".host"), lambda: (lambda: read_addresses(None, PROBE_TIMEOUT), _nothing),
                             timeout)  # fmt: skip


def _nothing() -> None:
    pass


# ----- the root directory, a PTY -------------------------------------------------------------


async def open_root_directory(machine: Machine, timeout: float) -> int:
    """The container's root directory, opened read-only as upstream's child opens ``/`` inside
    (opening may ask the file system: in a look thread)."""
    return await _in_thread(machine, "root", lambda leader, pidfd: _open_root(leader, pidfd, os.O_RDONLY), timeout,
                            os.close)  # an fd nobody waits for any more  # fmt: skip


async def open_pty(machine: Machine, timeout: float) -> tuple[int, str]:
    """A PTY master allocated inside the container (its devpts), and its slave's path there:
    by a child started for it."""
    from machined.children import jobs
    from machined.children.client import run_worker_with_fd

    with leader_pidfd(machine) as leader_fd:
        path, fd = await run_worker_with_fd(jobs.OPEN_PTY, timeout, fds={"leader_fd": leader_fd}, leader=machine.leader)
    return fd, str(path)


# ----- the UID shift -------------------------------------------------------------------------


def uid_shift(leader: int) -> int | None:
    """The container's UID shift from /proc/LEADER/{uid,gid}_map; None if the mapping is complex."""
    try:
        with open(f"/proc/{leader}/uid_map", encoding="ascii") as f:
            uid_lines = f.read().split("\n")
    except FileNotFoundError:
        if os.path.exists(f"/proc/{leader}"):
            return 0  # kernel without user namespaces
        raise BusError.from_errno(errno.ESRCH) from None
    uid_rows = [line.split() for line in uid_lines if line.strip()]
    if len(uid_rows) != 1 or len(uid_rows[0]) != 3:
        return None
    inside, outside, count = (int(x) for x in uid_rows[0])
    if inside != 0 or count < 65534:
        return None
    with open(f"/proc/{leader}/gid_map", encoding="ascii") as f:
        gid_lines = [line.split() for line in f.read().split("\n") if line.strip()]
    if len(gid_lines) != 1 or [int(x) for x in gid_lines[0]] != [inside, outside, count]:
        return None
    return outside

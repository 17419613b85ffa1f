"""Functions that work inside a container's namespaces; they run in a worker child or helper.

Never in the daemon's own process: setns() would switch a whole thread of an
asyncio daemon into the container. Two ways in:

- :func:`resident` is the helper of one running container (see
  :mod:`machined.inside`): it enters once, then answers cheap looks (OS release,
  addresses, a PTY, the root directory) one at a time, without a fork each;
- the other functions (login, shell; :mod:`machined.machine_ops` for copies and
  binds) enter in a child of their own, which exits afterwards.

Every entry goes through the leader's pidfd, which the daemon pinned at
registration: ``setns(pidfd, CLONE_NEWNS|CLONE_NEWNET|…)`` joins the namespaces of
exactly that process, at once. Two things have no pidfd interface and are read
from ``/proc/LEADER/`` instead: the leader's root directory (``root``, to chroot
into) and its user namespace (``ns/user``, to tell whether it is ours). Each is
opened first, and then the pidfd is checked to still name LEADER (``Pid:`` in its
fdinfo): a PID is not reused before its process has been reaped, and a reaped
process's pidfd names no PID, so what was opened belonged to the pinned leader.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import select
from collections.abc import Callable
from typing import Any

# Everything is imported before entering a container: its root need not contain this project.
from dbus_fast.aio import MessageBus

from machined import netlink, pty, sessions
from machined.envfile import read_os_release
from machined.errors import BusError, errno_error_name
from machined.worker import send_fd, serve_requests

CONTAINER_BUS = "unix:path=/run/dbus/system_bus_socket"

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
SIGKILL = 9

_libc = ctypes.CDLL(None, use_errno=True)


# ----- getting in -----------------------------------------------------------------------------


def setns(fd: int, nstype: int) -> None:
    """setns(2) on a namespace fd or, with a mask of CLONE_NEW* flags, a pidfd."""
    if _libc.setns(fd, nstype) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def pidfd_pid(pidfd: int, proc: str | int = "/proc") -> int:
    """The PID *pidfd* names (in our PID namespace); -1 once its process was reaped."""
    flags = os.O_RDONLY | os.O_CLOEXEC
    fd = os.open(f"self/fdinfo/{pidfd}", flags, dir_fd=proc) if isinstance(proc, int) else \
        os.open(f"{proc}/self/fdinfo/{pidfd}", flags)  # fmt: skip
    with open(fd, "rb") as f:
        for line in f:
            if line.startswith(b"Pid:"):
                return int(line.split()[1])
    raise OSError(errno.EBADF, "not a pidfd")


def open_leader_file(leader: int, leader_fd: int, name: str, flags: int) -> int:
    """``/proc/LEADER/NAME``, proven to belong to the process *leader_fd* pins."""
    try:
        fd = os.open(f"/proc/{leader}/{name}", flags | os.O_CLOEXEC)
    except FileNotFoundError:
        raise OSError(errno.ESRCH, os.strerror(errno.ESRCH)) from None
    if pidfd_pid(leader_fd) != leader:
        os.close(fd)
        raise OSError(errno.ESRCH, os.strerror(errno.ESRCH))
    return fd


def join_mount_namespace(leader_fd: int) -> None:
    """Only the mount namespace (copies, binds), through the pidfd."""
    setns(leader_fd, CLONE_NEWNS)


def enter_container(leader: int, leader_fd: int, net: bool = False) -> None:
    """Join the leader's mount namespace, its user namespace if that is not ours (as root there)
    and, with *net*, its network namespace; then chroot into its root directory."""
    root = open_leader_file(leader, leader_fd, "root", os.O_RDONLY | os.O_DIRECTORY)
    try:
        userns = open_leader_file(leader, leader_fd, "ns/user", os.O_RDONLY)
        try:
            own_user = os.fstat(userns).st_ino != os.stat("/proc/self/ns/user").st_ino
        finally:
            os.close(userns)
        # All at once; joining our own user namespace would be EINVAL.
        setns(leader_fd, CLONE_NEWNS | (CLONE_NEWNET if net else 0) | (CLONE_NEWUSER if own_user else 0))
        # Not to be ptraced from inside, and (new credentials reset it) killed with the fork server.
        _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        _libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
        os.fchdir(root)
        os.chroot(".")
        os.chdir("/")
        if own_user:
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
    finally:
        os.close(root)


# ----- the helper of a running container ------------------------------------------------------


def _os_release() -> dict[str, str]:
    try:
        return read_os_release("/")
    except FileNotFoundError:
        raise OSError(errno.ENOENT, "Machine does not contain OS release information") from None


def _addresses() -> list[list]:
    return [[a.family, a.address.hex()] for a in netlink.dump_addresses()]


def _open_pty(fd_socket: int) -> str:
    master, path = pty.open_master()
    try:
        send_fd(fd_socket, master)
    finally:
        os.close(master)
    return path


def _open_root_directory(fd_socket: int) -> None:
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        send_fd(fd_socket, fd)
    finally:
        os.close(fd)


LOOKS: dict[str, Callable[..., Any]] = {
    "os_release": _os_release,
    "addresses": _addresses,
    "open_pty": _open_pty,
    "open_root_directory": _open_root_directory,
}


def resident(leader: int, leader_fd: int, channel: int) -> None:
    """A container's helper: enter once (every namespace, the root), then serve :data:`LOOKS`.

    It leaves when the daemon closes the channel or the leader exits. Before each
    answer it checks that the leader still lives and still has the root it is in (a
    container manager may register its leader before that switches root): if not, it
    leaves unanswered and the daemon asks a new helper, which sees the new root.
    """
    proc = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)  # the host's, kept for the checks
    enter_container(leader, leader_fd, net=True)
    here = os.stat("/")
    watch = select.poll()
    watch.register(leader_fd, select.POLLIN)

    def fresh() -> bool:
        try:
            st = os.stat(f"{leader}/root", dir_fd=proc)
        except OSError:
            return False
        if watch.poll(0):  # exited: the PID may have named another process by the time we looked
            return False
        return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)

    serve_requests(channel, LOOKS, watch_fd=leader_fd, fresh=fresh)


# ----- sessions (a child each) ----------------------------------------------------------------


async def _container_bus(name: str) -> MessageBus:
    try:
        return await MessageBus(bus_address=CONTAINER_BUS, negotiate_unix_fd=True).connect()
    except (FileNotFoundError, ConnectionRefusedError):
        raise BusError(errno_error_name(errno.ENOENT), f"There is no system bus in container {name}.") from None


def open_login(leader: int, leader_fd: int, fd_socket: int, name: str) -> str:
    enter_container(leader, leader_fd)
    master, path = pty.open_master()

    async def start() -> None:
        bus = await _container_bus(name)
        try:
            await sessions.start_login(sessions.manager_call(bus), path)
        finally:
            bus.disconnect()

    asyncio.run(start())
    send_fd(fd_socket, master)
    return path


def open_shell(leader: int, leader_fd: int, fd_socket: int, name: str, user: str, path: str, argv: list[str],
               env: list[str]) -> str:  # fmt: skip
    enter_container(leader, leader_fd)
    master, pty_path = pty.open_master()
    slave = pty.open_slave(pty_path)

    async def start() -> None:
        bus = await _container_bus(name)
        try:
            await sessions.start_shell(sessions.manager_call(bus), slave, pty_path, user, path, argv, env)
        finally:
            bus.disconnect()

    asyncio.run(start())
    send_fd(fd_socket, master)
    return pty_path

"""Functions that look inside a machine's namespaces; they run in a worker child.

Called through :func:`machined.worker.run_worker` (``machined.nsprobe:os_release``
and so on), never in the daemon's own process: setns() would switch a whole
thread of an asyncio daemon into the container.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os

# Everything is imported before entering a container: its root need not contain this project.
from dbus_fast.aio import MessageBus

from machined import pty, sessions
from machined.addresses import read_addresses
from machined.envfile import read_os_release
from machined.errors import BusError, errno_error_name
from machined.worker import send_fd

CONTAINER_BUS = "unix:path=/run/dbus/system_bus_socket"

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def setns(path: str, nstype: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, nstype) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
    finally:
        os.close(fd)


def enter_mount_and_root(leader: int) -> None:
    """Join *leader*'s mount namespace and chroot into its root."""
    root = os.open(f"/proc/{leader}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    setns(f"/proc/{leader}/ns/mnt", CLONE_NEWNS)
    os.fchdir(root)
    os.chroot(".")
    os.chdir("/")
    os.close(root)


def os_release(leader: int) -> dict[str, str]:
    enter_mount_and_root(leader)
    try:
        return read_os_release("/")
    except FileNotFoundError:
        raise OSError(errno.ENOENT, "Machine does not contain OS release information") from None


def addresses(leader: int) -> list[list]:
    setns(f"/proc/{leader}/ns/net", CLONE_NEWNET)
    return [[a.family, a.address.hex()] for a in read_addresses()]


CLONE_NEWUSER = 0x10000000


def enter_container(leader: int) -> None:
    """Join *leader*'s mount (and, if different, user) namespace and root, as root there."""
    root = os.open(f"/proc/{leader}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    userns = os.open(f"/proc/{leader}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    # Our own /proc entries are out of sight once we are in the container's mount namespace.
    own_userns = os.stat("/proc/self/ns/user").st_ino
    try:
        setns(f"/proc/{leader}/ns/mnt", CLONE_NEWNS)
        if os.fstat(userns).st_ino != own_userns:
            if _libc.setns(userns, CLONE_NEWUSER) != 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code))
        os.fchdir(root)
        os.chroot(".")
        os.chdir("/")
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    finally:
        os.close(root)
        os.close(userns)


def open_pty(leader: int, fd_socket: int) -> str:
    enter_container(leader)
    master, path = pty.open_master()
    send_fd(fd_socket, master)
    return path


def open_root_directory(leader: int, fd_socket: int) -> None:
    enter_container(leader)
    send_fd(fd_socket, os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))


async def _container_bus(name: str) -> MessageBus:
    try:
        return await MessageBus(bus_address=CONTAINER_BUS, negotiate_unix_fd=True).connect()
    except (FileNotFoundError, ConnectionRefusedError):
        raise BusError(errno_error_name(errno.ENOENT), f"There is no system bus in container {name}.") from None


def open_login(leader: int, fd_socket: int, name: str) -> str:
    enter_container(leader)
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


def open_shell(leader: int, fd_socket: int, name: str, user: str, path: str, argv: list[str],
               env: list[str]) -> str:  # fmt: skip
    enter_container(leader)
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

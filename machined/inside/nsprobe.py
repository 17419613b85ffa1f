"""Functions that work inside a container's mount namespace; each runs in a child of its own.

Never in the daemon's own process, which never enters a container's mount namespace
(the looks that need no child are :mod:`machined.inside.looks`'s). A PTY, a login, a shell
(and, in :mod:`machined.inside.machine_ops`, copies and binds) enter in a child started for
them, which exits afterwards.

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

import array
import errno
import os
import socket
import struct
from collections.abc import Coroutine
from typing import Any

# Everything is imported before entering a container: its root need not contain this project.
from dbus_fast import Message

from machined.children.wire import send_fd
from machined.dbus.internals import marshal
from machined.errors import BusError, errno_error_name
from machined.fs.libc import CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWUSER, PR_SET_DUMPABLE, PR_SET_PDEATHSIG, prctl, setns
from machined.inside import pty, sessions
from machined.inside.looks import pidfd_pid

SIGKILL = 9

__all__ = ["CLONE_NEWNET", "CLONE_NEWNS", "enter_container", "join_mount_namespace", "open_leader_file", "setns"]


# ----- getting in -----------------------------------------------------------------------------


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
            join_user = os.fstat(userns).st_ino != os.stat("/proc/self/ns/user").st_ino
        finally:
            os.close(userns)
        # All at once; joining our own user namespace would be EINVAL.
        setns(leader_fd, CLONE_NEWNS | (CLONE_NEWNET if net else 0) | (CLONE_NEWUSER if join_user else 0))
        # Not to be ptraced from inside, and (new credentials reset it) killed with the fork server.
        prctl(PR_SET_DUMPABLE, 0)
        prctl(PR_SET_PDEATHSIG, SIGKILL)
        os.fchdir(root)
        os.chroot(".")
        os.chdir("/")
        if join_user:
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
    finally:
        os.close(root)


# ----- a PTY (a child of its own) -------------------------------------------------------------


def open_pty(leader: int, leader_fd: int, fd_socket: int) -> str:
    """A PTY master from the container's devpts (its /dev/ptmx, inside), handed to the daemon;
    the slave's path there."""
    enter_container(leader, leader_fd)
    master, path = pty.open_master()
    try:
        send_fd(fd_socket, master)
    finally:
        os.close(master)
    return path


# ----- sessions (a child each) ----------------------------------------------------------------


MESSAGE_ERROR = 3
DBUS = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
CONTAINER_BUS_PATH = "/run/dbus/system_bus_socket"


class ContainerBus:
    """A minimal synchronous D-Bus client: the container's system bus, for a call or two.

    No event loop, no round trip of its own: the authentication and Hello go out with
    the first call, as sd-bus sends them (except when that call carries fds, which must
    not arrive before the bus agreed to take them). A call waits for its reply.
    """

    def __init__(self, name: str, path: str = CONTAINER_BUS_PATH) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            raise BusError(errno_error_name(errno.ENOENT), f"There is no system bus in container {name}.") from None
        self.serial = 1
        self.buffer = b""
        self.pending = b"\0AUTH EXTERNAL " + str(os.geteuid()).encode().hex().encode() + b"\r\n"
        self.pending += b"NEGOTIATE_UNIX_FD\r\nBEGIN\r\n"
        self.pending += marshal(Message(destination=DBUS, path=DBUS_PATH, interface=DBUS, member="Hello", serial=1))
        self.authenticated = False

    def close(self) -> None:
        self.sock.close()

    def call(self, destination: str, path: str, interface: str, member: str, signature: str, body: list[Any],
             fds: list[int] | None = None) -> None:  # fmt: skip
        self.serial += 1
        serial = self.serial
        data = marshal(
            Message(
                destination=destination,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=body,
                unix_fds=fds or [],
                serial=serial,
            )
        )
        if fds and not self.authenticated:
            self.sock.sendall(self.pending)
            self.pending = b""
            self._authenticate()
        self.sock.sendmsg([self.pending + data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                          if fds else [])  # fmt: skip
        self.pending = b""
        if not self.authenticated:
            self._authenticate()
        while True:
            reply = self._message()
            if reply.reply_serial != serial:
                continue  # Hello's reply, NameAcquired, …
            if reply.message_type == MESSAGE_ERROR:
                raise BusError(reply.error_name or "org.freedesktop.DBus.Error.Failed", reply.text)
            return

    def _read(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise BusError("org.freedesktop.DBus.Error.NoReply", "No reply")
        self.buffer += data

    def _authenticate(self) -> None:
        """The server's answers: OK, then AGREE_UNIX_FD."""
        for expected in (b"OK ", b"AGREE_UNIX_FD"):
            while b"\r\n" not in self.buffer:
                self._read()
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if not line.startswith(expected):
                raise BusError("org.freedesktop.DBus.Error.AuthFailed", line.decode(errors="replace"))
        self.authenticated = True

    def _message(self) -> _Reply:
        while True:
            parsed = _Reply.parse(self.buffer)
            if parsed is not None:
                reply, used = parsed
                self.buffer = self.buffer[used:]
                return reply
            self._read()


class _Reply:
    """What a caller needs of a message: its type, the serial it answers, an error's name and text."""

    def __init__(self, message_type: int, reply_serial: int | None, error_name: str | None, text: str) -> None:
        self.message_type = message_type
        self.reply_serial = reply_serial
        self.error_name = error_name
        self.text = text

    @classmethod
    def parse(cls, buf: bytes) -> tuple[_Reply, int] | None:
        """The first message in *buf* and its length; None if it is not all there yet."""
        if len(buf) < 16:
            return None
        order = "<" if buf[0:1] == b"l" else ">"
        message_type = buf[1]
        body_length, _, fields_length = struct.unpack_from(order + "III", buf, 4)
        body = _align(16 + fields_length, 8)
        end = body + body_length
        if len(buf) < end:
            return None
        fields: dict[int, Any] = {}
        pos = 16
        while pos < 16 + fields_length:
            pos = _align(pos, 8)
            code, size = buf[pos], buf[pos + 1]
            kind = buf[pos + 2 : pos + 2 + size]
            pos += 3 + size
            if kind in (b"s", b"o"):
                pos = _align(pos, 4)
                (n,) = struct.unpack_from(order + "I", buf, pos)
                fields[code] = buf[pos + 4 : pos + 4 + n].decode(errors="replace")
                pos += 5 + n
            elif kind == b"g":
                n = buf[pos]
                fields[code] = buf[pos + 1 : pos + 1 + n].decode(errors="replace")
                pos += 2 + n
            elif kind == b"u":
                pos = _align(pos, 4)
                (fields[code],) = struct.unpack_from(order + "I", buf, pos)
                pos += 4
            else:
                break  # no other header field is defined; what we need came first anyway
        text = ""
        if message_type == MESSAGE_ERROR and str(fields.get(8, "")).startswith("s") and body_length >= 4:
            (n,) = struct.unpack_from(order + "I", buf, body)
            text = buf[body + 4 : body + 4 + n].decode(errors="replace")
        return cls(message_type, fields.get(5), fields.get(4), text), end


def _align(n: int, to: int) -> int:
    return (n + to - 1) & ~(to - 1)


def _run(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine that never suspends (its calls are synchronous) to its end."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise RuntimeError("a synchronous call suspended")


def _manager_call(bus: ContainerBus) -> sessions.ManagerCall:
    async def call(member: str, signature: str, body: list[Any], unix_fds: list[int] | None) -> None:
        bus.call("org.freedesktop.systemd1", "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager",
                 member, signature, body, unix_fds)  # fmt: skip

    return call


def open_login(leader: int, leader_fd: int, fd_socket: int, name: str) -> str:
    enter_container(leader, leader_fd)
    master, path = pty.open_master()
    bus = ContainerBus(name)
    try:
        _run(sessions.start_login(_manager_call(bus), path))
    finally:
        bus.close()
    send_fd(fd_socket, master)
    return path


def open_shell(leader: int, leader_fd: int, fd_socket: int, name: str, user: str, path: str, argv: list[str],
               env: list[str]) -> str:  # fmt: skip
    enter_container(leader, leader_fd)
    master, pty_path = pty.open_master()
    slave = pty.open_slave(pty_path)
    bus = ContainerBus(name)
    try:
        _run(sessions.start_shell(_manager_call(bus), slave, pty_path, user, path, argv, env))
    finally:
        bus.close()
    send_fd(fd_socket, master)
    return pty_path


def rehearse() -> None:
    """In a spare, before its job comes (see :func:`machined.children.child.rehearse`): build the
    messages of a login and parse a reply, without effect."""
    hello = marshal(Message(destination=DBUS, path=DBUS_PATH, interface=DBUS, member="Hello", serial=1))
    marshal(Message(destination="org.freedesktop.systemd1", path="/org/freedesktop/systemd1",
                    interface="org.freedesktop.systemd1.Manager", member="StartUnit", signature="ss",
                    body=["container-getty@0.service", "replace"], serial=2))  # fmt: skip
    _Reply.parse(hello)
    os.stat("/proc/self/ns/user")

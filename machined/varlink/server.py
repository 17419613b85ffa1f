"""An asyncio varlink server: NUL-terminated JSON messages on Unix stream sockets.

What sd-varlink (systemd 262) does on the wire, and clients depend on:

- one method call at a time per connection, answered in order; a message that is not
  a call (not an object, unknown keys, ``more`` together with ``oneway``) or that
  overflows the buffer closes that connection;
- ``parameters`` null or missing means ``{}``; empty parameters are left out of replies;
- a call is checked against the interface description first (``ExpectedMore``,
  ``InvalidParameter`` naming the first bad field), then its handler runs;
- a method called with ``more`` may answer with several replies; all but the last carry
  ``"continues": true``; one that has nothing to say answers its *sentinel* error;
- errors carry parameters (``{"parameter": "name"}``; ``io.systemd.System`` with the errno);
- file descriptors travel with a reply (SCM_RIGHTS on its first byte);
- the peer's UID, GID and PID are read once from ``SO_PEERCRED`` and its process is pinned
  with ``SO_PEERPIDFD`` (or ``pidfd_open`` of that PID on older kernels);
- ``org.varlink.service.GetInfo`` and ``GetInterfaceDescription`` are built in.

Handlers run in the connection's task with :data:`machined.caller.current` set to the peer.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from machined import caller, errors
from machined.caller import PolkitSubject
from machined.errors import BusError
from machined.process import ProcessRef, start_time
from machined.varlink import idl

log = logging.getLogger(__name__)

BUFFER_MAX = 16 * 1024 * 1024
READ_SIZE = 64 * 1024
SO_PEERPIDFD = 77
CONNECTIONS_MAX = 4096
CONNECTIONS_PER_UID_MAX = 1024  # (sd-varlink's limits: one user cannot take every connection)
_UCRED = struct.Struct("3i")


class VarlinkError(Exception):
    """A varlink error reply: its name and parameters."""

    def __init__(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        super().__init__(name)
        self.name = name
        self.parameters = parameters or {}


def invalid_parameter(name: str) -> VarlinkError:
    return VarlinkError(errors.VL_INVALID_PARAMETER, {"parameter": name})


class Reply:
    """Reply parameters with file descriptors; each fd is sent once, then closed."""

    def __init__(self, parameters: dict[str, Any], fds: list[int] | None = None) -> None:
        self.parameters = parameters
        self.fds = fds or []


class Peer:
    """The process at the other end of a connection, as the kernel vouches for it."""

    def __init__(self, sock: socket.socket) -> None:
        # (pid_value and uid_value: pid() and uid() are the Requester's methods)
        self.pid_value, self.uid_value, self.gid = -1, -1, -1
        self.pidfd = -1
        try:
            self.pid_value, self.uid_value, self.gid = _UCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            )
        except OSError:
            pass
        try:
            self.pidfd = _UCRED_FD.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
        except OSError:
            if self.pid_value > 0:  # older kernels: pin the PID; then check it still is the peer's
                try:
                    self.pidfd = os.pidfd_open(self.pid_value)
                except OSError:
                    self.pidfd = -1
        self.pidfd_id = 0
        if self.pidfd >= 0:
            try:
                self.pidfd_id = os.fstat(self.pidfd).st_ino
            except OSError:
                pass

    async def uid(self) -> int:
        return self.uid_value

    async def pid(self) -> int:
        return self.pid_value

    def process_ref(self) -> ProcessRef | None:
        """The peer's process, pinned by a duplicate of its pidfd (None if it has none)."""
        if self.pidfd < 0:
            return None
        ref = ProcessRef(self.pid_value, pidfd=os.dup(self.pidfd), pidfd_id=self.pidfd_id)
        ref.start_time = start_time(self.pid_value)
        return ref

    def polkit_subject(self) -> PolkitSubject:
        return PolkitSubject("unix-process", pidfd=self.pidfd, uid=self.uid_value)

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


_UCRED_FD = struct.Struct("i")


class Call:
    """One method call being served."""

    def __init__(self, connection: Connection, method: str, parameters: dict[str, Any], more: bool,
                 oneway: bool) -> None:  # fmt: skip
        self.connection = connection
        self.method = method
        self.parameters = parameters
        self.more = more
        self.oneway = oneway
        self.peer = connection.peer
        self._previous: Reply | None = None

    @property
    def allow_interactive_authentication(self) -> bool:
        return self.parameters.get("allowInteractiveAuthentication") is True

    async def notify(self, parameters: dict[str, Any], fds: list[int] | None = None) -> None:
        """One of several replies to a ``more`` call; sent with ``continues`` once the next one is known."""
        if not self.more:
            _close_all(fds or [])
            raise VarlinkError(errors.VL_EXPECTED_MORE)
        if self._previous is not None:
            await self.connection.send_reply(self._previous, continues=True)
        self._previous = Reply(parameters, fds)

    async def _finish(self, final: Reply | None, sentinel: str | None) -> None:
        if final is not None:
            if self._previous is not None:
                await self.connection.send_reply(self._previous, continues=True)
                self._previous = None
            await self.connection.send_reply(final)
        elif self._previous is not None:
            previous, self._previous = self._previous, None
            await self.connection.send_reply(previous)
        elif sentinel is not None:
            await self.connection.send_error(sentinel, {})
        else:
            await self.connection.send_reply(Reply({}))

    async def _fail(self, name: str, parameters: dict[str, Any]) -> None:
        if self._previous is not None:
            previous, self._previous = self._previous, None
            await self.connection.send_reply(previous, continues=True)
        await self.connection.send_error(name, parameters)


# A handler gets the call and returns the reply's parameters (or a Reply with fds, or None for
# "{}" or, after notify(), "the last notified one is the last reply"); it may raise VarlinkError
# or BusError.
Handler = Callable[[Call], Awaitable[dict[str, Any] | Reply | None]]


class MethodSpec:
    def __init__(self, handler: Handler, sentinel: str | None = None) -> None:
        self.handler = handler
        self.sentinel = sentinel


class Service:
    """Interfaces and their method handlers, served on one or more sockets."""

    def __init__(self, vendor: str = "", product: str = "", version: str = "", url: str = "",
                 introspection: bool = True) -> None:  # fmt: skip
        self.vendor, self.product, self.version, self.url = vendor, product, version, url
        self.interfaces: dict[str, idl.Interface] = {}
        self.methods: dict[str, MethodSpec] = {}
        if introspection:
            from machined.varlink.interfaces import IO_SYSTEMD, ORG_VARLINK_SERVICE

            self.add_interface(ORG_VARLINK_SERVICE)
            self.add_interface(IO_SYSTEMD)
            self.bind("org.varlink.service.GetInfo", self._get_info)
            self.bind("org.varlink.service.GetInterfaceDescription", self._get_interface_description)

    def add_interface(self, interface: idl.Interface) -> None:
        self.interfaces[interface.name] = interface

    def bind(self, method: str, handler: Handler, sentinel: str | None = None) -> None:
        self.methods[method] = MethodSpec(handler, sentinel)

    def declaration(self, method: str) -> tuple[idl.Interface, idl.Method] | None:
        interface_name, _, name = method.rpartition(".")
        interface = self.interfaces.get(interface_name)
        if interface is None:
            return None
        declared = interface.method(name)
        return (interface, declared) if declared is not None else None

    async def _get_info(self, call: Call) -> dict[str, Any]:
        return {"vendor": self.vendor, "product": self.product, "version": self.version, "url": self.url,
                "interfaces": sorted(self.interfaces)}  # fmt: skip

    async def _get_interface_description(self, call: Call) -> dict[str, Any]:
        name = call.parameters.get("interface")
        interface = self.interfaces.get(name) if isinstance(name, str) else None
        if interface is None:
            raise VarlinkError(errors.VL_INTERFACE_NOT_FOUND, {"interface": name})
        return {"description": interface.describe()}


class Connection:
    def __init__(self, server: VarlinkServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.peer = Peer(sock)
        self.loop = asyncio.get_running_loop()

    async def serve(self) -> None:
        buffer = bytearray()
        try:
            while True:
                end = buffer.find(0)
                while end < 0:
                    if len(buffer) > BUFFER_MAX:
                        return
                    data = await self.loop.sock_recv(self.sock, READ_SIZE)
                    if not data:
                        return
                    start = len(buffer)
                    buffer += data
                    end = buffer.find(0, start)
                message = bytes(buffer[:end])
                del buffer[: end + 1]
                if not await self._dispatch(message):
                    return
        except (ConnectionError, OSError):
            return
        finally:
            self.peer.close()
            self.sock.close()

    async def _dispatch(self, raw: bytes) -> bool:
        """Serve one message; False to close the connection (a protocol violation)."""
        try:
            message = json.loads(raw)
        except ValueError:
            return False
        if not isinstance(message, dict):
            return False
        method: str | None = None
        parameters: Any = None
        more = oneway = False
        seen_flag = False
        for key, value in message.items():
            if key == "method" and isinstance(value, str):
                method = value
            elif key == "parameters" and (value is None or isinstance(value, dict)):
                parameters = value
            elif key in ("more", "oneway") and isinstance(value, bool):
                if seen_flag:
                    return False
                seen_flag = True
                more, oneway = (value, False) if key == "more" else (False, value)
            else:
                return False
        if method is None:
            return False
        call = Call(self, method, parameters or {}, more, oneway)
        spec = self.server.service.methods.get(method)
        if spec is None:
            if not oneway:
                await self.send_error(errors.VL_METHOD_NOT_FOUND, {"method": method})
            return True
        declared = self.server.service.declaration(method)
        if declared is not None:
            try:
                idl.validate_call(declared[0], declared[1], call.parameters, more)
            except idl.ExpectedMore:
                if not oneway:
                    await self.send_error(errors.VL_EXPECTED_MORE, {})
                return True
            except idl.Invalid as e:
                if not oneway:
                    await self.send_error(errors.VL_INVALID_PARAMETER, {"parameter": e.field or method})
                return True
        token = caller.current.set(self.peer)
        try:
            result = await spec.handler(call)
        except VarlinkError as e:
            if not oneway:
                await call._fail(e.name, e.parameters)
            return True
        except BusError as e:
            if not oneway:
                await call._fail(*errors.varlink_error(e))
            return True
        except OSError as e:
            if not oneway:
                await call._fail(*errors.system_error(e.errno or errno.EIO))
            return True
        except Exception:
            log.exception("varlink method %s failed", method)
            if not oneway:
                await call._fail(*errors.system_error(errno.EIO))
            return True
        finally:
            caller.current.reset(token)
        if oneway:
            if isinstance(result, Reply):
                _close_all(result.fds)
            return True
        if isinstance(result, dict):
            result = Reply(result)
        await call._finish(result, spec.sentinel if more else None)
        return True

    async def send_reply(self, reply: Reply, continues: bool = False) -> None:
        message: dict[str, Any] = {}
        if reply.parameters:
            message["parameters"] = reply.parameters
        if continues:
            message["continues"] = True
        try:
            await self._send(message, reply.fds)
        finally:
            _close_all(reply.fds)

    async def send_error(self, name: str, parameters: dict[str, Any]) -> None:
        message: dict[str, Any] = {"error": name}
        if parameters:
            message["parameters"] = parameters
        await self._send(message, [])

    async def _send(self, message: dict[str, Any], fds: list[int]) -> None:
        data = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode() + b"\0"
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
            while True:
                try:
                    sent = self.sock.sendmsg([data], ancillary)
                    break
                except BlockingIOError:
                    await self._writable()
            data = data[sent:]
        if data:
            await self.loop.sock_sendall(self.sock, data)

    async def _writable(self) -> None:
        future = self.loop.create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        self.loop.add_writer(self.sock.fileno(), wake)
        try:
            await future
        finally:
            self.loop.remove_writer(self.sock.fileno())


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class VarlinkServer:
    """Serves a :class:`Service` on Unix socket paths it binds, or on sockets it is handed
    (socket activation)."""

    def __init__(self, service: Service, paths: list[str] | None = None, mode: int = 0o666,
                 sockets: list[socket.socket] | None = None) -> None:  # fmt: skip
        self.service = service
        self.paths = list(paths or [])
        self.mode = mode
        self._given = list(sockets or [])
        self._listeners: list[socket.socket] = []
        self._bound: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting: list[asyncio.Task[None]] = []
        self._per_uid: dict[int, int] = {}

    @property
    def path(self) -> str:
        return self.paths[0]

    async def start(self) -> None:
        for path in self.paths:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            try:
                os.unlink(path)  # a socket left by an earlier instance
            except FileNotFoundError:
                pass
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.bind(path)
                os.chmod(path, self.mode)
                sock.listen(socket.SOMAXCONN)
            except OSError:
                sock.close()
                raise
            self._bound.append(path)
            self._listeners.append(sock)
        self._listeners.extend(self._given)
        for sock in self._listeners:
            sock.setblocking(False)
            self._accepting.append(asyncio.get_running_loop().create_task(self._accept(sock)))

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await asyncio.sleep(0.1)  # out of descriptors: let others finish first
                    continue
                raise
            if len(self._tasks) >= CONNECTIONS_MAX:
                sock.close()
                continue
            sock.setblocking(False)
            connection = Connection(self, sock)
            uid = connection.peer.uid_value
            if self._per_uid.get(uid, 0) >= CONNECTIONS_PER_UID_MAX:
                connection.peer.close()
                sock.close()
                continue
            self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
            task = loop.create_task(connection.serve())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

            def release(_task: asyncio.Task[None], uid: int = uid) -> None:
                self._release_uid(uid)

            task.add_done_callback(release)

    def _release_uid(self, uid: int) -> None:
        left = self._per_uid.get(uid, 1) - 1
        if left > 0:
            self._per_uid[uid] = left
        else:
            self._per_uid.pop(uid, None)

    async def stop(self) -> None:
        for task in self._accepting:
            task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._accepting, *self._tasks, return_exceptions=True)
        for sock in self._listeners:
            sock.close()
        for path in self._bound:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._listeners.clear()
        self._bound.clear()


SD_LISTEN_FDS_START = 3


def listen_fds(name: str) -> list[socket.socket]:
    """The listening sockets systemd passed us for *name* (``FileDescriptorName=``), as sockets.

    Follows sd_listen_fds(): ``LISTEN_PID`` must be us; descriptors from 3 on, named by
    ``LISTEN_FDNAMES``. The variables stay for other names; the descriptors taken are marked
    close-on-exec."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    out = []
    for i in range(count):
        if (names[i] if i < len(names) else "unknown") != name:
            continue
        fd = SD_LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
            out.append(socket.socket(fileno=fd))
        except OSError:
            continue
    return out

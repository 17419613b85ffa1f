"""io.machined.Machine: this project's own varlink interface, on a socket of its own.

Not upstream's: nothing here is added to io.systemd.Machine or to the D-Bus objects,
which stay as systemd-machined's. It serves what machinectl users ask for and upstream
does not offer:

* ``Watch`` (with ``more``): first every current machine (``type: "existing"``), then one
  reply per event of :mod:`machined.events` (new, state, changed, removed), each with its
  sequence number and timestamp. While anybody watches, address changes are reported too
  (:mod:`machined.addrwatch`): ``changed: ["addresses"]`` with the machine's ``addresses`` now,
  as io.systemd.Machine.List shows them (an empty list when none is left). Anybody may watch
  (as anybody may list). Each watcher has a bounded queue (:data:`QUEUE_MAX` events) and a
  small socket buffer: a watcher that does not keep up is sent ``io.machined.Machine.Overflow``
  (with the first sequence number it will not get) instead of the events it missed, and is
  disconnected (at once if the notice goes out, after :data:`OVERFLOW_GRACE` seconds if even
  that cannot be written). The daemon never waits for a watcher: an event costs it one append per watcher.

Socket: /run/machined/io.machined.Machine (mode 0666), $XDG_RUNTIME_DIR/machined/… for
``machined --user`` (0600).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import deque
from typing import Any

from machined import errors, personality
from machined.caller import Authorize, PolkitSubject
from machined.errors import BusError
from machined.events import Event
from machined.machine import Machine, MachineClass
from machined.manager import MachineManager
from machined.process import start_time
from machined.varlink.idl import Enum, Error, Field, Interface, Method, Struct, opt, req
from machined.varlink.interfaces import PRODUCT, URL, VENDOR
from machined.varlink.server import Call, Reply, Service, VarlinkError, invalid_parameter

log = logging.getLogger(__name__)

SOCKET = "/run/machined/io.machined.Machine"
NAME = "io.machined.Machine"
IFACE = NAME + "."
ERROR_OVERFLOW = IFACE + "Overflow"

# Events queued for one watcher beyond what its socket holds; past that it is overflowing.
QUEUE_MAX = 256
# A watcher's socket send buffer (the kernel doubles it): what an idle watcher may hold unread.
SEND_BUFFER = 16 * 1024
# How long an overflowing watcher's notice may wait for room in its socket before it is closed.
OVERFLOW_GRACE = 30.0

_ADDRESS = Struct((opt("ifindex", "int"), req("family", "int"), Field("address", "int", array=True)))
_TIMESTAMP = Struct((req("realtime", "int"), req("monotonic", "int")))
_EVENT_FIELDS = (
    req("sequence", "int"),
    req("type", Enum(("existing", "new", "state", "changed", "removed"))),
    req("name", "string"),
    req("class", "string"),
    opt("service", "string"),
    req("state", Enum(("opening", "running", "closing"))),
    opt("leader", "int"),
    opt("unit", "string"),
    opt("changed", "string", array=True),
    opt("addresses", _ADDRESS, array=True),
    req("timestamp", _TIMESTAMP),
)

INTERFACE = Interface(
    NAME,
    [
        Method("Watch", (), _EVENT_FIELDS, more="requires"),
        Method(
            "Run",
            (
                req("name", "string"), req("command", "string", array=True), opt("user", "string"),
                opt("environment", "string", array=True), opt("directory", "string"), opt("detach", "bool"),
                opt("allowInteractiveAuthentication", "bool"),
            ),
            (req("controlFileDescriptor", "int"), req("runnerProcessId", "int")),
        ),
        Error("NoSuchMachine"),
        Error("NotSupported"),
        Error("NoSuchUser"),
        Error("Overflow", (req("lostSequence", "int"),)),
    ],
)  # fmt: skip


def user_socket(runtime_dir: str) -> str:
    """The socket of ``machined --user``."""
    return os.path.join(runtime_dir, "machined", "io.machined.Machine")


def event_parameters(event: Event) -> dict[str, Any]:
    """An event as a ``Watch`` reply."""
    out: dict[str, Any] = {"sequence": event.sequence, "type": event.kind, "name": event.name,
                           "class": event.machine_class}  # fmt: skip
    if event.service:
        out["service"] = event.service
    out["state"] = event.state
    if event.leader > 0:
        out["leader"] = event.leader
    if event.unit:
        out["unit"] = event.unit
    if event.changed:
        out["changed"] = list(event.changed)
    if event.addresses is not None:  # as io.systemd.Machine.List shows them
        out["addresses"] = [{**({"ifindex": a.ifindex} if a.ifindex > 0 else {}), "family": a.family,
                             "address": list(a.address)} for a in event.addresses]  # fmt: skip
    out["timestamp"] = {"realtime": event.realtime, "monotonic": event.monotonic}
    return out


class Watcher:
    """One ``Watch`` call: the events not yet sent to it."""

    __slots__ = ("queue", "wakeup", "lost", "gone", "abort")

    def __init__(self) -> None:
        self.queue: deque[dict[str, Any]] = deque()
        self.wakeup: asyncio.Future[None] | None = None
        self.lost = 0  # the first sequence number it will not get (overflowing), else 0
        self.gone = False
        self.abort: asyncio.TimerHandle | None = None

    def push(self, sequence: int, parameters: dict[str, Any], sock: socket.socket) -> None:
        if self.lost:
            return
        if len(self.queue) >= QUEUE_MAX:
            self.lost = self.queue[0]["sequence"]  # what it gets ends just before the first queued
            self.queue.clear()
            self.abort = asyncio.get_running_loop().call_later(OVERFLOW_GRACE, _shut, sock)
        else:
            self.queue.append(parameters)
        self.wake()

    def wake(self) -> None:
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)


def _shut(sock: socket.socket) -> None:
    """End a connection whose writes are stuck: the pending write fails, the connection ends."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class OursService:
    """The handlers of io.machined.Machine, bound to one manager; subscribed to its events
    until :meth:`close`."""

    def __init__(self, manager: MachineManager, polkit: Any = None, bus: Any = None) -> None:
        self.manager = manager
        self.polkit = polkit
        self.bus = bus
        self.watchers: dict[Watcher, socket.socket] = {}
        from machined.addrwatch import AddressWatch

        self.addresses = AddressWatch(manager)  # started by the first watcher, stopped after the last
        self._unsubscribe = manager.events.subscribe(self._on_event)
        self.service = Service(vendor=VENDOR, product=PRODUCT, version=_version(), url=URL)
        self.service.add_interface(INTERFACE)
        self.service.bind(IFACE + "Watch", self.watch)
        self.service.bind(IFACE + "Run", self.run)

    def close(self) -> None:
        self._unsubscribe()
        self.addresses.stop()

    def _on_event(self, event: Event, machine: Machine) -> None:
        if not self.watchers:
            return
        parameters = event_parameters(event)  # one for all watchers (never changed once made)
        for watcher, sock in self.watchers.items():
            watcher.push(event.sequence, parameters, sock)

    # ----- Watch ---------------------------------------------------------------------------

    async def watch(self, call: Call) -> None:
        connection = call.connection
        sock = connection.sock
        loop = asyncio.get_running_loop()
        watcher = Watcher()
        # What exists now and the events after it, with nothing in between (no await here).
        self.watchers[watcher] = sock
        events = self.manager.events
        sequence = events.sequence
        from machined.events import snapshot

        current = [snapshot(m, sequence) for m in self.manager.machines() if m.is_host or events.known(m)]
        self.addresses.start()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except OSError:
            pass
        fd = sock.fileno()
        loop.add_reader(fd, _readable, watcher, sock, loop)
        try:
            for event in current:
                await connection.send_reply(Reply(event_parameters(event)), continues=True)
                if watcher.lost or watcher.gone:
                    break
            del current
            while True:
                while watcher.queue and not watcher.lost:
                    await connection.send_reply(Reply(watcher.queue.popleft()), continues=True)
                if watcher.lost:
                    await connection.send_error(ERROR_OVERFLOW, {"lostSequence": watcher.lost})
                    raise _end(sock)
                if watcher.gone:
                    raise _end(sock)
                watcher.wakeup = loop.create_future()
                await watcher.wakeup
                watcher.wakeup = None
        finally:
            self.watchers.pop(watcher, None)
            if not self.watchers:
                self.addresses.stop()
            if watcher.abort is not None:
                watcher.abort.cancel()
            loop.remove_reader(fd)

    # ----- Run ----------------------------------------------------------------------------

    async def run(self, call: Call) -> Reply:
        """Start a command in a machine; the caller gets the control socket (see :mod:`machined.run`).
        Authorized as D-Bus's OpenMachineShell: polkit's ``shell`` (``host-shell`` for ``.host``)
        with the details machine, user, program."""
        from machined import run
        from machined.envfile import env_is_valid
        from machined.varlink.machine import varlink_authorizer

        params = call.parameters
        name, command = params["name"], params["command"]
        user = params.get("user") or ""
        environment = params.get("environment") or []
        directory = params.get("directory") or ""
        if not command or not command[0] or any("\0" in a for a in command):
            raise invalid_parameter("command")
        if user and (len(user) > 256 or any(c in user for c in ":/\n\0")):
            raise invalid_parameter("user")
        if not env_is_valid(environment):
            raise invalid_parameter("environment")
        if directory and (not directory.startswith("/") or "\0" in directory):
            raise invalid_parameter("directory")
        machine = self.manager.registry.get(name)
        if machine is None or not (machine.is_host or self.manager.events.known(machine)):
            raise VarlinkError(IFACE + "NoSuchMachine")
        if machine.machine_class is MachineClass.VM:
            raise VarlinkError(IFACE + "NotSupported")
        authorize = (
            varlink_authorizer(self.polkit, self.bus, call, rename=False)
            if personality.is_262()
            else (self._authorizer_252(call))
        )
        await authorize("host-shell" if machine.is_host else "shell",
                        {"machine": machine.name, "user": user or "root", "program": command[0]})  # fmt: skip
        try:
            if machine.is_host and run.is_host_user(user):  # PID 1 starts it (see run.start_on_host)
                pid, control = 0, await run.start_on_host(self.manager.systemd, command, user, environment, directory,
                                                          params.get("detach") is True)  # fmt: skip
            else:
                pid, control = await run.start(machine, command, user, environment, directory,
                                               params.get("detach") is True, call.peer.pid_value)  # fmt: skip
        except BusError as e:
            if e.name.startswith(IFACE):
                raise VarlinkError(e.name) from None
            raise
        return Reply({"controlFileDescriptor": 0, "runnerProcessId": pid}, [control])

    def _authorizer_252(self, call: Call) -> Authorize:
        """On a 252 host, polkit (of that time) knows no pidfd subject: the peer is named by its PID
        and start time (which polkit checks), as polkit's own clients name a process."""

        async def authorize(action: str, details: dict[str, str]) -> None:
            peer = call.peer
            if peer.uid_value == 0:
                return
            if self.polkit is None:
                raise BusError(errors.ACCESS_DENIED, "Permission denied")
            subject = PolkitSubject("unix-process", uid=peer.uid_value, pid=peer.pid_value,
                                    start_time=start_time(peer.pid_value) or 0)  # fmt: skip
            await self.polkit(self.bus, subject, peer.uid_value, action, details,
                              call.allow_interactive_authentication)  # fmt: skip

        return authorize


def _end(sock: socket.socket) -> OSError:
    """The watcher's connection ends here (what was sent stays readable for the peer): the
    error to raise so that the server closes it without another word."""
    _shut(sock)
    return ConnectionResetError("watcher disconnected")


def _readable(watcher: Watcher, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
    """The watcher's socket has something to read while it watches: its end (gone), or a
    message it should not have sent (ignored: its end is then seen when a write fails)."""
    try:
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return
    except OSError:
        data = b""
    loop.remove_reader(sock.fileno())
    if not data:
        watcher.gone = True
        watcher.wake()


def _version() -> str:
    from machined import __version__

    return __version__

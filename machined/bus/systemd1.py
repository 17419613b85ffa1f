"""org.freedesktop.systemd1 as machined uses it: scopes, stop, kill, state queries, signals.

Signals from the service manager never change the registry themselves: they
are handed to a :class:`SystemdListener` (the manager), which only queues
machines for garbage collection. Only signals that really come from systemd
(the current owner of ``org.freedesktop.systemd1``) are passed on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from machined import errors, sessions
from machined.bus.client import call_bus_daemon, call_method
from machined.errors import BusError
from machined.naming import bus_label_escape, bus_label_unescape

log = logging.getLogger(__name__)

SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
SYSTEMD_MANAGER = "org.freedesktop.systemd1.Manager"
UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"
NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"
LOAD_FAILED = "org.freedesktop.systemd1.LoadFailed"

MATCH_RULES = [
    f"type='signal',sender='{SYSTEMD}',path='{SYSTEMD_PATH}',interface='{SYSTEMD_MANAGER}',member='JobRemoved'",
    f"type='signal',sender='{SYSTEMD}',path='{SYSTEMD_PATH}',interface='{SYSTEMD_MANAGER}',member='UnitRemoved'",
    f"type='signal',sender='{SYSTEMD}',path='{SYSTEMD_PATH}',interface='{SYSTEMD_MANAGER}',member='Reloading'",
    f"type='signal',sender='{SYSTEMD}',interface='org.freedesktop.DBus.Properties',"
    f"member='PropertiesChanged',arg0='org.freedesktop.systemd1.Unit'",
    f"type='signal',sender='org.freedesktop.DBus',path='/org/freedesktop/DBus',"
    f"interface='org.freedesktop.DBus',member='NameOwnerChanged',arg0='{SYSTEMD}'",
]


def unit_object_path(unit: str) -> str:
    return UNIT_PATH_PREFIX + bus_label_escape(unit)


class SystemdListener(Protocol):
    def job_removed(self, job: str, unit: str, result: str) -> None: ...
    def unit_changed(self, unit: str) -> None: ...
    def manager_reloaded(self) -> None: ...


class Systemd:
    """Calls into PID 1's manager and the signals machined follows."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.owner: str | None = None
        self.listener: SystemdListener | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def connect(self, listener: SystemdListener) -> None:
        """Match the signals, learn who systemd is on the bus, and Subscribe()."""
        self.listener = listener
        self.bus.add_message_handler(self._on_signal)
        for rule in MATCH_RULES:
            await call_bus_daemon(self.bus, "AddMatch", "s", [rule])
        try:
            self.owner = (await call_bus_daemon(self.bus, "GetNameOwner", "s", [SYSTEMD]))[0]
        except BusError:
            self.owner = None
        await self.subscribe()

    async def subscribe(self) -> None:
        try:
            await self._manager_call("Subscribe")
        except BusError as e:
            # Already subscribed (after our own reconnect) is fine; anything else is logged.
            if e.name != "org.freedesktop.systemd1.AlreadySubscribed":
                log.warning("Failed to subscribe to systemd: %s", e.message)

    # ----- calls ---------------------------------------------------------------------

    async def _manager_call(self, member: str, sig: str = "", body: list[Any] | None = None) -> list[Any]:
        return await call_method(self.bus, SYSTEMD, SYSTEMD_PATH, SYSTEMD_MANAGER, member, sig, body)

    async def start_transient_unit(self, name: str, properties: list[tuple[str, Variant]]) -> str:
        """Start a transient unit in mode "fail"; return the job path. Errors pass through."""
        body = [name, "fail", [list(p) for p in properties], []]
        return (await self._manager_call("StartTransientUnit", "ssa(sv)a(sa(sv))", body))[0]

    async def stop_unit(self, unit: str) -> str:
        """StopUnit(unit, "fail"); "" when the unit does not exist (nothing to stop)."""
        try:
            return (await self._manager_call("StopUnit", "ss", [unit, "fail"]))[0]
        except BusError as e:
            if e.name in (NO_SUCH_UNIT, LOAD_FAILED):
                return ""
            raise

    async def kill_unit(self, unit: str, signal: int) -> None:
        await self._manager_call("KillUnit", "ssi", [unit, "all", signal])

    async def unref_unit(self, unit: str) -> None:
        try:
            await self._manager_call("UnrefUnit", "s", [unit])
        except BusError as e:
            log.warning("Failed to drop reference to machine scope, ignoring: %s", e.message)

    async def unit_is_active(self, unit: str) -> bool:
        """False only when systemd says the unit is inactive, failed, unknown or unloadable."""
        try:
            (value,) = await call_method(self.bus, SYSTEMD, unit_object_path(unit), "org.freedesktop.DBus.Properties",
                                         "Get", "ss", ["org.freedesktop.systemd1.Unit", "ActiveState"])  # fmt: skip
        except BusError as e:
            if e.name in (NO_SUCH_UNIT, LOAD_FAILED):
                return False
            return True  # cannot tell: keep the machine
        return value.value not in ("inactive", "failed")

    async def job_is_active(self, job: str) -> bool:
        """Whether the job object still exists (its state does not matter)."""
        try:
            await call_method(self.bus, SYSTEMD, job, "org.freedesktop.DBus.Properties", "Get", "ss",
                              ["org.freedesktop.systemd1.Job", "State"])  # fmt: skip
        except BusError as e:
            return e.name != errors.UNKNOWN_OBJECT
        return True

    async def start_login(self, pty_path: str) -> None:
        await sessions.start_login(self.bus, pty_path)

    async def start_shell(self, slave: int, pty_path: str, user: str, path: str, argv: list[str],
                          env: list[str]) -> None:  # fmt: skip
        await sessions.start_shell(self.bus, slave, pty_path, user, path, argv, env)

    # ----- signals -------------------------------------------------------------------

    def _resubscribe(self) -> None:
        task = asyncio.get_running_loop().create_task(self.subscribe())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_signal(self, msg: Message) -> bool:
        if msg.message_type is not MessageType.SIGNAL or self.listener is None:
            return False
        try:
            self._dispatch_signal(msg)
        except Exception:  # a malformed signal must not hurt the daemon
            log.exception("Failed to process signal %s.%s", msg.interface, msg.member)
        return False

    def _dispatch_signal(self, msg: Message) -> None:
        assert self.listener is not None
        if msg.member == "NameOwnerChanged" and msg.interface == "org.freedesktop.DBus":
            if msg.sender != "org.freedesktop.DBus" or msg.signature != "sss" or msg.body[0] != SYSTEMD:
                return
            self.owner = msg.body[2] or None
            if self.owner:
                self._resubscribe()  # systemd came back (daemon-reexec): it forgot us
            self.listener.manager_reloaded()
            return
        if self.owner is None or msg.sender != self.owner:
            return
        if msg.interface == SYSTEMD_MANAGER and msg.path == SYSTEMD_PATH:
            if msg.member == "JobRemoved" and msg.signature == "uoss":
                _, job, unit, result = msg.body
                self.listener.job_removed(job, unit, result)
            elif msg.member == "UnitRemoved" and msg.signature == "so":
                self.listener.unit_changed(msg.body[0])
            elif msg.member == "Reloading" and msg.signature == "b":
                if not msg.body[0]:
                    self._resubscribe()
                    self.listener.manager_reloaded()
        elif msg.member == "PropertiesChanged" and msg.path and msg.path.startswith(UNIT_PATH_PREFIX):
            element = msg.path[len(UNIT_PATH_PREFIX):]
            if element and "/" not in element:
                self.listener.unit_changed(bus_label_unescape(element))


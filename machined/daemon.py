"""Composition root: build the objects, own the bus name, serve until told to stop."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import resource
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from dbus_fast import BusType, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.constants import NameFlag

from machined import events, notify, personality
from machined.clients.bus import call_bus_daemon
from machined.clients.systemd1 import Systemd
from machined.dbus import internals
from machined.dbus.introspection import STANDARD_INTERFACES_XML, load_interface
from machined.dbus.logcontrol import LogControl
from machined.dbus.objects import Dispatcher, new_signal
from machined.dbus.tree import MANAGER_PATH, MachinedTree
from machined.errors import BusError
from machined.events import Event
from machined.machine import Machine, Timestamp, host_machine
from machined.manager import MachineManager
from machined.statefile import StateDir
from machined.userdb import userdb_service
from machined.userscope import UserScope
from machined.varlink import VarlinkServer

if TYPE_CHECKING:
    from machined.metrics import Metrics
    from machined.oci.watcher import OciWatcher
    from machined.varlink.ours import OursService

log = logging.getLogger(__name__)

BUS_NAME = "org.freedesktop.machine1"
STATE_DIR = "/run/systemd/machines"
USERDB_SOCKET = "/run/systemd/userdb/io.systemd.Machine"
# io.systemd.Machine and io.systemd.MachineImage: one socket serving both, the second name a
# symbolic link to it, both listed in the varlink registry (as 262).
MACHINE_SOCKET = "/run/systemd/machine/io.systemd.Machine"
MACHINE_IMAGE_LINK = "/run/systemd/machine/io.systemd.MachineImage"
VARLINK_REGISTRY = "/run/varlink/registry"
IDENTIFIER = "machined"
OCI_START_WAIT = 3.0  # --register-oci: how long start-up waits for the running containers' registrations


class StartupError(Exception):
    """The daemon cannot start; the message is for the operator."""


def read_machine_id(path: str = "/etc/machine-id") -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def boot_timestamp() -> Timestamp:
    """When the system booted, on both clocks (what ``.host`` reports): boot time 0 carried over
    to each clock as upstream does, so the monotonic value is what the monotonic clock advanced
    past the boot-time clock between the two reads (0 or a few µs; 0 after a suspend)."""
    boot_us = time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1000
    mono_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    now_us = time.clock_gettime_ns(time.CLOCK_REALTIME) // 1000
    return Timestamp(realtime=max(now_us - boot_us, 0), monotonic=max(mono_us - boot_us, 0))


def return_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``): start-up frees
    much of what it allocated (imports, state files read back, interface XML parsed), but glibc
    keeps free pages below the top of its heap. About 1.5 MiB at idle."""
    try:
        from machined.fs.libc import libc

        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def raise_fd_limit() -> None:
    """Every machine holds its leader's pidfd: allow as many descriptors as the hard limit does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Daemon:
    """machined's process: the bus connection, the manager, and the main loop."""

    def __init__(self, bus_address: str | None = None, state_dir: str = STATE_DIR,
                 userdb_socket: str = USERDB_SOCKET, metrics_listen: tuple[str, int] | None = None,
                 metrics_textfile: str | None = None, metrics_interval: float = 15.0,
                 machine_socket: str | None = None, personality: str = personality.AUTO,
                 user: UserScope | None = None, register_oci: bool = False) -> None:  # fmt: skip
        # The per-user instance (262's --user): the user's bus, sockets, state and images.
        self.user = user
        if user is not None:
            bus_address = bus_address or user.bus_address
            if state_dir == STATE_DIR:
                state_dir = user.state_dir
            userdb_socket = ""  # (262's user instance serves no user records)
        self.bus_address = bus_address
        self.personality = personality
        self.userdb_socket = userdb_socket
        self.userdb: VarlinkServer | None = None
        # None: upstream's sockets (passed by systemd, or bound here) on the system bus only
        self.machine_socket = machine_socket
        self.machine_varlink: VarlinkServer | None = None
        self.resolve_hook: VarlinkServer | None = None  # io.systemd.Resolve.Hook (262)
        self._hook_changed: Callable[[], None] | None = None
        self.state_dir = state_dir
        machine_id = read_machine_id()
        self.machine_id = machine_id
        host = host_machine(bytes.fromhex(machine_id) if len(machine_id) == 32 else b"", boot_timestamp())
        self.manager = MachineManager(host, StateDir(state_dir))
        # The core's events, to each subscriber: the D-Bus signals (and what goes with them, the
        # metrics), and the watchers of our own varlink interface (machined.varlink.ours).
        self.manager.events.subscribe(self._on_event)
        self.ours: VarlinkServer | None = None  # io.machined.Machine
        self._ours_service: OursService | None = None
        if user is not None:
            self.manager.registry.remove(host)  # a user's instance has no .host machine
            self.manager.user_scope = True
            self.manager.pool_path = user.pool_path
            from machined.clients import polkit

            polkit.ask_polkit = False
            from machined.images import pool

            pool.use_user_search_path(user.image_search_path, user.pool_path)
            from machined.images import lock

            lock.use_user_lock_dir(user.lock_dir)
        self.log_control = LogControl(IDENTIFIER)
        self.bus: MessageBus | None = None
        self._stop = asyncio.Event()
        self.metrics_listen = metrics_listen
        self.metrics_textfile = metrics_textfile
        self.metrics_interval = metrics_interval
        self.metrics: Metrics | None = None
        # --register-oci: podman's and docker's containers as machines (machined.oci, loaded only then).
        self.register_oci = register_oci
        self.oci: OciWatcher | None = None

    async def run(self) -> int:
        """Serve until SIGTERM or until the bus goes away; exit status 0 either way, as 252
        (bus activation starts us again on the next call)."""
        raise_fd_limit()
        # Some programs test this directory's existence to decide that machined runs.
        os.makedirs(self.state_dir, mode=0o755, exist_ok=True)
        self.bus = await self._connect()
        systemd = Systemd(self.bus)
        self.manager.systemd = systemd
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            self._start_metrics()
            await systemd.connect(self.manager)
            await self._decide_personality(systemd)
            if self.register_oci:
                from machined.oci.watcher import OciWatcher

                self.oci = OciWatcher(self.manager, list_units=systemd.list_units_by_patterns)
                await systemd.watch_unit_new()
            tree = MachinedTree(self.manager, self.log_control)
            dispatcher = Dispatcher(self.bus, tree, self.machine_id)
            if self.metrics is not None:
                dispatcher.observe = self.metrics.observe_call
            dispatcher.install()
            await self._request_name(self.bus)
            await self.manager.load_state()
            if self.metrics is not None:  # machines recovered from state files are no registrations
                self.manager.events.subscribe(_count_in(self.metrics))
            self.manager.start_gc()
            if self.oci is not None:
                # The containers running now, registered before the first caller is served (as
                # machines read back from state files are); a slow runtime delays that 3 s at most.
                await self.oci.scan()
                await self.oci.settle(OCI_START_WAIT)
                log.info("Registering podman's and docker's containers as machines.")
            await self._start_userdb()
            await self._start_machine_varlink()
            await self._start_resolve_hook()
            await self._start_ours()
            dispatcher.ready.set()
            notify.ready(f"Serving {BUS_NAME}.")
            return_free_memory()
            log.info("Serving %s on the bus.", BUS_NAME)
            watchdog = notify.start_watchdog(loop)
            # (dbus-fast leaves wait_for_disconnect unannotated)
            disconnected = asyncio.ensure_future(self.bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
            stopped = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({disconnected, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if watchdog is not None:
                watchdog.cancel()
            await self.manager.stop_gc()
            if self.oci is not None:
                self.oci.close()
            if self.userdb is not None:
                await self.userdb.stop()
            if self.machine_varlink is not None:
                await self.machine_varlink.stop()
            if self.resolve_hook is not None:
                await self.resolve_hook.stop()
            await self._stop_ours()
            if disconnected.done():
                disconnected.exception()  # how it went away (EOFError...) is no news: no traceback
                log.warning("Lost the connection to the bus; exiting.")
                return 0
            disconnected.cancel()
            notify.stopping()
            log.info("Exiting.")
            return 0
        finally:
            if self.metrics is not None:
                self.metrics.stop()
            if self.bus.connected:
                self.bus.disconnect()

    async def _decide_personality(self, systemd: Systemd) -> None:
        """252 or 262, from PID 1's version unless told (before any object is built)."""
        if self.personality == personality.AUTO:
            version = await systemd.version()
            personality.set_personality(personality.from_version(version))
            log.debug("PID 1 is systemd %s: answering as systemd-machined %s.", version or "(unknown)",
                      personality.current())  # fmt: skip
        else:
            personality.set_personality(self.personality)

    async def _start_userdb(self) -> None:
        """Serve container users and groups to the host's user database, as upstream does."""
        if not self.userdb_socket:
            return
        self.userdb = VarlinkServer(userdb_service(self.manager), [self.userdb_socket])
        try:
            await self.userdb.start()
        except OSError as e:
            log.warning("Not serving the user database on %s: %s", self.userdb_socket, e)
            self.userdb = None

    async def _start_machine_varlink(self) -> None:
        """io.systemd.Machine over varlink (262): on the socket systemd passed us (socket
        activation, FileDescriptorName=varlink), else on the path we bind ourselves."""
        from machined.clients import polkit
        from machined.varlink import machine as machine_varlink
        from machined.varlink.server import listen_fds

        socket_path, image_link, registry = MACHINE_SOCKET, MACHINE_IMAGE_LINK, VARLINK_REGISTRY
        if self.user is not None:
            socket_path, image_link = self.user.machine_socket, self.user.machine_image_link
            registry = self.user.varlink_registry
        sockets = listen_fds("varlink")
        if sockets:
            paths: list[str] = []
        elif self.machine_socket is None and self.user is None and personality.is_262():
            # Not socket-activated, 262 binds both names as sockets of their own (no registry entries).
            paths = [socket_path, image_link] if self.bus_address is None else []
        elif self.machine_socket is None and self.user is None:
            paths = [socket_path] if self.bus_address is None else []  # (and the link and registry entries)
        elif self.machine_socket is None:
            paths = [socket_path]
        else:
            paths = [self.machine_socket] if self.machine_socket else []
        if not sockets and not paths:
            return
        from machined import __version__

        service = machine_varlink.machine_service(self.manager, polkit=polkit.check, bus=self.bus, version=__version__)
        mode = 0o600 if self.user is not None else 0o666  # (as 262's socket units)
        self.machine_varlink = VarlinkServer(service, paths, sockets=sockets, mode=mode)
        try:
            await self.machine_varlink.start()
        except OSError as e:
            log.warning("Not serving io.systemd.Machine on %s: %s", ", ".join(paths), e)
            self.machine_varlink = None
            return
        if paths == [socket_path] or sockets:
            for link in (image_link, *(os.path.join(registry, os.path.basename(p))
                                       for p in (socket_path, image_link))):  # fmt: skip
                _symlink(socket_path, link)

    async def _start_resolve_hook(self) -> None:
        """io.systemd.Resolve.Hook (262): machine names for systemd-resolved, on a socket of its own
        that the daemon always binds itself (as 262), next to io.systemd.Machine's."""
        if (self.machine_varlink is None or self.user is not None or self.machine_socket is not None
                or not personality.is_262()):  # fmt: skip
            return
        from machined import __version__
        from machined.varlink import resolve_hook

        service, hook = resolve_hook.resolve_hook_service(self.manager, version=__version__)
        self.resolve_hook = VarlinkServer(service, [resolve_hook.SOCKET])
        try:
            await self.resolve_hook.start()
        except OSError as e:
            log.warning("Not serving io.systemd.Resolve.Hook on %s: %s", resolve_hook.SOCKET, e)
            self.resolve_hook = None
            return
        self._hook_changed = hook.changed

    async def _start_ours(self) -> None:
        """io.machined.Machine, this project's own interface (events, run), on a socket of its
        own: /run/machined/io.machined.Machine, or $XDG_RUNTIME_DIR/machined/… for --user.
        Only where upstream's io.systemd.Machine is served by us on its standard path (not on a
        private bus, not with --machine-socket): tests and side-by-side runs get none."""
        if self.machine_socket is not None or (self.bus_address is not None and self.user is None):
            return
        from machined.clients import polkit
        from machined.varlink import ours

        path = ours.user_socket(self.user.runtime_dir) if self.user is not None else ours.SOCKET
        service = ours.OursService(self.manager, polkit=polkit.check, bus=self.bus)
        self.ours = VarlinkServer(service.service, [path], mode=0o600 if self.user is not None else 0o666)
        try:
            await self.ours.start()
        except OSError as e:
            log.warning("Not serving io.machined.Machine on %s: %s", path, e)
            self.ours = None
            service.close()
            return
        self._ours_service = service

    async def _stop_ours(self) -> None:
        if self._ours_service is not None:
            self._ours_service.close()
        if self.ours is not None:
            await self.ours.stop()

    def _start_metrics(self) -> None:
        """Export metrics if asked to; prometheus_client is imported only then."""
        if self.metrics_listen is None and not self.metrics_textfile:
            return
        from machined.children import limits
        from machined.metrics import Metrics

        self.metrics = Metrics(self.manager, limits.children, known_methods())
        try:
            if self.metrics_listen is not None:
                host, port = self.metrics_listen
                self.metrics.serve(host, port)
                log.info("Serving metrics on http://%s/metrics.", _host_port(host, self.metrics.port))
            if self.metrics_textfile:
                self.metrics.start_textfile(self.metrics_textfile, self.metrics_interval)
        except OSError as e:
            self.metrics.stop()
            raise StartupError(f"Cannot export metrics: {e}") from e

    def _on_event(self, event: Event, machine: Machine) -> None:
        """A machine came or went: MachineNew / MachineRemoved on the Manager object; other
        events (state changes) have no D-Bus signal (upstream's Manager sends none)."""
        if event.kind == events.NEW:
            self._announce("MachineNew", machine)
        elif event.kind == events.REMOVED:
            self._announce("MachineRemoved", machine)

    def _announce(self, signal_name: str, machine: Machine) -> None:
        """MachineNew / MachineRemoved on the Manager object."""
        if self._hook_changed is not None:
            self._hook_changed()
        if self.bus is None or not self.bus.connected:
            return
        self.bus.send(
            new_signal(
                MANAGER_PATH,
                "org.freedesktop.machine1.Manager",
                signal_name,
                "so",
                [machine.name, machine.object_path],
            )
        )

    async def _connect(self) -> MessageBus:
        internals.install()  # dbus-fast's internals checked: our reader and writer, or its own
        try:
            if self.bus_address:
                bus = MessageBus(bus_address=self.bus_address, negotiate_unix_fd=True)
            else:
                bus = MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
            return await bus.connect()
        except (OSError, ValueError) as e:
            where = self.bus_address or "the system bus"
            raise StartupError(f"Failed to connect to {where}: {e}") from e

    async def _request_name(self, bus: MessageBus) -> None:
        reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        if reply in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            return
        owner = await _describe_owner(bus, BUS_NAME)
        raise StartupError(f"{BUS_NAME} is already owned on this bus{owner}; is systemd-machined running?")


def _count_in(metrics: Metrics) -> Callable[[Event, Machine], None]:
    """The metrics as a subscriber of the core's events: registrations and removals by class."""

    def count(event: Event, machine: Machine) -> None:
        if event.kind == events.NEW:
            metrics.announced("MachineNew", machine)
        elif event.kind == events.REMOVED:
            metrics.announced("MachineRemoved", machine)

    return count


def _symlink(target: str, link: str) -> None:
    """*link* → *target*, replaced atomically if it points elsewhere; failures only logged."""
    try:
        if os.path.islink(link) and os.readlink(link) == target:
            return
        os.makedirs(os.path.dirname(link), mode=0o755, exist_ok=True)
        tmp = link + ".machined"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.symlink(target, tmp)
        os.rename(tmp, link)
    except OSError as e:
        log.debug("Cannot link %s to %s: %s", link, target, e)


def known_methods() -> set[tuple[str, str]]:
    """Every (interface, method) we serve: the only ones metrics may name."""
    names = ["org.freedesktop.machine1.Manager", "org.freedesktop.machine1.Machine",
             "org.freedesktop.machine1.Image", "org.freedesktop.LogControl1"]  # fmt: skip
    known = {(name, method) for name in names for method in load_interface(name).methods}
    standard = re.findall(r'<interface name="([^"]+)">(.*?)</interface>', STANDARD_INTERFACES_XML, re.S)
    known.update((name, m) for name, body in standard for m in re.findall(r'<method name="([^"]+)"', body))
    return known


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _describe_owner(bus: MessageBus, name: str) -> str:
    try:
        (pid,) = await call_bus_daemon(bus, "GetConnectionUnixProcessID", "s", [name])
    except BusError:
        return ""
    import psutil  # here: only a daemon that cannot take the name asks, the running one does without it

    try:
        return f" by PID {pid} ({psutil.Process(pid).name()})"
    except (psutil.Error, ValueError):  # gone meanwhile
        return f" by PID {pid}"

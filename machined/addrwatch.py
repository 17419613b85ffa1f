"""Address changes as events, while somebody watches: no polling, no process.

While at least one ``io.machined.Machine.Watch`` caller is connected (and only then), each
container with a network namespace of its own, and ``.host``, has a NETLINK_ROUTE socket
subscribed to the IPv4 and IPv6 address groups (``RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR``).
A container's socket is created in its namespace as the addresses look creates its own
(:func:`machined.inside.looks._netlink_socket_in`: a short-lived thread joins the namespace
through the pinned leader's pidfd, creates the socket and leaves), in a look thread; ``.host``'s
is one of the daemon's namespace. Each socket is watched with ``loop.add_reader``.

An RTM_NEWADDR/RTM_DELADDR is not parsed: it says the addresses changed. The first one starts
a timer of :data:`COALESCE` seconds (not restarted by the next ones: a veth coming up adds
several addresses, which make one event); then the addresses are read once, as
GetMachineAddresses reads them (a read of its own, never joined to one of GetMachineAddresses
in flight), and an ``addresses`` change is emitted if they differ from those
last seen. Notices that arrive during the read make another read after it. A socket whose
buffer overflowed (ENOBUFS: notices were lost) counts as a notice.

Containers that share the host's network namespace have no socket (their addresses are the
host's, reported as ``.host``'s); VMs have none (machined cannot see their addresses).
Sockets are closed when their machine goes (or its leader changes: reopened for the new one)
and when the last watcher leaves (:meth:`AddressWatch.stop`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Awaitable, Callable

from machined import events as ev
from machined.inside.addresses import Address
from machined.machine import Machine, MachineClass
from machined.manager import MachineManager

log = logging.getLogger(__name__)

COALESCE = 0.02  # seconds from the first notice of a burst to the read of the addresses
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
RTNLGRP_IPV4_IFADDR = 5
RTNLGRP_IPV6_IFADDR = 9
RECEIVE_BUFFER = 64 * 1024  # a notice is ~80 bytes: a burst of hundreds fits; past it ENOBUFS

OpenSocket = Callable[[Machine], Awaitable[socket.socket]]
ReadAddresses = Callable[[Machine], Awaitable[list[Address]]]


def subscribe_addresses(sock: socket.socket) -> None:
    """Join *sock* (a bound NETLINK_ROUTE socket, of whatever namespace) to the address groups."""
    for group in (RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV6_IFADDR):
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    except OSError:
        pass
    sock.setblocking(False)


async def open_socket(machine: Machine) -> socket.socket:
    """A NETLINK_ROUTE socket of *machine*'s network namespace, subscribed to address changes."""
    from machined.inside import looks
    from machined.inside.addresses import netlink_socket

    if machine.is_host:
        sock = netlink_socket()
    else:
        sock = await looks._in_thread(machine, "address-socket", lambda _leader, pidfd: looks._netlink_socket_in(pidfd),
                                      looks.PROBE_TIMEOUT, lambda s: s.close())  # fmt: skip
    try:
        subscribe_addresses(sock)
    except BaseException:
        sock.close()
        raise
    return sock


async def read_addresses(machine: Machine) -> list[Address]:
    """*machine*'s addresses, read as GetMachineAddresses reads them, by a read of our own (never
    joined to a GetMachineAddresses in flight, which may have dumped them before the change)."""
    from machined.inside import looks
    from machined.inside.addresses import read_addresses as dump
    from machined.inside.lookthreads import threads

    if machine.is_host:
        return await threads.run(("address-events", ".host"),
                                 lambda: (lambda: dump(None, looks.PROBE_TIMEOUT), _nothing),
                                 looks.PROBE_TIMEOUT)  # fmt: skip
    return await looks._in_thread(machine, "address-events", looks._addresses_of, looks.PROBE_TIMEOUT)


def _nothing() -> None:
    pass


def own_network(machine: Machine) -> bool:
    """Whether *machine* gets a socket: ``.host``, or a container with a live leader in a network
    namespace other than the daemon's."""
    if machine.is_host:
        return True
    if machine.machine_class is not MachineClass.CONTAINER or machine.leader <= 0:
        return False
    from machined.inside import looks

    try:
        return not looks.same_netns(machine.leader)
    except Exception:  # gone, or /proc not readable: nothing to watch
        return False


class _Source:
    """One machine's socket, its pending read and the addresses it last reported."""

    __slots__ = ("machine", "sock", "task", "timer", "dirty", "seen", "closed")

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.sock: socket.socket | None = None
        self.task: asyncio.Task[None] | None = None  # opening, or reading the addresses
        self.timer: asyncio.TimerHandle | None = None
        self.dirty = False  # notices arrived while reading
        self.seen: list[Address] | None = None
        self.closed = False


class AddressWatch:
    """Address change events of *manager*'s machines while started; see the module's description."""

    def __init__(self, manager: MachineManager, coalesce: float = COALESCE,
                 opener: OpenSocket = open_socket, reader: ReadAddresses = read_addresses,
                 eligible: Callable[[Machine], bool] = own_network) -> None:  # fmt: skip
        self.manager = manager
        self.coalesce = coalesce
        self.opener = opener
        self.reader = reader
        self.eligible = eligible
        self.sources: dict[int, _Source] = {}  # by machine identity
        self._unsubscribe: Callable[[], None] | None = None

    @property
    def started(self) -> bool:
        return self._unsubscribe is not None

    def start(self) -> None:
        if self._unsubscribe is not None:
            return
        self._unsubscribe = self.manager.events.subscribe(self._on_event)
        for machine in self.manager.machines():
            if machine.is_host or self.manager.events.known(machine):
                self._consider(machine)

    def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for source in list(self.sources.values()):
            self._close(source)

    def _on_event(self, event: ev.Event, machine: Machine) -> None:
        if event.kind == ev.REMOVED:
            self._close_machine(machine)
        elif event.kind == ev.CHANGED and "leader" in event.changed:
            self._close_machine(machine)
            self._consider(machine)
        elif event.kind in (ev.NEW, ev.STATE):
            self._consider(machine)

    def _consider(self, machine: Machine) -> None:
        if id(machine) in self.sources or str(machine.state) == "closing" or not self.eligible(machine):
            return
        source = _Source(machine)
        self.sources[id(machine)] = source
        source.task = asyncio.get_running_loop().create_task(self._open(source))

    def _close_machine(self, machine: Machine) -> None:
        source = self.sources.get(id(machine))
        if source is not None:
            self._close(source)

    def _close(self, source: _Source) -> None:
        source.closed = True
        if self.sources.get(id(source.machine)) is source:
            del self.sources[id(source.machine)]
        if source.timer is not None:
            source.timer.cancel()
            source.timer = None
        if source.task is not None:
            source.task.cancel()
            source.task = None
        if source.sock is not None:
            try:
                asyncio.get_running_loop().remove_reader(source.sock.fileno())
            except (RuntimeError, ValueError):
                pass
            source.sock.close()
            source.sock = None

    async def _open(self, source: _Source) -> None:
        machine = source.machine
        try:
            sock = await self.opener(machine)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the leader went, the namespace cannot be joined: nothing to watch
            log.debug("No address events for %s: %s", machine.name, e)
            if self.sources.get(id(machine)) is source:
                del self.sources[id(machine)]
            return
        if source.closed:
            sock.close()
            return
        source.sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable, source)
        # What there is now, subscribed first: a change from here on makes a notice.
        try:
            source.seen = await self.reader(machine)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.debug("Could not read the addresses of %s: %s", machine.name, e)
        source.task = None
        if source.dirty:
            source.dirty = False
            self._schedule(source)

    def _readable(self, source: _Source) -> None:
        sock = source.sock
        if sock is None:
            return
        got = False
        while True:
            try:
                if not sock.recv(65536):
                    break
                got = True
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # notices were lost: the addresses changed anyway
                    got = True
                    continue
                log.debug("Address events of %s end: %s", source.machine.name, e)
                self._close(source)
                return
        if got:
            self._schedule(source)

    def _schedule(self, source: _Source) -> None:
        if source.closed:
            return
        if source.task is not None:  # opening or reading: read again after it
            source.dirty = True
            return
        if source.timer is None:
            source.timer = asyncio.get_running_loop().call_later(self.coalesce, self._read_now, source)

    def _read_now(self, source: _Source) -> None:
        source.timer = None
        if not source.closed:
            source.task = asyncio.get_running_loop().create_task(self._read(source))

    async def _read(self, source: _Source) -> None:
        machine = source.machine
        try:
            addresses = await self.reader(machine)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.debug("Could not read the addresses of %s: %s", machine.name, e)
            addresses = None
        source.task = None
        if source.closed:
            return
        if addresses is not None and addresses != source.seen:
            source.seen = addresses
            self.manager.events.addresses_changed(machine, addresses)
        if source.dirty:
            source.dirty = False
            self._schedule(source)

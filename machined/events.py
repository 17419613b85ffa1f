"""Machine events: what changed in the registry, emitted once to every subscriber.

The manager reports each change here (:meth:`Events.machine_new`, :meth:`Events.update`,
:meth:`Events.machine_removed`); subscribers (the D-Bus signals, the varlink ``Watch``
stream, the metrics) each get every :class:`Event` (with the machine it is about), in
order, synchronously. A
subscriber must not block: one that has I/O to do queues the event and returns.

Kinds:

* ``new``: a machine started (registered and its unit known);
* ``state``: its state changed (opening → running → closing);
* ``changed``: its leader or unit changed (``changed`` names which), or its addresses
  (``changed`` is ``addresses``, the event carries the new list; reported only while somebody
  watches them, by :mod:`machined.addrwatch`);
* ``removed``: it is gone.

Each event carries a sequence number (1, 2, 3… for the daemon's life, one per event,
whatever the subscriber) and when it happened (realtime and monotonic, in µs).

Free of D-Bus and varlink; no I/O.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from machined.inside.addresses import Address
from machined.machine import Machine

log = logging.getLogger(__name__)

NEW = "new"
STATE = "state"
CHANGED = "changed"
REMOVED = "removed"
KINDS = (NEW, STATE, CHANGED, REMOVED)


@dataclass(frozen=True, slots=True)
class Event:
    sequence: int
    kind: str
    name: str
    machine_class: str
    service: str
    state: str
    leader: int
    unit: str
    realtime: int  # µs since the epoch
    monotonic: int  # µs of CLOCK_MONOTONIC
    changed: tuple[str, ...] = ()  # for "changed": which of "leader", "unit"; or "addresses"
    addresses: tuple[Address, ...] | None = None  # for "changed" addresses: the list now


# Called with each event and the machine it is about (its record as it is now; for
# ``removed``, as it was when it went).
Subscriber = Callable[[Event, Machine], None]

# What a machine looked like when last reported: (state, leader, unit).
_Seen = tuple[str, int, str]


def _seen(machine: Machine) -> _Seen:
    return (str(machine.state), machine.leader, machine.unit)


class Events:
    """The event source: numbers events and hands each to every subscriber."""

    def __init__(self) -> None:
        self.sequence = 0  # the last event's number
        self._subscribers: list[Subscriber] = []
        self._seen: dict[int, _Seen] = {}  # machine identity → as last reported

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add *subscriber*; returns what removes it."""
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            try:
                self._subscribers.remove(subscriber)
            except ValueError:
                pass

        return unsubscribe

    # ----- what the manager reports --------------------------------------------------------

    def machine_new(self, machine: Machine) -> None:
        self._seen[id(machine)] = _seen(machine)
        self._emit(NEW, machine)

    def update(self, machine: Machine) -> None:
        """*machine* may have changed: a ``state`` and/or ``changed`` event if it did."""
        before = self._seen.get(id(machine))
        if before is None:
            return  # not announced (yet): nothing to compare with
        now = _seen(machine)
        if now == before:
            return
        self._seen[id(machine)] = now
        if now[0] != before[0]:
            self._emit(STATE, machine)
        changed = tuple(name for name, a, b in (("leader", before[1], now[1]), ("unit", before[2], now[2])) if a != b)
        if changed:
            self._emit(CHANGED, machine, changed)

    def machine_removed(self, machine: Machine) -> None:
        if self._seen.pop(id(machine), None) is None:
            return
        self._emit(REMOVED, machine)

    def addresses_changed(self, machine: Machine, addresses: list[Address]) -> None:
        """*machine*'s addresses are now *addresses*: a ``changed`` event naming ``addresses``."""
        if machine.is_host or id(machine) in self._seen:
            self._emit(CHANGED, machine, ("addresses",), tuple(addresses))

    def known(self, machine: Machine) -> bool:
        return id(machine) in self._seen

    # ----- emission ------------------------------------------------------------------------

    def _emit(self, kind: str, machine: Machine, changed: tuple[str, ...] = (),
              addresses: tuple[Address, ...] | None = None) -> None:  # fmt: skip
        self.sequence += 1
        event = Event(
            sequence=self.sequence,
            kind=kind,
            name=machine.name,
            machine_class=str(machine.machine_class),
            service=machine.service,
            state=str(machine.state),
            leader=machine.leader,
            unit=machine.unit,
            realtime=time.clock_gettime_ns(time.CLOCK_REALTIME) // 1000,
            monotonic=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000,
            changed=changed,
            addresses=addresses,
        )
        for subscriber in list(self._subscribers):
            try:
                subscriber(event, machine)
            except Exception:
                log.exception("An event subscriber failed on %s of %s", kind, machine.name)


def snapshot(machine: Machine, sequence: int) -> Event:
    """A current machine as a watcher's first replies show it (kind ``existing``): *sequence*
    is the last event's number at the time, the events that follow have the next ones."""
    now_rt = time.clock_gettime_ns(time.CLOCK_REALTIME) // 1000
    now_mono = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return Event(sequence, "existing", machine.name, str(machine.machine_class), machine.service,
                 str(machine.state), machine.leader, machine.unit, now_rt, now_mono)  # fmt: skip

"""How D-Bus senders share the daemon: per-sender queues served round-robin, root first.

dbus-daemon queues every message for our one connection in arrival order, so a peer that
writes calls as fast as it can (NO_REPLY_EXPECTED ones cost it nothing: dbus-daemon bounds
only calls awaiting a reply, 128 per connection) would put everybody else's calls behind all of
its own. The bus reader takes what is waiting (machined.dbus.internals) and the dispatcher
puts each method call in its sender's queue; calls are then served one per sender in turn,
senders known to be root first, a bounded number per turn of the event loop.

A sender (a unique bus name, i.e. one connection) may have about ``max_bytes`` (4 MiB) of
arguments waiting, all senders together ``max_total_bytes`` (64 MiB), and a call flagged
NO_REPLY_EXPECTED is taken only while fewer than ``max_messages`` (128) of the sender's calls
wait (calls expecting a reply are bounded by dbus-daemon already: 128 awaiting replies per
connection on the system bus); a sender's first waiting call is always taken if it is small
(64 KiB), so that one flood cannot shut others out. A call over the bound is not queued: one
expecting a reply is answered at once with ``org.freedesktop.DBus.Error.LimitsExceeded``,
one flagged NO_REPLY_EXPECTED is dropped (as dbus-daemon drops what it cannot queue).
Connections known to be root's are never bounded.
A sender may also be held: its calls queue but are not served until it is released. The
dispatcher holds a connection (not root's) while MAX_WAITING_CALLS of its calls wait on
something (polkit, systemd, a thread, a child), so that a flood of such calls does not
multiply the work behind them.
This module is the policy alone; machined.dbus.objects applies it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T")

MAX_MESSAGES = 128  # per sender: dbus-daemon's own bound on a connection's calls awaiting replies
MAX_BYTES = 4 << 20  # per sender, estimated from the arguments...
MAX_TOTAL_BYTES = 64 << 20  # ... and for all senders but root's
FIRST_ALWAYS = 64 << 10  # a sender's first waiting call always fits up to this size


class _Sender(Generic[T]):
    __slots__ = ("bytes", "items", "priority")

    def __init__(self, priority: bool) -> None:
        self.items: deque[tuple[T, int]] = deque()
        self.bytes = 0
        self.priority = priority


class FairQueue(Generic[T]):
    """Items queued per sender; :meth:`pop` serves senders in turn, priority ones first.

    A sender's items come out in the order they went in. A sender is in the ring of its class
    while it has items waiting; it goes to the back of the ring after each item served.
    """

    def __init__(self, max_messages: int = MAX_MESSAGES, max_bytes: int = MAX_BYTES,
                 max_total_bytes: int = MAX_TOTAL_BYTES) -> None:  # fmt: skip
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_total_bytes = max_total_bytes
        self._bytes = 0
        self._senders: dict[Hashable, _Sender[T]] = {}
        self._rings: tuple[deque[Hashable], deque[Hashable]] = (deque(), deque())  # (priority, others)
        self._held: set[Hashable] = set()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def ready(self) -> bool:
        """Whether a call can be popped (some sender that is not held has calls waiting)."""
        return bool(self._rings[0] or self._rings[1])

    def hold(self, sender: Hashable) -> None:
        """Serve nothing more of *sender* until :meth:`release` (its calls still queue)."""
        if sender in self._held:
            return
        self._held.add(sender)
        entry = self._senders.get(sender)
        if entry is not None:
            self._rings[0 if entry.priority else 1].remove(sender)

    def release(self, sender: Hashable) -> None:
        if sender not in self._held:
            return
        self._held.discard(sender)
        entry = self._senders.get(sender)
        if entry is not None:
            self._rings[0 if entry.priority else 1].append(sender)

    def promote(self, sender: Hashable) -> None:
        """*sender* is root's: its waiting calls are served first from now on."""
        entry = self._senders.get(sender)
        if entry is None or entry.priority:
            return
        entry.priority = True
        if sender not in self._held:
            self._rings[1].remove(sender)
            self._rings[0].append(sender)

    def held(self, sender: Hashable) -> bool:
        return sender in self._held

    def waiting(self, sender: Hashable) -> int:
        entry = self._senders.get(sender)
        return len(entry.items) if entry is not None else 0

    def push(self, sender: Hashable, item: T, size: int = 0, priority: bool = False, no_reply: bool = True) -> bool:
        """Queue *item* (*size* bytes) from *sender*; False (nothing queued) when the sender is over
        its bound: bytes for every call, the count too for one expecting no reply (*no_reply*).
        *priority* senders (root) are served first and never bounded."""
        entry = self._senders.get(sender)
        if priority or (entry is not None and entry.priority):
            pass
        elif entry is None or not entry.items:  # a sender's first waiting call
            if size > FIRST_ALWAYS and self._bytes + size > self.max_total_bytes:
                return False
        elif (
            entry.bytes + size > self.max_bytes
            or self._bytes + size > self.max_total_bytes
            or (no_reply and len(entry.items) >= self.max_messages)
        ):
            return False
        if entry is None:
            entry = self._senders[sender] = _Sender(priority)
            if sender not in self._held:
                self._rings[0 if priority else 1].append(sender)
        elif priority and not entry.priority:  # learned to be root while waiting
            self.promote(sender)
        entry.items.append((item, size))
        entry.bytes += size
        self._bytes += size
        self._count += 1
        return True

    def pop(self) -> T:
        """The next item: the first waiting of the next sender in turn (held ones aside).
        IndexError when there is none."""
        ring = self._rings[0] if self._rings[0] else self._rings[1]
        sender = ring.popleft()  # IndexError when both are empty
        entry = self._senders[sender]
        item, size = entry.items.popleft()
        entry.bytes -= size
        self._bytes -= size
        self._count -= 1
        if entry.items:
            ring.append(sender)
        else:
            del self._senders[sender]
        return item


def estimated_size(body: list[object]) -> int:
    """A cheap estimate of what a call's arguments take (strings and arrays at the top level)."""
    size = 256
    for arg in body:
        if isinstance(arg, str | bytes | bytearray):
            size += len(arg)
        elif isinstance(arg, list | dict | tuple):
            size += 16 * len(arg)
    return size

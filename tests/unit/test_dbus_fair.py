"""How D-Bus senders share the daemon (machined.dbus.fair, applied by the dispatcher): calls
wait per sender and are served one sender at a time, root's connections first; a sender over its
bound gets LimitsExceeded for a call expecting a reply, its NO_REPLY_EXPECTED calls are dropped."""

from __future__ import annotations

import asyncio

from dbus_fast import Message, MessageFlag

from machined.dbus import fair, objects
from machined.dbus.fair import FairQueue, estimated_size
from machined.dbus.objects import Credentials
from tests.unit.test_dispatch import MANAGER, MANAGER_IFACE, dispatcher_for, manager_with


def test_senders_are_served_in_turn_each_in_its_own_order() -> None:
    q: FairQueue[str] = FairQueue()
    for i in range(4):
        assert q.push("flood", f"f{i}")
    assert q.push("a", "a0") and q.push("a", "a1") and q.push("b", "b0")
    assert len(q) == 7
    assert [q.pop() for _ in range(7)] == ["f0", "a0", "b0", "f1", "a1", "f2", "f3"]
    assert len(q) == 0 and q.waiting("flood") == 0


def test_root_first_and_never_bounded() -> None:
    q: FairQueue[str] = FairQueue(max_messages=2, max_bytes=1000)
    assert q.push("user", "u0") and q.push("user", "u1")
    assert q.push("root", "r0", priority=True)
    for i in range(1, 10):
        assert q.push("root", f"r{i}", size=5000, priority=True)  # over both bounds: taken
    assert q.push("late", "l0")
    assert q.push("late", "l1", priority=True)  # learned to be root while waiting: moves up
    out = [q.pop() for _ in range(len(q))]
    assert out == ["r0", "l0", "r1", "l1"] + [f"r{i}" for i in range(2, 10)] + ["u0", "u1"]


def test_a_sender_over_its_bound() -> None:
    q: FairQueue[int] = FairQueue(max_messages=3, max_bytes=1000)
    assert all(q.push("s", i) for i in range(3))
    assert not q.push("s", 3)  # a fourth expecting no reply: refused
    assert q.push("s", 4, no_reply=False)  # one expecting a reply: dbus-daemon bounds those
    assert not q.push("s", 5, size=1001, no_reply=False)  # too many bytes: refused either way
    assert q.push("other", 6)  # another sender is not affected
    assert [q.pop() for _ in range(len(q))] == [0, 6, 1, 2, 4]
    assert q.push("s", 7, size=10**6)  # a sender's first waiting call fits while all together do
    assert not q.push("s", 8, size=1)


def test_all_senders_together_are_bounded_but_a_small_first_call_always_fits() -> None:
    q: FairQueue[int] = FairQueue(max_messages=100, max_bytes=1000, max_total_bytes=2500)
    assert q.push("a", 1, size=900) and q.push("b", 2, size=900)
    assert not q.push("a", 3, size=200, no_reply=False)  # past a's own bound
    assert q.push("c", 4, size=600)  # 2,400 in all
    assert not q.push("c", 5, size=200, no_reply=False)  # past the total
    assert q.push("d", 6, size=fair.FIRST_ALWAYS)  # a small first call: taken all the same
    assert not q.push("e", 7, size=fair.FIRST_ALWAYS + 1)  # a large one: not past the total
    assert q.push("root", 8, size=10**9, priority=True)  # root's: always
    assert [q.pop() for _ in range(len(q))] == [8, 1, 2, 4, 6]
    assert q.push("e", 7, size=2000)  # room again


def test_size_estimate() -> None:
    assert estimated_size([]) == 256
    assert estimated_size(["x" * 1000, b"y" * 10, [1, 2, 3], 7]) == 256 + 1000 + 10 + 48


def ping(sender: str, serial: int, flags: MessageFlag = MessageFlag.NO_REPLY_EXPECTED) -> Message:
    return Message(destination="org.freedesktop.machine1", path=MANAGER, interface="org.freedesktop.DBus.Peer",
                   member="Ping", serial=serial, sender=sender, flags=flags)  # fmt: skip


def list_machines(sender: str, serial: int) -> Message:
    return Message(destination="org.freedesktop.machine1", path=MANAGER, interface=MANAGER_IFACE,
                   member="ListMachines", serial=serial, sender=sender)  # fmt: skip


async def test_a_flood_does_not_hold_up_another_sender(tmp_path) -> None:  # type: ignore[no-untyped-def]
    dispatcher, bus = dispatcher_for(manager_with(tmp_path, ["a"]))
    served: list[tuple[str, int]] = []
    serve = dispatcher._serve

    def counting(message: Message, started: float) -> None:
        served.append((message.sender or "", message.serial))
        serve(message, started)

    dispatcher._serve = counting  # type: ignore[method-assign]
    # What one read-ahead brings: 1,000 calls of one flooder, then root's, then more of the flood.
    for i in range(1000):
        assert dispatcher._on_message(ping(":1.66", i + 1)) is True
    dispatcher._on_message(list_machines(":1.7", 5))
    dispatcher._on_message(ping(":1.66", 5000, MessageFlag.NONE))  # expects a reply: waits too
    big = Message(destination="org.freedesktop.machine1", path=MANAGER, interface=MANAGER_IFACE, member="GetMachine",
                  signature="s", body=["x" * fair.MAX_BYTES], serial=5001, sender=":1.66")  # fmt: skip
    dispatcher._on_message(big)  # over the bound in bytes: refused
    inline = objects.INLINE_PER_TURN
    assert len(served) == inline  # the first ones of a turn at once, the rest wait their turn
    assert len(dispatcher.queue) == fair.MAX_MESSAGES + 2  # the flood's bound, root's call, the one expecting a reply
    refused = [m for m in bus.sent if m.error_name]
    assert [(m.error_name, m.reply_serial) for m in refused] == [("org.freedesktop.DBus.Error.LimitsExceeded", 5001)]
    await asyncio.sleep(0)  # one turn of the loop
    assert served.index((":1.7", 5)) == inline + 1  # root's call right after the flood's next one
    listed = [m for m in bus.sent if m.reply_serial == 5]
    assert len(listed) == 1 and listed[0].signature == "a(ssso)"
    for _ in range(10):
        await asyncio.sleep(0)
    assert not dispatcher.queue
    assert len(served) == inline + fair.MAX_MESSAGES + 2
    # The no-reply calls got nothing: root's reply, the refusal and the flooder's one Ping reply were sent.
    assert sorted(m.reply_serial for m in bus.sent) == [5, 5000, 5001]


async def test_known_root_is_served_before_a_flood_already_waiting(tmp_path) -> None:  # type: ignore[no-untyped-def]
    dispatcher, bus = dispatcher_for(manager_with(tmp_path, []))
    dispatcher.credentials.put(":1.3", Credentials(pid=1, uid=0))
    for i in range(20):
        dispatcher._on_message(ping(":1.66", i + 1))
    for sender in (":1.67", ":1.68"):
        for i in range(5):
            dispatcher._on_message(ping(sender, i + 1))
    dispatcher._on_message(list_machines(":1.3", 99))
    objects.TURN_CALLS, saved = 1, objects.TURN_CALLS
    try:
        await asyncio.sleep(0)
    finally:
        objects.TURN_CALLS = saved
    assert [m.reply_serial for m in bus.sent] == [99]  # the turn's one call was root's
    for _ in range(5):
        await asyncio.sleep(0)
    assert not dispatcher.queue


def test_a_held_sender_keeps_its_calls_until_released() -> None:
    q: FairQueue[str] = FairQueue()
    q.hold("a")
    assert q.push("a", "a0") and q.push("b", "b0") and q.push("a", "a1")
    assert q.ready() and q.pop() == "b0"
    assert len(q) == 2 and not q.ready()  # a's calls wait while it is held
    q.release("a")
    assert [q.pop(), q.pop()] == ["a0", "a1"] and not q.ready()
    q.push("c", "c0")
    q.hold("c")
    assert not q.ready() and q.held("c")
    q.release("c")
    assert q.pop() == "c0"


async def test_a_connection_has_a_bounded_number_of_calls_waiting(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A call that waits (here on the image pool, in a thread) counts against its connection:
    past MAX_WAITING_CALLS its next calls wait their turn, others' are served meanwhile."""
    dispatcher, bus = dispatcher_for(manager_with(tmp_path, []))
    release = asyncio.Event()
    started: list[int] = []

    async def slow(call: object) -> list[list[object]]:
        started.append(len(started))
        await release.wait()
        return [[]]

    manager_object = dispatcher.tree._manager_object  # type: ignore[attr-defined]
    manager_object.methods[(MANAGER_IFACE, "ListMachines")] = slow
    for i in range(10):
        dispatcher._on_message(list_machines(":1.50", i + 1))
    dispatcher._on_message(ping(":1.51", 99, MessageFlag.NONE))
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(started) == objects.MAX_WAITING_CALLS  # the rest of :1.50's wait
    assert [m.reply_serial for m in bus.sent] == [99]  # another connection is served
    release.set()
    for _ in range(50):
        await asyncio.sleep(0)
    assert len(started) == 10 and not dispatcher.queue and not dispatcher._waiting
    assert sorted(m.reply_serial for m in bus.sent) == [*range(1, 11), 99]
    assert not any(m.error_name for m in bus.sent)


async def test_a_sender_over_its_bound_is_asked_for_and_root_is_never_bounded(tmp_path) -> None:  # type: ignore[no-untyped-def]
    dispatcher, bus = dispatcher_for(manager_with(tmp_path, []))
    asked: list[str] = []

    async def root_creds(self: objects.Call) -> Credentials:
        asked.append(self.sender)
        creds = Credentials(pid=1, uid=0)
        dispatcher.credentials.put(self.sender, creds)
        return creds

    objects.Call.credentials, saved = root_creds, objects.Call.credentials  # type: ignore[method-assign]
    try:
        n = objects.INLINE_PER_TURN + fair.MAX_MESSAGES
        for i in range(n + 10):  # 10 over the bound: dropped, and who it is asked once
            dispatcher._on_message(ping(":1.3", i + 1))
        assert len(dispatcher.queue) == fair.MAX_MESSAGES
        await asyncio.sleep(0)
        assert asked == [":1.3"]
        for i in range(1000):  # root's now: queued, however many
            dispatcher._on_message(ping(":1.3", n + 100 + i))
        assert dispatcher.queue.waiting(":1.3") > fair.MAX_MESSAGES
    finally:
        objects.Call.credentials = saved  # type: ignore[method-assign]


async def test_a_held_connection_found_to_be_roots_is_served_at_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Root's calls that wait (on a wedged PID 1, say) never hold up root's next calls: a fresh
    connection is held like any until the bus says it is root's, then released."""
    dispatcher, bus = dispatcher_for(manager_with(tmp_path, []))
    release = asyncio.Event()
    started: list[int] = []

    async def slow(call: object) -> list[list[object]]:
        started.append(len(started))
        await release.wait()
        return [[]]

    dispatcher.tree._manager_object.methods[(MANAGER_IFACE, "ListMachines")] = slow  # type: ignore[attr-defined]
    for i in range(10):
        dispatcher._on_message(list_machines(":1.40", i + 1))
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(started) == objects.MAX_WAITING_CALLS and dispatcher.queue.held(":1.40")
    dispatcher.credentials.put(":1.40", Credentials(pid=1, uid=0))  # as a call's lookup does
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(started) == 10 and not dispatcher.queue.held(":1.40") and not dispatcher._waiting
    release.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert sorted(m.reply_serial for m in bus.sent) == list(range(1, 11))
    assert not dispatcher._waiting and not dispatcher.queue

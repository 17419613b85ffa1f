"""dbus-fast's internals in one place (machined.dbus.internals). The bus reader: one read a
wakeup, never one that fails with EAGAIN, the messages parsed out of it a bounded number a turn;
descriptors given to the message they came with; split messages, the end of the connection, and
nothing kept after a message. The start-up check: everything installed on the pinned dbus-fast,
dbus-fast's own reader, writer or marshalling kept where a shape differs (faked here). No other
module of the package uses dbus-fast's private names."""

from __future__ import annotations

import asyncio
import os
import socket
from functools import partial
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType, Variant

from machined.dbus import internals


class CountingSocket(socket.socket):
    """Counts reads and reads that found nothing (EAGAIN)."""

    reads = 0
    empty = 0

    def recvmsg(self, *args: Any) -> Any:
        CountingSocket.reads += 1
        try:
            return super().recvmsg(*args)
        except BlockingIOError:
            CountingSocket.empty += 1
            raise


def wire(serial: int, unix_fds: list[int] | None = None, size: int = 0) -> bytes:
    message = Message(destination="org.freedesktop.machine1", path="/org/freedesktop/machine1",
                      interface="org.freedesktop.DBus.Peer", member="Ping", serial=serial, sender=":1.5",
                      signature="h" if unix_fds else ("s" if size else ""),
                      body=[0] if unix_fds else (["x" * size] if size else []),
                      unix_fds=unix_fds or [])  # fmt: skip
    return bytes(message._marshall(True))


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, b"".join(f.to_bytes(4, "little") for f in fds))])


async def until(got: list[Any], n: int) -> None:
    for _ in range(400):
        if len(got) >= n:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{len(got)} messages, not {n}")


async def test_reads_once_a_wakeup_and_gives_descriptors_to_their_message() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sock = CountingSocket(fileno=ours.detach())
    sock.setblocking(False)
    CountingSocket.reads = CountingSocket.empty = 0
    got: list[Message] = []
    failed: list[Exception | None] = []
    loop = asyncio.get_running_loop()

    def finalize(e: Exception | None) -> None:  # as dbus-fast's bus: no more reading
        failed.append(e)
        loop.remove_reader(sock.fileno())

    reader = internals.one_message_per_wakeup(sock, got.append, finalize, True)
    assert isinstance(reader, internals._Reader)
    loop.add_reader(sock.fileno(), reader)
    r, w = os.pipe()
    r2, w2 = os.pipe()
    try:
        theirs.send(wire(1))  # one call, as a client makes them: one read, none that fails
        await until(got, 1)
        assert CountingSocket.reads == 1 and CountingSocket.empty == 0
        assert reader.unmarshaller.message is None  # its bytes let go of at once
        theirs.send(wire(2) + wire(3) + wire(4))  # queued together: one read
        await until(got, 4)
        assert CountingSocket.reads == 2 and CountingSocket.empty == 0
        # Descriptors with a message after others, then one without, then one whose descriptors
        # come with a read that ends inside it (its first bytes).
        theirs.send(wire(5) + wire(6))
        send_with_fds(theirs, wire(7, [r]), [r])
        theirs.send(wire(8))
        big = wire(9, [r2])
        send_with_fds(theirs, big[:40], [r2, w2])
        await asyncio.sleep(0.05)
        theirs.send(big[40:])
        split = wire(10)
        theirs.send(split[:20])
        await until(got, 9)
        theirs.send(split[20:])
        await until(got, 10)
        assert [m.serial for m in got] == list(range(1, 11))
        assert all(m.message_type is MessageType.METHOD_CALL for m in got)
        with_fds = {m.serial: m.unix_fds for m in got if m.unix_fds}
        assert sorted(with_fds) == [7, 9] and len(with_fds[7]) == 1 and len(with_fds[9]) == 2
        assert os.path.sameopenfile(with_fds[7][0], r) and os.path.sameopenfile(with_fds[9][1], w2)
        assert CountingSocket.empty == 0 and not failed
        for fds in with_fds.values():
            for fd in fds:
                os.close(fd)
        theirs.close()  # the bus went away: told once
        for _ in range(200):
            if failed:
                break
            await asyncio.sleep(0.005)
        assert len(failed) == 1 and isinstance(failed[0], EOFError)
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()
        for fd in (r, w, r2, w2):
            os.close(fd)


async def test_a_turn_parses_a_bounded_number_the_rest_follows() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    got: list[Message] = []
    loop = asyncio.get_running_loop()
    reader = internals._Reader(ours, got.append, lambda e: None)
    n = internals.READ_AHEAD + 100
    theirs.sendall(b"".join(wire(i + 1) for i in range(n)))
    try:
        reader()  # one wakeup
        assert 0 < len(got) <= internals.READ_AHEAD
        loop.add_reader(ours.fileno(), reader)
        await until(got, n)
        assert [m.serial for m in got] == list(range(1, n + 1))
        theirs.setblocking(False)
        await loop.sock_sendall(theirs, wire(n + 1, size=1 << 20))  # a large one, in many reads
        await until(got, n + 1)
        assert len(got[-1].body[0]) == 1 << 20
    finally:
        loop.remove_reader(ours.fileno())
        ours.close()
        theirs.close()


def test_connections_without_descriptors_keep_dbus_fasts_reader() -> None:
    a, b = socket.socketpair()
    try:
        reader = internals.one_message_per_wakeup(a, print, print, False)
        assert isinstance(reader, partial) and reader.args[-1] is False  # dbus-fast's own, greedy reader
    finally:
        a.close()
        b.close()


def fresh(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """As at start-up: nothing checked or installed yet; what install() replaces is put back after."""
    monkeypatch.setattr(internals, "_checked", {})
    monkeypatch.setattr(internals, "_installed", {})
    monkeypatch.setattr(internals._aio, "build_message_reader", internals._aio.build_message_reader)
    monkeypatch.setattr(internals._aio._MessageWriter, "write_callback", internals._aio._MessageWriter.write_callback)


def test_on_the_pinned_dbus_fast_everything_is_as_expected_and_installed_once(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    fresh(monkeypatch)
    assert internals.install() == {"reader": True, "writer": True, "marshalling": True}
    assert internals._aio.build_message_reader is internals.one_message_per_wakeup  # type: ignore[attr-defined]
    assert internals._aio._MessageWriter.write_callback is internals._write_callback
    assert internals.marshalling_known()
    assert internals.install() == {"reader": True, "writer": True, "marshalling": True}
    assert not [r for r in caplog.records if r.name == internals.__name__]


def test_internals_checked_and_dbus_fasts_reader_kept_if_they_differ(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    fresh(monkeypatch)

    class Other:  # an unmarshaller that reads no stream
        def __init__(self, *args: Any) -> None:
            pass

        def unmarshall(self) -> None:
            return None

    monkeypatch.setattr(internals, "Unmarshaller", Other)
    built = internals._aio.build_message_reader  # type: ignore[attr-defined]
    assert internals.install() == {"reader": False, "writer": True, "marshalling": True}
    assert internals._aio.build_message_reader is built  # type: ignore[attr-defined]
    assert internals._aio._MessageWriter.write_callback is internals._write_callback  # the rest is installed
    warnings = [r.getMessage() for r in caplog.records if r.name == internals.__name__]
    assert len(warnings) == 1 and "(reader)" in warnings[0] and "reading the bus" in warnings[0]


def test_a_writer_of_another_shape_keeps_dbus_fasts_writer_and_queue(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    fresh(monkeypatch)

    class OtherWriter:  # a writer without the fields the callback and the direct writes use
        def __init__(self, bus: Any) -> None:
            self.queue: list[Any] = []

        def write_callback(self) -> None:
            pass

    stock = OtherWriter.write_callback
    monkeypatch.setattr(internals._aio, "_MessageWriter", OtherWriter)
    assert internals.install() == {"reader": True, "writer": False, "marshalling": True}
    assert OtherWriter.write_callback is stock
    warnings = [r.getMessage() for r in caplog.records if r.name == internals.__name__]
    assert len(warnings) == 1 and "(writer)" in warnings[0]

    # No reply bypasses the queue then, even on a bus whose writer looks right: bus.send() for all.
    class Bus:
        sent: list[Message] = []
        _writer = internals._aio.MessageBus  # anything: not used
        next_serial = None

        def send(self, message: Message) -> None:
            self.sent.append(message)

    bus = Bus()
    bus._writer = type("W", (), dict.fromkeys(internals._WRITER_FIELDS))()  # type: ignore[assignment]
    assert not internals.direct_writes(bus)
    reply = Message(message_type=MessageType.METHOD_RETURN, reply_serial=1, destination=":1.2")
    assert internals.send(bus, reply, internals.direct_writes(bus)) is None and Bus.sent == [reply]


async def test_marshalling_of_another_shape_makes_get_all_marshal_each_time(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.unit.test_dispatch import MACHINE_IFACE, MANAGER, dispatcher_for, incoming, manager_with, unmarshal

    fresh(monkeypatch)

    class OtherMarshaller:  # big-endian bodies, say
        def __init__(self, signature: str, body: list[Any]) -> None:
            pass

        def marshall(self) -> bytearray:
            return bytearray(b"B")

    manager = manager_with(tmp_path, ["a", "b-2"])
    monkeypatch.setattr(internals, "Marshaller", OtherMarshaller)
    assert internals.install() == {"reader": True, "writer": True, "marshalling": False}
    assert not internals.marshalling_known()
    dispatcher, bus = dispatcher_for(manager)
    dispatcher._on_message(incoming(MANAGER + "/machine/a", "org.freedesktop.DBus.Properties", "GetAll", "s",
                                    [MACHINE_IFACE]))  # fmt: skip
    got = unmarshal(bus.wire[-1]).body[0]
    assert got["Name"].value == "a" and got["State"].value == "running" and len(got) == 11
    machine = manager.registry.get("a")
    assert machine is not None and machine.get_all_cache is None  # the stock path: nothing marshalled ahead

    # ListMachines' rows, marshalled ahead by the adapters: decoded and marshalled by dbus-fast.
    dispatcher._on_message(incoming(MANAGER, "org.freedesktop.machine1.Manager", "ListMachines"))
    assert bus.wire[-1] == marshalled_by_dbus_fast(rows_of(manager), serial=bus.sent[-1].serial)
    assert type(bus.sent[-1]) is Message


def rows_of(manager: Any) -> list[tuple[str, str, str, str]]:
    return [(m.name, m.machine_class.value, m.service, m.object_path) for m in manager.machines()]


def marshalled_by_dbus_fast(rows: list[Any], serial: int) -> bytes:
    reply = Message(message_type=MessageType.METHOD_RETURN, reply_serial=7, destination=":1.99",
                    flags=MessageFlag.NO_REPLY_EXPECTED, signature="a(ssso)", body=[rows], serial=serial)  # fmt: skip
    return bytes(reply._marshall(True))


BODIES = [
    ("a(ssso)", [[["a", "vm", "", "/x/a"], ["b-2", "container", "svc \u00e9", "/x/b_2d2"]]]),
    ("a(ssso)", [[]]),
    ("a{sv}", [{"Name": Variant("s", "a"), "Id": Variant("ay", b"\x01" * 16), "Leader": Variant("u", 7),
                "Timestamp": Variant("t", 1 << 40), "NetworkInterfaces": Variant("ai", [3, -4]),
                "Ok": Variant("b", True), "Pair": Variant("(uu)", [1, 2]), "None": Variant("as", []),
                "Ratio": Variant("d", 0.5), "Sig": Variant("g", "a{sv}"), "Nested": Variant("v", Variant("o", "/p"))}]),
    ("sa{ss}yqnx", ["x", {"k": "v", "": ""}, 255, 65535, -2, -(1 << 40)]),
]  # fmt: skip


def test_bodies_marshalled_ahead_decode_to_what_dbus_fast_reads() -> None:
    """The fallback's decoder against dbus-fast's own unmarshaller, on the bodies replies carry."""
    from tests.unit.test_dispatch import unmarshal

    for signature, body in BODIES:
        wire = bytes(
            Message(message_type=MessageType.METHOD_RETURN, reply_serial=1, signature=signature, body=body, serial=2)
            ._marshall(True)
        )  # fmt: skip
        data = wire[-len(internals.marshal_body(signature, body)) :] if body != [[]] else wire[-4:]
        decoded = internals.unmarshal_body(signature, data)
        assert decoded == unmarshal(wire).body, signature
        assert internals.marshal_body(signature, decoded) == internals.marshal_body(signature, body)


def test_marshal_gives_what_dbus_fast_sends() -> None:
    message = Message(destination="a.b", path="/x", interface="a.b", member="C", signature="s", body=["y"], serial=9)
    data = internals.marshal(message)
    assert type(data) is bytes and data == bytes(message._marshall(True))
    assert internals.marshal_body("s", ["y"]) == data[-len(internals.marshal_body("s", ["y"])) :]


# dbus-fast's private names: its private modules, (un)marshalling, and every attribute or method
# with a leading underscore that its classes use on themselves (its source, read at test time).
def _dbus_fasts_private_names() -> set[str]:
    import re
    from pathlib import Path

    import dbus_fast

    names: set[str] = set()
    for source in Path(dbus_fast.__file__).parent.rglob("*.py"):
        text = source.read_text()
        names |= set(re.findall(r"\bself\.(_[A-Za-z]\w*)", text))
        names |= set(re.findall(r"^\s+def (_[A-Za-z]\w*)\(self", text, re.MULTILINE))
    return {n for n in names if not n.startswith("__")}


def _private_uses(text: str, names: set[str]) -> list[str]:
    """Uses of dbus-fast's private names in *text*: ``x._name`` (not on self or cls: a class of
    our own), ``"_name"`` (getattr), and any mention of its private modules or marshalling."""
    import re

    alternatives = "|".join(sorted(names, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w.])(?!self\.|cls\.)[A-Za-z_]\w*(?:\.\w+)*\.({alternatives})\b"
                         rf"|[\"']({alternatives})[\"']|dbus_fast\._private|\b_marshall\b|\b_unmarshall\b")  # fmt: skip
    return [m.group(0) for m in pattern.finditer(text) if m.group(0) not in ("os._exit",)]


def test_no_module_but_internals_uses_dbus_fasts_private_names() -> None:
    from pathlib import Path

    import machined

    package = Path(machined.__file__).parent
    names = _dbus_fasts_private_names()
    assert {"_marshall", "_writer", "_user_disconnect", "_finalize"} <= names
    found = {}
    for source in sorted(package.rglob("*.py")):
        uses = _private_uses(source.read_text(), names)
        if uses:
            found[source.relative_to(package.parent).as_posix()] = uses
    # The check can fail: internals.py is where they are.
    assert set(found) == {"machined/dbus/internals.py"}, found
    assert {"dbus_fast._private", "_marshall", '"_writer"'} <= set(found["machined/dbus/internals.py"])

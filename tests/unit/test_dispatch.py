"""The dispatcher's direct path (calls answered where dbus-fast hands them over) and the
ListMachines reply marshalled from cached rows: same bytes on the wire as dbus-fast writes."""

from __future__ import annotations

import asyncio
import io
import os
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast._private.unmarshaller import Unmarshaller
from hypothesis import given, settings
from hypothesis import strategies as st

from machined.dbus.adapters import _list_body
from machined.dbus.introspection import load_interface
from machined.dbus.logcontrol import LogControl
from machined.dbus.objects import BusObject, Call, Dispatcher, FdReply, _method_return
from machined.dbus.tree import MachinedTree
from machined.machine import Machine, MachineClass, Timestamp, host_machine
from machined.manager import MachineManager
from machined.statefile import StateDir

DEST, MANAGER = "org.freedesktop.machine1", "/org/freedesktop/machine1"
MANAGER_IFACE, MACHINE_IFACE = "org.freedesktop.machine1.Manager", "org.freedesktop.machine1.Machine"


class FakeBus:
    """Marshals what is sent, as the connection's writer would; a send may be left pending."""

    unique_name = ":1.1"

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.wire: list[bytes] = []
        self.hold = False
        self.pending: list[asyncio.Future[None]] = []
        self.handlers: list[Any] = []

    def add_message_handler(self, handler: Any) -> None:
        self.handlers.append(handler)

    def send(self, message: Message) -> asyncio.Future[None]:
        message.serial = len(self.sent) + 1
        self.wire.append(bytes(message._marshall(True)))
        self.sent.append(message)
        future = asyncio.get_running_loop().create_future()
        if self.hold:
            self.pending.append(future)
        else:
            future.set_result(None)
        return future


def unmarshal(data: bytes) -> Message:
    """A message as a client reads it off the wire."""
    message = Unmarshaller(io.BytesIO(data), None, False).unmarshall()
    assert message is not None
    return message


def incoming(path: str, interface: str | None, member: str, signature: str = "", body: list | None = None,
             flags: MessageFlag = MessageFlag.NONE) -> Message:  # fmt: skip
    return Message(destination=DEST, path=path, interface=interface, member=member, signature=signature,
                   body=body or [], serial=7, sender=":1.99", flags=flags)  # fmt: skip


def manager_with(tmp_path: Any, names: list[str]) -> MachineManager:
    manager = MachineManager(host_machine(b"\x01" * 16, Timestamp(1, 0)), StateDir(str(tmp_path)))
    for i, name in enumerate(names):
        m = Machine(name=name, machine_class=MachineClass.VM, leader=10_000_000 + i, unit=f"machine-{i}.scope",
                    started=True, timestamp=Timestamp(5, 6))  # fmt: skip
        manager.registry.add(m)
        manager.registry.index_leader(m)
        manager.registry.index_unit(m)
    return manager


def dispatcher_for(manager: MachineManager) -> tuple[Dispatcher, FakeBus]:
    bus = FakeBus()
    dispatcher = Dispatcher(bus, MachinedTree(manager, LogControl("machined")), "0" * 32)  # type: ignore[arg-type]
    dispatcher.ready.set()
    return dispatcher, bus


def marshalled_by_dbus_fast(rows: list[tuple[str, str, str, str]]) -> bytes:
    reply = Message(message_type=MessageType.METHOD_RETURN, reply_serial=7, destination=":1.99",
                    flags=MessageFlag.NO_REPLY_EXPECTED, signature="a(ssso)", body=[rows], serial=1)  # fmt: skip
    return bytes(reply._marshall(True))


wire_chars = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))
machine_names = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(machine_names, st.text(wire_chars, max_size=12), st.sampled_from(list(MachineClass))),
        max_size=6,
        unique_by=lambda t: t[0],
    )  # fmt: skip
)
def test_list_machines_rows_marshalled_once_are_what_dbus_fast_writes(entries: list) -> None:
    machines = [Machine(name=n, service=s, machine_class=c) for n, s, c in entries]
    rows = [(m.name, str(m.machine_class), m.service, m.object_path) for m in machines]
    spec = load_interface(MANAGER_IFACE).methods["ListMachines"]
    call = incoming(MANAGER, MANAGER_IFACE, "ListMachines")
    for _ in range(2):  # the second time from the rows cached on the machines
        reply = _method_return(call, spec, _list_body(machines))
        reply.serial = 1
        assert bytes(reply._marshall(True)) == marshalled_by_dbus_fast(rows)


async def test_lookups_are_answered_at_once_without_a_task(tmp_path) -> None:  # type: ignore[no-untyped-def]
    dispatcher, bus = dispatcher_for(manager_with(tmp_path, ["a", "b-2"]))
    calls = [
        incoming(MANAGER, "org.freedesktop.DBus.Peer", "Ping"),
        incoming(MANAGER, MANAGER_IFACE, "GetMachine", "s", ["b-2"]),
        incoming(MANAGER, MANAGER_IFACE, "ListMachines"),
        incoming(MANAGER + "/machine/a", "org.freedesktop.DBus.Properties", "Get", "ss", [MACHINE_IFACE, "State"]),
        incoming(MANAGER + "/machine/_61", "org.freedesktop.DBus.Properties", "GetAll", "s", [MACHINE_IFACE]),
        incoming(MANAGER + "/machine/a", "org.freedesktop.DBus.Introspectable", "Introspect"),
        incoming(MANAGER, MANAGER_IFACE, "GetMachine", "s", ["nope"]),
    ]
    for message in calls:
        assert dispatcher._on_message(message) is True
    assert not dispatcher._tasks
    assert len(bus.sent) == len(calls)
    ping, get_machine, listed, state, get_all, xml, missing = bus.sent
    assert all(m.flags == MessageFlag.NO_REPLY_EXPECTED and m.reply_serial == 7 for m in bus.sent)
    assert get_machine.body == ["/org/freedesktop/machine1/machine/b_2d2"]
    assert listed.signature == "a(ssso)" and len(bus.wire[2]) > 100
    assert state.body == [Variant("s", "running")]
    get_all_read = unmarshal(bus.wire[4])
    assert get_all_read.body[0]["Name"] == Variant("s", "a") and list(get_all_read.body[0])[0] == "Name"
    assert get_all_read.body[0]["State"] == Variant("s", "running") and len(get_all_read.body[0]) == 11
    assert [row[0] for row in unmarshal(bus.wire[2]).body[0]] == [".host", "a", "b-2"]
    assert '<interface name="org.freedesktop.machine1.Machine">' in xml.body[0]
    assert missing.error_name == "org.freedesktop.machine1.NoSuchMachine"
    assert all(m.body == [] for m in calls)  # arguments dropped once answered


async def test_get_all_of_a_machine_follows_its_changes_with_dbus_fasts_bytes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    manager = manager_with(tmp_path, ["a"])
    dispatcher, bus = dispatcher_for(manager)
    machine = manager.registry.get("a")
    assert machine is not None

    def get_all() -> dict:
        dispatcher._on_message(incoming(MANAGER + "/machine/a", "org.freedesktop.DBus.Properties", "GetAll", "s",
                                        [MACHINE_IFACE]))  # fmt: skip
        return unmarshal(bus.wire[-1]).body[0]

    assert get_all()["State"].value == "running"
    assert get_all()["State"].value == "running"  # from the cache
    machine.stopping = True
    machine.netif = [3, 4]
    again = get_all()
    assert again["State"].value == "closing" and again["NetworkInterfaces"].value == [3, 4]
    # The same bytes as dbus-fast marshals from the values.
    generic = Message(message_type=MessageType.METHOD_RETURN, reply_serial=7, destination=":1.99",
                      flags=MessageFlag.NO_REPLY_EXPECTED, signature="a{sv}", body=[again],
                      serial=bus.sent[-1].serial)  # fmt: skip
    assert bytes(generic._marshall(True)) == bus.wire[-1]
    # GetAll("") and of no known interface.
    dispatcher._on_message(incoming(MANAGER + "/machine/a", "org.freedesktop.DBus.Properties", "GetAll", "s", [""]))
    assert unmarshal(bus.wire[-1]).body[0] == again
    dispatcher._on_message(incoming(MANAGER + "/machine/a", "org.freedesktop.DBus.Properties", "GetAll", "s", ["x.y"]))
    assert bus.sent[-1].error_name == "org.freedesktop.DBus.Error.UnknownInterface"


async def test_no_reply_expected_gets_none_and_errors_keep_their_names(tmp_path) -> None:  # type: ignore[no-untyped-def]
    dispatcher, bus = dispatcher_for(manager_with(tmp_path, []))
    dispatcher._on_message(incoming(MANAGER, "org.freedesktop.DBus.Peer", "Ping", flags=MessageFlag.NO_REPLY_EXPECTED))
    assert bus.sent == []
    dispatcher._on_message(incoming(MANAGER, MANAGER_IFACE, "GetMachine", "u", [1]))
    dispatcher._on_message(incoming("/nope", "org.freedesktop.DBus.Properties", "GetAll", "s", [""]))
    assert [m.error_name for m in bus.sent] == [
        "org.freedesktop.DBus.Error.InvalidArgs",
        "org.freedesktop.DBus.Error.UnknownObject",
    ]


async def test_machine_self_is_the_callers_machine_even_with_a_machine_named_self(tmp_path) -> None:  # type: ignore[no-untyped-def]
    manager = manager_with(tmp_path, ["self", "mine"])
    dispatcher, bus = dispatcher_for(manager)
    mine = manager.registry.get("mine")
    assert mine is not None
    manager.find_by_pid = lambda pid: mine if pid == 4242 else None  # type: ignore[method-assign]

    async def credentials(self: Call) -> Any:
        from machined.dbus.objects import Credentials

        return Credentials(pid=4242, uid=0)

    original = Call.credentials
    Call.credentials = credentials  # type: ignore[method-assign]
    try:
        dispatcher._on_message(incoming(MANAGER + "/machine/self", "org.freedesktop.DBus.Properties", "Get", "ss",
                                        [MACHINE_IFACE, "Name"]))  # fmt: skip
        for _ in range(3):
            await asyncio.sleep(0)
    finally:
        Call.credentials = original  # type: ignore[method-assign]
    assert bus.sent[-1].body == [Variant("s", "mine")]


async def test_a_reply_that_cannot_be_marshalled_is_an_error_not_silence(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bus = FakeBus()
    iface = load_interface(MACHINE_IFACE)

    class Tree:
        def lookup_now(self, path: str, call: Call) -> BusObject:
            return BusObject(interfaces=[iface], properties={(MACHINE_IFACE, p): (lambda: 5) for p in iface.properties})

    dispatcher = Dispatcher(bus, Tree(), "0" * 32)  # type: ignore[arg-type]
    dispatcher.ready.set()
    dispatcher._on_message(incoming("/x", "org.freedesktop.DBus.Properties", "Get", "ss", [MACHINE_IFACE, "Name"]))
    assert [m.error_name for m in bus.sent] == ["org.freedesktop.DBus.Error.Failed"]


async def test_descriptors_of_a_reply_are_closed_once_it_is_written(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bus = FakeBus()
    bus.hold = True
    r, w = os.pipe()
    os.close(r)
    iface = load_interface(MACHINE_IFACE)

    async def open_root(call: Call) -> FdReply:
        return FdReply([0], [w])

    class Tree:
        def lookup_now(self, path: str, call: Call) -> BusObject:
            return BusObject(interfaces=[iface], methods={(MACHINE_IFACE, "OpenRootDirectory"): open_root})

    dispatcher = Dispatcher(bus, Tree(), "0" * 32)  # type: ignore[arg-type]
    dispatcher.ready.set()
    dispatcher._on_message(incoming("/x", MACHINE_IFACE, "OpenRootDirectory"))
    await asyncio.sleep(0)
    assert bus.sent and bus.sent[0].unix_fds == [w]
    os.fstat(w)  # still open: the reply is not written yet
    bus.pending[0].set_result(None)
    await asyncio.sleep(0)
    try:
        os.fstat(w)
    except OSError:
        pass
    else:
        os.close(w)
        raise AssertionError("descriptor left open after the reply was written")


async def test_refusals_known_without_looking_inside_are_answered_in_place(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """machinectl list asks for each machine's OS release and addresses: a VM's refusal (and a
    container's without a network of its own) is answered right away, as 252 words it, without
    a coroutine or a context of its own."""
    from machined.dbus import objects

    manager = manager_with(tmp_path, ["vm1"])
    shared = Machine(name="c1", machine_class=MachineClass.CONTAINER, leader=os.getpid(), unit="c1.scope",
                     started=True, timestamp=Timestamp(5, 6))  # fmt: skip
    manager.registry.add(shared)
    dispatcher, bus = dispatcher_for(manager)

    class NoContexts:
        def copy_context(self) -> None:
            raise AssertionError("a coroutine was started")

    monkeypatch.setattr(objects, "contextvars", NoContexts())
    calls = [
        incoming(MANAGER, MANAGER_IFACE, "GetMachineOSRelease", "s", ["vm1"]),
        incoming(MANAGER, MANAGER_IFACE, "GetMachineAddresses", "s", ["vm1"]),
        incoming(MANAGER, MANAGER_IFACE, "GetMachineUIDShift", "s", ["vm1"]),
        incoming(MANAGER + "/machine/vm1", MACHINE_IFACE, "GetOSRelease"),
        incoming(MANAGER, MANAGER_IFACE, "GetMachineAddresses", "s", ["c1"]),
    ]
    for message in calls:
        assert dispatcher._on_message(message) is True
    assert not dispatcher._tasks
    assert [(m.error_name, m.body) for m in bus.sent] == [
        ("org.freedesktop.DBus.Error.NotSupported", ["Requesting OS release data is only supported on container machines."]),
        ("org.freedesktop.DBus.Error.NotSupported", ["Requesting IP address data is only supported on container machines."]),
        ("org.freedesktop.DBus.Error.NotSupported", ["UID/GID shift may only be determined for container machines."]),
        ("org.freedesktop.DBus.Error.NotSupported", ["Requesting OS release data is only supported on container machines."]),
        ("org.freedesktop.machine1.NoPrivateNetworking", ["Machine c1 does not use private networking"]),
    ]  # fmt: skip

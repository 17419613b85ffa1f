"""The machine record, the registry indexes and the interface definitions."""

from machined.dbus.introspection import introspect_xml, load_interface
from machined.machine import Machine, MachineClass, MachineState, Timestamp, host_machine
from machined.registry import Registry


def test_host_machine_is_running_and_at_its_path() -> None:
    host = host_machine(bytes(range(16)), Timestamp(5, 0))
    assert host.state is MachineState.RUNNING
    assert host.object_path == "/org/freedesktop/machine1/machine/_2ehost"
    assert (host.leader, host.unit, host.root_directory, str(host.machine_class)) == (1, "-.slice", "/", "host")


def test_machine_state_and_null_id() -> None:
    m = Machine("a", id=bytes(16), machine_class=MachineClass.CONTAINER)
    assert m.id_bytes == b""
    m.scope_job = "/org/freedesktop/systemd1/job/1"
    assert m.state is MachineState.OPENING
    m.stopping = True
    assert m.state is MachineState.CLOSING


def test_registry_indexes_follow_add_and_remove() -> None:
    reg = Registry()
    a = Machine("a", leader=10, unit="machine-a.scope")
    b = Machine("b", leader=10)
    reg.add(a)
    assert reg.index_leader(a)
    reg.index_unit(a)
    reg.add(b)
    assert not reg.index_leader(b)
    assert reg.by_leader(10) is a and reg.by_unit("machine-a.scope") is a
    reg.remove(a)
    assert reg.by_leader(10) is None and reg.by_unit("machine-a.scope") is None
    assert [m.name for m in reg] == ["b"]


def test_interfaces_have_252_signatures() -> None:
    manager = load_interface("org.freedesktop.machine1.Manager")
    assert manager.methods["CreateMachine"].in_signature == "sayssusa(sv)"
    assert manager.methods["ListMachines"].out_signature == "a(ssso)"
    assert manager.methods["KillMachine"].in_signature == "ssi"
    assert set(manager.signals) == {"MachineNew", "MachineRemoved"}
    machine = load_interface("org.freedesktop.machine1.Machine")
    assert "Scope" not in machine.properties
    assert machine.properties["State"].signature == "s"
    xml = introspect_xml([machine], ["x"])
    assert xml.startswith("<!DOCTYPE node") and ' <node name="x"/>\n</node>\n' in xml


def test_every_introspected_method_has_a_handler(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from machined.dbus import adapters
    from machined.inside.access import MachineAccess
    from machined.manager import MachineManager
    from machined.statefile import StateDir

    manager = MachineManager(host_machine(b"", Timestamp()), StateDir(str(tmp_path)))
    access = MachineAccess(manager)
    for obj, name in (
        (adapters.manager_object(manager, access), "org.freedesktop.machine1.Manager"),
        (adapters.machine_object(manager, access, manager.host), "org.freedesktop.machine1.Machine"),
    ):
        iface = load_interface(name)
        assert [m for m in iface.methods if (name, m) not in obj.methods] == []
        assert [p for p in iface.properties if (name, p) not in obj.properties] == []

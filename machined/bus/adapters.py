"""Thin adapters: D-Bus methods and properties of the Manager and Machine objects.

Each handler parses its arguments, calls the manager, and returns the list of
out-arguments; the rules live in :mod:`machined.manager`. Manager methods that
take a machine name first (``GetMachineAddresses(name)``…) are redirects: they
look the machine up and run the very handler of the Machine object.
"""

from __future__ import annotations

from machined.bus.introspection import load_interface
from machined.bus.objects import BusObject, Call, Handler
from machined.machine import Machine
from machined.manager import MachineManager

MANAGER_IFACE = "org.freedesktop.machine1.Manager"
MACHINE_IFACE = "org.freedesktop.machine1.Machine"

# Manager method → the Machine method it redirects to, for the given machine name.
MACHINE_REDIRECTS = {
    "GetMachineAddresses": "GetAddresses",
    "GetMachineOSRelease": "GetOSRelease",
    "GetMachineUIDShift": "GetUIDShift",
}


def machine_methods(manager: MachineManager, machine: Machine) -> dict[str, Handler]:
    """The Machine interface's handlers, bound to *machine*."""

    async def get_addresses(call: Call) -> list:
        return [[(a.family, a.address) for a in await manager.addresses(machine)]]

    async def get_os_release(call: Call) -> list:
        return [await manager.os_release(machine)]

    async def get_uid_shift(call: Call) -> list:
        return [await manager.uid_shift(machine)]

    return {
        "GetAddresses": get_addresses,
        "GetOSRelease": get_os_release,
        "GetUIDShift": get_uid_shift,
    }


def _redirect(manager: MachineManager, target: str) -> Handler:
    async def handler(call: Call, name: str, *args: object) -> list:
        machine = manager.get(name)
        return await machine_methods(manager, machine)[target](call, *args)

    return handler


def manager_object(manager: MachineManager) -> BusObject:
    """The object at /org/freedesktop/machine1."""

    async def list_machines(call: Call) -> list:
        return [[(m.name, str(m.machine_class), m.service, m.object_path) for m in manager.machines()]]

    async def get_machine(call: Call, name: str) -> list:
        return [manager.get(name).object_path]

    async def get_machine_by_pid(call: Call, pid: int) -> list:
        if pid == 0:
            pid = (await call.credentials()).pid
        return [manager.get_by_pid(pid).object_path]

    i = MANAGER_IFACE
    methods: dict[tuple[str, str], Handler] = {
        (i, "ListMachines"): list_machines,
        (i, "GetMachine"): get_machine,
        (i, "GetMachineByPID"): get_machine_by_pid,
    }
    for name, target in MACHINE_REDIRECTS.items():
        methods[(i, name)] = _redirect(manager, target)
    return BusObject(
        interfaces=[load_interface(i)],
        methods=methods,
        properties={
            (i, "PoolPath"): lambda: manager.pool_path,
            (i, "PoolUsage"): manager.pool_usage,
            (i, "PoolLimit"): manager.pool_limit,
        },
    )


def machine_object(manager: MachineManager, machine: Machine) -> BusObject:
    """The object of one machine, at its escaped path."""
    i = MACHINE_IFACE
    return BusObject(
        interfaces=[load_interface(i)],
        methods={(i, name): h for name, h in machine_methods(manager, machine).items()},
        properties={
            (i, "Name"): lambda: machine.name,
            (i, "Id"): lambda: machine.id_bytes,
            (i, "Timestamp"): lambda: machine.timestamp.realtime,
            (i, "TimestampMonotonic"): lambda: machine.timestamp.monotonic,
            (i, "Service"): lambda: machine.service,
            (i, "Unit"): lambda: machine.unit,
            (i, "Leader"): lambda: machine.leader,
            (i, "Class"): lambda: str(machine.machine_class),
            (i, "RootDirectory"): lambda: machine.root_directory,
            (i, "NetworkInterfaces"): lambda: list(machine.netif),
            (i, "State"): lambda: str(machine.state),
        },
        hidden_properties={(i, "Scope"): ("s", lambda: machine.unit)},
    )

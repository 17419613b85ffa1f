"""Thin adapters: D-Bus methods and properties of the Manager and Machine objects.

Each handler parses its arguments, calls the manager, and returns the list of
out-arguments; the rules live in :mod:`machined.manager`. Manager methods that
take a machine name first (``GetMachineAddresses(name)``…) are redirects: they
look the machine up and run the very handler of the Machine object.
"""

from __future__ import annotations

from collections.abc import Awaitable
from functools import partial
from typing import Any

from machined import lifecycle, personality
from machined.clients.polkit import authorize
from machined.dbus import machine262
from machined.dbus.introspection import load_interface
from machined.dbus.objects import BusObject, Call, FdReply, Handler, MarshalledBody, PropertyGetter
from machined.inside import machine_calls
from machined.inside.access import MachineAccess
from machined.inside.addresses import Address
from machined.machine import Machine
from machined.manager import MachineManager, UnitProperty
from machined.registration import RegistrationRequest, validate_registration

MANAGER_IFACE = "org.freedesktop.machine1.Manager"
MACHINE_IFACE = "org.freedesktop.machine1.Machine"

# Manager method → the Machine method it redirects to, for the given machine name.
MACHINE_REDIRECTS = {
    "UnregisterMachine": "Unregister",
    "TerminateMachine": "Terminate",
    "KillMachine": "Kill",
    "GetMachineAddresses": "GetAddresses",
    "GetMachineOSRelease": "GetOSRelease",
    "GetMachineUIDShift": "GetUIDShift",
    "OpenMachinePTY": "OpenPTY",
    "OpenMachineLogin": "OpenLogin",
    "OpenMachineShell": "OpenShell",
    "OpenMachineRootDirectory": "OpenRootDirectory",
    "BindMountMachine": "BindMount",
    "CopyFromMachine": "CopyFrom",
    "CopyToMachine": "CopyTo",
    "CopyFromMachineWithFlags": "CopyFromWithFlags",
    "CopyToMachineWithFlags": "CopyToWithFlags",
}
COPY_FLAGS_PUBLIC = 1  # bit 0: replace an existing destination


def machine_handlers(manager: MachineManager, access: MachineAccess) -> dict[str, Handler]:
    """The Machine interface's handlers, built once and shared by every machine: each takes
    the machine first (Unregister: Manager only)."""

    async def unregister(machine: Machine, call: Call) -> None:
        await lifecycle.unregister(manager, machine, partial(authorize, call))

    async def terminate(machine: Machine, call: Call) -> None:
        await lifecycle.terminate(manager, machine, partial(authorize, call))

    async def kill(machine: Machine, call: Call, who: str, signal: int) -> None:
        await lifecycle.kill(manager, machine, who, signal, partial(authorize, call))

    # Refusals known without looking inside (a VM, no network of its own) are answered in place,
    # without a coroutine: machinectl list asks for every machine's addresses and OS release.
    def get_addresses(machine: Machine, call: Call) -> Awaitable[list[Any]]:
        access.check_addresses(machine)
        return _addresses(access.addresses(machine))

    def get_os_release(machine: Machine, call: Call) -> Awaitable[list[Any]]:
        if personality.is_262():  # 262 asks polkit first (root passes at once), then looks
            return _inspected_os_release(machine, call)
        access.check_os_release(machine)
        return _one(access.os_release(machine))

    async def _inspected_os_release(machine: Machine, call: Call) -> list[Any]:
        await authorize(call, "inspect-machines", {"machine": machine.name, "verb": "get_os_release"})
        access.check_os_release(machine)
        return await _one(access.os_release(machine))

    def get_uid_shift(machine: Machine, call: Call) -> list[Any]:
        return [access.uid_shift_now(machine)]

    async def open_pty(machine: Machine, call: Call) -> FdReply:
        fd, path = await machine_calls.open_pty(access, machine, partial(authorize, call))
        return FdReply([0, path], [fd])

    async def open_login(machine: Machine, call: Call) -> FdReply:
        fd, path = await machine_calls.open_login(access, machine, partial(authorize, call))
        return FdReply([0, path], [fd])

    async def open_shell(machine: Machine, call: Call, user: str, path: str, args: list[str],
                         env: list[str]) -> FdReply:  # fmt: skip
        fd, pty_path = await machine_calls.open_shell(access, machine, user, path, args, env, partial(authorize, call))
        return FdReply([0, pty_path], [fd])

    async def open_root_directory(machine: Machine, call: Call) -> FdReply:
        return FdReply([0], [await machine_calls.open_root_directory(access, machine, partial(authorize, call))])

    def copier(copy_from: bool, with_flags: bool) -> Handler:
        async def handler(machine: Machine, call: Call, src: str, dest: str, flags: int = 0) -> None:
            await machine_calls.copy(
                access,
                machine,
                copy_from,
                src,
                dest,
                bool(flags & COPY_FLAGS_PUBLIC),
                partial(authorize, call),
                not (with_flags and flags & ~COPY_FLAGS_PUBLIC),
            )

        return handler

    async def bind_mount(machine: Machine, call: Call, src: str, dest: str, read_only: bool, mkdir: bool) -> None:
        await machine_calls.bind_mount(access, machine, src, dest, read_only, mkdir, partial(authorize, call))

    return {
        "BindMount": bind_mount,
        "CopyFrom": copier(True, False),
        "CopyTo": copier(False, False),
        "CopyFromWithFlags": copier(True, True),
        "CopyToWithFlags": copier(False, True),
        "OpenPTY": open_pty,
        "OpenLogin": open_login,
        "OpenShell": open_shell,
        "OpenRootDirectory": open_root_directory,
        "Unregister": unregister,
        "Terminate": terminate,
        "Kill": kill,
        "GetAddresses": get_addresses,
        "GetOSRelease": get_os_release,
        "GetUIDShift": get_uid_shift,
        "GetSSHInfo": machine262.get_ssh_info,  # (262's interface only)
    }


async def _one(value: Awaitable[Any]) -> list[Any]:
    return [await value]


async def _addresses(addresses: Awaitable[list[Address]]) -> list[Any]:
    return [[(a.family, a.address) for a in await addresses]]


def unit_properties(properties: list[list[Any]]) -> list[UnitProperty]:
    """The caller's a(sv) scope properties as the core takes them: (name, signature, value)."""
    return [(name, variant.signature, variant.value) for name, variant in properties]


def _redirect(manager: MachineManager, target: Handler) -> Handler:
    def handler(call: Call, name: str, *args: object) -> object:
        return target(manager.get(name), call, *args)

    return handler


# ListMachines' a(ssso) on the wire: each row a struct (8-aligned) of four strings (4-aligned).
_LIST_EMPTY: list[Any] = [[]]


def _list_row(machine: Machine) -> bytes:
    """The machine's ListMachines row, marshalled once: name, class and service never change
    while it is registered. Padded to 8 bytes, where the next row starts."""
    row = machine.list_row
    if not row:
        out = bytearray()
        for text in (machine.name, str(machine.machine_class), machine.service, machine.object_path):
            out += bytes(-len(out) % 4)
            data = text.encode()
            if b"\0" in data:
                raise ValueError("string value contains a NUL byte")  # refused as dbus-fast does
            out += len(data).to_bytes(4, "little")
            out += data
            out += b"\0"
        out += bytes(-len(out) % 8)
        row = machine.list_row = bytes(out)
    return row


def _list_body(machines: list[Machine]) -> MarshalledBody:
    rows = [_list_row(m) for m in machines]
    if not rows:
        return MarshalledBody(bytes(8), _LIST_EMPTY)
    data = b"".join(rows)
    last = rows[-1]
    # The array ends with its last element, without the padding after it.
    size = len(data) - (len(last) - len(last.rstrip(b"\0")) - 1)
    return MarshalledBody(size.to_bytes(4, "little") + bytes(4) + data[:size], _LIST_EMPTY)


def manager_object(manager: MachineManager, access: MachineAccess,
                   machine_methods: dict[str, Handler] | None = None) -> BusObject:  # fmt: skip
    """The object at /org/freedesktop/machine1 (*machine_methods*: from :func:`machine_handlers`)."""
    machine_methods = machine_methods or machine_handlers(manager, access)
    registry = manager.registry
    listed: list[Any] = [-1, None]  # (registry generation, ListMachines body)

    def list_machines(call: Call) -> MarshalledBody:
        if listed[0] != registry.generation:
            listed[:] = [registry.generation, _list_body(manager.machines())]
        body: MarshalledBody = listed[1]
        return body

    def get_machine(call: Call, name: str) -> list[Any]:
        return [manager.get(name).object_path]

    def get_machine_by_pid(call: Call, pid: int) -> object:
        if pid == 0:
            return get_machine_of_caller(call)
        return [manager.get_by_pid(pid).object_path]

    async def get_machine_of_caller(call: Call) -> list[Any]:
        return [manager.get_by_pid((await call.credentials()).pid).object_path]

    async def request(call: Call, name: str, machine_id: bytes, service: str, machine_class: str,
                      leader: int, root: str, netif: list[int] | None = None) -> RegistrationRequest:  # fmt: skip
        req = validate_registration(name, machine_id, service, machine_class, leader, root, netif)
        if req.leader == 0:
            req = req.with_leader((await call.credentials()).pid)
        return req

    async def create_machine(call: Call, name: str, machine_id: bytes, service: str, machine_class: str,
                             leader: int, root: str, properties: list[list[Any]]) -> list[Any]:  # fmt: skip
        req = await request(call, name, machine_id, service, machine_class, leader, root)
        return [(await manager.create(req, unit_properties(properties))).object_path]

    async def create_machine_with_network(call: Call, name: str, machine_id: bytes, service: str,
                                          machine_class: str, leader: int, root: str, netif: list[int],
                                          properties: list[list[Any]]) -> list[Any]:  # fmt: skip
        req = await request(call, name, machine_id, service, machine_class, leader, root, netif)
        return [(await manager.create(req, unit_properties(properties))).object_path]

    async def register_machine(call: Call, name: str, machine_id: bytes, service: str, machine_class: str,
                               leader: int, root: str) -> list[Any]:  # fmt: skip
        req = await request(call, name, machine_id, service, machine_class, leader, root)
        return [(await manager.register(req)).object_path]

    async def register_machine_with_network(call: Call, name: str, machine_id: bytes, service: str,
                                            machine_class: str, leader: int, root: str,
                                            netif: list[int]) -> list[Any]:  # fmt: skip
        req = await request(call, name, machine_id, service, machine_class, leader, root, netif)
        return [(await manager.register(req)).object_path]

    def map_from_user(call: Call, name: str, uid: int) -> list[Any]:
        return [access.map_from_machine(name, uid, "uid")]

    def map_from_group(call: Call, name: str, gid: int) -> list[Any]:
        return [access.map_from_machine(name, gid, "gid")]

    def map_to_user(call: Call, uid: int) -> list[Any]:
        machine, inner = access.map_to_machine(uid, "uid")
        return [machine.name, machine.object_path, inner]

    def map_to_group(call: Call, gid: int) -> list[Any]:
        machine, inner = access.map_to_machine(gid, "gid")
        return [machine.name, machine.object_path, inner]

    i = MANAGER_IFACE
    methods: dict[tuple[str, str], Handler] = {
        (i, "MapFromMachineUser"): map_from_user,
        (i, "MapFromMachineGroup"): map_from_group,
        (i, "MapToMachineUser"): map_to_user,
        (i, "MapToMachineGroup"): map_to_group,
        (i, "ListMachines"): list_machines,
        (i, "GetMachine"): get_machine,
        (i, "GetMachineByPID"): get_machine_by_pid,
        (i, "CreateMachine"): create_machine,
        (i, "CreateMachineWithNetwork"): create_machine_with_network,
        (i, "RegisterMachine"): register_machine,
        (i, "RegisterMachineWithNetwork"): register_machine_with_network,
    }
    for name, target in MACHINE_REDIRECTS.items():
        methods[(i, name)] = _redirect(manager, machine_methods[target])
    if personality.is_262():
        methods.update({(i, name): h for name, h in machine262.manager_methods(manager, machine_methods).items()})
    interface = load_interface(i)
    # The rest is the image pool's, loaded on first use: the daemon needs none of it to start.
    image_api = _LazyImages(manager)
    for name in interface.methods:
        methods.setdefault((i, name), image_api.method(name))
    return BusObject(
        interfaces=[interface],
        methods=methods,
        properties={
            (i, "PoolPath"): lambda: manager.pool_path,
            (i, "PoolUsage"): image_api.property("PoolUsage"),
            (i, "PoolLimit"): image_api.property("PoolLimit"),
        },
    )


class _LazyImages:
    """The Manager's image methods and pool properties (:mod:`machined.dbus.images`), imported
    when first called."""

    def __init__(self, manager: MachineManager) -> None:
        self.manager = manager
        self._methods: dict[str, Handler] | None = None
        self._properties: dict[str, PropertyGetter] | None = None

    def _load(self) -> None:
        from machined.dbus import images

        self._methods = images.image_manager_methods(self.manager)
        self._properties = images.image_manager_properties(self.manager)

    def method(self, name: str) -> Handler:
        def handler(call: Call, *args: object) -> object:
            if self._methods is None:
                self._load()
            assert self._methods is not None
            return self._methods[name](call, *args)

        return handler

    def property(self, name: str) -> PropertyGetter:
        def getter() -> object:
            if self._properties is None:
                self._load()
            assert self._properties is not None
            return self._properties[name]()

        return getter


# The Machine interface's properties, shared by every machine object: getter(machine).
_I = MACHINE_IFACE
MACHINE_PROPERTIES: dict[tuple[str, str], PropertyGetter] = {
    (_I, "Name"): lambda m: m.name,
    (_I, "Id"): lambda m: m.id_bytes,
    (_I, "Timestamp"): lambda m: m.timestamp.realtime,
    (_I, "TimestampMonotonic"): lambda m: m.timestamp.monotonic,
    (_I, "Service"): lambda m: m.service,
    (_I, "Unit"): lambda m: m.unit,
    (_I, "Leader"): lambda m: m.leader,
    (_I, "Class"): lambda m: str(m.machine_class),
    (_I, "RootDirectory"): lambda m: m.root_directory,
    (_I, "NetworkInterfaces"): lambda m: list(m.netif),
    (_I, "State"): lambda m: str(m.state),
    # 262's (its interface only)
    (_I, "Subgroup"): lambda m: m.subgroup,
    (_I, "LeaderPIDFDId"): machine262.leader_pidfd_id,
    (_I, "Supervisor"): lambda m: m.supervisor_ref.pid if m.supervisor_ref is not None else 0,
    (_I, "SupervisorPIDFDId"): lambda m: m.supervisor_ref.pidfd_id if m.supervisor_ref is not None else 0,
    (_I, "VSockCID"): lambda m: m.vsock_cid,
    (_I, "SSHAddress"): lambda m: m.ssh_address,
    (_I, "SSHPrivateKeyPath"): lambda m: m.ssh_private_key_path,
    (_I, "UID"): lambda m: m.uid,
}
MACHINE_HIDDEN_PROPERTIES: dict[tuple[str, str], tuple[str, PropertyGetter]] = {(_I, "Scope"): ("s", lambda m: m.unit)}


def machine_object_methods(machine_methods: dict[str, Handler]) -> dict[tuple[str, str], Handler]:
    """The method table of machine objects, from :func:`machine_handlers` (no Unregister there)."""
    return {(MACHINE_IFACE, name): h for name, h in machine_methods.items() if name != "Unregister"}


def machine_object(manager: MachineManager, access: MachineAccess, machine: Machine,
                   methods: dict[tuple[str, str], Handler] | None = None) -> BusObject:  # fmt: skip
    """The object of one machine, at its escaped path: a view on *machine* over the tables every
    machine object shares (*methods*: from :func:`machine_object_methods`, built once)."""
    if methods is None:
        methods = machine_object_methods(machine_handlers(manager, access))
    return BusObject(
        interfaces=[load_interface(MACHINE_IFACE)],
        methods=methods,
        properties=MACHINE_PROPERTIES,
        hidden_properties=MACHINE_HIDDEN_PROPERTIES,
        target=machine,
    )

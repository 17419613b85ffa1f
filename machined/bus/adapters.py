"""Thin adapters: D-Bus methods and properties of the Manager and Machine objects.

Each handler parses its arguments, calls the manager, and returns the list of
out-arguments; the rules live in :mod:`machined.manager`. Manager methods that
take a machine name first (``GetMachineAddresses(name)``…) are redirects: they
look the machine up and run the very handler of the Machine object.
"""

from __future__ import annotations

import errno


from machined import errors
from machined.access import MachineAccess
from machined.bus import images
from machined.bus.introspection import load_interface
from machined.bus.objects import BusObject, Call, FdReply, Handler
from machined.bus.polkit import authorize
from machined.envfile import env_is_valid
from machined.errors import BusError
from machined.machine import Machine, MachineClass
from machined.manager import MachineManager
from machined.naming import path_is_normalized_absolute
from machined.registration import validate_kill, validate_registration
from machined.sessions import shell_command

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



def machine_methods(manager: MachineManager, access: MachineAccess, machine: Machine) -> dict[str, Handler]:
    """The Machine interface's handlers, bound to *machine* (Unregister: Manager only)."""

    async def unregister(call: Call) -> None:
        await authorize(call, "manage-machines", {"machine": machine.name, "verb": "unregister"})
        await manager.unregister(machine)

    async def terminate(call: Call) -> None:
        await authorize(call, "manage-machines", {"machine": machine.name, "verb": "terminate"})
        await manager.terminate(machine)

    async def kill(call: Call, who: str, signal: int) -> None:
        who = validate_kill(who, signal)
        await authorize(call, "manage-machines", {"machine": machine.name, "verb": "kill"})
        await manager.kill(machine, who, signal)

    async def get_addresses(call: Call) -> list:
        return [[(a.family, a.address) for a in await access.addresses(machine)]]

    async def get_os_release(call: Call) -> list:
        return [await access.os_release(machine)]

    async def get_uid_shift(call: Call) -> list:
        return [await access.uid_shift(machine)]

    host = machine.is_host

    async def open_pty(call: Call) -> FdReply:
        await authorize(call, "host-open-pty" if host else "open-pty", {"machine": machine.name})
        fd, path = await access.open_pty(machine)
        return FdReply([0, path], [fd])

    async def open_login(call: Call) -> FdReply:
        await authorize(call, "host-login" if host else "login", {"machine": machine.name, "verb": "login"})
        fd, path = await access.open_login(machine)
        return FdReply([0, path], [fd])

    async def open_shell(call: Call, user: str, path: str, args: list[str], env: list[str]) -> FdReply:
        user = user or "root"
        if path and not path.startswith("/"):
            raise BusError(errors.INVALID_ARGS, f"Specified path '{path}' is not absolute")
        program, argv = shell_command(user, path, args)
        if not env_is_valid(env):
            raise BusError(errors.INVALID_ARGS, "Invalid environment assignments")
        await authorize(call, "host-shell" if host else "shell",
                        {"machine": machine.name, "user": user, "program": program})  # fmt: skip
        fd, pty_path = await access.open_shell(machine, user, program, argv, env)
        return FdReply([0, pty_path], [fd])

    async def open_root_directory(call: Call) -> FdReply:
        await authorize(call, "manage-machines", {"machine": machine.name, "verb": "open_root_directory"})
        return FdReply([0], [await access.open_root_directory(machine)])

    def copier(copy_from: bool, with_flags: bool) -> Handler:
        async def handler(call: Call, src: str, dest: str, flags: int = 0) -> None:
            access.check_copy(machine)
            if with_flags and flags & ~COPY_FLAGS_PUBLIC:
                raise BusError.from_errno(errno.EINVAL)
            if not src.startswith("/"):
                raise BusError(errors.INVALID_ARGS, "Source path must be absolute.")
            dest = dest or src
            if not dest.startswith("/"):
                raise BusError(errors.INVALID_ARGS, "Destination path must be absolute.")
            await authorize(call, "manage-machines",
                            {"machine": machine.name, "verb": "copy", "src": src, "dest": dest})  # fmt: skip
            await access.copy(machine, copy_from, src, dest, bool(flags & COPY_FLAGS_PUBLIC))

        return handler

    async def bind_mount(call: Call, src: str, dest: str, read_only: bool, mkdir: bool) -> None:
        if machine.machine_class is not MachineClass.CONTAINER:
            raise BusError(errors.NOT_SUPPORTED, "Bind mounting is only supported on container machines.")
        if not path_is_normalized_absolute(src):
            raise BusError(errors.INVALID_ARGS, "Source path must be absolute and normalized.")
        dest = dest or src
        if not path_is_normalized_absolute(dest):
            raise BusError(errors.INVALID_ARGS, "Destination path must be absolute and normalized.")
        await authorize(call, "manage-machines",
                        {"machine": machine.name, "verb": "bind", "src": src, "dest": dest})  # fmt: skip
        await access.bind_mount(machine, src, dest, read_only, mkdir)

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
    }


def _redirect(manager: MachineManager, access: MachineAccess, target: str) -> Handler:
    async def handler(call: Call, name: str, *args: object) -> list:
        machine = manager.get(name)
        return await machine_methods(manager, access, machine)[target](call, *args)

    return handler


def manager_object(manager: MachineManager, access: MachineAccess) -> BusObject:
    """The object at /org/freedesktop/machine1."""

    async def list_machines(call: Call) -> list:
        return [[(m.name, str(m.machine_class), m.service, m.object_path) for m in manager.machines()]]

    async def get_machine(call: Call, name: str) -> list:
        return [manager.get(name).object_path]

    async def get_machine_by_pid(call: Call, pid: int) -> list:
        if pid == 0:
            pid = (await call.credentials()).pid
        return [manager.get_by_pid(pid).object_path]

    async def request(call: Call, name: str, machine_id: bytes, service: str, machine_class: str,
                      leader: int, root: str, netif: list[int] | None = None):  # fmt: skip
        req = validate_registration(name, machine_id, service, machine_class, leader, root, netif)
        if req.leader == 0:
            req = req.with_leader((await call.credentials()).pid)
        return req

    async def create_machine(call: Call, name: str, machine_id: bytes, service: str, machine_class: str,
                             leader: int, root: str, properties: list) -> list:  # fmt: skip
        req = await request(call, name, machine_id, service, machine_class, leader, root)
        return [(await manager.create(req, properties)).object_path]

    async def create_machine_with_network(call: Call, name: str, machine_id: bytes, service: str,
                                          machine_class: str, leader: int, root: str, netif: list[int],
                                          properties: list) -> list:  # fmt: skip
        req = await request(call, name, machine_id, service, machine_class, leader, root, netif)
        return [(await manager.create(req, properties)).object_path]

    async def register_machine(call: Call, name: str, machine_id: bytes, service: str, machine_class: str,
                               leader: int, root: str) -> list:  # fmt: skip
        req = await request(call, name, machine_id, service, machine_class, leader, root)
        return [(await manager.register(req)).object_path]

    async def register_machine_with_network(call: Call, name: str, machine_id: bytes, service: str,
                                            machine_class: str, leader: int, root: str,
                                            netif: list[int]) -> list:  # fmt: skip
        req = await request(call, name, machine_id, service, machine_class, leader, root, netif)
        return [(await manager.register(req)).object_path]

    async def map_from_user(call: Call, name: str, uid: int) -> list:
        return [access.map_from_machine(name, uid, "uid")]

    async def map_from_group(call: Call, name: str, gid: int) -> list:
        return [access.map_from_machine(name, gid, "gid")]

    async def map_to_user(call: Call, uid: int) -> list:
        machine, inner = access.map_to_machine(uid, "uid")
        return [machine.name, machine.object_path, inner]

    async def map_to_group(call: Call, gid: int) -> list:
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
        methods[(i, name)] = _redirect(manager, access, target)
    for name, handler in images.image_manager_methods(manager).items():
        methods[(i, name)] = handler
    return BusObject(
        interfaces=[load_interface(i)],
        methods=methods,
        properties={
            (i, "PoolPath"): lambda: manager.pool_path,
            **{(i, name): getter for name, getter in images.image_manager_properties(manager).items()},
        },
    )


def machine_object(manager: MachineManager, access: MachineAccess, machine: Machine) -> BusObject:
    """The object of one machine, at its escaped path."""
    i = MACHINE_IFACE
    return BusObject(
        interfaces=[load_interface(i)],
        methods={(i, name): h for name, h in machine_methods(manager, access, machine).items() if name != "Unregister"},
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

"""What systemd-machined 262 adds to the D-Bus face of 252 (under the 262 personality):
CreateMachineEx/RegisterMachineEx, GetMachineSSHInfo, and CreateMachine*/RegisterMachine*
as 262 takes them: the leader pinned (``Failed to pin process``), the caller kept as
supervisor when it is not the leader, its UID, and polkit's ``create-machine`` /
``register-machine`` through the same core call as varlink's Register
(:func:`machined.lifecycle.register`).
"""

from __future__ import annotations

import os
from typing import Any

from machined import lifecycle
from machined.clients.polkit import authorize
from machined.dbus.objects import Call, Handler
from machined.inside import machine_calls
from machined.machine import Machine
from machined.manager import MachineManager, UnitProperty
from machined.process import ProcessRef
from machined.registration import (
    RegistrationRequest,
    pin_leader,
    pin_process,
    validate_registration,
    validate_registration_ex,
)

VMADDR_CID_LOCAL = 1


def _unit_properties(properties: list[Any]) -> list[UnitProperty]:
    return [(name, variant.signature, variant.value) for name, variant in properties]


async def _register(manager: MachineManager, call: Call, req: RegistrationRequest, allocate_unit: bool,
                    properties: list[UnitProperty] | None = None) -> Machine:  # fmt: skip
    """Register *req* (its leader pinned, or 0 for the caller) for the D-Bus caller of *call*."""
    creds = await call.credentials()
    if req.leader_ref is None and req.leader == 0:
        req = req.replace(leader=creds.pid, leader_ref=pin_process(creds.pid))
    supervisor = ProcessRef.take(creds.pid) if creds.pid != req.leader else None

    async def polkit(action: str, details: dict[str, str]) -> None:
        await authorize(call, action, details)

    return await lifecycle.register(manager, req, allocate_unit, creds.uid, polkit, supervisor, properties)


def manager_methods(manager: MachineManager, machine_methods: dict[str, Handler]) -> dict[str, Handler]:
    """262's Manager methods that differ from 252's, by name."""

    def request(name: str, machine_id: bytes, service: str, machine_class: str, leader: int, root: str,
                netif: list[int] | None = None) -> RegistrationRequest:  # fmt: skip
        req = validate_registration(name, machine_id, service, machine_class, leader, root, netif)
        if req.leader:
            req = req.replace(leader_ref=pin_process(req.leader))
        return req

    async def create_machine(call: Call, name: str, machine_id: bytes, service: str, machine_class: str,
                             leader: int, root: str, properties: list[Any]) -> list[Any]:  # fmt: skip
        req = request(name, machine_id, service, machine_class, leader, root)
        return [(await _register(manager, call, req, True, _unit_properties(properties))).object_path]

    async def create_machine_with_network(call: Call, name: str, machine_id: bytes, service: str,
                                          machine_class: str, leader: int, root: str, netif: list[int],
                                          properties: list[Any]) -> list[Any]:  # fmt: skip
        req = request(name, machine_id, service, machine_class, leader, root, netif)
        return [(await _register(manager, call, req, True, _unit_properties(properties))).object_path]

    async def register_machine(call: Call, name: str, machine_id: bytes, service: str, machine_class: str,
                               leader: int, root: str) -> list[Any]:  # fmt: skip
        req = request(name, machine_id, service, machine_class, leader, root)
        return [(await _register(manager, call, req, False)).object_path]

    async def register_machine_with_network(call: Call, name: str, machine_id: bytes, service: str,
                                            machine_class: str, leader: int, root: str,
                                            netif: list[int]) -> list[Any]:  # fmt: skip
        req = request(name, machine_id, service, machine_class, leader, root, netif)
        return [(await _register(manager, call, req, False)).object_path]

    def ex_request(call: Call, name: str, properties: list[Any]) -> RegistrationRequest:
        fds = call.message.unix_fds
        parsed: list[tuple[str, str, Any]] = []
        for key, variant in properties:
            value = variant.value
            if variant.signature == "h":
                value = fds[value] if 0 <= value < len(fds) else -1
            parsed.append((key, variant.signature, value))
        req, spec = validate_registration_ex(name, parsed)
        leader_ref = pin_leader(spec)
        if leader_ref is not None:
            req = req.replace(leader=leader_ref.pid, leader_ref=leader_ref)
        return req

    async def create_machine_ex(call: Call, name: str, properties: list[Any], scope: list[Any]) -> list[Any]:
        req = ex_request(call, name, properties)
        return [(await _register(manager, call, req, True, _unit_properties(scope))).object_path]

    async def register_machine_ex(call: Call, name: str, properties: list[Any]) -> list[Any]:
        req = ex_request(call, name, properties)
        return [(await _register(manager, call, req, False)).object_path]

    def get_machine_ssh_info(call: Call, name: str) -> object:
        return machine_methods["GetSSHInfo"](manager.get(name), call)

    return {
        "CreateMachine": create_machine,
        "CreateMachineWithNetwork": create_machine_with_network,
        "CreateMachineEx": create_machine_ex,
        "RegisterMachine": register_machine,
        "RegisterMachineWithNetwork": register_machine_with_network,
        "RegisterMachineEx": register_machine_ex,
        "GetMachineSSHInfo": get_machine_ssh_info,
    }


def get_ssh_info(machine: Machine, call: Call) -> list[Any]:
    return list(machine_calls.ssh_info(machine))


_HOST_PIDFD_ID: list[int] = []


def host_pidfd_id() -> int:
    """The pidfd inode id of PID 1 (the ``.host`` machine's leader)."""
    if not _HOST_PIDFD_ID:
        try:
            fd = os.pidfd_open(1)
        except OSError:
            _HOST_PIDFD_ID.append(0)
        else:
            try:
                _HOST_PIDFD_ID.append(os.fstat(fd).st_ino)
            finally:
                os.close(fd)
    return _HOST_PIDFD_ID[0]


def leader_pidfd_id(machine: Machine) -> int:
    if machine.is_host:
        return host_pidfd_id()
    ref = machine.leader_ref
    if ref is not None and ref.pidfd_id:
        return ref.pidfd_id
    return machine.leader_pidfd_id

"""The machine lifecycle calls both front-ends (D-Bus, varlink) make, in upstream's order:
check the arguments, have the caller authorized, act.

Transport-neutral: the caller is authorized through an :data:`~machined.caller.Authorize`
the front-end builds for its transport (polkit asked about a bus name or a process); errors
are :class:`~machined.errors.BusError`, which each front-end answers in its own terms.
"""

from __future__ import annotations

import errno

from machined import errors
from machined.caller import Authorize
from machined.errors import BusError
from machined.machine import Machine
from machined.manager import MachineManager, UnitProperty
from machined.process import ProcessRef
from machined.registration import RegistrationRequest, validate_kill


async def unregister(manager: MachineManager, machine: Machine, authorize: Authorize) -> None:
    await authorize("manage-machines", {"machine": machine.name, "verb": "unregister"})
    await manager.unregister(machine)


async def terminate(manager: MachineManager, machine: Machine, authorize: Authorize) -> None:
    await authorize("manage-machines", {"machine": machine.name, "verb": "terminate"})
    await manager.terminate(machine)


async def kill(
    manager: MachineManager,
    machine: Machine,
    who: str,
    signal: int,
    authorize: Authorize,
) -> None:
    who = validate_kill(who, signal)
    await authorize("manage-machines", {"machine": machine.name, "verb": "kill"})
    await manager.kill(machine, who, signal)


def process_owner(pid: int) -> int | None:
    """The real UID of process *pid*, None if it is gone."""
    import psutil  # here: only registrations by other users than root ask, the idle daemon does without it

    try:
        return psutil.Process(pid).uids().real
    except (psutil.Error, ValueError):  # gone, or no valid PID
        return None


async def register(manager: MachineManager, req: RegistrationRequest, allocate_unit: bool, caller_uid: int,
                   authorize: Authorize, supervisor: ProcessRef | None = None,
                   unit_properties: list[UnitProperty] | None = None) -> Machine:  # fmt: skip
    """Register (262's varlink Register, CreateMachine*/RegisterMachine* on D-Bus under 262):
    polkit's ``create-machine`` when machined is to create the scope, ``register-machine`` when
    the leader's unit is taken as it is; a caller other than root may only register a leader it
    owns (so that nobody terminates a stranger's service). The registering user is kept, and the
    registering process (*supervisor*, pinned by the front-end) when it is not the leader; the
    processes pinned for the request are released with the machine, or here if not kept."""
    if supervisor is not None and supervisor.pid == req.leader:
        supervisor.release()
        supervisor = None
    req = req.replace(uid=caller_uid, supervisor=supervisor)
    try:
        return await _register(manager, req, allocate_unit, caller_uid, authorize, unit_properties or [])
    except BaseException:
        release_unkept(manager, req)
        raise


def release_unkept(manager: MachineManager, req: RegistrationRequest) -> None:
    """Release the processes pinned for *req* unless a registered machine holds them."""
    kept = manager.registry.get(req.name)
    for ref in (req.supervisor, req.leader_ref):
        if ref is not None and (kept is None or (kept.supervisor_ref is not ref and kept.leader_ref is not ref)):
            ref.release()


async def _register(manager: MachineManager, req: RegistrationRequest, allocate_unit: bool, caller_uid: int,
                    authorize: Authorize, unit_properties: list[UnitProperty]) -> Machine:  # fmt: skip
    action = "create-machine" if allocate_unit else "register-machine"
    await authorize(action, {"name": req.name, "class": str(req.machine_class)})
    if caller_uid != 0 and process_owner(req.leader) != caller_uid:
        raise BusError(errors.ACCESS_DENIED, "Only privileged users may register machines for other users",
                       errno_code=errno.EPERM)  # fmt: skip
    if allocate_unit:
        return await manager.create(req, unit_properties)
    return await manager.register(req)

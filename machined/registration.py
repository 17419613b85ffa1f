"""Validation of what clients send, in the order and with the errors of systemd-machined 252.

Each error also names the varlink field it is about (``parameter``), for the varlink front-end."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field, replace
from typing import Any

from machined import errors, personality
from machined.errors import BusError
from machined.machine import VMADDR_CID_ANY, MachineClass
from machined.naming import hostname_is_valid
from machined.process import ProcessRef, start_time

SIGNAL_MAX = 64  # _NSIG - 1: signals 1..64 are valid


@dataclass(frozen=True)
class RegistrationRequest:
    """A validated CreateMachine*/RegisterMachine* request (leader 0 = the caller)."""

    name: str
    id: bytes
    service: str
    machine_class: MachineClass
    leader: int
    root_directory: str
    netif: list[int] = field(default_factory=list)
    # 262: who registers (UID; the registering process when it is not the leader, pinned), the
    # leader pinned by the front-end (a pidfd the caller passed), and what VMs also tell.
    uid: int = 0
    supervisor: ProcessRef | None = field(default=None, compare=False)
    leader_ref: ProcessRef | None = field(default=None, compare=False)
    vsock_cid: int = VMADDR_CID_ANY
    ssh_address: str = ""
    ssh_private_key_path: str = ""
    control_address: str = ""

    def with_leader(self, pid: int) -> RegistrationRequest:
        return replace(self, leader=pid)

    def replace(self, **changes: Any) -> RegistrationRequest:
        return replace(self, **changes)


def validate_registration(
    name: str,
    machine_id: bytes,
    service: str,
    machine_class: str,
    leader: int,
    root_directory: str,
    netif: list[int] | None = None,
) -> RegistrationRequest:
    """Check the arguments of Create*/Register* or raise the error upstream raises first."""
    if not hostname_is_valid(name):
        raise BusError(errors.INVALID_ARGS, "Invalid machine name", parameter="name")
    if len(machine_id) not in (0, 16):
        raise BusError(errors.INVALID_ARGS, "Invalid machine ID parameter", parameter="id")
    for index in netif or []:
        if index <= 0:
            raise BusError(errors.INVALID_ARGS, f"Invalid network interface index {index}", parameter="ifIndices")
    if machine_class == "":
        parsed = MachineClass.UNKNOWN
    elif machine_class in (MachineClass.CONTAINER, MachineClass.VM):
        parsed = MachineClass(machine_class)
    else:
        # "host" included: only the system itself is the host (Debian's CVE-2026-4105 fix).
        raise BusError(errors.INVALID_ARGS, "Invalid machine class parameter", parameter="class")
    if leader == 1:
        raise BusError(errors.INVALID_ARGS, "Invalid leader PID", parameter="leader")
    if root_directory and not root_directory.startswith("/"):
        raise BusError(errors.INVALID_ARGS, "Root directory must be empty or an absolute path",
                       parameter="rootDirectory")  # fmt: skip
    return RegistrationRequest(
        name=name,
        id=bytes(machine_id) if any(machine_id) else b"",
        service=service,
        machine_class=parsed,
        leader=leader,
        root_directory=root_directory,
        netif=list(netif or []),
    )


class KillWho:
    LEADER = "leader"
    SUPERVISOR = "supervisor"  # (262)
    ALL = "all"


def validate_kill(who: str, signal: int) -> str:
    """The normalized ``who`` of a Kill call ("" means all), or InvalidArgs."""
    who = who or KillWho.ALL
    if who not in (KillWho.LEADER, KillWho.ALL) and not (who == KillWho.SUPERVISOR and personality.is_262()):
        raise BusError(errors.INVALID_ARGS, f"Invalid kill parameter '{who}'", parameter="whom")
    if not 1 <= signal <= SIGNAL_MAX:
        raise BusError(errors.INVALID_ARGS, f"Invalid signal {signal}", parameter="signal")
    return who


def vsock_cid_is_regular(cid: int) -> bool:
    """Not VMADDR_CID_ANY, the hypervisor (0), local (1) or host (2) CID."""
    return 2 < cid < VMADDR_CID_ANY


BOTH_LEADER_KEYS = "Both LeaderPID and LeaderPIDFDID must be specified to identify the leader process by PIDFDID"


@dataclass
class LeaderSpec:
    """How a CreateMachineEx/RegisterMachineEx caller names the leader: a pidfd it passed
    (*pidfd*, not ours to close), a PID with its pidfd inode id, or nothing (the caller)."""

    pidfd: int | None = None
    pid: int = 0
    pidfd_id: int = 0


# CreateMachineEx/RegisterMachineEx properties (262) and the D-Bus signature each must have.
EX_PROPERTIES = {
    "Id": "ay",
    "Service": "s",
    "Class": "s",
    "LeaderPIDFD": "h",
    "LeaderPID": "u",
    "LeaderPIDFDID": "t",
    "RootDirectory": "s",
    "NetworkInterfaces": "ai",
    "VSockCID": "u",
    "SSHAddress": "s",
    "SSHPrivateKeyPath": "s",
}


def validate_registration_ex(
    name: str, properties: list[tuple[str, str, Any]]
) -> tuple[RegistrationRequest, LeaderSpec]:
    """Check the (name, signature, value) properties of CreateMachineEx/RegisterMachineEx as
    262 does: each in turn (unknown ones, wrong types, the ID, interfaces and vsock CID), then
    class and root directory. The leader (:class:`LeaderSpec`) is resolved by :func:`pin_leader`;
    the request's leader is 0 until then. A LeaderPIDFD is an fd index resolved by the front-end."""
    if not hostname_is_valid(name):
        raise BusError(errors.INVALID_ARGS, "Invalid machine name")
    machine_id = b""
    service = machine_class = root = ssh_address = ssh_key = ""
    netif: list[int] = []
    vsock_cid = 0  # (an Ex registration without VSockCID keeps none: 0, not written)
    leader = LeaderSpec()
    for key, signature, value in properties:
        expected = EX_PROPERTIES.get(key)
        if expected is None:
            raise BusError(errors.INVALID_ARGS, f"Unknown property '{key}'")
        if signature != expected:
            raise BusError.from_errno(errno.ENXIO)  # what sd-bus reads from a variant of another type
        if key == "Id":
            if len(value) not in (0, 16):
                raise BusError(errors.INVALID_ARGS, "Invalid machine ID parameter")
            machine_id = bytes(value)
        elif key == "Service":
            service = value
        elif key == "Class":
            machine_class = value
        elif key == "LeaderPIDFD":
            leader.pidfd = value
        elif key == "LeaderPID":
            leader.pid = value
        elif key == "LeaderPIDFDID":
            leader.pidfd_id = value
        elif key == "RootDirectory":
            root = value
        elif key == "NetworkInterfaces":
            for index in value:
                if index <= 0:
                    raise BusError(errors.INVALID_ARGS, f"Invalid network interface index {index}")
            netif = list(value)
        elif key == "VSockCID":
            if not vsock_cid_is_regular(value):
                raise BusError(errors.INVALID_ARGS, "JSON field 'vSockCid' is not a regular VSOCK CID.")
            vsock_cid = value
        elif key == "SSHAddress":
            ssh_address = value
        elif key == "SSHPrivateKeyPath":
            ssh_key = value
    if machine_class == "":
        parsed = MachineClass.UNKNOWN
    elif machine_class in (MachineClass.CONTAINER, MachineClass.VM):
        parsed = MachineClass(machine_class)
    else:
        raise BusError(errors.INVALID_ARGS, "Invalid machine class parameter")
    if root and not root.startswith("/"):
        raise BusError(errors.INVALID_ARGS, "Root directory must be empty or an absolute path")
    req = RegistrationRequest(
        name=name,
        id=machine_id if any(machine_id) else b"",
        service=service,
        machine_class=parsed,
        leader=0,
        root_directory=root,
        netif=netif,
        vsock_cid=vsock_cid,
        ssh_address=ssh_address,
        ssh_private_key_path=ssh_key,
    )
    return req, leader


def _pidfd_pid(fd: int) -> int:
    """The PID of the process pidfd *fd* refers to (-1 once it exited), from its fdinfo."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
            for line in f:
                if line.startswith("Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    raise BusError.from_errno(errno.EBADF)


def pin_leader(spec: LeaderSpec) -> ProcessRef | None:
    """The leader a CreateMachineEx/RegisterMachineEx caller named, pinned; None when it named
    none (the caller is the leader). Raises 262's errors; PID 1 is never a leader."""
    if spec.pidfd is not None:
        pid = _pidfd_pid(spec.pidfd)
        if pid <= 0:
            raise BusError.from_errno(errno.ESRCH)
        inode = os.fstat(spec.pidfd).st_ino
        if spec.pid and spec.pid != pid:
            raise BusError(errors.INVALID_ARGS, "LeaderPID and LeaderPIDFD refer to different processes")
        if spec.pidfd_id and spec.pidfd_id != inode:
            raise BusError(errors.INVALID_ARGS, "LeaderPIDFDID does not match the inode number of LeaderPIDFD")
        ref = ProcessRef(pid, start_time=start_time(pid), pidfd=os.dup(spec.pidfd), pidfd_id=inode)
    elif spec.pid or spec.pidfd_id:
        if not (spec.pid and spec.pidfd_id):
            raise BusError(errors.INVALID_ARGS, BOTH_LEADER_KEYS)
        ref = ProcessRef.take(spec.pid, expect_pidfd_id=spec.pidfd_id)
        if ref.pidfd is None or not ref.is_alive():
            ref.release()
            raise BusError.from_errno(
                errno.ESRCH, f"Failed to pin process {spec.pid} by PIDFDID {spec.pidfd_id}: No such process"
            )
    else:
        return None
    if ref.pid == 1:
        ref.release()
        raise BusError(errors.INVALID_ARGS, "Invalid leader PID")
    return ref


def pin_process(pid: int) -> ProcessRef:
    """*pid* pinned by pidfd, or 262's error for a process that cannot be pinned."""
    ref = ProcessRef.take(pid)
    if ref.pidfd is None or not ref.is_alive():
        ref.release()
        raise BusError.from_errno(errno.ESRCH, f"Failed to pin process {pid}: No such process")
    return ref

"""Validation of what clients send, in the order and with the errors of systemd-machined 252.

Each error also names the varlink field it is about (``parameter``), for the varlink front-end."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from machined import errors
from machined.errors import BusError
from machined.machine import MachineClass
from machined.naming import hostname_is_valid

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

    def with_leader(self, pid: int) -> RegistrationRequest:
        return replace(self, leader=pid)


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
    ALL = "all"


def validate_kill(who: str, signal: int) -> str:
    """The normalized ``who`` of a Kill call ("" means all), or InvalidArgs."""
    who = who or KillWho.ALL
    if who not in (KillWho.LEADER, KillWho.ALL):
        raise BusError(errors.INVALID_ARGS, f"Invalid kill parameter '{who}'", parameter="whom")
    if not 1 <= signal <= SIGNAL_MAX:
        raise BusError(errors.INVALID_ARGS, f"Invalid signal {signal}", parameter="signal")
    return who

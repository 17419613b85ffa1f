"""The machine record and its enumerations; no D-Bus, no I/O."""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from typing import Any

from machined.naming import HOST_MACHINE_NAME, machine_object_path
from machined.process import ProcessRef

VMADDR_CID_ANY = 0xFFFFFFFF


class MachineClass(enum.StrEnum):
    """Wire strings of a machine's class; ``UNKNOWN`` is the empty string."""

    UNKNOWN = ""
    CONTAINER = "container"
    VM = "vm"
    HOST = "host"


class MachineState(enum.StrEnum):
    OPENING = "opening"
    RUNNING = "running"
    CLOSING = "closing"


@dataclass
class Timestamp:
    """A point in time on both clocks, in microseconds (0 = unset)."""

    realtime: int = 0
    monotonic: int = 0

    def is_set(self) -> bool:
        return self.realtime > 0 or self.monotonic > 0


@dataclass
class Machine:
    """One registered machine: what clients see of it and what we track."""

    name: str
    id: bytes = b""
    service: str = ""
    machine_class: MachineClass = MachineClass.UNKNOWN
    leader: int = 0
    root_directory: str = ""
    netif: list[int] = field(default_factory=list)
    unit: str = ""
    scope_job: str = ""
    timestamp: Timestamp = field(default_factory=Timestamp)
    started: bool = False
    stopping: bool = False
    # The leader pinned by pidfd from registration on; None for the host and unpinnable PIDs.
    leader_ref: ProcessRef | None = None
    # pidfd inode id read from a state file, to re-verify the leader after a restart.
    leader_pidfd_id: int = 0
    # The machine's ListMachines row as marshalled, kept by the bus adapters (name, class and
    # service never change once the machine is registered).
    list_row: bytes = field(default=b"", repr=False, compare=False)
    # Who registered it over varlink (262): the registering process when it is not the leader
    # (pinned, released with the machine) and its user. D-Bus registrations are root's (252).
    supervisor_ref: ProcessRef | None = field(default=None, repr=False, compare=False)
    uid: int = 0
    # What 262 also keeps of a machine (VMs): vsock CID (VMADDR_CID_ANY: none), SSH endpoint
    # and key, control socket address.
    vsock_cid: int = VMADDR_CID_ANY
    ssh_address: str = ""
    ssh_private_key_path: str = ""
    control_address: str = ""
    # The cgroup below the unit the machine lives in (262's per-user instance: a varlink
    # registration of a leader in the user's manager is in a subgroup of user@UID.service).
    subgroup: str = ""
    # "podman" or "docker" for a container registered from its runtime's scope (--register-oci):
    # its scope is the runtime's, never stopped by machined; "" for every other machine.
    runtime: str = ""
    # Its Properties.GetAll reply body as last marshalled, with the values it was made of.
    get_all_cache: tuple[Any, ...] | None = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def object_path(self) -> str:
        return machine_object_path(self.name)

    @property
    def is_host(self) -> bool:
        return self.machine_class is MachineClass.HOST

    @property
    def state(self) -> MachineState:
        if self.is_host:
            return MachineState.RUNNING
        if self.stopping:
            return MachineState.CLOSING
        if self.scope_job:
            return MachineState.OPENING
        return MachineState.RUNNING

    @property
    def id_bytes(self) -> bytes:
        """The Id property: empty when no ID (or an all-zero one) is known."""
        return b"" if not any(self.id) else self.id


def host_machine(machine_id: bytes, boot: Timestamp) -> Machine:
    """The ``.host`` pseudo-machine: the system itself, always present."""
    return Machine(
        name=HOST_MACHINE_NAME,
        id=machine_id,
        machine_class=MachineClass.HOST,
        leader=1,
        root_directory="/",
        unit="-.slice",
        timestamp=boot,
        started=True,
        vsock_cid=VMADDR_CID_LOCAL if _vsock_available() else VMADDR_CID_ANY,
    )


VMADDR_CID_LOCAL = 1
IOCTL_VM_SOCKETS_GET_LOCAL_CID = 0x7B9


def _vsock_available() -> bool:
    """Whether AF_VSOCK works here (``/dev/vsock`` answers the local-CID ioctl): 262 then gives
    ``.host`` the loopback CID, the same on every host."""
    import fcntl
    import os

    try:
        fd = os.open("/dev/vsock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, bytearray(4))
    except OSError:
        return False
    finally:
        os.close(fd)
    return True

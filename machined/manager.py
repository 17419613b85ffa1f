"""The registry's use cases: lookups now, registration and lifecycle later.

Free of D-Bus: adapters in :mod:`machined.bus` translate calls into these
methods and the :class:`~machined.errors.BusError` they raise into replies.
"""

from __future__ import annotations

import asyncio
import logging

from machined import errors
from machined.addresses import Address, read_addresses
from machined.envfile import read_os_release
from machined.cgroup import pid_unit
from machined.errors import BusError
from machined.machine import Machine, MachineClass
from machined.registry import Registry

log = logging.getLogger(__name__)

POOL_PATH = "/var/lib/machines"
UINT64_MAX = 2**64 - 1


class MachineManager:
    """Owns the registry and everything that changes it."""

    def __init__(self, host: Machine, pool_path: str = POOL_PATH) -> None:
        self.registry = Registry()
        self.host = host
        self.pool_path = pool_path
        self.registry.add(host)

    def machines(self) -> list[Machine]:
        return list(self.registry)

    def get(self, name: str) -> Machine:
        machine = self.registry.get(name)
        if machine is None:
            raise errors.no_such_machine(name)
        return machine

    def find_by_pid(self, pid: int) -> Machine | None:
        """The machine *pid* belongs to: by leader first, then by its unit."""
        machine = self.registry.by_leader(pid)
        if machine is not None:
            return machine
        unit = pid_unit(pid)
        return self.registry.by_unit(unit) if unit else None

    def get_by_pid(self, pid: int) -> Machine:
        machine = self.find_by_pid(pid)
        if machine is None:
            raise BusError(errors.NO_MACHINE_FOR_PID, f"PID {pid} does not belong to any known machine")
        return machine

    def pool_usage(self) -> int:
        return UINT64_MAX

    def pool_limit(self) -> int:
        return UINT64_MAX

    # ----- looking inside machines ----------------------------------------------------

    async def addresses(self, machine: Machine) -> list[Address]:
        if machine.is_host:
            return await asyncio.to_thread(read_addresses)
        if machine.machine_class is not MachineClass.CONTAINER:
            raise BusError(errors.NOT_SUPPORTED, "Requesting IP address data is only supported on container machines.")
        raise BusError(errors.NOT_SUPPORTED, "Not implemented yet for containers")

    async def os_release(self, machine: Machine) -> dict[str, str]:
        if machine.is_host:
            try:
                return await asyncio.to_thread(read_os_release, "/")
            except FileNotFoundError:
                raise BusError(errors.FAILED, "Machine does not contain OS release information") from None
        if machine.machine_class is not MachineClass.CONTAINER:
            raise BusError(errors.NOT_SUPPORTED, "Requesting OS release data is only supported on container machines.")
        raise BusError(errors.NOT_SUPPORTED, "Not implemented yet for containers")

    async def uid_shift(self, machine: Machine) -> int:
        if machine.is_host:
            return 0
        if machine.machine_class is not MachineClass.CONTAINER:
            raise BusError(errors.NOT_SUPPORTED, "UID/GID shift may only be determined for container machines.")
        raise BusError(errors.NOT_SUPPORTED, "Not implemented yet for containers")

"""The set of known machines, indexed by name, leader PID and unit."""

from __future__ import annotations

from collections.abc import Iterator

from machined.machine import Machine


class Registry:
    """Machines by name, with leader, unit and object path indexes kept in step."""

    def __init__(self) -> None:
        self._by_name: dict[str, Machine] = {}
        self._by_leader: dict[int, Machine] = {}
        self._by_unit: dict[str, Machine] = {}
        self._by_path: dict[str, Machine] = {}
        # Changes whenever a machine comes or goes: lets readers cache what they derive.
        self.generation = 0

    def __len__(self) -> int:
        return len(self._by_name)

    def __iter__(self) -> Iterator[Machine]:
        return iter(list(self._by_name.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def get(self, name: str) -> Machine | None:
        return self._by_name.get(name)

    def by_leader(self, pid: int) -> Machine | None:
        return self._by_leader.get(pid)

    def by_unit(self, unit: str) -> Machine | None:
        return self._by_unit.get(unit)

    def by_path(self, path: str) -> Machine | None:
        """The machine whose object path (as we escape it) is *path*."""
        return self._by_path.get(path)

    def add(self, machine: Machine) -> None:
        if machine.name in self._by_name:
            raise KeyError(f"machine {machine.name} exists")
        self._by_name[machine.name] = machine
        self._by_path[machine.object_path] = machine
        self.generation += 1

    def index_leader(self, machine: Machine) -> bool:
        """Record *machine*'s leader; False if another machine has that leader."""
        other = self._by_leader.get(machine.leader)
        if other is not None and other is not machine:
            return False
        self._by_leader[machine.leader] = machine
        return True

    def index_unit(self, machine: Machine) -> None:
        if machine.unit:
            self._by_unit[machine.unit] = machine

    def remove(self, machine: Machine) -> None:
        if self._by_name.get(machine.name) is machine:
            del self._by_name[machine.name]
            del self._by_path[machine.object_path]
            self.generation += 1
        if self._by_leader.get(machine.leader) is machine:
            del self._by_leader[machine.leader]
        if machine.unit and self._by_unit.get(machine.unit) is machine:
            del self._by_unit[machine.unit]

"""The watcher: containers' scopes appearing become machines, a refused terminate, clashes.

Driven by the manager: it hands over every unit systemd announces (UnitNew, a unit's
PropertiesChanged) that has no machine, and the units found by pattern at start. A unit named as
a container's scope (:func:`machined.oci.parse_scope`) is looked up in its runtime (a few short
retries while the runtime writes its state: no periodic polling), its init process pinned and
checked to be in that scope, and registered as RegisterMachine would, with the scope as its unit.
Its going is the manager's ordinary garbage collection (the scope inactive or gone), except that
the scope is never stopped by us: it is the runtime's.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from machined.cgroup import cgroup_path_get_unit, pid_cgroup
from machined.errors import BusError
from machined.machine import Machine, MachineClass
from machined.oci import DOCKER, PODMAN, SCOPE_PREFIXES, ContainerRef, Facts, escape, machine_name, parse_scope
from machined.oci.http import HTTPError
from machined.process import ProcessRef
from machined.registration import RegistrationRequest

if TYPE_CHECKING:
    from machined.manager import MachineManager

log = logging.getLogger(__name__)

# Delays between looks at a runtime's state right after its scope appeared (about 6 s in all).
RETRY_DELAYS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0)


class Reader(Protocol):
    runtime: str

    def read(self, ref: ContainerRef) -> Facts | None | Awaitable[Facts | None]: ...


Stopper = Callable[[ContainerRef], Awaitable[bool]]
ListUnits = Callable[[list[str]], Awaitable[list[tuple[str, str]]]]  # patterns → [(unit, active state)]


def _default_readers() -> dict[str, Reader]:
    from machined.oci.docker import DockerReader
    from machined.oci.podman import PodmanReader

    return {PODMAN: PodmanReader(), DOCKER: DockerReader()}


def _default_stoppers() -> dict[str, Stopper]:
    from machined.oci import podman_api
    from machined.oci.docker import DockerReader

    return {PODMAN: podman_api.stop, DOCKER: DockerReader().stop}


class OciWatcher:
    """Registers the runtimes' containers as machines (see the module's text)."""

    def __init__(self, manager: MachineManager, readers: dict[str, Reader] | None = None,
                 stoppers: dict[str, Stopper] | None = None, retry_delays: tuple[float, ...] = RETRY_DELAYS,
                 list_units: ListUnits | None = None) -> None:  # fmt: skip
        self.manager = manager
        self.list_units = list_units
        self.in_scope: Callable[[int, str], bool] = _in_scope  # (the tests' fake cgroups)
        self.readers = readers if readers is not None else _default_readers()
        self.stoppers = stoppers if stoppers is not None else _default_stoppers()
        self.retry_delays = retry_delays
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: dict[str, asyncio.Task[None]] = {}  # scope → its registration under way
        self._logged_clash: set[str] = set()
        self._own_name: dict[str, str] = {}  # scope → the machine's name where it is the container's own
        manager.external = self

    # ----- what the manager hands over -------------------------------------------------------

    def adopt(self, machine: Machine) -> None:
        """A machine read back from its state file at start: a container's when its unit is a
        container's scope and its service that runtime's."""
        ref = parse_scope(machine.unit)
        if ref is not None and machine.service == ref.runtime and machine.machine_class is MachineClass.CONTAINER:
            machine.runtime = ref.runtime

    def forget(self, machine: Machine) -> None:
        """A container's machine is gone. Its scope is looked at once more: a container started
        again at once (``docker restart``) may run in a scope of the same name already."""
        self._own_name.pop(machine.unit, None)
        if machine.unit:
            self.unit_seen(machine.unit)

    def unit_seen(self, unit: str) -> None:
        """systemd announced *unit* (new, or its properties changed) and no machine has it."""
        if not unit.startswith(SCOPE_PREFIXES) or unit in self._pending:
            return
        ref = parse_scope(unit)
        if ref is None or ref.runtime not in self.readers:
            return
        task = asyncio.get_running_loop().create_task(self._register(ref))
        self._pending[unit] = task

        def done(_task: asyncio.Task[None]) -> None:
            if self._pending.get(unit) is _task:
                del self._pending[unit]

        task.add_done_callback(done)

    def reloaded(self) -> None:
        """systemd reloaded or came back: signals may have been lost, so list the scopes again."""
        task = asyncio.get_running_loop().create_task(self.scan(quiet=True))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def scan(self, quiet: bool = False) -> None:
        """The containers running when the daemon starts: their scopes, listed by pattern (*quiet*:
        a failure only logged for debugging: systemd may be away for a moment)."""
        from machined.oci import SCOPE_PATTERNS

        if self.list_units is None:
            return
        try:
            units = await self.list_units(SCOPE_PATTERNS)
        except BusError as e:
            (log.debug if quiet else log.warning)("Cannot list the containers' scopes: %s", e.message)
            return
        for unit, active_state in units:
            if active_state in ("active", "activating", "reloading") and self.manager.registry.by_unit(unit) is None:
                self.unit_seen(unit)

    async def settle(self, timeout: float | None = None) -> None:
        """Wait for the registrations under way (start-up, tests), at most *timeout* seconds;
        they go on after it."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self._pending:
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return
            await asyncio.wait(list(self._pending.values()), timeout=left)

    def close(self) -> None:
        for task in [*self._pending.values(), *self._tasks]:
            task.cancel()

    # ----- registration ----------------------------------------------------------------------

    async def _facts(self, ref: ContainerRef) -> Facts | None:
        reader = self.readers[ref.runtime]
        if asyncio.iscoroutinefunction(reader.read):
            return await reader.read(ref)  # type: ignore[no-any-return]
        return await asyncio.to_thread(reader.read, ref)  # type: ignore[arg-type]  # files: off the loop

    async def _register(self, ref: ContainerRef) -> None:
        facts: Facts | None = None
        for delay in self.retry_delays:
            if delay:
                await asyncio.sleep(delay)
            if self.manager.registry.by_unit(ref.scope) is not None:
                return  # registered meanwhile (restart: read back from its state file)
            try:
                facts = await self._facts(ref)
            except (OSError, HTTPError) as e:
                log.debug("Cannot read %s container %s yet: %s", ref.runtime, ref.id[:12], e)
                facts = None
            if facts is not None and facts.pid and self.in_scope(facts.pid, ref.scope):
                break
            facts = None
            if not await self._scope_active(ref.scope):
                return  # the scope went (UnitRemoved, a stopped container): nothing to wait for
        if facts is None:
            log.debug("No running %s container for %s.", ref.runtime, ref.scope)
            return
        leader = ProcessRef.take(facts.pid)
        if leader.pidfd is None or not leader.is_alive() or not self.in_scope(facts.pid, ref.scope):
            leader.release()  # gone, or its PID taken by another process meanwhile
            return
        taken = {m.name for m in self.manager.registry}
        name = machine_name(facts.name, ref, taken)
        wanted = machine_name(facts.name, ref)
        if name != wanted:
            self._log_clash(wanted, ref, name)
        req = RegistrationRequest(name=name, id=b"", service=ref.runtime, machine_class=MachineClass.CONTAINER,
                                  leader=facts.pid, root_directory=facts.root_directory, leader_ref=leader)  # fmt: skip
        try:
            machine = await self.manager.register_external(req, ref.scope, ref.runtime)
        except BusError as e:
            leader.release()
            log.warning("Cannot register %s container %s as machine %s: %s", ref.runtime, ref.id[:12], name,
                        escape(e.message))  # fmt: skip
            return
        if machine.name == _plain(facts.name, ref):
            self._own_name[ref.scope] = machine.name
        log.info("Registered %s container %s (%s) as machine %s.", ref.runtime, ref.id[:12],
                 escape(_plain(facts.name, ref)), machine.name)  # fmt: skip

    async def _scope_active(self, scope: str) -> bool:
        systemd = self.manager.systemd
        return systemd is None or await systemd.unit_is_active(scope)

    def _log_clash(self, wanted: str, ref: ContainerRef, name: str) -> None:
        if ref.id in self._logged_clash:
            return
        if len(self._logged_clash) > 4096:
            self._logged_clash.clear()
        self._logged_clash.add(ref.id)
        log.warning("Machine name %s is taken: %s container %s registered as %s.", wanted, ref.runtime,
                    ref.id[:12], name)  # fmt: skip

    async def evicted(self, machine: Machine) -> None:
        """An ordinary registration took the name of container machine *machine* (dropped by the
        manager): the container comes back under its fallback name."""
        ref = parse_scope(machine.unit)
        if ref is None:
            return
        log.warning("Machine name %s is taken by a registration: %s container %s is now machine %s.",
                    machine.name, ref.runtime, ref.id[:12], ref.fallback_name)  # fmt: skip
        self._logged_clash.add(ref.id)
        self.unit_seen(ref.scope)

    # ----- terminate ---------------------------------------------------------------------------

    async def terminate(self, machine: Machine) -> None:
        """TerminateMachine of a container's machine: through its runtime's API socket, or refused
        (EOPNOTSUPP) naming the runtime's own command. Never a stop of the runtime's scope."""
        ref = parse_scope(machine.unit)
        runtime = machine.runtime
        stopper = self.stoppers.get(runtime) if ref is not None else None
        if ref is not None and stopper is not None:
            try:
                if await stopper(ref):
                    return
            except HTTPError as e:
                log.debug("%s's API socket does not answer: %s", runtime, e)
        # Its name when the machine bears it unchanged, else its ID (a name made valid is not podman's).
        who = machine.name if ref is None or self._own_name.get(ref.scope) == machine.name else ref.id[:12]
        raise BusError.from_errno(
            errno.EOPNOTSUPP,
            f"Machine {machine.name} is a {runtime} container: stop it with '{runtime} stop {who}'",
        )


def _plain(container_name: str, ref: ContainerRef) -> str:
    return container_name[1:] if ref.runtime == DOCKER and container_name.startswith("/") else container_name


def _in_scope(pid: int, scope: str) -> bool:
    path = pid_cgroup(pid)
    return path is not None and cgroup_path_get_unit(path) == scope

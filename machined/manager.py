"""The registry's use cases: registration, lifecycle, garbage collection, lookups.

Free of D-Bus: adapters in :mod:`machined.dbus` translate calls into these
methods and the :class:`~machined.errors.BusError` they raise into replies.
The service manager is reached through a :class:`ServiceManager` port, and
machine arrivals, state changes and departures are emitted once, as
:mod:`machined.events`, to whoever subscribed (D-Bus signals, varlink watchers, metrics).

Lifecycle as in systemd-machined 252: events from systemd only queue machines
for garbage collection; one GC pass asks systemd whether a machine's unit (or
its pending job) is still active, stops it if not, and finalizes it when it is
gone.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable, Coroutine
from signal import SIGTERM
from typing import Any, Protocol

from machined import caller, errors, journal, personality
from machined.cgroup import (
    cgroup_path_get_unit,
    cgroup_path_get_unit_full,
    cgroup_path_get_user_unit_full,
    pid_cgroup,
)
from machined.children.limits import Operations
from machined.errors import BusError
from machined.events import NEW, REMOVED, Event, Events, Subscriber
from machined.machine import Machine, MachineClass, Timestamp
from machined.naming import machine_scope_name
from machined.process import ProcessRef
from machined.registration import KillWho, RegistrationRequest
from machined.registry import Registry
from machined.statefile import StateDir

log = logging.getLogger(__name__)

POOL_PATH = "/var/lib/machines"
MACHINE_SLICE = "machine.slice"
SCOPE_TASKS_MAX = 16384
# How long CreateMachine waits for its scope's start job (clients give up after 25 s).
START_JOB_TIMEOUT = 20.0
# Machines a GC pass checks at once. The daemon's own calls to PID 1 are served before callers',
# so a pass takes few of the 32 that may be in flight: registrations keep the rest.
GC_CONCURRENCY = 4
# Machines checked at once when recovering at start, before any caller is served: half of them.
RECOVERY_CONCURRENCY = 16


# A unit property as the core passes it to the service manager: (name, D-Bus signature, value).
# The systemd client turns it into whatever its transport needs (a D-Bus variant).
UnitProperty = tuple[str, str, Any]


class ServiceManager(Protocol):
    """What machined needs from systemd (PID 1)."""

    async def start_transient_unit(self, name: str, properties: list[UnitProperty]) -> str: ...
    async def stop_unit(self, unit: str) -> str: ...
    async def kill_unit(self, unit: str, signal: int) -> None: ...
    async def kill_unit_subgroup(self, unit: str, subgroup: str, signal: int) -> None: ...
    async def unit_is_active(self, unit: str) -> bool: ...
    async def job_is_active(self, job: str) -> bool: ...
    async def start_login(self, pty_path: str) -> None: ...
    async def start_shell(self, slave: int, pty_path: str, user: str, path: str, argv: list[str],
                          env: list[str]) -> None: ...  # fmt: skip


class ExternalMachines(Protocol):
    """Machines of containers that a runtime runs (``--register-oci``: :mod:`machined.oci`).

    The manager hands it the units systemd announces that no machine has, the machines read back
    at start, and the terminate of such a machine; it tells it when a container's machine loses
    its name to an ordinary registration, and when one goes."""

    def adopt(self, machine: Machine) -> None: ...
    def unit_seen(self, unit: str) -> None: ...
    async def terminate(self, machine: Machine) -> None: ...
    async def evicted(self, machine: Machine) -> None: ...
    def forget(self, machine: Machine) -> None: ...
    def reloaded(self) -> None: ...


Announce = Callable[[str, Machine], None]  # ("MachineNew" | "MachineRemoved", machine)


def _announcer(announce: Announce) -> Subscriber:
    """An :data:`Announce` callback as an event subscriber (MachineNew, MachineRemoved only)."""

    def on_event(event: Event, machine: Machine) -> None:
        if event.kind in (NEW, REMOVED):
            announce("MachineNew" if event.kind == NEW else "MachineRemoved", machine)

    return on_event


def now() -> Timestamp:
    return Timestamp(
        realtime=time.clock_gettime_ns(time.CLOCK_REALTIME) // 1000,
        monotonic=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000,
    )


def scope_properties(machine: Machine, extra: list[UnitProperty]) -> list[UnitProperty]:
    """The properties of a machine's scope, upstream's first, the caller's last (they win).

    Unlike upstream, no ``AddRef``: a reference costs PID 1 a match rule per machine on the
    bus (see :mod:`machined.clients.systemd1`)."""
    kind = "Virtual Machine" if machine.machine_class is MachineClass.VM else "Container"
    return [
        ("Slice", "s", MACHINE_SLICE),
        ("Description", "s", f"{kind} {machine.name}"),
        ("PIDs", "au", [machine.leader]),
        ("Delegate", "b", True),
        ("CollectMode", "s", "inactive-or-failed"),
        ("TasksMax", "t", SCOPE_TASKS_MAX),
        *extra,
    ]


class MachineManager:
    """Owns the registry and everything that changes it."""

    def __init__(
        self,
        host: Machine,
        state: StateDir,
        systemd: ServiceManager | None = None,
        announce: Announce | None = None,
        pool_path: str = POOL_PATH,
    ) -> None:
        self.registry = Registry()
        self.host = host
        self.state = state
        self.systemd = systemd
        # Every change of the registry, emitted once to its subscribers.
        self.events = Events()
        if announce is not None:
            self.events.subscribe(_announcer(announce))
        self.pool_path = pool_path
        # Long-running children (copies, image removal and cloning): at most 64 at once.
        self.operations = Operations()
        self.registry.add(host)
        self._gc_queue: dict[int, Machine] = {}
        self._gc_wakeup = asyncio.Event()
        self._gc_task: asyncio.Task[None] | None = None
        # Pending CreateMachine replies, by machine identity.
        self._create_waiters: dict[int, asyncio.Future[str]] = {}
        # JobRemoved results that arrived before StartTransientUnit's reply was read.
        self._early_jobs: dict[str, str] = {}
        self._starting = 0
        # Machines between registration request and start: GC leaves them alone.
        self._in_progress: set[int] = set()
        # Scopes of registrations given up on while PID 1 did not answer: stopped when it does.
        self._abandoned: set[str] = set()
        # Units whose stop job (ours, for a stopping machine) systemd reported done: inactive.
        self._stopped_units: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.gc_passes = 0  # read by the metrics exporter
        # The per-user instance (``machined --user``): units are the user's manager's, and a
        # machine may live in a cgroup below its unit (its subgroup), watched through its leader.
        self.user_scope = False
        self._leader_watches: dict[int, int] = {}  # machine identity → its leader's pidfd
        # Containers' machines found from their runtimes' scopes (--register-oci); None: off.
        self.external: ExternalMachines | None = None

    # ----- lookups -------------------------------------------------------------------

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
        if machine is not None and (machine.leader_ref is None or machine.leader_ref.is_pid(pid)):
            return machine
        # Not (or no longer) that leader: a recycled PID belongs where its cgroup says.
        path = pid_cgroup(pid)
        unit = cgroup_path_get_unit(path) if path else None
        return self.registry.by_unit(unit) if unit else None

    def get_by_pid(self, pid: int) -> Machine:
        machine = self.find_by_pid(pid)
        if machine is None:
            raise BusError(errors.NO_MACHINE_FOR_PID, f"PID {pid} does not belong to any known machine")
        return machine

    # ----- registration --------------------------------------------------------------

    async def create(self, req: RegistrationRequest, properties: list[UnitProperty]) -> Machine:
        """CreateMachine: a new scope for the leader; returns once systemd started it."""
        machine = await self._add(req)
        try:
            await self._start(machine, properties)
        except BaseException:
            self._drop_unstarted(machine)
            raise
        finally:
            self._in_progress.discard(id(machine))
        if machine.scope_job:
            waiter = asyncio.get_running_loop().create_future()
            self._create_waiters[id(machine)] = waiter
            self._claim_early_job(machine)
            try:
                result = await asyncio.wait_for(asyncio.shield(waiter), START_JOB_TIMEOUT)
            except TimeoutError:
                # systemd never told us (it left the bus, or is wedged): give up on this machine
                # and stop its scope once systemd answers again, so no scope outlives it.
                log.warning("Start job of %s did not finish in time; giving up on machine %s.",
                            machine.unit, machine.name)  # fmt: skip
                unit = machine.unit
                await self.finalize(machine)
                self._abandon(unit)
                raise BusError.from_errno(
                    errno.ETIMEDOUT, f"Start job for unit {unit} did not finish in time"
                ) from None
            finally:
                self._create_waiters.pop(id(machine), None)
            if result != "done":
                raise BusError(errors.JOB_FAILED, f"Start job for unit {machine.unit} failed with '{result}'")
        return machine

    async def register(self, req: RegistrationRequest) -> Machine:
        """RegisterMachine: the leader's existing unit becomes the machine's unit.

        In the per-user instance, as 262: a D-Bus RegisterMachine takes the unit of the user's
        manager the leader runs in; a varlink Register the system's unit holding it (the user's
        ``user@UID.service``), with the cgroup below as the machine's subgroup."""
        return await self._placed(await self._add(req), self._place_by_leader)

    def _place_by_leader(self, machine: Machine) -> None:
        """RegisterMachine's unit (and 262's subgroup): where the leader runs."""
        path = pid_cgroup(machine.leader)
        if path is None:
            raise BusError.from_errno(
                errno.ESRCH, f"Failed to determine unit of process {machine.leader} : No such process"
            )
        subgroup = ""
        if not self.user_scope and personality.is_262():
            # 262 keeps where below its unit the leader runs (nspawn --keep-unit: its payload)
            unit, subgroup = cgroup_path_get_unit_full(path)
        elif not self.user_scope:
            unit = cgroup_path_get_unit(path)
        elif caller.over_dbus():
            unit, subgroup = cgroup_path_get_user_unit_full(path)
        else:
            unit, subgroup = cgroup_path_get_unit_full(path)
        if unit is None:
            raise BusError.from_errno(
                errno.ENXIO, f"Failed to determine unit of process {machine.leader} : No such device or address"
            )
        machine.unit = unit
        machine.subgroup = subgroup

    async def _placed(self, machine: Machine, place: Callable[[Machine], None]) -> Machine:
        """A machine just added, given its unit by *place*, started (or dropped if that fails)."""
        try:
            place(machine)
            await self._start(machine, [])
        except BaseException:
            self._drop_unstarted(machine)
            raise
        finally:
            self._in_progress.discard(id(machine))
        return machine

    async def register_external(self, req: RegistrationRequest, unit: str, runtime: str) -> Machine:
        """A runtime's container (--register-oci): registered as RegisterMachine registers, with
        the runtime's scope *unit* as its unit (never a new scope, never a subgroup)."""

        def place(machine: Machine) -> None:
            machine.unit = unit
            machine.runtime = runtime

        return await self._placed(await self._add(req, external=True), place)

    async def _add(self, req: RegistrationRequest, external: bool = False) -> Machine:
        existing = self.registry.get(req.name)
        if existing is not None and existing.runtime and not external and self.external is not None:
            # An ordinary registration wins over a container's machine of that name: the
            # container is registered again under its fallback name.
            await self.finalize(existing)
            self._spawn(self.external.evicted(existing))
            existing = self.registry.get(req.name)
        if existing is not None:
            if not await self._provably_dead(existing):
                raise BusError(errors.MACHINE_EXISTS, f"Machine '{req.name}' already exists")
            # Beyond upstream: a dead holder does not block the name forever.
            log.info("Machine %s is gone (leader %d exited, unit inactive); replacing it.",
                     existing.name, existing.leader)  # fmt: skip
            await self.finalize(existing)
            if req.name in self.registry:  # somebody else took it while we waited
                raise BusError(errors.MACHINE_EXISTS, f"Machine '{req.name}' already exists")
        machine = Machine(
            name=req.name,
            id=req.id,
            service=req.service,
            machine_class=req.machine_class,
            leader=req.leader,
            root_directory=req.root_directory,
            netif=list(req.netif),
            leader_ref=req.leader_ref if req.leader_ref is not None else ProcessRef.take(req.leader),
            supervisor_ref=req.supervisor,
            uid=req.uid,
            vsock_cid=req.vsock_cid,
            ssh_address=req.ssh_address,
            ssh_private_key_path=req.ssh_private_key_path,
            control_address=req.control_address,
        )
        self.registry.add(machine)
        self._in_progress.add(id(machine))
        return machine

    async def _provably_dead(self, machine: Machine) -> bool:
        if machine.is_host or not machine.started or machine.scope_job:
            return False
        if machine.leader_ref is not None and machine.leader_ref.is_alive():
            return False
        assert self.systemd is not None
        return not (machine.unit and await self.systemd.unit_is_active(machine.unit))

    def _drop_unstarted(self, machine: Machine) -> None:
        if not machine.started:
            self.registry.remove(machine)

    async def _start(self, machine: Machine, properties: list[UnitProperty]) -> None:
        """machine_start(): index the leader, ensure a unit, announce, persist."""
        if machine.machine_class not in (MachineClass.CONTAINER, MachineClass.VM):
            raise errors.not_supported()
        if machine.started:
            return
        if not self.registry.index_leader(machine):
            raise BusError.from_errno(errno.EEXIST)
        if not machine.unit:
            assert self.systemd is not None
            machine.unit = machine_scope_name(machine.name)
            # Write ahead: if we are killed before the job returns, a restart finds the file
            # and asks systemd about the scope, so a scope never outlives our knowledge of it.
            self._write_state(machine)
            self._starting += 1
            try:
                job = await self._start_scope(machine, properties)
            except BaseException as e:
                self.state.remove(machine)
                if isinstance(e, BusError) and e.name == errors.errno_error_name(errno.ETIMEDOUT):
                    self._abandon(machine.unit)  # PID 1 may still start it: stop it when it answers
                machine.unit = ""
                raise
            finally:
                self._starting -= 1
            machine.scope_job = job
        self.registry.index_unit(machine)
        if machine.subgroup:
            self._watch_leader(machine)
        journal.machine_started(machine)
        if not machine.timestamp.is_set():
            machine.timestamp = now()
        machine.started = True
        self._save(machine)
        self.events.machine_new(machine)

    def _watch_leader(self, machine: Machine) -> None:
        """A machine in a subgroup of a unit (262's per-user instance) goes with its leader:
        systemd says nothing about a cgroup below a unit, the leader's pidfd does."""
        ref = machine.leader_ref
        if ref is None or ref.pidfd is None or id(machine) in self._leader_watches:
            return
        fd = ref.pidfd
        asyncio.get_running_loop().add_reader(fd, self._leader_exited, machine)
        self._leader_watches[id(machine)] = fd

    def _leader_exited(self, machine: Machine) -> None:
        self._unwatch_leader(machine)
        self.queue_gc(machine)

    def _unwatch_leader(self, machine: Machine) -> None:
        fd = self._leader_watches.pop(id(machine), None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)

    async def _start_scope(self, machine: Machine, properties: list[UnitProperty]) -> str:
        """StartTransientUnit for the machine's scope. 262 asks again when systemd refuses a
        property (UnknownProperty, PropertyReadOnly: its PIDFDs fallback), and that second
        request carries only machined's own properties, not the caller's."""
        assert self.systemd is not None
        try:
            return await self.systemd.start_transient_unit(machine.unit, scope_properties(machine, properties))
        except BusError as e:
            if not (properties and personality.is_262() and e.name in (errors.UNKNOWN_PROPERTY,
                                                                       errors.PROPERTY_READ_ONLY)):  # fmt: skip
                raise
        return await self.systemd.start_transient_unit(machine.unit, scope_properties(machine, []))

    def _save(self, machine: Machine) -> None:
        if machine.started:
            self._write_state(machine)

    def _write_state(self, machine: Machine) -> None:
        try:
            self.state.save(machine)
        except OSError as e:
            log.error("Failed to save machine data %s: %s", self.state.file_of(machine.name), e)

    # ----- lifecycle -----------------------------------------------------------------

    async def terminate(self, machine: Machine) -> None:
        """machine_stop(): ask systemd to stop the unit; removal follows through GC."""
        if machine.machine_class not in (MachineClass.CONTAINER, MachineClass.VM):
            raise errors.not_supported()
        if machine.runtime:
            # A runtime's container: its runtime stops it, or the call is refused (never its scope).
            if self.external is None:
                raise BusError.from_errno(errno.EOPNOTSUPP)
            await self.external.terminate(machine)
            return
        if machine.subgroup:
            # 262 does not stop a unit that holds more than the machine: it asks the supervisor
            # (nspawn...) to end it, with SIGTERM (ESRCH once the supervisor is gone).
            if machine.supervisor_ref is None:
                raise BusError.from_errno(errno.EOPNOTSUPP)
            try:
                machine.supervisor_ref.send_signal(SIGTERM)
            except OSError as e:
                raise BusError.from_errno(e.errno or errno.ESRCH) from None
            machine.stopping = True
            self._save(machine)
            self.events.update(machine)
            return
        if machine.unit:
            assert self.systemd is not None
            job = await self.systemd.stop_unit(machine.unit)
            if job:
                machine.scope_job = job
        machine.stopping = True
        self._save(machine)
        self.events.update(machine)

    async def kill(self, machine: Machine, who: str, signal: int) -> None:
        if machine.machine_class not in (MachineClass.CONTAINER, MachineClass.VM):
            raise errors.not_supported()
        if not machine.unit:
            raise BusError.from_errno(errno.ESRCH)
        if who == KillWho.LEADER:
            # Through the pidfd: a process that took over a dead leader's PID is never hit.
            if machine.leader_ref is None:
                raise BusError.from_errno(errno.ESRCH)
            machine.leader_ref.send_signal(signal)
            return
        if who == KillWho.SUPERVISOR:  # (262)
            if machine.supervisor_ref is None:
                raise BusError.from_errno(errno.ESRCH)
            machine.supervisor_ref.send_signal(signal)
            return
        if machine.subgroup and not self.user_scope:
            assert self.systemd is not None  # 262: only the machine's cgroup below the unit
            await self.systemd.kill_unit_subgroup(machine.unit, machine.subgroup, signal)
            return
        if machine.subgroup:
            # (262's per-user instance asks its manager about a unit of the system's: ENOENT)
            raise BusError.from_errno(errno.ENOENT)
        assert self.systemd is not None
        await self.systemd.kill_unit(machine.unit, signal)

    async def finalize(self, machine: Machine) -> None:
        """Forget *machine*: files, indexes, announcement, our reference on its scope."""
        if machine.is_host or self.registry.get(machine.name) is not machine:
            return  # the host stays; a machine already gone stays gone
        if machine.started:
            journal.machine_stopped(machine)
            machine.stopping = True
            self.events.update(machine)  # every machine passes "closing" on its way out
        self.state.remove(machine)
        self.registry.remove(machine)
        self._unwatch_leader(machine)
        self._stopped_units.discard(machine.unit)
        self._gc_queue.pop(id(machine), None)
        waiter = self._create_waiters.pop(id(machine), None)
        if waiter is not None and not waiter.done():
            waiter.set_result("canceled")
        if machine.started:
            self.events.machine_removed(machine)
            machine.started = False
        if machine.leader_ref is not None:
            machine.leader_ref.release()
        if machine.supervisor_ref is not None:
            machine.supervisor_ref.release()
        if machine.runtime and self.external is not None:
            self.external.forget(machine)

    async def unregister(self, machine: Machine) -> None:
        await self.finalize(machine)

    # ----- events from systemd (they only queue GC) ----------------------------------

    def job_removed(self, job: str, unit: str, result: str) -> None:
        if unit in self._abandoned:
            self._spawn(self.reap_abandoned())
        machine = self.registry.by_unit(unit)
        if machine is None or machine.scope_job != job:
            if self._starting:
                self._early_jobs[job] = result
            if machine is not None:
                self.queue_gc(machine)
            return
        self._job_done(machine, result)

    def _job_done(self, machine: Machine, result: str) -> None:
        if machine.stopping and result == "done" and machine.unit:
            # The stop job finished: the unit is inactive, GC need not ask systemd again.
            self._stopped_units.add(machine.unit)
        machine.scope_job = ""
        waiter = self._create_waiters.get(id(machine))
        self._save(machine)
        self.events.update(machine)
        if waiter is not None and not waiter.done():
            waiter.set_result(result)
        self.queue_gc(machine)

    def _claim_early_job(self, machine: Machine) -> None:
        result = self._early_jobs.pop(machine.scope_job, None)
        if not self._starting:
            self._early_jobs.clear()
        if result is not None:
            self._job_done(machine, result)

    def unit_changed(self, unit: str) -> None:
        machine = self.registry.by_unit(unit)
        if machine is not None:
            self.queue_gc(machine)
        elif self.external is not None:
            self.external.unit_seen(unit)

    def unit_new(self, unit: str) -> None:
        """A unit was loaded (UnitNew, matched only with --register-oci)."""
        if self.external is not None and self.registry.by_unit(unit) is None:
            self.external.unit_seen(unit)

    def manager_reloaded(self) -> None:
        """systemd reloaded, reexecuted or came back to the bus: signals may have been lost.

        Reconcile: every machine is checked by GC, registrations waiting for a start job
        ask whether the job still exists, and abandoned scopes are stopped."""
        for machine in self.registry:
            self.queue_gc(machine)
        self._spawn(self._recheck_start_jobs())
        if self._abandoned:
            self._spawn(self.reap_abandoned())
        if self.external is not None:
            self.external.reloaded()

    async def _recheck_start_jobs(self) -> None:
        assert self.systemd is not None
        for machine in [m for m in self.registry if id(m) in self._create_waiters and m.scope_job]:
            job = machine.scope_job
            if await self.systemd.job_is_active(job) or machine.scope_job != job:
                continue
            result = "done" if await self.systemd.unit_is_active(machine.unit) else "failed"
            if machine.scope_job == job:
                self._job_done(machine, result)

    def _abandon(self, unit: str) -> None:
        if unit:
            self._abandoned.add(unit)
            self._spawn(self.reap_abandoned())

    async def reap_abandoned(self) -> None:
        """Stop scopes that no machine owns any more because their registration was given up."""
        assert self.systemd is not None
        for unit in list(self._abandoned):
            if self.registry.by_unit(unit) is not None:
                self._abandoned.discard(unit)  # taken again by a new registration of that name
                continue
            try:
                await self.systemd.stop_unit(unit)
            except BusError as e:
                log.debug("Could not stop abandoned scope %s yet: %s", unit, e.message)
                continue
            self._abandoned.discard(unit)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----- garbage collection ----------------------------------------------------------

    def queue_gc(self, machine: Machine) -> None:
        if machine.is_host:
            return
        self._gc_queue[id(machine)] = machine
        self._gc_wakeup.set()

    def start_gc(self) -> None:
        self._gc_task = asyncio.get_running_loop().create_task(self._gc_loop())

    async def stop_gc(self) -> None:
        if self._gc_task is not None:
            self._gc_task.cancel()
            try:
                await self._gc_task
            except asyncio.CancelledError:
                pass

    async def _gc_loop(self) -> None:
        # A wait_for() inside a pass may turn our cancellation (stop_gc) into the failure of the
        # call it was waiting for when the bus goes away at the same moment, and that failure
        # may be absorbed ("cannot tell"): so a pending cancellation is checked after each pass.
        task = asyncio.current_task()
        while True:
            await self._gc_wakeup.wait()
            self._gc_wakeup.clear()
            try:
                await self.gc(drop_not_started=True)
            except Exception:
                if task is None or not task.cancelling():
                    log.exception("Garbage collection failed")
            if task is not None and task.cancelling():
                raise asyncio.CancelledError

    async def may_gc(self, machine: Machine, drop_not_started: bool, known: dict[str, bool] | None = None) -> bool:
        """Whether *machine* may go; *known*: units' activity as systemd told it just now."""
        if machine.is_host:
            return False
        if drop_not_started and not machine.started:
            return True
        if self.user_scope and machine.leader_ref is not None and machine.leader_ref.is_alive():
            # 262 keeps a machine whose leader runs, whatever its unit: in a user's instance a
            # machine's unit may be one its manager does not know (user@UID.service)
            return False
        if machine.subgroup:
            return machine.leader_ref is None or not machine.leader_ref.is_alive()
        if machine.runtime and (machine.leader_ref is None or not machine.leader_ref.is_alive()):
            return True  # a runtime's container whose init exited: its scope may already be the next run's
        assert self.systemd is not None
        if machine.scope_job and await self.systemd.job_is_active(machine.scope_job):
            return False
        if machine.unit:
            active = known.get(machine.unit) if known else None
            if active is None and machine.unit in self._stopped_units:
                active = False
            if active is None:
                active = await self.systemd.unit_is_active(machine.unit)
            if active:
                return False
        return True

    async def gc(self, drop_not_started: bool) -> None:
        """One pass over the queue, machines checked side by side (at most :data:`GC_CONCURRENCY`
        at once) rather than one after another."""
        self.gc_passes += 1
        while self._gc_queue:
            batch = list(self._gc_queue.values())
            self._gc_queue.clear()
            if len(batch) == 1:
                await self._gc_one(batch[0], drop_not_started)
                continue
            gate = asyncio.Semaphore(GC_CONCURRENCY)

            async def one(machine: Machine, gate: asyncio.Semaphore = gate) -> None:
                async with gate:
                    await self._gc_one(machine, drop_not_started)

            results = await asyncio.gather(*(one(m) for m in batch), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result

    async def _gc_one(self, machine: Machine, drop_not_started: bool, known: dict[str, bool] | None = None) -> None:
        if self.registry.get(machine.name) is not machine:
            return
        if not machine.started and id(machine) in self._in_progress:
            return  # still being registered: its request decides
        # As upstream's manager_gc(): stop a machine that may go, then check again. Upstream
        # asks systemd twice even when nothing was stopped; its calls block, so the second
        # answer is the first one again: we ask again only after stopping.
        may = await self.may_gc(machine, drop_not_started, known)
        if may and not machine.stopping and not machine.subgroup and not machine.runtime:
            try:
                await self.terminate(machine)
            except BusError as e:
                log.warning("Failed to stop machine %s: %s", machine.name, e.message)
            may = await self.may_gc(machine, drop_not_started)
        if may:
            await self.finalize(machine)

    # ----- restart recovery ------------------------------------------------------------

    async def load_state(self) -> None:
        """Re-read state files, drop what systemd says is gone, restart the living.

        As upstream's start-up (every machine checked by GC, then started), but with the units'
        states asked of PID 1 in one call for all, and machine by machine, side by side (at most
        :data:`RECOVERY_CONCURRENCY` at once) where it must be asked more."""
        loaded = []
        for machine in self.state.load_all():
            if machine.name in self.registry:
                continue
            # Pin the leader again; a PID now used by another process stays unpinned (dead).
            machine.leader_ref = ProcessRef.take(machine.leader, expect_pidfd_id=machine.leader_pidfd_id)
            supervisor = machine.supervisor_ref
            if supervisor is not None:  # (262) kept only while the very same process runs
                ref = ProcessRef.take(supervisor.pid, expect_pidfd_id=supervisor.pidfd_id)
                machine.supervisor_ref = ref if ref.pidfd is not None and ref.is_alive() else None
                if machine.supervisor_ref is None:
                    ref.release()
            if self.external is not None:
                self.external.adopt(machine)
            self.registry.add(machine)
            loaded.append(machine)
        self.gc_passes += 1
        # Which units are active, asked for all machines at once where systemd can tell us so.
        units_active = getattr(self.systemd, "units_active", None)
        known = await units_active([m.unit for m in loaded if m.unit]) if units_active and loaded else {}
        gate = asyncio.Semaphore(RECOVERY_CONCURRENCY)

        async def recover(machine: Machine) -> None:
            async with gate:
                await self._gc_one(machine, drop_not_started=False, known=known)
            if self.registry.get(machine.name) is not machine:
                return
            try:
                await self._start(machine, [])
            except BusError as e:
                log.warning("Failed to restart machine %s: %s", machine.name, e.message)
                self.queue_gc(machine)

        results = await asyncio.gather(*(recover(m) for m in loaded), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

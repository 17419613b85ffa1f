"""org.freedesktop.systemd1 as machined uses it: scopes, stop, kill, state queries, signals.

Signals from the service manager never change the registry themselves: they
are handed to a :class:`SystemdListener` (the manager), which only queues
machines for garbage collection. Only signals that really come from systemd
(the current owner of ``org.freedesktop.systemd1``) are passed on.

What machined costs PID 1 is bounded, whatever its callers do:

- at most :data:`CALLS_MAX` method calls are in flight (dbus-daemon allows a
  connection 128 pending replies, and polkit's questions need some too), served
  root first and round-robin across users;
- at most :data:`JOBS_MAX` jobs that we asked for are alive at once. PID 1
  tracks the requester of every job with one match rule on its own connection,
  and dbus-daemon disconnects PID 1 past 512 of them. A job's slot is held from
  the call until its ``JobRemoved``, or until systemd, asked after a reconnect or
  a deadline, no longer knows the job;
- scopes are not referenced (no ``AddRef``): upstream's reference costs PID 1
  one more match rule per machine for as long as it runs, which is what takes
  PID 1 off a stock bus at about 510 machines. machined needs no reference: a
  scope that stops is collected by systemd (CollectMode=inactive-or-failed), and
  its UnitRemoved/JobRemoved signal or the absence of the unit tells us it is gone.

Every call has a deadline (:data:`CALL_TIMEOUT`, before clients give up at 25 s);
a call that misses it keeps its slot until PID 1 answers, so the bounds hold.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from machined import caller, errors
from machined.clients.bus import call_bus_daemon, call_method
from machined.errors import BusError
from machined.inside import sessions
from machined.limits import FairLimiter, Release
from machined.naming import bus_label_escape, bus_label_unescape

log = logging.getLogger(__name__)

SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
SYSTEMD_MANAGER = "org.freedesktop.systemd1.Manager"
UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"
NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"
CALLS_MAX = 32
CALLS_PER_USER = 8
JOBS_MAX = 64
CALL_TIMEOUT = 20.0
JOB_SWEEP_INTERVAL = 30.0
LOAD_FAILED = "org.freedesktop.systemd1.LoadFailed"
UNITS_PER_CALL = 1024

MATCH_RULES = [
    f"type='signal',sender='{SYSTEMD}',path='{SYSTEMD_PATH}',interface='{SYSTEMD_MANAGER}',member='JobRemoved'",
    f"type='signal',sender='{SYSTEMD}',path='{SYSTEMD_PATH}',interface='{SYSTEMD_MANAGER}',member='UnitRemoved'",
    f"type='signal',sender='{SYSTEMD}',path='{SYSTEMD_PATH}',interface='{SYSTEMD_MANAGER}',member='Reloading'",
    f"type='signal',sender='{SYSTEMD}',interface='org.freedesktop.DBus.Properties',"
    f"member='PropertiesChanged',arg0='org.freedesktop.systemd1.Unit'",
    f"type='signal',sender='org.freedesktop.DBus',path='/org/freedesktop/DBus',"
    f"interface='org.freedesktop.DBus',member='NameOwnerChanged',arg0='{SYSTEMD}'",
]


# Only with --register-oci: units appearing (a container runtime's scopes).
UNIT_NEW_RULE = f"type='signal',sender='{SYSTEMD}',path='{SYSTEMD_PATH}',interface='{SYSTEMD_MANAGER}',member='UnitNew'"


def unit_object_path(unit: str) -> str:
    return UNIT_PATH_PREFIX + bus_label_escape(unit)


class SystemdListener(Protocol):
    def job_removed(self, job: str, unit: str, result: str) -> None: ...
    def unit_changed(self, unit: str) -> None: ...
    def unit_new(self, unit: str) -> None: ...
    def manager_reloaded(self) -> None: ...


class Systemd:
    """Calls into PID 1's manager and the signals machined follows."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.owner: str | None = None
        self.listener: SystemdListener | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.calls = FairLimiter("systemd-calls", CALLS_MAX, CALLS_PER_USER)
        self.jobs = FairLimiter("systemd-jobs", JOBS_MAX, JOBS_MAX // 4)
        # Jobs we asked for that PID 1 still runs: path → (release of their slot, when started).
        self._live_jobs: dict[str, tuple[Release, float]] = {}
        self._removed_jobs: OrderedDict[str, None] = OrderedDict()  # recently removed, for early signals
        self._sweep_handle: asyncio.TimerHandle | None = None

    async def connect(self, listener: SystemdListener) -> None:
        """Match the signals, learn who systemd is on the bus, and Subscribe()."""
        self.listener = listener
        self.bus.add_message_handler(self._on_signal)
        for rule in MATCH_RULES:
            await call_bus_daemon(self.bus, "AddMatch", "s", [rule])
        try:
            self.owner = (await call_bus_daemon(self.bus, "GetNameOwner", "s", [SYSTEMD]))[0]
        except BusError:
            self.owner = None
        await self.subscribe()

    async def watch_unit_new(self) -> None:
        """Follow UnitNew too (--register-oci only: one more match rule)."""
        await call_bus_daemon(self.bus, "AddMatch", "s", [UNIT_NEW_RULE])

    async def list_units_by_patterns(self, patterns: list[str]) -> list[tuple[str, str]]:
        """(name, active state) of the loaded units matching *patterns* (ListUnitsByPatterns)."""
        (rows,) = await self._manager_call("ListUnitsByPatterns", "asas", [[], patterns])
        return [(row[0], row[3]) for row in rows]

    async def subscribe(self) -> None:
        try:
            await self._manager_call("Subscribe")
        except BusError as e:
            # Already subscribed (after our own reconnect) is fine; anything else is logged.
            if e.name != "org.freedesktop.systemd1.AlreadySubscribed":
                log.warning("Failed to subscribe to systemd: %s", e.message)

    # ----- calls ---------------------------------------------------------------------

    async def _call(self, path: str, interface: str, member: str, sig: str = "", body: list[Any] | None = None,
                    unix_fds: list[int] | None = None, *, job: bool = False) -> list[Any]:  # fmt: skip
        """One call to PID 1 within the bounds; with *job*, the reply's first value is a job path."""
        user = await caller.current_uid()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CALL_TIMEOUT

        async def slots() -> tuple[Release | None, Release]:
            release_job = await self.jobs.acquire(user, of_caller=False) if job else None
            try:
                return release_job, await self.calls.acquire(user, of_caller=False)
            except BaseException:
                if release_job is not None:
                    release_job()
                raise

        # (wait_for, not asyncio.timeout: handlers start outside any task, see bus.objects)
        try:
            release_job, release_call = await asyncio.wait_for(slots(), CALL_TIMEOUT)
        except TimeoutError:
            raise _timed_out() from None
        pending = asyncio.ensure_future(call_method(self.bus, SYSTEMD, path, interface, member, sig, body, unix_fds))
        pending.add_done_callback(lambda _f: release_call())
        pending.add_done_callback(_consume)
        if release_job is not None:
            pending.add_done_callback(lambda f: self._job_started(f, release_job))
        try:
            return await asyncio.wait_for(asyncio.shield(pending), max(deadline - loop.time(), 0.1))
        except TimeoutError:
            raise _timed_out() from None
        except (EOFError, OSError) as e:  # our own connection is gone
            raise BusError(errors.NO_REPLY, f"Connection to the bus lost: {e}") from None

    async def _manager_call(self, member: str, sig: str = "", body: list[Any] | None = None,
                            unix_fds: list[int] | None = None, *, job: bool = False) -> list[Any]:  # fmt: skip
        return await self._call(SYSTEMD_PATH, SYSTEMD_MANAGER, member, sig, body, unix_fds, job=job)

    def _job_started(self, reply: asyncio.Future[list[Any]], release: Release) -> None:
        """A job call returned: hold its slot until the job is removed."""
        if reply.cancelled() or reply.exception() is not None:
            release()
            return
        path = reply.result()[0]
        if path in self._removed_jobs:  # JobRemoved overtook the reply
            release()
            return
        self._live_jobs[path] = (release, time.monotonic())
        if self._sweep_handle is None:
            self._sweep_handle = asyncio.get_running_loop().call_later(JOB_SWEEP_INTERVAL, self._sweep_soon)

    def _job_removed(self, path: str) -> None:
        entry = self._live_jobs.pop(path, None)
        if entry is not None:
            entry[0]()
        self._removed_jobs[path] = None
        if len(self._removed_jobs) > 4096:
            self._removed_jobs.popitem(last=False)

    def live_jobs(self) -> int:
        return len(self._live_jobs)

    def _sweep_soon(self) -> None:
        self._sweep_handle = None
        self._spawn(self.sweep_jobs())

    async def sweep_jobs(self, older_than: float = 0.0) -> None:
        """Give back the slots of jobs systemd no longer knows (their JobRemoved was lost)."""
        now = time.monotonic()
        for path, (_, started) in list(self._live_jobs.items()):
            if now - started >= older_than and path in self._live_jobs and not await self.job_is_active(path):
                self._job_removed(path)
        if self._live_jobs and self._sweep_handle is None:
            self._sweep_handle = asyncio.get_running_loop().call_later(JOB_SWEEP_INTERVAL, self._sweep_soon)

    async def start_transient_unit(self, name: str, properties: list[tuple[str, str, Any]]) -> str:
        """Start a transient unit in mode "fail"; return the job path. Errors pass through.

        *properties* are (name, signature, value) as the core builds them; here they become variants."""
        body = [name, "fail", [[key, Variant(sig, value)] for key, sig, value in properties], []]
        job: str = (await self._manager_call("StartTransientUnit", "ssa(sv)a(sa(sv))", body, job=True))[0]
        return job

    async def run_service(self, name: str, properties: list[tuple[str, str, Any]], unix_fds: list[int],
                          wait: bool = True, sent: Callable[[], None] | None = None
                          ) -> tuple[int, int, str]:  # fmt: skip
        """Start the transient service *name* (mode "fail"; *properties* as for
        :meth:`start_transient_unit`, ``h`` values indexes into *unix_fds*) and, with *wait*,
        wait for it to end: (ExecMainCode, ExecMainStatus, Result) as PID 1 reports them, (0, 0,
        "") if it could not tell. Without *wait*: (0, 0, "") once it was queued.

        Waiting holds no process and no thread: the unit is referenced (``AddRef``: PID 1 keeps it
        until we have read how it ended, or until our connection goes), its ``PropertiesChanged``
        signals (matched already) wake us, its ``ActiveState`` is read after each. Cancelled while
        waiting: the unit is stopped. Its reference is dropped in any case. *sent* is called once
        PID 1 answered the start (the descriptors may then be closed)."""
        path = unit_object_path(name)
        changed = asyncio.Event()

        def handler(msg: Message) -> bool:
            if msg.message_type is MessageType.SIGNAL and msg.path == path and msg.member == "PropertiesChanged":
                if self.owner is not None and msg.sender == self.owner:
                    changed.set()
            return False

        body = [name, "fail", [[key, Variant(sig, value)] for key, sig, value in properties]
                + ([["AddRef", Variant("b", True)]] if wait else []), []]  # fmt: skip
        if not wait:
            try:
                await self._manager_call("StartTransientUnit", "ssa(sv)a(sa(sv))", body, unix_fds, job=True)
            finally:
                if sent is not None:
                    sent()
            return 0, 0, ""
        self.bus.add_message_handler(handler)
        referenced = False
        try:
            try:
                await self._manager_call("StartTransientUnit", "ssa(sv)a(sa(sv))", body, unix_fds, job=True)
                referenced = True
            finally:
                if sent is not None:
                    sent()
            while True:
                changed.clear()
                try:  # (inactive with its start job still queued has not begun yet)
                    (job,) = await self._call(path, "org.freedesktop.DBus.Properties", "Get", "ss",
                                              ["org.freedesktop.systemd1.Unit", "Job"])  # fmt: skip
                    (state,) = await self._call(path, "org.freedesktop.DBus.Properties", "Get", "ss",
                                                ["org.freedesktop.systemd1.Unit", "ActiveState"])  # fmt: skip
                except BusError as e:
                    if e.name in (NO_SUCH_UNIT, LOAD_FAILED, errors.UNKNOWN_OBJECT):
                        return 0, 0, ""
                    raise
                if state.value in ("inactive", "failed") and not job.value[0]:
                    break
                await changed.wait()
            (values,) = await self._call(path, "org.freedesktop.DBus.Properties", "GetAll", "s",
                                         ["org.freedesktop.systemd1.Service"])  # fmt: skip
            code, status, result = (values.get(key) for key in ("ExecMainCode", "ExecMainStatus", "Result"))
            return (int(code.value) if code is not None else 0, int(status.value) if status is not None else 0,
                    str(result.value) if result is not None else "")  # fmt: skip
        except asyncio.CancelledError:
            if referenced:
                self._spawn(self._stop_quietly(name))
            raise
        finally:
            self.bus.remove_message_handler(handler)
            if referenced:
                self._spawn(self._unref(path))

    async def _stop_quietly(self, unit: str) -> None:
        try:
            await self.stop_unit(unit)
        except BusError as e:
            log.debug("Could not stop %s: %s", unit, e.message)

    async def _unref(self, path: str) -> None:
        try:
            await self._call(path, "org.freedesktop.systemd1.Unit", "Unref")
        except BusError as e:
            log.debug("Could not unreference %s: %s", path, e.message)

    async def stop_unit(self, unit: str) -> str:
        """StopUnit(unit, "fail"); "" when the unit does not exist (nothing to stop)."""
        try:
            job: str = (await self._manager_call("StopUnit", "ss", [unit, "fail"], job=True))[0]
            return job
        except BusError as e:
            if e.name in (NO_SUCH_UNIT, LOAD_FAILED):
                return ""
            raise

    async def kill_unit(self, unit: str, signal: int) -> None:
        await self._manager_call("KillUnit", "ssi", [unit, "all", signal])

    async def kill_unit_subgroup(self, unit: str, subgroup: str, signal: int) -> None:
        """Signal the processes of the cgroup *subgroup* below *unit*'s own (systemd 258+)."""
        await self._manager_call("KillUnitSubgroup", "sssi", [unit, "cgroup", subgroup, signal])

    async def version(self) -> str:
        """PID 1's ``Version`` ("252.39-1~deb12u2", "262-1"); "" when it cannot be read."""
        try:
            (value,) = await self._call(SYSTEMD_PATH, "org.freedesktop.DBus.Properties", "Get", "ss",
                                        [SYSTEMD_MANAGER, "Version"])  # fmt: skip
        except BusError:
            return ""
        return str(value.value)

    async def unit_is_active(self, unit: str) -> bool:
        """False only when systemd says the unit is inactive, failed, unknown or unloadable."""
        try:
            (value,) = await self._call(unit_object_path(unit), "org.freedesktop.DBus.Properties", "Get", "ss",
                                        ["org.freedesktop.systemd1.Unit", "ActiveState"])  # fmt: skip
        except BusError as e:
            if e.name in (NO_SUCH_UNIT, LOAD_FAILED):
                return False
            return True  # cannot tell: keep the machine
        return value.value not in ("inactive", "failed")

    async def units_active(self, units: list[str]) -> dict[str, bool]:
        """What unit_is_active() would say of many units, from one ListUnitsByNames call per
        :data:`UNITS_PER_CALL` units (restart recovery); units it cannot tell are left out."""
        answers: dict[str, bool] = {}
        for start in range(0, len(units), UNITS_PER_CALL):
            try:
                (rows,) = await self._manager_call("ListUnitsByNames", "as", [units[start : start + UNITS_PER_CALL]])
            except BusError:
                continue  # asked one by one then
            for name, _description, _load_state, active_state, *_ in rows:
                answers[name] = active_state not in ("inactive", "failed")  # as unit_is_active() reads it
        return answers

    async def job_is_active(self, job: str) -> bool:
        """Whether the job object still exists (its state does not matter); True when we cannot tell."""
        try:
            await self._call(job, "org.freedesktop.DBus.Properties", "Get", "ss",
                             ["org.freedesktop.systemd1.Job", "State"])  # fmt: skip
        except BusError as e:
            return e.name != errors.UNKNOWN_OBJECT
        return True

    async def start_login(self, pty_path: str) -> None:
        await sessions.start_login(self._session_call, pty_path)

    async def start_shell(self, slave: int, pty_path: str, user: str, path: str, argv: list[str],
                          env: list[str]) -> None:  # fmt: skip
        await sessions.start_shell(self._session_call, slave, pty_path, user, path, argv, env)

    async def _session_call(self, member: str, sig: str, body: list[Any], unix_fds: list[int] | None) -> None:
        await self._manager_call(member, sig, body, unix_fds, job=True)

    # ----- signals -------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _resubscribe(self) -> None:
        """systemd came back (reexec, reconnect): it forgot our subscription and maybe our jobs' signals."""
        self._spawn(self.subscribe())
        self._spawn(self.sweep_jobs())

    def _on_signal(self, msg: Message) -> bool:
        if msg.message_type is not MessageType.SIGNAL or self.listener is None:
            return False
        try:
            self._dispatch_signal(msg)
        except Exception:  # a malformed signal must not hurt the daemon
            log.exception("Failed to process signal %s.%s", msg.interface, msg.member)
        return False

    def _dispatch_signal(self, msg: Message) -> None:
        assert self.listener is not None
        if msg.member == "NameOwnerChanged" and msg.interface == "org.freedesktop.DBus":
            if msg.sender != "org.freedesktop.DBus" or msg.signature != "sss" or msg.body[0] != SYSTEMD:
                return
            self.owner = msg.body[2] or None
            if self.owner:
                self._resubscribe()  # systemd came back (daemon-reexec): it forgot us
            self.listener.manager_reloaded()
            return
        if self.owner is None or msg.sender != self.owner:
            return
        if msg.interface == SYSTEMD_MANAGER and msg.path == SYSTEMD_PATH:
            if msg.member == "JobRemoved" and msg.signature == "uoss":
                _, job, unit, result = msg.body
                self._job_removed(job)
                self.listener.job_removed(job, unit, result)
            elif msg.member == "UnitRemoved" and msg.signature == "so":
                self.listener.unit_changed(msg.body[0])
            elif msg.member == "UnitNew" and msg.signature == "so":
                self.listener.unit_new(msg.body[0])
            elif msg.member == "Reloading" and msg.signature == "b":
                if not msg.body[0]:
                    self._resubscribe()
                    self.listener.manager_reloaded()
        elif msg.member == "PropertiesChanged" and msg.path and msg.path.startswith(UNIT_PATH_PREFIX):
            element = msg.path[len(UNIT_PATH_PREFIX) :]
            if element and "/" not in element:
                self.listener.unit_changed(bus_label_unescape(element))


def _timed_out() -> BusError:
    return BusError.from_errno(errno.ETIMEDOUT, "Timed out waiting for the service manager")


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a call nobody waits for any more (it missed its deadline)."""
    if not future.cancelled():
        future.exception()

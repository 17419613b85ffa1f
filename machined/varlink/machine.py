"""io.systemd.Machine and io.systemd.service over varlink, as systemd-machined 262 serves them
on ``/run/systemd/machine/io.systemd.Machine``.

A thin front-end: each method turns its JSON parameters into the arguments of the same
core calls the D-Bus adapters make (:mod:`machined.lifecycle`, :mod:`machined.manager`,
:mod:`machined.inside.access`), with 262's parameter checks (``InvalidParameter`` naming the
field), error names (``io.systemd.Machine.NoSuchMachine``…) and polkit subject (the peer's
process). Machines are looked up by ``name`` or by ``pid`` (a ProcessId; 0 = the caller's
machine), as 262 does for every method that takes a machine.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

from machined import errors, idmap, lifecycle
from machined.caller import Authorize
from machined.errors import BusError
from machined.inside import machine_calls
from machined.inside.access import MachineAccess
from machined.limits import LIMITS_EXCEEDED
from machined.machine import Machine, MachineClass
from machined.manager import MachineManager
from machined.naming import HOST_MACHINE_NAME, hostname_is_valid, path_is_normalized_absolute, path_is_valid_absolute
from machined.process import ProcessRef
from machined.registration import SIGNAL_MAX, validate_registration, vsock_cid_is_regular
from machined.varlink.interfaces import IO_SYSTEMD_MACHINE, IO_SYSTEMD_SERVICE, PRODUCT, URL, VENDOR
from machined.varlink.server import Call, Reply, Service, VarlinkError, invalid_parameter

log = logging.getLogger(__name__)

IFACE = "io.systemd.Machine."
VMADDR_CID_ANY = 0xFFFFFFFF

# (bus, subject, uid, action, details, interactive): machined.clients.polkit.check, or a stand-in.
PolkitCheck = Callable[..., Awaitable[None]]


def varlink_authorizer(check: PolkitCheck | None, bus: Any, call: Call, rename: bool = True,
                       extra: dict[str, str] | None = None) -> Authorize:  # fmt: skip
    """The polkit question for the peer of *call*: its process (pidfd) and UID. Most of 262's
    varlink methods name the machine ``name`` in the details where D-Bus says ``machine``
    (*rename*; Open keeps ``machine``); *extra* details are added (Open's shell: verb, command line)."""

    async def authorize(action: str, details: dict[str, str]) -> None:
        if rename:
            details = {("name" if key == "machine" else key): value for key, value in details.items()}
        if extra:
            details = {**details, **extra}
        if call.peer.uid_value == 0:
            return
        if check is None:
            raise BusError(errors.ACCESS_DENIED, "Permission denied")
        await check(bus, call.peer.polkit_subject(), call.peer.uid_value, action, details,
                    call.allow_interactive_authentication)  # fmt: skip

    return authorize


def _int(value: Any) -> int | None:
    """An ``int`` field's value (sd-json also takes a decimal string, and a real that is an
    integer, ``1e3``), None if it is none."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        return int(value) if value.is_integer() and -(2**63) <= value < 2**64 else None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


_BOOT_ID: list[str] = []


def _boot_id() -> str:
    """This boot's ID as 262 qualifies pidfd ids with it (32 hex digits)."""
    if not _BOOT_ID:
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
                _BOOT_ID.append(f.read().strip().replace("-", ""))
        except OSError:
            _BOOT_ID.append("")
    return _BOOT_ID[0]


def _process_id(ref: ProcessRef | None) -> dict[str, Any] | None:
    """A pinned process as a ProcessId (pid, pidfdId and bootId when pinned by pidfd)."""
    if ref is None or ref.pid <= 0:
        return None
    out: dict[str, Any] = {"pid": ref.pid}
    if ref.pidfd_id:
        out["pidfdId"] = ref.pidfd_id
        if _boot_id():
            out["bootId"] = _boot_id()
    return out


def _pidfd_id(pid: int) -> int:
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return 0
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


PID_T_MAX = 0x7FFFFFFF
_ID128 = re.compile(r"[0-9a-fA-F]{32}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _uint64(value: Any, strict: bool = False) -> int | None:
    """An unsigned 64-bit field as sd-json takes it (a decimal string too; null is 0 unless *strict*)."""
    if value is None:
        return None if strict else 0
    number = _int(value)
    return number if number is not None and 0 <= number < 2**64 else None


def _id128(value: Any) -> str | None:
    """A 128-bit id (32 hex digits, or the UUID form) as lower-case hex; None if it is not one."""
    if not isinstance(value, str) or not _ID128.fullmatch(value):
        return None
    return value.replace("-", "").lower()


PidParam = tuple[int, int, bool]  # pid, pidfd id, of another boot


def _process_id_param(value: Any, field: str, relax: bool = False, strict: bool = False) -> PidParam | None:
    """A ProcessId (or a plain PID) as 262 reads one: (pid, pidfd id, of another boot), None for
    "the caller" (*relax*: a zero PID with nothing else). *strict* (Register's leader): the
    process must exist in this boot and match the pidfd id given. Anything else is
    InvalidParameter naming *field*."""
    fd_id = 0
    boot = ""
    if isinstance(value, dict):
        known = {"pid", "pidfdId", "bootId"}
        if "pid" not in value or any(key not in known for key in value):
            raise invalid_parameter(field)
        pid = _uint64(value["pid"], strict=True)
        if pid is None:
            raise invalid_parameter(field)
        if "pidfdId" in value:
            fd_id_value = _uint64(value["pidfdId"], strict=strict)
            if fd_id_value is None:
                raise invalid_parameter(field)
            fd_id = fd_id_value
        if "bootId" in value:
            boot_id = _id128(value["bootId"])
            if boot_id is None:
                raise invalid_parameter(field)
            boot = "" if boot_id == "0" * 32 else boot_id
    else:
        number = _uint64(value, strict=True)
        if number is None:
            raise invalid_parameter(field)
        pid = number
    if relax and pid == 0 and fd_id == 0 and not boot:
        return None
    if not 0 < pid <= PID_T_MAX:
        raise invalid_parameter(field)
    remote = bool(boot) and bool(_boot_id()) and boot != _boot_id()
    if strict:
        if remote:
            raise invalid_parameter(field)
        actual = _pidfd_id(pid)
        if actual == 0 or (fd_id and actual != fd_id):
            raise invalid_parameter(field)
        fd_id = actual
    return pid, fd_id, remote


class MachineVarlink:
    """The handlers of io.systemd.Machine, bound to one manager."""

    def __init__(self, manager: MachineManager, access: MachineAccess | None = None,
                 polkit: PolkitCheck | None = None, bus: Any = None) -> None:  # fmt: skip
        self.manager = manager
        self.access = access or MachineAccess(manager)
        self.polkit = polkit
        self.bus = bus
        self._host_pidfd_id: int | None = None

    def authorizer(self, call: Call, rename: bool = True, extra: dict[str, str] | None = None) -> Authorize:
        return varlink_authorizer(self.polkit, self.bus, call, rename, extra)

    # ----- lookups -----------------------------------------------------------------------------

    def _pid_param(self, call: Call, value: Any) -> int | None:
        """The PID a lookup's ``pid`` (ProcessId) names, as 262 reads it (relaxed, not verified):
        0 alone means the caller; a pidfd id that does not match is not held against it; a
        process of another boot (``bootId``) is none here (None)."""
        ref = _process_id_param(value, "pid", relax=True)
        if ref is None:
            return call.peer.pid_value
        pid, _, remote = ref
        return None if remote else pid

    def lookup(self, call: Call) -> Machine | None:
        """The machine named by ``name`` and/or ``pid``; None if neither is given. Both given must agree."""
        params = call.parameters
        name, pid_value = params.get("name"), params.get("pid")
        by_name = by_pid = None
        if name is not None:
            if not (name == HOST_MACHINE_NAME or hostname_is_valid(name)):
                raise invalid_parameter("name")
            by_name = self.manager.registry.get(name)
            if by_name is None:
                raise VarlinkError(errors.VL_NO_SUCH_MACHINE)
        if pid_value is not None:
            pid = self._pid_param(call, pid_value)
            by_pid = self.manager.find_by_pid(pid) if pid is not None else None
            if by_pid is None:
                raise VarlinkError(errors.VL_NO_SUCH_MACHINE)
        if by_name is not None and by_pid is not None and by_name is not by_pid:
            raise VarlinkError(errors.VL_NO_SUCH_MACHINE)
        return by_name or by_pid

    def require(self, call: Call) -> Machine:
        machine = self.lookup(call)
        if machine is None:
            raise VarlinkError(errors.VL_NO_SUCH_MACHINE)
        return machine

    # ----- List --------------------------------------------------------------------------------

    def _leader(self, machine: Machine) -> dict[str, Any] | None:
        if machine.leader <= 0:
            return None
        if machine.is_host:
            if self._host_pidfd_id is None:
                self._host_pidfd_id = _pidfd_id(1)
            pidfd_id = self._host_pidfd_id
        else:
            ref = machine.leader_ref
            pidfd_id = ref.pidfd_id if ref is not None and ref.pidfd is not None else 0
        leader: dict[str, Any] = {"pid": machine.leader}
        if pidfd_id:
            leader["pidfdId"] = pidfd_id
            boot_id = _boot_id()
            if boot_id:
                leader["bootId"] = boot_id
        return leader

    async def describe(self, machine: Machine, metadata: str) -> dict[str, Any]:
        """One machine as List reports it (with addresses, OS release and UID shift if asked)."""
        addresses = os_release = shift = None
        if metadata in ("yes", "graceful"):
            graceful = metadata == "graceful"
            addresses = await _metadata(self.access.addresses(machine), graceful, _address_error)
            os_release = await _metadata(self.access.os_release(machine), graceful, _os_release_error)
            shift = await _metadata(self.access.uid_shift(machine), graceful, _uid_shift_error)
        out: dict[str, Any] = {"name": machine.name}
        if machine.id_bytes:
            out["id"] = machine.id_bytes.hex()
        out["class"] = str(machine.machine_class)
        for key, value in (("service", machine.service), ("rootDirectory", machine.root_directory),
                           ("unit", machine.unit)):  # fmt: skip
            if value:
                out[key] = value
        if machine.subgroup:
            out["subgroup"] = machine.subgroup
        leader = self._leader(machine)
        if leader is not None:
            out["leader"] = leader
        supervisor = _process_id(machine.supervisor_ref)
        if supervisor is not None:
            out["supervisor"] = supervisor
        if machine.timestamp.is_set():
            out["timestamp"] = {"realtime": machine.timestamp.realtime, "monotonic": machine.timestamp.monotonic}
        cid = machine.vsock_cid
        if vsock_cid_is_regular(cid) or (machine.is_host and cid not in (0, VMADDR_CID_ANY)):
            out["vSockCid"] = cid  # (.host: the loopback CID when vsock works, as 262)
        for key, value in (("sshAddress", machine.ssh_address), ("sshPrivateKeyPath", machine.ssh_private_key_path),
                           ("controlAddress", machine.control_address)):  # fmt: skip
            if value:
                out[key] = value
        if addresses:  # none at all: no key (262 builds the array only from what it found)
            out["addresses"] = [{**({"ifindex": a.ifindex} if a.ifindex > 0 else {}), "family": a.family,
                                 "address": list(a.address)} for a in addresses]  # fmt: skip
        if os_release:
            out["OSRelease"] = [f"{key}={value}" for key, value in os_release.items()]
        if shift is not None:
            out["UIDShift"] = shift
        out["UID"] = machine.uid  # the registering user (262)
        return out

    async def list(self, call: Call) -> dict[str, Any] | None:
        metadata = call.parameters.get("acquireMetadata") or "no"
        if metadata != "no":  # what is inside machines is not for everybody (262), asked before anything else
            name = call.parameters.get("name")  # (262 names the machine asked for by name, or "n/a")
            await self.authorizer(call)("inspect-machines", {"name": name if isinstance(name, str) else "n/a"})
        machine = self.lookup(call)
        if machine is not None:
            return await self.describe(machine, metadata)
        if not call.more:
            raise VarlinkError(errors.VL_EXPECTED_MORE)
        for machine in self.manager.machines():
            await call.notify(await self.describe(machine, metadata))
        return None  # the last one notified is the last reply; none at all: NoSuchMachine

    # ----- Register ----------------------------------------------------------------------------

    @staticmethod
    def _register_fields(params: dict[str, Any]) -> dict[str, Any]:
        """Register's fields checked one by one in the order the caller sent them, as sd-json
        dispatches an object (the first bad one is named). Null is refused where 262's dispatch
        table gives the field a JSON type; ``leader`` and ``leaderProcessId`` must name the same
        live process of this boot (pidfd id checked); the supervisor fields are taken and unused."""
        out: dict[str, Any] = {"leader": 0, "id": b"", "netif": [], "cid": VMADDR_CID_ANY}

        def string(key: str, value: Any) -> str:
            if not isinstance(value, str):
                raise invalid_parameter(key)
            return value

        for key, value in params.items():
            if key == "name":
                if not hostname_is_valid(string(key, value)):
                    raise invalid_parameter(key)
                out["name"] = value
            elif key == "id":
                machine_id = _id128(value)
                if machine_id is None:
                    raise invalid_parameter(key)
                out["id"] = bytes.fromhex(machine_id)
            elif key in ("service", "sshAddress"):
                out[key] = string(key, value)
            elif key == "class":
                out[key] = value  # (the enum is checked with the declaration; "host" below)
            elif key in ("leader", "leaderProcessId"):
                if value is None:
                    if key == "leaderProcessId" or out["leader"]:
                        raise invalid_parameter(key)  # (null after a leader: "conflicts" with it, as 262)
                    continue
                if key == "leaderProcessId" and not isinstance(value, dict):
                    raise invalid_parameter(key)
                ref = _process_id_param(value, key, strict=True)
                assert ref is not None
                pid, fd_id, _ = ref
                if pid == 1:
                    raise invalid_parameter(key)
                if out["leader"] and (out["leader"], out.get("leader_fd_id")) != (pid, fd_id):
                    raise invalid_parameter(key)  # leader and leaderProcessId name different processes
                out["leader"], out["leader_fd_id"] = pid, fd_id
            elif key in ("rootDirectory", "controlAddress"):
                if not path_is_normalized_absolute(string(key, value)):
                    raise invalid_parameter(key)  # (262: no "//", "." or "..", names of 255 bytes at most)
                out[key] = value
            elif key == "sshPrivateKeyPath":
                if not path_is_valid_absolute(string(key, value)):
                    raise invalid_parameter(key)
                out[key] = value
            elif key == "ifIndices":
                if not isinstance(value, list):
                    raise invalid_parameter(key)
                netif = []
                for index in value:  # unsigned JSON numbers only (1e0 too, not "1"), 1..INT_MAX
                    number = None if isinstance(index, str) else _int(index)
                    if number is None or not 0 < number <= 0x7FFFFFFF:
                        raise invalid_parameter(key)
                    netif.append(number)
                out["netif"] = netif
            elif key == "vSockCid":
                cid = _uint64(value, strict=True)
                if cid is None or cid in (0, 1, 2, VMADDR_CID_ANY) or cid > 0xFFFFFFFF:
                    raise invalid_parameter(key)
                out["cid"] = cid
            elif key in ("allocateUnit", "allowInteractiveAuthentication"):
                if not isinstance(value, bool):
                    raise invalid_parameter(key)
                out[key] = value
            # supervisor, supervisorProcessId: accepted whatever they hold, not used (as 262)
        if out.get("class") not in (MachineClass.CONTAINER, MachineClass.VM):
            raise invalid_parameter("class")  # "host": only the system itself is that (after the fields)
        return out

    async def register(self, call: Call) -> None:
        params = call.parameters
        fields = self._register_fields(params)
        req = validate_registration(fields["name"], fields["id"], fields.get("service", ""), fields["class"],
                                    fields["leader"], fields.get("rootDirectory", ""), fields["netif"])  # fmt: skip
        if req.leader == 0:
            req = req.with_leader(call.peer.pid_value)
        req = req.replace(vsock_cid=fields["cid"], ssh_address=fields.get("sshAddress", ""),
                          ssh_private_key_path=fields.get("sshPrivateKeyPath", ""),
                          control_address=fields.get("controlAddress", ""))  # fmt: skip
        await lifecycle.register(self.manager, req, fields.get("allocateUnit") is True, call.peer.uid_value,
                                 self.authorizer(call), call.peer.process_ref())  # fmt: skip
        return None

    # ----- lifecycle ---------------------------------------------------------------------------

    async def unregister(self, call: Call) -> None:
        await lifecycle.unregister(self.manager, self.require(call), self.authorizer(call))

    async def terminate(self, call: Call) -> None:
        await lifecycle.terminate(self.manager, self.require(call), self.authorizer(call))

    async def kill(self, call: Call) -> None:
        signal = _int(call.parameters.get("signal"))
        if signal is None or not 1 <= signal <= SIGNAL_MAX:
            raise invalid_parameter("signal")
        machine = self.require(call)
        whom = call.parameters.get("whom") or ""
        if whom == "supervisor":  # 262 tracks the registrant as supervisor; machined knows none
            raise BusError.from_errno(errno.ESRCH)
        await lifecycle.kill(self.manager, machine, whom, signal, self.authorizer(call))

    # ----- inside the machine ------------------------------------------------------------------

    async def open(self, call: Call) -> Reply:
        params = call.parameters
        mode = params["mode"]
        user = params.get("user")
        if user is not None and not _valid_user_name(user):
            raise invalid_parameter("user")
        path = params.get("path")
        if path is not None and not _path_ok(path):
            raise invalid_parameter("path")
        env = params.get("environment") or []
        extra = None
        if mode == "shell":
            try:
                user, program, argv = machine_calls.shell_arguments(user or "", path or "", params.get("args") or [],
                                                                    env)  # fmt: skip
            except BusError as e:
                raise invalid_parameter(e.parameter or "environment") from None
            extra = {"verb": "shell", "command_line": " ".join(argv)}
        machine = self.require(call)
        authorize = self.authorizer(call, rename=False, extra=extra)
        try:
            if mode == "tty":
                fd, pty_path = await machine_calls.open_pty(self.access, machine, authorize)
            elif mode == "login":
                fd, pty_path = await machine_calls.open_login(self.access, machine, authorize)
            else:
                fd, pty_path = await machine_calls.open_shell(
                    self.access, machine, user or "", path or "", params.get("args") or [], env, authorize
                )
        except BusError as e:
            raise _remap(e, {errors.NOT_SUPPORTED: errors.VL_NOT_SUPPORTED}, no_ipc=True) from None
        return Reply({"ptyFileDescriptor": 0, "ptyPath": pty_path}, [fd])

    async def open_root_directory(self, call: Call) -> Reply:
        machine = self.require(call)
        try:
            fd = await machine_calls.open_root_directory(self.access, machine, self.authorizer(call))
        except BusError as e:
            raise _remap(e, {errors.NOT_SUPPORTED: errors.VL_NOT_SUPPORTED}) from None
        return Reply({"fileDescriptor": 0}, [fd])

    def _paths(self, call: Call) -> tuple[str, str]:
        src, dest = call.parameters["source"], call.parameters.get("destination")
        if not _path_ok(src):
            raise invalid_parameter("source")
        if dest is not None and not _path_ok(dest):
            raise invalid_parameter("destination")
        return src, dest or src

    async def bind_mount(self, call: Call) -> None:
        src, dest = self._paths(call)
        machine = self.require(call)
        if machine.machine_class is not MachineClass.CONTAINER:
            raise VarlinkError(errors.VL_NOT_SUPPORTED)
        params = call.parameters
        try:
            await machine_calls.bind_mount(self.access, machine, src, dest, params.get("readOnly") is True,
                                           params.get("mkdir") is True, self.authorizer(call))  # fmt: skip
        except BusError as e:
            raise _remap(e, {errors.NOT_SUPPORTED: errors.VL_NOT_SUPPORTED}) from None

    async def _copy(self, call: Call, copy_from: bool) -> None:
        operations = self.manager.operations
        if operations.running >= operations.limit:
            raise VarlinkError(errors.VARLINK_MACHINE + "TooManyOperations")
        src, dest = self._paths(call)
        machine = self.require(call)
        if machine.machine_class is not MachineClass.CONTAINER:
            raise VarlinkError(errors.VL_NOT_SUPPORTED)
        try:
            await machine_calls.copy(self.access, machine, copy_from, src, dest, call.parameters.get("replace") is True,
                                     self.authorizer(call))  # fmt: skip
        except BusError as e:
            raise _remap(e, {errors.NOT_SUPPORTED: errors.VL_NOT_SUPPORTED,
                             LIMITS_EXCEEDED: errors.VARLINK_MACHINE + "TooManyOperations"}) from None  # fmt: skip

    async def copy_from(self, call: Call) -> None:
        await self._copy(call, True)

    async def copy_to(self, call: Call) -> None:
        await self._copy(call, False)

    # ----- UID/GID mapping ---------------------------------------------------------------------

    @staticmethod
    def _ids(call: Call) -> tuple[int | None, int | None]:
        out: list[int | None] = []
        for key in ("uid", "gid"):
            value = call.parameters.get(key)
            if value is None:
                out.append(None)
                continue
            number = _int(value)
            if number is None or not 0 <= number < 2**32 or not idmap.id_is_valid(number):
                raise invalid_parameter(key)
            out.append(number)
        return out[0], out[1]

    async def map_from(self, call: Call) -> dict[str, Any]:
        uid, gid = self._ids(call)
        machine = self.require(call)
        if machine.machine_class is not MachineClass.CONTAINER:
            raise VarlinkError(errors.VL_NOT_SUPPORTED)
        out: dict[str, Any] = {}
        for key, inner, error in (("uid", uid, errors.VL_NO_SUCH_USER), ("gid", gid, errors.VL_NO_SUCH_GROUP)):
            if inner is None:
                continue
            try:
                out[key] = self.access.map_from_machine(machine.name, inner, key)
            except BusError as e:
                if e.name in (errors.NO_SUCH_USER_MAPPING, errors.NO_SUCH_GROUP_MAPPING):
                    raise VarlinkError(error) from None
                raise
        return out

    async def map_to(self, call: Call) -> dict[str, Any]:
        uid, gid = self._ids(call)
        if uid is not None and uid < 0x10000:
            raise VarlinkError(errors.VL_USER_IN_HOST_RANGE)
        if gid is not None and gid < 0x10000:
            raise VarlinkError(errors.VL_GROUP_IN_HOST_RANGE)
        found: dict[str, tuple[Machine, int]] = {}
        for key, outer, error in (("uid", uid, errors.VL_NO_SUCH_USER), ("gid", gid, errors.VL_NO_SUCH_GROUP)):
            if outer is None:
                continue
            try:
                found[key] = self.access.map_to_machine(outer, key)
            except BusError as e:
                if e.name in (errors.NO_SUCH_USER_MAPPING, errors.NO_SUCH_GROUP_MAPPING):
                    raise VarlinkError(error) from None
                raise
        machines = {id(m): m for m, _ in found.values()}
        if len(machines) != 1:  # none asked for, or two different machines
            raise VarlinkError(errors.VL_NO_SUCH_MACHINE)
        out: dict[str, Any] = {key: inner for key, (_, inner) in found.items()}
        out["machineName"] = next(iter(machines.values())).name
        return out


def _valid_user_name(name: str) -> bool:
    """What 262 accepts as a user name here (relaxed rules: no control characters, ':' or '/')."""
    return bool(name) and len(name) <= 256 and not any(c in name for c in ":/\n\t") and name not in (".", "..")


def _path_ok(path: Any) -> bool:
    """json_dispatch_path: an absolute, valid path."""
    return isinstance(path, str) and path.startswith("/") and "\0" not in path and len(path) < 4096


def _remap(error: BusError, names: dict[str, str], no_ipc: bool = False) -> Exception:
    """262's varlink error for a failure the core reports with a D-Bus name."""
    if no_ipc and error.name == errors.errno_error_name(2) and "no system bus" in error.message.lower():
        return VarlinkError(errors.VL_NO_IPC)
    if error.name in names:
        return VarlinkError(names[error.name])
    if error.name == errors.ACCESS_DENIED or error.errno in (1, 13):
        return VarlinkError(errors.VL_PERMISSION_DENIED)
    return error


def _address_error(e: BusError) -> str | None:
    if e.name == errors.NO_PRIVATE_NETWORKING:
        return errors.VL_NO_PRIVATE_NETWORKING
    return errors.VL_NOT_AVAILABLE if e.name == errors.NOT_SUPPORTED else None


def _os_release_error(e: BusError) -> str | None:
    if e.name == errors.FAILED:  # no os-release file in the container
        return errors.VL_NO_OS_RELEASE
    return errors.VL_NOT_AVAILABLE if e.name == errors.NOT_SUPPORTED else None


def _uid_shift_error(e: BusError) -> str | None:
    if e.name == errors.NOT_SUPPORTED:
        return errors.VL_NO_UID_SHIFT if "complex" in e.message else errors.VL_NOT_AVAILABLE
    return None


async def _metadata(pending: Awaitable[Any], graceful: bool, own_error: Callable[[BusError], str | None]) -> Any:
    """One piece of List's metadata; None if it cannot be had and *graceful*, else 262's error."""
    try:
        return await pending
    except BusError as e:
        if graceful:
            return None
        name = own_error(e)
        if name is not None:
            raise VarlinkError(name) from None
        raise


def _set_log_level(level: int) -> None:
    """syslog level (0..7) → the daemon's logging level."""
    names = {0: logging.CRITICAL, 1: logging.CRITICAL, 2: logging.CRITICAL, 3: logging.ERROR, 4: logging.WARNING,
             5: logging.INFO, 6: logging.INFO, 7: logging.DEBUG}  # fmt: skip
    logging.getLogger().setLevel(names[level])


def machine_service(manager: MachineManager, access: MachineAccess | None = None, polkit: PolkitCheck | None = None,
                    bus: Any = None, version: str = "") -> Service:  # fmt: skip
    """The service on /run/systemd/machine/io.systemd.Machine (and …/io.systemd.MachineImage)."""
    handlers = MachineVarlink(manager, access, polkit, bus)
    service = Service(vendor=VENDOR, product=PRODUCT, version=version, url=URL)
    service.add_interface(IO_SYSTEMD_MACHINE)
    service.add_interface(IO_SYSTEMD_SERVICE)
    service.bind(IFACE + "List", handlers.list, sentinel=errors.VL_NO_SUCH_MACHINE)
    service.bind(IFACE + "Register", handlers.register)
    service.bind(IFACE + "Unregister", handlers.unregister)
    service.bind(IFACE + "Terminate", handlers.terminate)
    service.bind(IFACE + "Kill", handlers.kill)
    service.bind(IFACE + "Open", handlers.open)
    service.bind(IFACE + "OpenRootDirectory", handlers.open_root_directory)
    service.bind(IFACE + "BindMount", handlers.bind_mount)
    service.bind(IFACE + "CopyFrom", handlers.copy_from)
    service.bind(IFACE + "CopyTo", handlers.copy_to)
    service.bind(IFACE + "MapFrom", handlers.map_from)
    service.bind(IFACE + "MapTo", handlers.map_to)

    def privileged(call: Call) -> None:
        if call.peer.uid_value != 0:  # 262 answers with the call's own parameters
            raise VarlinkError(errors.VL_PERMISSION_DENIED, dict(call.parameters))

    async def ping(call: Call) -> None:
        return None

    async def set_log_level(call: Call) -> None:
        privileged(call)
        if "level" in call.parameters and call.parameters["level"] is None:
            _set_log_level(6)  # 262: a null level is the default one again (info), measured
            return
        level = _int(call.parameters.get("level"))
        if level is None or not 0 <= level <= 7:
            raise invalid_parameter("level")
        _set_log_level(level)

    async def get_log_level(call: Call) -> dict[str, Any]:
        level = logging.getLogger().getEffectiveLevel()
        return {"level": 7 if level <= logging.DEBUG else 6 if level <= logging.INFO else 4 if level <= logging.WARNING
                else 3 if level <= logging.ERROR else 2}  # fmt: skip

    async def get_environment(call: Call) -> dict[str, Any]:
        privileged(call)
        return {"environment": [f"{key}={value}" for key, value in os.environ.items()]}

    from machined.varlink.image import bind_image_methods

    bind_image_methods(service, manager, lambda call: handlers.authorizer(call, rename=False))
    service.bind("io.systemd.service.Ping", ping)
    service.bind("io.systemd.service.SetLogLevel", set_log_level)
    service.bind("io.systemd.service.GetLogLevel", get_log_level)
    service.bind("io.systemd.service.GetEnvironment", get_environment)
    return service

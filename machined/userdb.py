"""Users and groups of containers for the host's user database (``io.systemd.UserDatabase``).

A container's UID 5 mapped to host UID 200005 shows up on the host as user
``vu-NAME-5`` (group ``vg-NAME-5``), as systemd-machined 252 serves it to
nss-systemd and userdbctl. Lookups only; no enumeration.
"""

from __future__ import annotations

import errno
import re
from typing import Any

from machined import errors, idmap, personality
from machined.machine import Machine, MachineClass
from machined.manager import MachineManager
from machined.varlink.server import Call, Service, VarlinkError, system_error_252

SERVICE = "io.systemd.Machine"
NOLOGIN = "/usr/sbin/nologin"
NOBODY_GID = 65534
HOST_RANGE_END = 0x10000
LOGIN_NAME_MAX = 31  # what fits into utmp

_ERROR = "io.systemd.UserDatabase."
BAD_SERVICE = _ERROR + "BadService"
NO_RECORD = _ERROR + "NoRecordFound"
CONFLICT = _ERROR + "ConflictingRecordFound"
NO_ENUMERATION = _ERROR + "EnumerationNotSupported"

_STRICT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


class UserDbError(VarlinkError):
    """A lookup answered with a varlink error of the UserDatabase interface."""


def valid_user_group_name(name: str) -> bool:
    """systemd's strict rule for names it synthesizes: POSIX-like, no dots, fits utmp."""
    if not name or name.isdigit():
        return False
    return bool(_STRICT_NAME.fullmatch(name)) and len(name) <= LOGIN_NAME_MAX


def valid_gecos(text: str) -> bool:
    return ":" not in text and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def _parse_id(text: str) -> int | None:
    if not text.isdigit():
        return None
    value = int(text)
    return value if value < 2**32 and idmap.id_is_valid(value) else None


def _check_252(params: dict[str, Any], fields: dict[str, str]) -> None:
    """The parameters as 252's json_dispatch() takes them, in their order: a field it does not
    know fails the call with EADDRNOTAVAIL, one of the wrong type (an ID that is not a valid
    UID/GID) with EINVAL, both as ``io.systemd.System`` with the errno alone."""
    for key, value in params.items():
        kind = fields.get(key)
        if kind is None:
            raise VarlinkError(*system_error_252(errno.EADDRNOTAVAIL))
        if value is None:
            continue
        if kind == "id":
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 0xFFFFFFFF and value != 0xFFFF
        else:
            ok = isinstance(value, str)
        if not ok:
            raise VarlinkError(*system_error_252(errno.EINVAL))


def _check_262(params: dict[str, Any], fields: dict[str, str]) -> None:
    """The parameters as 262's machined dispatches them, in their order, after the declaration
    has been checked: a field it does not take (fuzzyNames, dispositionMask, …) is
    InvalidParameter naming it, as is a UID/GID that is not a valid one as a JSON number, or a
    user/group name that is null or no name at all (empty, all digits, ``.``/``..``, ``/``, ``:``,
    control characters)."""
    for key, value in params.items():
        kind = fields.get(key)
        if kind is None:
            raise VarlinkError(errors.VL_INVALID_PARAMETER, {"parameter": key})
        if kind == "id":  # (an integral real such as 1e3 is that integer to sd-json)
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            ok = value is None or (
                isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 0xFFFFFFFF and value != 0xFFFF
            )
        elif kind == "name":
            ok = isinstance(value, str) and _relaxed_name(value)
        else:
            ok = True  # (service: a string, as declared)
        if not ok:
            raise VarlinkError(errors.VL_INVALID_PARAMETER, {"parameter": key})


def _relaxed_name(name: str) -> bool:
    if name in ("", ".", "..") or name.isdigit():
        return False
    return not any(c in "/:" or ord(c) < 0x20 or ord(c) == 0x7F for c in name)


class UserDatabase:
    """Answers GetUserRecord / GetGroupRecord / GetMemberships from the registry."""

    def __init__(self, manager: MachineManager) -> None:
        self.manager = manager

    def _containers(self) -> list[Machine]:
        return [m for m in self.manager.machines() if m.machine_class is MachineClass.CONTAINER]

    def _by_host_id(self, outer: int, kind: str) -> tuple[str, int]:
        """(machine name, inner ID) of host ID *outer*, for kind "uid" or "gid"."""
        if outer < HOST_RANGE_END:
            raise UserDbError(NO_RECORD)
        for machine in self._containers():
            try:
                inner = idmap.to_container(idmap.read_map(machine.leader, kind), outer)
            except OSError:
                continue
            if inner is not None:
                return machine.name, inner
        raise UserDbError(NO_RECORD)

    def _by_name(self, name: str, prefix: str, kind: str) -> tuple[str, int, int]:
        """(machine name, inner ID, host ID) of a synthesized ``vu-…``/``vg-…`` name."""
        if not valid_user_group_name(name) or not name.startswith(prefix):
            raise UserDbError(NO_RECORD)
        machine_name, sep, number = name[len(prefix) :].rpartition("-")
        inner = _parse_id(number)
        machine = self.manager.registry.get(machine_name) if sep else None
        if inner is None or machine is None or machine.machine_class is not MachineClass.CONTAINER:
            raise UserDbError(NO_RECORD)
        try:
            outer = idmap.to_host(idmap.read_map(machine.leader, kind), inner)
        except OSError:
            outer = None
        if outer is None:
            raise UserDbError(NO_RECORD)
        return machine.name, inner, outer

    def get_record(self, params: dict[str, Any], kind: str) -> dict[str, Any]:
        """The record a GetUserRecord (kind "uid") or GetGroupRecord ("gid") call asks for."""
        id_key, name_key = ("uid", "userName") if kind == "uid" else ("gid", "groupName")
        prefix = "vu-" if kind == "uid" else "vg-"
        if not personality.is_262():
            _check_252(params, {id_key: "id", name_key: "string", "service": "string"})
        else:  # (an ID that is not an integer, or past 64 bits: sd-json's dispatch refuses it too)
            _check_262(params, {id_key: "id", name_key: "name", "service": "string"})
            if isinstance(params.get(id_key), float):
                params = {**params, id_key: int(params[id_key])}
        if params.get("service") != SERVICE:
            raise UserDbError(BAD_SERVICE)
        wanted_id = params.get(id_key)
        wanted_name = params.get(name_key)
        if isinstance(wanted_id, int) and idmap.id_is_valid(wanted_id):
            machine_name, inner = self._by_host_id(wanted_id, kind)
            name, outer = f"{prefix}{machine_name}-{inner}", wanted_id
            if not valid_user_group_name(name):
                raise UserDbError(NO_RECORD)
        elif isinstance(wanted_name, str):
            machine_name, inner, outer = self._by_name(wanted_name, prefix, kind)
            name = wanted_name
        else:
            raise UserDbError(NO_ENUMERATION)
        if (wanted_name is not None and wanted_name != name) or (
            isinstance(wanted_id, int) and idmap.id_is_valid(wanted_id) and wanted_id != outer
        ):
            raise UserDbError(CONFLICT)
        label = "UID" if kind == "uid" else "GID"
        text = f"{label} {inner} of Container {machine_name}"
        if kind == "uid":
            record: dict[str, Any] = {"userName": name, "uid": outer, "gid": NOBODY_GID}
            if valid_gecos(text):
                record["realName"] = text
            record.update(homeDirectory="/", shell=NOLOGIN, locked=True)
        else:
            record = {"groupName": name, "gid": outer}
            if valid_gecos(text):
                record["description"] = text
        record.update(service=SERVICE, disposition="container")
        return {"record": record}

    def get_memberships(self, params: dict[str, Any]) -> dict[str, Any]:
        if not personality.is_262():
            _check_252(params, {"userName": "string", "groupName": "string", "service": "string"})
        else:
            _check_262(params, {"userName": "name", "groupName": "name", "service": "string"})
        if params.get("service") != SERVICE:
            raise UserDbError(BAD_SERVICE)
        raise UserDbError(NO_RECORD)


def userdb_service(manager: MachineManager) -> Service:
    """io.systemd.UserDatabase as machined serves it on /run/systemd/userdb/io.systemd.Machine
    (parameters are checked by the lookups alone). 252 answers nothing else there; 262 also
    org.varlink.service (GetInfo, and 262's description of the interface)."""
    db = UserDatabase(manager)
    if personality.is_262():
        from machined import __version__
        from machined.varlink.interfaces import IO_SYSTEMD_USER_DATABASE, PRODUCT, URL, VENDOR

        service = Service(vendor=VENDOR, product=PRODUCT, version=__version__, url=URL)
        service.add_interface(IO_SYSTEMD_USER_DATABASE)
    else:
        service = Service(introspection=False, as_252=True)

    async def user(call: Call) -> dict[str, Any]:
        return db.get_record(call.parameters, "uid")

    async def group(call: Call) -> dict[str, Any]:
        return db.get_record(call.parameters, "gid")

    async def memberships(call: Call) -> dict[str, Any]:
        return db.get_memberships(call.parameters)

    service.bind("io.systemd.UserDatabase.GetUserRecord", user)
    service.bind("io.systemd.UserDatabase.GetGroupRecord", group)
    service.bind("io.systemd.UserDatabase.GetMemberships", memberships)
    return service

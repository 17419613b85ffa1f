"""io.systemd.Resolve.Hook, as systemd-machined 262 serves it on
``/run/systemd/resolve.hook/io.systemd.Machine``: systemd-resolved asks it before any DNS,
LLMNR or mDNS lookup, so that machine names resolve to their containers' addresses.

- ``QueryFilter`` answers the names of the started machines (the host left out) as
  ``filterDomains``; called with ``more`` it is a subscription: the first reply comes at
  once, another one each time a machine is added or removed, until the client hangs up.
- ``ResolveRecord`` answers A and AAAA questions for a machine's exact name from the
  addresses GetAddresses reports (TTL 0), ``rcode`` 0 with no answer for other types of
  that name, ``rcode`` NXDOMAIN (3) for names below a machine's name, and nothing at all
  for the rest (resolved then goes on as usual). A question it cannot parse (not a valid
  DNS name, a type or class outside 0..65535, unknown fields, none at all) is
  ``InvalidParameter`` naming ``question``; a machine that has no addresses to give fails
  the call with its errno (a VM: EOPNOTSUPP; a container sharing the host's network: ENONET).

The server is the same one as io.systemd.Machine's (:mod:`machined.varlink.server`), with its
own socket and only this interface besides the introspection ones.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import socket
import struct
from typing import Any

from machined import errors
from machined.errors import BusError
from machined.inside.access import MachineAccess
from machined.inside.addresses import Address
from machined.machine import MachineClass
from machined.manager import MachineManager
from machined.varlink.idl import Interface, Method, Struct, TypeDef, opt, req
from machined.varlink.interfaces import PRODUCT, URL, VENDOR
from machined.varlink.server import Call, Reply, Service, invalid_parameter

IFACE = "io.systemd.Resolve.Hook."
SOCKET = "/run/systemd/resolve.hook/io.systemd.Machine"

DNS_CLASS_IN = 1
DNS_TYPE_A = 1
DNS_TYPE_AAAA = 28
DNS_RCODE_SUCCESS = 0
DNS_RCODE_NXDOMAIN = 3
DNS_LABEL_MAX = 63
DNS_HOSTNAME_MAX = 253
_FAMILY_OF_TYPE = {DNS_TYPE_A: socket.AF_INET, DNS_TYPE_AAAA: socket.AF_INET6}

_RR_FIELDS = (
    ("priority", "int"), ("weight", "int"), ("port", "int"), ("name", "string"), ("cpu", "string"),
    ("os", "string"), ("items", "[]string"), ("address", "[]int"), ("mname", "string"), ("rname", "string"),
    ("serial", "int"), ("refresh", "int"), ("retry", "int"), ("expire", "int"), ("minimum", "int"),
    ("exchange", "string"), ("version", "int"), ("size", "int"), ("horiz_pre", "int"), ("vert_pre", "int"),
    ("latitude", "int"), ("longitude", "int"), ("altitude", "int"), ("keyTag", "int"), ("algorithm", "int"),
    ("digestType", "int"), ("digest", "string"), ("fptype", "int"), ("fingerprint", "string"), ("flags", "int"),
    ("protocol", "int"), ("dnskey", "string"), ("signer", "string"), ("typeCovered", "int"), ("labels", "int"),
    ("originalTtl", "int"), ("expiration", "int"), ("inception", "int"), ("signature", "string"),
    ("nextDomain", "string"), ("types", "[]int"), ("iterations", "int"), ("salt", "string"), ("hash", "string"),
    ("certUsage", "int"), ("selector", "int"), ("matchingType", "int"), ("data", "string"), ("tag", "string"),
    ("value", "string"), ("target", "string"), ("svcparams", "object"), ("order", "int"), ("preference", "int"),
    ("naptrFlags", "string"), ("services", "string"), ("regexp", "string"), ("replacement", "string"),
)  # fmt: skip

IO_SYSTEMD_RESOLVE_HOOK = Interface(
    "io.systemd.Resolve.Hook",
    [
        TypeDef("Answer", Struct((opt("rr", "ResourceRecord"), req("raw", "string")))),
        TypeDef("Question", Struct((req("key", "ResourceKey"),))),
        TypeDef("ResourceKey", Struct((opt("class", "int"), req("type", "int"), req("name", "string")))),
        TypeDef("ResourceRecord", Struct((
            req("key", "ResourceKey"),
            *(opt(name, kind.removeprefix("[]"), array=kind.startswith("[]")) for name, kind in _RR_FIELDS),
        ))),
        Method("QueryFilter", (), (
            opt("filterDomains", "string", array=True), opt("filterLabelsMin", "int"), opt("filterLabelsMax", "int"),
        ), more="supports"),
        Method("ResolveRecord", (req("question", "Question", array=True),),
               (opt("rcode", "int"), opt("answer", "Answer", array=True))),
    ],
)  # fmt: skip


# ----- DNS names ---------------------------------------------------------------------------------


class BadName(ValueError):
    pass


def _labels(name: str) -> list[bytes]:
    """The labels of DNS name *name* (escapes ``\\X`` and ``\\DDD`` resolved), as resolved
    parses them: an empty name or ``.`` is the root; one trailing dot is allowed; no empty
    label, none longer than 63 bytes, at most 253 characters in all."""
    if name in ("", "."):
        return []
    labels: list[bytes] = []
    label = bytearray()
    i, n = 0, len(name)
    while i < n:
        c = name[i]
        if c == ".":
            if not label:
                raise BadName(name)
            labels.append(bytes(label))
            label = bytearray()
            i += 1
            if i == n:
                break
            continue
        if c == "\\":
            if i + 1 >= n:
                raise BadName(name)
            if name[i + 1].isdigit():
                digits = name[i + 1 : i + 4]
                if len(digits) != 3 or not digits.isdigit() or int(digits) > 255:
                    raise BadName(name)
                label.append(int(digits))
                i += 4
            else:
                label += name[i + 1].encode()
                i += 2
        else:
            label += c.encode()
            i += 1
        if len(label) > DNS_LABEL_MAX:
            raise BadName(name)
    if label:
        labels.append(bytes(label))
    if len(labels) == 0 or sum(len(label) + 1 for label in labels) - 1 > DNS_HOSTNAME_MAX:
        raise BadName(name)
    return labels


def _parents(name: str) -> list[str]:
    """*name* without its first label, then without its first two, ... (as written, escapes kept)."""
    out = []
    rest = name
    while True:
        i = 0
        while i < len(rest) and rest[i] != ".":
            i += 2 if rest[i] == "\\" else 1
        if i >= len(rest):
            break
        rest = rest[i + 1 :]
        if not rest:
            break
        out.append(rest)
    return out


def _wire_name(name: str) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in _labels(name)) + b"\0"


def _address_answer(name: str, rr_type: int, address: bytes) -> dict[str, Any]:
    """One A/AAAA record (class IN, TTL 0) as resolved puts it in JSON: the record and its wire form."""
    raw = _wire_name(name) + struct.pack("!HHIH", rr_type, DNS_CLASS_IN, 0, len(address)) + address
    return {
        "rr": {"key": {"class": DNS_CLASS_IN, "type": rr_type, "name": name}, "address": list(address)},
        "raw": base64.b64encode(raw).decode("ascii"),
    }


def _int16(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():  # (1e0: an integer to sd-json)
        value = int(value)
    if isinstance(value, int) and 0 <= value <= 0xFFFF:
        return value
    return None


def parse_question(value: Any) -> list[tuple[int, int, str]]:
    """(class, type, name) of each key of a ResolveRecord question; InvalidParameter if any is bad."""
    if not isinstance(value, list) or not value:
        raise invalid_parameter("question")
    keys = []
    for item in value:
        key = item.get("key") if isinstance(item, dict) else None
        if not isinstance(key, dict):
            raise invalid_parameter("question")
        # (no class means IN; a null one is class 0, as sd-json dispatches it)
        rr_class = DNS_CLASS_IN if "class" not in key else 0 if key["class"] is None else _int16(key["class"])
        rr_type = _int16(key.get("type"))
        name = key.get("name")
        if rr_class is None or rr_type is None or not isinstance(name, str):
            raise invalid_parameter("question")
        try:
            _labels(name)
        except BadName:
            raise invalid_parameter("question") from None
        if (rr_class, rr_type, name) not in keys:
            keys.append((rr_class, rr_type, name))
    return keys


# ----- the service -------------------------------------------------------------------------------


class ResolveHook:
    """The handlers, bound to one manager; :meth:`changed` is called when a machine comes or goes."""

    def __init__(self, manager: MachineManager, access: MachineAccess | None = None) -> None:
        self.manager = manager
        self.access = access or MachineAccess(manager)
        self._changed = asyncio.Event()
        self._generation = 0

    def domains(self) -> list[str]:
        return [m.name for m in self.manager.registry if m.machine_class is not MachineClass.HOST and m.started]

    def changed(self) -> None:
        self._generation += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def query_filter(self, call: Call) -> dict[str, Any] | None:
        if not call.more:
            return {"filterDomains": self.domains()}
        # Until the client hangs up: the server then cancels this call, which lets go of
        # everything it holds at once (what the client sends meanwhile waits, as in sd-varlink).
        connection = call.connection
        while True:
            event, generation = self._changed, self._generation
            await connection.send_reply(Reply({"filterDomains": self.domains()}), continues=True)
            if generation == self._generation:
                await event.wait()

    async def _addresses(self, name: str) -> list[Address]:
        machine = self.manager.registry.get(name)
        assert machine is not None
        try:
            return await self.access.addresses(machine)
        except BusError as e:
            if e.name == errors.NO_PRIVATE_NETWORKING:
                raise OSError(errno.ENONET, "Machine is not on the network") from None
            if e.name == errors.NOT_SUPPORTED:
                raise OSError(errno.EOPNOTSUPP, "Not supported") from None
            raise

    async def resolve_record(self, call: Call) -> dict[str, Any] | None:
        keys = parse_question(call.parameters.get("question"))
        answer: list[dict[str, Any]] = []
        seen: set[tuple[int, str, bytes]] = set()
        addresses: dict[str, list[Address]] = {}  # each machine's own, looked up once per call
        found = nxdomain = False
        for rr_class, rr_type, name in keys:
            if self.manager.registry.get(name) is not None:
                found = True
                family = _FAMILY_OF_TYPE.get(rr_type) if rr_class == DNS_CLASS_IN else None
                if family is not None:
                    if name not in addresses:
                        addresses[name] = await self._addresses(name)
                    for address in addresses[name]:
                        if address.family == family and (rr_type, name, address.address) not in seen:
                            seen.add((rr_type, name, address.address))
                            answer.append(_address_answer(name, rr_type, address.address))
            if not nxdomain:
                nxdomain = any(self.manager.registry.get(parent) is not None for parent in _parents(name))
        if not found:
            return {"rcode": DNS_RCODE_NXDOMAIN} if nxdomain else None
        return {"rcode": DNS_RCODE_SUCCESS, "answer": answer}


def resolve_hook_service(manager: MachineManager, version: str = "") -> tuple[Service, ResolveHook]:
    """The service on /run/systemd/resolve.hook/io.systemd.Machine, and its handlers."""
    hook = ResolveHook(manager)
    service = Service(vendor=VENDOR, product=PRODUCT, version=version, url=URL)
    service.add_interface(IO_SYSTEMD_RESOLVE_HOOK)
    service.bind(IFACE + "QueryFilter", hook.query_filter)
    service.bind(IFACE + "ResolveRecord", hook.resolve_record)
    return service, hook

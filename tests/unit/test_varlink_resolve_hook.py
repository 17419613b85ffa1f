"""io.systemd.Resolve.Hook on a real Unix socket: the answers systemd-machined 262 gave in a
sandbox (records, their wire form, NXDOMAIN below a machine's name, refused questions) and the
QueryFilter subscription. The differential test is tests/integration262/test_resolve_hook262.py."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from machined.errors import BusError
from machined.inside.addresses import Address
from machined.machine import Machine, MachineClass, Timestamp, host_machine
from machined.manager import MachineManager
from machined.statefile import StateDir
from machined.varlink import VarlinkServer
from machined.varlink.resolve_hook import ResolveHook, _labels, _parents, parse_question, resolve_hook_service
from machined.varlink.server import VarlinkError
from tests.unit.test_varlink_machine import Client

H = "io.systemd.Resolve.Hook."


class FakeAccess:
    def __init__(self) -> None:
        self.asked: list[str] = []

    async def addresses(self, machine: Machine) -> list[Address]:
        self.asked.append(machine.name)
        if machine.machine_class is MachineClass.VM:
            raise BusError("org.freedesktop.DBus.Error.NotSupported", "no")
        return [
            Address(socket.AF_INET, 0, 5, bytes([10, 77, 0, 2])),
            Address(socket.AF_INET, 0, 5, bytes([10, 77, 0, 3])),
            Address(socket.AF_INET6, 0, 5, bytes([0xFD, 0, 0, 0x77] + [0] * 11 + [2])),
        ]


def _machine(name: str, machine_class: MachineClass = MachineClass.CONTAINER) -> Machine:
    m = Machine(name=name, machine_class=machine_class, leader=0)
    m.started = True
    return m


@pytest.fixture
async def hooked(tmp_path: Path):  # type: ignore[no-untyped-def]
    manager = MachineManager(host_machine(b"", Timestamp()), StateDir(str(tmp_path / "m")))
    service, hook = resolve_hook_service(manager, version="test")
    hook.access = FakeAccess()  # type: ignore[assignment]
    path = str(tmp_path / "io.systemd.Machine")
    server = VarlinkServer(service, [path])
    await server.start()
    client = await Client.connect(path)
    try:
        yield manager, hook, client, path
    finally:
        client.close()
        await server.stop()


def test_dns_names_as_resolved_parses_them() -> None:
    assert _labels("hk1") == [b"hk1"] and _labels("hk1.") == [b"hk1"] and _labels("") == [] == _labels(".")
    assert _labels("\\065b.c") == [b"Ab", b"c"] and _labels("a\\.b") == [b"a.b"]
    for bad in ("a..b", ".host", "a" * 64, "a." + ".".join(["a" * 63] * 4), "a\\", "a\\9"):
        with pytest.raises(ValueError):
            _labels(bad)
    assert _parents("a.b.hk1") == ["b.hk1", "hk1"] and _parents("hk1") == [] and _parents("a\\.b.c") == ["c"]
    assert parse_question([{"key": {"type": "28", "name": "x"}}]) == [(1, 28, "x")]
    for bad_question in ([], None, [{"key": {"type": 65536, "name": "x"}}], [{"key": {"type": -1, "name": "x"}}],
                         [{"key": {"class": True, "type": 1, "name": "x"}}], [{"key": {"type": 1}}]):  # fmt: skip
        with pytest.raises(VarlinkError):
            parse_question(bad_question)


async def test_records_nxdomain_and_nothing(hooked) -> None:  # type: ignore[no-untyped-def]
    manager, hook, client, _ = hooked
    manager.registry.add(_machine("hk1"))
    manager.registry.add(_machine("hk2", MachineClass.VM))
    both = {
        "question": [{"key": {"class": 1, "type": 1, "name": "hk1"}}, {"key": {"class": 1, "type": 28, "name": "hk1"}}]
    }
    reply = await client.one(H + "ResolveRecord", both)
    # (what systemd-machined 262 answered for a container with these addresses)
    assert reply == {"parameters": {"rcode": 0, "answer": [
        {"rr": {"key": {"class": 1, "type": 1, "name": "hk1"}, "address": [10, 77, 0, 2]},
         "raw": "A2hrMQAAAQABAAAAAAAECk0AAg=="},
        {"rr": {"key": {"class": 1, "type": 1, "name": "hk1"}, "address": [10, 77, 0, 3]},
         "raw": "A2hrMQAAAQABAAAAAAAECk0AAw=="},
        {"rr": {"key": {"class": 1, "type": 28, "name": "hk1"}, "address": [253, 0, 0, 119] + [0] * 11 + [2]},
         "raw": "A2hrMQAAHAABAAAAAAAQ/QAAdwAAAAAAAAAAAAAAAg=="},
    ]}}  # fmt: skip
    assert hook.access.asked == ["hk1"]  # once per call

    async def one(name: str, rr_type: int = 1) -> dict[str, Any]:
        return await client.one(H + "ResolveRecord", {"question": [{"key": {"type": rr_type, "name": name}}]})

    assert await one("hk1", 16) == {"parameters": {"rcode": 0, "answer": []}}
    assert await one("a.b.hk1") == {"parameters": {"rcode": 3}}
    assert await one("nope") == {} == await one("HK1") == await one("hk1.")
    assert await one(".host") == {
        "error": "org.varlink.service.InvalidParameter",
        "parameters": {"parameter": "question"},
    }
    assert await one("hk2") == {"error": "io.systemd.System",
                                "parameters": {"origin": "linux", "errno": 95, "errnoName": "EOPNOTSUPP"}}  # fmt: skip
    assert await one("hk2", 16) == {"parameters": {"rcode": 0, "answer": []}}
    assert await client.one(H + "ResolveRecord", {"question": [{"key": {"type": 1, "name": "x"}, "x": 1}]}) == {
        "error": "org.varlink.service.InvalidParameter", "parameters": {"parameter": "question"}}  # fmt: skip


async def test_query_filter_and_its_subscription(hooked) -> None:  # type: ignore[no-untyped-def]
    manager, hook, client, path = hooked
    assert await client.one(H + "QueryFilter", {}) == {"parameters": {"filterDomains": []}}
    subscriber = await Client.connect(path)
    await subscriber.send({"method": H + "QueryFilter", "more": True})
    assert await subscriber.read() == {"parameters": {"filterDomains": []}, "continues": True}
    machine = _machine("hk4")
    manager.registry.add(machine)
    hook.changed()
    assert await subscriber.read() == {"parameters": {"filterDomains": ["hk4"]}, "continues": True}
    manager.registry.remove(machine)
    hook.changed()
    assert await subscriber.read() == {"parameters": {"filterDomains": []}, "continues": True}
    subscriber.close()
    await asyncio.sleep(0.05)
    hook.changed()  # nobody to tell: the subscription is over
    assert await client.one(H + "QueryFilter", {}) == {"parameters": {"filterDomains": []}}
    info = await client.one("org.varlink.service.GetInfo", {})
    assert info["parameters"]["interfaces"] == ["io.systemd", "io.systemd.Resolve.Hook", "org.varlink.service"]
    assert isinstance(hook, ResolveHook)


def test_a_null_class_is_class_zero_and_none_is_in() -> None:
    # (262: no answer for {"class": null, "type": 1, "name": "hk1"}; answers without "class")
    assert parse_question([{"key": {"class": None, "type": 1, "name": "x"}}]) == [(0, 1, "x")]
    assert parse_question([{"key": {"type": 1, "name": "x"}}]) == [(1, 1, "x")]

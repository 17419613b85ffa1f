"""Interface descriptions and GetInfo: what org.varlink.service answers on machined's sockets.

The descriptions are 262's own text (comments included, ``dbus-interfaces/262/*.varlink``,
compared byte for byte with a live 262 in tests/integration262/test_answers262.py); here: the
declarations calls are checked against say the same, comments aside, and the user database
socket is introspectable (and its calls checked against 262's declaration) under 262 only (252
serves no org.varlink.service there)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from machined import personality
from machined.machine import Timestamp, host_machine
from machined.manager import MachineManager
from machined.statefile import StateDir
from machined.userdb import userdb_service
from machined.varlink import VarlinkServer, idl, interfaces
from machined.varlink.machine import machine_service
from machined.varlink.resolve_hook import IO_SYSTEMD_RESOLVE_HOOK

DECLARED = [
    interfaces.IO_SYSTEMD,
    interfaces.IO_SYSTEMD_MACHINE,
    interfaces.IO_SYSTEMD_MACHINE_IMAGE,
    interfaces.IO_SYSTEMD_SERVICE,
    interfaces.ORG_VARLINK_SERVICE,
    IO_SYSTEMD_RESOLVE_HOOK,
    interfaces.IO_SYSTEMD_USER_DATABASE,
]


@pytest.mark.parametrize("interface", DECLARED, ids=lambda i: i.name)
def test_stored_description_is_the_declaration_with_comments(interface: idl.Interface) -> None:
    stored = idl.stored_description(interface.name)
    assert stored is not None and stored.endswith("\n")
    assert "\n# " in "\n" + stored  # upstream's comments are there
    assert idl.without_comments(stored) == idl.describe(interface)
    assert interface.describe() == stored


def test_without_comments_keeps_the_more_markers() -> None:
    text = "# about\ninterface a.b\n\n# [Supports 'more' flag]\n# what it does\nmethod M(\n\t# x\n\tx: int\n) -> ()\n"
    assert idl.without_comments(text) == "interface a.b\n\n# [Supports 'more' flag]\nmethod M(\n\tx: int\n) -> ()\n"


@pytest.fixture
def personality_262() -> Iterator[None]:
    before = personality.current()
    personality.set_personality(personality.V262)
    try:
        yield
    finally:
        personality.set_personality(before)


async def _ask(path: str, *messages: dict) -> list[dict]:
    reader, writer = await asyncio.open_unix_connection(path)
    replies = []
    for message in messages:
        writer.write(json.dumps(message).encode() + b"\0")
        await writer.drain()
        replies.append(json.loads((await reader.readuntil(b"\0"))[:-1]))
    writer.close()
    return replies


INFO = {"method": "org.varlink.service.GetInfo", "parameters": {}}


def _describe(name: str) -> dict:
    return {"method": "org.varlink.service.GetInterfaceDescription", "parameters": {"interface": name}}


async def test_user_database_introspection_262(tmp_path: Path, personality_262: None) -> None:
    manager = MachineManager(host_machine(b"", Timestamp()), StateDir(str(tmp_path / "m")))
    server = VarlinkServer(userdb_service(manager), [str(tmp_path / "io.systemd.Machine")])
    await server.start()
    try:
        info, described = await _ask(server.path, INFO, _describe("io.systemd.UserDatabase"))
    finally:
        await server.stop()
    assert info["parameters"]["interfaces"] == ["io.systemd", "io.systemd.UserDatabase", "org.varlink.service"]
    assert info["parameters"]["url"] == interfaces.URL and interfaces.URL.startswith("https://")
    assert described["parameters"]["description"] == idl.stored_description("io.systemd.UserDatabase")


async def test_user_database_without_introspection_252(tmp_path: Path) -> None:
    before = personality.current()
    personality.set_personality(personality.V252)
    try:
        manager = MachineManager(host_machine(b"", Timestamp()), StateDir(str(tmp_path / "m")))
        server = VarlinkServer(userdb_service(manager), [str(tmp_path / "io.systemd.Machine")])
    finally:
        personality.set_personality(before)
    await server.start()
    try:
        (info,) = await _ask(server.path, INFO)
    finally:
        await server.stop()
    assert info == {
        "error": "org.varlink.service.MethodNotFound",
        "parameters": {"method": "org.varlink.service.GetInfo"},
    }


async def test_machine_socket_describes_262s_text(tmp_path: Path) -> None:
    manager = MachineManager(host_machine(b"", Timestamp()), StateDir(str(tmp_path / "m")))
    server = VarlinkServer(machine_service(manager, version="9"), [str(tmp_path / "io.systemd.Machine")])
    await server.start()
    try:
        replies = await _ask(server.path, INFO, *(_describe(i.name) for i in DECLARED[:5]))
    finally:
        await server.stop()
    info = replies[0]["parameters"]
    assert (info["vendor"], info["product"], info["version"], info["url"]) == ("machined", "machined", "9",
                                                                                interfaces.URL)  # fmt: skip
    for interface, reply in zip(DECLARED[:5], replies[1:], strict=True):
        assert reply["parameters"]["description"] == idl.stored_description(interface.name)

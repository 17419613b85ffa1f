"""The varlink server and the user database service, over a real Unix socket."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from machined.machine import Machine, MachineClass, Timestamp, host_machine
from machined.manager import MachineManager
from machined.statefile import StateDir
from machined.userdb import userdb_service, valid_user_group_name
from machined.varlink import VarlinkServer


async def _ask(path: str, *messages: dict) -> list[dict]:
    reader, writer = await asyncio.open_unix_connection(path)
    replies = []
    for message in messages:
        writer.write(json.dumps(message).encode() + b"\0")
        await writer.drain()
        if not message.get("oneway"):
            replies.append(json.loads((await reader.readuntil(b"\0"))[:-1]))
    writer.close()
    return replies


async def test_user_database_answers_like_machined(tmp_path: Path) -> None:
    manager = MachineManager(host_machine(b"", Timestamp()), StateDir(str(tmp_path / "m")))
    # A "container" whose leader is this very process: its uid_map maps 1:1, so no vu- users.
    manager.registry.add(Machine("c1", machine_class=MachineClass.CONTAINER, leader=os.getpid()))
    server = VarlinkServer(userdb_service(manager), [str(tmp_path / "userdb" / "io.systemd.Machine")])
    await server.start()
    try:
        assert oct(os.stat(server.path).st_mode & 0o777) == "0o666"
        replies = await _ask(
            server.path,
            {"method": "io.systemd.UserDatabase.GetUserRecord", "parameters": {"uid": 200005}},
            {"method": "io.systemd.UserDatabase.GetUserRecord", "parameters": {"service": "io.systemd.Machine"}},
            {"method": "io.systemd.UserDatabase.GetUserRecord",
             "parameters": {"service": "io.systemd.Machine", "uid": 200005}},
            {"method": "io.systemd.UserDatabase.GetGroupRecord",
             "parameters": {"service": "io.systemd.Machine", "groupName": "vg-c1-5"}},
            {"method": "io.systemd.UserDatabase.GetMemberships", "parameters": {"service": "io.systemd.Machine"}},
            {"method": "io.systemd.UserDatabase.Nope", "parameters": {}},
            {"method": "io.systemd.UserDatabase.GetUserRecord", "oneway": True, "parameters": {}},
            {"method": "io.systemd.UserDatabase.GetUserRecord", "parameters": {"service": "io.systemd.Machine",
                                                                               "uid": 100}},
        )  # fmt: skip
        await asyncio.sleep(0.05)  # let the server side see the client go
    finally:
        await server.stop()
    assert [r.get("error") for r in replies] == [
        "io.systemd.UserDatabase.BadService",
        "io.systemd.UserDatabase.EnumerationNotSupported",
        "io.systemd.UserDatabase.NoRecordFound",
        None,
        "io.systemd.UserDatabase.NoRecordFound",
        "org.varlink.service.MethodNotFound",
        "io.systemd.UserDatabase.NoRecordFound",
    ]
    # a 1:1 gid_map translates container GID 5 to host GID 5, as upstream's lookup does
    assert replies[3]["parameters"]["record"] == {
        "groupName": "vg-c1-5", "gid": 5, "description": "GID 5 of Container c1",
        "service": "io.systemd.Machine", "disposition": "container",
    }  # fmt: skip
    assert not os.path.exists(server.path)


def test_synthesized_names_follow_the_strict_rules() -> None:
    assert valid_user_group_name("vu-c1-5")
    assert not valid_user_group_name("vu-my.host-5")  # dots are not allowed
    assert not valid_user_group_name("vu-" + "x" * 40 + "-5")  # longer than utmp allows
    assert not valid_user_group_name("5")

"""io.systemd.MachineImage over varlink: the image pool's use cases (the ones D-Bus calls) with
262's checks and errors, on a pool in a temporary directory; long operations recorded instead
of run in children."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from machined.images import pool
from machined.machine import Timestamp, host_machine
from machined.manager import MachineManager
from machined.statefile import StateDir
from machined.varlink import VarlinkServer
from machined.varlink.machine import machine_service
from tests.unit.test_image_service import RecordingOperations
from tests.unit.test_varlink_machine import Client

IFACE = "io.systemd.MachineImage."


def invalid(field: str) -> dict[str, Any]:
    return {"error": "org.varlink.service.InvalidParameter", "parameters": {"parameter": field}}


@pytest.fixture
async def images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    machines = tmp_path / "machines"
    tree = machines / "img1" / "etc"
    tree.mkdir(parents=True)
    (tree / "os-release").write_text("ID=test\nVERSION_ID=1\n")
    (tree / "hostname").write_text("imghost\n")
    monkeypatch.setattr(pool, "SEARCH_PATH", (str(machines),))
    manager = MachineManager(host_machine(b"", Timestamp()), StateDir(str(tmp_path / "m")))
    ops = RecordingOperations()
    manager.operations = ops
    path = str(tmp_path / "io.systemd.MachineImage")
    server = VarlinkServer(machine_service(manager), [path])
    await server.start()
    client = await Client.connect(path)
    try:
        yield client, ops, machines
    finally:
        client.close()
        await server.stop()


async def test_list(images) -> None:  # type: ignore[no-untyped-def]
    client, _, machines = images
    assert await client.one(IFACE + "List", {}) == {"error": "org.varlink.service.ExpectedMore"}
    replies = await client.call(IFACE + "List", {}, more=True)
    assert sorted(r["parameters"]["name"] for r in replies) == [".host", "img1"]
    assert [r.get("continues") for r in replies] == [True, None]
    one = (await client.one(IFACE + "List", {"name": "img1"}))["parameters"]
    assert one["path"] == str(machines / "img1") and one["type"] == "directory" and one["class"] == "machine"
    assert one["readOnly"] is False and "hostname" not in one
    meta = (await client.one(IFACE + "List", {"name": "img1", "acquireMetadata": "yes"}))["parameters"]
    assert meta["hostname"] == "imghost" and meta["OSRelease"] == ["ID=test", "VERSION_ID=1"]
    assert await client.one(IFACE + "List", {"name": "nope"}) == {"error": "io.systemd.MachineImage.NoSuchImage"}
    assert await client.one(IFACE + "List", {"name": "a/b"}) == invalid("name")


async def test_update_clone_remove(images) -> None:  # type: ignore[no-untyped-def]
    client, ops, machines = images
    assert await client.one(IFACE + "Update", {"name": "img1", "newName": "bad/name"}) == invalid("newName")
    assert await client.one(IFACE + "Update", {"name": "img1", "limit": -1}) == invalid("limit")
    assert await client.one(IFACE + "Update", {"name": "gone", "newName": "x"}) == {
        "error": "io.systemd.MachineImage.NoSuchImage"
    }
    assert await client.one(IFACE + "Update", {"name": "img1", "newName": "img2"}) == {}
    assert sorted(os.listdir(machines)) == ["img2"]
    assert await client.one(IFACE + "Clone", {"name": "img2"}) == invalid("newName")  # mandatory
    assert await client.one(IFACE + "Clone", {"name": "img2", "newName": "img3", "readOnly": True}) == {}
    assert await client.one(IFACE + "Remove", {"name": "img2"}) == {}
    assert [(job.function, kwargs.get("new_name")) for job, kwargs in ops.calls] == [
        ("clone_in_child", "img3"),
        ("remove_in_child", None),
    ]
    ops.limit = 0  # 64 operations running: refused before anything is looked at
    assert await client.one(IFACE + "Remove", {"name": "zzz"}) == {"error": "io.systemd.MachineImage.TooManyOperations"}
    assert await client.one(IFACE + "Clone", {"name": "img2", "newName": "x"}) == {
        "error": "io.systemd.MachineImage.TooManyOperations"
    }


async def test_pool_limit_and_clean(images) -> None:  # type: ignore[no-untyped-def]
    client, ops, _ = images
    assert await client.one(IFACE + "SetPoolLimit", {"limit": -5}) == invalid("limit")
    assert await client.one(IFACE + "SetPoolLimit", {}) == invalid("limit")
    assert await client.one(IFACE + "CleanPool", {"mode": "all"}) == {"error": "org.varlink.service.ExpectedMore"}
    assert await client.call(IFACE + "CleanPool", {"mode": "some"}, more=True) == [invalid("mode")]
    ops.result = [("a", 5), ("b", 2**64 - 1)]
    replies = await client.call(IFACE + "CleanPool", {"mode": "hidden"}, more=True)
    assert replies == [
        {"parameters": {"name": "a", "usageExclusive": 5}, "continues": True},
        {"parameters": {"name": "b"}},
    ]
    await asyncio.sleep(0)

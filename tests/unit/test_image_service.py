"""The image pool's use cases without a bus: upstream's order of checks, where the work runs
(thread or child, deadline, the operations cap), and pool properties read off the event loop."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message

from machined import errors
from machined.children import jobs
from machined.children.jobs import Job
from machined.children.limits import Operations
from machined.dbus import images as bus_images
from machined.dbus.introspection import load_interface
from machined.dbus.objects import BusObject, Call, Dispatcher
from machined.errors import BusError
from machined.images import metadata, pool, service
from machined.images.pool import Image
from machined.images.service import METADATA_TIMEOUT, ImageService
from machined.limits import LIMITS_EXCEEDED

MANAGER_IFACE = "org.freedesktop.machine1.Manager"


class RecordingOperations(Operations):
    """The operations cap, with children replaced by a record of what would have run."""

    def __init__(self, limit: int = 64) -> None:
        super().__init__(limit)
        self.calls: list[tuple[Job, dict[str, Any]]] = []
        self.result: Any = None

    async def run(self, job: Job, limit_message: str = "Too many ongoing operations.", **kwargs: Any) -> Any:
        if self.running >= self.limit:
            raise BusError(LIMITS_EXCEEDED, limit_message)
        self.calls.append((job, kwargs))
        return self.result


class Polkit:
    def __init__(self, allow: bool = True) -> None:
        self.asked: list[tuple[str, dict[str, str]]] = []
        self.allow = allow

    async def __call__(self, action: str, details: dict[str, str]) -> None:
        self.asked.append((action, details))
        if not self.allow:
            raise BusError(errors.ACCESS_DENIED, "Permission denied")


IMG = Image("img", "/var/lib/machines/img", "directory", False)
RAW = Image("disk", "/var/lib/machines/disk.raw", "raw", False)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_clone_checks_the_cap_then_the_name_then_asks_polkit() -> None:
    ops = RecordingOperations()
    svc, polkit = ImageService(ops), Polkit()
    ops.running = ops.limit
    with pytest.raises(BusError) as e:
        run(svc.clone(IMG, "a/b", False, polkit))
    assert (e.value.name, e.value.message) == (LIMITS_EXCEEDED, "Too many ongoing operations.")
    ops.running = 0
    with pytest.raises(BusError) as e:
        run(svc.clone(IMG, "a/b", False, polkit))
    assert (e.value.name, e.value.message) == (errors.INVALID_ARGS, "Image name 'a/b' is invalid.")
    assert polkit.asked == [] and ops.calls == []
    run(svc.clone(IMG, "copy", True, polkit))
    assert polkit.asked == [("manage-images", {"image": "img", "verb": "clone", "new_name": "copy"})]
    target, kwargs = ops.calls[0]
    assert target == jobs.CLONE_IMAGE
    assert Image(**kwargs["image"]) == IMG and kwargs["new_name"] == "copy" and kwargs["read_only"] is True


def test_a_refusal_stops_before_any_work() -> None:
    ops = RecordingOperations()
    svc = ImageService(ops)
    for coro in (svc.remove(IMG, Polkit(False)), svc.clean_pool("all", Polkit(False)),
                 svc.set_pool_limit(1, Polkit(False))):  # fmt: skip
        with pytest.raises(BusError) as e:
            run(coro)
        assert e.value.name == errors.ACCESS_DENIED
    assert ops.calls == []


def test_arguments_checked_before_polkit() -> None:
    svc, polkit = ImageService(RecordingOperations()), Polkit()
    for coro, message in (
        (svc.rename(IMG, ".#x", polkit), "Image name '.#x' is invalid."),
        (svc.set_limit(IMG, 2**63, polkit), "New limit out of range"),
        (svc.set_pool_limit(2**63, polkit), "New limit out of range"),
        (svc.clean_pool("bogus", polkit), "Unknown mode 'bogus'."),
        (svc.lookup(".."), "Image name '..' is invalid."),
    ):
        with pytest.raises(BusError) as e:
            run(coro)
        assert (e.value.name, e.value.message) == (errors.INVALID_ARGS, message)
    assert polkit.asked == []


def test_unknown_images(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool, "find", lambda name: None)
    svc = ImageService(RecordingOperations())
    for coro in (svc.get(".."), svc.lookup("nope")):
        with pytest.raises(BusError) as e:
            run(coro)
        assert e.value.name == errors.NO_SUCH_IMAGE


def test_disk_image_metadata_is_an_operation_with_a_deadline() -> None:
    ops = RecordingOperations()
    ops.result = {"hostname": "h", "machine_id": "", "machine_info": {}, "os_release": {}}
    svc = ImageService(ops)
    assert run(svc.metadata(RAW))["hostname"] == "h"
    target, kwargs = ops.calls[0]
    assert target == jobs.READ_METADATA
    assert kwargs["timeout"] == METADATA_TIMEOUT and Image(**kwargs["image"]) == RAW
    ops.running = ops.limit
    with pytest.raises(BusError) as e:
        run(svc.metadata(RAW))
    assert (e.value.name, e.value.message) == (LIMITS_EXCEEDED, "Too many ongoing operations.")


def test_tree_metadata_is_read_in_a_thread(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    threads: list[threading.Thread] = []

    def read(img: Image) -> dict[str, Any]:
        threads.append(threading.current_thread())
        raise OSError(2, "gone")

    monkeypatch.setattr(metadata, "read_metadata", read)
    with pytest.raises(BusError) as e:
        run(ImageService(RecordingOperations()).metadata(IMG))
    assert e.value.name == "org.freedesktop.DBus.Error.FileNotFound"
    assert e.value.message == "Failed to read image metadata: No such file or directory"
    assert threads and threads[0] is not threading.main_thread()


class _Tree:
    def __init__(self, obj: BusObject) -> None:
        self.obj = obj

    async def lookup(self, path: str, call: Call) -> BusObject | None:
        return self.obj


def test_pool_properties_are_read_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Manager's PoolUsage/PoolLimit getters hand btrfs quota to a thread; the dispatcher awaits them."""
    readers: list[threading.Thread] = []

    def quota(path: str) -> tuple[int, int]:
        readers.append(threading.current_thread())
        assert path == "/pool"
        return 123, 456

    monkeypatch.setattr(pool, "pool_quota", quota)

    class Manager:
        operations = RecordingOperations()
        pool_path = "/pool"

    props = bus_images.image_manager_properties(Manager())  # type: ignore[arg-type]
    obj = BusObject(
        interfaces=[load_interface(MANAGER_IFACE)],
        properties={(MANAGER_IFACE, "PoolPath"): lambda: "/pool", **{(MANAGER_IFACE, k): g for k, g in props.items()}},
    )

    async def ask(member: str, signature: str, body: list[Any]) -> Message:
        dispatcher = Dispatcher(None, _Tree(obj), "0" * 32)  # type: ignore[arg-type]
        msg = Message(destination="org.freedesktop.machine1", path="/org/freedesktop/machine1", member=member,
                      interface="org.freedesktop.DBus.Properties", signature=signature, body=body, serial=1)  # fmt: skip
        return await dispatcher._dispatch(Call(None, msg))  # type: ignore[arg-type]

    usage = run(ask("Get", "ss", [MANAGER_IFACE, "PoolUsage"]))
    limit = run(ask("Get", "ss", [MANAGER_IFACE, "PoolLimit"]))
    every = run(ask("GetAll", "s", [MANAGER_IFACE]))
    assert (usage.body[0].value, limit.body[0].value) == (123, 456)
    assert {k: v.value for k, v in every.body[0].items()} == {"PoolPath": "/pool", "PoolUsage": 123, "PoolLimit": 456}
    assert len(readers) == 4 and threading.main_thread() not in readers


def test_service_module_is_free_of_dbus() -> None:
    for module in ("machined.images.service", "machined.images.operations", "machined.images.metadata",
                   "machined.fs.copy", "machined.fs.btrfs"):  # fmt: skip
        source = Path(__import__(module, fromlist=["x"]).__file__).read_text()  # type: ignore[arg-type]
        assert "dbus_fast" not in source and "machined.dbus" not in source, module
    assert service.UINT64_MAX == pool.UINT64_MAX

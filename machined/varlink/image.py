"""io.systemd.MachineImage over varlink, as systemd-machined 262 serves it (on both of its sockets).

A thin front-end over the image pool's use cases (:class:`machined.images.service.ImageService`),
the same ones the D-Bus Image objects call: List (one image by name, or all with ``more``,
with metadata if asked), Update (rename, read-only flag and limit under one ``update``
authorization), Clone, Remove, SetPoolLimit and CleanPool, with 262's checks and errors.
"""

from __future__ import annotations

from typing import Any

from machined import errors
from machined.caller import Authorize
from machined.errors import BusError
from machined.images import pool
from machined.images.pool import Image
from machined.images.service import INT64_MAX, UINT64_MAX, ImageService
from machined.limits import LIMITS_EXCEEDED
from machined.manager import MachineManager
from machined.varlink.server import Call, VarlinkError, invalid_parameter

IFACE = "io.systemd.MachineImage."
NO_SUCH_IMAGE = IFACE + "NoSuchImage"
TOO_MANY_OPERATIONS = IFACE + "TooManyOperations"
NOT_SUPPORTED = IFACE + "NotSupported"


async def _allowed(action: str, details: dict[str, str]) -> None:
    """For a use case the front-end has authorized already (Update's parts)."""


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _limit(value: Any) -> int:
    """A size limit: a valid file size, or UINT64_MAX for none (262's FILE_SIZE_VALID_OR_INFINITY)."""
    limit = _int(value)
    if limit is None or limit < 0 or (limit > INT64_MAX and limit != UINT64_MAX):
        raise invalid_parameter("limit")
    return limit


def _remap(error: BusError) -> Exception:
    if error.name == LIMITS_EXCEEDED:
        return VarlinkError(TOO_MANY_OPERATIONS)
    if error.name == errors.NO_SUCH_IMAGE:
        return VarlinkError(NO_SUCH_IMAGE)
    return error


class ImageVarlink:
    def __init__(self, manager: MachineManager, authorizer: Any) -> None:
        self.service = ImageService(manager.operations, manager.pool_path)
        self.authorizer = authorizer  # Call -> Authorize (the peer asked about at polkit)

    def _check_slot(self) -> None:
        operations = self.service.operations
        if operations.running >= operations.limit:
            raise VarlinkError(TOO_MANY_OPERATIONS)

    async def _image(self, name: Any, field: str = "name") -> Image:
        if not isinstance(name, str) or not pool.image_name_is_valid(name):
            raise invalid_parameter(field)
        img = await self.service.find(name)
        if img is None:
            raise VarlinkError(NO_SUCH_IMAGE)
        return img

    async def describe(self, img: Image, metadata: str) -> dict[str, Any]:
        out: dict[str, Any] = {"name": img.name}
        if img.path:
            out["path"] = img.path
        out.update(type=img.type, **{"class": "machine"}, readOnly=img.shown_read_only)
        for key, value, unset in (
            ("creationTimestamp", img.crtime, 0),
            ("modificationTimestamp", img.mtime, 0),
            ("usage", img.usage, UINT64_MAX),
            ("usageExclusive", img.usage_exclusive, UINT64_MAX),
            ("limit", img.limit, UINT64_MAX),
            ("limitExclusive", img.limit_exclusive, UINT64_MAX),
        ):
            if value != unset:
                out[key] = value
        if metadata in ("yes", "graceful"):
            try:
                meta = await self.service.metadata(img)
            except BusError:
                if metadata == "yes":
                    raise
                return out
            if meta.get("hostname"):
                out["hostname"] = meta["hostname"]
            if meta.get("machine_id"):
                out["machineId"] = meta["machine_id"]
            if meta.get("machine_info"):
                out["machineInfo"] = [f"{k}={v}" for k, v in meta["machine_info"].items()]
            if meta.get("os_release"):
                out["OSRelease"] = [f"{k}={v}" for k, v in meta["os_release"].items()]
        return out

    async def list(self, call: Call) -> dict[str, Any] | None:
        metadata = call.parameters.get("acquireMetadata") or "no"
        if metadata != "no":  # what is inside images is not for everybody (262), asked before anything else
            name = call.parameters.get("name")  # (262 names the image asked for, or "n/a")
            await self.authorizer(call)("inspect-images", {"name": name if isinstance(name, str) else "n/a"})
        name = call.parameters.get("name")
        if name is not None:
            return await self.describe(await self._image(name), metadata)
        if not call.more:
            raise VarlinkError(errors.VL_EXPECTED_MORE)
        images = await self.service.discover()
        for img in images.values():
            await call.notify(await self.describe(img, metadata))
        return None

    async def update(self, call: Call) -> None:
        params = call.parameters
        if not isinstance(params["name"], str) or not pool.image_name_is_valid(params["name"]):
            raise invalid_parameter("name")
        new_name = params.get("newName")
        if new_name is not None and not pool.image_name_is_valid(new_name):
            raise invalid_parameter("newName")
        limit = _limit(params["limit"]) if params.get("limit") is not None else None
        img = await self._image(params["name"])
        authorize: Authorize = self.authorizer(call)
        await authorize("manage-images", {"image": img.name, "verb": "update"})
        try:
            if new_name is not None:
                img = await self.service.rename(img, new_name, _allowed)
            first: BusError | None = None  # the flag and the limit are both tried; the first failure is told
            if params.get("readOnly") is not None:
                try:
                    await self.service.mark_read_only(img, params["readOnly"], _allowed)
                except BusError as e:
                    first = first or e
            if limit is not None:
                try:
                    await self.service.set_limit(img, limit, _allowed)
                except BusError as e:
                    first = first or e
            if first is not None:
                raise first
        except BusError as e:
            raise _remap(e) from None

    async def clone(self, call: Call) -> None:
        self._check_slot()
        params = call.parameters
        if not pool.image_name_is_valid(params["name"]):
            raise invalid_parameter("name")
        if not pool.image_name_is_valid(params["newName"]):
            raise invalid_parameter("newName")
        img = await self._image(params["name"])
        try:
            await self.service.clone(img, params["newName"], params.get("readOnly") is True, self.authorizer(call))
        except BusError as e:
            raise _remap(e) from None

    async def remove(self, call: Call) -> None:
        self._check_slot()
        img = await self._image(call.parameters["name"])
        try:
            await self.service.remove(img, self.authorizer(call))
        except BusError as e:
            raise _remap(e) from None

    async def set_pool_limit(self, call: Call) -> None:
        limit = _limit(call.parameters["limit"])
        authorize: Authorize = self.authorizer(call)

        async def as_262(action: str, details: dict[str, str]) -> None:
            await authorize("manage-images", details)  # D-Bus (252) asks for manage-machines

        try:
            await self.service.set_pool_limit(limit, as_262)
        except BusError as e:
            if e.name == errors.NOT_SUPPORTED:
                raise VarlinkError(NOT_SUPPORTED) from None
            raise _remap(e) from None

    async def clean_pool(self, call: Call) -> None:
        mode = call.parameters["mode"]
        if mode not in ("all", "hidden"):
            raise invalid_parameter("mode")
        try:
            removed = await self.service.clean_pool(mode, self.authorizer(call))
        except BusError as e:
            raise _remap(e) from None
        for name, usage in removed:
            entry: dict[str, Any] = {"name": name}
            if usage != UINT64_MAX:
                entry["usageExclusive"] = usage
            await call.notify(entry)


def bind_image_methods(service: Any, manager: MachineManager, authorizer: Any) -> None:
    """Add io.systemd.MachineImage to *service* (a :class:`machined.varlink.server.Service`)."""
    from machined.varlink.interfaces import IO_SYSTEMD_MACHINE_IMAGE

    handlers = ImageVarlink(manager, authorizer)
    service.add_interface(IO_SYSTEMD_MACHINE_IMAGE)
    service.bind(IFACE + "List", handlers.list, sentinel=NO_SUCH_IMAGE)
    service.bind(IFACE + "Update", handlers.update)
    service.bind(IFACE + "Clone", handlers.clone)
    service.bind(IFACE + "Remove", handlers.remove)
    service.bind(IFACE + "SetPoolLimit", handlers.set_pool_limit)
    service.bind(IFACE + "CleanPool", handlers.clean_pool)

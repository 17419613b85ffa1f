"""D-Bus adapters of the image pool: Image objects, the Manager's image methods and pool properties.

Thin: handlers decode arguments, hand the use cases of
:class:`machined.images.service.ImageService` a polkit check for the caller, and
put the results on the wire. The Manager's ``…Image…(name, …)`` methods look the
image up (name checked) and run the very handler of the Image object.
"""

from __future__ import annotations

import os
from typing import Any

from machined import personality
from machined.clients.polkit import authorize
from machined.dbus.introspection import load_interface
from machined.dbus.objects import BusObject, Call, Handler, PropertyGetter
from machined.errors import BusError
from machined.images.pool import Image
from machined.images.service import Authorize, ImageService
from machined.manager import MachineManager
from machined.naming import bus_label_escape, bus_label_unescape

IMAGE_IFACE = "org.freedesktop.machine1.Image"

# Manager method → the Image method it redirects to, for the given image name.
IMAGE_REDIRECTS = {
    "RemoveImage": "Remove",
    "RenameImage": "Rename",
    "CloneImage": "Clone",
    "MarkImageReadOnly": "MarkReadOnly",
    "SetImageLimit": "SetLimit",
    "GetImageHostname": "GetHostname",
    "GetImageMachineID": "GetMachineID",
    "GetImageMachineInfo": "GetMachineInfo",
    "GetImageOSRelease": "GetOSRelease",
}


def _service(manager: MachineManager) -> ImageService:
    return ImageService(manager.operations, manager.pool_path)


def _polkit(call: Call) -> Authorize:
    """The caller's authorization, asked of polkit (root always may)."""

    async def check(action: str, details: dict[str, str]) -> None:
        await authorize(call, action, details)

    return check


def image_methods(manager: MachineManager, img: Image) -> dict[str, Handler]:
    """The Image interface's handlers, bound to *img*."""
    service = _service(manager)

    async def remove(call: Call) -> None:
        await service.remove(img, _polkit(call))

    async def rename(call: Call, new_name: str) -> None:
        try:
            await service.rename(img, new_name, _polkit(call))
        except OSError as e:
            if not (e.errno and personality.is_262()):
                raise
            raise BusError.from_errno(e.errno, f"Failed to rename image: {os.strerror(e.errno)}") from e

    async def clone(call: Call, new_name: str, read_only: bool) -> None:
        await service.clone(img, new_name, read_only, _polkit(call))

    async def mark_read_only(call: Call, read_only: bool) -> None:
        await service.mark_read_only(img, read_only, _polkit(call))

    async def set_limit(call: Call, limit: int) -> None:
        await service.set_limit(img, limit, _polkit(call))

    async def get_hostname(call: Call) -> list[Any]:
        return [(await service.metadata(img))["hostname"]]

    async def get_machine_id(call: Call) -> list[Any]:
        machine_id = (await service.metadata(img))["machine_id"]
        return [bytes.fromhex(machine_id) if machine_id else b""]

    async def get_machine_info(call: Call) -> list[Any]:
        return [(await service.metadata(img))["machine_info"]]

    async def get_os_release(call: Call) -> list[Any]:
        return [(await service.metadata(img))["os_release"]]

    return {
        "Remove": remove,
        "Rename": rename,
        "Clone": clone,
        "MarkReadOnly": mark_read_only,
        "SetLimit": set_limit,
        "GetHostname": get_hostname,
        "GetMachineID": get_machine_id,
        "GetMachineInfo": get_machine_info,
        "GetOSRelease": get_os_release,
    }


def _redirect(manager: MachineManager, target: str) -> Handler:
    async def handler(call: Call, name: str, *args: object) -> list[Any] | None:
        img = await _service(manager).lookup(name)
        reply: list[Any] | None = await image_methods(manager, img)[target](call, *args)
        return reply

    return handler


def image_manager_methods(manager: MachineManager) -> dict[str, Handler]:
    """Manager methods about images (ListImages, GetImage, RemoveImage...), by member name."""
    service = _service(manager)

    async def list_images(call: Call) -> list[Any]:
        found = await service.discover()
        return [
            [(i.name, i.type, i.shown_read_only, i.crtime, i.mtime, i.usage, i.object_path) for i in found.values()]
        ]

    async def get_image(call: Call, name: str) -> list[Any]:
        return [(await service.get(name)).object_path]

    async def set_pool_limit(call: Call, limit: int) -> None:
        await service.set_pool_limit(limit, _polkit(call))

    async def clean_pool(call: Call, mode: str) -> list[Any]:
        return [await service.clean_pool(mode, _polkit(call))]

    methods: dict[str, Handler] = {
        "ListImages": list_images,
        "GetImage": get_image,
        "SetPoolLimit": set_pool_limit,
        "CleanPool": clean_pool,
    }
    for name, target in IMAGE_REDIRECTS.items():
        methods[name] = _redirect(manager, target)
    return methods


def image_manager_properties(manager: MachineManager) -> dict[str, PropertyGetter]:
    """The Manager's pool properties; their getters read btrfs quota in a thread (awaitable values)."""
    service = _service(manager)
    return {"PoolUsage": service.pool_usage, "PoolLimit": service.pool_limit}


async def image_children(manager: MachineManager) -> list[str]:
    """Escaped names of the images, the child nodes of /org/freedesktop/machine1/image.

    A fresh scan each time, as upstream's node enumerator does, in a thread.
    """
    return sorted(bus_label_escape(name) for name in await _service(manager).discover())


async def image_object(manager: MachineManager, element: str, call: Call) -> BusObject | None:
    """The object at /org/freedesktop/machine1/image/<element>, or None."""
    img = await _service(manager).find(bus_label_unescape(element))
    if img is None:
        return None
    i = IMAGE_IFACE
    return BusObject(
        interfaces=[load_interface(i)],
        methods={(i, name): h for name, h in image_methods(manager, img).items()},
        properties={
            (i, "Name"): lambda: img.name,
            (i, "Path"): lambda: img.path,
            (i, "Type"): lambda: img.type,
            (i, "ReadOnly"): lambda: img.shown_read_only,
            (i, "CreationTimestamp"): lambda: img.crtime,
            (i, "ModificationTimestamp"): lambda: img.mtime,
            (i, "Usage"): lambda: img.usage,
            (i, "Limit"): lambda: img.limit,
            (i, "UsageExclusive"): lambda: img.usage_exclusive,
            (i, "LimitExclusive"): lambda: img.limit_exclusive,
        },
    )

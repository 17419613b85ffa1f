"""D-Bus adapters of the image pool: Image objects and the Manager's image methods.

Handlers check their arguments and ask polkit in upstream's order, find the
image and do the work off the event loop: Remove, Clone and CleanPool are
long-running operations in a worker child (at most 64 at once, the reply goes
out when the child ends); discovery, Rename, MarkReadOnly, the limits and the
metadata of directory trees are short and run in a thread (disk images are
dissected in a child). The Manager's ``…Image…(name, …)`` methods validate the
name, look the image up and run the very handler of the Image object.
"""

from __future__ import annotations

import asyncio
import errno
import os

from machined import errors, image_ops
from machined import images as pool
from machined.bus.introspection import load_interface
from machined.bus.objects import BusObject, Call, Handler
from machined.bus.polkit import authorize
from machined.errors import BusError
from machined.images import Image
from machined.manager import MachineManager
from machined.naming import bus_label_escape, bus_label_unescape, image_object_path
from machined.worker import LIMITS_EXCEEDED, run_worker

IMAGE_IFACE = "org.freedesktop.machine1.Image"
INT64_MAX = 2**63 - 1

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


def _no_such_image(name: str) -> BusError:
    return BusError(errors.NO_SUCH_IMAGE, f"No image '{name}' known")


def _check_name(name: str) -> None:
    if not pool.image_name_is_valid(name):
        raise BusError(errors.INVALID_ARGS, f"Image name '{name}' is invalid.")


# Reading a disk image's metadata dissects it in a child; a wedged image costs its caller this long.
METADATA_TIMEOUT = 20.0


def _check_limit(limit: int) -> None:
    if limit > INT64_MAX and limit != pool.UINT64_MAX:
        raise BusError(errors.INVALID_ARGS, "New limit out of range")


def _check_operation_slot(manager: MachineManager) -> None:
    if manager.operations.running >= manager.operations.limit:
        raise BusError(LIMITS_EXCEEDED, "Too many ongoing operations.")


async def _find(name: str) -> Image | None:
    return await asyncio.to_thread(pool.find, name)


async def _metadata(img: Image) -> dict:
    """What GetHostname & co. read from the image: trees in a thread, disk images in a child
    (they need loop devices and mounts)."""
    try:
        if img.type in ("directory", "subvolume"):
            return await asyncio.to_thread(pool.read_metadata, img.to_dict())
        return await run_worker("machined.images:read_metadata", METADATA_TIMEOUT, shared=True, image=img.to_dict())
    except OSError as e:
        code = e.errno or errno.EIO
        raise BusError(errors.errno_error_name(code), f"Failed to read image metadata: {os.strerror(code)}") from None


def image_methods(manager: MachineManager, img: Image) -> dict[str, Handler]:
    """The Image interface's handlers, bound to *img*."""

    async def remove(call: Call) -> None:
        _check_operation_slot(manager)
        await authorize(call, "manage-images", {"image": img.name, "verb": "remove"})
        await manager.operations.run("machined.image_ops:remove", image=img.to_dict())

    async def rename(call: Call, new_name: str) -> None:
        _check_name(new_name)
        await authorize(call, "manage-images", {"image": img.name, "verb": "rename", "new_name": new_name})
        await asyncio.to_thread(image_ops.rename, img.to_dict(), new_name)

    async def clone(call: Call, new_name: str, read_only: bool) -> None:
        _check_operation_slot(manager)
        _check_name(new_name)
        await authorize(call, "manage-images", {"image": img.name, "verb": "clone", "new_name": new_name})
        await manager.operations.run(
            "machined.image_ops:clone", image=img.to_dict(), new_name=new_name, read_only=read_only
        )

    async def mark_read_only(call: Call, read_only: bool) -> None:
        details = {"image": img.name, "verb": "mark_read_only", "read_only": "1" if read_only else "0"}
        await authorize(call, "manage-images", details)
        await asyncio.to_thread(image_ops.mark_read_only, img.to_dict(), read_only)

    async def set_limit(call: Call, limit: int) -> None:
        _check_limit(limit)
        await authorize(call, "manage-images", {"machine": img.name, "verb": "set_limit"})
        await asyncio.to_thread(image_ops.set_limit, img.to_dict(), limit)

    async def get_hostname(call: Call) -> list:
        return [(await _metadata(img))["hostname"]]

    async def get_machine_id(call: Call) -> list:
        machine_id = (await _metadata(img))["machine_id"]
        return [bytes.fromhex(machine_id) if machine_id else b""]

    async def get_machine_info(call: Call) -> list:
        return [(await _metadata(img))["machine_info"]]

    async def get_os_release(call: Call) -> list:
        return [(await _metadata(img))["os_release"]]

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
    async def handler(call: Call, name: str, *args: object) -> list | None:
        _check_name(name)
        img = await _find(name)
        if img is None:
            raise _no_such_image(name)
        return await image_methods(manager, img)[target](call, *args)

    return handler


def image_manager_methods(manager: MachineManager) -> dict[str, Handler]:
    """Manager methods about images (ListImages, GetImage, RemoveImage...), by member name."""

    async def list_images(call: Call) -> list:
        found = await asyncio.to_thread(pool.discover)
        return [
            [
                (i.name, i.type, i.read_only, i.crtime, i.mtime, i.usage, i.object_path)
                for i in found.values()
            ]
        ]

    async def get_image(call: Call, name: str) -> list:
        if await _find(name) is None:
            raise _no_such_image(name)
        return [image_object_path(name)]

    async def set_pool_limit(call: Call, limit: int) -> None:
        _check_limit(limit)
        await authorize(call, "manage-machines", {"verb": "set_pool_limit"})
        await asyncio.to_thread(image_ops.set_pool_limit, limit)

    async def clean_pool(call: Call, mode: str) -> list:
        _check_operation_slot(manager)
        if mode not in ("all", "hidden"):
            raise BusError(errors.INVALID_ARGS, f"Unknown mode '{mode}'.")
        await authorize(call, "manage-machines", {"verb": "clean_pool", "mode": mode})
        removed = await manager.operations.run("machined.image_ops:clean_pool", mode=mode)
        return [[(name, size) for name, size in removed]]

    methods: dict[str, Handler] = {
        "ListImages": list_images,
        "GetImage": get_image,
        "SetPoolLimit": set_pool_limit,
        "CleanPool": clean_pool,
    }
    for name, target in IMAGE_REDIRECTS.items():
        methods[name] = _redirect(manager, target)
    return methods


async def image_children(manager: MachineManager) -> list[str]:
    """Escaped names of the images, the child nodes of /org/freedesktop/machine1/image.

    A fresh scan each time, as upstream's node enumerator does, in a thread.
    """
    names = await asyncio.to_thread(pool.discover)
    return sorted(bus_label_escape(name) for name in names)


async def image_object(manager: MachineManager, element: str, call: Call) -> BusObject | None:
    """The object at /org/freedesktop/machine1/image/<element>, or None."""
    img = await _find(bus_label_unescape(element))
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
            (i, "ReadOnly"): lambda: img.read_only,
            (i, "CreationTimestamp"): lambda: img.crtime,
            (i, "ModificationTimestamp"): lambda: img.mtime,
            (i, "Usage"): lambda: img.usage,
            (i, "Limit"): lambda: img.limit,
            (i, "UsageExclusive"): lambda: img.usage_exclusive,
            (i, "LimitExclusive"): lambda: img.limit_exclusive,
        },
    )

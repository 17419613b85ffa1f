"""The image pool's use cases, as the bus adapter calls them (no D-Bus types here).

Each checks its arguments, has the caller authorized (the adapter passes an
:data:`Authorize` that asks polkit) and does the work off the event loop, in
upstream's order and with its errors. Where the work runs:

- in a child (:mod:`machined.children`), at most 64 at once with the machines' copies (``Operations``,
  then ``LimitsExceeded``): Remove, Clone and CleanPool (long; no deadline, as
  upstream), and the metadata of disk images (systemd-dissect needs loop devices
  and mounts; with a deadline);
- in a thread: discovery and lookups, Rename, MarkReadOnly, the limits, the
  metadata of directory trees, and the pool's usage and limit (btrfs quota).
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Awaitable, Callable
from typing import Any

from machined import errors, personality
from machined.children import jobs
from machined.children.limits import Operations
from machined.errors import BusError
from machined.images import metadata, pool
from machined.images import operations as ops
from machined.images.pool import Image
from machined.limits import LIMITS_EXCEEDED

# (polkit action id without its prefix, details) → returns if the caller may, raises if not.
Authorize = Callable[[str, dict[str, str]], Awaitable[None]]

INT64_MAX = 2**63 - 1
UINT64_MAX = pool.UINT64_MAX
# Reading a disk image's metadata dissects it in a child; a wedged image costs its caller this long.
METADATA_TIMEOUT = 20.0
CLEAN_MODES = ("all", "hidden")


def check_name(name: str) -> None:
    """An image name from a caller (an image to look up, or a new name), checked once, as upstream."""
    if not pool.image_name_is_valid(name):
        raise BusError(errors.INVALID_ARGS, f"Image name '{name}' is invalid.")


def check_limit(limit: int) -> None:
    if limit > INT64_MAX and limit != UINT64_MAX:
        raise BusError(errors.INVALID_ARGS, "New limit out of range")


def no_such_image(name: str) -> BusError:
    return BusError(errors.NO_SUCH_IMAGE, f"No image '{name}' known")


class ImageService:
    """The use cases, bound to the daemon's cap on long operations and to its pool path."""

    def __init__(self, operations: Operations, pool_path: str = pool.POOL_PATH) -> None:
        self.operations = operations
        self.pool_path = pool_path

    # ----- lookups -----------------------------------------------------------------------

    async def discover(self) -> dict[str, Image]:
        """Every image by name (a fresh scan each time, as upstream)."""
        return await asyncio.to_thread(pool.discover)

    async def find(self, name: str) -> Image | None:
        return await asyncio.to_thread(pool.find, name)

    async def get(self, name: str) -> Image:
        """The image *name* (GetImage: an invalid name is just unknown)."""
        img = await self.find(name)
        if img is None:
            raise no_such_image(name)
        return img

    async def lookup(self, name: str) -> Image:
        """The image *name* a Manager method names (``RemoveImage(name)``…): checked, then found."""
        check_name(name)
        return await self.get(name)

    # ----- operations --------------------------------------------------------------------

    def _check_operation_slot(self) -> None:
        """Upstream refuses a 65th operation before it even asks polkit."""
        if self.operations.running >= self.operations.limit:
            raise BusError(LIMITS_EXCEEDED, "Too many ongoing operations.")

    async def remove(self, img: Image, authorize: Authorize) -> None:
        self._check_operation_slot()
        await authorize("manage-images", {"image": img.name, "verb": "remove"})
        await self.operations.run(jobs.REMOVE_IMAGE, image=img.fields(), v262=personality.is_262())

    async def rename(self, img: Image, new_name: str, authorize: Authorize) -> Image:
        """Rename *img*; the image as renamed (what a following change applies to)."""
        check_name(new_name)
        await authorize("manage-images", {"image": img.name, "verb": "rename", "new_name": new_name})
        return await asyncio.to_thread(ops.rename, img, new_name)

    async def clone(self, img: Image, new_name: str, read_only: bool, authorize: Authorize) -> None:
        self._check_operation_slot()
        check_name(new_name)
        await authorize("manage-images", {"image": img.name, "verb": "clone", "new_name": new_name})
        await self.operations.run(jobs.CLONE_IMAGE, image=img.fields(), new_name=new_name,
                                  read_only=read_only, v262=personality.is_262())  # fmt: skip

    async def mark_read_only(self, img: Image, read_only: bool, authorize: Authorize) -> None:
        details = {"image": img.name, "verb": "mark_read_only", "read_only": "1" if read_only else "0"}
        await authorize("manage-images", details)
        await asyncio.to_thread(ops.mark_read_only, img, read_only)

    async def set_limit(self, img: Image, limit: int, authorize: Authorize) -> None:
        check_limit(limit)
        await authorize("manage-images", {"machine": img.name, "verb": "set_limit"})  # sic, upstream
        await asyncio.to_thread(ops.set_limit, img, limit)

    async def set_pool_limit(self, limit: int, authorize: Authorize) -> None:
        check_limit(limit)
        await authorize("manage-machines", {"verb": "set_pool_limit"})
        await asyncio.to_thread(ops.set_pool_limit, limit)

    async def clean_pool(self, mode: str, authorize: Authorize) -> list[tuple[str, int]]:
        """Remove the pool's images (``all``) or its hidden ones; (name, exclusive usage) of each removed."""
        self._check_operation_slot()
        if mode not in CLEAN_MODES:
            raise BusError(errors.INVALID_ARGS, f"Unknown mode '{mode}'.")
        await authorize("manage-machines", {"verb": "clean_pool", "mode": mode})
        removed = await self.operations.run(jobs.CLEAN_POOL, mode=mode, v262=personality.is_262())
        return [(name, size) for name, size in removed]

    # ----- reading -----------------------------------------------------------------------

    async def metadata(self, img: Image) -> dict[str, Any]:
        """Hostname, machine ID (hex), machine-info and os-release of an image: trees in a thread,
        disk images in a child with a deadline, counted as an operation."""
        try:
            if img.type == "mstack":  # 262 reads nothing from a stack of layers
                raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
            if img.is_tree:
                return await asyncio.to_thread(metadata.read_metadata, img)
            read: dict[str, Any] = await self.operations.run(jobs.READ_METADATA, timeout=METADATA_TIMEOUT, shared=True,
                                                             image=img.fields())  # fmt: skip
            return read
        except OSError as e:
            code = e.errno or errno.EIO
            raise BusError(
                errors.errno_error_name(code), f"Failed to read image metadata: {os.strerror(code)}"
            ) from None

    async def pool_usage(self) -> int:
        """Bytes the pool references (btrfs quota), UINT64_MAX if unknown; read in a thread."""
        return (await asyncio.to_thread(pool.pool_quota, self.pool_path))[0]

    async def pool_limit(self) -> int:
        """The pool's quota limit in bytes, UINT64_MAX if none or unknown; read in a thread."""
        return (await asyncio.to_thread(pool.pool_quota, self.pool_path))[1]

"""D-Bus adapters of the image pool: Image objects and the Manager's image methods.

Placeholder until the image pool lands.
"""

from __future__ import annotations

from machined.bus.objects import BusObject, Call, Handler
from machined.manager import MachineManager


def image_manager_methods(manager: MachineManager) -> dict[str, Handler]:
    """Manager methods about images (ListImages, GetImage, RemoveImage...), by member name."""
    return {}


def image_children(manager: MachineManager) -> list[str]:
    """Escaped names of the images, the child nodes of /org/freedesktop/machine1/image."""
    return []


async def image_object(manager: MachineManager, element: str, call: Call) -> BusObject | None:
    """The object at /org/freedesktop/machine1/image/<element>, or None."""
    return None

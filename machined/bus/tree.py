"""The object tree of org.freedesktop.machine1: which path is which object.

Machine objects are resolved on demand from the path, like sd-bus fallback
vtables: ``/org/freedesktop/machine1/machine/<escaped name>`` exists exactly
while the machine is registered, and ``…/machine/self`` is the caller's own
machine.
"""

from __future__ import annotations

from machined.access import MachineAccess
from machined.bus import adapters, images
from machined.bus.logcontrol import LogControl
from machined.bus.objects import BusObject, Call
from machined.manager import MachineManager
from machined.naming import (
    IMAGE_PATH_PREFIX,
    MACHINE_PATH_PREFIX,
    bus_label_escape,
    bus_label_unescape,
)

MANAGER_PATH = "/org/freedesktop/machine1"
LOG_CONTROL_PATH = "/org/freedesktop/LogControl1"


class MachinedTree:
    """Resolves object paths to :class:`BusObject` views of the manager's state."""

    def __init__(self, manager: MachineManager, log_control: LogControl) -> None:
        self.manager = manager
        self.access = MachineAccess(manager)
        self._manager_object = adapters.manager_object(manager, self.access)
        self._manager_object.children = ["image", "machine"]
        self._log_control_object = log_control.bus_object()
        self._static = {
            "/": BusObject(children=["org"]),
            "/org": BusObject(children=["freedesktop"]),
            "/org/freedesktop": BusObject(children=["LogControl1", "machine1"]),
        }

    async def lookup(self, path: str, call: Call) -> BusObject | None:
        if path == MANAGER_PATH:
            return self._manager_object
        if path == LOG_CONTROL_PATH:
            return self._log_control_object
        if path in self._static:
            return self._static[path]
        if path == MACHINE_PATH_PREFIX:
            labels = sorted(bus_label_escape(m.name) for m in self.manager.machines())
            return BusObject(children=labels)
        if path == IMAGE_PATH_PREFIX:
            return BusObject(children=await images.image_children(self.manager))
        parent, _, element = path.rpartition("/")
        if parent == IMAGE_PATH_PREFIX and element:
            return await images.image_object(self.manager, element, call)
        if parent == MACHINE_PATH_PREFIX and element:
            if element == "self":
                creds = await call.credentials()
                machine = self.manager.find_by_pid(creds.pid)
            else:
                machine = self.manager.registry.get(bus_label_unescape(element))
            return adapters.machine_object(self.manager, self.access, machine) if machine else None
        return None

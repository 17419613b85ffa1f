"""The object tree of org.freedesktop.machine1: which path is which object.

Machine objects are resolved on demand from the path, like sd-bus fallback
vtables: ``/org/freedesktop/machine1/machine/<escaped name>`` exists exactly
while the machine is registered, and ``…/machine/self`` is the caller's own
machine.
"""

from __future__ import annotations

from machined.dbus import adapters
from machined.dbus.logcontrol import LogControl
from machined.dbus.objects import LATER, BusObject, Call, Later
from machined.inside.access import MachineAccess
from machined.machine import Machine
from machined.manager import MachineManager
from machined.naming import (
    IMAGE_PATH_PREFIX,
    MACHINE_PATH_PREFIX,
    bus_label_escape,
    bus_label_unescape,
)

MANAGER_PATH = "/org/freedesktop/machine1"
SELF_PATH = MACHINE_PATH_PREFIX + "/self"
LOG_CONTROL_PATH = "/org/freedesktop/LogControl1"


class MachinedTree:
    """Resolves object paths to :class:`BusObject` views of the manager's state."""

    def __init__(self, manager: MachineManager, log_control: LogControl) -> None:
        self.manager = manager
        self.access = MachineAccess(manager)
        # Handler tables are built once; a machine's object is a view on it over them.
        machine_methods = adapters.machine_handlers(manager, self.access)
        self._machine_methods = adapters.machine_object_methods(machine_methods)
        self._manager_object = adapters.manager_object(manager, self.access, machine_methods)
        self._manager_object.children = ["image", "machine"]
        self._log_control_object = log_control.bus_object()
        self._static = {
            "/": BusObject(children=["org"]),
            "/org": BusObject(children=["freedesktop"]),
            "/org/freedesktop": BusObject(children=["LogControl1", "machine1"]),
        }

    def lookup_now(self, path: str, call: Call) -> BusObject | None | Later:
        """The object at *path* if that can be told without waiting, else LATER (images, or
        ``machine/self`` of a caller whose credentials are not known yet)."""
        if path == MANAGER_PATH:
            return self._manager_object
        if path == SELF_PATH:  # before a machine named "self", as upstream
            creds = call.known_credentials()
            if creds is None:
                return LATER
            return self._machine_object(self.manager.find_by_pid(creds.pid))
        machine = self.manager.registry.by_path(path)
        if machine is not None:
            return self._machine_object(machine)
        parent, _, element = path.rpartition("/")
        if parent == MACHINE_PATH_PREFIX and element:  # escaped otherwise than we escape
            return self._machine_object(self.manager.registry.get(bus_label_unescape(element)))
        if path == LOG_CONTROL_PATH:
            return self._log_control_object
        if path in self._static:
            return self._static[path]
        if path == MACHINE_PATH_PREFIX:
            labels = sorted(bus_label_escape(m.name) for m in self.manager.machines())
            return BusObject(children=labels)
        if path == IMAGE_PATH_PREFIX or parent == IMAGE_PATH_PREFIX:
            return LATER
        return None

    async def lookup(self, path: str, call: Call) -> BusObject | None:
        obj = self.lookup_now(path, call)
        if not isinstance(obj, Later):
            return obj
        if path == SELF_PATH:
            creds = await call.credentials()
            return self._machine_object(self.manager.find_by_pid(creds.pid))
        from machined.dbus import images  # the image pool is loaded on first use

        if path == IMAGE_PATH_PREFIX:
            return BusObject(children=await images.image_children(self.manager))
        return await images.image_object(self.manager, path.rpartition("/")[2], call)

    def _machine_object(self, machine: Machine | None) -> BusObject | None:
        if machine is None:
            return None
        return adapters.machine_object(self.manager, self.access, machine, self._machine_methods)

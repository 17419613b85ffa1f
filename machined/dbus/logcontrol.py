"""org.freedesktop.LogControl1: read and change the daemon's log level at run time."""

from __future__ import annotations

import logging

from machined import errors
from machined.dbus.introspection import load_interface
from machined.dbus.objects import BusObject, Call
from machined.errors import BusError

IFACE = "org.freedesktop.LogControl1"

# syslog level names as systemd spells them ↔ Python logging levels.
LEVELS = {
    "emerg": logging.CRITICAL,
    "alert": logging.CRITICAL,
    "crit": logging.CRITICAL,
    "err": logging.ERROR,
    "warning": logging.WARNING,
    "notice": logging.INFO,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}
TARGETS = ("console", "journal", "kmsg", "journal-or-kmsg", "syslog", "syslog-or-kmsg", "auto", "null")


class LogControl:
    """Log level and target as clients (``systemctl service-log-level``) see them."""

    def __init__(self, identifier: str, target: str = "auto", level: str = "info") -> None:
        self.identifier = identifier
        self.target = target
        self.level = level

    async def _require_root(self, call: Call, prop: str) -> None:
        if (await call.credentials()).uid != 0:
            raise BusError(errors.ACCESS_DENIED, f"Access to {IFACE}.{prop}() not permitted.")

    def bus_object(self) -> BusObject:
        async def set_level(call: Call, value: str) -> None:
            await self._require_root(call, "LogLevel")
            if value not in LEVELS:
                raise BusError(errors.INVALID_ARGS, f'Invalid log level "{value}"')
            self.level = value
            logging.getLogger().setLevel(LEVELS[value])

        async def set_target(call: Call, value: str) -> None:
            await self._require_root(call, "LogTarget")
            if value not in TARGETS:
                raise BusError(errors.INVALID_ARGS, f'Invalid log target "{value}"')
            self.target = value

        return BusObject(
            interfaces=[load_interface(IFACE)],
            properties={
                (IFACE, "LogLevel"): lambda: self.level,
                (IFACE, "LogTarget"): lambda: self.target,
                (IFACE, "SyslogIdentifier"): lambda: self.identifier,
            },
            setters={(IFACE, "LogLevel"): set_level, (IFACE, "LogTarget"): set_target},
        )

"""Errors a client sees, each carrying the D-Bus error name real machined uses.

Domain code raises :class:`BusError` (or lets an ``OSError`` escape); the bus
adapter is the only place that turns them into D-Bus error replies.
"""

from __future__ import annotations

import errno
import os

NO_SUCH_MACHINE = "org.freedesktop.machine1.NoSuchMachine"
NO_SUCH_IMAGE = "org.freedesktop.machine1.NoSuchImage"
NO_MACHINE_FOR_PID = "org.freedesktop.machine1.NoMachineForPID"
MACHINE_EXISTS = "org.freedesktop.machine1.MachineExists"
NO_PRIVATE_NETWORKING = "org.freedesktop.machine1.NoPrivateNetworking"
NO_SUCH_USER_MAPPING = "org.freedesktop.machine1.NoSuchUserMapping"
NO_SUCH_GROUP_MAPPING = "org.freedesktop.machine1.NoSuchGroupMapping"
JOB_FAILED = "org.freedesktop.systemd1.JobFailed"

_DBUS = "org.freedesktop.DBus.Error."
FAILED = _DBUS + "Failed"
INVALID_ARGS = _DBUS + "InvalidArgs"
NOT_SUPPORTED = _DBUS + "NotSupported"
ACCESS_DENIED = _DBUS + "AccessDenied"
UNKNOWN_OBJECT = _DBUS + "UnknownObject"
UNKNOWN_METHOD = _DBUS + "UnknownMethod"
UNKNOWN_INTERFACE = _DBUS + "UnknownInterface"
UNKNOWN_PROPERTY = _DBUS + "UnknownProperty"
PROPERTY_READ_ONLY = _DBUS + "PropertyReadOnly"
NO_REPLY = _DBUS + "NoReply"
INTERACTIVE_AUTHORIZATION_REQUIRED = _DBUS + "InteractiveAuthorizationRequired"

# sd-bus's errno → error-name table (bus-error.c); the rest is System.Error.<NAME>.
_ERRNO_NAMES = {
    errno.EPERM: "AccessDenied",
    errno.EACCES: "AccessDenied",
    errno.EINVAL: "InvalidArgs",
    errno.ESRCH: "UnixProcessIdUnknown",
    errno.ENOENT: "FileNotFound",
    errno.EEXIST: "FileExists",
    errno.ETIMEDOUT: "Timeout",
    errno.EIO: "IOError",
    errno.ENOMEM: "NoMemory",
    errno.ENOBUFS: "LimitsExceeded",
    errno.EOPNOTSUPP: "NotSupported",
    errno.EADDRINUSE: "AddressInUse",
    errno.EBADMSG: "InconsistentMessage",
    errno.ENOTCONN: "Disconnected",
    errno.ECONNRESET: "Disconnected",
    errno.ECONNREFUSED: "Disconnected",
    errno.ESHUTDOWN: "Disconnected",
    errno.ENXIO: "FileNotFound",
    errno.ENOSYS: "UnknownMethod",
    errno.ENOMEDIUM: "NoNetwork",
    errno.EHOSTDOWN: "NoServer",
    errno.ELOOP: "Failed",
}


def errno_error_name(code: int) -> str:
    """The D-Bus error name sd-bus gives a handler failing with *code*."""
    if code in _ERRNO_NAMES:
        return _DBUS + _ERRNO_NAMES[code]
    return "System.Error." + errno.errorcode.get(code, "EIO")


class BusError(Exception):
    """A failure with a D-Bus error name and message, as the client must see it."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = message

    @classmethod
    def from_errno(cls, code: int, message: str | None = None) -> "BusError":
        return cls(errno_error_name(code), message if message is not None else os.strerror(code))

    def __repr__(self) -> str:
        return f"BusError({self.name!r}, {self.message!r})"


def no_such_machine(name: str) -> BusError:
    return BusError(NO_SUCH_MACHINE, f"No machine '{name}' known")


def not_supported() -> BusError:
    return BusError.from_errno(errno.EOPNOTSUPP)

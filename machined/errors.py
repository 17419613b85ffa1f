"""Errors a client sees, with the names real machined uses on each transport.

Domain code raises :class:`BusError` (or lets an ``OSError`` escape). It carries the
D-Bus error name and message machined 252 answers; :func:`varlink_error` derives
what machined 262 answers over varlink for the same failure: its own error name
(``io.systemd.Machine.NoSuchMachine``), ``org.varlink.service.InvalidParameter``
naming the offending field, ``PermissionDenied``, or ``io.systemd.System`` with
the errno. The front-ends (``machined.dbus``, ``machined.varlink``) are the only
places that turn errors into replies.
"""

from __future__ import annotations

import errno
import os
from typing import Any

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

# What sd-bus 252 answers for a handler failing with an errno (sd_bus_error_set_errno(),
# bus-error.c): a few errnos have a fixed org.freedesktop.DBus.Error name ...
_ERRNO_CONST = {
    errno.ENOMEM: "NoMemory",
    errno.EPERM: "AccessDenied",
    errno.EACCES: "AccessDenied",
    errno.EINVAL: "InvalidArgs",
    errno.ESRCH: "UnixProcessIdUnknown",
    errno.ENOENT: "FileNotFound",
    errno.EEXIST: "FileExists",
    errno.ETIMEDOUT: "Timeout",
    errno.ETIME: "Timeout",
    errno.EIO: "IOError",
    errno.ENETRESET: "Disconnected",
    errno.ECONNABORTED: "Disconnected",
    errno.ECONNRESET: "Disconnected",
    errno.EOPNOTSUPP: "NotSupported",
    errno.EADDRNOTAVAIL: "BadAddress",
    errno.ENOBUFS: "LimitsExceeded",
    errno.EADDRINUSE: "AddressInUse",
    errno.EBADMSG: "InconsistentMessage",
}

# ... every other one is System.Error.<its name in systemd's errno list>, and an errno
# without a name (41, 58, >133 on Linux) is org.freedesktop.DBus.Error.Failed.
# Linux's errno names from 1 on, "-" where no errno has that number.
_ERRNO_LIST = """
    EPERM ENOENT ESRCH EINTR EIO ENXIO E2BIG ENOEXEC EBADF ECHILD EAGAIN ENOMEM EACCES EFAULT
    ENOTBLK EBUSY EEXIST EXDEV ENODEV ENOTDIR EISDIR EINVAL ENFILE EMFILE ENOTTY ETXTBSY EFBIG
    ENOSPC ESPIPE EROFS EMLINK EPIPE EDOM ERANGE EDEADLK ENAMETOOLONG ENOLCK ENOSYS ENOTEMPTY
    ELOOP - ENOMSG EIDRM ECHRNG EL2NSYNC EL3HLT EL3RST ELNRNG EUNATCH ENOCSI EL2HLT EBADE EBADR
    EXFULL ENOANO EBADRQC EBADSLT - EBFONT ENOSTR ENODATA ETIME ENOSR ENONET ENOPKG EREMOTE
    ENOLINK EADV ESRMNT ECOMM EPROTO EMULTIHOP EDOTDOT EBADMSG EOVERFLOW ENOTUNIQ EBADFD EREMCHG
    ELIBACC ELIBBAD ELIBSCN ELIBMAX ELIBEXEC EILSEQ ERESTART ESTRPIPE EUSERS ENOTSOCK
    EDESTADDRREQ EMSGSIZE EPROTOTYPE ENOPROTOOPT EPROTONOSUPPORT ESOCKTNOSUPPORT EOPNOTSUPP
    EPFNOSUPPORT EAFNOSUPPORT EADDRINUSE EADDRNOTAVAIL ENETDOWN ENETUNREACH ENETRESET
    ECONNABORTED ECONNRESET ENOBUFS EISCONN ENOTCONN ESHUTDOWN ETOOMANYREFS ETIMEDOUT
    ECONNREFUSED EHOSTDOWN EHOSTUNREACH EALREADY EINPROGRESS ESTALE EUCLEAN ENOTNAM ENAVAIL
    EISNAM EREMOTEIO EDQUOT ENOMEDIUM EMEDIUMTYPE ECANCELED ENOKEY EKEYEXPIRED EKEYREVOKED
    EKEYREJECTED EOWNERDEAD ENOTRECOVERABLE ERFKILL EHWPOISON
""".split()


def errno_name(code: int) -> str | None:
    """systemd's name of errno *code* ("ELOOP"), None for a number no errno has."""
    code = abs(code)
    if 1 <= code <= len(_ERRNO_LIST) and _ERRNO_LIST[code - 1] != "-":
        return _ERRNO_LIST[code - 1]
    return None


def errno_error_name(code: int) -> str:
    """The D-Bus error name sd-bus 252 gives a handler failing with *code*."""
    code = abs(code)
    if code in _ERRNO_CONST:
        return _DBUS + _ERRNO_CONST[code]
    name = errno_name(code)
    return "System.Error." + name if name else FAILED


class BusError(Exception):
    """A failure as the client must see it: a D-Bus error name and message; for varlink,
    optionally the input field it is about (*parameter*), the errno it stands for, or an
    explicit varlink error (*varlink*: name and parameters) where 262 answers differently."""

    def __init__(self, name: str, message: str, *, parameter: str | None = None, errno_code: int = 0,
                 varlink: tuple[str, dict[str, Any]] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.name = name
        self.message = message
        self.parameter = parameter
        self.errno = errno_code
        self.varlink = varlink

    @classmethod
    def from_errno(cls, code: int, message: str | None = None) -> BusError:
        code = abs(code)
        return cls(errno_error_name(code), message if message is not None else os.strerror(code), errno_code=code)

    def __repr__(self) -> str:
        return f"BusError({self.name!r}, {self.message!r})"


def no_such_machine(name: str) -> BusError:
    return BusError(NO_SUCH_MACHINE, f"No machine '{name}' known")


def not_supported() -> BusError:
    return BusError.from_errno(errno.EOPNOTSUPP)


# ----- varlink ---------------------------------------------------------------------------------

VARLINK_MACHINE = "io.systemd.Machine."
VARLINK_IMAGE = "io.systemd.MachineImage."
VL_NO_SUCH_MACHINE = VARLINK_MACHINE + "NoSuchMachine"
VL_MACHINE_EXISTS = VARLINK_MACHINE + "MachineExists"
VL_NO_PRIVATE_NETWORKING = VARLINK_MACHINE + "NoPrivateNetworking"
VL_NO_OS_RELEASE = VARLINK_MACHINE + "NoOSReleaseInformation"
VL_NO_UID_SHIFT = VARLINK_MACHINE + "NoUIDShift"
VL_NOT_AVAILABLE = VARLINK_MACHINE + "NotAvailable"
VL_NOT_SUPPORTED = VARLINK_MACHINE + "NotSupported"
VL_NO_IPC = VARLINK_MACHINE + "NoIPC"
VL_NO_SUCH_USER = VARLINK_MACHINE + "NoSuchUser"
VL_NO_SUCH_GROUP = VARLINK_MACHINE + "NoSuchGroup"
VL_USER_IN_HOST_RANGE = VARLINK_MACHINE + "UserInHostRange"
VL_GROUP_IN_HOST_RANGE = VARLINK_MACHINE + "GroupInHostRange"
VL_NO_SUCH_IMAGE = VARLINK_IMAGE + "NoSuchImage"
VL_TOO_MANY_OPERATIONS = VARLINK_IMAGE + "TooManyOperations"
VL_IMAGE_NOT_SUPPORTED = VARLINK_IMAGE + "NotSupported"
VL_INVALID_PARAMETER = "org.varlink.service.InvalidParameter"
VL_PERMISSION_DENIED = "org.varlink.service.PermissionDenied"
VL_EXPECTED_MORE = "org.varlink.service.ExpectedMore"
VL_METHOD_NOT_FOUND = "org.varlink.service.MethodNotFound"
VL_INTERFACE_NOT_FOUND = "org.varlink.service.InterfaceNotFound"
VL_INTERACTIVE_AUTHENTICATION_REQUIRED = "io.systemd.InteractiveAuthenticationRequired"
VL_SYSTEM = "io.systemd.System"

# D-Bus names with a varlink counterpart of their own (no parameters).
_VARLINK_BY_NAME = {
    NO_SUCH_MACHINE: VL_NO_SUCH_MACHINE,
    NO_MACHINE_FOR_PID: VL_NO_SUCH_MACHINE,
    MACHINE_EXISTS: VL_MACHINE_EXISTS,
    NO_PRIVATE_NETWORKING: VL_NO_PRIVATE_NETWORKING,
    NO_SUCH_IMAGE: VL_NO_SUCH_IMAGE,
    ACCESS_DENIED: VL_PERMISSION_DENIED,
    INTERACTIVE_AUTHORIZATION_REQUIRED: VL_INTERACTIVE_AUTHENTICATION_REQUIRED,
}
_ERRNO_BY_CONST = {_DBUS + name: code for code, name in _ERRNO_CONST.items() if code not in (errno.EACCES, errno.ETIME)}


def errno_of(error: BusError) -> int:
    """The errno a D-Bus error stands for (sd-bus's mapping backwards); EIO when none."""
    if error.errno:
        return error.errno
    if error.name in _ERRNO_BY_CONST:
        return _ERRNO_BY_CONST[error.name]
    if error.name.startswith("System.Error."):
        name = error.name.removeprefix("System.Error.")
        if name in _ERRNO_LIST:
            return _ERRNO_LIST.index(name) + 1
    return errno.EIO


def system_error(code: int) -> tuple[str, dict[str, Any]]:
    """``io.systemd.System``: what sd-varlink answers for a method failing with an errno."""
    code = abs(code)
    params: dict[str, Any] = {"origin": "linux", "errno": code}
    name = errno_name(code)
    if name:
        params["errnoName"] = name
    return VL_SYSTEM, params


def varlink_error(error: BusError) -> tuple[str, dict[str, Any]]:
    """(error name, parameters) machined 262 answers over varlink for *error*."""
    if error.varlink is not None:
        return error.varlink
    if error.parameter is not None:
        return VL_INVALID_PARAMETER, {"parameter": error.parameter}
    name = _VARLINK_BY_NAME.get(error.name)
    if name is not None:
        return name, {}
    if error.name.startswith("org.freedesktop.PolicyKit1."):
        return VL_PERMISSION_DENIED, {}
    return system_error(errno_of(error))

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

"""errno → D-Bus error, as sd-bus 252 answers for a handler that fails with an errno."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno

import pytest

from machined import errors
from machined.errors import BusError, errno_error_name


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (errno.EPERM, "org.freedesktop.DBus.Error.AccessDenied"),
        (errno.EACCES, "org.freedesktop.DBus.Error.AccessDenied"),
        (errno.ENOENT, "org.freedesktop.DBus.Error.FileNotFound"),
        (errno.ESRCH, "org.freedesktop.DBus.Error.UnixProcessIdUnknown"),
        (errno.EINVAL, "org.freedesktop.DBus.Error.InvalidArgs"),
        (errno.ETIME, "org.freedesktop.DBus.Error.Timeout"),
        (errno.EADDRNOTAVAIL, "org.freedesktop.DBus.Error.BadAddress"),
        (errno.ECONNABORTED, "org.freedesktop.DBus.Error.Disconnected"),
        (errno.EOPNOTSUPP, "org.freedesktop.DBus.Error.NotSupported"),
        # not in sd-bus's fixed table: System.Error.<name>
        (errno.ENXIO, "System.Error.ENXIO"),
        (errno.ELOOP, "System.Error.ELOOP"),
        (errno.ENOSYS, "System.Error.ENOSYS"),
        (errno.ENOTCONN, "System.Error.ENOTCONN"),
        (errno.ECONNREFUSED, "System.Error.ECONNREFUSED"),
        (errno.EHOSTDOWN, "System.Error.EHOSTDOWN"),
        (errno.ENOMEDIUM, "System.Error.ENOMEDIUM"),
        (errno.ENOTTY, "System.Error.ENOTTY"),
        (35, "System.Error.EDEADLK"),  # not EDEADLOCK, its alias
        (133, "System.Error.EHWPOISON"),
        # numbers no errno has
        (41, "org.freedesktop.DBus.Error.Failed"),
        (58, "org.freedesktop.DBus.Error.Failed"),
        (134, "org.freedesktop.DBus.Error.Failed"),
        (4096, "org.freedesktop.DBus.Error.Failed"),
    ],
)
def test_error_names(code: int, name: str) -> None:
    assert errno_error_name(code) == name
    assert errno_error_name(-code) == name


def test_message_is_strerror() -> None:
    e = BusError.from_errno(errno.ENXIO)
    assert (e.name, e.message) == ("System.Error.ENXIO", "No such device or address")
    assert errors.errno_name(errno.ELOOP) == "ELOOP" and errors.errno_name(41) is None


class _SdBusError(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("message", ctypes.c_char_p), ("need_free", ctypes.c_int)]


def _libsystemd() -> ctypes.CDLL:
    path = ctypes.util.find_library("systemd")
    if path is None:
        pytest.skip("libsystemd not installed")
    lib = ctypes.CDLL(path)
    lib.sd_bus_error_set_errno.argtypes = [ctypes.POINTER(_SdBusError), ctypes.c_int]
    lib.sd_bus_error_free.argtypes = [ctypes.POINTER(_SdBusError)]
    return lib


def test_every_errno_as_the_installed_sd_bus_answers() -> None:
    """The whole table against sd_bus_error_set_errno() of the host's libsystemd (252 on Debian 12)."""
    lib = _libsystemd()
    differences = []
    for code in range(1, 300):
        e = _SdBusError()
        lib.sd_bus_error_set_errno(ctypes.byref(e), code)
        expected = (e.name.decode(), e.message.decode())
        lib.sd_bus_error_free(ctypes.byref(e))
        ours = BusError.from_errno(code)
        if (ours.name, ours.message) != expected:
            differences.append((code, expected, (ours.name, ours.message)))
    assert differences == []

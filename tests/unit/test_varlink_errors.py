"""One error, two transports: the D-Bus name 252 answers and the varlink error 262 answers."""

from __future__ import annotations

import errno

import pytest

from machined import errors
from machined.errors import BusError, varlink_error
from machined.registration import validate_kill, validate_registration


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (errors.no_such_machine("x"), ("io.systemd.Machine.NoSuchMachine", {})),
        (BusError(errors.NO_MACHINE_FOR_PID, "PID 5 does not belong to any known machine"),
         ("io.systemd.Machine.NoSuchMachine", {})),
        (BusError(errors.MACHINE_EXISTS, "Machine 'x' already exists"), ("io.systemd.Machine.MachineExists", {})),
        (BusError(errors.NO_SUCH_IMAGE, "No image 'x' known"), ("io.systemd.MachineImage.NoSuchImage", {})),
        (BusError(errors.ACCESS_DENIED, "Permission denied"), ("org.varlink.service.PermissionDenied", {})),
        (BusError(errors.INTERACTIVE_AUTHORIZATION_REQUIRED, "Interactive authentication required."),
         ("io.systemd.InteractiveAuthenticationRequired", {})),
        (BusError("org.freedesktop.PolicyKit1.Error.Failed", "x"), ("org.varlink.service.PermissionDenied", {})),
        (errors.not_supported(), ("io.systemd.System", {"origin": "linux", "errno": 95, "errnoName": "EOPNOTSUPP"})),
        (BusError.from_errno(errno.ENXIO, "Failed to determine unit of process 5 : No such device or address"),
         ("io.systemd.System", {"origin": "linux", "errno": 6, "errnoName": "ENXIO"})),
        # a D-Bus name alone still tells the errno
        (BusError("System.Error.ELOOP", "x"), ("io.systemd.System", {"origin": "linux", "errno": 40, "errnoName": "ELOOP"})),
        (BusError(errors.INVALID_ARGS, "x"), ("io.systemd.System", {"origin": "linux", "errno": 22, "errnoName": "EINVAL"})),
        (BusError(errors.FAILED, "Child died abnormally."), ("io.systemd.System", {"origin": "linux", "errno": 5,
                                                                                  "errnoName": "EIO"})),
        # explicit varlink answers win
        (BusError(errors.FAILED, "x", varlink=("io.systemd.Machine.NoIPC", {})), ("io.systemd.Machine.NoIPC", {})),
    ],
)  # fmt: skip
def test_varlink_error_of(error: BusError, expected: tuple) -> None:
    assert varlink_error(error) == expected


def test_errno_errors_keep_their_dbus_names() -> None:
    e = BusError.from_errno(-errno.ESRCH)
    assert (e.name, e.message, e.errno) == (
        "org.freedesktop.DBus.Error.UnixProcessIdUnknown",
        "No such process",
        3,
    )


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("a_b", b"", "", "container", 0, ""), "name"),
        (("a", b"12", "", "container", 0, ""), "id"),
        (("a", b"", "", "host", 0, ""), "class"),
        (("a", b"", "", "container", 1, ""), "leader"),
        (("a", b"", "", "container", 0, "rel"), "rootDirectory"),
        (("a", b"", "", "container", 0, "", [0]), "ifIndices"),
    ],
)
def test_registration_errors_name_their_varlink_field(args: tuple, field: str) -> None:
    with pytest.raises(BusError) as caught:
        validate_registration(*args)
    assert caught.value.name == errors.INVALID_ARGS  # D-Bus: unchanged
    assert varlink_error(caught.value) == (
        "org.varlink.service.InvalidParameter",
        {"parameter": field},
    )


def test_kill_errors_name_their_varlink_field() -> None:
    for who, sig, field in (("nobody", 9, "whom"), ("all", 0, "signal")):
        with pytest.raises(BusError) as caught:
            validate_kill(who, sig)
        assert varlink_error(caught.value) == (
            "org.varlink.service.InvalidParameter",
            {"parameter": field},
        )

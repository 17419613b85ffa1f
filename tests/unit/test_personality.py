"""The 252/262 personality: its choice from PID 1's version, and what it changes (interface
XML, state files, polkit's wording, CreateMachineEx/RegisterMachineEx checks)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from machined import errors, personality, statefile
from machined.clients import polkit
from machined.dbus.introspection import load_interface
from machined.errors import BusError
from machined.machine import Machine, MachineClass
from machined.process import ProcessRef
from machined.registration import LeaderSpec, pin_leader, validate_registration_ex


@pytest.fixture
def as_262() -> Iterator[None]:
    personality.set_personality(personality.V262)
    try:
        yield
    finally:
        personality.set_personality(personality.V252)


@pytest.mark.parametrize(
    ("version", "expected"),
    [("252.39-1~deb12u2", "252"), ("256.7-1", "252"), ("257", "262"), ("262-1", "262"), ("v258-rc1", "262"),
     ("", "252"), ("unknown", "252")],
)  # fmt: skip
def test_personality_from_version(version: str, expected: str) -> None:
    assert personality.from_version(version) == expected


def test_default_is_252_and_bad_values_refused() -> None:
    assert personality.current() == "252" and not personality.is_262()
    with pytest.raises(ValueError):
        personality.set_personality("auto")


def test_interfaces_follow_the_personality(as_262: None) -> None:
    machine = load_interface("org.freedesktop.machine1.Machine")
    manager = load_interface("org.freedesktop.machine1.Manager")
    assert {"VSockCID", "SSHAddress", "Supervisor", "UID", "Subgroup"} <= set(machine.properties)
    assert "GetSSHInfo" in machine.methods and "CreateMachineEx" in manager.methods
    assert not manager.methods["CreateMachine"].privileged
    personality.set_personality(personality.V252)
    assert "VSockCID" not in load_interface("org.freedesktop.machine1.Machine").properties
    assert load_interface("org.freedesktop.machine1.Manager").methods["CreateMachine"].privileged


def _vm() -> Machine:
    return Machine("x3", service="my svc", root_directory="/a b", ssh_private_key_path='/k"e$y', ssh_address="vsock%77",
                   netif=[3, 4], vsock_cid=77, machine_class=MachineClass.VM, leader=5, unit="leadz.service",
                   supervisor_ref=ProcessRef(9, pidfd_id=99), uid=1000)  # fmt: skip


def test_state_file_as_262(as_262: None) -> None:
    text = statefile.serialize(_vm())
    assert text == (
        '# This is private data. Do not parse.\nNAME=x3\nUID=1000\nSCOPE=leadz.service\nSERVICE="my svc"\n'
        'ROOT="/a b"\nLEADER=5\nSUPERVISOR=9\nSUPERVISOR_PIDFDID=99\nCLASS=vm\nNETIF=" 3 4"\nVSOCK_CID=77\n'
        'SSH_ADDRESS=vsock%77\nSSH_PRIVATE_KEY_PATH="/k\\"e\\$y"\n'
    )
    back = statefile.parse("x3", text)
    assert (back.service, back.root_directory, back.netif, back.vsock_cid, back.uid) == (
        "my svc",
        "/a b",
        [3, 4],
        77,
        1000,
    )
    assert (back.ssh_address, back.ssh_private_key_path) == ("vsock%77", '/k"e$y')
    assert back.supervisor_ref is not None and (back.supervisor_ref.pid, back.supervisor_ref.pidfd_id) == (9, 99)
    assert statefile.parse("y", "LEADER=5\n").vsock_cid == 0  # (as 262 reads back an Ex registration's)


def test_state_file_as_252_is_unchanged() -> None:
    text = statefile.serialize(_vm())
    assert "UID=" not in text and "SUPERVISOR" not in text and "VSOCK" not in text and "SSH" not in text
    assert "SERVICE=my svc\n" in text and "NETIF=3 4\n" in text


def test_polkit_wording_follows_the_personality(as_262: None) -> None:
    assert polkit.interactive_required_message().startswith("Access denied as the requested operation requires")
    personality.set_personality(personality.V252)
    assert polkit.interactive_required_message() == "Interactive authentication required."


@pytest.mark.parametrize(
    ("name", "props", "error"),
    [
        ("a_b", [("Bogus", "s", "")], "Invalid machine name"),
        ("a", [("Class", "s", "host"), ("Bogus", "s", "")], "Unknown property 'Bogus'"),
        ("a", [("Class", "s", "host")], "Invalid machine class parameter"),
        ("a", [("Id", "ay", b"12"), ("Bogus", "s", "")], "Invalid machine ID parameter"),
        ("a", [("VSockCID", "u", 2)], "JSON field 'vSockCid' is not a regular VSOCK CID."),
        ("a", [("NetworkInterfaces", "ai", [0])], "Invalid network interface index 0"),
        ("a", [("RootDirectory", "s", "x")], "Root directory must be empty or an absolute path"),
        ("a", [("Class", "u", 3)], "No such device or address"),
    ],
)
def test_ex_checks(name: str, props: list[tuple[str, str, object]], error: str) -> None:
    with pytest.raises(BusError) as e:
        validate_registration_ex(name, props)
    assert e.value.message == error


def test_ex_leader_by_pidfd() -> None:
    req, spec = validate_registration_ex("a", [("SSHAddress", "s", "x"), ("Class", "s", "vm")])
    assert (req.vsock_cid, req.ssh_address, req.machine_class, spec) == (0, "x", MachineClass.VM, LeaderSpec())
    assert pin_leader(spec) is None  # the caller
    fd = os.pidfd_open(os.getpid())
    try:
        ref = pin_leader(LeaderSpec(pidfd=fd, pid=os.getpid(), pidfd_id=os.fstat(fd).st_ino))
        assert ref is not None and ref.pid == os.getpid() and ref.is_alive()
        ref.release()
        with pytest.raises(BusError) as e:
            pin_leader(LeaderSpec(pidfd=fd, pid=os.getpid() + 1))
        assert e.value.message == "LeaderPID and LeaderPIDFD refer to different processes"
        with pytest.raises(BusError) as e:
            pin_leader(LeaderSpec(pidfd=fd, pidfd_id=5))
        assert e.value.message == "LeaderPIDFDID does not match the inode number of LeaderPIDFD"
    finally:
        os.close(fd)
    with pytest.raises(BusError) as e:
        pin_leader(LeaderSpec(pid=os.getpid()))
    assert e.value.name == errors.INVALID_ARGS and e.value.message.startswith("Both LeaderPID and LeaderPIDFDID")
    with pytest.raises(BusError) as e:
        pin_leader(LeaderSpec(pid=os.getpid(), pidfd_id=5))
    assert e.value.name == errors.errno_error_name(3) and "by PIDFDID 5" in e.value.message

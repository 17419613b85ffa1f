"""The daemon on a private dbus-daemon: needs no root and no systemd.

A real dbus-daemon (session configuration) and the real daemon process; the
client is dbus-fast, checking replies and error names as a client sees them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

pytestmark = pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="dbus-daemon not installed")

DEST = "org.freedesktop.machine1"
MANAGER = "/org/freedesktop/machine1"


@pytest.fixture
def private_bus(tmp_path: Path) -> Iterator[str]:
    address = f"unix:path={tmp_path}/bus"
    proc = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", f"--address={address}", "--nopidfile"],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(100):
        if (tmp_path / "bus").exists():
            break
        time.sleep(0.02)
    try:
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def start_daemon(address: str, state_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "machined",
            "--bus-address",
            address,
            "--state-dir",
            str(state_dir),
            "--userdb-socket",
            str(state_dir) + ".userdb",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "INVOCATION_ID")},
    )


@pytest.fixture
def daemon(private_bus: str, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    proc = start_daemon(private_bus, tmp_path / "machines")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = subprocess.run(["busctl", f"--address={private_bus}", "status", DEST], capture_output=True, text=True)
        if r.returncode == 0:
            break
        time.sleep(0.05)
    yield proc
    proc.terminate()
    proc.wait(timeout=10)


async def call(address: str, path: str, iface: str, member: str, sig: str = "", body: list | None = None) -> Message:
    bus = await MessageBus(bus_address=address).connect()
    try:
        reply = await bus.call(
            Message(destination=DEST, path=path, interface=iface, member=member, signature=sig, body=body or [])
        )
        assert reply is not None
        return reply
    finally:
        bus.disconnect()


async def test_list_machines_serves_host(private_bus: str, daemon: subprocess.Popen[str], tmp_path: Path) -> None:
    reply = await call(private_bus, MANAGER, "org.freedesktop.machine1.Manager", "ListMachines")
    assert reply.message_type is MessageType.METHOD_RETURN
    assert reply.body == [[(".host", "host", "", "/org/freedesktop/machine1/machine/_2ehost")]]
    assert (tmp_path / "machines").is_dir()


async def test_get_all_with_empty_interface_returns_every_property(
    private_bus: str, daemon: subprocess.Popen[str]
) -> None:
    reply = await call(
        private_bus, "/org/freedesktop/machine1/machine/_2ehost", "org.freedesktop.DBus.Properties", "GetAll", "s", [""]
    )
    props = {k: v.value for k, v in reply.body[0].items()}
    assert set(props) == {
        "Name", "Id", "Timestamp", "TimestampMonotonic", "Service", "Unit", "Leader", "Class",
        "RootDirectory", "NetworkInterfaces", "State",
    }  # fmt: skip
    assert (props["Name"], props["Class"], props["Unit"], props["Leader"]) == (".host", "host", "-.slice", 1)
    scope = await call(
        private_bus, "/org/freedesktop/machine1/machine/_2ehost", "org.freedesktop.DBus.Properties", "Get", "ss",
        ["org.freedesktop.machine1.Machine", "Scope"],
    )  # fmt: skip
    assert scope.body[0].value == "-.slice"


@pytest.mark.parametrize(
    ("path", "iface", "member", "sig", "body", "error", "text"),
    [
        (MANAGER, "org.freedesktop.machine1.Manager", "GetMachine", "s", ["nope"],
         "org.freedesktop.machine1.NoSuchMachine", "No machine 'nope' known"),
        (MANAGER, "org.freedesktop.machine1.Manager", "GetMachine", "u", [5], "org.freedesktop.DBus.Error.InvalidArgs",
         "Invalid arguments 'u' to call org.freedesktop.machine1.Manager.GetMachine(), expecting 's'."),
        (MANAGER, "org.freedesktop.machine1.Manager", "Nope", "", [], "org.freedesktop.DBus.Error.UnknownMethod",
         "Unknown method Nope or interface org.freedesktop.machine1.Manager."),
        ("/org/freedesktop/machine1/machine/foo", "org.freedesktop.DBus.Properties", "GetAll", "s", [""],
         "org.freedesktop.DBus.Error.UnknownObject", "Unknown object '/org/freedesktop/machine1/machine/foo'."),
        (MANAGER, "org.freedesktop.DBus.Properties", "GetAll", "s", ["org.foo"],
         "org.freedesktop.DBus.Error.UnknownInterface", "Unknown interface 'org.foo'."),
        (MANAGER, "org.freedesktop.DBus.Properties", "Set", "ssv",
         ["org.freedesktop.machine1.Manager", "PoolPath", __import__("dbus_fast").Variant("s", "x")],
         "org.freedesktop.DBus.Error.PropertyReadOnly", "Property 'PoolPath' is not writable."),
    ],
)  # fmt: skip
async def test_errors_are_named_as_sd_bus_names_them(
    private_bus: str, daemon: subprocess.Popen[str], path: str, iface: str, member: str, sig: str,
    body: list, error: str, text: str,
) -> None:  # fmt: skip
    reply = await call(private_bus, path, iface, member, sig, body)
    assert reply.message_type is MessageType.ERROR
    assert (reply.error_name, reply.body[0]) == (error, text)


def test_second_instance_exits_with_a_clear_message(
    private_bus: str, daemon: subprocess.Popen[str], tmp_path: Path
) -> None:
    second = start_daemon(private_bus, tmp_path / "machines2")
    out, err = second.communicate(timeout=20)
    assert second.returncode == 1
    assert "org.freedesktop.machine1 is already owned" in err
    assert "Traceback" not in err


def test_sigterm_exits_cleanly(private_bus: str, daemon: subprocess.Popen[str]) -> None:
    daemon.terminate()
    _, err = daemon.communicate(timeout=10)
    assert daemon.returncode == 0
    assert "Traceback" not in err

"""How io.systemd.Machine reads a process (ProcessId) and Register's fields, as 262 does
(compared with the real daemon in tests/integration262/test_answers262.py): lookups relaxed
(a pidfd id that does not match is not held against the PID, another boot's process is no
machine's), Register's leader strict; fields checked in the caller's order."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from machined.varlink.machine import MachineVarlink, VarlinkError, _boot_id, _pidfd_id, _process_id_param

OTHER_BOOT = "00000000000000000000000000000001"


@pytest.fixture
def child() -> Iterator[int]:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def _bad(value: Any, **kwargs: bool) -> str:
    with pytest.raises(VarlinkError) as e:
        _process_id_param(value, "pid", **kwargs)
    return str(e.value.parameters.get("parameter"))


def test_lookup_process_ids(child: int) -> None:
    fd_id = _pidfd_id(child)
    assert fd_id > 0
    assert _process_id_param({"pid": child}, "pid", relax=True) == (child, 0, False)
    # a pidfd id that does not match, or null: the PID is taken as it is
    assert _process_id_param({"pid": child, "pidfdId": 12345}, "pid", relax=True) == (child, 12345, False)
    assert _process_id_param({"pid": child, "pidfdId": None}, "pid", relax=True) == (child, 0, False)
    assert _process_id_param({"pid": str(child)}, "pid", relax=True) == (child, 0, False)
    # this boot (either spelling) or the null id: local; another boot: remote
    dashed = "-".join((_boot_id()[:8], _boot_id()[8:12], _boot_id()[12:16], _boot_id()[16:20], _boot_id()[20:]))
    for boot in (_boot_id(), dashed, "0" * 32):
        assert _process_id_param({"pid": child, "bootId": boot}, "pid", relax=True) == (child, 0, False)
    assert _process_id_param({"pid": child, "bootId": OTHER_BOOT}, "pid", relax=True) == (child, 0, True)
    # no such process is not a bad parameter; 0 alone is the caller; PIDs past pid_t are
    assert _process_id_param({"pid": 1 << 30}, "pid", relax=True) == (1 << 30, 0, False)
    assert _process_id_param({"pid": 0}, "pid", relax=True) is None
    assert _process_id_param({"pid": 0, "pidfdId": 0}, "pid", relax=True) is None
    for bad in ({"pid": 0, "pidfdId": 5}, {"pid": 0, "bootId": _boot_id()}, {"pid": 1 << 31}, {"pid": -1},
                {"pid": child, "bootId": None}, {"pid": child, "bootId": "zz"}, {"pid": child, "bootId": 5},
                {"pid": child, "pidfdId": -1}, {"pid": child, "pidfdId": "x"}, {"pid": child, "x": 1},
                {"pidfdId": 3}, {}, "x", [], None):  # fmt: skip
        assert _bad(bad, relax=True) == "pid", bad


def test_leader_process_ids_are_strict(child: int) -> None:
    fd_id = _pidfd_id(child)
    assert _process_id_param({"pid": child}, "pid", strict=True) == (child, fd_id, False)
    assert _process_id_param({"pid": child, "pidfdId": fd_id}, "pid", strict=True) == (child, fd_id, False)
    assert _process_id_param(child, "pid", strict=True) == (child, fd_id, False)
    for bad in ({"pid": child, "pidfdId": fd_id + 1}, {"pid": child, "bootId": OTHER_BOOT},
                {"pid": child, "pidfdId": None}, {"pid": 0}, {"pid": 1 << 30}, 0):  # fmt: skip
        assert _bad(bad, strict=True) == "pid", bad


def _register(params: dict[str, Any]) -> dict[str, Any] | str:
    try:
        return MachineVarlink._register_fields(params)
    except VarlinkError as e:
        return str(e.parameters["parameter"])


def test_register_fields_in_the_callers_order(child: int) -> None:
    me = os.getpid()
    base = {"name": "m1", "class": "container"}
    assert _register({**base, "leader": child, "leaderProcessId": {"pid": me}}) == "leaderProcessId"
    assert _register({**base, "leaderProcessId": {"pid": me}, "leader": child}) == "leader"
    assert _register({**base, "leaderProcessId": {"pid": child}, "leader": None}) == "leader"
    fields = _register({**base, "leader": None, "leaderProcessId": {"pid": child}})
    assert isinstance(fields, dict) and fields["leader"] == child
    assert _register({**base, "vSockCid": 0, "rootDirectory": "rel"}) == "vSockCid"
    assert _register({**base, "rootDirectory": "rel", "vSockCid": 0}) == "rootDirectory"
    assert _register({"id": "zz", "name": "x_y", "class": "container"}) == "id"
    assert _register({"class": "host", "name": "x_y"}) == "name"  # host: refused after the fields
    assert _register({"class": "host", "name": "x"}) == "class"
    for key in ("id", "service", "rootDirectory", "ifIndices", "vSockCid", "sshAddress", "sshPrivateKeyPath",
                "controlAddress", "allocateUnit", "leaderProcessId", "allowInteractiveAuthentication"):  # fmt: skip
        assert _register({**base, key: None}) == key, key
    for key in ("supervisor", "supervisorProcessId", "leader"):
        assert isinstance(_register({**base, key: None}), dict), key
    assert _register({**base, "ifIndices": ["1"]}) == "ifIndices"
    assert isinstance(_register({**base, "supervisor": "x", "supervisorProcessId": {"pid": -1}}), dict)
    fields = _register({**base, "id": "00000000-0000-0000-0000-000000000001", "vSockCid": "7"})
    assert isinstance(fields, dict) and fields["id"] == bytes(15) + b"\x01" and fields["cid"] == 7

"""tests/integration/test_weight.py on systemd 262: a burst of looks answers as the real 262 does
and leaves only the daemon in the service's cgroup; hostile os-release files cost only their
caller (errors as 262 names them)."""

from __future__ import annotations

from machined.sandbox import Sandbox
from tests.integration.differential import run
from tests.integration.test_lifecycle import assert_same
from tests.integration.test_weight import BURST, HOSTILE_COMPARED, check_hostile, hostile_ours_script


def test_a_burst_of_looks_leaves_only_the_daemon(ours262: Sandbox, real262: Sandbox) -> None:
    out = assert_same(ours262, real262, BURST, timeout=240)
    assert "[byte 0xc6, 0x33, 0x64, 0x04]" in out and "198.51.100.4" in out, out
    for moment in ("after looks", "after machinectl list", "after .host"):
        assert f"{moment}: 1\n" in out, out


def test_unreadable_os_release_files_answered_as_upstream(ours262: Sandbox, real262: Sandbox) -> None:
    out = assert_same(ours262, real262, HOSTILE_COMPARED, timeout=120)
    assert "'ID': 'foo'" in out or "'ID': <'foo'>" in out, out


def test_hostile_os_release_files_cost_only_their_caller(ours262: Sandbox) -> None:
    check_hostile(run(ours262, hostile_ours_script(), timeout=180), "262")

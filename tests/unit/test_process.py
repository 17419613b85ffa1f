"""Processes pinned by identity: a recycled PID is never taken for the pinned process."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from machined.process import ProcessRef, start_time


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"])


def test_pinned_process_is_alive_until_it_exits() -> None:
    proc = _sleeper()
    ref = ProcessRef.take(proc.pid)
    try:
        assert ref.pidfd is not None and ref.pidfd_id > 0
        assert ref.is_alive() and ref.is_pid(proc.pid)
        ref.send_signal(signal.SIGTERM)
        proc.wait()
        assert not ref.is_alive() and not ref.is_pid(proc.pid)
        with pytest.raises(ProcessLookupError):
            ref.send_signal(signal.SIGTERM)
    finally:
        ref.release()


def test_a_state_file_naming_another_process_is_refused() -> None:
    proc = _sleeper()
    try:
        ref = ProcessRef.take(proc.pid, expect_pidfd_id=1)  # not the pidfd id this process has
        assert ref.pidfd is None and not ref.is_alive()
        assert ProcessRef.take(proc.pid, expect_start=(start_time(proc.pid) or 0) + 1).is_alive() is False
    finally:
        proc.kill()
        proc.wait()


def test_without_pidfds_the_start_time_still_tells(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pidfd(pid: int) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    proc = _sleeper()
    ref = ProcessRef.take(proc.pid)
    assert ref.pidfd is None and ref.is_alive()
    ref.send_signal(signal.SIGKILL)
    proc.wait()
    assert not ref.is_alive()
    with pytest.raises(ProcessLookupError):
        ref.send_signal(signal.SIGKILL)


def test_nonexistent_pid() -> None:
    ref = ProcessRef.take(4_000_000)
    assert not ref.is_alive()

"""Processes held by identity, not by number.

A bare PID can be reused once its process dies. A :class:`ProcessRef` pins the
process with a pidfd when it is taken, and remembers its start time and pidfd
inode id; every later use checks that the PID still names the same process, and
signals go through the pidfd, so a newcomer with a recycled PID is never
killed, attributed or reported alive in the dead leader's place.
"""

from __future__ import annotations

import os
import select
import signal
from dataclasses import dataclass


def start_time(pid: int) -> int | None:
    """Start time of *pid* in clock ticks after boot (field 22 of /proc/PID/stat). Read here, not
    with psutil, whose create_time() is a float of seconds since the epoch that adds the boot time
    as the clock has it now: identity checks compare these exact ticks, which never move."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        return int(data.rsplit(b")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


@dataclass
class ProcessRef:
    """A process pinned by pidfd; ``pidfd`` is None when it could not be opened."""

    pid: int
    start_time: int | None = None
    pidfd: int | None = None
    pidfd_id: int = 0  # inode of the pidfd on pidfs kernels: unique for the boot

    @classmethod
    def take(cls, pid: int, expect_pidfd_id: int = 0, expect_start: int | None = None) -> ProcessRef:
        """Pin *pid* now. With expectations (from a state file), refuse another process by that PID."""
        ref = cls(pid)
        if pid <= 0:
            return ref
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            # No pidfd (out of descriptors, old kernel): fall back to the start time.
            ref.start_time = start_time(pid)
            if expect_start is not None and ref.start_time != expect_start:
                ref.start_time = None
            return ref
        # The start time read after opening the pidfd belongs to the pinned process,
        # unless it died meanwhile: then the pidfd reports it and is_alive() says no.
        ref.pidfd = fd
        ref.start_time = start_time(pid)
        ref.pidfd_id = os.fstat(fd).st_ino
        mismatch = (expect_pidfd_id and ref.pidfd_id != expect_pidfd_id) or (
            expect_start is not None and ref.start_time != expect_start
        )
        if mismatch:
            ref.release()
            ref.start_time = None
            ref.pidfd_id = 0
        return ref

    def is_alive(self) -> bool:
        """The very process we pinned still runs (a recycled PID does not count)."""
        if self.pidfd is None:
            return self.start_time is not None and start_time(self.pid) == self.start_time
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return not poller.poll(0)  # a pidfd turns readable when its process exits

    def is_pid(self, pid: int) -> bool:
        """Whether *pid* currently names this (living) process. A process that still runs keeps
        its PID, so liveness by pidfd tells (without a pidfd, is_alive() compares start times)."""
        return pid == self.pid and self.is_alive()

    def send_signal(self, sig: int) -> None:
        if self.pidfd is not None:
            signal.pidfd_send_signal(self.pidfd, sig)
        elif self.is_alive():
            os.kill(self.pid, sig)
        else:
            raise ProcessLookupError(3, "No such process")

    def release(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
            self.start_time = None

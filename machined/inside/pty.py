"""Pseudo terminals: allocate a master on /dev/ptmx and name its slave."""

from __future__ import annotations

import fcntl
import os
import struct

TIOCGPTN = 0x80045430
TIOCSPTLCK = 0x40045431


def open_master() -> tuple[int, str]:
    """A new, unlocked PTY master of the calling process's /dev/pts and its slave's path."""
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        (number,) = struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, b"\0" * 4))
    except OSError:
        os.close(master)
        raise
    return master, f"/dev/pts/{number}"


def open_slave(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)

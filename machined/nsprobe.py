"""Functions that look inside a machine's namespaces; they run in a worker child.

Called through :func:`machined.worker.run_worker` (``machined.nsprobe:os_release``
and so on), never in the daemon's own process: setns() would switch a whole
thread of an asyncio daemon into the container.
"""

from __future__ import annotations

import ctypes
import errno
import os

# Imported before entering the container: its root need not contain this project.
from machined.addresses import read_addresses
from machined.envfile import read_os_release

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def setns(path: str, nstype: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, nstype) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
    finally:
        os.close(fd)


def enter_mount_and_root(leader: int) -> None:
    """Join *leader*'s mount namespace and chroot into its root."""
    root = os.open(f"/proc/{leader}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    setns(f"/proc/{leader}/ns/mnt", CLONE_NEWNS)
    os.fchdir(root)
    os.chroot(".")
    os.chdir("/")
    os.close(root)


def os_release(leader: int) -> dict[str, str]:
    enter_mount_and_root(leader)
    try:
        return read_os_release("/")
    except FileNotFoundError:
        raise OSError(errno.ENOENT, "Machine does not contain OS release information") from None


def addresses(leader: int) -> list[list]:
    setns(f"/proc/{leader}/ns/net", CLONE_NEWNET)
    return [[a.family, a.address.hex()] for a in read_addresses()]

"""Child process that looks inside a machine's namespaces and prints JSON.

The daemon never calls setns() itself (it is threaded and asyncio-driven; a
namespace switch would affect the whole thread). It runs
``python -m machined.nsprobe OP LEADER`` instead, with a deadline, so a
container that hangs or dies costs its caller an error and nobody else anything.

Exit status 0: JSON result on stdout. Otherwise stdout has a JSON object
``{"errno": N, "message": "..."}``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import sys

# Imported before entering the container: its root need not contain this project.
from machined.envfile import read_os_release

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(path: str, nstype: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, nstype) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
    finally:
        os.close(fd)


def _enter_mount_and_root(leader: int) -> None:
    root = os.open(f"/proc/{leader}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    _setns(f"/proc/{leader}/ns/mnt", CLONE_NEWNS)
    os.fchdir(root)
    os.chroot(".")
    os.chdir("/")
    os.close(root)


def op_os_release(leader: int) -> object:
    _enter_mount_and_root(leader)
    try:
        return read_os_release("/")
    except FileNotFoundError:
        raise OSError(errno.ENOENT, "Machine does not contain OS release information") from None


def op_addresses(leader: int) -> object:
    from machined.addresses import read_addresses

    _setns(f"/proc/{leader}/ns/net", CLONE_NEWNET)
    return [[a.family, a.address.hex()] for a in read_addresses()]


OPS = {"os-release": op_os_release, "addresses": op_addresses}


def main() -> int:
    op, leader = sys.argv[1], int(sys.argv[2])
    try:
        result = OPS[op](leader)
    except OSError as e:
        print(json.dumps({"errno": e.errno or errno.EIO, "message": e.strerror or str(e)}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

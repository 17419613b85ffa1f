"""What both sides of the fork share: fds over Unix sockets, and the request a child gets.

A request is ``{"target": "MODULE:FUNCTION", "kwargs": {...}, "names": [...], "nice": N,
"fd_socket": BOOL}`` in JSON with fds attached (passed to the function as keyword arguments
under *names*); its target is a :class:`machined.children.jobs.Job`'s. The outcome a child
writes back is ``{"result": ...}``, ``{"errno": N, "message": ...}`` or ``{"error": NAME,
"message": ...}``, after one NUL per fd it handed back (:func:`send_fd`).
"""

from __future__ import annotations

import array
import json
import os
import socket
from collections.abc import Iterable, Mapping
from typing import Any

FDS_MAX = 16  # fds one message may carry
ANCBUF = socket.CMSG_SPACE(FDS_MAX * array.array("i").itemsize)


def fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(data[: len(data) - len(data) % got.itemsize])
            fds.extend(got)
    return fds


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], ancillary)


def close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def send_fd(fd_socket: int, fd: int) -> None:
    """In a child: hand *fd* to the daemon (see :func:`machined.children.client.run_worker_with_fd`)."""
    sock = socket.socket(fileno=os.dup(fd_socket))
    try:
        send_with_fds(sock, b"\0", [fd])  # one NUL per fd; the outcome follows
    finally:
        sock.close()


def request(target: str, kwargs: Mapping[str, Any], names: list[str], nice: int = 0, fd_socket: bool = False) -> bytes:
    """A child's request; its fds come with it, in the order of *names*."""
    return json.dumps(
        {"target": target, "kwargs": dict(kwargs), "names": names, "nice": nice, "fd_socket": fd_socket}
    ).encode()

"""The child's side of the fork: run one job from the job socket and answer.

A child is a spare of the fork server (:mod:`machined.children.forkserver`) or, when that
cannot start, ``python -m machined.children.child --job FD`` (an interpreter for one job).
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from machined.children.jobs import PING
from machined.children.wire import ANCBUF, fds_from, request
from machined.errors import BusError


def set_name(name: bytes) -> None:
    """This process's name (comm, as ps shows it); for children."""
    from machined.fs.libc import PR_SET_NAME, prctl

    prctl(PR_SET_NAME, name)


def _outcome(func: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"result": func(**kwargs)}
    except BusError as e:
        return {"error": e.name, "message": e.message}
    except OSError as e:
        return {"errno": e.errno or errno.EIO, "message": e.strerror or str(e)}


def _target(target: str) -> Callable[..., Any]:
    module_name, _, func_name = target.partition(":")
    return getattr(importlib.import_module(module_name), func_name)  # type: ignore[no-any-return]


def rehearse() -> None:
    """In a spare, before its job comes: run what every job runs, without effect.

    A spare shares its memory with the fork server until it writes to it, and Python
    writes to every object it uses (reference counts): the copies of those pages are
    made now, while the spare waits, rather than while its caller does.
    """
    message = json.loads(request(PING.target, {"a": 1, "b": "c", "l": [1]}, ["x"]))
    json.dumps(_outcome(_target(message["target"]), {}))
    a, b = socket.socketpair()
    a.setblocking(True)
    fds_from([])
    a.close()
    b.close()


def serve_job(job_fd: int, on_request: Callable[[], None] | None = None) -> None:
    """In a child: read the request (and its fds) from the job socket, run it, write the outcome.

    *on_request* is called once the request has come (a spare waits for it).
    """
    sock = socket.socket(fileno=job_fd)
    sock.setblocking(True)
    chunks, fds = [], []
    while True:
        data, ancdata, _, _ = sock.recvmsg(1 << 16, ANCBUF, socket.MSG_CMSG_CLOEXEC)
        fds.extend(fds_from(ancdata))
        if not data:
            break
        chunks.append(data)
    if not chunks:
        return  # the daemon let go of this spare
    if on_request is not None:
        on_request()
    asked = json.loads(b"".join(chunks))
    if asked.get("nice"):
        try:
            os.setpriority(os.PRIO_PROCESS, 0, int(asked["nice"]))
        except OSError:
            pass
    kwargs = dict(asked.get("kwargs") or {})
    names = asked.get("names") or []
    if len(names) != len(fds):
        raise OSError(errno.EBADF, "fds lost on the way")
    kwargs.update(zip(names, fds, strict=True))
    if asked.get("fd_socket"):
        kwargs["fd_socket"] = job_fd
    outcome = _outcome(_target(asked["target"]), kwargs)
    sock.sendall(json.dumps(outcome).encode())
    sock.close()


def main(argv: list[str] | None = None) -> int:
    """The exec path: ``python -m machined.children.child --job FD``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "--job":
        print("usage: python -m machined.children.child --job FD", file=sys.stderr)
        return 2
    serve_job(int(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The fork server: one single-threaded process that forks a child per operation.

The daemon starts it at an operation that needs a child, and lets it go once it has been
without children for a few seconds (``python -m machined.children.forkserver FD``,
FD one end of a SOCK_SEQPACKET socketpair; see :mod:`machined.children`). It imports
what the jobs need once, says ``ready``, and then waits. It holds no event
loop, no bus connection and no thread, so forking it is safe.

For each ``spare`` message it forks a child, a *spare*, with one end of a new
stream socketpair (the child's job socket), and answers ``{"pid": P}`` with a pidfd
of the child and the other end of the socketpair (or ``{"errno": E}`` if it could
not fork). The daemon asks for spares ahead of time, so that an operation waits
for no fork: it writes its request (and the request's fds) straight to a spare.
A child closes what is the server's, asks for SIGKILL when the server dies
(PR_SET_PDEATHSIG), waits for its request and runs it once with
:func:`machined.children.child.serve_job`, then exits. The server reaps each child as soon
as the child's pidfd turns readable. When the control socket closes (the daemon
is gone), it kills its children and exits.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import select
import signal
import socket
import sys

from machined.children.child import serve_job, set_name
from machined.children.wire import close_all, send_with_fds
from machined.fs.libc import PR_SET_PDEATHSIG, prctl

# What the children run (the modules of machined.children.jobs), imported once here (before
# any child enters a container, whose root need not contain this project). The child's side
# of the protocol comes first.
PRELOAD = (
    "machined.children.child",
    "machined.inside.nsprobe",
    "machined.inside.machine_ops",
    "machined.images.operations",
    "machined.images.metadata",
)

NAME = b"machined-fork"
SPARE_NAME = b"machined-spare"  # waiting for a job
CHILD_NAME = b"machined-job"  # running one


class Server:
    def __init__(self, ctl: socket.socket) -> None:
        self.ctl = ctl
        self.pid = os.getpid()
        self.children: dict[int, int] = {}  # pidfd -> pid
        self.poller = select.poll()
        self.poller.register(ctl.fileno(), select.POLLIN)
        self.devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)

    def run(self) -> int:
        self.ctl.send(b"ready")
        while True:
            try:
                events = self.poller.poll()
            except InterruptedError:
                continue
            for fd, _ in events:
                if fd == self.ctl.fileno():
                    if not self._control():
                        self._shutdown()
                        return 0
                elif fd in self.children:
                    self._reap(fd)

    def _control(self) -> bool:
        """Serve every queued message; False once the daemon is gone."""
        while True:
            try:
                data = self.ctl.recv(64, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            if not data:
                return False
            if data == b"spare":
                self._spare()

    def _spare(self) -> None:
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as e:
            self._answer({"errno": e.errno})
            return
        try:
            pid = os.fork()
        except OSError as e:
            ours.close()
            theirs.close()
            self._answer({"errno": e.errno})
            return
        if pid == 0:
            code = 1
            try:
                ours.close()
                if self._leave_server():
                    set_name(SPARE_NAME)
                    self._rehearse()
                    serve_job(theirs.detach(), lambda: set_name(CHILD_NAME))
                    code = 0
            finally:
                os._exit(code)
        theirs.close()
        try:
            pidfd = os.pidfd_open(pid)  # not reaped yet: the PID is still this child's
        except OSError as e:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            ours.close()
            self._answer({"errno": e.errno})
            return
        self.children[pidfd] = pid
        self.poller.register(pidfd, select.POLLIN)
        self._answer({"pid": pid}, [pidfd, ours.fileno()])
        ours.close()

    def _leave_server(self) -> bool:
        """In a new child: drop what is the server's; False if the server died meanwhile."""
        self.ctl.close()
        close_all(self.children)
        os.dup2(self.devnull, 2)
        os.close(self.devnull)
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        return os.getppid() == self.pid

    def _rehearse(self) -> None:
        """What jobs run, run once without effect (see :func:`machined.children.child.rehearse`)."""
        for name in PRELOAD:
            rehearse = getattr(sys.modules.get(name), "rehearse", None)
            if rehearse is not None:
                try:
                    rehearse()
                except Exception:  # noqa: BLE001, S110 (only a warm-up)
                    pass

    def _answer(self, message: dict[str, int | None], fds: list[int] | None = None) -> None:
        try:
            send_with_fds(self.ctl, json.dumps(message).encode(), fds or [])
        except OSError:
            pass  # the daemon is gone: the next read says so

    def _reap(self, pidfd: int) -> None:
        pid = self.children.pop(pidfd)
        self.poller.unregister(pidfd)
        os.waitpid(pid, 0)
        os.close(pidfd)

    def _shutdown(self) -> None:
        for pidfd in self.children:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pidfd in list(self.children):
            self._reap(pidfd)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m machined.children.forkserver FD", file=sys.stderr)
        return 2
    ctl = socket.socket(fileno=int(argv[0]))
    import machined.lean  # noqa: F401  (before the jobs' modules: no OpenSSL, some 5 MiB less to fork)

    set_name(NAME)
    for module in PRELOAD:
        try:
            importlib.import_module(module)
        except ImportError as e:  # a child that needs it imports it itself (slowly)
            print(f"machined-fork: cannot preload {module}: {e}", file=sys.stderr)
    gc.freeze()  # what is imported stays out of collections: children share more pages with us
    return Server(ctl).run()


if __name__ == "__main__":
    sys.exit(main())

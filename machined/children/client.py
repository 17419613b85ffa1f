"""The daemon's side of the fork: children for jobs, under limits and deadlines.

See :mod:`machined.children` for the whole; :mod:`machined.children.child` is the other side.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from machined import caller, errors
from machined.children.jobs import Job
from machined.children.limits import children
from machined.children.wire import ANCBUF, close_all, fds_from, request
from machined.errors import BusError

UNPRIVILEGED_NICENESS = 10
OUTPUT_MAX = 16 << 20  # bytes a child may answer with
FORKSERVER_START_TIMEOUT = 30.0
FORKSERVER_RETRY = 5.0  # after a failed start, calls take the exec path this long before the next try
SPARES = 2  # children the fork server forks ahead, each waiting for a job
FORKSERVER_LINGER = 5.0  # seconds the fork server stays once its last child has exited

DIED = "Child died abnormally."

__all__ = ["forkserver_pid", "run_worker", "run_worker_with_fd"]

log = logging.getLogger(__name__)

_shared: dict[str, asyncio.Future[Any]] = {}
_live: set[Child] = set()  # children not yet known to be gone


# ----- the daemon's side ---------------------------------------------------------------------


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: no "never retrieved" warning for outcomes nobody awaits


class _Reader:
    """Reads a stream socket in the event loop until EOF: the bytes, and the fds that came with them."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.loop = asyncio.get_running_loop()
        self.future: asyncio.Future[bytes] = self.loop.create_future()
        self.future.add_done_callback(_retrieve)
        self.data = bytearray()
        self.fds: list[int] = []
        self.reading = True
        sock.setblocking(False)
        self.loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        while True:
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(1 << 16, ANCBUF, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ECONNRESET: the child went away without reading the request
                data, ancdata, flags = b"", [], 0
            self.fds.extend(fds_from(ancdata))
            if data and not flags & socket.MSG_CTRUNC and len(self.data) + len(data) <= OUTPUT_MAX:
                self.data += data
                continue
            self.stop()
            if not self.future.done():
                if data:  # too much, or fds lost
                    self.future.set_exception(BusError(errors.FAILED, DIED))
                else:
                    self.future.set_result(bytes(self.data))
            return

    def stop(self) -> None:
        if self.reading:
            self.reading = False
            if not self.loop.is_closed():  # (a closed one was of an earlier test)
                self.loop.remove_reader(self.fd)

    def fail(self, exc: BaseException) -> None:
        self.stop()
        if not self.future.done():
            self.future.set_exception(exc)

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds

    def close(self) -> None:
        self.stop()
        if not self.future.done() and not self.loop.is_closed():
            self.future.cancel()
        close_all(self.take_fds())


class Child:
    """A child serving one request (or, for a helper, many); its outcome comes on its job socket.

    ``output`` resolves with the bytes the child wrote once it closed the job socket;
    ``gone`` once the process has exited.
    """

    def __init__(self, sock: socket.socket, pid: int, pidfd: int, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.reader = _Reader(sock)
        self.output = self.reader.future
        self.gone: asyncio.Future[None] = self.loop.create_future()
        self.pid = pid
        self.pidfd: int | None = pidfd
        self._popen = popen  # ours to reap (exec path); the fork server reaps its own
        self._on_gone: list[Callable[[], None]] = []
        self._unsent = b""
        _live.add(self)
        self.loop.add_reader(pidfd, self._exited)

    @property
    def running(self) -> bool:
        """Not yet known to have exited."""
        return self in _live

    def when_gone(self, callback: Callable[[], None]) -> None:
        """Call *callback* (synchronously) once the process has exited."""
        if self in _live:
            self._on_gone.append(callback)
        else:
            callback()

    def _set_gone(self) -> None:
        _live.discard(self)
        callbacks, self._on_gone = self._on_gone, []
        if not self.gone.done() and not self.loop.is_closed():
            self.gone.set_result(None)
        for callback in callbacks:
            callback()

    def _exited(self) -> None:
        assert self.pidfd is not None
        self.loop.remove_reader(self.pidfd)
        if self._popen is not None:
            self._popen.wait()
        os.close(self.pidfd)
        self.pidfd = None
        self._set_gone()

    def kill(self) -> None:
        """SIGKILL through the pidfd: never a process that merely reuses the PID."""
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def fail(self, exc: BaseException) -> None:
        """It must not answer any more (its fork server died): kill it, fail its output."""
        self.kill()
        self.reader.fail(exc)

    def abandon(self) -> None:
        """Its event loop is gone (tests): kill it, and count it gone."""
        self.kill()
        if self.pidfd is not None:
            if not self.loop.is_closed():
                self.loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
        self.close()
        self._set_gone()

    def queue(self, request: bytes, fds: list[int]) -> None:
        """Write the request, its fds with its first bytes, as far as it fits in the socket now."""
        sent = self.sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds
                                 else [])  # fmt: skip
        self._unsent = request[sent:]
        if not self._unsent:
            self.sock.shutdown(socket.SHUT_WR)

    async def send(self) -> None:
        """The rest of the request; a child that died meanwhile is told by its (empty) output."""
        if self._unsent:
            try:
                await self.loop.sock_sendall(self.sock, self._unsent)
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._unsent = b""

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


_Spare = tuple[int, int, socket.socket]  # pid, pidfd, our end of its job socket


class _ForkServer:
    """The daemon's end of :mod:`machined.children.forkserver`, started at first use.

    The server forks *spares*, children waiting for a job, and hands each to the daemon
    (its pidfd and the daemon's end of its job socket). The daemon keeps :data:`SPARES`
    in stock, so that an operation waits for neither a fork nor the server: its request
    goes straight to the spare. A spare taken is replaced once its work is done (at
    once when it was the last one).
    """

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ctl: socket.socket | None = None
        self.popen: subprocess.Popen[bytes] | None = None
        self.pidfd: int | None = None
        self.stock: deque[_Spare] = deque()
        self.waiting: deque[asyncio.Future[_Spare]] = deque()
        self.asked = 0  # spares asked for, not yet come
        self.unsent = 0  # of those, asks not yet written (its queue was full)
        self.children: set[Child] = set()
        self.writing = False  # waiting for room in its queue
        self.starting: asyncio.Task[bool] | None = None
        self.failed_at = -FORKSERVER_RETRY
        self.linger: asyncio.TimerHandle | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None and self.ctl is not None else None

    async def ready(self) -> bool:
        """Whether the fork server runs (starting it if needed); False: take the exec path."""
        loop = asyncio.get_running_loop()
        if self.ctl is not None and self.loop is not loop:
            self._abandon()  # started by another event loop (tests)
        if self.ctl is not None:
            return True
        if self.starting is not None and self.starting.get_loop() is not loop:
            self.starting = None
        if self.starting is None:
            if time.monotonic() - self.failed_at < FORKSERVER_RETRY:
                return False
            self.starting = loop.create_task(self._start())
        return await asyncio.shield(self.starting)

    async def _start(self) -> bool:
        loop = asyncio.get_running_loop()
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as e:
            return self._start_failed(f"socketpair: {e}")
        try:
            try:
                popen = subprocess.Popen(  # noqa: ASYNC220 (vfork and exec: no wait on the child)
                    [sys.executable, "-m", "machined.children.forkserver", str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                )  # fmt: skip
            finally:
                theirs.close()
            pidfd = os.pidfd_open(popen.pid)  # ours, not reaped: the PID is still this process's
        except OSError as e:
            ours.close()
            return self._start_failed(str(e))
        ours.setblocking(False)
        try:
            hello = await asyncio.wait_for(loop.sock_recv(ours, 64), FORKSERVER_START_TIMEOUT)
        except (TimeoutError, OSError):
            hello = b""
        if hello != b"ready":
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.close(pidfd)
            ours.close()
            await asyncio.to_thread(popen.wait)
            return self._start_failed(f"exit status {popen.returncode}")
        self.loop, self.ctl, self.popen, self.pidfd = loop, ours, popen, pidfd
        self.stock, self.waiting, self.asked, self.unsent, self.children = deque(), deque(), 0, 0, set()
        loop.add_reader(ours.fileno(), self._control)
        loop.add_reader(pidfd, self._died)
        self.starting = None
        self._arm_linger()  # (the operation that started it takes a child at once)
        log.debug("fork server %d started", popen.pid)
        return True

    def _start_failed(self, why: str) -> bool:
        log.warning("Fork server did not start (%s); children are started one interpreter each for now", why)
        self.failed_at = time.monotonic()
        self.starting = None
        return False

    async def child(self) -> Child:
        """A spare, as a child of ours to send a request to."""
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        pid, pidfd, sock = await self._spare()
        child = Child(sock, pid, pidfd)
        self.children.add(child)
        child.when_gone(lambda: self._gone(child))
        return child

    def _gone(self, child: Child) -> None:
        self.children.discard(child)
        if self.ctl is not None and self.loop is child.loop:
            if not self.children and not self.waiting:
                self._arm_linger()
            self._replenish()  # only now: forking while it worked would have taken the CPU from it

    def _arm_linger(self) -> None:
        assert self.loop is not None
        if self.loop.is_closed():
            return  # (tests: its event loop is gone; the next one abandons it)
        if self.linger is not None:
            self.linger.cancel()
        self.linger = self.loop.call_later(FORKSERVER_LINGER, self._idle)

    def _idle(self) -> None:
        """No child of it for :data:`FORKSERVER_LINGER` s: let it and its spares go (closing its
        control socket ends it; it kills its spares and exits)."""
        self.linger = None
        if self.ctl is None or self.children or self.waiting or self.starting is not None:
            return
        assert self.loop is not None and self.pidfd is not None and self.popen is not None
        log.debug("fork server %d idle: let go", self.popen.pid)
        self.loop.remove_reader(self.ctl.fileno())
        if self.writing:
            self.loop.remove_writer(self.ctl.fileno())
            self.writing = False
        self._drop_spares()
        self.ctl.close()
        self.ctl = None
        pidfd, popen, loop = self.pidfd, self.popen, self.loop
        loop.remove_reader(pidfd)

        def reap() -> None:
            loop.remove_reader(pidfd)
            popen.wait()
            os.close(pidfd)

        loop.add_reader(pidfd, reap)
        self.pidfd = None

    async def _spare(self) -> _Spare:
        assert self.loop is not None
        if self.stock:
            spare = self.stock.popleft()
            if not self.stock:
                self._replenish()  # the next caller would wait: no time to lose
            return spare  # else replaced when its work is done
        waiter: asyncio.Future[_Spare] = self.loop.create_future()
        self.waiting.append(waiter)
        self._replenish()
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._give(waiter.result())  # it came as we went away: for the next one
            elif waiter in self.waiting:
                self.waiting.remove(waiter)
            raise

    def _replenish(self) -> None:
        """Ask for spares until the stock (and those waiting for one) will be served."""
        assert self.loop is not None and self.ctl is not None
        missing = SPARES + len(self.waiting) - len(self.stock) - self.asked
        if missing <= 0:
            return
        self.asked += missing
        self.unsent += missing
        self._flush()

    def _flush(self) -> None:
        assert self.loop is not None and self.ctl is not None
        while self.unsent:
            try:
                self.ctl.send(b"spare")
            except BlockingIOError:
                if not self.writing:
                    self.loop.add_writer(self.ctl.fileno(), self._flush)
                    self.writing = True
                return
            except OSError:
                return  # dead: _died() follows
            self.unsent -= 1
        if self.writing:
            self.loop.remove_writer(self.ctl.fileno())
            self.writing = False

    def _give(self, spare: _Spare) -> None:
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(spare)
                return
        self.stock.append(spare)

    def _control(self) -> None:
        while self.ctl is not None:
            try:
                data, ancdata, _, _ = self.ctl.recvmsg(4096, ANCBUF, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, ancdata = b"", []
            fds = fds_from(ancdata)
            if not data:
                close_all(fds)
                self._died()
                return
            try:
                message = json.loads(data)
                pid = int(message.get("pid", 0))
                code = int(message.get("errno", 0))
            except (ValueError, TypeError, AttributeError):
                close_all(fds)
                continue
            self.asked = max(self.asked - 1, 0)
            if pid and len(fds) == 2:
                self._give((pid, fds[0], socket.socket(fileno=fds[1])))
                continue
            close_all(fds)
            while self.waiting:  # it could not fork: one waiting caller learns why
                waiter = self.waiting.popleft()
                if not waiter.done():
                    code = code or errno.EIO
                    waiter.set_exception(OSError(code, os.strerror(code)))
                    break

    def _died(self) -> None:
        """It exited (or its control socket broke): its children go with it and fail."""
        if self.ctl is None:
            return
        assert self.loop is not None and self.pidfd is not None and self.popen is not None
        log.warning("Fork server %d died; it is started again at the next operation", self.popen.pid)
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        self.loop.remove_reader(self.ctl.fileno())
        if self.writing:
            self.loop.remove_writer(self.ctl.fileno())
            self.writing = False
        self.ctl.close()
        self.ctl = None
        pidfd, popen = self.pidfd, self.popen
        self.loop.remove_reader(pidfd)
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)

        def reap() -> None:
            assert self.loop is not None
            self.loop.remove_reader(pidfd)
            popen.wait()
            os.close(pidfd)

        self.loop.add_reader(pidfd, reap)
        self.pidfd = None
        self._drop_spares()
        for waiter in self.waiting:
            if not waiter.done():
                waiter.set_exception(BusError(errors.FAILED, DIED))
        self.waiting = deque()
        doomed, self.children = self.children, set()
        for child in doomed:
            child.fail(BusError(errors.FAILED, DIED))

    def _drop_spares(self) -> None:
        for _, pidfd, sock in self.stock:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.close(pidfd)
            sock.close()
        self.stock = deque()
        self.asked = self.unsent = 0

    def _abandon(self) -> None:
        """Forget a server of an event loop that is gone; closing its socket makes it exit."""
        if self.ctl is not None:
            self.ctl.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        self._drop_spares()
        self.loop = self.ctl = self.pidfd = self.popen = None  # subprocess reaps the Popen
        self.waiting, self.children, self.writing = deque(), set(), False


_server = _ForkServer()


def forkserver_pid() -> int | None:
    """The fork server's PID while it runs."""
    return _server.pid


def _spawn() -> Child:
    """The exec path: a new interpreter for this one child."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        popen = subprocess.Popen(
            [sys.executable, "-m", "machined.children.child", "--job", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    try:
        pidfd = os.pidfd_open(popen.pid)
    except OSError:
        ours.close()
        popen.kill()
        popen.wait()
        raise
    return Child(ours, popen.pid, pidfd, popen)


async def _start_child(request: bytes, fds: list[int]) -> Child:
    """A child (a spare of the fork server, else exec'd) given *request* and *fds* (copied).

    The caller awaits ``send()`` for what of the request did not fit in the socket at once.
    """
    loop = asyncio.get_running_loop()
    for stale in [c for c in _live if c.loop is not loop]:
        stale.abandon()
    for attempt in range(2):
        child = await _server.child() if await _server.ready() else _spawn()
        try:
            child.queue(request, fds)
            return child
        except OSError:  # a spare that died waiting: one more try
            child.kill()
            child.close()
            if attempt:
                raise BusError(errors.FAILED, DIED) from None
        except BaseException:
            child.kill()
            child.close()
            raise
    raise AssertionError("unreachable")


def _decode(data: bytes) -> Any:
    """A child's outcome: its result, or its error raised."""
    try:
        outcome = json.loads(data.lstrip(b"\0") or b"null")
    except ValueError:
        outcome = None
    if not isinstance(outcome, dict):
        raise BusError(errors.FAILED, DIED)
    if "result" in outcome:
        return outcome["result"]
    if "errno" in outcome:
        raise OSError(int(outcome["errno"]), str(outcome.get("message", "")))
    if "error" in outcome:
        raise BusError(str(outcome["error"]), str(outcome.get("message", "")))
    raise BusError(errors.FAILED, "Child failed.")


def _own(fds: Mapping[str, int] | None) -> dict[str, int]:
    """Copies of the caller's fds, taken before the first await: the caller may close its own."""
    return {name: os.dup(fd) for name, fd in (fds or {}).items()}


async def run_worker_with_fd(job: Job, timeout: float | None = None, fds: Mapping[str, int] | None = None,
                             **kwargs: Any) -> tuple[Any, int]:  # fmt: skip
    """Like :func:`run_worker`; the function gets ``fd_socket`` and sends one fd back over it."""
    result, got = await _run_limited(job, timeout, _own(fds), kwargs, True)
    if not got:
        raise BusError(errors.FAILED, "Child failed.")
    close_all(got[1:])
    return result, got[0]


async def run_worker(job: Job, timeout: float | None = None, fds: Mapping[str, int] | None = None,
                     shared: bool = False, **kwargs: Any) -> Any:  # fmt: skip
    """Run *job* (``function(**kwargs)``) in a child; return its result or raise its error.

    *fds* (name → fd) are passed to the function as keyword arguments, as its own fds;
    they are copied at once, the caller keeps its own. With *shared*, a call identical to
    one in flight waits for that one's outcome instead of starting a child of its own
    (for read-only probes without fds).
    """
    if not shared or fds:
        result, got = await _run_limited(job, timeout, _own(fds), kwargs, False)
        close_all(got)
        return result
    key = job.target + json.dumps(kwargs, sort_keys=True)
    return await _coalesced(key, lambda: _run_limited(job, timeout, {}, kwargs, False))


async def _coalesced(key: str, start: Callable[[], Any]) -> Any:
    future = _shared.get(key)
    if future is None:
        future = asyncio.ensure_future(start())
        _shared[key] = future

        def forget(f: asyncio.Future[Any]) -> None:
            if _shared.get(key) is f:
                del _shared[key]
            _retrieve(f)

        future.add_done_callback(forget)
    result, got = await asyncio.shield(future)
    close_all(got)  # none: calls that hand fds back are never shared
    return result


_T = TypeVar("_T")


async def _deadline(work: Awaitable[_T], timeout: float | None) -> _T:
    # (wait_for, not asyncio.timeout: handlers start outside any task, see bus.objects)
    try:
        return await asyncio.wait_for(work, timeout)
    except TimeoutError:
        raise BusError.from_errno(errno.ETIMEDOUT, "Timed out waiting for the child process") from None


async def _run_limited(job: Job, timeout: float | None, fds: dict[str, int], kwargs: dict[str, Any],
                       want_fd: bool) -> tuple[Any, list[int]]:  # fmt: skip
    """Run one child under the limit and the deadline; *fds* are ours (closed here)."""
    try:
        user = await caller.current_uid()
        nice = UNPRIVILEGED_NICENESS if user not in (None, 0) else 0
        message = request(job.target, kwargs, list(fds), nice, want_fd)

        async def run() -> tuple[Any, list[int]]:
            release = await children.acquire(user, of_caller=False)
            try:
                child = await _start_child(message, list(fds.values()))
            except BaseException:
                release()
                raise
            child.when_gone(release)  # the slot is held until it has exited
            try:
                await child.send()
                data = await child.output
                got = child.reader.take_fds()
            except BaseException:  # deadline or cancellation: the child goes with its caller
                child.kill()
                raise
            finally:
                child.close()
            try:
                return _decode(data), got
            except BaseException:
                close_all(got)
                raise

        return await _deadline(run(), timeout)
    finally:
        close_all(fds.values())


# ----- the child's side ----------------------------------------------------------------------

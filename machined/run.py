"""Run a command in a machine without a terminal (``machined run``; io.machined.Machine.Run).

The daemon holds nothing for the command and never waits for it. It asks a child of the fork
server (:func:`machined.children.client.run_worker_with_fd`, job ``RUN_SPAWN``: :func:`spawn`) to start a *runner*
and hands the caller one end of a ``SOCK_SEQPACKET`` socket pair, the runner holding the
other (the *control* socket). The runner, a process of its own (it outlives the job child):

1. moves itself into the cgroups the machine's leader is in (every hierarchy mounted here:
   cgroup2, and on the hybrid and legacy layouts the v1 ones), so that the machine's limits
   apply to the command and terminating the machine ends it (``.host``: the caller's cgroups);
2. enters the leader's namespaces through its pidfd (user if not ours, mount, PID, network,
   IPC, UTS, cgroup) and its root directory; looks the user up in the machine's
   ``/etc/passwd`` and ``/etc/group``; says it is ready (or why not: the caller's error);
3. waits for the caller's stdin, stdout and stderr, sent as descriptors over the control
   socket (never copied through the daemon or the runner);
4. forks the command (a session of its own, as the user, in the directory, with the
   environment) and waits for it or for the caller to go away: it then sends the command's
   exit status (or signal) over the control socket; if the caller goes away first, it kills
   the command's process group (SIGTERM, SIGKILL after :data:`KILL_GRACE`) unless detached.

Failures before the command runs are reported as the call's error; failures of exec (no such
program, no such directory) as an ``error`` message on the control socket (exit status 127 or
126, as shells give).

Core module: no D-Bus, no varlink. The parts that run in the child import nothing heavy.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import select
import signal
import socket
import struct
import time
from typing import Any

from machined.errors import BusError

log = logging.getLogger(__name__)

SPAWN_TIMEOUT = 20.0  # the runner's start, namespaces and user lookup
FDS_TIMEOUT = 30.0  # how long a runner waits for the caller's descriptors
KILL_GRACE = 3.0  # SIGTERM → SIGKILL when the caller went away
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

ERROR_PREFIX = "io.machined.Machine."
NO_SUCH_USER = ERROR_PREFIX + "NoSuchUser"

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
PR_SET_DUMPABLE = 4
_INT = struct.Struct("i")


# ----- the daemon's side -----------------------------------------------------------------------


async def start(machine: Any, argv: list[str], user: str, environment: list[str], directory: str, detach: bool,
                caller_pid: int) -> tuple[int, int]:  # fmt: skip
    """Start *argv* in *machine* (a container or ``.host``): (the runner's PID, the control socket)."""
    from machined.children import jobs
    from machined.children.client import run_worker_with_fd
    from machined.inside.looks import leader_pidfd

    kwargs: dict[str, Any] = {"argv": argv, "user": user, "environment": environment, "directory": directory,
                              "detach": detach}  # fmt: skip
    if machine.is_host:
        fd = os.pidfd_open(caller_pid)
        try:
            result, control = await run_worker_with_fd(jobs.RUN_SPAWN, SPAWN_TIMEOUT, {"leader_fd": fd},
                                                       leader=caller_pid, host=True, **kwargs)  # fmt: skip
        finally:
            os.close(fd)
    else:
        with leader_pidfd(machine) as fd:
            result, control = await run_worker_with_fd(jobs.RUN_SPAWN, SPAWN_TIMEOUT, {"leader_fd": fd},
                                                       leader=machine.leader, host=False, **kwargs)  # fmt: skip
    return int(result), control


# ----- .host as another user: a transient service of PID 1 -------------------------------------------

HOST_RUNS_MAX = 128  # commands started this way whose end the daemon waits for, at once
_host_runs: set[asyncio.Task[None]] = set()
EXIT_CHDIR, EXIT_EXEC, EXIT_USER = 200, 203, 217  # systemd's exit statuses of a failed start (exec, chdir, user)
CLD_EXITED, CLD_KILLED, CLD_DUMPED = 1, 2, 3


def is_host_user(user: str) -> bool:
    """Whether ``.host`` as *user* goes through PID 1: any user but root (machined's unit may not
    change UIDs: its capability bounding set is upstream's, without CAP_SETUID)."""
    return user not in ("", "root", "0")


Properties = list[tuple[str, str, Any]]  # (name, D-Bus signature, value)


def host_unit_properties(argv: list[str], user: str, environment: list[str], directory: str) -> Properties:
    """The transient service that runs *argv* on the host as *user*: the caller's descriptors
    (0, 1, 2 of the call's fds), its environment and directory; ended with its caller."""
    props: Properties = [
        ("Description", "s", f"machined run as {user}: {argv[0]}"[:200]),
        ("Type", "s", "exec"),
        ("User", "s", user),
        ("StandardInputFileDescriptor", "h", 0),
        ("StandardOutputFileDescriptor", "h", 1),
        ("StandardErrorFileDescriptor", "h", 2),
        ("WorkingDirectory", "s", directory or "-~"),
        ("IgnoreSIGPIPE", "b", False),
        ("KillMode", "s", "mixed"),
        ("CollectMode", "s", "inactive-or-failed"),
    ]
    if environment:
        props.append(("Environment", "as", list(environment)))
    # (ExecStartEx: its arguments as given, no $VARIABLE expanded by PID 1)
    props.append(("ExecStartEx", "a(sasas)", [(argv[0], list(argv), ["no-env-expand"])]))
    return props


def host_outcome(code: int, status: int, result: str, argv: list[str], directory: str) -> dict[str, Any]:
    """The control message for a service that ended with ExecMainCode *code*, ExecMainStatus
    *status* and Result *result*, as the runner words the same outcomes."""
    if code in (CLD_KILLED, CLD_DUMPED):
        return {"signal": status}
    if code == CLD_EXITED:
        if status == EXIT_EXEC:
            return {"error": f"{argv[0]}: could not be executed (status 203/EXEC)", "exit": 127}
        if status == EXIT_CHDIR:
            return {"error": f"{directory or '~'}: could not change into the directory (status 200/CHDIR)", "exit": 126}
        return {"exit": status}
    if result and result != "success":  # it never ran (PID 1 could not find or start it)
        return {"error": f"{argv[0]}: could not be started ({result})", "exit": 127}
    return {}  # (the client says it ended without a status)


async def _lookup_host_user(user: str) -> None:
    import pwd

    def lookup() -> None:
        if user.isdigit():
            pwd.getpwuid(int(user))
        else:
            pwd.getpwnam(user)

    try:
        await asyncio.to_thread(lookup)  # (NSS may ask a network service: never in the event loop)
    except (KeyError, OverflowError, ValueError):
        raise BusError(NO_SUCH_USER, f"No user '{user}'") from None


async def start_on_host(systemd: Any, argv: list[str], user: str, environment: list[str], directory: str,
                        detach: bool) -> int:  # fmt: skip
    """Start *argv* on the host as *user* through PID 1 (as upstream starts host shells); return the
    caller's end of the control socket (its protocol is the runner's). The daemon keeps the other
    end and one task per command, no process: it waits for the caller's descriptors, starts the
    service with them, and sends its exit status when PID 1 says it ended; a caller that goes
    away first stops the service, unless *detach*."""
    from machined.limits import LIMITS_EXCEEDED

    if not hasattr(systemd, "run_service"):
        raise BusError("org.freedesktop.DBus.Error.NotSupported", "No service manager to start the command")
    if len(_host_runs) >= HOST_RUNS_MAX:
        raise BusError(LIMITS_EXCEEDED, "Too many commands running on the host")
    await _lookup_host_user(user)
    theirs, mine = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    mine.setblocking(False)
    task = asyncio.get_running_loop().create_task(_host_run(systemd, mine, argv, user, environment, directory, detach))
    _host_runs.add(task)
    task.add_done_callback(_host_runs.discard)
    fd = theirs.detach()
    return fd


async def _receive_stdio_async(control: socket.socket) -> list[int] | None:
    loop = asyncio.get_running_loop()
    got: asyncio.Future[list[int] | None] = loop.create_future()

    def ready() -> None:
        try:
            data, ancdata, _, _ = control.recvmsg(4096, socket.CMSG_SPACE(3 * _INT.size), socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return
        except OSError:
            data, ancdata = b"", []
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(x for (x,) in _INT.iter_unpack(payload[: len(payload) - len(payload) % _INT.size]))
        if len(fds) != 3 or data != b"stdio":
            for fd in fds:
                os.close(fd)
            fds = []
        if not got.done():
            got.set_result(fds or None)
        else:
            for fd in fds:
                os.close(fd)

    loop.add_reader(control.fileno(), ready)
    try:
        return await asyncio.wait_for(got, FDS_TIMEOUT)
    except TimeoutError:
        return None
    finally:
        loop.remove_reader(control.fileno())


async def _gone(control: socket.socket) -> None:
    """Returns once the caller closed its end of *control* (what it sends meanwhile is dropped)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            if not await loop.sock_recv(control, 1):
                return
        except OSError:
            return


async def _host_run(systemd: Any, control: socket.socket, argv: list[str], user: str, environment: list[str],
                    directory: str, detach: bool) -> None:  # fmt: skip
    loop = asyncio.get_running_loop()
    name = f"machined-run-{os.urandom(8).hex()}.service"
    try:
        fds = await _receive_stdio_async(control)
        if fds is None:
            return
        props = host_unit_properties(argv, user, environment, directory)

        def close_fds() -> None:  # (once PID 1 has them: we must not hold the caller's pipes open)
            while fds:
                os.close(fds.pop())

        try:
            if detach:
                await systemd.run_service(name, props, fds, wait=False, sent=close_fds)
                return
            service = loop.create_task(systemd.run_service(name, props, fds, sent=close_fds))
            service.add_done_callback(lambda _t: close_fds())  # (cancelled before it started)
        except BaseException:
            close_fds()
            raise
        hangup = loop.create_task(_gone(control))
        try:
            await asyncio.wait({service, hangup}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not service.done():
                service.cancel()  # the caller went away: the service is stopped
            hangup.cancel()
        if service.cancelled():
            return
        try:
            code, status, result = service.result()
        except Exception as e:
            message: dict[str, Any] = {"error": f"The service manager could not start the command: {e}", "exit": 125}
        else:
            message = host_outcome(code, status, result, argv, directory)
        try:
            control.send(json.dumps(message).encode())
        except OSError:
            pass
    except Exception:
        log.exception("machined run on the host failed")
    finally:
        control.close()


# ----- in the fork server's child -----------------------------------------------------------------


def spawn(leader: int, leader_fd: int, fd_socket: int, host: bool, argv: list[str], user: str,
          environment: list[str], directory: str, detach: bool) -> int:  # fmt: skip
    """Fork the runner; return its PID once it is ready in the machine (or raise its error);
    hand the daemon the caller's end of the control socket."""
    from machined.children.wire import send_fd
    from machined.inside.nsprobe import open_leader_file

    with os.fdopen(open_leader_file(leader, leader_fd, "cgroup", os.O_RDONLY), encoding="utf-8") as f:
        procs = cgroup_procs_files(f.read(), _cgroup_mounts())
    theirs, mine = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the runner
        code = 1
        try:
            os.close(ready_r)
            theirs.close()
            _keep_only({leader_fd, mine.fileno(), ready_w})  # (the job socket: the daemon waits for its end)
            os.setsid()
            code = _runner(leader, leader_fd, host, procs, argv, user, environment, directory, detach, mine, ready_w)
        except BaseException as e:  # noqa: BLE001 (a child never returns into the server's code)
            _report(ready_w, e)
        finally:
            os._exit(code)
    os.close(ready_w)
    mine.close()
    try:
        outcome = _read_all(ready_r, SPAWN_TIMEOUT)
    finally:
        os.close(ready_r)
    try:
        message = json.loads(outcome or b"{}")
    except ValueError:
        message = {}
    if message.get("ready"):
        send_fd(fd_socket, theirs.fileno())
        theirs.close()
        return pid
    theirs.close()
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    if "error" in message:
        raise BusError(str(message["error"]), str(message.get("message", "")))
    if "errno" in message:
        raise OSError(int(message["errno"]), str(message.get("message", "")))
    raise BusError("org.freedesktop.DBus.Error.Failed", "The command's runner failed to start.")


def _keep_only(keep: set[int]) -> None:
    """Close every descriptor but *keep*; 0, 1 and 2 become /dev/null."""
    null = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        if target not in keep:
            os.dup2(null, target)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _read_all(fd: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        data = os.read(fd, 65536)
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def _report(ready_w: int, e: BaseException) -> None:
    if isinstance(e, BusError):
        message: dict[str, Any] = {"error": e.name, "message": e.message}
    elif isinstance(e, OSError):
        message = {"errno": e.errno or errno.EIO, "message": e.strerror or str(e)}
    else:
        message = {"errno": errno.EIO, "message": str(e)}
    try:
        os.write(ready_w, json.dumps(message).encode())
    except OSError:
        pass


# ----- cgroups ---------------------------------------------------------------------------------------


def _cgroup_mounts() -> list[tuple[str, frozenset[str], str, str]]:
    """The cgroup file systems mounted here and visible: (type, v1 controllers/name, mount root,
    mount point). A mount is hidden by a later one on its point or above it (a container manager
    may have mounted a tmpfs with other hierarchies over /sys/fs/cgroup)."""
    out: list[tuple[str, frozenset[str], str, str]] = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or len(tail) < 3:
                continue
            point = _unescape(fields[4])
            out = [m for m in out if not (m[3] == point or m[3].startswith(point.rstrip("/") + "/"))]
            if tail[0] not in ("cgroup", "cgroup2"):
                continue
            options = frozenset(o for o in tail[2].split(",") if o not in ("rw", "ro") and "=" not in o or
                                o.startswith("name="))  # fmt: skip
            out.append((tail[0], options, _unescape(fields[3]), point))
    return out


def _unescape(text: str) -> str:
    return text.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def cgroup_procs_files(proc_cgroup: str, mounts: list[tuple[str, frozenset[str], str, str]]) -> list[str]:
    """The ``cgroup.procs`` files that put a process where ``/proc/PID/cgroup`` (*proc_cgroup*)
    says another one is, in each hierarchy mounted here (*mounts*, see :func:`_cgroup_mounts`)."""
    files: list[str] = []
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        number, controllers, path = parts
        path = path.removesuffix(" (deleted)")
        wanted = frozenset(c for c in controllers.split(",") if c)
        for kind, options, root, point in mounts:
            if number == "0" and kind != "cgroup2":
                continue
            if number != "0" and (kind != "cgroup" or not wanted or not wanted <= options):
                continue
            if not (path == root or path.startswith(root.rstrip("/") + "/")):
                continue
            relative = path[len(root.rstrip("/")) :].lstrip("/")
            candidate = os.path.join(point, relative, "cgroup.procs")
            if not os.path.exists(candidate):
                continue  # (not this mount's: another of the same hierarchy may have it)
            if candidate not in files:
                files.append(candidate)
            break
    return files


# ----- the runner ---------------------------------------------------------------------------------------


def _runner(leader: int, leader_fd: int, host: bool, procs: list[str], argv: list[str], user: str,
            environment: list[str], directory: str, detach: bool, control: socket.socket,
            ready_w: int) -> int:  # fmt: skip
    for sig in (signal.SIGCHLD, signal.SIGPIPE, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for path in procs:
        with open(path, "w", encoding="ascii") as f:
            f.write("0\n")
    if not host:
        _enter(leader, leader_fd)
    os.close(leader_fd)
    account = lookup_user(user)
    os.write(ready_w, b'{"ready": true}')
    os.close(ready_w)
    control.setblocking(True)
    fds = _receive_stdio(control)
    if fds is None:
        return 1
    child_r, child_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(child_r)
            control.close()
            _exec(argv, account, environment, directory, fds, child_w)
        finally:
            os._exit(127)
    os.close(child_w)
    for fd in fds:
        os.close(fd)
    failure = _read_all(child_r, 60.0)  # empty once exec closed it
    os.close(child_r)
    if failure:
        _, status = os.waitpid(pid, 0)
        _send(control, json.loads(failure))
        return 0
    return _supervise(pid, control, detach)


def _enter(leader: int, leader_fd: int) -> None:
    """Into the leader's namespaces and root, as root there (dumpable no more)."""
    from machined.fs.libc import libc
    from machined.inside.nsprobe import open_leader_file, setns

    root = open_leader_file(leader, leader_fd, "root", os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
        for name, flag in (("user", CLONE_NEWUSER), ("cgroup", CLONE_NEWCGROUP)):
            ns = open_leader_file(leader, leader_fd, f"ns/{name}", os.O_RDONLY)
            try:
                if os.fstat(ns).st_ino != os.stat(f"/proc/self/ns/{name}").st_ino:
                    flags |= flag  # (joining our own user namespace would be EINVAL)
            finally:
                os.close(ns)
        setns(leader_fd, flags)
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        os.fchdir(root)
        os.chroot(".")
        os.chdir("/")
        if flags & CLONE_NEWUSER:
            os.setgroups([])
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
    finally:
        os.close(root)


class Account:
    def __init__(self, name: str, uid: int, gid: int, home: str, shell: str, groups: list[int]) -> None:
        self.name, self.uid, self.gid, self.home, self.shell, self.groups = name, uid, gid, home, shell, groups


def _read_lines(path: str) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n").split(":") for line in f if line.strip() and not line.startswith("#")]
    except OSError:
        return []


def lookup_user(user: str) -> Account:
    """*user* (a name or a UID; root when empty) in this root's /etc/passwd and /etc/group."""
    user = user or "root"
    rows = [r for r in _read_lines("/etc/passwd") if len(r) >= 7]
    row = next((r for r in rows if r[0] == user), None)
    if row is None and user.isdigit():
        row = next((r for r in rows if r[2] == user), None)
        if row is None:
            uid = int(user)
            return Account(user, uid, uid, "/", "/bin/sh", [])
    if row is None:
        if user == "root":
            return Account("root", 0, 0, "/root", "/bin/sh", [])
        raise BusError(NO_SUCH_USER, f"No user '{user}' in the machine")
    name, uid, gid = row[0], int(row[2]), int(row[3])
    groups = sorted({int(g[2]) for g in _read_lines("/etc/group")
                     if len(g) >= 4 and g[2].isdigit() and name in g[3].split(",")} | {gid})  # fmt: skip
    return Account(name, uid, gid, row[5] or "/", row[6] or "/bin/sh", groups)


def _receive_stdio(control: socket.socket) -> list[int] | None:
    """The caller's stdin, stdout and stderr; None if it went away or sent something else."""
    ready, _, _ = select.select([control], [], [], FDS_TIMEOUT)
    if not ready:
        return None
    try:
        data, ancdata, _, _ = control.recvmsg(4096, socket.CMSG_SPACE(3 * _INT.size), socket.MSG_CMSG_CLOEXEC)
    except OSError:
        return None
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(x for (x,) in _INT.iter_unpack(payload[: len(payload) - len(payload) % _INT.size]))
    if len(fds) != 3 or data != b"stdio":
        for fd in fds:
            os.close(fd)
        return None
    return fds


def _exec(argv: list[str], account: Account, environment: list[str], directory: str, fds: list[int],
          failure_w: int) -> None:  # fmt: skip
    """In the command's process: its session, descriptors, user, directory, environment; exec."""
    step = "setsid"
    try:
        os.setsid()
        step = "descriptors"
        for target, fd in enumerate(fds):
            os.dup2(fd, target, inheritable=True)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        step = "user"
        os.setgroups(account.groups)
        os.setresgid(account.gid, account.gid, account.gid)
        os.setresuid(account.uid, account.uid, account.uid)
        env = {"PATH": DEFAULT_PATH, "HOME": account.home, "USER": account.name, "LOGNAME": account.name,
               "SHELL": account.shell}  # fmt: skip
        for entry in environment:
            key, _, value = entry.partition("=")
            env[key] = value
        step = "directory"
        if directory:
            os.chdir(directory)
        else:
            try:
                os.chdir(account.home)
            except OSError:
                os.chdir("/")
        step = "exec"
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        what = {"exec": argv[0], "directory": directory or account.home, "user": account.name}.get(step, step)
        code = 127 if step == "exec" and e.errno == errno.ENOENT else 126 if step == "exec" else 125
        os.write(failure_w, json.dumps({"error": f"{what}: {e.strerror}", "errno": e.errno, "exit": code}).encode())


def _send(control: socket.socket, message: dict[str, Any]) -> None:
    try:
        control.send(json.dumps(message).encode())
    except OSError:
        pass


def _supervise(pid: int, control: socket.socket, detach: bool) -> int:
    """Wait for the command, or for the caller to go away (then end the command unless *detach*)."""
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(control.fileno(), select.POLLIN | select.POLLHUP)
    caller_here = True
    while True:
        for fd, _ in poller.poll():
            if fd == pidfd:
                _, status = os.waitpid(pid, 0)
                if caller_here:
                    if os.WIFSIGNALED(status):
                        _send(control, {"signal": os.WTERMSIG(status)})
                    else:
                        _send(control, {"exit": os.waitstatus_to_exitcode(status)})
                return 0
            # the caller went away (or sent what it should not: the same)
            poller.unregister(control.fileno())
            caller_here = False
            control.close()
            if not detach:
                _end(pid, pidfd)
                os.waitpid(pid, 0)
                return 0


def _end(pid: int, pidfd: int) -> None:
    """SIGTERM to the command's process group, SIGKILL after :data:`KILL_GRACE`."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pid, sig)
        except OSError:
            pass
        if wait and select.select([pidfd], [], [], wait)[0]:
            try:
                os.killpg(pid, signal.SIGKILL)  # the rest of its group
            except OSError:
                pass
            return

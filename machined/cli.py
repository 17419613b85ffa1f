"""Command line of the daemon: arguments, logging, exit codes; no logic."""

from __future__ import annotations

from machined import lean  # noqa: F401  (first: asyncio and dbus-fast without OpenSSL)

# isort: split
import argparse
import asyncio
import logging
import os
import socket
import sys
from collections.abc import Iterator

from machined import __version__, personality
from machined.daemon import IDENTIFIER, STATE_DIR, USERDB_SOCKET, Daemon, StartupError


def setup_logging(level: str) -> None:
    """journald (structured) when systemd started us, plain stderr otherwise."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    handler: logging.Handler | None = None
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        try:
            from machined.journal import JournalHandler

            handler = JournalHandler(SYSLOG_IDENTIFIER=IDENTIFIER)
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{IDENTIFIER}: %(message)s"))
    root.addHandler(handler)


METRICS_PORT = 9765
METRICS_LISTEN = f"127.0.0.1:{METRICS_PORT}"


def listen_address(text: str) -> tuple[str, int]:
    """``PORT`` (on 127.0.0.1), ``HOST:PORT`` or ``[IPV6]:PORT`` → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise argparse.ArgumentTypeError(f"'{text}': write an IPv6 address in brackets, as [::1]:{port}")
    if not host:
        raise argparse.ArgumentTypeError(
            f"'{text}': name the address to listen on (127.0.0.1:{port}; 0.0.0.0:{port} or [::]:{port} for all)"
        )
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"'{text}': the port must be a number from 0 to 65535")
    return host, number


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"'{text}': a positive number of seconds")
    return value


M_MMAP_THRESHOLD = -3
LARGE_ALLOCATION = 128 * 1024


def return_large_buffers_to_the_system() -> None:
    """Give every large allocation its own mapping, unmapped when freed.

    glibc raises its mmap threshold each time a mapped block is freed (up to 32 MiB), so
    after one large message the next ones come from the heap and their memory is kept
    for good; a fixed threshold keeps the daemon near its idle size after large calls.
    """
    try:
        from machined.fs.libc import libc

        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return  # not glibc
    mallopt(M_MMAP_THRESHOLD, LARGE_ALLOCATION)


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] in ("install", "uninstall"):
        from machined.install import main as install_main  # the daemon itself never loads it

        return install_main(words)
    if words and words[0] == "events":
        return events_main(words[1:])
    if words and words[0] == "run":
        return run_main(words[1:])
    parser = argparse.ArgumentParser(
        prog="machined",
        description="Virtual machine and container registration service (org.freedesktop.machine1).",
        epilog="'machined install' puts machined in place of systemd-machined on this host; "
        "'machined uninstall' goes back (see 'machined install --help'). "
        "'machined events' watches machines come, change state and go; 'machined run' runs a command in a "
        "machine without a terminal (see their --help).",
    )
    parser.add_argument("--bus-address", help="connect to this D-Bus address instead of the system bus")
    parser.add_argument(
        "--state-dir",
        default=STATE_DIR,
        help="where machine state files are kept (default: %(default)s; clients read them there)",
    )
    parser.add_argument(
        "--userdb-socket",
        default=USERDB_SOCKET,
        help="varlink socket serving container users and groups (default: %(default)s; '' for none)",
    )
    parser.add_argument(
        "--machine-socket",
        default=None,
        help="varlink socket serving io.systemd.Machine and io.systemd.MachineImage (default: the socket "
        "systemd passes, else /run/systemd/machine/io.systemd.Machine on the system bus only; '' for none)",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("MACHINED_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    parser.add_argument(
        "--metrics-listen",
        metavar="ADDR",
        nargs="?",
        const=("127.0.0.1", METRICS_PORT),  # (argparse does not convert a const)
        type=listen_address,
        help=f"serve Prometheus metrics over HTTP on ADDR: PORT, HOST:PORT or [IPV6]:PORT "
        f"(without ADDR: {METRICS_LISTEN}; default: off)",
    )
    parser.add_argument(
        "--metrics-textfile",
        metavar="PATH",
        help="write Prometheus metrics to PATH (ending in .prom, for node_exporter's textfile collector)",
    )
    parser.add_argument(
        "--metrics-interval",
        metavar="SECONDS",
        type=positive_seconds,
        default=15.0,
        help="how often --metrics-textfile is rewritten (default: %(default)s)",
    )
    parser.add_argument(
        "--personality",
        choices=personality.CHOICES,
        default=personality.AUTO,
        help="behave as systemd-machined 252 or 262 (default: %(default)s, as the systemd PID 1 is: 257 and "
        "later as 262)",
    )
    parser.add_argument(
        "--user",
        action="store_true",
        help="serve the calling user only, as systemd 262's 'systemd-machined --user': on the user's bus and "
        "$XDG_RUNTIME_DIR/systemd/machine/io.systemd.Machine, machines' scopes in the user's service manager, "
        "state files in $XDG_RUNTIME_DIR/systemd/machines, images in the user's directories",
    )
    parser.add_argument(
        "--register-oci",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="register podman's and docker's containers as machines (default: off, or RegisterOCI= in the "
        "configuration file)",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help="configuration file (default: /etc/machined/machined.conf, if it exists)",
    )
    parser.add_argument("--version", action="version", version=f"machined {__version__}")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    return_large_buffers_to_the_system()
    try:
        from machined import config

        try:
            conf = config.load(args.config or config.CONFIG_FILE, required=args.config is not None)
        except config.ConfigError as e:
            raise StartupError(str(e)) from None
        register_oci = conf.register_oci if args.register_oci is None else args.register_oci
        user = None
        if args.user:
            from machined.userscope import UserScopeError, from_environment

            try:
                user = from_environment()
            except UserScopeError as e:
                raise StartupError(str(e)) from None
        daemon = Daemon(
            bus_address=args.bus_address,
            state_dir=args.state_dir,
            userdb_socket=args.userdb_socket,
            machine_socket=args.machine_socket,
            metrics_listen=args.metrics_listen,
            metrics_textfile=args.metrics_textfile,
            metrics_interval=args.metrics_interval,
            personality=args.personality,
            user=user,
            register_oci=register_oci and user is None,
        )
        return asyncio.run(daemon.run())
    except StartupError as e:
        logging.getLogger("machined").error("%s", e)
        return 1
    except KeyboardInterrupt:
        return 0


# ----- machined events: a client of io.machined.Machine ------------------------------------------


def ours_socket(user: bool) -> str:
    """Where io.machined.Machine is served: the system's, or (--user) the calling user's instance's."""
    from machined.varlink import ours

    if not user:
        return ours.SOCKET
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return ours.user_socket(runtime_dir)


class VarlinkClientError(Exception):
    def __init__(self, name: str, parameters: dict[str, object]) -> None:
        super().__init__(name)
        self.name = name
        self.parameters = parameters


def connect_ours(path: str, user: bool) -> socket.socket:
    """A connection to io.machined.Machine at *path*. Its socket exists while machined runs; if it
    is not there yet, machined is started as any client of upstream's starts it (its varlink socket,
    262's socket activation; else a D-Bus call, bus activation), then waited for (5 s at most)."""
    import time

    for attempt in range(2):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if attempt:
                raise
        _activate(user)
        deadline = time.monotonic() + 5.0
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
    raise AssertionError("unreachable")


def _activate(user: bool) -> None:
    import subprocess

    if user:
        runtime_dir = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
        upstream = os.path.join(runtime_dir, "systemd", "machine", "io.systemd.Machine")
    else:
        upstream = "/run/systemd/machine/io.systemd.Machine"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(5.0)
            s.connect(upstream)
            s.sendall(b'{"method":"org.varlink.service.GetInfo"}\0')
            s.recv(65536)
            return
    except OSError:
        pass
    bus = ["busctl", "--user"] if user else ["busctl"]
    try:
        subprocess.run([*bus, "call", "org.freedesktop.machine1", "/org/freedesktop/machine1",
                        "org.freedesktop.DBus.Peer", "Ping"], capture_output=True, timeout=10, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        pass


def varlink_stream(path: str, method: str, parameters: dict[str, object], user: bool = False
                   ) -> Iterator[dict[str, object]]:  # fmt: skip
    """Call *method* with ``more`` on the socket *path*; yield each reply's parameters; raise
    :class:`VarlinkClientError` for an error reply, OSError if the socket cannot be reached."""
    import json

    sock = connect_ours(path, user)
    try:
        sock.sendall(json.dumps({"method": method, "parameters": parameters, "more": True}).encode() + b"\0")
        buffer = b""
        while True:
            end = buffer.find(b"\0")
            if end < 0:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionResetError("the service closed the connection")
                buffer += data
                continue
            message = json.loads(buffer[:end])
            buffer = buffer[end + 1 :]
            if "error" in message:
                raise VarlinkClientError(str(message["error"]), message.get("parameters") or {})
            yield message.get("parameters") or {}
            if not message.get("continues"):
                return
    finally:
        sock.close()


def _event_line(event: dict[str, object]) -> str:
    import datetime

    stamp = event.get("timestamp")
    realtime = stamp.get("realtime", 0) if isinstance(stamp, dict) else 0
    when = datetime.datetime.fromtimestamp(int(realtime) / 1e6, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    leader = event.get("leader")
    changed = event.get("changed")
    text = (f"{event.get('sequence')!s:>6} {when} {event.get('type')!s:<8} {event.get('name')!s:<24} "
            f"{event.get('class')!s:<9} {event.get('state')!s:<7} {leader if leader else '-'!s:>7} "
            f"{event.get('unit') or '-'}")  # fmt: skip
    if isinstance(changed, list) and changed:
        text += " changed=" + ",".join(str(c) for c in changed)
    addresses = event.get("addresses")
    if isinstance(addresses, list):
        text += " addresses=" + (",".join(_address_text(a) for a in addresses if isinstance(a, dict)) or "-")
    return text


def _address_text(address: dict[str, object]) -> str:
    """One address of an event as ``ADDRESS%IFINDEX``."""
    import ipaddress
    import socket

    raw = address.get("address")
    try:
        text = str(ipaddress.ip_address(bytes(raw))) if isinstance(raw, list) else "?"
    except ValueError:
        text = "?"
    if address.get("family") == socket.AF_INET6 and not text.startswith("?"):
        text = f"[{text}]"
    index = address.get("ifindex")
    return f"{text}%{index}" if index else text


def events_main(argv: list[str]) -> int:
    """``machined events``: every machine, then one line per change, until interrupted."""
    import json

    parser = argparse.ArgumentParser(
        prog="machined events",
        description="Watch machines: first every current machine ('existing'), then one line per event "
        "('new', 'state': opening, running, closing, 'changed': leader, unit or addresses, 'removed'), each with its "
        "sequence number and time, as io.machined.Machine.Watch reports them.",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line (the Watch replies)")
    parser.add_argument("--user", action="store_true", help="watch the calling user's instance (machined --user)")
    args = parser.parse_args(argv)
    path = ours_socket(args.user)
    try:
        if not args.json:
            print(f"{'SEQ':>6} {'TIME':<27} {'TYPE':<8} {'NAME':<24} {'CLASS':<9} {'STATE':<7} {'LEADER':>7} UNIT",
                  flush=True)  # fmt: skip
        for event in varlink_stream(path, "io.machined.Machine.Watch", {}, args.user):
            print(json.dumps(event) if args.json else _event_line(event), flush=True)
    except VarlinkClientError as e:
        if e.name == "io.machined.Machine.Overflow":
            print(f"machined events: this watcher did not keep up; events from {e.parameters.get('lostSequence')} "
                  "on were not sent to it. Watch again.", file=sys.stderr)  # fmt: skip
        else:
            print(f"machined events: {e.name} {json.dumps(e.parameters)}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 0
    except OSError as e:
        print(f"machined events: cannot watch through {path}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


# ----- machined run ----------------------------------------------------------------------------------

RUN_FAILED = 125  # the command could not be started (126 and 127: as shells, it could not be executed)

_RUN_ERRORS = {
    "io.machined.Machine.NoSuchMachine": "No machine '{name}' known.",
    "io.machined.Machine.NotSupported": "'{name}' is a virtual machine: machined run enters containers and .host only "
    "(a VM has no namespaces to enter; use its SSH or agent).",
    "io.machined.Machine.NoSuchUser": "No user '{user}' in machine '{name}'.",
    "io.systemd.InteractiveAuthenticationRequired": "Access denied: polkit's org.freedesktop.machine1.shell asks for "
    "interactive authentication, which machined run does not do (run it as root).",
    "org.varlink.service.PermissionDenied": "Access denied (polkit's org.freedesktop.machine1.shell).",
    "org.varlink.service.InvalidParameter": "Invalid {parameter}.",
}


def varlink_call_with_fds(path: str, method: str, parameters: dict[str, object], user: bool = False
                          ) -> tuple[dict[str, object], list[int]]:  # fmt: skip
    """One call on *path*: its reply's parameters and the descriptors that came with it."""
    import array
    import json

    sock = connect_ours(path, user)
    fds: list[int] = []
    try:
        sock.sendall(json.dumps({"method": method, "parameters": parameters}).encode() + b"\0")
        buffer = b""
        while b"\0" not in buffer:
            data, ancdata, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(16 * 4), socket.MSG_CMSG_CLOEXEC)
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                    fds.extend(got)
            if not data:
                raise ConnectionResetError("the service closed the connection")
            buffer += data
        message = json.loads(buffer[: buffer.index(b"\0")])
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        sock.close()
    if "error" in message:
        for fd in fds:
            os.close(fd)
        raise VarlinkClientError(str(message["error"]), message.get("parameters") or {})
    return message.get("parameters") or {}, fds


def run_main(argv: list[str]) -> int:
    """``machined run NAME [options] [--] CMD [ARGS...]``: CMD's exit status (128+N if killed by signal N)."""
    import array
    import json

    parser = argparse.ArgumentParser(
        prog="machined run",
        description="Run CMD in machine NAME (a container or .host) without a terminal: in all of its namespaces "
        "and its root, in its cgroup, with this command's stdin, stdout and stderr (passed as descriptors). "
        "Exits with CMD's exit status (128+N if a signal N killed it; 125 if it could not be started, 126 if it "
        "could not be executed, 127 if it was not found).",
    )
    parser.add_argument("--uid", metavar="USER", default="", help="run as USER of the machine (default: root)")
    parser.add_argument("--setenv", metavar="NAME=VALUE", action="append", default=[], help="set a variable")
    parser.add_argument("--chdir", metavar="DIR", default="", help="working directory (default: USER's home)")
    parser.add_argument("--detach", action="store_true", help="return once CMD started; CMD is left running")
    parser.add_argument("--user", action="store_true", help="a machine of the calling user's instance")
    parser.add_argument("name", metavar="NAME")
    parser.add_argument("command", metavar="CMD", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("CMD is required")
    path = ours_socket(args.user)
    parameters: dict[str, object] = {"name": args.name, "command": command}
    if args.uid:
        parameters["user"] = args.uid
    if args.setenv:
        parameters["environment"] = args.setenv
    if args.chdir:
        parameters["directory"] = args.chdir
    if args.detach:
        parameters["detach"] = True
    try:
        reply, fds = varlink_call_with_fds(path, "io.machined.Machine.Run", parameters, args.user)
    except VarlinkClientError as e:
        template = _RUN_ERRORS.get(e.name)
        if template is not None:
            text = template.format(name=args.name, user=args.uid, parameter=e.parameters.get("parameter"))
        else:
            text = e.name + (" " + json.dumps(e.parameters) if e.parameters else "")
        print("machined run: " + text, file=sys.stderr)
        return RUN_FAILED
    except OSError as e:
        print(f"machined run: cannot reach {path}: {e.strerror or e}", file=sys.stderr)
        return RUN_FAILED
    index = reply.get("controlFileDescriptor")
    if not isinstance(index, int) or not 0 <= index < len(fds):
        print("machined run: the service sent no control socket", file=sys.stderr)
        return RUN_FAILED
    control = socket.socket(fileno=os.dup(fds[index]))
    for fd in fds:
        os.close(fd)
    try:
        control.sendmsg([b"stdio"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
        if args.detach:
            return 0
        data = control.recv(65536)
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        print(f"machined run: lost the command: {e.strerror or e}", file=sys.stderr)
        return RUN_FAILED
    finally:
        control.close()
    try:
        outcome = json.loads(data) if data else {}
    except ValueError:
        outcome = {}
    if "signal" in outcome:
        return 128 + int(outcome["signal"])
    if "exit" in outcome and "error" not in outcome:
        return int(outcome["exit"]) & 0xFF
    if "error" in outcome:
        print(f"machined run: {outcome['error']}", file=sys.stderr)
        return int(outcome.get("exit", RUN_FAILED))
    print("machined run: the command ended without a status (its machine ended it?)", file=sys.stderr)
    return 128 + 9


if __name__ == "__main__":
    sys.exit(main())

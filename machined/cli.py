"""Command line of the daemon: arguments, logging, exit codes; no logic."""

from __future__ import annotations

from machined import lean  # noqa: F401  (first: asyncio and dbus-fast without OpenSSL)

# isort: split
import argparse
import asyncio
import ctypes
import logging
import os
import sys

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
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return  # not glibc
    mallopt(M_MMAP_THRESHOLD, LARGE_ALLOCATION)


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] in ("install", "uninstall"):
        from machined.install import main as install_main  # the daemon itself never loads it

        return install_main(words)
    parser = argparse.ArgumentParser(
        prog="machined",
        description="Virtual machine and container registration service (org.freedesktop.machine1).",
        epilog="'machined install' puts machined in place of systemd-machined on this host; "
        "'machined uninstall' goes back (see 'machined install --help').",
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
    parser.add_argument("--version", action="version", version=f"machined {__version__}")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    return_large_buffers_to_the_system()
    try:
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
        )
        return asyncio.run(daemon.run())
    except StartupError as e:
        logging.getLogger("machined").error("%s", e)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

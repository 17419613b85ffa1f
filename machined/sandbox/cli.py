"""``machined-sandbox``: start, enter, list and stop sandboxes with a real systemd."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from machined.sandbox.core import CGROUP_ENV, LAYOUTS, SYSTEMD_VERSIONS, Sandbox, SandboxError

CGROUP_HELP = (
    "cgroup layout inside: hybrid (name=systemd v1 + cgroup2 at unified/) or unified "
    f"(cgroup2 only at /sys/fs/cgroup); default ${CGROUP_ENV}, else the host's; "
    "a systemd-262 sandbox is always unified"
)
SYSTEMD_HELP = (
    "252: the host's systemd on the host's file systems (read-only); 262: the Debian forky "
    "root cached by 'build-root' (built on first use), booted as an overlay"
)


def _pick(sandbox_id: str | None) -> Sandbox:
    if sandbox_id:
        return Sandbox.attach(sandbox_id)
    running = [info for info, alive in Sandbox.list() if alive]
    if len(running) == 1:
        return Sandbox.attach(running[0].id)
    if not running:
        raise SandboxError("no sandbox is running (start one with 'machined-sandbox start')")
    ids = ", ".join(i.id for i in running)
    raise SandboxError(f"several sandboxes are running ({ids}): name one")


def cmd_start(args: argparse.Namespace) -> int:
    sb = Sandbox(
        args.impl, cgroup=args.cgroup, systemd=args.systemd, oci=args.oci, machined_args=args.machined_arg or ()
    ).start()
    print(sb.id)
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    if not args.command:
        raise SandboxError("exec needs a command: machined-sandbox exec ID -- CMD [ARGS...]")
    return _pick(args.id).interactive(args.command)


def cmd_shell(args: argparse.Namespace) -> int:
    sb = _pick(args.id)
    print(f"Entering sandbox {sb.id} ({sb.info.impl}); 'exit' leaves it running.", file=sys.stderr)
    return sb.interactive(["/bin/bash", "-l"])


def cmd_stop(args: argparse.Namespace) -> int:
    if args.all:
        targets = [Sandbox.attach(info.id) for info, _ in Sandbox.list()]
    else:
        targets = [_pick(args.id)]
    for sb in targets:
        sb.stop()
        print(f"stopped {sb.id}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    rows = Sandbox.list()
    print(f"{'ID':<10} {'IMPL':<5} {'CGROUP':<8} {'SYSTEMD':<7} {'INIT PID':>8}  STATE")
    for info, alive in rows:
        state = "running" if alive else "dead"
        print(f"{info.id:<10} {info.impl:<5} {info.cgroup:<8} {info.systemd:<7} {info.init_pid:>8}  {state}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if not args.command:
        raise SandboxError("run needs a command: machined-sandbox run [--impl X] -- CMD [ARGS...]")
    with Sandbox(
        args.impl, cgroup=args.cgroup, systemd=args.systemd, oci=args.oci, machined_args=args.machined_arg or ()
    ) as sb:
        return sb.interactive(args.command)


def cmd_build_root(args: argparse.Namespace) -> int:
    from machined.sandbox.root import RootError, cached_root, ensure_root

    if os.geteuid() != 0:
        raise SandboxError("build-root must run as root")
    before = None if args.rebuild else cached_root()
    try:
        root = ensure_root(log=lambda line: print(f"machined-sandbox: {line}", file=sys.stderr), rebuild=args.rebuild)
    except RootError as e:
        raise SandboxError(str(e)) from None
    m = root.manifest
    state = "cached" if before is not None else "built"
    print(
        f"{root.rootfs}: {state}; systemd {root.systemd_version}, {len(m.get('packages', {}))} packages, "
        f"{m.get('size_bytes', 0) / 2**20:.0f} MiB, built {m.get('built')} in {m.get('build_seconds')} s "
        f"from {m.get('mirror')}"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from machined.sandbox.demo import demo

    return demo(args.id_file, args.systemd)


def _add_extras(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--oci",
        action="store_true",
        help="podman and docker usable inside (root, systemd cgroup manager; storage on the sandbox's tmpfs; "
        "the hybrid layout cannot run their containers)",
    )
    s.add_argument(
        "--machined-arg",
        action="append",
        metavar="ARG",
        help="add ARG to our machined's command line (repeatable; --impl ours), e.g. --machined-arg=--register-oci",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="machined-sandbox",
        description="Boot a real systemd as PID 1 in fresh namespaces, with machined "
        "(--impl ours) or systemd-machined (--impl real) serving org.freedesktop.machine1.",
    )
    sub = p.add_subparsers(dest="verb", required=True)

    s = sub.add_parser("start", help="boot a sandbox and print its id")
    s.add_argument("--impl", choices=["ours", "real"], default="ours")
    s.add_argument("--cgroup", choices=list(LAYOUTS), default=None, help=CGROUP_HELP)
    s.add_argument("--systemd", choices=list(SYSTEMD_VERSIONS), default="252", help=SYSTEMD_HELP)
    _add_extras(s)
    s.set_defaults(func=cmd_start)

    s = sub.add_parser("exec", help="run a command inside a sandbox")
    s.add_argument("id", nargs="?")
    s.add_argument("command", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_exec)

    s = sub.add_parser("shell", help="open an interactive shell inside a sandbox")
    s.add_argument("id", nargs="?")
    s.set_defaults(func=cmd_shell)

    s = sub.add_parser("stop", help="power a sandbox off and remove every trace of it")
    s.add_argument("id", nargs="?")
    s.add_argument("--all", action="store_true", help="stop every sandbox on this host")
    s.set_defaults(func=cmd_stop)

    s = sub.add_parser("list", help="list sandboxes")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("run", help="boot a sandbox, run one command in it, tear it down")
    s.add_argument("--impl", choices=["ours", "real"], default="ours")
    s.add_argument("--cgroup", choices=list(LAYOUTS), default=None, help=CGROUP_HELP)
    s.add_argument("--systemd", choices=list(SYSTEMD_VERSIONS), default="252", help=SYSTEMD_HELP)
    _add_extras(s)
    s.add_argument("command", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser(
        "build-root",
        help="build (or show) the cached Debian forky root that systemd-262 sandboxes boot",
    )
    s.add_argument("--rebuild", action="store_true", help="build it again even if it is cached")
    s.set_defaults(func=cmd_build_root)

    s = sub.add_parser("demo", help="boot a sandbox with machined and show real clients using it")
    s.add_argument("--id-file", help="write the sandbox id to this file")
    s.add_argument("--systemd", choices=["262"], help="boot systemd 262 from the cached Debian forky root")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except SandboxError as e:
        print(f"machined-sandbox: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("machined-sandbox: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

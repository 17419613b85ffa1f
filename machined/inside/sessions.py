"""Login and shell sessions on a PTY, started by the service manager of the host or a container.

What OpenLogin and OpenShell ask systemd for: ``container-getty@N.service``, or
a transient ``container-shell@N.service`` running the requested program on the
PTY's slave, with upstream's unit properties.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from dbus_fast import Variant
from dbus_fast.aio import MessageBus

from machined.clients.bus import call_method


def shell_properties(user: str, pty_path: str, path: str, argv: list[str], env: list[str]) -> list[list[Any]]:
    """Properties of the transient shell unit; fd index 0 is the PTY slave."""
    props: list[list[Any]] = [
        ["Description", Variant("s", f"Shell for User {user}")],
        ["StandardInputFileDescriptor", Variant("h", 0)],
        ["StandardOutputFileDescriptor", Variant("h", 0)],
        ["StandardErrorFileDescriptor", Variant("h", 0)],
        ["SendSIGHUP", Variant("b", True)],
        ["IgnoreSIGPIPE", Variant("b", False)],
        ["KillMode", Variant("s", "mixed")],
        ["TTYPath", Variant("s", pty_path)],
        ["TTYReset", Variant("b", True)],
        ["UtmpIdentifier", Variant("s", pty_path.removeprefix("/dev/"))],
        ["UtmpMode", Variant("s", "user")],
        ["PAMName", Variant("s", "login")],
        ["WorkingDirectory", Variant("s", "-~")],
        ["User", Variant("s", user)],
    ]
    if env:
        props.append(["Environment", Variant("as", list(env))])
    props.append(["ExecStart", Variant("a(sasb)", [[path, argv, True]])])
    return props


# Calls PID 1's manager: (member, signature, body, unix fds).
ManagerCall = Callable[[str, str, list[Any], list[int] | None], Awaitable[None]]


def manager_call(bus: MessageBus) -> ManagerCall:
    """A plain :data:`ManagerCall` on *bus* (a container's own bus, from a worker child)."""

    async def call(member: str, signature: str, body: list[Any], unix_fds: list[int] | None) -> None:
        await call_method(bus, "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                          "org.freedesktop.systemd1.Manager", member, signature, body, unix_fds)  # fmt: skip

    return call


async def start_login(call: ManagerCall, pty_path: str) -> None:
    number = pty_path.removeprefix("/dev/pts/")
    await call("StartUnit", "ss", [f"container-getty@{number}.service", "replace"], None)


async def start_shell(call: ManagerCall, slave: int, pty_path: str, user: str, path: str, argv: list[str],
                      env: list[str]) -> None:  # fmt: skip
    number = pty_path.removeprefix("/dev/pts/")
    props = shell_properties(user, pty_path, path, argv, env)
    await call("StartTransientUnit", "ssa(sv)a(sa(sv))", [f"container-shell@{number}.service", "fail", props, []],
               [slave])  # fmt: skip

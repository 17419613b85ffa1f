"""Calls on a machine's inside that both front-ends make, in upstream's order: check the
arguments, have the caller authorized, act through :class:`~machined.inside.access.MachineAccess`.

Terminals (a PTY, a login prompt, a shell), the root directory, bind mounts and copies.
Transport-neutral like :mod:`machined.lifecycle`: the caller is authorized through an
:data:`~machined.caller.Authorize`; errors are :class:`~machined.errors.BusError` with
252's D-Bus names and messages, which the varlink front-end maps to 262's errors.
"""

from __future__ import annotations

import errno

from machined import errors
from machined.caller import Authorize
from machined.envfile import env_is_valid
from machined.errors import BusError
from machined.inside.access import MachineAccess
from machined.inside.shell import shell_command
from machined.machine import Machine, MachineClass
from machined.naming import path_is_normalized_absolute


async def open_pty(access: MachineAccess, machine: Machine, authorize: Authorize) -> tuple[int, str]:
    await authorize("host-open-pty" if machine.is_host else "open-pty", {"machine": machine.name})
    return await access.open_pty(machine)


async def open_login(access: MachineAccess, machine: Machine, authorize: Authorize) -> tuple[int, str]:
    await authorize(
        "host-login" if machine.is_host else "login",
        {"machine": machine.name, "verb": "login"},
    )
    return await access.open_login(machine)


def shell_arguments(user: str, path: str, args: list[str], env: list[str]) -> tuple[str, str, list[str]]:
    """(user, program, argv) of a shell request, or the error upstream gives first."""
    user = user or "root"
    if path and not path.startswith("/"):
        raise BusError(
            errors.INVALID_ARGS,
            f"Specified path '{path}' is not absolute",
            parameter="path",
        )
    program, argv = shell_command(user, path, args)
    if not env_is_valid(env):
        raise BusError(
            errors.INVALID_ARGS,
            "Invalid environment assignments",
            parameter="environment",
        )
    return user, program, argv


async def open_shell(access: MachineAccess, machine: Machine, user: str, path: str, args: list[str], env: list[str],
                     authorize: Authorize) -> tuple[int, str]:  # fmt: skip
    user, program, argv = shell_arguments(user, path, args, env)
    await authorize("host-shell" if machine.is_host else "shell",
                    {"machine": machine.name, "user": user, "program": program})  # fmt: skip
    return await access.open_shell(machine, user, program, argv, env)


async def open_root_directory(access: MachineAccess, machine: Machine, authorize: Authorize) -> int:
    await authorize("manage-machines", {"machine": machine.name, "verb": "open_root_directory"})
    return await access.open_root_directory(machine)


async def bind_mount(access: MachineAccess, machine: Machine, src: str, dest: str, read_only: bool, mkdir: bool,
                     authorize: Authorize) -> None:  # fmt: skip
    if machine.machine_class is not MachineClass.CONTAINER:
        raise BusError(
            errors.NOT_SUPPORTED,
            "Bind mounting is only supported on container machines.",
        )
    if not path_is_normalized_absolute(src):
        raise BusError(
            errors.INVALID_ARGS,
            "Source path must be absolute and normalized.",
            parameter="source",
        )
    dest = dest or src
    if not path_is_normalized_absolute(dest):
        raise BusError(errors.INVALID_ARGS, "Destination path must be absolute and normalized.",
                       parameter="destination")  # fmt: skip
    await authorize(
        "manage-machines",
        {"machine": machine.name, "verb": "bind", "src": src, "dest": dest},
    )
    await access.bind_mount(machine, src, dest, read_only, mkdir)


async def copy(access: MachineAccess, machine: Machine, copy_from: bool, src: str, dest: str, replace: bool,
               authorize: Authorize, flags_valid: bool = True) -> None:  # fmt: skip
    """CopyFrom/CopyTo (*flags_valid*: whether D-Bus's *WithFlags* flags were all known)."""
    access.check_copy(machine)
    if not flags_valid:
        raise BusError.from_errno(errno.EINVAL)
    if not src.startswith("/"):
        raise BusError(errors.INVALID_ARGS, "Source path must be absolute.", parameter="source")
    dest = dest or src
    if not dest.startswith("/"):
        raise BusError(
            errors.INVALID_ARGS,
            "Destination path must be absolute.",
            parameter="destination",
        )
    await authorize(
        "manage-machines",
        {"machine": machine.name, "verb": "copy", "src": src, "dest": dest},
    )
    await access.copy(machine, copy_from, src, dest, replace)


def ssh_info(machine: Machine) -> tuple[str, str]:
    """GetSSHInfo (262): the SSH address and private key path the machine was registered with;
    ENOENT unless both are known."""
    if not machine.ssh_address or not machine.ssh_private_key_path:
        raise BusError.from_errno(errno.ENOENT)
    return machine.ssh_address, machine.ssh_private_key_path

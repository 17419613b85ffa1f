"""Access to what is inside a machine: addresses, OS release, UID shift and mapping,
terminals (PTY, login, shell), the root directory, copies and bind mounts.

Free of D-Bus like :mod:`machined.manager`, whose registry and service-manager
port it uses. Anything that must enter a container's namespaces runs in a
child (:mod:`machined.children`; :mod:`machined.inside.nsprobe`, :mod:`machined.inside.machine_ops`)
under a deadline (the looks need none: :mod:`machined.inside.looks`), and gets
in through the leader's pidfd; long copies count against the shared limit of 64
operations.
"""

from __future__ import annotations

import errno
import os

from machined import errors, idmap, personality
from machined.children import jobs
from machined.envfile import read_os_release
from machined.errors import BusError
from machined.inside import looks, pty
from machined.inside.addresses import Address
from machined.limits import LIMITS_EXCEEDED
from machined.machine import Machine, MachineClass
from machined.manager import MachineManager

# How long a container may take to answer for a PTY, login, shell or mount before its caller gets an error.
SESSION_TIMEOUT = 20.0


class MachineAccess:
    """The operations on one machine's inside, for the bus adapters."""

    def __init__(self, manager: MachineManager) -> None:
        self.manager = manager

    # ----- looking inside machines ----------------------------------------------------

    def check_addresses(self, machine: Machine) -> None:
        """What GetAddresses refuses without looking (a VM, a container without a network of its
        own), raised at once: callers answer it in place."""
        if machine.is_host:
            return
        if machine.machine_class is not MachineClass.CONTAINER:
            raise BusError(errors.NOT_SUPPORTED, "Requesting IP address data is only supported on container machines.")
        if looks.same_netns(machine.leader):
            raise BusError(errors.NO_PRIVATE_NETWORKING, f"Machine {machine.name} does not use private networking")

    def check_may_enter(self, machine: Machine, what: str) -> None:
        """Who may look inside a container: not 262's per-user instance, which runs without the
        privilege to enter its namespaces (EPERM, as upstream's answers there)."""
        if not machine.is_host and getattr(self.manager, "user_scope", False):
            raise BusError(errors.errno_error_name(errno.EPERM), f"Failed to get {what}: {os.strerror(errno.EPERM)}",
                           errno_code=errno.EPERM, varlink=errors.system_error(errno.EPERM))  # fmt: skip

    async def addresses(self, machine: Machine) -> list[Address]:
        self.check_addresses(machine)
        self.check_may_enter(machine, "addresses")
        if machine.is_host:
            return await looks.host_addresses()
        return await looks.container_addresses(machine)

    def check_os_release(self, machine: Machine) -> None:
        """What GetOSRelease refuses without looking (a VM), raised at once."""
        if machine.machine_class not in (MachineClass.HOST, MachineClass.CONTAINER):
            raise BusError(errors.NOT_SUPPORTED, "Requesting OS release data is only supported on container machines.")

    async def os_release(self, machine: Machine) -> dict[str, str]:
        self.check_os_release(machine)
        self.check_may_enter(machine, "OS release")
        try:
            if machine.is_host:
                return read_os_release("/")  # a small local file: quicker than a thread hop
            return await looks.container_os_release(machine)
        except FileNotFoundError:
            if personality.is_262():  # its reader's ENOENT, passed on by errno (not 252's Failed)
                raise BusError.from_errno(errno.ENOENT, "Failed to get OS release: No such file or directory") from None
            raise BusError(errors.FAILED, "Machine does not contain OS release information") from None

    async def uid_shift(self, machine: Machine) -> int:
        return self.uid_shift_now(machine)

    def uid_shift_now(self, machine: Machine) -> int:
        """The UID shift, read from /proc without waiting (or the refusal, raised)."""
        if machine.is_host:
            return 0
        if machine.machine_class is not MachineClass.CONTAINER:
            raise BusError(errors.NOT_SUPPORTED, "UID/GID shift may only be determined for container machines.")
        shift = looks.uid_shift(machine.leader)
        if shift is None:
            raise BusError(
                errors.NOT_SUPPORTED, f"Machine {machine.name} uses a complex UID/GID mapping, cannot determine shift"
            )
        return shift

    # ----- copies and bind mounts --------------------------------------------------------

    def check_copy(self, machine: Machine) -> None:
        """What upstream checks before it even reads a copy request's arguments."""
        if self.manager.operations.running >= self.manager.operations.limit:
            raise BusError(LIMITS_EXCEEDED, "Too many ongoing copies.")
        if machine.machine_class is not MachineClass.CONTAINER:
            raise BusError(errors.NOT_SUPPORTED, "Copying files is only supported on container machines.")

    async def copy(self, machine: Machine, copy_from: bool, src: str, dest: str, replace: bool) -> None:
        shift = await self.uid_shift(machine)
        host_path, container_path = (dest, src) if copy_from else (src, dest)
        with looks.leader_pidfd(machine) as leader_fd:
            await self.manager.operations.run(
                jobs.COPY, "Too many ongoing copies.", fds={"leader_fd": leader_fd},
                leader=machine.leader, copy_from=copy_from, host_path=host_path,
                container_path=container_path, uid_shift=shift, replace=replace,
            )  # fmt: skip

    async def bind_mount(self, machine: Machine, src: str, dest: str, read_only: bool, mkdir: bool) -> None:
        if await self.uid_shift(machine) != 0:
            raise BusError(errors.NOT_SUPPORTED, "Can't bind mount on container with user namespacing applied.")
        from machined.children.client import run_worker  # (loaded at the first job, not at start)

        try:
            with looks.leader_pidfd(machine) as leader_fd:
                await run_worker(
                    jobs.BIND_MOUNT, SESSION_TIMEOUT, fds={"leader_fd": leader_fd},
                    leader=machine.leader, name=machine.name, source=src, destination=dest, read_only=read_only,
                    mkdir=mkdir, new_api=personality.is_262(),
                )  # fmt: skip
        except OSError as e:
            code = e.errno or errno.EIO
            raise BusError.from_errno(
                code, f"Failed to mount {src} on {dest} in machine's namespace: {os.strerror(code)}"
            ) from None

    # ----- UID/GID mapping -------------------------------------------------------------

    def map_from_machine(self, name: str, inner: int, kind: str) -> int:
        """Host ID of container user/group *inner* (kind "uid" or "gid")."""
        label = "user" if kind == "uid" else "group"
        if not idmap.id_is_valid(inner):
            raise BusError(errors.INVALID_ARGS, f"Invalid {label} ID {inner}")
        machine = self.manager.get(name)
        if machine.machine_class is not MachineClass.CONTAINER:
            raise BusError(errors.INVALID_ARGS, "Not supported for non-container machines.")
        outer = idmap.to_host(idmap.read_map(machine.leader, kind), inner)
        if outer is None:
            # Upstream names the group case NoSuchUserMapping too; clients may rely on it.
            raise BusError(errors.NO_SUCH_USER_MAPPING, f"Machine '{name}' has no matching {label} mappings.")
        return outer

    def map_to_machine(self, outer: int, kind: str) -> tuple[Machine, int]:
        """The container owning host user/group *outer*, and its ID there."""
        label, host_label = ("User", "UID") if kind == "uid" else ("Group", "GID")
        error = errors.NO_SUCH_USER_MAPPING if kind == "uid" else errors.NO_SUCH_GROUP_MAPPING
        if not idmap.id_is_valid(outer):
            raise BusError(errors.INVALID_ARGS, f"Invalid {label.lower()} ID {outer}")
        if outer < 0x10000:
            raise BusError(error, f"{label} {outer} belongs to host {host_label} range")
        for machine in self.manager.registry:
            if machine.machine_class is not MachineClass.CONTAINER:
                continue
            inner = idmap.to_container(idmap.read_map(machine.leader, kind), outer)
            if inner is not None:
                return machine, inner
        raise BusError(error, f"No matching {label.lower()} mapping for {outer}.")

    # ----- terminals and the root directory -------------------------------------------

    def _require_host_or_container(self, machine: Machine) -> None:
        if machine.machine_class not in (MachineClass.HOST, MachineClass.CONTAINER):
            raise errors.not_supported()

    async def open_pty(self, machine: Machine) -> tuple[int, str]:
        self._require_host_or_container(machine)
        if machine.is_host:
            return pty.open_master()
        return await looks.open_pty(machine, SESSION_TIMEOUT)

    async def open_login(self, machine: Machine) -> tuple[int, str]:
        self._require_host_or_container(machine)
        if machine.is_host:
            assert self.manager.systemd is not None
            master, path = pty.open_master()
            try:
                await self.manager.systemd.start_login(path)
            except BaseException:
                os.close(master)
                raise
            return master, path
        from machined.children.client import run_worker_with_fd

        with looks.leader_pidfd(machine) as leader_fd:
            path, fd = await run_worker_with_fd(
                jobs.OPEN_LOGIN, SESSION_TIMEOUT, fds={"leader_fd": leader_fd},
                leader=machine.leader, name=machine.name,
            )  # fmt: skip
        return fd, path

    async def open_shell(self, machine: Machine, user: str, path: str, argv: list[str],
                         env: list[str]) -> tuple[int, str]:  # fmt: skip
        self._require_host_or_container(machine)
        if machine.is_host:
            assert self.manager.systemd is not None
            master, pty_path = pty.open_master()
            try:
                slave = pty.open_slave(pty_path)
                try:
                    await self.manager.systemd.start_shell(slave, pty_path, user, path, argv, env)
                finally:
                    os.close(slave)
            except BaseException:
                os.close(master)
                raise
            return master, pty_path
        from machined.children.client import run_worker_with_fd

        with looks.leader_pidfd(machine) as leader_fd:
            pty_path, fd = await run_worker_with_fd(
                jobs.OPEN_SHELL, SESSION_TIMEOUT, fds={"leader_fd": leader_fd},
                leader=machine.leader, name=machine.name, user=user, path=path, argv=argv, env=env,
            )  # fmt: skip
        return fd, pty_path

    async def open_root_directory(self, machine: Machine) -> int:
        if machine.is_host:
            return os.open("/", os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY)
        if machine.machine_class is not MachineClass.CONTAINER:
            raise BusError(errors.NOT_SUPPORTED, "Opening the root directory is only supported on container machines.")
        return await looks.open_root_directory(machine, SESSION_TIMEOUT)

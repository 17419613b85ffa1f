"""Every function a child may run, by name: the one registry of jobs.

The daemon names a job by its :class:`Job` (checked by mypy, found by a search, and checked
by tests to name a function that exists), never by a string; the child imports the job's
module and calls the function with the request's arguments and fds. A job's module is
imported by the fork server before it forks (``PRELOAD`` there), so that a child that has
entered a container needs nothing from the container's root.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    """A function run in a child: ``module.function(**kwargs)``, fds among the kwargs."""

    module: str
    function: str

    @property
    def target(self) -> str:
        """``MODULE:FUNCTION``, as the request names it."""
        return f"{self.module}:{self.function}"


# Inside a machine (machined.inside): what needs the container's mount namespace.
OPEN_PTY = Job("machined.inside.nsprobe", "open_pty")
OPEN_LOGIN = Job("machined.inside.nsprobe", "open_login")
OPEN_SHELL = Job("machined.inside.nsprobe", "open_shell")
COPY = Job("machined.inside.machine_ops", "copy")
BIND_MOUNT = Job("machined.inside.machine_ops", "bind_mount")
# `machined run`: the runner, started inside the machine.
RUN_SPAWN = Job("machined.run", "spawn")
# The image pool (machined.images): long operations and disk images' metadata.
REMOVE_IMAGE = Job("machined.images.operations", "remove_in_child")
CLONE_IMAGE = Job("machined.images.operations", "clone_in_child")
CLEAN_POOL = Job("machined.images.operations", "clean_pool")
READ_METADATA = Job("machined.images.metadata", "read_metadata_in_child")
# Does nothing: what a spare rehearses before its job comes.
PING = Job("os", "getpid")

ALL = (OPEN_PTY, OPEN_LOGIN, OPEN_SHELL, COPY, BIND_MOUNT, RUN_SPAWN, REMOVE_IMAGE, CLONE_IMAGE, CLEAN_POOL,
       READ_METADATA, PING)  # fmt: skip

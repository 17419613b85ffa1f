"""The per-user instance (``machined --user``, as systemd-machined 262 runs in a user's service
manager): where it finds its bus, serves varlink, keeps state files and looks for images.

Everything is below the user's own directories (``$XDG_RUNTIME_DIR``, ``$XDG_STATE_HOME``,
``~/.local/lib``), as 262 does it:

* the user's bus (``$DBUS_SESSION_BUS_ADDRESS``, else ``$XDG_RUNTIME_DIR/bus``), where the
  user's service manager is ``org.freedesktop.systemd1`` (machines' scopes go there, under the
  user's ``machine.slice``);
* ``$XDG_RUNTIME_DIR/systemd/machine/io.systemd.Machine`` (mode 0600, the other name a link to
  it, both in ``$XDG_RUNTIME_DIR/varlink/registry``);
* state files in ``$XDG_RUNTIME_DIR/systemd/machines``;
* images in ``$XDG_RUNTIME_DIR/machines``, ``$XDG_STATE_HOME/machines`` (the pool) and
  ``~/.local/lib/machines``, locked in ``$XDG_RUNTIME_DIR/systemd/nspawn/locks``; no ``.host``
  machine and no ``.host`` image.

No polkit: whoever can reach the instance (its user, and root) is served as its owner.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass


class UserScopeError(Exception):
    """The environment does not say where the user's directories are."""


@dataclass(frozen=True)
class UserScope:
    uid: int
    runtime_dir: str  # $XDG_RUNTIME_DIR
    home: str
    state_home: str  # $XDG_STATE_HOME, ~/.local/state by default
    bus_address: str

    @property
    def state_dir(self) -> str:
        return os.path.join(self.runtime_dir, "systemd", "machines")

    @property
    def machine_socket(self) -> str:
        return os.path.join(self.runtime_dir, "systemd", "machine", "io.systemd.Machine")

    @property
    def machine_image_link(self) -> str:
        return os.path.join(self.runtime_dir, "systemd", "machine", "io.systemd.MachineImage")

    @property
    def varlink_registry(self) -> str:
        return os.path.join(self.runtime_dir, "varlink", "registry")

    @property
    def lock_dir(self) -> str:
        """Where image locks are taken (nspawn's, in the user's runtime directory)."""
        return os.path.join(self.runtime_dir, "systemd", "nspawn", "locks")

    @property
    def pool_path(self) -> str:
        return os.path.join(self.state_home, "machines")

    @property
    def image_search_path(self) -> tuple[str, ...]:
        return (
            os.path.join(self.runtime_dir, "machines"),
            self.pool_path,
            os.path.join(self.home, ".local", "lib", "machines"),
        )


def _absolute(value: str | None) -> str | None:
    return value if value and os.path.isabs(value) else None


def from_environment(environ: dict[str, str] | None = None, uid: int | None = None) -> UserScope:
    """The scope of the user running us, from the environment the user's manager gives its services."""
    env = dict(os.environ) if environ is None else environ
    uid = os.geteuid() if uid is None else uid
    runtime_dir = _absolute(env.get("XDG_RUNTIME_DIR"))
    if runtime_dir is None:
        raise UserScopeError("$XDG_RUNTIME_DIR is not set (or not an absolute path): cannot serve a user instance")
    home = _absolute(env.get("HOME"))
    if home is None:
        try:
            home = pwd.getpwuid(uid).pw_dir
        except KeyError:
            raise UserScopeError(f"$HOME is not set and user {uid} has no home directory") from None
    state_home = _absolute(env.get("XDG_STATE_HOME")) or os.path.join(home, ".local", "state")
    bus_address = env.get("DBUS_SESSION_BUS_ADDRESS") or f"unix:path={os.path.join(runtime_dir, 'bus')}"
    return UserScope(uid=uid, runtime_dir=runtime_dir, home=home, state_home=state_home, bus_address=bus_address)

"""The files machined ships besides its code, read with :mod:`importlib.resources`.

In the repository they stay where the design puts them: ``dbus-interfaces/``
(interface XML, bus policy, bus activation file, polkit policy) and ``units/``
(the service unit), at the top of the checkout. pyproject.toml maps those two
folders onto the subpackages ``machined.data.interfaces`` and
``machined.data.units``, so a wheel (built directly or from the sdist) carries
them inside the package, and an editable install reads the checkout's files.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable
    from pathlib import Path

INTERFACES = f"{__name__}.interfaces"  # dbus-interfaces/
UNITS = f"{__name__}.units"  # units/


def interface_file(name: str) -> Traversable:
    """``dbus-interfaces/<name>``: interface XML, bus policy, activation file or polkit policy."""
    from importlib.resources import files  # (imported when needed: the daemon reads interface_text)

    return files(INTERFACES).joinpath(name)


def interface_text(name: str) -> str:
    """The text of ``dbus-interfaces/<name>``, read without :mod:`importlib.resources` (the
    daemon's start-up path: wheels and editable installs keep the package on disk)."""
    folder = os.path.dirname(importlib.import_module(INTERFACES).__file__ or "")
    with open(os.path.join(folder, name), encoding="utf-8") as f:
        return f.read()


def interface_file_for(systemd: str, name: str) -> Traversable:
    """``dbus-interfaces/<name>`` as machined ships it for a host whose systemd is *systemd*
    ("252", "262"): the file of ``dbus-interfaces/262/`` where 262's differs (bus policy,
    polkit actions), else the common one."""
    if systemd != "252":
        special = interface_file(f"262/{name}")
        if special.is_file():
            return special
    return interface_file(name)


def unit_text(name: str) -> str:
    """The text of ``units/<name>``."""
    return unit_file(name).read_text(encoding="utf-8")


def unit_file(name: str) -> Traversable:
    """``units/<name>``."""
    from importlib.resources import files

    return files(UNITS).joinpath(name)


def file_path(resource: Traversable) -> Path:
    """The file-system path of a shipped file, for what needs one (bind mounts, installing).

    Wheels and editable installs put the package on disk (never in a zip), so
    the path is the file itself and stays valid while the process runs.
    """
    from pathlib import Path

    path = Path(str(resource))
    if not path.is_file():
        raise FileNotFoundError(f"machined's data file {path} is missing (broken installation?)")
    return path

"""What podman (root, containers-storage) keeps on disk about a container.

- ``/etc/containers/storage.conf`` (``[storage]``: ``graphroot``, ``runroot``, ``driver``): where
  the storage is; podman's defaults ``/var/lib/containers/storage`` and ``/run/containers/storage``.
- ``<graphroot>/<driver>-containers/containers.json``: every container's ID and ``names``
  (what ``podman ps`` shows).
- ``<graphroot>/<driver>-containers/<ID>/userdata/config.json``: the OCI spec podman gave the
  runtime; ``root.path`` is the container's root directory (its mounted rootfs).
- ``<runroot>/<driver>-containers/<ID>/userdata/pidfile``: the container's init PID, written by the
  OCI runtime once the container runs (``conmon.pid`` beside it is the monitor's, not ours).

Plain file reads, run in a thread by the watcher; every failure is "not known (yet)".
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tomllib
from dataclasses import dataclass

from machined.oci import PODMAN, ContainerRef, Facts

log = logging.getLogger(__name__)

STORAGE_CONF = "/etc/containers/storage.conf"
DEFAULT_GRAPHROOT = "/var/lib/containers/storage"
DEFAULT_RUNROOT = "/run/containers/storage"
MAX_FILE = 16 << 20  # containers.json of thousands of containers stays far below


@dataclass(frozen=True)
class Storage:
    graphroot: str = DEFAULT_GRAPHROOT
    runroot: str = DEFAULT_RUNROOT
    driver: str = ""


def read_storage_conf(path: str = STORAGE_CONF) -> Storage:
    """graphroot, runroot and driver from storage.conf (TOML); podman's defaults for what is missing."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return Storage()
    section = data.get("storage")
    if not isinstance(section, dict):
        return Storage()

    def text(key: str, default: str) -> str:
        value = section.get(key)
        return value if isinstance(value, str) and value else default

    return Storage(text("graphroot", DEFAULT_GRAPHROOT), text("runroot", DEFAULT_RUNROOT), text("driver", ""))


def _read_json(path: str) -> object:
    with open(path, "rb") as f:
        data = f.read(MAX_FILE + 1)
    if len(data) > MAX_FILE:
        raise ValueError(f"{path} is too large")
    return json.loads(data)


class PodmanReader:
    """Reads a podman container's facts from containers-storage and its userdata."""

    runtime = PODMAN

    def __init__(self, storage_conf: str = STORAGE_CONF) -> None:
        self.storage_conf = storage_conf

    def _container_dirs(self, storage: Storage) -> list[str]:
        """``<graphroot>/<driver>-containers``: the configured driver's, else every one there is."""
        if storage.driver:
            return [os.path.join(storage.graphroot, f"{storage.driver}-containers")]
        return sorted(glob.glob(os.path.join(glob.escape(storage.graphroot), "*-containers")))

    def read(self, ref: ContainerRef) -> Facts | None:
        """The container's name, init PID and root directory; None while podman's storage does not
        know it (not written yet, or removed)."""
        storage = read_storage_conf(self.storage_conf)
        for containers in self._container_dirs(storage):
            name = _name_in(os.path.join(containers, "containers.json"), ref.id)
            if name is None:
                continue
            driver_dir = os.path.basename(containers)
            pid = _read_pid(os.path.join(storage.runroot, driver_dir, ref.id, "userdata", "pidfile"))
            if not pid:  # (a runroot that storage.conf does not name: the graphroot's userdata)
                pid = _read_pid(os.path.join(containers, ref.id, "userdata", "pidfile"))
            root = _root_path(os.path.join(containers, ref.id, "userdata", "config.json"))
            return Facts(name=name, pid=pid, root_directory=root)
        return None


def _name_in(path: str, container_id: str) -> str | None:
    """The first of the container's ``names`` in containers.json; None if it is not listed."""
    try:
        entries = _read_json(path)
    except (OSError, ValueError) as e:
        if not isinstance(e, FileNotFoundError):
            log.debug("Cannot read %s: %s", path, e)
        return None
    if not isinstance(entries, list):
        return None
    for entry in entries:
        if isinstance(entry, dict) and entry.get("id") == container_id:
            names = entry.get("names")
            if isinstance(names, list) and names and isinstance(names[0], str):
                return names[0]
            return ""  # listed without a name: the fallback name
    return None


def _read_pid(path: str) -> int:
    try:
        with open(path, "rb") as f:
            text = f.read(64)
        pid = int(text.strip() or b"0")
    except (OSError, ValueError):
        return 0
    return pid if pid > 1 else 0


def _root_path(path: str) -> str:
    try:
        spec = _read_json(path)
    except (OSError, ValueError):
        return ""
    root = spec.get("root") if isinstance(spec, dict) else None
    value = root.get("path") if isinstance(root, dict) else None
    return value if isinstance(value, str) and value.startswith("/") else ""

"""What docker tells of a container: its API on ``/run/docker.sock`` (``GET /containers/ID/json``:
``Name`` with its leading '/', ``State.Pid``, ``GraphDriver.Data.MergedDir``), or, when the API does
not answer, what it keeps on disk: ``<data-root>/containers/<ID>/config.v2.json`` (``Name``,
``State.Pid``), data-root from ``/etc/docker/daemon.json`` (default ``/var/lib/docker``)."""

from __future__ import annotations

import asyncio
import json
import logging
import os

from machined.oci import DOCKER, ContainerRef, Facts
from machined.oci.http import HTTPError, request

log = logging.getLogger(__name__)

SOCKET = "/run/docker.sock"
DAEMON_JSON = "/etc/docker/daemon.json"
DEFAULT_DATA_ROOT = "/var/lib/docker"
MAX_FILE = 8 << 20


def _facts(info: object, running_only: bool) -> Facts | None:
    if not isinstance(info, dict):
        return None
    name = info.get("Name")
    state = info.get("State")
    pid = state.get("Pid") if isinstance(state, dict) else 0
    if running_only and isinstance(state, dict) and state.get("Running") is False:
        pid = 0
    root = ""
    driver = info.get("GraphDriver")
    data = driver.get("Data") if isinstance(driver, dict) else None
    merged = data.get("MergedDir") if isinstance(data, dict) else None
    if isinstance(merged, str) and merged.startswith("/"):
        root = merged
    return Facts(name=name if isinstance(name, str) else "", pid=pid if isinstance(pid, int) and pid > 1 else 0,
                 root_directory=root)  # fmt: skip


def data_root(path: str = DAEMON_JSON) -> str:
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read(MAX_FILE))
    except (OSError, ValueError):
        return DEFAULT_DATA_ROOT
    value = config.get("data-root") if isinstance(config, dict) else None
    return value if isinstance(value, str) and value.startswith("/") else DEFAULT_DATA_ROOT


class DockerReader:
    runtime = DOCKER

    def __init__(self, socket_path: str = SOCKET, daemon_json: str = DAEMON_JSON) -> None:
        self.socket_path = socket_path
        self.daemon_json = daemon_json

    async def read(self, ref: ContainerRef) -> Facts | None:
        """The container's facts from the API; from config.v2.json when the API does not answer.
        None when docker does not know the container."""
        try:
            status, body = await request(self.socket_path, "GET", f"/containers/{ref.id}/json")
        except HTTPError as e:
            log.debug("Docker's API does not answer (%s); reading its files.", e)
            return await asyncio.to_thread(self.read_files, ref)
        if status == 404:
            return None
        if status != 200:
            return await asyncio.to_thread(self.read_files, ref)
        try:
            return _facts(json.loads(body), running_only=True)
        except ValueError:
            return None

    def read_files(self, ref: ContainerRef) -> Facts | None:
        path = os.path.join(data_root(self.daemon_json), "containers", ref.id, "config.v2.json")
        try:
            with open(path, "rb") as f:
                info = json.loads(f.read(MAX_FILE))
        except (OSError, ValueError):
            return None
        return _facts(info, running_only=True)

    async def stop(self, ref: ContainerRef) -> bool:
        """POST /containers/ID/stop; True when docker took it (stopped, or already stopped)."""
        status, _ = await request(self.socket_path, "POST", f"/containers/{ref.id}/stop?t=10", timeout=20.0)
        return status in (204, 304)

"""Stopping a podman container through podman's API socket (``podman.socket``:
``/run/podman/podman.sock``, libpod's ``POST /v4.0.0/libpod/containers/ID/stop``)."""

from __future__ import annotations

from machined.oci import ContainerRef
from machined.oci.http import request

SOCKET = "/run/podman/podman.sock"
STOP_TIMEOUT = 10  # seconds podman waits before SIGKILL (its own default)


async def stop(ref: ContainerRef, socket_path: str = SOCKET) -> bool:
    """True when podman took it (stopped, or already stopped); raises HTTPError when the socket
    does not answer."""
    status, _ = await request(socket_path, "POST", f"/v4.0.0/libpod/containers/{ref.id}/stop?timeout={STOP_TIMEOUT}",
                              timeout=STOP_TIMEOUT + 10.0)  # fmt: skip
    return status in (204, 304)

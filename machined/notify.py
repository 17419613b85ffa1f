"""sd_notify messages (READY, STATUS, STOPPING, WATCHDOG) when run under systemd.

Spoken natively, as ``sd_notify()`` does: one datagram to ``$NOTIFY_SOCKET`` (a path, or an
abstract socket for ``@name``), no libsystemd needed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger(__name__)


def _notify(state: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as e:
        log.debug("Cannot notify the service manager: %s", e)


def ready(status: str) -> None:
    _notify(f"READY=1\nSTATUS={status}")


def stopping() -> None:
    _notify("STOPPING=1\nSTATUS=Shutting down.")


def watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC in seconds, if the watchdog is on for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


def start_watchdog(loop: asyncio.AbstractEventLoop) -> asyncio.Task[None] | None:
    """Ping the watchdog from the event loop, so a wedged loop gets us restarted."""
    interval = watchdog_interval()
    if interval is None:
        return None

    async def ping() -> None:
        while True:
            _notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    return loop.create_task(ping())

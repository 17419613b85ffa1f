"""sd_notify messages (READY, STATUS, STOPPING, WATCHDOG) when run under systemd."""

from __future__ import annotations

import asyncio
import logging
import os

log = logging.getLogger(__name__)

try:
    from systemd import daemon as _sd_daemon
except ImportError:  # systemd-python missing: run without notifications
    _sd_daemon = None


def _notify(state: str) -> None:
    if _sd_daemon is not None and os.environ.get("NOTIFY_SOCKET"):
        _sd_daemon.notify(state)


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

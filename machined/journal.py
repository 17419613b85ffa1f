"""Lifecycle messages with upstream's MESSAGE_IDs, so journal catalogs and filters work."""

from __future__ import annotations

import logging
import os

from machined.machine import Machine

log = logging.getLogger("machined")

MACHINE_START = "24d8d4452573402496068381a6312df2"
MACHINE_STOP = "58432bd3bace477cb514b56381b8a758"

try:
    from systemd import journal as _journal
except ImportError:  # systemd-python missing: plain logging only
    _journal = None


def _send(message_id: str, text: str, machine: Machine) -> None:
    under_systemd = os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID")
    if _journal is None or not under_systemd:
        log.info("%s", text)
        return
    _journal.send(
        text,
        MESSAGE_ID=message_id,
        NAME=machine.name,
        LEADER=str(machine.leader),
        PRIORITY="6",
        SYSLOG_IDENTIFIER="machined",
    )


def machine_started(machine: Machine) -> None:
    _send(MACHINE_START, f"New machine {machine.name}.", machine)


def machine_stopped(machine: Machine) -> None:
    _send(MACHINE_STOP, f"Machine {machine.name} terminated.", machine)

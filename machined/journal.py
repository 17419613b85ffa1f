"""Logging to the journal: lifecycle messages with upstream's MESSAGE_IDs (so journal catalogs
and filters work) and a logging handler with the fields systemd-python's JournalHandler sends.

Spoken natively (journald's datagram protocol, as ``sd_journal_sendv()`` speaks it): the
daemon needs no libsystemd for it, nor the modules systemd-python loads with it.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

from machined.machine import Machine

log = logging.getLogger("machined")

MACHINE_START = "24d8d4452573402496068381a6312df2"
MACHINE_STOP = "58432bd3bace477cb514b56381b8a758"
SOCKET = "/run/systemd/journal/socket"
SNDBUF_SIZE = 8 * 1024 * 1024


class Journal:
    """A connection to journald's socket (opened on first use, kept)."""

    def __init__(self, path: str = SOCKET) -> None:
        self.path = path
        self._sock: socket.socket | None = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF_SIZE)
            except OSError:
                pass
            self._sock = sock
        return self._sock

    def send(self, message: str, **fields: Any) -> None:
        """One entry: MESSAGE and *fields* (upper-case names; values as text). Raises OSError."""
        data = encode({"MESSAGE": message, **fields})
        sock = self._socket()
        try:
            sock.sendto(data, self.path)
        except OSError as e:
            if e.errno not in (90, 105):  # EMSGSIZE, ENOBUFS: too large for a datagram
                raise
            self._send_large(sock, data)

    def _send_large(self, sock: socket.socket, data: bytes) -> None:
        """As sd-journal does for large entries: the data in a sealed memfd, passed along."""
        fd = os.memfd_create("journal-data", os.MFD_CLOEXEC | getattr(os, "MFD_ALLOW_SEALING", 2))
        try:
            os.write(fd, data)
            try:
                import fcntl

                fcntl.fcntl(fd, 1033, 0x1 | 0x2 | 0x4 | 0x8)  # F_ADD_SEALS: SEAL, SHRINK, GROW, WRITE
            except OSError:
                pass
            sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))], 0, self.path)
        finally:
            os.close(fd)


def _field_name_valid(name: str) -> bool:
    if name in _VALID_NAMES:
        return True
    valid = (
        0 < len(name) <= 64
        and not name[0].isdigit()
        and name[0] != "_"
        and all(c.isdigit() or "A" <= c <= "Z" or c == "_" for c in name)
    )
    if valid and len(_VALID_NAMES) < 1024:
        _VALID_NAMES.add(name)
    return valid


_VALID_NAMES: set[str] = set()


def encode(fields: dict[str, Any]) -> bytes:
    """journald's native format: ``KEY=value\\n``, or ``KEY\\n`` + 64-bit length + value + ``\\n``
    for a value with a newline. Invalid names are left out (journald would drop them)."""
    out = bytearray()
    for name, value in fields.items():
        if not _field_name_valid(name):
            continue
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogateescape")
        key = name.encode("ascii")
        if b"\n" in raw:
            out += key + b"\n" + len(raw).to_bytes(8, "little") + raw + b"\n"
        else:
            out += key + b"=" + raw + b"\n"
    return bytes(out)


_journal = Journal()


def send(message: str, **fields: Any) -> None:
    _journal.send(message, **fields)


class JournalHandler(logging.Handler):
    """Log records as journal entries, with the fields systemd-python's handler sends:
    MESSAGE, PRIORITY, LOGGER, THREAD_NAME, PROCESS_NAME, CODE_FILE/LINE/FUNC, CODE_ARGS,
    EXCEPTION_TEXT, upper-case attributes of the record (``extra={"MESSAGE_ID": ...}``)
    and the handler's own fields (SYSLOG_IDENTIFIER)."""

    def __init__(self, level: int = logging.NOTSET, journal: Journal | None = None, **fields: Any) -> None:
        super().__init__(level)
        for name in fields:
            if not _field_name_valid(name):
                raise ValueError(f"Invalid field name: {name}")
        fields.setdefault("SYSLOG_IDENTIFIER", sys.argv[0])
        self.journal = journal or _journal
        self.fields = fields

    @staticmethod
    def map_priority(levelno: int) -> int:
        if levelno <= logging.DEBUG:
            return 7
        if levelno <= logging.INFO:
            return 6
        if levelno <= logging.WARNING:
            return 4
        if levelno <= logging.ERROR:
            return 3
        if levelno <= logging.CRITICAL:
            return 2
        return 1

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            fields = dict(self.fields)
            if record.exc_text:
                fields["EXCEPTION_TEXT"] = record.exc_text
            if record.args:
                fields["CODE_ARGS"] = str(record.args)
            fields.update((k, v) for k, v in record.__dict__.items() if k.isupper())
            fields.update(
                PRIORITY=self.map_priority(record.levelno),
                LOGGER=record.name,
                THREAD_NAME=record.threadName,
                PROCESS_NAME=record.processName,
                CODE_FILE=record.pathname,
                CODE_LINE=record.lineno,
                CODE_FUNC=record.funcName,
            )
            self.journal.send(message, **fields)
        except Exception:
            self.handleError(record)


def _send(message_id: str, text: str, machine: Machine) -> None:
    under_systemd = os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID")
    if under_systemd:
        try:
            _journal.send(text, MESSAGE_ID=message_id, NAME=machine.name, LEADER=str(machine.leader),
                          PRIORITY="6", SYSLOG_IDENTIFIER="machined")  # fmt: skip
            return
        except OSError:
            pass  # no journald: plain logging
    log.info("%s", text)


def machine_started(machine: Machine) -> None:
    _send(MACHINE_START, f"New machine {machine.name}.", machine)


def machine_stopped(machine: Machine) -> None:
    _send(MACHINE_STOP, f"Machine {machine.name} terminated.", machine)

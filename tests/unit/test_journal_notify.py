"""journald's native protocol and sd_notify, spoken without libsystemd: what arrives on the sockets."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

from machined import journal, notify


def parse_entry(data: bytes) -> dict[str, bytes]:
    """journald's reading of a native datagram."""
    fields, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            i = nl + 1
        else:
            key, size = line, int.from_bytes(data[nl + 1 : nl + 9], "little")
            value = data[nl + 9 : nl + 9 + size]
            assert data[nl + 9 + size : nl + 10 + size] == b"\n"
            i = nl + 10 + size
        fields[key.decode()] = value
    return fields


@pytest.fixture
def journald(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_entries_carry_their_fields_newlines_included(journald) -> None:  # type: ignore[no-untyped-def]
    path, sock = journald
    journal.Journal(path).send("two\nlines", MESSAGE_ID="24d8", NAME="m1", LEADER=42, lower="dropped", _X="dropped")
    fields = parse_entry(sock.recv(65536))
    assert fields == {"MESSAGE": b"two\nlines", "MESSAGE_ID": b"24d8", "NAME": b"m1", "LEADER": b"42"}


def test_a_large_entry_goes_in_a_sealed_memfd(journald) -> None:  # type: ignore[no-untyped-def]
    path, sock = journald
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    big = "x" * (20 * 1024 * 1024)  # more than a datagram may carry
    journal.Journal(path).send(big, PRIORITY=6)
    msg, anc, _, _ = sock.recvmsg(16, socket.CMSG_SPACE(4))
    assert msg == b"" and anc
    fd = int.from_bytes(anc[0][2][:4], "little")
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            f.seek(0)
            assert parse_entry(f.read())["MESSAGE"] == big.encode()
    finally:
        os.close(fd)


def test_the_logging_handler_sends_what_systemd_pythons_does(journald) -> None:  # type: ignore[no-untyped-def]
    path, sock = journald
    handler = journal.JournalHandler(journal=journal.Journal(path), SYSLOG_IDENTIFIER="machined")
    logger = logging.getLogger("machined.test-journal")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("hello %s", "there", extra={"MESSAGE_ID": "abc"})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    first = parse_entry(sock.recv(65536))
    assert first["MESSAGE"] == b"hello there" and first["PRIORITY"] == b"4" and first["MESSAGE_ID"] == b"abc"
    assert first["SYSLOG_IDENTIFIER"] == b"machined" and first["LOGGER"] == b"machined.test-journal"
    assert first["CODE_FUNC"] == b"test_the_logging_handler_sends_what_systemd_pythons_does"
    assert first["CODE_FILE"].endswith(b"test_journal_notify.py") and int(first["CODE_LINE"]) > 0
    assert first["CODE_ARGS"] == b"('there',)" and first["THREAD_NAME"] and first["PROCESS_NAME"]
    second = parse_entry(sock.recv(65536))
    assert second["PRIORITY"] == b"3" and b"ValueError: boom" in second["MESSAGE"]
    assert b"ValueError: boom" in second["EXCEPTION_TEXT"]


def test_lifecycle_messages_fall_back_to_logging_without_journald(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    from machined.machine import Machine

    monkeypatch.setenv("INVOCATION_ID", "x")
    monkeypatch.setattr(journal, "_journal", journal.Journal("/nonexistent/journal.sock"))
    with caplog.at_level(logging.INFO, logger="machined"):
        journal.machine_started(Machine(name="m1", leader=7))
    assert "New machine m1." in caplog.text


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_reaches_the_socket(tmp_path: Path, monkeypatch, abstract: bool) -> None:  # type: ignore[no-untyped-def]
    name = f"machined-test-notify-{os.getpid()}" if abstract else str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name if abstract else name)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name if abstract else name)
    try:
        notify.ready("Serving.")
        assert sock.recv(4096) == b"READY=1\nSTATUS=Serving."
        notify.stopping()
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=Shutting down."
    finally:
        sock.close()


def test_notify_without_a_socket_does_nothing(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notify.ready("x")
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify.sock")
    notify.ready("x")  # an unreachable socket is no error

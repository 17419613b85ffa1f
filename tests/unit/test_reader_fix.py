"""The bus reader (machined.dbus.reader_fix): one read a wakeup, never one that fails with
EAGAIN, the messages parsed out of it a bounded number a turn; descriptors given to the message
they came with; split messages, the end of the connection, and nothing kept after a message."""

from __future__ import annotations

import asyncio
import os
import socket
from functools import partial
from typing import Any

from dbus_fast import Message, MessageType

from machined.dbus import reader_fix


class CountingSocket(socket.socket):
    """Counts reads and reads that found nothing (EAGAIN)."""

    reads = 0
    empty = 0

    def recvmsg(self, *args: Any) -> Any:
        CountingSocket.reads += 1
        try:
            return super().recvmsg(*args)
        except BlockingIOError:
            CountingSocket.empty += 1
            raise


def wire(serial: int, unix_fds: list[int] | None = None, size: int = 0) -> bytes:
    message = Message(destination="org.freedesktop.machine1", path="/org/freedesktop/machine1",
                      interface="org.freedesktop.DBus.Peer", member="Ping", serial=serial, sender=":1.5",
                      signature="h" if unix_fds else ("s" if size else ""),
                      body=[0] if unix_fds else (["x" * size] if size else []),
                      unix_fds=unix_fds or [])  # fmt: skip
    return bytes(message._marshall(True))


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, b"".join(f.to_bytes(4, "little") for f in fds))])


async def until(got: list[Any], n: int) -> None:
    for _ in range(400):
        if len(got) >= n:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{len(got)} messages, not {n}")


async def test_reads_once_a_wakeup_and_gives_descriptors_to_their_message() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sock = CountingSocket(fileno=ours.detach())
    sock.setblocking(False)
    CountingSocket.reads = CountingSocket.empty = 0
    got: list[Message] = []
    failed: list[Exception | None] = []
    loop = asyncio.get_running_loop()

    def finalize(e: Exception | None) -> None:  # as dbus-fast's bus: no more reading
        failed.append(e)
        loop.remove_reader(sock.fileno())

    reader = reader_fix.one_message_per_wakeup(sock, got.append, finalize, True)
    assert isinstance(reader, reader_fix._Reader)
    loop.add_reader(sock.fileno(), reader)
    r, w = os.pipe()
    r2, w2 = os.pipe()
    try:
        theirs.send(wire(1))  # one call, as a client makes them: one read, none that fails
        await until(got, 1)
        assert CountingSocket.reads == 1 and CountingSocket.empty == 0
        assert reader.unmarshaller.message is None  # its bytes let go of at once
        theirs.send(wire(2) + wire(3) + wire(4))  # queued together: one read
        await until(got, 4)
        assert CountingSocket.reads == 2 and CountingSocket.empty == 0
        # Descriptors with a message after others, then one without, then one whose descriptors
        # come with a read that ends inside it (its first bytes).
        theirs.send(wire(5) + wire(6))
        send_with_fds(theirs, wire(7, [r]), [r])
        theirs.send(wire(8))
        big = wire(9, [r2])
        send_with_fds(theirs, big[:40], [r2, w2])
        await asyncio.sleep(0.05)
        theirs.send(big[40:])
        split = wire(10)
        theirs.send(split[:20])
        await until(got, 9)
        theirs.send(split[20:])
        await until(got, 10)
        assert [m.serial for m in got] == list(range(1, 11))
        assert all(m.message_type is MessageType.METHOD_CALL for m in got)
        with_fds = {m.serial: m.unix_fds for m in got if m.unix_fds}
        assert sorted(with_fds) == [7, 9] and len(with_fds[7]) == 1 and len(with_fds[9]) == 2
        assert os.path.sameopenfile(with_fds[7][0], r) and os.path.sameopenfile(with_fds[9][1], w2)
        assert CountingSocket.empty == 0 and not failed
        for fds in with_fds.values():
            for fd in fds:
                os.close(fd)
        theirs.close()  # the bus went away: told once
        for _ in range(200):
            if failed:
                break
            await asyncio.sleep(0.005)
        assert len(failed) == 1 and isinstance(failed[0], EOFError)
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()
        for fd in (r, w, r2, w2):
            os.close(fd)


async def test_a_turn_parses_a_bounded_number_the_rest_follows() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    got: list[Message] = []
    loop = asyncio.get_running_loop()
    reader = reader_fix._Reader(ours, got.append, lambda e: None)
    n = reader_fix.READ_AHEAD + 100
    theirs.sendall(b"".join(wire(i + 1) for i in range(n)))
    try:
        reader()  # one wakeup
        assert 0 < len(got) <= reader_fix.READ_AHEAD
        loop.add_reader(ours.fileno(), reader)
        await until(got, n)
        assert [m.serial for m in got] == list(range(1, n + 1))
        theirs.setblocking(False)
        await loop.sock_sendall(theirs, wire(n + 1, size=1 << 20))  # a large one, in many reads
        await until(got, n + 1)
        assert len(got[-1].body[0]) == 1 << 20
    finally:
        loop.remove_reader(ours.fileno())
        ours.close()
        theirs.close()


def test_connections_without_descriptors_keep_dbus_fasts_reader() -> None:
    a, b = socket.socketpair()
    try:
        reader = reader_fix.one_message_per_wakeup(a, print, print, False)
        assert isinstance(reader, partial) and reader.args[-1] is False  # dbus-fast's own, greedy reader
    finally:
        a.close()
        b.close()


def test_internals_checked_and_dbus_fasts_reader_kept_if_they_differ(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    assert reader_fix.internals_known()

    class Other:  # an unmarshaller that reads no stream
        def __init__(self, *args: Any) -> None:
            pass

        def unmarshall(self) -> None:
            return None

    monkeypatch.setattr(reader_fix, "Unmarshaller", Other)
    built = reader_fix._aio.build_message_reader  # type: ignore[attr-defined]
    assert not reader_fix.internals_known()
    assert reader_fix.apply() is False
    assert reader_fix._aio.build_message_reader is built  # type: ignore[attr-defined]

"""The bus reader returns after each message (machined.dbus.reader_fix): no read that fails with
EAGAIN after every call, while messages queued together, descriptors and messages split across
reads all still arrive, and the last message's bytes are let go of soon after."""

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


def wire(serial: int, unix_fds: list[int] | None = None) -> bytes:
    message = Message(destination="org.freedesktop.machine1", path="/org/freedesktop/machine1",
                      interface="org.freedesktop.DBus.Peer", member="Ping", serial=serial, sender=":1.5",
                      signature="h" if unix_fds else "", body=[0] if unix_fds else [],
                      unix_fds=unix_fds or [])  # fmt: skip
    return bytes(message._marshall(True))


async def test_one_message_per_wakeup_without_a_failing_read() -> None:
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
    try:

        async def until(n: int) -> None:
            for _ in range(200):
                if len(got) >= n:
                    return
                await asyncio.sleep(0.005)
            raise AssertionError(f"{len(got)} messages, not {n}")

        theirs.send(wire(1))  # one call, as a client makes them: answered without a failing read
        await until(1)
        assert CountingSocket.empty == 0 and CountingSocket.reads == 2  # the fixed header, then the rest
        theirs.send(wire(2) + wire(3) + wire(4))  # queued together: each read in turn
        r, w = os.pipe()
        theirs.sendmsg([wire(5, [r])], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview(bytearray(
            r.to_bytes(4, "little")))))])  # fmt: skip
        split = wire(6)
        theirs.send(split[:20])
        await until(5)
        theirs.send(split[20:])
        await until(6)
        assert reader.unmarshaller.message is got[-1]  # dbus-fast holds the last one's bytes...
        await asyncio.sleep(reader_fix.SWEEP_AFTER + 0.2)
        assert reader.unmarshaller.message is None  # ... until the reader starts on the next
        assert [m.serial for m in got] == [1, 2, 3, 4, 5, 6]
        assert all(m.message_type is MessageType.METHOD_CALL for m in got)
        assert len(got[4].unix_fds) == 1 and os.path.sameopenfile(got[4].unix_fds[0], r)
        assert not got[5].unix_fds and not failed
        os.close(got[4].unix_fds[0])
        os.close(r)
        os.close(w)
        theirs.close()  # the bus went away: told once
        for _ in range(200):
            if failed:
                break
            await asyncio.sleep(0.005)
        assert len(failed) == 1 and isinstance(failed[0], EOFError)
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()


def test_connections_without_descriptors_keep_dbus_fasts_reader() -> None:
    a, b = socket.socketpair()
    try:
        reader = reader_fix.one_message_per_wakeup(a, print, print, False)
        assert isinstance(reader, partial) and reader.args[-1] is False  # dbus-fast's own, greedy reader
    finally:
        a.close()
        b.close()

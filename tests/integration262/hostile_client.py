"""A hostile local user's varlink client, run inside a 262 sandbox by test_hostile262.py.

Started as root (so that the venv's Python and its libraries load), it becomes nobody before
it connects to anything, except where a command measures what root gets meanwhile (then a
child becomes nobody and root measures). Commands (arguments after the name; results as
JSON on stdout):

- ``probe``: stdin is a JSON list of [socket, hex bytes, seconds, replies expected]; each is
  sent on its own connection; the answer is the replies read and whether the daemon closed
  the connection (a reply expected ends the wait 0.1 s after it came).
- ``flood SOCKET oneway|reply SECONDS CONNECTIONS``: nobody streams Pings over CONNECTIONS
  connections while root times io.systemd.Machine.List (half of the time) and D-Bus
  ListMachines (the other half); answers the latencies' percentiles in ms.
- ``connections SOCKET N``: nobody opens N connections, then pings on each; how many answered.
- ``hangups N``: nobody subscribes to the resolve hook's QueryFilter, sends a second call and
  hangs up, N times.
- ``descriptors SOCKET...``: nobody sends a Ping with a file descriptor along on each socket:
  the errno of sendmsg() (EPERM where the daemon refuses descriptors) or the reply.
- ``partial SOCKET N MIB``: nobody sends N messages of MIB MiB without their end, on N
  connections, and keeps them open a second; how many the daemon closed.
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import select
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

MACHINE = "/run/systemd/machine/io.systemd.Machine"
HOOK = "/run/systemd/resolve.hook/io.systemd.Machine"
NOBODY = 65534


def become_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def probe(path: str, data: bytes, wait: float, expect: int) -> dict[str, Any]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    try:
        sock.sendall(data)
    except OSError:
        pass  # (closed while we sent: what was answered before still counts)
    buf = b""
    closed = False
    end = time.monotonic() + wait
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            break
        except OSError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        buf += chunk
        finals = sum(1 for m in buf.split(b"\0")[:-1] if b'"continues":true' not in m)
        if expect and finals >= expect:
            end = min(end, time.monotonic() + 0.1)
    sock.close()
    return {"replies": [m.decode("utf-8", "backslashreplace") for m in buf.split(b"\0")[:-1]], "closed": closed}


def call(sock: socket.socket, message: dict[str, Any]) -> list[dict[str, Any]]:
    sock.sendall(json.dumps(message).encode() + b"\0")
    buf = b""
    out = []
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise EOFError("the daemon closed root's connection")
        buf += chunk
        while b"\0" in buf:
            raw, buf = buf.split(b"\0", 1)
            reply = json.loads(raw)
            out.append(reply)
            if not reply.get("continues"):
                return out


def flooder(path: str, mode: str, seconds: float, connections: int) -> None:
    become_nobody()
    socks = []
    for _ in range(connections):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        sock.setblocking(False)
        socks.append(sock)
    ping = (
        b'{"method":"io.systemd.service.Ping","oneway":true}\0'
        if mode == "oneway"
        else b'{"method":"io.systemd.service.Ping"}\0'
    )
    batch = ping * 200
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for sock in socks:
            try:
                sock.send(batch)
            except OSError:
                pass
            if mode != "oneway":
                try:
                    while sock.recv(1 << 20):
                        pass
                except OSError:
                    pass
        select.select([], socks, [], 0.05)
    os._exit(0)


async def dbus_latencies(seconds: float) -> list[float]:
    from dbus_fast import BusType, Message
    from dbus_fast.aio import MessageBus

    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.monotonic()
        await asyncio.wait_for(bus.call(Message(
            destination="org.freedesktop.machine1", path="/org/freedesktop/machine1",
            interface="org.freedesktop.machine1.Manager", member="ListMachines")), 30)  # fmt: skip
        out.append(time.monotonic() - start)
        await asyncio.sleep(0.005)
    bus.disconnect()
    return out


def percentiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    if not values:
        return {"n": 0}
    at = lambda q: round(values[min(len(values) - 1, int(len(values) * q))] * 1000, 2)  # noqa: E731
    return {"n": len(values), "p50": at(0.5), "p99": at(0.99), "max": round(values[-1] * 1000, 2)}


def flood(path: str, mode: str, seconds: float, connections: int) -> dict[str, Any]:
    root = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    root.connect(MACHINE)
    root.settimeout(30)
    call(root, {"method": "io.systemd.Machine.List", "more": True})
    asyncio.run(dbus_latencies(0.1))
    child = os.fork()
    if child == 0:
        flooder(path, mode, seconds + 2, connections)
    time.sleep(0.5)
    varlink = []
    end = time.monotonic() + seconds / 2
    while time.monotonic() < end:
        start = time.monotonic()
        call(root, {"method": "io.systemd.Machine.List", "more": True})
        varlink.append(time.monotonic() - start)
        time.sleep(0.005)
    dbus = asyncio.run(dbus_latencies(seconds / 2))
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    return {"varlink": percentiles(varlink), "dbus": percentiles(dbus)}


def connections(path: str, n: int) -> dict[str, int]:
    become_nobody()
    socks = []
    for _ in range(n):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        socks.append(sock)
    time.sleep(0.5)
    answered = 0
    for sock in socks:
        sock.settimeout(2)
        try:
            sock.sendall(b'{"method":"io.systemd.service.Ping"}\0')
            answered += sock.recv(100) == b"{}\0"
        except OSError:
            pass
    return {"answered": answered}


def hangups(n: int) -> dict[str, int]:
    become_nobody()
    first = 0
    for _ in range(n):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(HOOK)
        sock.sendall(b'{"method":"io.systemd.Resolve.Hook.QueryFilter","more":true}\0'
                     b'{"method":"io.systemd.service.Ping"}\0')  # fmt: skip
        sock.settimeout(5)
        first += b'"continues":true' in sock.recv(1 << 16)
        sock.close()
    return {"subscribed": first}


def partial(path: str, n: int, mib: int) -> dict[str, int]:
    become_nobody()
    chunk = b'{"method":"io.systemd.service.Ping","parameters":{"x":"' + b"x" * (1 << 20)
    socks = []
    for _ in range(n):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        sock.settimeout(5)
        try:
            for _ in range(mib):
                sock.sendall(chunk)
        except OSError:
            pass
        socks.append(sock)
    time.sleep(1)
    closed = 0
    for sock in socks:
        readable, _, _ = select.select([sock], [], [], 0)
        if readable:
            try:
                closed += sock.recv(1) == b""
            except OSError:
                closed += 1
    return {"closed": closed}


def descriptors(paths: list[str]) -> list[Any]:
    """For each socket: a Ping sent with a descriptor along; the sender's errno, or the reply."""
    become_nobody()
    out: list[Any] = []
    for path in paths:
        read_end, write_end = os.pipe()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        try:
            sock.sendmsg([b'{"method":"io.systemd.service.Ping"}\0'],
                         [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [read_end]))])  # fmt: skip
            sock.settimeout(2)
            out.append(sock.recv(1 << 16).decode())
        except OSError as e:
            out.append(e.errno)
        sock.close()
        os.close(read_end)
        os.close(write_end)
    return out


def main() -> None:
    command, args = sys.argv[1], sys.argv[2:]
    if command == "probe":
        cases = json.loads(sys.stdin.read())
        become_nobody()
        with ThreadPoolExecutor(8) as pool:
            out: Any = list(pool.map(lambda c: probe(c[0], bytes.fromhex(c[1]), c[2], c[3]), cases))
    elif command == "flood":
        out = flood(args[0], args[1], float(args[2]), int(args[3]))
    elif command == "connections":
        out = connections(args[0], int(args[1]))
    elif command == "hangups":
        out = hangups(int(args[0]))
    elif command == "descriptors":
        out = descriptors(args)
    elif command == "partial":
        out = partial(args[0], int(args[1]), int(args[2]))
    else:
        raise SystemExit(f"unknown command {command}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

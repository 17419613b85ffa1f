"""The benchmark client, run inside a sandbox with the project's interpreter (bench/run.py).

    client.py main SERVICE [--machines N] [--calls N] [--sequential N] [--list-calls N]
    client.py big SERVICE [--machines N]

``main``: idle memory, CreateMachine one after another and 32 in flight, lookups (Peer.Ping,
GetMachine, GetMachineByPID, Properties.Get/GetAll of a machine), ListMachines latency and
the daemon's CPU time for 50 of them, ``machinectl list``, memory with N machines, restart
until all N are listed again, and TerminateMachine of all until the registry is empty.
``big``: N machines created by 4 connections with 128 calls in flight, listed, terminated.

SERVICE is the daemon's unit (its MainPID is measured). Prints one JSON object: every
sample, in milliseconds unless the key says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__" and sys.argv[1:2] == ["responder"]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import machined.lean  # noqa: F401  (as the daemon starts: asyncio and dbus-fast without OpenSSL)

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

DEST = "org.freedesktop.machine1"
PATH = "/org/freedesktop/machine1"
MANAGER = "org.freedesktop.machine1.Manager"
MACHINE = "org.freedesktop.machine1.Machine"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def manager_call(member: str, sig: str = "", body: list[Any] | None = None) -> Message:
    return Message(destination=DEST, path=PATH, interface=MANAGER, member=member, signature=sig, body=body or [])


def machine_path(name: str) -> str:
    # Bench names are plain letters and digits: escaping only touches a leading digit.
    return f"{PATH}/machine/{name}"


def spawn_leaders(n: int) -> list[int]:
    devnull = os.open("/dev/null", os.O_RDWR)
    actions = [(os.POSIX_SPAWN_DUP2, devnull, fd) for fd in (0, 1, 2)]
    pids = [os.posix_spawn("/bin/sleep", ["sleep", "999998"], os.environ, file_actions=actions) for _ in range(n)]
    os.close(devnull)
    return pids


def main_pid(service: str) -> int:
    out = subprocess.run(["systemctl", "show", "-p", "MainPID", "--value", service],
                         capture_output=True, text=True).stdout  # fmt: skip
    return int(out.strip() or 0)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process, in clock ticks (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of *pid* in nanoseconds (schedstat: finer than clock ticks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total


async def settle(pid: int, timeout: float = 30) -> None:
    """Until the daemon is idle (under 10 ms of CPU in half a second): work left over from a
    registration storm (GC asking PID 1 about each new machine) must not count as lookups."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = cpu_ns(pid)
        await asyncio.sleep(0.5)
        if cpu_ns(pid) - before < 10_000_000:
            return


async def check(bus: MessageBus, message: Message) -> Message:
    reply = await bus.call(message)
    assert reply is not None and reply.message_type is MessageType.METHOD_RETURN, (
        message.member,
        reply and reply.error_name,
        reply and reply.body,
    )
    return reply


async def sequential(bus: MessageBus, make, count: int) -> list[float]:
    """Latency of *count* calls made one after another, in ms."""
    lat = []
    for i in range(count):
        message = make(i)
        t = time.perf_counter()
        await check(bus, message)
        lat.append((time.perf_counter() - t) * 1000)
    return lat


async def in_flight(buses: list[MessageBus], make, count: int, concurrency: int) -> float:
    """Seconds for *count* calls with at most *concurrency* in flight over *buses*."""
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            await check(buses[i % len(buses)], make(i))

    t = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    return time.perf_counter() - t


async def listed(bus: MessageBus) -> int:
    return len((await check(bus, manager_call("ListMachines"))).body[0])


async def until_listed(bus: MessageBus, count: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reply = await bus.call(manager_call("ListMachines"))
            if reply.message_type is MessageType.METHOD_RETURN and len(reply.body[0]) == count:
                return
        except Exception:
            pass
        await asyncio.sleep(0.005)
    raise TimeoutError(f"never listed {count} machines")


def machinectl_list(expect: int) -> float:
    t = time.perf_counter()
    r = subprocess.run(["machinectl", "list", "--no-pager", "--no-legend"], capture_output=True, text=True)
    elapsed = (time.perf_counter() - t) * 1000
    assert r.returncode == 0 and len(r.stdout.splitlines()) == expect, (
        r.returncode,
        r.stderr,
        len(r.stdout.splitlines()),
    )
    return elapsed


def create(name: str, leader: int) -> Message:
    return manager_call("CreateMachine", "sayssusa(sv)", [name, b"", "", "vm", leader, "", []])


def dbus_fast_compiled() -> bool:
    """Whether dbus-fast's Cython extension modules are the ones imported (not the pure-Python fallback)."""
    import dbus_fast.message
    from dbus_fast._private import marshaller, unmarshaller

    return all(m.__file__.endswith(".so") for m in (dbus_fast.message, marshaller, unmarshaller))


async def bench_main(args: argparse.Namespace) -> dict[str, Any]:
    n, out = args.machines, {"dbus_fast_compiled": dbus_fast_compiled()}
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    await check(bus, manager_call("ListMachines"))  # activation
    pid = main_pid(args.service)
    await asyncio.sleep(1)
    await settle(pid)
    out["rss_idle_mib"] = rss_mib(pid)
    # Lookups on an almost empty registry are what most clients see; the rows below run with N.
    leaders = spawn_leaders(n)
    seq = args.sequential
    out["create_sequential_ms"] = await sequential(bus, lambda i: create(f"b{i}", leaders[i]), seq)
    out["create_32_in_flight_s"] = await in_flight(
        [bus], lambda i: create(f"b{seq + i}", leaders[seq + i]), n - seq, 32
    )
    out["create_32_in_flight_count"] = n - seq
    assert await listed(bus) == n + 1
    await settle(pid)
    calls = args.calls
    ping = lambda i: Message(destination=DEST, path=PATH, interface="org.freedesktop.DBus.Peer", member="Ping")  # noqa: E731
    ns = cpu_ns(pid)
    out["ping_ms"] = await sequential(bus, ping, calls)
    out["ping_cpu_us"] = (cpu_ns(pid) - ns) / calls / 1000
    out["get_machine_ms"] = await sequential(bus, lambda i: manager_call("GetMachine", "s", [f"b{i % n}"]), calls)
    out["get_machine_by_pid_ms"] = await sequential(
        bus, lambda i: manager_call("GetMachineByPID", "u", [leaders[i % n]]), calls
    )
    out["properties_get_ms"] = await sequential(
        bus,
        lambda i: Message(
            destination=DEST,
            path=machine_path(f"b{i % n}"),
            interface="org.freedesktop.DBus.Properties",
            member="Get",
            signature="ss",
            body=[MACHINE, "State"],
        ),
        calls,
    )
    out["properties_get_all_ms"] = await sequential(
        bus,
        lambda i: Message(
            destination=DEST,
            path=machine_path(f"b{i % n}"),
            interface="org.freedesktop.DBus.Properties",
            member="GetAll",
            signature="s",
            body=[MACHINE],
        ),
        calls,
    )
    out["list_machines_ms"] = await sequential(bus, lambda i: manager_call("ListMachines"), args.list_calls)
    ticks, ns = cpu_ticks(pid), cpu_ns(pid)
    await sequential(bus, lambda i: manager_call("ListMachines"), 50)
    out["list_machines_cpu50_stat_s"] = (cpu_ticks(pid) - ticks) / CLK_TCK
    out["list_machines_cpu50_s"] = (cpu_ns(pid) - ns) / 1e9
    ns = cpu_ns(pid)
    out["machinectl_list_ms"] = [machinectl_list(n) for _ in range(args.machinectl)]
    out["machinectl_list_cpu_ms"] = (cpu_ns(pid) - ns) / args.machinectl / 1e6
    await settle(pid)
    out["rss_machines_mib"] = rss_mib(pid)
    # Restart: from the stop request until a fresh daemon lists all N again.
    t = time.perf_counter()
    subprocess.run(["systemctl", "restart", args.service], check=True)
    await until_listed(bus, n + 1)
    out["restart_listed_s"] = time.perf_counter() - t
    pid = main_pid(args.service)
    await settle(pid)
    out["rss_machines_after_restart_mib"] = rss_mib(pid)
    t = time.perf_counter()
    await in_flight([bus], lambda i: manager_call("TerminateMachine", "s", [f"b{i}"]), n, 32)
    await until_listed(bus, 1)
    out["terminate_until_gone_s"] = time.perf_counter() - t
    # What a round trip costs without the daemon: to the bus itself, and to a responder that
    # answers Ping with dbus-fast and asyncio doing nothing else (the daemon stopped meanwhile).
    out["bus_ping_ms"] = await sequential(bus, lambda i: Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
        member="GetId"), calls)  # fmt: skip
    subprocess.run(["systemctl", "stop", args.service], check=True)
    responder = subprocess.Popen(
        [sys.executable, __file__, "responder", args.service], stdout=subprocess.PIPE, text=True
    )
    try:
        assert responder.stdout is not None and responder.stdout.readline().strip() == "ready"
        ns = cpu_ns(responder.pid)
        out["floor_ping_ms"] = await sequential(bus, ping, calls)
        out["floor_ping_cpu_us"] = (cpu_ns(responder.pid) - ns) / calls / 1000
    finally:
        responder.kill()
        responder.wait()
    return out


async def responder() -> None:
    """The floor: org.freedesktop.machine1 answered by dbus-fast and asyncio alone (set up as the
    daemon sets them up: no OpenSSL, descriptors negotiated), every call with an empty reply."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dbus_fast import MessageFlag

    bus = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()

    def answer(msg: Message) -> bool:
        if msg.message_type is not MessageType.METHOD_CALL:
            return False
        bus.send(Message(message_type=MessageType.METHOD_RETURN, reply_serial=msg.serial, destination=msg.sender,
                         flags=MessageFlag.NO_REPLY_EXPECTED, validate=False))  # fmt: skip
        return True

    bus.add_message_handler(answer)
    await bus.request_name(DEST)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def serve_batches(args: argparse.Namespace) -> None:
    """Paired mode: N machines registered, then one batch of calls per line read from stdin
    ("OP COUNT"), one JSON line back per batch: the batch's p50 and the daemon's CPU per call.
    bench/run.py alternates batches between ours and real, both sandboxes up at once, so that
    load from elsewhere on the machine falls on both alike."""
    n = args.machines
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    await check(bus, manager_call("ListMachines"))
    leaders = spawn_leaders(n)
    await in_flight([bus], lambda i: create(f"b{i}", leaders[i]), n, 32)
    pid = main_pid(args.service)
    await settle(pid)
    props = "org.freedesktop.DBus.Properties"
    ops = {
        "ping": lambda i: Message(destination=DEST, path=PATH, interface="org.freedesktop.DBus.Peer", member="Ping"),
        "get_machine": lambda i: manager_call("GetMachine", "s", [f"b{i % n}"]),
        "get_machine_by_pid": lambda i: manager_call("GetMachineByPID", "u", [leaders[i % n]]),
        "properties_get": lambda i: Message(destination=DEST, path=machine_path(f"b{i % n}"), interface=props,
                                            member="Get", signature="ss", body=[MACHINE, "State"]),
        "properties_get_all": lambda i: Message(destination=DEST, path=machine_path(f"b{i % n}"), interface=props,
                                                member="GetAll", signature="s", body=[MACHINE]),
        "list_machines": lambda i: manager_call("ListMachines"),
    }  # fmt: skip
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line.strip():
            return
        op, count = line.split()[0], int(line.split()[1])
        ns = cpu_ns(pid)
        if op == "machinectl_list":
            values = [machinectl_list(n) for _ in range(count)]
        else:
            values = await sequential(bus, ops[op], count)
        print(
            json.dumps({"p50_ms": statistics.median(values), "cpu_us": (cpu_ns(pid) - ns) / count / 1000}), flush=True
        )


async def bench_big(args: argparse.Namespace) -> dict[str, Any]:
    n, out = args.machines, {}
    buses = [await MessageBus(bus_type=BusType.SYSTEM).connect() for _ in range(4)]
    bus = buses[0]
    await check(bus, manager_call("ListMachines"))
    leaders = spawn_leaders(n)
    out["create_s"] = await in_flight(buses, lambda i: create(f"g{i}", leaders[i]), n, 128)
    assert await listed(bus) == n + 1
    await settle(main_pid(args.service))
    out["list_machines_ms"] = await sequential(bus, lambda i: manager_call("ListMachines"), 20)
    out["machinectl_list_ms"] = [machinectl_list(n) for _ in range(3)]
    out["rss_machines_mib"] = rss_mib(main_pid(args.service))
    t = time.perf_counter()
    await in_flight(buses, lambda i: manager_call("TerminateMachine", "s", [f"g{i}"]), n, 32)
    await until_listed(bus, 1)
    out["terminate_until_gone_s"] = time.perf_counter() - t
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["main", "big", "responder", "paired"])
    ap.add_argument("service")
    ap.add_argument("--machines", type=int, default=1000)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--sequential", type=int, default=200)
    ap.add_argument("--list-calls", type=int, default=200)
    ap.add_argument("--machinectl", type=int, default=5)
    args = ap.parse_args()
    if args.mode == "responder":
        asyncio.run(responder())
        return
    if args.mode == "paired":
        asyncio.run(serve_batches(args))
        return
    result = asyncio.run(bench_main(args) if args.mode == "main" else bench_big(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

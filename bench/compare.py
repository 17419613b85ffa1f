"""Benchmark machined against systemd-machined 252 in the same run; prints ratios.

Each implementation gets a fresh sandbox; the same client (dbus-fast, inside the
sandbox) then measures: registering N machines concurrently (CreateMachine
until the reply, i.e. until the scope job finished), ListMachines and GetMachine
latency with N machines registered, GetMachineByPID, GetMachineOSRelease of
.host, and terminating all N until the registry is empty.

Usage: .venv/bin/python bench/compare.py [--machines N] [--calls N]
A ratio below 1 means ours is faster.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machined.sandbox import Sandbox  # noqa: E402

CLIENT = r"""
import asyncio, json, subprocess, sys, time
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

N, CALLS = int(sys.argv[1]), int(sys.argv[2])
M, MP, MI = "org.freedesktop.machine1", "/org/freedesktop/machine1", "org.freedesktop.machine1.Manager"

def msg(member, sig="", body=()):
    return Message(destination=M, path=MP, interface=MI, member=member, signature=sig, body=list(body))

async def timed(bus, make, count, concurrency=1):
    sem = asyncio.Semaphore(concurrency)
    lat = []
    async def one(i):
        async with sem:
            t = time.perf_counter()
            r = await bus.call(make(i))
            lat.append(time.perf_counter() - t)
            assert r.message_type is MessageType.METHOD_RETURN, (r.error_name, r.body)
    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    total = time.perf_counter() - t0
    lat.sort()
    return {"total_s": total, "p50_ms": lat[len(lat) // 2] * 1000, "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1000}

async def main():
    leaders = []
    for i in range(N):
        subprocess.run(["systemd-run", "--quiet", f"--unit=bench-{i}", "sleep", "1000"], check=True)
    for i in range(N):
        leaders.append(int(subprocess.run(["systemctl", "show", "-p", "MainPID", "--value", f"bench-{i}"],
                                          capture_output=True, text=True).stdout))
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    await bus.call(msg("ListMachines"))  # activation, warm-up
    out = {}
    out["CreateMachine x%d (concurrent)" % N] = await timed(
        bus, lambda i: msg("CreateMachine", "sayssusa(sv)", [f"b{i}", b"", "", "vm", leaders[i], "", []]), N, 32)
    out["ListMachines (%d machines)" % N] = await timed(bus, lambda i: msg("ListMachines"), CALLS)
    out["GetMachine"] = await timed(bus, lambda i: msg("GetMachine", "s", [f"b{i % N}"]), CALLS)
    out["GetMachineByPID"] = await timed(bus, lambda i: msg("GetMachineByPID", "u", [leaders[i % N]]), CALLS)
    out["GetMachineOSRelease .host"] = await timed(bus, lambda i: msg("GetMachineOSRelease", "s", [".host"]), CALLS)
    t0 = time.perf_counter()
    await timed(bus, lambda i: msg("TerminateMachine", "s", [f"b{i}"]), N, 32)
    while len((await bus.call(msg("ListMachines"))).body[0]) > 1:
        await asyncio.sleep(0.01)
    out["TerminateMachine x%d until gone" % N] = {"total_s": time.perf_counter() - t0, "p50_ms": 0, "p99_ms": 0}
    print(json.dumps(out))

asyncio.run(main())
"""


def measure(impl: str, machines: int, calls: int) -> dict:
    with Sandbox(impl) as sb:
        sb.run(["sh", "-c", f"cat > /tmp/bench.py <<'EOF'\n{CLIENT}\nEOF"])
        result = sb.run([sys.executable, "/tmp/bench.py", str(machines), str(calls)], timeout=1800)
        return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=100)
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    real = measure("real", args.machines, args.calls)
    ours = measure("ours", args.machines, args.calls)
    print(f"{'operation':<38} {'real':>12} {'ours':>12} {'ours/real':>10}")
    for op in real:
        for key in ("total_s", "p50_ms", "p99_ms"):
            r, o = real[op][key], ours[op][key]
            if r == 0 and o == 0:
                continue
            unit = "s" if key == "total_s" else "ms"
            label = f"{op} {key.split('_')[0]}"
            print(f"{label:<38} {r:>10.3f}{unit:>2} {o:>10.3f}{unit:>2} {o / r if r else float('inf'):>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

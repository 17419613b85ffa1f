"""The event loop under the lookups: the stock asyncio loop against uvloop, side by side on a private bus.

A private dbus-daemon (session configuration, socket in a temporary directory) and, for each
loop, a responder that is nothing but dbus-fast answering every method call with an empty
reply, set up as the daemon sets itself up (``machined.lean`` first: no OpenSSL unless the loop
itself imports it, descriptors negotiated). One client (stock asyncio) calls Peer.Ping one call
after another, the responders taking turns in short batches so that load from elsewhere falls
on both alike. Reported per loop: the median latency, the responder's CPU per call
(``/proc/PID/schedstat``) and its resident memory once started (RssAnon + RssFile).

uvloop is optional: ``pip install uvloop`` first (the row is left out without it).

Usage: .venv/bin/python bench/loops.py [--calls N] [--rounds N] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "org.example.Responder"

RESPONDER = r"""
import sys
sys.path.insert(0, sys.argv[2])
import machined.lean  # noqa: F401  (as the daemon: asyncio and dbus-fast without OpenSSL)
import asyncio
if sys.argv[1] == "uvloop":
    import uvloop
    uvloop.install()
from dbus_fast import Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus

async def main():
    bus = await MessageBus(bus_address=sys.argv[3], negotiate_unix_fd=True).connect()
    def answer(msg):
        if msg.message_type is not MessageType.METHOD_CALL:
            return False
        bus.send(Message(message_type=MessageType.METHOD_RETURN, reply_serial=msg.serial, destination=msg.sender,
                         flags=MessageFlag.NO_REPLY_EXPECTED, validate=False))
        return True
    bus.add_message_handler(answer)
    await bus.request_name(sys.argv[4])
    print(type(asyncio.get_running_loop()).__module__, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def cpu_ns(pid: int) -> int:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def rss_mib(pid: int) -> float:
    kib = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:")):
            kib += int(line.split()[1])
    return round(kib / 1024, 1)


def have_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


async def run(calls: int, rounds: int) -> dict[str, dict[str, float]]:
    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus

    loops = ["asyncio"] + (["uvloop"] if have_uvloop() else [])
    with tempfile.TemporaryDirectory() as tmp:
        address = f"unix:path={tmp}/bus"
        config = Path(tmp, "bus.conf")
        config.write_text(
            "<busconfig><type>session</type><listen>" + address + "</listen><auth>EXTERNAL</auth>"
            '<policy context="default"><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/>'
            '<allow own="*"/></policy></busconfig>'
        )
        daemon = subprocess.Popen(["dbus-daemon", f"--config-file={config}", "--nofork", "--nopidfile"])
        responders: dict[str, subprocess.Popen[str]] = {}
        try:
            for _ in range(100):
                if Path(tmp, "bus").exists():
                    break
                time.sleep(0.05)
            for i, loop in enumerate(loops):
                responders[loop] = subprocess.Popen(
                    [sys.executable, "-c", RESPONDER, loop, str(ROOT), address, f"{NAME}{i}"],
                    stdout=subprocess.PIPE, text=True,
                )  # fmt: skip
            for proc in responders.values():
                assert proc.stdout is not None
                proc.stdout.readline()
            bus = await MessageBus(bus_address=address).connect()
            samples: dict[str, list[float]] = {loop: [] for loop in loops}
            cpu: dict[str, int] = dict.fromkeys(loops, 0)
            for r in range(rounds):
                for loop in loops if r % 2 == 0 else loops[::-1]:
                    pid = responders[loop].pid
                    dest = f"{NAME}{loops.index(loop)}"
                    ns = cpu_ns(pid)
                    for _ in range(calls):
                        t = time.perf_counter()
                        reply = await bus.call(
                            Message(destination=dest, path="/", interface="org.freedesktop.DBus.Peer", member="Ping")
                        )
                        samples[loop].append(time.perf_counter() - t)
                        assert reply is not None and reply.message_type is MessageType.METHOD_RETURN
                    cpu[loop] += cpu_ns(pid) - ns
            bus.disconnect()
            return {
                loop: {
                    "ping_p50_ms": round(statistics.median(samples[loop]) * 1000, 4),
                    "cpu_per_call_us": round(cpu[loop] / (calls * rounds) / 1000, 1),
                    "rss_mib": rss_mib(responders[loop].pid),
                }
                for loop in loops
            }
        finally:
            for proc in responders.values():
                proc.kill()
                proc.wait()
            daemon.kill()
            daemon.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500, help="calls per batch")
    parser.add_argument("--rounds", type=int, default=20, help="batches per loop, taking turns")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "loops-latest.json"))
    args = parser.parse_args()
    results = asyncio.run(run(args.calls, args.rounds))
    print("| loop | Peer.Ping p50 | responder CPU per call | responder RSS |")
    print("|---|---|---|---|")
    for loop, r in results.items():
        print(f"| {loop} | {r['ping_p50_ms']} ms | {r['cpu_per_call_us']} µs | {r['rss_mib']} MiB |")
    meta = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "host": platform.node(),
            "cpus": os.cpu_count(), "calls": args.calls, "rounds": args.rounds}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Load client for the storm tests, run inside a sandbox with the project's interpreter.

    loadclient.py create PREFIX N [--conns C] [--concurrency K] [--timeout S]
        start N leader processes, CreateMachine PREFIX1..PREFIXN for them
    loadclient.py terminate PREFIX N [--conns C] [--concurrency K]
        TerminateMachine PREFIX1..PREFIXN
    loadclient.py calls METHOD ARGS_JSON N [--conns C] [--concurrency K]
        the same Manager call N times (ARGS_JSON: [signature, [values...]])

With ``--as-user NAME`` the client drops to that user after its imports (an unprivileged user
cannot run the project's interpreter, which lives under /root, by itself).

Calls are spread over C connections (dbus-daemon allows each 128 pending replies),
at most K in flight in all. Prints one JSON object: replies by outcome ("ok" or the
error name), calls without any reply within the timeout ("noreply"), the slowest
reply in seconds, and for ``create`` the leaders' PIDs by name.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from typing import Any

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

DEST = "org.freedesktop.machine1"
PATH = "/org/freedesktop/machine1"
IFACE = "org.freedesktop.machine1.Manager"


def spawn_leaders(n: int) -> list[int]:
    devnull = os.open("/dev/null", os.O_RDWR)
    actions = [(os.POSIX_SPAWN_DUP2, devnull, fd) for fd in (0, 1, 2)]
    pids = [os.posix_spawn("/bin/sleep", ["sleep", "999997"], os.environ, file_actions=actions) for _ in range(n)]
    os.close(devnull)
    return pids


async def storm(
    calls: list[tuple[str, str, list[Any]]], conns: int, concurrency: int, timeout: float
) -> dict[str, Any]:
    buses = [await MessageBus(bus_type=BusType.SYSTEM).connect() for _ in range(conns)]
    outcomes: Counter[str] = Counter()
    slowest = 0.0
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int, member: str, sig: str, body: list[Any]) -> None:
        nonlocal slowest
        async with gate:
            start = time.monotonic()
            msg = Message(destination=DEST, path=PATH, interface=IFACE, member=member, signature=sig, body=body)
            try:
                reply = await asyncio.wait_for(buses[i % conns].call(msg), timeout)
            except TimeoutError:
                outcomes["noreply"] += 1
                return
            slowest = max(slowest, time.monotonic() - start)
            if reply is None:
                outcomes["noreply"] += 1
            elif reply.message_type is MessageType.ERROR:
                outcomes[reply.error_name or "?"] += 1
            else:
                outcomes["ok"] += 1

    await asyncio.gather(*(one(i, *c) for i, c in enumerate(calls)))
    for bus in buses:
        bus.disconnect()
    return {"outcomes": dict(outcomes), "slowest": round(slowest, 3)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["create", "terminate", "calls"])
    ap.add_argument("what")
    ap.add_argument("rest", nargs="*")
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--as-user")
    args = ap.parse_args()
    if args.as_user:
        import pwd

        entry = pwd.getpwnam(args.as_user)
        os.setgroups([])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    result: dict[str, Any] = {}
    if args.mode == "create":
        n = int(args.rest[0])
        pids = spawn_leaders(n)
        names = [f"{args.what}{i + 1}" for i in range(n)]
        calls = [
            ("CreateMachine", "sayssusa(sv)", [nm, b"", "", "vm", pid, "", []])
            for nm, pid in zip(names, pids, strict=True)
        ]
        result["leaders"] = dict(zip(names, pids, strict=True))
    elif args.mode == "terminate":
        n = int(args.rest[0])
        calls = [("TerminateMachine", "s", [f"{args.what}{i + 1}"]) for i in range(n)]
    else:
        sig, body = json.loads(args.rest[0])
        calls = [(args.what, sig, body)] * int(args.rest[1])
    result.update(asyncio.run(storm(calls, args.conns, args.concurrency, args.timeout)))
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run inside a sandbox (with the checkout's venv python): make D-Bus calls to
org.freedesktop.machine1 given as JSON on stdin and print each outcome on one line: the
reply's body or ``ERROR name: message``. busctl cannot pass a pidfd nor show error names;
this can.

Input: a JSON list of calls ``[path, interface, member, signature, body]``. In a body,
``{"v": [signature, value]}`` is a variant, ``{"pidfd": PID}`` a pidfd of PID (passed as a
unix fd), ``{"pidfdid": PID}`` the inode number of such a pidfd, ``{"pid": "$NAME"}`` the
PID in the environment variable NAME, ``{"bytes": [..]}`` a byte array.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

DEST = "org.freedesktop.machine1"


def convert(value: Any, fds: list[int]) -> Any:
    if isinstance(value, list):
        return [convert(v, fds) for v in value]
    if isinstance(value, dict):
        if "v" in value:
            sig, inner = value["v"]
            return Variant(sig, convert(inner, fds))
        if "pidfd" in value:
            fds.append(os.pidfd_open(int(convert(value["pidfd"], fds))))
            return len(fds) - 1
        if "pidfdid" in value:
            fd = os.pidfd_open(int(convert(value["pidfdid"], fds)))
            try:
                return os.fstat(fd).st_ino
            finally:
                os.close(fd)
        if "pid" in value:
            return int(os.environ[value["pid"].lstrip("$")])
        if "bytes" in value:
            return bytes(value["bytes"])
        if "struct" in value:
            return tuple(convert(v, fds) for v in value["struct"])
    return value


def show(value: Any) -> str:
    if isinstance(value, Variant):
        return f"<{value.signature}>{show(value.value)}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, bytes):
        return value.hex()
    return json.dumps(value)


async def main() -> None:
    calls = json.load(sys.stdin)
    bus = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()
    for path, interface, member, signature, body in calls:
        fds: list[int] = []
        try:
            args = convert(body, fds)
        except (OSError, KeyError, ValueError) as e:
            print(f"{member}: cannot build the call: {e}")
            continue
        reply = await bus.call(
            Message(
                destination=DEST,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=args,
                unix_fds=fds,
            )  # fmt: skip
        )
        for fd in fds:
            os.close(fd)
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            print(f"{member}: ERROR {reply.error_name}: {reply.body[0] if reply.body else ''}")
        else:
            print(f"{member}: {show(reply.body)}")
        for fd in reply.unix_fds:
            os.close(fd)
    bus.disconnect()


if __name__ == "__main__":
    asyncio.run(main())

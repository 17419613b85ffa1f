"""Fuzzing the varlink server (hypothesis): whatever a client sends, each message is answered
as specified or the connection is closed, the server stays up, logs no error, and another
client (root's) is served right after.

"As specified", checked independently of the server's own reader: what Python's strict JSON
reader refuses (or what is not UTF-8) is closed without a reply; a well-formed Ping is
answered ``{}``; anything else gets at most one reply, a JSON object made of ``parameters``
and ``error`` only (the methods here answer once), or a close.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from machined.varlink.server import Call, Service, VarlinkServer

PING = {"method": "io.systemd.service.Ping"}


class _Running:
    """A VarlinkServer served by an event loop in a thread of its own."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def ping(call: Call) -> dict[str, Any]:
            return {}

        async def echo(call: Call) -> dict[str, Any]:
            return {"echo": call.parameters}

        service = Service()
        service.bind("io.systemd.service.Ping", ping)
        service.bind("x.Echo", echo)
        self.server = VarlinkServer(service, [self.path])
        self.loop.run_until_complete(self.server.start())
        self.ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Running]:
    server = _Running(str(Path(tmp_path_factory.mktemp("fuzz")) / "s"))
    yield server
    server.stop()


def _exchange(path: str, data: bytes, timeout: float = 0.5) -> tuple[list[bytes], bool]:
    """Send *data* (one message and its NUL); the replies, and whether the server closed."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    try:
        sock.sendall(data)
    except OSError:
        pass
    buf = b""
    closed = False
    end = time.monotonic() + timeout
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
        if buf.endswith(b"\0"):
            end = min(end, time.monotonic() + 0.02)  # (a close right after the reply, if any)
    sock.close()
    return buf.split(b"\0")[:-1], closed


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _loads(text: str | bytes, **kwargs: Any) -> Any:
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)
    try:
        return json.loads(text, **kwargs)
    finally:
        sys.setrecursionlimit(limit)


def _strict(raw: bytes) -> Any:
    """What a strict JSON reader makes of *raw*; ValueError if it refuses it, or if it nests
    deeper than sd-json's 2048."""

    def refuse(name: str) -> Any:
        raise ValueError(name)

    value = _loads(raw.decode("utf-8"), parse_constant=refuse)
    if _depth(value) > 2048:
        raise ValueError("too deep")
    return value


TOKENS = [
    b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b"\\u0000", b"\\ud800", b"\\udfff", b"\\ud83d\\ude00",
    b"\\ufffe", b"NaN", b"Infinity", b"-", b"0", b"01", b"1e999", b"99999999999999999999999", b"null",
    b"true", b"false", b" ", b"\t", b"\xff", b"\xc3\xa9", b"\xef\xbb\xbf", b"\x01", b"\x7f", b'"method"',
    b'"io.systemd.service.Ping"', b'"x.Echo"', b'"parameters"', b'"more"', b'"oneway"', b'"upgrade"', b'"a"',
]  # fmt: skip

CALL = st.fixed_dictionaries(
    {"method": st.sampled_from(["io.systemd.service.Ping", "x.Echo", "x.Nope", "", "org.varlink.service.GetInfo"])},
    optional={
        "parameters": st.one_of(st.none(), st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5))),
        "more": st.booleans(),
        "oneway": st.booleans(),
        "upgrade": st.booleans(),
    },
)

MESSAGES = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from(TOKENS), max_size=30).map(b"".join),
    CALL.map(lambda c: json.dumps(c).encode()),
    st.tuples(CALL.map(lambda c: json.dumps(c).encode()), st.integers(0, 200), st.sampled_from(TOKENS)).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]
    ),
    st.integers(1, 3000).map(lambda n: b'{"method":"x.Echo","parameters":{"a":' + b"[" * n + b"]" * n + b"}}"),
).map(lambda m: m.replace(b"\0", b""))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(message=MESSAGES)
def test_every_message_is_answered_as_specified_or_closed(
    running: _Running, message: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="machined"):
        replies, closed = _exchange(running.path, message + b"\0")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    try:
        value: Any = _strict(message)
    except ValueError:
        value = None
        assert closed and not replies, (message[:200], replies)
    if value == PING:
        assert replies == [b"{}"] and not closed
    assert len(replies) <= 1, replies
    for reply in replies:
        parsed = _loads(reply)
        assert isinstance(parsed, dict) and set(parsed) <= {"parameters", "error"}, reply
    # root (any other client) is served right after, and the server is up
    assert _exchange(running.path, json.dumps(PING).encode() + b"\0", timeout=5) == ([b"{}"], False)

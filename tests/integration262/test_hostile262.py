"""A hostile local user (nobody) on the varlink sockets, against systemd-machined 262 and ours.

Raw varlink over the sockets (hostile_client.py, run inside each sandbox): malformed and
odd messages, and a differential fuzz run, must get 262's answer (the same reply or error,
or the same close); a flood of Pings on any socket must leave root served (List and D-Bus
ListMachines p99 < 50 ms, ours; 262's numbers are printed); a user keeps 128 connections;
hanging up a resolve-hook subscription with a call queued behind it lets go of everything
at once (the daemon's descriptors are counted); and nothing writes a traceback.

Known, deliberate difference: one user's unfinished messages may pin at most 64 MiB in ours
(262: 128 connections × 16 MiB); the connections past it are closed.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from machined.sandbox import Sandbox

CLIENT = str(Path(__file__).with_name("hostile_client.py"))
M = "/run/systemd/machine/io.systemd.Machine"
MI = "/run/systemd/machine/io.systemd.MachineImage"
H = "/run/systemd/resolve.hook/io.systemd.Machine"
U = "/run/systemd/userdb/io.systemd.Machine"
P = b'"method":"io.systemd.service.Ping"'
L = b'"method":"io.systemd.Machine.List"'
RR = b'"method":"io.systemd.Resolve.Hook.ResolveRecord"'
GUR = b'"method":"io.systemd.UserDatabase.GetUserRecord"'


def _deep(n: int, open_: bytes = b"[", close: bytes = b"]") -> bytes:
    return open_ * n + close * n


# (name, socket, message without its NUL)
HOSTILE: list[tuple[str, str, bytes]] = [
    # flags: more, oneway, upgrade
    ("ping", M, b"{" + P + b"}"),
    ("more false, oneway false", M, b"{" + P + b',"more":false,"oneway":false}'),
    ("more and oneway", M, b"{" + P + b',"more":true,"oneway":true}'),
    ("oneway false then more", M, b"{" + P + b',"oneway":false,"more":true}'),
    ("more true then more false", M, b"{" + P + b',"more":true,"more":false}'),
    ("more false twice", M, b"{" + P + b',"more":false,"more":false}'),
    ("oneway true twice", M, b"{" + P + b',"oneway":true,"oneway":true}'),
    ("oneway, then a ping", M, b"{" + P + b',"oneway":true}\0{' + P + b"}"),
    ("oneway to no such method", M, b'{"method":"io.systemd.Nope","oneway":true}'),
    ("upgrade", M, b"{" + P + b',"upgrade":true}'),
    ("upgrade false", M, b"{" + P + b',"upgrade":false}'),
    ("upgrade and more", M, b"{" + P + b',"upgrade":true,"more":true}'),
    ("upgrade and more false", M, b"{" + P + b',"upgrade":true,"more":false}'),
    ("upgrade and oneway", M, b"{" + P + b',"upgrade":true,"oneway":true}'),
    ("oneway false then upgrade", M, b"{" + P + b',"oneway":false,"upgrade":true}'),
    ("upgrade twice", M, b"{" + P + b',"upgrade":true,"upgrade":false}'),
    ("upgrade null", M, b"{" + P + b',"upgrade":null}'),
    ("upgrade, then a ping", M, b"{" + P + b',"upgrade":true}\0{' + P + b"}"),
    ("upgrade List", M, b"{" + L + b',"parameters":{"name":".host"},"upgrade":true}'),
    ("upgrade List, bad parameter", M, b"{" + L + b',"parameters":{"name":1},"upgrade":true}'),
    ("upgrade image List", MI, b'{"method":"io.systemd.MachineImage.List","upgrade":true}'),
    ("upgrade Kill", M, b'{"method":"io.systemd.Machine.Kill","parameters":{"name":"x"},"upgrade":true}'),
    ("upgrade no such method", M, b'{"method":"io.systemd.Nope","upgrade":true}'),
    ("upgrade GetInterfaceDescription", M,
     b'{"method":"org.varlink.service.GetInterfaceDescription","parameters":{"interface":"nope"},"upgrade":true}'),
    ("upgrade QueryFilter", H, b'{"method":"io.systemd.Resolve.Hook.QueryFilter","upgrade":true}'),
    ("upgrade GetUserRecord", U, b"{" + GUR + b',"parameters":{"service":"io.systemd.Machine"},"upgrade":true}'),
    ("more as a string", M, b"{" + P + b',"more":"yes"}'),
    ("oneway as a number", M, b"{" + P + b',"oneway":1}'),
    # the envelope
    ("unknown key", M, b"{" + P + b',"foo":1}'),
    ("method twice", M, b"{" + P + b"," + P + b"}"),
    ("parameters twice", M, b"{" + P + b',"parameters":{},"parameters":{}}'),
    ("parameters first", M, b'{"parameters":{},' + P + b"}"),
    ("parameters null", M, b"{" + P + b',"parameters":null}'),
    ("parameters an array", M, b"{" + P + b',"parameters":[]}'),
    ("parameters a string", M, b"{" + P + b',"parameters":"x"}'),
    ("method a number", M, b'{"method":1}'),
    ("no method", M, b'{"parameters":{}}'),
    ("empty method", M, b'{"method":""}'),
    ("method without interface", M, b'{"method":"Ping"}'),
    ("empty message", M, b""),
    ("an array", M, b"[1]"),
    ("a string", M, b'"x"'),
    ("true", M, b"true"),
    ("null", M, b"null"),
    ("garbage", M, b"xyz"),
    ("two values", M, b"{" + P + b"}{" + P + b"}"),
    ("trailing comma", M, b"{" + P + b",}"),
    ("whitespace around", M, b" \n\t{" + P + b"} \n"),
    ("a ping, garbage, a ping", M, b"{" + P + b"}\0xyz\0{" + P + b"}"),
    # JSON values sd-json refuses
    ("NaN", M, b"{" + P + b',"parameters":{"x":NaN}}'),
    ("nan", M, b"{" + P + b',"parameters":{"x":nan}}'),
    ("Infinity", M, b"{" + P + b',"parameters":{"x":Infinity}}'),
    ("-Infinity", M, b"{" + P + b',"parameters":{"x":-Infinity}}'),
    ("leading zero", M, b"{" + P + b',"parameters":{"x":01}}'),
    ("plus sign", M, b"{" + P + b',"parameters":{"x":+1}}'),
    ("byte order mark", M, b"\xef\xbb\xbf{" + P + b"}"),
    ("\\u0000 in a name", M, b"{" + L + b',"parameters":{"name":"a\\u0000b"}}'),
    ("\\u0000 in a parameter", M, b"{" + P + b',"parameters":{"x":"\\u0000"}}'),
    ("control character", M, b"{" + L + b',"parameters":{"name":"a\x01b"}}'),
    ("raw tab", M, b"{" + L + b',"parameters":{"name":"a\tb"}}'),
    ("raw DEL", M, b"{" + L + b',"parameters":{"name":"a\x7fb"}}'),
    ("escaped DEL", M, b'{"method":"x\\u007f"}'),
    ("bad escape", M, b"{" + L + b',"parameters":{"name":"\\x"}}'),
    # UTF-8 and surrogates
    ("invalid UTF-8", M, b"{" + L + b',"parameters":{"name":"\xff"}}'),
    ("overlong UTF-8", M, b"{" + L + b',"parameters":{"name":"\xc0\xaf"}}'),
    ("UTF-8 surrogate", M, b'{"method":"x\xed\xa0\x80"}'),
    ("lone surrogate in a method", M, b'{"method":"x\\ud800"}'),
    ("lone low surrogate", M, b'{"method":"x\\udc00"}'),
    ("lone surrogate echoed", M, b'{"method":"io.systemd.N\\udfffope"}'),
    ("lone surrogate in a name", M, b"{" + L + b',"parameters":{"name":"\\ud800"}}'),
    ("lone surrogate in an interface", M,
     b'{"method":"org.varlink.service.GetInterfaceDescription","parameters":{"interface":"a\\ud800"}}'),
    ("surrogate pair", M, b'{"method":"x\\ud83d\\ude00"}'),
    ("UTF-8 in a method", M, b'{"method":"x\xc3\xa9"}'),
    ("noncharacter U+FFFE", M, '{"method":"x\ufffe"}'.encode()),
    ("escaped U+FDD0", M, b'{"method":"x\\ufdd0"}'),
    ("U+FDF0", M, '{"method":"x\ufdf0"}'.encode()),
    ("escaped U+10FFFF", M, b'{"method":"x\\udbff\\udfff"}'),
    ("U+10FFFD", M, '{"method":"x\U0010fffd"}'.encode()),
    ("U+0080", M, b'{"method":"x\xc2\x80"}'),
    # numbers
    ("100,000 digits", M, b"{" + L + b',"parameters":{"name":' + b"9" * 100000 + b"}}"),
    ("100,000 digits to Ping", M, b"{" + P + b',"parameters":{"x":' + b"9" * 100000 + b"}}"),
    ("100,000 digits as a uid", U, b"{" + GUR + b',"parameters":{"uid":' + b"9" * 100000 + b',"service":"io.systemd.Machine"}}'),
    ("2^64 as a pid", M, b"{" + L + b',"parameters":{"pid":18446744073709551616}}'),
    ("-2^63-1 as a pid", M, b"{" + L + b',"parameters":{"pid":-9223372036854775809}}'),
    ("1e400", M, b"{" + P + b',"parameters":{"x":1e400}}'),
    ("1e-400", M, b"{" + P + b',"parameters":{"x":1e-400}}'),
    ("-0", M, b"{" + P + b',"parameters":{"x":-0}}'),
    ("1.0 as a boolean", M, b"{" + L + b',"parameters":{"name":".host","acquireMetadata":1.0}}'),
    ("1e2 as a pid", M, b"{" + L + b',"parameters":{"pid":1e2}}'),
    ("a real in a question", H, b"{" + RR + b',"parameters":{"question":[{"key":{"name":"a","type":1e400}}]}}'),
    # nesting
    ("depth 2000 in a parameter", M, b"{" + L + b',"parameters":{"name":' + _deep(2000) + b"}}"),
    ("depth 2048 in all", M, b"{" + P + b',"parameters":{"x":' + _deep(2046) + b"}}"),
    ("depth 2049 in all", M, b"{" + P + b',"parameters":{"x":' + _deep(2047) + b"}}"),
    ("depth 5000", M, b"{" + P + b',"parameters":{"x":' + _deep(5000) + b"}}"),
    ("objects 2000 deep", M, b"{" + P + b',"parameters":{"x":' + b'{"a":' * 2000 + b"1" + b"}" * 2000 + b"}}"),
    ("100,000 brackets unclosed", M, b"[" * 100000),
    ("depth 2000 in a question", H, b"{" + RR + b',"parameters":{"question":' + _deep(2000) + b"}}"),
    # keys given twice
    ("a parameter twice", M, b"{" + L + b',"parameters":{"name":"a","name":"b"}}'),
    ("a parameter twice, the first of the wrong type", M, b"{" + L + b',"parameters":{"name":1,"name":"b"}}'),
    ("an unknown parameter before one twice", M, b"{" + L + b',"parameters":{"zzz":1,"name":"a","name":"b"}}'),
    ("an unknown parameter after one twice", M, b"{" + L + b',"parameters":{"name":"a","name":"b","zzz":1}}'),
    ("acquireMetadata twice", M, b"{" + L + b',"parameters":{"name":".host","acquireMetadata":"no","acquireMetadata":"no"}}'),
    ("a key twice inside a question", H,
     b"{" + RR + b',"parameters":{"question":[{"key":{"name":"a","name":"b","type":1}}]}}'),
    ("service twice", U, b"{" + GUR + b',"parameters":{"service":"io.systemd.Machine","service":"io.systemd.Machine"}}'),
    # a subscription with a call behind it
    ("QueryFilter with more, then a ping", H, b'{"method":"io.systemd.Resolve.Hook.QueryFilter","more":true}\0{' + P + b"}"),
]  # fmt: skip

# What the fuzz run mutates: calls whose answers do not depend on the machine they run on.
FUZZ_BASES = [
    (M, b'{"method":"io.systemd.service.Ping"}'),
    (M, b'{"method":"io.systemd.Machine.List","parameters":{"name":"nosuch"}}'),
    (M, b'{"method":"io.systemd.Machine.Kill","parameters":{"name":"nosuch","signal":9,"whom":"all"},"oneway":false}'),
    (M, b'{"method":"io.systemd.MachineImage.List","parameters":{"name":"nosuch"},"more":true}'),
    (H, b'{"method":"io.systemd.Resolve.Hook.QueryFilter","parameters":{}}'),
]
FUZZ_TOKENS = [
    b",", b"{", b"}", b"[", b"]", b'"', b"\\", b"\\u0000", b"\\ud800", b"\\udc00", b"\\ud83d\\ude00", b"NaN", b"1e999",
    b"-", b"0", b"00", b"null", b"true", b" ", b"\n", b"\xff", b"\xc3", b"\xc3\xa9", b"\xef\xbb\xbf", b"\x01", b":",
    b'"more":true', b'"oneway":true', b'"upgrade":true', b'"method":"x"', b'"parameters":{}', b"18446744073709551616",
    b"1.5", b"\\x", b"\\u00e9", b"\t", b"\x7f", b"\xed\xa0\x80", b"\xef\xbf\xbe", b"\\uFFFF", b"\\uDBFF\\uDFFF", b"\\b",
]  # fmt: skip


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3))):
        op, pos = rng.randrange(4), rng.randrange(len(out) + 1)
        if op == 0 and out:
            del out[pos : pos + rng.randrange(1, 4)]
        elif op == 1:
            out[pos:pos] = rng.choice(FUZZ_TOKENS)
        elif op == 2 and out:
            out[min(pos, len(out) - 1)] = rng.randrange(1, 256)
        else:
            start = rng.randrange(len(out))
            out[pos:pos] = out[start : start + rng.randrange(1, 30)]
    return bytes(out).replace(b"\0", b"")


def _client(sb: Sandbox, *args: str, input: str | None = None, timeout: float = 120) -> Any:
    r = sb.run([sys.executable, CLIENT, *args], input=input, timeout=timeout)
    return json.loads(r.stdout)


def _probe(sb: Sandbox, cases: list[tuple[str, bytes]], wait: float = 1.0) -> list[dict[str, Any]]:
    return _client(sb, "probe", input=json.dumps([(path, data.hex(), wait, 1) for path, data in cases]))  # type: ignore[no-any-return]


def _daemon_pid(sb: Sandbox) -> int:
    for unit in ("systemd-machined", "machined"):
        pid = int(sb.run(["systemctl", "show", "-P", "MainPID", unit]).stdout.strip() or 0)
        if pid:
            return pid
    raise AssertionError("no machined runs")


def _fds(sb: Sandbox) -> int:
    return len(sb.run(["ls", f"/proc/{_daemon_pid(sb)}/fd"]).stdout.split())


@pytest.fixture(scope="module")
def both(real262: Sandbox, ours262: Sandbox) -> tuple[Sandbox, Sandbox]:
    for sb in (real262, ours262):  # (starts the daemon; its hook and userdb sockets come with it)
        sb.run(["varlinkctl", "call", M, "io.systemd.service.Ping", "{}"])
        sb.run(["bash", "-c", f"for i in $(seq 100); do [ -S {H} ] && [ -S {U} ] && exit 0; sleep 0.05; done; exit 1"])
    return real262, ours262


def test_hostile_messages_as_262(both: tuple[Sandbox, Sandbox]) -> None:
    cases = [(path, data + b"\0") for _, path, data in HOSTILE]
    real, ours = (_probe(sb, cases) for sb in both)
    differ = [f"{name}: 262 {r} ours {o}" for (name, _, _), r, o in zip(HOSTILE, real, ours, strict=True) if r != o]
    assert not differ, "\n".join(differ)
    closed = sum(r["closed"] for r in real)
    assert 30 < closed < len(HOSTILE) - 30  # (both kinds of answer are there)


def test_fuzzed_messages_as_262(both: tuple[Sandbox, Sandbox]) -> None:
    rng = random.Random(19)
    cases = []
    for _ in range(400):
        path, base = rng.choice(FUZZ_BASES)
        cases.append((path, _mutate(rng, base) + b"\0"))
    real, ours = (_probe(sb, cases) for sb in both)
    differ = [f"{data!r}: 262 {r} ours {o}" for (_, data), r, o in zip(cases, real, ours, strict=True) if r != o]
    assert not differ, "\n".join(differ[:20])


def test_connections_per_user_as_262(both: tuple[Sandbox, Sandbox]) -> None:
    answered = [_client(sb, "connections", M, "200")["answered"] for sb in both]
    assert answered == [128, 128]


def test_hangups_release_everything_as_262(both: tuple[Sandbox, Sandbox]) -> None:
    for sb in both:
        before = _fds(sb)
        assert _client(sb, "hangups", "100") == {"subscribed": 100}
        sb.run(["sleep", "0.5"])
        assert _fds(sb) == before, sb.info.impl


def test_descriptors_are_refused_as_262(both: tuple[Sandbox, Sandbox]) -> None:
    real, ours = (_client(sb, "descriptors", M, MI, H, U) for sb in both)
    assert real == ours == [1, 1, 1, 1]  # (EPERM at the sender: the sockets refuse SCM_RIGHTS)


def test_partial_messages_pin_a_bounded_amount(both: tuple[Sandbox, Sandbox]) -> None:
    real, ours = both
    assert _client(real, "partial", M, "8", "15") == {"closed": 0}  # (262: 8 × 15 MiB held)
    assert _client(ours, "partial", M, "8", "15") == {"closed": 4}  # (ours: 64 MiB per user)
    assert _client(ours, "connections", M, "3") == {"answered": 3}  # (and let go of after)


FLOODS = {
    "machine-oneway": (M, "oneway", "1"),
    "machine-replies": (M, "reply", "1"),
    "image-oneway": (MI, "oneway", "1"),
    "userdb-oneway": (U, "oneway", "1"),
    "hook-oneway": (H, "oneway", "1"),
    "machine-oneway-128-connections": (M, "oneway", "128"),
}


@pytest.mark.parametrize("flood", FLOODS.values(), ids=FLOODS.keys())
def test_root_is_served_during_a_flood(both: tuple[Sandbox, Sandbox], flood: tuple[str, str, str]) -> None:
    path, mode, connections = flood
    results = {sb.info.impl: _client(sb, "flood", path, mode, "4", connections) for sb in both}
    print(f"{path} {mode} ×{connections}: {results}")
    ours = results["ours"]
    assert ours["varlink"]["n"] > 100 and ours["dbus"]["n"] > 100, ours
    assert ours["varlink"]["p99"] < 50 and ours["dbus"]["p99"] < 50, ours


def test_no_traceback_after_all(both: tuple[Sandbox, Sandbox]) -> None:
    real, ours = both
    assert _client(ours, "connections", M, "1") == {"answered": 1}  # (still up)
    journal = ours.run(["journalctl", "-b", "--no-pager", "-o", "cat", "-u", "machined.service"]).stdout
    assert "Traceback" not in journal and "exception was never retrieved" not in journal, journal[-3000:]

"""A hostile local user (nobody) on the user database's varlink socket under 252, against
systemd-machined 252 and ours: raw messages and a fuzz run get 252's answers (the varlink
server serves it as 252's sd-varlink does; see test_hostile262.py for 262's sockets)."""

from __future__ import annotations

import random

from machined.sandbox import Sandbox
from tests.integration262.test_hostile262 import FUZZ_TOKENS, _client, _probe

U = "/run/systemd/userdb/io.systemd.Machine"
G = b'"method":"io.systemd.UserDatabase.GetUserRecord"'
S = b'"service":"io.systemd.Machine"'

HOSTILE = [
    b"{" + G + b',"parameters":{' + S + b"}}",
    b"{" + G + b',"parameters":{' + S + b'},"more":false,"oneway":false}',
    b"{" + G + b',"parameters":{' + S + b'},"more":true,"oneway":true}',
    b"{" + G + b',"parameters":{' + S + b'},"more":true,"more":false}',
    b"{" + G + b',"parameters":{' + S + b'},"upgrade":true}',
    b"{" + G + b',"parameters":{' + S + b'},"upgrade":false}',
    b"{" + G + b"," + G + b',"parameters":{' + S + b"}}",
    b"{" + G + b',"parameters":{' + S + b"," + S + b"}}",
    b"{" + G + b',"parameters":{"uid":1,"uid":1,' + S + b"}}",
    b"{" + G + b',"parameters":{' + S + b',"uid":NaN}}',
    b"{" + G + b',"parameters":{' + S + b',"userName":"a\\u0000"}}',
    b"\xef\xbb\xbf{" + G + b',"parameters":{' + S + b"}}",
    b"{" + G + b',"parameters":{' + S + b',"userName":"\\ud800"}}',
    b"{" + G + b',"parameters":{' + S + b',"userName":"\\ufffe"}}',
    b"{" + G + b',"parameters":{' + S + b',"userName":"\x7f"}}',
    b"{" + G + b',"parameters":{' + S + b',"uid":' + b"9" * 100000 + b"}}",
    b"{" + G + b',"parameters":{' + S + b',"uid":1.5}}',
    b"{" + G + b',"parameters":{' + S + b',"uid":"5"}}',
    b"{" + G + b',"parameters":{' + S + b',"uid":-1}}',
    b"{" + G + b',"parameters":{' + S + b',"x":1}}',
    b"{" + G + b',"parameters":{' + S + b',"x":' + b"[" * 2046 + b"]" * 2046 + b"}}",
    b"{" + G + b',"parameters":{' + S + b',"x":' + b"[" * 2047 + b"]" * 2047 + b"}}",
    b"{" + G + b',"parameters":{' + S + b',"x":' + b"[" * 2048 + b"]" * 2048 + b"}}",
    b"{" + G + b',"parameters":{' + S + b'},"foo":1}',
    b"{" + G + b',"parameters":null}',
    b"{" + G + b"}",
    b'{"method":"io.systemd.service.Ping"}',
    b'{"method":"org.varlink.service.GetInfo","upgrade":true}',
    b'{"method":"x.y","oneway":true}',
]

FUZZ_BASES = [
    b"{" + G + b',"parameters":{' + S + b',"uid":5}}',
    b'{"method":"io.systemd.UserDatabase.GetGroupRecord","parameters":{' + S + b',"gid":5},"more":true}',
    b'{"method":"io.systemd.UserDatabase.GetMemberships","parameters":{' + S + b"}}",
]


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


def _wake(sb: Sandbox) -> None:
    sb.run(["busctl", "call", "org.freedesktop.machine1", "/org/freedesktop/machine1",
            "org.freedesktop.DBus.Peer", "Ping"])  # fmt: skip
    sb.run(["bash", "-c", f"for i in $(seq 100); do [ -S {U} ] && exit 0; sleep 0.05; done; exit 1"])


def test_hostile_messages_to_the_user_database_as_252(real: Sandbox, ours: Sandbox) -> None:
    rng = random.Random(252)
    # (names are left out of the fuzz: a name 252 would not take as a user name is EINVAL there)
    cases = [*HOSTILE, *(_mutate(rng, rng.choice(FUZZ_BASES)) for _ in range(300))]
    answers = []
    for sb in (real, ours):
        _wake(sb)
        answers.append(_probe(sb, [(U, data + b"\0") for data in cases]))
    differ = [f"{data[:200]!r}: 252 {r} ours {o}" for data, r, o in zip(cases, *answers, strict=True) if r != o]
    assert not differ, "\n".join(differ[:20])
    # descriptors: 252 takes them (and the call is answered)
    assert [_client(sb, "descriptors", U) for sb in (real, ours)] == [
        ['{"error":"org.varlink.service.MethodNotFound","parameters":{"method":"io.systemd.service.Ping"}}\0'] * 1
    ] * 2

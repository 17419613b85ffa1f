"""Integral JSON reals where an integer is declared, compared with real systemd-machined 262.

sd-json builds a real from doubles digit by digit (machined/varlink/sdjson.py), so an integral
number written with a fraction or an exponent is sometimes not an integer to 262 and refused
(InvalidParameter): about one in seven of those written as ``varlinkctl`` writes reals
(``%.21e``: ``varlinkctl call … '{"pid":{"pid":123456.0}}'`` sends
``1.234560000000000000000e+05``, which is 123456.00000000001). A batch of such calls is sent
raw to both daemons (pid lookups, signals, UIDs to map, the user database's UIDs, the resolve
hook's record types) and the answers compared one by one; then a few through varlinkctl.
"""

from __future__ import annotations

import json
import random
import re
import sys

from machined.sandbox import Sandbox

M = "/run/systemd/machine/io.systemd.Machine"
U = "/run/systemd/userdb/io.systemd.Machine"
H = "/run/systemd/resolve.hook/io.systemd.Machine"

# Sent inside a sandbox: stdin a JSON list of [socket, method, parameters]; out the answers
# (error name and parameters, or "ok"), one per call, each on a connection of its own.
CLIENT = r"""
import json, socket, sys
def call(path, method, params):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    s.sendall(b'{"method":"%s","parameters":%s}\0' % (method.encode(), params.encode()))
    data = b""
    while b"\0" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return "closed"
        data += chunk
    s.close()
    reply = json.loads(data.split(b"\0")[0])
    return reply["error"] + " " + json.dumps(reply.get("parameters"), sort_keys=True) if "error" in reply else "ok"
import os, time
call("/run/systemd/machine/io.systemd.Machine", "org.varlink.service.GetInfo", "{}")  # (real: started by its socket)
for _ in range(100):  # (the resolve hook's socket is the daemon's own, made once it runs)
    if os.path.exists("/run/systemd/resolve.hook/io.systemd.Machine"):
        break
    time.sleep(0.05)
print(json.dumps([call(*c) for c in json.load(sys.stdin)]))
"""

# PIDs whose varlinkctl form real 262 refused (not integral to sd-json), and some it took
REFUSED_PIDS = [13294, 103194, 103866, 122039, 122138, 123456, 237796, 830685, 1835269, 4064270]
TAKEN_PIDS = [1, 20035, 65535, 100000, 999999, 4194304]


def _forms(n: int) -> list[str]:
    s = str(n)
    return [f"{n}.0", f"{n:.21e}", f"{n:.17e}", f"{s[0]}.{s[1:] or '0'}e{len(s) - 1}", f"0.{s}e{len(s)}", f"{n}0e-1"]


def _p(template: str, number: str) -> str:
    return template.replace("@", number)


def _batch() -> list[list[str]]:
    rng = random.Random(262)
    pids = REFUSED_PIDS + TAKEN_PIDS + rng.sample(range(2, 4194304), 30)
    calls = [[M, "io.systemd.Machine.List", _p('{"pid":{"pid":@}}', t)] for n in pids for t in _forms(n)]
    calls += [[M, "io.systemd.Machine.List", _p('{"pid":{"pid":@}}', t)] for t in (
        "1e400", "-1e400", "0e400", "1.5", "18446744073709551616", "-9223372036854775809", "9" * 400, "0.0",
        "-0.0", "1e0", "1E+0", "4194304.5", "1e-400", "0." + "0" * 400 + "1")]  # fmt: skip
    calls += [[M, "io.systemd.Machine.Kill", _p('{"name":"nosuchmachine","signal":@}', t)]
              for n in (1, 9, 15, 18, 31, 34, 64, 65) for t in _forms(n)]  # fmt: skip
    uids = [494361469, 3801304050, 1029217452, 1000, 65534, 65535, 1000000] + rng.sample(range(1, 4294967294), 12)
    calls += [[M, "io.systemd.Machine.MapTo", _p('{"uid":@}', t)] for n in uids for t in _forms(n)[:2]]
    calls += [[U, "io.systemd.UserDatabase.GetUserRecord", _p('{"service":"io.systemd.Machine","uid":@}', t)]
              for n in uids for t in _forms(n)[:2]]  # fmt: skip
    types = [1, 28, 255, 12345, 65281, 65535, 65536] + rng.sample(range(1, 65536), 8)
    calls += [[H, "io.systemd.Resolve.Hook.ResolveRecord", _p('{"question":[{"key":{"type":@,"name":"nx"}}]}', t)]
              for n in types for t in _forms(n)[:2]]  # fmt: skip
    return calls


def _answers(sb: Sandbox, calls: list[list[str]]) -> list[str]:
    r = sb.run([sys.executable, "-c", CLIENT], input=json.dumps(calls), timeout=180)
    answers: list[str] = json.loads(r.stdout)
    return answers


def test_integral_reals_raw_as_262(real262: Sandbox, ours262: Sandbox) -> None:
    calls = _batch()
    real, ours = _answers(real262, calls), _answers(ours262, calls)
    differ = [f"{c[1]} {c[2]}: real {a!r}, ours {b!r}" for c, a, b in zip(calls, real, ours, strict=True) if a != b]
    assert not differ, "\n".join(differ)
    # the point of the batch: real 262 refuses some integral values written so, and takes others
    refused = {c[2] for c, a in zip(calls, real, strict=True) if "InvalidParameter" in a}
    assert '{"pid":{"pid":1.234560000000000000000e+05}}' in refused, real
    assert '{"pid":{"pid":123456.0}}' not in refused, real
    assert '{"pid":{"pid":2.003500000000000000000e+04}}' not in refused, real
    assert sum("pid" in c for c in refused) >= len(REFUSED_PIDS), real


VARLINKCTL = r"""
for n in 123456.0 13294.0 20035.0 1.0 4194304.0 12.5 1e3 103866.0; do
  echo "> $n"; varlinkctl --json=short call /run/systemd/machine/io.systemd.Machine io.systemd.Machine.List "{\"pid\":{\"pid\":$n}}" 2>&1
  echo "rc=$?"
done
"""


def test_integral_reals_through_varlinkctl_as_262(real262: Sandbox, ours262: Sandbox) -> None:
    real = real262.run(["bash", "-c", VARLINKCTL], check=False).stdout
    ours = ours262.run(["bash", "-c", VARLINKCTL], check=False).stdout
    assert ours == real
    blocks = dict(re.findall(r"> (\S+)\n(.*?)rc=", real, re.DOTALL))
    assert "parameter" in blocks["123456.0"] and "parameter" in blocks["103866.0"], real
    assert "parameter" not in blocks["20035.0"], real

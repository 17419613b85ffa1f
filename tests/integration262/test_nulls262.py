"""Explicit nulls, field by field: every optional (``?type``) input field of the methods on
machined's varlink sockets sent as ``null`` on its own to real 262 and to ours, the answers
compared. 262 refuses ``null`` in many of them (InvalidParameter naming the field) where a
missing field is fine: its handlers' dispatch tables are stricter than the interfaces say
(machined/varlink/nulls.py)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from machined.sandbox import Sandbox

INTERFACES = Path(__file__).resolve().parents[2] / "dbus-interfaces" / "262"
SOCKETS = {
    "io.systemd.Machine": "/run/systemd/machine/io.systemd.Machine",
    "io.systemd.MachineImage": "/run/systemd/machine/io.systemd.MachineImage",
    "io.systemd.UserDatabase": "/run/systemd/userdb/io.systemd.Machine",
    "io.systemd.Resolve.Hook": "/run/systemd/resolve.hook/io.systemd.Machine",
}
# Left out: none (a null log level, which 262 takes as its default level, is checked below).
KNOWN: set[tuple[str, str]] = set()

CLIENT = r"""
import json, socket, sys
out = []
for path, method, params in json.load(sys.stdin):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(json.dumps({"method": method, "parameters": params}).encode() + b"\0")
    s.settimeout(10)
    buf = b""
    try:
        while not buf.endswith(b"\0"):
            d = s.recv(65536)
            if not d:
                break
            buf += d
    except OSError as e:
        buf = repr(e).encode()
    s.close()
    out.append(buf.rstrip(b"\0").decode())
print(json.dumps(out))
"""


def _probes() -> list[tuple[str, str, dict[str, object]]]:
    probes = []
    for path in sorted(INTERFACES.glob("*.varlink")):
        text = path.read_text()
        interface = re.search(r"^interface (\S+)", text, re.M)
        assert interface is not None
        socket_path = SOCKETS.get(interface.group(1))
        if socket_path is None:
            continue
        for method in re.finditer(r"^method (\w+)\((.*?)\)\s*->", text, re.M | re.S):
            for field in re.finditer(r"^\s+(\w+)\s*:\s*\?", method.group(2), re.M):
                name = f"{interface.group(1)}.{method.group(1)}"
                if (name, field.group(1)) in KNOWN:
                    continue
                params: dict[str, object] = {field.group(1): None}
                if interface.group(1) == "io.systemd.UserDatabase":
                    params["service"] = "io.systemd.Machine"
                probes.append((socket_path, name, params))
    return probes


def _answers(sb: Sandbox, probes: list[tuple[str, str, dict[str, object]]]) -> list[str]:
    sb.run(["machinectl", "list"])  # (socket-activated daemons: started first)
    r = sb.run([sys.executable, "-c", CLIENT], input=json.dumps(probes), timeout=120)
    answers: list[str] = json.loads(r.stdout)
    return answers


def test_explicit_nulls_as_262(real262: Sandbox, ours262: Sandbox) -> None:
    probes = _probes()
    assert len(probes) > 60, probes
    real, ours = _answers(real262, probes), _answers(ours262, probes)
    differ = [f"{p[1]} {json.dumps(p[2])}: real {a}, ours {b}" for p, a, b in zip(probes, real, ours, strict=True)
              if a != b]  # fmt: skip
    assert not differ, "\n".join(differ)
    # the point: 262 refuses a null where a missing field would do
    refused = [p for p, a in zip(probes, real, strict=True) if '"parameter":"name"' in a and "name" in p[2]]
    assert any(p[1] == "io.systemd.Machine.List" for p in refused), real


LOG_LEVELS = r"""
import json, socket
def call(method, params):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("/run/systemd/machine/io.systemd.Machine")
    s.sendall(json.dumps({"method": "io.systemd.service." + method, "parameters": params}).encode() + b"\0")
    buf = b""
    while not buf.endswith(b"\0"):
        buf += s.recv(65536)
    return buf.rstrip(b"\0").decode()
for method, params in [("SetLogLevel", {"level": 7}), ("SetLogLevel", {"level": None}), ("GetLogLevel", {}),
                       ("SetLogLevel", {"level": 3}), ("GetLogLevel", {}), ("SetLogLevel", {"level": None}),
                       ("GetLogLevel", {}), ("SetLogLevel", {})]:
    print(method, json.dumps(params), call(method, params))
"""


def test_null_log_level_is_the_default_again(real262: Sandbox, ours262: Sandbox) -> None:
    real, ours = (sb.run([sys.executable, "-c", LOG_LEVELS]).stdout for sb in (real262, ours262))
    assert ours == real
    assert 'GetLogLevel {} {"parameters":{"level":6}}' in real, real

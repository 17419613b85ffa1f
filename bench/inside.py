"""Benchmark looks inside a container: machined against systemd-machined 252 in the same run.

Both implementations get a sandbox of their own with one container (systemd-nspawn
of the host's OS, volatile, private network with an address on its loopback), and
the same client inside each. The calls are interleaved (one in real's sandbox, one
in ours, alternating which goes first), so that both see the same load on the
machine. Timed, one call after another: GetMachineAddresses, GetMachineOSRelease,
OpenMachinePTY, OpenMachineRootDirectory (dbus-fast), ``getent hosts NAME``
(nss-mymachines), ``machinectl list``, ``machinectl status -n0 NAME``, ``machinectl
copy-to`` and ``copy-from`` of a small file, ``machinectl bind``; and, in a second,
booted container (``boot_container``), OpenMachineLogin and ``machinectl shell NAME
/bin/true``. It prints the median
of each, ours/real, and saves everything as JSON (``--out``, default
bench/inside.json). The very first look (cold: the first call after the service started)
has a row of its own; the memory of the daemon and of its children (the fork server and its
spares, which the PTY, login, shell, copy and bind calls start: RSS, PSS, private) is printed
at the end.

Usage: .venv/bin/python bench/inside.py [--calls N] [--out FILE]
A ratio below 1 means ours is faster.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machined.sandbox import Sandbox
from machined.sandbox.containers import BASH_FUNCTIONS

CLIENT = r"""
import asyncio, json, os, subprocess, sys, time
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

SERVICE = sys.argv[1]
M, MP, MI = "org.freedesktop.machine1", "/org/freedesktop/machine1", "org.freedesktop.machine1.Manager"
NAME = "bench1"
BOOTED = sys.argv[2]  # its veth is in the host's network namespace: one name per sandbox

def sh(cmd, check=True):
    return subprocess.run(cmd, shell=True, check=check, capture_output=True, text=True).stdout

def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0

def rollup_kib(pid, *keys):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(l.split()[1]) for l in f if l.split(":")[0] in keys)
    except OSError:
        return 0

def comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"

def descendants(pid):
    out = []
    for child in sh(f"ps --ppid {pid} --no-headers -o pid", check=False).split():
        out.append(int(child))
        out.extend(descendants(int(child)))
    return out

def setup():
    sh(f"systemd-run --quiet --unit=bench-c1 systemd-nspawn -q -D / --volatile=yes --private-network -M {NAME} "
       "/bin/sleep 999999")
    for _ in range(200):
        if subprocess.run(["machinectl", "show", NAME], capture_output=True).returncode == 0:
            break
        time.sleep(0.05)
    leader = sh(f"machinectl show {NAME} -p Leader --value").strip()
    for _ in range(200):  # nspawn's payload execs late; the netns is set up by then
        if open(f"/proc/{leader}/comm").read().strip() == "sleep":
            break
        time.sleep(0.05)
    sh(f"nsenter -t {leader} -n ip addr add 198.51.100.2/24 dev lo")
    sh("cp /etc/nsswitch.conf /tmp/nsswitch.conf && sed -i 's/^hosts:.*/hosts: files mymachines/' "
       "/tmp/nsswitch.conf && mount --bind /tmp/nsswitch.conf /etc/nsswitch.conf")
    sh("echo payload > /tmp/bench-file && mkdir -p /tmp/bench-dir")
    # A booted container (systemd, dbus, logind inside) for login and shell.
    subprocess.run(["bash", "-c", f"source /tmp/bench-functions.sh; boot_container {BOOTED}"], capture_output=True)
    for _ in range(600):  # boot_container gives up after 10 s; a loaded machine may need longer
        state = subprocess.run(["systemctl", "-M", BOOTED, "is-system-running"], capture_output=True, text=True)
        if state.stdout.strip() in ("running", "degraded"):
            break
        time.sleep(0.2)
    else:
        raise SystemExit(f"container {BOOTED} did not boot")

async def main():
    setup()
    main_pid = int(sh(f"systemctl show {SERVICE} -p MainPID --value").strip() or 0)
    bus = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()

    async def call(member, sig="s", body=(NAME,)):
        r = await bus.call(Message(destination=M, path=MP, interface=MI, member=member, signature=sig, body=list(body)))
        assert r.message_type is MessageType.METHOD_RETURN, (member, r.error_name, r.body)
        for fd in r.unix_fds:
            os.close(fd)
        return r

    def cmd(line):
        r = subprocess.run(line, shell=True, capture_output=True, text=True)
        assert r.returncode == 0, (line, r.stdout, r.stderr)

    ops = {
        "GetMachineAddresses": lambda i: call("GetMachineAddresses"),
        "GetMachineOSRelease": lambda i: call("GetMachineOSRelease"),
        "OpenMachinePTY": lambda i: call("OpenMachinePTY"),
        "OpenMachineRootDirectory": lambda i: call("OpenMachineRootDirectory"),
        "getent hosts NAME": lambda i: cmd(f"getent hosts {NAME}"),
        "machinectl list": lambda i: cmd("machinectl list --no-pager"),
        "machinectl status -n0 NAME": lambda i: cmd(f"machinectl status -n0 --no-pager {NAME}"),
        "machinectl copy-to": lambda i: cmd(f"machinectl copy-to {NAME} /tmp/bench-file /tmp/bench-copy-{i}"),
        "machinectl copy-from": lambda i: cmd(f"machinectl copy-from {NAME} /tmp/bench-file /tmp/bench-back-{i}"),
        "machinectl bind": lambda i: cmd(f"machinectl bind --mkdir {NAME} /tmp/bench-dir /mnt/bench-{i}"),
        "OpenMachineLogin (booted)": lambda i: call("OpenMachineLogin", body=(BOOTED,)),
        "machinectl shell NAME /bin/true (booted)": lambda i: cmd(f"machinectl shell {BOOTED} /bin/true"),
    }
    rss_idle = rss_kib(main_pid) if main_pid else 0
    print("READY", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        if words[0] == "prepare":  # after the first look, which is to be cold
            sh(f"machinectl copy-to {NAME} /tmp/bench-file /tmp/bench-file")
            print("ok", flush=True)
            continue
        if words[0] == "memory":
            helpers = descendants(main_pid) if main_pid else []
            print(json.dumps({
                "daemon_rss_kib_before_first_look": rss_idle,
                "daemon_rss_kib": rss_kib(main_pid) if main_pid else 0,
                "daemon_pss_kib": rollup_kib(main_pid, "Pss") if main_pid else 0,
                "children": len(helpers),
                "children_rss_kib": sum(rss_kib(p) for p in helpers),
                "children_pss_kib": sum(rollup_kib(p, "Pss") for p in helpers),
                "children_by_name": sorted(
                    [comm(p), rss_kib(p), rollup_kib(p, "Pss"), rollup_kib(p, "Private_Clean", "Private_Dirty")]
                    for p in helpers
                ),
            }), flush=True)
            continue
        op, i = " ".join(words[:-1]), int(words[-1])
        t = time.perf_counter()
        if op == "first":
            await call("GetMachineAddresses")
        else:
            result = ops[op](i)
            if asyncio.iscoroutine(result):
                await result
        print((time.perf_counter() - t) * 1000, flush=True)
    sh("umount /etc/nsswitch.conf", check=False)
    sh("systemctl stop bench-c1", check=False)
    subprocess.run(["bash", "-c", f"source /tmp/bench-functions.sh; stop_container {BOOTED}"], capture_output=True)

asyncio.run(main())
"""

OPERATIONS = [
    "GetMachineAddresses", "GetMachineOSRelease", "OpenMachinePTY", "OpenMachineRootDirectory",
    "getent hosts NAME", "machinectl list", "machinectl status -n0 NAME", "machinectl copy-to",
    "machinectl copy-from", "machinectl bind", "OpenMachineLogin (booted)", "machinectl shell NAME /bin/true (booted)",
]  # fmt: skip


class Client:
    def __init__(self, sb: Sandbox) -> None:
        service = "machined.service" if sb.info.impl == "ours" else "systemd-machined.service"
        sb.run(["sh", "-c", f"cat > /tmp/bench-inside.py <<'EOF'\n{CLIENT}\nEOF"])
        sb.run(["sh", "-c", f"cat > /tmp/bench-functions.sh <<'EOF'\n{BASH_FUNCTIONS}\nEOF"])
        # Activate the service first, so that its start is not part of the first look.
        sb.run(["busctl", "call", "org.freedesktop.machine1", "/org/freedesktop/machine1",
                "org.freedesktop.machine1.Manager", "ListMachines"])  # fmt: skip
        argv = [sys.executable, "/tmp/bench-inside.py", service, f"boot{sb.info.impl}"]
        self.proc = sb.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "READY":
            raise RuntimeError(f"client in {sb.info.impl} sandbox did not start: {line!r}")

    def ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"client died at {line!r}")
        return answer

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(timeout=60)


def median(values: list[float]) -> float:
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def measure(calls: int) -> dict:
    with Sandbox("real") as real_sb, Sandbox("ours") as ours_sb:
        clients = {"real": Client(real_sb), "ours": Client(ours_sb)}
        try:
            latency: dict[str, dict[str, list[float]]] = {"real": {}, "ours": {}}
            for impl, client in clients.items():
                latency[impl]["first look (cold)"] = [float(client.ask("first 0"))]
                client.ask("prepare")
            for op in OPERATIONS:
                for i in range(calls):
                    order = ("real", "ours") if i % 2 == 0 else ("ours", "real")
                    for impl in order:
                        latency[impl].setdefault(op, []).append(float(clients[impl].ask(f"{op} {i}")))
            memory = {impl: json.loads(client.ask("memory")) for impl, client in clients.items()}
        finally:
            for client in clients.values():
                client.close()
    return {"latency_ms": latency, "memory": memory}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).with_name("inside.json")))
    args = parser.parse_args()
    data = measure(args.calls)
    rows = []
    print(f"{'operation (median of ' + str(args.calls) + ')':<30} {'real ms':>9} {'ours ms':>9} {'ours/real':>10}")
    for op, lat in data["latency_ms"]["real"].items():
        r, o = median(lat), median(data["latency_ms"]["ours"][op])
        rows.append({"operation": op, "real_ms": r, "ours_ms": o, "ratio": o / r if r else None})
        print(f"{op:<30} {r:>9.2f} {o:>9.2f} {o / r if r else float('inf'):>10.2f}")
    for key, value in data["memory"]["ours"].items():
        if key == "children_by_name":
            for name, rss, pss, private in value:
                print(f"ours child {name}: RSS {rss} KiB, PSS {pss} KiB, private {private} KiB")
        else:
            print(f"ours {key}: {value}")
    print(f"real daemon_rss_kib: {data['memory']['real']['daemon_rss_kib']}")
    Path(args.out).write_text(json.dumps({"calls": args.calls, "rows": rows, **data}, indent=1))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

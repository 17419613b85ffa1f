"""What the whole service weighs: machined against systemd-machined 252 in the same run.

Every process in the cgroup of the unit serving org.freedesktop.machine1 (what `systemctl
status` and `systemd-cgls` show of the service) is counted, at each moment:

- idle (the daemon started, one ListMachines answered);
- N containers registered (``systemd-nspawn -D / --volatile=yes --private-network``, an
  address on each one's loopback), nothing asked yet;
- right after the looks: GetMachineOSRelease and GetMachineAddresses of each container;
- right after ``machinectl list`` (which asks both of every container);
- with ``--later S``: S seconds later, nothing asked;
- with ``--machines N``: N more machines registered (VMs of ``sleep`` leaders, 32 CreateMachine
  calls in flight), the registry at scale; the sandboxes' bus then allows 8,192 match rules per
  connection (252's PID 1 spends one per machine, as in bench/run.py).

Memory is given twice: the physical pages resident in any process of the cgroup counted once
(from ``/proc/PID/pagemap``: unlike PSS it does not depend on what else runs on the machine),
and PSS summed (``smaps_rollup``). The look latencies (medians of GetMachineOSRelease and
GetMachineAddresses, one call after another over the containers, from a dbus-fast client)
come from the same sandboxes. Results are printed as a table and saved as JSON.

Usage: .venv/bin/python bench/weight.py [--containers N] [--later S] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machined.sandbox import Sandbox  # noqa: E402
from machined.sandbox.containers import BASH_FUNCTIONS  # noqa: E402

SERVICE = {"ours": "machined.service", "real": "systemd-machined.service"}

# Run inside the sandbox: {"procs", "pages_mib", "pss_mib", "rss_mib"} of the service's cgroup.
WEIGH = r"""
import json, os, struct, subprocess, sys
cg = subprocess.run(["systemctl", "show", "-p", "ControlGroup", "--value", sys.argv[1]],
                    capture_output=True, text=True).stdout.strip()
pids = []
for d in ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup"):
    if os.path.exists(d + cg + "/cgroup.procs"):
        pids = [int(x) for x in open(d + cg + "/cgroup.procs").read().split()]
        break
pss = rss = 0
pfns = set()
hidden = 0
for pid in pids:
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                pss += int(line.split()[1])
            elif line.startswith("Rss:"):
                rss += int(line.split()[1])
        with open(f"/proc/{pid}/pagemap", "rb") as pm:
            for line in open(f"/proc/{pid}/maps"):
                if "[vsyscall]" in line:
                    continue
                a, b = (int(x, 16) for x in line.split()[0].split("-"))
                pm.seek(a // 4096 * 8)
                for (e,) in struct.iter_unpack("Q", pm.read((b - a) // 4096 * 8)):
                    if e >> 63:  # present
                        pfn = e & ((1 << 55) - 1)
                        if pfn:
                            pfns.add(pfn)
                        else:
                            hidden += 1  # PFNs hidden (no CAP_SYS_ADMIN): pages once unknown
    except (FileNotFoundError, ProcessLookupError):
        pass  # gone meanwhile
print(json.dumps({"procs": len(pids), "pages_mib": None if hidden else round(len(pfns) * 4 / 1024, 1),
                  "pss_mib": round(pss / 1024, 1), "rss_mib": round(rss / 1024, 1)}))
"""

LATENCY = r"""
import asyncio, json, statistics, sys, time
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus
async def main():
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    out = {}
    for member in ("GetMachineOSRelease", "GetMachineAddresses"):
        times = []
        for i in range(int(sys.argv[2])):
            t = time.perf_counter()
            reply = await bus.call(Message(destination="org.freedesktop.machine1", path="/org/freedesktop/machine1",
                interface="org.freedesktop.machine1.Manager", member=member, signature="s",
                body=[f"w{i % int(sys.argv[1]) + 1}"]))
            times.append(time.perf_counter() - t)
            assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        out[member] = round(statistics.median(times) * 1000, 3)
    print(json.dumps(out))
asyncio.run(main())
"""

CREATE = r"""
import asyncio, os, sys
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus
async def main():
    n = int(sys.argv[1])
    devnull = os.open("/dev/null", os.O_RDWR)
    acts = [(os.POSIX_SPAWN_DUP2, devnull, fd) for fd in (0, 1, 2)]
    leaders = [os.posix_spawn("/bin/sleep", ["sleep", "999997"], os.environ, file_actions=acts) for _ in range(n)]
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    slots = asyncio.Semaphore(32)
    async def one(i):
        async with slots:
            r = await bus.call(Message(destination="org.freedesktop.machine1", path="/org/freedesktop/machine1",
                interface="org.freedesktop.machine1.Manager", member="CreateMachine", signature="sayssusa(sv)",
                body=[f"m{i}", b"", "", "vm", leaders[i], "", []]))
            assert r.message_type == MessageType.METHOD_RETURN, r.body
    await asyncio.gather(*(one(i) for i in range(n)))
asyncio.run(main())
"""

MOMENTS = ["idle", "registered", "after looks", "after machinectl list"]
RAISED = {"max_match_rules_per_connection": 8192}


def measure(impl: str, containers: int, calls: int, later: float, machines: int) -> dict[str, object]:
    svc = SERVICE[impl]
    out: dict[str, object] = {}
    with Sandbox(impl, bus_limits=RAISED if machines else None) as sb:

        def sh(script: str, timeout: float = 600) -> str:
            r = sb.run(["bash", "-c", BASH_FUNCTIONS + script], check=False, timeout=timeout)
            return r.stdout

        def weigh() -> dict[str, object]:
            result: dict[str, object] = json.loads(sb.run(["python3", "-c", WEIGH, svc]).stdout)
            return result

        sh("busctl call org.freedesktop.machine1 /org/freedesktop/machine1 org.freedesktop.machine1.Manager"
           " ListMachines > /dev/null; sleep 2")  # fmt: skip
        out["idle"] = weigh()
        sh(f"""
for i in $(seq {containers}); do
  systemd-run --quiet --unit=w$i systemd-nspawn -q -D / --volatile=yes --private-network -M w$i /bin/sleep 999990
done
for i in $(seq {containers}); do
  until_listed w$i; L=$(machinectl show w$i -p Leader --value)
  for _ in $(seq 100); do [ "$(cat /proc/$L/comm)" = sleep ] && break; sleep 0.05; done
  nsenter -t $L -n ip addr add 198.51.100.$((i % 250 + 1))/24 dev lo
done
sleep 2""")  # fmt: skip
        out["registered"] = weigh()
        sh(f"""
for i in $(seq {containers}); do
  for m in GetMachineOSRelease GetMachineAddresses; do
    busctl call org.freedesktop.machine1 /org/freedesktop/machine1 org.freedesktop.machine1.Manager $m s w$i > /dev/null
  done
done""")  # fmt: skip
        out["after looks"] = weigh()
        sh("machinectl list > /dev/null")
        out["after machinectl list"] = weigh()
        if later:
            sh(f"sleep {later}", timeout=later + 60)
            out[f"{later:g} s later"] = weigh()
        out["latency_ms"] = json.loads(sb.run([sys.executable, "-c", LATENCY, str(containers), str(calls)]).stdout)
        if machines:
            sb.run([sys.executable, "-c", CREATE, str(machines)], timeout=1800)
            sh("sleep 2")
            out[f"{machines} machines more"] = weigh()
    return out


def table(results: dict[str, dict[str, object]], moments: list[str]) -> str:
    lines = ["| moment | real 252: processes / pages once / PSS | ours: processes / pages once / PSS |"]
    lines.append("|---|---|---|")
    for moment in moments:
        cells = []
        for impl in ("real", "ours"):
            w = results[impl][moment]
            assert isinstance(w, dict)
            cells.append(f"{w['procs']} / {w['pages_mib']} / {w['pss_mib']} MiB")
        lines.append(f"| {moment} | {cells[0]} | {cells[1]} |")
    real, ours = results["real"]["latency_ms"], results["ours"]["latency_ms"]
    assert isinstance(real, dict) and isinstance(ours, dict)
    for member in ("GetMachineOSRelease", "GetMachineAddresses"):
        ratio = ours[member] / real[member]
        lines.append(f"| {member} median | {real[member]} ms | {ours[member]} ms ({ratio:.2f}×) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--containers", type=int, default=20)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--later", type=float, default=0.0)
    parser.add_argument("--machines", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "weight-latest.json"))
    args = parser.parse_args()
    results = {impl: measure(impl, args.containers, args.calls, args.later, args.machines) for impl in ("real", "ours")}
    moments = MOMENTS + ([f"{args.later:g} s later"] if args.later else [])
    moments += [f"{args.machines} machines more"] if args.machines else []
    print(table(results, moments))
    meta = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "host": platform.node(),
            "containers": args.containers}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()

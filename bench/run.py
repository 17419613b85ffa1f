"""Benchmark machined against systemd-machined 252: one table of medians and ratios.

Every run boots a fresh sandbox per implementation, real and ours interleaved (the order
alternates between runs), and runs bench/client.py inside it with the project's
interpreter. The 1,000-machine rows need the sandbox's bus to allow more match rules
per connection than the stock 512 (252 makes PID 1 spend one per machine), so both
implementations get ``max_match_rules_per_connection=8192`` there. The 5,000-machine
rows run ours on a stock bus (252 takes PID 1 off a stock bus at about 510 machines).

Each row is the median over the runs of one run's value (for latencies: the run's p50).
A ratio below 1 means ours is faster (or smaller). Results are saved as JSON.

Usage: .venv/bin/python bench/run.py [--runs N] [--machines N] [--calls N] [--big N] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machined.sandbox import Sandbox  # noqa: E402

CLIENT = Path(__file__).with_name("client.py")
SERVICE = {"ours": "machined.service", "real": "systemd-machined.service"}
RAISED = {"max_match_rules_per_connection": 8192}

# (label, key in the client's output, how one run's samples become one value, unit, goal)
# goal: ("ratio", x) ours/real at most x; ("ours", x) ours' value at most x; None: reported only.
ROWS = [
    ("Peer.Ping p50", "ping_ms", "p50", "ms", ("ratio", 1.2)),
    ("Peer.Ping, daemon CPU per call", "ping_cpu_us", "value", "µs", None),
    ("GetMachine p50", "get_machine_ms", "p50", "ms", ("ratio", 1.2)),
    ("GetMachineByPID p50", "get_machine_by_pid_ms", "p50", "ms", ("ratio", 1.2)),
    ("Properties.Get (machine State) p50", "properties_get_ms", "p50", "ms", ("ratio", 1.2)),
    ("Properties.GetAll (machine) p50", "properties_get_all_ms", "p50", "ms", ("ratio", 1.2)),
    ("ListMachines, {n} machines, p50", "list_machines_ms", "p50", "ms", ("ratio", 1.0)),
    ("ListMachines ×50, daemon CPU (schedstat)", "list_machines_cpu50_s", "value", "s", None),
    ("ListMachines ×50, daemon CPU (utime+stime)", "list_machines_cpu50_stat_s", "value", "s", None),
    ("machinectl list, {n} machines, wall", "machinectl_list_ms", "p50", "ms", ("ratio", 1.0)),
    ("machinectl list, {n} machines, daemon CPU", "machinectl_list_cpu_ms", "value", "ms", None),
    ("restart → {n} listed", "restart_listed_s", "value", "s", ("ratio", 1.0)),
    ("RSS idle", "rss_idle_mib", "value", "MiB", ("ours", 24.0)),
    ("RSS, {n} machines", "rss_machines_mib", "value", "MiB", ("ours", 30.0)),
    ("RSS, {n} machines, after restart", "rss_machines_after_restart_mib", "value", "MiB", None),
    ("CreateMachine sequential p50", "create_sequential_ms", "p50", "ms", None),
    ("CreateMachine 32 in flight, per machine", "create_32_in_flight_s", "per_machine", "ms", None),
    ("TerminateMachine ×{n} (32 in flight) until gone", "terminate_until_gone_s", "value", "s", None),
    ("GetId of dbus-daemon itself (one hop, no daemon)", "bus_ping_ms", "p50", "ms", None),
]
# The floor: ours' column is a responder doing nothing but answer with dbus-fast and asyncio, measured
# in ours' sandbox with the daemon stopped; the ratio is to real 252's Peer.Ping.
FLOOR_ROWS = [
    ("Peer.Ping, bare dbus-fast responder vs 252 (floor)", "floor_ping_ms", "ping_ms", "p50", "ms"),
    ("Peer.Ping CPU per call, bare dbus-fast responder vs 252", "floor_ping_cpu_us", "ping_cpu_us", "value", "µs"),
]
BIG_ROWS = [
    ("{big}: CreateMachine (4 conns, 128 in flight)", "create_s", "value", "s"),
    ("{big}: ListMachines p50", "list_machines_ms", "p50", "ms"),
    ("{big}: machinectl list, wall", "machinectl_list_ms", "p50", "ms"),
    ("{big}: RSS", "rss_machines_mib", "value", "MiB"),
    ("{big}: TerminateMachine until gone", "terminate_until_gone_s", "value", "s"),
]


def client(sb: Sandbox, impl: str, mode: str, *args: str) -> dict:
    argv = [sys.executable, str(CLIENT), mode, SERVICE[impl], *args]
    r = sb.run(argv, timeout=3600, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"client failed in {impl} ({r.returncode}):\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# Paired rows: both sandboxes up at once, short batches alternating between them.
PAIRED = [
    ("paired: Peer.Ping p50", "ping", 200, ("ratio", 1.2)),
    ("paired: GetMachine p50", "get_machine", 200, ("ratio", 1.2)),
    ("paired: GetMachineByPID p50", "get_machine_by_pid", 200, ("ratio", 1.2)),
    ("paired: Properties.Get (machine State) p50", "properties_get", 200, ("ratio", 1.2)),
    ("paired: Properties.GetAll (machine) p50", "properties_get_all", 200, ("ratio", 1.2)),
    ("paired: ListMachines, {n} machines, p50", "list_machines", 20, ("ratio", 1.0)),
    ("paired: machinectl list, {n} machines, wall", "machinectl_list", 1, ("ratio", 1.0)),
]


def paired(n: int, rounds: int) -> dict[str, dict[str, list[dict]]]:
    """Both implementations up at once with *n* machines each; *rounds* rounds of one batch per
    operation and implementation, the order alternating. Load from elsewhere on the machine
    then falls on both alike, which sequential runs seconds apart cannot promise."""
    results: dict[str, dict[str, list[dict]]] = {impl: {op: [] for _, op, _, _ in PAIRED} for impl in SERVICE}
    sandboxes: dict[str, Sandbox] = {}
    clients: dict[str, subprocess.Popen] = {}
    try:
        for impl in ("real", "ours"):
            sandboxes[impl] = Sandbox(impl, bus_limits=RAISED).start()
            clients[impl] = sandboxes[impl].popen(
                [sys.executable, str(CLIENT), "paired", SERVICE[impl], "--machines", str(n)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
        for impl, proc in clients.items():
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"paired client for {impl} did not start")
        for r in range(rounds):
            for _, op, count, _ in PAIRED:
                for impl in ("real", "ours") if r % 2 == 0 else ("ours", "real"):
                    proc = clients[impl]
                    assert proc.stdin is not None and proc.stdout is not None
                    proc.stdin.write(f"{op} {count}\n")
                    proc.stdin.flush()
                    results[impl][op].append(json.loads(proc.stdout.readline()))
    finally:
        for proc in clients.values():
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for sb in sandboxes.values():
            sb.stop()
    return results


def one_value(sample: dict, key: str, how: str) -> float:
    value = sample[key]
    if how == "p50":
        return statistics.median(value)
    if how == "per_machine":
        return value / sample["create_32_in_flight_count"] * 1000
    return value


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f} {unit}" if value < 10 else f"{value:.1f} {unit}"


def compact(value: object) -> object:
    """Long lists of latencies as their quantiles (the saved JSON stays small); the rest as is."""
    if isinstance(value, dict):
        return {k: compact(v) for k, v in value.items()}
    if isinstance(value, list) and len(value) > 50 and all(isinstance(v, (int, float)) for v in value):
        ordered = sorted(value)

        def q(f: float) -> float:
            return ordered[min(len(ordered) - 1, int(f * len(ordered)))]

        return {"n": len(ordered), "min": ordered[0], "p10": q(0.1), "p50": statistics.median(ordered),
                "p90": q(0.9), "p99": q(0.99), "max": ordered[-1]}  # fmt: skip
    if isinstance(value, list):
        return [compact(v) for v in value]
    return value


def machine_description() -> str:
    cores = os.cpu_count()
    with open("/proc/meminfo") as f:
        mem_gib = int(f.readline().split()[1]) / 1024 / 1024
    return f"{cores} cores, {mem_gib:.0f} GiB, {platform.system()} {platform.release()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--machines", type=int, default=1000)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--big", type=int, default=5000, help="machines of ours' stock-bus run (0: skip)")
    ap.add_argument("--impl", choices=["both", "ours", "real"], default="both")
    ap.add_argument("--paired-rounds", type=int, default=15, help="rounds of the paired rows (0: skip)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n = args.machines
    started = datetime.datetime.now().astimezone()
    # Byte-compile the package first: sandboxes see the checkout read-only, so a module changed
    # since it was last imported here would be compiled from source at every start of the daemon.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "machined")], check=False)
    impls = ["real", "ours"] if args.impl == "both" else [args.impl]
    samples: dict[str, list[dict]] = {"real": [], "ours": []}
    big: list[dict] = []
    for run in range(args.runs):
        order = impls if run % 2 == 0 else impls[::-1]
        for impl in order:
            t = time.monotonic()
            with Sandbox(impl, bus_limits=RAISED) as sb:
                samples[impl].append(client(sb, impl, "main", "--machines", str(n), "--calls", str(args.calls),
                                            "--sequential", str(min(200, n // 5))))  # fmt: skip
            print(f"run {run + 1}/{args.runs} {impl}: {time.monotonic() - t:.0f} s", file=sys.stderr, flush=True)
        if args.big and "ours" in impls:
            t = time.monotonic()
            with Sandbox("ours") as sb:
                big.append(client(sb, "ours", "big", "--machines", str(args.big)))
            print(f"run {run + 1}/{args.runs} ours, {args.big} machines on a stock bus: "
                  f"{time.monotonic() - t:.0f} s", file=sys.stderr, flush=True)  # fmt: skip

    pairs = {}
    if args.paired_rounds and args.impl == "both":
        t = time.monotonic()
        pairs = paired(n, args.paired_rounds)
        print(f"paired rows, {args.paired_rounds} rounds: {time.monotonic() - t:.0f} s", file=sys.stderr, flush=True)

    table = []
    for label, op, _, goal in PAIRED if pairs else []:
        real = statistics.median(b["p50_ms"] for b in pairs["real"][op])
        ours = statistics.median(b["p50_ms"] for b in pairs["ours"][op])
        cpu_real = statistics.median(b["cpu_us"] for b in pairs["real"][op])
        cpu_ours = statistics.median(b["cpu_us"] for b in pairs["ours"][op])
        table.append({"operation": label.format(n=f"{n:,}"), "unit": "ms", "real": real, "ours": ours,
                      "ratio": ours / real, "goal": f"≤ {goal[1]}×", "met": ours / real <= goal[1]})  # fmt: skip
        table.append({"operation": "  daemon CPU per call" if op != "machinectl_list" else "  daemon CPU per list",
                      "unit": "µs", "real": cpu_real, "ours": cpu_ours, "ratio": cpu_ours / cpu_real,
                      "goal": "", "met": None})  # fmt: skip
    for label, key, how, unit, goal in ROWS:
        values = {impl: statistics.median(one_value(s, key, how) for s in samples[impl]) if samples[impl] else None
                  for impl in ("real", "ours")}  # fmt: skip
        real, ours = values["real"], values["ours"]
        ratio = ours / real if real and ours is not None else None
        met = None
        if goal and goal[0] == "ratio" and ratio is not None:
            met = ratio <= goal[1]
        elif goal and goal[0] == "ours" and ours is not None:
            met = ours <= goal[1]
        goal_text = "" if goal is None else (f"≤ {goal[1]}×" if goal[0] == "ratio" else f"≤ {goal[1]:g} {unit}")
        table.append({"operation": label.format(n=f"{n:,}"), "unit": unit, "real": real, "ours": ours,
                      "ratio": ratio, "goal": goal_text, "met": met})  # fmt: skip
    for label, key, real_key, how, unit in FLOOR_ROWS:
        if samples["real"] and samples["ours"]:
            real = statistics.median(one_value(s, real_key, how) for s in samples["real"])
            ours = statistics.median(one_value(s, key, how) for s in samples["ours"])
            table.append({"operation": label, "unit": unit, "real": real, "ours": ours, "ratio": ours / real,
                          "goal": "", "met": None})  # fmt: skip
    for label, key, how, unit in BIG_ROWS:
        ours = statistics.median(one_value(s, key, how) for s in big) if big else None
        table.append({"operation": label.format(big=f"{args.big:,} machines, stock bus"), "unit": unit,
                      "real": None, "ours": ours, "ratio": None, "goal": "reported", "met": None,
                      "note": "252: n/a (PID 1 disconnected from a stock bus at ~510)"})  # fmt: skip

    width = max(len(row["operation"]) for row in table)
    print(f"{'operation (median of ' + str(args.runs) + ' runs)':<{width}}  {'real 252':>12} {'ours':>12} "
          f"{'ours/real':>9}  goal")  # fmt: skip
    for row in table:
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "n/a"
        verdict = "" if row["met"] is None else (" met" if row["met"] else " NOT met")
        print(f"{row['operation']:<{width}}  {fmt(row['real'], row['unit']):>12} {fmt(row['ours'], row['unit']):>12} "
              f"{ratio:>9}  {row['goal']}{verdict}")  # fmt: skip
    print(
        f"1,000-machine rows on a bus with max_match_rules_per_connection=8192 for both; "
        f"{args.big:,}-machine rows: ours on stock bus limits."
    )
    compiled = [s.get("dbus_fast_compiled") for s in samples["ours"]]
    print(f"dbus-fast's compiled extension in use (ours): {all(compiled) if compiled else 'n/a'}")

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    result = {
        "date": started.isoformat(timespec="seconds"),
        "machine": machine_description(),
        "commit": commit,
        "args": vars(args),
        "bus_limits_1000": RAISED,
        "table": table,
        "samples": compact(samples),
        "big": compact(big),
        "paired": pairs,
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"saved {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

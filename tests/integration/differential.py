"""Run the same shell scenario in a real-machined and an our-machined sandbox, compare.

Scenarios are bash scripts run inside the sandbox. They print what clients
show; lines ``@@pid NAME VALUE`` declare process IDs, which are then replaced
by ``<NAME>`` everywhere, so two runs with different PIDs compare equal.
Timestamps, IDs, job numbers and unique bus names are masked as well.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator

import pytest

from machined.sandbox import Sandbox
from machined.sandbox.containers import BASH_FUNCTIONS

PRELUDE = (
    BASH_FUNCTIONS
    + r"""
set -u
M=org.freedesktop.machine1
MP=/org/freedesktop/machine1
MI=org.freedesktop.machine1.Manager
# leader UNIT: start `sleep` as a service and print its PID
leader() { systemd-run --quiet --unit="$1" sleep 999998; systemctl show -p MainPID --value "$1"; }
pid() { echo "@@pid $1 $2"; }
# call METHOD ARGS...: a Manager call through gdbus, which prints error names
call() { gdbus call --system --dest $M --object-path $MP --method $MI."$1" "${@:2}" 2>&1; }
mcall() { local p=$1; shift; gdbus call --system --dest $M --object-path "$p" --method "$@" 2>&1; }
# sortvals: KEY=v1 v2 ... lines with the values sorted (systemd prints dependency sets in hash order)
sortvals() { while IFS== read -r k v; do echo "$k=$(echo $v | tr ' ' '\n' | sort | xargs)"; done; }
# machines: ListMachines, sorted (the reply comes in hash order)
machines() { busctl call --json=short $M $MP $MI ListMachines | python3 -c 'import json,sys; [print(*r) for r in sorted(json.load(sys.stdin)["data"][0])]'; }
# until_comm PID COMM: wait until process PID runs COMM (nspawn's payload execs late)
until_comm() { for _ in $(seq 200); do [ "$(cat /proc/$1/comm 2>/dev/null)" = "$2" ] && return 0; sleep 0.05; done; }
state() { for f in "$@"; do echo "--- $f"; cat "/run/systemd/machines/$f"; done; }
links() { (cd /run/systemd/machines && for f in *; do stat -c '%A %N' -- "$f"; done) 2>&1; }
"""
)


def normalize(text: str) -> str:
    pids: dict[str, str] = {}
    lines = []
    for line in text.splitlines():
        if line.startswith("LEADER_PIDFDID="):
            continue  # ours adds it (as systemd 258+ does) to re-verify leaders; 252 readers ignore it
        m = re.fullmatch(r"@@pid (\S+) (\d+)", line.strip())
        if m:
            pids[m.group(2)] = m.group(1)
            continue
        lines.append(line)
    text = re.sub(r"\b[0-9a-f]{32}\b", "<id>", "\n".join(lines) + "\n")
    for value, name in sorted(pids.items(), key=lambda kv: -len(kv[0])):
        text = re.sub(rf"(?<![\w.]){value}(?![\w.])", f"<{name}>", text)
    subs = [
        (r"(REALTIME|MONOTONIC)=\d+", r"\1=T"),
        (r"\b[0-9a-f]{32}\b", "<id>"),
        (r"(Timestamp=)[^\n]*", r"\1T"),
        (r"(TimestampMonotonic=)\d+", r"\1T"),
        (r"(Since: )[^\n]*", r"\1T"),
        (r"(uint64|t) \d{10,}", r"\1 T"),
        (r"/org/freedesktop/systemd1/job/\d+", "/org/freedesktop/systemd1/job/N"),
        (r":1\.\d+", ":1.N"),
        (r"/tmp/scenario\.\w+", "/tmp/scenario"),
        (r"\(#\d+\)", "(#N)"),
        (r"(since )\w{3} \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \w+; [^\n]*", r"\1T"),
        (r"\[\d+\]:", "[N]:"),
        (r"(?<![\w.])\d{9,}(?![\w.])", "N"),  # times in µs, whatever prints them
        (r"[ \t]{2,}", " "),  # column widths follow the (masked) values
    ]
    for pattern, repl in subs:
        text = re.sub(pattern, repl, text)
    return text


def run(sb: Sandbox, script: str, timeout: float = 120) -> str:
    """Run *script*; ``$SVC`` names the unit serving org.freedesktop.machine1 there."""
    svc = "machined.service" if sb.info.impl == "ours" else "systemd-machined.service"
    # The script is saved first and run with stdin from /dev/null, so that clients which read
    # their standard input (machinectl shell) cannot eat the rest of the script.
    runner = 'f=$(mktemp /tmp/scenario.XXXXXX); cat > "$f"; bash "$f" < /dev/null; rc=$?; rm -f "$f"; exit $rc'
    try:
        r = sb.run(["bash", "-c", runner], input=f"SVC={svc}\n" + PRELUDE + script, check=False, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"scenario ran over {timeout} s in sandbox {sb.id} ({sb.info.impl}); its output so far:\n"
                    f"{_text(e.stdout)}{_text(e.stderr)}\n{_stuck(sb)}")  # fmt: skip
    return r.stdout + r.stderr


def _text(data: str | bytes | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def _stuck(sb: Sandbox) -> str:
    """What a scenario that ran over its time was waiting for: the sandbox's processes (the
    oldest scenario's last command among them) and the end of its journal."""
    look = "ps -eo pid,stat,etimes,wchan:24,args --forest; journalctl -q --no-pager -n 60 -o short-monotonic"
    try:
        return sb.run(["sh", "-c", look], check=False, timeout=30).stdout
    except Exception as e:  # the sandbox itself no longer answers
        return f"(could not look inside: {e})"


def compare(ours: Sandbox, real: Sandbox, script: str, timeout: float = 120) -> tuple[str, str]:
    """(expected from real, got from ours), normalized."""
    return normalize(run(real, script, timeout)), normalize(run(ours, script, timeout))


# What a scenario left behind when it failed half-way (a container still booting, a machine its
# last lines would have terminated): ended after each test, so that one failure in a sandbox
# shared by a module does not show up again as a difference in every test after it.
SWEEP = r"""
for m in $(machinectl list --no-legend 2>/dev/null | awk '{print $1}'); do machinectl terminate "$m" 2>/dev/null; done
# at most 5 s for all: a machine that terminate does not end (its leader's own unit) stays
for _ in $(seq 100); do [ -z "$(machinectl list --no-legend 2>/dev/null)" ] && break; sleep 0.05; done
for d in /var/lib/machines/*; do mountpoint -q "$d" && umount -l "$d"; done 2>/dev/null
machinectl list --no-legend 2>/dev/null | awk '{print "left: " $1}'
"""


def sweep(sb: Sandbox) -> str:
    """End every machine still registered in *sb* (best effort); what is left, one per line."""
    try:
        r = sb.run(["bash", "-c", SWEEP], check=False, timeout=60)
    except Exception as e:  # a sandbox a test broke on purpose, or one already gone
        return f"sweep failed: {e}"
    return r.stdout


def sweep_after(request: pytest.FixtureRequest, names: tuple[str, ...]) -> Iterator[None]:
    """The body of an autouse fixture: after the test, sweep the shared sandboxes it used."""
    used = [request.getfixturevalue(n) for n in names if n in request.fixturenames]
    yield
    for sb in used:
        sweep(sb)

"""Metrics for Prometheus from machined under a real systemd: scraped over HTTP and read
from the textfile inside the sandbox, parsed with prometheus_client's parser.

machined gets its flags from a drop-in (as an operator would enable metrics), with
``IPAddressAllow=localhost`` since the shipped unit denies IP. The sandbox shares the
host's network namespace, so the daemon listens on port 0 and the test reads the
port from the daemon's journal.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from machined.sandbox import Sandbox
from tests.integration.differential import run

pytestmark = pytest.mark.integration

TEXTFILE = "/run/machined-metrics/machined.prom"
INTERVAL = 0.5
DROPIN_DIR = "/run/systemd/system/machined.service.d"
DROPIN = f"""[Service]
ExecStart=
ExecStart={sys.executable} -m machined --metrics-listen 127.0.0.1:0 --metrics-textfile {TEXTFILE} --metrics-interval {INTERVAL}
IPAddressAllow=localhost
"""
LOADCLIENT = f"{sys.executable} {Path(__file__).with_name('loadclient.py')}"
MANAGER = "org.freedesktop.machine1.Manager"

SCRAPE = r"""
import sys, time, urllib.request
start = time.perf_counter()
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=20) as r:
    body = r.read().decode()
sys.stderr.write(f"{time.perf_counter() - start}\n")
sys.stdout.write(body)
"""


def families(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(fams: dict[str, list], sample: str, **labels: str) -> float | None:
    for samples in fams.values():
        for s in samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def info(fams: dict[str, list]) -> dict[str, dict[str, str]]:
    return {s.labels["name"]: s.labels for s in fams["machined_machine_info"]}


class Scraper:
    def __init__(self, sb: Sandbox, port: int) -> None:
        self.sb = sb
        self.port = port
        self.seconds = 0.0

    def __call__(self) -> dict[str, list]:
        r = self.sb.run([sys.executable, "-c", SCRAPE, str(self.port)], timeout=60)
        self.seconds = float(r.stderr.strip().splitlines()[-1])
        return families(r.stdout)


def metrics_port(sb: Sandbox, timeout: float = 30) -> int:
    """The port of the running machined.service, from its journal."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = sb.run(["systemctl", "show", "-p", "MainPID", "--value", "machined.service"]).stdout.strip()
        if pid not in ("", "0"):
            out = sb.run(["journalctl", "-o", "cat", f"_PID={pid}", "--no-pager"], check=False).stdout
            m = re.findall(r"Serving metrics on http://127\.0\.0\.1:(\d+)/metrics", out)
            if m:
                return int(m[-1])
        time.sleep(0.1)
    status = sb.run(["systemctl", "status", "--no-pager", "machined.service"], check=False).stdout
    raise AssertionError(f"machined did not report its metrics port:\n{status}")


@pytest.fixture(scope="module")
def scrape(ours: Sandbox) -> Iterator[Scraper]:
    ours.run(["mkdir", "-p", DROPIN_DIR, str(Path(TEXTFILE).parent)])
    ours.run(["sh", "-c", f"cat > {DROPIN_DIR}/metrics.conf"], input=DROPIN)
    ours.run(["systemctl", "daemon-reload"])
    ours.run(["systemctl", "restart", "machined.service"])
    yield Scraper(ours, metrics_port(ours))


def test_http_scrape_counts_machines_and_calls(ours: Sandbox, scrape: Scraper) -> None:
    out = run(
        ours,
        r"""
P=$(leader mx-a-l); echo "A=$P"
call CreateMachine mx-a '[]' 'svc-a' container $P '' '@a(sv) []' >/dev/null
Q=$(leader mx-b-l); echo "B=$Q"
call CreateMachine mx-b '[]' 'svc-b' vm $Q '' '@a(sv) []' >/dev/null
call GetMachine no-such-machine
call GetMachine mx-a >/dev/null
""",
    )
    assert "org.freedesktop.machine1.NoSuchMachine" in out, out
    fams = scrape()
    machines = info(fams)
    assert machines["mx-a"] == {"name": "mx-a", "class": "container", "service": "svc-a", "state": "running",
                                "unit": "machine-mx\\x2da.scope"}  # fmt: skip
    assert machines["mx-b"]["class"] == "vm" and machines["mx-b"]["unit"] == "machine-mx\\x2db.scope"
    assert machines[".host"]["class"] == "host"
    for name in ("mx-a", "mx-b"):
        # The leader (sleep) runs in the scope; cgroup2 always has cpu.stat.
        assert value(fams, "machined_machine_tasks", name=name) >= 1, name
        assert value(fams, "machined_machine_cpu_seconds_total", name=name) >= 0, name
    assert value(fams, "machined_machine_tasks", name=".host") is None
    assert value(fams, "machined_calls_total", interface=MANAGER, method="CreateMachine", result="ok") == 2
    assert value(fams, "machined_calls_total", interface=MANAGER, method="GetMachine", result="ok") >= 1
    assert value(fams, "machined_calls_total", interface=MANAGER, method="GetMachine",
                 result="org.freedesktop.machine1.NoSuchMachine") == 1  # fmt: skip
    assert value(fams, "machined_call_duration_seconds_count", interface=MANAGER, method="CreateMachine") == 2
    assert value(fams, "machined_registrations_total", **{"class": "container"}) == 1
    assert value(fams, "machined_registrations_total", **{"class": "vm"}) == 1
    assert value(fams, "machined_removals_total", **{"class": "vm"}) == 0
    assert value(fams, "process_resident_memory_bytes") > 0

    run(ours, "call TerminateMachine mx-b >/dev/null; gone mx-b")
    fams = scrape()
    assert "mx-b" not in info(fams)
    assert value(fams, "machined_removals_total", **{"class": "vm"}) == 1
    assert value(fams, "machined_gc_passes_total") >= 1
    assert value(fams, "machined_calls_total", interface=MANAGER, method="TerminateMachine", result="ok") == 1
    run(ours, "call TerminateMachine mx-a >/dev/null; gone mx-a")


def test_textfile_is_written_and_replaced(ours: Sandbox, scrape: Scraper) -> None:
    def read() -> tuple[int, dict[str, list]]:
        r = ours.run(["sh", "-c", f"stat -c %i {TEXTFILE} && cat {TEXTFILE}"])
        inode, _, text = r.stdout.partition("\n")
        return int(inode), families(text)

    inode, fams = read()
    assert ".host" in info(fams)
    run(ours, "call GetMachine no-such-machine")
    no_such = {"interface": MANAGER, "method": "GetMachine", "result": "org.freedesktop.machine1.NoSuchMachine"}
    expected = value(scrape(), "machined_calls_total", **no_such)
    assert expected is not None and expected >= 1
    # It catches up within an interval, in a new file renamed over the old one (a new
    # inode): node_exporter never reads a half-written file.
    deadline = time.monotonic() + 10 * INTERVAL + 10
    changed = False
    while time.monotonic() < deadline:
        new_inode, fams = read()
        changed = changed or new_inode != inode
        if changed and value(fams, "machined_calls_total", **no_such) == expected:
            break
        time.sleep(INTERVAL / 4)
    assert changed, "the textfile was not replaced"
    assert value(fams, "machined_calls_total", **no_such) == expected
    # Only the file itself: temporaries are renamed over it, never left behind.
    listing = ours.run(["ls", "-A", str(Path(TEXTFILE).parent)]).stdout.split()
    assert listing == [Path(TEXTFILE).name]


def test_scrape_of_a_hundred_machines(ours: Sandbox, scrape: Scraper) -> None:
    r = ours.run(["sh", "-c", f"{LOADCLIENT} create mx-load- 100 --concurrency 32"], timeout=300)
    result = json.loads(r.stdout)
    assert result["outcomes"] == {"ok": 100}, result
    try:
        times = []
        for _ in range(5):
            fams = scrape()
            times.append(scrape.seconds)
        machines = info(fams)
        assert sum(1 for n in machines if n.startswith("mx-load-")) == 100
        with_tasks = [n for n in machines if n.startswith("mx-load-") and value(fams, "machined_machine_tasks", name=n)]
        assert len(with_tasks) == 100
        collect = value(fams, "machined_machine_collect_seconds")
        print(f"\nscrape of 100 machines: {min(times) * 1000:.1f} ms best, {max(times) * 1000:.1f} ms worst "
              f"(reading the cgroups: {collect * 1000:.1f} ms)")  # fmt: skip
        assert min(times) < 2.0
    finally:
        ours.run(["sh", "-c", f"{LOADCLIENT} terminate mx-load- 100 --concurrency 32"], timeout=300)

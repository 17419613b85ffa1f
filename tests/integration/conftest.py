"""Sandboxes with a real systemd, real dbus-daemon and real clients, for integration tests.

``ours`` runs machined in place of systemd-machined; ``real`` keeps
systemd-machined 252, the reference. Both are booted once per test module and
always torn down, even when a test fails.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

from machined.sandbox import Sandbox
from machined.sandbox.core import CGROUP_ENV, LAYOUTS, cgroup_layout
from tests.integration.differential import sweep_after

pytestmark = pytest.mark.integration

# The cgroup layout of every sandbox of this run: MACHINED_TEST_CGROUP=hybrid|unified
# (`make test` runs the suite once with each); unset: the host's own layout. Exported
# for machined-sandbox itself too, so that sandboxes a test starts directly or through
# the command line get the same layout as the ours/real fixtures.
CGROUP_LAYOUT = os.environ.get("MACHINED_TEST_CGROUP") or None
if CGROUP_LAYOUT is not None:
    if CGROUP_LAYOUT not in LAYOUTS:
        raise pytest.UsageError(f"MACHINED_TEST_CGROUP={CGROUP_LAYOUT}: hybrid or unified")
    os.environ[CGROUP_ENV] = CGROUP_LAYOUT


def sandbox_layout() -> str:
    """The layout the sandboxes of this run get (inside them, at /sys/fs/cgroup)."""
    if CGROUP_LAYOUT is not None:
        return CGROUP_LAYOUT
    try:
        return cgroup_layout()
    except Exception:  # not root or no cgroups: integration tests are skipped anyway
        return "unknown"


def pytest_report_header() -> str:
    return f"sandbox cgroup layout: {sandbox_layout()}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="integration tests boot systemd in namespaces and need root")
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def ours() -> Iterator[Sandbox]:
    with Sandbox("ours", cgroup=CGROUP_LAYOUT) as sb:
        yield sb


@pytest.fixture(scope="module")
def real() -> Iterator[Sandbox]:
    with Sandbox("real", cgroup=CGROUP_LAYOUT) as sb:
        yield sb


@pytest.fixture(autouse=True)
def _sweep_shared_sandboxes(request: pytest.FixtureRequest) -> Iterator[None]:
    yield from sweep_after(request, ("ours", "real"))


@pytest.fixture(scope="session")
def layout() -> str:
    """``hybrid`` or ``unified``: the cgroup layout inside this run's sandboxes."""
    return sandbox_layout()


def mask(text: str) -> str:
    """Hide what legitimately differs between two runs: PIDs, times, unique names."""
    text = re.sub(r'"(Timestamp|TimestampMonotonic)" t \d+', r'"\1" t N', text)
    # .host's times are computed from the clocks at start: µs of jitter, upstream included
    text = re.sub(r"(\.Timestamp(Monotonic)?\s+property\s+t\s+)\d+", r"\1N", text)
    text = re.sub(r"time=\d+\.\d+", "time=T", text)
    text = re.sub(r"serial=\d+", "serial=S", text)
    text = re.sub(r":1\.\d+", ":1.N", text)
    return text

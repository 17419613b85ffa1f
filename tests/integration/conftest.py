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

pytestmark = pytest.mark.integration


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="integration tests boot systemd in namespaces and need root")
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def ours() -> Iterator[Sandbox]:
    with Sandbox("ours") as sb:
        yield sb


@pytest.fixture(scope="module")
def real() -> Iterator[Sandbox]:
    with Sandbox("real") as sb:
        yield sb


def mask(text: str) -> str:
    """Hide what legitimately differs between two runs: PIDs, times, unique names."""
    text = re.sub(r'"(Timestamp|TimestampMonotonic)" t \d+', r'"\1" t N', text)
    # .host's times are computed from the clocks at start: µs of jitter, upstream included
    text = re.sub(r"(\.Timestamp(Monotonic)?\s+property\s+t\s+)\d+", r"\1N", text)
    text = re.sub(r"time=\d+\.\d+", "time=T", text)
    text = re.sub(r"serial=\d+", "serial=S", text)
    text = re.sub(r":1\.\d+", ":1.N", text)
    return text

"""Sandboxes with systemd 262 (the cached Debian forky root), for differential tests against
upstream's newest machined.

``ours262`` runs machined in place of systemd-machined 262 (its socket and service masked);
``real262`` keeps systemd-machined 262, socket-activated, the reference. Both are booted once
per test module and always torn down, even when a test fails. A 262 sandbox is always on
cgroup2 only, so `make test` runs this directory once (not once per cgroup layout).

The root is built before the first test when it is not cached (a few minutes on a fresh
machine), outside any test's timeout.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from machined.sandbox import Sandbox
from tests.integration.differential import sweep_after

pytestmark = pytest.mark.integration


def pytest_report_header() -> str:
    from machined.sandbox.root import cached_root, root_dir

    root = cached_root()
    if root is None:
        return f"systemd-262 root: {root_dir()} (not built yet: built before the first test)"
    return f"systemd-262 root: {root.rootfs} (systemd {root.systemd_version}, built {root.manifest.get('built')})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="integration tests boot systemd in namespaces and need root")
    for item in items:
        if "integration262" in str(item.path):
            item.add_marker(skip)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the root now if a selected test needs it (not inside a test's timeout)."""
    if os.geteuid() != 0 or not any("integration262" in str(item.path) for item in session.items):
        return
    from machined.sandbox.root import RootError, cached_root, ensure_root

    if cached_root() is not None:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")

    def log(line: str) -> None:
        if reporter is not None:
            reporter.write_line(f"machined-sandbox: {line}")

    try:
        ensure_root(log=log)
    except RootError as e:  # every test will then fail with this message from Sandbox.start
        log(f"building the systemd-262 root failed: {e}")


@pytest.fixture(scope="module")
def ours262() -> Iterator[Sandbox]:
    with Sandbox("ours", systemd="262") as sb:
        yield sb


@pytest.fixture(scope="module")
def real262() -> Iterator[Sandbox]:
    with Sandbox("real", systemd="262") as sb:
        yield sb


@pytest.fixture(autouse=True)
def _sweep_shared_sandboxes(request: pytest.FixtureRequest) -> Iterator[None]:
    yield from sweep_after(request, ("ours262", "real262"))

"""The core is transport-neutral: importing it loads no D-Bus library.

Each module is imported in a fresh interpreter (so nothing imported by other tests counts),
then sys.modules is inspected."""

from __future__ import annotations

import subprocess
import sys

import pytest

CORE = [
    "machined.manager", "machined.registry", "machined.machine", "machined.inside.access", "machined.lifecycle",
    "machined.images.pool", "machined.images.lock", "machined.images.metadata", "machined.images.operations",
    "machined.images.service", "machined.fs", "machined.fs.copy", "machined.children.client", "machined.children.jobs", "machined.children.limits", "machined.limits",
    "machined.caller", "machined.errors", "machined.statefile", "machined.naming", "machined.cgroup",
    "machined.registration", "machined.userdb",
    # the varlink front-end needs no D-Bus either (its polkit client is handed in by the daemon)
    "machined.varlink", "machined.varlink.machine", "machined.varlink.image",
    # inside a machine: the looks and the calls both front-ends make on a machine's inside
    "machined.inside.machine_calls", "machined.inside.shell", "machined.inside.looks", "machined.inside.lookthreads",
    "machined.inside.addresses", "machined.inside.pty",
]  # fmt: skip


@pytest.mark.parametrize("module", CORE)
def test_importing_the_core_never_imports_dbus_fast(module: str) -> None:
    """Nor the D-Bus front-end (machined.dbus) or the outgoing clients (machined.clients)."""
    code = (
        f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'dbus_fast'"
        " or m.startswith(('machined.dbus', 'machined.clients'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"{module} imports {out.strip()}"


def test_the_dbus_front_end_does() -> None:
    """The check can fail: the D-Bus adapters do load dbus_fast."""
    code = "import sys, machined.dbus.adapters; print('dbus_fast' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


# What runs in a child inside a container's mount namespace; the daemon's looks never load it.
CHILD_SIDE = ["machined.inside.nsprobe", "machined.inside.machine_ops", "machined.inside.sessions"]


@pytest.mark.parametrize("module", ["machined.inside.access", "machined.inside.looks", "machined.inside.machine_calls"])
def test_the_looks_never_import_what_runs_in_children(module: str) -> None:
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m in {CHILD_SIDE!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"{module} imports {out.strip()}"


def test_the_child_side_is_what_the_fork_server_preloads() -> None:
    """The check can fail: the fork server loads the child side before it forks."""
    from machined.children import forkserver

    assert set(CHILD_SIDE) - {"machined.inside.sessions"} <= set(forkserver.PRELOAD)


def test_every_job_names_a_function_that_exists() -> None:
    """A job moved or renamed fails here, not in a child at run time."""
    import importlib

    from machined.children import jobs

    for job in jobs.ALL:
        assert callable(getattr(importlib.import_module(job.module), job.function, None)), job.target
    assert len({job.target for job in jobs.ALL}) == len(jobs.ALL)


def test_the_daemon_side_of_the_fork_never_imports_the_child_side() -> None:
    code = "import sys, machined.children.client; print(sorted(m for m in sys.modules if m.startswith('machined.children')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(["machined.children", "machined.children.client", "machined.children.jobs",
                               "machined.children.limits", "machined.children.wire"])  # fmt: skip


def test_the_daemon_starts_without_the_childrens_client() -> None:
    """Loaded at the first job (some 0.6 MiB): idle and the looks go without it."""
    code = "import sys, machined.cli; print(sorted(m for m in sys.modules if m.startswith('machined.children')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(["machined.children", "machined.children.jobs", "machined.children.limits"])

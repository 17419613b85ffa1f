"""The core is transport-neutral: importing it loads no D-Bus library.

Each module is imported in a fresh interpreter (so nothing imported by other tests counts),
then sys.modules is inspected."""

from __future__ import annotations

import subprocess
import sys

import pytest

CORE = [
    "machined.manager", "machined.registry", "machined.machine", "machined.access", "machined.lifecycle",
    "machined.images.pool", "machined.images.lock", "machined.images.metadata", "machined.images.operations",
    "machined.images.service", "machined.fs", "machined.fs.copy", "machined.worker", "machined.limits",
    "machined.caller", "machined.errors", "machined.statefile", "machined.naming", "machined.cgroup",
    "machined.registration", "machined.userdb",
    # the varlink front-end needs no D-Bus either (its polkit client is handed in by the daemon)
    "machined.varlink", "machined.varlink.machine", "machined.varlink.image", "machined.machine_calls", "machined.shell",
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

"""machined --register-oci with real podman and docker under systemd 262 (issue 17): the tests of
tests/integration/test_oci.py in a 262 sandbox (the forky root's podman, docker.io and runc),
one sandbox for the module, in the same order (they share its containers)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from machined.sandbox import Sandbox
from tests.integration import test_oci
from tests.integration.test_oci import MACHINED_ARGS, State, compared, make_state  # noqa: F401 (compared: a fixture)

pytestmark = pytest.mark.integration

# test_oci's tests, collected here in their order of definition
for _name, _test in vars(test_oci).items():
    if _name.startswith("test_") and callable(_test):
        globals()[_name] = _test


@pytest.fixture(scope="module")
def oci_state() -> Iterator[State]:
    with Sandbox("ours", systemd="262", oci=True, machined_args=MACHINED_ARGS) as sb:
        yield from make_state(sb)

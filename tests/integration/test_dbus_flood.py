"""A D-Bus peer sending NO_REPLY_EXPECTED calls as fast as it can (user nobody: Ping, Introspect,
GetAll, ListMachines, GetMachine, on one connection, then on four) cannot take more than its
share of the daemon: root's ListMachines is answered within 50 ms at the 99th percentile
meanwhile, every one of them; neither daemon restarts nor PID 1 loses the bus. Real
systemd-machined 252 is flooded the same way in the same run and its figures reported."""

from __future__ import annotations

import pytest

from machined.sandbox import Sandbox
from tests.integration.dbusflood import check_flood


@pytest.mark.parametrize("conns", [1, 4])
def test_root_is_served_while_nobody_floods(
    conns: int, ours: Sandbox, real: Sandbox, request: pytest.FixtureRequest
) -> None:
    check_flood(request, ours, real, conns, varlink=False)

"""The per-user instance's places (``machined --user``, as systemd 262's): paths from the
environment, the unit of a leader (system's or the user manager's), the image search path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from machined.cgroup import cgroup_path_get_unit_full, cgroup_path_get_user_unit_full
from machined.images import pool
from machined.userscope import UserScopeError, from_environment

APP = "/user.slice/user-1500.slice/user@1500.service/app.slice/lead.service"


def test_paths_from_the_environment() -> None:
    scope = from_environment({"XDG_RUNTIME_DIR": "/run/user/1500", "HOME": "/home/u"}, uid=1500)
    assert scope.state_dir == "/run/user/1500/systemd/machines"
    assert scope.machine_socket == "/run/user/1500/systemd/machine/io.systemd.Machine"
    assert scope.machine_image_link == "/run/user/1500/systemd/machine/io.systemd.MachineImage"
    assert scope.varlink_registry == "/run/user/1500/varlink/registry"
    assert scope.lock_dir == "/run/user/1500/systemd/nspawn/locks"
    assert scope.pool_path == "/home/u/.local/state/machines"
    assert scope.image_search_path == (
        "/run/user/1500/machines",
        "/home/u/.local/state/machines",
        "/home/u/.local/lib/machines",
    )
    assert scope.bus_address == "unix:path=/run/user/1500/bus"


def test_xdg_state_home_and_bus_address_are_honoured() -> None:
    env = {"XDG_RUNTIME_DIR": "/r", "HOME": "/h", "XDG_STATE_HOME": "/s", "DBUS_SESSION_BUS_ADDRESS": "unix:path=/b"}
    scope = from_environment(env, uid=1)
    assert scope.pool_path == "/s/machines" and scope.bus_address == "unix:path=/b"
    # a relative XDG_STATE_HOME is ignored, as the XDG spec says
    assert from_environment({**env, "XDG_STATE_HOME": "rel"}, uid=1).pool_path == "/h/.local/state/machines"


@pytest.mark.parametrize("runtime_dir", [None, "", "relative/dir"])
def test_no_runtime_dir_is_a_clear_error(runtime_dir: str | None) -> None:
    env = {"HOME": "/h"} if runtime_dir is None else {"HOME": "/h", "XDG_RUNTIME_DIR": runtime_dir}
    with pytest.raises(UserScopeError, match="XDG_RUNTIME_DIR"):
        from_environment(env, uid=1)


def test_daemon_refuses_to_start_as_a_user_instance_without_runtime_dir() -> None:
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    r = subprocess.run([sys.executable, "-m", "machined", "--user"], env=env, capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 1
    assert "XDG_RUNTIME_DIR is not set" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("path", "system", "user"),
    [
        (APP, ("user@1500.service", "app.slice/lead.service"), ("lead.service", "")),
        (APP + "/sub/deeper", ("user@1500.service", "app.slice/lead.service/sub/deeper"), ("lead.service", "sub/deeper")),
        ("/machine.slice/machine-a.scope", ("machine-a.scope", ""), (None, "")),
        ("/machine.slice/machine-a.scope/payload", ("machine-a.scope", "payload"), (None, "")),
        ("/user.slice/user-1500.slice/user@1500.service/init.scope", ("user@1500.service", "init.scope"),
         ("init.scope", "")),
        ("/user.slice/user-1500.slice/user@1500.service", ("user@1500.service", ""), (None, "")),
        ("/sandbox-exec", (None, ""), (None, "")),
        ("/", (None, ""), (None, "")),
    ],
)  # fmt: skip
def test_unit_and_subgroup_of_a_cgroup(path: str, system: tuple[str | None, str], user: tuple[str | None, str]) -> None:
    assert cgroup_path_get_unit_full(path) == system
    assert cgroup_path_get_user_unit_full(path) == user


def test_user_search_path_has_no_host_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "img").mkdir()
    monkeypatch.setattr(pool, "SEARCH_PATH", pool.SEARCH_PATH)
    monkeypatch.setattr(pool, "POOL_PATH", pool.POOL_PATH)
    monkeypatch.setattr(pool, "INCLUDE_HOST", pool.INCLUDE_HOST)
    monkeypatch.setenv(pool.USER_SEARCH_PATH_ENV, "")  # (restored after the test: the call below sets it)
    pool.use_user_search_path((str(tmp_path / "run"), str(tmp_path / "state")), str(tmp_path / "state"))
    assert sorted(pool.discover()) == ["img"]
    assert pool.find(".host") is None and pool.find("img") is not None
    assert pool.POOL_PATH == str(tmp_path / "state")
    # Worker children (a fresh interpreter) see the same search path.
    probe = "from machined.images import pool as p; print(p.POOL_PATH, p.SEARCH_PATH, p.INCLUDE_HOST)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{tmp_path}/state ('{tmp_path}/run', '{tmp_path}/state') False"


async def test_user_instance_asks_polkit_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from machined.caller import PolkitSubject
    from machined.clients import polkit
    from machined.errors import BusError

    subject = PolkitSubject("unix-process", pidfd=-1, uid=1000)
    with pytest.raises(BusError):  # a system instance refuses an unidentifiable unprivileged peer
        await polkit.check(None, subject, 1000, "manage-machines", {}, False)
    monkeypatch.setattr(polkit, "ask_polkit", False)
    await polkit.check(None, subject, 1000, "manage-machines", {}, False)  # served, no polkit asked

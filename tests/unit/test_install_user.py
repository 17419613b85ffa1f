"""``machined install`` on a host whose systemd has a per-user machined (262's
``systemd-machined --user``): ours for every user in /etc/systemd/user, upstream's user units
masked there, and ``uninstall`` gives the tree back byte for byte. The live check (a user's
service manager starting ours, then upstream's again) is tests/integration262/test_install262.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from machined import install as inst
from machined.data import unit_file
from tests.unit.test_install import (
    EXEC,
    MANIFEST,
    FakeHost262,
    forky_root,
    installation,
    put,
    snapshot,
)

USER_DIR = "etc/systemd/user"
USER_UNIT = f"{USER_DIR}/machined.service"
USER_ALIAS = f"{USER_DIR}/dbus-org.freedesktop.machine1.service"
USER_SOCKET = f"{USER_DIR}/machined.socket"
USER_WANTS = f"{USER_DIR}/sockets.target.wants/machined.socket"
USER_MASKS = (f"{USER_DIR}/systemd-machined.service", f"{USER_DIR}/systemd-machined.socket")


def forky_user_root(root: Path) -> Path:
    """forky_root plus 262's user units for machined, as Debian forky ships them."""
    forky_root(root)
    (root / USER_DIR).mkdir(parents=True)
    lib = "usr/lib/systemd/user"
    put(root, f"{lib}/systemd-machined.service", "[Service]\nExecStart=/usr/lib/systemd/systemd-machined --user\n")
    put(root, f"{lib}/systemd-machined.socket", "[Socket]\nListenStream=%t/systemd/machine/io.systemd.Machine\n")
    os.symlink("systemd-machined.service", root / lib / "dbus-org.freedesktop.machine1.service")
    (root / lib / "sockets.target.wants").mkdir()
    os.symlink("../systemd-machined.socket", root / lib / "sockets.target.wants/systemd-machined.socket")
    return root


def test_user_units_installed_enabled_and_upstreams_masked(tmp_path: Path) -> None:
    root = forky_user_root(tmp_path)
    lines: list[str] = []
    installation(root, lines=lines).install()
    unit = (root / USER_UNIT).read_text()
    assert f"\nExecStart={EXEC} --user\n" in unit and unit.count("ExecStart=") == 1
    assert "Alias=dbus-org.freedesktop.machine1.service" in unit
    shipped = unit_file("machined-user.service").read_text()
    assert unit.endswith(shipped.replace("ExecStart=/usr/local/bin/machined --user", f"ExecStart={EXEC} --user"))
    assert (root / USER_SOCKET).read_text().endswith(unit_file("machined-user.socket").read_text())
    assert "ListenStream=%t/systemd/machine/io.systemd.Machine" in (root / USER_SOCKET).read_text()
    assert os.readlink(root / USER_ALIAS) == "/etc/systemd/user/machined.service"
    assert os.readlink(root / USER_WANTS) == "/etc/systemd/user/machined.socket"
    for mask in USER_MASKS:
        assert os.readlink(root / mask) == "/dev/null"
    assert (root / USER_UNIT).stat().st_mode & 0o7777 == 0o644
    assert "created /etc/systemd/user/machined.service (per-user unit)" in lines
    assert "created /etc/systemd/user/systemd-machined.socket -> /dev/null (masked, as systemctl mask does)" in lines
    # the system's units are still the system's (no --user there)
    assert f"\nExecStart={EXEC}\n" in (root / "etc/systemd/system/machined.service").read_text()
    paths = [e["path"] for e in json.loads((root / MANIFEST).read_text())["entries"]]
    assert "/etc/systemd/user/machined.service" in paths and "/etc/systemd/user/sockets.target.wants" not in paths


def test_uninstall_gives_back_the_user_units_byte_for_byte(tmp_path: Path) -> None:
    root = forky_user_root(tmp_path)
    # an administrator's own files where ours go: backed up and put back
    put(root, USER_UNIT, "[Service]\nExecStart=/bin/true\n", mode=0o640, mtime=1_600_000_000)
    os.symlink("/usr/lib/systemd/user/systemd-machined.socket", root / USER_MASKS[1])
    before = snapshot(root)
    lines: list[str] = []
    installation(root, lines=lines).install()
    assert "replaced /etc/systemd/user/machined.service (per-user unit)" in lines
    assert os.readlink(root / USER_MASKS[1]) == "/dev/null"
    installation(root, lines=lines).uninstall()
    assert snapshot(root) == before  # incl. sockets.target.wants, created by install, gone again


def test_install_twice_changes_nothing(tmp_path: Path) -> None:
    root = forky_user_root(tmp_path)
    installation(root).install()
    after_first = snapshot(root)
    lines: list[str] = []
    installation(root, lines=lines).install()
    assert "unchanged /etc/systemd/user/machined.service" in lines
    after_first.pop(MANIFEST)  # (rewritten: its "updated" time)
    again = snapshot(root)
    again.pop(MANIFEST)
    assert again == after_first


def test_an_installation_from_before_gets_the_user_units_and_uninstall_undoes_both(tmp_path: Path) -> None:
    """Installed on 262 by a machined without the user part: install again adds it."""
    root = forky_user_root(tmp_path)
    before = snapshot(root)
    plain = inst.Installation.per_user
    try:
        inst.Installation.per_user = lambda self: False  # type: ignore[method-assign]
        installation(root).install()
    finally:
        inst.Installation.per_user = plain  # type: ignore[method-assign]
    assert not (root / USER_UNIT).exists()
    lines: list[str] = []
    installation(root, lines=lines).install()
    assert "created /etc/systemd/user/machined.service (per-user unit)" in lines
    installation(root).uninstall()
    assert snapshot(root) == before


def test_without_upstream_user_units_nothing_for_users(tmp_path: Path) -> None:
    root = forky_root(tmp_path)  # (a 257: socket-activated, no per-user machined)
    installation(root).install()
    assert not (root / USER_DIR).exists()


def test_live_install_says_running_user_managers_keep_theirs_and_touches_none(tmp_path: Path) -> None:
    root = forky_user_root(tmp_path)
    before = snapshot(root)
    host = FakeHost262(root, {inst.UPSTREAM_UNIT, inst.UPSTREAM_SOCKET})
    lines: list[str] = []
    installation(root, host, lines).install()
    assert any(line.startswith("users' service managers running now keep systemd-machined --user") for line in lines)
    # the system's switch as without user units; nothing asked of users' managers
    assert [c for c in host.calls if c.startswith(("start", "stop"))] == [
        "stop systemd-machined.socket", "stop systemd-machined.service", "start machined.socket",
        "start machined.service",
    ]  # fmt: skip
    lines.clear()
    installation(root, host, lines).uninstall()
    assert any(line.startswith("users' service managers running now keep machined --user") for line in lines)
    assert snapshot(root) == before

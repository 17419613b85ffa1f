"""``machined install`` / ``uninstall`` on a file system tree (``--root``): no root, no systemd.

The live switch (systemctl, the bus) is tested in a sandbox in
tests/integration/test_install.py; here a fake host records what would be asked of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from machined import cli
from machined import install as inst
from machined.data import interface_file

EXEC = "/opt/venv/bin/machined"
UNIT = "etc/systemd/system/machined.service"
ALIAS = "etc/systemd/system/dbus-org.freedesktop.machine1.service"
MASK = "etc/systemd/system/systemd-machined.service"
POLICY = "etc/dbus-1/system.d/org.freedesktop.machine1.conf"
MANIFEST = "var/lib/machined/install-manifest.json"
UPSTREAM_ACTIVATION = "usr/share/dbus-1/system-services/org.freedesktop.machine1.service"
LOCAL_ACTIVATION = "usr/local/share/dbus-1/system-services/org.freedesktop.machine1.service"
POLKIT = "usr/share/polkit-1/actions/org.freedesktop.machine1.policy"

# What systemd-container 252 ships, as far as install compares it (other comments, same keys).
UPSTREAM_ACTIVATION_TEXT = """#  SPDX-License-Identifier: LGPL-2.1-or-later
#
#  This file is part of systemd.

[D-BUS Service]
Name=org.freedesktop.machine1
Exec=/bin/false
User=root
SystemdService=dbus-org.freedesktop.machine1.service
"""


def upstream_polkit_text() -> str:
    """Our actions re-indented, with upstream's vendor and gettext domains: equivalent."""
    text = interface_file("org.freedesktop.machine1.policy").read_text()
    text = text.replace("<vendor>machined</vendor>", "<vendor>The systemd Project</vendor>")
    return text.replace("<description>", '<description gettext-domain="systemd">').replace("\n    ", "\n        ")


def put(root: Path, rel: str, text: str, mode: int = 0o644, mtime: int | None = None) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    os.chmod(p, mode)
    if mtime is not None:
        os.utime(p, (mtime, mtime))
    return p


def debian_root(root: Path) -> Path:
    """A tree like Debian 12 with systemd-container: upstream's activation file and polkit actions."""
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/dbus-1/system.d").mkdir(parents=True)
    put(root, UPSTREAM_ACTIVATION, UPSTREAM_ACTIVATION_TEXT, mtime=1_700_000_000)
    put(root, POLKIT, upstream_polkit_text(), mtime=1_700_000_000)
    return root


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under *root*: type, mode, owner, content hash or link target, file mtime."""
    result = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                result[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                result[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                result[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, digest, st.st_mtime_ns)
    return result


def installation(root: Path, host: object = None, lines: list[str] | None = None) -> inst.Installation:
    out = lines.append if lines is not None else (lambda _: None)
    return inst.Installation(root, host, exec_start=EXEC, out=out)  # type: ignore[arg-type]


# ----- placing the files ---------------------------------------------------------------


def test_install_places_unit_alias_mask_and_policy_with_right_content_and_modes(tmp_path: Path) -> None:
    root = debian_root(tmp_path)
    lines: list[str] = []
    installation(root, lines=lines).install()

    unit = (root / UNIT).read_text()
    assert f"\nExecStart={EXEC}\n" in unit and unit.count("ExecStart=") == 1
    assert "Type=notify" in unit and "BusName=org.freedesktop.machine1" in unit
    assert "Alias=dbus-org.freedesktop.machine1.service" in unit
    assert stat.S_IMODE((root / UNIT).stat().st_mode) == 0o644
    # Exactly what `systemctl enable` and `systemctl mask` create.
    assert os.readlink(root / ALIAS) == "/etc/systemd/system/machined.service"
    assert os.readlink(root / MASK) == "/dev/null"
    assert (root / POLICY).read_bytes() == interface_file("org.freedesktop.machine1.conf").read_bytes()
    assert stat.S_IMODE((root / POLICY).stat().st_mode) == 0o644
    # Upstream's activation file and polkit actions do what ours do: left alone.
    assert (root / UPSTREAM_ACTIVATION).read_text() == UPSTREAM_ACTIVATION_TEXT
    assert not (root / LOCAL_ACTIVATION).exists()
    assert (root / POLKIT).read_text() == upstream_polkit_text()
    assert any(line.startswith("kept /usr/share/dbus-1/system-services/") for line in lines)
    assert any(line.startswith("kept /usr/share/polkit-1/actions/") for line in lines)


def test_manifest_records_every_change(tmp_path: Path) -> None:
    root = debian_root(tmp_path)
    installation(root).install()
    m = json.loads((root / MANIFEST).read_text())
    assert stat.S_IMODE((root / MANIFEST).stat().st_mode) == 0o600
    assert m["version"] == 1 and m["upstream_was_active"] is False
    assert [e["path"] for e in m["entries"]] == ["/" + p for p in (UNIT, ALIAS, MASK, POLICY)]
    assert all(e["before"] == {"type": "absent"} for e in m["entries"])
    assert m["entries"][1]["installed"] == {"type": "symlink", "target": "/etc/systemd/system/machined.service"}
    unit_sha = hashlib.sha256((root / UNIT).read_bytes()).hexdigest()
    assert m["entries"][0]["installed"] == {"type": "file", "sha256": unit_sha, "mode": "0644"}
    assert "/var/lib/machined" in m["created_dirs"]
    assert len(m["kept"]) == 2


def test_without_upstream_files_ours_are_installed_where_they_take_effect(tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    installation(tmp_path).install()
    # dbus-daemon's first system service directory; polkitd's only actions directory.
    assert (tmp_path / LOCAL_ACTIVATION).read_bytes() == interface_file(inst.ACTIVATION_FILE).read_bytes()
    assert (tmp_path / POLKIT).read_bytes() == interface_file("org.freedesktop.machine1.policy").read_bytes()
    installation(tmp_path).uninstall()
    assert snapshot(tmp_path) == before  # created directories are gone too


def test_a_different_activation_file_or_polkit_policy_is_overridden_and_restored(tmp_path: Path) -> None:
    root = debian_root(tmp_path)
    put(root, UPSTREAM_ACTIVATION, UPSTREAM_ACTIVATION_TEXT.replace("dbus-org.freedesktop.machine1", "other"))
    put(root, POLKIT, upstream_polkit_text().replace("auth_admin_keep", "yes", 1), mode=0o640, mtime=1_600_000_000)
    before = snapshot(root)
    installation(root).install()
    assert (root / LOCAL_ACTIVATION).exists()  # first in the search path: wins over /usr/share
    assert (root / POLKIT).read_bytes() == interface_file("org.freedesktop.machine1.policy").read_bytes()
    installation(root).uninstall()
    assert snapshot(root) == before


def test_uninstall_restores_overwritten_files_byte_for_byte_and_removes_created_ones(tmp_path: Path) -> None:
    root = debian_root(tmp_path)
    # An administrator's copy of systemd-machined's unit, their own bus policy and an
    # earlier, hand-made machined unit.
    put(root, MASK, "[Service]\nExecStart=/lib/systemd/systemd-machined\n", mode=0o600, mtime=1_500_000_000)
    put(root, POLICY, "<busconfig><!-- mine --></busconfig>\n", mode=0o644, mtime=1_500_000_001)
    put(root, UNIT, "[Service]\nExecStart=/usr/local/bin/machined\n", mode=0o664, mtime=1_500_000_002)
    before = snapshot(root)
    lines: list[str] = []
    installation(root, lines=lines).install()
    assert os.readlink(root / MASK) == "/dev/null"
    assert (
        "replaced /etc/systemd/system/systemd-machined.service -> /dev/null (masked, as systemctl mask does)" in lines
    )
    m = json.loads((root / MANIFEST).read_text())
    backups = {e["path"]: e["before"]["backup"] for e in m["entries"] if e["before"]["type"] == "file"}
    assert set(backups) == {"/" + MASK, "/" + POLICY, "/" + UNIT}
    assert stat.S_IMODE((root / inst.BACKUP_DIR.lstrip("/")).stat().st_mode) == 0o700

    lines.clear()
    assert installation(root, lines=lines).uninstall() is True
    assert snapshot(root) == before
    assert "removed /etc/systemd/system/dbus-org.freedesktop.machine1.service" in lines
    assert "restored /etc/systemd/system/systemd-machined.service" in lines
    assert not (root / "var/lib/machined").exists()


def test_symlinks_there_before_are_put_back(tmp_path: Path) -> None:
    root = debian_root(tmp_path)
    os.symlink("/dev/null", root / MASK)  # the administrator had masked systemd-machined
    os.symlink("/lib/systemd/system/systemd-machined.service", root / ALIAS)
    before = snapshot(root)
    installation(root).install()
    assert os.readlink(root / ALIAS) == "/etc/systemd/system/machined.service"
    m = json.loads((root / MANIFEST).read_text())
    assert inst._entry(m, "/" + MASK)["before"] == {"type": "symlink", "target": "/dev/null"}  # type: ignore[index]
    installation(root).uninstall()
    assert snapshot(root) == before


def test_install_twice_changes_nothing_and_keeps_the_original_backups(tmp_path: Path) -> None:
    root = debian_root(tmp_path)
    put(root, POLICY, "<busconfig><!-- mine --></busconfig>\n", mtime=1_500_000_000)
    before = snapshot(root)
    installation(root).install()
    after_first = snapshot(root)
    manifest_first = json.loads((root / MANIFEST).read_text())
    lines: list[str] = []
    installation(root, lines=lines).install()
    assert "machined is installed already; bringing the installation up to date" in lines
    assert sum(line.startswith("unchanged ") for line in lines) == 4
    manifest_second = json.loads((root / MANIFEST).read_text())
    assert manifest_second["entries"] == manifest_first["entries"]
    after_second = snapshot(root)
    after_first.pop(MANIFEST)
    after_second.pop(MANIFEST)
    assert after_second == after_first
    installation(root).uninstall()
    assert snapshot(root) == before  # the administrator's policy, not our own copy of it


def test_reinstall_with_a_new_command_updates_the_unit_only(tmp_path: Path) -> None:
    root = debian_root(tmp_path)
    before = snapshot(root)
    installation(root).install()
    lines: list[str] = []
    inst.Installation(root, None, exec_start="/usr/bin/python3 -m machined", out=lines.append).install()
    assert "ExecStart=/usr/bin/python3 -m machined\n" in (root / UNIT).read_text()
    assert "updated /etc/systemd/system/machined.service (unit)" in lines
    installation(root).uninstall()
    assert snapshot(root) == before


def test_uninstall_without_install_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = debian_root(tmp_path)
    before = snapshot(root)
    assert installation(root).uninstall() is False
    assert cli.main(["uninstall", "--root", str(root)]) == 0
    assert "machined is not installed here" in capsys.readouterr().out
    assert snapshot(root) == before


def test_a_file_changed_after_install_is_saved_before_the_original_comes_back(tmp_path: Path) -> None:
    root = debian_root(tmp_path)
    installation(root).install()
    (root / UNIT).write_text((root / UNIT).read_text() + "# local change\n")
    lines: list[str] = []
    installation(root, lines=lines).uninstall()
    saved = root / "var/lib/machined/uninstall-saved/etc/systemd/system/machined.service"
    assert saved.read_text().endswith("# local change\n")
    assert not (root / UNIT).exists()
    assert any("was changed after install" in line for line in lines)


def test_a_failed_first_install_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = debian_root(tmp_path)
    put(root, MASK, "[Service]\n", mtime=1_500_000_000)
    before = snapshot(root)
    real_write = inst._write_file

    def failing_write(tmp: Path, data: bytes, mode: int) -> None:
        if "system.d" in str(tmp):
            raise OSError(28, "No space left on device")
        real_write(tmp, data, mode)

    monkeypatch.setattr(inst, "_write_file", failing_write)
    with pytest.raises(OSError):
        installation(root).install()
    assert snapshot(root) == before


def test_a_directory_in_the_way_is_refused(tmp_path: Path) -> None:
    root = debian_root(tmp_path)
    (root / MASK).mkdir()
    before = snapshot(root)
    with pytest.raises(inst.InstallError, match="neither a file nor a symlink"):
        installation(root).install()
    assert snapshot(root) == before


def test_command_line_with_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = debian_root(tmp_path)
    before = snapshot(root)
    monkeypatch.setattr(sys, "argv", [EXEC])  # as if run as /opt/venv/bin/machined
    monkeypatch.setattr(inst, "default_exec_start", lambda: EXEC)
    assert cli.main(["install", "--root", str(root)]) == 0
    assert f"ExecStart={EXEC}\n" in (root / UNIT).read_text()
    assert "created /etc/systemd/system/machined.service (unit)" in capsys.readouterr().out
    assert cli.main(["uninstall", "--root", str(root), "--no-start"]) == 0
    assert snapshot(root) == before
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])  # the daemon's own options are untouched
    assert e.value.code == 0


# ----- the command the unit runs -------------------------------------------------------


def test_exec_start_is_the_running_console_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = put(tmp_path, "bin/machined", "#!/usr/bin/python3\n", mode=0o755)
    monkeypatch.setattr(sys, "argv", [str(script), "install"])
    assert inst.default_exec_start() == str(script)


def test_exec_start_without_a_console_script_is_this_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/somewhere/machined/__main__.py", "install"])
    # Not resolved: a virtualenv's python finds its packages only through its own path.
    assert inst.default_exec_start() == f"{os.path.abspath(sys.executable)} -m machined"


@pytest.mark.parametrize(
    "bad", ["/opt/100%/machined", "/opt/$HOME/machined", "/opt/a\\b/machined", "machined", "/a  -m x"]
)
def test_exec_start_that_systemd_would_misread_is_refused(bad: str) -> None:
    with pytest.raises(inst.InstallError):
        inst.check_exec_start(bad)


def test_a_console_script_with_a_blank_in_its_path_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = put(tmp_path, "my venv/bin/machined", "#!/usr/bin/python3\n", mode=0o755)
    monkeypatch.setattr(sys, "argv", [str(script), "install"])
    with pytest.raises(inst.InstallError, match="plain path"):
        inst.default_exec_start()


# ----- the live switch, against a fake host --------------------------------------------


class FakeHost:
    """Records what install asks of systemd and the bus; units' states as given."""

    def __init__(self, root: Path, active: set[str], *, shadowed: bool = False) -> None:
        self.root = root
        self.active = set(active)
        self.shadowed = shadowed
        self.calls: list[str] = []

    def check(self) -> None:
        self.calls.append("check")

    def check_command(self, exec_start: str) -> None:
        self.calls.append(f"check_command {exec_start}")

    def is_active(self, unit: str) -> bool:
        return unit in self.active

    def show(self, unit: str, *props: str) -> dict[str, str]:
        if unit == inst.UNIT:
            path = (
                "/run/systemd/transient/machined.service" if self.shadowed else "/etc/systemd/system/machined.service"
            )
            return {"LoadState": "loaded", "FragmentPath": path}
        if unit == inst.ALIAS:
            return {"Id": inst.UNIT}
        masked = (self.root / MASK).is_symlink() and os.readlink(self.root / MASK) == "/dev/null"
        return {"LoadState": "masked" if masked else "loaded"}

    def daemon_reload(self) -> None:
        self.calls.append("daemon-reload")

    def reload_bus(self) -> None:
        self.calls.append("ReloadConfig")

    def start(self, unit: str) -> None:
        self.calls.append(f"start {unit}")
        self.active.add(unit)

    def stop(self, unit: str) -> None:
        self.calls.append(f"stop {unit}")
        self.active.discard(unit)

    def restart(self, unit: str) -> None:
        self.calls.append(f"restart {unit}")


def test_live_install_reloads_the_bus_before_systemd_then_switches(tmp_path: Path) -> None:
    root = debian_root(tmp_path)
    host = FakeHost(root, {inst.UPSTREAM_UNIT})
    installation(root, host).install()
    assert host.calls == [
        "check",
        f"check_command {EXEC}",
        "ReloadConfig",
        "daemon-reload",
        "stop systemd-machined.service",
        "start machined.service",
    ]
    assert json.loads((root / MANIFEST).read_text())["upstream_was_active"] is True

    # Again: nothing changed, nothing to reload, ours runs already.
    host.calls.clear()
    installation(root, host).install()
    assert host.calls == ["check", f"check_command {EXEC}"]

    # Back: files first, then the reloads, then ours stops and systemd-machined starts.
    host.calls.clear()
    installation(root, host).uninstall()
    assert host.calls == [
        "check",
        "ReloadConfig",
        "daemon-reload",
        "stop machined.service",
        "start systemd-machined.service",
    ]


def test_live_no_start_still_stops_the_service_that_cannot_run_on(tmp_path: Path) -> None:
    root = debian_root(tmp_path)
    host = FakeHost(root, {inst.UPSTREAM_UNIT})
    installation(root, host).install(start=False)
    assert host.calls[-1] == "stop systemd-machined.service"  # masked: its watchdog pings are ignored
    assert "start machined.service" not in host.calls
    host.calls.clear()
    host.active.add(inst.UNIT)  # activated by the bus meanwhile
    installation(root, host).uninstall(start=False)
    assert host.calls[-1] == "stop machined.service"  # its unit file is gone


def test_live_uninstall_starts_systemd_machined_only_if_it_ran_or_ours_runs(tmp_path: Path) -> None:
    root = debian_root(tmp_path)
    host = FakeHost(root, set())
    installation(root, host).install(start=False)
    assert json.loads((root / MANIFEST).read_text())["upstream_was_active"] is False
    host.calls.clear()
    installation(root, host).uninstall()
    assert not any(c.startswith(("start", "stop")) for c in host.calls)


def test_live_install_that_does_not_take_effect_is_undone(tmp_path: Path) -> None:
    root = debian_root(tmp_path)
    before = snapshot(root)
    host = FakeHost(root, {inst.UPSTREAM_UNIT}, shadowed=True)
    with pytest.raises(inst.InstallError, match="/run/systemd/transient/machined.service"):
        installation(root, host).install()
    assert snapshot(root) == before
    assert host.calls[-2:] == ["ReloadConfig", "daemon-reload"]  # the undo, reloaded
    assert inst.UPSTREAM_UNIT in host.active  # never stopped


# ----- ours against what systemd-container 252 ships -----------------------------------

HOST_POLICY = Path("/usr/share/dbus-1/system.d/org.freedesktop.machine1.conf")
HOST_ACTIVATION = Path("/usr/share/dbus-1/system-services/org.freedesktop.machine1.service")
HOST_POLKIT = Path("/usr/share/polkit-1/actions/org.freedesktop.machine1.policy")


def policy_rules(data: bytes) -> dict[str, list[tuple]]:
    """Policy context -> its rules in order (element, sorted attributes)."""
    rules: dict[str, list[tuple]] = {}
    for policy in ET.fromstring(data).iter("policy"):
        key = ",".join(f"{k}={v}" for k, v in sorted(policy.attrib.items()))
        rules[key] = [(r.tag, tuple(sorted(r.attrib.items()))) for r in policy]
    return rules


@pytest.mark.skipif(not HOST_POLICY.exists(), reason="systemd-container is not installed")
def test_our_bus_policy_has_upstreams_rules_in_upstreams_order() -> None:
    # Read after upstream's (/etc after /usr/share), ours decides; with the same rules it
    # is neither weaker nor stricter.
    ours = interface_file("org.freedesktop.machine1.conf").read_bytes()
    assert policy_rules(ours) == policy_rules(HOST_POLICY.read_bytes())


@pytest.mark.skipif(not HOST_ACTIVATION.exists(), reason="systemd-container is not installed")
def test_upstreams_activation_file_is_equivalent_to_ours() -> None:
    ours = inst.activation_settings(interface_file(inst.ACTIVATION_FILE).read_bytes())
    assert ours == inst.activation_settings(HOST_ACTIVATION.read_bytes())
    assert ours is not None and ours["SystemdService"] == "dbus-org.freedesktop.machine1.service"


@pytest.mark.skipif(not HOST_POLKIT.exists(), reason="systemd-container is not installed")
def test_upstreams_polkit_actions_cover_ours() -> None:
    ours = interface_file("org.freedesktop.machine1.policy").read_bytes()
    assert inst.polkit_covers(HOST_POLKIT.read_bytes(), ours)
    assert not inst.polkit_covers(ours.replace(b"auth_admin_keep", b"yes", 1), ours)
    assert len(inst.polkit_actions(ours) or {}) == 8


def test_live_uninstall_leaves_systemd_machined_masked_if_it_was(tmp_path: Path) -> None:
    root = debian_root(tmp_path)
    os.symlink("/dev/null", root / MASK)
    host = FakeHost(root, set())
    installation(root, host).install()
    host.calls.clear()
    lines: list[str] = []
    installation(root, host, lines).uninstall()
    assert os.readlink(root / MASK) == "/dev/null"
    assert host.calls[-1] == "stop machined.service"
    assert "systemd-machined.service is masked (as it was before install); not started" in lines


# ----- systemd 257 and later: machined socket-activated ---------------------------------

UPSTREAM_SOCKET_FILE = "usr/lib/systemd/system/systemd-machined.socket"
SOCKET = "etc/systemd/system/machined.socket"
SOCKET_WANTS = "etc/systemd/system/sockets.target.wants/machined.socket"
SOCKET_MASK = "etc/systemd/system/systemd-machined.socket"


def forky_root(root: Path) -> Path:
    """A tree like Debian forky (systemd 262): upstream's socket unit and 262's polkit actions."""
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/dbus-1/system.d").mkdir(parents=True)
    put(root, UPSTREAM_ACTIVATION, UPSTREAM_ACTIVATION_TEXT, mtime=1_700_000_000)
    put(root, UPSTREAM_SOCKET_FILE, "[Socket]\nListenStream=/run/systemd/machine/io.systemd.Machine\n")
    text = interface_file("262/org.freedesktop.machine1.policy").read_text().replace("<vendor>machined", "<vendor>x")
    put(root, POLKIT, text, mtime=1_700_000_000)
    return root


class FakeHost262(FakeHost):
    def show(self, unit: str, *props: str) -> dict[str, str]:
        if unit in (inst.SOCKET, inst.UPSTREAM_SOCKET):
            if unit == inst.SOCKET:
                return {"LoadState": "loaded", "FragmentPath": "/etc/systemd/system/machined.socket"}
            masked = os.path.islink(self.root / SOCKET_MASK) and os.readlink(self.root / SOCKET_MASK) == "/dev/null"
            return {"LoadState": "masked" if masked else "loaded"}
        return super().show(unit, *props)


def test_on_262_install_adds_the_socket_enabled_masks_upstreams_and_ships_262s_policies(tmp_path: Path) -> None:
    root = forky_root(tmp_path)
    before = snapshot(root)
    host = FakeHost262(root, {inst.UPSTREAM_UNIT, inst.UPSTREAM_SOCKET})
    installation(root, host).install()
    assert (root / SOCKET).read_text().endswith(inst.unit_file("machined.socket").read_text())
    assert "ListenStream=/run/systemd/machine/io.systemd.Machine" in (root / SOCKET).read_text()
    assert os.readlink(root / SOCKET_WANTS) == "/etc/systemd/system/machined.socket"
    assert os.readlink(root / SOCKET_MASK) == "/dev/null"
    assert (root / POLICY).read_bytes() == interface_file("262/org.freedesktop.machine1.conf").read_bytes()
    assert b"CreateMachine" in (root / POLICY).read_bytes()
    assert (root / POLKIT).read_text().count("<vendor>x") == 1  # upstream's 262 actions are kept (same as ours)
    # upstream's socket stopped before its service, ours started before machined
    calls = [c for c in host.calls if c.startswith(("start", "stop"))]
    assert calls == ["stop systemd-machined.socket", "stop systemd-machined.service", "start machined.socket",
                     "start machined.service"]  # fmt: skip
    host.calls.clear()
    installation(root, host).uninstall()
    calls = [c for c in host.calls if c.startswith(("start", "stop"))]
    assert calls == ["stop machined.socket", "start systemd-machined.socket", "stop machined.service",
                     "start systemd-machined.service"]  # fmt: skip
    assert snapshot(root) == before


def test_on_252_nothing_of_the_socket(tmp_path: Path) -> None:
    root = debian_root(tmp_path)
    installation(root).install()
    assert not (root / SOCKET).exists() and not (root / SOCKET_WANTS).exists() and not (root / SOCKET_MASK).exists()
    assert (root / POLICY).read_bytes() == interface_file("org.freedesktop.machine1.conf").read_bytes()

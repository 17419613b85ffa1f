"""``machined install`` / ``machined uninstall``: take over from systemd-machined, reversibly.

What ``install`` puts in place (paths inside ``--root``, default ``/``):

* ``/etc/systemd/system/machined.service``: the shipped unit, ExecStart= pointing at
  this installation (:func:`default_exec_start`);
* ``/etc/systemd/system/dbus-org.freedesktop.machine1.service`` -> that unit: the alias
  ``systemctl enable`` creates from ``[Install] Alias=``; dbus-daemon activates the name
  through it (the alias in /etc hides upstream's in /lib/systemd/system);
* ``/etc/systemd/system/systemd-machined.service`` -> ``/dev/null``, as ``systemctl mask``;
* where systemd is 257 or later (upstream's machined is socket-activated: its
  ``systemd-machined.socket`` is there): ``/etc/systemd/system/machined.socket``, enabled
  (``sockets.target.wants/machined.socket``, as ``systemctl enable``), and
  ``systemd-machined.socket`` masked; the bus policy and polkit actions are then 262's
  (``dbus-interfaces/262/``);
* where upstream ships a per-user machined (``systemd-machined --user``, systemd 262: its user
  units in /usr/lib/systemd/user): ours for every user in ``/etc/systemd/user``, as
  ``systemctl --global enable`` and ``mask`` would leave them: ``machined.service`` (the
  system unit's command plus ``--user``) with its alias ``dbus-org.freedesktop.machine1.service``
  (the session bus activates the name through it), ``machined.socket`` enabled
  (``sockets.target.wants``), upstream's ``systemd-machined.service`` and ``.socket`` masked.
  Users' service managers that run already keep what they have (their sockets are bound);
  each one started afterwards (the user's next login) starts ours;
* ``/etc/dbus-1/system.d/org.freedesktop.machine1.conf``: our bus policy. dbus-daemon
  reads /usr/share/dbus-1/system.d first and /etc/dbus-1/system.d after it (the
  administrator's layer); the last matching rule wins and ours opens with a ``deny`` for
  the destination, so ours decides, whether or not upstream's file is there;
* the bus activation file and the polkit actions only where what is there does not
  already do what ours does: dbus-daemon takes the first
  ``org.freedesktop.machine1.service`` of its standard system service directories,
  polkitd reads only /usr/share/polkit-1/actions. With systemd-container installed both
  are upstream's and equivalent, so nothing is written there.

Everything changed is recorded in ``/var/lib/machined/install-manifest.json``, with a
byte-for-byte backup (mode, owner, times) of whatever was overwritten; ``uninstall``
puts back exactly that. On a live system (no ``--root``) the switch is live: systemd
and dbus-daemon reload, systemd-machined stops, machined starts and adopts the machines
from the state files in /run/systemd/machines (upstream's format), and back.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from machined import __version__
from machined.data import interface_file, interface_file_for, unit_file

UNIT_DIR = "/etc/systemd/system"
UNIT = "machined.service"
ALIAS = "dbus-org.freedesktop.machine1.service"
UPSTREAM_UNIT = "systemd-machined.service"
SOCKET = "machined.socket"
SOCKET_WANTS = f"{UNIT_DIR}/sockets.target.wants/{SOCKET}"
UPSTREAM_SOCKET = "systemd-machined.socket"
# Where upstream's socket unit is when systemd is 257 or later (machined socket-activated).
UPSTREAM_SOCKET_PATHS = (f"/usr/lib/systemd/system/{UPSTREAM_SOCKET}", f"/lib/systemd/system/{UPSTREAM_SOCKET}")
USER_UNIT_DIR = "/etc/systemd/user"
USER_SOCKET_WANTS = f"{USER_UNIT_DIR}/sockets.target.wants/{SOCKET}"
# Where upstream's per-user units are when it has a per-user machined (systemd 262).
UPSTREAM_USER_UNIT_DIRS = ("/usr/lib/systemd/user", "/lib/systemd/user")
BUS_POLICY = "/etc/dbus-1/system.d/org.freedesktop.machine1.conf"
ACTIVATION_FILE = "org.freedesktop.machine1.service"
# dbus-daemon's <standard_system_servicedirs/>, first one wins (dbus-daemon(1)).
ACTIVATION_DIRS = (
    "/usr/local/share/dbus-1/system-services",
    "/usr/share/dbus-1/system-services",
    "/lib/dbus-1/system-services",
)
# Where a changed file means dbus-daemon must reload.
BUS_DIRS = ("/etc/dbus-1/", *(f"{d}/" for d in ACTIVATION_DIRS))
POLKIT_POLICY = "/usr/share/polkit-1/actions/org.freedesktop.machine1.policy"
STATE_DIR = "/var/lib/machined"
MANIFEST = f"{STATE_DIR}/install-manifest.json"
BACKUP_DIR = f"{STATE_DIR}/install-backup"
SAVED_DIR = f"{STATE_DIR}/uninstall-saved"  # files changed after install, kept by uninstall
MANIFEST_VERSION = 1

# Characters ExecStart= would treat specially (quoting, specifiers, variables).
_UNSAFE_IN_EXEC = re.compile(r"[\s\"'\\%$;]")


class InstallError(Exception):
    """Installing or uninstalling cannot go on; the message says why and what to do."""


# ----- what ours is --------------------------------------------------------------------


def default_exec_start() -> str:
    """The command the installed unit runs: this installation's ``machined``.

    The console script that is running (``sys.argv[0]``, e.g. /usr/local/bin/machined or
    a virtualenv's bin/machined): its shebang pins the interpreter that has machined and
    its dependencies, and the process is called ``machined`` in ps, busctl status and the
    journal. Started some other way (``python -m machined install``): this interpreter,
    not resolved through symlinks, since a virtualenv's python finds its packages only
    through its own path.
    """
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "machined":
        script = os.path.abspath(argv0)
        if os.path.isfile(script) and os.access(script, os.X_OK):
            return _plain(script)
    if not sys.executable:
        raise InstallError("cannot tell which Python runs machined (sys.executable is empty)")
    return f"{_plain(os.path.abspath(sys.executable))} -m machined"


def _plain(path: str) -> str:
    """*path*, if ExecStart= takes it literally (no blanks, quotes, specifiers, variables)."""
    if _UNSAFE_IN_EXEC.search(path):
        raise InstallError(
            f"cannot put {path!r} into ExecStart= (blanks, quotes, '%' or '$' in it); "
            "install machined somewhere with a plain path"
        )
    return path


def check_exec_start(exec_start: str) -> None:
    """*exec_start*: an absolute program path and plain arguments, separated by single spaces."""
    for word in exec_start.split(" "):
        if not word:
            raise InstallError(f"cannot put {exec_start!r} into ExecStart= (empty word)")
        _plain(word)
    if not exec_start.startswith("/"):
        raise InstallError(f"ExecStart= needs an absolute path, not {exec_start!r}")


def _installed_service(shipped: str, command: str) -> str:
    """The shipped service *shipped* as installed: its ExecStart= running *command*."""
    text = unit_file(shipped).read_text(encoding="utf-8")
    text, n = re.subn(r"(?m)^ExecStart=.*$", lambda _: f"ExecStart={command}", text)
    if n != 1:
        raise InstallError(f"the shipped {shipped} has no single ExecStart= line (broken installation?)")
    return f"# Installed by 'machined install' (machined {__version__}); 'machined uninstall' removes it.\n" + text


def unit_text(exec_start: str) -> str:
    """Our unit as installed: the shipped one with ExecStart= pointed at *exec_start*."""
    return _installed_service("machined.service", exec_start)


def user_unit_text(exec_start: str) -> str:
    """Our per-user unit as installed: the shipped one running *exec_start* with ``--user``."""
    return _installed_service("machined-user.service", f"{exec_start} --user")


def user_socket_text() -> str:
    """Our per-user socket unit as installed."""
    text = unit_file("machined-user.socket").read_text(encoding="utf-8")
    return f"# Installed by 'machined install' (machined {__version__}); 'machined uninstall' removes it.\n" + text


def socket_text() -> str:
    """Our socket unit as installed (systemd 257 and later)."""
    text = unit_file(SOCKET).read_text(encoding="utf-8")
    return f"# Installed by 'machined install' (machined {__version__}); 'machined uninstall' removes it.\n" + text


def activation_settings(data: bytes) -> dict[str, str] | None:
    """The ``[D-BUS Service]`` keys of an activation file (None: unreadable)."""
    parser = configparser.ConfigParser(interpolation=None, strict=False, comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(data.decode("utf-8"))
        return dict(parser["D-BUS Service"])
    except (configparser.Error, KeyError, UnicodeDecodeError):
        return None


_Pairs = tuple[tuple[str, str], ...]


def polkit_actions(data: bytes) -> dict[str, tuple[_Pairs, _Pairs]] | None:
    """Action id -> (defaults, annotations) of a polkit policy (None: unreadable)."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError:
        return None
    actions: dict[str, tuple[_Pairs, _Pairs]] = {}
    for action in root.iter("action"):
        defaults = action.find("defaults")
        values = tuple(sorted((d.tag, (d.text or "").strip()) for d in (defaults if defaults is not None else [])))
        notes = tuple(sorted((a.get("key", ""), (a.text or "").strip()) for a in action.iter("annotate")))
        actions[action.get("id", "")] = (values, notes)
    return actions


def polkit_covers(existing: bytes, ours: bytes) -> bool:
    """Whether *existing* defines every action of *ours* with the same defaults and implications."""
    have, want = polkit_actions(existing), polkit_actions(ours)
    if have is None or want is None:
        return False
    return all(have.get(action_id) == spec for action_id, spec in want.items())


# ----- file states ---------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Desired:
    """What one path should be after install: a file with *content* or a symlink to *target*."""

    path: str  # as on the target system, e.g. /etc/systemd/system/machined.service
    role: str
    content: bytes | None = None
    target: str | None = None
    mode: int = 0o644

    def state(self) -> dict[str, Any]:
        if self.target is not None:
            return {"type": "symlink", "target": self.target}
        assert self.content is not None
        return {"type": "file", "sha256": _sha256(self.content), "mode": f"{self.mode:04o}"}


def _state_of(p: Path) -> dict[str, Any]:
    """What is at *p* now: absent, a symlink (its target) or a regular file (hash and metadata)."""
    try:
        st = p.lstat()
    except FileNotFoundError:
        return {"type": "absent"}
    if os.path.islink(p):
        return {"type": "symlink", "target": os.readlink(p)}
    if not p.is_file():
        raise InstallError(f"{p} is neither a file nor a symlink; refusing to touch it")
    return {
        "type": "file",
        "sha256": _sha256(p.read_bytes()),
        "mode": f"{st.st_mode & 0o7777:04o}",
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mtime_ns": st.st_mtime_ns,
        "atime_ns": st.st_atime_ns,
    }


def _same(current: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether *current* is *wanted* as far as install cares (type, content or target, mode)."""
    if current["type"] != wanted["type"]:
        return False
    if wanted["type"] == "symlink":
        return bool(current["target"] == wanted["target"])
    if wanted["type"] == "file":
        return bool(current["sha256"] == wanted["sha256"] and current["mode"] == wanted["mode"])
    return True


def _as_it_was(current: dict[str, Any], before: dict[str, Any]) -> bool:
    """Whether *current* is exactly the recorded *before* (content, mode, owner, mtime)."""
    if not _same(current, before):
        return False
    if before["type"] != "file":
        return True
    return all(current[k] == before[k] for k in ("uid", "gid", "mtime_ns"))


def _replace_atomically(p: Path, make: Callable[[Path], None]) -> None:
    """Build the new entry next to *p* with *make(tmp)*, then rename it over *p*."""
    tmp = p.with_name(f".#{p.name}.machined-{os.getpid()}")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    try:
        make(tmp)
        os.replace(tmp, p)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(p.parent)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(tmp: Path, data: bytes, mode: int) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)


def _restore_metadata(p: Path, state: dict[str, Any]) -> None:
    try:
        os.chown(p, state["uid"], state["gid"])  # before chmod: chown clears set-id bits
    except PermissionError:
        if os.geteuid() == 0:
            raise  # pragma: no cover
    os.chmod(p, int(state["mode"], 8))
    os.utime(p, ns=(state["atime_ns"], state["mtime_ns"]))


# ----- the live system -----------------------------------------------------------------


class SystemdHost:
    """systemctl and the bus of the running system (not used with ``--root``)."""

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        try:
            r = subprocess.run(list(args), check=False, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise InstallError(f"'{' '.join(args)}' failed: {e}") from e
        if check and r.returncode != 0:
            raise InstallError(f"'{' '.join(args)}' failed: {(r.stderr or r.stdout).strip()}")
        return r

    def check(self) -> None:
        if os.geteuid() != 0:
            raise InstallError("must run as root (or with --root DIR to only place the files)")
        if not os.path.isdir("/run/systemd/system"):
            raise InstallError("systemd is not running as init here; use --root DIR to only place the files")

    def is_active(self, unit: str) -> bool:
        state = self._run("systemctl", "is-active", unit, check=False).stdout.strip()
        return state in ("active", "activating", "reloading")

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self._run("systemctl", "show", *(f"--property={p}" for p in props), "--", unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def daemon_reload(self) -> None:
        self._run("systemctl", "daemon-reload")

    def reload_bus(self) -> None:
        # The bus's own method (dbus-daemon and dbus-broker alike), whatever its unit is called.
        self._run(
            "busctl", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "ReloadConfig"
        )

    def start(self, unit: str) -> None:
        self._run("systemctl", "start", unit)

    def restart(self, unit: str) -> None:
        self._run("systemctl", "restart", unit)

    def stop(self, unit: str) -> None:
        self._run("systemctl", "stop", unit)

    def check_command(self, exec_start: str) -> None:
        r = self._run(*shlex.split(exec_start), "--version", check=False)
        if r.returncode != 0 or not r.stdout.startswith("machined"):
            raise InstallError(
                f"'{exec_start} --version' does not run machined ({(r.stderr or r.stdout).strip()!r}); "
                "the unit would not start"
            )


# ----- install / uninstall -------------------------------------------------------------


class Installation:
    """Install or uninstall into *root*; *host* drives systemd and the bus (None: files only)."""

    def __init__(
        self,
        root: str | os.PathLike[str] = "/",
        host: SystemdHost | None = None,
        *,
        exec_start: str | None = None,
        out: Callable[[str], None] = print,
    ) -> None:
        self.root = Path(root)
        self.host = host
        self.exec_start = exec_start
        self.out = out

    # paths

    def p(self, path: str) -> Path:
        """*path* (absolute, as on the target system) under the root."""
        return self.root / path.lstrip("/")

    @property
    def manifest_path(self) -> Path:
        return self.p(MANIFEST)

    def load_manifest(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise InstallError(f"{self.manifest_path} is unreadable ({e}); fix or remove it by hand") from e
        if data.get("version") != MANIFEST_VERSION:
            raise InstallError(f"{self.manifest_path} has an unknown format version {data.get('version')!r}")
        manifest: dict[str, Any] = data
        return manifest

    def save_manifest(self, manifest: dict[str, Any]) -> None:
        data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        _replace_atomically(self.manifest_path, lambda tmp: _write_file(tmp, data, 0o600))

    def _mkdirs(self, path: str, manifest: dict[str, Any], mode: int = 0o755) -> None:
        """Create *path* and its missing parents (recorded, so that uninstall removes them)."""
        missing = []
        d = Path(path)
        while not self.p(str(d)).exists():
            missing.append(str(d))
            d = d.parent
        for created in reversed(missing):
            self.p(created).mkdir(mode=mode if created == path else 0o755)
            manifest["created_dirs"].append(created)

    # what there was before install

    def original(self, path: str, manifest: dict[str, Any] | None) -> bytes | None:
        """The content *path* had before machined was installed (None: no such file)."""
        entry = _entry(manifest, path)
        if entry is None:
            p = self.p(path)
            return p.read_bytes() if p.is_file() else None
        before = entry["before"]
        if before["type"] == "file":
            return self.p(f"{BACKUP_DIR}/{before['backup']}").read_bytes()
        if before["type"] == "symlink":
            p = self.p(path)  # not ours: resolve it as it was
            target = before["target"]
            resolved = self.p(target) if target.startswith("/") else p.parent / target
            return resolved.read_bytes() if resolved.is_file() else None
        return None

    def socket_activated(self) -> bool:
        """Whether systemd here is 257 or later, where machined is socket-activated (upstream's
        systemd-machined.socket is installed)."""
        return any(self.p(path).is_file() for path in UPSTREAM_SOCKET_PATHS)

    def per_user(self) -> bool:
        """Whether upstream has a per-user machined here (its user units; systemd 262)."""
        return any(
            self.p(f"{d}/{unit}").is_file()
            for d in UPSTREAM_USER_UNIT_DIRS
            for unit in (UPSTREAM_UNIT, UPSTREAM_SOCKET)
        )

    def plan(self, manifest: dict[str, Any] | None) -> tuple[list[Desired], list[str]]:
        """What install puts in place, and notes on what it leaves as it is."""
        exec_start = self.exec_start or default_exec_start()
        check_exec_start(exec_start)
        systemd = "262" if self.socket_activated() else "252"
        ours_policy = interface_file_for(systemd, "org.freedesktop.machine1.conf").read_bytes()
        ours_activation = interface_file(ACTIVATION_FILE).read_bytes()
        ours_polkit = interface_file_for(systemd, "org.freedesktop.machine1.policy").read_bytes()
        desired = [
            Desired(f"{UNIT_DIR}/{UNIT}", "unit", content=unit_text(exec_start).encode()),
            Desired(f"{UNIT_DIR}/{ALIAS}", "the alias systemctl enable makes", target=f"{UNIT_DIR}/{UNIT}"),
            Desired(f"{UNIT_DIR}/{UPSTREAM_UNIT}", "masked, as systemctl mask does", target="/dev/null"),
            Desired(BUS_POLICY, "bus policy", content=ours_policy),
        ]
        if systemd != "252":
            desired += [
                Desired(f"{UNIT_DIR}/{SOCKET}", "socket unit", content=socket_text().encode()),
                Desired(SOCKET_WANTS, "the link systemctl enable makes", target=f"{UNIT_DIR}/{SOCKET}"),
                Desired(f"{UNIT_DIR}/{UPSTREAM_SOCKET}", "masked, as systemctl mask does", target="/dev/null"),
            ]
        if self.per_user():
            desired += [
                Desired(f"{USER_UNIT_DIR}/{UNIT}", "per-user unit", content=user_unit_text(exec_start).encode()),
                Desired(
                    f"{USER_UNIT_DIR}/{ALIAS}", "the alias systemctl enable makes", target=f"{USER_UNIT_DIR}/{UNIT}"
                ),
                Desired(f"{USER_UNIT_DIR}/{UPSTREAM_UNIT}", "masked, as systemctl mask does", target="/dev/null"),
                Desired(f"{USER_UNIT_DIR}/{SOCKET}", "per-user socket unit", content=user_socket_text().encode()),
                Desired(USER_SOCKET_WANTS, "the link systemctl enable makes", target=f"{USER_UNIT_DIR}/{SOCKET}"),
                Desired(f"{USER_UNIT_DIR}/{UPSTREAM_SOCKET}", "masked, as systemctl mask does", target="/dev/null"),
            ]
        notes = []

        # Bus activation: the first file of the search path is the one that counts.
        effective = None
        for d in ACTIVATION_DIRS:
            data = self.original(f"{d}/{ACTIVATION_FILE}", manifest)
            if data is not None:
                effective = (f"{d}/{ACTIVATION_FILE}", data)
                break
        if effective and activation_settings(effective[1]) == activation_settings(ours_activation):
            notes.append(f"kept {effective[0]} (activates the name as ours does)")
        else:
            desired.append(
                Desired(f"{ACTIVATION_DIRS[0]}/{ACTIVATION_FILE}", "bus activation", content=ours_activation)
            )

        existing_polkit = self.original(POLKIT_POLICY, manifest)
        if existing_polkit is not None and polkit_covers(existing_polkit, ours_polkit):
            notes.append(f"kept {POLKIT_POLICY} (same actions and defaults as ours)")
        else:
            desired.append(Desired(POLKIT_POLICY, "polkit actions", content=ours_polkit))
        return desired, notes

    # install

    def install(self, *, start: bool = True) -> None:
        host = self.host
        if host is not None:
            host.check()
        manifest = self.load_manifest()
        first = manifest is None
        desired, notes = self.plan(manifest)
        if host is not None:
            host.check_command(self.exec_start or default_exec_start())
        if manifest is None:
            manifest = {
                "version": MANIFEST_VERSION,
                "installed_by": f"machined {__version__}",
                "root": str(self.root),
                "created_dirs": [],
                "entries": [],
                "upstream_was_active": host.is_active(UPSTREAM_UNIT) if host is not None else False,
            }
        if self.socket_activated() and "upstream_socket_was_active" not in manifest:
            manifest["upstream_socket_was_active"] = host.is_active(UPSTREAM_SOCKET) if host is not None else False
            self._mkdirs(STATE_DIR, manifest)
        manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._mkdirs(BACKUP_DIR, manifest, mode=0o700)
        if not first:
            self.out("machined is installed already; bringing the installation up to date")

        # Entries a newer plan no longer wants (e.g. upstream's file now does the job): undo them.
        changed: list[str] = []
        wanted_paths = {d.path for d in desired}
        for entry in [e for e in manifest["entries"] if e["path"] not in wanted_paths]:
            if self._revert(entry):
                changed.append(entry["path"])
            manifest["entries"].remove(entry)

        try:
            # Record (and back up) everything first, so that an interrupted install can be undone.
            for d in desired:
                if _entry(manifest, d.path) is None:
                    manifest["entries"].append(self._record(d, manifest))
            self.save_manifest(manifest)
            for d in desired:
                entry = _entry(manifest, d.path)
                assert entry is not None
                if self._apply(d, manifest):
                    changed.append(d.path)
                entry["installed"] = d.state()
            manifest["kept"] = notes
            self.save_manifest(manifest)
        except (OSError, InstallError):
            if first:
                self.out("install failed; undoing what it did")
                self._undo_files(manifest)
                self._forget(manifest)
            else:
                self.out(f"install failed halfway; {MANIFEST} says what is changed ('machined uninstall' undoes it)")
            raise
        for note in notes:
            self.out(note)

        if host is None:
            return
        if any(path.startswith(f"{USER_UNIT_DIR}/") for path in changed):
            self.out(
                "users' service managers running now keep systemd-machined --user until they restart "
                "(the user's next login); each one started from now on starts machined --user"
            )
        self._reload(host, changed)
        problems = self._verify(host)
        if problems:
            self.out("the installation does not take effect; undoing it")
            self._reload(host, self._undo_files(manifest))
            self._forget(manifest)
            raise InstallError("; ".join(problems))
        # Masked, systemd-machined cannot run on: systemd ignores its watchdog pings from the
        # reload on and would kill it (SIGABRT) when WatchdogSec= runs out. Stop it now,
        # --no-start or not; its machines stay in /run/systemd/machines for machined.
        # Its socket first (it would start it again), which frees the path for ours.
        socket = self.socket_activated()
        if socket and host.is_active(UPSTREAM_SOCKET):
            host.stop(UPSTREAM_SOCKET)
            self.out(f"stopped {UPSTREAM_SOCKET}")
        if host.is_active(UPSTREAM_UNIT):
            host.stop(UPSTREAM_UNIT)
            self.out(f"stopped {UPSTREAM_UNIT}")
        if socket and not host.is_active(SOCKET):
            host.start(SOCKET)  # (--no-start too: varlink clients start machined through it, as the bus does)
            self.out(f"started {SOCKET}")
        if not start:
            self.out(f"{UNIT} not started (--no-start): the bus starts it at the first request")
        elif not host.is_active(UNIT):
            host.start(UNIT)
            self.out(f"started {UNIT}")
        elif f"{UNIT_DIR}/{UNIT}" in changed:
            host.restart(UNIT)
            self.out(f"restarted {UNIT} (its unit changed)")
        else:
            self.out(f"{UNIT} is running")

    def _reload(self, host: SystemdHost, changed: list[str]) -> None:
        """Make dbus-daemon, then systemd, read the files in *changed* again.

        The bus goes first. During a reload dbus-daemon looks up group memberships, which
        nss-systemd asks every userdb service about, systemd-machined's io.systemd.Machine
        included; and after a daemon-reload systemd-machined 252 re-checks its machines
        with blocking calls on the bus. In the other order the two wait for each other
        until sd-bus's 25 s timeout (seen in the sandbox with machines registered).
        """
        if any(path.startswith(BUS_DIRS) for path in changed):
            host.reload_bus()
        if any(path.startswith(f"{UNIT_DIR}/") for path in changed):
            host.daemon_reload()

    def _record(self, d: Desired, manifest: dict[str, Any]) -> dict[str, Any]:
        p = self.p(d.path)
        self._mkdirs(str(Path(d.path).parent), manifest)
        before = _state_of(p)
        if before["type"] == "file":
            name = f"{len(manifest['entries'])}-{p.name}"
            backup = self.p(f"{BACKUP_DIR}/{name}")
            shutil.copy2(p, backup, follow_symlinks=False)
            if _sha256(backup.read_bytes()) != before["sha256"]:
                raise InstallError(f"backing up {p} failed (the copy differs)")
            before["backup"] = name
        return {"path": d.path, "role": d.role, "before": before, "installed": None}

    def _apply(self, d: Desired, manifest: dict[str, Any]) -> bool:
        p = self.p(d.path)
        current = _state_of(p)
        wanted = d.state()
        if _same(current, wanted):
            self.out(f"unchanged {d.path}")
            return False
        if d.target is not None:
            _replace_atomically(p, lambda tmp: os.symlink(d.target, tmp))  # type: ignore[arg-type]
        else:
            assert d.content is not None
            _replace_atomically(p, lambda tmp: _write_file(tmp, d.content, d.mode))  # type: ignore[arg-type]
        entry = _entry(manifest, d.path)
        if current["type"] == "absent":
            verb = "created"
        elif entry is not None and entry["installed"] is not None and _same(current, entry["installed"]):
            verb = "updated"  # an earlier install's version
        else:
            verb = "replaced"
        self.out(f"{verb} {d.path}" + (f" -> {d.target}" if d.target else "") + f" ({d.role})")
        return True

    def _verify(self, host: SystemdHost) -> list[str]:
        """After the reloads: systemd resolves the names to ours, as installed.

        Only a few places outrank /etc/systemd/system (systemd-analyze unit-paths):
        *.control (set-property), /run/systemd/transient (systemd-run --unit=) and
        /run/systemd/generator.early; a unit there under one of our names wins.
        """
        problems = []
        ours = host.show(UNIT, "LoadState", "FragmentPath")
        if ours.get("LoadState") != "loaded" or ours.get("FragmentPath") != f"{UNIT_DIR}/{UNIT}":
            problems.append(
                f"systemd loads {UNIT} from {ours.get('FragmentPath') or '?'} ({ours.get('LoadState')}), "
                f"not from {UNIT_DIR}/{UNIT}: that one outranks ours; remove it and try again"
            )
        alias = host.show(ALIAS, "Id").get("Id")
        if alias != UNIT:
            problems.append(f"{ALIAS} is {alias}, not {UNIT}: a unit of that name outranks the alias")
        upstream = host.show(UPSTREAM_UNIT, "LoadState").get("LoadState")
        if upstream != "masked":
            problems.append(f"{UPSTREAM_UNIT} is {upstream}, not masked: a unit of that name outranks the mask")
        if self.socket_activated():
            sock = host.show(SOCKET, "LoadState", "FragmentPath")
            if sock.get("LoadState") != "loaded" or sock.get("FragmentPath") != f"{UNIT_DIR}/{SOCKET}":
                problems.append(
                    f"systemd loads {SOCKET} from {sock.get('FragmentPath') or '?'} ({sock.get('LoadState')}), "
                    f"not from {UNIT_DIR}/{SOCKET}: that one outranks ours; remove it and try again"
                )
            upstream = host.show(UPSTREAM_SOCKET, "LoadState").get("LoadState")
            if upstream != "masked":
                problems.append(f"{UPSTREAM_SOCKET} is {upstream}, not masked: a unit of that name outranks the mask")
        return problems

    # uninstall

    def uninstall(self, *, start: bool = True) -> bool:
        """Undo the installation; False if machined was not installed (nothing done)."""
        if self.host is not None:
            self.host.check()
        manifest = self.load_manifest()
        if manifest is None:
            self.out(f"machined is not installed here (no {self.manifest_path}); nothing to do")
            return False
        self._uninstall(manifest, start=start)
        return True

    def _uninstall(self, manifest: dict[str, Any], *, start: bool) -> None:
        host = self.host
        ours_active = host.is_active(UNIT) if host is not None else False
        socket = "upstream_socket_was_active" in manifest
        socket_active = host.is_active(SOCKET) if host is not None and socket else False
        reverted = self._undo_files(manifest)
        if host is not None:
            if any(path.startswith(f"{USER_UNIT_DIR}/") for path in reverted):
                self.out(
                    "users' service managers running now keep machined --user until they restart "
                    "(the user's next login); each one started from now on starts systemd-machined --user"
                )
            # Reload before stopping ours: from here on, activation starts systemd-machined.
            self._reload(host, reverted)
            if socket_active:
                host.stop(SOCKET)  # (first: it would start ours again)
                self.out(f"stopped {SOCKET}")
            if socket and (manifest.get("upstream_socket_was_active") or socket_active):
                if host.show(UPSTREAM_SOCKET, "LoadState").get("LoadState") == "masked":
                    self.out(f"{UPSTREAM_SOCKET} is masked (as it was before install); not started")
                else:
                    host.start(UPSTREAM_SOCKET)
                    self.out(f"started {UPSTREAM_SOCKET}")
            if ours_active:
                # Its unit file is gone: it cannot run on (see install), --no-start or not.
                host.stop(UNIT)
                self.out(f"stopped {UNIT}")
            if not start:
                self.out(f"{UPSTREAM_UNIT} not started (--no-start): the bus starts it at the first request")
            elif manifest.get("upstream_was_active") or ours_active:
                if host.show(UPSTREAM_UNIT, "LoadState").get("LoadState") == "masked":
                    self.out(f"{UPSTREAM_UNIT} is masked (as it was before install); not started")
                else:
                    host.start(UPSTREAM_UNIT)
                    self.out(f"started {UPSTREAM_UNIT}")
        self._forget(manifest)
        self.out("machined is uninstalled")

    def _undo_files(self, manifest: dict[str, Any]) -> list[str]:
        """Put back every entry as it was before install; the paths that changed."""
        return [e["path"] for e in reversed(manifest["entries"]) if self._revert(e)]

    def _forget(self, manifest: dict[str, Any]) -> None:
        """Remove the backups, the manifest and the directories install created."""
        shutil.rmtree(self.p(BACKUP_DIR), ignore_errors=True)
        self.manifest_path.unlink(missing_ok=True)
        for d in reversed(manifest["created_dirs"]):
            try:
                self.p(d).rmdir()
            except OSError:
                pass  # not empty (e.g. files saved by uninstall) or gone already

    def _revert(self, entry: dict[str, Any]) -> bool:
        """Put *entry*'s path back as it was before install; whether anything changed."""
        path, before = entry["path"], entry["before"]
        p = self.p(path)
        current = _state_of(p)
        if _as_it_was(current, before):
            return False  # already as it was (or install never got to it)
        installed = entry.get("installed")
        if installed is not None and not _same(current, installed) and current["type"] == "file":
            # Changed by somebody after install: keep that version, then put back the original.
            saved = self.p(f"{SAVED_DIR}{path}")
            saved.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, saved)
            self.out(f"{path} was changed after install; that version is saved as {saved}")
        if before["type"] == "absent":
            p.unlink(missing_ok=True)
            self.out(f"removed {path}")
        elif before["type"] == "symlink":
            _replace_atomically(p, lambda tmp: os.symlink(before["target"], tmp))
            self.out(f"restored {path} -> {before['target']}")
        else:
            backup = self.p(f"{BACKUP_DIR}/{before['backup']}")
            data = backup.read_bytes()
            if _sha256(data) != before["sha256"]:
                raise InstallError(f"the backup {backup} of {path} is damaged; restore {path} by hand")

            def make(tmp: Path) -> None:
                _write_file(tmp, data, int(before["mode"], 8))
                _restore_metadata(tmp, before)

            _replace_atomically(p, make)
            self.out(f"restored {path}")
        return True


def _entry(manifest: dict[str, Any] | None, path: str) -> dict[str, Any] | None:
    if manifest is None:
        return None
    return next((e for e in manifest["entries"] if e["path"] == path), None)


# ----- command line --------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """``machined install|uninstall [--root DIR] [--no-start]`` (*argv* starts with the subcommand)."""
    command, rest = argv[0], argv[1:]
    parser = argparse.ArgumentParser(
        prog=f"machined {command}",
        description=(
            "Put machined in place of systemd-machined: unit, bus alias, bus policy (and the "
            "activation file and polkit actions if the ones there differ), systemd-machined "
            "masked, then switch over live; where systemd has a per-user machined, the same for "
            "users (ours in /etc/systemd/user, taking effect as their service managers start)."
            if command == "install"
            else "Undo 'machined install' exactly: restore every file it replaced, remove what it "
            "created, unmask systemd-machined and switch back live."
        ),
    )
    parser.add_argument(
        "--root",
        metavar="DIR",
        help="operate on the file system tree at DIR instead of the running system (files only: no systemctl, no bus)",
    )
    parser.add_argument(
        "--no-start",
        action="store_true",
        help="change the files and reload, but leave the running services alone",
    )
    args = parser.parse_args(rest)
    inst = Installation(args.root or "/", None if args.root else SystemdHost())
    try:
        if command == "install":
            inst.install(start=not args.no_start)
        else:
            inst.uninstall(start=not args.no_start)
    except InstallError as e:
        print(f"machined {command}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"machined {command}: {e}", file=sys.stderr)
        return 1
    return 0

"""Boot a real systemd as PID 1 of fresh namespaces, with its own system bus.

A :class:`Sandbox` shares the host's file systems but sees them read-only, with
private tmpfs mounts on /run, /tmp, /var/tmp, /var/lib/machines,
/var/log/journal, /var/lib/systemd and /dev/shm, a private cgroup subtree, and
every unit that could write host state masked. With ``impl="ours"`` our daemon
is installed as the provider of org.freedesktop.machine1 (real
systemd-machined masked, our unit, bus policy, activation file and polkit
policy bind-mounted in place); with ``impl="real"`` systemd-machined stays.

With ``systemd="262"`` the sandbox boots systemd 262 from a cached Debian forky root
instead of the host's systemd (:mod:`machined.sandbox.root` builds it,
:mod:`machined.sandbox.forky` says what it mounts and installs).

Host-side bookkeeping lives in ``/run/machined-sandbox/<id>/`` so that the
command-line tool can find, enter and stop sandboxes started earlier.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from machined import cgroup as _cg
from machined.data import file_path, interface_file, unit_file

if TYPE_CHECKING:
    from machined.sandbox.root import Root

STATE_ROOT = Path("/run/machined-sandbox")
CGROUP_PREFIX = "machined-sandbox-"
EXEC_CGROUP = "sandbox-exec"
TARGET = "machined-sandbox.target"
FIRST_PID = 20000  # PIDs in a sandbox start here (its own pid namespace; below the default pid_max)
PROJECT_ROOT = Path(__file__).resolve().parents[2]

# Units that would write to the host's file systems or devices (sandbox.md).
MASKED_UNITS = (
    "systemd-tmpfiles-setup.service",
    "systemd-tmpfiles-setup-dev.service",
    "systemd-tmpfiles-clean.service",
    "systemd-tmpfiles-clean.timer",
    "systemd-sysusers.service",
    "systemd-sysctl.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount",
    "systemd-modules-load.service",
    "systemd-remount-fs.service",
    "systemd-journal-flush.service",
    "systemd-update-utmp.service",
    "systemd-update-utmp-runlevel.service",
    "systemd-random-seed.service",
    "systemd-machine-id-commit.service",
    "systemd-hwdb-update.service",
    "ldconfig.service",
    "systemd-firstboot.service",
    "systemd-repart.service",
    "systemd-pcrphase.service",
    "systemd-pcrphase-sysinit.service",
    "systemd-pcrphase-initrd.service",
    "systemd-timesyncd.service",
    "kmod-static-nodes.service",
    "kmod.service",
    "systemd-udevd.service",
    "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service",
    "systemd-udev-settle.service",
    "systemd-boot-update.service",
    "systemd-boot-system-token.service",
    "systemd-journald-audit.socket",
    "systemd-networkd.service",
    "systemd-resolved.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "man-db.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "logrotate.timer",
    "dpkg-db-backup.timer",
    "cron.service",
    "ssh.service",
    "getty.target",
    "console-getty.service",
    "modprobe@.service",
)

POLICY_FILES = {
    "org.freedesktop.machine1.conf": "/usr/share/dbus-1/system.d/org.freedesktop.machine1.conf",
    "org.freedesktop.machine1.service": ("/usr/share/dbus-1/system-services/org.freedesktop.machine1.service"),
    "org.freedesktop.machine1.policy": "/usr/share/polkit-1/actions/org.freedesktop.machine1.policy",
}


SYSTEMD_VERSIONS = ("252", "262")  # the host's systemd; the cached Debian forky root's (machined.sandbox.root)


class SandboxError(Exception):
    """A sandbox could not be started, entered or stopped; the message says why."""


@dataclass
class SandboxInfo:
    """What the host keeps about a running sandbox (``info.json``)."""

    id: str
    impl: str
    init_pid: int = 0
    init_start_time: int = 0
    cgroups: list[str] = field(default_factory=list)
    created: float = 0.0
    cgroup: str = "hybrid"  # the layout its systemd sees at /sys/fs/cgroup
    systemd: str = "252"  # 252: the host's systemd; 262: the cached forky root's
    oci: bool = False  # podman and docker set up inside (machined.sandbox.oci)

    @property
    def state_dir(self) -> Path:
        return STATE_ROOT / self.id


def _proc_start_time(pid: int) -> int:
    """Start time of *pid* in clock ticks since boot (0 if it does not exist)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            data = f.read()
    except OSError:
        return 0
    return int(data.rsplit(")", 1)[1].split()[19])


def _alive(pid: int, start_time: int) -> bool:
    return pid > 0 and _proc_start_time(pid) == start_time


LAYOUTS = ("hybrid", "unified")
CGROUP_ENV = "MACHINED_SANDBOX_CGROUP"  # the default layout of new sandboxes


def cgroup_layout() -> str:
    """The host's layout, decided as systemd does (file system types at /sys/fs/cgroup):
    ``hybrid`` (v1 name=systemd + cgroup2 at unified/) or ``unified`` (cgroup2 only)."""
    unusable = (
        "no usable cgroup hierarchy: need cgroup2 at /sys/fs/cgroup, or name=systemd at "
        "/sys/fs/cgroup/systemd plus cgroup2 at /sys/fs/cgroup/unified"
    )
    try:
        layout = _cg.detect_layout()
    except OSError as e:
        raise SandboxError(f"{unusable} ({e})") from None
    if layout == _cg.UNIFIED:
        return "unified"
    if (
        layout == _cg.HYBRID
        and _cg.fs_type("/sys/fs/cgroup/unified") == _cg.CGROUP2_SUPER_MAGIC
        and _cg.fs_type("/sys/fs/cgroup/systemd") == _cg.CGROUP_SUPER_MAGIC
    ):
        return "hybrid"
    raise SandboxError(unusable)


def _cgroup_roots(host_layout: str) -> list[Path]:
    """Where a sandbox gets cgroups of its own on the host (whatever its own layout)."""
    if host_layout == "hybrid":
        return [Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified")]
    return [Path("/sys/fs/cgroup")]


def sandbox_layout(requested: str | None, host_layout: str) -> str:
    """The layout a sandbox gets: *requested*, else $MACHINED_SANDBOX_CGROUP, else the host's.

    On a hybrid host both work: ``unified`` mounts only (the sandbox's subtree of) the
    host's cgroup2 at the sandbox's /sys/fs/cgroup. A unified host has no name=systemd
    hierarchy to give a hybrid sandbox.
    """
    layout = requested or os.environ.get(CGROUP_ENV) or host_layout
    if layout not in LAYOUTS:
        raise SandboxError(f"unknown cgroup layout '{layout}' (hybrid or unified)")
    if layout == "hybrid" and host_layout != "hybrid":
        raise SandboxError("a hybrid sandbox needs a hybrid host (name=systemd at /sys/fs/cgroup/systemd)")
    return layout


def check_host() -> str:
    """Refuse clearly when this host cannot run a sandbox; return its cgroup layout."""
    if os.geteuid() != 0:
        raise SandboxError("machined-sandbox must run as root (it creates namespaces and cgroups)")
    for tool in ("unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            raise SandboxError(f"'{tool}' is missing (Debian package util-linux / mount)")
    if not os.path.exists(systemd_binary()):
        raise SandboxError("systemd is not installed on this host (/lib/systemd/systemd)")
    layout = cgroup_layout()
    probe = subprocess.run(
        ["unshare", "--pid", "--mount", "--cgroup", "--uts", "--ipc", "--fork", "true"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        raise SandboxError("cannot create pid/mount/cgroup/uts/ipc namespaces here: " + probe.stderr.strip())
    return layout


def systemd_binary() -> str:
    override = os.environ.get("MACHINED_SANDBOX_SYSTEMD")
    if override:
        return override
    for path in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd"):
        if os.path.exists(path):
            return path
    return "/lib/systemd/systemd"


def bus_limit_files(bus_limits: dict[str, int], unit_dir: str) -> list[dict[str, Any]]:
    """A bus configuration with *bus_limits* and the dbus.service drop-in that uses it."""
    if not bus_limits:
        return []
    limits = "".join(f'  <limit name="{k}">{v}</limit>\n' for k, v in bus_limits.items())
    return [
        {
            "path": "/run/machined-sandbox/system-bus.conf",
            "content": (
                '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"\n'
                ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n'
                "<busconfig>\n  <include>/usr/share/dbus-1/system.conf</include>\n"
                f"{limits}</busconfig>\n"
            ),
        },
        {
            "path": f"{unit_dir}/dbus.service.d/sandbox-limits.conf",
            "content": (
                "[Service]\nExecStart=\nExecStart=/usr/bin/dbus-daemon "
                "--config-file=/run/machined-sandbox/system-bus.conf --address=systemd: "
                "--nofork --nopidfile --systemd-activation --syslog-only\n"
            ),
        },
    ]


def our_unit_text(python: str, args: builtins.list[str] | tuple[str, ...] = ()) -> str:
    """The project's service unit with ExecStart pointed at this interpreter (and *args*
    added to machined's command line, e.g. ``--register-oci``)."""
    text = unit_file("machined.service").read_text(encoding="utf-8")  # package data: works from a wheel
    extra = "".join(f" {_unit_quote(a)}" for a in args)
    return re.sub(r"(?m)^ExecStart=.*$", lambda _: f"ExecStart={python} -m machined{extra}", text)


def _unit_quote(arg: str) -> str:
    """*arg* as one word of a unit file's command line (only plain words: a sandbox's options)."""
    if not re.fullmatch(r"[A-Za-z0-9_./=:,+@-]+", arg):
        raise SandboxError(f"machined argument {arg!r}: only letters, digits and _./=:,+@- here")
    return arg


class Sandbox:
    """A booted systemd in fresh namespaces; use as a context manager in tests."""

    def __init__(
        self,
        impl: str = "ours",
        *,
        bus_limits: dict[str, int] | None = None,
        machines_size: str = "512m",
        boot_timeout: float = 60.0,
        cgroup: str | None = None,
        systemd: str = "252",
        machined_args: builtins.list[str] | tuple[str, ...] = (),
        oci: bool = False,
    ) -> None:
        """*cgroup*: ``hybrid`` or ``unified`` (see :func:`sandbox_layout`; None: the default).

        *systemd*: ``252`` boots the host's systemd on the host's file systems (read-only);
        ``262`` boots the cached Debian forky root (built on first use) as an overlay, always
        on cgroup2 only (see :mod:`machined.sandbox.forky`).

        *machined_args*: added to our daemon's command line in its unit (``impl="ours"``).
        *oci*: podman and docker usable inside, their state on the sandbox's tmpfs
        (:mod:`machined.sandbox.oci`)."""
        if impl not in ("ours", "real"):
            raise SandboxError(f"unknown implementation '{impl}' (ours or real)")
        if cgroup is not None and cgroup not in LAYOUTS:
            raise SandboxError(f"unknown cgroup layout '{cgroup}' (hybrid or unified)")
        if systemd not in SYSTEMD_VERSIONS:
            raise SandboxError(f"unknown systemd '{systemd}' ({' or '.join(SYSTEMD_VERSIONS)})")
        if systemd == "262" and cgroup == "hybrid":
            raise SandboxError("systemd 262 supports cgroup2 only: a 262 sandbox is always unified")
        if machined_args and impl != "ours":
            raise SandboxError("machined_args are for our daemon (impl='ours')")
        self.info = SandboxInfo(id=secrets.token_hex(4), impl=impl, systemd=systemd, oci=oci)
        self.machined_args = tuple(machined_args)
        self.requested_cgroup = cgroup
        self.bus_limits = bus_limits or {}
        self.machines_size = machines_size
        self.boot_timeout = boot_timeout
        self._launcher: subprocess.Popen[bytes] | None = None
        self._root: Root | None = None  # the forky root of a 262 sandbox

    # ----- lifecycle -------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def init_pid(self) -> int:
        return self.info.init_pid

    @property
    def state_dir(self) -> Path:
        return self.info.state_dir

    def __enter__(self) -> Sandbox:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @classmethod
    def attach(cls, sandbox_id: str) -> Sandbox:
        """The running sandbox *sandbox_id*, as recorded by the one that started it."""
        path = STATE_ROOT / sandbox_id / "info.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise SandboxError(f"no sandbox '{sandbox_id}' (see 'machined-sandbox list')") from e
        sb = cls.__new__(cls)
        sb.info = SandboxInfo(**data)
        sb.bus_limits = {}
        sb.machines_size = ""
        sb.boot_timeout = 60.0
        sb.requested_cgroup = sb.info.cgroup
        sb.machined_args = ()
        sb._launcher = None
        sb._root = None
        return sb

    @staticmethod
    def list() -> list[tuple[SandboxInfo, bool]]:
        """Every sandbox recorded on this host, with whether its systemd is still running."""
        result: list[tuple[SandboxInfo, bool]] = []
        if not STATE_ROOT.is_dir():
            return result
        for entry in sorted(STATE_ROOT.iterdir()):
            try:
                info = SandboxInfo(**json.loads((entry / "info.json").read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError):
                continue
            result.append((info, _alive(info.init_pid, info.init_start_time)))
        return result

    def alive(self) -> bool:
        return _alive(self.info.init_pid, self.info.init_start_time)

    @property
    def cgroup(self) -> str:
        """The cgroup layout inside: ``hybrid`` or ``unified``."""
        return self.info.cgroup

    @property
    def oci(self) -> bool:
        """Whether podman and docker are set up inside (:mod:`machined.sandbox.oci`)."""
        return self.info.oci

    @property
    def systemd(self) -> str:
        """``252`` (the host's systemd) or ``262`` (the forky root's)."""
        return self.info.systemd

    def python_env(self) -> dict[str, str]:
        """What the host's interpreter (this virtualenv's python) needs in its environment to
        run inside: nothing in a 252 sandbox; the libraries the forky root lacks in a 262 one."""
        if self.systemd == "262":
            from machined.sandbox.forky import python_env

            return python_env()
        return {}

    def start(self) -> Sandbox:
        host_layout = check_host()
        if self.systemd == "262":
            self._root = self._ensure_root()
            layout = sandbox_layout("unified", host_layout)
        else:
            layout = sandbox_layout(self.requested_cgroup, host_layout)
        self.info.cgroup = layout
        self.info.created = time.time()
        # On a hybrid host a unified sandbox still gets a name=systemd cgroup of its own:
        # the kernel lists that hierarchy in /proc/PID/cgroup, and teardown finds every
        # process of the sandbox in both trees.
        self.info.cgroups = [str(r / (CGROUP_PREFIX + self.id)) for r in _cgroup_roots(host_layout)]
        try:
            self._start(layout)
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _ensure_root() -> Root:
        from machined.sandbox.root import RootError, ensure_root

        try:
            return ensure_root(log=lambda line: print(f"machined-sandbox: {line}", file=sys.stderr, flush=True))
        except (RootError, OSError) as e:
            raise SandboxError(f"the systemd-262 root is not available: {e}") from None

    def _start(self, layout: str) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=False)
        for cg in self.info.cgroups:
            os.mkdir(cg)
        self._save_info()
        console = self.state_dir / "console.log"
        console.touch()
        if self.systemd == "262":
            from machined.sandbox.forky import boot_spec

            assert self._root is not None
            (self.state_dir / "root").mkdir()  # the staging mount point, mounted on in the sandbox only
            spec = boot_spec(self, self._root.rootfs, str(console))
            boot_module = "machined.sandbox.bootroot"
        else:
            spec = self._boot_spec(layout, str(console))
            boot_module = "machined.sandbox.boot"
        procs = " ".join(f"{cg}/cgroup.procs" for cg in self.info.cgroups)
        script = f'for f in {procs}; do echo $$ > "$f" || exit 1; done; exec "$@"'
        argv = [
            "sh", "-c", script, "sh",
            "unshare", "--pid", "--mount", "--cgroup", "--uts", "--ipc", "--fork",
            "--propagation", "private", "--",
            sys.executable, "-m", boot_module,
        ]  # fmt: skip
        with open(console, "ab") as log:
            self._launcher = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=log,
                cwd=str(PROJECT_ROOT),
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(PROJECT_ROOT)},
                start_new_session=True,
            )
        assert self._launcher.stdin is not None
        self._launcher.stdin.write(json.dumps(spec).encode())
        self._launcher.stdin.close()
        self._find_init()
        self._save_info()
        self._wait_booted()
        for cg in self.info.cgroups:
            os.makedirs(f"{cg}/{EXEC_CGROUP}", exist_ok=True)

    def _find_init(self) -> None:
        assert self._launcher is not None
        deadline = time.monotonic() + 10
        pid = self._launcher.pid
        while time.monotonic() < deadline:
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                children = []
            if children:
                self.info.init_pid = int(children[0])
                self.info.init_start_time = _proc_start_time(self.info.init_pid)
                return
            if self._launcher.poll() is not None:
                break
            time.sleep(0.02)
        raise SandboxError("the sandbox's init did not start:\n" + self.console_tail())

    def _wait_booted(self) -> None:
        deadline = time.monotonic() + self.boot_timeout
        state = ""
        while time.monotonic() < deadline:
            if not self.alive():
                raise SandboxError("systemd exited during boot; its last lines:\n" + self.console_tail())
            r = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                if state == "degraded":
                    failed = self.run(["systemctl", "--failed", "--no-legend"], check=False).stdout
                    raise SandboxError(f"systemd booted degraded; failed units:\n{failed}")
                return
            time.sleep(0.1)
        raise SandboxError(
            f"systemd did not finish booting within {self.boot_timeout:.0f}s "
            f"(state '{state}'); its last lines:\n" + self.console_tail()
        )

    def console_tail(self, lines: int = 30) -> str:
        try:
            text = (self.state_dir / "console.log").read_text(errors="replace")
        except OSError:
            return "(no console log)"
        return "\n".join(text.splitlines()[-lines:])

    def _save_info(self) -> None:
        tmp = self.state_dir / "info.json.tmp"
        tmp.write_text(json.dumps(asdict(self.info)), encoding="utf-8")
        tmp.rename(self.state_dir / "info.json")

    def _boot_spec(self, layout: str, console: str) -> dict[str, Any]:
        files: list[dict[str, Any]] = []
        unit_dir = "/run/systemd/system"
        files.append(
            {
                "path": f"{unit_dir}/{TARGET}",
                "content": (
                    "[Unit]\nDescription=machined sandbox\n"
                    "Wants=dbus.socket dbus.service systemd-journald.service machine.slice\n"
                    "After=dbus.socket dbus.service systemd-journald.service\n"
                ),
            }
        )
        for unit in MASKED_UNITS:
            files.append({"path": f"{unit_dir}/{unit}", "symlink": "/dev/null"})
        binds: list[dict[str, Any]] = []
        if self.info.impl == "ours":
            files.append({"path": f"{unit_dir}/systemd-machined.service", "symlink": "/dev/null"})
            files.append(
                {"path": f"{unit_dir}/machined.service", "content": our_unit_text(sys.executable, self.machined_args)}
            )
            files.append({"path": f"{unit_dir}/dbus-org.freedesktop.machine1.service", "symlink": "machined.service"})
            for name, dst in POLICY_FILES.items():
                binds.append({"src": str(file_path(interface_file(name))), "dst": dst})
        files += bus_limit_files(self.bus_limits, unit_dir)
        overlays: list[str] = []
        if self.oci:
            from machined.sandbox import oci

            for d in oci.OVERLAID_DIRS:
                if not os.path.isdir(d):
                    raise SandboxError(f"{d} is missing: podman and docker.io are not installed ('make deps')")
            overlays = list(oci.OVERLAID_DIRS)
            (self.state_dir / oci.OVERLAY_STAGING).mkdir()  # mounted on in the sandbox only
            files += oci.config_files()
        tmpfs = [
            {"path": "/run", "options": "mode=755,nosuid,nodev,size=256m"},
            {"path": "/tmp", "options": "mode=1777,nosuid,nodev,size=512m"},
            {"path": "/var/tmp", "options": "mode=1777,nosuid,nodev,size=256m"},
            {"path": "/var/lib/machines", "options": f"mode=700,size={self.machines_size or '512m'}"},
            {"path": "/var/lib/systemd", "options": "mode=755,size=64m"},
            {"path": "/var/log/journal", "options": "mode=2755,size=64m"},
            {"path": "/dev/shm", "options": "mode=1777,nosuid,nodev,size=64m"},
        ]
        if self.oci:
            tmpfs += oci.storage_tmpfs()
        return {
            "overlays": overlays,
            "overlay_staging": str(self.state_dir / "oci"),
            "tmpfs": tmpfs,
            "binds": binds,
            "files": files,
            "cgroup_layout": layout,
            "console_log": console,
            "hostname": f"sandbox-{self.id}",
            "systemd": systemd_binary(),
            "unit": TARGET,
            "preserve": sorted({str(PROJECT_ROOT), sys.prefix, sys.base_prefix}),
            "first_pid": FIRST_PID,
        }

    def stop(self, timeout: float = 30.0) -> None:
        """Power the sandbox off and remove every trace of it; safe to call twice."""
        pid, start_time = self.info.init_pid, self.info.init_start_time
        if _alive(pid, start_time) and self.oci:
            # Containers first: podman's conmon ignores the SIGTERM of a shutdown, which would
            # then wait out its stop timeout.
            from machined.sandbox.oci import REMOVE_ALL

            try:
                self.run(["sh", "-c", REMOVE_ALL], check=False, timeout=30)
            except subprocess.TimeoutExpired:
                pass
        if _alive(pid, start_time):
            self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=10)
            deadline = time.monotonic() + timeout
            while _alive(pid, start_time) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid, start_time):
                # Killing a pid namespace's init kills every process in it.
                os.kill(pid, signal.SIGKILL)
        if self._launcher is not None:
            try:
                self._launcher.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._launcher.kill()
                self._launcher.wait()
        self._remove_cgroups()
        for staging in (self.state_dir / "root", self.state_dir / "oci"):
            if os.path.ismount(staging):  # never on the host (it is mounted in the sandbox's namespace)
                raise SandboxError(f"{staging} is mounted on the host: not removing {self.state_dir}")
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def _remove_cgroups(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for cg in self.info.cgroups:
            root = Path(cg)
            while root.exists():
                try:
                    dirs = sorted(
                        (p for p in root.rglob("*") if p.is_dir()),
                        key=lambda p: len(p.parts),
                        reverse=True,
                    )
                    for d in [*dirs, root]:
                        d.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        raise SandboxError(f"could not remove cgroup {cg}: processes remain in it") from None
                    self._kill_cgroup(root)
                    time.sleep(0.05)

    @staticmethod
    def _kill_cgroup(root: Path) -> None:
        for procs in root.rglob("cgroup.procs"):
            try:
                pids = procs.read_text().split()
            except OSError:
                continue
            for p in pids:
                try:
                    os.kill(int(p), signal.SIGKILL)
                except (OSError, ValueError):
                    pass

    # ----- running commands inside -----------------------------------------------------

    def command(self, args: builtins.list[str]) -> builtins.list[str]:
        """argv that runs *args* inside the sandbox (its namespaces and a cgroup of it)."""
        if not self.info.init_pid:
            raise SandboxError("the sandbox is not running")
        procs = " ".join(f"{cg}/{EXEC_CGROUP}/cgroup.procs" for cg in self.info.cgroups)
        script = f'for f in {procs}; do [ -e "$f" ] && echo $$ > "$f"; done; exec "$@"'
        return [
            "sh", "-c", script, "sh",
            "nsenter", "-t", str(self.info.init_pid), "-p", "-m", "-C", "-u", "-i", "--",
            *args,
        ]  # fmt: skip

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "SYSTEMD_PAGER": "cat",
            "PAGER": "cat",
            "SYSTEMD_COLORS": "0",
            "HOME": "/root",
        }
        if "TERM" in os.environ:
            env["TERM"] = os.environ["TERM"]
        env.update(extra or {})
        return env

    def run(
        self,
        args: builtins.list[str],
        *,
        check: bool = True,
        timeout: float | None = 60,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run *args* inside and capture its output as text."""
        r = subprocess.run(
            self.command(args),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env=self.env(env),
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and r.returncode != 0:
            raise SandboxError(
                f"{' '.join(args)!r} failed in sandbox {self.id} with {r.returncode}:\n{r.stdout}{r.stderr}"
            )
        return r

    def popen(self, args: builtins.list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start *args* inside without waiting (output handling as the caller says)."""
        kwargs.setdefault("env", self.env())
        return subprocess.Popen(self.command(args), **kwargs)

    def interactive(self, args: builtins.list[str]) -> int:
        """Run *args* inside attached to this terminal; return its exit status."""
        return subprocess.call(self.command(args), env=self.env())

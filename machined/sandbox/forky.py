"""The systemd-262 sandbox: what it mounts, masks and installs (run by :mod:`bootroot`).

It boots the cached Debian forky root (:mod:`machined.sandbox.root`) as an overlay on
cgroup2 only. ``impl="real"`` keeps the root's systemd-machined (socket-activated by
``systemd-machined.socket``, varlink at ``/run/systemd/machine/io.systemd.Machine``);
``impl="ours"`` masks that socket and service and runs our daemon from the host's
virtualenv: the checkout, the virtualenv and the interpreter it was made from are bound
read-only at their own paths, and the shared libraries the root lacks for that interpreter
(libffi, ...) are bound into :data:`HOST_LIBS`, which only our unit's ``LD_LIBRARY_PATH``
names, so the root's own programs keep the root's libraries.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from machined.sandbox.core import Sandbox

HOST_LIBS = "/run/machined-sandbox/host-libs"  # inside the sandbox
SYSTEMD = "/usr/lib/systemd/systemd"

# Units of 262 beyond the 252 sandbox's list that write state outside the sandbox (EFI
# variables, TPM, pstore, firmware) or have no business in it. The overlay keeps the host's
# files safe anyway; the kernel's settings (sysctl, binfmt, modules) and devices are shared.
EXTRA_MASKED_UNITS = (
    "systemd-tmpfiles-setup-dev-early.service",
    "systemd-journal-catalog-update.service",
    "systemd-update-done.service",
    "systemd-hibernate-clear.service",
    "systemd-factory-reset-request.service",
    "systemd-factory-reset.socket",
    "systemd-pstore.service",
    "systemd-tpm2-setup.service",
    "systemd-tpm2-setup-early.service",
    "systemd-pcrmachine.service",
    "systemd-pcrfs-root.service",
    "systemd-pcrextend.socket",
    "systemd-pcrlock.socket",
    "systemd-sysext.service",
    "systemd-confext.service",
    "systemd-sysupdate.timer",
    "systemd-sysupdate-reboot.timer",
    "systemd-sysupdate-update.timer",
    "systemd-network-generator.service",
    "systemd-networkd.socket",
    "systemd-bsod.service",
    "systemd-battery-check.service",
    "systemd-boot-random-seed.service",
    "systemd-growfs-root.service",
    "systemd-quotacheck-root.service",
    "systemd-mute-console.socket",
    # the host kernel's debugfs, tracefs and configfs: nothing in the sandbox needs them
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount",
)

# podman's DHCP proxy for netavark (the sandboxes have no network for it) and, outside
# ``oci=True`` sandboxes, docker's and containerd's units.
NETAVARK_UNITS = ("netavark-dhcp-proxy.socket", "netavark-dhcp-proxy.service")
OCI_UNITS = ("docker.socket", "docker.service", "containerd.service")

DEV_NODES = (
    "/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty",
    "/dev/net/tun", "/dev/fuse", "/dev/loop-control", "/dev/btrfs-control",
)  # fmt: skip


def _lib_dirs(rootfs: Path) -> list[Path]:
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{os.uname().machine}-linux-gnu"
    return [rootfs / "usr/lib" / multiarch, rootfs / "usr/lib", rootfs / "usr/lib64", rootfs / "usr/local/lib"]


def _daemon_elf_files() -> list[str]:
    """The interpreter and the extension modules the daemon may load (standard library and
    the project's runtime dependencies)."""
    files = [os.path.realpath(sys.executable)]
    # The interpreter's extension modules (in a virtualenv, platstdlib is the venv's, which has none).
    dynload = sysconfig.get_config_var("DESTSHARED") or os.path.join(sysconfig.get_path("platstdlib"), "lib-dynload")
    files += sorted(f for f in glob.glob(os.path.join(dynload, "*.so")) if "_tkinter" not in os.path.basename(f))
    try:
        requires = metadata.requires("machined") or []
    except metadata.PackageNotFoundError:
        requires = []
    for req in requires:
        if "extra ==" in req:
            continue
        name = req.split(";")[0].split("[")[0]
        for sep in "<>=!~ ":
            name = name.split(sep)[0]
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for f in dist.files or []:
            if ".so" in f.name:
                files.append(str(f.locate()))
    return files


def missing_libraries(rootfs: Path) -> dict[str, str]:
    """soname → host path of every shared library the daemon's interpreter and extension
    modules need on this host that the root does not have."""
    r = subprocess.run(["ldd", *_daemon_elf_files()], check=False, capture_output=True, text=True)
    needed: dict[str, str] = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "=>" and parts[2].startswith("/"):
            needed.setdefault(parts[0], parts[2])
    dirs = _lib_dirs(rootfs)
    return {
        soname: path
        for soname, path in sorted(needed.items())
        if not any(os.path.lexists(d / soname) for d in dirs)
        and not path.startswith(sys.base_prefix.rstrip("/") + "/")  # bound with the interpreter
    }


def host_paths() -> list[str]:
    """Host directories bound read-only at their own paths: the checkout, the virtualenv and
    the interpreter it was made from (``home =`` of pyvenv.cfg is ``sys.base_prefix/bin``)."""
    from machined.sandbox.core import PROJECT_ROOT

    paths: list[str] = []
    for p in sorted(
        {
            str(PROJECT_ROOT),
            sys.prefix,
            sys.base_prefix,
            os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))),
        }
    ):
        if not any(p == kept or p.startswith(kept.rstrip("/") + "/") for kept in paths):
            paths.append(p)
    return paths


def python_env() -> dict[str, str]:
    """The environment the host's interpreter needs inside a 262 sandbox."""
    return {"LD_LIBRARY_PATH": HOST_LIBS}


USER_UNIT_DIR = "/run/systemd/user"  # (read by every user's service manager)


def user_bus_files() -> list[dict[str, Any]]:
    """A bus for each user's service manager (what Debian's dbus-user-session adds, which a
    minbase root lacks): 262's per-user machined serves on it."""
    return [
        {
            "path": f"{USER_UNIT_DIR}/dbus.socket",
            "content": "[Unit]\nDescription=D-Bus User Message Bus Socket\n\n[Socket]\nListenStream=%t/bus\n",
        },
        {
            "path": f"{USER_UNIT_DIR}/dbus.service",
            "content": (
                "[Unit]\nDescription=D-Bus User Message Bus\nRequires=dbus.socket\n\n[Service]\n"
                "ExecStart=/usr/bin/dbus-daemon --session --address=systemd: --nofork --nopidfile "
                "--systemd-activation --syslog-only\n"
            ),
        },
        {"path": f"{USER_UNIT_DIR}/sockets.target.wants/dbus.socket", "symlink": "../dbus.socket"},
    ]


def our_user_unit_files() -> list[dict[str, Any]]:
    """Ours in place of 262's per-user systemd-machined: its units masked, ours socket-activated
    and bus-activated in each user's service manager, as 262's are."""
    from machined.data import unit_file

    service = unit_file("machined-user.service").read_text(encoding="utf-8")
    service = re.sub(r"(?m)^ExecStart=.*$", f"ExecStart={sys.executable} -m machined --user", service)
    files: list[dict[str, Any]] = [
        {"path": f"{USER_UNIT_DIR}/{unit}", "symlink": "/dev/null"}
        for unit in ("systemd-machined.service", "systemd-machined.socket")
    ]
    files += [
        {"path": f"{USER_UNIT_DIR}/machined.service", "content": service},
        {
            "path": f"{USER_UNIT_DIR}/machined.service.d/host-python.conf",
            "content": f"[Service]\nEnvironment=LD_LIBRARY_PATH={HOST_LIBS}\n",
        },
        {"path": f"{USER_UNIT_DIR}/dbus-org.freedesktop.machine1.service", "symlink": "machined.service"},
        {
            "path": f"{USER_UNIT_DIR}/machined.socket",
            "content": unit_file("machined-user.socket").read_text(encoding="utf-8"),
        },
        {"path": f"{USER_UNIT_DIR}/sockets.target.wants/machined.socket", "symlink": "../machined.socket"},
    ]
    return files


def boot_spec(sb: Sandbox, rootfs: Path, console: str) -> dict[str, Any]:
    """The spec :mod:`machined.sandbox.bootroot` assembles and boots."""
    from machined.data import file_path, interface_file_for, unit_text
    from machined.sandbox.core import (
        FIRST_PID,
        MASKED_UNITS,
        POLICY_FILES,
        TARGET,
        bus_limit_files,
        our_unit_text,
    )

    unit_dir = "/run/systemd/system"
    files: list[dict[str, Any]] = [
        {
            "path": f"{unit_dir}/{TARGET}",
            "content": (
                "[Unit]\nDescription=machined sandbox (systemd 262)\n"
                "Wants=sockets.target dbus.socket dbus.service systemd-journald.service machine.slice\n"
                "After=sockets.target dbus.socket dbus.service systemd-journald.service\n"
            ),
        },
        # journald 262 refuses to start when it cannot read /dev/kmsg (bound to /dev/null here).
        {"path": "/run/systemd/journald.conf.d/machined-sandbox.conf", "content": "[Journal]\nReadKMsg=no\n"},
        # Each sandbox is a machine of its own.
        {"path": "/etc/machine-id", "content": os.urandom(16).hex() + "\n", "mode": "444"},
        {"path": "/var/lib/dbus/machine-id", "symlink": "/etc/machine-id"},
        # (the tree's /etc/hostname is the build host's name; systemd sets the hostname from it)
        {"path": "/etc/hostname", "content": f"sandbox-{sb.id}\n"},
    ]
    files += user_bus_files()
    # The root's container runtimes (for the OCI tests) stay off in other sandboxes: their
    # sockets would otherwise listen in every one (sockets.target wants them).
    runtime_units = OCI_UNITS if not sb.oci else ()
    for unit in dict.fromkeys(MASKED_UNITS + EXTRA_MASKED_UNITS + NETAVARK_UNITS + runtime_units):
        files.append({"path": f"{unit_dir}/{unit}", "symlink": "/dev/null"})
    binds: list[dict[str, Any]] = [{"src": p, "dst": p} for p in host_paths()]
    if sb.info.impl == "ours":
        for unit in ("systemd-machined.service", "systemd-machined.socket"):
            files.append({"path": f"{unit_dir}/{unit}", "symlink": "/dev/null"})
        files.append(
            {"path": f"{unit_dir}/machined.service", "content": our_unit_text(sys.executable, sb.machined_args)}
        )
        files.append(
            {
                "path": f"{unit_dir}/machined.service.d/host-python.conf",
                "content": f"[Service]\nEnvironment=LD_LIBRARY_PATH={HOST_LIBS}\n",
            }
        )
        files.append({"path": f"{unit_dir}/dbus-org.freedesktop.machine1.service", "symlink": "machined.service"})
        files += our_user_unit_files()
        # Started by socket activation like systemd-machined 262 (our socket unit), or by the bus.
        files.append({"path": f"{unit_dir}/machined.socket", "content": unit_text("machined.socket")})
        files.append({"path": f"{unit_dir}/sockets.target.wants/machined.socket", "symlink": "../machined.socket"})
        for name, dst in POLICY_FILES.items():  # 262's bus policy and polkit actions where they differ from 252's
            binds.append({"src": str(file_path(interface_file_for("262", name))), "dst": dst})
    for soname, path in missing_libraries(rootfs).items():
        binds.append({"src": os.path.realpath(path), "dst": f"{HOST_LIBS}/{soname}"})
    files += bus_limit_files(sb.bus_limits, unit_dir)
    tmpfs = [
        {"path": "/run", "options": "mode=755,nosuid,nodev,size=256m"},
        {"path": "/tmp", "options": "mode=1777,nosuid,nodev,size=512m"},
        {"path": "/var/tmp", "options": "mode=1777,nosuid,nodev,size=256m"},
        {"path": "/var/lib/machines", "options": f"mode=700,size={sb.machines_size or '512m'}"},
        {"path": "/var/log/journal", "options": "mode=2755,size=64m"},
    ]
    if sb.oci:  # the root's podman and docker.io, their state on tmpfs, their /etc in the overlay
        from machined.sandbox import oci

        tmpfs += oci.storage_tmpfs()
        files += oci.config_files()
    return {
        "lower": str(rootfs),
        "staging": str(sb.state_dir / "root"),
        "staging_size": "2g",  # the overlay's upper layer: every write of the sandbox outside its tmpfs mounts
        "tmpfs": tmpfs,
        # logind fails on a root it cannot write without this directory.
        "dirs": ["/var/lib/systemd/linger", HOST_LIBS],
        "binds": binds,
        "files": files,
        "dev_nodes": [*DEV_NODES, *sorted(glob.glob("/dev/loop[0-9]*"))],
        "console_log": console,
        "hostname": f"sandbox-{sb.id}",
        "systemd": SYSTEMD,
        "unit": TARGET,
        "first_pid": FIRST_PID,
    }

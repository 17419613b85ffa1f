"""Podman and docker in a sandbox (``Sandbox(..., oci=True)``): their state on the sandbox's own tmpfs.

Both runtimes run as root with the systemd cgroup manager/driver, so that their containers
are scopes of the sandbox's systemd (``libpod-ID.scope`` in machine.slice, ``docker-ID.scope``
in system.slice). Nothing of theirs reaches the host:

- storage: tmpfs mounts on /var/lib/containers, /var/lib/docker and /var/lib/containerd;
  their run roots (/run/containers, /run/libpod, /run/docker, /run/containerd) are under the
  sandbox's private /run. A 252 sandbox sees the host's file systems read-only and the host
  may have no such directories to mount on, so /var/lib gets a writable overlay (host's
  /var/lib below, the sandbox's tmpfs above) first; a 262 sandbox's root is an overlay already.
- configuration: /etc/containers and /etc/docker get writable copies (overlays on a 252
  sandbox; the 262 root's own, in its overlay), with the files below written into them, so
  that plain ``podman`` and ``docker`` commands work.

What the files settle: runc as podman's runtime (crun needs CAP_SYS_RESOURCE for its
RLIMIT_MEMLOCK, which the sandbox may not have); no pids limit (a sandbox whose host has no
cgroup2 controllers cannot set pids.max); the overlay storage driver where the kernel has
overlayfs, else vfs; docker without iptables and without its bridge (no network: containers
run with ``--network none``); events and logs in files.
"""

from __future__ import annotations

import json
from typing import Any

# tmpfs mounts of the runtimes' storage (in the sandbox; created in its /var/lib overlay or root)
STORAGE_DIRS = ("/var/lib/containers", "/var/lib/docker", "/var/lib/containerd")
STORAGE_SIZE = "2g"  # a ceiling: tmpfs takes memory only for what is written
# Host directories a 252 sandbox overlays (their content stays visible, writes go to the sandbox)
OVERLAID_DIRS = ("/var/lib", "/etc/containers", "/etc/docker")
OVERLAY_STAGING = "oci"  # in the sandbox's state directory: the tmpfs with the overlays' upper layers


# Every container removed at once (before a sandbox powers off); docker only if dockerd runs
REMOVE_ALL = (
    "podman rm --all --force --time 0 >/dev/null 2>&1; "
    "if systemctl -q is-active docker.service; then docker ps -aq | xargs -r docker rm -f >/dev/null 2>&1; fi; true"
)


def overlay_supported() -> bool:
    try:
        with open("/proc/filesystems", encoding="ascii") as f:
            return any(line.split()[-1:] == ["overlay"] for line in f)
    except OSError:
        return False


def storage_driver() -> str:
    """``overlay`` where the kernel has overlayfs (on the tmpfs storage), else ``vfs``."""
    return "overlay" if overlay_supported() else "vfs"


def config_files() -> list[dict[str, Any]]:
    """The runtimes' configuration files, written into the sandbox's /etc."""
    driver = storage_driver()
    storage_conf = (
        "# machined-sandbox: podman's storage on the sandbox's tmpfs\n"
        f'[storage]\ndriver = "{driver}"\n'
        'runroot = "/run/containers/storage"\ngraphroot = "/var/lib/containers/storage"\n'
    )
    containers_conf = (
        "# machined-sandbox: root podman with the systemd cgroup manager, runc, no pids limit\n"
        "[containers]\npids_limit = 0\n\n"
        '[engine]\ncgroup_manager = "systemd"\nruntime = "runc"\nevents_logger = "file"\n'
    )
    daemon_json = {
        "exec-opts": ["native.cgroupdriver=systemd"],
        "storage-driver": "overlay2" if driver == "overlay" else "vfs",
        "data-root": "/var/lib/docker",
        "exec-root": "/run/docker",
        "iptables": False,
        "ip6tables": False,
        "ip-forward": False,
        "ip-masq": False,
        "bridge": "none",
        "log-driver": "json-file",
    }
    return [
        {"path": "/etc/containers/storage.conf", "content": storage_conf},
        {"path": "/etc/containers/containers.conf", "content": containers_conf},
        {"path": "/etc/docker/daemon.json", "content": json.dumps(daemon_json, indent=1) + "\n"},
    ]


def storage_tmpfs() -> list[dict[str, Any]]:
    return [{"path": d, "options": f"mode=711,size={STORAGE_SIZE}"} for d in STORAGE_DIRS]

"""Real podman and docker in a sandbox, for the OCI registration tests (machined --register-oci).

A sandbox booted with ``oci=True`` (:mod:`machined.sandbox.oci`) has the runtimes' storage on its
own tmpfs and their configuration in writable copies of /etc/containers and /etc/docker. This
module makes a small local image for each runtime (no registry, no network): a root tree of the
sandbox's own /bin/sh, true, sleep, cat and ls with their libraries, imported with
``podman import`` and ``docker import``. Containers run ``sleep infinity`` with ``--network none``
(a private network namespace with ``lo`` only); :func:`add_address` gives one an address with a
veth pair made wholly inside its namespace.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from machined.sandbox import Sandbox

RUNTIMES = ("podman", "docker")
IMAGE = {"podman": "localhost/machined-mini:latest", "docker": "machined-mini:latest"}
IMAGE_TREE = "/var/tmp/machined-oci-image"
HYBRID_SKIP = (
    "the hybrid layout hides the cgroup v1 controllers from the sandbox: podman and docker "
    "cannot make their containers' cgroups there (runc: 'mkdir /sys/fs/cgroup/cpuset/machine.slice: "
    "no such file or directory'; tested on the unified layout)"
)

# The tree's binaries and every library they load; /bin, /lib, /lib64 as links into /usr as on
# a merged-/usr system (whatever the sandbox's own layout, the copies are at their real paths).
_TREE_SCRIPT = r"""
set -eu
T="$1"
rm -rf "$T"
mkdir -p "$T/usr/bin" "$T/etc" "$T/tmp" "$T/proc" "$T/sys" "$T/dev" "$T/root"
chmod 1777 "$T/tmp"
for d in bin lib lib64 sbin; do ln -s "usr/$d" "$T/$d"; done
mkdir -p "$T/usr/lib" "$T/usr/lib64" "$T/usr/sbin"
copy_lib() {
    real=$(readlink -f "$1")
    case "$1" in /usr/*) dst="$1" ;; *) dst="/usr$1" ;; esac
    mkdir -p "$T$(dirname "$dst")"
    [ -e "$T$dst" ] || cp "$real" "$T$dst"
}
for b in sh true sleep cat ls; do
    p=""
    for d in /usr/bin /bin; do if [ -x "$d/$b" ]; then p="$d/$b"; break; fi; done
    cp "$(readlink -f "$p")" "$T/usr/bin/$b"
    for lib in $(ldd "$p" | grep -o '/[^ ]*'); do copy_lib "$lib"; done
done
echo "machined-mini" > "$T/etc/hostname"
echo "root:x:0:0:root:/root:/bin/sh" > "$T/etc/passwd"
echo "root:x:0:" > "$T/etc/group"
"""


@dataclass
class Container:
    runtime: str
    name: str
    id: str
    pid: int

    @property
    def unit(self) -> str:
        prefix = "libpod" if self.runtime == "podman" else "docker"
        return f"{prefix}-{self.id}.scope"


def wait_for(predicate: object, timeout: float, interval: float = 0.02) -> float | None:
    """Seconds until ``predicate()`` is true, or None if it stays false for *timeout* seconds."""
    assert callable(predicate)
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            return None
        time.sleep(interval)


def start_docker(sb: Sandbox) -> None:
    sb.run(["systemctl", "start", "docker.service"], timeout=120)


def prepare(sb: Sandbox) -> None:
    """dockerd started, the image made and imported into both runtimes."""
    start_docker(sb)
    sb.run(["sh", "-c", _TREE_SCRIPT, "sh", IMAGE_TREE])
    for runtime in RUNTIMES:
        sb.run(["sh", "-c", f"tar -C {IMAGE_TREE} -c . | {runtime} import - {IMAGE[runtime]}"], timeout=120)


def run(sb: Sandbox, runtime: str, name: str, *args: str) -> Container:
    """``RUNTIME run -d --name NAME --network none IMAGE sleep infinity`` (and *args* before the
    image). Stopped with SIGKILL: ``sleep`` as PID 1 ignores SIGTERM, and a stop would wait 10 s."""
    argv = [runtime, "run", "-d", "--name", name, "--network", "none", "--stop-signal", "SIGKILL", *args]
    r = sb.run([*argv, IMAGE[runtime], "sleep", "infinity"])
    cid = r.stdout.strip().splitlines()[-1]
    pid = int(sb.run([runtime, "inspect", "-f", "{{.State.Pid}}", cid]).stdout.strip())
    return Container(runtime, name, cid, pid)


def remove(sb: Sandbox, c: Container) -> None:
    """Stop at once (``sleep`` as PID 1 ignores SIGTERM) and remove."""
    sb.run([c.runtime, "rm", "-f", "-t", "0", c.id] if c.runtime == "podman" else ["docker", "rm", "-f", c.id])


def add_address(sb: Sandbox, c: Container, address: str) -> None:
    """*address* (CIDR) on a veth pair wholly inside the container's network namespace."""
    script = (
        f"ip link add oci0 type veth peer name oci1 && ip addr add {address} dev oci0 && "
        "ip link set oci0 up && ip link set oci1 up"
    )
    sb.run(["nsenter", "-t", str(c.pid), "-n", "sh", "-c", script])


def machines(sb: Sandbox) -> dict[str, tuple[str, str]]:
    """``machinectl list``: name → (class, service)."""
    r = sb.run(["machinectl", "list", "--no-legend", "--no-pager", "--full"])
    out: dict[str, tuple[str, str]] = {}
    for line in r.stdout.splitlines():
        words = line.split()
        if len(words) >= 3:
            out[words[0]] = (words[1], words[2])
    return out


def runtime_scopes(sb: Sandbox) -> list[str]:
    """The containers' scopes the sandbox's systemd knows (libpod-conmon-* is not a container)."""
    r = sb.run(["systemctl", "list-units", "--all", "--no-legend", "--plain", "libpod-*.scope", "docker-*.scope"])
    units = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    return [u for u in units if not u.startswith("libpod-conmon-")]

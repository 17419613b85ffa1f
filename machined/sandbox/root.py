"""The Debian forky root a systemd-262 sandbox boots: built once with debootstrap, cached.

The tree lives in ``/var/cache/machined-sandbox/forky-<stamp>/rootfs`` (``$MACHINED_SANDBOX_CACHE``
moves the cache), where *stamp* is a hash of the recipe below: changing the suite or the
package list builds a new tree next to the old one. A build goes into a temporary
directory beside it and is renamed into place only once complete, with ``manifest.json``
(package versions, systemd's version, build time, size) written last; a directory
without a manifest or without systemd is incomplete and is rebuilt. An ``flock`` on
``.lock`` makes parallel callers wait for one build instead of running two.

Sandboxes never write the tree: they boot an overlay with the tree as its lower layer.
The Debian mirror is the one this host's apt uses (``$MACHINED_SANDBOX_MIRROR`` overrides it).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUITE = "forky"
VARIANT = "minbase"
# What the sandbox and its tests use: the service manager and machined (systemd,
# systemd-container: machinectl, nspawn), the bus, polkit (authorization tests),
# nss-mymachines, userdbctl, ps/pgrep, ip, su/setpriv/mount, gdbus, jq for varlinkctl's
# JSON, and the file-system tools of the image pool tests.
INCLUDE = (
    "systemd",
    "systemd-container",
    "systemd-userdbd",
    "dbus",
    "polkitd",
    "libpam-systemd",  # logind: polkitd depends on default-logind | logind, which debootstrap cannot resolve
    "libnss-mymachines",
    "iproute2",
    "procps",
    "util-linux",
    "mount",
    "jq",
    "libglib2.0-bin",
    "btrfs-progs",
    "e2fsprogs",
    "fdisk",
    # the container runtimes of the OCI registration tests (machined --register-oci)
    "podman",
    "docker.io",
    "docker-cli",
    "crun",
    "runc",
)
# debootstrap has no script for forky before it is released; sid's works for every suite.
DEBOOTSTRAP_SCRIPT = "/usr/share/debootstrap/scripts/sid"
RECIPE_VERSION = 1  # bump when the tree is post-processed differently

CACHE_ENV = "MACHINED_SANDBOX_CACHE"
MIRROR_ENV = "MACHINED_SANDBOX_MIRROR"
DEFAULT_CACHE = "/var/cache/machined-sandbox"
MANIFEST = "manifest.json"


class RootError(Exception):
    """The root could not be found or built; the message says why."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def recipe_stamp() -> str:
    recipe = json.dumps([RECIPE_VERSION, SUITE, VARIANT, sorted(INCLUDE)])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def root_dir() -> Path:
    """Where the complete tree of the current recipe is (or will be) cached."""
    return cache_dir() / f"{SUITE}-{recipe_stamp()}"


# ----- the mirror -------------------------------------------------------------------------


def _one_line_entries(text: str) -> list[tuple[str, list[str]]]:
    """(uri, suites) of the ``deb`` lines of a sources.list file."""
    entries = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        words = line.split()[1:]
        if words and words[0].startswith("["):  # options: [arch=amd64 signed-by=...]
            while words and not words[0].endswith("]"):
                words.pop(0)
            words = words[1:]
        if len(words) >= 2:
            entries.append((words[0], [words[1]]))
    return entries


def _deb822_entries(text: str) -> list[tuple[str, list[str]]]:
    """(uri, suites) of the enabled ``Types: deb`` stanzas of a .sources file."""
    entries = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            entries.append((uri, fields.get("suites", "").split()))
    return entries


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian archive this host's apt uses (not its security archive)."""
    override = os.environ.get(MIRROR_ENV)
    if override:
        return override
    files = [apt_dir / "sources.list"]
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        entries = _deb822_entries(text) if path.suffix == ".sources" else _one_line_entries(text)
        for uri, suites in entries:
            if not uri.startswith(("http://", "https://", "file:/")):
                continue
            if any(s.endswith(("-security", "/updates")) for s in suites) or "security" in uri:
                continue
            return uri.rstrip("/")
    raise RootError(
        f"no Debian mirror found in {apt_dir}/sources.list or {apt_dir}/sources.list.d/ (set ${MIRROR_ENV} to one)"
    )


# ----- the cached tree --------------------------------------------------------------------


@dataclass
class Root:
    """A complete cached tree and what its manifest says about it."""

    path: Path
    manifest: dict[str, Any]

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    @property
    def systemd_version(self) -> str:
        """Upstream's version of the tree's systemd, e.g. ``262`` or ``262.1``."""
        return str(self.manifest.get("systemd_version", ""))


def _complete(path: Path) -> Root | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    rootfs = path / "rootfs"
    if not (rootfs / "usr/lib/systemd/systemd").exists() or not (rootfs / "usr/lib/systemd/systemd-machined").exists():
        return None
    return Root(path, manifest)


def cached_root() -> Root | None:
    """The complete tree of the current recipe, if it is built."""
    return _complete(root_dir())


def _packages(rootfs: Path) -> dict[str, str]:
    r = subprocess.run(
        ["dpkg-query", f"--admindir={rootfs}/var/lib/dpkg", "-W", "-f", "${Package}\t${Version}\n"],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(line.split("\t", 1) for line in r.stdout.splitlines() if "\t" in line)


def _upstream_version(debian_version: str) -> str:
    """``262.1-1`` → ``262.1``; ``262~rc3-2`` → ``262~rc3``."""
    version = debian_version.split(":", 1)[-1]
    return version.rsplit("-", 1)[0] if "-" in version else version


def _du(path: Path) -> int:
    r = subprocess.run(["du", "-sx", "--block-size=1", str(path)], check=False, capture_output=True, text=True)
    try:
        return int(r.stdout.split()[0])
    except (IndexError, ValueError):
        return 0


def _remove_tree(path: Path) -> None:
    """Remove a (partial) tree of ours; refuses anything that is or holds a mount point."""
    if not path.exists():
        return
    path = path.resolve()
    if not _under(path, cache_dir().resolve()) or path == cache_dir().resolve():
        raise RootError(f"refusing to remove {path}: not a tree in {cache_dir()}")
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if _under(Path(point), path):
                raise RootError(f"refusing to remove {path}: {point} is mounted inside it")
    shutil.rmtree(path)


def _under(path: Path, top: Path) -> bool:
    return path == top or top in path.parents


def build_root(dest: Path, mirror: str, log: Callable[[str], None]) -> Root:
    """debootstrap the recipe into *dest*: built beside it, manifest last, renamed into place
    (an existing *dest* is replaced only by a complete build; stop its sandboxes first)."""
    if shutil.which("debootstrap") is None or not os.path.exists(DEBOOTSTRAP_SCRIPT):
        raise RootError("debootstrap is missing: apt-get install debootstrap")
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    _remove_tree(tmp)
    tmp.mkdir(parents=True)
    rootfs = tmp / "rootfs"
    logfile = tmp / "debootstrap.log"
    argv = [
        "debootstrap", f"--variant={VARIANT}", f"--include={','.join(INCLUDE)}",
        SUITE, str(rootfs), mirror, DEBOOTSTRAP_SCRIPT,
    ]  # fmt: skip
    log(f"building the {SUITE} root for systemd-262 sandboxes in {dest} (a few minutes, once)")
    log("  " + " ".join(argv))
    started = time.monotonic()
    try:
        with open(logfile, "wb") as out:
            r = subprocess.run(argv, check=False, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            # Keep the logs for a look after the partial tree is gone.
            failed = dest.parent / f"{dest.name}.failed.log"
            with open(failed, "wb") as out:
                for part in (logfile, rootfs / "debootstrap/debootstrap.log"):
                    if part.exists():
                        out.write(f"===== {part.name}\n".encode() + part.read_bytes())
            tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-20:])
            raise RootError(f"debootstrap failed with {r.returncode} (logs: {failed}); its last lines:\n{tail}")
        # Nothing of the host's apt state belongs in the tree; its package cache is not needed.
        for leftover in (rootfs / "var/cache/apt/archives").glob("*.deb"):
            leftover.unlink()
        packages = _packages(rootfs)
        seconds = time.monotonic() - started
        size = _du(rootfs)
        manifest = {
            "suite": SUITE,
            "variant": VARIANT,
            "include": list(INCLUDE),
            "recipe": recipe_stamp(),
            "mirror": mirror,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(seconds, 1),
            "size_bytes": size,
            "systemd_version": _upstream_version(packages.get("systemd", "")),
            "packages": packages,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.sync()
        if dest.exists():  # a rebuild, or an incomplete tree: replaced only by a complete one
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            dest.rename(old)
            tmp.rename(dest)
            _remove_tree(old)
        else:
            tmp.rename(dest)
    except BaseException:
        _remove_tree(tmp)
        raise
    log(
        f"built {dest.name}: systemd {manifest['systemd_version']}, {len(packages)} packages, "
        f"{size / 2**20:.0f} MiB in {seconds:.0f} s"
    )
    root = _complete(dest)
    if root is None:
        raise RootError(f"{dest} is incomplete right after its build (no systemd or machined in it)")
    return root


def ensure_root(log: Callable[[str], None] = print, *, rebuild: bool = False) -> Root:
    """The cached tree of the current recipe, built first if it is missing or incomplete."""
    dest = root_dir()
    if not rebuild:
        root = _complete(dest)
        if root is not None:
            return root
    if os.geteuid() != 0:
        raise RootError(f"building {dest} needs root")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another caller may be building it: wait, then look again
        root = None if rebuild else _complete(dest)
        if root is not None:
            return root
        mirror = debian_mirror()
        for stale in [*dest.parent.glob(f".{dest.name}.tmp-*"), *dest.parent.glob(f".{dest.name}.old-*")]:
            log(f"removing {stale}, left by a build that died")  # (we hold the lock: nobody builds)
            _remove_tree(stale)
        if dest.exists():
            log(
                f"{dest} is {'to be rebuilt' if rebuild else 'incomplete'}: replacing it once the new build is complete"
            )
        return build_root(dest, mirror, log)

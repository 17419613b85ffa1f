"""Podman's and docker's containers as machines (``machined --register-oci``).

Off by default: nothing of this wing is imported, no match rule is added and no runtime's
state is read unless the daemon is told to. What a container's scope is called
(:func:`parse_scope`), how its name becomes a machine name (:func:`machine_name`), and the
runtimes' identities; the readers (:mod:`.podman`, :mod:`.docker`) and the watcher that registers
and unregisters (:mod:`.watcher`) build on these. Transport-neutral: no D-Bus or varlink here.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from machined.naming import HOST_MACHINE_NAME, HOST_NAME_MAX, hostname_is_valid

PODMAN = "podman"
DOCKER = "docker"
RUNTIMES = (PODMAN, DOCKER)

# The scope each runtime's systemd cgroup manager/driver starts for a container.
_SCOPE = re.compile(r"^(libpod|docker)-([0-9a-f]{64})\.scope$")
_PREFIX_RUNTIME = {"libpod": PODMAN, "docker": DOCKER}
# What a unit name must start with to be worth a look (cheap test before the pattern).
SCOPE_PREFIXES = ("libpod-", "docker-")
# ListUnitsByPatterns' patterns for the containers running when the daemon starts.
SCOPE_PATTERNS = ["libpod-*.scope", "docker-*.scope"]

_KEEP = frozenset(string.ascii_letters + string.digits + "_.-")
SHORT_ID = 12


@dataclass(frozen=True)
class ContainerRef:
    """A container as its scope names it: the runtime and the full (64 hex) ID."""

    runtime: str
    id: str

    @property
    def scope(self) -> str:
        prefix = "libpod" if self.runtime == PODMAN else "docker"
        return f"{prefix}-{self.id}.scope"

    @property
    def fallback_name(self) -> str:
        return fallback_name(self.runtime, self.id)


@dataclass(frozen=True)
class Facts:
    """What a runtime tells of a running container: its name as ``podman ps``/``docker ps`` show
    it, its init PID (0: not known yet) and its root directory ("" if not known)."""

    name: str
    pid: int
    root_directory: str = ""


def parse_scope(unit: str) -> ContainerRef | None:
    """The container whose scope *unit* is (``libpod-ID.scope``, ``docker-ID.scope``), else None.

    ``libpod-conmon-ID.scope`` (podman's monitor) is no container."""
    if not unit.startswith(SCOPE_PREFIXES):
        return None
    match = _SCOPE.match(unit)
    if match is None:
        return None
    return ContainerRef(_PREFIX_RUNTIME[match.group(1)], match.group(2))


def fallback_name(runtime: str, container_id: str) -> str:
    """``<runtime>-<first 12 hex of the ID>``: the name of a container whose own name cannot be used."""
    return f"{runtime}-{container_id[:SHORT_ID]}"


def sanitize(name: str) -> str:
    """The documented rule: characters outside [A-Za-z0-9_.-] become '-', runs of '-' collapse,
    '..' becomes '.', leading/trailing '-' and '.' go, cut to 64 characters (then stripped again).
    The result may still be invalid (an underscore, an empty string...): :func:`machine_name` decides."""
    out = "".join(ch if ch in _KEEP else "-" for ch in name)
    out = re.sub(r"-{2,}", "-", out)
    out = re.sub(r"\.{2,}", ".", out)
    out = out.strip("-.")
    out = out[:HOST_NAME_MAX].strip("-.")
    return out


def machine_name(container_name: str, ref: ContainerRef, taken: frozenset[str] | set[str] = frozenset()) -> str:
    """The machine name of container *ref* called *container_name* (docker's leading '/' dropped):
    the name itself when it is a valid machine name, else :func:`sanitize`'s result when that is
    valid; the fallback ``<runtime>-<12 hex>`` when neither is, when it is ``.host``, or when the
    name is *taken* by another machine."""
    name = container_name[1:] if ref.runtime == DOCKER and container_name.startswith("/") else container_name
    candidate = name if hostname_is_valid(name) else sanitize(name)
    if not hostname_is_valid(candidate) or candidate == HOST_MACHINE_NAME or candidate in taken:
        return ref.fallback_name
    return candidate


def escape(text: str) -> str:
    """*text* for a log line or a message: printable ASCII kept, the rest escaped as Python escapes
    it (``\\n``, ``\\x1b``, ``\\xfc``, ``\\u2028``, ``\\\\``), at most 80 characters shown."""
    out = "".join(ch if " " <= ch <= "~" and ch != "\\" else ch.encode("unicode_escape").decode("ascii")
                  for ch in text[:80])  # fmt: skip
    return out + ("..." if len(text) > 80 else "")

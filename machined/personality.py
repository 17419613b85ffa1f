"""Which systemd-machined machined behaves as: 252 (Debian 12) or 262 (newest upstream).

machined behaves as the systemd it runs under: with PID 1 at 252 (or any version before 257)
it is byte-identical to systemd-machined 252 (introspection, properties, state files, error
messages); under 257 and later it is identical to 262. The daemon decides once at start,
from PID 1's ``Version`` (or from ``--personality``), before any object is built; the core
and the front-ends then ask :func:`is_262`.
"""

from __future__ import annotations

import re

V252 = "252"
V262 = "262"
AUTO = "auto"
CHOICES = (AUTO, V252, V262)
# The first systemd version that machined answers as 262.
FIRST_262 = 257

_current = [V252]


def current() -> str:
    return _current[0]


def is_262() -> bool:
    return _current[0] == V262


def set_personality(value: str) -> None:
    if value not in (V252, V262):
        raise ValueError(f"unknown personality {value!r}")
    _current[0] = value


def from_version(version: str) -> str:
    """The personality for systemd's ``Version`` string ("252.39-1~deb12u2", "262-1",
    "v258-rc1", "systemd 256 (256.7)"...): 262 from :data:`FIRST_262` on, else 252 (also when
    the string holds no version number)."""
    match = re.search(r"\d+", version)
    if match is None:
        return V252
    return V262 if int(match.group(0)) >= FIRST_262 else V252

"""Reading shell-like environment files (os-release, machine-info, state files)."""

from __future__ import annotations

import shlex


def parse_env_file(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines with shell quoting; comments and malformed lines skipped."""
    result: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip()
        if not key.replace("_", "").isalnum():
            continue
        try:
            parts = shlex.split(value, comments=False, posix=True)
        except ValueError:
            continue
        result[key] = " ".join(parts) if parts else ""
    return result


def read_os_release(root: str = "/") -> dict[str, str]:
    """os-release of the tree at *root* (``/etc/os-release``, else ``/usr/lib/os-release``)."""
    base = root.rstrip("/")
    for path in (f"{base}/etc/os-release", f"{base}/usr/lib/os-release"):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return parse_env_file(f.read())
        except FileNotFoundError:
            continue
    raise FileNotFoundError("no os-release")


def env_is_valid(assignments: list[str]) -> bool:
    """Whether every entry is a ``NAME=value`` assignment with a valid variable name."""
    seen = set()
    for entry in assignments:
        name, sep, _ = entry.partition("=")
        if not sep or not name or name[0].isdigit() or not all(c.isalnum() or c == "_" for c in name):
            return False
        if not name.isascii() or name in seen:
            return False
        seen.add(name)
    return True

"""What an image says about itself: hostname, machine ID, machine-info and os-release.

Directory trees are read as they are (symlinks resolved inside the tree); disk
images (raw files, block devices) through their partitions, by systemd-dissect,
which needs loop devices and mounts: that happens in a worker child
(:func:`read_metadata_in_child`). Either way under nspawn's shared lock.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from typing import Any

from machined.envfile import parse_env_file
from machined.errors import BusError
from machined.images.lock import image_path_lock
from machined.images.pool import Image
from machined.naming import hostname_is_valid


def read_metadata(img: Image) -> dict[str, Any]:
    """Hostname, machine ID (hex or ""), machine-info and os-release of an image, under a shared lock."""
    with image_path_lock(img.path, exclusive=False):
        if img.is_tree:
            return _tree_metadata(img.path)
        if img.type in ("raw", "block"):
            return _dissected_metadata(img.path)
    raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))


def read_metadata_in_child(image: dict[str, Any]) -> dict[str, Any]:
    """Worker target: :func:`read_metadata` of the image given by its fields."""
    return read_metadata(Image(**image))


def _tree_metadata(root: str) -> dict[str, Any]:
    return {
        "hostname": _hostname(_read_in(root, "/etc/hostname")),
        "machine_id": _machine_id(_read_in(root, "/etc/machine-id")),
        "machine_info": parse_env_file(_read_in(root, "/etc/machine-info") or ""),
        "os_release": parse_env_file(_read_in(root, "/etc/os-release") or _read_in(root, "/usr/lib/os-release") or ""),
    }


def _read_in(root: str, path: str) -> str | None:
    """Text of *path* inside the tree at *root* (symlinks resolved inside it), None if unreadable."""
    try:
        with open(chase(root, path), encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError:
        return None


def chase(root: str, path: str, max_links: int = 32) -> str:
    """Resolve *path* as if *root* were ``/``: absolute symlinks and ``..`` stay inside *root*."""
    resolved: list[str] = []
    todo = [p for p in path.split("/") if p]
    while todo:
        part = todo.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        if os.path.islink(candidate):
            max_links -= 1
            if max_links < 0:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            todo = [p for p in target.split("/") if p] + todo
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)


def _hostname(text: str | None) -> str:
    """The first hostname line of /etc/hostname, normalized as systemd does ("" if none or invalid)."""
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        cleaned = _hostname_cleanup(line)
        return cleaned if hostname_is_valid(cleaned) else ""
    return ""


def _hostname_cleanup(text: str) -> str:
    out: list[str] = []
    after_dot, after_hyphen = True, True
    for ch in text:
        if len(out) >= 64:
            break
        if ch == ".":
            if after_dot or after_hyphen:
                continue
            after_dot, after_hyphen = True, False
        elif ch == "-":
            if after_dot:
                continue
            after_dot, after_hyphen = False, True
        elif ch.isascii() and ch.isalnum():
            after_dot, after_hyphen = False, False
        else:
            continue
        out.append(ch)
    if out and out[-1] in "-.":
        out.pop()
    return "".join(out)


def _machine_id(text: str | None) -> str:
    """The 32 hex digits of a machine-id file, "" if it holds none."""
    if text is None:
        return ""
    value = text.removesuffix("\n")
    if len(value) == 32 and all(c in "0123456789abcdefABCDEF" for c in value):
        return value.lower()
    return ""


def _dissected_metadata(path: str) -> dict[str, Any]:
    """Metadata of a disk image through its partitions, as systemd-dissect finds them."""
    proc = subprocess.run(
        ["systemd-dissect", "--json=short", "--read-only", path],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        code = _dissect_errno(proc.stderr)
        raise BusError.from_errno(code, f"Failed to read image metadata: {os.strerror(code)}")
    data = json.loads(proc.stdout)
    if not data.get("osRelease"):  # 262 wants the image to pass os-release validation
        raise BusError.from_errno(errno.ENOMEDIUM, f"Failed to read image metadata: {os.strerror(errno.ENOMEDIUM)}")
    return {
        "hostname": data.get("hostname") or "",
        "machine_id": data.get("machineId") or "",
        "machine_info": _pairs(data.get("machineInfo")),
        "os_release": _pairs(data.get("osRelease")),
    }


# What systemd-dissect says when it cannot dissect an image, and the errno behind each message
# (the errno 262's machined answers with, as it dissects the image itself).
_DISSECT_ERRORS = (
    ("Couldn't identify a suitable partition table or file system", errno.ENOPKG),
    ("does not pass os-release/extension-release validation", errno.ENOMEDIUM),
    ("No suitable root partition found", errno.ENXIO),
    ("No root partition discovered", errno.ENXIO),
    ("No root/usr partition for specified root/usr hash found", errno.EADDRNOTAVAIL),
    ("Multiple suitable root partitions found", errno.ENOTUNIQ),
    ("partition scanning turned off", errno.EPROTONOSUPPORT),
    ("Image is not a block device", errno.ENOTBLK),
)


def _dissect_errno(stderr: str) -> int:
    """The errno behind systemd-dissect's failure: from its own messages, else from the
    ``…: <strerror>`` its last line ends with (no loop device free: EBUSY), else EIO."""
    for message, code in _DISSECT_ERRORS:
        if message in stderr:
            return code
    lines = [line.strip().rstrip(".") for line in stderr.splitlines() if line.strip()]
    if lines:
        for code in sorted(errno.errorcode):
            if lines[-1].endswith(": " + os.strerror(code)):
                return code
    return errno.EIO


def _pairs(assignments: list[str] | None) -> dict[str, str]:
    """``KEY=VALUE`` strings (as systemd-dissect prints them) as a dict."""
    return dict(a.split("=", 1) for a in assignments or [] if "=" in a)

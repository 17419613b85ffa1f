"""Name rules and escapings that clients rely on, as systemd 252 defines them.

Pure functions, no I/O: machine-name validation (hostname rules), object-path
label escaping (sd-bus ``bus_label_escape``) and unit-name escaping
(``unit_name_escape``), plus the object paths and scope names built from them.
"""

from __future__ import annotations

import string

HOST_NAME_MAX = 64
MACHINE_PATH_PREFIX = "/org/freedesktop/machine1/machine"
IMAGE_PATH_PREFIX = "/org/freedesktop/machine1/image"
HOST_MACHINE_NAME = ".host"

_LDH = frozenset(string.ascii_letters + string.digits + "-")
_UNIT_KEEP = frozenset(string.ascii_letters + string.digits + ":_.")
_HEX = frozenset(string.hexdigits)


def hostname_is_valid(name: str) -> bool:
    """True if *name* is a valid machine name: hostname rules, at most 64 bytes.

    Labels of letters, digits and inner hyphens, separated by single dots; no
    leading or trailing dot. Underscores are refused, as systemd's code does.
    """
    if not name or len(name.encode("utf-8", "surrogatepass")) > HOST_NAME_MAX:
        return False
    for label in name.split("."):
        if not label or not set(label) <= _LDH:
            return False
        if label[0] == "-" or label[-1] == "-":
            return False
    return True


def bus_label_escape(label: str) -> str:
    """Escape *label* for use as one object-path element (``.host`` → ``_2ehost``)."""
    if not label:
        return "_"
    out = []
    for i, byte in enumerate(label.encode("utf-8", "surrogateescape")):
        ch = chr(byte)
        if ch in string.ascii_letters or (i > 0 and ch in string.digits):
            out.append(ch)
        else:
            out.append(f"_{byte:02x}")
    return "".join(out)


def bus_label_unescape(element: str) -> str:
    """Reverse :func:`bus_label_escape`; a lone ``_`` is the empty string."""
    if element == "_":
        return ""
    raw = bytearray()
    i = 0
    while i < len(element):
        ch = element[i]
        pair = element[i + 1 : i + 3]
        if ch == "_" and len(pair) == 2 and set(pair) <= _HEX:
            raw.append(int(element[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(ch.encode("utf-8"))
            i += 1
    return raw.decode("utf-8", "surrogateescape")


def unit_name_escape(name: str) -> str:
    """Escape *name* for a unit name: ``-`` → ``\\x2d``, a leading ``.`` → ``\\x2e``."""
    out = []
    for i, byte in enumerate(name.encode("utf-8", "surrogateescape")):
        ch = chr(byte)
        if ch == "/":
            out.append("-")
        elif (i == 0 and ch == ".") or ch not in _UNIT_KEEP:
            out.append(f"\\x{byte:02x}")
        else:
            out.append(ch)
    return "".join(out)


def machine_object_path(name: str) -> str:
    return f"{MACHINE_PATH_PREFIX}/{bus_label_escape(name)}"


def image_object_path(name: str) -> str:
    return f"{IMAGE_PATH_PREFIX}/{bus_label_escape(name)}"


def machine_scope_name(name: str) -> str:
    """The scope unit CreateMachine starts for machine *name*."""
    return f"machine-{unit_name_escape(name)}.scope"


def path_is_valid_absolute(path: str) -> bool:
    """Absolute and a valid path: shorter than PATH_MAX, no name over 255 bytes (``//``, ``.`` and
    ``..`` allowed)."""
    if not path.startswith("/") or len(path.encode()) >= 4096:
        return False
    return all(len(part.encode()) <= 255 for part in path.split("/"))


def path_is_normalized_absolute(path: str) -> bool:
    """Absolute, without ``.`` or ``..`` components and without ``//`` (trailing ``/`` allowed)."""
    if not path.startswith("/") or "//" in path or len(path.encode()) >= 4096:
        return False
    return all(part not in (".", "..") and len(part.encode()) <= 255 for part in path.split("/"))

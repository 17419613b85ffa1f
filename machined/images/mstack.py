"""``.mstack`` images (systemd 262, what ``importctl pull-oci`` stores): a directory of layers.

Its entries: ``layer@KEY`` (read-only overlay layers, in version order of KEY), ``rw``
(the writable upper layer), ``root`` (a root tree), ``bind@PATH``/``robind@PATH``
(bind mounts, PATH escaped as in unit names); each a directory, a ``.raw`` file, a
block device or a ``.v`` versioned directory of those. Entries starting with ``.``
are ignored. machined only needs to know whether such a stack is read-only: a stack
it cannot make sense of (an unknown entry, one given twice, a ``.v`` without a
usable version) counts as read-only, as in systemd.
"""

from __future__ import annotations

import os
import stat

from machined.images import vpick


class BadStack(Exception):
    """The directory is no stack systemd would assemble."""


def _unescape_path(escaped: str) -> str:
    """A unit-name escaped path (``-`` for ``/``, ``\\xNN`` for other bytes) as a path."""
    if escaped == "-":
        return "/"
    if escaped.startswith("-") or escaped.endswith("-") or "--" in escaped:
        raise BadStack(escaped)
    out = bytearray()
    i = 0
    raw = escaped.encode("utf-8", "surrogateescape")
    while i < len(raw):
        c = raw[i]
        if c == ord("-"):
            out += b"/"
        elif c == ord("\\"):
            if raw[i + 1 : i + 2] != b"x" or len(raw) < i + 4:
                raise BadStack(escaped)
            try:
                out.append(int(raw[i + 2 : i + 4], 16))
            except ValueError:
                raise BadStack(escaped) from None
            i += 3
        else:
            out.append(c)
        i += 1
    path = "/" + out.decode("utf-8", "surrogateescape")
    if any(part in (".", "..") for part in path.split("/")[1:]):
        raise BadStack(escaped)
    return path


def _entry(directory: str, filename: str) -> tuple[str, str, os.stat_result]:
    """(name without its suffixes, path and stat of what the entry stands for) of one entry."""
    path = os.path.join(directory, filename)
    try:
        st = os.stat(path)
    except OSError as e:
        raise BadStack(filename) from e
    if stat.S_ISDIR(st.st_mode):
        if not filename.endswith(".v"):
            return filename, path, st
        raw = filename.endswith(".raw.v")
        stem = filename[: -len(".raw.v")] if raw else filename[: -len(".v")]
        types = (stat.S_ISREG,) if raw else (stat.S_ISDIR, stat.S_ISBLK)
        try:
            picked = vpick.pick(path, stem, ".raw" if raw else "", types, tries=False)
        except OSError as e:
            raise BadStack(filename) from e
        if picked is None:
            raise BadStack(filename)
        return stem, *picked
    if stat.S_ISREG(st.st_mode):
        if not filename.endswith(".raw"):
            raise BadStack(filename)
        return filename[: -len(".raw")], path, st
    if stat.S_ISBLK(st.st_mode):
        return filename, path, st
    raise BadStack(filename)


def is_read_only(path: str) -> bool:
    """Whether the stack at *path* has no writable part (or is no stack at all)."""
    try:
        return _is_read_only(path)
    except (BadStack, OSError):
        return True


def _is_read_only(path: str) -> bool:
    layers: dict[str, str] = {}  # sort key → path
    singles: dict[str, str] = {}  # rw, root → path
    binds: dict[str, bool] = {}  # where → writable
    for filename in os.listdir(path):
        if filename.startswith("."):
            continue
        name, what, _ = _entry(path, filename)
        if name.startswith("layer@") and len(name) > len("layer@"):
            key = name[len("layer@") :]
            if key in layers:
                raise BadStack(filename)
            layers[key] = what
        elif name in ("rw", "root"):
            if name in singles:
                raise BadStack(filename)
            singles[name] = what
        elif (name.startswith("bind@") and len(name) > 5) or (name.startswith("robind@") and len(name) > 7):
            kind, _, escaped = name.partition("@")
            where = _unescape_path(escaped)
            if where in binds:
                raise BadStack(filename)
            binds[where] = kind == "bind"
        else:
            raise BadStack(filename)
    has_rw, has_root = "rw" in singles, "root" in singles
    if "/" in binds or (has_root and "/usr" in binds):  # the overlay is hidden entirely
        layers.clear()
        has_rw = False
    if len(layers) + has_rw == 1:  # a single layer becomes a bind mount (of /usr/ under a root)
        if has_root:  # ... of its usr/ directory, which it must have
            single = singles["rw"] if has_rw else next(iter(layers.values()))
            st = os.lstat(os.path.join(single, "usr"))
            if not stat.S_ISDIR(st.st_mode):
                raise BadStack(single)
        binds["/usr" if has_root else "/"] = has_rw
        layers.clear()
        has_rw = False
    if "/" in binds:
        has_root = False
    if not layers and not has_rw and "/" not in binds and not has_root:
        return False  # an empty tmpfs root
    return not (has_root or has_rw or any(binds.values()))

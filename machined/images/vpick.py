"""Versioned image directories as systemd 262 reads them (``NAME.v/NAME_VERSION[_ARCH][+TRIES]SUFFIX``).

A ``.v`` directory holds several versions of one image; the one used is picked by
these rules, in order: an entry with tries left beats one without (``+0``), a newer
version beats an older one (systemd's version comparison), the native architecture
beats the secondary one, which beats an entry without one (entries for any other
known architecture are ignored), more tries left win, fewer tries done win, and last
the larger file name. The picked entry must be of the wanted inode type, or nothing is
picked at all (an older entry does not stand in for it).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import stat
from collections.abc import Callable
from typing import Any

UINT_MAX = 2**32 - 1

ARCHITECTURES = frozenset(
    "arm64 arm64-be arm arm-be alpha arc arc-be cris x86-64 x86 ia64 loongarch64 m68k mips64-le mips64 "
    "mips-le mips nios2 parisc64 parisc ppc64-le ppc64 ppc ppc-le riscv32 riscv64 s390x s390 sh64 sh "
    "sparc64 sparc tilegx".split()
)

# uname's machine → (native, secondary) architecture names; others have no secondary one
_LOCAL = {
    "x86_64": ("x86-64", "x86"),
    "aarch64": ("arm64", "arm"),
    "aarch64_be": ("arm64-be", "arm-be"),
    "ppc64le": ("ppc64-le",),
    "ppc64": ("ppc64", "ppc"),
    "s390x": ("s390x", "s390"),
    "i686": ("x86",),
    "i586": ("x86",),
    "i486": ("x86",),
    "i386": ("x86",),
    "riscv64": ("riscv64",),
    "loongarch64": ("loongarch64",),
}

_VERSION_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.~^")

# inode types of a filter: the stat predicates of what may be picked
InodeTypes = tuple[Callable[[int], bool], ...]
DIRECTORY: InodeTypes = (stat.S_ISDIR,)
RAW: InodeTypes = (stat.S_ISREG, stat.S_ISBLK)


def local_architectures() -> tuple[str | None, ...]:
    """Architectures in order of preference; None (no architecture in the name) last."""
    machine = platform.machine()
    return (*_LOCAL.get(machine, (machine.replace("_", "-"),)), None)


def version_is_valid(version: str) -> bool:
    return bool(version) and "/" not in version and set(version) <= _VERSION_CHARS


def _is_alpha(c: str) -> bool:
    return ("a" <= c <= "z") or ("A" <= c <= "Z")


def _cmp(a: Any, b: Any) -> int:
    return int(a > b) - int(a < b)


def verscmp(a: str, b: str) -> int:
    """systemd's version comparison (<0: *a* older, 0: same, >0: *a* newer): segments of digits or
    letters; ``~`` marks a pre-release (older), ``-`` a release (older than ``^`` and ``.``)."""
    if not a or not b:
        return _cmp(a, b)
    valid = _VERSION_CHARS
    i = j = 0
    na, nb = len(a), len(b)

    def at(s: str, k: int) -> str:
        return s[k] if k < len(s) else ""

    while True:
        while i < na and a[i] not in valid:
            i += 1
        while j < nb and b[j] not in valid:
            j += 1
        if at(a, i) == "~" or at(b, j) == "~":
            r = _cmp(at(a, i) != "~", at(b, j) != "~")
            if r:
                return r
            i, j = i + 1, j + 1
        if i >= na or j >= nb:
            return _cmp(at(a, i), at(b, j))
        for mark in "-^.":
            if at(a, i) == mark or at(b, j) == mark:
                r = _cmp(at(a, i) != mark, at(b, j) != mark)
                if r:
                    return r
                i, j = i + 1, j + 1
        if at(a, i).isdigit() or at(b, j).isdigit():
            while at(a, i) == "0":
                i += 1
            while at(b, j) == "0":
                j += 1
            ea, eb = i, j
            while at(a, ea).isdigit():
                ea += 1
            while at(b, eb).isdigit():
                eb += 1
            r = _cmp(ea - i, eb - j) or _cmp(a[i:ea], b[j:eb])
            if r:
                return r
        else:
            ea, eb = i, j
            while _is_alpha(at(a, ea)):
                ea += 1
            while _is_alpha(at(b, eb)):
                eb += 1
            n = min(ea - i, eb - j)
            r = _cmp(a[i : i + n], b[j : j + n]) or _cmp(ea - i, eb - j)
            if r:
                return r
        i, j = ea, eb


def parse_tries(s: str) -> tuple[int, int] | None:
    """``+LEFT`` or ``+LEFT-DONE`` → (left, done); None if *s* is no such suffix."""
    if not s.startswith("+"):
        return None
    left, sep, done = s[1:].partition("-")
    if not left.isascii() or not left.isdigit():
        return None
    if not sep:
        done = "0"
    elif not done.isascii() or not done.isdigit():
        return None
    if int(left) > UINT_MAX or int(done) > UINT_MAX:
        return None
    return int(left), int(done)


@dataclasses.dataclass
class _Candidate:
    filename: str
    version: str
    arch_index: int
    tries_left: int
    tries_done: int

    def better_than(self, best: _Candidate, tries: bool) -> bool:
        d = _cmp(self.tries_left != 0, best.tries_left != 0) if tries else 0
        d = d or verscmp(self.version, best.version)
        d = d or -_cmp(self.arch_index, best.arch_index)
        if tries:
            d = d or _cmp(self.tries_left, best.tries_left)
            d = d or -_cmp(self.tries_done, best.tries_done)
        d = d or _cmp(os.fsencode(self.filename), os.fsencode(best.filename))
        return d >= 0


def _candidate(
    filename: str, basename: str, suffix: str, architectures: tuple[str | None, ...], tries: bool
) -> _Candidate | None:
    if basename:
        if not filename.startswith(basename + "_"):
            return None
        rest = filename[len(basename) + 1 :]
    else:
        rest = filename
    if suffix:
        if not rest.endswith(suffix):
            return None
        rest = rest[: -len(suffix)]
    left = done = UINT_MAX
    plus = rest.rfind("+") if tries else -1
    if plus >= 0:
        parsed = parse_tries(rest[plus:])
        if parsed is not None:
            (left, done), rest = parsed, rest[:plus]
    underscore = rest.rfind("_")
    arch = rest[underscore + 1 :] if underscore >= 0 else None
    if arch not in ARCHITECTURES:
        arch = None
    if arch not in architectures:
        return None
    if underscore >= 0:
        rest = rest[:underscore]
    if not version_is_valid(rest):
        return None
    return _Candidate(filename, rest, architectures.index(arch), left, done)


def pick(
    directory: str, basename: str, suffix: str, types: InodeTypes, tries: bool = True
) -> tuple[str, os.stat_result] | None:
    """The entry of the versioned *directory* to use, as (path, stat of what it points to); None
    if none fits or the best one is not of one of *types* (stat predicates: :data:`DIRECTORY`,
    :data:`RAW`). *tries*: whether ``+LEFT-DONE`` suffixes count (they do for images, not for
    a stack's layers). Raises OSError if *directory* cannot be read."""
    architectures = local_architectures()
    best: _Candidate | None = None
    for filename in os.listdir(directory):
        found = _candidate(filename, basename, suffix, architectures, tries)
        if found is not None and (best is None or found.better_than(best, tries)):
            best = found
    if best is None:
        return None
    path = os.path.join(directory, best.filename)
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not any(is_type(st.st_mode) for is_type in types):
        return None
    return path, st

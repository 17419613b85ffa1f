"""UID/GID translation between a container and the host, from its uid_map/gid_map."""

from __future__ import annotations

INVALID_IDS = (0xFFFFFFFF, 0xFFFF)  # (uid_t) -1 and the 16-bit -1 are never valid IDs


def id_is_valid(value: int) -> bool:
    return value not in INVALID_IDS


def parse_map(text: str) -> list[tuple[int, int, int]]:
    """``inside outside count`` lines of /proc/PID/uid_map or gid_map."""
    ranges = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 3:
            raise OSError(5, "Input/output error")  # EIO, as a malformed map file is for upstream
        ranges.append((int(fields[0]), int(fields[1]), int(fields[2])))
    return ranges


def read_map(leader: int, kind: str) -> list[tuple[int, int, int]]:
    with open(f"/proc/{leader}/{kind}_map", encoding="ascii") as f:
        return parse_map(f.read())


def to_host(ranges: list[tuple[int, int, int]], inner: int) -> int | None:
    """The host ID of container ID *inner*, or None when no range maps it."""
    for base, shift, count in ranges:
        if base <= inner < base + count:
            converted = inner - base + shift
            return converted if id_is_valid(converted) else None
    return None


def to_container(ranges: list[tuple[int, int, int]], outer: int) -> int | None:
    """The container ID of host ID *outer*; identity-mapped ranges (outside start 0) are skipped."""
    for base, shift, count in ranges:
        if shift == 0:
            continue
        if shift <= outer < shift + count:
            converted = outer - shift + base
            return converted if id_is_valid(converted) else None
    return None

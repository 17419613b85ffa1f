"""Reading shell-like environment files (os-release, machine-info, state files)."""

from __future__ import annotations


def parse_env_file(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines as systemd's env-file reader takes them.

    Unquoted values lose leading and trailing blanks and take a backslash as
    "next character literally"; single quotes are literal; in double quotes a
    backslash escapes only ``"``, ``\\``, `` ` `` and ``$``; a backslash before a
    newline continues the line. Comment lines start with ``#`` or ``;``.
    """
    result: dict[str, str] = {}
    for key, value in _assignments(text):
        if key and all(c.isalnum() or c == "_" for c in key) and not key[0].isdigit():
            result[key] = value
    return result


def _assignments(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n":
            i += 1
        if i >= n:
            break
        if text[i] in "#;":
            while i < n and text[i] != "\n":
                i += 2 if text[i] == "\\" else 1
            continue
        key_start = i
        while i < n and text[i] not in "=\n":
            i += 1
        if i >= n or text[i] == "\n":
            continue  # a line without "=" is ignored
        key = text[key_start:i].strip()
        i += 1
        while i < n and text[i] in " \t":
            i += 1
        value: list[str] = []
        trailing_blanks = 0  # unquoted blanks at the end, trimmed if the line ends there
        while i < n and text[i] != "\n":
            c = text[i]
            if c == "'":
                end = text.find("'", i + 1)
                end = n if end < 0 else end
                value.append(text[i + 1 : end])
                trailing_blanks = 0
                i = end + 1
            elif c == '"':
                i += 1
                while i < n and text[i] != '"':
                    if text[i] == "\\" and i + 1 < n:
                        nxt = text[i + 1]
                        if nxt in '"\\`$':
                            value.append(nxt)
                        elif nxt != "\n":
                            value.append("\\" + nxt)
                        i += 2
                    else:
                        value.append(text[i])
                        i += 1
                trailing_blanks = 0
                i += 1
            elif c == "\\":
                if i + 1 < n and text[i + 1] != "\n":
                    value.append(text[i + 1])
                trailing_blanks = 0
                i += 2
            else:
                value.append(c)
                trailing_blanks = trailing_blanks + 1 if c in " \t\r" else 0
                i += 1
        joined = "".join(value)
        out.append((key, joined[: len(joined) - trailing_blanks] if trailing_blanks else joined))
    return out


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

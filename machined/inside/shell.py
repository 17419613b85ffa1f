"""What OpenShell runs: the requested program, or the user's login shell (no D-Bus, no I/O)."""

from __future__ import annotations

LOGIN_SHELL_SCRIPT = (
    'shell=$(getent passwd {user} 2>/dev/null | {{ IFS=: read _ _ _ _ _ _ x; echo "$x"; }})\n'
    'exec "${{shell:-/bin/sh}}" -l'
)


def shell_command(user: str, path: str, args: list[str]) -> tuple[str, list[str]]:
    """(program, argv) for OpenShell: the user's login shell when no path is given."""
    if not path:
        return "/bin/sh", ["sh", "-c", LOGIN_SHELL_SCRIPT.format(user=user)]
    return path, list(args) if args else [path]

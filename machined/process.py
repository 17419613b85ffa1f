"""Facts about processes by PID."""

from __future__ import annotations

import os


def process_exists(pid: int) -> bool:
    """Whether a process *pid* exists (zombies included)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

"""Start the daemon without what it never uses: imported first by the command line.

asyncio imports :mod:`ssl` (for TLS transports) and dbus-fast imports :mod:`hashlib`, which
loads OpenSSL's libcrypto through ``_hashlib``: together some 5 MiB of resident memory that a
daemon speaking D-Bus and varlink over Unix sockets never uses. argparse imports :mod:`shutil`,
which loads bz2 and lzma (and their libraries) only to tell whether it could make such archives
(another 0.25 MiB). While these are imported here, ``ssl``, ``_hashlib``, ``bz2`` and ``lzma``
are unavailable, so asyncio goes without TLS, hashlib uses Python's own hash implementations and
shutil makes no bz2 or xz archives; afterwards they may be imported again by whatever really
needs them. In a process that imported asyncio already (tests, other programs) this does nothing.
"""

from __future__ import annotations

import sys


def import_lean() -> None:
    if "asyncio" in sys.modules:
        return
    blocked = [name for name in ("ssl", "_ssl", "_hashlib", "bz2", "lzma") if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # "import ssl" raises ImportError
    try:
        import asyncio  # noqa: F401
        import hashlib  # noqa: F401
        import shutil  # noqa: F401

        import dbus_fast  # noqa: F401
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


import_lean()

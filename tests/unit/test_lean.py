"""The daemon's start-up imports: no OpenSSL, no libsystemd, no bz2/lzma, and nothing kept from
whoever needs them later."""

from __future__ import annotations

import subprocess
import sys

CHECK = r"""
import sys
import machined.cli, machined.daemon
loaded = [m for m in ("ssl", "_ssl", "_hashlib", "bz2", "lzma", "systemd", "tempfile") if m in sys.modules]
assert not loaded, loaded
maps = open("/proc/self/maps").read()
assert "libcrypto" not in maps and "libssl" not in maps and "libsystemd" not in maps, "a library is mapped"
import hashlib, shutil, ssl, bz2  # still there for whoever needs them
assert hashlib.sha256(b"x").hexdigest().startswith("2d711642")
print("ok")
"""


def test_the_daemon_starts_without_openssl_libsystemd_or_archives() -> None:
    r = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr

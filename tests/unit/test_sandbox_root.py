"""The forky root's cache (machined.sandbox.root): the mirror from apt's configuration, and
atomic, locked, self-repairing builds (with a fake debootstrap)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from machined.sandbox import root as R

pytestmark = pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="needs dpkg-query (Debian)")


# ----- the mirror -------------------------------------------------------------------------


def _apt(tmp_path: Path, sources_list: str = "", parts: dict[str, str] | None = None) -> Path:
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    if sources_list:
        (apt / "sources.list").write_text(sources_list)
    for name, text in (parts or {}).items():
        (apt / "sources.list.d" / name).write_text(text)
    return apt


def test_mirror_from_deb822_skips_security_disabled_and_source_stanzas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(R.MIRROR_ENV, raising=False)
    apt = _apt(
        tmp_path,
        parts={
            "a.sources": (
                "Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\n\n"
                "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n"
                "Enabled: no\nTypes: deb\nURIs: http://off.example/debian\nSuites: bookworm\n\n"
                "Types: deb\n# a comment\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
            ),
            "b.list.disabled-by-someone": "deb http://ignored.example/debian bookworm main\n",
        },
    )
    assert R.debian_mirror(apt) == "http://mirror.example/debian"


def test_mirror_from_one_line_sources_with_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(R.MIRROR_ENV, raising=False)
    apt = _apt(
        tmp_path,
        sources_list=(
            "# deb http://commented.example/debian bookworm main\n"
            "deb http://security.example/debian-security bookworm-security main\n"
            "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://one.example/debian bookworm main\n"
        ),
    )
    assert R.debian_mirror(apt) == "http://one.example/debian"


def test_mirror_override_and_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    apt = _apt(tmp_path)
    monkeypatch.delenv(R.MIRROR_ENV, raising=False)
    with pytest.raises(R.RootError, match="no Debian mirror"):
        R.debian_mirror(apt)
    monkeypatch.setenv(R.MIRROR_ENV, "http://override.example/debian")
    assert R.debian_mirror(apt) == "http://override.example/debian"


def test_recipe_stamp_follows_the_package_list(monkeypatch: pytest.MonkeyPatch) -> None:
    stamp = R.recipe_stamp()
    assert stamp == R.recipe_stamp() and len(stamp) == 12
    monkeypatch.setattr(R, "INCLUDE", (*R.INCLUDE, "extra-package"))
    assert R.recipe_stamp() != stamp
    assert R.root_dir().name == f"forky-{R.recipe_stamp()}"


# ----- builds with a fake debootstrap -----------------------------------------------------

FAKE_DEBOOTSTRAP = """#!/bin/sh
# fake debootstrap: ... SUITE DIR MIRROR SCRIPT
for last; do :; done
dir=$(eval echo \\${$(($# - 2))})
echo run >> "$FAKE_COUNT"
sleep "${FAKE_SLEEP:-0}"
[ -n "$FAKE_FAIL" ] && { echo "E: fake failure"; exit 1; }
mkdir -p "$dir/usr/lib/systemd" "$dir/var/lib/dpkg" "$dir/var/cache/apt/archives"
touch "$dir/usr/lib/systemd/systemd" "$dir/usr/lib/systemd/systemd-machined" "$dir/var/cache/apt/archives/x.deb"
printf 'Package: systemd\\nStatus: install ok installed\\nVersion: 262.1-2\\nArchitecture: amd64\\nMaintainer: x\\nDescription: x\\n' \\
  > "$dir/var/lib/dpkg/status"
echo "I: Base system installed successfully."
"""


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "debootstrap"
    script.write_text(FAKE_DEBOOTSTRAP)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "sid").write_text("")
    count = tmp_path / "count"
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_COUNT", str(count))
    monkeypatch.setenv(R.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(R.MIRROR_ENV, "http://mirror.example/debian")
    monkeypatch.setattr(R, "DEBOOTSTRAP_SCRIPT", str(tmp_path / "sid"))
    monkeypatch.setattr(R.os, "geteuid", lambda: 0)
    monkeypatch.setattr(R.os, "sync", lambda: None)

    def runs() -> int:
        return len(count.read_text().splitlines()) if count.exists() else 0

    return runs


def _quiet(line: str) -> None:
    pass


def test_first_use_builds_then_the_cache_answers(fake: Callable[[], int]) -> None:
    assert R.cached_root() is None
    root = R.ensure_root(log=_quiet)
    assert fake() == 1
    assert root.path == R.root_dir() and root.systemd_version == "262.1"
    m = json.loads((root.path / R.MANIFEST).read_text())
    assert m["packages"] == {"systemd": "262.1-2"} and m["mirror"] == "http://mirror.example/debian"
    assert m["recipe"] == R.recipe_stamp() and m["size_bytes"] > 0 and m["build_seconds"] >= 0
    assert not list((root.rootfs / "var/cache/apt/archives").glob("*.deb"))
    assert [p.name for p in R.cache_dir().iterdir() if p.name != ".lock"] == [root.path.name]
    again = R.ensure_root(log=_quiet)
    assert fake() == 1 and again.path == root.path


@pytest.mark.parametrize("damage", ["manifest", "systemd", "machined"])
def test_an_incomplete_tree_is_rebuilt(fake: Callable[[], int], damage: str) -> None:
    root = R.ensure_root(log=_quiet)
    victim = {
        "manifest": root.path / R.MANIFEST,
        "systemd": root.rootfs / "usr/lib/systemd/systemd",
        "machined": root.rootfs / "usr/lib/systemd/systemd-machined",
    }[damage]
    victim.unlink()
    assert R.cached_root() is None
    R.ensure_root(log=_quiet)
    assert fake() == 2 and R.cached_root() is not None


def test_a_failed_build_leaves_no_tree_but_its_log(fake, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_FAIL", "1")
    with pytest.raises(R.RootError, match="debootstrap failed"):
        R.ensure_root(log=_quiet)
    names = sorted(p.name for p in R.cache_dir().iterdir())
    assert names == [".lock", f"{R.root_dir().name}.failed.log"]
    assert "fake failure" in (R.cache_dir() / names[1]).read_text()
    monkeypatch.delenv("FAKE_FAIL")
    assert R.ensure_root(log=_quiet).systemd_version == "262.1"


def test_leftovers_of_a_dead_build_are_removed(fake: Callable[[], int]) -> None:
    stale = R.cache_dir() / f".{R.root_dir().name}.tmp-999999"
    (stale / "rootfs/etc").mkdir(parents=True)
    R.ensure_root(log=_quiet)
    assert not stale.exists()


def test_parallel_callers_build_once(fake, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_SLEEP", "0.5")
    results: list[R.Root] = []
    threads = [threading.Thread(target=lambda: results.append(R.ensure_root(log=_quiet))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake() == 1 and len(results) == 3 and len({r.path for r in results}) == 1


def test_rebuild_replaces_the_tree(fake: Callable[[], int]) -> None:
    R.ensure_root(log=_quiet)
    (R.root_dir() / "rootfs/marker").write_text("old")
    R.ensure_root(log=_quiet, rebuild=True)
    assert fake() == 2 and not (R.root_dir() / "rootfs/marker").exists()


def test_removal_refuses_paths_outside_the_cache(fake: Callable[[], int], tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(R.RootError, match="refusing"):
        R._remove_tree(outside)
    assert outside.exists()


def test_a_failed_rebuild_keeps_the_complete_tree(fake, monkeypatch: pytest.MonkeyPatch) -> None:
    root = R.ensure_root(log=_quiet)
    monkeypatch.setenv("FAKE_FAIL", "1")
    with pytest.raises(R.RootError):
        R.ensure_root(log=_quiet, rebuild=True)
    again = R.cached_root()
    assert again is not None and again.path == root.path
    assert not list(R.cache_dir().glob(".forky-*"))

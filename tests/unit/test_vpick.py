"""Picking the version of a versioned image directory as systemd 262 does (machined.images.vpick),
with the orders and suffixes observed on real systemd-machined 262 (tests/integration262/test_images262)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from machined.images import vpick
from machined.images.vpick import parse_tries, verscmp, version_is_valid

# systemd's documented order, oldest first
ORDERED = ["122.1", "123~rc1-1", "123", "123-a", "123-a.1", "123-1", "123-1.1", "123^post1", "123.a-1",
           "123.1-1", "123a-1", "124-1"]  # fmt: skip


def test_version_order() -> None:
    for i, a in enumerate(ORDERED):
        for j, b in enumerate(ORDERED):
            r = verscmp(a, b)
            assert (r > 0) - (r < 0) == (i > j) - (i < j), (a, b)
    assert verscmp("1.10", "1.9") > 0 and verscmp("01", "1") == 0 and verscmp("1a", "1.a") > 0
    assert verscmp("", "1") < 0 and verscmp("1", "") > 0 and verscmp("", "") == 0
    assert verscmp("1_2", "12") < 0  # characters outside the version alphabet separate segments


@pytest.mark.parametrize(
    ("version", "valid"),
    [("1~rc", True), ("1^p", True), ("a", True), ("-1", True), (".1", True), ("1.10-1", True),
     ("", False), ("1%", False), ("1:2", False), ("1,2", False), ("1 2", False), ("1+x", False),
     ("1_2", False), ("1é", False), ("a/b", False)],
)  # fmt: skip
def test_version_alphabet_is_262s(version: str, valid: bool) -> None:
    assert version_is_valid(version) is valid


def test_tries_suffix() -> None:
    assert parse_tries("+3") == (3, 0) and parse_tries("+0-5") == (0, 5)
    assert parse_tries("+4294967295") == (2**32 - 1, 0)
    for bad in ("+", "+x", "+-1", "+1-", "+1-x", "+99999999999", "3", "+１"):
        assert parse_tries(bad) is None, bad


def _dirs(top: Path, *names: str) -> Path:
    for name in names:
        (top / name).mkdir(parents=True)
    return top


def _picked(top: Path, basename: str, suffix: str = "", types: vpick.InodeTypes = vpick.DIRECTORY) -> str | None:
    picked = vpick.pick(str(top), basename, suffix, types)
    return None if picked is None else os.path.basename(picked[0])


def test_pick_prefers_tries_left_then_version_then_architecture_then_tries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vpick.platform, "machine", lambda: "x86_64")
    assert _picked(_dirs(tmp_path / "a", "x_1", "x_2+0-3", "x_1.5+3"), "x") == "x_1.5+3"
    assert _picked(_dirs(tmp_path / "b", "x_1+0", "x_0+1"), "x") == "x_0+1"
    assert _picked(_dirs(tmp_path / "c", "x_3+2-1", "x_3+5", "x_3+2", "x_2"), "x") == "x_3+5"
    assert _picked(_dirs(tmp_path / "d", "x_1+0", "x_1+0-5", "x_0"), "x") == "x_0"
    assert _picked(_dirs(tmp_path / "e", "x_1+0", "x_1+0-5"), "x") == "x_1+0"
    assert _picked(_dirs(tmp_path / "f", "x_1_arm64", "x_1_x86-64", "x_2_arm64", "x_0_x86"), "x") == "x_1_x86-64"
    assert _picked(_dirs(tmp_path / "g", "x_5", "x_5_x86-64", "x_5_x86"), "x") == "x_5_x86-64"
    assert _picked(_dirs(tmp_path / "h", "x_5", "x_5_x86"), "x") == "x_5_x86"
    assert _picked(_dirs(tmp_path / "i", "x_1.10", "x_1.9", "x_1.10~rc", "x_1.10-1"), "x") == "x_1.10-1"
    assert _picked(_dirs(tmp_path / "j", "x", "other", "y_1"), "x") is None
    assert _picked(_dirs(tmp_path / "k", "x_1_2"), "x") == "x_1_2"  # an unknown "architecture" is cut off
    assert _picked(_dirs(tmp_path / "l", "x_1+x", "x_1%"), "x") is None


def test_pick_of_files_and_the_wrong_type(tmp_path: Path) -> None:
    top = tmp_path / "r.raw.v"
    top.mkdir()
    for name in ("r_1.raw", "r_2.raw", "r_3.img"):
        (top / name).write_bytes(b"")
    assert _picked(top, "r", ".raw", vpick.RAW) == "r_2.raw"
    (top / "r_4.raw").mkdir()  # the best one is of the wrong type: nothing is picked
    assert _picked(top, "r", ".raw", vpick.RAW) is None
    assert _picked(_dirs(tmp_path / "m", "m_1.mstack", "m_0"), "m") == "m_1.mstack"


def test_pick_without_tries_keeps_the_plus(tmp_path: Path) -> None:
    top = _dirs(tmp_path / "l.v", "layer@1_1", "layer@1_2+3")
    assert vpick.pick(str(top), "layer@1", "", vpick.DIRECTORY, tries=False) is not None
    assert _picked(top, "layer@1") == "layer@1_2+3"
    assert os.path.basename(vpick.pick(str(top), "layer@1", "", vpick.DIRECTORY, tries=False)[0]) == "layer@1_1"  # type: ignore[index]

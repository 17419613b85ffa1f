"""The image pool under the 262 personality, without a daemon: ``.mstack`` stacks and versioned
``.v`` directories on a search path of temporary directories (what real 262 does with the same
trees is checked in tests/integration262/test_images262), and the 252 personality left as it was."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from machined import personality
from machined.images import mstack, operations, pool
from tests.unit.test_images import make_raw, search  # noqa: F401 (a fixture)


@pytest.fixture
def v262(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(pool, "NSPAWN_VENDOR_SETTINGS_DIR", str(tmp_path / "vendor-nspawn"))
    before = personality.current()
    personality.set_personality(personality.V262)
    yield
    personality.set_personality(before)


def _mk(top: Path, *names: str) -> None:
    for name in names:
        (top / name).mkdir(parents=True)


def _stack(top: Path, *entries: str) -> str:
    top.mkdir(parents=True)
    for entry in entries:
        if entry.endswith(".raw"):
            (top / entry).parent.mkdir(parents=True, exist_ok=True)
            (top / entry).write_bytes(b"")
        else:
            (top / entry).mkdir(parents=True)
    return str(top)


@pytest.mark.parametrize(
    ("entries", "read_only"),
    [
        ((), False),  # an empty tmpfs root
        (("layer@1", "layer@2"), True),
        (("layer@1",), True),  # a single layer: a read-only bind mount
        (("rw",), False),
        (("layer@1", "layer@2", "rw"), False),
        (("root",), False),
        (("layer@1", "bind@usr", "robind@-"), False),
        (("bind@usr", "robind@usr"), True),  # the same place twice
        (("layer@1", "junk"), True),  # an unknown entry
        (("layer@", "layer@1", "layer@2"), True),
        ((".junk", "layer@1", "layer@2"), True),  # hidden entries are ignored
        (("rw", "rw.v"), True),  # a .v without a version: no stack
        (("rw.v/rw_1",), False),
        (("root", "layer@1/usr"), False),
        (("root", "layer@1"), True),  # a single layer under a root needs its usr/
        (("layer@1.raw", "layer@2.raw"), True),
        (("robind@-x", "layer@1", "layer@2"), True),
        (("bind@x\\x2dy", "layer@1", "layer@2"), False),
        (("layer@1.raw.v/layer@1_3.raw", "layer@2"), True),
    ],
)
def test_stacks_are_read_only_as_262_says(tmp_path: Path, entries: tuple[str, ...], read_only: bool) -> None:
    assert mstack.is_read_only(_stack(tmp_path / "s.mstack", *entries)) is read_only


def test_discovery_names_types_and_paths(search: tuple[Path, Path, Path], v262: None) -> None:  # noqa: F811
    first, pool_dir, last = search
    _mk(pool_dir, "oci1.mstack/layer@1", "oci1.mstack/rw", "foo.v/foo_1", "foo.v/foo_2", ".hid.mstack/rw",
        "baz.v/baz_1", "baz.v/baz_2+0", "empty.raw.v", "q.v/q", "abc.raw", "x.mstack.v/x_1.mstack/layer@1",
        "tgt/etc")  # fmt: skip
    (pool_dir / "bar.raw.v").mkdir()
    make_raw(pool_dir / "bar.raw.v" / "bar_1.raw")
    make_raw(pool_dir / "bar.raw.v" / "bar_3.raw")
    (pool_dir / "file.v").write_text("")
    (first / "lnk").symlink_to(pool_dir / "tgt")
    _mk(last, "ven.v/ven_1")
    found = pool.discover()
    shown = {name: (img.type, img.path, img.read_only) for name, img in found.items() if name != ".host"}
    p = str(pool_dir)
    assert shown == {
        "oci1": ("mstack", f"{p}/oci1.mstack", False),
        "foo": ("directory", f"{p}/foo.v/foo_2", False),
        ".hid": ("mstack", f"{p}/.hid.mstack", False),
        "baz": ("directory", f"{p}/baz.v/baz_1", False),
        "bar": ("raw", f"{p}/bar.raw.v/bar_3.raw", False),
        "abc.raw": ("directory", f"{p}/abc.raw", False),
        "x": ("mstack", f"{p}/x.mstack.v/x_1.mstack", True),
        "tgt": ("directory", f"{p}/tgt", False),
        "lnk": ("directory", f"{p}/tgt", False),  # symlinks resolved
        "ven": ("directory", f"{last}/ven.v/ven_1", False),
    }
    assert found[".hid"].shown_read_only
    for name, (kind, path, _) in shown.items():
        img = pool.find(name)
        if name == "abc.raw":  # a lookup of NAME.raw wants a file
            assert img is None
            continue
        assert img is not None and (img.type, img.path) == (kind, path), name
    assert pool.find("oci1.mstack") is not None and pool.find("oci1.mstack").name == "oci1.mstack"  # type: ignore[union-attr]
    for name in ("foo.v", "foo_2", "q", "empty", "file", "nope"):  # foo.v: real 262 aborts on it
        assert pool.find(name) is None, name


def test_252_sees_plain_directories(search: tuple[Path, Path, Path]) -> None:  # noqa: F811
    _, pool_dir, _ = search
    _mk(pool_dir, "oci1.mstack/rw", "foo.v/foo_1")
    assert personality.current() == personality.V252
    found = pool.discover()
    assert {n: i.type for n, i in found.items() if n != ".host"} == {"oci1.mstack": "directory", "foo.v": "directory"}
    assert pool.find("oci1") is None and pool.find("foo") is None and pool.find("foo.v") is not None


def test_operations_on_stacks_and_versions(search: tuple[Path, Path, Path], v262: None) -> None:  # noqa: F811
    _, pool_dir, _ = search
    _mk(pool_dir, "oci1.mstack/layer@1/etc", "oci1.mstack/rw", "foo.v/foo_1/etc", "foo.v/foo_2/etc")
    oci1, foo = pool.find("oci1"), pool.find("foo")
    assert oci1 is not None and foo is not None
    for op in (lambda: operations.clone(oci1, "c", False), lambda: operations.rename(oci1, "r"),
               lambda: operations.mark_read_only(oci1, True)):  # fmt: skip
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno == errno.EOPNOTSUPP
    with pytest.raises(OSError) as e:
        operations.clone(foo, "oci1", False)  # the name is taken by the stack
    assert e.value.errno == errno.EEXIST
    renamed = operations.rename(foo, "bar")  # a version is renamed where it is
    assert renamed.name == "bar" and renamed.path == str(pool_dir / "foo.v" / "bar")
    assert pool.find("bar") is None and pool.find("foo").path.endswith("foo.v/foo_1")  # type: ignore[union-attr]
    operations.clone(pool.find("foo"), "fooc", False)  # type: ignore[arg-type]
    assert (pool_dir / "fooc" / "etc").is_dir()
    operations.remove(pool.find("foo"))  # type: ignore[arg-type]
    assert sorted(os.listdir(pool_dir / "foo.v")) == ["bar"] and pool.find("foo") is None
    operations.remove(oci1)
    assert not (pool_dir / "oci1.mstack").exists()
    _mk(pool_dir, "a.mstack/rw", ".h.mstack/rw")
    assert [n for n, _ in operations.clean_pool("hidden", v262=True)] == [".h"]
    assert sorted(n for n, _ in operations.clean_pool("all", v262=True)) == ["a", "fooc"]


def test_files_that_follow_an_image(search: tuple[Path, Path, Path], v262: None, tmp_path: Path) -> None:  # noqa: F811
    _, pool_dir, _ = search
    vendor = tmp_path / "vendor-nspawn"
    vendor.mkdir()
    (vendor / "d.nspawn").write_text("v")
    (pool_dir / "d").mkdir()
    aux = (".nspawn", ".oci-config", ".roothash", ".roothash.p7s", ".usrhash", ".usrhash.p7s", ".verity")
    for suffix in (*aux, ".raw.sig"):
        (pool_dir / f"d{suffix}").write_text(suffix)
    operations.rename(pool.find("d"), "e")  # type: ignore[arg-type]
    assert sorted(os.listdir(pool_dir)) == sorted(["d.raw.sig", "e", *(f"e{x}" for x in aux)])
    assert os.listdir(vendor) == ["e.nspawn"]
    operations.clone(pool.find("e"), "f", False)  # type: ignore[arg-type]
    assert os.stat(pool_dir / "f.oci-config").st_mode & 0o777 == 0o664 and sorted(os.listdir(vendor)) == [
        "e.nspawn",
        "f.nspawn",
    ]
    operations.remove(pool.find("e"))  # type: ignore[arg-type]
    operations.remove(pool.find("f"))  # type: ignore[arg-type]
    assert os.listdir(pool_dir) == ["d.raw.sig"] and os.listdir(vendor) == []

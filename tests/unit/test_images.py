"""The image pool without a daemon: name rules, discovery, attributes, nspawn's locks, metadata,
and the operations, on a search path of temporary directories."""

from __future__ import annotations

import asyncio
import errno
import os
import struct
from pathlib import Path

import pytest

from machined.children import jobs
from machined.children.client import run_worker
from machined.fs import attrs, libc
from machined.images import lock, metadata, operations, pool
from machined.images.lock import LockFile, image_name_lock, image_path_lock
from machined.images.pool import Image, image_name_is_valid


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("foo", True),
        ("Foo_bar-1.2", True),
        (".hidden", True),
        ("ü", True),
        ("a b", True),
        ("x" * 255, True),
        ("x" * 256, False),
        ("ü" * 128, False),  # 256 bytes
        ("", False),
        (".", False),
        ("..", False),
        ("a/b", False),
        (".#x", False),
        ("a\tb", False),
        ("a\x7f", False),
        ("a\udcff", False),  # not UTF-8
    ],
)
def test_image_names_follow_upstream(name: str, valid: bool) -> None:
    assert image_name_is_valid(name) is valid


@pytest.fixture
def search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    """A search path of three directories (the middle one is the pool) and a private lock dir."""
    first, pool_dir, last = tmp_path / "etc", tmp_path / "pool", tmp_path / "usr"
    for d in (first, pool_dir, last):
        d.mkdir()
    monkeypatch.setattr(pool, "SEARCH_PATH", (str(first), str(tmp_path / "missing"), str(pool_dir), str(last)))
    monkeypatch.setattr(pool, "POOL_PATH", str(pool_dir))
    monkeypatch.setattr(lock, "LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setattr(pool, "NSPAWN_SETTINGS_DIRS", (str(tmp_path / "nspawn"),))
    return first, pool_dir, last


def make_raw(path: Path, size: int = 4096, data: bytes = b"x" * 100) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(size)


def test_discovery_types_names_and_shadowing(search: tuple[Path, Path, Path]) -> None:
    first, pool_dir, last = search
    (pool_dir / "dir1").mkdir()
    make_raw(pool_dir / "disk.raw")
    (pool_dir / "notraw").write_text("")
    (pool_dir / ".hidden").mkdir()
    (pool_dir / ".#dir1.lck").write_text("")
    (pool_dir / ".#tmp.raw").write_text("")
    (pool_dir / "shadowed").mkdir()
    (first / "shadowed").mkdir()
    (first / "link").symlink_to(pool_dir / "dir1")
    (first / "dangling").symlink_to(pool_dir / "gone")
    found = pool.discover()
    assert sorted(found) == [".hidden", ".host", "dir1", "disk", "link", "shadowed"]
    assert found["dir1"].type == "directory" and found["disk"].type == "raw"
    assert found["shadowed"].path == str(first / "shadowed")
    assert found["link"].path == str(first / "link")
    assert found[".host"].path == "/" and found[".host"].is_host
    assert found[".hidden"].is_hidden and not found["dir1"].is_hidden


def test_raw_attributes(search: tuple[Path, Path, Path]) -> None:
    _, pool_dir, _ = search
    make_raw(pool_dir / "disk.raw", size=1 << 20)
    os.utime(pool_dir / "disk.raw", ns=(1_000_000_000_123_456, 1_500_000_000_987_654_321))
    img = pool.find("disk")
    assert img is not None
    st = os.stat(pool_dir / "disk.raw")
    assert (img.usage, img.usage_exclusive) == (st.st_blocks * 512,) * 2
    assert (img.limit, img.limit_exclusive) == (1 << 20, 1 << 20)
    assert img.mtime == 1_500_000_000_987_654 and not img.read_only
    os.chmod(pool_dir / "disk.raw", 0o444)
    assert pool.find("disk").read_only  # type: ignore[union-attr]


def test_find_prefers_directories_and_skips_plain_files(search: tuple[Path, Path, Path]) -> None:
    first, pool_dir, _ = search
    make_raw(pool_dir / "both.raw")
    (pool_dir / "both").mkdir()
    assert pool.find("both").type == "directory"  # type: ignore[union-attr]
    (first / "plain").write_text("")  # not an image: the search goes on
    make_raw(pool_dir / "plain.raw")
    assert pool.find("plain").path == str(pool_dir / "plain.raw")  # type: ignore[union-attr]
    assert pool.find("nope") is None and pool.find("..") is None
    assert pool.find(".host").path == "/"  # type: ignore[union-attr]


def test_vendor_images_are_read_only(search: tuple[Path, Path, Path]) -> None:
    img = Image("v", "/usr/lib/machines/v", "directory", True)
    assert img.is_vendor and not Image("v", "/usrx/v", "directory", False).is_vendor
    assert pool.path_startswith("/usr/lib", "/usr") and not pool.path_startswith("/usrlocal", "/usr")


def test_crtime_takes_the_older_of_btime_and_xattr(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("")
    born = attrs.crtime(str(f))
    try:
        os.setxattr(f, "user.crtime_usec", struct.pack("<Q", 1_000_000))
    except OSError:
        pytest.skip("no user xattrs here")
    assert attrs.crtime(str(f)) == 1_000_000
    if born:
        os.setxattr(f, "user.crtime_usec", struct.pack("<Q", born + 10_000_000))
        assert attrs.crtime(str(f)) == born


# --- locks ---------------------------------------------------------------------


def test_lock_files_exclude_each_other_and_vanish(tmp_path: Path) -> None:
    path = str(tmp_path / "l")
    a = LockFile.acquire(path, exclusive=True)
    with pytest.raises(OSError) as e:
        LockFile.acquire(path, exclusive=False)
    assert e.value.errno == errno.EBUSY
    a.release()
    assert not os.path.exists(path)
    s1, s2 = LockFile.acquire(path, exclusive=False), LockFile.acquire(path, exclusive=False)
    s1.release()
    assert os.path.exists(path)  # the other reader still holds it
    s2.release()
    assert not os.path.exists(path)


def test_image_path_lock_uses_nspawns_files(search: tuple[Path, Path, Path]) -> None:
    _, pool_dir, _ = search
    image = pool_dir / "img"
    image.mkdir()
    st = os.stat(image)
    with image_path_lock(str(image), exclusive=True):
        assert (pool_dir / ".#img.lck").exists()
        assert os.path.exists(f"{lock.LOCK_DIR}/inode-{st.st_dev}:{st.st_ino}")
        with pytest.raises(OSError) as e, image_path_lock(str(image), exclusive=False):
            pass
        assert e.value.errno == errno.EBUSY
    assert not (pool_dir / ".#img.lck").exists()
    assert os.listdir(lock.LOCK_DIR) == []


def test_host_and_names(search: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    with image_path_lock("/", exclusive=False):
        pass
    for ctx in (image_path_lock("/", exclusive=True), image_name_lock(".host")):
        with pytest.raises(OSError) as e, ctx:
            pass
        assert e.value.errno == errno.EBUSY
    with pytest.raises(OSError) as e, image_name_lock("a/b"):
        pass
    assert e.value.errno == errno.EINVAL
    with image_name_lock("n"):
        assert os.path.exists(f"{lock.LOCK_DIR}/name-n")
        with pytest.raises(OSError), image_name_lock("n"):
            pass
    monkeypatch.setenv("SYSTEMD_NSPAWN_LOCK", "0")
    with image_path_lock("/", exclusive=True):
        pass


# --- metadata --------------------------------------------------------------------


def test_chase_stays_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "real").write_text("inside")
    (tmp_path / "real").write_text("outside")
    (root / "etc" / "abs").symlink_to("/real")
    (root / "etc" / "up").symlink_to("../../../real")
    assert metadata.chase(str(root), "/etc/abs") == str(root / "real")
    assert metadata.chase(str(root), "/etc/up") == str(root / "real")
    (root / "etc" / "loop").symlink_to("loop")
    with pytest.raises(OSError):
        metadata.chase(str(root), "/etc/loop")


def test_tree_metadata(tmp_path: Path) -> None:
    root = tmp_path / "img"
    (root / "etc").mkdir(parents=True)
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("# comment\n\n  My-Host.example.  \n")
    (root / "etc" / "machine-id").write_text("0123456789ABCDEF0123456789abcdef\n")
    (root / "etc" / "machine-info").write_text('PRETTY_HOSTNAME="Nice host"\nCHASSIS=vm\n')
    (root / "usr" / "lib" / "os-release").write_text('ID=test\nPRETTY_NAME="Test OS"\n')
    (root / "etc" / "os-release").symlink_to("/usr/lib/os-release")
    meta = metadata.read_metadata(Image("img", str(root), "directory", False))
    assert meta == {
        "hostname": "My-Host.example",
        "machine_id": "0123456789abcdef0123456789abcdef",
        "machine_info": {"PRETTY_HOSTNAME": "Nice host", "CHASSIS": "vm"},
        "os_release": {"ID": "test", "PRETTY_NAME": "Test OS"},
    }


@pytest.mark.parametrize(
    ("text", "hostname"),
    [("foo\n", "foo"), ("a..b", "a.b"), ("-a-", "a"), ("a--\n", ""), ("föö", "f"), ("", ""), ("#x\n", "")],
)
def test_hostname_cleanup_as_systemd(text: str, hostname: str) -> None:
    assert metadata._hostname(text) == hostname


@pytest.mark.parametrize(
    ("text", "machine_id"),
    [("0" * 32, "0" * 32), ("a" * 32 + "\n", "a" * 32), ("uninitialized\n", ""), ("a" * 31, ""), (None, "")],
)
def test_machine_id_files(text: str | None, machine_id: str) -> None:
    assert metadata._machine_id(text) == machine_id


# --- operations ------------------------------------------------------------------


def test_clone_copies_trees_faithfully(search: tuple[Path, Path, Path]) -> None:
    first, pool_dir, _ = search
    src = first / "src"
    (src / "sub").mkdir(parents=True)
    (src / "file").write_text("data")
    os.chmod(src / "file", 0o640)
    os.link(src / "file", src / "hardlink")
    (src / "sym").symlink_to("file")
    os.mkfifo(src / "fifo")
    os.utime(src / "sub", ns=(1_000_000_000, 2_000_000_000))
    os.chmod(src, 0o711)
    os.utime(src, ns=(3_000_000_000, 3_000_000_000))
    nspawn = Path(pool.NSPAWN_SETTINGS_DIRS[0])
    nspawn.mkdir()
    (nspawn / "src.nspawn").write_text("[Exec]\n")
    operations.clone(pool.find("src"), "copy", read_only=False)  # type: ignore[arg-type]
    dst = pool_dir / "copy"
    assert (dst / "file").read_text() == "data" and os.stat(dst / "file").st_mode & 0o777 == 0o640
    assert os.stat(dst / "hardlink").st_ino == os.stat(dst / "file").st_ino
    assert os.readlink(dst / "sym") == "file" and os.path.exists(dst / "fifo")
    assert os.stat(dst / "sub").st_mtime_ns == 2_000_000_000
    # the top directory is a new one, not the source's (mode 0711): as real 252 and 262 leave it
    assert os.stat(dst).st_mode & 0o777 == 0o755 and os.stat(dst).st_mtime_ns != 3_000_000_000
    assert (nspawn / "copy.nspawn").read_text() == "[Exec]\n"
    with pytest.raises(OSError) as e:
        operations.clone(pool.find("src"), "copy", read_only=False)  # type: ignore[arg-type]
    assert e.value.errno == errno.EEXIST


def test_clone_raw_read_only_keeps_times(search: tuple[Path, Path, Path]) -> None:
    _, pool_dir, _ = search
    make_raw(pool_dir / "disk.raw", size=8192)
    os.utime(pool_dir / "disk.raw", ns=(10**18, 10**18))
    operations.clone(pool.find("disk"), "disk2", read_only=True)  # type: ignore[arg-type]
    copy = pool.find("disk2")
    assert copy is not None and copy.read_only and copy.mtime == 10**15
    assert (pool_dir / "disk2.raw").read_bytes() == (pool_dir / "disk.raw").read_bytes()
    assert os.stat(pool_dir / "disk2.raw").st_mode & 0o777 == 0o444


def test_rename_moves_companions_and_refuses_taken_names(search: tuple[Path, Path, Path]) -> None:
    first, pool_dir, _ = search
    make_raw(pool_dir / "disk.raw")
    (pool_dir / "disk.nspawn").write_text("")
    (pool_dir / "disk.roothash").write_text("")
    (first / "taken").mkdir()
    disk = pool.find("disk")
    assert disk is not None
    with pytest.raises(OSError) as e:
        operations.rename(disk, "taken")
    assert e.value.errno == errno.EEXIST
    operations.rename(disk, "new")
    assert sorted(os.listdir(pool_dir)) == ["new.nspawn", "new.raw", "new.roothash"]


def test_remove_honours_locks_and_refuses_host(search: tuple[Path, Path, Path]) -> None:
    _, pool_dir, _ = search
    (pool_dir / "busy" / "x").mkdir(parents=True)
    busy = pool.find("busy")
    assert busy is not None
    with image_path_lock(busy.path, exclusive=False), pytest.raises(OSError) as e:
        operations.remove(busy)
    assert e.value.errno == errno.EBUSY
    operations.remove(busy)
    assert os.listdir(pool_dir) == []
    for img in (pool.host_image(), Image("v", "/usr/lib/machines/v", "directory", True)):
        with pytest.raises(OSError) as e:
            operations.remove(img)
        assert e.value.errno == errno.EROFS


def test_read_only_raw_and_limits(search: tuple[Path, Path, Path]) -> None:
    _, pool_dir, _ = search
    make_raw(pool_dir / "disk.raw")
    disk = pool.find("disk")
    assert disk is not None
    operations.mark_read_only(disk, True)
    assert os.stat(pool_dir / "disk.raw").st_mode & 0o777 == 0o444
    operations.mark_read_only(disk, False)
    assert os.stat(pool_dir / "disk.raw").st_mode & 0o777 == 0o644
    with pytest.raises(OSError) as e:
        operations.set_limit(disk, 1 << 30)
    assert e.value.errno == errno.EOPNOTSUPP


def test_clean_pool_hidden_then_all(search: tuple[Path, Path, Path]) -> None:
    first, pool_dir, _ = search
    (pool_dir / ".hid").mkdir()
    (pool_dir / "vis").mkdir()
    make_raw(pool_dir / ".hraw.raw", size=4096)
    removed = operations.clean_pool("hidden")
    assert sorted(name for name, _ in removed) == [".hid", ".hraw"]
    assert dict(removed)[".hid"] == pool.UINT64_MAX
    (first / "inuse").mkdir()
    with image_path_lock(str(first / "inuse"), exclusive=False):
        assert [name for name, _ in operations.clean_pool("all")] == ["vis"]
    assert os.listdir(first) == ["inuse"]


def test_rename_noreplace(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    with pytest.raises(OSError) as e:
        libc.rename_noreplace(str(tmp_path / "a"), str(tmp_path / "b"))
    assert e.value.errno == errno.EEXIST


def test_worker_reports_errno_of_an_operation() -> None:
    with pytest.raises(OSError) as e:
        asyncio.run(run_worker(jobs.REMOVE_IMAGE, image=pool.host_image().fields()))
    assert e.value.errno == errno.EROFS


def test_read_only_directory_is_immutable_and_still_renamable(search: tuple[Path, Path, Path]) -> None:
    _, pool_dir, _ = search
    (pool_dir / "tree").mkdir()
    tree = pool.find("tree")
    assert tree is not None
    try:
        operations.mark_read_only(tree, True)
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP):
            pytest.skip("this file system has no immutable flag")
        raise
    try:
        assert pool.find("tree").read_only  # type: ignore[union-attr]
        operations.rename(tree, "tree2")
        renamed = pool.find("tree2")
        assert renamed is not None and renamed.read_only
    finally:
        for name in ("tree", "tree2"):
            attrs.chattr(str(pool_dir / name), 0, attrs.FS_IMMUTABLE_FL, ignore_errors=True)
    operations.remove(renamed)
    assert os.listdir(pool_dir) == []

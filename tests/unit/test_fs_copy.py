"""The one tree copier (container copies and image clones) on temporary trees: what it keeps,
and each of its options: owner, merge, replace, extended attributes, same mount."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from machined.fs import libc
from machined.fs.copy import IMAGE_CLONE, CopyOptions, copy_directory_into, copy_tree_at
from machined.fs.fds import opened

DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def make_tree(root: Path) -> None:
    """A tree with every kind of entry: files (one with two names in two directories), a symlink,
    a FIFO, and directories with their own modes and times."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "other").mkdir()
    (root / "file").write_text("data")
    os.chmod(root / "file", 0o640)
    os.link(root / "file", root / "other" / "hardlink")
    (root / "sub" / "deeper" / "leaf").write_text("leaf")
    (root / "sym").symlink_to("file")
    os.mkfifo(root / "fifo", 0o620)
    os.chmod(root / "sub", 0o750)
    os.utime(root / "sub" / "deeper" / "leaf", ns=(1_000_000_000, 3_000_000_000))
    os.utime(root / "sub", ns=(1_000_000_000, 2_000_000_000))
    os.chmod(root, 0o711)


def copy_at(src: Path, dst: Path, options: CopyOptions, replace: bool = False) -> None:
    with opened(str(src.parent), DIR) as sd, opened(str(dst.parent), DIR) as dd:
        copy_tree_at(sd, src.name, dd, dst.name, options, replace)


def snapshot(root: Path) -> dict[str, tuple]:
    """What a copy must keep, by relative path: type, mode, contents or link target, mtime."""
    out: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        st = os.lstat(path)
        rel = str(path.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
        elif stat.S_ISREG(st.st_mode):
            out[rel] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes(), st.st_mtime_ns)
        else:
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode))
    return out


def test_a_new_copy_keeps_types_modes_times_and_hard_links(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    make_tree(src)
    copy_at(src, dst, CopyOptions())
    assert snapshot(dst) == snapshot(src)
    assert stat.S_IMODE(os.stat(dst).st_mode) == 0o711
    assert os.stat(dst / "other" / "hardlink").st_ino == os.stat(dst / "file").st_ino
    assert os.stat(dst / "file").st_ino != os.stat(src / "file").st_ino
    assert stat.S_ISFIFO(os.lstat(dst / "fifo").st_mode)


def test_a_single_file_and_an_existing_destination(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("new")
    (tmp_path / "g").write_text("old")
    with pytest.raises(FileExistsError):
        copy_at(tmp_path / "f", tmp_path / "g", CopyOptions(merge=True))
    assert (tmp_path / "g").read_text() == "old"
    copy_at(tmp_path / "f", tmp_path / "g", CopyOptions(merge=True), replace=True)
    assert (tmp_path / "g").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["f", "g"]  # no temporary left behind


def test_merge_keeps_what_is_there_and_adds_the_rest(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    make_tree(src)
    (dst / "sub").mkdir(parents=True)
    (dst / "file").write_text("mine")
    (dst / "extra").write_text("extra")
    os.chmod(dst / "sub", 0o700)
    with pytest.raises(FileExistsError):
        copy_at(src, dst, CopyOptions())
    copy_at(src, dst, CopyOptions(merge=True))
    assert (dst / "file").read_text() == "mine" and (dst / "extra").read_text() == "extra"
    assert (dst / "sub" / "deeper" / "leaf").read_text() == "leaf"
    assert stat.S_IMODE(os.stat(dst / "sub").st_mode) == 0o700  # a merged directory keeps its attributes
    # replace does not replace a directory by a directory: it merges
    copy_at(src, dst, CopyOptions(merge=True), replace=True)
    assert (dst / "file").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")
def test_one_owner_for_everything(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    make_tree(src)
    os.chown(src / "sub" / "deeper" / "leaf", 12, 34)
    copy_at(src, tmp_path / "same", CopyOptions())
    assert os.stat(tmp_path / "same" / "sub" / "deeper" / "leaf")[4:6] == (12, 34)
    copy_at(src, dst, CopyOptions(uid=100000, gid=100001))
    for path in [dst, *dst.rglob("*")]:
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid) == (100000, 100001), path
    assert snapshot(dst) == snapshot(src)  # modes survive the chown


def test_extended_attributes_only_when_asked(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    try:
        os.setxattr(src / "f", "user.test", b"1")
        os.setxattr(src, "user.top", b"2")
    except OSError:
        pytest.skip("no user xattrs here")
    copy_at(src, tmp_path / "plain", CopyOptions())
    assert "user.test" not in os.listxattr(tmp_path / "plain" / "f")
    copy_at(src, tmp_path / "all", CopyOptions(xattrs=True))
    assert os.getxattr(tmp_path / "all" / "f", "user.test") == b"1"
    assert os.getxattr(tmp_path / "all", "user.top") == b"2"


def test_copy_into_an_existing_empty_directory_gives_it_the_source_attributes(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    make_tree(src)
    os.utime(src, ns=(5_000_000_000, 6_000_000_000))
    dst.mkdir(0o755)
    with opened(str(src), DIR) as sfd, opened(str(dst), DIR) as dfd:
        copy_directory_into(sfd, dfd, IMAGE_CLONE)
    assert snapshot(dst) == snapshot(src)
    st = os.stat(dst)
    assert stat.S_IMODE(st.st_mode) == 0o711 and st.st_mtime_ns == 6_000_000_000


def _in_private_mount_namespace(test) -> None:  # type: ignore[no-untyped-def]
    """Run *test* in a child with a mount namespace of its own (nothing it mounts reaches the host)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if libc.libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
                raise libc.last_error()
            libc.mount(None, "/", (1 << 18) | 0x4000)  # MS_PRIVATE | MS_REC
            test()
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported through the exit status
            os.write(2, f"{e!r}\n".encode())
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_same_mount_leaves_other_mounts_out(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "mnt").mkdir(parents=True)
    (src / "kept").write_text("kept")

    def test() -> None:
        if libc.libc.mount(b"tmpfs", os.fsencode(src / "mnt"), b"tmpfs", 0, None) != 0:
            raise libc.last_error()
        (src / "mnt" / "inside").write_text("other file system")
        copy_at(src, tmp_path / "same", IMAGE_CLONE)
        assert sorted(os.listdir(tmp_path / "same")) == ["kept"]
        copy_at(src, tmp_path / "all", CopyOptions())
        assert (tmp_path / "all" / "mnt" / "inside").read_text() == "other file system"

    _in_private_mount_namespace(test)


def test_a_missing_source_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(OSError) as e:
        copy_at(tmp_path / "missing", tmp_path / "dst", CopyOptions())
    assert e.value.errno == errno.ENOENT
    assert not (tmp_path / "dst").exists()

"""File descriptors that close themselves: of a path, of a name in a directory, of a path's parent."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

DIRECTORY = os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC | os.O_DIRECTORY


@contextlib.contextmanager
def opened(path: str, flags: int = DIRECTORY, dir_fd: int | None = None) -> Iterator[int]:
    """An fd of *path* (relative to *dir_fd* if given; a directory unless *flags* say otherwise)."""
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def opened_at(dir_fd: int, name: str) -> contextlib.AbstractContextManager[int]:
    """An fd of directory *name* in *dir_fd*, never through a symlink."""
    return opened(name, DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)


@contextlib.contextmanager
def parent_dir(path: str) -> Iterator[tuple[int, str]]:
    """(fd of the directory holding *path*, last component of *path*)."""
    directory, name = os.path.split(os.path.normpath(path))
    with opened(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) as fd:
        yield fd, name

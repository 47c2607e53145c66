"""Files and folders that appear at their final path only when complete.

Everything framefarm writes (segments, the stitched video or frames folder, store objects,
downloads) is written under a hidden sibling name ending in TMP_SUFFIX, flushed to disk,
renamed into place, and the parent folder flushed so that the rename survives a crash too.
A reader that sees a final path therefore sees the whole thing; a crashed writer leaves
only a hidden temporary name, which store listings skip.

The temporary name is a sibling (same folder) so that the rename stays within one
filesystem and is atomic.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from typing import BinaryIO

# Every name framefarm writes before it is complete ends in this; listings skip such names.
TMP_SUFFIX = ".framefarm-tmp"


def tmp_sibling(path: str, tag: str = "") -> str:
    """A fresh hidden name beside `path` that ends in TMP_SUFFIX."""
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.{secrets.token_hex(6)}{tag}{TMP_SUFFIX}")


class Staged:
    """A final path and the hidden temporary sibling that becomes it on `commit`.

    The writer fills `tmp` (a file, or with `folder=True` a folder of files) by any means:
    `open()`, or a library given the name (PyAV, tarfile). Then `commit()` flushes it,
    renames it into place (replacing what was there) and flushes the parent folder, or
    `discard()` removes it. Used as a context manager it commits on success and discards
    on an exception.
    """

    def __init__(self, path: str | os.PathLike[str], *, folder: bool = False):
        self.path = os.path.abspath(os.fspath(path))
        self.folder = folder
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.tmp = tmp_sibling(self.path)
        self.committed = False

    def open(self) -> BinaryIO:
        """The temporary file, created for binary writing (mode from the umask, as any file's)."""
        return os.fdopen(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")

    def commit(self) -> int:
        """Flush the staged file or folder, move it to the final path; returns its size in bytes."""
        if self.folder:
            os.makedirs(self.tmp, exist_ok=True)  # an empty folder is still a folder
            size = 0
            for name in os.listdir(self.tmp):
                size += _fsync_path(os.path.join(self.tmp, name))
            _fsync_path(self.tmp)
            _replace_folder(self.tmp, self.path)
        else:
            size = _fsync_path(self.tmp)
            os.replace(self.tmp, self.path)
        _fsync_path(os.path.dirname(self.path))
        self.committed = True
        return size

    def discard(self) -> None:
        """Remove the temporary file or folder, if any; idempotent, never touches the final path."""
        if os.path.isdir(self.tmp) and not os.path.islink(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            try:
                os.remove(self.tmp)
            except FileNotFoundError:
                pass

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self.committed:
                self.commit()
        else:
            self.discard()


def write_file(path: str | os.PathLike[str], fill: Callable[[BinaryIO], object]) -> int:
    """Write `path` through `fill(file)` so that it appears only complete; returns its size."""
    with Staged(path) as staged:
        with staged.open() as f:
            fill(f)
        return staged.commit()


def move_into_place(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename a finished file (in the same folder) to its final path, replacing what was
    there, and flush the folder so that the rename survives a crash."""
    dst = os.fspath(dst)
    os.replace(src, dst)
    _fsync_path(os.path.dirname(os.path.abspath(dst)))


def _fsync_path(path: str) -> int:
    """fsync a file or folder by name; returns a file's size (0 for a folder)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        return 0 if os.path.isdir(path) else os.fstat(fd).st_size
    finally:
        os.close(fd)


def _replace_folder(src: str, dst: str) -> None:
    """Move a finished folder into place, replacing an older one (or a file) from a previous run."""
    if not os.path.lexists(dst):
        os.rename(src, dst)
        return
    # A non-empty folder cannot be renamed over, so swap: old aside, new in, old away.
    # Between the two renames dst is missing, never partial.
    aside = tmp_sibling(dst, ".old")
    os.rename(dst, aside)
    os.rename(src, dst)
    if os.path.isdir(aside) and not os.path.islink(aside):
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.remove(aside)

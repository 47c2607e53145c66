"""The staged-file helper: a final path holds a complete file or folder, or what it held before."""

import os

import pytest

from infra.staged import TMP_SUFFIX, Staged, write_file


def _leftovers(directory) -> list[str]:
    return [name for name in os.listdir(directory) if name.endswith(TMP_SUFFIX)]


def test_write_file_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "out.bin"
    assert write_file(path, lambda f: f.write(b"first")) == 5
    assert write_file(path, lambda f: f.write(b"second")) == 6
    assert path.read_bytes() == b"second"
    assert _leftovers(path.parent) == []


def test_a_failed_fill_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"half of the new")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_file(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_a_file_written_by_name_appears_only_on_commit(tmp_path):
    staged = Staged(tmp_path / "segment.mkv")
    assert os.path.dirname(staged.tmp) == str(tmp_path) and os.path.basename(staged.tmp).startswith(".segment.mkv.")
    with open(staged.tmp, "wb") as f:  # as a library given the name would (PyAV, tarfile)
        f.write(b"x" * 1000)
    assert not (tmp_path / "segment.mkv").exists()
    assert staged.commit() == 1000
    assert (tmp_path / "segment.mkv").read_bytes() == b"x" * 1000
    assert _leftovers(tmp_path) == []
    staged.discard()  # after a commit: touches nothing
    assert (tmp_path / "segment.mkv").exists()


def test_open_gives_the_file_the_umask_mode(tmp_path):
    mask = os.umask(0o022)
    try:
        write_file(tmp_path / "f", lambda f: f.write(b"1"))
    finally:
        os.umask(mask)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0o600


def test_context_manager_discards_on_error(tmp_path):
    with pytest.raises(RuntimeError, match="encoder"):
        with Staged(tmp_path / "out.mp4") as staged:
            with staged.open() as f:
                f.write(b"partial")
            raise RuntimeError("encoder failed")
    assert os.listdir(tmp_path) == []


def test_a_folder_replaces_an_older_one_whole(tmp_path):
    final = tmp_path / "frames"
    final.mkdir()
    (final / "000000.png").write_bytes(b"old")
    (final / "000001.png").write_bytes(b"old")
    staged = Staged(final, folder=True)
    os.makedirs(staged.tmp)
    (tmp_path / os.path.basename(staged.tmp) / "000000.png").write_bytes(b"new!")
    assert staged.commit() == 4
    assert sorted(os.listdir(final)) == ["000000.png"] and (final / "000000.png").read_bytes() == b"new!"
    assert _leftovers(tmp_path) == []


def test_discarding_a_folder_removes_it(tmp_path):
    staged = Staged(tmp_path / "frames", folder=True)
    os.makedirs(staged.tmp)
    (tmp_path / os.path.basename(staged.tmp) / "000000.png").write_bytes(b"1")
    staged.discard()
    staged.discard()
    assert os.listdir(tmp_path) == []

"""Stitcher: segments verified as they land, joined in shard order, refused when
they are not what their worker reported. Real segments (libx264, FFV1, PNG tars), a real
local store. The Ray wrapper runs in tests/test_render_ray.py, and segments fetched from S3
in tests/test_render_s3.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from actors.stitcher import Stitcher, SegmentError
from actors.decoders import read_index
from actors.segments import Segment, video_name
from actors.sinks import read_frames
from infra.checksum import sha256_file
from tests.test_concat import FPS, make_segments

SIZES = (9, 8, 8, 5)


def _store_segments(tmp_path, fmt: str, sizes=SIZES) -> tuple[str, list[dict]]:
    """Segments under OUT/segments/ as workers leave them, with the metadata they report."""
    out = tmp_path / "out"
    (out / "segments").mkdir(parents=True)
    paths, _ = make_segments(out / "segments", fmt, sizes)
    metas = [{"index": i, "key": os.path.relpath(p, out), "bytes": os.path.getsize(p),
              "sha256": sha256_file(p), "frames": n} for i, (p, n) in enumerate(zip(paths, sizes))]
    return str(out), metas


def _indices(out: str, fmt: str) -> list[int]:
    return [read_index(f) for f in read_frames(os.path.join(out, video_name(fmt)), fmt)]


@pytest.mark.parametrize("fmt", ["mp4", "ffv1", "png"])
def test_segments_arriving_out_of_order_give_every_frame_in_order(tmp_path, fmt):
    out, metas = _store_segments(tmp_path, fmt)
    stitcher = Stitcher(out, fmt, FPS, len(metas), scratch_dir=str(tmp_path))
    for i in (2, 0, 3, 1):
        stitcher.add(Segment(**metas[i]))
    result = stitcher.finish()
    assert result["frames"] == sum(SIZES) and result["video"] == video_name(fmt)
    assert _indices(out, fmt) == list(range(sum(SIZES)))
    assert len(stitcher.appended_at) == len(SIZES)


@pytest.mark.parametrize("fmt", ["mp4", "png"])
def test_a_one_shard_job_links_its_segment_as_the_video(tmp_path, fmt):
    out, metas = _store_segments(tmp_path, fmt, sizes=(9,))
    stitcher = Stitcher(out, fmt, FPS, 1, scratch_dir=str(tmp_path))
    stitcher.add(Segment(**metas[0]))
    result = stitcher.finish()
    assert result["frames"] == 9 and _indices(out, fmt) == list(range(9))
    segment, video = os.path.join(out, metas[0]["key"]), os.path.join(out, video_name(fmt))
    # mp4/mkv: the same file, no byte copied; png: unpacked from its tar
    assert os.path.samefile(segment, video) == (fmt != "png")


def test_segments_are_appended_as_they_land_not_at_finish(tmp_path):
    out, metas = _store_segments(tmp_path, "mp4")
    stitcher = Stitcher(out, "mp4", FPS, len(metas), scratch_dir=str(tmp_path))
    stitcher.add(Segment(**metas[1]))
    stitcher.add(Segment(**metas[0]))
    # Shards 0 and 1 are joined while 2 and 3 are still "decoding"; 2 cannot jump the queue.
    assert stitcher.wait_appended(2, timeout=60) == 2
    stitcher.add(Segment(**metas[3]))
    assert stitcher.wait_appended(3, timeout=0.2) == 2
    stitcher.add(Segment(**metas[2]))
    stitcher.finish()
    assert _indices(out, "mp4") == list(range(sum(SIZES)))


@pytest.mark.parametrize("damage, message", [
    ("flip", "sha256"),
    ("frames", "frames, expected"),
    ("bytes", "bytes, its worker reported"),
    ("garbage", "segment"),
])
def test_a_segment_that_is_not_what_its_worker_reported_fails_the_job_and_leaves_no_video(
        tmp_path, damage, message):
    out, metas = _store_segments(tmp_path, "mp4")
    bad = metas[2]
    path = os.path.join(out, bad["key"])
    if damage == "flip":
        with open(path, "r+b") as f:
            f.seek(bad["bytes"] // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "frames":
        bad["frames"] += 1
    elif damage == "bytes":
        bad["bytes"] -= 1
    else:
        with open(path, "wb") as f:
            f.write(b"not a video at all" * 100)
        bad["bytes"], bad["sha256"] = os.path.getsize(path), sha256_file(path)
    stitcher = Stitcher(out, "mp4", FPS, len(metas), scratch_dir=str(tmp_path))
    for m in metas:
        try:
            stitcher.add(Segment(**m))  # a later add may already see the failure
        except SegmentError:
            break
    with pytest.raises(SegmentError, match=message) as err:
        stitcher.finish()
    assert bad["key"] in str(err.value) or damage == "garbage"
    stitcher.abort()
    assert not os.path.exists(os.path.join(out, video_name("mp4")))
    assert [n for n in os.listdir(out) if n != "segments"] == []  # no temporary output either


def test_finish_with_a_shard_missing_refuses_and_abort_does_not_hang(tmp_path):
    out, metas = _store_segments(tmp_path, "ffv1")
    stitcher = Stitcher(out, "ffv1", FPS, len(metas), scratch_dir=str(tmp_path))
    for m in metas[:2] + metas[3:]:
        stitcher.add(Segment(**m))
    with pytest.raises(SegmentError, match=r"shards \[2\] not appended"):
        stitcher.finish()
    stitcher.abort()  # the appender is waiting for shard 2: it must still stop
    assert not os.path.exists(os.path.join(out, video_name("ffv1")))
    assert not os.path.exists(stitcher.scratch)


def test_bad_shard_indices_are_refused(tmp_path):
    out, metas = _store_segments(tmp_path, "mp4", (9, 8))
    stitcher = Stitcher(out, "mp4", FPS, 2, scratch_dir=str(tmp_path))
    try:
        stitcher.add(Segment(**metas[0]))
        with pytest.raises(ValueError, match="added twice"):
            stitcher.add(Segment(**metas[0]))
        with pytest.raises(ValueError, match="outside"):
            stitcher.add(Segment(**{**metas[1], "index": 2}))
    finally:
        stitcher.abort()


def test_finish_after_abort_refuses_instead_of_waiting(tmp_path):
    out, metas = _store_segments(tmp_path, "mp4", (9, 8))
    stitcher = Stitcher(out, "mp4", FPS, 2, scratch_dir=str(tmp_path))
    stitcher.add(Segment(**metas[0]))
    stitcher.abort()
    with pytest.raises(RuntimeError, match="aborted"):
        stitcher.finish()
    with pytest.raises(RuntimeError, match="aborted|closed"):
        stitcher.wait_appended(2, timeout=None)


def test_the_stitchers_process_imports_neither_torch_nor_the_decode_worker():
    """A Ray worker imports the module that defines an actor's class, and unpickles its
    arguments: a job's stitcher must come up in about a second, not after torch and
    diffusers (docs/deploy.md, "After the last shard")."""
    code = ("import pickle, sys, actors.stitcher_actor; from actors.segments import Segment; "
            "pickle.loads(pickle.dumps(Segment(0, 'k', 1, 1, 'x'))); "
            "heavy = {'torch', 'diffusers', 'actors.worker', 'actors.protocol'} & set(sys.modules); "
            "assert not heavy, heavy")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([root, *sys.path])})
    assert done.returncode == 0, done.stderr[-2000:]

"""Stitching: segments join without re-encoding and the result holds every frame exactly."""

from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np
import pytest

from actors.decoders import read_index
from actors.segments import segment_suffix, video_name
from actors.sinks import count_frames, open_sink, read_frames
from actors.concat import ConcatResult, StreamingConcat, concat_segments
from tests.test_sinks import H, W, pattern_frames

FPS = 16
FORMATS = ["mp4", "ffv1", "png"]


def make_segments(directory, fmt: str, sizes, fps: int = FPS, width: int = W, height: int = H,
                  name: str = "seg") -> tuple[list[str], np.ndarray]:
    """Encode consecutive test-pattern frames 0..sum(sizes)-1 into one segment per size."""
    frames = pattern_frames(0, sum(sizes), height=height, width=width)
    paths, start = [], 0
    for k, size in enumerate(sizes):
        path = os.path.join(directory, f"{name}{k:03d}{segment_suffix(fmt)}")
        sink = open_sink(fmt, path, width, height, fps=fps, encoder="libx264")
        sink.write(frames[start:start + size])
        sink.close()
        paths.append(path)
        start += size
    return paths, frames


def video_packets(path: str) -> list[av.Packet]:
    with av.open(path) as container:
        stream = container.streams.video[0]
        return [p for p in container.demux(stream) if p.size > 0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_three_segments_stitch_to_every_frame(tmp_path, fmt):
    (tmp_path / "segments").mkdir()
    segments, frames = make_segments(tmp_path / "segments", fmt, (9, 8, 8))
    out = tmp_path / "out" / video_name(fmt)
    result = concat_segments(segments, fmt, str(out), FPS)

    assert isinstance(result, ConcatResult)
    assert result.path == str(out) and result.frames == 25 and result.seconds >= 0
    assert visible_names(out.parent) == [out.name]  # nothing temporary left beside it
    assert count_frames(str(out), fmt) == 25
    stitched = read_frames(str(out), fmt)
    assert [read_index(f) for f in stitched] == list(range(25))
    # Remux, not re-encode: the output decodes to exactly what the segments decode to.
    per_segment = np.concatenate([read_frames(p, fmt) for p in segments])
    assert np.array_equal(stitched, per_segment)
    if fmt in ("ffv1", "png"):
        assert np.array_equal(stitched, frames)
    if fmt == "png":
        assert sorted(os.listdir(out)) == [f"{i:06d}.png" for i in range(25)]
        assert result.bytes == sum(os.path.getsize(out / n) for n in os.listdir(out))
    else:
        assert result.bytes == out.stat().st_size


@pytest.mark.parametrize("fmt", ["mp4", "ffv1"])
@pytest.mark.parametrize("sizes", [(9, 8, 8), (9, 1, 8, 2), (1, 4, 4, 2, 4, 1, 9), (2, 9)])
def test_stitched_timestamps(tmp_path, fmt, sizes):
    # x264 gives segments under 3 frames no B-frame delay while longer ones get 2 frames,
    # so decode times have to be reconciled; presentation times must not move.
    segments, _ = make_segments(tmp_path, fmt, sizes)
    out = tmp_path / video_name(fmt)
    total = sum(sizes)
    concat_segments(segments, fmt, str(out), FPS)

    packets = video_packets(str(out))
    assert len(packets) == total
    dts = [p.dts for p in packets]
    assert all(b > a for a, b in zip(dts, dts[1:]))
    assert all(p.dts <= p.pts for p in packets)
    if fmt == "mp4" and sizes[0] >= 3:
        # The first segment has the longest delay: every decode step is exactly one frame.
        assert {(b - a) * packets[0].time_base for a, b in zip(dts, dts[1:])} == {Fraction(1, FPS)}
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        shown = [frame.time for frame in container.decode(stream)]
        duration = Fraction(container.duration, av.time_base)
    assert all(b > a for a, b in zip(shown, shown[1:]))
    # Matroska keeps milliseconds: 1/16 s is 62.5 ms, rounded.
    slack = 0 if fmt == "mp4" else 0.001
    assert all(abs(t - i / FPS) <= slack for i, t in enumerate(shown))
    assert abs(duration - Fraction(total, FPS)) <= slack
    assert [read_index(f) for f in read_frames(str(out), fmt)] == list(range(total))


def test_mp4_stitch_copies_packets_byte_for_byte(tmp_path):
    segments, _ = make_segments(tmp_path, "mp4", (9, 8, 8))
    out = tmp_path / "video.mp4"
    concat_segments(segments, "mp4", str(out), FPS)
    expected = [bytes(p) for path in segments for p in video_packets(path)]
    assert [bytes(p) for p in video_packets(str(out))] == expected
    assert sum(p.is_keyframe for p in video_packets(str(out))) >= 3  # each segment opens with one


@pytest.mark.parametrize("fmt", FORMATS)
def test_count_mismatch_names_the_segment_and_leaves_nothing(tmp_path, fmt):
    segments, _ = make_segments(tmp_path, fmt, (9, 8, 8))
    out = tmp_path / "out" / video_name(fmt)
    with pytest.raises(ValueError, match=os.path.basename(segments[1])):
        concat_segments(segments, fmt, str(out), FPS, expected_frames=[9, 9, 8])
    assert visible_names(out.parent) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_streaming_append_checks_before_writing(tmp_path, fmt):
    segments, frames = make_segments(tmp_path, fmt, (9, 8, 8))
    out = tmp_path / "out" / video_name(fmt)
    concat = StreamingConcat(fmt, str(out), FPS)
    assert concat.append(segments[0], 9) == 9
    with pytest.raises(ValueError, match=os.path.basename(segments[1])):
        concat.append(segments[1], 4)
    assert not out.exists()
    # The bad call wrote nothing, so the stitch carries on as if it never happened.
    concat.append(segments[1], 8)
    concat.append(segments[2], 8)
    assert not out.exists()
    result = concat.close()
    assert result.frames == 25
    assert [read_index(f) for f in read_frames(str(out), fmt)] == list(range(25))
    with pytest.raises(RuntimeError):
        concat.append(segments[0], 9)


@pytest.mark.parametrize("fmt", FORMATS)
def test_streaming_abort_leaves_nothing(tmp_path, fmt):
    segments, _ = make_segments(tmp_path, fmt, (9, 8))
    out = tmp_path / "out" / video_name(fmt)
    concat = StreamingConcat(fmt, str(out), FPS)
    concat.append(segments[0], 9)
    concat.abort()
    concat.abort()
    assert visible_names(out.parent) == []
    with pytest.raises(RuntimeError):
        concat.close()


@pytest.mark.parametrize("fmt", ["mp4", "ffv1"])
def test_segments_with_other_settings_are_refused(tmp_path, fmt):
    first, _ = make_segments(tmp_path, fmt, (5,), name="a")
    other, _ = make_segments(tmp_path, fmt, (5,), width=W + 32, name="b")
    with pytest.raises(ValueError, match=os.path.basename(other[0])):
        concat_segments(first + other, fmt, str(tmp_path / "out" / video_name(fmt)), FPS)
    assert visible_names(tmp_path / "out") == []


def test_segment_at_another_frame_rate_is_refused(tmp_path):
    segments, _ = make_segments(tmp_path, "mp4", (5,), fps=24)
    with pytest.raises(ValueError, match="grid"):
        concat_segments(segments, "mp4", str(tmp_path / "out" / "video.mp4"), FPS)


def test_no_segments_is_an_error(tmp_path):
    with pytest.raises(ValueError):
        concat_segments([], "mp4", str(tmp_path / "video.mp4"), FPS)
    assert visible_names(tmp_path) == []


def test_png_output_replaces_an_older_directory(tmp_path):
    segments, frames = make_segments(tmp_path, "png", (3, 4))
    out = tmp_path / "frames"
    out.mkdir()
    (out / "999999.png").write_bytes(b"stale")
    concat_segments(segments, "png", str(out), FPS)
    assert sorted(os.listdir(out)) == [f"{i:06d}.png" for i in range(7)]
    assert np.array_equal(read_frames(str(out), "png"), frames)
    assert visible_names(tmp_path) == sorted([os.path.basename(p) for p in segments] + ["frames"])


def visible_names(directory) -> list[str]:
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_lone_segment_is_linked_not_copied_and_nothing_can_follow(tmp_path, fmt):
    from actors.concat import inspect_segment

    (segment,), _ = make_segments(tmp_path, fmt, (9,))
    out = tmp_path / "out" / video_name(fmt)
    concat = StreamingConcat(fmt, str(out), FPS)
    linked = concat.link(segment, 9, inspect_segment(segment, fmt, FPS))
    assert linked == (fmt != "png")  # png segments are tars: unpacked, never linked
    if not linked:
        concat.abort()
        return
    with pytest.raises(RuntimeError, match="linked"):
        concat.append(segment, 9)  # would write into the segment's own file
    assert not out.exists()
    result = concat.close()
    assert result.frames == 9 and os.path.samefile(out, segment)
    assert [read_index(f) for f in read_frames(str(out), fmt)] == list(range(9))
    os.remove(segment)  # the driver deletes segments once the video is published
    assert count_frames(str(out), fmt) == 9

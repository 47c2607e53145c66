"""Sinks: real encoders, real files; frames must come back exactly, in order."""

from __future__ import annotations

import os
import re
import resource
import signal
import tarfile
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from actors.decoders import draw_index_frame, read_index
from actors.protocol import segment_suffix, video_name
from actors.sinks import SinkResult, count_frames, nvenc_available, open_sink, read_frames

H, W = 96, 128  # the test pattern needs >= 8 px blocks: 9 columns x 4 rows of blocks


def pattern_frames(start: int, count: int, height: int = H, width: int = W) -> np.ndarray:
    """uint8 RGB [F, H, W, 3] test-pattern frames start..start+count-1, tints varying."""
    chw = torch.stack([draw_index_frame(i, height, width, float(np.sin(i)), "cpu")
                       for i in range(start, start + count)])
    return ((chw + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def noise_frames(count: int, seed: int = 0, height: int = H, width: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def visible(directory) -> list[str]:
    return sorted(os.listdir(directory))


def test_names():
    assert [segment_suffix(f) for f in ("mp4", "ffv1", "png")] == [".mp4", ".mkv", ".tar"]
    assert [video_name(f) for f in ("mp4", "ffv1", "png")] == ["video.mp4", "video.mkv", "frames"]
    with pytest.raises(ValueError):
        segment_suffix("gif")


@pytest.mark.parametrize("fmt", ["mp4", "ffv1", "png"])
def test_round_trip_holds_every_frame_in_order(tmp_path, fmt):
    frames = pattern_frames(100, 13)
    path = tmp_path / f"seg{segment_suffix(fmt)}"
    sink = open_sink(fmt, str(path), W, H, encoder="libx264")
    for chunk in (frames[:1], frames[1:5], frames[5:9], frames[9:]):  # Wan's 1 + 4k chunking
        sink.write(chunk)
    # Nothing at the final path until close, only a hidden partial file beside it.
    assert not path.exists()
    result = sink.close()

    assert isinstance(result, SinkResult)
    assert result.path == str(path) and result.frames == 13
    assert result.bytes == path.stat().st_size > 0
    assert 0 <= result.flush_seconds <= result.encode_seconds
    assert visible(tmp_path) == [path.name]
    assert count_frames(str(path), fmt) == 13
    back = read_frames(str(path), fmt)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert [read_index(f) for f in back] == list(range(100, 113))
    if fmt in ("ffv1", "png"):
        assert np.array_equal(back, frames)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("fmt", ["ffv1", "png"])
def test_lossless_formats_keep_every_value(tmp_path, fmt, threads):
    # Noise exercises all 256 levels in every channel, where a sneaky colour conversion shows.
    frames = noise_frames(7)
    path = tmp_path / f"noise{segment_suffix(fmt)}"
    sink = open_sink(fmt, str(path), W, H, threads=threads)
    for chunk in (frames[:1], frames[1:]):
        sink.write(chunk)
    assert sink.close().frames == 7
    assert np.array_equal(read_frames(str(path), fmt), frames)


def test_mp4_with_encoder_threads(tmp_path):
    path = tmp_path / "seg.mp4"
    sink = open_sink("mp4", str(path), W, H, encoder="libx264", threads=3)
    sink.write(pattern_frames(0, 12))
    assert sink.close().frames == 12
    assert [read_index(f) for f in read_frames(str(path), "mp4")] == list(range(12))


def test_mp4_colours_survive(tmp_path):
    # The encoder converts with BT.709 and tags it; decoding must invert the same matrix.
    colours = [(200, 60, 30), (20, 180, 90), (40, 50, 220), (128, 128, 128)]
    frames = np.stack([np.broadcast_to(np.array(c, np.uint8), (H, W, 3)) for c in colours])
    path = tmp_path / "flat.mp4"
    sink = open_sink("mp4", str(path), W, H, encoder="libx264")
    sink.write(frames)
    sink.close()
    back = read_frames(str(path), "mp4").astype(int)
    assert np.abs(back - frames).max() <= 3


def test_mp4_timing_and_keyframe(tmp_path):
    fps = 16
    path = tmp_path / "seg.mp4"
    sink = open_sink("mp4", str(path), W, H, fps=fps, encoder="libx264")
    sink.write(pattern_frames(0, 10))
    sink.close()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.average_rate == fps
        packets = [p for p in container.demux(stream) if p.size > 0]
        assert packets[0].is_keyframe
        assert sorted(p.pts * p.time_base for p in packets) == [Fraction(i, fps) for i in range(10)]
        assert stream.duration * stream.time_base == Fraction(10, fps)


@pytest.mark.parametrize("size", [(127, 96), (128, 95)])
def test_mp4_odd_dimensions_rejected_before_writing(tmp_path, size):
    width, height = size
    with pytest.raises(ValueError, match="even"):
        open_sink("mp4", str(tmp_path / "odd.mp4"), width, height)
    assert visible(tmp_path) == []


@pytest.mark.parametrize("fmt", ["mp4", "ffv1", "png"])
def test_wrong_frames_rejected(tmp_path, fmt):
    sink = open_sink(fmt, str(tmp_path / f"x{segment_suffix(fmt)}"), W, H)
    with pytest.raises(ValueError):
        sink.write(pattern_frames(0, 2, height=H, width=W + 16))  # would be silently rescaled
    with pytest.raises(ValueError):
        sink.write(pattern_frames(0, 2).astype(np.float32))
    with pytest.raises(ValueError):
        sink.write(pattern_frames(0, 2)[0])  # one frame without the F axis
    sink.abort()
    assert visible(tmp_path) == []


@pytest.mark.parametrize("fmt", ["mp4", "ffv1", "png"])
def test_abort_leaves_nothing(tmp_path, fmt):
    sink = open_sink(fmt, str(tmp_path / f"x{segment_suffix(fmt)}"), W, H)
    sink.write(pattern_frames(0, 9))
    sink.abort()
    sink.abort()
    assert visible(tmp_path) == []
    with pytest.raises(RuntimeError):
        sink.write(pattern_frames(9, 1))
    with pytest.raises(RuntimeError):
        sink.close()
    assert visible(tmp_path) == []


@pytest.mark.parametrize("fmt", ["mp4", "ffv1", "png"])
def test_close_without_frames_fails_and_leaves_nothing(tmp_path, fmt):
    sink = open_sink(fmt, str(tmp_path / f"x{segment_suffix(fmt)}"), W, H)
    with pytest.raises(ValueError, match="no frames"):
        sink.close()
    sink.abort()
    assert visible(tmp_path) == []


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE semantics")
@pytest.mark.parametrize("fmt", ["mp4", "ffv1", "png"])
def test_encoder_error_propagates_and_sticks(tmp_path, fmt):
    # A real failure inside the encoder/muxer: the file may not grow past 150 kB (EFBIG).
    sink = open_sink(fmt, str(tmp_path / f"x{segment_suffix(fmt)}"), W, H, encoder="libx264")
    frames = noise_frames(4)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, hard))
    try:
        with pytest.raises(OSError):
            for _ in range(100):
                sink.write(frames)
            sink.close()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    with pytest.raises(RuntimeError, match="failed earlier"):
        sink.write(frames)
    with pytest.raises(RuntimeError):
        sink.close()
    sink.abort()
    sink.abort()
    assert visible(tmp_path) == []


def test_encoder_choice(tmp_path):
    if nvenc_available():
        sink = open_sink("mp4", str(tmp_path / "a.mp4"), W, H, encoder="auto")
        sink.write(pattern_frames(0, 3))
        assert sink.close().codec == "h264_nvenc"
        return
    # CPU machine (or a GPU without encoder engines): forcing NVENC fails at open, auto falls back.
    with pytest.raises(av.error.FFmpegError):
        open_sink("mp4", str(tmp_path / "a.mp4"), W, H, encoder="h264_nvenc")
    assert visible(tmp_path) == []
    sink = open_sink("mp4", str(tmp_path / "b.mp4"), W, H, encoder="auto")
    sink.write(pattern_frames(0, 3))
    assert sink.close().codec == "libx264"
    with pytest.raises(ValueError):
        open_sink("mp4", str(tmp_path / "c.mp4"), W, H, encoder="x265")


def test_bad_x264_settings_fail_at_open(tmp_path):
    with pytest.raises(av.error.FFmpegError):
        open_sink("mp4", str(tmp_path / "a.mp4"), W, H, encoder="libx264", preset="no-such-preset")
    assert visible(tmp_path) == []


def test_close_replaces_an_older_file(tmp_path):
    path = tmp_path / "seg.mkv"
    path.write_bytes(b"stale segment from a failed attempt")
    sink = open_sink("ffv1", str(path), W, H)
    sink.write(pattern_frames(0, 3))
    assert path.read_bytes() == b"stale segment from a failed attempt"
    sink.close()
    assert [read_index(f) for f in read_frames(str(path), "ffv1")] == [0, 1, 2]
    assert visible(tmp_path) == ["seg.mkv"]


def test_png_segment_is_a_plain_tar_of_numbered_pngs(tmp_path):
    frames = pattern_frames(40, 6)
    paths = []
    for name in ("a.tar", "b.tar"):
        sink = open_sink("png", str(tmp_path / name), W, H)
        sink.write(frames)
        sink.close()
        paths.append(tmp_path / name)
    with tarfile.open(paths[0], "r:") as tar:  # "r:" refuses compressed archives
        members = tar.getmembers()
        assert [m.name for m in members] == [f"{i:06d}.png" for i in range(6)]
        assert all(tar.extractfile(m).read().startswith(b"\x89PNG\r\n\x1a\n") for m in members)
    # A retried shard must produce the same object, byte for byte.
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_encoder_probe_answers_yes_and_no_with_real_encoders():
    # The probe's "yes" path must not raise: an encoder that opens here (libx264) stands in
    # for NVENC on a GPU that has one; a codec that cannot open answers no.
    from actors.sinks import encoder_opens

    assert encoder_opens("libx264") is True
    assert encoder_opens("no_such_encoder") is False
    assert isinstance(nvenc_available(), bool)


# ---------------------------------------------------------------------------------------
# Frame-parallel mp4: a segment encoded as consecutive parts side by side, joined


def test_parts_double_from_the_end_cover_the_segment_and_follow_the_cores():
    from actors.sinks import MIN_PART_FRAMES, plan_parts

    assert plan_parts(161, 1280, 720, cores=8) == plan_parts(161, 1280, 720, cores=8, parts=20)
    for frames in (24, 40, 161, 321, 2001):
        sizes, threads = plan_parts(frames, 1280, 720, cores=8)
        assert sum(sizes) == frames and min(sizes) >= MIN_PART_FRAMES
        # The last part is the shortest; each before it is twice the next, except the first,
        # which takes what is left. Every part has a thread per core.
        assert sizes[-1] == MIN_PART_FRAMES and threads == [8] * len(sizes)
        assert all(a == 2 * b for a, b in zip(sizes[1:-1], sizes[2:]))
    assert plan_parts(161, 1280, 720, cores=8, parts=4) == ([77, 48, 24, 12], [8, 8, 8, 8])
    assert plan_parts(161, 1280, 720, cores=2, parts=4)[1] == [2, 2, 2, 2]
    # One encoder: a single core, too few frames, or asked.
    for args, kwargs in [((161, 1280, 720, 1), {}), ((20, 1280, 720, 8), {}),
                         ((161, 1280, 720, 8), {"parts": 1})]:
        assert plan_parts(*args, **kwargs) == ([args[0]], [0])
    assert plan_parts(161, W, H, 2, parts=3) == ([125, 24, 12], [2, 2, 2])


def test_a_short_segment_has_one_queued_encoder_above_640x360_and_one_in_the_callers_thread_below(tmp_path):
    big = open_sink("mp4", str(tmp_path / "big.mp4"), 640, 360, 16, encoder="libx264", frames=13)
    assert big.sizes == [13]  # one part, on a thread of its own
    frames = np.full((13, 360 * 3 // 2, 640), 128, np.uint8)  # neutral chroma
    frames[:, :360] = 16 + np.arange(13, dtype=np.uint8)[:, None, None] * 16  # a brighter grey each frame
    for i in range(0, 13, 4):
        chunk = frames[i:i + 4].copy()
        big.write(chunk)
        chunk[:] = 255  # the pipeline reuses its buffer at once: the sink kept its own copy
    result = big.close()
    assert result.frames == 13 and result.bytes == os.path.getsize(big.path)
    grey = [float(f.mean()) for f in read_frames(big.path, "mp4")]
    assert len(grey) == 13 and all(b - a > 10 for a, b in zip(grey, grey[1:]))  # every frame once, in order
    small = open_sink("mp4", str(tmp_path / "small.mp4"), W, H, 16, encoder="libx264", frames=13)
    assert not hasattr(small, "sizes")  # libx264 called from the writer's thread
    small.abort()
    aborted = open_sink("mp4", str(tmp_path / "aborted.mp4"), 640, 360, 16, encoder="libx264", frames=13)
    aborted.write(frames[:4])
    aborted.abort()
    assert visible(tmp_path) == ["big.mp4"]


@pytest.mark.parametrize("layout", ["rgb24", "yuv420p"])
def test_a_parted_segment_holds_every_frame_once_and_joins_like_any_other(tmp_path, layout):
    from actors.colour import to_yuv420_frames
    from actors.concat import concat_segments, inspect_segment

    frames = pattern_frames(0, 61)
    path = str(tmp_path / "parted.mp4")
    sink = open_sink("mp4", path, W, H, 16, encoder="libx264", frames=61, parts=3)
    assert sink.sizes == [25, 24, 12]
    if layout == "yuv420p":  # as the frame pipeline hands it over, in chunks of 4
        chw = torch.from_numpy(frames).permute(3, 0, 1, 2).float().div(127.5).sub(1)
        frames = to_yuv420_frames(chw).numpy()
    for i in range(0, 61, 4):
        chunk = frames[i:i + 4].copy()
        sink.write(chunk)
        chunk[:] = 0  # the caller's buffer is reused at once: the sink kept its own copy
    result = sink.close()
    assert result.frames == 61 and result.codec == "libx264" and result.bytes == os.path.getsize(path)
    # The tail after the last frame: the parts not yet closed then, each joined, the segment closed last.
    assert {"joined 2", "part 2", "closed"} <= set(result.tail) and list(result.tail)[-1] == "closed"
    assert 0 <= result.tail["part 2"] <= result.tail["joined 2"] <= result.tail["closed"]
    assert visible(tmp_path) == ["parted.mp4"]  # no part left behind
    assert [read_index(f) for f in read_frames(path, "mp4")] == list(range(61))
    assert inspect_segment(path, "mp4", 16, expected=61).frames == 61
    with open(path, "rb") as f:  # each part's first frame carries its x264 options; the last
        lookaheads = re.findall(rb"rc_lookahead=(\d+)", f.read())  # part's are TAIL_X264_PARAMS
    assert lookaheads == [b"10", b"10", b"3"]
    # A segment of one encoder and a parted one join into one video: the same stream parameters.
    single = open_sink("mp4", str(tmp_path / "single.mp4"), W, H, 16, encoder="libx264", frames=8, parts=1)
    single.write(pattern_frames(61, 8))
    single.close()
    out = str(tmp_path / "video.mp4")
    concat_segments([path, str(tmp_path / "single.mp4")], "mp4", out, 16, expected_frames=[61, 8])
    assert [read_index(f) for f in read_frames(out, "mp4")] == list(range(69))


def test_a_parted_segment_whose_last_part_has_a_short_lookahead_joins_losslessly(tmp_path):
    """The last part's own x264 options (TAIL_X264_PARAMS) keep the stream header every part
    shares: the joined segment decodes to the input, bit for bit (crf 0 is lossless; x264 has
    no lookahead to shorten there, so the crf 18 test above checks that the options apply)."""
    from actors.concat import inspect_segment

    frames = np.random.default_rng(1).integers(0, 256, (30, H * 3 // 2, W), dtype=np.uint8)
    path = str(tmp_path / "lossless.mp4")
    sink = open_sink("mp4", path, W, H, 16, encoder="libx264", crf=0, frames=30, parts=2)
    assert sink.sizes == [18, 12]
    for i in range(0, 30, 4):
        sink.write(frames[i:i + 4])
    assert sink.close().frames == 30
    assert inspect_segment(path, "mp4", 16, expected=30).frames == 30
    with av.open(path) as container:
        decoded = np.stack([f.to_ndarray(format="yuv420p") for f in container.decode(video=0)])
    np.testing.assert_array_equal(decoded, frames)


def test_a_parted_segment_short_of_frames_or_aborted_leaves_nothing(tmp_path):
    sink = open_sink("mp4", str(tmp_path / "short.mp4"), W, H, 16, encoder="libx264", frames=48, parts=3)
    sink.write(pattern_frames(0, 40))
    with pytest.raises(ValueError, match="40 frames written"):
        sink.close()
    long = open_sink("mp4", str(tmp_path / "long.mp4"), W, H, 16, encoder="libx264", frames=48, parts=3)
    with pytest.raises(ValueError, match="more than the 48 frames"):
        long.write(pattern_frames(0, 49))
    long.abort()
    aborted = open_sink("mp4", str(tmp_path / "aborted.mp4"), W, H, 16, encoder="libx264", frames=48, parts=3)
    aborted.write(pattern_frames(0, 30))
    aborted.abort()
    aborted.abort()
    assert visible(tmp_path) == []

"""The frame pipeline on the CPU path: the same frames at every depth (0: synchronous), errors end the run promptly."""

import os
import threading

import numpy as np
import pytest
import torch

from actors.decoders import TestPatternDecoder, pattern_latents, read_index
from actors.colour import to_uint8_frames
from actors.pipeline import run_pipeline
from actors.sinks import open_sink, read_frames
from actors.protocol import pixel_frames

H, W = 96, 128


def _host_threads():
    return [t for t in threading.enumerate() if t.name == "framefarm-host"]


def _render(tmp_path, name, latents, drop=0, depth=2, fmt="ffv1"):
    path = str(tmp_path / name)
    sink = open_sink(fmt, path, W, H, 16)
    report, result = run_pipeline(TestPatternDecoder().stream(latents), sink, drop=drop, depth=depth)
    return report, result, read_frames(path, fmt)


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.5, 1.0, 3.0]).view(1, 1, 1, 7).expand(3, 1, 1, 7)
    u8 = to_uint8_frames(x)
    assert u8.shape == (1, 1, 7, 3) and u8.dtype == torch.uint8
    # round((x + 1) * 127.5): 0.0 -> 127.5 -> 128 (round half to even gives 128), never truncated to 127
    assert u8[0, 0, :, 0].tolist() == [0, 0, 0, 128, 191, 255, 255]


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_sync_and_async_give_identical_frames(tmp_path, depth):
    latents = pattern_latents(6, H, W)
    rs, _, sync_frames = _render(tmp_path, "sync.mkv", latents, depth=0)
    ra, _, async_frames = _render(tmp_path, "async.mkv", latents, depth=depth)
    assert (rs.mode, ra.mode) == ("sync", "async")
    assert sync_frames.shape[0] == pixel_frames(6) == rs.frames == ra.frames
    np.testing.assert_array_equal(sync_frames, async_frames)
    assert [read_index(f) for f in async_frames] == list(range(pixel_frames(6)))
    for r in (rs, ra):
        assert r.chunks == 6 and r.gpu_busy_s > 0 and r.host_busy_s > 0 and r.bottleneck in {"gpu", "host", "copy"}
        # Every step timed: the quantiles are ordered and the slowest is no more than all of them.
        assert 0 < r.step_ms["p50"] <= r.step_ms["p90"] <= r.step_ms["max"] <= r.gpu_busy_s * 1e3 + 0.01
        assert r.cores >= 1 and r.torch_threads >= 1
    assert not _host_threads()


def test_leading_context_frames_are_dropped(tmp_path):
    latents = pattern_latents(7, H, W)[:, 2:]  # a stream that starts at latent 2 (context)
    report, result, frames = _render(tmp_path, "tail.mkv", latents, drop=5)
    # Latent 2 as a stream's first decodes to one frame, latent 3 to frames 9..12, dropped with it.
    assert [read_index(f) for f in frames] == list(range(13, 25))
    assert report.frames == result.frames == 12


class _FailingSink:
    """A real FFV1 sink that fails on its third write, as a full disk would."""

    def __init__(self, path):
        self.inner = open_sink("ffv1", path, W, H, 16)
        self.writes = 0
        self.aborted = False

    def write(self, frames):
        self.writes += 1
        if self.writes == 3:
            raise OSError("No space left on device")
        self.inner.write(frames)

    def close(self):
        return self.inner.close()

    def abort(self):
        self.aborted = True
        self.inner.abort()


@pytest.mark.parametrize("depth", [0, 2])
def test_failing_sink_ends_the_run_with_its_error(tmp_path, depth):
    path = str(tmp_path / "out.mkv")
    sink = _FailingSink(path)
    # Far more chunks than the ring holds: a hang would show as the test never returning.
    with pytest.raises((OSError, RuntimeError), match="No space left"):
        run_pipeline(TestPatternDecoder().stream(pattern_latents(200, H, W)), sink, depth=depth)
    assert sink.aborted and not os.path.exists(path)
    assert os.listdir(tmp_path) == []
    assert not _host_threads()


def test_failing_decoder_aborts_the_sink(tmp_path):
    path = str(tmp_path / "out.mp4")

    def broken_stream():
        yield from TestPatternDecoder().stream(pattern_latents(3, H, W))
        raise RuntimeError("CUDA error: an illegal memory access")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        run_pipeline(broken_stream(), open_sink("mp4", path, W, H, 16))
    assert os.listdir(tmp_path) == []
    assert not _host_threads()


class _StuckSink:
    """Its first write blocks until released: a sink stuck in I/O. Records who did what, when.

    The first, so that no slow write before it (a loaded machine) can be what the timeout sees.
    """

    def __init__(self, path):
        self.inner = open_sink("ffv1", path, W, H, 16)
        self.release = threading.Event()
        self.aborted = threading.Event()
        self.events: list[str] = []
        self.writes = 0

    def write(self, frames):
        self.writes += 1
        self.events.append("write")
        if self.writes == 1:
            assert self.release.wait(timeout=60), "never released"
        self.inner.write(frames)
        self.events.append("written")

    def close(self):
        return self.inner.close()

    def abort(self):
        self.events.append("abort")
        self.inner.abort()
        self.aborted.set()


@pytest.mark.parametrize("latents, message", [
    (2, "did not stop within 0.5 s"),  # both chunks fit the ring: the final join times out
    (4, "took no frames for 0.5 s"),  # the third chunk finds the ring full: the wait for a buffer
])
def test_a_stuck_sink_is_aborted_by_its_own_thread_once_its_write_returns(tmp_path, latents, message):
    from actors.pipeline import HostStuck

    sink = _StuckSink(str(tmp_path / "out.mkv"))
    with pytest.raises(HostStuck, match=message):
        run_pipeline(TestPatternDecoder().stream(pattern_latents(latents, H, W)), sink,
                     join_timeout_s=0.5)
    # The owner gave up but did not touch the sink while a write was in progress ...
    assert sink.events[-1] == "write" and not sink.aborted.is_set()
    sink.release.set()
    # ... the host thread aborts it when that write returns, and writes nothing more.
    assert sink.aborted.wait(timeout=30)
    assert sink.events[-2:] == ["written", "abort"]
    assert os.listdir(tmp_path) == []
    for thread in _host_threads():
        thread.join(timeout=30)
    assert not _host_threads()


class _SlowerThanTheDecoderSink:
    """A real FFV1 sink whose every write lasts until the decode loop has found the ring full.

    The host is then the slower side by construction, not by a timer: write k returns only
    once the loop, holding chunk k+2 with no free buffer, says it waits (`on_backpressure`).
    After the decoder's last chunk nothing waits any more, and the last writes go through.
    """

    def __init__(self, path):
        self.inner = open_sink("ffv1", path, W, H, 16)
        self.cond = threading.Condition()
        self.backpressure = 0  # times the decode loop found every buffer taken
        self.held = 0  # writes that have waited for one of those
        self.decoder_done = False

    def on_backpressure(self):
        with self.cond:
            self.backpressure += 1
            self.cond.notify_all()

    def finish_decoding(self):
        with self.cond:
            self.decoder_done = True
            self.cond.notify_all()

    def write(self, frames):
        with self.cond:
            assert self.cond.wait_for(lambda: self.backpressure > self.held or self.decoder_done, timeout=60), \
                "the decode loop never waited for a buffer"
            self.held += 1
        self.inner.write(frames)

    def close(self):
        return self.inner.close()

    def abort(self):
        self.inner.abort()


@pytest.mark.parametrize("depth", [1, 2])
def test_backpressure_names_the_host_as_bottleneck(tmp_path, depth):
    sink = _SlowerThanTheDecoderSink(str(tmp_path / "out.mkv"))
    latents = pattern_latents(24, H, W)
    decoded = list(TestPatternDecoder().stream(latents))  # decoding done up front: the steps cost ~nothing
    to_uint8_frames(decoded[0])  # and so does the conversion, warm before the first step

    def stream():
        yield from decoded
        sink.finish_decoding()

    # One intra-op thread: with two OpenMP threads on a busy two-core machine, the step's
    # 0.5 ms conversion can spin for 100 ms, and the first step is one no write overlaps.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report, result = run_pipeline(stream(), sink, depth=depth, on_backpressure=sink.on_backpressure)
    finally:
        torch.set_num_threads(threads)
    assert result.frames == report.frames == pixel_frames(24)
    # Every chunk after the first `depth` found the ring full and waited for the host, whose
    # writes then span the decoder's steps: only the first step and every write's own
    # encoding fall outside that overlap, and the encoding is far the larger.
    assert report.buffer_waits == len(decoded) - depth
    assert report.wait_for_buffer_s > 0
    assert report.bottleneck == "host"


def test_a_flush_after_the_last_chunk_names_the_host_and_a_busy_gpu_names_the_gpu():
    from actors.protocol import PipelineReport

    # The parted mp4 sink takes frames at once (little write time) and its encoders finish
    # after the last chunk: that flush is host time the GPU sat idle for.
    lagging = PipelineReport("async", wall_s=5.04, gpu_busy_s=3.65, copy_s=0.2, host_busy_s=0.25, flush_s=1.38)
    assert lagging.bottleneck == "host"
    paced = PipelineReport("async", wall_s=3.75, gpu_busy_s=3.65, copy_s=0.2, host_busy_s=0.25, flush_s=0.05)
    assert paced.bottleneck == "gpu"
    copies = PipelineReport("async", wall_s=5.0, gpu_busy_s=2.0, copy_s=3.0, host_busy_s=0.5, flush_s=0.1)
    assert copies.bottleneck == "copy"
    # Done one after another, the largest stage is named.
    assert PipelineReport("sync", wall_s=6.0, gpu_busy_s=3.0, copy_s=0.5, host_busy_s=2.0, flush_s=0.5
                          ).bottleneck == "gpu"
    assert PipelineReport("sync", wall_s=6.0, gpu_busy_s=2.0, copy_s=0.5, host_busy_s=2.0, flush_s=1.0
                          ).bottleneck == "host"
    assert PipelineReport.from_dict(lagging.as_dict()).bottleneck == "host"


def test_gpu_side_yuv420_matches_bt709_reference_values():
    from actors.colour import to_yuv420_frames

    colours = {"white": (1, 1, 1), "black": (-1, -1, -1), "red": (1, -1, -1), "blue": (-1, -1, 1)}
    expect = {"white": (235, 128, 128), "black": (16, 128, 128), "red": (63, 102, 240), "blue": (32, 240, 118)}
    for name, rgb in colours.items():
        chunk = torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 2, 4, 6)
        yuv = to_yuv420_frames(chunk)
        assert yuv.shape == (2, 6, 6) and yuv.dtype == torch.uint8
        flat = yuv[0].reshape(-1)
        y, u, v = flat[:24], flat[24:30], flat[30:]
        assert (y.unique().tolist(), u.unique().tolist(), v.unique().tolist()) == tuple(
            [[c] for c in expect[name]]), name


def test_mp4_from_gpu_yuv_reads_back_like_the_rgb_path(tmp_path):
    latents = pattern_latents(4, H, W)
    report, result, frames = _render(tmp_path, "yuv.mp4", latents, fmt="mp4")
    assert [read_index(f) for f in frames] == list(range(pixel_frames(4)))
    # The same frames through the host-side (swscale) conversion: decoded pixels agree closely.
    sink = open_sink("mp4", str(tmp_path / "rgb.mp4"), W, H, 16)
    for chunk in TestPatternDecoder().stream(latents):
        sink.write(to_uint8_frames(chunk).numpy())
    sink.close()
    rgb_path = read_frames(str(tmp_path / "rgb.mp4"), "mp4").astype(int)
    assert np.abs(rgb_path - frames.astype(int)).mean() < 1.5


_FROZEN_CHILD = r"""
import hashlib, sys, time
from actors.decoders import TestPatternDecoder, pattern_latents, read_index
from actors.pipeline import run_pipeline
from actors.sinks import open_sink, read_frames

BLOCK = bytes(1 << 20)

class SlowSink:
    # Slower than the decoder, so the decode loop spends its time waiting for a free buffer.
    def __init__(self, path):
        self.inner, self.layout = open_sink("ffv1", path, 128, 96, 16), "rgb24"
    def write(self, frames):
        # A slow encoder: 0.3 s of this thread's CPU, which a frozen process does not spend, so
        # the freeze lands inside this write and the write goes on once the process is let go.
        # hashlib lets go of the GIL, as an encoder does, so the decode loop is free to wait.
        done = time.thread_time() + 0.3
        while time.thread_time() < done:
            hashlib.sha256(BLOCK).digest()
        self.inner.write(frames)
    def close(self):
        return self.inner.close()
    def abort(self):
        self.inner.abort()

waits = []

def waiting():  # the decode loop found the ring's one buffer held by a write: it waits from here
    waits.append(1)
    if len(waits) == 2:
        print("waiting", flush=True)

path = sys.argv[1]
run_pipeline(TestPatternDecoder().stream(pattern_latents(10, 96, 128)), SlowSink(path), depth=1,
             join_timeout_s=2.0, on_backpressure=waiting)
print("frames", [read_index(f) for f in read_frames(path, "ffv1")] == list(range(37)), flush=True)
"""


def test_a_process_frozen_mid_shard_is_not_mistaken_for_a_stuck_sink(tmp_path):
    """SIGSTOP (or a paused VM) freezes the decode loop and the sink alike; once let go, the
    sink takes frames again at once. The wait for a buffer must not count the frozen seconds
    as the sink's: 5 s frozen against a 2 s patience, and the run still ends whole."""
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen([sys.executable, "-c", _FROZEN_CHILD, str(tmp_path / "out.mkv")], cwd=root,
                             env={**os.environ, "PYTHONPATH": root}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "waiting"
        os.kill(child.pid, signal.SIGSTOP)
        time.sleep(5.0)  # how long it stays frozen: the condition under test, not a wait for it
        os.kill(child.pid, signal.SIGCONT)
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err[-3000:]
    assert out.strip() == "frames True"

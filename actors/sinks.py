"""Where decoded frames go: one encoded segment file per shard, committed atomically.

Frames arrive as numpy uint8 arrays [F, H, W, 3] RGB, in order, from one host thread.
A sink writes them to a temporary name beside its final path and renames it into place on
close, so a file at a final path is always complete: an upload or a stitcher that sees it
never reads half a segment, and a crashed worker leaves only a hidden temporary file, which
store listings skip.

Formats:
  mp4   H.264 (NVENC where it works, else libx264), yuv420p, BT.709 limited range, lossy.
  ffv1  FFV1 in Matroska, bgr0: the RGB comes back bit-exact.
  png   a segment is an uncompressed tar of 000000.png, 000001.png...; segments go to object
        storage as single objects, and the stitcher unpacks them into one `frames/` folder.
"""

from __future__ import annotations

import io
import os
import queue
import tarfile
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Protocol

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace, VideoReformatter

from actors.protocol import check_format
from actors.concat import StreamingConcat
from infra.staged import Staged

_MKV_ALIASES = ("ffv1", "mkv")

# AVColorSpace / AVColorPrimaries / AVColorTransferCharacteristic / AVColorRange values
# for BT.709 limited range: players assume BT.709 for HD when a stream is untagged, so we
# both convert with it and say so in the stream.
_BT709 = 1
_RANGE_MPEG = 1

# libx264 preset names mapped onto NVENC's p1 (fastest) .. p7 (best): NVENC refuses x264 names.
_NVENC_PRESETS = {
    "ultrafast": "p1", "superfast": "p1", "veryfast": "p2", "faster": "p3", "fast": "p4",
    "medium": "p4", "slow": "p5", "slower": "p6", "veryslow": "p7", "placebo": "p7",
}


@dataclass(frozen=True)
class SinkResult:
    path: str
    frames: int
    bytes: int
    flush_seconds: float  # final encoder flush + container close
    encode_seconds: float  # everything inside write() and close()
    codec: str = ""  # the encoder that actually ran ("libx264", "h264_nvenc", "ffv1", "png")
    # A parted segment's tail, seconds after its last frame arrived: each part's encoder
    # closed ("part N"), each part joined ("joined N"), the segment closed ("closed").
    tail: dict = field(default_factory=dict)


class Sink(Protocol):
    # The frame layout `write` takes most cheaply: "rgb24" ([F, H, W, 3]) or "yuv420p"
    # ([F, H*3/2, W], I420 planes stacked, BT.709 limited range) which the frame pipeline
    # produces on the GPU, saving the host a colour conversion and the copy half its bytes.
    layout: str

    def write(self, frames: np.ndarray) -> None:
        """Encode uint8 frames in `layout` (or RGB [F, H, W, 3]), F >= 1, in order."""
        ...

    def close(self) -> SinkResult:
        """Flush, finish the container and move it to its final path."""
        ...

    def abort(self) -> None:
        """Remove anything partial. Idempotent; safe after a failed close."""
        ...


def nvenc_available(width: int = 256, height: int = 256) -> bool:
    """Whether an h264_nvenc encoder opens here now.

    FFmpeg wheels list h264_nvenc even on machines with no NVIDIA driver, and GPUs without
    encoder engines (H100, H200, A100) have the driver but refuse the session, so the only
    honest test is to open one. Nothing is cached: a caller that asks often should keep the
    answer itself.
    """
    return encoder_opens("h264_nvenc", width, height)


def encoder_opens(codec: str, width: int = 256, height: int = 256) -> bool:
    """Whether an encoder context for `codec` opens here now (and is released again)."""
    try:
        ctx = av.CodecContext.create(codec, "w")
        ctx.width, ctx.height = width, height
        ctx.pix_fmt = "yuv420p"
        ctx.time_base = Fraction(1, 16)
        ctx.open()
    except Exception:  # missing libcuda, no encoder engine, session limit: all mean "no"
        return False
    # PyAV codec contexts have no close(): the session ends when the context is freed.
    del ctx
    return True


def open_sink(fmt: str, path: str, width: int, height: int, fps: int = 16, *, encoder: str = "auto",
              crf: int = 18, preset: str = "veryfast", threads: int = 1, frames: int | None = None,
              parts: int | None = None, low_latency_tail: bool = True) -> Sink:
    """A sink for one segment of `fmt` at `path`.

    mp4 with libx264, given the segment's frame count (`frames`) and frames of 640x360 or
    more (or `parts`): consecutive parts encoded side by side on threads of their own
    (`plan_parts`; a segment too short to split has one), frames waiting for them in memory
    (see `_PartedMp4Sink`), so that libx264's uneven pace never holds the frame pipeline's
    buffers; `parts` overrides the count; `parts=1` is one encoder called from the writer's
    thread. `low_latency_tail`: the last of several parts is encoded with `TAIL_X264_PARAMS`,
    and the segment is put on disk as each earlier part joins it, so that little is left to
    do after the last frame (False: as before 2026-12-02, for benchmarks).
    """
    fmt = check_format(fmt)
    if width <= 0 or height <= 0:
        raise ValueError(f"bad frame size {width}x{height}")
    if fps <= 0:
        raise ValueError(f"bad fps {fps}")
    if frames is not None and frames < 1:
        raise ValueError(f"a segment of {frames} frames")
    if fmt == "mp4":
        # NVENC is one fast stream on its own engine: never split or queue it.
        queued = parts is not None or width * height >= MIN_PARTED_PIXELS
        if (frames is not None and encoder != "h264_nvenc" and parts != 1 and queued
                and (encoder == "libx264" or not nvenc_available(width, height))):
            sizes, part_threads = plan_parts(frames, width, height, available_cores(), parts)
            return _PartedMp4Sink(path, width, height, fps, sizes, crf=crf, preset=preset,
                                  threads=part_threads, low_latency_tail=low_latency_tail)
        return _Mp4Sink(path, width, height, fps, encoder=encoder, crf=crf, preset=preset, threads=threads)
    if fmt in _MKV_ALIASES:
        return _Ffv1Sink(path, width, height, fps, threads=threads)
    return _PngTarSink(path, width, height, threads=threads)


# ---------------------------------------------------------------------------------------
# Frame-parallel H.264: how a segment is cut into parts

# A part shorter than this pays its IDR frame over too few frames (bytes).
MIN_PART_FRAMES = 12
# Below this many pixels libx264 is called from the writer's thread: a frame encodes so fast
# that a thread of its own gains nothing.
MIN_PARTED_PIXELS = 640 * 360
# Decoded frames that may wait for their part's encoder (about 370 frames of 720p I420).
_BUFFER_BYTES = 512 * 2**20
_POLL_S = 0.1
_ABORT_JOIN_S = 30.0
# libx264 options of a parted segment's last part. What is left to encode after the last
# frame is what libx264 holds back: with veryfast's rc-lookahead of 10 and 3 B-frames, about
# 13 frames, all of a 12-frame last part. A lookahead of 3 (x264 raises anything smaller to
# the B-frame count, and 0 turns off mb-tree and adaptive B-frames: +4% bytes) holds about
# 6; slice threads (PyAV's default already) and no sync lookahead add no frame-thread delay.
# None of these reach the stream header: SPS and PPS stay byte-identical to the other parts',
# which actors/concat.py requires, and B-frames, pyramid and refs, on which the header's
# reorder depth depends, are untouched. Measured in docs/benchmarks.md (bytes within 0.2%).
TAIL_X264_PARAMS = "sliced-threads=1:sync-lookahead=0:rc-lookahead=3"


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask: `taskset`, a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def plan_parts(frames: int, width: int, height: int, cores: int, parts: int | None = None
               ) -> tuple[list[int], list[int]]:
    """Consecutive part sizes for a segment of `frames` frames, and libx264 threads for each
    (0: libx264 chooses by core count).

    Parts are encoded side by side and appended to the segment as each finishes. Frames reach
    the sink in order, as fast as the decoder makes them, so what is left after the last frame
    is the last part's encoding (libx264 holds back its lookahead until it is flushed: 10
    frames, 3 in the last part, whose `TAIL_X264_PARAMS` shorten it). The parts therefore
    double in size from the end, the last MIN_PART_FRAMES long, so that few parts mean few
    extra IDR frames and little left after the last frame; each has a thread per core, shared
    where parts overlap. On 8 cores of an H200 host at 720p, before the short lookahead, this
    left 0.33-0.36 s after the last frame in three runs out of three, where one encoder on a
    thread of its own left 0.34 and 0.67 s (docs/benchmarks.md), at the same bytes.
    `parts` overrides the count (1: one encoder); one core gets one encoder.
    """
    if cores < 2:
        parts = 1
    limit = max(1, frames // MIN_PART_FRAMES if parts is None else min(parts, frames // MIN_PART_FRAMES))
    tail: list[int] = []  # from the end
    left, size = frames, MIN_PART_FRAMES
    while len(tail) + 1 < limit and left - size >= size:
        tail.append(size)
        left -= size
        size *= 2
    sizes = [left, *reversed(tail)]
    if len(sizes) == 1:
        return sizes, [0]
    return sizes, [max(1, cores)] * len(sizes)


# ---------------------------------------------------------------------------------------
# Sinks


class _BaseSink:
    """Bookkeeping shared by the sinks: state, timing, frame checks, failure latching."""

    codec = ""
    layout = "rgb24"

    def __init__(self, path: str, width: int, height: int):
        self._staged = Staged(path)
        self.path = self._staged.path
        self.width, self.height = width, height
        self.frames = 0
        self._encode_seconds = 0.0
        self._state = "open"  # open -> closed | aborted | failed
        self._error: BaseException | None = None

    # Subclasses implement these three.
    def _encode(self, frame: np.ndarray) -> None: ...
    def _finish(self) -> None: ...
    def _release(self) -> None: ...

    def _commit(self) -> int:
        return self._staged.commit()

    def write(self, frames: np.ndarray) -> None:
        self._check_open()
        frames = self._check_frames(frames)
        start = time.perf_counter()
        try:
            for frame in frames:
                self._encode(frame)
                self.frames += 1
        except BaseException as exc:
            # An encoder that failed once holds an unknown number of frames: the segment
            # can no longer be exact, so every later call must fail too.
            self._state, self._error = "failed", exc
            raise
        finally:
            self._encode_seconds += time.perf_counter() - start

    def close(self) -> SinkResult:
        self._check_open()
        start = time.perf_counter()
        try:
            if self.frames == 0:
                raise ValueError(f"{self.path}: no frames written")
            self._finish()
            flush = time.perf_counter() - start
            size = self._commit()
        except BaseException as exc:
            self._state, self._error = "failed", exc
            self.abort()
            raise
        self._state = "closed"
        self._encode_seconds += time.perf_counter() - start
        return SinkResult(self.path, self.frames, size, flush, self._encode_seconds, self.codec)

    def abort(self) -> None:
        if self._state in ("closed", "aborted"):
            return
        if self._state == "open":
            self._state = "aborted"
        try:
            self._release()
        except Exception:
            pass  # the partial file is going away; its container's complaints don't matter
        self._staged.discard()

    def _check_open(self) -> None:
        if self._state == "failed":
            raise RuntimeError(f"{self.path}: sink failed earlier: {self._error!r}") from self._error
        if self._state != "open":
            raise RuntimeError(f"{self.path}: sink is {self._state}")

    def _check_frames(self, frames: np.ndarray) -> np.ndarray:
        frames = np.asarray(frames)
        if self.layout == "yuv420p" and frames.ndim == 3:
            if frames.shape[1:] != (self.height * 3 // 2, self.width) or frames.shape[0] < 1:
                raise ValueError(f"{self.path}: expected yuv420p frames [F>=1, {self.height * 3 // 2}, "
                                 f"{self.width}], got {list(frames.shape)}")
            if frames.dtype != np.uint8:
                raise ValueError(f"{self.path}: expected uint8 frames, got {frames.dtype}")
            return frames
        # The encoders' reformatters would silently rescale a frame of the wrong size.
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3) or frames.shape[0] < 1:
            raise ValueError(f"{self.path}: expected frames [F>=1, {self.height}, {self.width}, 3], "
                             f"got {list(frames.shape)}")
        if frames.dtype != np.uint8:
            raise ValueError(f"{self.path}: expected uint8 frames, got {frames.dtype}")
        return frames


class _AvSink(_BaseSink):
    """A PyAV container with one video stream; pts = frame index in 1/fps."""

    def __init__(self, path: str, width: int, height: int, fps: int, container_format: str,
                 target: io.BytesIO | None = None):
        super().__init__(path, width, height)
        self._target = target  # None: the staged file beside `path`; else this in-memory file
        self.fps = fps
        self._time_base = Fraction(1, fps)
        self._container_format = container_format
        self._container = None
        self._stream = None

    def _open_stream(self, codec: str, pix_fmt: str, options: dict[str, str], threads: int,
                     bt709: bool = False) -> None:
        # The file itself is only created at the first mux, so a failure here leaves nothing.
        container = av.open(self._staged.tmp if self._target is None else self._target, "w",
                            format=self._container_format)
        try:
            stream = container.add_stream(codec, rate=self.fps, options=options)
            ctx = stream.codec_context
            ctx.width, ctx.height = self.width, self.height
            ctx.pix_fmt = pix_fmt
            ctx.time_base = self._time_base
            stream.time_base = self._time_base
            ctx.thread_count = threads
            if bt709:
                ctx.colorspace = ctx.color_primaries = ctx.color_trc = _BT709
                ctx.color_range = _RANGE_MPEG
            # Open now so that an encoder that cannot run fails in open_sink, not mid-shard.
            ctx.open()
        except BaseException:
            container.close()
            raise
        self._container, self._stream, self.codec = container, stream, codec

    def _to_av_frame(self, rgb: np.ndarray) -> av.VideoFrame:
        return av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")

    def _encode(self, rgb: np.ndarray) -> None:
        frame = self._to_av_frame(rgb)
        frame.pts = self.frames
        frame.time_base = self._time_base
        self._container.mux(self._stream.encode(frame))

    def _finish(self) -> None:
        self._container.mux(self._stream.encode(None))
        container, self._container = self._container, None
        container.close()

    def _release(self) -> None:
        container, self._container = self._container, None
        if container is not None:
            container.close()


class _Mp4Sink(_AvSink):
    def __init__(self, path: str, width: int, height: int, fps: int, *, encoder: str, crf: int,
                 preset: str, threads: int, target: io.BytesIO | None = None, x264_params: str = ""):
        if width % 2 or height % 2:
            raise ValueError(f"mp4 (yuv420p) needs even dimensions, got {width}x{height}")
        if encoder not in ("auto", "libx264", "h264_nvenc"):
            raise ValueError(f"unknown encoder {encoder!r}")
        super().__init__(path, width, height, fps, "mp4", target)
        self._reformatter: VideoReformatter | None = None
        if encoder in ("auto", "h264_nvenc"):
            try:
                self._open_stream("h264_nvenc", "yuv420p", self._nvenc_options(crf, preset), threads, bt709=True)
                return
            except Exception:
                if encoder == "h264_nvenc":
                    raise
        x264 = {"crf": str(crf), "preset": preset}
        if x264_params:
            x264["x264-params"] = x264_params
        self._open_stream("libx264", "yuv420p", x264, threads, bt709=True)

    @staticmethod
    def _nvenc_options(crf: int, preset: str) -> dict[str, str]:
        # Constant quality: vbr with cq and no bitrate target is NVENC's nearest to x264's crf.
        return {"preset": _NVENC_PRESETS.get(preset, preset), "rc": "vbr", "cq": str(crf), "b": "0"}

    layout = "yuv420p"

    def _to_av_frame(self, rgb: np.ndarray) -> av.VideoFrame:
        if rgb.ndim == 2:  # already I420 (converted on the GPU with the same BT.709 matrix)
            return av.VideoFrame.from_ndarray(rgb, format="yuv420p")
        # Converted here rather than by the encoder, whose reformatter would use BT.601,
        # so that the matrix matches the stream's BT.709 tags.
        if self._reformatter is None:
            self._reformatter = VideoReformatter()
        return self._reformatter.reformat(
            super()._to_av_frame(rgb), format="yuv420p", dst_colorspace=Colorspace.ITU709,
            dst_color_range=ColorRange.MPEG)


class _Mp4Part(_Mp4Sink):
    """One part of a `_PartedMp4Sink`: an mp4 of its own libx264 encoder, written to memory.

    Parts never touch the disk: they live only until the segment has copied their packets,
    and writing, flushing and re-reading them cost more than encoding the last frames.
    """

    def __init__(self, name: str, width: int, height: int, fps: int, *, crf: int, preset: str, threads: int,
                 x264_params: str = ""):
        super().__init__(name, width, height, fps, encoder="libx264", crf=crf, preset=preset, threads=threads,
                         target=io.BytesIO(), x264_params=x264_params)
        self.data: bytes | None = None  # the whole mp4, once closed

    def _commit(self) -> int:
        target, self._target = self._target, None
        self.data = target.getvalue()
        return len(self.data)


class _PartedMp4Sink:
    """An mp4 segment encoded by libx264 on threads of its own: one encoder, or consecutive parts.

    One part: its encoder writes the segment itself, from its own thread. Several: each part
    is a closed H.264 stream of its own encoder (the same codec parameters as every other
    part, so one stream header serves them all), encoded into memory by its own thread, and a
    joiner thread appends each finished part, in order, to the segment (actors/concat.py:
    packets copied, timestamps shifted, frame counts and timestamps checked), so that when
    the last frame arrives only the last parts are left to encode and join. The segment
    appears at `path` complete or not at all. Frames are copied on arrival, since the frame
    pipeline reuses its buffers, and wait in memory for their part's encoder: at most
    `max_buffered` of them, beyond which write() blocks (the pipeline then reports the host as
    its bottleneck).
    """

    codec = "libx264"
    layout = "yuv420p"

    def __init__(self, path: str, width: int, height: int, fps: int, sizes: list[int], *, crf: int,
                 preset: str, threads: list[int], max_buffered: int | None = None,
                 low_latency_tail: bool = True):
        self.path = os.path.abspath(path)
        self.width, self.height, self.fps = width, height, fps
        self.sizes = list(sizes)
        self.total = sum(sizes)
        self.frames = 0  # received so far
        if len(threads) != len(sizes):
            raise ValueError(f"{len(sizes)} parts but {len(threads)} thread counts")
        self.threads = list(threads)
        self._options = dict(crf=crf, preset=preset)
        # One part is the whole segment: a short lookahead there would cost bytes everywhere.
        self._low_latency_tail = low_latency_tail and len(sizes) > 1
        frame_bytes = width * height * 3 // 2
        self.max_buffered = max_buffered or max(2 * MIN_PART_FRAMES, _BUFFER_BYTES // frame_bytes)
        self._cond = threading.Condition()
        self._buffered = 0
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._parts: list[_Part] = []
        self._state = "open"
        self._seconds = 0.0
        self._marks: dict[str, float] = {}  # perf_counter() of the tail's events (SinkResult.tail)
        # One part writes the segment itself; several are joined into it.
        self._concat = StreamingConcat("mp4", self.path, fps) if len(sizes) > 1 else None
        # The first part's encoder opens now, so that one that cannot run fails in open_sink.
        try:
            self._open_part()
        except BaseException:
            if self._concat is not None:
                self._concat.abort()
            raise
        self._joiner = None
        if self._concat is not None:
            self._joiner = threading.Thread(target=self._join_parts, name="framefarm-x264-join", daemon=True)
            self._joiner.start()

    def _open_part(self) -> _Part:
        index = len(self._parts)
        if self._concat is None:
            sink = _Mp4Sink(self.path, self.width, self.height, self.fps, encoder="libx264",
                            threads=self.threads[index], **self._options)
        else:
            sink = _Mp4Part(f"{self.path}#part{index}", self.width, self.height, self.fps,
                            threads=self.threads[index], **self._options,
                            x264_params=TAIL_X264_PARAMS if self._low_latency_tail and index == len(self.sizes) - 1
                            else "")
        part = _Part(self, index, sink, self.sizes[index])
        with self._cond:
            self._parts.append(part)
            self._cond.notify_all()
        return part

    def write(self, frames: np.ndarray) -> None:
        start = time.perf_counter()
        try:
            self._check_open()
            frames = np.asarray(frames)
            if frames.ndim == 4:  # RGB: the host converts, as the one-encoder sink does
                frames = np.stack([self._to_i420(f) for f in frames])
            if frames.ndim != 3 or frames.shape[1:] != (self.height * 3 // 2, self.width) or frames.dtype != np.uint8:
                raise ValueError(f"{self.path}: expected yuv420p uint8 frames [F, {self.height * 3 // 2}, "
                                 f"{self.width}], got {frames.dtype} {list(frames.shape)}")
            if self.frames + len(frames) > self.total:
                raise ValueError(f"{self.path}: more than the {self.total} frames this segment was opened for")
            while len(frames):
                part = self._parts[-1]
                if part.received == part.size:
                    part = self._open_part()
                n = min(len(frames), part.size - part.received)
                self._reserve(n)
                part.put(frames[:n].copy())  # the caller's buffer goes back to its ring
                frames = frames[n:]
                self.frames += n
            if self.frames == self.total:
                self._marks["last frame"] = time.perf_counter()
        finally:
            self._seconds += time.perf_counter() - start

    def _to_i420(self, rgb: np.ndarray) -> np.ndarray:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        yuv = frame.reformat(format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG)
        return yuv.to_ndarray()

    def _reserve(self, n: int) -> None:
        """Wait until `n` more frames may wait in memory (all of them if nothing waits)."""
        with self._cond:
            while self._buffered and self._buffered + n > self.max_buffered:
                self._raise_failure()
                self._cond.wait(_POLL_S)
            self._raise_failure()
            self._buffered += n

    def _done_with(self, n: int) -> None:
        with self._cond:
            self._buffered -= n
            self._cond.notify_all()

    def _failed(self, exc: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = exc
            self._stop.set()
            self._cond.notify_all()

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"{self.path}: a part's encoder failed: {self._error!r}") from self._error

    def _join_parts(self) -> None:
        """The joiner thread: append each part to the segment as soon as it is encoded, in order."""
        try:
            for index, size in enumerate(self.sizes):
                with self._cond:
                    while len(self._parts) <= index and not self._stop.is_set():
                        self._cond.wait(_POLL_S)
                if self._stop.is_set():
                    return
                part = self._parts[index]
                while not part.finished.wait(_POLL_S):
                    if self._stop.is_set():
                        return
                if part.sink.data is None:  # its encoder failed, and said so to the owner
                    return
                data, part.sink.data = part.sink.data, None  # the packets are in the segment now
                self._concat.append(part.sink.path, size, data=data)
                self._marks[f"joined {index}"] = time.perf_counter()
                if self._low_latency_tail and index < len(self.sizes) - 1:
                    self._concat.sync()  # while the next part encodes, not after the last frame
        except BaseException as exc:  # noqa: BLE001 - carried to the owner's next call
            self._failed(exc)

    def close(self) -> SinkResult:
        self._check_open()
        start = time.perf_counter()
        try:
            if self.frames != self.total:
                raise ValueError(f"{self.path}: {self.frames} frames written, the segment was opened for "
                                 f"{self.total}")
            if self._concat is None:
                part = self._parts[0]
                part.join(self._raise_failure)
                self._raise_failure()
                size = part.result.bytes
            else:
                while self._joiner.is_alive():
                    self._raise_failure()
                    self._joiner.join(_POLL_S)
                self._raise_failure()
                size = self._concat.close().bytes
        except BaseException:
            self.abort()
            raise
        finally:
            self._seconds += time.perf_counter() - start
        self._state = "closed"
        self._marks["closed"] = time.perf_counter()
        for part in self._parts:
            if part.closed_at is not None:
                self._marks[f"part {part.index}"] = part.closed_at
        last = self._marks.get("last frame", start)
        tail = {k: round(t - last, 4) for k, t in sorted(self._marks.items(), key=lambda kv: kv[1]) if k != "last frame"}
        return SinkResult(self.path, self.total, size, time.perf_counter() - start, self._seconds, self.codec, tail)

    def abort(self) -> None:
        if self._state in ("closed", "aborted"):
            return
        self._state = "aborted"
        self._stop.set()
        for part in self._parts:
            part.join(None, timeout=_ABORT_JOIN_S)
        if self._concat is not None:
            self._joiner.join(_ABORT_JOIN_S)
            self._concat.abort()

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"{self.path}: sink is {self._state}")
        self._raise_failure()


class _Part:
    """One part of a `_PartedMp4Sink`: its encoder, fed from a queue by its own thread."""

    def __init__(self, owner: _PartedMp4Sink, index: int, sink: _Mp4Sink, size: int):
        self.owner, self.sink, self.size, self.index = owner, sink, size, index
        self.result: SinkResult | None = None
        self.closed_at: float | None = None  # perf_counter() once its encoder closed
        self.received = 0
        self.queue: queue.Queue = queue.Queue()
        self.finished = threading.Event()  # encoded and closed, or given up
        self.thread = threading.Thread(target=self._run, name=f"framefarm-x264-part{index}", daemon=True)
        self.thread.start()

    def put(self, frames: np.ndarray) -> None:
        self.received += len(frames)
        self.queue.put(frames)

    def _run(self) -> None:
        encoded = 0
        try:
            while encoded < self.size:
                if self.owner._stop.is_set():
                    self.sink.abort()
                    return
                try:
                    frames = self.queue.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                self.sink.write(frames)
                encoded += len(frames)
                self.owner._done_with(len(frames))
            self.result = self.sink.close()
            self.closed_at = time.perf_counter()
        except BaseException as exc:  # noqa: BLE001 - carried to the owner's next call
            self.sink.abort()
            self.owner._failed(exc)
        finally:
            self.finished.set()

    def join(self, check, timeout: float | None = None) -> None:
        """Wait for the part's thread; `check` (re-raising a part's failure) runs between waits."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.thread.is_alive():
            if check is not None:
                check()
            if deadline is not None and time.monotonic() > deadline:
                return
            self.thread.join(_POLL_S)


class _Ffv1Sink(_AvSink):
    def __init__(self, path: str, width: int, height: int, fps: int, *, threads: int):
        super().__init__(path, width, height, fps, "matroska")
        # bgr0 is FFV1's only RGB layout that keeps 8-bit RGB exactly (gbrp and rgb24 are
        # refused, yuv loses it); slice threading needs FFV1 version 3.
        options = {"level": "3", "slices": "4"} if threads > 1 else {}
        self._open_stream("ffv1", "bgr0", options, threads)
        # The encoder reformats rgb24 -> bgr0 by reordering bytes; tests check it is exact.


class _PngTarSink(_BaseSink):
    codec = "png"

    def __init__(self, path: str, width: int, height: int, *, threads: int):
        super().__init__(path, width, height)
        ctx = av.CodecContext.create("png", "w")
        ctx.width, ctx.height = width, height
        ctx.pix_fmt = "rgb24"
        ctx.time_base = Fraction(1, 1)
        ctx.thread_count = threads
        ctx.open()
        self._ctx = ctx
        self._tar: tarfile.TarFile | None = None
        self._members = 0

    def _add(self, packets) -> None:
        if packets and self._tar is None:
            self._tar = tarfile.open(self._staged.tmp, "w", format=tarfile.PAX_FORMAT)
        for packet in packets:
            data = bytes(packet)
            info = tarfile.TarInfo(f"{self._members:06d}.png")
            # Fixed metadata: the same frames always make the same bytes, so a retried shard
            # produces an identical object and checksums stay meaningful.
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
            self._members += 1

    def _encode(self, rgb: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = self.frames
        self._add(self._ctx.encode(frame))

    def _finish(self) -> None:
        self._add(self._ctx.encode(None))
        if self._members != self.frames:
            raise RuntimeError(f"{self.path}: png encoder produced {self._members} images for {self.frames} frames")
        tar, self._tar = self._tar, None
        tar.close()

    def _release(self) -> None:
        tar, self._tar = self._tar, None
        if tar is not None:
            tar.close()


# ---------------------------------------------------------------------------------------
# Reading back (verification and tests)


def count_frames(path: str, fmt: str) -> int:
    """Frames in a segment or final output, without decoding video (packets / PNG entries)."""
    fmt = check_format(fmt)
    if fmt == "png":
        return len(_png_blobs(path, read=False))
    with av.open(path) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def read_frames(path: str, fmt: str) -> np.ndarray:
    """Decode a segment or final output to RGB uint8 [F, H, W, 3]."""
    fmt = check_format(fmt)
    if fmt == "png":
        frames = []
        for blob in _png_blobs(path, read=True):
            # A fresh decoder per image: FFmpeg's png decoder, reused, carries state from one
            # image into the next and returns wrong pixels.
            decoded = av.CodecContext.create("png", "r").decode(av.Packet(blob))
            if len(decoded) != 1:
                raise ValueError(f"{path}: a PNG decoded to {len(decoded)} frames")
            frames.append(decoded[0].to_ndarray(format="rgb24"))
        return np.stack(frames)
    with av.open(path) as container:
        stream = container.streams.video[0]
        # Frames carry their colorspace tags, so to_ndarray inverts the matrix they were made with.
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])


def _png_blobs(path: str, read: bool) -> list:
    """PNG images in order, from a segment tar or a `frames/` directory (bytes, or names)."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith(".png"))
        if not read:
            return names
        blobs = []
        for name in names:
            with open(os.path.join(path, name), "rb") as f:
                blobs.append(f.read())
        return blobs
    with tarfile.open(path, "r:") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".png")]
        if not read:
            return [m.name for m in members]
        return [tar.extractfile(m).read() for m in members]

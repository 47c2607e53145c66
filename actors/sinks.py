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
import tarfile
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace, VideoReformatter

from actors.protocol import check_format
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
              crf: int = 18, preset: str = "veryfast", threads: int = 1) -> Sink:
    fmt = check_format(fmt)
    if width <= 0 or height <= 0:
        raise ValueError(f"bad frame size {width}x{height}")
    if fps <= 0:
        raise ValueError(f"bad fps {fps}")
    if fmt == "mp4":
        return _Mp4Sink(path, width, height, fps, encoder=encoder, crf=crf, preset=preset, threads=threads)
    if fmt in _MKV_ALIASES:
        return _Ffv1Sink(path, width, height, fps, threads=threads)
    return _PngTarSink(path, width, height, threads=threads)


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
            size = self._staged.commit()
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

    def __init__(self, path: str, width: int, height: int, fps: int, container_format: str):
        super().__init__(path, width, height)
        self.fps = fps
        self._time_base = Fraction(1, fps)
        self._container_format = container_format
        self._container = None
        self._stream = None

    def _open_stream(self, codec: str, pix_fmt: str, options: dict[str, str], threads: int,
                     bt709: bool = False) -> None:
        # The file itself is only created at the first mux, so a failure here leaves nothing.
        container = av.open(self._staged.tmp, "w", format=self._container_format)
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
                 preset: str, threads: int):
        if width % 2 or height % 2:
            raise ValueError(f"mp4 (yuv420p) needs even dimensions, got {width}x{height}")
        if encoder not in ("auto", "libx264", "h264_nvenc"):
            raise ValueError(f"unknown encoder {encoder!r}")
        super().__init__(path, width, height, fps, "mp4")
        self._reformatter: VideoReformatter | None = None
        if encoder in ("auto", "h264_nvenc"):
            try:
                self._open_stream("h264_nvenc", "yuv420p", self._nvenc_options(crf, preset), threads, bt709=True)
                return
            except Exception:
                if encoder == "h264_nvenc":
                    raise
        x264 = {"crf": str(crf), "preset": preset}
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

"""Concatenating segments into the final output without re-encoding.

mp4 and mkv segments are remuxed: each packet keeps its bytes and gets its timestamps moved
by the frames that came before it, so the output decodes to exactly the frames the segments
decode to. png segments (tars) are unpacked into one directory, renumbered globally.

Every segment is checked before any of it reaches the output: its frame count against what
the caller expects, and (mp4/mkv) that its timestamps are one frame apart on the 1/fps grid
with no gaps or duplicates. That check (`inspect_segment`) only reads the segment, so a
caller may run it in another thread, for several segments at once, and hand its result to
`StreamingConcat.append`. The output lives under a hidden temporary name beside out_path
until close() renames it into place, so out_path only ever holds a complete video.
"""

from __future__ import annotations

import io
import math
import os
import tarfile
import time
from dataclasses import dataclass
from fractions import Fraction

import av

from actors.segments import check_format
from infra.staged import Staged

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class SegmentLayout:
    """What pass 1 read from a segment: enough to append it without reading it twice."""

    path: str
    frames: int
    template: tuple | None = None  # mp4/mkv: codec parameters every segment must share
    stamps: tuple[tuple[int, int], ...] = ()  # mp4/mkv: (pts, dts) frame indices, decode order, pts from 0
    delay: int = 0  # mp4/mkv: the encoder's decode delay, pts - dts of the first packet


def inspect_segment(segment_path: str, fmt: str, fps: int, expected: int | None = None, *,
                    data: bytes | None = None) -> SegmentLayout:
    """Pass 1: read a segment's frame count and timestamps, and refuse a malformed one.

    `data`: the segment's bytes, held in memory (mp4/mkv only); `segment_path` then only names
    it. Reads only; safe to run in any thread. Raises ValueError naming the segment.
    """
    fmt = "mkv" if check_format(fmt) == "ffv1" else fmt
    if fmt == "png":
        with tarfile.open(segment_path, "r:") as tar:
            names = [m.name for m in tar.getmembers() if m.isfile()]
        count = len(names)
        _check_count(segment_path, count, expected)
        if names != [f"{i:06d}.png" for i in range(count)]:
            raise ValueError(f"segment {segment_path}: members are not 000000.png.. in order")
        return SegmentLayout(segment_path, count)
    with _open_segment(segment_path, data) as segment:
        stream = _video_stream(segment, segment_path)
        template = _template_key(stream)
        stamps = [(_on_grid(p.pts, p.time_base, fps, segment_path), _on_grid(p.dts, p.time_base, fps, segment_path))
                  for p in segment.demux(stream) if p.size > 0]
    count = len(stamps)
    _check_count(segment_path, count, expected)
    # Each segment starts at its own zero (an mp4 with an edit list) or at its encoder's
    # delay (one without): normalize to the first presented frame so that either kind
    # lands exactly after the previous segment.
    origin = min(pts for pts, _ in stamps)
    if sorted(pts - origin for pts, _ in stamps) != list(range(count)):
        raise ValueError(f"segment {segment_path}: timestamps are not {count} consecutive frames")
    if any(b[1] <= a[1] for a, b in zip(stamps, stamps[1:])):
        raise ValueError(f"segment {segment_path}: decode timestamps are not increasing")
    return SegmentLayout(segment_path, count, template, tuple((p - origin, d - origin) for p, d in stamps),
                         stamps[0][0] - stamps[0][1])


def _check_count(segment_path: str, count: int, expected: int | None) -> None:
    if expected is not None and count != expected:
        raise ValueError(f"segment {segment_path}: holds {count} frames, expected {expected}")
    if count == 0:
        raise ValueError(f"segment {segment_path}: holds no frames")


@dataclass(frozen=True)
class ConcatResult:
    path: str
    frames: int
    bytes: int
    seconds: float  # time spent in append() and close()


def concat_segments(segment_paths: list[str], fmt: str, out_path: str, fps: int, *,
                    expected_frames: list[int] | None = None) -> ConcatResult:
    """Join segments in order; every frame of every segment, nothing re-encoded.

    With expected_frames (one count a segment, from the plan) each segment is checked
    against it; without, counts are taken from the segments themselves. On any error
    nothing is left at out_path.
    """
    if expected_frames is not None and len(expected_frames) != len(segment_paths):
        raise ValueError(f"{len(segment_paths)} segments but {len(expected_frames)} expected counts")
    counts = expected_frames if expected_frames is not None else [None] * len(segment_paths)
    concat = StreamingConcat(fmt, out_path, fps)
    try:
        for path, expected in zip(segment_paths, counts):
            concat.append(path, expected)
        return concat.close()
    except BaseException:
        concat.abort()
        raise


class StreamingConcat:
    """Appends segments to one output as they land; close() commits it, abort() drops it.

    append() validates a segment completely before writing any of it, so a segment that
    fails (wrong frame count, foreign codec, broken timestamps) raises ValueError and leaves
    the output as it was: the caller may fetch the segment again and retry, or abort().
    One thread at a time.
    """

    def __init__(self, fmt: str, out_path: str, fps: int):
        self.fmt = "mkv" if check_format(fmt) == "ffv1" else fmt
        if fps <= 0:
            raise ValueError(f"bad fps {fps}")
        self.fps = fps
        self._staged = Staged(out_path, folder=self.fmt == "png")
        self.path = self._staged.path
        self._tmp = self._staged.tmp
        self.frames = 0
        self.segments = 0
        self._seconds = 0.0
        self._state = "open"  # open -> closed | aborted | failed (output touched, then an error)
        self._out = None  # output container (mp4/mkv), opened with the first segment
        self._out_stream = None
        self._template: tuple | None = None
        self._last_dts: int | None = None  # of the last packet, in the output's time base
        self._delay: int | None = None  # the output's decode delay in frames (the first segment's)
        self._linked = False  # the output is a lone segment's own file (`link`)

    def append(self, segment_path: str, expected_frames: int | None, layout: SegmentLayout | None = None, *,
               data: bytes | None = None) -> int:
        """Append one segment's frames; returns how many. expected_frames=None skips that check.

        `layout`, `inspect_segment`'s result for this very file, saves reading it twice.
        `data`: the segment's bytes in memory (mp4/mkv), named by `segment_path`.
        """
        self._check_open()
        if self._linked:
            raise RuntimeError(f"{self.path}: the output is a linked segment; nothing can follow it")
        start = time.perf_counter()
        try:
            if layout is None:
                layout = inspect_segment(segment_path, self.fmt, self.fps, expected_frames, data=data)
            elif layout.path != segment_path:
                raise ValueError(f"layout of {layout.path} given for {segment_path}")
            else:
                _check_count(segment_path, layout.frames, expected_frames)
            if self.fmt == "png":
                if data is not None:
                    raise ValueError(f"segment {segment_path}: png segments are read from files")
                count = self._append_png(segment_path, layout.frames)
            else:
                count = self._append_video(segment_path, layout, data)
        except _OutputTouched as exc:
            # Part of the segment may be in the output: it can no longer be made exact.
            self._state = "failed"
            raise exc.__cause__ from None
        finally:
            self._seconds += time.perf_counter() - start
        self.frames += count
        self.segments += 1
        return count

    def link(self, segment_path: str, expected_frames: int | None, layout: SegmentLayout) -> bool:
        """Make a lone segment the whole output as it is: a hard link to its file, no byte read
        or written (remuxing a 720p segment of 321 frames, 111 MB, and flushing the copy to
        disk is most of a one-shard job's stitch). False, with nothing changed, where the
        filesystem refuses the link (another device, no hard links) or for png: then
        `append` it. Nothing can be appended after it, which would write into the segment.

        `layout` is `inspect_segment`'s result for this very file, as for `append`.
        """
        self._check_open()
        if self.segments or self.fmt == "png":
            return False
        if layout.path != segment_path:
            raise ValueError(f"layout of {layout.path} given for {segment_path}")
        _check_count(segment_path, layout.frames, expected_frames)
        start = time.perf_counter()
        try:
            os.link(segment_path, self._tmp)
        except OSError:
            return False
        finally:
            self._seconds += time.perf_counter() - start
        self._linked = True
        self.frames += layout.frames
        self.segments += 1
        return True

    def sync(self) -> None:
        """Put what has been appended so far on disk now. close() flushes the whole output
        before renaming it (tens of ms for a 720p segment), so a caller with time to spare
        between appends, like a parted sink's joiner, takes most of that off close()."""
        self._check_open()
        if self._out is None:
            return
        fd = os.open(self._tmp, os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def close(self) -> ConcatResult:
        self._check_open()
        start = time.perf_counter()
        try:
            if self.segments == 0:
                raise ValueError(f"{self.path}: no segments appended")
            if self._out is not None:
                out, self._out = self._out, None
                out.close()
            size = self._staged.commit()
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        self._seconds += time.perf_counter() - start
        return ConcatResult(self.path, self.frames, size, self._seconds)

    def abort(self) -> None:
        if self._state in ("closed", "aborted"):
            return
        self._state = "aborted"
        out, self._out = self._out, None
        if out is not None:
            try:
                out.close()
            except Exception:
                pass  # the partial output is being deleted; its trailer doesn't matter
        self._staged.discard()

    def _check_open(self) -> None:
        if self._state == "failed":
            raise RuntimeError(f"{self.path}: an earlier append failed part-way; abort() and start again")
        if self._state != "open":
            raise RuntimeError(f"{self.path}: concat is {self._state}")

    # -- mp4 / mkv ---------------------------------------------------------------------

    def _append_video(self, segment_path: str, layout: SegmentLayout, data: bytes | None) -> int:
        if self._template is not None and layout.template != self._template:
            raise ValueError(f"segment {segment_path}: stream {layout.template} does not match the first "
                             f"segment's {self._template}; concatenation needs identical encoder settings")
        self._copy_packets(segment_path, layout, data)
        return layout.frames

    def _place(self, segment_path: str, layout: SegmentLayout) -> tuple[list[tuple[int, int]], int]:
        """Output (pts, dts) in the output stream's time base for a segment's frame indices
        (pts, dts in decode order, pts from 0), and the duration of its last packet.

        Segments normally share one decode delay (x264 with B-frames: dts starts 2 frames
        before pts), and then only a shift is needed. But x264 gives a segment of fewer than
        3 frames no delay at all (dts == pts). The output keeps the first segment's delay:
        a segment with less has its dts moved earlier (always legal); one with more, after a
        short first segment, has its first dts squeezed just past the previous packet in the
        output's finer time base (1/16384 s for mp4 at 16 fps), since dts only has to keep
        decode order. Its last packet is then stretched by the delay it lost, because mp4
        takes the track's length from the last dts plus the last duration.
        """
        tb = self._out_stream.time_base
        stamps, delay = layout.stamps, layout.delay  # delay: pts - dts of the first packet
        output_delay = delay if self._delay is None else self._delay
        earlier = max(output_delay - delay, 0)  # frames to move this segment's dts back
        lost = max(delay - output_delay, 0)  # frames of dts that squeezing will lose
        placed = []
        last = self._last_dts
        for pts_index, dts_index in stamps:
            pts = _round_half_up(Fraction(self.frames + pts_index, self.fps) / tb)
            dts = _round_half_up(Fraction(self.frames + dts_index - earlier, self.fps) / tb)
            if last is not None and dts <= last:
                dts = last + 1
            if dts > pts:
                raise ValueError(f"segment {segment_path}: its decode delay cannot follow the previous "
                                 f"segment's in time base {tb}")
            placed.append((pts, dts))
            last = dts
        return placed, 1 + lost

    def _copy_packets(self, segment_path: str, layout: SegmentLayout, data: bytes | None) -> None:
        """Pass 2: the packets, bytes untouched, at their new times.

        The output is opened from the first segment's stream, in the same open of it. Errors
        before the first packet is muxed leave the output as it was.
        """
        with _open_segment(segment_path, data) as segment:
            stream = _video_stream(segment, segment_path)
            if self._out is None:
                try:
                    self._open_output(stream)
                except Exception as exc:
                    raise _OutputTouched() from exc
                self._template = layout.template
            placed, last_duration = self._place(segment_path, layout)
            try:
                self._mux(segment, stream, segment_path, placed, last_duration)
            except Exception as exc:
                raise _OutputTouched() from exc
        self._last_dts = placed[-1][1]
        if self._delay is None:
            self._delay = layout.delay

    def _mux(self, segment, stream, segment_path: str, placed: list[tuple[int, int]], last_duration: int) -> None:
        tb = self._out_stream.time_base
        index = 0
        for packet in segment.demux(stream):
            if packet.size == 0:
                continue
            if index == len(placed):
                raise ValueError(f"segment {segment_path}: changed while it was read")
            packet.time_base = tb
            packet.pts, packet.dts = placed[index]
            frames = 1 if index < len(placed) - 1 else last_duration
            packet.duration = _round_half_up(Fraction(frames, self.fps) / tb)
            packet.stream = self._out_stream
            self._out.mux(packet)
            index += 1
        if index != len(placed):
            raise ValueError(f"segment {segment_path}: changed while it was read")

    def _open_output(self, template_stream) -> None:
        container_format = "mp4" if self.fmt == "mp4" else "matroska"
        out = av.open(self._tmp, "w", format=container_format)
        try:
            out_stream = out.add_stream_from_template(template_stream)
            # Write the header now: the muxer fixes the stream's time base here, and every
            # timestamp is computed in it (the template's extradata is already known).
            out.start_encoding()
        except BaseException:
            out.close()
            raise
        self._out, self._out_stream = out, out_stream

    # -- png ---------------------------------------------------------------------------

    def _append_png(self, segment_path: str, expected: int | None) -> int:
        with tarfile.open(segment_path, "r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            count = len(members)
            _check_count(segment_path, count, expected)  # again: the tar may have changed since inspection
            names = [m.name for m in members]
            if names != [f"{i:06d}.png" for i in range(count)]:
                raise ValueError(f"segment {segment_path}: members are not 000000.png.. in order")
            blobs = [tar.extractfile(m).read() for m in members]
        for name, blob in zip(names, blobs):
            if not blob.startswith(_PNG_SIGNATURE):
                raise ValueError(f"segment {segment_path}: {name} is not a PNG")
        try:
            os.makedirs(self._tmp, exist_ok=True)
            for i, blob in enumerate(blobs):
                with open(os.path.join(self._tmp, f"{self.frames + i:06d}.png"), "wb") as f:
                    f.write(blob)
        except Exception as exc:
            raise _OutputTouched() from exc
        return count


class _OutputTouched(Exception):
    """Carries an error raised after a segment's frames began reaching the output."""


def _open_segment(path: str, data: bytes | None):
    return av.open(path if data is None else io.BytesIO(data))


def _video_stream(container, path: str):
    if not container.streams.video:
        raise ValueError(f"segment {path}: no video stream")
    return container.streams.video[0]


def _template_key(stream) -> tuple:
    """What must match between segments for their packets to share one stream header."""
    ctx = stream.codec_context
    return (ctx.name, ctx.width, ctx.height, ctx.format.name if ctx.format else None,
            bytes(ctx.extradata or b""))


def _on_grid(timestamp: int | None, time_base: Fraction, fps: int, path: str) -> int:
    """A timestamp as a frame index; Matroska's millisecond clock rounds 1/fps, so allow slack."""
    if timestamp is None:
        raise ValueError(f"segment {path}: a packet has no timestamp")
    frames = timestamp * time_base * fps
    index = round(frames)
    if abs(frames - index) > Fraction(1, 4):
        raise ValueError(f"segment {path}: timestamp {timestamp}*{time_base}s is not on the 1/{fps} s grid")
    return index


def _round_half_up(x: Fraction) -> int:
    # Python's round() goes half to even; FFmpeg's rescaling goes half up. Matroska's
    # millisecond clock at 16 fps hits halves on every odd frame.
    return math.floor(x + Fraction(1, 2))

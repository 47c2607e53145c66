"""The asynchronous frame pipeline: decode on the GPU while copying and encoding earlier chunks.

Three stages overlap:
  compute stream   decoder step for chunk N, then uint8 conversion (4x fewer bytes to copy)
  copy stream      D2H of chunk N-1 into a pinned host buffer of a small ring
  host thread      hands chunk N-2 to the sink (colour conversion, encoding, writing)
CUDA events are the barriers: compute-done before the copy starts, copy-done before the
host reads the buffer; a buffer goes back to the ring only after the sink is done with
it, so when the host is slower than the GPU the decode loop waits for a free buffer
(backpressure) and the report names the host as the bottleneck.

The synchronous mode (decode, blocking copy, write, repeat) runs behind the same call for
comparison. Without CUDA the same code runs with threads only: the decode loop in the
caller's thread, the sink in the host thread.

Note [pipeline shutdown]
  1. The decode loop ends (normally or by an error) and puts `_END` on the ready queue;
     on error it also sets `stop`, so the host thread skips whatever is still queued.
  2. The host thread exits on `_END` or `stop`; every queue wait has a timeout after which
     it rechecks `stop`, so it can never block forever.
  3. The owner joins the thread (it is woken by step 1), then closes the sink on success or
     aborts it on failure. An error in the host thread travels to the owner as a value
     (`_StageError`) and is re-raised there, naming the stage.
  4. If the join times out (a sink stuck in I/O), the owner sets `stop` and hands the abort
     to the host thread, which runs it when its write returns: two threads never touch the
     sink at once. On the CUDA path the owner also waits for the copy stream on failure, so
     that no copy into the pinned ring is still in flight when the next shard reuses it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from actors.sinks import Sink, SinkResult

Mode = Literal["async", "sync"]
_POLL_S = 0.1
_JOIN_TIMEOUT_S = 60.0


@dataclass
class PipelineReport:
    mode: str
    frames: int = 0
    chunks: int = 0
    wall_s: float = 0.0
    gpu_busy_s: float = 0.0  # decoder + uint8 conversion, by CUDA events (wall time on CPU)
    gpu_span_s: float = 0.0  # from the first chunk's start to the last chunk's end
    copy_s: float = 0.0  # device-to-host copies, by CUDA events
    host_busy_s: float = 0.0  # inside sink.write
    flush_s: float = 0.0  # the sink's final flush and commit, apart from the rest
    wait_for_buffer_s: float = 0.0  # decode loop blocked on a free host buffer
    buffer_waits: int = 0  # chunks that found the ring full (backpressure from the host)
    host_idle_s: float = 0.0  # host thread waiting for a chunk
    peak_gpu_bytes: int = 0
    sink: dict = field(default_factory=dict)

    @property
    def gpu_utilization(self) -> float:
        return self.gpu_busy_s / self.gpu_span_s if self.gpu_span_s > 0 else 0.0

    @property
    def bottleneck(self) -> str:
        """The stage with the most work: in a pipeline it sets the pace, the others wait for it.

        Waits are not evidence: in the async mode the decode loop also waits for a free buffer
        when the GPU itself is behind, since a buffer comes back only after its copy landed.
        """
        stages = {"gpu": self.gpu_busy_s, "copy": self.copy_s, "host": self.host_busy_s}
        return max(stages, key=stages.get)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["gpu_utilization"] = self.gpu_utilization
        d["bottleneck"] = self.bottleneck
        return d


class _StageError:
    """An exception carried from a stage thread to the owner, with where it happened."""

    def __init__(self, where: str, exc: BaseException):
        self.where, self.exc = where, exc

    def reraise(self):
        raise RuntimeError(f"frame pipeline: {self.where} failed: {self.exc!r}") from self.exc


_END = object()


def to_uint8_frames(chunk: torch.Tensor) -> torch.Tensor:
    """CFHW in [-1, 1] -> FHWC uint8, rounding (never truncating) as Wan's pipelines do."""
    x = chunk.float().clamp(-1.0, 1.0).add_(1.0).mul_(127.5).round_()  # out of place: the chunk may be shared
    return x.to(torch.uint8).permute(1, 2, 3, 0).contiguous()


# BT.709 (Kr 0.2126, Kb 0.0722) in limited range: Y in [16, 235], Cb/Cr in [16, 240].
_BT709_YUV = torch.tensor([
    [0.2126, 0.7152, 0.0722],
    [-0.2126 / 1.8556, -0.7152 / 1.8556, 0.5],
    [0.5, -0.7152 / 1.5748, -0.0722 / 1.5748],
])


def to_yuv420_frames(chunk: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
    """CFHW in [-1, 1] -> [F, H*3/2, W] uint8 I420 (BT.709, limited range), on the chunk's device.

    Starts from the same rounded 8-bit RGB as `to_uint8_frames`; chroma is the mean of each
    2x2 block. Half the bytes of RGB to copy, and no colour conversion left for the host.
    `matrix`: the RGB -> YCbCr matrix already on the chunk's device. Pass it in a loop: moving
    it there from pageable memory waits for the stream, which would stall a pipelined decode.
    """
    _, f, h, w = chunk.shape
    rgb = to_uint8_frames(chunk).float().div_(255.0)  # FHWC in [0, 1]
    if matrix is None:
        matrix = _BT709_YUV.to(rgb.device)
    yuv = rgb @ matrix.T  # FHW3: Y in [0, 1], Cb/Cr in [-0.5, 0.5]
    y = yuv[..., 0].mul(219.0).add_(16.0)
    chroma = torch.nn.functional.avg_pool2d(yuv[..., 1:].permute(0, 3, 1, 2), 2)  # F,2,H/2,W/2
    chroma = chroma.mul_(224.0).add_(128.0)
    out = torch.empty((f, h * 3 // 2, w), dtype=torch.uint8, device=chunk.device)
    flat = out.view(f, -1)  # I420: the Y plane, then U, then V, each row-major
    flat[:, : h * w] = y.round_().clamp_(0, 255).to(torch.uint8).reshape(f, -1)
    flat[:, h * w :] = chroma.round_().clamp_(0, 255).to(torch.uint8).reshape(f, -1)
    return out


def frame_converter(layout: str, device: torch.device):
    """The GPU-side conversion that hands a sink frames in the layout it takes."""
    if layout == "yuv420p":
        matrix = _BT709_YUV.to(device)  # once per run, before the first step is queued
        return lambda chunk: to_yuv420_frames(chunk, matrix)
    if layout == "rgb24":
        return to_uint8_frames
    raise ValueError(f"unknown frame layout {layout!r}")


def run_pipeline(chunks: Iterator[torch.Tensor], sink: Sink, *, drop: int = 0, mode: Mode = "async",
                 depth: int = 2, device: torch.device | str = "cpu",
                 ring: list | None = None, join_timeout_s: float = _JOIN_TIMEOUT_S,
                 on_backpressure: Callable[[], None] | None = None,
                 ) -> tuple[PipelineReport, SinkResult]:
    """Drive `chunks` (a decoder's stream) into `sink`, dropping the first `drop` frames.

    The sink is closed (committed) on success and aborted on any failure. `ring`, a list the
    caller keeps (a worker, across shards), holds the pinned host buffers, so they are
    allocated once rather than per run (page-locking costs milliseconds per buffer).
    `join_timeout_s`: how long the end of a run waits for the host thread's last write.
    `on_backpressure`: called from the decode loop each time it finds every host buffer taken
    and starts to wait for one (the host is behind); it must not block.
    """
    report = PipelineReport(mode=mode)
    start = time.perf_counter()
    cuda = False
    try:
        device = torch.device(device)
        cuda = device.type == "cuda"
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        convert = frame_converter(getattr(sink, "layout", "rgb24"), device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            if mode == "sync":
                _run_sync_cuda(chunks, sink, convert, drop, depth, device, report)
            else:
                _run_async_cuda(chunks, sink, convert, drop, depth, device, report, [] if ring is None else ring,
                                join_timeout_s, on_backpressure)
        elif mode == "sync":
            _run_sync_cpu(chunks, sink, convert, drop, depth, report)
        else:
            _run_async_cpu(chunks, sink, convert, drop, depth, report, join_timeout_s, on_backpressure)
        t = time.perf_counter()
        result = sink.close()
        report.flush_s = time.perf_counter() - t
    except HostStuck:
        raise
    except BaseException:
        sink.abort()
        raise
    finally:
        if cuda:
            report.peak_gpu_bytes = torch.cuda.max_memory_allocated(device)
    report.wall_s = time.perf_counter() - start
    report.sink = asdict(result)
    return report, result


def _trim(frames: torch.Tensor, to_drop: int) -> tuple[torch.Tensor, int]:
    """Drop up to `to_drop` leading frames; return what is left and what is still to drop."""
    n = min(to_drop, frames.shape[0])
    return frames[n:], to_drop - n


# --- synchronous ---------------------------------------------------------------------------


def _cpu_steps(chunks, convert, drop, report):
    """The decoder's steps timed on the CPU clock; yields each step's kept frames, if any."""
    t_first = None
    it = iter(chunks)
    while True:
        t0 = time.perf_counter()
        chunk = next(it, None)
        if chunk is None:
            return
        frames, drop = _trim(convert(chunk), drop)
        t1 = time.perf_counter()
        t_first = t0 if t_first is None else t_first
        report.gpu_busy_s += t1 - t0
        report.gpu_span_s = t1 - t_first
        report.chunks += 1
        if frames.shape[0]:
            yield frames


def _run_sync_cpu(chunks, sink, convert, drop, depth, report):
    for frames in _cpu_steps(chunks, convert, drop, report):
        t = time.perf_counter()
        sink.write(frames.numpy())
        report.frames += frames.shape[0]
        report.host_busy_s += time.perf_counter() - t


def _run_sync_cuda(chunks, sink, convert, drop, depth, device, report):
    it = iter(chunks)
    spans = []
    while True:
        begin = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        begin.record()
        chunk = next(it, None)
        if chunk is None:
            break
        frames, drop = _trim(convert(chunk), drop)
        end.record()
        spans.append((begin, end))
        report.chunks += 1
        if frames.shape[0]:
            t = time.perf_counter()
            host = frames.cpu()  # blocking D2H: the GPU idles from here to the next launch
            t1 = time.perf_counter()
            report.copy_s += t1 - t
            sink.write(host.numpy())
            report.host_busy_s += time.perf_counter() - t1
            report.frames += host.shape[0]
    torch.cuda.synchronize(device)
    _account_gpu(spans, report)


def _account_gpu(spans, report):
    if not spans:
        return
    report.gpu_busy_s = sum(b.elapsed_time(e) for b, e in spans) / 1e3
    report.gpu_span_s = spans[0][0].elapsed_time(spans[-1][1]) / 1e3


# --- asynchronous --------------------------------------------------------------------------


class HostStuck(RuntimeError):
    """The host thread outlived its join timeout; it, not the owner, aborts the sink."""


class _HostWorker:
    """Feeds the sink from a queue in its own thread; see Note [pipeline shutdown]."""

    def __init__(self, sink: Sink, report: PipelineReport, on_done=None, join_timeout_s: float = _JOIN_TIMEOUT_S):
        self.sink, self.report, self.on_done = sink, report, on_done
        self.join_timeout_s = join_timeout_s
        self.ready: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.error: _StageError | None = None
        self._exit_lock = threading.Lock()
        self._exited = False
        self._abort_on_exit = False
        self.thread = threading.Thread(target=self._loop, name="framefarm-host", daemon=True)
        self.thread.start()

    def _loop(self):
        try:
            self._feed()
        finally:
            with self._exit_lock:
                self._exited = True
                if self._abort_on_exit:
                    try:
                        self.sink.abort()
                    except Exception:  # noqa: BLE001 - nobody is left to tell; the owner already raised
                        pass

    def give_up(self, what: str) -> None:
        """Step 4: stop the thread; if it is still running, it aborts the sink itself when
        its write returns, and HostStuck (saying `what` happened) tells the owner not to."""
        self.stop.set()
        with self._exit_lock:
            if self._exited:
                return
            self._abort_on_exit = True
        raise HostStuck(f"frame pipeline: {what} (is the sink blocked on I/O?); "
                        "the host thread aborts the sink when its write returns")

    def _feed(self):
        try:
            while not self.stop.is_set():
                t = time.perf_counter()
                try:
                    item = self.ready.get(timeout=_POLL_S)
                except queue.Empty:
                    self.report.host_idle_s += time.perf_counter() - t
                    continue
                if item is _END:
                    return
                frames, slot, copy_done = item
                if copy_done is not None:
                    copy_done.synchronize()  # the copy into this buffer has landed
                self.report.host_idle_s += time.perf_counter() - t
                t = time.perf_counter()
                self.sink.write(frames)
                self.report.host_busy_s += time.perf_counter() - t
                if self.on_done is not None:
                    self.on_done(slot)
        except BaseException as exc:  # noqa: BLE001 - carried to the owner as a value
            self.error = _StageError("host worker (sink)", exc)
            self.stop.set()

    def check(self):
        if self.error is not None:
            self.error.reraise()

    def finish(self, ok: bool):
        """Step 1-3 of Note [pipeline shutdown]."""
        if not ok:
            self.stop.set()
        self.ready.put(_END)
        if self._abort_on_exit:
            return  # already given up on (a stalled acquire): the HostStuck in flight says why
        self.thread.join(timeout=self.join_timeout_s)
        if self.thread.is_alive():
            self.give_up(f"host worker did not stop within {self.join_timeout_s:g} s")
        self.check()


def _run_async_cpu(chunks, sink, convert, drop, depth, report, join_timeout_s, on_backpressure):
    free = _FreeSlots(depth, on_backpressure)  # at most `depth` chunks wait for the host
    host = _HostWorker(sink, report, on_done=free.release, join_timeout_s=join_timeout_s)
    ok = False
    try:
        for frames in _cpu_steps(chunks, convert, drop, report):
            slot = free.acquire(host, report)
            host.ready.put((frames.numpy(), slot, None))
            report.frames += frames.shape[0]
        ok = True
    finally:
        host.finish(ok)


def _run_async_cuda(chunks, sink, convert, drop, depth, device, report, ring, join_timeout_s, on_backpressure):
    compute = torch.cuda.Stream(device)
    copy = torch.cuda.Stream(device)
    ring.extend([None] * (depth - len(ring)))  # pinned buffers, sized by the first chunk
    free = _FreeSlots(depth, on_backpressure)
    host = _HostWorker(sink, report, on_done=free.release, join_timeout_s=join_timeout_s)
    spans, copies = [], []
    ok = False
    try:
        it = iter(chunks)
        while True:
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(compute):
                begin.record(compute)
                chunk = next(it, None)
                if chunk is None:
                    break
                frames, drop = _trim(convert(chunk), drop)
                end.record(compute)
            spans.append((begin, end))
            report.chunks += 1
            n = frames.shape[0]
            if not n:
                continue
            slot = free.acquire(host, report)
            buf = ring[slot]
            if buf is None or buf.shape[1:] != frames.shape[1:] or buf.shape[0] < n:
                buf = ring[slot] = torch.empty((max(4, n), *frames.shape[1:]), dtype=torch.uint8,
                                               pin_memory=True)
            copy_begin = torch.cuda.Event(enable_timing=True)
            copy_done = torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(copy):
                copy.wait_event(end)  # compute-done before the copy
                copy_begin.record(copy)
                buf[:n].copy_(frames, non_blocking=True)
                copy_done.record(copy)
            # The allocator must not hand `frames` to the next chunk before the copy reads it.
            frames.record_stream(copy)
            copies.append((copy_begin, copy_done))
            host.ready.put((buf[:n].numpy(), slot, copy_done))
            report.frames += n
        ok = True
    finally:
        try:
            host.finish(ok)
        finally:
            if not ok:
                _quiet_sync(copy)
    torch.cuda.synchronize(device)
    _account_gpu(spans, report)
    report.copy_s = sum(b.elapsed_time(e) for b, e in copies) / 1e3


def _quiet_sync(stream) -> None:
    """Wait for `stream` on a failure path, where the original error matters more than this."""
    try:
        stream.synchronize()
    except Exception:  # noqa: BLE001 - a broken CUDA context: the caller is already raising
        pass


class _FreeSlots:
    """The ring's free list: which host buffer the next chunk may use (backpressure)."""

    def __init__(self, depth: int, on_backpressure: Callable[[], None] | None = None):
        self.on_backpressure = on_backpressure
        self.slots: queue.Queue[int] = queue.Queue()
        for slot in range(depth):
            self.slots.put(slot)

    def acquire(self, host: _HostWorker, report: PipelineReport) -> int:
        t = time.perf_counter()
        try:
            slot = self.slots.get_nowait()
        except queue.Empty:
            slot = self._wait(host, report)
        report.wait_for_buffer_s += time.perf_counter() - t
        return slot

    def _wait(self, host: _HostWorker, report: PipelineReport) -> int:
        report.buffer_waits += 1
        if self.on_backpressure is not None:
            self.on_backpressure()
        t = time.perf_counter()
        while True:
            host.check()
            if host.stop.is_set():
                raise RuntimeError("frame pipeline: host worker stopped")
            try:
                return self.slots.get(timeout=_POLL_S)
            except queue.Empty:
                pass
            if time.perf_counter() - t > host.join_timeout_s:
                # Every buffer is held by a write that does not return: a sink stuck in I/O.
                host.give_up(f"the sink took no frames for {host.join_timeout_s:g} s")

    def release(self, slot: int):
        self.slots.put(slot)

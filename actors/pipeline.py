"""The asynchronous frame pipeline: decode on the GPU while copying and encoding earlier chunks.

Three stages overlap:
  compute stream   decoder step for chunk N, then conversion to the sink's frame layout
                   (actors/colour.py: uint8 RGB or I420, 4x or 8x fewer bytes to copy)
  copy stream      D2H of chunk N-1 into a pinned host buffer of a small ring
  host thread      hands chunk N-2 to the sink (encoding, writing)
CUDA events are the barriers: compute-done before the copy starts, copy-done before the
host reads the buffer; a buffer goes back to the ring only after the sink is done with
it, so when the host is slower than the GPU the decode loop waits for a free buffer
(backpressure) and the report names the host as the bottleneck.

One loop (`_drive`) runs on every device; what differs lives in a device object: on CUDA
the streams, events and pinned ring (`_CudaDevice`), on the CPU the decoder's steps timed
by the clock and frames handed over as they are (`_CpuDevice`). `depth` is the ring's size.
depth 0 is the synchronous baseline that benchmarks compare against: no host thread, each
chunk is copied and written before the next step is launched, so the GPU idles meanwhile.

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
from dataclasses import asdict

import numpy as np
import torch

from actors.colour import frame_converter
from actors.protocol import PipelineReport
from actors.sinks import Sink, SinkResult, available_cores

_POLL_S = 0.1
_JOIN_TIMEOUT_S = 60.0


class _StageError:
    """An exception carried from a stage thread to the owner, with where it happened."""

    def __init__(self, where: str, exc: BaseException):
        self.where, self.exc = where, exc

    def reraise(self):
        raise RuntimeError(f"frame pipeline: {self.where} failed: {self.exc!r}") from self.exc


_END = object()


def run_pipeline(chunks: Iterator[torch.Tensor], sink: Sink, *, drop: int = 0, depth: int = 2,
                 device: torch.device | str = "cpu", ring: list | None = None,
                 join_timeout_s: float = _JOIN_TIMEOUT_S, on_backpressure: Callable[[], None] | None = None,
                 ) -> tuple[PipelineReport, SinkResult]:
    """Drive `chunks` (a decoder's stream) into `sink`, dropping the first `drop` frames.

    `depth`: host buffers in the ring (chunks that may wait for the host); 0 runs the
    synchronous baseline. The sink is closed (committed) on success and aborted on any
    failure. `ring`, a list the caller keeps (a worker, across shards), holds the pinned host
    buffers, so they are allocated once rather than per run (page-locking costs milliseconds
    per buffer). `join_timeout_s`: how long the end of a run waits for the host thread's last
    write. `on_backpressure`: called from the decode loop each time it finds every host buffer
    taken and starts to wait for one (the host is behind); it must not block.
    """
    report = PipelineReport(mode="async" if depth else "sync", cores=available_cores(),
                            torch_threads=torch.get_num_threads())
    start = time.perf_counter()
    cuda = False
    try:
        device = torch.device(device)
        cuda = device.type == "cuda"
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        convert = frame_converter(getattr(sink, "layout", "rgb24"), device)
        slots = max(depth, 1)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            dev = _CudaDevice(device, [] if ring is None else ring, slots, report)
        else:
            dev = _CpuDevice(report)
        free = _FreeSlots(slots, on_backpressure)
        if depth:
            host = _HostWorker(sink, report, on_done=free.release, join_timeout_s=join_timeout_s)
        else:
            host = _InlineHost(sink, report, on_done=free.release)
        ok = False
        try:
            _drive(chunks, convert, drop, dev, host, free, report)
            ok = True
        finally:
            try:
                host.finish(ok)
            except BaseException:
                ok = False
                raise
            finally:
                dev.settle(ok)
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


def _drive(chunks, convert, drop, dev, host, free, report) -> None:
    """The one decode loop: step, drop context frames, take a free buffer, hand it to the host."""
    it = iter(chunks)
    while True:
        frames = dev.step(it, convert)
        if frames is None:
            return
        report.chunks += 1
        n = min(drop, frames.shape[0])  # leading context frames are decoded, never kept
        frames, drop = frames[n:], drop - n
        if not frames.shape[0]:
            continue
        slot = free.acquire(host, report)
        host_frames, ready = dev.to_host(frames, slot)
        host.put(host_frames, slot, ready)
        report.frames += frames.shape[0]


# --- devices -------------------------------------------------------------------------------


class _CpuDevice:
    """Decoder steps in the caller's thread, timed by the clock; frames reach the host as they are."""

    def __init__(self, report: PipelineReport):
        self.report = report
        self._first: float | None = None
        self.steps: list[float] = []  # ms

    def step(self, it: Iterator[torch.Tensor], convert) -> torch.Tensor | None:
        t0 = time.perf_counter()
        chunk = next(it, None)
        if chunk is None:
            return None
        frames = convert(chunk)
        t1 = time.perf_counter()
        self._first = t0 if self._first is None else self._first
        self.report.gpu_busy_s += t1 - t0
        self.report.gpu_span_s = t1 - self._first
        self.steps.append((t1 - t0) * 1e3)
        return frames

    def to_host(self, frames: torch.Tensor, slot: int) -> tuple[np.ndarray, None]:
        return frames.numpy(), None

    def settle(self, ok: bool) -> None:
        self.report.step_ms = step_quantiles(self.steps)


def step_quantiles(steps_ms: list[float]) -> dict:
    """p50, p90 and max of the decode steps' times (ms, to 0.01 ms), the slowest step's index
    and the first three steps (a new stream's own); {} for none."""
    if not steps_ms:
        return {}
    s = sorted(steps_ms)
    q = {name: round(s[min(len(s) - 1, int(at * len(s)))], 2)  # nearest rank
         for name, at in (("p50", 0.5), ("p90", 0.9), ("max", 1.0))}
    return {**q, "max_at": steps_ms.index(s[-1]), "first": [round(t, 2) for t in steps_ms[:3]]}


class _CudaDevice:
    """The compute and copy streams, the pinned ring, and the CUDA events between them."""

    def __init__(self, device: torch.device, ring: list, slots: int, report: PipelineReport):
        self.device, self.report = device, report
        self.compute = torch.cuda.Stream(device)
        self.copy = torch.cuda.Stream(device)
        ring.extend([None] * (slots - len(ring)))  # pinned buffers, sized by the first chunk
        self.ring = ring
        self.spans: list = []  # (begin, end) of each step on the compute stream
        self.copies: list = []  # (begin, done) of each copy on the copy stream

    def step(self, it: Iterator[torch.Tensor], convert) -> torch.Tensor | None:
        begin = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.compute):
            begin.record(self.compute)
            chunk = next(it, None)
            if chunk is None:
                return None
            frames = convert(chunk)
            end.record(self.compute)
        self.spans.append((begin, end))
        return frames

    def to_host(self, frames: torch.Tensor, slot: int) -> tuple[np.ndarray, torch.cuda.Event]:
        n = frames.shape[0]
        buf = self.ring[slot]
        if buf is None or buf.shape[1:] != frames.shape[1:] or buf.shape[0] < n:
            buf = self.ring[slot] = torch.empty((max(4, n), *frames.shape[1:]), dtype=torch.uint8,
                                                pin_memory=True)
        copy_begin = torch.cuda.Event(enable_timing=True)
        # Blocking: the host thread waits on it for most of a shard, and a spinning wait would
        # take a whole core from the encoders beside it.
        copy_done = torch.cuda.Event(enable_timing=True, blocking=True)
        with torch.cuda.stream(self.copy):
            self.copy.wait_event(self.spans[-1][1])  # compute-done before the copy
            copy_begin.record(self.copy)
            buf[:n].copy_(frames, non_blocking=True)
            copy_done.record(self.copy)
        # The allocator must not hand `frames` to the next chunk before the copy reads it.
        frames.record_stream(self.copy)
        self.copies.append((copy_begin, copy_done))
        return buf[:n].numpy(), copy_done

    def settle(self, ok: bool) -> None:
        """After the host is done: the GPU's times on success; on failure, no copy left in flight."""
        if not ok:
            _quiet_sync(self.copy)
            return
        torch.cuda.synchronize(self.device)
        if self.spans:
            steps = [b.elapsed_time(e) for b, e in self.spans]
            self.report.gpu_busy_s = sum(steps) / 1e3
            self.report.step_ms = step_quantiles(steps)
            self.report.gpu_span_s = self.spans[0][0].elapsed_time(self.spans[-1][1]) / 1e3
        self.report.copy_s = sum(b.elapsed_time(e) for b, e in self.copies) / 1e3


def _quiet_sync(stream) -> None:
    """Wait for `stream` on a failure path, where the original error matters more than this."""
    try:
        stream.synchronize()
    except Exception:  # noqa: BLE001 - a broken CUDA context: the caller is already raising
        pass


# --- the host side -------------------------------------------------------------------------


class _InlineHost:
    """depth 0: the sink is fed in the decode loop's own thread, the copy waited for first."""

    def __init__(self, sink: Sink, report: PipelineReport, on_done):
        self.sink, self.report, self.on_done = sink, report, on_done
        self.stop = threading.Event()  # never set: nothing runs beside the loop
        self.join_timeout_s = _JOIN_TIMEOUT_S

    def put(self, frames: np.ndarray, slot: int, ready) -> None:
        t = time.perf_counter()
        if ready is not None:
            ready.synchronize()  # a blocking copy: the GPU has nothing queued meanwhile
        t1 = time.perf_counter()
        self.report.host_idle_s += t1 - t
        self.sink.write(frames)
        self.report.host_busy_s += time.perf_counter() - t1
        self.on_done(slot)

    def check(self) -> None:
        pass

    def finish(self, ok: bool) -> None:
        pass


class _Patience:
    """How long the owner has waited on the host thread, counted a poll at a time. A turn that
    took far longer than a poll means this whole process was frozen (SIGSTOP, a paused VM) and
    the sink with it: that is no sign of a stuck sink, so it counts as one poll, not as its
    length (a replica let go after a stop found its ring full and blamed the sink)."""

    def __init__(self, limit_s: float):
        self.limit_s, self.waited_s = limit_s, 0.0

    def exhausted(self, turn_started: float) -> bool:
        self.waited_s += min(time.perf_counter() - turn_started, 2 * _POLL_S)
        return self.waited_s > self.limit_s


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

    def put(self, frames: np.ndarray, slot: int, ready) -> None:
        """Queue a chunk for the sink; `ready` (a CUDA event, or None) marks its copy landed."""
        self.ready.put((frames, slot, ready))

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
        patience = _Patience(self.join_timeout_s)
        while True:
            t = time.perf_counter()
            self.thread.join(timeout=_POLL_S)
            if not self.thread.is_alive():
                break
            if patience.exhausted(t):
                self.give_up(f"host worker did not stop within {self.join_timeout_s:g} s")
        self.check()


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
        patience = _Patience(host.join_timeout_s)
        while True:
            host.check()
            if host.stop.is_set():
                raise RuntimeError("frame pipeline: host worker stopped")
            t = time.perf_counter()
            try:
                return self.slots.get(timeout=_POLL_S)
            except queue.Empty:
                pass
            if patience.exhausted(t):
                # Every buffer is held by a write that does not return: a sink stuck in I/O.
                host.give_up(f"the sink took no frames for {host.join_timeout_s:g} s")

    def release(self, slot: int):
        self.slots.put(slot)


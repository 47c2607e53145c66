"""The stitcher: a job's segments joined into its video, in shard order, as they land.

`Stitcher` runs without Ray; `actors.stitcher_actor.StitcherActor` wraps it. Segments can
arrive in any order. Each is verified the moment it arrives, in a pool of threads: fetched
if remote, then its size, sha256 and frame count and timestamps checked (hash and
inspection side by side, each reading the file once). One appender thread joins verified
segments to the output in shard order. So stitching streams alongside decoding, and when
several shards finish at once (a balanced plan makes them) their verification runs in
parallel instead of one after another, leaving only the remux itself after the last shard.
A job of one shard has nothing to join: its segment is hard-linked as the video (no copy).

Errors travel as values: a failed segment's exception is kept and raised by the next
`add`, by `finish`, or by `wait_appended`.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from actors.segments import Segment, video_name
from actors.concat import SegmentLayout, StreamingConcat, inspect_segment
from infra.checksum import sha256_file
from infra.scratch import make_scratch, sweep_stale
from infra.storage import open_store

_POLL_S = 1.0  # how often a waiting thread looks at the stop flag
SCRATCH_PREFIX = "framefarm-stitch-"


class SegmentError(RuntimeError):
    """A segment failed verification: it is not what its worker reported. `key` names it, so
    that the driver can delete it and render its shard again."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key

    def __reduce__(self):  # crosses Ray with its key
        return (SegmentError, (str(self), self.key))


@dataclass
class _Verified:
    segment: Segment
    path: str
    fetched: bool  # a scratch copy to remove once appended
    layout: SegmentLayout
    verify_s: float


class Stitcher:
    def __init__(self, output_uri: str, fmt: str, fps: int, shard_count: int, scratch_dir: str | None = None,
                 verify_threads: int = 4, video_prefix: str = ""):
        """Segments' keys are relative to `output_uri`; the video goes under `video_prefix`
        there (a render's own folder)."""
        if shard_count < 1:
            raise ValueError(f"shard_count must be >= 1, got {shard_count}")
        if verify_threads < 1:
            raise ValueError(f"verify_threads must be >= 1, got {verify_threads}")
        self.store = open_store(output_uri)
        self.fmt, self.fps, self.shard_count = fmt, fps, shard_count
        sweep_stale(SCRATCH_PREFIX, scratch_dir)  # those of stitchers killed on this machine
        self.scratch = make_scratch(SCRATCH_PREFIX, scratch_dir)
        self.video = video_name(fmt)
        self.final_name = f"{video_prefix.strip('/')}/{self.video}" if video_prefix.strip("/") else self.video
        # Stitch straight into the output folder when it is local (one rename commits it);
        # otherwise into scratch, uploaded once complete.
        local_out = self.store.local_path(self.final_name)
        self.local_output = local_out is not None
        target = local_out or os.path.join(self.scratch, self.video)
        if self.local_output:
            os.makedirs(os.path.dirname(target), exist_ok=True)
        self.concat = StreamingConcat(fmt, target, fps)
        self.frames = 0
        self.appended_at: list[float] = []
        self.verify_s = 0.0  # summed over segments, though they overlap in time
        # Two pools: a segment's verification waits for its hash, and a hash never waits,
        # so a full verification pool cannot starve the hashes it waits for.
        self._verify_pool = ThreadPoolExecutor(verify_threads, thread_name_prefix="framefarm-verify")
        self._hash_pool = ThreadPoolExecutor(verify_threads, thread_name_prefix="framefarm-hash")
        self._cond = threading.Condition()
        self._arrived: dict[int, Future] = {}  # shard index -> future of _Verified
        self._next = 0  # shards appended so far, in order
        self._error: BaseException | None = None
        self._stop = False
        self._appender = threading.Thread(target=self._append_loop, name="framefarm-append", daemon=True)
        self._appender.start()

    @property
    def next_index(self) -> int:
        with self._cond:
            return self._next

    def add(self, segment: Segment) -> int:
        """Accept a committed segment and start verifying it; returns how many shards are
        appended so far. Raises the error of any segment that already failed."""
        index = segment.index
        with self._cond:
            self._raise_failure()
            if self._stop:
                raise RuntimeError("the stitcher is closed")
            if not 0 <= index < self.shard_count:
                raise ValueError(f"shard {index} is outside this job's {self.shard_count} shards")
            if index in self._arrived:
                raise ValueError(f"shard {index} was added twice")
            self._arrived[index] = self._verify_pool.submit(self._verify, segment)
            self._cond.notify_all()
            return self._next

    def wait_appended(self, count: int, timeout: float | None = None) -> int:
        """Block until `count` shards are appended (or `timeout` passes); returns how many are."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._next < count and self._error is None and not self._stop:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(_POLL_S if left is None else min(_POLL_S, left))
            self._raise_failure()
            if self._stop and self._next < count:
                raise RuntimeError("the stitcher was aborted")
            return self._next

    def finish(self) -> dict:
        """Commit the final video once every shard is in; returns what was written."""
        with self._cond:
            self._raise_failure()  # a segment that failed says more than one that never came
            if self._stop:
                raise RuntimeError("the stitcher was aborted")
            missing = sorted(set(range(self.shard_count)) - set(self._arrived))
        if missing:
            raise SegmentError(f"cannot finish: shards {missing[:10]} not appended")
        self.wait_appended(self.shard_count)
        self._appender.join()
        self._shutdown_pools()
        t = time.perf_counter()
        result = self.concat.close()
        if not self.local_output:
            if self.fmt == "png":
                # Object stores have no folder rename: frames are replaced one by one, then
                # those of an earlier, longer render under the same name are deleted.
                names = sorted(os.listdir(result.path))
                old = set(self.store.list(f"{self.final_name}/"))
                for name in names:
                    self.store.put_file(os.path.join(result.path, name), f"{self.final_name}/{name}")
                for key in sorted(old - {f"{self.final_name}/{n}" for n in names}):
                    self.store.delete(key)
            else:
                self.store.put_file(result.path, self.final_name)
        shutil.rmtree(self.scratch, ignore_errors=True)
        return {"video": self.video, "key": self.final_name, "frames": result.frames, "bytes": result.bytes,
                "commit_s": time.perf_counter() - t, "verify_s": self.verify_s, "committed_at": time.time()}

    def abort(self):
        """Stop, drop the partial output and any scratch copies. Safe to call more than once."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        # Wake, then join: the appender notices the flag within _POLL_S, or when its
        # current segment is done.
        self._appender.join()
        self._shutdown_pools()
        self.concat.abort()
        shutil.rmtree(self.scratch, ignore_errors=True)

    # -- threads -------------------------------------------------------------------------

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def _shutdown_pools(self) -> None:
        self._verify_pool.shutdown(wait=True, cancel_futures=True)
        self._hash_pool.shutdown(wait=True, cancel_futures=True)

    def _verify(self, segment: Segment) -> _Verified:
        """Runs in the verification pool: everything about a segment short of appending it."""
        t = time.perf_counter()
        key = segment.key
        path = self.store.local_path(key)
        fetched = path is None
        if fetched:
            # The shard index keeps two segments of one name (other jobs' prefixes) apart.
            path = os.path.join(self.scratch, f"{segment.index:06d}-{os.path.basename(key)}")
            self.store.get_file(key, path)
        try:
            size = os.path.getsize(path)
            if size != segment.bytes:
                raise SegmentError(f"segment {key}: {size} bytes, its worker reported {segment.bytes}", key)
            digest = self._hash_pool.submit(sha256_file, path)
            try:
                layout = inspect_segment(path, self.fmt, self.fps)
            finally:
                sha256 = digest.result()  # also when inspection failed: no hash left running
            if sha256 != segment.sha256:
                raise SegmentError(f"segment {key}: sha256 {sha256[:12]}..., its worker reported "
                                   f"{segment.sha256[:12]}...", key)
            if layout.frames != segment.frames:
                raise SegmentError(f"segment {key}: {layout.frames} frames, expected {segment.frames}", key)
        except ValueError as exc:  # inspect_segment's refusal of a malformed segment
            self._discard(path, fetched)
            raise SegmentError(str(exc), key) from exc
        except BaseException:
            self._discard(path, fetched)
            raise
        return _Verified(segment, path, fetched, layout, time.perf_counter() - t)

    @staticmethod
    def _discard(path: str, fetched: bool) -> None:
        if fetched and os.path.exists(path):
            os.remove(path)

    def _next_arrival(self) -> Future | None:
        """The future of the next shard in order, once it has arrived; None when stopping."""
        with self._cond:
            while self._next not in self._arrived:
                if self._stop:
                    return None
                self._cond.wait(_POLL_S)
            return None if self._stop else self._arrived[self._next]

    def _append_loop(self) -> None:
        try:
            while self.next_index < self.shard_count:
                future = self._next_arrival()
                if future is None:
                    return
                while True:  # wait for its verification, but stay stoppable
                    try:
                        seg = future.result(timeout=_POLL_S)
                        break
                    except futures.TimeoutError:
                        with self._cond:
                            if self._stop:
                                return
                try:
                    # A one-shard job's segment is its video already: linked, not copied.
                    if not (self.shard_count == 1 and self.concat.link(seg.path, seg.segment.frames, seg.layout)):
                        self.concat.append(seg.path, seg.segment.frames, seg.layout)
                finally:
                    self._discard(seg.path, seg.fetched)
                with self._cond:
                    self.frames += seg.layout.frames
                    self.verify_s += seg.verify_s
                    self.appended_at.append(time.time())
                    self._next += 1
                    self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - kept and raised in the caller's thread
            with self._cond:
                self._error = exc
                self._cond.notify_all()

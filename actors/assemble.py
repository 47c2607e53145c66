"""Reassembling a job's segments into its final video, in shard order, as they land.

`SegmentAssembler` runs without Ray; `actors.ray_actors.Stitcher` wraps it. Segments can
arrive in any order; each is fetched, verified (size, sha256, frame count) and appended
as soon as every earlier shard has been appended, so stitching streams alongside decoding
instead of starting after the last shard.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from infra.checksum import sha256_file
from actors.sinks import count_frames, video_name
from actors.stitch import StreamingConcat
from infra.storage import open_store


class SegmentError(RuntimeError):
    """A segment failed verification: it is not what its worker reported."""


class SegmentAssembler:
    def __init__(self, output_uri: str, fmt: str, fps: int, shard_count: int, scratch_dir: str | None = None):
        self.store = open_store(output_uri)
        self.fmt, self.fps, self.shard_count = fmt, fps, shard_count
        self.scratch = tempfile.mkdtemp(prefix="framefarm-stitch-", dir=scratch_dir)
        self.final_name = video_name(fmt)
        # Stitch straight into the output folder when it is local (one rename commits it);
        # otherwise into scratch, uploaded once complete.
        local_out = self.store.local_path(self.final_name)
        self.local_output = local_out is not None
        target = local_out or os.path.join(self.scratch, self.final_name)
        if self.local_output:
            os.makedirs(os.path.dirname(target), exist_ok=True)
        self.concat = StreamingConcat(fmt, target, fps)
        self.pending: dict[int, dict] = {}
        self.next_index = 0
        self.frames = 0
        self.appended_at: list[float] = []
        self.verify_s = 0.0

    def add(self, meta: dict) -> int:
        """Accept a committed segment's metadata; append whatever is now in order. Returns appended count."""
        self.pending[meta["shard"]] = meta
        while self.next_index in self.pending:
            self._append(self.pending.pop(self.next_index))
            self.next_index += 1
        return self.next_index

    def _append(self, meta: dict):
        t = time.perf_counter()
        key = meta["key"]
        path = self.store.local_path(key)
        fetched = path is None
        if fetched:
            path = os.path.join(self.scratch, os.path.basename(key))
            self.store.get_file(key, path)
        try:
            size = os.path.getsize(path)
            if size != meta["bytes"]:
                raise SegmentError(f"segment {key}: {size} bytes, its worker reported {meta['bytes']}")
            digest = sha256_file(path)
            if digest != meta["sha256"]:
                raise SegmentError(f"segment {key}: sha256 {digest[:12]}..., its worker reported "
                                   f"{meta['sha256'][:12]}...; delete it and run the job again")
            frames = count_frames(path, self.fmt)
            if frames != meta["frames"]:
                raise SegmentError(f"segment {key}: {frames} frames, expected {meta['frames']}")
            self.verify_s += time.perf_counter() - t
            self.concat.append(path, meta["frames"])
            self.frames += meta["frames"]
            self.appended_at.append(time.time())
        finally:
            if fetched and os.path.exists(path):
                os.remove(path)

    def finish(self) -> dict:
        """Commit the final video once every shard is in; returns what was written."""
        if self.next_index != self.shard_count:
            missing = sorted(set(range(self.shard_count)) - set(range(self.next_index)))
            raise SegmentError(f"cannot finish: shards {missing[:10]} not appended")
        t = time.perf_counter()
        result = self.concat.close()
        if not self.local_output:
            if self.fmt == "png":
                for name in sorted(os.listdir(result.path)):
                    self.store.put_file(os.path.join(result.path, name), f"{self.final_name}/{name}")
            else:
                self.store.put_file(result.path, self.final_name)
        shutil.rmtree(self.scratch, ignore_errors=True)
        return {"video": self.final_name, "frames": result.frames, "bytes": result.bytes,
                "commit_s": time.perf_counter() - t, "verify_s": self.verify_s, "committed_at": time.time()}

    def abort(self):
        self.concat.abort()
        shutil.rmtree(self.scratch, ignore_errors=True)

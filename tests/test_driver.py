"""The driver's logic (retries, resume, cancellation, the stall watch, backup copies) over a worker pool:
once with ShardWorkers on threads of this process (no Ray started), once with Ray actors on
a local Ray. One set of tests, parametrized over the two pools.

Each kind's pool is shared by the module's tests (as a Farm's is by its jobs): a test that
loses or stops a worker leaves a replacement behind for the next. Workers are stopped
the way each kind stops: a Ray actor's process by SIGSTOP at its shard's dispatch, an
in-process worker at a gate before the first decode step of the shard it was told to hold.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time

import pytest

from actors.decoders import pattern_latents, read_index
from actors.protocol import (DecoderSpec, LatentSlice, RenderSpec, SegmentRecord, SegmentTaken, Shard, ShardWithdrawn,
                             pixel_frames, shard_task, sidecar_key)
from actors.sinks import read_frames
from actors.worker import ShardWorker
from cluster.dispatch import InProcessPool, JobCancelled, RayPool
from cluster.driver import RenderJob
from infra.checksum import sha256_file
from infra.staged import TMP_SUFFIX
from tests.conftest import block_segments, clear_segments_on_retry


class _GatedDecoder:
    """A decoder whose stream takes each step only while `running` is set: an in-process
    worker stopped mid-shard, as SIGSTOP stops a process."""

    def __init__(self, decoder, running: threading.Event):
        self._decoder, self._running = decoder, running

    def __getattr__(self, name):
        return getattr(self._decoder, name)

    def stream(self, *args, **kwargs):
        for chunk in self._decoder.stream(*args, **kwargs):
            self._running.wait()
            yield chunk


class _StoppableWorker(ShardWorker):
    """Stops (for good, until let go) when it starts a shard whose index is in `holds`, a set
    its pool's workers share; the first to start that shard takes the index out."""

    def __init__(self, holds: set):
        super().__init__(device="cpu")
        self.running = threading.Event()
        self.running.set()
        self._holds = holds

    def decoder(self, spec):
        return _GatedDecoder(super().decoder(spec), self.running)

    def render_shard(self, task, latents):
        if task.shard.index in self._holds:
            self._holds.discard(task.shard.index)
            self.running.clear()
        return super().render_shard(task, latents)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=3, num_gpus=0, include_dashboard=False, object_store_memory=150 * 2**20)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module", params=["in-process", "ray"])
def pool(request):
    """Two workers of the parametrized kind, shared by the module's tests."""
    if request.param == "ray":
        request.getfixturevalue("local_ray")
        made = RayPool(2, use_gpu=False, shared=True)
    else:
        holds = set()
        made = InProcessPool(2, shared=True, make_worker=lambda: _StoppableWorker(holds))
        made.holds = holds
    made.stopped = []  # what tests stopped, let go at the end
    made.wait_ready(300)
    yield made
    _let_go(made)
    made.shutdown(wait_s=30)


def lose(pool, worker) -> None:
    """End a worker the way its pool's kind loses one: a killed process, a crashed thread."""
    if isinstance(pool, RayPool):
        import ray

        ray.kill(worker, no_restart=True)
    else:
        pool.lose(worker)


class Stopper:
    """Stops the worker of the first copy of shard `index` in its shard, without ending it;
    `on_event` is the job's event hook, keeping every (kind, info) in `events`. `worker` is
    the stopped one."""

    def __init__(self, pool, index: int):
        self.pool, self.index, self.worker = pool, index, None
        self.events: list[tuple[str, dict]] = []
        if not isinstance(pool, RayPool):
            pool.holds.add(index)

    def on_event(self, kind, info) -> None:
        self.events.append((kind, info))
        if kind != "dispatch" or info["shard"].index != self.index or self.worker is not None:
            return
        self.worker = info["worker"]
        if isinstance(self.pool, RayPool):
            pid = self.pool.describe(self.worker).pid
            os.kill(pid, signal.SIGSTOP)
            self.pool.stopped.append(pid)
        else:
            self.pool.stopped.append(self.worker.worker.running)

    def let_go(self) -> None:
        """Let the stopped worker go on (a Ray actor's process, continued, is then the pool's)."""
        if isinstance(self.pool, RayPool):
            os.kill(self.pool.stopped.pop(), signal.SIGCONT)
        else:
            self.worker.worker.running.set()


def _let_go(pool) -> None:
    for stopped in pool.stopped:
        if isinstance(stopped, threading.Event):
            stopped.set()
        else:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(stopped, sig)
                except ProcessLookupError:
                    pass
    pool.stopped.clear()


def _spec(out, **options) -> RenderSpec:
    return RenderSpec(output=str(out), decoder=DecoderSpec(name="test-pattern"), format="ffv1", **options)


def _indices(out) -> list[int]:
    return [read_index(f) for f in read_frames(os.path.join(out, "video.mkv"), "ffv1")]


def test_a_lost_worker_s_shard_is_retried_elsewhere(pool, tmp_path):
    lost = []

    def on_event(kind, info):
        if kind == "dispatch" and info["shard"].index == 1 and not lost:
            lose(pool, info["worker"])  # gone with its shard in flight
            lost.append(info["worker"])

    result = RenderJob(_spec(tmp_path, shard_latents=3), pattern_latents(9, 96, 128), pool=pool, progress=False,
                       on_event=on_event).run()
    assert len(lost) == 1 and lost[0] not in pool.ready()
    assert _indices(tmp_path) == list(range(pixel_frames(9)))
    assert {r["shard"]: r["attempts"] for r in result.manifest} == {0: 1, 1: 2, 2: 1}


def test_a_transient_failure_is_retried_and_a_lasting_one_fails_the_job(pool, tmp_path):
    # Segment writes fail until the first retry clears the way; then the job completes.
    out, retries = tmp_path / "io", []
    block_segments(out)
    result = RenderJob(_spec(out, shard_latents=3), pattern_latents(9, 96, 128), pool=pool, progress=False,
                       on_event=clear_segments_on_retry(out, retries)).run()
    assert retries and result.summary["retried_shards"] >= 1
    assert _indices(out) == list(range(pixel_frames(9)))

    # The same obstacle at every attempt: the job ends after max_attempts with the worker's error.
    out2 = tmp_path / "io2"
    block_segments(out2)
    retried = []
    with pytest.raises(OSError):
        RenderJob(_spec(out2, max_attempts=2), pattern_latents(3, 96, 128), pool=pool, progress=False,
                  on_event=lambda kind, info: retried.append(kind) if kind == "retry" else None).run()
    assert retried == ["retry"]
    assert not (out2 / "video.mkv").exists()


def test_a_rerun_reuses_committed_segments(pool, tmp_path):
    latents = pattern_latents(9, 96, 128)
    first = RenderJob(_spec(tmp_path, shard_latents=3, keep_segments=True), latents, pool=pool,
                      progress=False).run()
    assert first.summary["reused_shards"] == 0
    sidecars = sorted(tmp_path.glob("segments/*/*.mkv.json"))
    assert len(sidecars) == 3
    sidecars[1].unlink()  # shard 1 was not committed
    sidecars[2].write_text("{")  # shard 2's sidecar is damaged: not committed either
    (tmp_path / "video.mkv").unlink()  # the render is no longer whole: the job runs again
    dispatched = []
    again = RenderJob(_spec(tmp_path, shard_latents=3), latents, pool=pool, progress=False,
                      on_event=lambda kind, info: dispatched.append(info["shard"].index)
                      if kind == "dispatch" and not info["backup"] else None).run()
    assert sorted(dispatched) == [1, 2]
    assert again.summary["reused_shards"] == 1
    assert _indices(tmp_path) == list(range(pixel_frames(9)))
    assert not list(tmp_path.glob("segments/*/*"))  # not kept this time


def test_cancel_ends_the_job_and_leaves_no_video_and_the_pool_goes_on(pool, tmp_path):
    job = None

    def cancel_at_first_dispatch(kind, info):
        if kind == "dispatch":
            job.cancel()  # shards in flight: the job ends with them abandoned

    job = RenderJob(_spec(tmp_path / "cancelled", shard_latents=3), pattern_latents(30, 96, 128), pool=pool,
                    progress=False, on_event=cancel_at_first_dispatch)
    with pytest.raises(JobCancelled):
        job.run()
    assert not (tmp_path / "cancelled" / "video.mkv").exists()
    # The pool outlives the job: its busy workers were replaced, and the next job runs on it.
    pool.wait_ready(300)
    RenderJob(_spec(tmp_path / "next"), pattern_latents(3, 96, 128), pool=pool, progress=False).run()
    assert _indices(tmp_path / "next") == list(range(pixel_frames(3)))


def test_a_stopped_worker_s_shard_is_abandoned_after_the_stall_time_and_rerun(pool, tmp_path):
    stopper = Stopper(pool, 1)
    # No backup copies: the stall watch alone must end the stopped copy.
    result = RenderJob(_spec(tmp_path, shard_latents=3, stall_s=4, backups=False), pattern_latents(9, 96, 128),
                       pool=pool, progress=False, on_event=stopper.on_event).run()
    stalls = [info for kind, info in stopper.events if kind == "stall"]
    # Under load a healthy worker may miss a step for the stall time too; the stopped one must.
    assert stopper.worker is not None and any(s["worker"] == stopper.worker and s["shard"].index == 1 for s in stalls)
    assert result.summary["stalled_shards"] == len(stalls) and result.summary["backup_shards"] == 0
    assert stopper.worker not in pool.ready()  # replaced
    assert _indices(tmp_path) == list(range(pixel_frames(9)))
    assert not [n for _, _, files in os.walk(tmp_path) for n in files if n.endswith(TMP_SUFFIX)]
    timeline = json.loads((tmp_path / "timeline.json").read_text())
    assert "stall shard 1" in {e["name"] for e in timeline["traceEvents"] if e["ph"] == "i"}


def test_an_idle_worker_backs_up_a_stopped_shard_and_the_first_copy_to_commit_wins(pool, tmp_path):
    stopper = Stopper(pool, 0)
    # The stall time is far away: the backup copy, not the stall watch, finishes the job.
    result = RenderJob(_spec(tmp_path, shard_latents=3, stall_s=120, keep_segments=True), pattern_latents(12, 96, 128),
                       pool=pool, progress=False, on_event=stopper.on_event).run()
    backups = [info for kind, info in stopper.events if kind == "backup"]
    assert [b["shard"].index for b in backups] == [0] and backups[0]["worker"] != stopper.worker
    assert result.summary["backup_shards"] == 1 and result.summary["backup_wins"] == 1
    assert result.summary["stalled_shards"] == 0
    assert _indices(tmp_path) == list(range(pixel_frames(12)))
    timeline = json.loads((tmp_path / "timeline.json").read_text())
    assert {"backup shard 0", "backup won shard 0"} <= {e["name"] for e in timeline["traceEvents"] if e["ph"] == "i"}
    (segment,) = [p for p in tmp_path.glob("segments/*/00000_*.mkv")]
    committed = segment.read_bytes()

    # Let the loser go on: it was withdrawn, commits nothing, and its worker comes back to
    # the pool (not replaced).
    stopper.let_go()
    deadline = time.monotonic() + 120
    while True:
        free = pool.claim(2)
        for worker in free:
            pool.release(worker)
        if stopper.worker in free:
            break
        assert time.monotonic() < deadline, "the withdrawn copy's worker did not come back"
        time.sleep(0.05)
    assert segment.read_bytes() == committed
    record = SegmentRecord.from_json((tmp_path / (str(segment.relative_to(tmp_path)) + ".json")).read_bytes())
    assert record.sha256 == sha256_file(str(segment))
    assert not [n for _, _, files in os.walk(tmp_path) for n in files if n.endswith(TMP_SUFFIX)]


def test_a_second_copy_of_a_shard_commits_nothing_and_its_worker_goes_on(tmp_path):
    """Two copies of one shard on two workers (no pool, no Ray): the first commits; the
    second finds the segment claimed and leaves it as it was; a withdrawn copy stops."""
    first, second = ShardWorker(device="cpu"), ShardWorker(device="cpu")
    latents = pattern_latents(9, 96, 128)
    shards = [Shard(index=0, start=0, stop=4, context_start=0), Shard(index=1, start=4, stop=9, context_start=0)]
    tasks = [shard_task(_spec(tmp_path), "job1", shard) for shard in shards]
    slices = [LatentSlice.of(latents[:, s.context_start:s.stop]) for s in shards]
    try:
        record = first.render_shard(tasks[0], slices[0])
        segment = tmp_path / record.key
        committed, sidecar = segment.read_bytes(), (tmp_path / sidecar_key(record.key)).read_bytes()
        with pytest.raises(SegmentTaken):
            second.render_shard(tasks[0], slices[0])
        assert segment.read_bytes() == committed and (tmp_path / sidecar_key(record.key)).read_bytes() == sidecar
        second.withdraw(tasks[1].run_key, 1)
        with pytest.raises(ShardWithdrawn):
            second.render_shard(tasks[1], slices[1])
        assert not (tmp_path / tasks[1].segment_key).exists()
        assert not [n for _, _, files in os.walk(tmp_path) for n in files if n.endswith(TMP_SUFFIX)]
        # A rerun of the same job (same fingerprint, another run) on the same worker is not
        # the copy that was withdrawn: it decodes and commits.
        rerun = dataclasses.replace(tasks[1], run_id="rerun")
        assert second.render_shard(rerun, slices[1]).frames == shards[1].frame_count
        # The same worker, another job: it decodes as before.
        other = shard_task(_spec(tmp_path / "other"), "job2", shards[1])
        assert second.render_shard(other, slices[1]).frames == shards[1].frame_count
    finally:
        first.close()
        second.close()

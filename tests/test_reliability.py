"""Faults and bad inputs on a real local Ray: the project's own processes killed or stopped by
their PIDs, OUTPUT shared by jobs, encoders that cannot open. Every test checks the frames
by the test pattern's indices, or a clean refusal, and that no earlier render was lost."""

from __future__ import annotations

import os
import re
import signal
import tempfile
import threading
import time

import pytest
import ray

from actors.decoders import pattern_latents, read_index
from actors.sinks import read_frames
from actors.worker import ShardWorker
from cluster.api import render, submit
from cluster.driver import OutputBusy, RenderJob

from infra.staged import TMP_SUFFIX
from actors.protocol import InputError, RenderSpec, pixel_frames
from tests.conftest import wait_for

PATTERN = {"decoder": {"name": "test-pattern"}, "progress": False}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=3, num_gpus=0, include_dashboard=False, object_store_memory=200 * 2**20)
    try:
        yield
    finally:
        ray.shutdown()


def _indices(out, name):
    fmt = {"video.mp4": "mp4", "video.mkv": "ffv1", "frames": "png"}[name]
    return [read_index(f) for f in read_frames(os.path.join(out, name), fmt)]


def _leftovers(out) -> list[str]:
    return [n for _, dirs, files in os.walk(out) for n in dirs + files if n.endswith(TMP_SUFFIX)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_one_render_per_output_same_job_done_once_other_job_only_with_overwrite(tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("mine")
    first_latents = pattern_latents(9, 96, 128)
    busy = []

    def second_job_while_first_runs(kind, info):
        if kind == "dispatch" and not busy:
            # Same OUTPUT, another job, while the first holds it: refused at once, naming it.
            with pytest.raises(OutputBusy, match=r"is busy: .* job [0-9a-f]{16} \(host .* pid"):
                RenderJob(RenderSpec(output=out, decoder={"name": "test-pattern"}, format="ffv1"),
                          pattern_latents(5, 96, 128), progress=False).prepare()
            busy.append(True)

    first = submit(first_latents, out, shard_latents=3, on_event=second_job_while_first_runs,
                   decoder={"name": "test-pattern"}).wait(timeout=300)
    assert busy and _indices(out, "video.mp4") == list(range(pixel_frames(9)))

    # The same job again: already rendered, no work at all.
    events = []
    again = submit(first_latents, out, shard_latents=3, on_event=lambda kind, info: events.append(kind),
                   decoder={"name": "test-pattern"}).wait(timeout=300)
    assert again.already_rendered and events == [] and again.summary["render"] == first.summary["render"]

    # Another job: refused, the first render untouched; with overwrite it replaces it,
    # a video of another format included, and nothing of the user's goes.
    with pytest.raises(InputError, match=r"holds the render of job .* pass --overwrite"):
        render(pattern_latents(5, 96, 128), out, format="ffv1", **PATTERN)
    assert _indices(out, "video.mp4") == list(range(pixel_frames(9)))
    second = render(pattern_latents(5, 96, 128), out, format="ffv1", overwrite=True, **PATTERN)
    assert _indices(out, "video.mkv") == list(range(pixel_frames(5)))
    assert sorted(os.listdir(out)) == sorted(["video.mkv", "manifest.parquet", "summary.json", "timeline.json",
                                              "render.json", "renders", "notes.txt"])
    assert sorted(os.listdir(os.path.join(out, "renders"))) == sorted(["current", second.summary["render"]])
    assert open(os.path.join(out, "notes.txt")).read() == "mine"
    assert _leftovers(out) == []


def test_a_worker_killed_by_pid_mid_write_leaves_nothing_behind(tmp_path):
    out = str(tmp_path / "out")
    latents = pattern_latents(121, 96, 128)  # two shards of 240 frames: long enough to catch mid-write
    pids, killed = [], []

    def kill_while_writing(kind, info):
        if kind == "dispatch":
            pids.append(info["info"].pid)
        if kind == "dispatch" and not killed:
            segments = os.path.join(out, "segments")
            wait_for(lambda: any(n.endswith(TMP_SUFFIX) for _, _, files in os.walk(segments) for n in files),
                     what="a segment being written")
            os.kill(info["info"].pid, signal.SIGKILL)
            killed.append(info["info"].pid)

    result = submit(latents, out, format="ffv1", shard_latents=60, workers=2, on_event=kill_while_writing,
                    decoder={"name": "test-pattern"}).wait(timeout=600)
    assert killed and result.summary["retried_shards"] >= 1
    assert _indices(out, "video.mkv") == list(range(pixel_frames(121)))
    assert _leftovers(out) == []  # the killed writer's partial segment went with the run
    assert not os.path.exists(os.path.join(out, "segments")) or not os.listdir(os.path.join(out, "segments"))
    # A worker killed by pid, or ended by the pool's shutdown (ray.kill runs no cleanup),
    # leaves its scratch folder: the next worker to start on this machine sweeps those of
    # processes that are gone. Whether a replacement started after the kill is a race, so
    # wait for the job's workers to exit, then start one.
    wait_for(lambda: not any(_alive(p) for p in pids), what="the job's workers to exit")
    ShardWorker(device="cpu").close()
    owners = [re.match(r"framefarm-scratch-(\d+)-", n) for n in os.listdir(tempfile.gettempdir())]
    assert not [m.group(0) for m in owners if m and int(m.group(1)) in pids]


def test_an_encoder_that_cannot_open_is_refused_once_not_retried(tmp_path):
    out = tmp_path / "out"
    retries = []
    with pytest.raises(InputError, match="h264_nvenc does not open"):
        submit(pattern_latents(5, 96, 128), str(out), encoder="h264_nvenc", shard_latents=2,
               on_event=lambda kind, info: retries.append(kind) if kind in ("retry", "dispatch") else None,
               decoder={"name": "test-pattern"}).wait(timeout=300)
    assert retries == []  # refused before any shard went out
    assert not out.exists() or _leftovers(str(out)) == [] and not os.path.exists(out / "video.mp4")


def test_a_stopped_driver_loses_its_lease_and_publishes_nothing(tmp_path):
    """A job whose lease was taken over (its driver stalled past the expiry) stops before
    publishing; the render in OUTPUT stays whole."""
    from infra.lease import Lease, lease_key
    from infra.storage import LocalStore
    import json

    out = str(tmp_path / "out")
    render(pattern_latents(5, 96, 128), out, **PATTERN)
    taken = threading.Event()

    def take_over(kind, info):
        if kind == "dispatch" and not taken.is_set():
            store = LocalStore(out)
            (key,) = [k for k in store.list(".framefarm-lease.")]
            record = json.loads(store.get_bytes(key))
            store.put_bytes(key, json.dumps({**record, "expires": time.time() - 1}).encode())
            Lease.acquire(store, "someone-else", ttl_s=3600)
            taken.set()

    job = submit(pattern_latents(9, 96, 128), out, shard_latents=3, overwrite=True, on_event=take_over,
                 decoder={"name": "test-pattern"})
    with pytest.raises(Exception, match="lease on .* (taken over|no longer)"):
        job.wait(timeout=300)
    assert _indices(out, "video.mp4") == list(range(pixel_frames(5)))
    assert LocalStore(out).list(".framefarm-lease.") == [lease_key(2)]  # the new holder's, untouched


def test_a_damaged_committed_segment_is_deleted_and_rendered_again(tmp_path):
    out = tmp_path / "out"
    latents = pattern_latents(13, 96, 128)
    render(latents, str(out), format="ffv1", shard_latents=3, keep_segments=True, **PATTERN)
    (segment,) = [p for p in sorted(out.glob("segments/*/*.mkv")) if p.name.startswith("00002_")]
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flipped bytes in a committed segment
    segment.write_bytes(bytes(data))
    (out / "video.mkv").unlink()  # the render is no longer whole: the job runs again, reusing segments
    events = []
    result = submit(latents, str(out), format="ffv1", shard_latents=3,
                    on_event=lambda kind, info: events.append((kind, info)),
                    decoder={"name": "test-pattern"}).wait(timeout=300)
    healed = [info["shard"].index for kind, info in events if kind == "heal"]
    assert healed == [2]
    assert [info.shard.index for kind, info in events if kind == "done"] == [2]  # only it was decoded
    assert result.summary["reused_shards"] == 4
    assert _indices(str(out), "video.mkv") == list(range(pixel_frames(13)))
    assert _leftovers(str(out)) == []


def test_a_killed_stitcher_is_replaced_at_once_and_the_video_is_exact(tmp_path):
    out = str(tmp_path / "out")
    latents = pattern_latents(61, 96, 128)
    order, pids = [], []

    def kill_stitcher_after_first_shard(kind, info):
        order.append(kind)
        if kind == "stitcher":
            pids.append(info["pid"])
        if kind == "done" and order.count("done") == 1:
            os.kill(pids[0], signal.SIGKILL)

    submit(latents, out, format="ffv1", shard_latents=6, workers=2, on_event=kill_stitcher_after_first_shard,
           decoder={"name": "test-pattern"}).wait(timeout=600)
    assert len(pids) == 2 and pids[0] != pids[1]
    # Noticed while shards still ran, not after the last one.
    assert order.index("stitcher", 1) < len(order) - 1 - order[::-1].index("done")
    assert _indices(out, "video.mkv") == list(range(pixel_frames(61)))
    assert _leftovers(out) == []
    assert not [n for n in os.listdir(tempfile.gettempdir()) if n.startswith(f"framefarm-stitch-{pids[0]}-")]


def test_a_farm_shared_by_concurrent_jobs(tmp_path):
    """Jobs from several threads on one Farm all finish exact; a worker lost between jobs is
    replaced once, not once per job; cancelling one job ends none of another's shards."""
    from cluster.api import Farm
    from cluster.dispatch import JobCancelled

    with Farm(workers=2, device="cpu") as farm:
        farm.pool.wait_ready(300)
        # A worker dies between jobs: every job below meets it, one replacement is started.
        dead = farm.pool.actors[0]
        os.kill(farm.pool.info[dead].pid, signal.SIGKILL)
        errors, results = [], {}

        def run(i):
            try:
                results[i] = farm.render(pattern_latents(3 + i, 96, 128), str(tmp_path / f"job{i}"),
                                         shard_latents=2, **PATTERN)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert errors == [] and len(results) == 5
        for i in range(5):
            assert _indices(str(tmp_path / f"job{i}"), "video.mp4") == list(range(pixel_frames(3 + i)))
        assert len(farm.pool.actors) + farm.pool.starting == 2

        # One long job and one short, side by side; the long one is cancelled once both have
        # a shard out (from its own dispatch, so that it cannot have finished first).
        long_running, short_dispatched = threading.Event(), threading.Event()
        long_job = None

        def cancel_once_both_run(kind, info):
            if kind == "dispatch" and not long_running.is_set():
                long_running.set()
                assert short_dispatched.wait(timeout=300)
                long_job.job.cancel()

        long_job = submit(pattern_latents(2000, 96, 128), str(tmp_path / "long"), farm=farm, format="ffv1",
                          shard_latents=2000, decoder={"name": "test-pattern"}, on_event=cancel_once_both_run)
        assert long_running.wait(timeout=300)
        short_events = []

        def on_short(kind, info):
            short_events.append(kind)
            if kind == "dispatch":
                short_dispatched.set()

        short_job = submit(pattern_latents(9, 96, 128), str(tmp_path / "short"), farm=farm, format="ffv1",
                           shard_latents=3, decoder={"name": "test-pattern"}, on_event=on_short)
        assert short_dispatched.wait(timeout=300)
        assert long_job.cancel(timeout=120)
        with pytest.raises(JobCancelled):
            long_job.wait(timeout=1)
        short = short_job.wait(timeout=300)
        assert "retry" not in short_events and short.summary["retried_shards"] == 0
        assert _indices(str(tmp_path / "short"), "video.mkv") == list(range(pixel_frames(9)))
        assert len(farm.pool.actors) + farm.pool.starting == 2

"""The product on a real local Ray cluster: three workers on three nodes, exact and complete video.

Workers hold fake GPUs (Ray resources) and decode on the CPU, which is the path CI has.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch

from actors.decoders import pattern_latents, read_index
from actors.colour import to_uint8_frames
from actors.sinks import read_frames
from actors.wan import load_wan_decoder
from cluster.api import render, submit
from actors.protocol import pixel_frames
from tests.conftest import block_segments, clear_segments_on_retry, tiny_latents

PATTERN = {"decoder": {"name": "test-pattern"}, "progress": False}


def _video(out, fmt):
    return read_frames(os.path.join(out, {"mp4": "video.mp4", "ffv1": "video.mkv", "png": "frames"}[fmt]), fmt)


def test_exact_shards_equal_the_monolithic_decode(ray_cluster, tiny_wan_dir, tmp_path):
    decoder = load_wan_decoder(tiny_wan_dir)
    k = decoder.receptive_field
    t = 3 * k + 5  # three shards, each after the first with full context
    latents = tiny_latents(t, seed=3)
    reference = np.concatenate([to_uint8_frames(c).numpy() for c in decoder.stream(latents)])

    out = str(tmp_path / "exact")
    result = render(latents, out, decoder={"name": "wan2.1", "weights": tiny_wan_dir}, format="ffv1",
                    workers=3, progress=False)
    frames = _video(out, "ffv1")
    assert frames.shape == reference.shape == (pixel_frames(t), 64, 64, 3)
    np.testing.assert_array_equal(frames, reference)
    assert len(result.manifest) == 3 and all(r["context"] in (0, k) for r in result.manifest)
    assert len({r["node_id"] for r in result.manifest}) == 3  # one shard on each node

    # Context decoded in full through every stage gives the very same frames.
    whole = str(tmp_path / "full")
    render(latents, whole, decoder={"name": "wan2.1", "weights": tiny_wan_dir}, format="ffv1", workers=3,
           context_mode="full", progress=False)
    np.testing.assert_array_equal(_video(whole, "ffv1"), reference)

    # With too little context the shards are not exact: the test can tell the difference.
    short = str(tmp_path / "short")
    render(latents, short, decoder={"name": "wan2.1", "weights": tiny_wan_dir}, format="ffv1", workers=3,
           context=2, progress=False)
    assert not np.array_equal(_video(short, "ffv1"), reference)


@pytest.mark.parametrize("fmt", ["mp4", "png"])
def test_every_frame_exactly_once_in_order(ray_cluster, tmp_path, fmt):
    t = 37
    out = str(tmp_path / fmt)
    result = render(pattern_latents(t, 96, 128), out, format=fmt, shard_latents=4, **PATTERN)
    frames = _video(out, fmt)
    assert [read_index(f) for f in frames] == list(range(pixel_frames(t)))
    table = pq.read_table(os.path.join(out, "manifest.parquet")).to_pylist()
    assert [r["shard"] for r in table] == list(range(10))
    assert sum(r["frames"] for r in table) == pixel_frames(t)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["frames"] == pixel_frames(t) and summary["shards"] == 10
    trace = json.load(open(os.path.join(out, "timeline.json")))
    assert sum(e["name"].startswith("shard ") for e in trace["traceEvents"]) == 10
    assert result.summary["frames"] == pixel_frames(t)
    # Segments are intermediate: gone once the video is committed (unless --keep-segments).
    assert [f for _, _, files in os.walk(os.path.join(out, "segments")) for f in files] == []


def _clean_reference(tmp_path, latents):
    out = str(tmp_path / "clean")
    render(latents, out, format="ffv1", shard_latents=3, **PATTERN)
    return _video(out, "ffv1")


def test_worker_killed_mid_shard_gives_the_identical_video(ray_cluster, tmp_path):
    latents = pattern_latents(25, 96, 128)
    reference = _clean_reference(tmp_path, latents)
    killed = []

    def kill_first_dispatch(kind, info):
        if kind == "dispatch" and info["shard"].index == 2 and not killed:
            ray.kill(info["worker"], no_restart=True)  # the process dies with its shard in flight
            killed.append(info["shard"].index)

    out = str(tmp_path / "killed")
    result = submit(latents, out, format="ffv1", shard_latents=3, on_event=kill_first_dispatch,
                    decoder={"name": "test-pattern"}).wait(timeout=300)
    assert killed == [2]
    np.testing.assert_array_equal(_video(out, "ffv1"), reference)
    assert [r["attempts"] for r in result.manifest if r["shard"] == 2] == [2]


def test_node_removed_mid_job_gives_the_identical_video(ray_cluster, tmp_path):
    cluster, nodes = ray_cluster
    latents = pattern_latents(25, 96, 128)
    reference = _clean_reference(tmp_path, latents)
    victim = nodes[-1]
    removed = []

    def remove_node_of_dispatch(kind, info):
        if kind == "dispatch" and not removed and info["info"].node_id == victim.node_id:
            cluster.remove_node(victim, allow_graceful=False)
            removed.append(info["shard"].index)

    out = str(tmp_path / "removed")
    from cluster.api import Farm

    with Farm(workers=3, device="cuda") as farm:
        # All three workers up before the job (one per node, each node has one GPU), so the
        # first round of dispatch reaches the victim's: a slow start cannot skip it.
        deadline = time.monotonic() + 180
        while len(farm.pool.actors) < 3 and time.monotonic() < deadline:
            farm.pool.poll_ready(timeout=1.0)
        assert len(farm.pool.actors) == 3
        result = submit(latents, out, farm=farm, format="ffv1", shard_latents=3, on_event=remove_node_of_dispatch,
                        decoder={"name": "test-pattern"}).wait(timeout=300)
    assert removed
    np.testing.assert_array_equal(_video(out, "ffv1"), reference)
    # Retried once Ray declares the node's actor dead, or overtaken before that by a backup
    # copy on a worker that fell idle.
    assert result.summary["retried_shards"] + result.summary["backup_wins"] >= 1
    assert victim.node_id not in {r["node_id"] for r in result.manifest if r["attempts"] > 1}


def test_frame_too_large_for_the_device_is_refused_before_any_output(ray_cluster, tmp_path):
    from actors.protocol import InputError

    out = tmp_path / "huge"
    # 4000x4000 pixels in fp32 needs hundreds of GiB per decode stream: more than these
    # workers' device has (the host's RAM on a CPU worker).
    with pytest.raises(InputError, match="4000x4000 needs about"):
        render(tiny_latents(2, h=500, w=500), str(out), decoder={"name": "wan2.1", "random_weights": True},
               workers=1, progress=False)
    assert not out.exists()


def test_wan22_ti2v_vae_renders_exactly_through_the_same_path(ray_cluster, tmp_path):
    from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan

    from actors.wan import tiny_wan_config

    weights = tmp_path / "tiny-ti2v"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        AutoencoderKLWan.from_config(tiny_wan_config("2.2")).save_pretrained(str(weights))
    decoder = load_wan_decoder(str(weights))
    assert (decoder.z_dim, decoder.spatial_scale) == (48, 16)
    t = decoder.receptive_field + 4
    latents = torch.randn(48, t, 4, 4, generator=torch.Generator().manual_seed(5))
    reference = np.concatenate([to_uint8_frames(c).numpy() for c in decoder.stream(latents)])
    out = str(tmp_path / "ti2v")
    render(latents, out, decoder={"name": "wan2.2-ti2v", "weights": str(weights)}, format="ffv1", workers=2,
           progress=False)
    np.testing.assert_array_equal(_video(out, "ffv1"), reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_latent_slices_cross_ray_exactly_and_read_only(ray_cluster, dtype):
    from actors.protocol import LatentSlice

    latents = torch.randn(16, 7, 6, 10).to(dtype)[:, 2:6]  # a shard's slice: not contiguous

    @ray.remote(num_cpus=0)
    def receive(payload: LatentSlice):
        t = payload.tensor()
        return t.clone(), payload.data.flags.writeable

    got, writeable = ray.get(receive.remote(ray.put(LatentSlice.of(latents))))
    assert got.dtype == dtype and torch.equal(got, latents)
    assert not writeable  # Ray handed over its own memory, not a pickled copy


def test_a_farm_outlives_a_dead_worker_and_a_cancelled_job(ray_cluster, tmp_path):
    import threading

    from cluster.api import Farm
    from cluster.dispatch import JobCancelled

    latents = pattern_latents(9, 96, 128)
    with Farm(workers=2, device="cuda") as farm:
        farm.render(latents, str(tmp_path / "first"), **PATTERN)
        # A worker dies between jobs (a reclaimed spot node, say): the next job still runs.
        dead = farm.pool.actors[0]
        ray.kill(dead, no_restart=True)
        second = farm.render(latents, str(tmp_path / "second"), **PATTERN)
        assert [read_index(f) for f in _video(str(tmp_path / "second"), "mp4")] == list(range(pixel_frames(9)))
        assert dead not in farm.pool.actors and second.summary["frames"] == pixel_frames(9)

        # Cancel once a long job's shards run: the busy workers are killed and replaced (a
        # running actor task ignores ray.cancel), no video is written, the Farm goes on.
        running = threading.Event()
        busy = []

        def on_event(kind, info):
            if kind == "dispatch":
                busy.append(info["worker"])
                running.set()

        # Shards far longer than the dispatch loop's 1 s poll: they are still running at the cancel.
        handle = submit(pattern_latents(4000, 96, 128), str(tmp_path / "cancelled"), farm=farm,
                        on_event=on_event, shard_latents=2000, format="ffv1", decoder={"name": "test-pattern"})
        assert running.wait(timeout=120)
        assert handle.cancel(timeout=120)
        with pytest.raises(JobCancelled):
            handle.wait(timeout=1)
        assert not os.path.exists(tmp_path / "cancelled" / "video.mkv")
        assert not set(busy) & set(farm.pool.actors)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(busy[0].describe.remote(), timeout=60)
        third = farm.render(latents, str(tmp_path / "third"), **PATTERN)
        assert third.summary["frames"] == pixel_frames(9)


def test_worker_errors_reach_the_caller_as_themselves(ray_cluster, tmp_path):
    # A frame too small for the test pattern is refused in the worker; the caller sees that
    # error's own message, not Ray's remote traceback.
    with pytest.raises(Exception) as err:
        render(pattern_latents(3, 8, 8), str(tmp_path / "out"), **PATTERN)
    assert "\x1b[" not in str(err.value) and "ray::" not in str(err.value), str(err.value)
    assert not isinstance(err.value, ray.exceptions.RayTaskError)


def test_resume_redoes_segments_made_with_another_encoder(ray_cluster, tmp_path):
    # A job first run where "auto" meant NVENC, resumed where it means libx264: segments of
    # both cannot be joined, so the resume redoes the NVENC ones instead of failing to stitch.
    out = tmp_path / "resume"
    latents = pattern_latents(9, 96, 128)
    first = render(latents, str(out), shard_latents=3, keep_segments=True, **PATTERN)
    assert first.summary["shards"] == 3
    sidecars = sorted(out.glob("segments/*/*.mp4.json"))
    sidecars[0].unlink()  # shard 0 was not committed: the resume has work to do
    meta = json.loads(sidecars[1].read_text())
    assert meta["report"]["sink"]["codec"] == "libx264"
    meta["report"]["sink"]["codec"] = "h264_nvenc"  # as a worker with NVENC would have written it
    sidecars[1].write_text(json.dumps(meta))
    (out / "video.mp4").unlink()
    again = render(latents, str(out), shard_latents=3, **PATTERN)
    assert again.summary["reused_shards"] == 1
    assert [read_index(f) for f in _video(str(out), "mp4")] == list(range(pixel_frames(9)))


def test_a_shard_failing_on_io_is_retried_and_bad_input_is_not(ray_cluster, tmp_path):
    # Every worker's segment write fails until the first retry clears the way; then the job completes.
    out, retries = tmp_path / "io", []
    block_segments(out)
    handle = submit(pattern_latents(9, 96, 128), str(out), format="ffv1", shard_latents=3,
                    on_event=clear_segments_on_retry(out, retries), decoder={"name": "test-pattern"})
    result = handle.wait(timeout=300)
    assert retries and result.summary["retried_shards"] >= 1
    assert handle.progress() == (pixel_frames(9), pixel_frames(9))  # a handle's job has no bar
    assert [read_index(f) for f in _video(str(out), "ffv1")] == list(range(pixel_frames(9)))

    # Not transient: the same obstacle for every attempt ends the job after max_attempts,
    # with the worker's own error.
    out2 = tmp_path / "io2"
    block_segments(out2)
    retried = []
    with pytest.raises(OSError):
        submit(pattern_latents(3, 96, 128), str(out2), format="ffv1", max_attempts=2, workers=1,
               on_event=lambda kind, info: retried.append(info["shard"].index) if kind == "retry" else None,
               decoder={"name": "test-pattern"}).wait(timeout=300)
    assert retried == [0]  # one shard, two attempts, one retry between them

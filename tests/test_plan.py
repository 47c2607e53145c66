"""Shard planning and frame arithmetic: every frame belongs to exactly one shard."""

import pytest

from actors.protocol import frame_range, frames_to_drop, pixel_frames
from cluster.plan import plan_shards


def test_pixel_frames_follow_wan_temporal_compression():
    assert [pixel_frames(t) for t in (1, 2, 3, 41, 361)] == [1, 5, 9, 161, 1441]
    with pytest.raises(ValueError):
        pixel_frames(0)


def test_latent_ranges_cover_their_frames():
    assert frame_range(0, 1) == (0, 1)
    assert frame_range(1, 2) == (1, 5)  # latent i >= 1 covers frames 4i-3 .. 4i
    assert frame_range(0, 41) == (0, 161)
    assert frames_to_drop(0, 0) == 0
    assert frames_to_drop(2, 40) == pixel_frames(38)


@pytest.mark.parametrize("latents", [1, 2, 5, 41, 97, 361])
@pytest.mark.parametrize("workers", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("context", [1, 3, 38])
def test_shards_partition_latents_and_frames(latents, workers, context):
    plan = plan_shards(latents, workers, context)
    assert plan.shards[0].start == 0 and plan.shards[-1].stop == latents
    frames = []
    for a, b in zip(plan.shards, plan.shards[1:]):
        assert a.stop == b.start
    for s in plan.shards:
        assert s.context_start == max(0, s.start - context)
        # What the stream yields minus what is dropped is exactly what the shard owns.
        assert pixel_frames(s.decoded_latent_frames) - s.drop == s.frame_count
        frames.extend(range(*s.frames))
    assert frames == list(range(pixel_frames(latents)))
    assert len(plan.shards) <= workers


def test_balanced_plan_evens_out_decode_work():
    plan = plan_shards(361, 4, 38)
    work = [s.decoded_latent_frames for s in plan.shards]
    assert len(work) == 4 and max(work) - min(work) <= 1
    assert plan.overhead == pytest.approx(3 * 38 / 361)


def test_fixed_size_shards_and_overhead():
    plan = plan_shards(100, 4, 10, shard_latents=30)
    assert [(s.start, s.stop) for s in plan.shards] == [(0, 30), (30, 60), (60, 90), (90, 100)]
    assert plan.decoded_latent_frames == 100 + 30
    assert plan.overhead == pytest.approx(0.3)


def test_context_dominating_video_uses_fewer_shards():
    plan = plan_shards(20, 8, 38)
    assert len(plan.shards) < 8
    assert plan.overhead <= 38 * (len(plan.shards) - 1) / 20


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match="context"):
        plan_shards(10, 2, 0)
    with pytest.raises(ValueError):
        plan_shards(0, 2, 3)
    with pytest.raises(ValueError):
        plan_shards(10, 0, 3)


def test_pruned_context_cost_rebalances_shards_and_reports_compute_overhead():
    full = plan_shards(361, 4, 38)
    pruned = plan_shards(361, 4, 38, context_cost=6.5)
    # Same context in latents (exactness), far less work: later shards keep more frames.
    assert all(s.context in (0, 38) for s in pruned.shards)
    assert pruned.overhead == full.overhead
    assert full.compute_overhead == pytest.approx(full.overhead)
    assert pruned.compute_overhead == pytest.approx(3 * 6.5 / 361)
    kept = [s.latent_frames for s in pruned.shards]
    assert max(kept) - min(kept) <= 7  # vs 38 when context is paid in full
    work = [s.latent_frames + (6.5 if s.context else 0) for s in pruned.shards]
    assert max(work) - min(work) <= 1


def test_measured_context_cost_reads_context_time_off_the_shards():
    from benchmarks.bench_scaling import measured_context_cost

    # Shard 0 decodes 100 latents in 20 s (0.2 s each); the others pay 0.3 and 0.5 s of
    # context beside their kept latents: 1.5 and 2.5 latent frames' worth, 2.0 on average.
    shards = [{"start": 0, "stop": 100, "context": 0, "gpu_busy_s": 20.0},
              {"start": 100, "stop": 190, "context": 38, "gpu_busy_s": 18.3},
              {"start": 190, "stop": 280, "context": 38, "gpu_busy_s": 18.5}]
    assert abs(measured_context_cost(shards) - 2.0) < 1e-9
    assert measured_context_cost(shards[:1]) is None
    assert measured_context_cost(shards[1:]) is None

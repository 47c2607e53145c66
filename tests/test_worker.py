"""ShardWorker without Ray: a shard in, a committed segment and its record out."""

from __future__ import annotations

import os

import pytest

from actors.decoders import pattern_latents, read_index
from actors.protocol import (DecoderSpec, LatentSlice, RenderSpec, SegmentRecord, Shard, pixel_frames, shard_task,
                             sidecar_key)
from actors.sinks import read_frames
from actors.worker import ShardWorker

FPS = 16


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    return ShardWorker("cpu", scratch_dir=str(tmp_path_factory.mktemp("scratch")))


def _spec(out, **options) -> RenderSpec:
    return RenderSpec(output=str(out), decoder=DecoderSpec(name="test-pattern"), format="ffv1", fps=FPS, **options)


def test_a_shard_becomes_a_committed_segment_with_its_record(worker, tmp_path):
    latents = pattern_latents(9, 96, 128)
    shard = Shard(index=1, start=4, stop=9, context_start=2)
    task = shard_task(_spec(tmp_path), "job1", shard, attempt=2)
    record = worker.render_shard(task, LatentSlice.of(latents[:, shard.context_start:shard.stop]))

    first, end = shard.frames
    assert (record.shard, record.frames, record.attempt) == (shard, end - first, 2)
    path = os.path.join(tmp_path, record.key)
    assert os.path.getsize(path) == record.bytes
    # The segment holds exactly the frames the shard owns: context frames were dropped.
    assert [read_index(f) for f in read_frames(path, "ffv1")] == list(range(first, end))
    # The sidecar is the record, and reads back as one.
    with open(os.path.join(tmp_path, sidecar_key(record.key)), "rb") as f:
        assert SegmentRecord.from_json(f.read()) == record
    assert record.started <= record.pipeline_started <= record.pipeline_ended <= record.ended
    assert record.worker.device == "cpu" and record.report.frames == record.frames


def test_the_first_shard_has_no_context(worker, tmp_path):
    latents = pattern_latents(3, 96, 128)
    record = worker.render_shard(shard_task(_spec(tmp_path), "job2", Shard(0, 0, 3, 0)), latents)
    assert record.frames == pixel_frames(3)


def test_a_slice_of_the_wrong_length_is_refused_before_any_output(worker, tmp_path):
    latents = pattern_latents(4, 96, 128)
    with pytest.raises(ValueError, match="expected 5"):
        worker.render_shard(shard_task(_spec(tmp_path), "job3", Shard(1, 4, 9, 4)), latents)
    assert not os.path.exists(tmp_path / "segments")


@pytest.mark.parametrize("damage", [b"", b"{", b"[]", b'{"job_id": "x"}'])
def test_a_damaged_sidecar_is_not_a_record(damage):
    with pytest.raises(ValueError, match="not a segment record"):
        SegmentRecord.from_json(damage)

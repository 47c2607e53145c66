"""Start-up you can see: each worker's phases reach the job's timeline and summary."""

from __future__ import annotations

import importlib
import json
import os
import time

import pytest
import ray

from actors.decoders import pattern_latents
from actors.protocol import DecoderSpec, PipelineReport, SegmentRecord, Shard, WorkerInfo
from actors.startup import Phase, StartupClock, StartupReport, process_started_at
from actors.worker import ShardWorker
from cluster.api import render
from cluster.report import chrome_trace, startup_summary


def test_clock_records_phases_in_order_and_failures():
    clock = StartupClock()
    with clock.phase("weights", "wan2.1"):
        pass
    with pytest.raises(RuntimeError):
        with clock.phase("compile"):
            raise RuntimeError("inductor")
    assert [p.name for p in clock.phases] == ["weights", "compile (failed)"]
    assert clock.phases[0].detail == "wan2.1" and clock.phases[0].start <= clock.phases[0].end
    report = StartupReport(clock.phases, compile="eager-fallback", compile_error="inductor")
    assert StartupReport.from_dict(json.loads(json.dumps(report.as_dict()))) == report


def test_process_start_is_before_now():
    started = process_started_at()
    assert started is not None and started <= time.time()


def _meta(pid, started, phases, pipeline_started, reused=False):
    worker = WorkerInfo(device="cuda:0", device_name="gpu", device_memory=1 << 30, hostname="h", pid=pid,
                        gpu_ids=(str(pid),))
    return SegmentRecord(
        job_id="j", shard=Shard(pid, 0, 1, 0), key=f"k{pid}", frames=1, bytes=1, sha256="0", attempt=1, width=8,
        height=8, started=started, pipeline_started=pipeline_started, pipeline_ended=pipeline_started + 1,
        ended=pipeline_started + 2, worker=worker, reused=reused, startup=StartupReport(phases),
        report=PipelineReport(mode="async", gpu_busy_s=1.0, gpu_span_s=1.0, flush_s=0.1))


def test_summary_and_timeline_count_only_phases_inside_the_job():
    job = 1000.0
    cold = [Phase("process", 1001, 1003), Phase("imports", 1003, 1010), Phase("weights", 1010, 1012)]
    warm = [Phase("process", 900, 903), Phase("imports", 903, 910), Phase("first-step", 999, 1001)]
    metas = [_meta(1, 1012, cold, 1012.5), _meta(2, 1002, warm, 1002.5)]
    s = startup_summary(metas, job)
    assert s["time_to_first_frame_s"] == pytest.approx(2.5)
    phases = {k.split("pid ")[1]: v["phases_s"] for k, v in s["workers"].items()}
    assert phases["1)"] == {"process": 2.0, "imports": 7.0, "weights": 2.0}
    assert phases["2)"] == {"first-step": 1.0}  # clipped at the job's start; the rest was before it

    trace = json.loads(chrome_trace(metas, job, None, [Phase("read + validate input", 1000, 1000.5)]))
    names = [(e["pid"], e["tid"], e["name"]) for e in trace["traceEvents"] if e["ph"] == "X"]
    assert (-1, 0, "read + validate input") in names
    starts = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["tid"] == 0 and e["pid"] > 0]
    assert sorted(e["name"] for e in starts) == ["first-step", "imports", "process", "weights"]
    assert min(e["ts"] for e in starts) >= 0


def test_worker_without_ray_records_device_and_weights(tmp_path):
    worker = ShardWorker("cpu", scratch_dir=str(tmp_path))
    spec = DecoderSpec(name="test-pattern")
    info = worker.check_input(spec, 4, 4)
    names = [p["name"] for p in info["startup"]["phases"]]
    assert names == ["device", "weights"]
    worker.check_input(spec, 4, 4)  # prepared once per spec and size
    assert [p.name for p in worker.startup.phases] == names


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, object_store_memory=150 * 2**20)
    try:
        yield
    finally:
        ray.shutdown()


def test_job_timeline_shows_each_workers_startup_before_its_first_shard(local_ray, tmp_path):
    out = str(tmp_path / "job")
    latents = pattern_latents(9, 96, 128)
    t0 = time.time()
    result = render(latents, out, decoder={"name": "test-pattern"}, format="ffv1", workers=2, device="cuda",
                    progress=False)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert 0 < summary["time_to_first_frame_s"] < time.time() - t0
    workers = summary["startup"]["workers"]
    assert len(workers) == len({(r["hostname"], r["gpu_ids"]) for r in result.manifest})
    for w in workers.values():
        assert {"imports", "device", "weights"} <= set(w["phases_s"]) and w["compile"] == "off"

    trace = json.load(open(os.path.join(out, "timeline.json")))["traceEvents"]
    spans = [e for e in trace if e["ph"] == "X"]
    for pid in {e["pid"] for e in spans if e["pid"] > 0}:
        phases = {e["name"]: e for e in spans if e["pid"] == pid and e["tid"] == 0}
        first_shard = min(e["ts"] for e in spans if e["pid"] == pid and e["tid"] == 1)
        assert {"imports", "device", "weights"} <= set(phases)
        assert phases["imports"]["ts"] + phases["imports"]["dur"] <= phases["device"]["ts"] + 1e3
        assert all(p["ts"] + p["dur"] <= first_shard + 1e3 for p in phases.values())
    driver = {e["name"] for e in spans if e["pid"] == -1}
    assert {"read + validate input", "first worker ready"} <= driver


@pytest.mark.parametrize("name", ["bench_product", "bench_coldstart"])
def test_the_gpu_benchmarks_import_and_parse_their_options(name):
    # They run first on a lent GPU, where a broken import costs the session's device time.
    module = importlib.import_module(f"benchmarks.{name}")
    args = module.parse_args(["--size", "64x32", "--out", "x.json"])
    assert (args.width, args.height) == (64, 32)

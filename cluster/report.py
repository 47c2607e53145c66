"""What a job leaves beside its video: manifest rows, the summary, a Chrome-trace timeline.

Pure functions over the workers' segment records; the driver writes the results.
"""

from __future__ import annotations

import io
import json

from actors.protocol import SegmentRecord
from actors.startup import Phase, StartupReport

MANIFEST_COLUMNS = (
    "job_id", "shard", "start", "stop", "context_start", "context", "frame_start", "frame_end", "frames", "key",
    "bytes", "sha256", "attempts", "node_id", "hostname", "gpu_ids", "device_name", "started", "ended",
    "wall_s", "gpu_busy_s", "copy_s", "host_busy_s", "flush_s", "gpu_utilization", "bottleneck", "reused",
    "segment_kept",
)


def stage_label(stage: str, device: str) -> str:
    """The pipeline names its decode stage "gpu"; on a CPU worker that stage is the CPU decoding."""
    return "decode" if stage == "gpu" and not device.startswith("cuda") else stage


def busy_label(device: str) -> str:
    return "GPU busy" if device.startswith("cuda") else "decode busy"


def manifest_rows(records: list[SegmentRecord], segments_kept: bool = True) -> list[dict]:
    """One row a shard. `segment_kept` says whether `key` still names a segment in the output
    (the driver deletes them once the video is committed, unless asked to keep them)."""
    rows = []
    for m in sorted(records, key=lambda m: m.shard.index):
        r, w, shard = m.report, m.worker, m.shard
        rows.append({
            "job_id": m.job_id, "shard": shard.index, "start": shard.start, "stop": shard.stop, "context_start": shard.context_start,
            "context": shard.context, "frame_start": shard.frames[0], "frame_end": shard.frames[1],
            "frames": m.frames, "key": m.key, "bytes": m.bytes, "sha256": m.sha256, "attempts": m.attempt,
            "node_id": w.node_id, "hostname": w.hostname, "gpu_ids": ",".join(w.gpu_ids),
            "device_name": w.device_name, "started": m.started, "ended": m.ended,
            "wall_s": m.ended - m.started, "gpu_busy_s": r.gpu_busy_s, "copy_s": r.copy_s,
            "host_busy_s": r.host_busy_s, "flush_s": r.flush_s,
            "gpu_utilization": r.gpu_utilization, "bottleneck": stage_label(r.bottleneck, w.device),
            "reused": m.reused, "segment_kept": segments_kept,
        })
    return rows


def manifest_parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows) if rows else pa.table({c: [] for c in MANIFEST_COLUMNS})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def worker_startups(records: list[SegmentRecord]) -> dict[str, StartupReport]:
    """Each worker's start-up as its shards reported it, by timeline track (host, GPU, pid).

    A worker's later shards carry every phase its earlier ones did and more (a second
    decoder it prepared): the one with the most phases is kept.
    """
    startups: dict[str, StartupReport] = {}
    for m in records:
        if m.reused or m.startup is None:
            continue
        report = m.startup
        track = m.worker.track
        if track not in startups or len(report.phases) > len(startups[track].phases):
            startups[track] = report
    return startups


def startup_summary(records: list[SegmentRecord], job_started: float) -> dict:
    """What the job waited for before decoding: time to its first frame, and per worker the
    seconds of each start-up phase that fell inside the job (a warm worker's fall before it)."""
    fresh = [m for m in records if not m.reused]
    first = min((m.pipeline_started for m in fresh), default=None)
    workers = {}
    for track, report in worker_startups(fresh).items():
        phases: dict[str, float] = {}
        for p in report.phases:
            inside = max(0.0, p.end - max(p.start, job_started))
            if inside > 0:
                phases[p.name] = round(phases.get(p.name, 0.0) + inside, 3)
        workers[track] = {"phases_s": phases, "compile": report.compile, "compile_error": report.compile_error,
                          "compile_cache": report.compile_cache}
    return {
        # From the job's start to the first shard's first decode step: reading the input,
        # planning, every start-up phase of the first worker up.
        "time_to_first_frame_s": first - job_started if first is not None else None,
        "workers": workers,
    }


def summarize(records: list[SegmentRecord], *, frames: int, fps: int, wall_s: float, workers: int, use_gpu: bool,
              price_per_gpu_hour: float, plan_overhead: float, stitch: dict, extra: dict | None = None,
              job_started: float | None = None, driver_phases: list[Phase] = ()) -> dict:
    """The job's figures. Its time (`wall_seconds`) runs from `job_started`, the driver's first
    step of the job (reading its input), to its render written but for this summary, ready
    to publish. Before it, a driver process of its own (the CLI, `ray job submit`) started
    Python and imported framefarm: the "driver start" phase of `driver_phases`, reported
    as `startup.driver_start_s` and drawn before zero on the timeline, outside the job's
    time. After it: this summary's write, the publication (renames) and segment deletion."""
    fresh = [m for m in records if not m.reused]
    busy = sum(m.report.gpu_busy_s for m in fresh)
    in_shards = sum(m.report.gpu_span_s for m in fresh)
    worker_s = workers * wall_s
    billed = worker_s if use_gpu else 0.0
    video_s = frames / fps
    last_shard_end = max((m.ended for m in fresh), default=None)
    summary = {
        "frames": frames, "fps": fps, "video_seconds": video_s, "wall_seconds": wall_s,
        "realtime_factor": video_s / wall_s if wall_s > 0 else None,
        "workers": workers, "device": "gpu" if use_gpu else "cpu",
        "gpu_seconds": billed, "busy_seconds": busy,
        # Over the whole job's wall time and every worker, start-up included: what the GPUs
        # billed did (on CPU workers, what the decode did: "device" says which).
        # `gpu_utilization_in_shards` counts only the shards' decode spans.
        "gpu_utilization": busy / worker_s if worker_s > 0 and fresh else None,
        "gpu_utilization_in_shards": busy / in_shards if in_shards > 0 else None,
        "price_per_gpu_hour": price_per_gpu_hour,
        "estimated_cost_usd": billed / 3600 * price_per_gpu_hour,
        "context_overhead": plan_overhead, "shards": len(records),
        "reused_shards": len(records) - len(fresh),
        "retried_shards": sum(1 for m in fresh if m.attempt > 1),  # in this run, not a reused one's
        "last_shard_to_video_s": (stitch["committed_at"] - last_shard_end) if last_shard_end else None,
        "video": stitch["video"], "video_bytes": stitch["bytes"],
    }
    if job_started is not None:
        summary["started_at"] = job_started
        summary["startup"] = startup_summary(records, job_started)
        before = [p for p in driver_phases if p.start < job_started]
        summary["startup"]["driver_start_s"] = job_started - min(p.start for p in before) if before else None
        summary["startup"]["driver_phases_s"] = {p.name: round(p.seconds, 3) for p in driver_phases}
        summary["time_to_first_frame_s"] = summary["startup"]["time_to_first_frame_s"]
    summary.update(extra or {})
    return summary


def chrome_trace(records: list[SegmentRecord], job_started: float, stitch: dict | None = None,
                 driver_phases: list[Phase] = (), render: str | None = None, incidents: list[dict] = ()) -> bytes:
    """One track per worker device; its start-up phases (those inside the job) on thread 0,
    shards on 1 and their phases on 2, as complete ('X') events. The driver's track holds its
    phases and, as instant ('i') events, its incidents: stalls and backup copies, each a dict
    with "name", "at" (epoch seconds), "shard", "attempt" and any detail."""
    events = []
    tracks: dict[str, int] = {}
    for track, report in sorted(worker_startups(records).items(), key=lambda kv: kv[1].started or 0.0):
        pid = tracks.setdefault(track, len(tracks) + 1)
        for p in report.phases:
            if p.end <= job_started:
                continue  # a warm worker's start-up: the job did not wait for it
            t0 = max(p.start, job_started)
            events.append({"name": p.name, "ph": "X", "pid": pid, "tid": 0, "ts": (t0 - job_started) * 1e6,
                           "dur": (p.end - t0) * 1e6, "args": {"detail": p.detail} if p.detail else {}})
    for m in sorted(records, key=lambda m: m.started):
        if m.reused:
            continue
        track = m.worker.track
        pid = tracks.setdefault(track, len(tracks) + 1)

        def span(name, t0, t1, tid, args=None):
            events.append({"name": name, "ph": "X", "pid": pid, "tid": tid,
                           "ts": (t0 - job_started) * 1e6, "dur": max(0.0, t1 - t0) * 1e6,
                           "args": args or {}})

        r, shard = m.report, m.shard
        span(f"shard {shard.index} [{shard.start},{shard.stop}) ctx {shard.context}",
             m.started, m.ended, 1, {"frames": m.frames, "attempt": m.attempt,
                                     "gpu_utilization": r.gpu_utilization, "bottleneck": r.bottleneck})
        pipe_end = m.pipeline_ended - r.flush_s
        span("setup", m.started, m.pipeline_started, 2)
        span("decode+copy+encode", m.pipeline_started, pipe_end, 2,
             {"gpu_busy_s": r.gpu_busy_s, "copy_s": r.copy_s, "host_busy_s": r.host_busy_s,
              "step_ms": r.step_ms, "wait_for_buffer_s": r.wait_for_buffer_s, "buffer_waits": r.buffer_waits,
              "cores": r.cores, "torch_threads": r.torch_threads})
        span("encoder flush", pipe_end, m.pipeline_ended, 2)
        span("upload", m.pipeline_ended, m.ended, 2)
    meta_events = [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}}
                   for name, pid in tracks.items()]
    if driver_phases or incidents:
        meta_events.append({"name": "process_name", "ph": "M", "pid": -1, "args": {"name": "driver"}})
    events.extend({"name": p.name, "ph": "X", "pid": -1, "tid": 0, "ts": (p.start - job_started) * 1e6,
                   "dur": p.seconds * 1e6, "args": {"detail": p.detail} if p.detail else {}}
                  for p in driver_phases)
    events.extend({"name": f"{i['name']} shard {i['shard']}", "ph": "i", "s": "p", "pid": -1, "tid": 1,
                   "ts": (i["at"] - job_started) * 1e6, "args": {k: v for k, v in i.items() if k not in ("name", "at")}}
                  for i in incidents)
    if stitch is not None:
        meta_events.append({"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "stitcher"}})
        t = stitch["committed_at"]
        events.append({"name": "commit video", "ph": "X", "pid": 0, "tid": 1,
                       "ts": (t - stitch["commit_s"] - job_started) * 1e6, "dur": stitch["commit_s"] * 1e6,
                       "args": {}})
    return json.dumps({"traceEvents": meta_events + events, "displayTimeUnit": "ms",
                       "otherData": {"render": render}}).encode()

"""What a job leaves beside its video: manifest rows, the summary, a Chrome-trace timeline.

Pure functions over the workers' shard metadata; the driver writes the results.
"""

from __future__ import annotations

import io
import json

MANIFEST_COLUMNS = (
    "shard", "start", "stop", "context_start", "context", "frame_start", "frame_end", "frames", "key",
    "bytes", "sha256", "attempts", "node_id", "hostname", "gpu_ids", "device_name", "started", "ended",
    "wall_s", "gpu_busy_s", "copy_s", "host_busy_s", "flush_s", "gpu_utilization", "bottleneck", "reused",
)


def manifest_rows(metas: list[dict]) -> list[dict]:
    rows = []
    for m in sorted(metas, key=lambda m: m["shard"]):
        r = m["report"]
        rows.append({
            "shard": m["shard"], "start": m["start"], "stop": m["stop"], "context_start": m["context_start"],
            "context": m["start"] - m["context_start"], "frame_start": m["frame_start"],
            "frame_end": m["frame_end"], "frames": m["frames"], "key": m["key"], "bytes": m["bytes"],
            "sha256": m["sha256"], "attempts": m["attempt"], "node_id": m.get("node_id", ""),
            "hostname": m["hostname"], "gpu_ids": ",".join(m.get("gpu_ids", [])),
            "device_name": m["device_name"], "started": m["started"], "ended": m["ended"],
            "wall_s": m["ended"] - m["started"], "gpu_busy_s": r["gpu_busy_s"], "copy_s": r["copy_s"],
            "host_busy_s": r["host_busy_s"], "flush_s": r["flush_s"],
            "gpu_utilization": r["gpu_utilization"], "bottleneck": r["bottleneck"],
            "reused": bool(m.get("reused", False)),
        })
    return rows


def manifest_parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows) if rows else pa.table({c: [] for c in MANIFEST_COLUMNS})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def summarize(metas: list[dict], *, frames: int, fps: int, wall_s: float, workers: int, use_gpu: bool,
              price_per_gpu_hour: float, plan_overhead: float, stitch: dict, extra: dict | None = None) -> dict:
    fresh = [m for m in metas if not m.get("reused")]
    busy = sum(m["report"]["gpu_busy_s"] for m in fresh)
    billed = workers * wall_s if use_gpu else 0.0
    video_s = frames / fps
    last_shard_end = max((m["ended"] for m in fresh), default=None)
    summary = {
        "frames": frames, "fps": fps, "video_seconds": video_s, "wall_seconds": wall_s,
        "realtime_factor": video_s / wall_s if wall_s > 0 else None,
        "workers": workers, "device": "gpu" if use_gpu else "cpu",
        "gpu_seconds": billed, "busy_seconds": busy,
        "gpu_utilization": busy / billed if billed > 0 else None,
        "price_per_gpu_hour": price_per_gpu_hour,
        "estimated_cost_usd": billed / 3600 * price_per_gpu_hour,
        "context_overhead": plan_overhead, "shards": len(metas),
        "reused_shards": len(metas) - len(fresh),
        "retried_shards": sum(1 for m in fresh if m["attempt"] > 1),  # in this run, not a reused one's
        "last_shard_to_video_s": (stitch["committed_at"] - last_shard_end) if last_shard_end else None,
        "video": stitch["video"], "video_bytes": stitch["bytes"],
    }
    summary.update(extra or {})
    return summary


def chrome_trace(metas: list[dict], job_started: float, stitch: dict | None = None) -> bytes:
    """One track per worker device; shards and their phases as complete ('X') events."""
    events = []
    tracks: dict[str, int] = {}
    for m in sorted(metas, key=lambda m: m["started"]):
        if m.get("reused"):
            continue
        track = f"{m['hostname']} gpu {','.join(m.get('gpu_ids', [])) or m['device']} (pid {m['pid']})"
        pid = tracks.setdefault(track, len(tracks) + 1)

        def span(name, t0, t1, tid, args=None):
            events.append({"name": name, "ph": "X", "pid": pid, "tid": tid,
                           "ts": (t0 - job_started) * 1e6, "dur": max(0.0, t1 - t0) * 1e6,
                           "args": args or {}})

        r = m["report"]
        span(f"shard {m['shard']} [{m['start']},{m['stop']}) ctx {m['start'] - m['context_start']}",
             m["started"], m["ended"], 1, {"frames": m["frames"], "attempt": m["attempt"],
                                            "gpu_utilization": r["gpu_utilization"],
                                            "bottleneck": r["bottleneck"]})
        pipe_end = m["pipeline_ended"] - m["flush_s"]
        span("setup", m["started"], m["pipeline_started"], 2)
        span("decode+copy+encode", m["pipeline_started"], pipe_end, 2,
             {"gpu_busy_s": r["gpu_busy_s"], "copy_s": r["copy_s"], "host_busy_s": r["host_busy_s"]})
        span("encoder flush", pipe_end, m["pipeline_ended"], 2)
        span("upload", m["pipeline_ended"], m["ended"], 2)
    meta_events = [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}}
                   for name, pid in tracks.items()]
    if stitch is not None:
        meta_events.append({"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "stitcher"}})
        t = stitch["committed_at"]
        events.append({"name": "commit video", "ph": "X", "pid": 0, "tid": 1,
                       "ts": (t - stitch["commit_s"] - job_started) * 1e6, "dur": stitch["commit_s"] * 1e6,
                       "args": {}})
    return json.dumps({"traceEvents": meta_events + events, "displayTimeUnit": "ms"}).encode()

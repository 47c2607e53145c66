"""Multi-GPU benchmark: one long video rendered on 1, 2, 4... GPUs of this machine through Ray.

    python -m benchmarks.bench_scaling [--gpus 1,2,4] [--latent-frames 361] [--size 1280x720] [--out scaling.json]

Each GPU count gets its own `Farm` (one DecodeWorker a GPU), warmed up by a short job so
model loading and cuDNN's algorithm search stay out of the timings; then the video is
rendered with exact context. Decode throughput counts context frames (the work the GPUs
did); the end-to-end speed-up counts the video. "ctx cost" is what a shard's context cost in
GPU time, in latent frames' worth (`measured_context_cost`). Prints a table and writes JSON.
"""

from __future__ import annotations

import os
import tempfile
import time

import ray
import torch

from benchmarks.common import machine, parser, write_json
from cluster.api import Farm


def parse_args(argv=None):
    p = parser("bench_scaling", __doc__, "scaling.json")
    p.add_argument("--gpus", default="1,2,4")
    p.add_argument("--latent-frames", type=int, default=361)
    p.add_argument("--size", default="1280x720")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--format", default="mp4")
    p.add_argument("--context", default="exact", help="latent frames of left context per shard, or exact")
    p.add_argument("--context-mode", default="pruned", choices=["pruned", "full"])
    p.add_argument("--encoder-threads", type=int, default=0)
    return p.parse_args(argv)


def measured_context_cost(shards: list[dict]) -> float | None:
    """What a shard's left context cost in GPU time, in latent frames' worth: each context
    shard's GPU-busy seconds less its kept latents at the rate of the shards without
    context (shard 0), over that rate. The mean over context shards; None without both kinds.
    """
    plain = [s for s in shards if s["context"] == 0]
    ctx = [s for s in shards if s["context"] > 0]
    if not plain or not ctx:
        return None
    rate = sum(s["gpu_busy_s"] for s in plain) / sum(s["stop"] - s["start"] for s in plain)
    return sum((s["gpu_busy_s"] - (s["stop"] - s["start"]) * rate) / rate for s in ctx) / len(ctx)


def main(argv=None) -> int:
    args = parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    counts = [int(n) for n in args.gpus.split(",")]
    ray.init(address="local", num_gpus=max(counts), include_dashboard=False)
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(16, args.latent_frames, height // 8, width // 8, generator=g)
    decoder = {"name": "wan2.1", "random_weights": True, "dtype": args.dtype}
    options = dict(decoder=decoder, format=args.format, context=args.context, context_mode=args.context_mode,
                   encoder_threads=args.encoder_threads, progress=False)
    root = tempfile.mkdtemp(prefix="ffscale-")
    rows = []
    for n in counts:
        with Farm(workers=n, device="cuda") as farm:
            # One single-latent shard per worker: every worker loads its model and tunes cuDNN.
            farm.render(latents[:, :n], os.path.join(root, f"warm{n}"), shard_latents=1, **options)
            t = time.perf_counter()
            result = farm.render(latents, os.path.join(root, f"gpus{n}"), **options)
            wall = time.perf_counter() - t
        s = result.summary
        decoded = s["decoded_latent_frames"]
        rows.append({"gpus": n, "wall_s": wall, "job_wall_s": s["wall_seconds"], "frames": s["frames"],
                     "decoded_latent_frames": decoded, "context_overhead": s["context_overhead"],
                     "context_compute_overhead": s["context_compute_overhead"],
                     "decode_throughput": decoded / wall, "video_latents_per_s": args.latent_frames / wall,
                     "last_shard_to_video_s": s["last_shard_to_video_s"], "gpu_utilization": s["gpu_utilization"],
                     "shards": [{k: r[k] for k in ("shard", "start", "stop", "context", "wall_s", "gpu_busy_s",
                                                   "gpu_utilization", "bottleneck", "flush_s")}
                                for r in result.manifest]})
        print(f"{n} GPU: {wall:.1f} s, {decoded} latent frames decoded ({100 * s['context_overhead']:.1f}% context, "
              f"{100 * s['context_compute_overhead']:.1f}% of the work), "
              f"last shard -> video {s['last_shard_to_video_s']:.2f} s", flush=True)
    for r in rows:
        r["context_cost_measured"] = measured_context_cost(r["shards"])
    base = rows[0]
    for r in rows:
        r["throughput_vs_linear"] = r["decode_throughput"] / (base["decode_throughput"] * r["gpus"] / base["gpus"])
        r["speedup"] = base["wall_s"] / r["wall_s"]
    ray.shutdown()
    print(f"\n{card}, {args.size}, {args.latent_frames} latent frames ({rows[0]['frames']} frames), {args.dtype}, "
          f"{args.format}, context {args.context} ({args.context_mode})")
    print(f"{'GPUs':>5}{'wall s':>9}{'decoded':>9}{'context':>9}{'ctx work':>9}{'lat/s':>8}{'vs linear':>11}"
          f"{'speed-up':>10}{'tail s':>8}{'GPU util':>10}{'ctx cost':>10}")
    for r in rows:
        util = r["gpu_utilization"]
        print(f"{r['gpus']:>5}{r['wall_s']:>9.1f}{r['decoded_latent_frames']:>9}{100 * r['context_overhead']:>8.1f}%"
              f"{100 * r['context_compute_overhead']:>8.1f}%"
              f"{r['decode_throughput']:>8.2f}{100 * r['throughput_vs_linear']:>10.1f}%{r['speedup']:>10.2f}"
              f"{r['last_shard_to_video_s']:>8.2f}{(100 * util if util else 0):>9.1f}%"
              + (f"{r['context_cost_measured']:>10.2f}" if r["context_cost_measured"] is not None else f"{'-':>10}"))
    write_json(args.json, {"card": card, "machine": machine(), "args": vars(args), "runs": rows})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

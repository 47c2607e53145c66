"""The product's shard against the old diffusers-module decoder, side by side in one process.

    python -m benchmarks.bench_product [--size 1280x720] [--latent-frames 81] [--dtype bf16]
                                       [--device cuda] [--runs 2] [--out bench_product.json]
                                       [--compile-cache DIR|off] [--skip-old]

Issue 9's first "done when": `jobs.render ... --decoder wan2.1 --random-weights --dtype bf16
--device cuda`, 720p, 81 latent frames on one GPU, must decode its shard at least 2.2x faster
than the path it replaced. Both paths, with the same random weights (the real Wan 2.1 VAE
architecture, seed 0) and the same latents (seed 0):

  product  `ShardWorker.render_shard` exactly as a job's worker runs it: one shard of all
           the latents, MP4 (libx264, veryfast, crf 18), the async pipeline; its decoder and
           options are the product's defaults for the device. The worker is prepared first
           (weights, compile or compile cache, first steps: start-up, reported apart).
  old      diffusers' AutoencoderKLWan decoder streamed per latent frame with its cache
           (benchmarks/diffusers_stream.py, what `WanDecoder` did) through the same pipeline
           and the same sink settings.

Each path renders --runs times; per run: the pipeline's wall time (decode + copy + encode,
overlapped, the shard's decode time), the GPU's busy time inside it (CUDA events), the
bottleneck stage. The ratio is old over product, of the last run (warm: cuDNN autotuned,
CUDA graphs captured) and of the first. The output videos are compared frame count for frame
count. Prints a table last; writes JSON (rewritten after each path).
"""

from __future__ import annotations

import os
import platform
import tempfile
import time

import torch

from actors.pipeline import run_pipeline
from actors.protocol import DecodeSpec, DecoderSpec, EncodeSpec, Shard, ShardTask
from actors.sinks import open_sink
from actors.wan import wan21_config
from actors.wan_diffusers import decoder_vae
from actors.wan_weights import random_decoder_weights
from actors.worker import ShardWorker
from benchmarks.common import parser, write_json
from benchmarks.diffusers_stream import DiffusersStream

SPATIAL = 8  # Wan 2.1: pixels per latent pixel


def parse_args(argv=None):
    p = parser("bench_product", __doc__, "bench_product.json")
    p.add_argument("--size", default="1280x720", help="WIDTHxHEIGHT in pixels (multiples of 8)")
    p.add_argument("--latent-frames", type=int, default=81)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="the decoder's compile option (auto: compiled on CUDA, eager elsewhere)")
    p.add_argument("--compile-cache", default=None,
                   help="compile cache folder for the product worker (default: a fresh temporary one); off: none")
    p.add_argument("--skip-old", action="store_true", help="only the product path")
    args = p.parse_args(argv)
    args.width, args.height = (int(v) for v in args.size.lower().split("x"))
    if args.width % SPATIAL or args.height % SPATIAL:
        p.error("--size must be a multiple of 8 on both sides")
    if args.latent_frames < 2 or args.runs < 1:
        p.error("--latent-frames must be >= 2 and --runs >= 1")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _row(path: str, run: int, wall: float, report: dict, frames: int, video_bytes: int) -> dict:
    return {"path": path, "run": run, "pipeline_s": wall, "gpu_busy_s": report["gpu_busy_s"],
            "gpu_utilization": report["gpu_utilization"], "bottleneck": report["bottleneck"],
            "frames": frames, "bytes": video_bytes, "peak_gpu_bytes": report.get("peak_gpu_bytes", 0),
            # The whole report: where a pipeline's wall time beyond the GPU's went (the sink's
            # flush, waits for buffers, the host's idle time) shows only there.
            "report": report}


def product(args, latents: torch.Tensor, workdir: str, cache: str | None) -> dict:
    spec = DecoderSpec(name="wan2.1", random_weights=True, dtype=args.dtype, seed=0, compile=args.compile)
    t0 = time.time()
    worker = ShardWorker(args.device, scratch_dir=os.path.join(workdir, "scratch"))
    info = worker.check_input(spec, latents.shape[2], latents.shape[3], "libx264", compile_cache=cache)
    startup = {"seconds": time.time() - t0, **info["startup"]}
    decoder = worker.decoder(spec)
    runs = []
    t = latents.shape[1]
    for i in range(args.runs):
        task = ShardTask(job_id="bench-product", shard=Shard(0, 0, t, 0), output_uri=workdir,
                         segment_key=f"product-{i}.mp4",
                         decode=DecodeSpec(spec, context_mode="pruned", ring_depth=2,
                                           compile_cache=cache),
                         encode=EncodeSpec(format="mp4", fps=16, encoder="libx264", crf=18, preset="veryfast",
                                           threads=0))
        record = worker.render_shard(task, latents)
        runs.append(_row("product", i, record.pipeline_ended - record.pipeline_started, record.report.as_dict(),
                         record.frames, record.bytes))
        runs[-1]["shard_s"] = record.ended - record.started
    out = {"decoder": repr(decoder), "startup": startup, "runs": runs}
    del worker, decoder
    _free(torch.device(args.device))
    return out


def old_path(args, latents: torch.Tensor, workdir: str, device: torch.device) -> dict:
    t0 = time.time()
    # The product's --random-weights (seed 0) in diffusers' modules: the same weights on both paths.
    config = wan21_config()
    ref = DiffusersStream(decoder_vae(config, random_decoder_weights(config, seed=0)), device=device,
                          dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype])
    build_s = time.time() - t0
    on_device = latents.to(device)
    _sync(device)
    runs = []
    for i in range(args.runs):
        path = os.path.join(workdir, f"old-{i}.mp4")
        sink = open_sink("mp4", path, args.width, args.height, 16, encoder="libx264", crf=18, preset="veryfast",
                         threads=0)
        t = time.perf_counter()
        report, result = run_pipeline(ref.stream(on_device), sink, depth=2, device=device)
        wall = time.perf_counter() - t
        runs.append(_row("old", i, wall, report.as_dict(), result.frames, result.bytes))
    del ref, on_device
    _free(device)
    return {"decoder": "diffusers AutoencoderKLWan decoder, streamed (benchmarks/diffusers_stream.py)",
            "build_s": build_s, "runs": runs}


def machine(device: torch.device) -> dict:
    m = {"host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        m["gpu"] = torch.cuda.get_device_name(device)
    return m


def _save(results: dict, path: str) -> None:
    write_json(path, results)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda on a machine without CUDA")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(16, args.latent_frames, args.height // SPATIAL, args.width // SPATIAL, generator=g)
    cache = args.compile_cache
    if cache is None:
        # Not beside --out: the compiled code is megabytes nobody needs back from the GPU machine.
        cache = tempfile.mkdtemp(prefix="bench-product-compile-cache-")
    elif cache.lower() == "off":
        cache = None
    results = {"benchmark": "bench_product", "machine": machine(device), "args": vars(args),
               "latents": list(latents.shape)}
    with tempfile.TemporaryDirectory(prefix="bench-product-") as workdir:
        results["product"] = product(args, latents, workdir, cache)
        _save(results, args.json)
        if not args.skip_old:
            results["old"] = old_path(args, latents, workdir, device)
            new, old = results["product"]["runs"], results["old"]["runs"]
            results["ratio_old_over_product"] = {
                "pipeline_last": old[-1]["pipeline_s"] / new[-1]["pipeline_s"],
                "pipeline_first": old[0]["pipeline_s"] / new[0]["pipeline_s"],
                "gpu_busy_last": old[-1]["gpu_busy_s"] / new[-1]["gpu_busy_s"] if new[-1]["gpu_busy_s"] else None,
                "target": 2.2,
            }
            results["same_frame_count"] = old[-1]["frames"] == new[-1]["frames"]
        _save(results, args.json)

    print(f"\n{results['machine'].get('gpu', 'cpu')}, {args.width}x{args.height}, {args.latent_frames} latent frames, "
          f"{args.dtype}; product start-up {results['product']['startup']['seconds']:.1f} s "
          f"(compile: {results['product']['startup']['compile']})")
    print(f"{'path':8} {'run':>3} {'pipeline s':>11} {'GPU busy s':>11} {'GPU util':>9} {'bottleneck':>11} {'frames':>7}")
    for r in results["product"]["runs"] + results.get("old", {}).get("runs", []):
        print(f"{r['path']:8} {r['run']:>3} {r['pipeline_s']:>11.2f} {r['gpu_busy_s']:>11.2f} "
              f"{100 * r['gpu_utilization']:>8.0f}% {r['bottleneck']:>11} {r['frames']:>7}")
    if "ratio_old_over_product" in results:
        ratio = results["ratio_old_over_product"]
        print(f"old / product, pipeline: {ratio['pipeline_last']:.2f}x (last run), {ratio['pipeline_first']:.2f}x "
              f"(first); GPU busy: {ratio['gpu_busy_last'] or float('nan'):.2f}x; target >= 2.2x")
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Render latents to a finished video on the Ray cluster (or an embedded local Ray).

    python -m jobs.render LATENTS OUTPUT [--weights DIR|s3://...] [--random-weights] ...
    python -m jobs.render --demo [OUTPUT]
    ray job submit --working-dir . -- python -m jobs.render s3://b/latents.safetensors s3://b/out ...

Exits non-zero with the reason on stderr when anything fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from pydantic import ValidationError

from cluster.latents import InputError

DEMO_OUTPUT = "framefarm-demo"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.render", description=__doc__.split("\n\n")[0])
    p.add_argument("latents", nargs="?", help="latents file (.safetensors, .npy, .pt): path or s3:// URI")
    p.add_argument("output", nargs="?", help="output folder: path or s3://bucket/prefix")
    p.add_argument("--demo", action="store_true",
                   help="render synthetic latents with the test-pattern decoder (no download); "
                        f"OUTPUT defaults to ./{DEMO_OUTPUT}")
    p.add_argument("--decoder", default=None, choices=["wan2.1", "wan2.2-ti2v", "test-pattern"],
                   help="default: wan2.1, or test-pattern with --demo")
    p.add_argument("--weights", help="diffusers-format VAE folder (config.json + safetensors): path or s3://")
    p.add_argument("--random-weights", action="store_true", help="the real architecture, random weights")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--overlap", default="exact", help="'exact' (the receptive field) or N latent frames")
    p.add_argument("--context-mode", default="pruned", choices=["pruned", "full"],
                   help="decode context latents only through the stages that need them (same frames)")
    p.add_argument("--workers", type=int, help="decode workers (default: one per GPU, 2 on CPU)")
    p.add_argument("--shard-frames", type=int, help="kept latent frames per shard (default: one shard a worker)")
    p.add_argument("--format", default="mp4", choices=["mp4", "ffv1", "png"])
    p.add_argument("--fps", type=int, default=None, help="default: the model's native rate (16; 24 for wan2.2-ti2v)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--encoder", default="auto", choices=["auto", "libx264", "h264_nvenc"])
    p.add_argument("--crf", type=int, default=18)
    p.add_argument("--preset", default="veryfast")
    p.add_argument("--encoder-threads", type=int, default=0, help="0: the encoder picks by core count")
    p.add_argument("--pipeline", default="async", choices=["async", "sync"])
    p.add_argument("--depth", type=int, default=2, help="pinned host buffers in the pipeline's ring")
    p.add_argument("--max-attempts", type=int, default=3)
    p.add_argument("--keep-segments", action="store_true",
                   help="keep OUTPUT/segments/ after the video is committed (default: delete them)")
    p.add_argument("--price-per-gpu-hour", type=float, default=3.36)
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, a running local cluster, "
                                     "or a new embedded one)")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for workers")
    p.add_argument("--demo-frames", type=int, default=41, help="latent frames of the demo")
    args = p.parse_args(argv)
    if args.demo:
        if args.output is None:
            args.output = args.latents or DEMO_OUTPUT
            args.latents = None
    elif not (args.latents and args.output):
        p.error("LATENTS and OUTPUT are required (or --demo)")
    return args


def spec_from_args(args: argparse.Namespace):
    from jobs.spec import RenderSpec

    decoder = {"name": args.decoder or ("test-pattern" if args.demo else "wan2.1"), "dtype": args.dtype,
               "weights": args.weights, "random_weights": args.random_weights}
    return RenderSpec(
        latents=args.latents, output=args.output, decoder=decoder, overlap=args.overlap, context_mode=args.context_mode, workers=args.workers,
        shard_frames=args.shard_frames, format=args.format, fps=args.fps, device=args.device,
        encoder=args.encoder, crf=args.crf, preset=args.preset, encoder_threads=args.encoder_threads,
        pipeline=args.pipeline, depth=args.depth, max_attempts=args.max_attempts, keep_segments=args.keep_segments,
        price_per_gpu_hour=args.price_per_gpu_hour)


def demo_latents(latent_frames: int):
    from actors.decoders import pattern_latents

    return pattern_latents(latent_frames, height=240, width=320)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        spec = spec_from_args(args)
    except ValidationError as exc:
        print(f"framefarm: bad options:\n{exc}", file=sys.stderr)
        return 2
    from cluster.api import connect
    from cluster.driver import RenderJob

    latents = demo_latents(args.demo_frames) if args.demo else None
    job = RenderJob(spec, latents, progress=True, startup_timeout_s=args.startup_timeout)
    try:
        job.prepare()  # bad input fails here, before Ray is started or joined
        started = connect(args.address)
        try:
            result = job.run()
        finally:
            if started:
                import ray

                ray.shutdown()
    except (InputError, ValueError, FileNotFoundError) as exc:
        print(f"framefarm: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a job's failure is reported, not dumped
        logging.getLogger("framefarm").debug("job failed", exc_info=True)
        print(f"framefarm: job failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    s = result.summary
    print(json.dumps({k: s[k] for k in ("frames", "video_seconds", "wall_seconds", "realtime_factor",
                                        "gpu_utilization", "estimated_cost_usd", "shards")}, indent=2))
    where = os.path.abspath(spec.output) if "://" not in spec.output else spec.output
    print(f"framefarm: wrote {where.rstrip('/')}/{s['video']} ({s['frames']} frames, "
          f"{s['video_seconds']:.1f} s at {spec.fps} fps) with manifest.parquet, summary.json, timeline.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

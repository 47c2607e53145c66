"""Single-GPU benchmark: diffusers' decode + encode against framefarm's pipeline, side by side.

    python -m benchmarks.bench [--out results.json] [--sizes 1280x720,832x480] [--dtypes fp32,bf16]

Variants, each on the same random-weight Wan 2.1 VAE and the same latents:
  (a) diffusers: `vae.decode()` of the whole video, then libx264 of every frame, one thread
  (b) framefarm, synchronous pipeline (decode a chunk, blocking copy, encode, repeat)
  (c) framefarm, asynchronous pipeline (compute stream, copy stream, pinned ring, host thread)
  (d) framefarm's streaming decode alone: no copy, no encode (the floor for this decoder)
and (c) again at --long-frames latent frames, to show peak memory does not grow with length.
Prints a table and writes every number as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch

from actors.colour import to_uint8_frames
from actors.pipeline import run_pipeline
from actors.sinks import open_sink

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench.json")
    p.add_argument("--sizes", default="1280x720,832x480")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--latent-frames", type=int, default=41)
    p.add_argument("--long-frames", type=int, default=161)
    p.add_argument("--variants", default="a,b,c,d", help="subset of a,b,c,d")
    p.add_argument("--crf", type=int, default=18)
    p.add_argument("--preset", default="veryfast")
    p.add_argument("--encoder-threads", type=int, default=0, help="0: libx264 picks by core count")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--device", default="cuda")
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def variant_a(vae, latents, decoder, device, dtype, path, args) -> dict:
    """What users do today: diffusers' decode of everything, then encode in the same thread."""
    _reset_peak(device)
    t0 = time.perf_counter()
    z = latents.to(device, dtype)
    # WanPipeline's un-normalization, in the VAE's dtype.
    z = decoder.unnormalize(z)
    cuda = device.type == "cuda"
    if cuda:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
    with torch.no_grad():
        video = vae.decode(z.unsqueeze(0)).sample[0]
        frames = to_uint8_frames(video)
    if cuda:
        end.record()
    host = frames.cpu()
    t1 = time.perf_counter()
    sink = open_sink("mp4", path, host.shape[2], host.shape[1], 16, encoder="libx264", crf=args.crf,
                     preset=args.preset, threads=args.encoder_threads)
    for i in range(0, host.shape[0], 4):
        sink.write(host[i:i + 4].numpy())
    t2 = time.perf_counter()
    result = sink.close()
    t3 = time.perf_counter()
    _sync(device)
    gpu = begin.elapsed_time(end) / 1e3 if cuda else t1 - t0
    return {"wall_s": t3 - t0, "gpu_busy_s": gpu, "gpu_utilization": gpu / (t3 - t0), "decode_s": t1 - t0,
            "encode_s": t2 - t1, "flush_s": t3 - t2, "frames": result.frames, "bytes": result.bytes,
            "peak_gpu_bytes": _peak(device)}


def variant_pipeline(decoder, latents, device, path, depth, args, ring=None) -> dict:
    _reset_peak(device)
    t0 = time.perf_counter()
    z = latents.to(device)
    sink = open_sink("mp4", path, latents.shape[3] * 8, latents.shape[2] * 8, 16, encoder="libx264",
                     crf=args.crf, preset=args.preset, threads=args.encoder_threads)
    report, result = run_pipeline(decoder.stream(z), sink, depth=depth, device=device, ring=ring)
    wall = time.perf_counter() - t0
    d = report.as_dict()
    d.update(wall_s=wall, bytes=result.bytes, peak_gpu_bytes=_peak(device))
    return d


def variant_d(decoder, latents, device) -> dict:
    """The streaming decode alone, with the uint8 conversion, no copy, no encode."""
    _reset_peak(device)
    t0 = time.perf_counter()
    z = latents.to(device)
    frames = 0
    for chunk in decoder.stream(z):
        frames += to_uint8_frames(chunk).shape[0]
    _sync(device)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "frames": frames, "peak_gpu_bytes": _peak(device)}


def run(args) -> dict:
    from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan

    from actors.wan import WanDecoder

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    variants = set(args.variants.split(","))
    results = {"card": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(),
               "encoder": {"codec": "libx264", "crf": args.crf, "preset": args.preset,
                           "threads": args.encoder_threads}, "depth": args.depth, "runs": []}
    tmp = tempfile.mkdtemp(prefix="ffbench-")
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        torch.manual_seed(0)
        vae = AutoencoderKLWan().eval().requires_grad_(False)  # the real Wan 2.1 VAE architecture
        decoder = WanDecoder.from_vae(vae, device=device, dtype=dtype)  # the device's default options
        vae.to(device, dtype)
        for size in args.sizes.split(","):
            width, height = (int(v) for v in size.split("x"))
            g = torch.Generator().manual_seed(1)
            latents = torch.randn(16, args.latent_frames, height // 8, width // 8, generator=g)
            # Warm-up: cuDNN picks its algorithms for these shapes once, outside the timings.
            variant_d(decoder, latents[:, :3], device)
            if "a" in variants:
                with torch.no_grad():
                    vae.decode((latents[:, :2].to(device, dtype)).unsqueeze(0))
            row = {"dtype": dtype_name, "size": size, "latent_frames": args.latent_frames}
            out = os.path.join(tmp, f"{dtype_name}-{size}")
            if "a" in variants:
                row["a"] = variant_a(vae, latents, decoder, device, dtype, out + "-a.mp4", args)
            if "b" in variants:
                row["b"] = variant_pipeline(decoder, latents, device, out + "-b.mp4", 0, args)
            if "c" in variants:
                # A worker keeps its pinned ring across shards: warm it as the decoder is warmed.
                ring = []
                variant_pipeline(decoder, latents[:, :3], device, out + "-warm.mp4", args.depth, args, ring)
                row["c"] = variant_pipeline(decoder, latents, device, out + "-c.mp4", args.depth, args, ring)
            if "d" in variants:
                row["d"] = variant_d(decoder, latents, device)
            if "c" in row and "d" in row:
                row["c_over_d"] = row["c"]["wall_s"] / row["d"]["wall_s"]
            if "a" in row and "c" in row:
                row["c_speedup_over_a"] = row["a"]["wall_s"] / row["c"]["wall_s"]
            results["runs"].append(row)
            _print_row(row)
            _save(results, args.out)
            if args.long_frames and "c" in variants and size == args.sizes.split(",")[0]:
                long = torch.randn(16, args.long_frames, height // 8, width // 8, generator=g)
                c_long = variant_pipeline(decoder, long, device, out + "-long.mp4", args.depth, args, ring)
                results["runs"].append({"dtype": dtype_name, "size": size, "latent_frames": args.long_frames,
                                        "c": c_long,
                                        "peak_ratio_long_over_short": c_long["peak_gpu_bytes"]
                                        / max(1, row["c"]["peak_gpu_bytes"])})
                print(f"  (c) at {args.long_frames} latent frames: {c_long['wall_s']:.2f} s, peak "
                      f"{c_long['peak_gpu_bytes'] / 2**30:.2f} GiB vs {row['c']['peak_gpu_bytes'] / 2**30:.2f} GiB "
                      f"at {args.latent_frames}", flush=True)
        del vae, decoder
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _save(results, path):
    """After every row, so a run cut short by a time limit keeps what it measured."""
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


def _print_row(row):
    print(f"\n{row['dtype']} {row['size']} x {row['latent_frames']} latent frames", flush=True)
    print(f"  {'variant':<34}{'wall s':>8}{'GPU util':>10}{'peak GiB':>10}{'flush s':>9}{'bottleneck':>12}")
    names = {"a": "(a) diffusers decode + encode", "b": "(b) framefarm sync", "c": "(c) framefarm async",
             "d": "(d) streaming decode alone"}
    for k in "abcd":
        if k in row:
            r = row[k]
            util = r.get("gpu_utilization")
            print(f"  {names[k]:<34}{r['wall_s']:>8.2f}{(f'{100 * util:.1f}%' if util else '-'):>10}"
                  f"{r['peak_gpu_bytes'] / 2**30:>10.2f}{r.get('flush_s', 0):>9.2f}{r.get('bottleneck', '-'):>12}")
    if "c_over_d" in row:
        print(f"  (c)/(d) = {row['c_over_d']:.3f}", end="")
    if "c_speedup_over_a" in row:
        print(f"   (a)/(c) = {row['c_speedup_over_a']:.3f}", end="")
    print(flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    _save(results, args.out)
    print(f"\nwrote {args.out}" + (f" ({results['card']})" if results["card"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Single-GPU benchmark: diffusers' decode + encode against framefarm's pipeline, side by side.

    taskset -c 0-7 python -m benchmarks.bench [--size 1280x720] [--latent-frames 41] [--runs 3]
                                              [--json bench.json]

On the same random-weight Wan 2.1 VAE and the same latents, --runs times in a row:
  (a) diffusers in fp32: `vae.decode()` of the whole video, then libx264 of every frame
  (c) framefarm in bf16 through the frame pipeline: the product's decoder (its device
      defaults), compute and copy streams, pinned ring, host thread, the mp4 sink as a
      worker opens it (frame-parallel libx264 parts chosen from the cores this process has)
  (d) framefarm's decode alone in bf16: the same steps and colour conversion, no copy, no
      encode: the floor that (c) can reach
and per run (a)/(c) (issue 9: >= 3.0) and (c)/(d) (issue 9: <= 1.03 on 8 cores, `taskset -c
0-7`, every run). libx264 veryfast crf 18 throughout. Prints a table per run and a verdict,
and writes every number as JSON (--json).
"""

from __future__ import annotations

import os
import resource
import tempfile

import torch

from actors.colour import to_uint8_frames
from actors.pipeline import run_pipeline
from actors.sinks import available_cores, open_sink, plan_parts
from benchmarks.common import (machine, parse_list, parse_size, parser, peak_bytes, print_table, reset_peak,
                               stopwatch, sync, write_json)

A_OVER_C_TARGET = 3.0
C_OVER_D_TARGET = 1.03


def parse_args(argv=None):
    p = parser("bench", __doc__, "bench.json")
    p.add_argument("--size", type=parse_size, default=(1280, 720), help="WIDTHxHEIGHT (default: 1280x720)")
    p.add_argument("--latent-frames", type=int, default=41, help="default: 41 (161 frames)")
    p.add_argument("--runs", type=int, default=3, help="runs in a row (default: 3)")
    p.add_argument("--variants", type=parse_list, default=["a", "c", "c1", "d"],
                   help="subset of a,c,c1,d (default: all); c1 is (c) with parts=1: libx264 called from the pipeline's host thread")
    p.add_argument("--parts", default="auto",
                   help="the mp4 sink's parts for (c): auto (as a worker chooses), or a count; 1: one encoder; "
                        "a +plain suffix (auto+plain) encodes the last part without its low-latency options")
    p.add_argument("--crf", type=int, default=18)
    p.add_argument("--preset", default="veryfast")
    p.add_argument("--depth", type=int, default=2, help="the pipeline's ring of host buffers (default: 2)")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    if not set(args.variants) <= {"a", "c", "c1", "d"}:
        p.error("--variants is a subset of a,c,c1,d")
    planned = args.parts.removesuffix("+plain")
    if planned != "auto" and not (planned.isdigit() and int(planned) >= 1):
        p.error("--parts is 'auto' or a count >= 1")
    if args.runs < 1 or args.latent_frames < 1:
        p.error("--runs and --latent-frames must be >= 1")
    return args


def _mp4(path: str, width: int, height: int, frames: int, args, parts: str = "1"):
    planned = parts.removesuffix("+plain")
    return open_sink("mp4", path, width, height, 16, encoder="libx264", crf=args.crf, preset=args.preset,
                     threads=0, frames=frames, parts=None if planned == "auto" else int(planned),
                     low_latency_tail=not parts.endswith("+plain"))


def variant_a(vae, latents: torch.Tensor, device: torch.device, path: str, args) -> dict:
    """What users do today: diffusers' decode of everything in fp32, then encode the frames."""
    reset_peak(device)
    mean = torch.tensor(vae.config.latents_mean, device=device).view(-1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std, device=device).view(-1, 1, 1, 1)
    with stopwatch() as total:
        with stopwatch(device) as decode:
            z = latents.to(device) / inv_std + mean  # WanPipeline's un-normalization
            with torch.no_grad():
                host = to_uint8_frames(vae.decode(z.unsqueeze(0)).sample[0]).cpu()
        with stopwatch() as encode:
            sink = _mp4(path, host.shape[2], host.shape[1], host.shape[0], args)
            for i in range(0, host.shape[0], 4):
                sink.write(host[i:i + 4].numpy())
            result = sink.close()
    return {"wall_s": total["s"], "decode_s": decode["s"], "encode_s": encode["s"], "frames": result.frames,
            "bytes": result.bytes, "peak_gpu_bytes": peak_bytes(device)}


def variant_c(decoder, latents: torch.Tensor, device: torch.device, path: str, args, ring: list,
              parts: str | None = None) -> dict:
    """The product's path: the frame pipeline into the sink a worker would open.

    `parts`: the sink's, overriding --parts ("1" for variant c1). cpu_s is this process's CPU
    time over the run, every thread: against wall_s x cores it says whether the host's cores
    were all busy (the encoders' work exceeding them) or the host merely lagged.
    """
    reset_peak(device)
    frames = 1 + 4 * (latents.shape[1] - 1)
    cpu0 = _cpu_s()
    with stopwatch() as total:
        z = latents.to(device)
        sink = _mp4(path, latents.shape[3] * decoder.spatial_scale, latents.shape[2] * decoder.spatial_scale,
                    frames, args, parts or args.parts)
        report, result = run_pipeline(decoder.stream(z), sink, depth=args.depth, device=device, ring=ring)
    cpu = _cpu_s() - cpu0
    d = report.as_dict()
    d.update(wall_s=total["s"], bytes=result.bytes, frames=result.frames, peak_gpu_bytes=peak_bytes(device),
             parts=len(getattr(sink, "sizes", [frames])), cpu_s=cpu,
             cores_busy=cpu / total["s"], cores=available_cores())
    return d


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def variant_d(decoder, latents: torch.Tensor, device: torch.device) -> dict:
    """The streaming decode alone, with the uint8 conversion: no copy, no encode."""
    reset_peak(device)
    frames = 0
    with stopwatch(device) as total:
        for chunk in decoder.stream(latents.to(device)):
            frames += to_uint8_frames(chunk).shape[0]
    return {"wall_s": total["s"], "frames": frames, "peak_gpu_bytes": peak_bytes(device)}


def main(argv=None) -> int:
    from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan

    from actors.wan import WanDecoder

    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    width, height = args.size
    frames = 1 + 4 * (args.latent_frames - 1)
    results = {"machine": machine(device), "size": f"{width}x{height}", "latent_frames": args.latent_frames,
               "frames": frames, "encoder": {"codec": "libx264", "crf": args.crf, "preset": args.preset},
               "parts": args.parts, "auto_plan": plan_parts(frames, width, height, available_cores())[0],
               "depth": args.depth, "targets": {"a_over_c": A_OVER_C_TARGET, "c_over_d": C_OVER_D_TARGET},
               "runs": []}
    torch.manual_seed(0)
    vae = AutoencoderKLWan().eval().requires_grad_(False)  # the real Wan 2.1 VAE architecture, fp32
    decoder = WanDecoder.from_vae(vae, device=device, dtype=torch.bfloat16)  # the device's default options
    vae.to(device)
    print(f"{results['machine']['device_name']}, {results['machine']['cores']} cores; {decoder!r}", flush=True)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(16, args.latent_frames, height // 8, width // 8, generator=g)
    tmp = tempfile.mkdtemp(prefix="ffbench-")
    # Warm-up, outside every timing: cuDNN's algorithm choice, compiling and graph capture for
    # these shapes, the pinned ring (a worker keeps it across shards), diffusers' first call.
    ring: list = []
    with stopwatch(device) as warm:
        variant_d(decoder, latents[:, :4], device)
        variant_c(decoder, latents[:, :4], device, os.path.join(tmp, "warm.mp4"), args, ring)
        if "a" in args.variants:
            with torch.no_grad():
                vae.decode(latents[:, :2].to(device).unsqueeze(0))
    results["warmup_s"] = warm["s"]
    for run in range(1, args.runs + 1):
        row = {"run": run}
        if "a" in args.variants:
            row["a"] = variant_a(vae, latents, device, os.path.join(tmp, f"a{run}.mp4"), args)
        if "c" in args.variants:
            row["c"] = variant_c(decoder, latents, device, os.path.join(tmp, f"c{run}.mp4"), args, ring)
        if "c1" in args.variants:
            row["c1"] = variant_c(decoder, latents, device, os.path.join(tmp, f"c1-{run}.mp4"), args, ring, "1")
        if "d" in args.variants:
            row["d"] = variant_d(decoder, latents, device)
        if "a" in row and "c" in row:
            row["a_over_c"] = row["a"]["wall_s"] / row["c"]["wall_s"]
        if "c" in row and "d" in row:
            row["c_over_d"] = row["c"]["wall_s"] / row["d"]["wall_s"]
        if "c" in row and "c1" in row:
            row["c_bytes_over_one_encoder"] = row["c"]["bytes"] / row["c1"]["bytes"]
        for k in ("c", "c1"):
            if k in row:
                os.remove(os.path.join(tmp, f"c{run}.mp4" if k == "c" else f"c1-{run}.mp4"))
        results["runs"].append(row)
        write_json(args.json, results)
        _print_run(row, args, width, height)
    sync(device)
    verdict = _verdict(results["runs"])
    results["verdict"] = verdict
    write_json(args.json, results)
    print(verdict["line"])
    print(f"wrote {args.json}")
    return 0


def _print_run(row: dict, args, width: int, height: int) -> None:
    print(f"\nrun {row['run']}: {width}x{height} x {args.latent_frames} latent frames", flush=True)
    names = {"a": "(a) diffusers fp32 decode + encode", "c": "(c) framefarm bf16 pipeline",
             "c1": "(c), encoder in the host thread", "d": "(d) framefarm bf16 decode alone"}
    table = []
    for k in ("a", "c", "c1", "d"):
        if k in row:
            r = row[k]
            table.append({"variant": names[k], "wall_s": r["wall_s"], "util": r.get("gpu_utilization"),
                          "peak": r["peak_gpu_bytes"] / 2**30, "bottleneck": r.get("bottleneck"),
                          "flush": r.get("flush_s"), "cores_busy": r.get("cores_busy"),
                          "parts": r.get("parts"), "bytes": r.get("bytes")})
    print_table(table, [("variant", "variant", ""), ("wall_s", "wall s", ".2f"), ("util", "GPU busy", ".1%"),
                        ("peak", "peak GiB", ".2f"), ("bottleneck", "bottleneck", ""),
                        ("flush", "after last frame s", ".2f"), ("cores_busy", "CPU cores busy", ".1f"),
                        ("parts", "parts", "d"), ("bytes", "bytes", "d")])
    if "c_bytes_over_one_encoder" in row:
        print(f"  (c) bytes / one encoder's: {row['c_bytes_over_one_encoder']:.4f}")
    ratios = []
    if "a_over_c" in row:
        ratios.append(f"(a)/(c) = {row['a_over_c']:.3f} (target >= {A_OVER_C_TARGET})")
    if "c_over_d" in row:
        ratios.append(f"(c)/(d) = {row['c_over_d']:.3f} (target <= {C_OVER_D_TARGET})")
    if ratios:
        print("  " + "   ".join(ratios), flush=True)


def _verdict(runs: list[dict]) -> dict:
    c_over_d = [r["c_over_d"] for r in runs if "c_over_d" in r]
    a_over_c = [r["a_over_c"] for r in runs if "a_over_c" in r]
    v = {"c_over_d": c_over_d, "a_over_c": a_over_c,
         "c_over_d_every_run": bool(c_over_d) and max(c_over_d) <= C_OVER_D_TARGET,
         "a_over_c_every_run": bool(a_over_c) and min(a_over_c) >= A_OVER_C_TARGET}
    parts = []
    if c_over_d:
        parts.append(f"(c)/(d) {', '.join(f'{x:.3f}' for x in c_over_d)}: "
                     f"{'holds' if v['c_over_d_every_run'] else 'misses'} <= {C_OVER_D_TARGET} every run")
    if a_over_c:
        parts.append(f"(a)/(c) {', '.join(f'{x:.2f}' for x in a_over_c)}: "
                     f"{'holds' if v['a_over_c_every_run'] else 'misses'} >= {A_OVER_C_TARGET} every run")
    v["line"] = "\n" + "; ".join(parts)
    return v


if __name__ == "__main__":
    raise SystemExit(main())

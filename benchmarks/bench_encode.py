"""The mp4 sink's host side alone (CPU only): one libx264 encoder against frame-parallel parts.

    python -m benchmarks.bench_encode [--size 1280x720] [--frames 161] [--parts auto,auto+plain,1]
                                      [--fps-in R] [--repeat 3] [--json bench_encode.json]

Writes --frames frames of --size (I420, as the frame pipeline hands them over, 4 at a time)
into the mp4 sink, libx264 veryfast crf 18, in two ways:

  offline  every frame at once, as fast as the encoders take them: frames/s of the host
  paced    frames offered at --fps-in, as a decoder makes them (default: the fast decoder's
           47 frames/s of 720p on an H200 scaled to this process's cores against the 8 of a
           g7e.2xlarge, so that decoder rate over encoder capacity is the GPU machine's);
           reported as the time to the committed segment over the time the frames took to
           arrive, which is what (c)/(d) of benchmarks.bench measures on a GPU

for each --parts value: 1 is one encoder with libx264's own threads (the sink before
frame-parallel encoding), auto is what the sink chooses here (actors/sinks.py plan_parts),
N forces N parts; a "+plain" suffix (auto+plain) encodes the last part like the others, as
before its low-latency options (actors/sinks.py TAIL_X264_PARAMS): "after last frame" is
what those options cut. Bytes are compared with the one-encoder segment, and frames per CPU
second (all threads) says how much encoder work each way costs, which a machine shared
with other work still measures where wall times do not. The frames are the test
pattern on moving gradients with grain, so that the encoder has texture and motion to code.
"""

from __future__ import annotations

import os
import resource
import statistics
import tempfile
import threading
import time

import numpy as np
import torch

from actors.colour import to_yuv420_frames
from actors.decoders import draw_index_frame
from actors.sinks import available_cores, open_sink, plan_parts
from benchmarks.common import machine, parse_list, parse_size, parser, print_table, write_json

DECODER_FPS_720P_H200 = 47.0  # DESIGN.md, the fast decoder
G7E_CORES = 8


def parse_args(argv=None):
    p = parser("bench_encode", __doc__, "bench_encode.json")
    p.add_argument("--size", type=parse_size, default=(1280, 720), help="WIDTHxHEIGHT (default: 1280x720)")
    p.add_argument("--frames", type=int, default=161, help="frames in the segment (default: 161, 41 latents)")
    p.add_argument("--parts", type=lambda s: parse_list(s, str), default=["auto", "auto+plain", "1"],
                   help="comma-separated: auto, or a part count (1: one encoder), +plain for no "
                        "low-latency last part; default: auto,auto+plain,1")
    p.add_argument("--fps-in", type=float, default=None, help="paced arrival rate (default: see above)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each; medians are reported (default: 3)")
    p.add_argument("--modes", type=lambda s: parse_list(s, str), default=["offline", "paced"],
                   help="offline, paced or both (default: offline,paced)")
    p.add_argument("--crf", type=int, default=18)
    p.add_argument("--preset", default="veryfast")
    args = p.parse_args(argv)
    for v in args.parts:
        v = v.removesuffix("+plain")
        if v != "auto" and not (v.isdigit() and int(v) >= 1):
            p.error(f"--parts takes 'auto' or counts >= 1, got {v!r}")
    if args.frames < 1 or args.repeat < 1:
        p.error("--frames and --repeat must be >= 1")
    if args.fps_in is None:
        args.fps_in = DECODER_FPS_720P_H200 * available_cores() / G7E_CORES
    return args


def test_frames(count: int, width: int, height: int) -> np.ndarray:
    """I420 frames [F, H*3/2, W]: the index pattern over moving gradients, with grain."""
    g = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    out = []
    for start in range(0, count, 4):
        chunk = []
        for i in range(start, min(start + 4, count)):
            pattern = draw_index_frame(i, height, width, float(np.sin(i)), "cpu")
            phase = i / 24
            wave = torch.stack([torch.sin(6 * x + phase), torch.cos(4 * y - phase), torch.sin(3 * (x + y) + 2 * phase)])
            grain = torch.randn(3, height, width, generator=g) * 0.05
            chunk.append((0.5 * pattern + 0.4 * wave + grain).clamp(-1, 1))
        out.append(to_yuv420_frames(torch.stack(chunk, dim=1)).numpy())
    return np.concatenate(out)


def encode(frames: np.ndarray, path: str, parts: str, args, fps_in: float | None) -> dict:
    """One segment through the sink; `fps_in` paces the frames (None: as fast as taken)."""
    count, height = frames.shape[0], frames.shape[1] * 2 // 3
    width = frames.shape[2]
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    planned = parts.removesuffix("+plain")
    sink = open_sink("mp4", path, width, height, 16, encoder="libx264", crf=args.crf, preset=args.preset,
                     threads=0, frames=count, parts=None if planned == "auto" else int(planned),
                     low_latency_tail=not parts.endswith("+plain"))
    arrived = threading.Event()
    for i in range(0, count, 4):
        if fps_in is not None:
            # The decoder's clock: chunk i is ready (i + 4) / fps_in after the start.
            arrived.wait(max(0.0, t0 + (i + 4) / fps_in - time.perf_counter()))
        sink.write(frames[i:i + 4])
    last_frame = time.perf_counter()
    result = sink.close()
    wall = time.perf_counter() - t0
    cpu = _cpu_s() - cpu0
    os.remove(path)
    arrival = count / fps_in if fps_in else None
    return {"wall_s": wall, "tail_s": wall - (last_frame - t0), "fps": count / wall, "bytes": result.bytes,
            "cpu_s": cpu, "frames_per_cpu_s": count / cpu,
            "over_arrival": wall / arrival if arrival else None, "parts": len(getattr(sink, "sizes", [count]))}


def _cpu_s() -> float:
    """CPU seconds of this process, every thread: the encoders' work, whatever else runs here."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv=None) -> int:
    args = parse_args(argv)
    width, height = args.size
    frames = test_frames(args.frames, width, height)
    cores = available_cores()
    sizes, threads = plan_parts(args.frames, width, height, cores)
    results = {"machine": machine("cpu"), "size": f"{width}x{height}", "frames": args.frames,
               "fps_in": args.fps_in, "crf": args.crf, "preset": args.preset,
               "auto_plan": {"sizes": sizes, "threads_per_part": threads}, "rows": []}
    print(f"{width}x{height} x {args.frames} frames, {cores} cores; auto: {len(sizes)} parts {sizes}, "
          f"{threads} x264 threads per part; paced at {args.fps_in:.1f} frames/s\n", flush=True)
    tmp = tempfile.mkdtemp(prefix="ffenc-")
    for mode, fps_in in [m for m in (("offline", None), ("paced", args.fps_in)) if m[0] in args.modes]:
        # Interleaved, so that other work on the machine weighs on every way alike.
        by_parts = {parts: [] for parts in args.parts}
        for r in range(args.repeat):
            for parts in args.parts:
                by_parts[parts].append(encode(frames, os.path.join(tmp, f"{mode}-{parts}-{r}.mp4"), parts, args,
                                              fps_in))
        for parts, runs in by_parts.items():
            row = {"mode": mode, "parts": parts, "runs": runs, "part_count": runs[0]["parts"]}
            for key in ("wall_s", "tail_s", "fps", "cpu_s", "frames_per_cpu_s", "bytes", "over_arrival"):
                values = [r[key] for r in runs if r[key] is not None]
                row[key] = statistics.median(values) if values else None
            row["bytes"] = int(row["bytes"])
            results["rows"].append(row)
            write_json(args.json, results)
    for mode in args.modes:
        rows = [r for r in results["rows"] if r["mode"] == mode]
        one = next((r for r in rows if r["parts"] == "1"), None)
        for r in rows:
            r["bytes_over_one"] = r["bytes"] / one["bytes"] if one else None
        print(mode)
        print_table(rows, [("parts", "parts", ""), ("part_count", "count", "d"), ("fps", "frames/s", ".1f"),
                           ("frames_per_cpu_s", "frames/CPU s", ".1f"),
                           ("wall_s", "wall s", ".2f"), ("tail_s", "after last frame s", ".2f"),
                           ("over_arrival", "wall/arrival", ".3f"), ("bytes", "bytes", "d"),
                           ("bytes_over_one", "bytes/one", ".4f")])
        print()
    write_json(args.json, results)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The stitcher's tail: from the last shard landing to the committed video (CPU only).

    python -m benchmarks.bench_stitch [--segments 4] [--frames 360] [--size 1280x720]
                                [--verify-threads 1,4] [--repeat 3] [--out bench_stitch.json]

A balanced plan makes every shard finish at about the same time, so the stitcher meets all
segments at once, after the GPUs are done: whatever it then does is the job's tail (1.2 s
on one H200 and 1.5 s on four for a 90 s 720p video, docs/benchmarks.md). This writes
--segments libx264 segments of --frames noisy frames each (about the size random-weight
Wan frames encode to), hands them all to the stitcher at once, and times until the video
is committed, for:

  serial        what the stitcher did before: for each segment in turn, sha256, count its
                frames, read its timestamps, copy its packets
  stitcher/N   Stitcher: verification on arrival in N threads (hash and timestamp
                pass side by side), one appender thread joining in order

Prints a table and writes JSON. Results depend on the cores and the disk cache, so compare
rows of one run.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from actors.stitcher import Stitcher
from actors.segments import Segment
from actors.sinks import count_frames, open_sink
from actors.concat import StreamingConcat
from benchmarks.common import machine, parser, write_json
from infra.checksum import sha256_file


def parse_args(argv=None):
    p = parser("bench_stitch", __doc__, "bench_stitch.json")
    p.add_argument("--segments", type=int, default=4)
    p.add_argument("--frames", type=int, default=360, help="frames per segment")
    p.add_argument("--size", default="1280x720")
    p.add_argument("--verify-threads", default="1,4")
    p.add_argument("--repeat", type=int, default=3, help="runs per variant; the median is reported")
    p.add_argument("--dir", default=None, help="where to write segments and videos (default: a temp dir)")
    args = p.parse_args(argv)
    try:
        args.width, args.height = (int(v) for v in args.size.lower().split("x"))
        args.threads = [int(n) for n in args.verify_threads.split(",")]
    except ValueError:
        p.error("--size is WIDTHxHEIGHT and --verify-threads integers, comma-separated")
    if min(args.segments, args.frames, args.repeat, *args.threads) < 1:
        p.error("--segments, --frames, --repeat and --verify-threads must be >= 1")
    return args


def write_segments(root: str, count: int, frames: int, width: int, height: int) -> list[dict]:
    """Segments under ROOT/segments/ and the metadata their workers would report."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    metas = []
    for s in range(count):
        key = f"segments/{s:05d}.mp4"
        path = os.path.join(root, key)
        sink = open_sink("mp4", path, width, height, 16, encoder="libx264", preset="ultrafast", crf=18, threads=0)
        for i in range(frames):
            sink.write(np.roll(base, 7 * (s * frames + i), axis=1)[None])
        sink.close()
        metas.append({"index": s, "key": key, "bytes": os.path.getsize(path), "sha256": sha256_file(path),
                      "frames": frames})
    return metas


def serial(root: str, metas: list[dict]) -> float:
    t = time.perf_counter()
    concat = StreamingConcat("mp4", os.path.join(root, "serial.mp4"), 16)
    for m in metas:
        path = os.path.join(root, m["key"])
        if os.path.getsize(path) != m["bytes"] or sha256_file(path) != m["sha256"]:
            raise RuntimeError(f"{path} changed")
        if count_frames(path, "mp4") != m["frames"]:
            raise RuntimeError(f"{path} frame count")
        concat.append(path, m["frames"])
    concat.close()
    return time.perf_counter() - t


def stitched(root: str, metas: list[dict], threads: int) -> float:
    t = time.perf_counter()
    stitcher = Stitcher(root, "mp4", 16, len(metas), verify_threads=threads)
    for m in metas:
        stitcher.add(Segment(**m))
    stitcher.finish()
    return time.perf_counter() - t


def main(argv=None) -> int:
    args = parse_args(argv)
    root = args.dir or tempfile.mkdtemp(prefix="ffstitch-")
    made = args.dir is None
    try:
        t = time.perf_counter()
        metas = write_segments(root, args.segments, args.frames, args.width, args.height)
        total_mb = sum(m["bytes"] for m in metas) / 1e6
        print(f"{args.segments} segments, {total_mb:.0f} MB, written in {time.perf_counter() - t:.1f} s", flush=True)
        variants = [("serial", lambda: serial(root, metas))]
        variants += [(f"stitcher/{n}", lambda n=n: stitched(root, metas, n)) for n in args.threads]
        rows = []
        for name, run in variants:
            run()  # warm: every segment in the page cache, as a just-written one is
            times = [run() for _ in range(args.repeat)]
            rows.append({"variant": name, "median_s": statistics.median(times), "runs_s": times})
            print(f"{name}: {', '.join(f'{x:.3f}' for x in times)} s", flush=True)
    finally:
        if made:
            shutil.rmtree(root, ignore_errors=True)
    base = rows[0]["median_s"]
    print(f"\n{args.segments} x {args.frames} frames at {args.size} ({total_mb:.0f} MB), "
          f"{os.cpu_count()} cores: all segments land at once, time to the committed video")
    print(f"{'variant':<14}{'median s':>10}{'vs serial':>11}{'MB/s':>8}")
    for r in rows:
        print(f"{r['variant']:<14}{r['median_s']:>10.3f}{base / r['median_s']:>10.2f}x{total_mb / r['median_s']:>8.0f}")
    write_json(args.json, {"args": dict(vars(args)), "megabytes": total_mb, "machine": machine(), "rows": rows})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

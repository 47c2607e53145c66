"""A job's start-up on the driver: what stands between submitting and the shards decoding.

    python -m benchmarks.bench_startup [--latent-frames 361] [--size 1280x720] [--shards 4]
                                 [--repeat 3] [--out bench_startup.json]

Every job validates its latents, fingerprints them (the key of resumable segments) and
hands each shard its slice through Ray's object store, all before or between dispatches,
so on a balanced plan all of it adds to the wall time. For the latents of a 90 s 720p video
(361 latent frames, 333 MB) this times, side by side in one process, each step as the
driver did it before and as it does now:

  finite check   isfinite(x).all()                  one fp32 sum (exact count only if not finite)
  fingerprint    sha256 of a bytes copy              sha256 of 16 MiB chunk digests, in threads, no copy
  slice transport ray.put(tensor) + get in a task    ray.put(LatentSlice) + get (numpy, zero-copy)

for --shards slices of a balanced plan with the Wan receptive field as context. Prints a
table and writes JSON; medians of --repeat runs.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time

import ray
import torch

from actors.protocol import LatentSlice
from benchmarks.common import machine, parser, write_json
from cluster.driver import latents_digest
from cluster.latents import validate_latents
from cluster.plan import plan_shards

CONTEXT = 38


def parse_args(argv=None):
    p = parser("bench_startup", __doc__, "bench_startup.json")
    p.add_argument("--latent-frames", type=int, default=361)
    p.add_argument("--size", default="1280x720")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    args.width, args.height = (int(v) for v in args.size.lower().split("x"))
    if min(args.latent_frames, args.shards, args.repeat) < 1:
        p.error("--latent-frames, --shards and --repeat must be >= 1")
    return args


def finite_before(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def digest_before(x: torch.Tensor) -> str:
    t = x.detach().to("cpu").contiguous()
    h = hashlib.sha256(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@ray.remote(num_cpus=0)
def _receive(payload) -> int:
    t = payload.tensor() if isinstance(payload, LatentSlice) else payload
    return t.shape[1]


def transport(slices: list[torch.Tensor], wrap) -> float:
    t = time.perf_counter()
    refs = [ray.put(wrap(s)) for s in slices]
    ray.get([_receive.remote(r) for r in refs])
    del refs
    return time.perf_counter() - t


def timed(fn, repeat: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, args.latent_frames, args.height // 8, args.width // 8, generator=g)
    plan = plan_shards(args.latent_frames, args.shards, CONTEXT)
    slices = [x[:, s.context_start:s.stop] for s in plan.shards]
    mb = x.numel() * x.element_size() / 1e6
    slice_mb = sum(s.numel() * s.element_size() for s in slices) / 1e6
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=int(max(2e9, 3 * slice_mb * 1e6)))
    try:
        rows = [
            ("finite check", timed(lambda: finite_before(x), args.repeat),
             timed(lambda: validate_latents(x, 16), args.repeat)),
            ("fingerprint", timed(lambda: digest_before(x), args.repeat), timed(lambda: latents_digest(x), args.repeat)),
            (f"{len(slices)} slices to workers", timed(lambda: transport(slices, lambda s: s.contiguous()), args.repeat),
             timed(lambda: transport(slices, LatentSlice.of), args.repeat)),
        ]
    finally:
        ray.shutdown()
    total_before, total_now = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"\nlatents {tuple(x.shape)} ({mb:.0f} MB), {len(slices)} shards ({slice_mb:.0f} MB with context), "
          f"{os.cpu_count()} cores, median of {args.repeat}")
    print(f"{'step':<22}{'before s':>10}{'now s':>9}{'x':>7}")
    for name, before, now in rows + [("total", total_before, total_now)]:
        print(f"{name:<22}{before:>10.3f}{now:>9.3f}{before / now:>7.1f}")
    write_json(args.json, {"args": dict(vars(args)), "megabytes": mb, "slice_megabytes": slice_mb,
                           "machine": machine(),
                           "rows": [{"step": n, "before_s": b, "now_s": a} for n, b, a in rows]})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

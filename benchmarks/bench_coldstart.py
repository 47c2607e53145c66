"""A cold GPU worker, from the Ray actor's creation to its first decode step, with and without
a compile cache.

    python -m benchmarks.bench_coldstart [--size 1280x720] [--dtype bf16] [--device cuda]
                                         [--runs no-cache,cache,cache] [--cache-dir DIR]
                                         [--decoder wan2.1] [--out bench_coldstart.json]

Issue 9's "done when": a cold worker that finds the compile cache starts its first decode
step within 10 s of the actor's creation; the cold start without the cache beside it. Each
run creates a fresh `DecodeWorker` actor (a new process: nothing imported, no CUDA context,
no compiled code in memory) on a local Ray, asks it to prepare the job's decoder at the job's
frame size exactly as a job's first worker does (`check_input`: weights, compile cache,
first steps, compile and CUDA graph capture), and reads its start-up phases. Runs:

  no-cache  an empty compile cache folder: the worker compiles, then saves the cache there
  cache     the folder the last no-cache run filled: the worker loads compiled code
  cache-inline  the same, with the compiler's modules imported when first needed instead of
            on a background thread over CUDA's start and the weights (the worker's default):
            whether that overlap pays, on this host
  off       no compile cache at all

Before the runs, one throwaway actor starts and stops, so that every run finds the files
(torch, CUDA libraries) in the OS page cache: "cold" here is the process, not the disk (its
time is reported too). Between runs the benchmark waits until the killed actor's GPU is
free again, so that no run waits for the one before.

Times from the actor's creation on the driver (same host, same clock): to the start of its
first decode step, to that step's end, and to ready (compiled, captured, steady). The
first step is the worker's warm-up step (zeros at the job's size); a job's first real step
starts after ready, since its shard waits for `check_input` (weights, compile warm-up)
before it decodes. Per run, the breakdown in seconds: process start, imports, device (CUDA
context), weights, the compiler's import on its background thread (and how long the main
thread then waited for it), compile-cache load, first step, the compiled warm-up (`compile`:
the first steady step, where dynamo traces every region and inductor's code is loaded or
compiled; `compiled-steps`; `graph-capture`: the CUDA graph's capture), cache save. Before
2026-12-02 `compile` covered all three.

What a production node sees: its Python packages' bytecode compiled (pip compiles .pyc at
install; `bytecode` in the JSON says, per package, whether its .pyc files were there when
this benchmark started: benchmarks/gpu_session.sh compiles an unpacked site folder first),
and its files in the page cache after the first worker (the warm-up actor above).

Prints a table; writes JSON after every run.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import sys
import tempfile
import time

# Before anything below imports a package (and writes its missing .pyc files): the packages
# a worker imports, whether their bytecode was compiled when this process started.
BYTECODE_PACKAGES = ("torch", "ray", "av", "safetensors", "pydantic", "numpy", "actors")


def bytecode_state(packages=BYTECODE_PACKAGES) -> dict:
    """Per package: True if its __init__'s .pyc exists (compiled at install or by an earlier
    import), False if not, None if it is not installed; with where it lives."""
    out = {"dont_write_bytecode": sys.flags.dont_write_bytecode or bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))}
    for name in packages:
        spec = importlib.util.find_spec(name)
        origin = getattr(spec, "origin", None)
        if spec is None or not origin or not origin.endswith(".py"):
            out[name] = None
            continue
        out[name] = {"pyc": os.path.exists(importlib.util.cache_from_source(origin)),
                     "path": os.path.dirname(origin)}
    return out


BYTECODE = bytecode_state()

import ray  # noqa: E402
import torch  # noqa: E402

from actors.ray_actors import decode_worker_class  # noqa: E402
from actors.protocol import DecoderSpec  # noqa: E402
from actors.startup import COMPILER_MODULES  # noqa: E402
from actors.worker import COMPILER_IMPORT_ENV  # noqa: E402
from benchmarks.common import parser, write_json  # noqa: E402

RUNS = ("no-cache", "cache", "cache-inline", "off")
# The breakdown's columns: start-up phases by name, in the order a worker runs them.
BREAKDOWN = ("process", "imports", "device", "weights", "compiler-import", "compiler-import-wait",
             "compile-cache-load", "first-step", "compile", "compiled-steps", "graph-capture", "warm-up",
             "compile-cache-save")


def parse_args(argv=None):
    p = parser("bench_coldstart", __doc__, "bench_coldstart.json")
    p.add_argument("--size", default="1280x720", help="WIDTHxHEIGHT in pixels")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--decoder", default="wan2.1", choices=["wan2.1", "wan2.2-ti2v", "test-pattern"])
    p.add_argument("--runs", default="no-cache,cache,cache", help="comma-separated, of " + ",".join(RUNS))
    p.add_argument("--cache-dir", default=None, help="compile cache root (default: a temporary folder)")
    p.add_argument("--no-prewarm", action="store_true", help="skip the page-cache warm-up actor")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="the decoder's compile option (auto: compiled on CUDA, eager elsewhere)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per run")
    args = p.parse_args(argv)
    args.width, args.height = (int(v) for v in args.size.lower().split("x"))
    args.run_list = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = set(args.run_list) - set(RUNS)
    if bad or not args.run_list:
        p.error(f"--runs: unknown {sorted(bad)}; use {RUNS}")
    return args


def _wait_gpus_free(total: float, timeout_s: float = 60.0) -> float:
    """Seconds until Ray sees every GPU free again (a killed actor's resources come back late)."""
    t0 = time.time()
    while ray.available_resources().get("GPU", 0) < total:
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"the GPUs were not free within {timeout_s:.0f} s of the last actor's end")
        time.sleep(0.1)  # a benchmark's poll of Ray's resource view; nothing to wait on instead
    return time.time() - t0


def one_run(cls, label: str, device: str, spec: DecoderSpec, latent_h: int, latent_w: int,
            cache: str | None, timeout_s: float) -> dict:
    # Every run through the same kind of runtime env, so that only the variable differs.
    mode = "inline" if label.endswith("-inline") else "background"
    created = time.time()
    actor = cls.options(runtime_env={"env_vars": {COMPILER_IMPORT_ENV: mode}}).remote(device)
    try:
        info = ray.get(actor.check_input.remote(spec, latent_h, latent_w, None, cache), timeout=timeout_s)
        ready_seen = time.time()
        described = ray.get(actor.describe.remote(), timeout=60)
    finally:
        ray.kill(actor)
    startup = info["startup"]
    phases = startup["phases"]

    def first(name):
        return next((p for p in phases if p["name"] == name), None)

    step = first("first-step")
    # Seconds per phase (summed where a phase repeats), the part after the actor's creation:
    # Ray may start a worker process before the actor is asked for.
    breakdown = {name: round(sum(p["end"] - max(p["start"], created) for p in phases
                                 if p["name"] == name and p["end"] > created), 3) for name in BREAKDOWN}
    saved = [os.path.join(cache, f) for f in os.listdir(cache)] if cache and os.path.isdir(cache) else []
    after = [p for p in phases if p["start"] >= created]
    row = {
        "run": label, "compiler_import": mode, "compile": startup["compile"], "compile_error": startup["compile_error"],
        "compile_cache": startup["compile_cache"],
        "cache_object_bytes": sum(os.path.getsize(f) for f in saved if os.path.isfile(f)),
        "pid": described.pid, "device_name": described.device_name,
        "to_first_step_start_s": step["start"] - created if step else None,
        "to_first_step_end_s": step["end"] - created if step else None,
        "to_ready_s": max(p["end"] for p in phases) - created,
        "to_ready_seen_by_driver_s": ready_seen - created,
        # A job's shard waits for check_input: its first real step could start at ready.
        "to_first_real_step_s": max(p["end"] for p in phases) - created,
        "breakdown_s": breakdown,
        # Phases after the creation; a prestarted Ray process's own start may lie before it.
        "phases_s": {p["name"]: round(p["end"] - max(p["start"], created), 3) for p in phases
                     if p["end"] > created},
        "phases": phases, "created": created,
        "scheduling_s": (min(p["start"] for p in after) - created) if after else None,
    }
    return row


def _save(results: dict, path: str) -> None:
    write_json(path, results)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Not beside --out by default: the compiled code is megabytes nobody needs back.
    cache_root = args.cache_dir or tempfile.mkdtemp(prefix="bench-coldstart-cache-")
    os.makedirs(cache_root, exist_ok=True)
    spec = DecoderSpec(name=args.decoder, dtype=args.dtype, random_weights=args.decoder != "test-pattern",
                       **({"compile": args.compile} if args.decoder != "test-pattern" else {}))
    scale = 16 if args.decoder == "wan2.2-ti2v" else 8
    latent_h, latent_w = args.height // scale, args.width // scale
    use_gpu = args.device == "cuda"
    gpus = torch.cuda.device_count() if use_gpu else 1  # on the CPU: one fake GPU, as the tests do
    if use_gpu and gpus == 0:
        raise SystemExit("--device cuda on a machine without CUDA")
    ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=gpus, include_dashboard=False,
             logging_level="WARNING")
    results = {"benchmark": "bench_coldstart", "host": platform.node(), "torch": torch.__version__,
               "args": {k: v for k, v in vars(args).items()}, "bytecode": BYTECODE, "runs": []}
    try:
        cls = decode_worker_class(True)  # one GPU each (a fake one on the CPU)
        if not args.no_prewarm:
            t = time.time()
            actor = cls.options(runtime_env={"env_vars": {COMPILER_IMPORT_ENV: "background"}}).remote(args.device)
            ray.get(actor.describe.remote(), timeout=args.timeout_s)
            ray.kill(actor)
            # The compiler's files too (the actor may be killed before its thread read them):
            # the page cache is the host's, whichever process reads them.
            for module in COMPILER_MODULES:
                importlib.import_module(module)
            results["prewarm_s"] = time.time() - t
            _wait_gpus_free(gpus)
        last_filled = None
        for i, label in enumerate(args.run_list):
            if label == "no-cache":
                cache = os.path.join(cache_root, f"run{i}-{int(time.time())}")
                os.makedirs(cache)
                last_filled = cache
            elif label in ("cache", "cache-inline"):
                cache = last_filled or os.path.join(cache_root, "shared")
            else:
                cache = None
            row = one_run(cls, label, args.device, spec, latent_h, latent_w, cache, args.timeout_s)
            row["wait_gpu_free_s"] = _wait_gpus_free(gpus)
            results["runs"].append(row)
            _save(results, args.json)
    finally:
        ray.shutdown()
    _save(results, args.json)

    name = results["runs"][0]["device_name"] if results["runs"] else "?"
    print(f"\n{name}, {args.decoder} {args.dtype} at {args.width}x{args.height}; seconds from the actor's creation"
          + (f"; page-cache warm-up actor {results['prewarm_s']:.1f} s" if "prewarm_s" in results else ""))
    missing = [k for k, v in BYTECODE.items() if isinstance(v, dict) and not v["pyc"]]
    print("bytecode: " + (f"NOT compiled for {', '.join(missing)} (a worker compiles it on import)" if missing
                          else "compiled for every package checked"))
    print(f"{'run':9} {'compile':15} {'first step starts':>18} {'ends':>7} {'ready':>7}  phases")
    for r in results["runs"]:
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r["phases_s"].items())
        start = r["to_first_step_start_s"]
        end = r["to_first_step_end_s"]
        print(f"{r['run']:9} {r['compile']:15} {start if start is not None else float('nan'):>18.2f} "
              f"{end if end is not None else float('nan'):>7.2f} {r['to_ready_s']:>7.2f}  {phases}")
        if r["compile_error"]:
            print(f"          compile error: {r['compile_error'][:300]}")
    print("\nbreakdown, seconds (compiler-import runs on a background thread, overlapping device and weights):")
    cols = [c for c in BREAKDOWN if any(r["breakdown_s"][c] for r in results["runs"])]
    print(f"{'run':9} " + " ".join(f"{c:>{max(len(c), 6)}}" for c in cols))
    for r in results["runs"]:
        print(f"{r['run']:9} " + " ".join(f"{r['breakdown_s'][c]:>{max(len(c), 6)}.2f}" for c in cols))
    print("target: first decode step within 10 s of creation with the cache (issue 9); the first step above is the "
          "warm-up's: a shard's first real step starts at ready")
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The Wan VAE decoder alone, before and after each speed change, side by side on one GPU.

    python -m benchmarks.bench_decoder [--sizes 1280x720,832x480] [--frames 10] [--variants ...]
                                 [--out bench_decoder.json] [--time-budget-s 200] [--device cuda]

On the real Wan 2.1 VAE architecture with random weights (AutoencoderKLWan() default
config, seed 0) and the same random latents for every variant, per size:
  diffusers      `vae.decode()` of all latents in bf16; per latent = (t(N) - t(1)) / (N - 1)
  wan            framefarm's WanDecoder in bf16 (diffusers' modules, streamed)
  fast-base ...  FastWanDecoder with the changes of actors.wan_fast.PRESETS switched on
                 one more at a time: +channels_last, +conv_buffer, +fp32_norm, +compile,
                 +cuda_graphs
  fp32-guard     FastWanDecoder in fp32 (eager flags) against WanDecoder fp32, TF32 off
Streaming variants decode --frames latents with a fresh state; the first 4 steps (the
stream's first latent, compile, cuDNN autotune, graph capture) are warm-up, reported as
wall time; the rest are timed with CUDA events, and their median is the steady per-latent
time. Error: relative L2 over all decoded frames against WanDecoder in fp32 (TF32 off)
with the original fp32 weights, and against fp32 with the same bf16-rounded weights
(what the bf16 decoders' arithmetic alone loses). Rates: decode_flops_per_latent over
the time, and over the card's own bf16 matmul rate, measured here first.

Stays within --time-budget-s: a variant that would not fit is recorded as skipped, a
compile that runs past the budget is interrupted, and every failure is recorded, not
fatal. JSON is rewritten after every variant; a table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import signal
import statistics
import time
import traceback

import torch

from actors.wan import WanDecoder
from actors.wan_fast import PRESETS, FastWanDecoder

WARMUP_STEPS = 4  # the first latent, then up to graph_warmup eager steady steps, then the capture
FAST = list(PRESETS)
ALL_VARIANTS = ["diffusers", "wan", *FAST, "fp32-guard"]
GPU_ONLY = {name for name, o in PRESETS.items() if o.compile or o.cuda_graphs}
# Seconds a variant needs at 720p, to decide what still fits the budget (measured on an H200
# for the eager ones; compile is a guess: ~20 small regions on 16 cores).
NEEDS = {"diffusers": 15, "wan": 12, "fp32-guard": 12, "+compile": 90, "+cuda_graphs": 20}
EAGER_NEED = 12
MARGIN_S = 8  # kept free at the end to write results


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_decoder", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1280x720,832x480", help="WIDTHxHEIGHT, comma-separated, in order")
    p.add_argument("--frames", type=int, default=10, help=f"latent frames per stream (>= {WARMUP_STEPS + 2})")
    p.add_argument("--variants", default=",".join(ALL_VARIANTS), help="subset of " + ",".join(ALL_VARIANTS))
    p.add_argument("--out", default="bench_decoder.json")
    p.add_argument("--time-budget-s", type=float, default=200.0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile-mode", default="default", help='torch.compile mode, e.g. "max-autotune-no-cudagraphs"')
    p.add_argument("--fp32-guard-frames", type=int, default=3)
    args = p.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(ALL_VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {ALL_VARIANTS}")
    if args.frames < WARMUP_STEPS + 2:
        p.error(f"--frames must be >= {WARMUP_STEPS + 2}: {WARMUP_STEPS} warm-up steps, then at least 2 timed")
    return args


# ---------------------------------------------------------------------------------------
# Clocks, budget, memory


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


class VariantTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float):
    """Interrupt the block after `seconds` (main thread, Unix): bounds a compile that runs long."""
    if seconds <= 0:
        raise VariantTimeout("no time left")

    def fire(signum, frame):
        raise VariantTimeout(f"ran past its {seconds:.1f} s share of the budget")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Clock:
    """CUDA events on a GPU (no sync between steps), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)


def reset_memory(device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_memory(device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def matmul_tflops(device) -> float:
    """The card's bf16 matrix rate on random data: the ceiling the decoder is measured against."""
    n = 8192 if device.type == "cuda" else 512
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    clock = Clock(device)
    for _ in range(3):
        a @ b
    clock.sync()
    reps = 10 if device.type == "cuda" else 2
    t0 = clock.mark()
    for _ in range(reps):
        a @ b
    t1 = clock.mark()
    clock.sync()
    return 2 * n ** 3 * reps / (clock.ms(t0, t1) / 1e3) / 1e12


# ---------------------------------------------------------------------------------------
# Variants


class ErrorMeter:
    """Relative L2 error of a stream's chunks against reference chunks, accumulated on the device."""

    def __init__(self, refs: list[list[torch.Tensor]]):
        self.refs = refs  # one list of chunks per reference
        self.num = [0.0] * len(refs)
        self.den = [0.0] * len(refs)
        self.finite = True

    def add(self, i: int, chunk: torch.Tensor) -> None:
        x = chunk.float()
        for k, ref in enumerate(self.refs):
            self.num[k] = self.num[k] + (x - ref[i]).square().sum()
            self.den[k] = self.den[k] + ref[i].square().sum()

    def result(self) -> list[float]:
        return [math.sqrt(float(n) / float(d)) for n, d in zip(self.num, self.den)]


def run_stream(decoder, latents: torch.Tensor, refs, device) -> dict:
    clock = Clock(device)
    meter = ErrorMeter(refs)
    state = decoder.new_state()
    marks, warm_walls = [], []
    for i in range(latents.shape[1]):
        w0 = time.perf_counter()
        a = clock.mark()
        out = decoder.step(state, latents[:, i])
        b = clock.mark()
        if i < WARMUP_STEPS:
            clock.sync()
            warm_walls.append(time.perf_counter() - w0)
        marks.append((a, b))
        meter.add(i, out)  # after the end mark: not timed
    clock.sync()
    step_ms = [clock.ms(a, b) for a, b in marks]
    timed = step_ms[WARMUP_STEPS:]
    errors = meter.result()
    return {
        "ms_per_latent": statistics.median(timed),
        "ms_spread": [min(timed), max(timed)],
        "first_latent_ms": step_ms[0],
        "step_ms": step_ms,
        "warmup_wall_s": sum(warm_walls),
        "warmup_walls_s": warm_walls,
        "rel_err_vs_fp32": errors[0],
        "rel_err_vs_fp32_same_weights": errors[1] if len(errors) > 1 else None,
        "state_bytes": state.nbytes() if hasattr(state, "nbytes") else None,
    }


def run_diffusers(vae, wan: WanDecoder, latents: torch.Tensor, refs, device) -> dict:
    clock = Clock(device)
    # WanPipeline's un-normalization, in the VAE's dtype, as WanDecoder does.
    z = latents.to(device, wan.dtype)
    z = (z / wan._inv_std.view(-1, 1, 1, 1) + wan._mean.view(-1, 1, 1, 1)).unsqueeze(0)
    n = z.shape[2]
    with torch.no_grad():
        w0 = time.perf_counter()
        vae.decode(z[:, :, :2])  # warm-up: cuDNN autotune for these shapes
        clock.sync()
        warm = time.perf_counter() - w0
        a = clock.mark()
        vae.decode(z[:, :, :1])
        b = clock.mark()
        out = vae.decode(z).sample[0]
        c = clock.mark()
    clock.sync()
    t1, tn = clock.ms(a, b), clock.ms(b, c)
    meter = ErrorMeter(refs)
    sizes = [r.shape[1] for r in refs[0]]
    start = 0
    for i, f in enumerate(sizes):
        meter.add(i, out[:, start : start + f])
        start += f
    errors = meter.result()
    return {"ms_per_latent": (tn - t1) / (n - 1), "first_latent_ms": t1, "total_ms": tn, "warmup_wall_s": warm,
            "rel_err_vs_fp32": errors[0], "rel_err_vs_fp32_same_weights": errors[1]}


def decode_chunks(decoder, latents: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [c.float() for c in decoder.stream(latents)]


# ---------------------------------------------------------------------------------------
# The run


def build(device: torch.device):
    """The real Wan 2.1 VAE with random weights, as fp32 reference, bf16-rounded fp32 and bf16 decoders."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae32 = AutoencoderKLWan().eval().requires_grad_(False)
    # WanDecoder moves the modules it is given (in place), so each dtype gets its own copy.
    vae16 = copy.deepcopy(vae32)
    rounded = copy.deepcopy(vae32)
    for p in rounded.parameters():
        p.data = p.data.to(torch.bfloat16).float()
    ref32 = WanDecoder(vae32, device=device, dtype=torch.float32)
    ref32_same = WanDecoder(rounded, device=device, dtype=torch.float32)
    wan16 = WanDecoder(vae16, device=device, dtype=torch.bfloat16)
    return vae16, ref32, ref32_same, wan16


def run(args) -> dict:
    import diffusers

    budget = Budget(args.time_budget_s)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)  # set_device and the memory statistics need an index
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
        # Every step has the same shapes: let cuDNN pick its fastest algorithms (as workers do).
        torch.backends.cudnn.benchmark = True
    # True fp32 for the references and the fp32 guard; bf16 variants are unaffected.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    variants = [v for v in ALL_VARIANTS if v in args.variants.split(",")]
    results = {
        "card": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args),
        "presets": {k: dataclasses.asdict(v) for k, v in PRESETS.items()},
        "runs": [],
    }
    results["matmul_bf16_tflops"] = matmul_tflops(device)
    print(f"{results['card']}: bf16 matmul {results['matmul_bf16_tflops']:.0f} TFLOP/s "
          f"(torch {torch.__version__}, diffusers {diffusers.__version__})", flush=True)
    vae16, ref32, ref32_same, wan16 = build(device)
    print(HEADER, flush=True)
    compile_failed = None
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.split("x"))
        row = {"size": size, "latent_frames": args.frames, "variants": {}}
        results["runs"].append(row)
        row["flops_per_latent"] = wan16.decode_flops_per_latent(height, width)
        g = torch.Generator().manual_seed(1)
        latents = torch.randn(16, args.frames, height // 8, width // 8, generator=g).to(device)
        if budget.left() < 30 + MARGIN_S:
            row["skipped"] = "budget"
            save(results, args.out)
            continue
        try:
            refs = [decode_chunks(ref32, latents), decode_chunks(ref32_same, latents)]
        except Exception as e:  # noqa: BLE001 (e.g. out of memory at a size too big for fp32)
            row["error"] = f"fp32 reference: {type(e).__name__}: {e}"
            save(results, args.out)
            continue
        clear()
        for name in variants:
            need = budget_need(name, height * width, row)
            if name in GPU_ONLY and not cuda:
                row["variants"][name] = {"skipped": "needs CUDA"}
            elif name in GPU_ONLY and compile_failed:
                row["variants"][name] = {"skipped": f"compile failed earlier: {compile_failed}"}
            elif budget.left() - MARGIN_S < need:
                row["variants"][name] = {"skipped": "budget"}
            else:
                row["variants"][name] = r = run_variant(name, args, device, budget, vae16, ref32, wan16,
                                                        latents, refs, row["flops_per_latent"],
                                                        results["matmul_bf16_tflops"])
                if name in GPU_ONLY and "error" in r:
                    compile_failed = r["error"][:200]
            add_speedups(row)
            print_variant(size, name, row["variants"][name], flush=True)
            save(results, args.out)
        del latents, refs
        clear()
    results["wall_s"] = args.time_budget_s - budget.left()
    save(results, args.out)
    print_table(results)
    return results


def budget_need(name: str, pixels: int, row: dict) -> float:
    """Seconds to reserve for a variant: decoding scales with pixels, compiling does not."""
    if name == "+compile":
        return NEEDS["+compile"]
    if name == "+cuda_graphs":
        # Reuses +compile's compiled code when that ran at this size; compiles it otherwise.
        compiled = "ms_per_latent" in row["variants"].get("+compile", {})
        return NEEDS["+cuda_graphs"] + (0 if compiled else NEEDS["+compile"])
    return max(3.0, NEEDS.get(name, EAGER_NEED) * pixels / (1280 * 720))


def run_variant(name, args, device, budget, vae16, ref32, wan16, latents, refs, flops, matmul) -> dict:
    base = reset_memory(device)
    decoder = None
    try:
        with deadline(budget.left() - MARGIN_S):
            if name == "diffusers":
                r = run_diffusers(vae16, wan16, latents, refs, device)
            elif name == "wan":
                r = run_stream(wan16, latents, refs, device)
            elif name == "fp32-guard":
                r = run_fp32_guard(args, ref32, latents, refs, device)
            else:
                options = PRESETS[name]
                if options.compile:
                    options = dataclasses.replace(options, compile_mode=args.compile_mode)
                decoder = FastWanDecoder(wan16, options=options)
                r = run_stream(decoder, latents, refs, device)
                # Compile and capture are in the warm-up steps; the steady steps' cost is not.
                r["compile_and_capture_s_est"] = max(0.0, r["warmup_wall_s"]
                                                     - (WARMUP_STEPS - 1) * r["ms_per_latent"] / 1e3
                                                     - r["first_latent_ms"] / 1e3)
    except VariantTimeout as e:
        return {"error": f"timeout: {e}"}
    except Exception as e:  # noqa: BLE001 (a failed variant is a result, not the end of the run)
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    finally:
        decoder = None  # its buffers and graphs go before the next variant
    if "ms_per_latent" in r and name != "fp32-guard":
        tflops = flops / (r["ms_per_latent"] / 1e3) / 1e12
        r.update(tflops=tflops, fraction_of_matmul=tflops / matmul)
    r["peak_bytes"] = peak_memory(device)
    r["peak_above_start_bytes"] = r["peak_bytes"] - base if device.type == "cuda" else 0
    clear()
    return r


def run_fp32_guard(args, ref32, latents, refs, device) -> dict:
    """The eager fast path in fp32 against WanDecoder in fp32 (TF32 off): the 1e-5 guard on a GPU."""
    n = min(args.fp32_guard_frames, latents.shape[1])
    eager = [o for o in PRESETS.values() if not o.compile and not o.cuda_graphs][-1]
    fast = FastWanDecoder(ref32, options=eager)
    chunks = decode_chunks(fast, latents[:, :n])
    ref = refs[0][:n]
    num = sum(float((a - b).square().sum()) for a, b in zip(chunks, ref))
    den = sum(float(b.square().sum()) for b in ref)
    err = math.sqrt(num / den)
    return {"latents": n, "options": dataclasses.asdict(eager),
            "rel_err_vs_fp32": err, "guard": 1e-5, "passes": err <= 1e-5}


def add_speedups(row) -> None:
    ref = row["variants"].get("diffusers", {}).get("ms_per_latent")
    wan = row["variants"].get("wan", {}).get("ms_per_latent")
    for name, r in row["variants"].items():
        if "ms_per_latent" in r and name != "fp32-guard":
            if ref:
                r["speedup_vs_diffusers"] = ref / r["ms_per_latent"]
            if wan:
                r["speedup_vs_wan"] = wan / r["ms_per_latent"]


def clear() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def save(results, path) -> None:
    """After every variant, atomically, so a run cut short keeps what it measured."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2, default=str)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# Output


HEADER = (f"{'size':<10}{'variant':<15}{'ms/lat':>8}{'TFLOP/s':>9}{'%mm':>6}{'x diff':>7}{'x wan':>7}"
          f"{'err fp32':>10}{'err same-w':>11}{'peak GiB':>9}{'warm s':>8}  note")


def format_variant(size, name, r) -> str:
    if "skipped" in r:
        return f"{size:<10}{name:<15}  skipped: {r['skipped']}"
    if "error" in r:
        return f"{size:<10}{name:<15}  error: {r['error'][:150]}"
    if name == "fp32-guard":
        return (f"{size:<10}{name:<15}  rel err {r['rel_err_vs_fp32']:.2e} over {r['latents']} latents, fp32, "
                f"guard 1e-5: {'pass' if r['passes'] else 'FAIL'}")

    def f(key, fmt, scale=1.0):
        v = r.get(key)
        return format(v * scale, fmt) if isinstance(v, (int, float)) else "-"

    note = ""
    if r.get("compile_and_capture_s_est", 0) > 2:
        note = f"compile+capture ~{r['compile_and_capture_s_est']:.0f} s"
    return (f"{size:<10}{name:<15}{f('ms_per_latent', '8.1f')}{f('tflops', '9.0f')}"
            f"{f('fraction_of_matmul', '6.0%')}{f('speedup_vs_diffusers', '7.2f')}{f('speedup_vs_wan', '7.2f')}"
            f"{f('rel_err_vs_fp32', '10.2e')}{f('rel_err_vs_fp32_same_weights', '11.2e')}"
            f"{f('peak_bytes', '9.2f', 1 / 2**30)}{f('warmup_wall_s', '8.1f')}  {note}")


def print_variant(size, name, r, flush=True) -> None:
    print(format_variant(size, name, r), flush=flush)


def print_table(results) -> None:
    print(f"\n{results['card']}, bf16, matmul {results['matmul_bf16_tflops']:.0f} TFLOP/s, "
          f"{results['args']['frames']} latent frames a stream, median of the steps after {WARMUP_STEPS}")
    print(HEADER)
    for row in results["runs"]:
        if "skipped" in row or "error" in row:
            print(f"{row['size']:<10}{row.get('skipped') or row.get('error')}")
            continue
        for name, r in row["variants"].items():
            print(format_variant(row["size"], name, r))
    print(f"wall {results.get('wall_s', 0):.0f} s of a {results['args']['time_budget_s']:.0f} s budget", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    run(args)


if __name__ == "__main__":
    main()

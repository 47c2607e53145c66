"""The Wan VAE decoder alone: diffusers against framefarm's decoder under each option set, on one device.

    python -m benchmarks.bench_decoder [--sizes 1280x720,832x480] [--frames 10] [--variants ...]
                                 [--config wan2.1|ti2v|tiny2.1] [--out bench_decoder.json]
                                 [--time-budget-s 300] [--device cuda]
    python -m benchmarks.bench_decoder --device cpu --config tiny2.1 --sizes 64x64 --frames 3   # smoke

On the chosen VAE architecture with random weights (seed 0) and the same random latents
for every variant, per size:
  diffusers        `vae.decode()` of all latents in bf16; per latent = (t(N) - t(1)) / (N - 1)
  eager ...        `actors.wan.WanDecoder` in bf16 with the option sets of OPTION_SETS, one
                   more change at a time: eager (diffusers-style history), +channels_last,
                   +conv_buffer, +compile, +cuda_graphs, +bias_in_reader (the CUDA default)
  stages           an instrumented steady step (the CUDA default's options without the graph;
                   CPU: +conv_buffer): events
                   around each stage and each convolution; per-stage time and conv share
  fp32-guard       WanDecoder in fp32 (CPU-default options, TF32 off by the decoder) against
                   diffusers' fp32 decode with TF32 off: the 1e-5 rule
Streaming variants decode --frames latents with a fresh state; the first steps (the
stream's first latent, compile, cuDNN autotune, graph capture: up to 4) are warm-up, the
rest are timed with CUDA events (wall clock on the CPU), their median is the steady
per-latent time. Error: relative L2 over all decoded frames against diffusers' fp32
decode (TF32 off) with the original weights, and with the same bf16-rounded weights.
Rates: the topology's FLOPs over the time, and over the card's bf16 matmul rate.

Stays within --time-budget-s: a variant that would not fit is recorded as skipped, one
that runs past the budget is interrupted, every failure is recorded, not fatal. JSON is
rewritten after every variant; a table is printed last.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import platform
import signal
import statistics
import time
import traceback

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan

from actors.wan import DecoderOptions, WanDecoder, ieee_fp32, ti2v_config, tiny_wan_config
from benchmarks.common import parser, write_json

WARMUP_STEPS = 4  # the first latent, then up to graph_warmup eager steady steps, then the capture
OPTION_SETS: dict[str, DecoderOptions] = {
    "eager": DecoderOptions(conv_buffer=False),
    "+channels_last": DecoderOptions(channels_last=True, conv_buffer=False),
    "+conv_buffer": DecoderOptions(channels_last=True, conv_buffer=True),
    "+compile": DecoderOptions(channels_last=True, conv_buffer=True, compile=True),
    "+cuda_graphs": DecoderOptions(channels_last=True, conv_buffer=True, compile=True, cuda_graphs=True),
    "+bias_in_reader": DecoderOptions(channels_last=True, conv_buffer=True, compile=True, cuda_graphs=True,
                                      bias_in_reader=True),
}
# The product's default (+bias_in_reader), the one before it and the stage profile first, so that a short budget
# measures what matters; then the option sets one change at a time.
ALL_VARIANTS = ["diffusers", "+bias_in_reader", "+cuda_graphs", "stages", "fp32-guard", "eager", "+channels_last", "+conv_buffer",
                "+compile"]
GPU_ONLY = {"+compile", "+cuda_graphs", "+bias_in_reader"}  # inductor on a small CPU takes minutes
COMPILING = {"+compile", "+cuda_graphs", "+bias_in_reader"}  # "stages" too on CUDA
CONFIGS = {"wan2.1": dict, "ti2v": ti2v_config, "tiny2.1": tiny_wan_config}
# Seconds a variant needs at 720p on an H200, to decide what still fits the budget; COMPILE_S
# once per process and size for the compiled regions (DESIGN.md: compile + capture ~23 s).
NEEDS = {"diffusers": 15, "fp32-guard": 25, "+compile": 10, "+cuda_graphs": 15, "+bias_in_reader": 15,
         "stages": 10}
COMPILE_S = 45
EAGER_NEED = 12
MARGIN_S = 8  # kept free at the end to write results


def parse_args(argv=None):
    p = parser("bench_decoder", __doc__, "bench_decoder.json")
    p.add_argument("--sizes", default="1280x720,832x480", help="WIDTHxHEIGHT, comma-separated, in order")
    p.add_argument("--frames", type=int, default=10, help="latent frames per stream (>= 2; the first steps are warm-up)")
    p.add_argument("--variants", default=",".join(ALL_VARIANTS), help="subset of " + ",".join(ALL_VARIANTS))
    p.add_argument("--config", choices=sorted(CONFIGS), default="wan2.1", help="VAE architecture (random weights)")
    p.add_argument("--time-budget-s", type=float, default=300.0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile-mode", default="default", help='torch.compile mode, e.g. "max-autotune-no-cudagraphs"')
    p.add_argument("--fp32-guard-frames", type=int, default=3)
    args = p.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(ALL_VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {ALL_VARIANTS}")
    if args.frames < 2:
        p.error("--frames must be >= 2: a stream's first latent is not a steady step")
    try:
        args.size_list = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    except ValueError:
        p.error("--sizes is WIDTHxHEIGHT[,WIDTHxHEIGHT...]")
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

    def add(self, i: int, chunk: torch.Tensor) -> None:
        x = chunk.float()
        for k, ref in enumerate(self.refs):
            self.num[k] = self.num[k] + (x - ref[i]).square().sum()
            self.den[k] = self.den[k] + ref[i].square().sum()

    def result(self) -> list[float]:
        return [math.sqrt(float(n) / float(d)) for n, d in zip(self.num, self.den)]


def warmup_steps(frames: int) -> int:
    return min(WARMUP_STEPS, frames - 1)


def run_stream(decoder: WanDecoder, latents: torch.Tensor, refs, device) -> dict:
    clock = Clock(device)
    meter = ErrorMeter(refs)
    state = decoder.new_state()
    warm = warmup_steps(latents.shape[1])
    marks, warm_walls = [], []
    for i in range(latents.shape[1]):
        w0 = time.perf_counter()
        a = clock.mark()
        out = decoder.step(state, latents[:, i])
        b = clock.mark()
        if i < warm:
            clock.sync()
            warm_walls.append(time.perf_counter() - w0)
        marks.append((a, b))
        meter.add(i, out)  # after the end mark: not timed
    clock.sync()
    step_ms = [clock.ms(a, b) for a, b in marks]
    timed = step_ms[warm:]
    errors = meter.result()
    return {
        "ms_per_latent": statistics.median(timed), "ms_spread": [min(timed), max(timed)], "timed_steps": len(timed),
        "first_latent_ms": step_ms[0], "step_ms": step_ms,
        "warmup_wall_s": sum(warm_walls), "warmup_walls_s": warm_walls,
        "rel_err_vs_fp32": errors[0], "rel_err_vs_fp32_same_weights": errors[1],
        "state_bytes": state.nbytes(),
        "compile_and_capture_s_est": max(0.0, sum(warm_walls) - (warm - 1) * statistics.median(timed) / 1e3
                                         - step_ms[0] / 1e3),
    }


def unnormalized(vae: AutoencoderKLWan, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """WanPipeline's un-normalization, in the VAE's dtype: what diffusers' decode takes."""
    std = torch.tensor(vae.config.latents_std).view(-1, 1, 1, 1).to(latents.device, dtype)
    mean = torch.tensor(vae.config.latents_mean).view(-1, 1, 1, 1).to(latents.device, dtype)
    return (latents.to(dtype) / (1.0 / std) + mean).unsqueeze(0)


def chunks_of(video: torch.Tensor) -> list[torch.Tensor]:
    """A CFHW decode split as a stream yields it: 1 frame, then 4 per latent."""
    sizes = [1] + [4] * ((video.shape[1] - 1) // 4)
    return list(video.float().split(sizes, dim=1))


def run_diffusers(vae, latents: torch.Tensor, refs, device) -> dict:
    clock = Clock(device)
    z = unnormalized(vae, latents, torch.bfloat16)
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
    for i, chunk in enumerate(chunks_of(out)):
        meter.add(i, chunk)
    errors = meter.result()
    return {"ms_per_latent": (tn - t1) / (n - 1), "first_latent_ms": t1, "total_ms": tn, "warmup_wall_s": warm,
            "rel_err_vs_fp32": errors[0], "rel_err_vs_fp32_same_weights": errors[1]}


def run_stages(decoder: WanDecoder, latents: torch.Tensor, device) -> dict:
    """Per-stage time of steady steps and the share of it that convolutions take.

    An instrumented step: the decoder's probe records a CUDA event (or the wall clock) where
    each stage begins, around every convolution, and after the step's last kernel. The
    first step and warm-up steps are not measured; the rest are, and their per-stage
    medians reported. Events between kernels cost a little launch time, so the sum is a
    bit above an uninstrumented eager step.
    """
    clock = Clock(device)
    state = decoder.new_state()
    warm = warmup_steps(latents.shape[1])
    runs = []
    for i in range(latents.shape[1]):
        events: list[tuple[str, int, object]] = []
        decoder.step(state, latents[:, i], probe=lambda kind, stage: events.append((kind, stage, clock.mark())))
        if i >= warm:
            runs.append(events)
    clock.sync()
    per_run = []
    for events in runs:
        stage_ms: dict[int, float] = {}
        conv_ms: dict[int, float] = {}
        starts = [(s, m) for kind, s, m in events if kind == "stage"]
        end = events[-1][2]
        for (s, m), nxt in zip(starts, starts[1:] + [(None, end)]):
            stage_ms[s] = stage_ms.get(s, 0.0) + clock.ms(m, nxt[1])
        begin = None
        for kind, s, m in events:
            if kind == "conv":
                begin = m
            elif kind == "glue" and begin is not None:
                conv_ms[s] = conv_ms.get(s, 0.0) + clock.ms(begin, m)
                begin = None
        per_run.append((stage_ms, conv_ms, clock.ms(events[0][2], end)))
    stages = sorted(per_run[0][0])
    top = decoder.topology
    h, w = latents.shape[2] * decoder.spatial_scale, latents.shape[3] * decoder.spatial_scale
    flops = {s: sum(top.layer_flops(x, h, w) for x in top.layers if x.stage == s) for s in stages}
    out = {"step_ms": statistics.median(r[2] for r in per_run), "measured_steps": len(per_run), "stages": []}
    for s in stages:
        total = statistics.median(r[0].get(s, 0.0) for r in per_run)
        conv = statistics.median(r[1].get(s, 0.0) for r in per_run)
        layer = next(x for x in top.layers if x.stage == s)
        out["stages"].append({"stage": s, "time_scale": layer.time_scale, "spatial_scale": layer.spatial_scale,
                              "ms": total, "conv_ms": conv, "conv_share": conv / total if total else None,
                              "tflop": flops[s] / 1e12, "tflops": flops[s] / (total / 1e3) / 1e12 if total else None})
    conv_all = sum(x["conv_ms"] for x in out["stages"])
    out["conv_ms"], out["conv_share"] = conv_all, conv_all / out["step_ms"]
    return out


def decode_reference(vae32: AutoencoderKLWan, latents: torch.Tensor, device) -> list[torch.Tensor]:
    # diffusers' fp32 reference with TF32 off for convs and matmuls (the decoder does the same itself).
    with torch.no_grad(), ieee_fp32() if device.type == "cuda" else contextlib.nullcontext():
        return chunks_of(vae32.decode(unnormalized(vae32, latents, torch.float32)).sample[0])


def run_fp32_guard(args, vae32, latents, refs, device) -> dict:
    """framefarm's decoder in fp32 against diffusers in fp32, both with TF32 off: the 1e-5 rule."""
    n = min(args.fp32_guard_frames, latents.shape[1])
    decoder = WanDecoder.from_vae(vae32, device=device, dtype=torch.float32, options=DecoderOptions())
    with torch.no_grad():
        chunks = [c.float() for c in decoder.stream(latents[:, :n])]
    ref = refs[0][: len(chunks)]
    num = sum(float((a - b).square().sum()) for a, b in zip(chunks, ref))
    den = sum(float(b.square().sum()) for b in ref)
    err = math.sqrt(num / den)
    return {"latents": n, "options": dataclasses.asdict(decoder.options),
            "rel_err_vs_fp32": err, "guard": 1e-5, "passes": err <= 1e-5}


# ---------------------------------------------------------------------------------------
# The run


def build(config: dict, device: torch.device):
    """diffusers' VAE with random weights: fp32 on the device, bf16 on the device, and fp32
    with bf16-rounded weights (what bf16 arithmetic alone loses)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae32 = AutoencoderKLWan.from_config(config).eval().requires_grad_(False)
    rounded = copy.deepcopy(vae32)
    for p in rounded.parameters():
        p.data = p.data.to(torch.bfloat16).float()
    vae16 = copy.deepcopy(vae32).to(device, torch.bfloat16)
    return vae32.to(device), rounded.to(device), vae16


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
    variants = [v for v in ALL_VARIANTS if v in args.variants.split(",")]
    results = {
        "card": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "cudnn": torch.backends.cudnn.version() if cuda else None, "config": args.config,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "args": {k: v for k, v in vars(args).items() if k != "size_list"},
        "option_sets": {k: dataclasses.asdict(v) for k, v in OPTION_SETS.items()},
        "runs": [],
    }
    results["matmul_bf16_tflops"] = matmul_tflops(device)
    print(f"{results['card']}: bf16 matmul {results['matmul_bf16_tflops']:.0f} TFLOP/s "
          f"(torch {torch.__version__}, diffusers {diffusers.__version__}), {args.config}", flush=True)
    config = CONFIGS[args.config]()
    vae32, rounded, vae16 = build(config, device)
    z_dim = int(vae32.config.z_dim)
    probe = WanDecoder.from_vae(vae16, device=device, dtype=torch.bfloat16, options=DecoderOptions())
    print(HEADER, flush=True)
    compile_failed = None
    for width, height in args.size_list:
        size = f"{width}x{height}"
        row = {"size": size, "latent_frames": args.frames, "variants": {}}
        results["runs"].append(row)
        row["flops_per_latent"] = probe.decode_flops_per_latent(height, width)
        row["model_peak_bytes"] = {name: probe.topology.peak_memory_bytes(height, width, 2, o.conv_buffer)
                                   for name, o in OPTION_SETS.items()}
        s = probe.spatial_scale
        g = torch.Generator().manual_seed(1)
        latents = torch.randn(z_dim, args.frames, height // s, width // s, generator=g).to(device)
        if budget.left() < 30 + MARGIN_S:
            row["skipped"] = "budget"
            save(results, args.json)
            continue
        try:
            refs = [decode_reference(vae32, latents, device), decode_reference(rounded, latents, device)]
        except Exception as e:  # noqa: BLE001 (e.g. out of memory at a size too big for fp32)
            row["error"] = f"fp32 reference: {type(e).__name__}: {e}"
            save(results, args.json)
            continue
        clear()
        for name in variants:
            need = budget_need(name, height * width, row)
            if name in GPU_ONLY and not cuda:
                row["variants"][name] = {"skipped": "needs CUDA"}
            elif name in COMPILING and compile_failed:
                row["variants"][name] = {"skipped": f"compile failed earlier: {compile_failed}"}
            elif budget.left() - MARGIN_S < need:
                row["variants"][name] = {"skipped": "budget"}
            else:
                row["variants"][name] = r = run_variant(name, args, device, budget, vae32, vae16, latents, refs,
                                                        row["flops_per_latent"], results["matmul_bf16_tflops"])
                if name in COMPILING and "error" in r:
                    compile_failed = r["error"][:200]
            add_speedups(row)
            print(format_variant(size, name, row["variants"][name]), flush=True)
            save(results, args.json)
        del latents, refs
        clear()
    results["wall_s"] = args.time_budget_s - budget.left()
    save(results, args.json)
    print_table(results)
    return results


def budget_need(name: str, pixels: int, row: dict) -> float:
    """Seconds to reserve for a variant: decoding scales with pixels, compiling does not."""
    need = max(3.0, NEEDS.get(name, EAGER_NEED) * pixels / (1280 * 720))
    if name in COMPILING or name == "stages":
        # Compiled regions are shared within the process: the first compiling variant pays.
        compiled = any("ms_per_latent" in row["variants"].get(n, {}) for n in COMPILING)
        need += 0 if compiled else COMPILE_S
    return need


def run_variant(name, args, device, budget, vae32, vae16, latents, refs, flops, matmul) -> dict:
    base = reset_memory(device)
    decoder = None
    try:
        with deadline(budget.left() - MARGIN_S):
            if name == "diffusers":
                r = run_diffusers(vae16, latents, refs, device)
            elif name == "fp32-guard":
                r = run_fp32_guard(args, vae32, latents, refs, device)
            else:
                # Stages: the CUDA default minus its graph (events need eager launches), eager elsewhere.
                if name != "stages":
                    options = OPTION_SETS[name]
                elif device.type == "cuda":
                    options = dataclasses.replace(DecoderOptions.for_device(device), cuda_graphs=False)
                else:
                    options = OPTION_SETS["+conv_buffer"]
                if options.compile:
                    options = dataclasses.replace(options, compile_mode=args.compile_mode)
                decoder = WanDecoder.from_vae(vae16, device=device, dtype=torch.bfloat16, options=options)
                r = run_stages(decoder, latents, device) if name == "stages" else run_stream(decoder, latents,
                                                                                             refs, device)
    except VariantTimeout as e:
        return {"error": f"timeout: {e}"}
    except Exception as e:  # noqa: BLE001 (a failed variant is a result, not the end of the run)
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    finally:
        decoder = None  # its buffers and graphs go before the next variant
    if "ms_per_latent" in r:
        tflops = flops / (r["ms_per_latent"] / 1e3) / 1e12
        r.update(tflops=tflops, fraction_of_matmul=tflops / matmul)
    r["peak_bytes"] = peak_memory(device)
    r["peak_above_start_bytes"] = r["peak_bytes"] - base if device.type == "cuda" else 0
    clear()
    return r


def add_speedups(row) -> None:
    ref = row["variants"].get("diffusers", {}).get("ms_per_latent")
    for r in row["variants"].values():
        if "ms_per_latent" in r and ref:
            r["speedup_vs_diffusers"] = ref / r["ms_per_latent"]


def clear() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def save(results, path) -> None:
    """After every variant, atomically, so a run cut short keeps what it measured."""
    write_json(path, results)


# ---------------------------------------------------------------------------------------
# Output


HEADER = (f"{'size':<10}{'variant':<15}{'ms/lat':>8}{'TFLOP/s':>9}{'%mm':>6}{'x diff':>7}"
          f"{'err fp32':>10}{'err same-w':>11}{'peak GiB':>9}{'warm s':>8}  note")


def format_variant(size, name, r) -> str:
    if "skipped" in r:
        return f"{size:<10}{name:<15}  skipped: {r['skipped']}"
    if "error" in r:
        return f"{size:<10}{name:<15}  error: {r['error'][:150]}"
    if name == "fp32-guard":
        return (f"{size:<10}{name:<15}  rel err {r['rel_err_vs_fp32']:.2e} over {r['latents']} latents, fp32, "
                f"TF32 off, guard 1e-5: {'pass' if r['passes'] else 'FAIL'}")
    if name == "stages":
        parts = [f"s{x['stage']} {x['ms']:.1f} ms ({x['conv_share']:.0%} conv)" for x in r["stages"]]
        return (f"{size:<10}{name:<15}  step {r['step_ms']:.1f} ms, conv {r['conv_share']:.0%}: "
                + ", ".join(parts))

    def f(key, fmt, scale=1.0):
        v = r.get(key)
        return format(v * scale, fmt) if isinstance(v, (int, float)) else "-"

    note = ""
    if r.get("compile_and_capture_s_est", 0) > 2:
        note = f"compile+capture ~{r['compile_and_capture_s_est']:.0f} s"
    return (f"{size:<10}{name:<15}{f('ms_per_latent', '8.1f')}{f('tflops', '9.0f')}"
            f"{f('fraction_of_matmul', '6.0%')}{f('speedup_vs_diffusers', '7.2f')}"
            f"{f('rel_err_vs_fp32', '10.2e')}{f('rel_err_vs_fp32_same_weights', '11.2e')}"
            f"{f('peak_bytes', '9.2f', 1 / 2**30)}{f('warmup_wall_s', '8.1f')}  {note}")


def print_table(results) -> None:
    print(f"\n{results['card']}, {results['config']}, bf16, matmul {results['matmul_bf16_tflops']:.0f} TFLOP/s, "
          f"{results['args']['frames']} latent frames a stream, median of the steady steps")
    print(HEADER)
    for row in results["runs"]:
        if "skipped" in row or "error" in row:
            print(f"{row['size']:<10}{row.get('skipped') or row.get('error')}")
            continue
        for name, r in row["variants"].items():
            print(format_variant(row["size"], name, r))
    print(f"wall {results.get('wall_s', 0):.0f} s of a {results['args']['time_budget_s']:.0f} s budget", flush=True)


def main(argv=None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()

"""Where a bf16 Wan decode loses accuracy, and how low its error can go (CPU or GPU).

    python -m benchmarks.bench_bf16_error [--config wan2.1|tiny2.1] [--seeds 0,1,2] [--latent 6x6]
                                    [--frames 4] [--out bench_bf16_error.json]

Issue 5's guard asks a bf16 decoder for a relative L2 error of at most 1e-2 against the
fp32 decode of the same input. This measures, on the real Wan 2.1 VAE architecture with
random weights (or the tiny test config), the error of:

  diffusers bf16        diffusers' own decode in bf16
  framefarm bf16        actors.wan.WanDecoder in bf16 (norms in fp32 until the conv input)
  conv in+out           an fp32 decode whose convolutions (and the attention's 1x1
                        projections) see bf16-rounded inputs and weights and return a
                        bf16-rounded output, everything else fp32: what any decoder whose
                        convs are cuDNN bf16 calls cannot beat, since cuDNN returns bf16
  conv in               the same with the conv output kept in fp32: the floor for bf16
                        tensor-core convolutions of any kind
  weights only          bf16-rounded weights, fp32 arithmetic
  stage k               conv in+out rounding only at stage k (k=0 latent resolution, then
                        each 2x spatial upsample): where the error comes from

Rounding is applied with forward pre-hooks on a copy of the model's conv modules, decoded
with diffusers' own `decode`, so the fp32 code path is diffusers' own; the reference is
diffusers' fp32 decode with TF32 off. No timing here: the same numbers come out on any device.
"""

from __future__ import annotations

import copy
import platform
import time

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan

from actors.wan import WanDecoder, ieee_fp32, tiny_wan_config
from benchmarks.common import parser, write_json

GUARD = 1e-2
STAGES = 4  # latent resolution, then three 2x spatial upsamples (Wan 2.1)


def parse_args(argv=None):
    p = parser("bench_bf16_error", __doc__, "bench_bf16_error.json")
    p.add_argument("--config", choices=["wan2.1", "tiny2.1"], default="wan2.1")
    p.add_argument("--seeds", default="0,1,2", help="model seeds; the latents use seed + 20")
    p.add_argument("--latent", default="6x6", help="latent WIDTHxHEIGHT (8x the frame size)")
    p.add_argument("--frames", type=int, default=4, help="latent frames (1 + 4(T-1) output frames)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        args.latent_w, args.latent_h = (int(v) for v in args.latent.lower().split("x"))
        args.seed_list = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error("--latent is WIDTHxHEIGHT and --seeds integers, comma-separated")
    if args.frames < 1 or args.latent_w < 1 or args.latent_h < 1:
        p.error("--frames and --latent must be positive")
    return args


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(t.dtype)


def _conv_modules(vae: AutoencoderKLWan) -> list[torch.nn.Module]:
    mods = [m for m in vae.decoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    return [vae.post_quant_conv, *mods]


def rounded_copy(vae: AutoencoderKLWan, latent_w: int, *, inputs: bool, outputs: bool, weights: bool,
                 stages: set[int] | None = None) -> AutoencoderKLWan:
    """An fp32 copy whose convs round their operands (and output) to bf16, at `stages` or all.

    A conv's stage is read from its input width against the latent width, so a stage's
    rounding covers every conv that runs at that resolution (the attention's projections at
    stage 0, an upsampler's 2-D conv at the resolution it produces).
    """
    vae = copy.deepcopy(vae)

    def stage_of(x: torch.Tensor) -> int:
        return max(0, (x.shape[-1] // latent_w).bit_length() - 1)

    for m in _conv_modules(vae):

        def pre(module, args, _stages=stages):
            if _stages is not None and stage_of(args[0]) not in _stages:
                return None
            if weights:  # each conv runs at one stage, and rounding twice changes nothing
                with torch.no_grad():
                    module.weight.copy_(_bf16(module.weight))
                    if module.bias is not None:
                        module.bias.copy_(_bf16(module.bias))
            if not inputs:
                return None
            return tuple(_bf16(a) if isinstance(a, torch.Tensor) else a for a in args)

        def post(module, args, out, _stages=stages):
            if not outputs or (_stages is not None and stage_of(args[0]) not in _stages):
                return None
            return _bf16(out)

        m.register_forward_pre_hook(pre)
        m.register_forward_hook(post)
    return vae


class Diffusers:
    """diffusers' `decode` of a (possibly hooked) VAE copy, as a stream-like decoder."""

    def __init__(self, vae: AutoencoderKLWan, device: str, dtype: torch.dtype = torch.float32):
        self.vae, self.device, self.dtype = vae.to(device, dtype), device, dtype

    def stream(self, z: torch.Tensor):
        mean = torch.tensor(self.vae.config.latents_mean).view(-1, 1, 1, 1)
        std = torch.tensor(self.vae.config.latents_std).view(-1, 1, 1, 1)
        x = (z * std + mean).unsqueeze(0).to(self.device, self.dtype)
        with torch.no_grad():
            yield self.vae.decode(x).sample[0]


def decode(decoder, z: torch.Tensor) -> torch.Tensor:
    return torch.cat(list(decoder.stream(z)), dim=1).float().cpu()


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).norm() / ref.norm()).item()


def variants(vae: AutoencoderKLWan, latent_w: int, device: str):
    """(name, decoder) pairs, built lazily so that one model copy lives at a time."""
    bf16 = torch.bfloat16
    yield "diffusers bf16", lambda: Diffusers(copy.deepcopy(vae), device, bf16)
    yield "framefarm bf16", lambda: WanDecoder.from_vae(vae, device=device, dtype=bf16)
    for name, inputs, outputs in [("conv in+out", True, True), ("conv in", True, False),
                                  ("weights only", False, False)]:
        yield name, lambda i=inputs, o=outputs: Diffusers(
            rounded_copy(vae, latent_w, inputs=i, outputs=o, weights=True), device)
    for k in range(STAGES):
        yield f"stage {k}", lambda k=k: Diffusers(
            rounded_copy(vae, latent_w, inputs=True, outputs=True, weights=True, stages={k}), device)


def main(argv=None) -> int:
    args = parse_args(argv)
    with ieee_fp32():  # an fp32 reference that is fp32 (the decoder turns TF32 off for its own fp32 steps)
        return measure(args)


def measure(args) -> int:
    rows, t0 = [], time.perf_counter()
    for seed in args.seed_list:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            cfg = tiny_wan_config("2.1") if args.config == "tiny2.1" else {}
            vae = AutoencoderKLWan.from_config(cfg).eval() if cfg else AutoencoderKLWan().eval()
        g = torch.Generator().manual_seed(seed + 20)
        z = torch.randn(vae.config.z_dim, args.frames, args.latent_h, args.latent_w, generator=g)
        ref = decode(Diffusers(copy.deepcopy(vae), args.device), z)
        row = {"seed": seed}
        for name, build in variants(vae, args.latent_w, args.device):
            row[name] = rel(decode(build(), z), ref)
        rows.append(row)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.2e}" for k, v in row.items() if k != "seed"), flush=True)
    names = [k for k in rows[0] if k != "seed"]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in names}
    result = {
        "config": args.config, "latent": [args.latent_w, args.latent_h], "frames": args.frames,
        "device": args.device, "guard": GUARD, "rows": rows, "mean": mean,
        "torch": torch.__version__, "machine": platform.node(), "seconds": time.perf_counter() - t0,
    }
    write_json(args.json, result)
    print(f"\nrelative L2 error against fp32 (TF32 off), {args.config}, latents {args.latent} x "
          f"{args.frames}, guard {GUARD:g}")
    print(f"{'variant':<22}" + "".join(f"{'seed ' + str(r['seed']):>11}" for r in rows) + f"{'mean':>11}")
    for k in names:
        print(f"{k:<22}" + "".join(f"{r[k]:>11.2e}" for r in rows) + f"{mean[k]:>11.2e}")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

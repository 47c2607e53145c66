"""The Wan VAE decoder (Wan 2.1 VAE, Wan 2.2 TI2V VAE): one explicit streaming step over explicit state.

`WanDecoder.step(state, latent)` decodes one normalized latent frame (CHW) into pixel
frames (CFHW in [-1, 1]: 1 frame on a stream's first call, 4 after), continuing the
stream whose causal history `state` (a `StreamState`) holds: per causal convolution, its
last 2 input frames. The forward pass is written out here, layer by layer in diffusers'
order, over the weights of diffusers' `AutoencoderKLWan` (the weight format and the test
reference; diffusers itself is not imported here: a worker starts without it, see
actors/wan_weights.py); its structure comes from `actors.wan_topology`, which also gives
the receptive field, the context depths, the weights' shapes and the cost model.

Pruned context is the same step told to run only its first `convs` causal convolutions:
a context latent warms the history of the convs that a shard's first frames depend on
(`wan_topology.Topology.context_depths`) and returns nothing.

Options (`DecoderOptions`, defaults by device: the fastest measured on CUDA, eager on CPU):
- `channels_last`: weights, buffers and activations channels-last, where cuDNN's bf16
  convolutions run fastest and the norms' channel reductions are contiguous;
- `conv_buffer`: each causal conv owns a buffer of [2 history frames + a steady step's
  input]; the norm before it writes into the buffer, the conv reads it with its own
  spatial padding, the last 2 frames then move to the front: no concatenation, clone or
  padded copy per step, and fixed addresses, which CUDA graphs need;
- `compile`: the elementwise work between convolutions (residual add + norm + SiLU into
  the next buffer, time interleave + nearest upsample, attention, output) as small
  `torch.compile`d regions; the convolutions stay cuDNN calls. Regional: compiling the
  whole decoder hit dynamo's recompile limit (DESIGN.md);
- `cuda_graphs`: a stream's steady step captured once and replayed (needs `conv_buffer`);
- `bias_in_reader`: each convolution runs without its bias, and the elementwise region that
  reads its output adds it. cuDNN has no bias: torch adds it after the convolution in a
  pass of its own over the output, about 12 GB of memory traffic per steady 720p step
  (docs/benchmarks.md). oneDNN (the CPU) adds it in the convolution's accumulator, so
  there it stays off: it would save nothing and cost bf16 one more rounding.
A stream's first call and pruned-context calls always run eagerly (once per stream).

Precision. The RMS norm, its gain and the SiLU are computed in fp32 and rounded once (the
reduction read straight from the input): diffusers rounds the normalized value to the
dtype before the gain, so in bf16 this is more accurate, in fp32 the same within
rounding. In fp32 the step turns TF32 off for its convolutions and matmuls (cuDNN's
default allows TF32 for fp32 convs, which costs about 1e-3 of relative error and made
the old GPU tests fail at 9.2e-4): fp32 means diffusers' fp32 decode within 1e-5. bf16
is the fast mode and is not affected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from actors.wan_topology import CACHE_FRAMES, Layer, Res, Topology, Up, topology, variant_name
from actors.wan_weights import (CONFIG_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME,  # noqa: F401
                                random_decoder_weights, read_wan_vae)
EPS = 1e-12  # F.normalize's: a zero vector stays zero, as in diffusers
# A probe sees (event, stage): "stage" where a stage begins, "conv" / "glue" around each
# convolution, "end" after the step's last kernel (benchmarks time these with CUDA events).
Probe = Callable[[str, int], None]


@dataclass(frozen=True)
class DecoderOptions:
    channels_last: bool = False
    conv_buffer: bool = True
    compile: bool = False
    compile_mode: str = "default"  # or "max-autotune-no-cudagraphs"
    cuda_graphs: bool = False
    graph_warmup: int = 2  # steady eager steps before a stream's capture (cuDNN autotune, compile)
    bias_in_reader: bool = False  # each conv's bias added by the region that reads its output

    def __post_init__(self):
        if self.cuda_graphs and not self.conv_buffer:
            raise ValueError("cuda_graphs needs conv_buffer: a graph replays on fixed buffer addresses")
        if self.graph_warmup < 1:
            raise ValueError("graph_warmup must be >= 1: a capture must not be a kernel's first run")

    @classmethod
    def for_device(cls, device: str | torch.device) -> DecoderOptions:
        """CUDA: the fastest measured (76 ms against diffusers' 188 per steady 720p latent, H200,
        bf16, docs/benchmarks.md); elsewhere eager (compiling costs minutes on a small CPU)."""
        if torch.device(device).type == "cuda":
            return cls(channels_last=True, conv_buffer=True, compile=True, cuda_graphs=True, bias_in_reader=True)
        return cls()


@dataclass
class StreamState:
    """One stream's causal history: per causal conv (by slot), its buffer or its last 2 input frames."""

    history: list[torch.Tensor | None]
    calls: int = 0  # latent frames taken, context included; the first call is special
    full_steps: int = 0  # steady steps run eagerly in full (a CUDA graph is captured after some)
    latent_size: tuple[int, int] | None = None
    graph: Any = None
    static_in: torch.Tensor | None = None
    static_out: torch.Tensor | None = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.history if t is not None)


# ---------------------------------------------------------------------------------------
# Elementwise regions: pure functions of tensors (plus `out` views they fill), so that the
# same code runs eagerly or compiled, one compiled graph serving every layer of a shape.
# Activations travel as (a, b, c) triples meaning a + c + b: a a convolution's output, c
# its pending per-channel bias (`bias_in_reader`), b a pending residual (each None where
# absent), so that a block's residual add and a conv's bias fuse into whatever reads them.


def _sum(a, b, c):
    """a + c + b, in the order diffusers computes it (the conv's bias first, then the residual)."""
    s = a if c is None else a + c
    return s if b is None else s + b


def _norm(s: torch.Tensor, gamma: torch.Tensor, dim: int) -> torch.Tensor:
    """RMS norm over `dim` times the gain (sqrt(C) folded in), in fp32: nothing rounded yet."""
    inv = torch.linalg.vector_norm(s, dim=dim, keepdim=True, dtype=torch.float32).clamp_min(EPS).reciprocal()
    return s * inv * gamma


def _norm_act(a, b, c, gamma, out):
    """s = a + c + b; silu(norm(s)) into `out` (or a new tensor). Returns (s, activated)."""
    s = _sum(a, b, c)
    n = F.silu(_norm(s, gamma, 1))
    if out is None:
        return s, n.to(s.dtype)
    out.copy_(n)
    return s, out


def _add_into(a, b, c, out):
    s = _sum(a, b, c)
    if out is None:
        return s
    out.copy_(s)
    return out


def _up_frames(a, b, bias, time_split: bool, cl: bool) -> torch.Tensor:
    """(1, C', T, H, W) -> (T', C, 2H, 2W) frames, nearest 2x, in one copy.

    With `time_split` the input is a time upsampler's conv output: C' = 2C, and frame 2t+i
    is channels [iC, (i+1)C) of frame t (diffusers' reshape-and-stack). Nearest-exact at
    scale 2 repeats each pixel, in any dtype.
    """
    x = _sum(a, b, bias)
    _, c, t, h, w = x.shape
    if cl:
        p = x[0].permute(1, 2, 3, 0)  # T, H, W, C': a view of channels-last memory
        if time_split:
            c //= 2
            q = p.reshape(t, h, w, 2, c).permute(0, 3, 1, 2, 4)[:, :, :, None, :, None, :]
            q = q.expand(t, 2, h, 2, w, 2, c).reshape(2 * t, 2 * h, 2 * w, c)
        else:
            q = p[:, :, None, :, None, :].expand(t, h, 2, w, 2, c).reshape(t, 2 * h, 2 * w, c)
        return q.permute(0, 3, 1, 2)  # channels-last NCHW frames, no copy
    p = x[0]
    if time_split:
        c //= 2
        q = p.reshape(2, c, t, h, w).permute(2, 0, 1, 3, 4)[..., :, None, :, None]
        return q.expand(t, 2, c, h, 2, w, 2).reshape(2 * t, c, 2 * h, 2 * w)
    q = p.permute(1, 0, 2, 3)[:, :, :, None, :, None]
    return q.expand(t, c, h, 2, w, 2).reshape(t, c, 2 * h, 2 * w)


def _attention(a, b, bias, gamma, w_qkv, b_qkv, w_proj, b_proj, cl: bool) -> torch.Tensor:
    """diffusers' WanAttentionBlock: per frame, one head over all H x W positions, plus identity.
    The 1x1 convs as matmuls over (positions, channels) rows (their bias in the matmul's epilogue)."""
    x = _sum(a, b, bias)
    _, c, t, h, w = x.shape
    rows = x[0].permute(1, 2, 3, 0).reshape(t, h * w, c)
    n = _norm(rows, gamma, -1).to(x.dtype)
    q, k, v = F.linear(n, w_qkv, b_qkv).unsqueeze(1).chunk(3, dim=-1)
    o = F.linear(F.scaled_dot_product_attention(q, k, v).squeeze(1), w_proj, b_proj) + rows
    out = o.reshape(t, h, w, c).permute(3, 0, 1, 2).unsqueeze(0)
    return out if cl else out.contiguous()


def _dup(a, b, c, cout: int, f_t: int, f_s: int, first: bool, cl: bool) -> torch.Tensor:
    """diffusers' DupUp3D: channels repeated, then moved into f_t frames and f_s x f_s pixels;
    a stream's first call keeps its last frame only."""
    x = _sum(a, b, c)
    _, cin, t, h, w = x.shape
    x = x.repeat_interleave(cout * f_t * f_s * f_s // cin, dim=1)
    x = x.view(1, cout, f_t, f_s, f_s, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    x = x.reshape(1, cout, t * f_t, h * f_s, w * f_s)
    if first:
        x = x[:, :, f_t - 1 :]
    return x.contiguous(memory_format=torch.channels_last_3d if cl else torch.contiguous_format)


def _finish(y: torch.Tensor, bias: torch.Tensor | None, patch: int) -> torch.Tensor:
    """(1, C, F, H, W) conv output (and its pending bias) -> contiguous CFHW in [-1, 1],
    unpatchified as diffusers does."""
    y = _sum(y, None, bias)
    if patch > 1:
        _, cp, f, h, w = y.shape
        y = y.reshape(1, cp // patch ** 2, patch, patch, f, h, w).permute(0, 1, 4, 5, 3, 6, 2)
        y = y.reshape(1, cp // patch ** 2, f, h * patch, w * patch)
    return y.clamp(-1.0, 1.0)[0].contiguous()


@dataclass(frozen=True)
class _Fns:
    norm_act: Any
    add_into: Any
    up_frames: Any
    attention: Any
    dup: Any
    finish: Any


_EAGER = _Fns(_norm_act, _add_into, _up_frames, _attention, _dup, _finish)
# Compiled regions by mode, shared by every decoder of the process: dynamo keys its cache on
# the code object and the backend, so decoders compiling their own would each recompile.
_COMPILED: dict[str, _Fns] = {}


def compiled_fns(mode: str) -> _Fns:
    if mode not in _COMPILED:
        cfg = torch._dynamo.config  # one graph per (region, shapes): about 20, more than the default 8
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(int(getattr(cfg, name)), 256))
        _COMPILED[mode] = _Fns(*(torch.compile(fn, mode=mode, dynamic=False, fullgraph=True)
                                 for fn in dataclasses.astuple(_EAGER)))
    return _COMPILED[mode]


def _shift(view: torch.Tensor, t: int) -> None:
    """Move the last CACHE_FRAMES frames of a buffer to its front: the next step's history."""
    if t >= CACHE_FRAMES:
        view[:, :, :CACHE_FRAMES].copy_(view[:, :, t : t + CACHE_FRAMES])
    else:
        for i in range(CACHE_FRAMES):  # overlapping ranges: frame by frame, front first
            view[:, :, i].copy_(view[:, :, i + t])


@contextlib.contextmanager
def ieee_fp32():
    """TF32 off for cuDNN convolutions and CUDA matmuls inside the block, restored after:
    torch's precision API where it exists (2.9 and later), the allow_tf32 flags before it."""
    conv, mm = getattr(torch.backends.cudnn, "conv", None), torch.backends.cuda.matmul
    if hasattr(conv, "fp32_precision") and hasattr(mm, "fp32_precision"):
        saved = conv.fp32_precision, mm.fp32_precision
        conv.fp32_precision = mm.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, mm.fp32_precision = saved
        return
    saved = torch.backends.cudnn.allow_tf32, mm.allow_tf32
    torch.backends.cudnn.allow_tf32 = mm.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, mm.allow_tf32 = saved


class _Stop(Exception):
    """The rest of this step serves only convs that this (pruned-context) step does not run."""


# ---------------------------------------------------------------------------------------
# One step


class _Step:
    """One call of the decoder's forward over one latent frame, cut before slot `limit`."""

    def __init__(self, dec: WanDecoder, st: StreamState, first: bool, limit: int, fns: _Fns, probe: Probe | None):
        self.dec, self.st, self.first, self.limit, self.f, self.probe = dec, st, first, limit, fns, probe
        self.cl = dec.options.channels_last
        self.stage = -1

    def need(self, x: Layer) -> None:
        if x.pays >= self.limit:
            raise _Stop
        if self.probe is not None and x.stage != self.stage:
            self.stage = x.stage
            self.probe("stage", x.stage)

    def conv(self, x: Layer, inp: torch.Tensor, padding=0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The convolution and its bias still to add ((1, C, 1, 1, 1), or None: added already)."""
        w, b = self.dec.weights[x.name]
        later = self.dec.options.bias_in_reader
        if self.probe is not None:
            self.probe("conv", x.stage)
        y = (F.conv3d if len(x.kernel) == 3 else F.conv2d)(inp, w, None if later else b.flatten(), padding=padding)
        if self.probe is not None:
            self.probe("glue", x.stage)
        return y, (b if later else None)

    def run(self, z: torch.Tensor) -> torch.Tensor:
        dec, top = self.dec, self.dec.topology
        self.need(top.post_quant)
        # WanPipeline's un-normalization, in the decoder's dtype.
        x = (z / dec.inv_std + dec.mean)[None, :, None].contiguous(memory_format=dec.fmt5)
        x, c = self.conv(top.post_quant, x)
        y, _ = self.causal(top.conv_in, (x, None, c), None)
        act = (y[0], None, y[1])
        res0, attn, res1 = top.mid
        act = self.res(res0, act)
        self.need(attn)
        act = (self.f.attention(*act, *dec.weights[attn.name], self.cl), None, None)
        act = self.res(res1, act)
        for up in top.ups:
            block_in = act
            for r in up.resnets:
                act = self.res(r, act)
            if up.conv2d is not None:
                act = self.upsample(up, act)
            if up.dup is not None:
                self.need(up.dup)
                short = self.f.dup(*block_in, up.dup.out_channels, *up.dup.kernel, self.first, self.cl)
                act = (act[0], short, act[2])  # added by the next reader, as diffusers adds it here
        y, _ = self.causal(top.conv_out, act, top.norm_out)
        out = self.f.finish(*y, top.patch_size)
        if self.probe is not None:
            self.probe("end", top.conv_out.stage)
        return out

    def res(self, r: Res, act):
        (y, c), s = self.causal(r.conv1, act, r.norm1)
        h, ch = (s, None) if r.shortcut is None else self.conv(r.shortcut, s)
        (y, c), _ = self.causal(r.conv2, (y, None, c), r.norm2)
        # The residual add is left to the next reader, with both biases in one: (1, C, 1, 1, 1).
        return (y, h, c if ch is None else ch if c is None else c + ch)

    def upsample(self, up: Up, act) -> tuple[torch.Tensor, None, torch.Tensor | None]:
        if up.time_conv is not None and not self.first:
            # On a stream's first call diffusers marks the time conv "Rep" and skips it: its
            # history stays zeros, exactly a fresh buffer's.
            (y, c), _ = self.causal(up.time_conv, act, None)
            self.need(up.conv2d)
            frames = self.f.up_frames(y, None, c, True, self.cl)
        else:
            self.need(up.conv2d)
            frames = self.f.up_frames(*act, False, self.cl)
        out, c = self.conv(up.conv2d, frames, padding=1)  # (T, C, 2H, 2W)
        return (out.permute(1, 0, 2, 3).unsqueeze(0), None, c)  # (1, C, T, 2H, 2W): channels-last 3-D if cl

    def causal(self, x: Layer, act, norm: Layer | None):
        """A causal conv over [its 2 history frames, the new ones]; returns ((output, its bias), s),
        s = a + c + b.

        Its input is silu(norm(s)) with `norm`, else s.
        """
        self.need(x)
        dec, (a, b, c) = self.dec, act
        t = a.shape[2]
        gamma = dec.weights[norm.name] if norm is not None else None
        pad = (0, x.kernel[1] // 2, x.kernel[2] // 2)
        hist = self.st.history[x.slot]
        if dec.options.conv_buffer:
            if hist is None:  # zeros stand for the frames before the stream began, as in diffusers
                shape = (1, a.shape[1], CACHE_FRAMES + x.time_scale, a.shape[3], a.shape[4])
                hist = torch.zeros(shape, device=dec.device, dtype=dec.dtype).contiguous(memory_format=dec.fmt5)
                self.st.history[x.slot] = hist
            view = hist if t == x.time_scale else hist[:, :, : CACHE_FRAMES + t]
            dst = view[:, :, CACHE_FRAMES:]
            s = self.f.norm_act(a, b, c, gamma, dst)[0] if norm is not None else self.f.add_into(a, b, c, dst)
            y = self.conv(x, view, pad)
            _shift(view, t)
            return y, s
        s, n = self.f.norm_act(a, b, c, gamma, None) if norm is not None else (None, self.f.add_into(a, b, c, None))
        n = F.pad(n, (0, 0, 0, 0, CACHE_FRAMES, 0)) if hist is None else torch.cat([hist, n], dim=2)
        self.st.history[x.slot] = n[:, :, -CACHE_FRAMES:].clone()
        return self.conv(x, n, pad), s


# ---------------------------------------------------------------------------------------
# The decoder


class WanDecoder:
    """A `Decoder` (actors/decoders.py) over a Wan VAE's decoder weights.

    `config` is the VAE's config.json (a diffusers `AutoencoderKLWan` config); `weights`
    holds at least every `decoder.*` and `post_quant_conv.*` tensor of its state dict
    (others, the encoder's, are ignored), each checked against the topology. `options`
    None: `DecoderOptions.for_device(device)`.
    """

    def __init__(self, config: Mapping[str, Any], weights: Mapping[str, torch.Tensor],
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 options: DecoderOptions | None = None):
        self.config = dict(config)
        self.device, self.dtype = torch.device(device), dtype
        self.options = DecoderOptions.for_device(self.device) if options is None else options
        if self.options.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs needs a CUDA device")
        self.topology: Topology = topology(self.config)
        top = self.topology
        self.name = variant_name(self.config)
        self.z_dim, self.spatial_scale, self.time_scale = top.z_dim, top.spatial_scale, top.time_scale
        self.receptive_field, self.first_exact_frame = top.receptive_field, top.first_exact_frame
        self.fmt5 = torch.channels_last_3d if self.options.channels_last else torch.contiguous_format
        self.weights = self._load(weights)
        mean = torch.tensor(self.config["latents_mean"], dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.config["latents_std"], dtype=torch.float32).view(-1, 1, 1)
        if mean.shape[0] != self.z_dim or std.shape[0] != self.z_dim:
            raise ValueError(f"latents_mean/std have {mean.shape[0]}/{std.shape[0]} entries, z_dim is {self.z_dim}")
        # WanPipeline's order: std to the dtype, its reciprocal in the dtype, then
        # latents / (1/std) + mean; in bf16 this matches the pipeline's own decode bit for bit.
        self.mean = mean.to(self.device, dtype)
        self.inv_std = 1.0 / std.to(self.device, dtype)
        self._compiled: _Fns | None = None  # on first use: building it imports torch._dynamo

    @property
    def _fns(self) -> _Fns:
        if not self.options.compile:
            return _EAGER
        if self._compiled is None:
            self._compiled = compiled_fns(self.options.compile_mode)
        return self._compiled

    @classmethod
    def from_vae(cls, vae: Any, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, options: DecoderOptions | None = None) -> WanDecoder:
        """The decoder over a diffusers `AutoencoderKLWan`'s config and weights (tests, benchmarks)."""
        return cls(vae.config, vae.state_dict(), device=device, dtype=dtype, options=options)

    def __repr__(self) -> str:
        return (f"WanDecoder({self.name}, receptive_field={self.receptive_field}, {self.options}, "
                f"device={self.device}, dtype={self.dtype})")

    def _load(self, weights: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
        """Per layer name, its tensors on the device, in the step's layout; every decoder weight
        must be used, with the topology's shape."""
        used: set[str] = set()
        expected = self.topology.weight_shapes()  # diffusers' shapes; `shape` below is the step's layout

        def get(key: str, shape: tuple[int, ...], fmt=None, dtype=None) -> torch.Tensor:
            if key not in weights:
                raise ValueError(f"Wan VAE weights lack {key!r} (the config describes another decoder)")
            t = weights[key]
            if tuple(t.shape) != expected[key]:
                raise ValueError(f"Wan VAE weight {key} has shape {tuple(t.shape)}, the config implies {expected[key]}")
            used.add(key)
            t = t.detach().reshape(shape).to(self.device, dtype or self.dtype)
            return t.contiguous(memory_format=fmt) if fmt is not None else t

        out: dict[str, tuple] = {}
        fmt4 = torch.channels_last if self.options.channels_last else None
        for x in self.topology.layers:
            if x.kind in ("conv", "conv2d"):
                fmt = (self.fmt5 if x.kind == "conv" else fmt4) if self.options.channels_last else None
                # The bias shaped for the (1, C, T, H, W) activations its reader adds it to.
                out[x.name] = (get(f"{x.name}.weight", (x.out_channels, x.in_channels, *x.kernel), fmt),
                               get(f"{x.name}.bias", (x.out_channels,)).view(1, -1, 1, 1, 1))
            elif x.kind == "norm":  # gain in fp32 with sqrt(C) folded in, shaped for NCTHW
                c = x.in_channels
                out[x.name] = get(f"{x.name}.gamma", (c, 1, 1, 1), dtype=torch.float32).view(1, c, 1, 1, 1) * c ** 0.5
            elif x.kind == "attention":
                c = x.in_channels
                out[x.name] = (get(f"{x.name}.norm.gamma", (c,), dtype=torch.float32) * c ** 0.5,
                               get(f"{x.name}.to_qkv.weight", (3 * c, c)), get(f"{x.name}.to_qkv.bias", (3 * c,)),
                               get(f"{x.name}.proj.weight", (c, c)), get(f"{x.name}.proj.bias", (c,)))
        unused = sorted(k for k in weights if k.startswith(("decoder.", "post_quant_conv.")) and k not in used)
        if unused:
            raise ValueError(f"Wan VAE weights the config does not describe: {', '.join(unused[:3])}"
                             f"{' ...' if len(unused) > 3 else ''}")
        return out

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.weights.values()
                   for t in (ts if isinstance(ts, tuple) else (ts,)))

    # -- streaming -------------------------------------------------------------------------

    def new_state(self) -> StreamState:
        return StreamState(history=[None] * len(self.topology.convs))

    def step(self, state: StreamState, latent_frame: torch.Tensor, convs: int | None = None,
             probe: Probe | None = None) -> torch.Tensor | None:
        """Decode one normalized CHW latent frame: CFHW in [-1, 1] on `device` (1 or 4 frames).

        With `convs`, only the first `convs` causal convs run (pruned context: their history
        is warmed and nothing is returned). `probe` sees the step's stages and convolutions
        (an instrumented eager step: no CUDA graph).
        """
        if latent_frame.dim() != 3 or latent_frame.shape[0] != self.z_dim:
            raise ValueError(f"expected a ({self.z_dim}, h, w) latent frame, got {tuple(latent_frame.shape)}")
        size = tuple(latent_frame.shape[1:])
        if state.latent_size is None:
            state.latent_size = size
        elif size != state.latent_size:
            raise ValueError(f"stream started at latent size {state.latent_size}, got {size}")
        n = len(self.topology.convs)
        limit = n if convs is None else max(0, min(convs, n))
        first = state.calls == 0
        # no_grad rather than inference_mode: inference tensors would refuse the caller's
        # in-place ops outside the mode (a uint8 conversion with add_/mul_).
        fp32 = self.dtype == torch.float32 and self.device.type == "cuda"
        with torch.no_grad(), ieee_fp32() if fp32 else contextlib.nullcontext():
            z = latent_frame.to(self.device, self.dtype, non_blocking=True)
            if limit < n:
                out = self._run(state, z, first, limit, probe) if limit > 0 else None
            elif (self.options.cuda_graphs and probe is None and not first
                  and state.full_steps >= self.options.graph_warmup):
                out = self._graph_step(state, z)
            else:
                out = self._run(state, z, first, limit, probe)
                state.full_steps += not first
        state.calls += 1
        return out

    def _run(self, st: StreamState, z: torch.Tensor, first: bool, limit: int, probe: Probe | None):
        try:
            return _Step(self, st, first, limit, _EAGER if first else self._fns, probe).run(z)
        except _Stop:
            return None

    def _graph_step(self, st: StreamState, z: torch.Tensor) -> torch.Tensor:
        if st.graph is None:
            st.static_in = z.clone()
            graph = torch.cuda.CUDAGraph()
            # Capture records without running: the replay below is this call's one step.
            # Thread-local: a stream's capture comes at its third steady step, mid-shard, while
            # the pipeline's host thread waits on copy events (and NVENC, where present, runs
            # CUDA calls of its own); in the default global mode any such call from another
            # thread fails the capture ("operation not permitted when stream is capturing",
            # tests/test_gpu.py on an H200, docs/benchmarks.md).
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                st.static_out = _Step(self, st, False, len(self.topology.convs), self._fns, None).run(st.static_in)
            st.graph = graph
        else:
            st.static_in.copy_(z)
        st.graph.replay()
        # A fresh tensor: the caller may still be copying this chunk to the host when the
        # next replay overwrites the static one.
        return st.static_out.clone()

    def stream(self, latents: torch.Tensor, context: int = 0) -> Iterator[torch.Tensor]:
        """Decode CTHW normalized latents with a fresh state; yield CFHW chunks (1 frame for a
        stream's first latent, 4 for every other).

        The first `context` latents are left context only: each runs only the convs that a
        shard's frames depend on (pruned context), and yields nothing; the chunks of the
        rest are those of a fresh stream over all of `latents`.
        """
        if latents.dim() != 4 or latents.shape[0] != self.z_dim:
            raise ValueError(f"expected CTHW latents with {self.z_dim} channels, got {tuple(latents.shape)}")
        if context and not 0 < context < latents.shape[1]:
            raise ValueError(f"context {context} must be in [0, {latents.shape[1]}) latent frames")
        return self._stream(latents, context)

    def _stream(self, latents: torch.Tensor, context: int) -> Iterator[torch.Tensor]:
        state = self.new_state()
        depths = self.topology.context_depths()
        for j in range(context):
            # The convs whose depth reaches back to context latent j: a prefix of the step.
            self.step(state, latents[:, j], convs=sum(d >= context - j for d in depths))
        for i in range(context, latents.shape[1]):
            yield self.step(state, latents[:, i])

    # -- cost model (actors.wan_topology) --------------------------------------------------

    def _element_size(self) -> int:
        return torch.tensor([], dtype=self.dtype).element_size()

    def cache_bytes(self, height: int, width: int) -> int:
        return self.topology.cache_bytes(height, width, self._element_size(), self.options.conv_buffer)

    def peak_memory_bytes(self, height: int, width: int) -> int:
        return self.topology.peak_memory_bytes(height, width, self._element_size(), self.options.conv_buffer)

    def decode_flops_per_latent(self, height: int, width: int, first: bool = False) -> float:
        return self.topology.flops_per_latent(height, width, first)


# ---------------------------------------------------------------------------------------
# Construction


def tiny_wan_config(variant: str = "2.1") -> dict:
    """A tiny but complete Wan VAE config (same topology as the real one, narrow and shallow).

    "2.1": z_dim 16, like the Wan 2.1 VAE; "2.2": z_dim 48, patch_size 2, residual up
    blocks, like the Wan 2.2 TI2V-5B VAE. Channels are 8 rather than diffusers' test 3, so
    that no stage is 1 channel wide (an RMS norm over 1 channel is just a sign).
    """
    if variant == "2.1":
        z_dim, extra = 16, {}
    elif variant == "2.2":
        z_dim, extra = 48, {"is_residual": True, "patch_size": 2, "in_channels": 12,
                            "out_channels": 12, "scale_factor_spatial": 16}
    else:
        raise ValueError(f"unknown variant {variant!r}; use '2.1' or '2.2'")
    g = torch.Generator().manual_seed(1234)
    mean = (torch.randn(z_dim, generator=g) * 0.5).tolist()
    std = (torch.rand(z_dim, generator=g) + 0.5).tolist()
    return {
        "base_dim": 8,
        "z_dim": z_dim,
        "dim_mult": [1, 1, 1, 1],
        "num_res_blocks": 1,
        "temperal_downsample": [False, True, True],
        "latents_mean": [round(v, 4) for v in mean],
        "latents_std": [round(v, 4) for v in std],
        **extra,
    }


def wan21_config() -> dict:
    """The Wan 2.1 VAE (used by Wan 2.1 and Wan 2.2 A14B): diffusers' `AutoencoderKLWan()`
    default config, its latents_mean/std included, written out so that no diffusers import
    is needed to build it."""
    return {
        "base_dim": 96, "decoder_base_dim": None, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
        "attn_scales": [], "temperal_downsample": [False, True, True], "dropout": 0.0,
        "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                         0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
        "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916],
        "is_residual": False, "in_channels": 3, "out_channels": 3, "patch_size": None,
        "scale_factor_temporal": 4, "scale_factor_spatial": 8,
    }


def ti2v_config() -> dict:
    """The Wan 2.2 TI2V-5B VAE architecture (z_dim 48, patch_size 2, 16x spatial).

    For random-weight benchmarks only: the real model's latents_mean/std ship with its
    weights (config.json), so here they are the identity normalization.
    """
    return {
        "base_dim": 160,
        "decoder_base_dim": 256,
        "z_dim": 48,
        "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "temperal_downsample": [False, True, True],
        "is_residual": True,
        "in_channels": 12,
        "out_channels": 12,
        "patch_size": 2,
        "scale_factor_spatial": 16,
        "latents_mean": [0.0] * 48,
        "latents_std": [1.0] * 48,
    }


def random_wan_decoder(config: dict | None = None, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32, seed: int = 0,
                       options: DecoderOptions | None = None) -> WanDecoder:
    """A decoder with random weights (`wan_weights.random_decoder_weights`: PyTorch's default
    init, as diffusers', but not diffusers' values for the same seed); `config=None` is the
    Wan 2.1 VAE (`wan21_config`)."""
    config = dict(config or wan21_config())
    return WanDecoder(config, random_decoder_weights(config, seed), device=device, dtype=dtype, options=options)


def load_wan_decoder(path: str | os.PathLike, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, options: DecoderOptions | None = None) -> WanDecoder:
    """Load a diffusers-format VAE folder (config.json + safetensors weights); never pickles.

    The variant (Wan 2.1 or 2.2 TI2V) comes from config.json's fields (z_dim, patch_size).
    The decoder's weights go straight onto the device, checked (actors/wan_weights.py).
    """
    config, weights = read_wan_vae(path, device=device, dtype=dtype)
    return WanDecoder(config, weights, device=device, dtype=dtype, options=options)

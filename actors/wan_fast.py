"""A faster streaming Wan VAE decoder: the same weights and the same frames as `WanDecoder`.

`WanDecoder` calls diffusers' modules, whose causal convolutions concatenate the cached
frames with the new ones, clone the cache and pad the result on every call, and whose RMS
norms go through five elementwise passes, several in fp32. On an H200 that makes a steady
720p latent frame cost 193 ms where its convolutions alone need about 60 (DESIGN.md,
"Measured anchors"). `FastWanDecoder` runs its own forward pass over the same submodules'
weights, layer by layer in diffusers' order, with its own cache per stream, and each
change is behind a flag of `FastOptions` so that a benchmark can measure them one at a
time:

- `channels_last`: weights, cache buffers and activations in channels-last layout, where
  cuDNN's bf16 convolutions run fastest and the channel reductions of the norms are
  contiguous.
- `conv_buffer`: every causal conv owns a buffer of [2 cached frames + the frames of a
  steady call]; its producer (the norm and activation before it) writes straight into
  the buffer, the conv reads the buffer with its own spatial padding, and afterwards the
  last 2 frames move to the front. No concatenation, clone or padded copy per call, and
  the cache lives at fixed addresses, which CUDA graphs need.
- `fp32_norm`: the RMS norm, its gain and the SiLU computed in fp32 and rounded once, with
  the reduction read straight from the bf16 input (diffusers rounds the normalized value
  to bf16 before the gain). More accurate; fewer passes only once compiled.
- `compile`: the elementwise work between convolutions (residual add + norm + SiLU into
  the next conv's buffer, time interleave + nearest upsample, the attention block, the
  output clamp) as small `torch.compile`d regions, one kernel each. Regional rather than
  whole-model: whole-decoder compilation hit dynamo's recompile limit (DESIGN.md), and the
  convolutions stay cuDNN calls either way.
- `cuda_graphs`: the steady step of each stream captured once as a CUDA graph and
  replayed, so the ~200 launches of a step cost one. Needs `conv_buffer`.

The first call of a stream (one frame at every stage, time upsamplers skipped) always
runs eagerly: it happens once per stream, and compiling or capturing it would double the
work for nothing. Supports the Wan 2.1 VAE and the Wan 2.2 TI2V VAE (residual up blocks,
patchified output).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    AutoencoderKLWan,
    WanAttentionBlock,
    WanCausalConv3d,
    WanResample,
    WanResidualBlock,
    WanResidualUpBlock,
    WanRMS_norm,
    WanUpBlock,
    unpatchify,
)

from actors.wan import WanDecoder, check_cthw, steps

EPS = 1e-12  # F.normalize's: a zero vector stays zero, as in diffusers


@dataclass(frozen=True)
class FastOptions:
    channels_last: bool = False
    conv_buffer: bool = False
    fp32_norm: bool = False
    compile: bool = False
    compile_mode: str = "default"  # or "max-autotune-no-cudagraphs"
    cuda_graphs: bool = False
    graph_warmup: int = 2  # steady eager calls before a stream's capture (cuDNN autotune, compile)

    def __post_init__(self):
        if self.cuda_graphs and not self.conv_buffer:
            raise ValueError("cuda_graphs needs conv_buffer: a graph replays on fixed cache addresses")
        if self.graph_warmup < 1:
            raise ValueError("graph_warmup must be >= 1: capture must not be the first run of a kernel")


# Cumulative, in the order the benchmark measures them.
PRESETS: dict[str, FastOptions] = {
    "fast-base": FastOptions(),
    "+channels_last": FastOptions(channels_last=True),
    "+conv_buffer": FastOptions(channels_last=True, conv_buffer=True),
    "+fp32_norm": FastOptions(channels_last=True, conv_buffer=True, fp32_norm=True),
    "+compile": FastOptions(channels_last=True, conv_buffer=True, fp32_norm=True, compile=True),
    "+cuda_graphs": FastOptions(channels_last=True, conv_buffer=True, fp32_norm=True, compile=True,
                                cuda_graphs=True),
}


# ---------------------------------------------------------------------------------------
# Elementwise regions: pure functions of tensors (plus `out` views they fill), so that the
# same code runs eagerly or compiled, and one compiled graph serves every layer of a shape.
# Activations travel as (a, b) pairs, b a pending residual (or None), so that a block's
# residual add fuses into whatever reads it next.


def _norm_scale(s: torch.Tensor, gamma: torch.Tensor, dim: int, fp32: bool) -> torch.Tensor:
    """RMS norm over `dim` with the gain (already times sqrt(C)); fp32 result if `fp32`."""
    if fp32:
        inv = torch.linalg.vector_norm(s, dim=dim, keepdim=True, dtype=torch.float32).clamp_min(EPS).reciprocal()
        return s * inv * gamma  # bf16 * fp32 promotes: nothing is rounded until the caller stores
    # diffusers' roundings: normalize in fp32, round to dtype, then the gain in dtype.
    return F.normalize(s.float(), dim=dim).to(s.dtype) * gamma


def _norm_act(a: torch.Tensor, b: torch.Tensor | None, gamma: torch.Tensor, out: torch.Tensor | None,
              fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """s = a + b; silu(norm(s)) into `out` (or a new tensor). Returns (s, normed)."""
    s = a if b is None else a + b
    n = F.silu(_norm_scale(s, gamma, 1, fp32))
    if out is None:
        return s, n.to(s.dtype)
    out.copy_(n)
    return s, out


def _add_into(a: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> None:
    out.copy_(a if b is None else a + b)


def _up_frames(a: torch.Tensor, b: torch.Tensor | None, time_split: bool, cl: bool) -> torch.Tensor:
    """(1, C', T, H, W) -> (T', C, 2H, 2W) frames, nearest 2x, in one copy.

    With `time_split`, the input is a time upsampler's conv output: C' = 2C, and frame 2t+i
    is channels [iC, (i+1)C) of frame t (diffusers' reshape-and-stack). Nearest-exact at
    scale 2 maps output pixel i to input i // 2, the same as repeating each pixel, in any
    dtype (diffusers upsamples in fp32 only because of old kernel gaps).
    """
    x = a if b is None else a + b
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


def _attention(a: torch.Tensor, b: torch.Tensor | None, gamma: torch.Tensor, w_qkv: torch.Tensor,
               b_qkv: torch.Tensor, w_proj: torch.Tensor, b_proj: torch.Tensor, fp32: bool,
               cl: bool) -> torch.Tensor:
    """diffusers' WanAttentionBlock: per frame, one head over all H x W positions, plus identity.

    The 1x1 convs as matmuls over (positions, channels) rows, which channels-last memory
    already is.
    """
    x = a if b is None else a + b
    _, c, t, h, w = x.shape
    rows = x[0].permute(1, 2, 3, 0).reshape(t, h * w, c)
    n = _norm_scale(rows, gamma, -1, fp32).to(x.dtype)
    q, k, v = F.linear(n, w_qkv, b_qkv).unsqueeze(1).chunk(3, dim=-1)
    o = F.scaled_dot_product_attention(q, k, v).squeeze(1)
    o = F.linear(o, w_proj, b_proj) + rows
    out = o.reshape(t, h, w, c).permute(3, 0, 1, 2).unsqueeze(0)
    return out if cl else out.contiguous()


def _finish(y: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(1, C, F, H, W) conv output -> contiguous CFHW in [-1, 1], unpatchified."""
    if patch_size > 1:
        y = unpatchify(y.contiguous(), patch_size=patch_size)
    return y.clamp(-1.0, 1.0)[0].contiguous()


@dataclass(frozen=True)
class _Fns:
    norm_act: Any
    add_into: Any
    up_frames: Any
    attention: Any
    finish: Any


_EAGER = _Fns(_norm_act, _add_into, _up_frames, _attention, _finish)
_COMPILED: dict[tuple, _Fns] = {}


def _raise_recompile_limits(limit: int = 256) -> None:
    """One compiled graph per (function, shapes) pair: a decoder has about 20, more than the default 8."""
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(int(getattr(cfg, name)), limit))


def _compiled_fns(mode: str) -> _Fns:
    # Module-level cache: decoders with the same mode share compiled code instead of each
    # compiling its own (dynamo keys its cache on the code object and the backend).
    if mode not in _COMPILED:
        _raise_recompile_limits()

        def c(fn):
            return torch.compile(fn, mode=mode, dynamic=False, fullgraph=True)

        _COMPILED[mode] = _Fns(*(c(fn) for fn in dataclasses.astuple(_EAGER)))
    return _COMPILED[mode]


# ---------------------------------------------------------------------------------------
# Weights, read once from diffusers' modules


@dataclass
class _CausalConv:
    slot: int  # index of this conv's cache in a stream's state
    weight: torch.Tensor
    bias: torch.Tensor
    history: int  # cached frames it reads: kernel_t - 1 (diffusers' CACHE_T = 2)
    padding: tuple[int, int, int]  # (0, ph, pw): time padding is the cache
    steady_frames: int  # frames a steady call feeds it
    px_scale: int  # pixels per latent pixel along a side at its input
    time_conv: bool  # a time upsampler's conv: skipped on a stream's first call


@dataclass
class _Norm:
    gamma: torch.Tensor  # (1, C, 1, 1, 1) for 5-D input, (C,) for attention rows


@dataclass
class _Res:
    norm1: _Norm
    conv1: _CausalConv
    norm2: _Norm
    conv2: _CausalConv
    shortcut: tuple[torch.Tensor, torch.Tensor] | None  # 1x1x1 conv weight, bias


@dataclass
class _Attn:
    gamma: torch.Tensor
    w_qkv: torch.Tensor
    b_qkv: torch.Tensor
    w_proj: torch.Tensor
    b_proj: torch.Tensor


@dataclass
class _Resample:
    time_conv: _CausalConv | None
    weight: torch.Tensor  # 3x3 conv2d after the nearest 2x upsample
    bias: torch.Tensor


@dataclass
class _Up:
    resnets: list[_Res]
    resample: _Resample | None
    dup: Any = None  # Wan 2.2's DupUp3D shortcut module (stateless), or None


@dataclass
class FastDecodeState:
    """One stream's cache: per causal conv a buffer (or diffusers-style cache), plus its graph."""

    caches: list[Any]
    calls: int = 0
    latent_size: tuple[int, int] | None = None
    graph: Any = None
    static_in: torch.Tensor | None = None
    static_out: torch.Tensor | None = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.caches if isinstance(t, torch.Tensor))


class FastWanDecoder:
    """A `Decoder` over a Wan VAE's decoder weights; `step`/`stream` as `WanDecoder`'s."""

    def __init__(self, source: AutoencoderKLWan | WanDecoder, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, options: FastOptions = FastOptions()):
        ref = source if isinstance(source, WanDecoder) else WanDecoder(source, device=device, dtype=dtype)
        self.ref = ref
        self.options = options
        self.device, self.dtype = ref.device, ref.dtype
        if options.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs needs a CUDA device")
        self.name = ref.name + "-fast"
        self.z_dim, self.patch_size = ref.z_dim, ref.patch_size
        self.spatial_scale, self.time_scale = ref.spatial_scale, ref.time_scale
        self.receptive_field, self.first_exact_frame = ref.receptive_field, ref.first_exact_frame
        self.config = ref.config
        self._fmt5 = torch.channels_last_3d if options.channels_last else torch.contiguous_format
        self._fmt4 = torch.channels_last if options.channels_last else torch.contiguous_format
        self._mean, self._inv_std = ref._mean, ref._inv_std
        self._build(ref)
        self._compiled = _compiled_fns(options.compile_mode) if options.compile else _EAGER

    def __repr__(self) -> str:
        return f"FastWanDecoder({self.name}, {self.options}, device={self.device}, dtype={self.dtype})"

    # -- weights -------------------------------------------------------------------------

    def _w(self, t: torch.Tensor, fmt=None) -> torch.Tensor:
        # Own copies where the layout changes: the wrapped WanDecoder's modules stay as they
        # were (its convs would otherwise follow the weights' layout).
        t = t.detach().to(self.device, self.dtype)
        return t.contiguous(memory_format=fmt) if fmt is not None else t

    def _build(self, ref: WanDecoder) -> None:
        dec = ref.decoder
        steady = {id(op.module): (op.time_scale, op.spatial_scale)
                  for op in ref._ops if op.kind == "conv3d" and op.cached}
        self._convs: list[_CausalConv] = []

        def cconv(m: WanCausalConv3d, time_conv: bool = False) -> _CausalConv:
            kt = m.kernel_size[0]
            if kt - 1 != 2 or tuple(m.stride) != (1, 1, 1) or id(m) not in steady:
                raise ValueError(f"unexpected causal conv in a Wan decoder: {m}")
            c = _CausalConv(len(self._convs), self._w(m.weight, self._fmt5), self._w(m.bias), kt - 1,
                            (0, m._padding[2], m._padding[0]), *steady[id(m)], time_conv)
            self._convs.append(c)
            return c

        def norm(n: WanRMS_norm, rows: bool = False) -> _Norm:
            if not isinstance(n.bias, float) or n.bias != 0.0:
                raise ValueError("RMS norms with a bias are not in the Wan decoders")
            g = n.gamma.detach().to(self.device, torch.float32) * n.scale
            g = g.reshape(-1) if rows else g.reshape(1, -1, 1, 1, 1)
            # The fp32 path multiplies in fp32, diffusers' in dtype; both fold the sqrt(C)
            # scale into the gain (one multiply instead of diffusers' two: a rounding apart).
            return _Norm(g if self.options.fp32_norm else g.to(self.dtype))

        def res(r: WanResidualBlock) -> _Res:
            sc = None
            if isinstance(r.conv_shortcut, WanCausalConv3d):
                sc = (self._w(r.conv_shortcut.weight, self._fmt5), self._w(r.conv_shortcut.bias))
            return _Res(norm(r.norm1), cconv(r.conv1), norm(r.norm2), cconv(r.conv2), sc)

        def resample(m: WanResample | None) -> _Resample | None:
            if m is None:
                return None
            if m.mode not in ("upsample2d", "upsample3d"):
                raise ValueError(f"unexpected resample mode {m.mode!r} in a Wan decoder")
            conv = m.resample[-1]
            tc = cconv(m.time_conv, time_conv=True) if m.mode == "upsample3d" else None
            return _Resample(tc, self._w(conv.weight, self._fmt4), self._w(conv.bias))

        # Same forward order as diffusers' WanDecoder3d.forward.
        self._post_quant = (self._w(ref.post_quant_conv.weight), self._w(ref.post_quant_conv.bias))
        self._conv_in = cconv(dec.conv_in)
        mid = dec.mid_block
        if len(mid.attentions) != 1 or len(mid.resnets) != 2:
            raise ValueError("unexpected mid block in a Wan decoder")
        a: WanAttentionBlock = mid.attentions[0]
        c = a.dim
        self._mid0 = res(mid.resnets[0])
        self._attn = _Attn(norm(a.norm, rows=True).gamma, self._w(a.to_qkv.weight.reshape(3 * c, c)),
                           self._w(a.to_qkv.bias), self._w(a.proj.weight.reshape(c, c)), self._w(a.proj.bias))
        self._mid1 = res(mid.resnets[1])
        self._ups: list[_Up] = []
        for ub in dec.up_blocks:
            if isinstance(ub, WanUpBlock):
                ups = ub.upsamplers[0] if ub.upsamplers is not None else None
                self._ups.append(_Up([res(r) for r in ub.resnets], resample(ups)))
            elif isinstance(ub, WanResidualUpBlock):
                self._ups.append(_Up([res(r) for r in ub.resnets], resample(ub.upsampler), ub.avg_shortcut))
            else:
                raise TypeError(f"unexpected up block {type(ub).__name__} in a Wan decoder")
        self._norm_out = norm(dec.norm_out)
        self._conv_out = cconv(dec.conv_out)
        if len(self._convs) != len(steady):
            raise ValueError("the forward walk missed a cached conv of the decoder")

    # -- streaming -----------------------------------------------------------------------

    def new_state(self) -> FastDecodeState:
        return FastDecodeState(caches=[None] * len(self._convs))

    def step(self, state: FastDecodeState, latent_frame: torch.Tensor) -> torch.Tensor:
        """Decode one normalized CHW latent frame; CFHW in [-1, 1] on `device` (1 or 4 frames)."""
        if latent_frame.dim() != 3 or latent_frame.shape[0] != self.z_dim:
            raise ValueError(f"expected a ({self.z_dim}, h, w) latent frame, got {tuple(latent_frame.shape)}")
        size = tuple(latent_frame.shape[1:])
        if state.latent_size is None:
            state.latent_size = size
        elif size != state.latent_size:
            raise ValueError(f"stream started at latent size {state.latent_size}, got {size}")
        first = state.calls == 0
        with torch.no_grad():
            z = latent_frame.to(self.device, self.dtype, non_blocking=True)
            if self.options.cuda_graphs and state.calls > self.options.graph_warmup:
                out = self._graph_step(state, z)
            else:
                out = self._forward(state, z, first)
        state.calls += 1
        return out

    def stream(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """Decode CTHW normalized latents with a fresh cache; yield CFHW chunks, 1 then 4 frames."""
        check_cthw(latents, self.z_dim)
        return steps(self, self.new_state(), latents)

    def _graph_step(self, state: FastDecodeState, z: torch.Tensor) -> torch.Tensor:
        if state.graph is None:
            state.static_in = z.clone()
            graph = torch.cuda.CUDAGraph()
            # Capture records without running: the replay below is this call's one step.
            with torch.cuda.graph(graph):
                state.static_out = self._forward(state, state.static_in, first=False)
            state.graph = graph
        else:
            state.static_in.copy_(z)
        state.graph.replay()
        # A fresh tensor, not the static output: the caller may still be copying this
        # chunk to the host while the next replay overwrites the static one.
        return state.static_out.clone()

    # -- the forward pass ----------------------------------------------------------------

    def _forward(self, st: FastDecodeState, z: torch.Tensor, first: bool) -> torch.Tensor:
        f = _EAGER if first else self._compiled
        # WanPipeline's un-normalization, in the decoder's dtype (as WanDecoder does).
        x = (z / self._inv_std + self._mean)[None, :, None].contiguous(memory_format=self._fmt5)
        x = F.conv3d(x, *self._post_quant)
        y, _ = self._cconv(st, f, self._conv_in, (x, None), None, first)
        act = self._res(st, f, self._mid0, (y, None), first)
        a = self._attn
        act = (f.attention(*act, a.gamma, a.w_qkv, a.b_qkv, a.w_proj, a.b_proj, self.options.fp32_norm,
                           self.options.channels_last), None)
        act = self._res(st, f, self._mid1, act, first)
        for up in self._ups:
            block_in = act
            for r in up.resnets:
                act = self._res(st, f, r, act, first)
            if up.resample is not None:
                act = (self._resample(st, f, up.resample, act, first), None)
            if up.dup is not None:
                # Wan 2.2's shortcut: stateless, run as diffusers does (not a measured path).
                short = up.dup(_mat(block_in).contiguous(), first_chunk=first)
                act = ((_mat(act) + short).contiguous(memory_format=self._fmt5), None)
        y, _ = self._cconv(st, f, self._conv_out, act, self._norm_out, first)
        return f.finish(y, self.patch_size)

    def _res(self, st, f: _Fns, r: _Res, act, first: bool):
        y, s = self._cconv(st, f, r.conv1, act, r.norm1, first)
        h = s if r.shortcut is None else F.conv3d(s, *r.shortcut)
        y, _ = self._cconv(st, f, r.conv2, (y, None), r.norm2, first)
        return (y, h)  # the residual add is left to the next reader

    def _resample(self, st, f: _Fns, r: _Resample, act, first: bool) -> torch.Tensor:
        cl = self.options.channels_last
        if r.time_conv is not None and not first:
            # diffusers marks the time conv "Rep" on a stream's first call and skips it, so
            # its history stays zeros: exactly a fresh buffer's.
            y, _ = self._cconv(st, f, r.time_conv, act, None, first)
            frames = f.up_frames(y, None, True, cl)
        else:
            frames = f.up_frames(*act, False, cl)
        out = F.conv2d(frames, r.weight, r.bias, padding=1)  # (T, C, 2H, 2W)
        return out.permute(1, 0, 2, 3).unsqueeze(0)  # (1, C, T, 2H, 2W): channels-last 3-D if cl

    def _cconv(self, st: FastDecodeState, f: _Fns, cv: _CausalConv, act, norm: _Norm | None,
               first: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A causal conv over [its 2 cached input frames, the new ones]; returns (output, s).

        Its input is silu(norm(a + b)) when `norm` is given, else a + b; `s` is a + b where a
        caller needs it (a residual block's shortcut).
        """
        a, b = act
        t = a.shape[2]
        hist = cv.history
        if self.options.conv_buffer:
            buf = st.caches[cv.slot]
            if buf is None:
                # Zeros stand for the frames before the stream began, as diffusers' padding does.
                shape = (1, a.shape[1], hist + cv.steady_frames, a.shape[3], a.shape[4])
                buf = torch.empty(shape, device=self.device, dtype=self.dtype, memory_format=self._fmt5).zero_()
                st.caches[cv.slot] = buf
            view = buf if t == cv.steady_frames else buf[:, :, : hist + t]
            dst = view[:, :, hist:]
            s = None
            if norm is not None:
                s, _ = f.norm_act(a, b, norm.gamma, dst, self.options.fp32_norm)
            else:
                f.add_into(a, b, dst)
            y = F.conv3d(view, cv.weight, cv.bias, padding=cv.padding)
            _shift(view, t, hist)
            return y, s
        # diffusers' way: concatenate cache and input, pad, keep a clone of the last frames.
        if norm is not None:
            s, n = f.norm_act(a, b, norm.gamma, None, self.options.fp32_norm)
        else:
            s = n = _mat(act)
        cache = st.caches[cv.slot]
        new_cache = n[:, :, -hist:]
        if new_cache.shape[2] < hist and cache is not None:
            new_cache = torch.cat([cache[:, :, new_cache.shape[2] - hist:], new_cache], dim=2)
        else:
            new_cache = new_cache.clone()
        x = n if cache is None else torch.cat([cache, n], dim=2)
        _, ph, pw = cv.padding
        x = F.pad(x, (pw, pw, ph, ph, hist + t - x.shape[2], 0))
        y = F.conv3d(x, cv.weight, cv.bias)
        st.caches[cv.slot] = new_cache
        return y, s

    # -- cost model ----------------------------------------------------------------------

    def decode_flops_per_latent(self, height: int, width: int, first: bool = False) -> float:
        return self.ref.decode_flops_per_latent(height, width, first)

    def cache_bytes(self, height: int, width: int) -> int:
        """Bytes of a stream's cache: with `conv_buffer`, each buffer also holds a steady call's frames."""
        if not self.options.conv_buffer:
            return self.ref.cache_bytes(height, width)
        p0 = self.ref._stage_pixels(height, width)
        e = torch.tensor([], dtype=self.dtype).element_size()
        return int(sum((c.history + c.steady_frames) * c.weight.shape[1] * p0 * c.px_scale ** 2 * e
                       for c in self._convs))

    def peak_memory_bytes(self, height: int, width: int) -> int:
        """Estimated peak device memory of one stream, weights excluded.

        Not calibrated on a GPU yet: the buffers (exact) plus, at the widest conv, its input,
        the block input, the conv output and cuDNN's workspace; the diffusers-style path
        keeps WanDecoder's calibrated estimate.
        """
        if not self.options.conv_buffer:
            return self.ref.peak_memory_bytes(height, width)
        p0 = self.ref._stage_pixels(height, width)
        e = torch.tensor([], dtype=self.dtype).element_size()
        act = 0
        for c in self._convs:
            unit = c.steady_frames * c.weight.shape[1] * p0 * c.px_scale ** 2 * e
            act = max(act, 12 * unit)
        return int(self.cache_bytes(height, width) + act)


def _mat(act) -> torch.Tensor:
    a, b = act
    return a if b is None else a + b


def _shift(view: torch.Tensor, t: int, hist: int) -> None:
    """Move the last `hist` frames of the buffer to its front: the next call's history."""
    if t >= hist:
        view[:, :, :hist].copy_(view[:, :, t : t + hist])
    else:
        for i in range(hist):  # overlapping ranges: frame by frame, front first
            view[:, :, i].copy_(view[:, :, i + t])

"""The Wan VAE decoder (Wan 2.1 VAE and Wan 2.2 TI2V-5B VAE) as a streaming `Decoder`.

We drive diffusers' `AutoencoderKLWan` modules ourselves, one latent frame per call,
instead of calling `vae.decode()`: that concatenates every chunk on the device (memory
grows with the video's length) and keeps its causal cache in shared module state
(`_feat_map`), so two streams on one model would corrupt each other. Here each stream
owns its cache in a `DecodeState`, and only `post_quant_conv` and `decoder` are used.

The temporal receptive field (latent frames of left context that make a shard decoded
with a fresh cache equal to the monolithic decode) is derived from the module topology
in `stage_receptive_fields` / `receptive_field`, not hard-coded: tests check it against
the experiment, and it comes out at 38 for the real Wan VAEs.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    AutoencoderKLWan,
    WanAttentionBlock,
    WanCausalConv3d,
    WanDecoder3d,
    WanResample,
    unpatchify,
)

from actors.wan_weights import CONFIG_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, decoder_vae, read_wan_vae  # noqa: F401

CACHE_FRAMES = 2  # diffusers' CACHE_T: every cached conv keeps its last 2 input frames
_ACTIVATION_UNITS = 8  # live tensors around the peak conv, in units of its input (measured 7.5)


# ---------------------------------------------------------------------------------------
# Topology: what the decoder does along time and space, read off its modules.


@dataclass(frozen=True)
class _Op:
    """One step of the decoder's forward pass that matters for time, space or cost."""

    kind: str  # "conv3d" | "time_up" | "space_up" | "conv2d" | "attention"
    time_scale: int  # frames per latent frame at the op's input
    spatial_scale: int  # pixels per latent pixel at the op's input (before unpatchify)
    in_channels: int = 0
    out_channels: int = 0
    kernel: tuple[int, ...] = ()
    cached: bool = False  # a causal conv that reads the stream's cache
    time_conv: bool = False  # a time upsampler's conv: skipped on a stream's first call
    module: Any = field(default=None, compare=False, repr=False)


def _decoder_ops(decoder: WanDecoder3d) -> list[_Op]:
    """The decoder's ops in forward order.

    Module registration order is forward order for everything that touches time, with two
    exceptions handled here: inside a `WanResample` the time conv runs before the spatial
    upsample although it is registered after it, and a residual block's 1x1x1
    `conv_shortcut` (registered last, run first) is on a parallel path with no temporal
    reach. Anything this walk does not understand raises rather than guessing.
    """
    ops: list[_Op] = []
    scale = {"t": 1, "s": 1}

    def conv3d(m: WanCausalConv3d, cached: bool, time_conv: bool = False) -> None:
        ops.append(_Op("conv3d", scale["t"], scale["s"], m.in_channels, m.out_channels,
                       tuple(m.kernel_size), cached, time_conv, m))

    def visit(m: torch.nn.Module) -> None:
        if isinstance(m, WanResample):
            if m.mode not in ("upsample2d", "upsample3d"):
                raise ValueError(f"unexpected resample mode {m.mode!r} in a Wan decoder")
            if m.mode == "upsample3d":
                # Each input frame after a stream's first becomes 2 (the time conv doubles the
                # channels, then they are interleaved along time).
                conv3d(m.time_conv, cached=True, time_conv=True)
                ops.append(_Op("time_up", scale["t"], scale["s"], kernel=(2,)))
                scale["t"] *= 2
            ops.append(_Op("space_up", scale["t"], scale["s"], kernel=(2,)))
            scale["s"] *= 2
            conv = m.resample[-1]
            if not isinstance(conv, torch.nn.Conv2d):
                raise ValueError(f"unexpected upsampler layout in a Wan decoder: {m.resample}")
            ops.append(_Op("conv2d", scale["t"], scale["s"], conv.in_channels, conv.out_channels,
                           tuple(conv.kernel_size)))
            return
        if isinstance(m, WanAttentionBlock):
            ops.append(_Op("attention", scale["t"], scale["s"], m.dim, m.dim))
            return
        if isinstance(m, WanCausalConv3d):
            # Only convs with a temporal kernel are called with the cache; the 1x1x1
            # shortcut convs are not.
            conv3d(m, cached=m.kernel_size[0] > 1)
            return
        for child in m.children():
            visit(child)

    visit(decoder)
    return ops


@dataclass(frozen=True)
class StageReach:
    """The decoder's causal convs that run at one (time, space) resolution."""

    time_scale: int  # frames per latent frame here: 1, 2, 4
    spatial_scale: int  # pixels per latent pixel here (before unpatchify)
    causal_convs: int  # convs with a temporal kernel > 1 (a time upsampler's counts where it reads)
    reach: int  # sum of (kernel_t - 1): frames of left context they need, at this stage's rate


def stage_receptive_fields(decoder: WanDecoder3d) -> list[StageReach]:
    """Per-stage temporal reach of the decoder, in forward order."""
    stages: list[StageReach] = []
    for op in _decoder_ops(decoder):
        if op.kind != "conv3d" or op.kernel[0] <= 1:
            continue
        if not stages or (stages[-1].time_scale, stages[-1].spatial_scale) != (op.time_scale, op.spatial_scale):
            stages.append(StageReach(op.time_scale, op.spatial_scale, 0, 0))
        last = stages[-1]
        stages[-1] = StageReach(last.time_scale, last.spatial_scale, last.causal_convs + 1,
                                last.reach + op.kernel[0] - 1)
    return stages


def first_exact_frame(decoder: WanDecoder3d) -> int:
    """First output frame of a fresh-cache stream that equals the monolithic decode.

    Counted from the stream's start, for a stream that starts after latent 0 (a stream
    from latent 0 is the monolithic decode). Tracks, through the forward pass, the first
    frame index at the current rate from which the activations are exact:
    - a causal conv with temporal kernel k reads k-1 earlier frames at its rate, which
      before the stream's start are zeros instead of the true history: +k-1;
    - a time upsampler by f leaves a stream's first frame as one frame and never feeds it
      to its time conv (diffusers' "Rep" cache: it reads zeros in its place), so input
      frame t >= 1 becomes output frames f(t-1)+1 .. f*t and frame 0 is never exact;
    - norms, attention, spatial upsampling and unpatchify are per frame: +0.
    """
    exact = 0
    for op in _decoder_ops(decoder):
        if op.kind == "conv3d":
            exact += op.kernel[0] - 1
        elif op.kind == "time_up":
            f = op.kernel[0]
            exact = f * (max(exact, 1) - 1) + 1
    return exact


def _time_scale(decoder: WanDecoder3d) -> int:
    return math.prod(op.kernel[0] for op in _decoder_ops(decoder) if op.kind == "time_up")


def receptive_field(decoder: WanDecoder3d) -> int:
    """Latent frames of left context K that make a fresh-cache shard exact.

    A stream that starts at latent c yields 1 frame for latent c and frames F(k-1)+1 .. Fk
    for latent c+k (F = total time upsampling), so latent c+k is exact once
    F(k-1)+1 >= first_exact_frame. At least 1: a shard's first latent always decodes to a
    single (wrong) frame.
    """
    f = _time_scale(decoder)
    exact = first_exact_frame(decoder)
    return max(1, math.ceil((exact - 1) / f) + 1)


# ---------------------------------------------------------------------------------------
# The streaming decoder


def check_cthw(latents: torch.Tensor, z_dim: int) -> None:
    """Called where a stream is made, not inside its generator, so bad input fails at the call."""
    if latents.dim() != 4 or latents.shape[0] != z_dim:
        raise ValueError(f"expected CTHW latents with {z_dim} channels, got {tuple(latents.shape)}")


def steps(decoder, state, latents: torch.Tensor, start: int = 0) -> Iterator[torch.Tensor]:
    """Decoder steps over latent frames start.. of CTHW `latents`, continuing `state`."""
    for i in range(start, latents.shape[1]):
        yield decoder.step(state, latents[:, i])


@dataclass
class DecodeState:
    """The causal cache of one stream: diffusers' `feat_cache` list, owned by the caller.

    Each entry is the last 2 input frames of one causal conv, or "Rep" for a time
    upsampler that has seen only the stream's first frame, or None before the first call.
    """

    cache: list[Any]
    calls: int = 0  # latent frames decoded so far; the first call is special

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache if isinstance(t, torch.Tensor))


class WanDecoder:
    """A `Decoder` over diffusers' Wan VAE: one latent frame per call, one cache per stream."""

    def __init__(self, vae: AutoencoderKLWan, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        config = dict(vae.config)
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.z_dim = int(config["z_dim"])
        self.patch_size = config.get("patch_size") or 1
        # Only what decoding needs goes to the device; the encoder stays where it was.
        self.post_quant_conv = vae.post_quant_conv.to(self.device, dtype).eval().requires_grad_(False)
        self.decoder = vae.decoder.to(self.device, dtype).eval().requires_grad_(False)
        self.name = _variant_name(config)

        ops = _decoder_ops(self.decoder)
        self.time_scale = _time_scale(self.decoder)
        self.spatial_scale = math.prod(op.kernel[0] for op in ops if op.kind == "space_up") * self.patch_size
        self.receptive_field = receptive_field(self.decoder)
        self.first_exact_frame = first_exact_frame(self.decoder)
        self._ops = ops
        # Same slot count as diffusers' `_cached_conv_counts["decoder"]`: one per causal conv,
        # the uncached 1x1x1 shortcuts included, because the decoder indexes slots in that order.
        self._cache_slots = sum(isinstance(m, WanCausalConv3d) for m in self.decoder.modules())
        # diffusers' Wan 2.1 decoder ignores first_chunk, the Wan 2.2 one needs it (its
        # DupUp3D shortcut must drop frames on a stream's first call); older releases lack it.
        self._takes_first_chunk = "first_chunk" in inspect.signature(self.decoder.forward).parameters
        if self.patch_size > 1 and not self._takes_first_chunk:
            raise ValueError("this diffusers release cannot decode patchified (Wan 2.2) VAEs streaming")
        mean = torch.tensor(config["latents_mean"], dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(config["latents_std"], dtype=torch.float32).view(-1, 1, 1)
        if mean.shape[0] != self.z_dim or std.shape[0] != self.z_dim:
            raise ValueError(f"latents_mean/std have {mean.shape[0]}/{std.shape[0]} entries, z_dim is {self.z_dim}")
        # Cast the way WanPipeline does: std to the VAE dtype first, its reciprocal in that
        # dtype, then latents / (1/std) + mean. In bf16 the order of the cast and the
        # reciprocal changes one rounding in six values; this order matches the pipeline's
        # own decode bit for bit.
        self._mean = mean.to(self.device, dtype)
        self._inv_std = 1.0 / std.to(self.device, dtype)

    def __repr__(self) -> str:
        return (f"WanDecoder({self.name}, z_dim={self.z_dim}, spatial_scale={self.spatial_scale}, "
                f"receptive_field={self.receptive_field}, device={self.device}, dtype={self.dtype})")

    # -- streaming -----------------------------------------------------------------------

    def unnormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalized latents (channels first, any trailing dims) -> what the decoder takes."""
        shape = (-1,) + (1,) * (z.dim() - 1)
        return z / self._inv_std.view(shape) + self._mean.view(shape)

    def new_state(self) -> DecodeState:
        return DecodeState(cache=[None] * self._cache_slots)

    def step(self, state: DecodeState, latent_frame: torch.Tensor) -> torch.Tensor:
        """Decode one normalized CHW latent frame; CFHW in [-1, 1] on `device` (1 or 4 frames)."""
        if latent_frame.dim() != 3 or latent_frame.shape[0] != self.z_dim:
            raise ValueError(f"expected a ({self.z_dim}, h, w) latent frame, got {tuple(latent_frame.shape)}")
        first = state.calls == 0
        # no_grad rather than inference_mode: inference tensors would refuse in-place ops
        # (e.g. a uint8 conversion done with add_/mul_) in the caller outside the mode.
        with torch.no_grad():
            z = latent_frame.to(self.device, self.dtype, non_blocking=True)
            z = self.unnormalize(z).unsqueeze(0).unsqueeze(2).contiguous()  # 1,C,1,h,w
            x = self.post_quant_conv(z)
            kwargs = {"first_chunk": first} if self._takes_first_chunk else {}
            # feat_idx counts the cache slots the call has walked; it restarts every call.
            out = self.decoder(x, feat_cache=state.cache, feat_idx=[0], **kwargs)
            if self.patch_size > 1:
                out = unpatchify(out, patch_size=self.patch_size)
            out = out.clamp_(-1.0, 1.0)
        state.calls += 1
        return out[0]

    def stream(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """Decode CTHW normalized latents with a fresh cache; yield CFHW chunks, 1 then 4 frames."""
        check_cthw(latents, self.z_dim)
        return steps(self, self.new_state(), latents)

    # -- cost model ----------------------------------------------------------------------

    def _stage_pixels(self, height: int, width: int) -> int:
        """Pixels of one latent frame at latent resolution."""
        s = self.spatial_scale
        if height % s or width % s:
            raise ValueError(f"{width}x{height} is not a multiple of the spatial scale {s}")
        return (height // s) * (width // s)

    def cache_bytes(self, height: int, width: int) -> int:
        """Exact size of a steady-state stream cache at this pixel size."""
        p0 = self._stage_pixels(height, width)
        e = torch.tensor([], dtype=self.dtype).element_size()
        return int(sum(CACHE_FRAMES * op.in_channels * p0 * op.spatial_scale ** 2 * e
                       for op in self._ops if op.kind == "conv3d" and op.cached))

    def peak_memory_bytes(self, height: int, width: int) -> int:
        """Estimated peak device memory of one stream at this pixel size, weights excluded.

        An estimate: the cache term is exact (see `cache_bytes`); the activation term is a
        model calibrated on an H200 (torch 2.11, cuDNN), where the peak of a steady-state
        call sits in a causal conv of the last stage. Its live set there, in units of the
        conv's input: the block input held by the decoder and by the residual block, the
        activated input, the cache clone, the cache-and-input concatenation and its padded
        copy, cuDNN's workspace (about 8 units), plus the output. Measured against this
        model: Wan 2.1 at 1280x720 9.68 GiB bf16 / 19.34 GiB fp32 (model 10.0 / 20.0),
        Wan 2.2 TI2V at 1280x704 bf16 9.92 GiB (model 10.3). The caching allocator's
        reserve comes on top (14.2 GiB reserved for the 9.68 GiB peak above).
        """
        p0 = self._stage_pixels(height, width)
        e = torch.tensor([], dtype=self.dtype).element_size()
        activations = 0.0
        for op in self._ops:
            if op.kind == "conv3d" and op.cached:
                frames = op.time_scale  # frames a steady-state call carries at this stage
                px = p0 * op.spatial_scale ** 2
                unit_in = frames * op.in_channels * px * e
                unit_out = frames * op.out_channels * px * e
                activations = max(activations, _ACTIVATION_UNITS * unit_in + unit_out)
        return int(self.cache_bytes(height, width) + activations)

    def decode_flops_per_latent(self, height: int, width: int, first: bool = False) -> float:
        """Multiply-adds x 2 of one latent frame's decode (a steady one, or a stream's first)."""
        p0 = self._stage_pixels(height, width)
        total = 2.0 * self.z_dim * self.z_dim * p0  # post_quant_conv, 1x1x1
        for op in self._ops:
            frames = 1 if first else op.time_scale
            px = p0 * op.spatial_scale ** 2
            if op.kind == "conv3d":
                if first and op.time_conv:
                    continue  # a time upsampler skips its conv on a stream's first call
                total += 2.0 * op.in_channels * op.out_channels * math.prod(op.kernel) * frames * px
            elif op.kind == "conv2d":
                total += 2.0 * op.in_channels * op.out_channels * math.prod(op.kernel) * frames * px
            elif op.kind == "attention":
                c = op.in_channels
                total += 2.0 * c * 4 * c * frames * px  # to_qkv (3c) and proj (c), 1x1
                total += 4.0 * px * px * c * frames  # q @ k^T and attn @ v
        return total


def _variant_name(config: dict) -> str:
    z_dim, patch = int(config["z_dim"]), config.get("patch_size")
    if patch is None and z_dim == 16:
        return "wan2.1-vae"
    if patch == 2 and z_dim == 48:
        return "wan2.2-ti2v-vae"
    return f"wan-vae(z{z_dim},p{patch or 1})"


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
                       dtype: torch.dtype = torch.float32, seed: int = 0) -> WanDecoder:
    """A decoder with diffusers' default (random) init; `config=None` is the real Wan 2.1 VAE."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
        torch.manual_seed(seed)
        vae = AutoencoderKLWan.from_config(dict(config or {}))
    return WanDecoder(vae, device=device, dtype=dtype)


def load_wan_decoder(path: str | os.PathLike, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> WanDecoder:
    """Load a diffusers-format VAE folder (config.json + safetensors weights); never pickles.

    The variant (Wan 2.1 or 2.2 TI2V) comes from config.json's fields (z_dim, patch_size).
    The decoder's weights go straight onto the device, checked (actors/wan_weights.py).
    """
    config, weights = read_wan_vae(path, device=device, dtype=dtype)
    return WanDecoder(decoder_vae(config, weights), device=device, dtype=dtype)

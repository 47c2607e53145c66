"""Exact left context for a Wan VAE shard at a fraction of its decode cost ("pruned context").

A shard that starts at latent s is exact when its stream's causal caches, just before
latent s, hold what a decode from s-K (K = the receptive field, 38 for the real VAEs)
would hold. Decoding the K context latents through the whole decoder costs K latents'
worth of compute, but each cached conv only needs the last few of them: its cache holds
its last 2 input frames, and the frames it feeds downstream only have to be right where
a later conv's cache or latent s's own outputs read them. Working backwards from the end
of the decoder, the frames each conv must see grow by (kernel_t - 1) per conv and halve
(rounded up) across each time upsampler, so the depth in latents shrinks from K at the
latent-resolution input conv to 1 at the last full-resolution conv.

`warm_state` runs context latent j through the prefix of the decoder made of the convs
whose depth reaches j, with the same one-latent-per-call chunking as a full decode, so
every call a conv sees has the same shapes as in the full decode and the cache it leaves
is equal bit for bit. A conv whose depth is less than the context starts mid-stream with
an empty cache (zero history, like diffusers' first call), which is wrong only for frames
that nothing downstream of latent s reads. The state it returns is a plain `DecodeState`:
`WanDecoder.step` carries on from it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    CACHE_T,
    WanAttentionBlock,
    WanCausalConv3d,
    WanMidBlock,
    WanResample,
    WanResidualBlock,
    WanResidualUpBlock,
    WanUpBlock,
)

from actors.wan import DecodeState, WanDecoder, _decoder_ops, _Op, check_cthw, stage_receptive_fields, steps

# ---------------------------------------------------------------------------------------
# The plan: how many of the last context latents each cached conv must process


@dataclass(frozen=True)
class ConvDepth:
    """One cached causal conv (one slot of the stream cache) and its share of the context."""

    slot: int  # its index in `DecodeState.cache` (diffusers' feat_idx order)
    name: str  # module path inside the decoder, for reports
    time_scale: int  # frames per latent frame at its input
    spatial_scale: int
    kernel_t: int
    frames: int  # input frames just before the shard's first latent that must be exact here
    depth: int  # context latents it must process: ceil(frames / time_scale)


@dataclass(frozen=True)
class StageDepth:
    """The convs of one (time, space) resolution; `reach` matches `stage_receptive_fields`."""

    time_scale: int
    spatial_scale: int
    convs: int
    reach: int
    depth_in: int  # depth of its first conv (the most it processes)
    depth_out: int  # depth of its last conv


@dataclass(frozen=True)
class ContextPlan:
    convs: tuple[ConvDepth, ...]  # forward order
    stages: tuple[StageDepth, ...]

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(c.depth for c in self.convs)

    @property
    def receptive_field(self) -> int:
        """Context latents an exact shard needs at all: the input conv's depth."""
        return max(self.depths)


def context_plan(decoder: WanDecoder) -> ContextPlan:
    """Per-conv and per-stage context depths, read off the decoder's topology.

    Backwards over the forward-ordered ops of `_decoder_ops` (the walk `receptive_field`
    and `stage_receptive_fields` use), counting input frames just before the shard's
    first latent that must equal the reference:
    - a cached conv with temporal kernel k needs k-1 frames more than its output must
      deliver, and at least its own cache (CACHE_T frames);
    - a time upsampler by f turns each input frame into f consecutive output frames of the
      same latent, so n output frames come from ceil(n / f) input frames;
    - spatial upsampling, 2-D convs, attention and the 1x1x1 shortcuts are per frame.
    Residual paths skip convs, so they never need more than the main path: the walk's
    main path is the maximum. A conv's depth is its frames in latents, rounded up; a
    running maximum keeps depths non-increasing along the forward pass (a conv can only
    process a latent that the convs before it have produced), which makes the convs
    that see any one context latent a prefix of the decoder.
    """
    ops = _decoder_ops(decoder.decoder)
    names = {id(m): n for n, m in decoder.decoder.named_modules()}
    cached = [op for op in ops if op.kind == "conv3d" and op.cached]
    for op in ops:
        if op.kind == "conv3d" and not op.cached and op.kernel[0] != 1:
            raise ValueError(f"uncached conv with temporal kernel {op.kernel} in a Wan decoder")

    frames = 0  # needed at the current point, at its rate
    needs: list[int] = []
    for op in reversed(ops):
        if op.kind == "conv3d" and op.cached:
            frames = max(frames + op.kernel[0] - 1, CACHE_T)
            needs.append(frames)
        elif op.kind == "time_up":
            frames = math.ceil(frames / op.kernel[0])
    needs.reverse()

    depths = [math.ceil(n / op.time_scale) for n, op in zip(needs, cached)]
    for i in range(len(depths) - 2, -1, -1):
        depths[i] = max(depths[i], depths[i + 1])
    convs = tuple(ConvDepth(i, names[id(op.module)], op.time_scale, op.spatial_scale, op.kernel[0], n, d)
                  for i, (op, n, d) in enumerate(zip(cached, needs, depths)))

    stages: list[StageDepth] = []
    for c in convs:
        if not stages or (stages[-1].time_scale, stages[-1].spatial_scale) != (c.time_scale, c.spatial_scale):
            stages.append(StageDepth(c.time_scale, c.spatial_scale, 0, 0, c.depth, c.depth))
        s = stages[-1]
        stages[-1] = StageDepth(s.time_scale, s.spatial_scale, s.convs + 1, s.reach + c.kernel_t - 1,
                                s.depth_in, c.depth)
    reach = [(s.time_scale, s.spatial_scale, s.causal_convs, s.reach) for s in stage_receptive_fields(decoder.decoder)]
    if reach != [(s.time_scale, s.spatial_scale, s.convs, s.reach) for s in stages]:
        raise AssertionError(f"context plan stages {stages} disagree with stage_receptive_fields {reach}")
    return ContextPlan(convs, tuple(stages))


# ---------------------------------------------------------------------------------------
# A prefix of the decoder's forward pass


class _Stop(Exception):
    """The rest of this call feeds only convs that do not need this latent."""


class _PrefixPass:
    """One call of `WanDecoder3d.forward` over one latent frame, cut before cache slot `limit`.

    Mirrors diffusers' forward (WanDecoder3d, WanMidBlock, WanUpBlock / WanResidualUpBlock,
    WanResidualBlock, WanResample, the cache handling around each WanCausalConv3d) call
    for call, so that what it computes is bit-identical; it differs in two places only:
    - `need()` stops the pass before any work that serves slot `limit` or later (the
      norms, shortcut, attention or spatial upsampling in front of that conv included);
    - a time upsampler that starts mid-stream (empty slot, not the stream's first call)
      runs its time conv with zero history, like any causal conv, instead of diffusers'
      "Rep" first call that would emit half the frames: it is a plain causal conv whose
      early outputs are wrong, and its depth allows for that.
    """

    def __init__(self, cache: list, limit: int, first: bool):
        self.cache = cache
        self.limit = limit
        self.first = first  # the stream's first latent: diffusers' first_chunk semantics
        self.idx = 0

    def need(self) -> None:
        if self.idx >= self.limit:
            raise _Stop

    def run(self, d, x: torch.Tensor) -> None:
        try:
            self._decoder(d, x)
        except _Stop:
            pass

    def _conv(self, conv: WanCausalConv3d, x: torch.Tensor) -> torch.Tensor:
        idx = self.idx
        cached = self.cache[idx]
        cache_x = x[:, :, -CACHE_T:, :, :].clone()
        if cache_x.shape[2] < 2 and cached is not None:
            cache_x = torch.cat([cached[:, :, -1, :, :].unsqueeze(2).to(cache_x.device), cache_x], dim=2)
        x = conv(x, cached)
        self.cache[idx] = cache_x
        self.idx += 1
        return x

    def _decoder(self, d, x: torch.Tensor) -> None:
        self.need()
        x = self._conv(d.conv_in, x)
        mid = d.mid_block
        x = self._resnet(mid.resnets[0], x)
        for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
            if attn is not None:
                self.need()
                x = attn(x)
            x = self._resnet(resnet, x)
        for block in d.up_blocks:
            x = self._up_block(block, x)
        self.need()
        x = d.nonlinearity(d.norm_out(x))
        self._conv(d.conv_out, x)

    def _resnet(self, r: WanResidualBlock, x: torch.Tensor) -> torch.Tensor:
        self.need()
        h = r.conv_shortcut(x)
        x = r.nonlinearity(r.norm1(x))
        x = self._conv(r.conv1, x)
        self.need()
        x = r.dropout(r.nonlinearity(r.norm2(x)))
        x = self._conv(r.conv2, x)
        return x + h

    def _up_block(self, block, x: torch.Tensor) -> torch.Tensor:
        if isinstance(block, WanResidualUpBlock):
            self.need()
            x_copy = x.clone()
            for resnet in block.resnets:
                x = self._resnet(resnet, x)
            if block.upsampler is not None:
                x = self._resample(block.upsampler, x)
            if block.avg_shortcut is not None:
                x = x + block.avg_shortcut(x_copy, first_chunk=self.first)
            return x
        if not isinstance(block, WanUpBlock):
            raise TypeError(f"unexpected up block {type(block).__name__} in a Wan decoder")
        for resnet in block.resnets:
            x = self._resnet(resnet, x)
        if block.upsamplers is not None:
            x = self._resample(block.upsamplers[0], x)
        return x

    def _resample(self, m: WanResample, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.size()
        if m.mode == "upsample3d":
            self.need()
            idx = self.idx
            cached = self.cache[idx]
            if cached is None and self.first:
                self.cache[idx] = "Rep"
                self.idx += 1
            else:
                rep = isinstance(cached, str)
                cache_x = x[:, :, -CACHE_T:, :, :].clone()
                if cache_x.shape[2] < 2 and cached is not None and not rep:
                    cache_x = torch.cat([cached[:, :, -1, :, :].unsqueeze(2).to(cache_x.device), cache_x], dim=2)
                if cache_x.shape[2] < 2 and rep:
                    cache_x = torch.cat([torch.zeros_like(cache_x).to(cache_x.device), cache_x], dim=2)
                x = m.time_conv(x) if cached is None or rep else m.time_conv(x, cached)
                self.cache[idx] = cache_x
                self.idx += 1
                self.need()
                x = x.reshape(b, 2, c, t, h, w)
                x = torch.stack((x[:, 0, :, :, :, :], x[:, 1, :, :, :, :]), 3)
                x = x.reshape(b, c, t * 2, h, w)
        elif m.mode != "upsample2d":
            raise ValueError(f"unexpected resample mode {m.mode!r} in a Wan decoder")
        self.need()
        t = x.shape[2]
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        x = m.resample(x)
        return x.view(b, t, x.size(1), x.size(2), x.size(3)).permute(0, 2, 1, 3, 4)


def _prefix_lengths(depths: Sequence[int], context: int) -> list[int]:
    """For context latent j (0-based), how many cache slots, from the first, process it."""
    if any(a < b for a, b in zip(depths, depths[1:])):
        raise ValueError(f"depths must not increase along the decoder: {list(depths)}")
    return [sum(d >= context - j for d in depths) for j in range(context)]


# ---------------------------------------------------------------------------------------
# Public API


def warm_state(decoder: WanDecoder, context_latents: torch.Tensor,
               depths: Sequence[int] | None = None) -> DecodeState:
    """The stream state after `context_latents` (CTHW, normalized), computed with pruned context.

    Equal, in every cache slot that influences later output, to decoding `context_latents`
    with a fresh stream (the first of them is the stream's first call, as in a shard
    decoded from its context start); with at least `receptive_field` latents it is also
    the monolithic decode's state. More context than the plan's depth is skipped, not
    decoded. `depths` overrides the plan (tests use it to show the plan is minimal).
    """
    if context_latents.dim() != 4 or context_latents.shape[0] != decoder.z_dim:
        raise ValueError(f"expected CTHW latents with {decoder.z_dim} channels, "
                         f"got {tuple(context_latents.shape)}")
    if depths is None:
        depths = context_plan(decoder).depths
    n = context_latents.shape[1]
    state = decoder.new_state()
    d = decoder.decoder
    with torch.no_grad():
        for j, limit in enumerate(_prefix_lengths(depths, n)):
            if limit == 0:
                continue
            # The same input preparation as WanDecoder.step, so conv_in sees the same bits.
            z = context_latents[:, j].to(decoder.device, decoder.dtype, non_blocking=True)
            z = decoder.unnormalize(z).unsqueeze(0).unsqueeze(2).contiguous()
            x = decoder.post_quant_conv(z)
            _PrefixPass(state.cache, limit, first=(j == 0)).run(d, x)
    state.calls = n
    if n > 0:
        missing = [i for i in range(len(depths)) if state.cache[i] is None]
        if missing:
            raise ValueError(f"cache slots {missing} saw no context (a depth of 0 in {list(depths)})")
    return state


def stream_with_context(decoder: WanDecoder, latents: torch.Tensor, context: int) -> Iterator[torch.Tensor]:
    """Decode CTHW `latents` whose first `context` latents are left context only.

    Yields the CFHW chunks of `latents[:, context:]`, exactly as a fresh stream over all of
    `latents` would yield them for those latents (4 frames each; 1 for the first when
    `context` is 0), so nothing has to be dropped.
    """
    check_cthw(latents, decoder.z_dim)
    if not 0 <= context < latents.shape[1]:
        raise ValueError(f"context {context} must be in [0, {latents.shape[1]}) latent frames")
    return _stream_with_context(decoder, latents, context)


def _stream_with_context(decoder: WanDecoder, latents: torch.Tensor, context: int) -> Iterator[torch.Tensor]:
    # Warmed inside the generator, as before: the pipeline times it as the first step's work.
    yield from steps(decoder, warm_state(decoder, latents[:, :context]), latents, start=context)


# ---------------------------------------------------------------------------------------
# Cost


def _op_flops(op: _Op, p0: int, first: bool) -> float:
    """One op's share of `WanDecoder.decode_flops_per_latent` (same formulas)."""
    frames = 1 if first else op.time_scale
    px = p0 * op.spatial_scale ** 2
    if op.kind in ("conv3d", "conv2d"):
        if first and op.time_conv:
            return 0.0
        return 2.0 * op.in_channels * op.out_channels * math.prod(op.kernel) * frames * px
    if op.kind == "attention":
        c = op.in_channels
        return 2.0 * c * 4 * c * frames * px + 4.0 * px * px * c * frames
    return 0.0


def slot_flops(decoder: WanDecoder, height: int, width: int, first: bool = False) -> list[float]:
    """FLOPs of one latent frame's decode, split by the cache slot whose prefix pays for them.

    Each op is charged to the cached conv it feeds, as `_PrefixPass` runs it: an
    upsampler's spatial part to the next cached conv, the mid block's attention to the
    first conv of the residual block after it, a residual block's 1x1x1 shortcut to that
    block's first conv, post_quant_conv to conv_in. The slots sum to
    `decode_flops_per_latent`. The attention and the shortcuts are placed by module,
    not by position: `_decoder_ops` lists modules in registration order, which puts the
    mid block's attention before its residual blocks and a shortcut after its block's
    second conv, although both run elsewhere (harmless for time, not for this split).
    """
    p0 = decoder._stage_pixels(height, width)
    ops = _decoder_ops(decoder.decoder)
    cached = [op for op in ops if op.kind == "conv3d" and op.cached]
    slot_of = {id(op.module): i for i, op in enumerate(cached)}
    for m in decoder.decoder.modules():
        if isinstance(m, WanResidualBlock) and isinstance(m.conv_shortcut, WanCausalConv3d):
            slot_of[id(m.conv_shortcut)] = slot_of[id(m.conv1)]
        if isinstance(m, WanMidBlock):
            for attn, resnet in zip(m.attentions, m.resnets[1:]):
                slot_of[id(attn)] = slot_of[id(resnet.conv1)]
    out = [0.0] * len(cached)
    out[0] += 2.0 * decoder.z_dim * decoder.z_dim * p0  # post_quant_conv
    # Attention ops carry no module; both lists are in registration order.
    attentions = iter([m for m in decoder.decoder.modules() if isinstance(m, WanAttentionBlock)])
    pending = 0.0  # an upsampler's per-frame work, waiting for the conv it feeds
    for op in ops:
        f = _op_flops(op, p0, first)
        module = next(attentions) if op.kind == "attention" else op.module
        if module is not None and id(module) in slot_of:
            out[slot_of[id(module)]] += f
            if op.kind == "conv3d" and op.cached:
                out[slot_of[id(op.module)]] += pending
                pending = 0.0
        elif op.kind in ("time_up", "space_up", "conv2d"):
            pending += f
        else:
            raise AssertionError(f"no cache slot to charge {op.kind} op {module!r} to")
    if pending:
        raise AssertionError("work after the last cached conv is not charged to any slot")
    return out


def context_flops(decoder: WanDecoder, height: int, width: int, context: int,
                  depths: Sequence[int] | None = None) -> float:
    """FLOPs `warm_state` spends on `context` latents at this pixel size (same cost model).

    A slot whose depth covers the whole context starts at the stream's first call (one
    frame at every rate, time convs skipped); any other processes `depth` steady latents.
    """
    if depths is None:
        depths = context_plan(decoder).depths
    steady = slot_flops(decoder, height, width)
    first = slot_flops(decoder, height, width, first=True)
    total = 0.0
    for d, s, f in zip(depths, steady, first):
        if context <= 0:
            continue
        total += f + (context - 1) * s if d >= context else d * s
    return total


def context_cost_in_latents(decoder: WanDecoder, height: int, width: int, context: int | None = None) -> float:
    """`context_flops` in steady-state latent frames' worth (the issue's measure)."""
    k = context_plan(decoder).receptive_field if context is None else context
    return context_flops(decoder, height, width, k) / decoder.decode_flops_per_latent(height, width)

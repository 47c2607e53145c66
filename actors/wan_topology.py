"""The Wan VAE decoder's topology, read from its config alone: layers, time, cost.

Pure: no torch, no diffusers. The planner (cluster/geometry.py) asks it for the receptive
field and the cost of pruned context without building a model; the decoder (actors/wan.py)
builds its step from it and checks every weight of diffusers' `AutoencoderKLWan` against
it, so a config this walk misreads fails at construction instead of decoding wrongly.

The walk follows diffusers' `WanDecoder3d` constructor (Wan 2.1 VAE; Wan 2.2 TI2V VAE
with residual up blocks, a channel-to-space shortcut and patchified output) and lists the
layers in the order one call of the streaming step runs them. Per layer: where it sits
in time and space (frames per latent frame, pixels per latent pixel, stage = spatial
upsamplings so far), its cache slot if it is a causal conv, and the slot that pays for
it (`pays`): the causal conv whose run implies this layer's, which is how pruned context
cuts the step short.

Time, as the decoder's step runs it (DESIGN.md): a causal conv with temporal kernel k
reads k-1 earlier frames at its rate, from its cache (zeros before the stream began); a
time upsampler's conv is skipped on a stream's first call, which stays one frame at every
rate; everything else (norms, attention, spatial upsampling, unpatchify) is per frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

CACHE_FRAMES = 2  # diffusers' CACHE_T: every causal conv keeps its last 2 input frames
# Live tensors around the peak conv of a steady step, in units of its input: measured 7.5 on
# an H200 (torch 2.11, cuDNN) for diffusers' modules (block input, activated input, cache
# clone, concatenation and padded copy, cuDNN's workspace of about 8 units, the output).
ACTIVATION_UNITS = 8


@dataclass(frozen=True)
class Layer:
    kind: str  # "conv" (3-D; causal when kernel[0] > 1), "conv2d", "norm", "attention", "time_up", "space_up", "dup"
    name: str = ""  # diffusers' parameter prefix ("decoder.conv_in"); "" for weightless layers
    in_channels: int = 0
    out_channels: int = 0
    kernel: tuple[int, ...] = ()  # conv: (t, h, w) or (h, w); time_up/space_up: (factor,); dup: (f_t, f_s)
    time_scale: int = 1  # frames per latent frame at its input
    spatial_scale: int = 1  # pixels per latent pixel along a side at its input (before unpatchify)
    stage: int = 0
    slot: int = -1  # a causal conv's cache slot, in the order a step runs them
    pays: int = 0  # the causal conv whose run implies this layer's
    time_conv: bool = False  # a time upsampler's conv: skipped on a stream's first call

    @property
    def cached(self) -> bool:
        return self.kind == "conv" and self.kernel[0] > 1


@dataclass(frozen=True)
class Res:
    norm1: Layer
    conv1: Layer
    norm2: Layer
    conv2: Layer
    shortcut: Layer | None  # 1x1x1 conv where the width changes


@dataclass(frozen=True)
class Up:
    resnets: tuple[Res, ...]
    time_conv: Layer | None  # upsample3d: doubles the channels, then interleaved along time
    conv2d: Layer | None  # after the nearest 2x spatial upsample; None: no upsampling here
    dup: Layer | None  # Wan 2.2: the block input, channels moved to time and space, added


@dataclass(frozen=True)
class StageDepth:
    """The causal convs of one stage and the context latents they must see (pruned context)."""

    time_scale: int
    spatial_scale: int
    convs: int
    reach: int  # sum of (kernel_t - 1): frames of left context, at this stage's rate
    depth_in: int  # context latents its first conv processes (the most in the stage)
    depth_out: int  # those of its last conv


@dataclass(frozen=True)
class Topology:
    z_dim: int
    patch_size: int
    post_quant: Layer
    conv_in: Layer
    mid: tuple[Res, Layer, Res]  # resnet, attention, resnet
    ups: tuple[Up, ...]
    norm_out: Layer
    conv_out: Layer
    layers: tuple[Layer, ...]  # every layer, in the order a step runs them

    @property
    def convs(self) -> tuple[Layer, ...]:
        """The causal convs, by slot."""
        return tuple(x for x in self.layers if x.cached)

    @property
    def stages(self) -> int:
        return self.conv_out.stage + 1

    @property
    def time_scale(self) -> int:
        return math.prod(x.kernel[0] for x in self.layers if x.kind == "time_up")

    @property
    def spatial_scale(self) -> int:
        """Pixels per latent pixel along a side, unpatchify included."""
        return self.conv_out.spatial_scale * self.patch_size

    # -- time ------------------------------------------------------------------------------

    @property
    def first_exact_frame(self) -> int:
        """First output frame of a fresh-cache stream (started after latent 0) that is exact.

        Forward over the layers, the first exact frame at the current rate: a causal conv
        with temporal kernel k adds k-1 (it reads zeros in place of the true history); a
        time upsampler by f maps input frame t >= 1 to frames f(t-1)+1 .. ft, and never
        feeds the stream's first frame to its conv, so frame 0 is never exact.
        """
        exact = 0
        for x in self.layers:
            if x.cached:
                exact += x.kernel[0] - 1
            elif x.kind == "time_up":
                exact = x.kernel[0] * (max(exact, 1) - 1) + 1
        return exact

    @property
    def receptive_field(self) -> int:
        """Latent frames of left context K that make a fresh-cache shard exact (38 for Wan).

        A stream from latent c yields frames F(k-1)+1 .. Fk for latent c+k (F the time
        scale), exact once F(k-1)+1 >= first_exact_frame. At least 1.
        """
        return max(1, math.ceil((self.first_exact_frame - 1) / self.time_scale) + 1)

    def context_depths(self) -> tuple[int, ...]:
        """Per causal conv (by slot), the last context latents it must process.

        Backwards over the layers, the input frames just before the shard's first latent
        that must be exact: a causal conv needs k-1 more than it delivers, and at least its
        own cache; across a time upsampler by f, n frames come from ceil(n / f). Residual
        paths skip convs, so the main path is the maximum. In latents, rounded up, with a
        running maximum so that the convs that see one context latent are a prefix of the
        step (a conv only sees a latent that the convs before it have processed).
        """
        frames, needs = 0, []
        for x in reversed(self.layers):
            if x.cached:
                frames = max(frames + x.kernel[0] - 1, CACHE_FRAMES)
                needs.append(math.ceil(frames / x.time_scale))
            elif x.kind == "time_up":
                frames = math.ceil(frames / x.kernel[0])
        depths = []
        for d in needs:  # from the last conv back: a running maximum
            depths.append(max(d, depths[-1] if depths else 0))
        return tuple(reversed(depths))

    def stage_depths(self) -> tuple[StageDepth, ...]:
        out: list[StageDepth] = []
        stage = -1
        for x, d in zip(self.convs, self.context_depths()):
            if x.stage != stage:
                stage = x.stage
                out.append(StageDepth(x.time_scale, x.spatial_scale, 0, 0, d, d))
            s = out[-1]
            out[-1] = StageDepth(s.time_scale, s.spatial_scale, s.convs + 1, s.reach + x.kernel[0] - 1,
                                 s.depth_in, d)
        return tuple(out)

    # -- weights -----------------------------------------------------------------------------

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor decoding reads, by diffusers' state-dict key, with its shape there.

        The format is diffusers' (a 3-D conv's weight is (out, in, t, h, w); an RMS norm's
        gain is (C, 1, 1, 1) before a 3-D conv, (C, 1, 1) in the attention block, whose 1x1
        projections are 2-D convs); the weight loader checks a folder against this, and
        tests check it against diffusers' own modules.
        """
        shapes: dict[str, tuple[int, ...]] = {}
        for x in self.layers:
            if x.kind in ("conv", "conv2d"):
                shapes[f"{x.name}.weight"] = (x.out_channels, x.in_channels, *x.kernel)
                shapes[f"{x.name}.bias"] = (x.out_channels,)
            elif x.kind == "norm":
                shapes[f"{x.name}.gamma"] = (x.in_channels, 1, 1, 1)
            elif x.kind == "attention":
                c = x.in_channels
                shapes[f"{x.name}.norm.gamma"] = (c, 1, 1)
                shapes[f"{x.name}.to_qkv.weight"] = (3 * c, c, 1, 1)
                shapes[f"{x.name}.to_qkv.bias"] = (3 * c,)
                shapes[f"{x.name}.proj.weight"] = (c, c, 1, 1)
                shapes[f"{x.name}.proj.bias"] = (c,)
        return shapes

    # -- cost ------------------------------------------------------------------------------

    def latent_pixels(self, height: int, width: int) -> int:
        s = self.spatial_scale
        if height % s or width % s:
            raise ValueError(f"{width}x{height} is not a multiple of the spatial scale {s}")
        return (height // s) * (width // s)

    def layer_flops(self, x: Layer, height: int, width: int, first: bool = False) -> float:
        """Multiply-adds x 2 of one layer in one step (a steady one, or a stream's first)."""
        frames = 1 if first else x.time_scale
        px = self.latent_pixels(height, width) * x.spatial_scale ** 2
        if x.kind in ("conv", "conv2d"):
            if first and x.time_conv:
                return 0.0
            return 2.0 * x.in_channels * x.out_channels * math.prod(x.kernel) * frames * px
        if x.kind == "attention":
            c = x.in_channels  # to_qkv (3c) and proj (c) as 1x1 convs, then q @ k^T and attn @ v
            return 2.0 * c * 4 * c * frames * px + 4.0 * px * px * c * frames
        return 0.0

    def flops_per_latent(self, height: int, width: int, first: bool = False) -> float:
        return sum(self.layer_flops(x, height, width, first) for x in self.layers)

    def slot_flops(self, height: int, width: int, first: bool = False) -> list[float]:
        """One step's FLOPs, split by the causal conv that pays for them (sums to the step's)."""
        out = [0.0] * len(self.convs)
        for x in self.layers:
            out[x.pays] += self.layer_flops(x, height, width, first)
        return out

    def context_flops(self, height: int, width: int, context: int, depths: Sequence[int] | None = None) -> float:
        """FLOPs that pruned context spends on `context` latents.

        A slot whose depth covers the whole context starts at the stream's first call (one
        frame at every rate, time convs skipped); any other processes `depth` steady latents.
        """
        if context <= 0:
            return 0.0
        depths = self.context_depths() if depths is None else depths
        steady, first = self.slot_flops(height, width), self.slot_flops(height, width, first=True)
        return sum(f + (context - 1) * s if d >= context else d * s for d, s, f in zip(depths, steady, first))

    def context_cost_in_latents(self, height: int, width: int, context: int | None = None) -> float:
        """Pruned context's work in steady latent frames' worth (6.5 for Wan 2.1 at 720p)."""
        k = self.receptive_field if context is None else context
        return self.context_flops(height, width, k) / self.flops_per_latent(height, width)

    def cache_bytes(self, height: int, width: int, element_size: int, conv_buffer: bool) -> int:
        """Exact size of a stream's state: per causal conv its 2 cached frames, and with
        `conv_buffer` also room for a steady step's input frames."""
        p0 = self.latent_pixels(height, width)
        return sum((CACHE_FRAMES + (x.time_scale if conv_buffer else 0)) * x.in_channels * p0
                   * x.spatial_scale ** 2 * element_size for x in self.convs)

    def peak_memory_bytes(self, height: int, width: int, element_size: int, conv_buffer: bool) -> int:
        """Estimated peak device memory of one stream, weights excluded: the state (exact),
        plus the live set at the widest causal conv of a steady step (ACTIVATION_UNITS of
        its input, plus its output). Calibrated for diffusers' modules at 1280x720 on an
        H200: 9.68 GiB bf16 / 19.34 GiB fp32 against 10.0 / 20.0 modelled. The explicit
        step holds fewer tensors; its buffers are counted exactly. The caching allocator's
        reserve comes on top."""
        p0 = self.latent_pixels(height, width)
        act = max((ACTIVATION_UNITS * x.in_channels + x.out_channels) * x.time_scale * p0 * x.spatial_scale ** 2
                  for x in self.convs)
        return self.cache_bytes(height, width, element_size, conv_buffer) + act * element_size


def variant_name(config: dict) -> str:
    z_dim, patch = int(config.get("z_dim", 16)), config.get("patch_size")  # diffusers' defaults, as topology()
    if patch is None and z_dim == 16:
        return "wan2.1-vae"
    if patch == 2 and z_dim == 48:
        return "wan2.2-ti2v-vae"
    return f"wan-vae(z{z_dim},p{patch or 1})"


# ---------------------------------------------------------------------------------------
# The walk


class _Walk:
    """Lists layers in step order, tracking time, space, stage and cache slots."""

    def __init__(self):
        self.layers: list[Layer] = []
        self.t, self.s, self.stage, self.slots = 1, 1, 0, 0

    def add(self, kind: str, name: str = "", cin: int = 0, cout: int = 0, kernel: tuple[int, ...] = (),
            pays: int | None = None, time_conv: bool = False) -> Layer:
        cached = kind == "conv" and kernel[0] > 1
        # Work before a causal conv is paid by it: the next slot, unless told otherwise.
        x = Layer(kind, name, cin, cout, kernel, self.t, self.s, self.stage, self.slots if cached else -1,
                  self.slots if pays is None else pays, time_conv)
        self.slots += cached
        self.layers.append(x)
        return x

    def res(self, name: str, cin: int, cout: int) -> Res:
        norm1 = self.add("norm", f"{name}.norm1", cin, cin)
        conv1 = self.add("conv", f"{name}.conv1", cin, cout, (3, 3, 3))
        # Run after conv1 (it reads the block input that conv1's norm already summed).
        shortcut = self.add("conv", f"{name}.conv_shortcut", cin, cout, (1, 1, 1), pays=conv1.slot) \
            if cin != cout else None
        norm2 = self.add("norm", f"{name}.norm2", cout, cout)
        return Res(norm1, conv1, norm2, self.add("conv", f"{name}.conv2", cout, cout, (3, 3, 3)), shortcut)


def topology(config: dict) -> Topology:
    """The decoder's topology from a diffusers `AutoencoderKLWan` config (its defaults: Wan 2.1)."""
    z_dim = int(config.get("z_dim", 16))
    base = config.get("decoder_base_dim") or config.get("base_dim", 96)
    mult = list(config.get("dim_mult", [1, 2, 4, 4]))
    blocks = int(config.get("num_res_blocks", 2))
    time_up = list(config.get("temperal_downsample", [False, True, True]))[::-1]
    residual = bool(config.get("is_residual", False))
    out_channels = int(config.get("out_channels", 3))
    patch = int(config.get("patch_size") or 1)
    if len(time_up) != len(mult) - 1:
        raise ValueError(f"temperal_downsample has {len(time_up)} entries; dim_mult {mult} needs {len(mult) - 1}")
    dims = [base * u for u in [mult[-1]] + mult[::-1]]

    w = _Walk()
    post_quant = w.add("conv", "post_quant_conv", z_dim, z_dim, (1, 1, 1))
    conv_in = w.add("conv", "decoder.conv_in", z_dim, dims[0], (3, 3, 3))
    res0 = w.res("decoder.mid_block.resnets.0", dims[0], dims[0])
    attn = w.add("attention", "decoder.mid_block.attentions.0", dims[0], dims[0])
    mid = (res0, attn, w.res("decoder.mid_block.resnets.1", dims[0], dims[0]))
    ups = []
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        name = f"decoder.up_blocks.{i}"
        if i > 0 and not residual:
            cin //= 2  # Wan 2.1: the previous block's upsampler halved the channels
        resnets, c = [], cin
        for j in range(blocks + 1):
            resnets.append(w.res(f"{name}.resnets.{j}", c, cout))
            c = cout
        time_conv = conv2d = dup = None
        if i != len(mult) - 1:
            temporal = time_up[i]
            up = f"{name}.upsampler" if residual else f"{name}.upsamplers.0"
            if temporal:
                time_conv = w.add("conv", f"{up}.time_conv", cout, 2 * cout, (3, 1, 1), time_conv=True)
                w.add("time_up", kernel=(2,))
                w.t *= 2
            w.add("space_up", kernel=(2,))
            w.s, w.stage = w.s * 2, w.stage + 1
            conv2d = w.add("conv2d", f"{up}.resample.1", cout, cout if residual else cout // 2, (3, 3))
            if residual:
                f_t = 2 if temporal else 1
                if (cout * f_t * 4) % cin:
                    raise ValueError(f"{name}: a {cin}->{cout} channel shortcut cannot upsample by {f_t}x2x2")
                # At the block's input rate; the time and space factors say what it produces.
                dup = w.add("dup", "", cin, cout, (f_t, 2))
        ups.append(Up(tuple(resnets), time_conv, conv2d, dup))
    norm_out = w.add("norm", "decoder.norm_out", dims[-1], dims[-1])
    conv_out = w.add("conv", "decoder.conv_out", dims[-1], out_channels, (3, 3, 3))  # patchified channels
    return Topology(z_dim, patch, post_quant, conv_in, mid, tuple(ups), norm_out, conv_out, tuple(w.layers))

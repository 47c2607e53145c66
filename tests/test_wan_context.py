"""Pruned context for Wan shards: bit-exact against the monolithic decode, depths from topology, cheaper.

CPU only: tiny configs (receptive field 30) at 8x8 latents, fp32; the real-size default
config is only built (on the meta device for counting), never decoded at size.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
from torch.utils.flop_counter import FlopCounterMode

from actors.wan import WanDecoder, random_wan_decoder, receptive_field, stage_receptive_fields, tiny_wan_config
from actors.wan_context import (
    context_cost_in_latents,
    context_flops,
    context_plan,
    slot_flops,
    stream_with_context,
    warm_state,
)
from actors.protocol import frame_start
from cluster.plan import plan_shards

T = 44  # latents: room for shards with a full receptive field (30) of context and more
SIDE = 8  # latent pixels


def _latents(z_dim: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(z_dim, t, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def _cat(chunks) -> torch.Tensor:
    return torch.cat(list(chunks), dim=1)


STATE_STARTS = (1, 2, 9, 30, 31, 40)  # where the monolithic stream's state is kept


@pytest.fixture(scope="module", params=["2.1", "2.2"])
def run(request):
    """A tiny decoder, latents, their monolithic decode and its state before some latents.

    The monolithic decode is the slow part: done once, with snapshots of its cache.
    """
    decoder = random_wan_decoder(tiny_wan_config(request.param), seed=3)
    z = _latents(decoder.z_dim, T, seed=11)
    state, chunks, states = decoder.new_state(), [], {}
    for i in range(T):
        if i in STATE_STARTS:
            states[i] = [x.clone() if isinstance(x, torch.Tensor) else x for x in state.cache]
        chunks.append(decoder.step(state, z[:, i]))
    return decoder, z, torch.cat(chunks, dim=1), states


@pytest.fixture(scope="module")
def default_meta():
    """The real Wan 2.1 VAE decoder on the meta device: shapes and FLOPs, no weights, no compute."""
    with torch.device("meta"):
        vae = AutoencoderKLWan.from_config({})
    return WanDecoder(vae, device="meta")


def _same_state(a: list, b: list) -> bool:
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)):
                return False
        elif x != y:  # None or "Rep"
            return False
    return True


# --------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("start", [0, 1, 2, 7, 29, 30, 31, 37, 41, 43])
def test_pruned_shard_equals_monolithic(run, start):
    """A shard [start, start+3) from pruned context is the monolithic decode, bit for bit.

    Starts below the receptive field (30) have the whole prefix as context (the context's
    first latent is the stream's first call); 0 has none; 30 is the first start whose
    context does not reach latent 0.
    """
    decoder, z, mono, _ = run
    k = decoder.receptive_field
    c, stop = max(0, start - k), min(start + 3, T)
    chunks = list(stream_with_context(decoder, z[:, c:stop], start - c))
    assert [x.shape[1] for x in chunks] == [1 if i == 0 else 4 for i in range(start, stop)]
    assert torch.equal(torch.cat(chunks, 1), mono[:, frame_start(start) : frame_start(stop)])


@pytest.mark.parametrize("start", STATE_STARTS)
def test_warm_state_equals_the_monolithic_state(run, start):
    """Every cache slot after pruned context equals the monolithic stream's before `start`.

    That is also a fresh decode of the full context's (c = start - K > 0 included): the
    receptive field makes every slot exact there, and shards from it equal monolithic.
    """
    decoder, z, _, states = run
    c = max(0, start - decoder.receptive_field)
    pruned = warm_state(decoder, z[:, c:start])
    assert pruned.calls == start - c
    assert _same_state(pruned.cache, states[start])


def test_planned_shards_with_pruned_context_reproduce_monolithic(run):
    """What the worker does with a plan: each shard's latents from context_start, no drop."""
    decoder, z, mono, _ = run
    plan = plan_shards(T, workers=3, context=decoder.receptive_field, shard_latents=12)
    # Shards whose context is the whole prefix, and one whose context starts later.
    assert [s.context_start for s in plan.shards] == [0, 0, 0, 6]
    pieces = []
    for shard in plan.shards:
        out = _cat(stream_with_context(decoder, z[:, shard.context_start : shard.stop], shard.context))
        assert out.shape[1] == shard.frame_count
        pieces.append(out)
    assert torch.equal(torch.cat(pieces, 1), mono)


def test_extra_context_is_skipped(run):
    decoder, z, _, _ = run
    k = decoder.receptive_field
    assert _same_state(warm_state(decoder, z[:, 2 : 2 + k + 5]).cache, warm_state(decoder, z[:, 7 : 7 + k]).cache)
    assert context_flops(decoder, 64, 64, k + 5) == context_flops(decoder, 64, 64, k)


def test_plan_is_minimal():
    """Lowering any conv's depth by one latent (and any later conv's to match) breaks the shard.

    The depths are derived, not tuned: this shows none of them is larger than it must be.
    """
    decoder = random_wan_decoder(tiny_wan_config("2.1"), seed=3)
    k = decoder.receptive_field
    s = k + 2
    # 4x4 latents: time is what is tested here, and this decodes 24 shards.
    z = torch.randn(decoder.z_dim, s + 1, 4, 4, generator=torch.Generator().manual_seed(5))
    ref = decoder.step(warm_state(decoder, z[:, 2:s]), z[:, s])
    full = decoder.new_state()
    for i in range(2, s):
        decoder.step(full, z[:, i])
    assert torch.equal(ref, decoder.step(full, z[:, s]))
    depths = context_plan(decoder).depths
    for i, d in enumerate(depths):
        lower = [min(x, d - 1) if j >= i else x for j, x in enumerate(depths)]
        if d == 1:  # a slot would see no context at all: refused rather than decoded wrong
            with pytest.raises(ValueError, match="saw no context"):
                warm_state(decoder, z[:, 2:s], depths=lower)
            continue
        out = decoder.step(warm_state(decoder, z[:, 2:s], depths=lower), z[:, s])
        assert not torch.equal(out, ref), f"slot {i}: depth {d - 1} is enough"


def test_stream_with_context_rejects_bad_input(run):
    decoder, z, _, _ = run
    with pytest.raises(ValueError, match="context"):
        stream_with_context(decoder, z[:, :5], 5)
    with pytest.raises(ValueError, match="context"):
        stream_with_context(decoder, z[:, :5], -1)
    with pytest.raises(ValueError, match="channels"):
        stream_with_context(decoder, torch.zeros(decoder.z_dim + 1, 3, 4, 4), 1)
    with pytest.raises(ValueError, match="depths"):
        warm_state(decoder, z[:, :3], depths=[1, 2])


# --------------------------------------------------------------------------------------
# Depths from topology


@pytest.mark.parametrize("variant", ["2.1", "2.2", "default"])
def test_plan_follows_topology(variant, default_meta):
    decoder = default_meta if variant == "default" else random_wan_decoder(tiny_wan_config(variant))
    plan = context_plan(decoder)
    d = decoder.decoder
    # The backward count of frames agrees with the forward one of `receptive_field`.
    assert plan.receptive_field == receptive_field(d) == decoder.receptive_field
    assert [(s.time_scale, s.spatial_scale, s.convs, s.reach) for s in plan.stages] == \
        [(s.time_scale, s.spatial_scale, s.causal_convs, s.reach) for s in stage_receptive_fields(d)]
    depths = plan.depths
    assert all(a >= b for a, b in zip(depths, depths[1:])) and depths[-1] == 1
    assert [c.slot for c in plan.convs] == list(range(len(depths)))
    assert plan.convs[0].name == "conv_in" and plan.convs[-1].name == "conv_out"
    for c in plan.convs:
        assert c.depth == math.ceil(c.frames / c.time_scale)
    # The slots are the ones diffusers' forward walks, in its order.
    assert [c.name for c in plan.convs] == [n for n, op in _cached_names(decoder)]


def _cached_names(decoder):
    names = {id(m): n for n, m in decoder.decoder.named_modules()}
    return [(names[id(op.module)], op) for op in decoder._ops if op.kind == "conv3d" and op.cached]


def test_default_config_depths(default_meta):
    plan = context_plan(default_meta)
    assert plan.receptive_field == 38
    # Stage by stage: latent resolution needs most of the 38, full resolution 4 down to 1.
    assert [(s.depth_in, s.depth_out) for s in plan.stages] == [(38, 16), (14, 8), (7, 4), (4, 1)]


# --------------------------------------------------------------------------------------
# Cost


@pytest.mark.parametrize("first", [False, True])
def test_slot_flops_split_the_per_latent_cost(run, default_meta, first):
    decoder, _, _, _ = run
    side = SIDE * decoder.spatial_scale
    for d, (h, w) in ((decoder, (side, side)), (default_meta, (720, 1280))):
        assert sum(slot_flops(d, h, w, first=first)) == pytest.approx(
            d.decode_flops_per_latent(h, w, first=first), rel=1e-12)


@pytest.mark.parametrize("context", [1, 2, 5, 30])
def test_counted_flops_match_the_model(run, context):
    """FlopCounterMode over warm_state equals context_flops, less the CPU attention matmuls.

    FlopCounterMode has no CPU formula for scaled_dot_product_attention (see test_wan):
    those 4 * P^2 * C per frame are added for every latent the attention's slot sees.
    """
    decoder, z, _, _ = run
    h = w = SIDE * decoder.spatial_scale
    plan = context_plan(decoder)
    attn_slot = next(c for c in plan.convs if c.name == "mid_block.resnets.1.conv1")
    c = decoder.decoder.mid_block.attentions[0].dim
    attention = 4 * (SIDE * SIDE) ** 2 * c * min(attn_slot.depth, context)
    with FlopCounterMode(display=False) as counter:
        warm_state(decoder, z[:, :context])
    assert counter.get_total_flops() + attention == context_flops(decoder, h, w, context)


def test_pruned_context_costs_a_fraction_of_full_context(run):
    decoder, z, _, _ = run
    h = w = SIDE * decoder.spatial_scale
    k = decoder.receptive_field
    full = decoder.decode_flops_per_latent(h, w, first=True) + (k - 1) * decoder.decode_flops_per_latent(h, w)
    assert context_flops(decoder, h, w, k) < full / 4
    # Measured the way: counted FLOPs of the warm-up against one steady step.
    state = decoder.new_state()
    decoder.step(state, z[:, 0])
    with FlopCounterMode(display=False) as counter:
        decoder.step(state, z[:, 1])
    step = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        warm_state(decoder, z[:, :k])
    assert counter.get_total_flops() / step < 4


def test_default_config_context_cost_at_720p(default_meta):
    """The issue's target: exact context for at most 10 steady latent frames' worth at 720p.

    Counted on the meta device (every op, attention included) and by the cost model.
    """
    d = default_meta
    k = d.receptive_field
    modelled = context_flops(d, 720, 1280, k)
    steady = d.decode_flops_per_latent(720, 1280)
    assert context_cost_in_latents(d, 720, 1280) == modelled / steady
    assert 6 < modelled / steady < 7  # 6.51; decoding the full context costs 37.3
    with FlopCounterMode(display=False) as counter:
        warm_state(d, torch.zeros(d.z_dim, k, 90, 160, device="meta"))
    assert counter.get_total_flops() == pytest.approx(modelled, rel=1e-9)
    assert context_cost_in_latents(d, 480, 832) < 10

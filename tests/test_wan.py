"""The one Wan VAE decoder: equal to diffusers, exact shards (pruned context too), topology from the config.

Everything runs on CPU with tiny configs (8 channels, 4x4 latents); the real-size configs
are built on the meta device only (shapes, weights checked, FLOPs counted, nothing decoded).
GPU paths (compile, CUDA graphs, TF32) are in tests/test_gpu.py.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan, WanCausalConv3d
from torch.utils.flop_counter import FlopCounterMode

from actors.wan import (DecoderOptions, WanDecoder, load_wan_decoder, random_wan_decoder, ti2v_config, tiny_wan_config,
                        wan21_config)
from actors.wan_diffusers import meta_vae
from actors.wan_topology import topology
from actors.protocol import frame_start, pixel_frames
from cluster.plan import plan_shards

VARIANTS = ("2.1", "2.2")
FP32_BOUND = 1e-5
EAGER_OPTIONS = {"default": DecoderOptions(), "no-buffer": DecoderOptions(conv_buffer=False),
                 "channels-last": DecoderOptions(channels_last=True),
                 "bias-in-reader": DecoderOptions(channels_last=True, bias_in_reader=True)}


def _vae(config: dict, seed: int = 0) -> AutoencoderKLWan:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLWan.from_config(config).eval()


def _latents(z_dim: int, t: int, h: int = 4, w: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(z_dim, t, h, w, generator=torch.Generator().manual_seed(seed))


def _decode(decoder, z: torch.Tensor, context: int = 0) -> torch.Tensor:
    return torch.cat(list(decoder.stream(z, context)), dim=1)


def _diffusers(vae: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(vae.config.latents_mean).view(-1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(-1, 1, 1, 1)
    with torch.no_grad():
        return vae.decode((z * std + mean).unsqueeze(0).to(vae.dtype)).sample[0]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.fixture(scope="module", params=VARIANTS)
def tiny(request):
    vae = _vae(tiny_wan_config(request.param))
    return vae, WanDecoder.from_vae(vae)


def _meta(config: dict) -> WanDecoder:
    with torch.device("meta"):
        vae = AutoencoderKLWan.from_config(config)
    return WanDecoder.from_vae(vae, device="meta")


@pytest.fixture(scope="module")
def default_meta():
    """The real Wan 2.1 VAE decoder on the meta device: its weights checked, nothing computed."""
    return _meta({})


# --------------------------------------------------------------------------------------
# Equality with diffusers


@pytest.mark.parametrize("t", [1, 2, 5])
def test_stream_matches_diffusers_decode(tiny, t):
    vae, decoder = tiny
    z = _latents(decoder.z_dim, t, seed=t)
    chunks = list(decoder.stream(z))
    assert [c.shape[1] for c in chunks] == [1] + [4] * (t - 1)
    ours = torch.cat(chunks, dim=1)
    ref = _diffusers(vae, z)
    assert ours.shape == ref.shape == (3, pixel_frames(t), 4 * decoder.spatial_scale, 4 * decoder.spatial_scale)
    assert ours.dtype == torch.float32 and ours.is_contiguous()
    assert _rel(ours, ref) <= FP32_BOUND
    assert ours.min() >= -1 and ours.max() <= 1


@pytest.mark.parametrize("name", ["no-buffer", "channels-last"])
def test_every_eager_option_set_matches_diffusers(tiny, name):
    vae, decoder = tiny
    z = _latents(decoder.z_dim, 3, seed=9)
    out = _decode(WanDecoder.from_vae(vae, options=EAGER_OPTIONS[name]), z)
    assert _rel(out, _diffusers(vae, z)) <= FP32_BOUND


@pytest.mark.slow  # inductor on 2 CPU cores: about a minute for the ~20 regions
def test_compiled_regions_match_eager():
    vae = _vae(tiny_wan_config())
    z = _latents(16, 3, seed=4)
    # With each conv's bias added in its reader's compiled region, as CUDA's default has it.
    compiled = WanDecoder.from_vae(vae, options=DecoderOptions(compile=True, bias_in_reader=True))
    assert _rel(_decode(compiled, z), _decode(WanDecoder.from_vae(vae), z)) <= FP32_BOUND


def test_options_default_by_device():
    assert DecoderOptions.for_device("cpu") == DecoderOptions()
    cuda = DecoderOptions.for_device("cuda")
    assert cuda.channels_last and cuda.conv_buffer and cuda.compile and cuda.cuda_graphs
    with pytest.raises(ValueError, match="conv_buffer"):
        DecoderOptions(conv_buffer=False, cuda_graphs=True)
    with pytest.raises(ValueError, match="CUDA"):
        random_wan_decoder(tiny_wan_config(), options=DecoderOptions(cuda_graphs=True))


def test_step_api_equals_stream_and_accepts_any_input_dtype(tiny):
    _, decoder = tiny
    z = _latents(decoder.z_dim, 3, seed=7)
    state = decoder.new_state()
    stepped = torch.cat([decoder.step(state, z[:, i].double()) for i in range(3)], dim=1)
    assert state.calls == 3
    assert torch.equal(stepped, _decode(decoder, z))


def test_two_interleaved_streams_do_not_share_state(tiny):
    _, decoder = tiny
    a, b = _latents(decoder.z_dim, 3, seed=2), _latents(decoder.z_dim, 3, seed=3)
    sa, sb = decoder.stream(a), decoder.stream(b)
    got_a, got_b = [], []
    for _ in range(3):
        got_a.append(next(sa))
        got_b.append(next(sb))
    assert torch.equal(torch.cat(got_a, 1), _decode(decoder, a))
    assert torch.equal(torch.cat(got_b, 1), _decode(decoder, b))


def test_bad_input_is_refused_at_the_call(tiny):
    _, decoder = tiny
    with pytest.raises(ValueError, match="channels"):
        decoder.stream(torch.zeros(decoder.z_dim + 1, 2, 4, 4))
    with pytest.raises(ValueError):
        decoder.stream(torch.zeros(1, decoder.z_dim, 2, 4, 4))
    with pytest.raises(ValueError, match="context"):
        decoder.stream(torch.zeros(decoder.z_dim, 2, 4, 4), context=2)
    with pytest.raises(ValueError, match="context"):
        decoder.stream(torch.zeros(decoder.z_dim, 2, 4, 4), context=-1)
    state = decoder.new_state()
    with pytest.raises(ValueError):
        decoder.step(state, torch.zeros(decoder.z_dim, 1, 4, 4))
    decoder.step(state, _latents(decoder.z_dim, 1)[:, 0])
    with pytest.raises(ValueError, match="latent size"):
        decoder.step(state, _latents(decoder.z_dim, 1, 4, 8)[:, 0])


def test_output_is_not_degenerate(tiny):
    # Random weights must give real pictures to test against, not a clamped or flat field.
    _, decoder = tiny
    x = _decode(decoder, _latents(decoder.z_dim, 3, 8, 8))
    assert (x.abs() >= 1).float().mean() < 0.05
    assert x.std() > 0.05
    assert x[:, 1:].std(dim=1).mean() > 1e-3  # frames differ from each other


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_error_no_worse_than_diffusers_bf16(variant):
    """Against fp32 on the same input: ours in bf16 is no worse than diffusers' own bf16 decode.

    Over three models, on average (one tiny model alone moves a few percent either way:
    other layouts round differently). Ours keeps the norms in fp32 until the conv input.
    """
    ours, theirs = [], []
    for seed in range(3):
        vae = _vae(tiny_wan_config(variant), seed)
        z = _latents(vae.config.z_dim, 3, seed=20 + seed)
        ref = _diffusers(vae, z)
        out = _decode(WanDecoder.from_vae(vae, dtype=torch.bfloat16), z)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        ours.append(_rel(out, ref))
        theirs.append(_rel(_diffusers(vae.to(torch.bfloat16), z.to(torch.bfloat16)), ref))
    assert 0 < sum(ours) <= sum(theirs), (ours, theirs)


# --------------------------------------------------------------------------------------
# Topology: read from the config, checked against diffusers' modules


@pytest.mark.parametrize("config", [tiny_wan_config("2.1"), tiny_wan_config("2.2"), {}, ti2v_config()],
                         ids=["tiny2.1", "tiny2.2", "wan2.1", "ti2v"])
def test_topology_describes_every_weight_of_diffusers_decoder(config):
    # The weight loader checks a folder against these shapes without importing diffusers.
    expected = {k: tuple(v.shape) for k, v in meta_vae(config).state_dict().items()
                if k.startswith(("decoder.", "post_quant_conv."))}
    assert topology(config).weight_shapes() == expected
    # The constructor checks each weight's shape and refuses unused ones: on the meta device
    # this is the real-size architecture, checked without memory.
    decoder = _meta(config)
    assert decoder.z_dim == config.get("z_dim", 16)
    assert decoder.spatial_scale == (16 if config.get("patch_size") else 8)
    assert decoder.receptive_field == (38 if config.get("base_dim", 96) > 8 else 30)


def test_causal_convs_run_in_slot_order(tiny):
    """The topology's slots are the causal convs diffusers' own decode runs, in its order."""
    vae, decoder = tiny
    names = {m: n for n, m in vae.named_modules()}
    seen: list[str] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(names[m])) for m in vae.decoder.modules()
             if isinstance(m, WanCausalConv3d) and m.kernel_size[0] > 1]
    try:
        _diffusers(vae, _latents(decoder.z_dim, 2))
    finally:
        for h in hooks:
            h.remove()
    steady = seen[len(seen) - len(decoder.topology.convs):]  # the second (steady) call
    assert steady == [x.name for x in decoder.topology.convs]


def test_default_config_topology_and_cost_model(default_meta):
    d, top = default_meta, default_meta.topology
    assert d.name == "wan2.1-vae" and d.receptive_field == 38 and d.first_exact_frame == 147
    stages = top.stage_depths()
    assert [(s.time_scale, s.spatial_scale) for s in stages] == [(1, 1), (2, 2), (4, 4), (4, 8)]
    assert [s.reach for s in stages] == [24, 14, 12, 14]
    # Pruned context: latent resolution needs most of the 38, full resolution 4 down to 1.
    assert [(s.depth_in, s.depth_out) for s in stages] == [(38, 16), (14, 8), (7, 4), (4, 1)]
    assert 6 < top.context_cost_in_latents(720, 1280) < 7  # 6.51; the full context costs 37.3
    assert top.context_cost_in_latents(480, 832) < 10
    # DESIGN.md: about 4 GiB of history per stream at 720p in bf16.
    assert 3.8 < top.cache_bytes(720, 1280, 2, conv_buffer=False) / 2**30 < 4.3
    # DESIGN.md: 31.45 TFLOP per steady latent frame at 720p, 10.2 for a stream's first.
    assert d.decode_flops_per_latent(720, 1280) / 1e12 == pytest.approx(31.45, rel=2e-3)
    assert d.decode_flops_per_latent(720, 1280, first=True) / 1e12 == pytest.approx(10.2, rel=5e-3)
    # Peak measured on an H200 (torch 2.11) for diffusers' modules: 19.34 GiB in fp32 at 720p.
    assert 19.34 < top.peak_memory_bytes(720, 1280, 4, conv_buffer=False) / 2**30 < 19.34 * 1.1


def test_default_config_context_cost_is_counted_at_720p(default_meta):
    """Pruned context on the meta device: FlopCounterMode counts every op, attention included."""
    d = default_meta
    k = d.receptive_field
    with FlopCounterMode(display=False) as counter:
        list(d.stream(torch.zeros(d.z_dim, k + 1, 90, 160, device="meta"), context=k))
    counted = counter.get_total_flops() - d.decode_flops_per_latent(720, 1280)  # less the one decoded latent
    assert counted == pytest.approx(d.topology.context_flops(720, 1280, k), rel=1e-9)


def test_flops_match_the_flop_counter(tiny):
    # FlopCounterMode counts the convolutions and matmuls; it has no CPU attention formula,
    # so the attention's q @ k^T and attn @ v (4 * P^2 * C per frame) are added here.
    _, decoder = tiny
    p = 4 * 4
    c = decoder.topology.mid[1].in_channels
    state = decoder.new_state()
    z = _latents(decoder.z_dim, 2)
    s = decoder.spatial_scale
    for i in range(2):
        with FlopCounterMode(display=False) as counter:
            decoder.step(state, z[:, i])
        assert counter.get_total_flops() + 4 * p * p * c == decoder.decode_flops_per_latent(4 * s, 4 * s, first=i == 0)


@pytest.mark.parametrize("conv_buffer", [True, False])
def test_state_size_is_the_cost_model(conv_buffer):
    vae = _vae(tiny_wan_config())
    decoder = WanDecoder.from_vae(vae, options=DecoderOptions(conv_buffer=conv_buffer))
    state = decoder.new_state()
    z = _latents(16, 3, 4, 8)
    for i in range(3):
        decoder.step(state, z[:, i])
    assert state.nbytes() == decoder.cache_bytes(32, 64)
    assert decoder.peak_memory_bytes(32, 64) > state.nbytes()


def test_peak_memory_scales_with_pixels_and_dtype():
    f32 = random_wan_decoder(tiny_wan_config(), dtype=torch.float32)
    b16 = random_wan_decoder(tiny_wan_config(), dtype=torch.bfloat16)
    small, big = f32.peak_memory_bytes(64, 128), f32.peak_memory_bytes(128, 256)
    assert big == 4 * small
    assert b16.peak_memory_bytes(64, 128) * 2 == small
    with pytest.raises(ValueError, match="multiple"):
        f32.peak_memory_bytes(100, 128)


# --------------------------------------------------------------------------------------
# Shards: full context from the receptive field, pruned context through the same step

T = 38  # latents: shards with the tiny configs' full receptive field (30) of context and more
STARTS = (1, 2, 9, 30, 31, 35)  # where the monolithic stream's state is kept


@pytest.fixture(scope="module")
def mono(tiny):
    """The monolithic decode and its state before some latents: the slow part, done once."""
    _, decoder = tiny
    z = _latents(decoder.z_dim, T, seed=11)
    state, chunks, states = decoder.new_state(), [], {}
    for i in range(T):
        if i in STARTS:
            # A buffer's front is its history; None: a time upsampler not run yet.
            states[i] = [None if h is None else h[:, :, :2].clone() for h in state.history]
        chunks.append(decoder.step(state, z[:, i]))
    return z, torch.cat(chunks, dim=1), states


def test_receptive_field_is_the_empirical_minimum(tiny, mono):
    """With K latents of context a fresh stream is exact, with K-1 it is not; frame by frame,
    a stream from latent c >= 1 is exact from its frame `first_exact_frame` on."""
    _, decoder = tiny
    z, ref_all, _ = mono
    k, e = decoder.receptive_field, decoder.first_exact_frame
    assert k == 30  # 4 stages of 2-resnet blocks
    c = 3
    out = _decode(decoder, z[:, c:])
    ref = ref_all[:, 4 * c : 4 * c + out.shape[1]]  # stream frame j >= 1 is monolithic frame j + 4c
    assert torch.equal(out[:, e:], ref[:, e:])
    assert not torch.equal(out[:, e - 1], ref[:, e - 1])
    assert frame_start(k - 1) < e <= frame_start(k)
    few = out[:, pixel_frames(8) : pixel_frames(9)]  # much less context: visibly wrong
    assert (few - ref_all[:, frame_start(c + 8) : frame_start(c + 9)]).abs().max() > 1e-3


def test_shards_with_full_context_reproduce_monolithic(tiny, mono):
    _, decoder = tiny
    z, ref, _ = mono
    plan = plan_shards(T, workers=2, context=decoder.receptive_field)
    assert any(s.context_start > 0 for s in plan.shards)
    pieces = [_decode(decoder, z[:, s.context_start : s.stop])[:, s.drop :] for s in plan.shards]
    assert [p.shape[1] for p in pieces] == [s.frame_count for s in plan.shards]
    assert torch.equal(torch.cat(pieces, dim=1), ref)


@pytest.mark.parametrize("start", [0, 1, 7, 29, 30, 31, 35, 37])
def test_pruned_shard_equals_monolithic(tiny, mono, start):
    """A shard [start, start+2) from pruned context is the monolithic decode, bit for bit.

    Below the receptive field (30) the context is the whole prefix (its first latent is the
    stream's first call); 30 is the first start whose context does not reach latent 0.
    """
    _, decoder = tiny
    z, ref, _ = mono
    c, stop = max(0, start - decoder.receptive_field), min(start + 2, T)
    chunks = list(decoder.stream(z[:, c:stop], context=start - c))
    assert [x.shape[1] for x in chunks] == [1 if i == 0 else 4 for i in range(start, stop)]
    assert torch.equal(torch.cat(chunks, 1), ref[:, frame_start(start) : frame_start(stop)])


def _warm(decoder: WanDecoder, context: torch.Tensor, depths) -> object:
    """The state after pruned context with the given per-conv depths (the stream's own loop)."""
    state, n = decoder.new_state(), context.shape[1]
    for j in range(n):
        decoder.step(state, context[:, j], convs=sum(d >= n - j for d in depths))
    return state


@pytest.mark.parametrize("start", STARTS)
def test_pruned_state_equals_the_monolithic_state(tiny, mono, start):
    _, decoder = tiny
    z, _, states = mono
    c = max(0, start - decoder.receptive_field)
    state = _warm(decoder, z[:, c:start], decoder.topology.context_depths())
    assert state.calls == start - c
    for i, (ours, theirs) in enumerate(zip(state.history, states[start], strict=True)):
        assert (ours is None and theirs is None) or torch.equal(ours[:, :, :2], theirs), f"slot {i}"


def test_planned_shards_with_pruned_context_reproduce_monolithic(tiny, mono):
    """What the worker does with a plan: each shard's latents from context_start, no drop."""
    _, decoder = tiny
    z, ref, _ = mono
    plan = plan_shards(T, workers=3, context=decoder.receptive_field, shard_latents=12)
    assert [s.context_start for s in plan.shards] == [0, 0, 0, 6]
    pieces = [_decode(decoder, z[:, s.context_start : s.stop], s.context) for s in plan.shards]
    assert [p.shape[1] for p in pieces] == [s.frame_count for s in plan.shards]
    assert torch.equal(torch.cat(pieces, 1), ref)


def test_extra_context_is_skipped(tiny, mono):
    _, decoder = tiny
    z, _, _ = mono
    k = decoder.receptive_field
    a, b = _decode(decoder, z[:, 2 : 2 + k + 6], k + 5), _decode(decoder, z[:, 7 : 7 + k + 1], k)
    assert torch.equal(a, b)
    assert decoder.topology.context_flops(32, 32, k + 5) == decoder.topology.context_flops(32, 32, k)


@pytest.mark.slow  # about 20 pruned-context decodes: minutes on 2 busy cores
def test_context_depths_are_minimal():
    """Lowering a conv's depth by one latent (and any later conv's to match) breaks the shard."""
    decoder = random_wan_decoder(tiny_wan_config("2.1"), seed=3)
    k = decoder.receptive_field
    s = k + 2
    z = _latents(16, s + 1, seed=5)
    depths = decoder.topology.context_depths()
    ref = decoder.step(_warm(decoder, z[:, 2:s], depths), z[:, s])
    full = decoder.new_state()
    for i in range(2, s):
        decoder.step(full, z[:, i])
    assert torch.equal(ref, decoder.step(full, z[:, s]))
    # The last conv of each run of equal depths: lowering an earlier one lowers it too (the
    # convs that see a latent are a prefix of the step), so these are the weakest changes.
    ends = [i for i, d in enumerate(depths) if i + 1 == len(depths) or depths[i + 1] < d]
    for i in ends:
        d = depths[i]
        if d == 1:
            continue  # a conv that sees no context at all would keep no history
        lower = [min(x, d - 1) if j >= i else x for j, x in enumerate(depths)]
        out = decoder.step(_warm(decoder, z[:, 2:s], lower), z[:, s])
        assert not torch.equal(out, ref), f"slot {i}: depth {d - 1} is enough"


@pytest.mark.parametrize("context", [1, 5, 30])
def test_pruned_context_flops_are_the_model(tiny, context):
    """FlopCounterMode over a pruned-context stream equals `context_flops` plus the decoded
    latent's step, less the CPU attention matmuls: one per latent that the attention's
    conv (mid_block.resnets.1.conv1) processes."""
    _, decoder = tiny
    top = decoder.topology
    s = 4 * decoder.spatial_scale
    attention = 4 * 16 ** 2 * top.mid[1].in_channels  # 4x4 latents: P = 16
    seen = min(top.context_depths()[top.mid[2].conv1.slot], context) + 1
    with FlopCounterMode(display=False) as counter:
        list(decoder.stream(_latents(decoder.z_dim, context + 1), context))
    counted = counter.get_total_flops() + seen * attention - decoder.decode_flops_per_latent(s, s)
    assert counted == top.context_flops(s, s, context)
    full = decoder.decode_flops_per_latent(s, s, first=True) + 29 * decoder.decode_flops_per_latent(s, s)
    assert top.context_flops(s, s, 30) < full / 4


# --------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_pretrained_then_load(tmp_path, variant):
    vae = _vae(tiny_wan_config(variant), seed=5)
    vae.save_pretrained(tmp_path / "vae")
    # Only the config decides the variant, whatever the folder is called.
    shutil.move(tmp_path / "vae", tmp_path / "wan2.1-looking-name")
    loaded = load_wan_decoder(str(tmp_path / "wan2.1-looking-name"), device="cpu", dtype=torch.float32)
    assert loaded.z_dim == (16 if variant == "2.1" else 48)
    assert loaded.spatial_scale == (8 if variant == "2.1" else 16)
    assert loaded.receptive_field == 30
    z = _latents(loaded.z_dim, 2, seed=6)
    assert torch.equal(_decode(loaded, z), _decode(WanDecoder.from_vae(vae), z))


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_wan_decoder(str(missing))
    folder = tmp_path / "vae"
    _vae(tiny_wan_config()).save_pretrained(folder)
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_wan_decoder(str(folder))
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_wan_decoder(str(folder))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "z_dim": 4}))
    (other / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="AutoencoderKL"):
        load_wan_decoder(str(other))


def test_partial_or_mismatched_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "vae"
    _vae(tiny_wan_config(), seed=2).save_pretrained(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    full = load_file(weights)
    # A decoder-only file is fine (nothing here encodes) ...
    save_file({k: v for k, v in full.items() if not k.startswith(("encoder.", "quant_conv."))}, weights)
    load_wan_decoder(str(folder))
    # ... one missing a block of the decoder would decode noise: refused.
    save_file({k: v for k, v in full.items() if not k.startswith("decoder.up_blocks.0.")}, weights)
    with pytest.raises(ValueError, match="decoder weights missing"):
        load_wan_decoder(str(folder))
    # So is a config.json that describes another architecture than the weights.
    save_file(full, weights)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_res_blocks": 2}))
    with pytest.raises(ValueError, match="do not match its config.json"):
        load_wan_decoder(str(folder))


def test_constructor_checks_weights_against_the_config():
    vae = _vae(tiny_wan_config())
    weights = vae.state_dict()
    with pytest.raises(ValueError, match="lack 'decoder.conv_out.bias'"):
        WanDecoder(vae.config, {k: v for k, v in weights.items() if k != "decoder.conv_out.bias"})
    with pytest.raises(ValueError, match="does not describe: decoder.extra"):
        WanDecoder(vae.config, {**weights, "decoder.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        WanDecoder({**vae.config, "base_dim": 16}, weights)


def test_bf16_unnormalization_is_wan_pipelines_bit_for_bit():
    # WanPipeline: latents / (1 / std.to(dtype)) + mean.to(dtype), all in the VAE's dtype.
    config = tiny_wan_config()
    decoder = WanDecoder.from_vae(_vae(config), dtype=torch.bfloat16)
    std = torch.tensor(config["latents_std"]).view(-1, 1, 1).to(torch.bfloat16)
    mean = torch.tensor(config["latents_mean"]).view(-1, 1, 1).to(torch.bfloat16)
    z = torch.randn(16, 8, 8).to(torch.bfloat16)
    assert torch.equal(z / decoder.inv_std + decoder.mean, z / (1.0 / std) + mean)


def test_weights_of_the_other_variant_are_refused_before_any_work(tmp_path):
    from cluster.geometry import decoder_geometry
    from actors.protocol import DecoderSpec

    folder = tmp_path / "ti2v"
    _vae(tiny_wan_config("2.2")).save_pretrained(folder)
    with pytest.raises(ValueError, match="holds a wan2.2-ti2v VAE.*decoder 'wan2.2-ti2v'"):
        decoder_geometry(DecoderSpec(name="wan2.1", weights=str(folder)))
    assert decoder_geometry(DecoderSpec(name="wan2.2-ti2v", weights=str(folder))).z_dim == 48


def test_sharded_checkpoints_pass_the_drivers_check_and_load(tmp_path):
    from cluster.geometry import decoder_geometry
    from actors.protocol import DecoderSpec

    folder = tmp_path / "sharded"
    vae = _vae(tiny_wan_config(), seed=3)
    vae.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert decoder_geometry(DecoderSpec(name="wan2.1", weights=str(folder))).z_dim == 16
    z = _latents(16, 2, seed=4)
    assert torch.equal(_decode(load_wan_decoder(str(folder)), z), _decode(WanDecoder.from_vae(vae), z))


def test_a_vae_that_is_not_4x_in_time_is_refused_before_any_work(tmp_path):
    from cluster.geometry import decoder_geometry
    from actors.protocol import DecoderSpec

    folder = tmp_path / "2x"
    _vae({**tiny_wan_config(), "temperal_downsample": [False, False, True]}).save_pretrained(folder)
    with pytest.raises(ValueError, match="compresses time 2x"):
        decoder_geometry(DecoderSpec(name="wan2.1", weights=str(folder)))
    assert topology({**tiny_wan_config(), "temperal_downsample": [False, False, True]}).time_scale == 2


def test_wan21_config_is_diffusers_default():
    assert wan21_config() == {k: v for k, v in meta_vae({}).config.items() if not k.startswith("_")}


def test_random_decoder_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = random_wan_decoder(tiny_wan_config(), seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = random_wan_decoder(tiny_wan_config(), seed=1)
    c = random_wan_decoder(tiny_wan_config(), seed=2)
    wa, wb, wc = (d.weights["decoder.conv_in"][0] for d in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert math.isclose(a.receptive_field, 30)

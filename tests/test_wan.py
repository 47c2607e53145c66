"""The Wan VAE streaming decoder: equal to diffusers, exact shards, topology-derived receptive field.

Everything runs on CPU with tiny configs (8 channels, 4x4 or 8x8 latents); only the
default (real-size) config is built, never decoded at size.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan, WanCausalConv3d
from torch.utils.flop_counter import FlopCounterMode

from actors.wan import (
    WanDecoder,
    first_exact_frame,
    load_wan_decoder,
    random_wan_decoder,
    receptive_field,
    stage_receptive_fields,
    tiny_wan_config,
)
from actors.protocol import frame_start, pixel_frames
from cluster.plan import plan_shards

VARIANTS = ("2.1", "2.2")


def _vae(config: dict, seed: int = 0) -> AutoencoderKLWan:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLWan.from_config(config).eval()


def _latents(z_dim: int, t: int, h: int = 4, w: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(z_dim, t, h, w, generator=torch.Generator().manual_seed(seed))


def _unnormalize(vae: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(vae.config.latents_mean).view(-1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(-1, 1, 1, 1)
    return z * std + mean


def _decode_all(decoder: WanDecoder, z: torch.Tensor) -> torch.Tensor:
    return torch.cat(list(decoder.stream(z)), dim=1)


@pytest.fixture(scope="module", params=VARIANTS)
def tiny(request):
    vae = _vae(tiny_wan_config(request.param))
    return vae, WanDecoder(vae)


@pytest.fixture(scope="module")
def default_decoder():
    return random_wan_decoder(None, seed=0)


# A monolithic decode long enough for shards with a full receptive field of context,
# shared by the receptive-field and shard tests (decoding is the slow part).
@pytest.fixture(scope="module")
def long_run(tiny):
    _, decoder = tiny
    t = decoder.receptive_field + 6
    z = _latents(decoder.z_dim, t, seed=1)
    return z, _decode_all(decoder, z)


# --------------------------------------------------------------------------------------
# Equality with diffusers


@pytest.mark.parametrize("t", [1, 2, 5])
def test_stream_matches_diffusers_decode(tiny, t):
    vae, decoder = tiny
    z = _latents(decoder.z_dim, t, 8, 8, seed=t)
    chunks = list(decoder.stream(z))
    assert [c.shape[1] for c in chunks] == [1] + [4] * (t - 1)
    ours = torch.cat(chunks, dim=1)
    side = 8 * decoder.spatial_scale
    assert ours.shape == (3, pixel_frames(t), side, side)
    with torch.no_grad():
        ref = vae.decode(_unnormalize(vae, z).unsqueeze(0)).sample[0]
    assert ref.shape == ours.shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert ours.min() >= -1 and ours.max() <= 1


def test_step_api_equals_stream_and_accepts_any_input_dtype(tiny):
    _, decoder = tiny
    z = _latents(decoder.z_dim, 3, seed=7)
    state = decoder.new_state()
    stepped = torch.cat([decoder.step(state, z[:, i].double()) for i in range(3)], dim=1)
    assert state.calls == 3
    assert torch.equal(stepped, _decode_all(decoder, z))


def test_two_interleaved_streams_do_not_share_state(tiny):
    _, decoder = tiny
    a, b = _latents(decoder.z_dim, 3, seed=2), _latents(decoder.z_dim, 3, seed=3)
    sa, sb = decoder.stream(a), decoder.stream(b)
    interleaved_a, interleaved_b = [], []
    for _ in range(3):
        interleaved_a.append(next(sa))
        interleaved_b.append(next(sb))
    assert torch.equal(torch.cat(interleaved_a, 1), _decode_all(decoder, a))
    assert torch.equal(torch.cat(interleaved_b, 1), _decode_all(decoder, b))


def test_stream_rejects_wrong_shape(tiny):
    _, decoder = tiny
    with pytest.raises(ValueError, match="channels"):
        decoder.stream(torch.zeros(decoder.z_dim + 1, 2, 4, 4))
    with pytest.raises(ValueError):
        decoder.stream(torch.zeros(1, decoder.z_dim, 2, 4, 4))
    with pytest.raises(ValueError):
        decoder.step(decoder.new_state(), torch.zeros(decoder.z_dim, 1, 4, 4))


def test_output_is_not_degenerate(tiny):
    # Random weights must give real pictures to test against, not a clamped or flat field.
    _, decoder = tiny
    x = _decode_all(decoder, _latents(decoder.z_dim, 3, 8, 8))
    assert (x.abs() >= 1).float().mean() < 0.05
    assert x.std() > 0.05
    assert x[:, 1:].std(dim=1).mean() > 1e-3  # frames differ from each other


def test_bf16_keeps_weights_and_output_in_bf16():
    config = tiny_wan_config()
    ref = WanDecoder(_vae(config), dtype=torch.float32)
    half = WanDecoder(_vae(config), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.decoder.parameters())
    z = _latents(16, 3, seed=4)
    out = _decode_all(half, z)
    assert out.dtype == torch.bfloat16
    assert (out.float() - _decode_all(ref, z)).abs().max() < 0.1


# --------------------------------------------------------------------------------------
# Receptive field: from the topology, checked by experiment


def test_default_config_receptive_field_is_38(default_decoder):
    d = default_decoder.decoder
    assert default_decoder.name == "wan2.1-vae"
    assert default_decoder.spatial_scale == 8 and default_decoder.z_dim == 16
    assert receptive_field(d) == default_decoder.receptive_field == 38
    assert first_exact_frame(d) == 147
    stages = stage_receptive_fields(d)
    assert [(s.time_scale, s.spatial_scale) for s in stages] == [(1, 1), (2, 2), (4, 4), (4, 8)]
    assert [s.reach for s in stages] == [24, 14, 12, 14]


def test_default_config_cost_model(default_decoder):
    d = default_decoder
    # DESIGN.md: about 4 GiB of cache per stream at 720p in bf16, twice in fp32 (d is fp32).
    assert 3.8 < d.cache_bytes(720, 1280) / 2**30 / 2 < 4.3
    # DESIGN.md: 31.45 TFLOP per steady latent frame at 720p, 10.2 for a stream's first.
    assert d.decode_flops_per_latent(720, 1280) / 1e12 == pytest.approx(31.45, rel=2e-3)
    assert d.decode_flops_per_latent(720, 1280, first=True) / 1e12 == pytest.approx(10.2, rel=5e-3)
    # Peak measured on an H200 (torch 2.11): 19.34 GiB in fp32 for one stream at 720p.
    # The estimate should be just above it: a scheduler packs streams by it.
    assert 19.34 < d.peak_memory_bytes(720, 1280) / 2**30 < 19.34 * 1.1


def test_default_config_decodes_sanely_at_tiny_size(default_decoder):
    # The real architecture with random init: 2 latents at 2x2 (16x16 pixels) is cheap.
    d = default_decoder
    state = d.new_state()
    z = _latents(16, 2, 2, 2)
    out = torch.cat([d.step(state, z[:, i]) for i in range(2)], dim=1)
    assert out.shape == (3, 5, 16, 16)
    assert (out.abs() >= 1).float().mean() < 0.5 and out.std() > 0.01
    assert state.nbytes() == d.cache_bytes(16, 16)


def test_tiny_receptive_field_is_the_empirical_minimum(tiny, long_run):
    """With K latents of context a fresh-cache stream is exact, with K-1 it is not.

    Frame by frame, too: a stream from latent c >= 1 is exact from its frame
    `first_exact_frame` on, and not at the frame before (the topology model predicts the
    exact frame, not only the latent).
    """
    _, decoder = tiny
    z, mono = long_run
    k, e = decoder.receptive_field, decoder.first_exact_frame
    assert k == receptive_field(decoder.decoder) == 30  # 4 stages of 2-resnet blocks
    for c in (1, 3):
        out = _decode_all(decoder, z[:, c:])
        # Stream frame j >= 1 is monolithic frame j + 4c.
        ref = mono[:, 4 * c : 4 * c + out.shape[1]]
        assert torch.equal(out[:, e:], ref[:, e:])
        assert not torch.equal(out[:, e - 1], ref[:, e - 1])
        # In latents: the first latent whose 4 frames are all exact is c + K.
        assert frame_start(k - 1) < e <= frame_start(k)
        s = c + k
        kept = out[:, pixel_frames(s - c) :]
        assert torch.equal(kept, mono[:, frame_start(s) : frame_start(s) + kept.shape[1]])
        short = out[:, pixel_frames(s - 1 - c) :]  # latent s-1 decoded with K-1 of context
        assert not torch.equal(short, mono[:, frame_start(s - 1) : frame_start(s - 1) + short.shape[1]])
        # Much less context is visibly wrong, not just off by rounding.
        few = out[:, pixel_frames(8) : pixel_frames(9)]
        assert (few - mono[:, frame_start(c + 8) : frame_start(c + 9)]).abs().max() > 1e-3


def test_shards_with_receptive_field_context_reproduce_monolithic(tiny, long_run):
    _, decoder = tiny
    z, mono = long_run
    t = z.shape[1]
    plan = plan_shards(t, workers=2, context=decoder.receptive_field)
    assert any(s.context_start > 0 for s in plan.shards)  # a real test of context
    pieces = []
    for shard in plan.shards:
        out = _decode_all(decoder, z[:, shard.context_start : shard.stop])
        pieces.append(out[:, shard.drop :])
        assert pieces[-1].shape[1] == shard.frame_count
    assert torch.equal(torch.cat(pieces, dim=1), mono)


def test_topology_walk_is_forward_order(tiny):
    """The walk's cached convs are the ones a steady call runs, in the order it runs them."""
    _, decoder = tiny
    seen: list[torch.nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(m))
             for m in decoder.decoder.modules()
             if isinstance(m, WanCausalConv3d) and m.kernel_size[0] > 1]
    try:
        state = decoder.new_state()
        z = _latents(decoder.z_dim, 2)
        decoder.step(state, z[:, 0])
        seen.clear()
        decoder.step(state, z[:, 1])
    finally:
        for h in hooks:
            h.remove()
    walked = [op.module for op in decoder._ops if op.kind == "conv3d" and op.cached]
    assert seen == walked


# --------------------------------------------------------------------------------------
# Cost model


def test_cache_bytes_is_exact(tiny):
    _, decoder = tiny
    state = decoder.new_state()
    z = _latents(decoder.z_dim, 3, 4, 8)
    for i in range(3):
        decoder.step(state, z[:, i])
    s = decoder.spatial_scale
    assert state.nbytes() == decoder.cache_bytes(4 * s, 8 * s)


def test_peak_memory_scales_with_pixels_and_dtype():
    f32 = random_wan_decoder(tiny_wan_config(), dtype=torch.float32)
    b16 = random_wan_decoder(tiny_wan_config(), dtype=torch.bfloat16)
    small, big = f32.peak_memory_bytes(64, 128), f32.peak_memory_bytes(128, 256)
    assert big == pytest.approx(4 * small, rel=1e-6)
    assert small > f32.cache_bytes(64, 128)
    assert b16.peak_memory_bytes(64, 128) < small
    assert b16.cache_bytes(64, 128) * 2 == f32.cache_bytes(64, 128)
    with pytest.raises(ValueError):
        f32.peak_memory_bytes(100, 128)


def test_flops_match_the_flop_counter(tiny):
    # FlopCounterMode counts the convolutions; it has no CPU attention formula, so the
    # attention matmuls (4 * P^2 * C per frame, mid block at latent size) are added here.
    _, decoder = tiny
    h = w = 4
    p = h * w
    c = decoder.decoder.mid_block.attentions[0].dim
    state = decoder.new_state()
    z = _latents(decoder.z_dim, 2, h, w)
    for i in range(2):
        with FlopCounterMode(display=False) as counter:
            decoder.step(state, z[:, i])
        s = decoder.spatial_scale
        expected = decoder.decode_flops_per_latent(h * s, w * s, first=(i == 0))
        assert counter.get_total_flops() + 4 * p * p * c == expected


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
    assert torch.equal(_decode_all(loaded, z), _decode_all(WanDecoder(vae), z))


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


def test_bf16_unnormalization_is_wan_pipelines_bit_for_bit():
    # WanPipeline: latents / (1 / std.to(dtype)) + mean.to(dtype), all in the VAE's dtype.
    config = tiny_wan_config()
    decoder = WanDecoder(_vae(config), dtype=torch.bfloat16)
    std = torch.tensor(config["latents_std"]).view(-1, 1, 1).to(torch.bfloat16)
    mean = torch.tensor(config["latents_mean"]).view(-1, 1, 1).to(torch.bfloat16)
    z = torch.randn(16, 8, 8).to(torch.bfloat16)
    assert torch.equal(z / decoder._inv_std + decoder._mean, z / (1.0 / std) + mean)


def test_weights_of_the_other_variant_are_refused_before_any_work(tmp_path):
    from cluster.geometry import decoder_geometry
    from actors.protocol import DecoderSpec

    folder = tmp_path / "ti2v"
    _vae(tiny_wan_config("2.2")).save_pretrained(folder)
    with pytest.raises(ValueError, match="holds a wan2.2-ti2v VAE.*--decoder wan2.2-ti2v"):
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
    assert torch.equal(_decode_all(load_wan_decoder(str(folder)), z), _decode_all(WanDecoder(vae), z))


def test_a_vae_that_is_not_4x_in_time_is_refused_before_any_work(tmp_path):
    from cluster.geometry import decoder_geometry
    from actors.protocol import DecoderSpec

    folder = tmp_path / "2x"
    _vae({**tiny_wan_config(), "temperal_downsample": [False, False, True]}).save_pretrained(folder)
    with pytest.raises(ValueError, match="compresses time 2x"):
        decoder_geometry(DecoderSpec(name="wan2.1", weights=str(folder)))


def test_random_decoder_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = random_wan_decoder(tiny_wan_config(), seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = random_wan_decoder(tiny_wan_config(), seed=1)
    c = random_wan_decoder(tiny_wan_config(), seed=2)
    wa, wb, wc = (d.decoder.conv_in.weight for d in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert math.isclose(a.receptive_field, 30)

"""Decoder weights read straight onto the device, and every strict check of a VAE folder."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
from safetensors.torch import load_file, save_file

from actors.wan import tiny_wan_config
from actors.wan_diffusers import decoder_vae
from actors.wan_weights import DECODER_PREFIXES, decoder_shapes, random_decoder_weights, read_wan_vae


def _folder(tmp_path, seed=1, **kw):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan.from_config(tiny_wan_config())
    folder = tmp_path / "vae"
    vae.save_pretrained(folder, **kw)
    return vae, folder


def test_reads_only_the_decoders_tensors_in_the_asked_dtype(tmp_path):
    vae, folder = _folder(tmp_path)
    config, weights = read_wan_vae(folder, dtype=torch.bfloat16)
    expected = {k: v for k, v in vae.state_dict().items() if k.startswith(DECODER_PREFIXES)}
    assert set(weights) == set(expected)
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert all(torch.equal(weights[k], v.to(torch.bfloat16)) for k, v in expected.items())
    built = decoder_vae(config, weights)
    # The modules hold the very tensors read (assigned, not copied); the encoder was never built.
    assert built.decoder.conv_in.weight.data_ptr() == weights["decoder.conv_in.weight"].data_ptr()
    assert all(p.is_meta for p in built.encoder.parameters())


def test_decoder_tensors_the_config_does_not_know_are_refused(tmp_path):
    _, folder = _folder(tmp_path)
    weights = folder / "diffusion_pytorch_model.safetensors"
    full = load_file(weights)
    save_file({**full, "decoder.extra.weight": torch.zeros(2)}, weights)
    with pytest.raises(ValueError, match="1 the config does not know"):
        read_wan_vae(folder)
    wrong = dict(full)
    wrong["decoder.conv_in.bias"] = torch.zeros(3)
    save_file(wrong, weights)
    with pytest.raises(ValueError, match="1 of the wrong shape.*conv_in.bias"):
        read_wan_vae(folder)


def test_a_sharded_index_reads_only_files_inside_the_folder(tmp_path):
    vae, folder = _folder(tmp_path, max_shard_size="20KB")
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    _, weights = read_wan_vae(folder)
    assert torch.equal(weights["decoder.conv_out.weight"], vae.state_dict()["decoder.conv_out.weight"])
    doc = json.loads(index.read_text())
    key = next(k for k in doc["weight_map"] if k.startswith("decoder."))
    doc["weight_map"][key] = "../elsewhere.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="only .safetensors files in the folder"):
        read_wan_vae(folder)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_weights_land_on_the_gpu_directly(tmp_path):
    _, folder = _folder(tmp_path)
    _, weights = read_wan_vae(folder, device="cuda", dtype=torch.bfloat16)
    assert all(t.is_cuda and t.dtype == torch.bfloat16 for t in weights.values())


def test_random_weights_are_pytorchs_default_init_drawn_per_tensor():
    config = tiny_wan_config("2.2")
    a, b = random_decoder_weights(config, seed=4), random_decoder_weights(config, seed=4)
    assert {k: v.shape for k, v in a.items()} == decoder_shapes(config)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = random_decoder_weights(config, seed=5)
    assert not torch.equal(a["decoder.conv_in.weight"], other["decoder.conv_in.weight"])
    for key in ("decoder.conv_in.weight", "decoder.conv_in.bias", "decoder.mid_block.attentions.0.to_qkv.bias"):
        fan_in = math.prod(a[key.rsplit(".", 1)[0] + ".weight"].shape[1:])
        assert 0.5 / math.sqrt(fan_in) < a[key].abs().max() <= 1 / math.sqrt(fan_in)
    assert torch.equal(a["decoder.norm_out.gamma"], torch.ones(a["decoder.norm_out.gamma"].shape))


def test_the_workers_modules_import_no_diffusers_and_no_compiler():
    """A cold worker imports these (Ray's actor, Serve's replica) and builds its decoder;
    diffusers' autoencoders package took 19.6 s and torch._dynamo 6.8 s of a cold H200
    worker's start. A compiling decoder imports the compiler at its first compiled step."""
    code = ("import sys, actors.ray_actors, actors.service; "
            "from actors.wan import DecoderOptions, random_wan_decoder, tiny_wan_config; "
            "random_wan_decoder(tiny_wan_config(), options=DecoderOptions(compile=True)); "
            "print(sorted({m.split('.')[0] for m in sys.modules if m.startswith(('diffusers', 'transformers'))}"
            " | {m for m in sys.modules if m in ('torch._dynamo', 'torch._inductor')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]", out.stdout

"""What the driver must know of a decoder before any GPU work: channels, scale, receptive field.

Read from the model's config alone (the Wan VAE is built on the meta device, no weights),
so the driver validates input and plans shards without loading or downloading a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from actors.decoders import TestPatternDecoder
from jobs.spec import DecoderSpec


@dataclass(frozen=True)
class DecoderGeometry:
    z_dim: int
    spatial_scale: int
    receptive_field: int


def wan_config(spec: DecoderSpec) -> dict:
    """The VAE config a Wan spec decodes with: the weights' config.json, or the built-in one."""
    from actors import wan

    if spec.random_weights:
        return wan.ti2v_config() if spec.name == "wan2.2-ti2v" else {}
    from infra.storage import open_store

    store = open_store(spec.weights)
    try:
        config = json.loads(store.get_bytes("config.json"))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{spec.weights}: no config.json; expected a diffusers-format VAE folder "
                                "(config.json + diffusion_pytorch_model.safetensors)") from exc
    if not store.exists("diffusion_pytorch_model.safetensors"):
        raise FileNotFoundError(f"{spec.weights}: no diffusion_pytorch_model.safetensors")
    return config


def decoder_geometry(spec: DecoderSpec) -> DecoderGeometry:
    if spec.name == "test-pattern":
        d = TestPatternDecoder()
        return DecoderGeometry(d.z_dim, d.spatial_scale, d.receptive_field)
    from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan

    from actors import wan

    with torch.device("meta"):  # topology only: no memory, no weights
        vae = AutoencoderKLWan.from_config(wan_config(spec))
    patch = vae.config.get("patch_size") or 1
    return DecoderGeometry(int(vae.config["z_dim"]), 8 * patch, wan.receptive_field(vae.decoder))

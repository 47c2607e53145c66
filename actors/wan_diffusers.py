"""diffusers' own Wan VAE modules over framefarm's config and weights: the reference.

diffusers is the weight format (actors/wan_weights.py reads it without diffusers), the test
reference and the benchmarks' baseline. Building its modules is what this module is for; the
worker never imports it (importing diffusers' `models.autoencoders` package imports every
autoencoder it has: 19.6 s of a cold H200 worker's 28 s of imports), and a test checks that
importing the worker's modules loads no diffusers module. Tests and benchmarks import it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan


def meta_vae(config: Mapping) -> AutoencoderKLWan:
    """The VAE's modules for `config` on the meta device: shapes without memory or init."""
    with torch.device("meta"):
        return AutoencoderKLWan.from_config(dict(config))


def random_vae(config: Mapping | None = None, seed: int = 0) -> AutoencoderKLWan:
    """diffusers' VAE with its own default (random) init under `seed` (the caller's RNG is left
    alone); `config=None` is the real Wan 2.1 VAE. Not the weights of framefarm's
    `--random-weights` (actors.wan_weights.random_decoder_weights draws its own)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLWan.from_config(dict(config or {}))


def decoder_vae(config: Mapping, weights: Mapping[str, torch.Tensor]) -> AutoencoderKLWan:
    """diffusers' VAE modules holding `weights` (checked) by reference; the encoder stays on the
    meta device (it cannot encode). For code that drives diffusers' modules."""
    vae = meta_vae(config)
    for name in ("decoder", "post_quant_conv"):
        module = getattr(vae, name)
        prefix = name + "."
        # assign: the module takes the tensors as they are (device, dtype), instead of copying
        # them into its meta parameters; strict: every parameter and buffer gets one.
        module.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)},
                               strict=True, assign=True)
        left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
        if left:  # a tensor outside the state dict (a non-persistent buffer) would stay unset
            raise ValueError(f"{name} has tensors no weight file sets: {', '.join(left[:3])}")
    return vae

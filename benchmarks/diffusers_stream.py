"""The baseline the product's decoder is measured against: diffusers' own Wan VAE modules,
streamed one latent frame per call with a cache list the caller owns.

This is how framefarm decoded before issue 9 (`WanDecoder` of actors/wan.py until then),
kept here, apart from the product, so that a benchmark can run the old path beside the new
one in the same process: `post_quant_conv`, then `decoder(x, feat_cache, feat_idx=[0],
first_chunk)` per latent frame, un-normalized as WanPipeline does, clamped to [-1, 1].
The encoder is never used.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan, WanCausalConv3d, unpatchify


class DiffusersStream:
    """A streaming decoder (`stream(latents)` of CTHW normalized latents -> CFHW chunks in [-1, 1])."""

    name = "diffusers-stream"

    def __init__(self, vae: AutoencoderKLWan, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        config = dict(vae.config)
        self.device, self.dtype = torch.device(device), dtype
        self.z_dim = int(config["z_dim"])
        self.patch_size = config.get("patch_size") or 1
        self.post_quant_conv = vae.post_quant_conv.to(self.device, dtype).eval().requires_grad_(False)
        self.decoder = vae.decoder.to(self.device, dtype).eval().requires_grad_(False)
        # One slot per causal conv, the 1x1x1 shortcuts included: the decoder indexes them in order.
        self._slots = sum(isinstance(m, WanCausalConv3d) for m in self.decoder.modules())
        self._first_chunk = "first_chunk" in inspect.signature(self.decoder.forward).parameters
        mean = torch.tensor(config["latents_mean"], dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(config["latents_std"], dtype=torch.float32).view(-1, 1, 1)
        # WanPipeline's order: std in the dtype, its reciprocal in the dtype, z / (1/std) + mean.
        self._mean = mean.to(self.device, dtype)
        self._inv_std = 1.0 / std.to(self.device, dtype)

    @classmethod
    def random(cls, config: dict | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, seed: int = 0) -> DiffusersStream:
        """diffusers' default init under `seed` (not the product's --random-weights, which draws
        its own: actors.wan_weights.random_decoder_weights)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKLWan.from_config(dict(config or {}))
        return cls(vae, device, dtype)

    def stream(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        if latents.dim() != 4 or latents.shape[0] != self.z_dim:
            raise ValueError(f"expected CTHW latents with {self.z_dim} channels, got {tuple(latents.shape)}")
        return self._steps(latents)

    def _steps(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        cache: list = [None] * self._slots
        for i in range(latents.shape[1]):
            with torch.no_grad():
                z = latents[:, i].to(self.device, self.dtype, non_blocking=True)
                z = (z / self._inv_std + self._mean).unsqueeze(0).unsqueeze(2).contiguous()
                kwargs = {"first_chunk": i == 0} if self._first_chunk else {}
                out = self.decoder(self.post_quant_conv(z), feat_cache=cache, feat_idx=[0], **kwargs)
                if self.patch_size > 1:
                    out = unpatchify(out, patch_size=self.patch_size)
                out = out.clamp_(-1.0, 1.0)
            yield out[0]

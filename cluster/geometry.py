"""What the driver must know of a decoder before any GPU work: channels, scale, receptive field.

Read from the model's config alone (`actors.wan_topology`: no weights, no torch modules),
so the driver validates input and plans shards without loading or downloading a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from actors import wan, wan_topology
from actors.decoders import TestPatternDecoder
from actors.protocol import TEMPORAL_SCALE, DecoderSpec
from infra.storage import open_store


@dataclass(frozen=True)
class DecoderGeometry:
    z_dim: int
    spatial_scale: int
    receptive_field: int
    # The Wan decoder's topology and cost model (None: a decoder without one).
    topology: wan_topology.Topology | None = None

    def context_cost(self, latent_height: int, latent_width: int, context: int) -> float | None:
        """Steady latent frames' worth of work that pruned context costs (None: not prunable)."""
        if self.topology is None:
            return None
        s = self.spatial_scale
        return self.topology.context_cost_in_latents(latent_height * s, latent_width * s, context)


def wan_config(spec: DecoderSpec) -> dict:
    """The VAE config a Wan spec decodes with: the weights' config.json, or the built-in one."""
    if spec.random_weights:
        return wan.ti2v_config() if spec.name == "wan2.2-ti2v" else {}
    store = open_store(spec.weights)
    try:
        config = json.loads(store.get_bytes("config.json"))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{spec.weights}: no config.json; expected a diffusers-format VAE folder "
                                "(config.json + diffusion_pytorch_model.safetensors)") from exc
    if not (store.exists(wan.WEIGHTS_NAME) or store.exists(wan.WEIGHTS_INDEX_NAME)):
        raise FileNotFoundError(f"{spec.weights}: no {wan.WEIGHTS_NAME} (or its sharded index)")
    return config


def decoder_geometry(spec: DecoderSpec) -> DecoderGeometry:
    if spec.name == "test-pattern":
        d = TestPatternDecoder()
        return DecoderGeometry(d.z_dim, d.spatial_scale, d.receptive_field)
    config = wan_config(spec)
    top = wan_topology.topology(config)
    # The architecture comes from config.json, but the job's defaults (fps) from the name:
    # a mix-up would decode one model while labelling it the other.
    variant = wan_topology.variant_name(config).removesuffix("-vae")
    if spec.weights and variant in ("wan2.1", "wan2.2-ti2v") and variant != spec.name:
        raise ValueError(f"{spec.weights} holds a {variant} VAE (by its config.json), but the job asks for "
                         f"decoder {spec.name!r}; ask for decoder {variant!r}")
    if top.time_scale != TEMPORAL_SCALE:
        # The planner's frame arithmetic (1 + 4(T-1) frames) is Wan's; refuse before any work.
        raise ValueError(f"this VAE's config compresses time {top.time_scale}x; framefarm plans shards for "
                         f"Wan's {TEMPORAL_SCALE}x (temperal_downsample with two True entries)")
    return DecoderGeometry(top.z_dim, top.spatial_scale, top.receptive_field, top)

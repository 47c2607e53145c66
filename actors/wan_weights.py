"""A Wan VAE folder's decoder weights, read straight onto the device and checked.

diffusers' `from_pretrained` builds the whole VAE with a random initialisation on the CPU,
then overwrites it with the file's tensors and moves it: for the Wan 2.1 VAE that is 127 M
parameters initialised for nothing (the encoder's 54 M are never used here) and a CPU copy
of each. Here only the tensors decoding needs (`decoder.*`, `post_quant_conv.*`) are read,
by safetensors straight onto the device in the decoder's dtype, and checked against the
shapes the folder's own config.json implies (`wan_topology.Topology.weight_shapes`, a walk
of the config alone: diffusers is not imported, its `models.autoencoders` package alone took
19.6 s of a cold H200 worker's start; tests check the walk against diffusers' modules). A
folder that lacks one of them, has one of another shape, or carries decoder tensors the
config does not know is refused: diffusers only warns and leaves the gap random, which
would decode noise without a word. Pickled `.bin` weights are refused; nothing here
unpickles.

`random_decoder_weights` is the decoder's random initialisation for `--random-weights`
(benchmarks, tests): PyTorch's default init of the same layers, drawn per tensor, so the
same seed gives the same weights on every worker.

diffusers' modules over these weights (the test reference, the benchmarks' baseline) are in
`actors.wan_diffusers`, which the worker never imports.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping

import torch
from safetensors import safe_open

from actors.wan_topology import topology

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
DECODER_PREFIXES = ("decoder.", "post_quant_conv.")  # all decoding reads; the encoder is never used


def read_config(path: str | os.PathLike) -> dict:
    """config.json of a diffusers-format Wan VAE folder, checked before any weight is read."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Wan VAE folder not found: {path}")
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in Wan VAE folder {path}")
    if not (os.path.isfile(os.path.join(path, WEIGHTS_NAME))
            or os.path.isfile(os.path.join(path, WEIGHTS_INDEX_NAME))):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in Wan VAE folder {path} (pickled .bin weights are refused)")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} is not a JSON object")
    cls = config.get("_class_name", "AutoencoderKLWan")
    if cls != "AutoencoderKLWan":
        raise ValueError(f"{config_path} describes a {cls}, not an AutoencoderKLWan")
    for key in ("z_dim", "latents_mean", "latents_std"):
        if key not in config:
            raise ValueError(f"{config_path} lacks {key!r}")
    return config


def decoder_shapes(config: Mapping) -> dict[str, torch.Size]:
    """Every tensor decoding needs, by state-dict key, with the shape `config` implies."""
    return {k: torch.Size(v) for k, v in topology(dict(config)).weight_shapes().items()}


def random_decoder_weights(config: Mapping, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random decoder weights for `config` (fp32, on the CPU): the distribution of PyTorch's
    default init, which diffusers' Wan VAE keeps (conv weights and biases uniform in
    +-1/sqrt(fan_in), norm gains one), but not diffusers' values for the same seed: those
    come from building the whole VAE, encoder first, in module order. Each tensor is drawn
    from a generator seeded by (seed, its key), on the CPU, so that every worker of a job,
    on any device, holds the same weights.
    """
    shapes = decoder_shapes(config)
    weights = {}
    for key, shape in shapes.items():
        if key.endswith(".gamma"):
            weights[key] = torch.ones(shape)
            continue
        # A bias draws within its layer's bound: the fan-in of the weight beside it.
        layer_weight = shapes[key.rsplit(".", 1)[0] + ".weight"]
        bound = 1.0 / math.sqrt(math.prod(layer_weight[1:]))
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        weights[key] = torch.empty(shape).uniform_(-bound, bound, generator=g)
    return weights


def _weight_files(path: str) -> dict[str, list[str]]:
    """safetensors file -> the decoder keys it holds (one file, or the shards of an index)."""
    index = os.path.join(path, WEIGHTS_INDEX_NAME)
    if not os.path.isfile(os.path.join(path, WEIGHTS_NAME)) and os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a safetensors index (no weight_map): {e}") from e
        files: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            if key.startswith(DECODER_PREFIXES):
                if os.path.basename(name) != name or not name.endswith(".safetensors"):
                    raise ValueError(f"{index} names {name!r}: only .safetensors files in the folder are read")
                files.setdefault(os.path.join(path, name), []).append(key)
        return files
    single = os.path.join(path, WEIGHTS_NAME)
    with safe_open(single, framework="pt") as f:
        return {single: [k for k in f.keys() if k.startswith(DECODER_PREFIXES)]}


def read_decoder_weights(path: str | os.PathLike, config: Mapping, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The folder's decoder tensors on `device` in `dtype`, exactly those `config` implies."""
    path = os.fspath(path)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    expected = decoder_shapes(config)
    weights: dict[str, torch.Tensor] = {}
    for file, keys in _weight_files(path).items():
        if not os.path.isfile(file):
            raise FileNotFoundError(f"Wan VAE folder {path}: its index names {os.path.basename(file)}, which is missing")
        # safetensors reads each tensor into memory of the device itself: no CPU copy on the way.
        with safe_open(file, framework="pt", device=str(device)) as f:
            for key in keys:
                t = f.get_tensor(key)
                weights[key] = t.to(dtype) if t.is_floating_point() else t
    check_decoder_weights(weights, expected, path)
    return weights


def check_decoder_weights(weights: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], path: str) -> None:
    missing = [k for k in expected if k not in weights]
    mismatched = [k for k in expected if k in weights and weights[k].shape != expected[k]]
    unknown = [k for k in weights if k not in expected]
    if missing or mismatched or unknown:
        bad = missing or mismatched or unknown
        raise ValueError(f"Wan VAE folder {path}: its weights do not match its config.json: "
                         f"{len(missing)} decoder weights missing, {len(mismatched)} of the wrong shape, "
                         f"{len(unknown)} the config does not know (e.g. {', '.join(bad[:3])})")


def read_wan_vae(path: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, decoder weights on the device) of a diffusers-format Wan VAE folder, checked."""
    config = read_config(path)
    return config, read_decoder_weights(path, config, device, dtype)

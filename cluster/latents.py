"""Reading and validating latent input before any GPU work.

Latents are Wan's normalized latents as the pipeline's transformer leaves them, shape
[C, T, H, W] or [1, C, T, H, W], in .safetensors (one tensor, or one named `latents`),
.npy, or .pt (read with `torch.load(weights_only=True)`; never unpickled otherwise).
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch

from actors.protocol import InputError
from infra.storage import read_uri_bytes

SUFFIXES = (".safetensors", ".npy", ".pt", ".pth")


def _suffix(name: str) -> str:
    suffix = os.path.splitext(name)[1].lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{name}: unsupported latents format {suffix!r}; use one of {', '.join(SUFFIXES)}")
    return suffix


def read_latents_bytes(data: bytes, name: str) -> torch.Tensor:
    """Parse a latents file's bytes; `name` gives the format (by suffix) and the error text."""
    suffix = _suffix(name)
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load as load_safetensors

            tensors = load_safetensors(data)
            if "latents" in tensors:
                tensor = tensors["latents"]
            elif len(tensors) == 1:
                tensor = next(iter(tensors.values()))
            else:
                raise InputError(f"{name}: holds {len(tensors)} tensors ({', '.join(sorted(tensors))}) "
                                 "and none is named 'latents'")
        elif suffix == ".npy":
            array = np.load(io.BytesIO(data), allow_pickle=False)
            tensor = torch.from_numpy(np.ascontiguousarray(array))
        else:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                if "latents" not in obj:
                    raise InputError(f"{name}: a dict without a 'latents' entry")
                obj = obj["latents"]
            if not isinstance(obj, torch.Tensor):
                raise InputError(f"{name}: holds a {type(obj).__name__}, not a tensor")
            tensor = obj
    except InputError:
        raise
    except Exception as exc:  # truncated or corrupt files fail in many ways inside the readers
        raise InputError(f"{name}: cannot read latents ({type(exc).__name__}: {exc})") from exc
    return tensor


def read_latents(path: str) -> torch.Tensor:
    """Read a latents file from a local path or an object-store URI."""
    _suffix(path)
    try:
        data = read_uri_bytes(path)
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such latents file") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot read latents ({exc})") from exc
    return read_latents_bytes(data, path)


def validate_latents(latents: torch.Tensor, z_dim: int, name: str = "latents") -> torch.Tensor:
    """Check shape, dtype and values; return the CTHW tensor (batch dimension removed)."""
    if not isinstance(latents, torch.Tensor):
        raise InputError(f"{name}: expected a tensor, got {type(latents).__name__}")
    if not latents.dtype.is_floating_point:
        raise InputError(f"{name}: dtype {latents.dtype} is not floating point")
    if latents.dim() == 5:
        if latents.shape[0] != 1:
            raise InputError(f"{name}: batch of {latents.shape[0]}; render one video at a time (batch 1)")
        latents = latents[0]
    if latents.dim() != 4:
        raise InputError(f"{name}: shape {tuple(latents.shape)} has rank {latents.dim()}; "
                         "expected [C, T, H, W] or [1, C, T, H, W]")
    c, t, h, w = latents.shape
    if c != z_dim:
        raise InputError(f"{name}: {c} channels, but the decoder expects {z_dim}")
    if t < 1:
        raise InputError(f"{name}: T = {t} latent frames; need at least 1")
    if h < 1 or w < 1:
        raise InputError(f"{name}: empty frame {h}x{w}")
    # A NaN or inf anywhere makes the sum non-finite, and one fp32 pass is 20x cheaper than
    # isfinite() over a long video's latents. A non-finite sum from finite values (overflow)
    # is told apart by the exact count.
    if not bool(torch.isfinite(latents.sum(dtype=torch.float32))):
        bad = int((~torch.isfinite(latents)).sum())
        if bad:
            raise InputError(f"{name}: {bad} non-finite values (NaN or inf)")
    return latents

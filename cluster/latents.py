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


def validate_latents(latents: torch.Tensor, z_dim: int, name: str = "latents",
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Check shape, dtype and values; return the CTHW tensor (batch dimension removed).

    `dtype` is the decoder's: values must be finite once converted to it (fp64 latents
    beyond fp32's range become inf in an fp32 decoder, and Wan then writes black frames)."""
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
    check_finite(latents, dtype, name)
    return latents


_FINITE_CHUNK = 8  # latent frames counted at a time when some value is not finite


def check_finite(latents: torch.Tensor, dtype: torch.dtype, name: str = "latents") -> None:
    """Refuse NaN, inf, and values that overflow `dtype`.

    One min/max pass (as cheap as a sum, 60x cheaper than isfinite() over a long video's
    latents; NaN propagates into both): conversion is monotonic, so every value is finite in
    `dtype` exactly when the smallest and the largest are. Only a refusal counts, by frames.
    """
    lo, hi = torch.aminmax(latents)
    if bool(torch.isfinite(lo.to(dtype))) and bool(torch.isfinite(hi.to(dtype))):
        return
    bad = sum(int((~torch.isfinite(latents[:, i:i + _FINITE_CHUNK].to(dtype))).sum())
              for i in range(0, latents.shape[1], _FINITE_CHUNK))
    beyond = "" if latents.dtype == dtype else f" in the decoder's {str(dtype).removeprefix('torch.')}"
    raise InputError(f"{name}: {bad} non-finite values{beyond} (NaN, inf or out of range)")

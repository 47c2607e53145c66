"""Inputs refused before Ray starts, end to end through the job's own first step (RenderJob.prepare,
which the CLI and the notebook API run before joining Ray): nothing started, nothing written."""

from __future__ import annotations

import pytest
import ray
import torch
from safetensors.torch import save_file

from actors.decoders import pattern_latents
from actors.protocol import InputError, RenderSpec
from cluster.driver import RenderJob


@pytest.mark.parametrize("dtype, where", [("fp32", "tensor"), ("bf16", "file")])
def test_latents_finite_as_given_but_not_in_the_decoders_dtype_are_refused_before_ray(tmp_path, dtype, where):
    # fp64 beyond fp32's range (Wan in fp32 wrote black frames, exit 0); fp32 beyond bf16's.
    latents = pattern_latents(3, 16, 16).to(torch.float64 if dtype == "fp32" else torch.float32)
    latents[0, 1, 1, 1] = 1e300 if dtype == "fp32" else 3.4e38
    out = tmp_path / "out"
    if where == "file":
        save_file({"latents": latents}, str(tmp_path / "in.safetensors"))
        spec, tensor = RenderSpec(latents=str(tmp_path / "in.safetensors"), output=str(out),
                                  decoder={"name": "test-pattern", "dtype": dtype}), None
    else:
        spec, tensor = RenderSpec(output=str(out), decoder={"name": "test-pattern", "dtype": dtype}), latents
    with pytest.raises(InputError, match=r"1 non-finite values in the decoder's (float32|bfloat16)"):
        RenderJob(spec, tensor, progress=False).prepare()
    assert not ray.is_initialized() and not out.exists()

"""The CUDA path of the frame pipeline and the decoder; skipped where torch sees no GPU.

Run on the GPU machine: `python -m pytest tests/test_gpu.py`.
"""

import numpy as np
import pytest
import torch

from actors.decoders import TestPatternDecoder, pattern_latents, read_index
from actors.colour import to_uint8_frames
from actors.pipeline import run_pipeline
from actors.sinks import open_sink, read_frames
from actors.protocol import frames_to_drop, pixel_frames

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tiny_decoder(device="cuda"):
    from actors.wan import random_wan_decoder, tiny_wan_config

    return random_wan_decoder(tiny_wan_config(), device=device, seed=3)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_async_cuda_pipeline_equals_sync(tmp_path, depth):
    decoder = _tiny_decoder()
    latents = torch.randn(16, 9, 16, 16).cuda()
    outs = {}
    for mode, ring in (("sync", 0), ("async", depth)):
        path = str(tmp_path / f"{mode}.mkv")
        report, result = run_pipeline(decoder.stream(latents), open_sink("ffv1", path, 128, 128, 16),
                                      depth=ring, device="cuda")
        assert result.frames == pixel_frames(9)
        assert 0 < report.gpu_utilization <= 1.0 and report.peak_gpu_bytes > 0
        outs[mode] = read_frames(path, "ffv1")
    reference = np.concatenate([to_uint8_frames(c).cpu().numpy() for c in decoder.stream(latents)])
    np.testing.assert_array_equal(outs["sync"], reference)
    np.testing.assert_array_equal(outs["async"], reference)


def test_cuda_pipeline_drops_context_and_keeps_indices(tmp_path):
    decoder = TestPatternDecoder(device="cuda")
    latents = pattern_latents(12, 96, 128)[:, 3:].cuda()
    path = str(tmp_path / "p.mp4")
    report, _ = run_pipeline(decoder.stream(latents), open_sink("mp4", path, 128, 96, 16), drop=frames_to_drop(3, 5),
                             device="cuda")
    assert [read_index(f) for f in read_frames(path, "mp4")] == list(range(17, 45))


def test_exact_shard_on_gpu_matches_monolithic():
    decoder = _tiny_decoder()
    k = decoder.receptive_field
    latents = torch.randn(16, k + 6, 16, 16).cuda()
    whole = torch.cat([to_uint8_frames(c) for c in decoder.stream(latents)])
    start = k + 2
    shard = torch.cat([to_uint8_frames(c) for c in decoder.stream(latents[:, start - k:])])
    shard = shard[frames_to_drop(start - k, start):]
    assert torch.equal(shard, whole[pixel_frames(start):])

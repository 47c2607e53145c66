"""A worker's compiled decoder: a compile that fails falls back to eager and says so.

The compile cache's own round trip (a second process compiles nothing) is in
test_compile_cache.py; compiling the whole tiny decoder on the 2-core CI machine takes minutes,
so here compiling fails fast, the way it does on a node without a working compiler.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from actors.colour import to_uint8_frames
from actors.protocol import DecodeSpec, DecoderSpec, EncodeSpec, Shard, ShardTask
from actors.sinks import read_frames
from actors.wan import load_wan_decoder
from actors.worker import ShardWorker, build_decoder
from tests.conftest import tiny_latents


def test_compile_option_maps_to_the_decoders_options(tiny_wan_dir):
    cpu = torch.device("cpu")
    auto = build_decoder(DecoderSpec(weights=tiny_wan_dir), cpu)
    on = build_decoder(DecoderSpec(weights=tiny_wan_dir, compile="on"), cpu)
    off = build_decoder(DecoderSpec(weights=tiny_wan_dir, compile="off"), cpu)
    assert not auto.options.compile and on.options.compile and not off.options.compile
    assert not on.options.cuda_graphs  # CUDA graphs only where the device has them


def test_a_compile_that_fails_falls_back_to_eager_and_says_so(tiny_wan_dir, tmp_path):
    from torch._inductor import config as inductor_config

    spec = DecoderSpec(weights=tiny_wan_dir, compile="on")
    worker = ShardWorker("cpu", scratch_dir=str(tmp_path / "scratch"))
    cache = str(tmp_path / "compile-cache")
    # Inductor's CPU back end compiles C++: with no compiler there, compiling raises.
    with inductor_config.patch({"cpp.cxx": (None, "/nonexistent/c++")}):
        info = worker.check_input(spec, 8, 8, compile_cache=cache)
        startup = info["startup"]
        assert startup["compile"] == "eager-fallback" and "InvalidCxxCompiler" in startup["compile_error"]
        names = [p["name"] for p in startup["phases"]]
        assert names.count("weights") == 2 and "compile (failed)" in names  # rebuilt without compiling
        # The compiler's modules were imported on a thread over the weights, then waited for.
        assert {"compiler-import", "compiler-import-wait"} <= set(names)
        assert not worker.decoder(spec).options.compile
        assert not os.path.exists(cache) or not os.listdir(cache)  # nothing compiled, nothing saved

        # The shard decodes, eagerly, the same frames as an eager decoder.
        latents = tiny_latents(4, seed=5)
        task = ShardTask("j", Shard(0, 0, 4, 0), str(tmp_path / "out"), "s.mkv",
                         DecodeSpec(spec, "pruned", 2, cache), EncodeSpec("ffv1", 16, "auto", 18, "veryfast", 0))
        record = worker.render_shard(task, latents)
    assert record.startup.compile == "eager-fallback"
    reference = np.concatenate([to_uint8_frames(c).numpy() for c in load_wan_decoder(tiny_wan_dir).stream(latents)])
    np.testing.assert_array_equal(read_frames(str(tmp_path / "out" / "s.mkv"), "ffv1"), reference)

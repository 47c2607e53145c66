"""The CLI is generated from the job spec: --help, parsing, and the same spec as the notebook API."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import ray
from pydantic import BaseModel

from actors.decoders import pattern_latents, read_index
from actors.protocol import InputError, RenderSpec, pixel_frames
from actors.sinks import read_frames
from cluster.api import make_spec
from jobs.render import Command, RunOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaf_fields(model: type[BaseModel]):
    """(option, field) of every field the CLI must offer, nested models flattened."""
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            for sub, subfield in ann.model_fields.items():
                yield ("--" + (name if sub == "name" else sub).replace("_", "-")), subfield
        elif name in ("latents", "output"):
            yield name.upper(), field
        else:
            yield "--" + name.replace("_", "-"), field


def _help_of(help_text: str, option: str) -> str:
    """The help entry of one option: its line and the indented lines after it."""
    lines = help_text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(option + " ") or line.strip() == option or line.strip().startswith(option + ","):
            block = [line]
            for nxt in lines[i + 1:]:
                if nxt.startswith("  ") and not nxt.strip().startswith(("-", "LATENTS", "OUTPUT")):
                    block.append(nxt)
                else:
                    break
            return " ".join(" ".join(block).split())
    raise AssertionError(f"{option} not in --help")


def test_help_lists_every_option_with_its_default_and_help():
    proc = subprocess.run([sys.executable, "-m", "jobs.render", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    fields = list(_leaf_fields(RenderSpec)) + list(_leaf_fields(RunOptions))
    assert len(fields) > 20
    for option, field in fields:
        entry = _help_of(proc.stdout, option)
        assert field.description, f"{option}: the spec field has no description"
        assert " ".join(field.description.split())[:30] in entry, entry
        if option in ("LATENTS", "OUTPUT"):
            continue
        if field.default is None:
            assert "default" in entry, f"{option}: says nothing of what leaving it out means: {entry}"
        elif field.is_required():
            continue
        else:
            shown = "off" if field.default is False else str(field.default)
            assert f"(default: {shown})" in entry, entry


def _cli_spec(argv):
    command = Command()
    values, run = command.parse(argv)
    return command.spec(values), run


def test_cli_and_api_build_equal_specs(tmp_path):
    weights = tmp_path / "vae"
    cli, run = _cli_spec(["z.safetensors", str(tmp_path / "out"), "--weights", str(weights), "--dtype", "bf16",
                          "--context", "8", "--workers", "3", "--shard-latents", "5", "--format", "ffv1",
                          "--keep-segments", "--address", "auto", "--startup-timeout", "30"])
    api, _ = make_spec(pathlib.Path("z.safetensors"), tmp_path / "out",
                       {"decoder": "wan2.1", "weights": weights, "dtype": "bf16", "context": 8, "workers": 3,
                        "shard_latents": 5, "format": "ffv1", "keep_segments": True})
    assert cli == api
    assert (run.address, run.startup_timeout, run.demo) == ("auto", 30.0, False)
    # The decoder as a dict or a DecoderSpec, as before, gives the same spec.
    as_dict, _ = make_spec("z.safetensors", str(tmp_path / "out"),
                           {"decoder": {"name": "wan2.1", "weights": str(weights), "dtype": "bf16"},
                            "context": "8", "workers": 3, "shard_latents": 5, "format": "ffv1",
                            "keep_segments": True})
    assert as_dict == api
    assert make_spec("z.npy", "o", {"decoder": api.decoder})[0].decoder == api.decoder
    # The deprecated names, --overlap and --shard-frames (overlap=, shard_frames=), still work.
    old, _ = _cli_spec(["z.safetensors", str(tmp_path / "out"), "--weights", str(weights), "--dtype", "bf16",
                        "--overlap", "8", "--workers", "3", "--shard-frames", "5", "--format", "ffv1",
                        "--keep-segments"])
    assert old == cli
    old_api, _ = make_spec(pathlib.Path("z.safetensors"), tmp_path / "out",
                           {"decoder": "wan2.1", "weights": weights, "dtype": "bf16", "overlap": 8, "workers": 3,
                            "shard_frames": 5, "format": "ffv1", "keep_segments": True})
    assert old_api == api


def test_demo_defaults_and_bad_options_exit_2(tmp_path):
    spec, run = _cli_spec(["--demo"])
    assert (spec.output, spec.decoder.name, run.demo, run.demo_frames) == ("framefarm-demo", "test-pattern", True, 41)
    spec, _ = _cli_spec(["--demo", str(tmp_path / "d"), "--demo-frames", "9"])
    assert spec.output == str(tmp_path / "d") and spec.latents is None
    proc = subprocess.run([sys.executable, "-m", "jobs.render", "z.safetensors", "out", "--random-weights",
                           "--weights", "w"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--weights" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(SystemExit) as exc:
        Command().parse(["z.safetensors"])
    assert exc.value.code == 2


def test_api_errors_name_its_keywords_and_refuse_before_ray(tmp_path):
    with pytest.raises(InputError, match=r"latents: a list; give a path"):
        make_spec([1, 2, 3], tmp_path, {"decoder": "test-pattern"})
    with pytest.raises(InputError, match=r"numpy array of <U1"):
        make_spec(np.array(["a"]), tmp_path, {"decoder": "test-pattern"})
    with pytest.raises(InputError, match="decoder= is required"):
        make_spec("z.npy", tmp_path, {})
    with pytest.raises(ValueError, match=r"weights .* or random_weights=True") as exc:
        make_spec("z.npy", tmp_path, {"decoder": "wan2.1"})
    assert "--" not in str(exc.value)
    with pytest.raises(InputError, match="dtype given both"):
        make_spec("z.npy", tmp_path, {"decoder": {"name": "wan2.1", "dtype": "fp32"}, "dtype": "bf16",
                                      "random_weights": True})
    from cluster import render

    bad = np.zeros((3, 4), dtype=np.float32)  # not [C,T,H,W]
    with pytest.raises(InputError):
        render(bad, tmp_path / "out", decoder="test-pattern")
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


@pytest.fixture
def local_ray():
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False,
             object_store_memory=200 * 2**20)
    try:
        yield
    finally:
        ray.shutdown()


def test_notebook_renders_a_numpy_array_to_a_path(local_ray, tmp_path):
    from cluster import Farm, render, submit

    latents = pattern_latents(9, 96, 128).numpy()
    out = tmp_path / "np"
    result = render(latents, out, decoder="test-pattern", workers=1, format="ffv1", progress=False)
    frames = read_frames(str(out / result.summary["video"]), "ffv1")
    assert [read_index(f) for f in frames] == list(range(pixel_frames(9)))
    with Farm(workers=1) as farm:
        handle = submit(latents[None], str(tmp_path / "sub"), farm=farm, decoder="test-pattern",
                        format="ffv1")
        assert handle.wait(timeout=300).summary["frames"] == pixel_frames(9)


def test_approximate_context_warns_that_frames_near_shard_starts_differ(tmp_path, caplog):
    from cluster.driver import prepare

    latents = pattern_latents(9, 96, 128)
    spec = RenderSpec(output=str(tmp_path / "o"), decoder={"name": "wan2.1", "random_weights": True}, context=4)
    with caplog.at_level("WARNING", logger="framefarm"):
        prepare(spec, latents)
    assert any("frames near each shard's start will differ" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="framefarm"):
        prepare(spec.model_copy(update={"context": "exact"}), latents)
    assert not [r for r in caplog.records if "differ" in r.getMessage()]

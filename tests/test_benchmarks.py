"""The benchmark scripts stay runnable: each imports and answers --help; the CPU ones run tiny."""

import importlib
import json
import pkgutil

import pytest

import benchmarks

SCRIPTS = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_imports_and_answers_help(name, capsys):
    module = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as exit_:
        module.parse_args(["--help"])
    assert exit_.value.code == 0
    assert f"python -m benchmarks.{name}" in capsys.readouterr().out


def test_bench_takes_the_gpu_commands_options():
    from benchmarks.bench import parse_args

    args = parse_args(["--size", "1280x720", "--latent-frames", "41", "--runs", "3", "--json", "r.json"])
    assert (args.size, args.latent_frames, args.runs, args.json, args.variants) == (
        (1280, 720), 41, 3, "r.json", ["a", "c", "c1", "d"])


def test_bench_encode_runs_tiny_and_compares_bytes(tmp_path):
    from benchmarks.bench_encode import main

    out = tmp_path / "enc.json"
    assert main(["--size", "640x368", "--frames", "24", "--parts", "1,2,2+plain", "--repeat", "1", "--fps-in", "400",
                 "--modes", "paced", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["mode"], r["parts"]): r for r in result["rows"]}
    assert rows[("paced", "2")]["part_count"] == 2 and rows[("paced", "1")]["part_count"] == 1
    assert rows[("paced", "2+plain")]["part_count"] == 2  # the last part without its low-latency options
    assert 0.5 < rows[("paced", "2")]["bytes"] / rows[("paced", "1")]["bytes"] < 2

"""The GPU benchmarks of issue 9 run end to end on the CPU at tiny sizes.

They run first on a lent GPU, where a script broken by a change elsewhere (a message type, a
renamed option) costs device time: here each runs as the lead runs it, in its own process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, *sys.path])}
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def test_bench_product_on_cpu(tmp_path):
    out = tmp_path / "bench_product.json"
    # fp32: bf16 convolutions on this CPU take a slow path (180 s for this run against 12 s).
    _run("benchmarks.bench_product", "--size", "32x32", "--latent-frames", "2", "--device", "cpu", "--runs", "1",
         "--dtype", "fp32", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["product"]["runs"][0]["frames"] == result["old"]["runs"][0]["frames"] == 5
    assert result["ratio_old_over_product"]["pipeline_last"] > 0 and result["same_frame_count"]


def test_bench_coldstart_on_cpu(tmp_path):
    out = tmp_path / "bench_coldstart.json"
    _run("benchmarks.bench_coldstart", "--device", "cpu", "--decoder", "test-pattern", "--size", "128x96",
         "--runs", "no-cache,cache", "--no-prewarm", "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    runs = json.loads(out.read_text())["runs"]
    assert [r["run"] for r in runs] == ["no-cache", "cache"]
    assert all({"imports", "device", "weights"} <= set(r["phases_s"]) and r["to_ready_s"] > 0 for r in runs)

"""Ctrl-C on `python -m jobs.render`: one line, exit 130, workers stopped, no partial files;
the same command then resumes and the video is frame-exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pyarrow.parquet as pq
import pytest

from actors.decoders import read_index
from actors.protocol import pixel_frames
from actors.sinks import read_frames
from infra.staged import TMP_SUFFIX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _partial_files(root) -> list[str]:
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in files + dirs if n.endswith(TMP_SUFFIX)]


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_and_the_same_command_resumes(tmp_path):
    out = tmp_path / "clip"
    cmd = [sys.executable, "-m", "jobs.render", "--demo", str(out), "--demo-frames", "21", "--shard-latents", "2",
           "--workers", "2", "--format", "ffv1"]
    # Its own session, so the SIGINT below goes to its whole process group, as Ctrl-C in a
    # terminal does (Ray's own processes included).
    driver = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    stderr: list[str] = []
    committed = threading.Event()

    def read_stderr():
        # The driver logs each shard it has received; a worker commits the segment (and its
        # sidecar) before that. Interrupt after the first, while the others are mid-render.
        for line in driver.stderr:
            stderr.append(line)
            if " done on " in line:
                committed.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert committed.wait(timeout=400), "".join(stderr)[-3000:]
        os.killpg(driver.pid, signal.SIGINT)
        driver.wait(timeout=180)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    reader.join(timeout=60)
    text = "".join(stderr)
    assert driver.returncode == 130, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("framefarm: interrupted; ") and "the same command resumes" in last, last
    kept = int(last.split("interrupted; ")[1].split(" of ")[0])
    assert kept >= 1
    assert not (out / "video.mkv").exists()
    assert _partial_files(out) == []

    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reused_shards"] == kept
    # Honest labels on a CPU run: no GPU named where none worked, figures where there are some.
    assert " done on " in rerun.stderr and "decode busy" in rerun.stderr, rerun.stderr[-3000:]
    assert "GPU busy" not in rerun.stderr and "bottleneck gpu" not in rerun.stderr
    assert summary["device"] == "cpu" and summary["gpu_utilization"] is not None
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert manifest and all(not row["segment_kept"] for row in manifest)  # the segments were deleted
    assert all(row["bottleneck"] != "gpu" for row in manifest)
    # The progress bar and log lines never share a line.
    for line in rerun.stderr.replace("\r", "\n").splitlines():
        assert not ("frame/s" in line and " INFO " in line), line
    frames = read_frames(str(out / "video.mkv"), "ffv1")
    assert [read_index(f) for f in frames] == list(range(pixel_frames(21)))
    assert _partial_files(out) == [] and not (out / "segments").exists()


def test_partial_files_of_a_killed_run_are_removed_by_the_next(tmp_path):
    from infra.storage import open_store

    store = open_store(str(tmp_path))
    store.put_bytes("segments/job/00000_0-2_c0.mkv", b"kept")
    (tmp_path / "segments" / "job" / f".00001_2-4_c1.mkv.abc{TMP_SUFFIX}").write_bytes(b"half")
    (tmp_path / "segments" / "job" / f".png.abc{TMP_SUFFIX}").mkdir()
    assert store.discard_partial("segments/job") == 2
    assert store.list("segments/") == ["segments/job/00000_0-2_c0.mkv"] and _partial_files(tmp_path) == []
    store.delete("segments/job/00000_0-2_c0.mkv")
    (tmp_path / "segments" / "job").mkdir(parents=True)
    (tmp_path / "segments" / "job" / f".x{TMP_SUFFIX}").write_bytes(b"half")
    assert store.discard_partial("segments/job") == 1
    assert not (tmp_path / "segments").exists()  # emptied folders go, as delete() drops them

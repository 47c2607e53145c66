"""`ray job submit` end to end, and a rerun after a killed driver, against a head this test starts.

The head comes from `ray.cluster_utils.Cluster` on free ports (its own dashboard and agent
ports, so it collides with no other Ray on the machine) and is stopped by its own handle.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import pytest

from actors.decoders import read_index
from actors.sinks import read_frames
from actors.protocol import pixel_frames
from tests.conftest import start_job_head

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def head():
    cluster, dashboard = start_job_head(num_cpus=3, num_gpus=0, object_store_memory=200 * 2**20)
    try:
        yield cluster, dashboard
    finally:
        cluster.shutdown()


def test_ray_job_submit_renders_the_demo(head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    _, dashboard = head
    client = JobSubmissionClient(dashboard)
    out = str(tmp_path / "demo")
    job = client.submit_job(
        entrypoint=f"{sys.executable} -m jobs.render --demo {out} --demo-frames 9 --workers 2",
        runtime_env={"working_dir": ROOT, "excludes": [".venv", ".git", "*.mp4", ".device-bundle"]})
    async def follow():  # tail_job_logs ends when the job does: no polling, no sleeps
        logs = []
        async for lines in client.tail_job_logs(job):
            logs.append(lines)
        return "".join(logs)

    logs = asyncio.run(follow())
    status = client.get_job_status(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "framefarm: wrote" in logs
    frames = read_frames(os.path.join(out, "video.mp4"), "mp4")
    assert [read_index(f) for f in frames] == list(range(pixel_frames(9)))


def test_failed_job_exits_nonzero_with_reason(head, tmp_path):
    _, dashboard = head
    proc = subprocess.run([sys.executable, "-m", "jobs.render", str(tmp_path / "nope.safetensors"),
                           str(tmp_path / "out"), "--decoder", "test-pattern", "--address", "auto"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_ADDRESS": head[0].address})
    assert proc.returncode == 2
    assert "no such latents file" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_rerun_after_killed_driver_reuses_committed_segments(head, tmp_path):
    cluster, _ = head
    out = tmp_path / "resume"
    cmd = [sys.executable, "-m", "jobs.render", "--demo", str(out), "--demo-frames", "41", "--shard-latents", "4",
           "--workers", "1", "--format", "ffv1"]
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    committed = 0
    try:
        # Read the driver's log until two shards are committed, then kill it outright.
        for line in driver.stdout:
            if " done on " in line:
                committed += 1
                if committed == 2:
                    driver.send_signal(signal.SIGKILL)
                    break
    finally:
        driver.kill()
        driver.wait(timeout=60)
    assert committed == 2 and not (out / "video.mkv").exists()
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reused_shards"] >= 2 and summary["shards"] == 11
    frames = read_frames(str(out / "video.mkv"), "ffv1")
    assert [read_index(f) for f in frames] == list(range(pixel_frames(41)))

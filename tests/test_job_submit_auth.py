"""The README's `ray job submit` commands, run as written, against a head with token auth on.

The head is a `ray.cluster_utils.Cluster` on free ports in a process of its own (its
environment carries RAY_AUTH_MODE=token and a HOME whose ~/.ray/auth_token the README's
`ray get-auth-token --generate` wrote), stopped by closing its stdin. The README's own
`ray start` line is the one thing not run: it would take fixed ports on a shared machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from actors.decoders import read_index
from actors.protocol import pixel_frames
from actors.sinks import read_frames

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HEAD = """
import sys
from tests.conftest import start_job_head

cluster, dashboard = start_job_head(num_cpus=3, num_gpus=0, object_store_memory=200 * 2**20)
print(dashboard, flush=True)
sys.stdin.read()  # until the test closes it
cluster.shutdown()
"""


def readme_submit_block() -> list[str]:
    """The lines of the README's first bash block that mentions `ray job submit`."""
    text = open(os.path.join(ROOT, "README.md")).read()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        if "ray job submit" in block:
            return [line for line in block.strip().splitlines() if line.strip()]
    raise AssertionError("README has no `ray job submit` block")


@pytest.mark.slow
def test_readme_job_submit_with_token_auth(tmp_path):
    lines = readme_submit_block()
    start = next(i for i, line in enumerate(lines) if line.startswith("ray start --head"))
    before, after = lines[:start], lines[start + 1:]
    assert any("RAY_AUTH_MODE=token" in line for line in before), "the README must keep token auth on"
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env["HOME"] = str(home)
    subprocess.run(["bash", "-ec", "\n".join(before)], cwd=ROOT, env=env, check=True, timeout=120)
    assert len((home / ".ray" / "auth_token").read_text().strip()) >= 32

    head = subprocess.Popen([sys.executable, "-c", HEAD], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**env, "RAY_AUTH_MODE": "token", "PYTHONPATH": ROOT})
    try:
        dashboard = head.stdout.readline().strip()
        assert dashboard.startswith("http://127.0.0.1:"), "the head did not start"
        # Auth is on: a client without the token is turned away.
        stranger = subprocess.run(["ray", "job", "list", "--address", dashboard], cwd=ROOT, capture_output=True,
                                  text=True, timeout=120, env={**env, "HOME": str(tmp_path)})
        assert "authentication token" in (stranger.stdout + stranger.stderr).lower()

        out = tmp_path / "demo"
        script = "\n".join(before[:1] + after).replace("http://127.0.0.1:8265", dashboard)
        script = script.replace('"$PWD/framefarm-demo"', str(out))
        proc = subprocess.run(["bash", "-ec", script], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        logs = proc.stdout + proc.stderr
        assert "framefarm: wrote" in logs and re.search(r"Job '\S+' succeeded", re.sub(r"\x1b\[[0-9;]*m", "", logs))
        frames = read_frames(str(out / "video.mp4"), "mp4")
        assert [read_index(f) for f in frames] == list(range(pixel_frames(41)))
    finally:
        head.stdin.close()
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()

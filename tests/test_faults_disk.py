"""A full disk under a render: OUTPUT on a small tmpfs, mounted in a user and mount namespace of
the test's own (`unshare -rm`, where an unprivileged user may mount), the render run there by
tests/full_disk_child.py with its own local Ray. Where such namespaces are not allowed, the
test is skipped and says so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from actors.protocol import pixel_frames
from infra.staged import TMP_SUFFIX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _can_mount(where: str) -> str | None:
    """None if this user may mount a tmpfs in a namespace of its own, else why not."""
    if shutil.which("unshare") is None:
        return "no unshare(1) on this machine"
    probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=64k", "probe", where],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return f"user namespaces may not mount here (unshare -rm mount: {probe.stderr.strip() or probe.returncode})"
    return None


def test_a_full_disk_fails_the_render_clearly_keeps_the_last_one_and_a_rerun_after_freeing_is_exact(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    why_not = _can_mount(str(mount))
    if why_not:
        pytest.skip(why_not)
    ray_tmp = tempfile.mkdtemp(prefix="ffd", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "PYTHONPATH": ROOT, "RAY_TMPDIR": ray_tmp}
    try:
        child = subprocess.run(["unshare", "-rm", sys.executable, os.path.join(ROOT, "tests", "full_disk_child.py"),
                                str(mount)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in child.stdout.splitlines() if line.startswith("FULL-DISK-RESULT ")]
    assert child.returncode == 0 and lines, (child.stdout + child.stderr)[-4000:]
    seen = json.loads(lines[0].split(" ", 1)[1])
    print(f"\nfull disk: B failed with {seen['b_failed']!r}; seconds from start: ray {seen['ray_s']:.1f}, "
          f"A {seen['a_s']:.1f}, B {seen['b_s']:.1f}, rerun {seen['rerun_s']:.1f}")
    a, b = seen["a_render"], seen["b_render"]

    assert seen["a_frames"] == list(range(pixel_frames(5)))
    # B fails with one line naming the disk's error; A, published before, is whole and shown.
    assert seen["b_failed"] and "No space left on device" in seen["b_failed"] and "\n" not in seen["b_failed"]
    assert seen["a_frames_after_failure"] == list(range(pixel_frames(5))) and seen["current_after_failure"] == a
    after = seen["after_failure"]
    assert not [n for n in after if TMP_SUFFIX in n]  # nothing half-written
    assert not [n for n in after if n.startswith(f"renders/{b}/")]  # nothing of B's render
    assert {f"renders/{a}/{n}" for n in ("video.mkv", "manifest.parquet", "summary.json", "timeline.json",
                                         "render.json")} <= set(after)
    # Space freed, B again: exact, and OUTPUT holds B's render and nothing else.
    assert seen["b_frames"] == list(range(pixel_frames(13)))
    assert seen["after_rerun"] == sorted(
        ["video.mkv", "manifest.parquet", "summary.json", "timeline.json", "render.json", "renders",
         "renders/current", f"renders/{b}"]
        + [f"renders/{b}/{n}" for n in ("video.mkv", "manifest.parquet", "summary.json", "timeline.json",
                                        "render.json")])

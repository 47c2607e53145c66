"""Run by tests/test_faults_disk.py inside `unshare -rm` (a user and mount namespace of its own,
where this process may mount): a small tmpfs as OUTPUT's disk, a local Ray, and three renders:
A into the empty disk, B (overwrite) into a disk filled to leave less than B needs, and B
again once the space is freed. Prints one JSON line of what it saw; the test judges it.

    python tests/full_disk_child.py MOUNT_POINT
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import ray

from actors.decoders import pattern_latents, read_index
from actors.sinks import read_frames
from cluster.api import Farm

PATTERN = {"decoder": {"name": "test-pattern"}, "progress": False, "format": "ffv1"}
ROOM = 16 << 10  # free space left for B: its lease (and a renewal's copy), not its segments (5 + 5 sidecars)


def listing(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files)


def indices(out: str) -> list[int]:
    return [read_index(f) for f in read_frames(os.path.join(out, "video.mkv"), "ffv1")]


def main(mount: str) -> dict:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "framefarm-full-disk", mount], check=True)
    out, filler = os.path.join(mount, "out"), os.path.join(mount, "filler")
    seen: dict = {}
    t0 = time.monotonic()
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=100 * 2**20)
    # One pool for the three renders: worker start-up is most of a tiny render's time.
    farm = Farm(workers=1, device="cpu")
    try:
        seen["ray_s"] = time.monotonic() - t0
        a = farm.render(pattern_latents(5, 96, 128), out, shard_latents=2, **PATTERN)
        seen["a_frames"] = indices(out)
        seen["a_s"] = time.monotonic() - t0
        free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
        with open(filler, "wb") as f:
            f.write(b"\0" * max(0, free - ROOM))
        seen["free_before_b"] = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
        try:
            farm.render(pattern_latents(13, 96, 128), out, shard_latents=3, overwrite=True, max_attempts=2, **PATTERN)
            seen["b_failed"] = None
        except Exception as exc:  # noqa: BLE001 - what the test judges
            seen["b_failed"] = f"{type(exc).__name__}: {exc}"
        seen["b_s"] = time.monotonic() - t0
        seen["after_failure"] = listing(out)
        seen["a_frames_after_failure"] = indices(out)
        seen["a_render"] = a.summary["render"]
        seen["current_after_failure"] = os.readlink(os.path.join(out, "renders", "current"))
        os.remove(filler)
        b = farm.render(pattern_latents(13, 96, 128), out, shard_latents=3, overwrite=True, **PATTERN)
        seen["b_frames"] = indices(out)
        seen["b_render"] = b.summary["render"]
        seen["b_reused"] = b.summary["reused_shards"]
        seen["after_rerun"] = listing(out)
        seen["rerun_s"] = time.monotonic() - t0
    finally:
        farm.close()
        ray.shutdown()
        subprocess.run(["umount", mount], check=False)
    return seen


if __name__ == "__main__":
    print("FULL-DISK-RESULT " + json.dumps(main(sys.argv[1])), flush=True)

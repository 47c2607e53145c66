"""The stitcher's Ray actor, apart from `actors.ray_actors` so that its process starts fast.

A Ray worker imports the module that defines an actor's class before it can build the
actor. `actors.ray_actors` imports torch, diffusers and the decode worker (7-9 s on the
2-core CI machine, about 13 s on the H200 host): there, each job's stitcher came up after
a warm farm had already decoded the job's only shard, and the job waited for it. This
module and what it imports (the stitcher, PyAV, storage, `actors.segments`) need none of
that: the process is up in about a second.
"""

from __future__ import annotations

import os

import ray

from actors.segments import Segment
from actors.stitcher import Stitcher


class _StitcherActor:
    def __init__(self, output_uri: str, fmt: str, fps: int, shard_count: int, video_prefix: str = ""):
        self.stitcher = Stitcher(output_uri, fmt, fps, shard_count, video_prefix=video_prefix)

    def describe(self) -> dict:
        return {"pid": os.getpid()}

    def add(self, segment: Segment) -> int:
        return self.stitcher.add(segment)

    def finish(self) -> dict:
        return self.stitcher.finish()

    def abort(self) -> None:
        self.stitcher.abort()


# The stitcher only remuxes and moves bytes: it takes no CPU slot a decoder could use.
StitcherActor = ray.remote(num_cpus=0)(_StitcherActor)

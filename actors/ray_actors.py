"""The decode worker's Ray actor class: a thin wrapper over a worker that runs without Ray.

Everything Ray-specific of a decode worker is here: resource requests, metrics, the GPU id
Ray assigned. The driver talks to it only through `cluster.dispatch`. The stitcher's actor
is in `actors.stitcher_actor`, whose process need not import any of this.
"""

from __future__ import annotations

import time

# A Ray worker imports this module to build its actor: the heavy imports below (torch,
# diffusers, PyAV) are the "imports" phase of a worker's start-up. Set once at import.
_IMPORTS_STARTED = time.time()

import ray  # noqa: E402
import torch  # noqa: E402
from ray.util import metrics  # noqa: E402

from actors.protocol import LatentSlice, SegmentRecord, ShardTask, WorkerInfo  # noqa: E402
from actors.startup import StartupClock, process_started_at  # noqa: E402
from actors.worker import ShardWorker  # noqa: E402

_IMPORTS_ENDED = time.time()


def ray_shard_worker(device: str, scratch_dir: str | None, imports: tuple[float, float], process: str) -> ShardWorker:
    """A ShardWorker inside a Ray process (an actor's, a Serve replica's), its start-up phases
    counted from the process's spawn: `imports` is (start, end) of the importing module's
    heavy imports, `process` names what the spawn phase was."""
    clock = StartupClock()
    spawned = process_started_at()
    if spawned is not None and spawned < imports[0]:
        clock.add("process", spawned, imports[0], process)
    clock.add("imports", *imports)
    return ShardWorker(device=device, scratch_dir=scratch_dir, clock=clock,
                       node_id=ray.get_runtime_context().get_node_id(),
                       gpu_ids=tuple(str(g) for g in ray.get_gpu_ids()))


class _DecodeWorker:
    def __init__(self, device: str, scratch_dir: str | None = None):
        self.worker = ray_shard_worker(device, scratch_dir, (_IMPORTS_STARTED, _IMPORTS_ENDED), "Ray worker process up")
        tags = ("device",)
        self.frames = metrics.Counter("framefarm_frames_decoded", "Pixel frames decoded and committed",
                                      tag_keys=tags)
        self.shard_seconds = metrics.Histogram("framefarm_shard_seconds", "Wall seconds per shard",
                                               boundaries=[1, 5, 15, 30, 60, 120, 300, 600], tag_keys=tags)
        self.busy = metrics.Gauge("framefarm_gpu_busy_fraction",
                                  "GPU busy fraction during the last shard's pipeline", tag_keys=tags)
        info = self.worker.info
        self.tags = {"device": f"{info.node_id[:8]}:{','.join(info.gpu_ids) or 'cpu'}"}

    def describe(self) -> WorkerInfo:
        return self.worker.info

    def close(self) -> None:
        """Clean up before the pool kills this actor (a kill runs no cleanup of its own)."""
        self.worker.close()

    def check_input(self, spec, latent_height: int, latent_width: int, encoder: str | None = None,
                    compile_cache: str | None = None) -> dict:
        return self.worker.check_input(spec, latent_height, latent_width, encoder, compile_cache)

    @ray.method(concurrency_group="watch")
    def progress(self) -> int:
        """Answered while a shard runs (its own thread): the driver's stall watch."""
        return self.worker.progress()

    @ray.method(concurrency_group="watch")
    def withdraw(self, run_key: str, shard_index: int) -> None:
        """Another copy of the shard committed: this one stops (answered mid-shard)."""
        self.worker.withdraw(run_key, shard_index)

    def render_shard(self, task: ShardTask, latents: LatentSlice | torch.Tensor) -> SegmentRecord:
        t = time.perf_counter()
        record = self.worker.render_shard(task, latents)
        self.frames.inc(record.frames, tags=self.tags)
        self.shard_seconds.observe(time.perf_counter() - t, tags=self.tags)
        self.busy.set(record.report.gpu_utilization, tags=self.tags)
        return record


def decode_worker_class(use_gpu: bool, cpus: int = 1):
    """The DecodeWorker actor class: one GPU each, or CPUs where the cluster has no GPUs."""
    # A "watch" group of its own: progress() answers while render_shard runs, which the
    # default group keeps to one call at a time.
    return ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=cpus,
                      concurrency_groups={"watch": 1})(_DecodeWorker)


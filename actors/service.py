"""The warm farm's node side: a Ray Serve application of decode replicas and a share ledger.

One application, `framefarm`, outlives every job and is shared by every driver:
  - `FarmWorker` (here): one replica per GPU (or per CPU slot on a GPU-less cluster),
    running a `ShardWorker`, at most one shard in flight (max_ongoing_requests=1),
    autoscaled by Serve between a minimum (0 by default) and the farm's capacity, restarted
    by Serve if it dies. Decoders are cached per `DecoderSpec` inside the worker, so a model
    loads once per replica.
  - `FarmIngress` and `FarmLedger` (actors/ledger.py, which imports no torch): the
    application's ingress, and the plain named actor it owns that tells each job its fair
    share of the replicas and keeps the step counts replicas post while running a shard.

Like `actors.ray_actors`, a thin Ray wrapper: the work is `ShardWorker`'s.
"""

from __future__ import annotations

import time

# A replica imports this module to build its deployment: the heavy imports below (torch,
# diffusers, PyAV) are the "imports" phase of a replica's start-up. Set once at import.
_IMPORTS_STARTED = time.time()

import dataclasses  # noqa: E402
import threading  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import ray  # noqa: E402
import torch  # noqa: E402
from ray.exceptions import RayActorError  # noqa: E402
from ray import serve  # noqa: E402
from ray.util import metrics  # noqa: E402

from actors.ledger import ON_HEAD, FarmIngress, find_ledger  # noqa: E402
from actors.protocol import LatentSlice, SegmentRecord, ShardTask, WorkerInfo  # noqa: E402
from actors.ray_actors import ray_shard_worker  # noqa: E402

_IMPORTS_ENDED = time.time()

APP = "framefarm"
BEAT_S = 1.0  # how often a replica running a shard tells the ledger its decode-step count
WORKER = "FarmWorker"
INGRESS = "FarmIngress"


@dataclass(frozen=True)
class FarmConfig:
    """What `python -m jobs.farm up` deploys."""

    capacity: int  # most replicas: the cluster's GPUs (or what the autoscaler may add)
    use_gpu: bool = True
    min_replicas: int = 0
    idle_s: float = 300.0  # an idle replica is let go after this long (its node then too)
    cpus_per_replica: float = 1.0
    scratch_dir: str | None = None


class FarmWorker:
    """One decode replica: a ShardWorker (its start-up phases included, as a DecodeWorker's),
    metrics tagged by job and by replica."""

    def __init__(self, device: str, scratch_dir: str | None = None):
        # Serve runs each call of a replica on whichever thread of its pool is free, but CUDA
        # keeps per-thread state (cuDNN and cuBLAS handles, the current stream): a shard on
        # another thread than the warm-up's paid about 0.8 s more of GPU time on an H200
        # (docs/benchmarks.md). So every GPU call of this replica runs on one thread of its own.
        self._gpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="framefarm-gpu")
        self.worker = self._gpu.submit(ray_shard_worker, device, scratch_dir, (_IMPORTS_STARTED, _IMPORTS_ENDED),
                                       "Serve replica process up").result()
        self.replica = serve.get_replica_context().replica_id.unique_id
        tags = ("job", "replica")
        self.frames = metrics.Counter("framefarm_farm_frames", "Frames decoded and committed by the farm",
                                      tag_keys=tags)
        self.shard_seconds = metrics.Histogram("framefarm_farm_shard_seconds", "Wall seconds per shard",
                                               boundaries=[1, 5, 15, 30, 60, 120, 300, 600], tag_keys=tags)
        self.busy = metrics.Gauge("framefarm_farm_gpu_busy_fraction",
                                  "GPU busy fraction during the last shard's pipeline", tag_keys=tags)

    def describe(self) -> WorkerInfo:
        return self.worker.info

    def _beat(self, job: str, call: str, ledger, task: ShardTask, done: threading.Event) -> None:
        """Tell the ledger this call's decode-step count every BEAT_S; its answer says whether
        the driver has withdrawn the call (another copy of the shard committed first), and then
        the worker stops the copy at its next step, as a job's own worker does."""
        me = ray.get_runtime_context().current_actor  # so that the driver can end a stuck replica
        while True:
            try:
                # A plain dict: the ledger's process imports no framefarm type (nor torch).
                info = dataclasses.asdict(self.worker.info)
                wanted = ray.get(ledger.beat.remote(job, call, self.worker.progress(), info, me), timeout=30)
            except RayActorError:  # a new ledger (the farm redeployed): found by its name next beat
                wanted, ledger = True, find_ledger() or ledger
            except Exception:  # noqa: BLE001 - a missed beat reads as no progress, which is the point
                wanted = True
            if not wanted:
                self.worker.withdraw(task.run_key, task.shard.index)
            if done.wait(BEAT_S):
                return

    def check_input(self, spec, latent_height: int, latent_width: int, encoder: str | None = None,
                    compile_cache: str | None = None) -> dict:
        return self._gpu.submit(self.worker.check_input, spec, latent_height, latent_width, encoder,
                                compile_cache).result()

    def render_shard(self, task: ShardTask, latents: LatentSlice | torch.Tensor,
                     call: tuple | None = None) -> SegmentRecord:
        """`call`: (the job's key in the ledger, the driver's name for this call, the ledger);
        while it runs, the worker's decode-step count goes to the ledger under it every BEAT_S
        (a replica answers no other call mid-shard): the driver's stall watch reads it there,
        and a withdrawal comes back the same way."""
        t = time.perf_counter()
        done = threading.Event()
        if call is not None:
            threading.Thread(target=self._beat, args=(*call, task, done), daemon=True,
                             name="framefarm-beat").start()
        try:
            record = self._gpu.submit(self.worker.render_shard, task, latents).result()
        finally:
            done.set()
        tags = {"job": task.job_id, "replica": self.replica}
        self.frames.inc(record.frames, tags=tags)
        self.shard_seconds.observe(time.perf_counter() - t, tags=tags)
        self.busy.set(record.report.gpu_utilization, tags=tags)
        return record


def farm_application(config: FarmConfig) -> serve.Application:
    """The Serve application `python -m jobs.farm up` deploys: replicas and their ledger."""
    resources = {"num_gpus": 1, "num_cpus": config.cpus_per_replica} if config.use_gpu else {"num_cpus": config.cpus_per_replica}
    worker = serve.deployment(
        FarmWorker, name=WORKER, max_ongoing_requests=1, ray_actor_options=resources,
        # One shard in flight per replica and the target is that one: Serve keeps as many
        # replicas as there are shards in flight or queued, up to the capacity.
        autoscaling_config={
            "min_replicas": config.min_replicas, "initial_replicas": config.min_replicas,
            "max_replicas": config.capacity, "target_ongoing_requests": 1,
            "upscale_delay_s": 0, "downscale_delay_s": config.idle_s,
            "downscale_to_zero_delay_s": config.idle_s,
            "metrics_interval_s": 0.5, "look_back_period_s": 2},
        # A shard runs for many seconds on a thread of the replica; health checks run apart.
        health_check_period_s=5, health_check_timeout_s=60,
        graceful_shutdown_timeout_s=600)
    ingress = serve.deployment(FarmIngress, name=INGRESS, num_replicas=1,
                               ray_actor_options={"num_cpus": 0, "resources": ON_HEAD})
    return ingress.bind(config.capacity, config.use_gpu,
                        workers=worker.bind("cuda" if config.use_gpu else "cpu", config.scratch_dir))

"""The warm farm's node side: a Ray Serve application of decode replicas and a share ledger.

One application, `framefarm`, outlives every job and is shared by every driver:
  - `FarmWorker`: one replica per GPU (or per CPU slot on a GPU-less cluster), running a
    `ShardWorker`, at most one shard in flight (max_ongoing_requests=1), autoscaled by Serve
    between a minimum (0 by default) and the farm's capacity, restarted by Serve if it dies.
    Decoders are cached per `DecoderSpec` inside the worker, so a model loads once per replica.
  - `FarmLedger`: a plain Ray actor, named (`LEDGER` in `NAMESPACE`), that knows which jobs
    are running now and tells each its fair share of the replicas (`fair_share`), so a long
    job cannot starve a later short one; replicas running a shard post their decode-step
    counts to it for the drivers' stall watch.
  - `FarmIngress`: the application's ingress, a CPU-less Serve replica that binds the workers
    into the application and owns the ledger, so that both start and end with it.

Why the ledger is a plain actor and not a Serve deployment:
  - A Serve call's answer is streamed back, and the callee's event loop waits until the
    caller has taken every piece of it (Ray's `WaitAllObjectsReported`). So one caller
    SIGSTOPped mid-call froze a Serve ledger for every job until that caller died. A plain
    actor's single reply is not streamed: the ledger does not wait for its caller.
  - A driver finds a named actor with one lookup in the GCS. Finding a Serve application
    asks Serve's controller, and a handle's first call waits for the controller's list of
    replicas: 2-4 s of a warm job's start on a loaded 2-core host (docs/benchmarks.md).

Like `actors.ray_actors`, a thin Ray wrapper: the work is `ShardWorker`'s, the policy is the
plain function `fair_share`.
"""

from __future__ import annotations

import time

# A replica imports this module to build its deployment: the heavy imports below (torch,
# diffusers, PyAV) are the "imports" phase of a replica's start-up. Set once at import.
_IMPORTS_STARTED = time.time()

import math  # noqa: E402
import threading  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import ray  # noqa: E402
import torch  # noqa: E402
from ray import serve  # noqa: E402
from ray.util import metrics  # noqa: E402

from actors.protocol import LatentSlice, SegmentRecord, ShardTask, WorkerInfo  # noqa: E402
from actors.ray_actors import ray_shard_worker  # noqa: E402

_IMPORTS_ENDED = time.time()

APP = "framefarm"
BEAT_FORGET_S = 60.0  # a call not heard from for this long is dropped from the ledger
BEAT_S = 1.0  # how often a replica running a shard tells the ledger its decode-step count
WITHDRAWN_KEEP_S = 3600.0  # a withdrawn call still running after this long is left to end
WORKER = "FarmWorker"
INGRESS = "FarmIngress"
LEDGER = "framefarm-ledger"  # the ledger actor's name, in NAMESPACE
NAMESPACE = "framefarm"  # drivers of `ray job submit` each run in a namespace of their own


def fair_share(capacity: int, running_jobs: int) -> int:
    """Shards one job may have in flight: an equal part of the farm's replicas, at least one.

    Every running job gets at least one slot, so a job that arrives while another holds every
    replica gets the next one to free up; the long job's share shrinks as soon as the short
    one registers, and grows back when it leaves. Rounding up keeps every replica busy when
    the capacity does not divide evenly (a request beyond a job's replica waits in its queue).
    """
    return max(1, math.ceil(capacity / max(1, running_jobs)))


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
                wanted = ray.get(ledger.beat.remote(job, call, self.worker.progress(), self.worker.info, me),
                                 timeout=30)
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


@ray.remote(num_cpus=0, max_concurrency=8)
class FarmLedger:
    """Which jobs run now, so that each takes only its fair share of the replicas, and the
    decode-step counts of their calls running on the farm: replicas post, drivers read.

    A job renews its lease whenever it asks for its share; a driver that died without
    leaving stops counting after `lease_s`. Calls not heard from for BEAT_FORGET_S are
    dropped, so that a shard that runs on after its job left (an abandoned call runs to its
    end) leaves nothing behind for long.
    """

    def __init__(self, capacity: int, use_gpu: bool, lease_s: float = 30.0):
        self.capacity = capacity
        self.use_gpu = use_gpu
        self.lease_s = lease_s
        self.jobs: dict[str, float] = {}  # job key -> last heard from (monotonic)
        self.calls: dict[str, dict] = {}  # job key -> {call: (steps, WorkerInfo, replica actor, heard at)}
        # Calls their drivers no longer want -> when withdrawn. By call, not by job: a withdrawn
        # copy may still be running (its replica stopped, say) after its job has left.
        self.withdrawn: dict[str, float] = {}
        self.running = metrics.Gauge("framefarm_farm_jobs", "Jobs sending shards to the farm")

    def share(self, job: str) -> dict:
        """The job's share of the replicas (its lease renewed) and its calls' progress:
        {call: (steps, WorkerInfo, replica actor)} of those heard from lately."""
        now = time.monotonic()
        self.jobs[job] = now
        for key, seen in list(self.jobs.items()):
            if now - seen > self.lease_s:
                del self.jobs[key]
                self.calls.pop(key, None)
        self.withdrawn = {c: t for c, t in self.withdrawn.items() if now - t < WITHDRAWN_KEEP_S}
        for key in list(self.calls):
            self.calls[key] = {c: v for c, v in self.calls[key].items() if now - v[3] < BEAT_FORGET_S}
            if not self.calls[key]:
                del self.calls[key]
        self.running.set(len(self.jobs))
        return {"share": fair_share(self.capacity, len(self.jobs)), "jobs": len(self.jobs),
                "capacity": self.capacity, "use_gpu": self.use_gpu,
                "progress": {c: v[:3] for c, v in self.calls.get(job, {}).items()}}

    def beat(self, job: str, call: str, steps: int, info: WorkerInfo, replica) -> bool:
        """A running call's step count; False if its driver has withdrawn it (stop it)."""
        self.calls.setdefault(job, {})[call] = (steps, info, replica, time.monotonic())
        return call not in self.withdrawn

    def withdraw(self, job: str, call: str) -> None:
        """The job's driver no longer wants this call (another copy of its shard committed):
        the replica running it hears so at its next beat, even after the job has left."""
        self.withdrawn[call] = time.monotonic()

    def leave(self, job: str) -> None:
        self.jobs.pop(job, None)
        self.calls.pop(job, None)
        self.running.set(len(self.jobs))

    def jobs_running(self) -> dict:
        return {"jobs": sorted(self.jobs), "capacity": self.capacity, "use_gpu": self.use_gpu}


class FarmIngress:
    """The application's ingress: it binds the workers into the application (deployed, and
    shut down, together) and owns the ledger, which ends with it. Drivers never call it."""

    def __init__(self, capacity: int, use_gpu: bool, workers=None, lease_s: float = 30.0):
        self.workers = workers
        self.ledger = FarmLedger.options(name=LEDGER, namespace=NAMESPACE).remote(capacity, use_gpu, lease_s)
        ray.get(self.ledger.jobs_running.remote())  # up (and named) before Serve calls the application running

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
    ingress = serve.deployment(FarmIngress, name=INGRESS, num_replicas=1, ray_actor_options={"num_cpus": 0})
    return ingress.bind(config.capacity, config.use_gpu,
                        workers=worker.bind("cuda" if config.use_gpu else "cpu", config.scratch_dir))

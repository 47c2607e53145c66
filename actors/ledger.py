"""The warm farm's ledger and its application's ingress: which jobs run, their shares, their calls' progress.

  - `FarmLedger`: a plain Ray actor, named (`LEDGER` in `NAMESPACE`), that knows which jobs
    are running now and tells each its fair share of the replicas (`fair_share`), so a long
    job cannot starve a later short one; replicas running a shard post their decode-step
    counts to it for the drivers' stall watch, and hear from it when their call is withdrawn.
  - `FarmIngress`: the Serve application's ingress, a CPU-less replica that binds the decode
    replicas (actors/service.py) into the application and owns the ledger, so that both start
    and end with it. Drivers never call it.

Why the ledger is a plain actor and not a Serve deployment:
  - A Serve call's answer is streamed back, and the callee's event loop waits until the
    caller has taken every piece of it (Ray's `WaitAllObjectsReported`). So one caller
    SIGSTOPped mid-call froze a Serve ledger for every job until that caller died. A plain
    actor's single reply is not streamed: the ledger does not wait for its caller.
  - A driver finds a named actor with one lookup in the GCS. Finding a Serve application
    asks Serve's controller, and a handle's first call waits for the controller's list of
    replicas: 2-4 s of a warm job's start on a loaded 2-core host (docs/benchmarks.md).

Both live on the head node (`ON_HEAD`), beside Serve's controller and the GCS: a worker
node may be drained (a spot notice, infra/spot_watcher.py) or scaled down, and a drained
node ends only once idle. Serve moves a drained node's replicas by starting the new one
before stopping the old, but a new ingress cannot create the ledger while the old one's
ledger still holds the name, and that ledger, owned by the old ingress, does not move: the
node stayed up, ingress and ledger on it, for the 300 s a test allowed it
(tests/test_spot_watcher.py, in a loaded run where Serve had put the ingress there).

This module imports Ray and nothing of the decoder (no torch): the ingress replica and the
ledger's process import only it. With the decoder's imports they took 93 s and 83 s of a
cold farm's start on a loaded 2-core host, one after the other.
"""

from __future__ import annotations

import math
import time

import ray
from ray.util import metrics

LEDGER = "framefarm-ledger"  # the ledger actor's name, in NAMESPACE
NAMESPACE = "framefarm"  # drivers of `ray job submit` each run in a namespace of their own
BEAT_FORGET_S = 60.0  # a call not heard from for this long is dropped from the ledger
WITHDRAWN_KEEP_S = 3600.0  # a withdrawn call still running after this long is left to end
# A sliver of the resource only the head node has (Ray's HEAD_NODE_RESOURCE_NAME, which Ray's
# own state actors ask for the same way): the ingress's and the ledger's placement.
ON_HEAD = {"node:__internal_head__": 0.001}


def find_ledger():
    """The farm's ledger actor on the connected cluster, or None when no farm runs.

    One lookup in the GCS. Serve's own ways (`serve.get_app_handle`, `serve.status()`) ask
    Serve's controller, which took 1.2-2.6 s of a warm job's start on a loaded 2-core host."""
    try:
        return ray.get_actor(LEDGER, namespace=NAMESPACE)
    except ValueError:
        return None


def fair_share(capacity: int, running_jobs: int) -> int:
    """Shards one job may have in flight: an equal part of the farm's replicas, at least one.

    Every running job gets at least one slot, so a job that arrives while another holds every
    replica gets the next one to free up; the long job's share shrinks as soon as the short
    one registers, and grows back when it leaves. Rounding up keeps every replica busy when
    the capacity does not divide evenly (a request beyond a job's replica waits in its queue).
    """
    return max(1, math.ceil(capacity / max(1, running_jobs)))


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
        self.calls: dict[str, dict] = {}  # job key -> {call: (steps, worker info as a dict, replica actor, heard at)}
        # Calls their drivers no longer want -> when withdrawn. By call, not by job: a withdrawn
        # copy may still be running (its replica stopped, say) after its job has left.
        self.withdrawn: dict[str, float] = {}
        self.running = metrics.Gauge("framefarm_farm_jobs", "Jobs sending shards to the farm")

    def share(self, job: str) -> dict:
        """The job's share of the replicas (its lease renewed) and its calls' progress:
        {call: (steps, worker info as a dict, replica actor)} of those heard from lately."""
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

    def beat(self, job: str, call: str, steps: int, info: dict, replica) -> bool:
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

    def __init__(self, capacity: int, use_gpu: bool, workers=None, lease_s: float = 30.0,
                 takeover_s: float = 120.0):
        self.workers = workers
        deadline = time.monotonic() + takeover_s
        while True:
            try:
                self.ledger = FarmLedger.options(name=LEDGER, namespace=NAMESPACE, resources=ON_HEAD).remote(
                    capacity, use_gpu, lease_s)
                break
            except ValueError:
                # The name is still the ledger of the ingress this one replaces (a redeploy, a
                # restart): it ends with its owner, a moment after. Past the deadline Serve
                # retries this constructor.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        ray.get(self.ledger.jobs_running.remote())  # up (and named) before Serve calls the application running

"""The warm farm from a driver: deploy it, find it, see it, stop it, send a job's shards to it.

The farm is the Serve application `framefarm` (actors/service.py). It lives on the cluster,
not in a driver: Serve's controller is a detached actor, so the replicas and their loaded
models outlive the job (and the driver) that started them, and every later driver, from
`ray job submit`, a shell or a notebook, finds them by the application's name.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import uuid

import ray
from ray import serve
from ray.exceptions import RayActorError, RayTaskError

from actors.protocol import LatentSlice, SegmentRecord, ShardTask, WorkerInfo
from actors.ledger import find_ledger
from actors.service import APP, WORKER, FarmConfig, farm_application
from cluster.dispatch import (JobStitcher, RayStitcher, ShardFailed, WorkerLost, WorkerPool, resolve_workers,
                              unwrap)

log = logging.getLogger("framefarm")

_SHARE_REFRESH_S = 1.0
_ASK_TIMEOUT_S = 10.0  # one question to the ledger; asked again a second later


def farm_running() -> bool:
    """Whether the farm runs on the connected cluster: its ledger lives as long as it does."""
    return find_ledger() is not None


def deploy(config: FarmConfig) -> None:
    """Start (or update) the farm. Serve's HTTP proxy stays off: drivers use handles, and a
    proxy would take a port (8000) that another Ray on the host may hold."""
    t = time.monotonic()
    serve.start(proxy_location="Disabled")
    serve.run(farm_application(config), name=APP, route_prefix=None)
    log.info("farm up in %.1f s: %d-%d %s replicas, idle ones let go after %.0f s", time.monotonic() - t,
             config.min_replicas, config.capacity, "GPU" if config.use_gpu else "CPU", config.idle_s)


def undeploy(timeout_s: float = 60.0) -> bool:
    """Stop the farm (its replicas and ledger); other Serve applications stay. False if none ran.

    Returns once the ledger is gone too (it ends with the application's ingress, a moment
    after Serve reports the application deleted), so that a job started next finds no farm."""
    if APP not in serve.status().applications:
        return False
    serve.delete(APP)
    deadline = time.monotonic() + timeout_s
    while farm_running():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the farm's ledger outlived its application by {timeout_s:.0f} s")
        time.sleep(0.1)  # the GCS marks the ledger dead once its owner has ended
    return True


def farm_status() -> dict:
    """The farm's state for `python -m jobs.farm status`: replicas by state, running jobs."""
    app = serve.status().applications.get(APP)
    if app is None:
        return {"running": False}
    out = {"running": True, "status": str(app.status), "message": app.message,
           "deployments": {name: {"status": str(d.status), "replicas": dict(d.replica_states)}
                           for name, d in app.deployments.items()}}
    ledger = find_ledger()
    if app.status == "RUNNING" and ledger is not None:
        out.update(ray.get(ledger.jobs_running.remote(), timeout=30))
    return out


class _Slot:
    """One of a job's places on the farm: room for one shard in flight."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __repr__(self):
        return f"farm slot {self.index}"


class ServicePool(WorkerPool):
    """A job's view of the farm, as a `cluster.dispatch.WorkerPool`.

    Its "workers" are slots, as many as the job's fair share of the farm's replicas (the
    ledger's answer, renewed every second): the driver sends a shard per free slot, Serve
    routes it to a free replica (starting one, from zero, if need be). A replica lost
    mid-shard fails that shard's call (WorkerLost), and the driver retries the shard; Serve
    restarts the replica by itself, so `replace` only frees the slot.

    Calls are Serve responses awaited by courier threads, so that the driver waits on
    ordinary futures as it waits on object refs with actors.

    The stall watch: a replica takes one call at a time, so none answers a progress call
    mid-shard; instead a replica running a shard sends its decode-step count to the farm's
    ledger (`actors.ledger.FarmLedger`, a plain actor: see there why) under the call's name
    every second, and `steps` reads the ledger's answers. The ledger is asked at most once a
    second, in a thread of its own: the dispatch loop never waits on it. A stalled call's
    replica is killed by `replace`; Serve starts another.
    """

    farm = True
    shared = True

    def __init__(self, job: str | None = None):
        self.job = job or uuid.uuid4().hex
        self._ledger = find_ledger()
        if self._ledger is None:
            raise RuntimeError("no farm runs on this cluster (`python -m jobs.farm up` starts one)")
        # Not checked with Serve's controller (a round trip to it, slow on a loaded head): the
        # ledger lives only while the application does.
        self._workers = serve.get_deployment_handle(WORKER, app_name=APP, _check_exists=False)
        answer = ray.get(self._ledger.share.remote(self.job), timeout=60)
        self.size = answer["capacity"]
        self._share = answer["share"]
        self.use_gpu = answer["use_gpu"]
        self._slots = [_Slot(i) for i in range(self.size)]
        self._couriers = concurrent.futures.ThreadPoolExecutor(self.size + 2, thread_name_prefix="framefarm-farm")
        self._calls: dict = {}  # future -> Serve response, for cancel
        self._names: dict = {}  # future of a shard's call -> the call's name in the ledger, for withdraw
        self._claimed: set = set()  # slots a job holds, from claim to release
        self._lock = threading.Lock()
        self._running: dict = {}  # slot -> name of the call it runs now
        self._heard: dict = {}  # call name -> (steps, worker info dict, replica actor), the ledger's last answer
        self._asking: concurrent.futures.Future | None = None  # a share-and-progress question in flight
        self._asked = time.monotonic()
        # Its own thread: couriers may all be waiting on shards (withdrawn copies included).
        self._asker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="framefarm-farm-progress")
        self._question = None  # the ledger call the asker waits on, cancelled by shutdown
        self._closed = False

    def _turn(self) -> dict:
        """The ledger's answer (share and progress), asked once a second."""
        if self._closed:  # no Ray call after the pool's shutdown: the process may be leaving Ray
            raise concurrent.futures.CancelledError()
        self._question = self._ledger.share.remote(self.job)
        return ray.get(self._question, timeout=_ASK_TIMEOUT_S)

    def _poll(self) -> None:
        """Take the last answer if it came, ask again once a second. Never waits: the dispatch
        loop runs the stall watch, which must not hang on the ledger it reads;
        no answer keeps the last share and reads as no news of progress."""
        if self._asking is not None and self._asking.done():
            try:
                answer = self._asking.result()
            except RayActorError:
                # A new ledger (the farm redeployed): asked by its name from now on; this job
                # registers there at its next question.
                self._ledger = find_ledger() or self._ledger
                log.warning("farm: the farm's ledger was replaced; keeping this job's share")
            except Exception as exc:  # noqa: BLE001 - asked again in a second
                log.warning("farm: no answer from the farm's ledger (%s); keeping this job's share", exc)
            else:
                if answer["share"] != self._share:
                    log.info("farm: %d jobs running, this one's share is %d of %d replicas",
                             answer["jobs"], answer["share"], answer["capacity"])
                self._share, self._heard = answer["share"], answer["progress"]
            self._asking = None
        if self._asking is None and time.monotonic() - self._asked >= _SHARE_REFRESH_S:
            self._asked = time.monotonic()
            self._asking = self._asker.submit(self._turn)

    @property
    def share_of_farm(self) -> int:
        self._poll()
        return self._share

    def ready(self) -> list:
        """The slots of this job's current share."""
        return self._slots[:max(1, min(self.share_of_farm, self.size))]

    def claim(self, n: int) -> list:
        """Up to `n` free slots, as many as the job's share leaves room for, held until released."""
        share = self.share_of_farm
        with self._lock:
            room = max(0, share - len(self._claimed))
            free = [s for s in self._slots if s not in self._claimed][:max(0, min(n, room))]
            self._claimed.update(free)
            return free

    def release(self, slot) -> None:
        with self._lock:
            self._claimed.discard(slot)

    def wait_ready(self, timeout_s: float, cancelled=None) -> None:
        """Nothing to wait for: Serve holds a call until a replica can take it."""

    def describe(self, slot) -> WorkerInfo | None:
        """The replica running the slot's call, once it has reported (Serve chose it)."""
        heard = self._heard.get(self._running.get(slot))
        return WorkerInfo(**heard[1]) if heard else None

    def _call(self, method: str, *args) -> concurrent.futures.Future:
        response = getattr(self._workers, method).remote(*args)
        future = self._couriers.submit(response.result)
        self._calls[future] = response
        future.add_done_callback(lambda f: self._calls.pop(f, None))
        return future

    def check_input(self, slot, decoder, latent_height, latent_width, encoder, compile_cache) -> dict:
        try:
            return self._call("check_input", decoder, latent_height, latent_width, encoder,
                              compile_cache).result()
        except RayTaskError as exc:
            raise unwrap(exc) from None
        except (RayActorError, concurrent.futures.CancelledError) as exc:
            raise WorkerLost(type(exc).__name__) from exc

    def share(self, latents: LatentSlice):
        return ray.put(latents)

    def submit(self, slot, task: ShardTask, latents) -> concurrent.futures.Future:
        self._running[slot] = call = uuid.uuid4().hex
        future = self._call("render_shard", task, latents, (self.job, call, self._ledger))
        self._names[future] = call
        future.add_done_callback(lambda f: self._names.pop(f, None))
        return future

    def wait_any(self, handles, timeout_s: float) -> list:
        done, _ = concurrent.futures.wait(handles, timeout=timeout_s,
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        return list(done)

    def result(self, handle) -> SegmentRecord:
        try:
            return handle.result()
        except RayTaskError as exc:
            raise ShardFailed(unwrap(exc)) from None
        except (RayActorError, concurrent.futures.CancelledError) as exc:
            raise WorkerLost(type(exc).__name__) from exc

    def steps(self, slot) -> int | None:
        self._poll()
        call = self._running.get(slot)
        if call not in self._heard:
            # Not started on a replica yet: Serve queues it until one is free (one may be
            # starting, on a node an autoscaler is adding). A queue is Serve's to drain, not
            # a stall: a count that moves every second.
            return -int(time.monotonic())
        return self._heard[call][0]

    def abandon(self, handle, slot) -> None:
        """Abandon a call. A shard already running on a replica runs to its end there (its
        segment is left for a resume); the replica then takes other jobs' shards."""
        response = self._calls.get(handle)
        if response is not None:
            response.cancel()
        self.release(slot)

    def withdraw(self, handle, slot, run_key: str, shard_index: int) -> None:
        """A replica answers no call mid-shard, so the withdrawal goes through the ledger: the
        replica hears it at its next beat (within BEAT_S) and stops the copy at its next decode
        step; it commits nothing either way (another copy claimed the segment). The call is
        left to end, so that Serve counts the replica busy until it has; the slot is the job's
        until then."""
        call = self._names.get(handle)
        if call is not None:
            self._ledger.withdraw.remote(self.job, call)
        handle.add_done_callback(lambda _: self.release(slot))

    def replace(self, slot) -> None:
        """A lost replica is Serve's to restart, and a stuck one (its call stalled) is ended
        here so that Serve restarts it too; the slot is free again for the retry."""
        heard = self._heard.get(self._running.pop(slot, None))
        if heard is not None:
            try:
                ray.kill(heard[2], no_restart=True)
            except Exception as exc:  # noqa: BLE001 - gone already
                log.debug("farm: the stalled replica is gone already (%s)", exc)
        self.release(slot)

    def start_stitcher(self, output_uri: str, fmt: str, fps: int, shard_count: int,
                       video_prefix: str = "") -> JobStitcher:
        return RayStitcher(output_uri, fmt, fps, shard_count, video_prefix)

    def workers_used(self, records: list[SegmentRecord]) -> int:
        """Replicas this job's shards ran on: the GPUs its job time is billed on."""
        return max(1, len({(m.worker.hostname, m.worker.pid) for m in records if not m.reused}))

    def shutdown(self, wait_s: float = 0.0) -> None:
        """Leave the farm; its replicas stay (a shard still running ends on its replica)."""
        for response in list(self._calls.values()):
            response.cancel()
        self._couriers.shutdown(wait=False, cancel_futures=True)
        # A question in flight is cancelled and its thread waited for: left running, it would
        # hold the interpreter's exit (up to its timeout; 3 s of a warm CLI job's exit on a
        # loaded host), and a Ray call after ray.shutdown would start a new Ray.
        self._closed = True
        if self._question is not None:
            try:
                ray.cancel(self._question)
            except Exception as exc:  # noqa: BLE001 - answered already, or the ledger is gone
                log.debug("farm: the last question to the ledger could not be cancelled (%s)", exc)
        self._asker.shutdown(wait=True, cancel_futures=True)
        try:
            ray.get(self._ledger.leave.remote(self.job), timeout=30)
        except Exception as exc:  # noqa: BLE001 - the lease runs out by itself
            log.warning("farm: could not leave the ledger (%s); this job's share lapses in 30 s", exc)


def use_farm(mode: str, device: str, workers: int | None, embedded: bool) -> bool:
    """Whether a job's shards go to the farm (`--farm` / `service=`): "auto" when it runs, "on"
    also starts it (sized like the job's own workers would be), "off" never."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"farm mode must be auto, on or off, not {mode!r}")
    if mode == "off":
        return False
    if farm_running():
        log.info("sending shards to the warm farm")
        return True
    if mode == "auto":
        if not embedded:
            log.info("no warm farm on this cluster: this job starts its own workers "
                     "(`python -m jobs.farm up` starts one that later jobs share)")
        return False
    if embedded:
        log.warning("farm on with an embedded Ray: the farm ends with this process; start a head once "
                    "(`ray start --head`) for one that outlives jobs")
    use_gpu, capacity = resolve_workers(device, workers)
    deploy(FarmConfig(capacity=capacity, use_gpu=use_gpu))
    return True


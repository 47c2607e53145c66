"""The one place the driver talks to decode workers: the pool interface and its kinds.

`WorkerPool` is what the driver's logic (retries, resume, cancellation, the stall watch,
backup copies, the stitcher's healing) is written against: wait for workers, lend one to a
job (`claim`, `release`), hand it a shard and get a handle, wait for any handle, read a
result, read a worker's decode-step count, replace a worker, give up on work nobody wants,
start a stitcher, shut down. Errors tell the driver's cases apart without Ray's types:
`WorkerLost` (the worker died or cannot be reached: its shard may go elsewhere),
`ShardFailed` (a healthy worker's shard raised: `cause` is the worker's own exception),
`StitcherLost` (the stitcher's process is gone) and the stitcher's own `SegmentError`.

Kinds: `RayPool` runs workers as Ray actors (`actors.ray_actors`): on a cluster with GPUs a
worker is one actor holding one GPU; without GPUs it holds a CPU and decodes there. Ray's
resource model is the seam between laptops and clusters. The warm farm's pool is
`cluster.service.ServicePool`. `InProcessPool` runs `actors.worker.ShardWorker`s on threads
of this process, without Ray: the driver's logic tested on its own.

A pool may outlive a job and serve several (`shared`: a Farm's): it then never leaves a
worker busy with an ended job's shard; it replaces the worker, since a running call cannot
be interrupted and the worker must be free for the next job.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util import metrics
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.protocol import DecoderSpec, LatentSlice, Segment, SegmentRecord, ShardTask, WorkerInfo
from actors.ray_actors import decode_worker_class
from actors.stitcher import SegmentError, Stitcher
from actors.stitcher_actor import StitcherActor
from actors.worker import ShardWorker

log = logging.getLogger("framefarm")

# A withdrawn copy stops at its worker's next decode step; a worker that has not returned
# from it after this long is stuck (stopped, hung) and is replaced.
WITHDRAW_GRACE_S = 60.0

Worker = Hashable  # a pool's handle on one worker; opaque to the driver
Handle = Hashable  # a pool's handle on one submitted shard


class NoWorkersError(RuntimeError):
    pass


class JobCancelled(RuntimeError):
    pass


class WorkerLost(RuntimeError):
    """The worker died or cannot be reached; whatever it was doing is lost, its shard may be
    retried on another worker."""


class ShardFailed(RuntimeError):
    """A worker ran the shard and it raised: `cause` is the worker's own exception."""

    def __init__(self, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


class StitcherLost(RuntimeError):
    """The stitcher died or cannot be reached; a new one can be handed every segment again."""


class JobStitcher(ABC):
    """Joins a job's segments into its video as they land (`actors.stitcher.Stitcher`).

    `check` and `finish` raise what the stitcher has reported: a SegmentError (a committed
    segment failed verification; its `key` names it) or StitcherLost.
    """

    @abstractmethod
    def add(self, segment: Segment) -> None:
        """Hand over a committed segment; returns at once (a failure surfaces in `check`/`finish`)."""

    @abstractmethod
    def check(self) -> None:
        """Raise now what the stitcher has reported so far, if anything."""

    @abstractmethod
    def finish(self) -> dict:
        """Commit the video once every segment is in."""

    @abstractmethod
    def restart(self, segments: list[Segment]) -> None:
        """Drop this stitcher (dead, or holding a bad segment) for a new one handed `segments`."""

    @abstractmethod
    def started(self) -> bool:
        """Whether the stitcher is up (without waiting for it)."""

    @abstractmethod
    def pid(self) -> int:
        """The stitcher's process (waits until it is up); StitcherLost if it died starting."""

    @abstractmethod
    def close(self, ok: bool) -> None:
        """Release what runs the stitcher; unless `ok`, drop its partial video first (never raises)."""


class WorkerPool(ABC):
    """Decode workers of one kind, and every call the driver makes on them."""

    size: int  # workers asked for (a farm: the most slots a job may hold)
    use_gpu: bool
    shared: bool = False  # outlives the job: work nobody wants is ended by replacing its worker
    farm: bool = False  # the warm farm's (for the summary)
    watches_progress: bool = True  # `steps` reads a running shard's progress

    @abstractmethod
    def ready(self) -> list[Worker]:
        """Workers up now (those that finished starting are taken in)."""

    @abstractmethod
    def wait_ready(self, timeout_s: float, cancelled: threading.Event | None = None) -> None:
        """Block until at least one worker is up; NoWorkersError says what is missing,
        JobCancelled comes when `cancelled` is set."""

    @abstractmethod
    def claim(self, n: int) -> list[Worker]:
        """Up to `n` workers up and free, now the caller's until `release` (or `replace`)."""

    @abstractmethod
    def release(self, worker: Worker) -> None:
        """Give a claimed worker back (its shard is done; it stays in the pool)."""

    @abstractmethod
    def describe(self, worker: Worker) -> WorkerInfo | None:
        """Where `worker` runs (None where unknown or gone)."""

    @abstractmethod
    def check_input(self, worker: Worker, decoder: DecoderSpec, latent_height: int, latent_width: int,
                    encoder: str | None, compile_cache: str | None) -> dict:
        """`ShardWorker.check_input` on `worker`, waited for: its own error if it refuses,
        WorkerLost if it is gone."""

    @abstractmethod
    def share(self, latents: LatentSlice) -> object:
        """Make a shard's latents available to every worker once (kept for its retries)."""

    @abstractmethod
    def submit(self, worker: Worker, task: ShardTask, latents: object) -> Handle:
        """Start `task` on `worker` (claimed by the caller) with shared latents."""

    @abstractmethod
    def wait_any(self, handles: Sequence[Handle], timeout_s: float) -> list[Handle]:
        """Those of `handles` finished within `timeout_s` (at least one unless it passed)."""

    @abstractmethod
    def result(self, handle: Handle) -> SegmentRecord:
        """A finished shard's record; raises ShardFailed or WorkerLost."""

    @abstractmethod
    def steps(self, worker: Worker) -> int | None:
        """The worker's decode-step count as last heard, without waiting (None: not heard
        since the last call). A count that stops moving is a shard that makes no progress."""

    @abstractmethod
    def replace(self, worker: Worker) -> None:
        """End `worker` (lost, or busy with work nobody wants) for good and start another,
        once however many jobs report it."""

    @abstractmethod
    def abandon(self, handle: Handle, worker: Worker) -> None:
        """The job no longer wants this work (it is ending): stop it as far as the pool can."""

    @abstractmethod
    def withdraw(self, handle: Handle, worker: Worker, run_key: str, shard_index: int) -> None:
        """The job no longer wants this copy of a shard (another copy committed it), but the
        worker is sound: ask it to stop the copy (it commits nothing), and take the worker
        back once the call returns. The caller does not wait on `handle` again."""

    @abstractmethod
    def start_stitcher(self, output_uri: str, fmt: str, fps: int, shard_count: int,
                       video_prefix: str = "") -> JobStitcher:
        """A stitcher of segments under `output_uri` into a video under `video_prefix` there."""

    @abstractmethod
    def shutdown(self, wait_s: float = 0.0) -> None:
        """End every worker; with `wait_s`, wait (that long at most) until they have stopped,
        so that nothing they were writing is still being written when this returns."""

    def set_pending(self, job_id: str, shards: int) -> None:
        """Report shards not yet committed (a metric where the pool has one)."""

    def workers_used(self, records: list[SegmentRecord]) -> int:
        """Workers the job's time is billed on: the whole pool, busy or not."""
        return self.size


# -- Ray ------------------------------------------------------------------------------------


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def resolve_workers(device: str, workers: int | None) -> tuple[bool, int]:
    """(use_gpu, worker count) from the request and what the cluster offers."""
    gpus = cluster_gpus()
    use_gpu = device == "cuda" or (device == "auto" and gpus > 0)
    if workers is None:
        if use_gpu and gpus == 0:
            raise NoWorkersError("device 'cuda' without a number of workers on a cluster that has no GPU yet: "
                                 "say how many GPU workers to ask the autoscaler for (workers=N; "
                                 "CLI: --workers N)")
        workers = gpus if use_gpu else 2
    return use_gpu, workers


def unwrap(exc: RayTaskError) -> BaseException:
    """The worker's own exception (InputError, ValueError...) rather than Ray's wrapper, whose
    text is the remote traceback with terminal colours."""
    return exc.cause if isinstance(exc.cause, BaseException) else exc


class RayPool(WorkerPool):
    """Decode actors, created once and reused by every job given this pool.

    Safe for jobs running at once in several threads (a Farm's): one lock over its state,
    each actor lent to one job at a time (`claim`, `release`), so that a job that is cancelled
    or fails kills only actors running its own shards; a lost actor is replaced once, however
    many jobs report it.
    """

    def __init__(self, workers: int, use_gpu: bool, scratch_dir: str | None = None, shared: bool = False):
        self.use_gpu = use_gpu
        self.size = workers
        self.shared = shared
        self.scratch_dir = scratch_dir
        self._cls = decode_worker_class(use_gpu)
        self._lock = threading.RLock()
        self.actors: list = []
        self.info: dict = {}  # actor -> WorkerInfo
        self._pending: dict = {}  # describe ref -> actor still starting
        self._claimed: set = set()  # actors lent to a job
        self._probes: dict = {}  # actor -> its unanswered progress() call
        self._returning: dict = {}  # ref of a withdrawn copy -> (its actor, when withdrawn)
        self._pending_gauge = metrics.Gauge("framefarm_pending_shards", "Shards not yet committed",
                                            tag_keys=("job",))
        self.spawn(workers)

    def spawn(self, n: int):
        device = "cuda" if self.use_gpu else "cpu"
        with self._lock:
            for _ in range(n):
                actor = self._cls.remote(device, self.scratch_dir)
                self._pending[actor.describe.remote()] = actor

    def poll_ready(self, timeout: float = 0.0) -> list:
        """Actors that finished starting since the last call; dead starters are dropped."""
        with self._lock:
            waiting = list(self._pending)
        if not waiting:
            return []
        ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=timeout)
        started = []
        with self._lock:
            for ref in ready:
                actor = self._pending.pop(ref, None)
                if actor is None:
                    continue  # another job's thread took it in
                try:
                    self.info[actor] = ray.get(ref)
                except RayActorError as exc:
                    log.warning("a decode worker failed to start: %s", exc)
                    continue
                self.actors.append(actor)
                started.append(actor)
        return started

    def ready(self) -> list:
        self.poll_ready()
        with self._lock:
            return list(self.actors)

    def claim(self, n: int) -> list:
        self.poll_ready()
        self._take_back()
        with self._lock:
            idle = [a for a in self.actors if a not in self._claimed][:max(n, 0)]
            self._claimed.update(idle)
            return idle

    def release(self, actor) -> None:
        with self._lock:
            self._claimed.discard(actor)

    def wait_ready(self, timeout_s: float, cancelled: threading.Event | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.actors:
            if cancelled is not None and cancelled.is_set():
                raise JobCancelled("cancelled while waiting for decode workers")
            if not self._pending:
                raise NoWorkersError("every decode worker failed to start; see the worker logs")
            self.poll_ready(timeout=min(1.0, max(0.1, deadline - time.monotonic())))
            if not self.actors and time.monotonic() > deadline:
                need = "1 GPU" if self.use_gpu else "1 CPU"
                raise NoWorkersError(
                    f"no decode worker started within {timeout_s:.0f} s: each needs {need}; the cluster "
                    f"has {dict(ray.available_resources())} available of {dict(ray.cluster_resources())}. "
                    "Check `ray status` (an autoscaler may still be adding nodes: wait longer with "
                    "startup_timeout_s=, CLI --startup-timeout), or ask for fewer workers.")

    @property
    def starting(self) -> int:
        """Workers asked for that have not finished starting."""
        return len(self._pending)

    def describe(self, actor) -> WorkerInfo | None:
        return self.info.get(actor)

    def check_input(self, actor, decoder, latent_height, latent_width, encoder, compile_cache) -> dict:
        try:
            return ray.get(actor.check_input.remote(decoder, latent_height, latent_width, encoder, compile_cache))
        except RayTaskError as exc:
            raise unwrap(exc) from None
        except RayActorError as exc:
            raise WorkerLost(type(exc).__name__) from exc

    def share(self, latents: LatentSlice):
        return ray.put(latents)

    def submit(self, actor, task: ShardTask, latents) -> ray.ObjectRef:
        return actor.render_shard.remote(task, latents)

    def wait_any(self, handles, timeout_s: float) -> list:
        done, _ = ray.wait(list(handles), num_returns=1, timeout=timeout_s)
        return done

    def result(self, handle) -> SegmentRecord:
        try:
            return ray.get(handle)
        except RayTaskError as exc:
            raise ShardFailed(unwrap(exc)) from None
        except RayActorError as exc:
            raise WorkerLost(type(exc).__name__) from exc

    def steps(self, actor) -> int | None:
        """Answered from the worker's own "watch" thread while a shard runs; a stopped or hung
        process never answers, which reads as no progress."""
        with self._lock:
            probe = self._probes.get(actor)
            if probe is None:
                self._probes[actor] = actor.progress.remote()
                return None
        if not ray.wait([probe], timeout=0)[0]:
            return None
        with self._lock:
            self._probes.pop(actor, None)
        try:
            return ray.get(probe)
        except RayActorError:
            return None  # lost: the shard's own result says so

    def forget(self, actor):
        """Drop an actor from the pool, and make sure it is gone: Ray also reports an actor
        that is merely unreachable for a while (ActorUnavailableError) as lost, and such a
        one must not keep its GPU, or write a segment its shard's retry is writing too."""
        with self._lock:
            if actor in self.actors:
                self.actors.remove(actor)
            self.info.pop(actor, None)
            self._claimed.discard(actor)
            self._probes.pop(actor, None)
        ray.kill(actor, no_restart=True)

    def replace(self, actor):
        with self._lock:
            known = actor in self.actors or actor in self._pending.values()
            self.forget(actor)
            for ref in [r for r, a in self._pending.items() if a is actor]:
                del self._pending[ref]
            if known:
                self.spawn(1)

    def abandon(self, handle, actor):
        if self.shared:
            # A running actor task ignores ray.cancel: the actor is replaced so that the next
            # job finds it free (and it writes nothing more).
            self.replace(actor)
        else:
            ray.cancel(handle, force=False)  # a job's own pool is shut down anyway

    def withdraw(self, handle, actor, run_key: str, shard_index: int) -> None:
        actor.withdraw.remote(run_key, shard_index)  # answered by its watch thread mid-shard
        with self._lock:
            self._returning[handle] = (actor, time.monotonic())

    def _take_back(self) -> None:
        """Workers of withdrawn copies that have returned are free again; stuck ones are replaced."""
        with self._lock:
            refs = list(self._returning)
        if not refs:
            return
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        now = time.monotonic()
        with self._lock:
            stuck = [ref for ref in refs if ref not in done and now - self._returning[ref][1] > WITHDRAW_GRACE_S]
            for ref in done:
                self._claimed.discard(self._returning.pop(ref)[0])
            stuck_actors = [self._returning.pop(ref)[0] for ref in stuck]
        for actor in stuck_actors:
            log.warning("a decode worker did not stop a withdrawn shard copy within %.0f s; replacing it",
                        WITHDRAW_GRACE_S)
            self.replace(actor)

    def start_stitcher(self, output_uri: str, fmt: str, fps: int, shard_count: int,
                       video_prefix: str = "") -> JobStitcher:
        return RayStitcher(output_uri, fmt, fps, shard_count, video_prefix)

    def set_pending(self, job_id: str, shards: int) -> None:
        self._pending_gauge.set(shards, tags={"job": job_id})

    def shutdown(self, wait_s: float = 0.0):
        # A kill runs no cleanup in the worker: its scratch folder goes first, by asking.
        with self._lock:
            actors = self.actors + list(self._pending.values())
            closing = [actor.close.remote() for actor in self.actors]
            self.actors.clear()
            self._pending.clear()
            self._claimed.clear()
            self._probes.clear()
            self._returning.clear()
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=10)
        for actor in actors:
            ray.kill(actor)
        if wait_s > 0 and actors:
            # A call to a killed actor fails once Ray has seen its process end.
            probes = [actor.describe.remote() for actor in actors]
            ray.wait(probes, num_returns=len(probes), timeout=wait_s)


class RayStitcher(JobStitcher):
    """The stitcher as an actor on the driver's node: it must outlive any worker node, and
    the driver's node does.

    Hard affinity, because Ray's soft affinity spreads zero-CPU actors to other nodes
    (seen with 2.60), where losing a worker node would take the stitcher with it.
    """

    def __init__(self, output_uri: str, fmt: str, fps: int, shard_count: int, video_prefix: str = ""):
        self._args = (output_uri, fmt, fps, shard_count, video_prefix)
        self._start()

    def _start(self) -> None:
        here = ray.get_runtime_context().get_node_id()
        self.actor = StitcherActor.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False)
        ).remote(*self._args)
        self._describe = self.actor.describe.remote()  # answered once its process is up
        self._adds: list = []

    @staticmethod
    def _get(refs, timeout: float | None = None):
        try:
            return ray.get(refs, timeout=timeout)
        except RayTaskError as exc:
            raise unwrap(exc) from None
        except RayActorError as exc:
            raise StitcherLost(type(exc).__name__) from None

    def add(self, segment: Segment) -> None:
        self._adds.append(self.actor.add.remote(segment))

    def check(self) -> None:
        if not self._adds:
            return
        done, self._adds = ray.wait(self._adds, num_returns=len(self._adds), timeout=0)
        self._get(done)

    def finish(self) -> dict:
        self._get(self._adds)
        self._adds = []
        return self._get(self.actor.finish.remote())

    def started(self) -> bool:
        return bool(ray.wait([self._describe], timeout=0)[0])

    def pid(self) -> int:
        return self._get(self._describe)["pid"]

    def _abort(self, timeout: float) -> None:
        try:  # a live one drops its partial output first
            ray.get(self.actor.abort.remote(), timeout=timeout)
        except Exception:  # noqa: BLE001 - dead: the next run's sweep removes what it left
            pass

    def restart(self, segments: list[Segment]) -> None:
        self._abort(30)
        ray.kill(self.actor)
        self._start()
        for segment in segments:
            self.add(segment)

    def close(self, ok: bool) -> None:
        if not ok:
            self._abort(60)  # the job's own error matters more than the stitcher's
        ray.kill(self.actor)


# -- in process -----------------------------------------------------------------------------


class _ThreadWorker:
    """A ShardWorker and the one thread that runs its calls (it does one thing at a time)."""

    _ids = itertools.count()

    def __init__(self, make: Callable[[], ShardWorker]):
        self.id = next(self._ids)
        self.worker = make()
        self.thread = ThreadPoolExecutor(1, thread_name_prefix=f"framefarm-worker-{self.id}")
        self.lost = False
        self.replaced = False

    def __repr__(self) -> str:
        return f"<in-process worker {self.id}{' (lost)' if self.lost else ''}>"


class InProcessPool(WorkerPool):
    """ShardWorkers on threads of this process: no Ray, no object store, the same driver.

    `lose(worker)` is what a crash is to a Ray actor: the worker leaves the pool and what
    it was doing comes back as WorkerLost (its thread finishes the call; the result is dropped).
    `make_worker` builds each worker (default: a CPU ShardWorker with its own scratch folder).
    """

    def __init__(self, workers: int = 2, device: str = "cpu", scratch_dir: str | None = None, shared: bool = False,
                 make_worker: Callable[[], ShardWorker] | None = None):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.size = workers
        self.use_gpu = device == "cuda"
        self.shared = shared
        self._make = make_worker or (lambda: ShardWorker(device=device, scratch_dir=scratch_dir))
        self._lock = threading.Lock()
        self._workers: list[_ThreadWorker] = []
        self._claimed: set = set()
        self._calls: dict[Future, _ThreadWorker] = {}
        self._all: list[_ThreadWorker] = []  # every worker ever started, for shutdown
        for _ in range(workers):
            self._start()

    def _start(self) -> None:
        worker = _ThreadWorker(self._make)
        with self._lock:
            self._workers.append(worker)
            self._all.append(worker)

    def ready(self) -> list:
        with self._lock:
            return list(self._workers)

    def wait_ready(self, timeout_s: float, cancelled: threading.Event | None = None) -> None:
        if cancelled is not None and cancelled.is_set():
            raise JobCancelled("cancelled while waiting for decode workers")
        if not self.ready():
            raise NoWorkersError("the in-process pool has no worker left")

    def claim(self, n: int) -> list:
        with self._lock:
            idle = [w for w in self._workers if w not in self._claimed][:max(n, 0)]
            self._claimed.update(idle)
            return idle

    def release(self, worker: _ThreadWorker) -> None:
        with self._lock:
            self._claimed.discard(worker)

    def describe(self, worker: _ThreadWorker) -> WorkerInfo | None:
        return None if worker.lost else worker.worker.info

    def check_input(self, worker: _ThreadWorker, decoder, latent_height, latent_width, encoder, compile_cache):
        try:
            result = worker.thread.submit(worker.worker.check_input, decoder, latent_height, latent_width,
                                          encoder, compile_cache).result()
        except RuntimeError as exc:
            if worker.lost:  # its thread was shut down
                raise WorkerLost(f"{worker!r} was lost") from exc
            raise
        if worker.lost:
            raise WorkerLost(f"{worker!r} was lost")
        return result

    def share(self, latents: LatentSlice) -> LatentSlice:
        return latents

    def submit(self, worker: _ThreadWorker, task: ShardTask, latents: LatentSlice) -> Future:
        # The driver holds an outer future: a lost worker's ends at once (as a dead actor's
        # call does), while its thread may still be inside the call.
        handle = Future()
        handle.set_running_or_notify_cancel()
        handle.task = task
        with self._lock:
            self._calls[handle] = worker
        try:
            inner = worker.thread.submit(worker.worker.render_shard, task, latents)
        except RuntimeError:  # lost since the claim: its thread takes no more calls
            _settle(handle, exc=WorkerLost(f"{worker!r} was lost"))
            return handle
        handle.inner = inner
        inner.add_done_callback(lambda call: _settle(handle, call=call))
        return handle

    def wait_any(self, handles, timeout_s: float) -> list:
        done, _ = futures.wait(list(handles), timeout=timeout_s, return_when=futures.FIRST_COMPLETED)
        return list(done)

    def result(self, handle: Future) -> SegmentRecord:
        with self._lock:
            self._calls.pop(handle, None)
        exc = handle.exception()
        if exc is None:
            return handle.result()
        if isinstance(exc, (WorkerLost, futures.CancelledError)):
            raise WorkerLost(str(exc) or "the call was cancelled before it ran") from None
        raise ShardFailed(exc) from exc

    def steps(self, worker: _ThreadWorker) -> int | None:
        return None if worker.lost else worker.worker.progress()

    def lose(self, worker: _ThreadWorker) -> None:
        """The worker is gone, as a crashed process would be: its calls end now as WorkerLost
        (its thread may go on inside one; what it returns is dropped)."""
        with self._lock:
            worker.lost = True
            if worker in self._workers:
                self._workers.remove(worker)
            self._claimed.discard(worker)
            calls = [c for c, w in self._calls.items() if w is worker]
        worker.thread.shutdown(wait=False, cancel_futures=True)
        for call in calls:
            # A crashed process writes nothing more: its thread, still inside the call, stops
            # at its next decode step or before committing.
            worker.worker.withdraw(call.task.run_key, call.task.shard.index)
            _settle(call, exc=WorkerLost(f"{worker!r} was lost with its shard in flight"))

    def replace(self, worker: _ThreadWorker) -> None:
        with self._lock:
            first, worker.replaced = not worker.replaced, True  # once, however many report it
        self.lose(worker)
        if first:
            self._start()

    def abandon(self, handle: Future, worker: _ThreadWorker) -> None:
        # A running call cannot be stopped: a queued one is cancelled, and the worker of a
        # running one is replaced, so that it writes nothing a later job expects.
        inner = getattr(handle, "inner", None)
        if inner is not None and (inner.done() or inner.cancel()):
            self.release(worker)  # it ran to its end, or never started: the worker is free
        else:
            self.replace(worker)

    def withdraw(self, handle: Future, worker: _ThreadWorker, run_key: str, shard_index: int) -> None:
        worker.worker.withdraw(run_key, shard_index)
        with self._lock:
            self._calls.pop(handle, None)
        inner = getattr(handle, "inner", None)
        if inner is None:
            self.release(worker)
        else:
            inner.add_done_callback(lambda _: self.release(worker))

    def start_stitcher(self, output_uri: str, fmt: str, fps: int, shard_count: int,
                       video_prefix: str = "") -> JobStitcher:
        return LocalStitcher(output_uri, fmt, fps, shard_count, video_prefix)

    def shutdown(self, wait_s: float = 0.0) -> None:
        with self._lock:
            workers, self._workers = list(self._all), []
            running = [getattr(call, "inner", call) for call in self._calls]
            self._claimed.clear()
        for worker in workers:
            worker.lost = True
            worker.thread.shutdown(wait=False, cancel_futures=True)
        if wait_s > 0 and running:
            futures.wait(running, timeout=wait_s)
        for worker in workers:
            # Its scratch folder; a call still running (its result unwanted) then fails, harmlessly.
            worker.worker.close()


def _settle(handle: Future, call: Future | None = None, exc: BaseException | None = None) -> None:
    """Complete the driver's future from the worker's call, or with `exc`; the first wins."""
    try:
        if call is not None and call.cancelled():
            handle.set_exception(WorkerLost("the call was cancelled before it ran"))
        elif call is not None and call.exception() is not None:
            handle.set_exception(call.exception())
        elif call is not None:
            handle.set_result(call.result())
        else:
            handle.set_exception(exc)
    except futures.InvalidStateError:
        pass  # already settled (a lost worker's call that ended later)


class LocalStitcher(JobStitcher):
    """The stitcher in this process (it verifies and appends on its own threads)."""

    def __init__(self, output_uri: str, fmt: str, fps: int, shard_count: int, video_prefix: str = ""):
        self._args = (output_uri, fmt, fps, shard_count)
        self._video_prefix = video_prefix
        self.stitcher = self._start()

    def _start(self) -> Stitcher:
        return Stitcher(*self._args, video_prefix=self._video_prefix)

    def add(self, segment: Segment) -> None:
        try:
            self.stitcher.add(segment)
        except SegmentError:
            pass  # an earlier segment's failure: `check` or `finish` reports it

    def check(self) -> None:
        self.stitcher.wait_appended(0, timeout=0)  # raises a failed segment's error

    def finish(self) -> dict:
        return self.stitcher.finish()

    def started(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()

    def _abort(self) -> None:
        try:
            self.stitcher.abort()
        except Exception:  # noqa: BLE001 - whatever made the job abort matters more
            pass

    def restart(self, segments: list[Segment]) -> None:
        self._abort()
        self.stitcher = self._start()
        for segment in segments:
            self.add(segment)

    def close(self, ok: bool) -> None:
        if not ok:
            self._abort()

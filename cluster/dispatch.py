"""The one place the driver talks to decode actors: start them, wait for them, call them.

Ray's resource model is the seam between laptops and clusters: on a cluster with GPUs a
worker is one actor holding one GPU; without GPUs it holds a CPU and decodes there.
"""

from __future__ import annotations

import logging
import threading
import time

import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.ray_actors import decode_worker_class
from actors.stitcher_actor import StitcherActor

log = logging.getLogger("framefarm")


class NoWorkersError(RuntimeError):
    pass


class JobCancelled(RuntimeError):
    pass


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


class WorkerPool:
    """Decode actors of one kind, created once and reused by every job given this pool.

    Safe for jobs running at once in several threads (a Farm's): one lock over its state,
    each actor lent to one job at a time (`claim`, `release`), so that a job that is cancelled
    or fails kills only actors running its own shards; a lost actor is replaced once, however
    many jobs report it.
    """

    def __init__(self, workers: int, use_gpu: bool, scratch_dir: str | None = None):
        self.use_gpu = use_gpu
        self.size = workers
        self.scratch_dir = scratch_dir
        self._cls = decode_worker_class(use_gpu)
        self._lock = threading.RLock()
        self.actors: list = []
        self.info: dict = {}  # actor -> describe()
        self._pending: dict = {}  # describe ref -> actor still starting
        self._claimed: set = set()  # actors lent to a job
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

    def claim(self, n: int) -> list:
        """Up to `n` started actors that no job holds, now held by the caller."""
        with self._lock:
            idle = [a for a in self.actors if a not in self._claimed][:max(n, 0)]
            self._claimed.update(idle)
            return idle

    def release(self, actor) -> None:
        """Give an actor back once its shard is done (it stays in the pool)."""
        with self._lock:
            self._claimed.discard(actor)

    def wait_ready(self, timeout_s: float, cancelled: threading.Event | None = None) -> None:
        """Block until at least one worker is up, or explain what is missing."""
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

    def forget(self, actor):
        """Drop an actor from the pool, and make sure it is gone: Ray also reports an actor
        that is merely unreachable for a while (ActorUnavailableError) as lost, and such a
        one must not keep its GPU, or write a segment its shard's retry is writing too."""
        with self._lock:
            if actor in self.actors:
                self.actors.remove(actor)
            self.info.pop(actor, None)
            self._claimed.discard(actor)
        ray.kill(actor, no_restart=True)

    # The calls the driver makes, through the pool so that another kind of pool (the warm
    # farm's, cluster.service.ServicePool) can stand in: refs here are Ray object refs.
    farm = False

    @staticmethod
    def check_input(actor, spec, latent_height: int, latent_width: int, encoder, compile_cache=None):
        return actor.check_input.remote(spec, latent_height, latent_width, encoder, compile_cache)

    @staticmethod
    def render_shard(actor, task, latents_ref):
        return actor.render_shard.remote(task, latents_ref)

    @staticmethod
    def progress(actor):
        """A ref to the worker's decode-step count, answered while a shard runs."""
        return actor.progress.remote()

    @staticmethod
    def wait(refs: list, timeout: float) -> list:
        done, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        return done

    @staticmethod
    def get(ref, timeout: float | None = None):
        return ray.get(ref, timeout=timeout)

    @staticmethod
    def cancel(ref) -> None:
        ray.cancel(ref, force=False)

    def workers_used(self, metas: list[dict]) -> int:
        """Workers the job's time is billed on: the whole pool, busy or not."""
        return self.size

    def replace(self, actor):
        """Kill `actor` (lost, or busy with work nobody wants any more) and start another,
        once: a second report of the same lost actor (another job's) starts nothing."""
        with self._lock:
            known = actor in self.actors or actor in self._pending.values()
            self.forget(actor)
            for ref in [r for r, a in self._pending.items() if a is actor]:
                del self._pending[ref]
            if known:
                self.spawn(1)

    def shutdown(self, wait_s: float = 0.0):
        """Kill every worker; with `wait_s`, also wait (that long at most) until they are dead,
        so that nothing they were writing is still being written when this returns."""
        # A kill runs no cleanup in the worker: its scratch folder goes first, by asking.
        with self._lock:
            actors = self.actors + list(self._pending.values())
            closing = [actor.close.remote() for actor in self.actors]
            self.actors.clear()
            self._pending.clear()
            self._claimed.clear()
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=10)
        for actor in actors:
            ray.kill(actor)
        if wait_s > 0 and actors:
            # A call to a killed actor fails once Ray has seen its process end.
            probes = [actor.describe.remote() for actor in actors]
            ray.wait(probes, num_returns=len(probes), timeout=wait_s)


def start_stitcher(output_uri: str, fmt: str, fps: int, shard_count: int, video_prefix: str = ""):
    """On the driver's node: it must outlive any worker node, and the driver's node does.

    Hard affinity, because Ray's soft affinity spreads zero-CPU actors to other nodes
    (seen with 2.60), where losing a worker node would take the stitcher with it.
    """
    here = ray.get_runtime_context().get_node_id()
    return StitcherActor.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False)
    ).remote(output_uri, fmt, fps, shard_count, video_prefix)


class StitcherLink:
    """The job's stitcher and the segments handed to it. A stitcher that died, or refused a
    segment, is replaced by `restart`, and the new one is handed every segment again (they
    stay in storage until the video is published)."""

    def __init__(self, output_uri: str, fmt: str, fps: int, shard_count: int, video_prefix: str = ""):
        self._args = (output_uri, fmt, fps, shard_count, video_prefix)
        self.actor = start_stitcher(*self._args)
        self._describe = self.actor.describe.remote()  # answered once its process is up
        self._refs: list = []

    def add(self, segment) -> None:
        self._refs.append(self.actor.add.remote(segment))

    def check(self) -> None:
        """Raise now what the stitcher has reported so far: a segment it refused (RayTaskError
        with a SegmentError) or its own death (RayActorError)."""
        if not self._refs:
            return
        done, self._refs = ray.wait(self._refs, num_returns=len(self._refs), timeout=0)
        for ref in done:
            ray.get(ref)

    def pid(self) -> int:
        return ray.get(self._describe)["pid"]

    def started(self) -> bool:
        """Whether the stitcher's process is up (without waiting for it)."""
        return bool(ray.wait([self._describe], timeout=0)[0])

    def finish(self) -> dict:
        ray.get(self._refs)
        self._refs = []
        return ray.get(self.actor.finish.remote())

    def restart(self, segments) -> None:
        try:  # a live one (it refused a segment) drops its partial output first
            ray.get(self.actor.abort.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - dead: the next run's sweep removes what it left
            pass
        ray.kill(self.actor)
        self.actor = start_stitcher(*self._args)
        self._describe = self.actor.describe.remote()
        self._refs = []
        for segment in segments:
            self.add(segment)

    def close(self, ok: bool) -> None:
        if not ok:
            try:
                ray.get(self.actor.abort.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - the job's own error matters more (a dead stitcher too)
                pass
        ray.kill(self.actor)

"""The Python API for notebooks and scripts: render (blocking) and submit (a handle).

    from cluster.api import render
    result = render(latents, "out/", decoder={"name": "wan2.1", "weights": "s3://models/wan-vae"})
    result.summary["realtime_factor"]

`latents` may be a path, an s3:// URI or a torch tensor ([C,T,H,W] or [1,C,T,H,W]).
Options are `jobs.spec.RenderSpec`'s fields. Ray is joined if running, or started
locally; `address=` picks a cluster explicitly. A `Farm` keeps its decode workers (and
their loaded models) across jobs.
"""

from __future__ import annotations

import threading

import ray
import torch

from cluster.dispatch import WorkerPool, resolve_workers
from cluster.driver import JobResult, RenderJob
from jobs.spec import RenderSpec


def connect(address: str | None = None, **init_kwargs) -> bool:
    """Join the given or running Ray cluster, or start a local one. True if this call started Ray."""
    if ray.is_initialized():
        return False
    # With no address, ray.init() joins a cluster already running on this host (or the one
    # RAY_ADDRESS names, as under `ray job submit`) and otherwise starts an embedded one.
    ray.init(address=address, **init_kwargs)
    return True


def make_spec(latents, output: str, options: dict) -> tuple[RenderSpec, torch.Tensor | None]:
    tensor = latents if isinstance(latents, torch.Tensor) else None
    path = None if tensor is not None else str(latents)
    return RenderSpec(latents=path, output=output, **options), tensor


class Farm:
    """Decode workers that outlive a job: the model is loaded once per worker, not per job."""

    def __init__(self, workers: int | None = None, device: str = "auto", address: str | None = None):
        self.started_ray = connect(address)
        use_gpu, n = resolve_workers(device, workers)
        self.pool = WorkerPool(n, use_gpu)

    def render(self, latents, output: str, *, progress: bool = True, startup_timeout_s: float = 600.0,
               **options) -> JobResult:
        spec, tensor = make_spec(latents, output, options)
        return RenderJob(spec, tensor, pool=self.pool, progress=progress, startup_timeout_s=startup_timeout_s).run()

    def close(self):
        self.pool.shutdown()
        if self.started_ray:
            ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def render(latents, output: str, *, address: str | None = None, progress: bool = True,
           farm: Farm | None = None, startup_timeout_s: float = 600.0, **options) -> JobResult:
    """Render one video and block until it is committed; returns its manifest and summary.

    `startup_timeout_s`: how long to wait for a first decode worker (an autoscaler adding a
    GPU node takes minutes)."""
    if farm is not None:
        return farm.render(latents, output, progress=progress, startup_timeout_s=startup_timeout_s, **options)
    spec, tensor = make_spec(latents, output, options)
    connect(address)
    return RenderJob(spec, tensor, progress=progress, startup_timeout_s=startup_timeout_s).run()


class JobHandle:
    """A job running in a background thread of this process."""

    def __init__(self, job: RenderJob):
        self.job = job
        self._result: JobResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="framefarm-job", daemon=True)
        self._thread.start()

    def _run(self):
        try:
            self._result = self.job.run()
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            self._error = exc

    def progress(self) -> tuple[int, int]:
        """(frames committed, frames in the video)."""
        return self.job.frames_done, self.job.frames_total

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> JobResult:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"job still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

    def cancel(self, timeout: float | None = 120) -> bool:
        """Stop dispatching, stop running shards, leave no video behind. Returns whether the
        job has ended within `timeout` (it goes on ending in the background if not)."""
        self.job.cancel()
        self._thread.join(timeout)
        return not self._thread.is_alive()


def submit(latents, output: str, *, address: str | None = None, farm: Farm | None = None,
           on_event=None, startup_timeout_s: float = 600.0, **options) -> JobHandle:
    """Start a render in a background thread; the handle tells progress, waits or cancels."""
    spec, tensor = make_spec(latents, output, options)
    if farm is None:
        connect(address)
    job = RenderJob(spec, tensor, pool=farm.pool if farm else None, on_event=on_event, progress=False,
                    startup_timeout_s=startup_timeout_s)
    return JobHandle(job)


__all__ = ["Farm", "JobHandle", "JobResult", "connect", "render", "submit", "resolve_workers"]

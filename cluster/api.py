"""The Python API for notebooks and scripts: render (blocking) and submit (a handle).

    from cluster.api import render
    result = render(latents, "out/", decoder={"name": "wan2.1", "weights": "s3://models/wan-vae"})
    result.summary["realtime_factor"]

`latents` may be a path (str or pathlib.Path), an s3:// URI, a torch tensor or a numpy
array ([C,T,H,W] or [1,C,T,H,W]). Options are `actors.protocol.RenderSpec`'s fields, as keywords;
`decoder` is a name, a dict or a DecoderSpec, and its fields (weights, random_weights,
dtype, seed) may also be keywords: `render(z, "out/", decoder="wan2.1", weights="/models/vae")`. Ray is joined if running, or started
locally; `address=` picks a cluster explicitly. Shards go to the cluster's warm farm when
one runs (`service="auto"`; "on" also starts it, "off" never uses it: cluster/service.py,
`python -m jobs.farm`). A `Farm` keeps decode workers of this process (and their loaded
models) across its jobs, for a notebook on a cluster without the warm farm.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import ray
import torch

from actors.protocol import DecoderSpec, InputError, RenderSpec
from cluster.dispatch import RayPool, resolve_workers
from cluster.driver import JobResult, RenderJob
from cluster.service import use_farm


def connect(address: str | None = None, **init_kwargs) -> bool:
    """Join the given or running Ray cluster, or start a local one. True if this call started Ray."""
    if ray.is_initialized():
        return False
    # With no address, ray.init() joins a cluster already running on this host (or the one
    # RAY_ADDRESS names, as under `ray job submit`) and otherwise starts an embedded one.
    ray.init(address=address, **init_kwargs)
    return True


# Keywords of render/submit that belong to the decoder, as the CLI's --weights etc. do.
DECODER_KEYWORDS = tuple(f for f in DecoderSpec.model_fields if f != "name")


def as_latents(latents) -> tuple[str | None, torch.Tensor | None]:
    """(a path or URI, or a tensor) from what a notebook holds: str, pathlib.Path, a torch
    tensor or a numpy array. Anything else is refused here, before Ray starts."""
    if isinstance(latents, torch.Tensor):
        return None, latents
    if isinstance(latents, np.ndarray):
        if latents.dtype.kind not in "fiu":
            raise InputError(f"latents: a numpy array of {latents.dtype} values; give floats")
        return None, torch.from_numpy(np.ascontiguousarray(latents))
    if isinstance(latents, (str, os.PathLike)):
        return os.fspath(latents), None
    raise InputError(f"latents: a {type(latents).__name__}; give a path, an s3:// URI, a torch tensor "
                     "or a numpy array")


def make_spec(latents, output, options: dict) -> tuple[RenderSpec, torch.Tensor | None]:
    """The job spec from render/submit's arguments.

    `decoder` may be a name ("wan2.1"), a dict or a DecoderSpec; the decoder's other fields
    (weights=, random_weights=, dtype=, seed=) may also come as keywords of their own."""
    path, tensor = as_latents(latents)
    if not isinstance(output, (str, os.PathLike)):
        raise InputError(f"output: a {type(output).__name__}; give a folder path or an s3:// URI")
    options = dict(options)
    decoder = options.pop("decoder", None)
    loose = {k: options.pop(k) for k in DECODER_KEYWORDS if k in options}
    if decoder is None:
        raise InputError('decoder= is required: "wan2.1", "wan2.2-ti2v" or "test-pattern" (a test '
                         "pattern by default would pass real latents without a word)")
    if isinstance(decoder, str):
        decoder = {"name": decoder}
    elif isinstance(decoder, DecoderSpec):
        decoder = decoder.model_dump()
    elif not isinstance(decoder, dict):
        raise InputError(f"decoder: a {type(decoder).__name__}; give a name, a dict or a DecoderSpec")
    twice = sorted(set(loose) & {k for k, v in decoder.items() if v is not None})
    if twice and any(decoder[k] != loose[k] for k in twice):
        raise InputError(f"{', '.join(twice)} given both in decoder= and as keywords; give each once")
    for key, value in loose.items():
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        decoder[key] = value
    if isinstance(decoder.get("weights"), os.PathLike):
        decoder["weights"] = os.fspath(decoder["weights"])
    return RenderSpec(latents=path, output=os.fspath(output), decoder=decoder, **options), tensor


class Farm:
    """Decode workers that outlive a job: the model is loaded once per worker, not per job."""

    def __init__(self, workers: int | None = None, device: str = "auto", address: str | None = None):
        self.started_ray = connect(address)
        use_gpu, n = resolve_workers(device, workers)
        self.pool = RayPool(n, use_gpu, shared=True)

    def render(self, latents, output: str | os.PathLike, *, progress: bool = True, startup_timeout_s: float = 600.0,
               **options) -> JobResult:
        spec, tensor = make_spec(latents, output, options)
        job = RenderJob(spec, tensor, pool=self.pool, progress=progress, startup_timeout_s=startup_timeout_s)
        job.prepare()
        return job.run()

    def close(self):
        self.pool.shutdown()
        if self.started_ray:
            ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def render(latents, output: str | os.PathLike, *, address: str | None = None, progress: bool = True,
           farm: Farm | None = None, service: str = "auto", startup_timeout_s: float = 600.0,
           **options) -> JobResult:
    """Render one video and block until it is committed; returns its manifest and summary.

    `startup_timeout_s`: how long to wait for a first decode worker (an autoscaler adding a
    GPU node takes minutes)."""
    if farm is not None:
        return farm.render(latents, output, progress=progress, startup_timeout_s=startup_timeout_s, **options)
    spec, tensor = make_spec(latents, output, options)
    job = RenderJob(spec, tensor, progress=progress, startup_timeout_s=startup_timeout_s)
    job.prepare()  # bad input and options fail here, before Ray is started or joined
    job.use_farm = use_farm(service, spec.device, spec.workers, connect(address))
    return job.run()


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


def submit(latents, output: str | os.PathLike, *, address: str | None = None, farm: Farm | None = None,
           service: str = "auto", on_event=None, startup_timeout_s: float = 600.0, **options) -> JobHandle:
    """Start a render in a background thread; the handle tells progress, waits or cancels."""
    spec, tensor = make_spec(latents, output, options)
    job = RenderJob(spec, tensor, pool=farm.pool if farm else None, on_event=on_event, progress=False,
                    startup_timeout_s=startup_timeout_s)
    job.prepare()  # bad input fails in the caller, before Ray, not later in the handle's wait()
    if farm is None:
        job.use_farm = use_farm(service, spec.device, spec.workers, connect(address))
    return JobHandle(job)


__all__ = ["Farm", "JobHandle", "JobResult", "connect", "make_spec", "render", "submit", "resolve_workers"]

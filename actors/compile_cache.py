"""Compiled decoder code kept in object storage, so that compiling is paid once, not per process.

`torch.compile` spends about 23 s per process on an H200 compiling the decoder's regions
(DESIGN.md). Inductor already keeps what it compiled in a local folder (its FX graph cache:
generated wrappers with the Triton kernels bundled in on CUDA, the compiled C++ libraries on
the CPU, autotuning results), and a process that finds that folder full skips the
compiler's back end. A fresh worker on another node has no such folder; this module gives
it one: each worker process compiles into a folder of its own, packs it after a compile as
one object under a key naming everything that could make the code wrong or stale, and a
later worker anywhere unpacks that object before its first compile.

Why the folder and not `torch.compiler.save_cache_artifacts()`: on torch 2.13 that format
carries the FX graph and AOT autograd entries but not the compiled C++ libraries of the CPU
back end, so a CPU process still recompiles them (measured on the 2-core CI machine: 23 s
cold, 22 s from the artifacts, 5 s from the folder). The folder is the same on both back
ends, and CPU tests exercise the path the GPU takes.

Inductor checks its own entries (graph, inputs, torch build, device); the key here only
chooses which object to fetch, so a stale object costs a compile, never a wrong frame:
  torch / CUDA / Triton / Python versions, the device's name and architecture (sm_90, or the CPU's
  vector ISA), latent frame size, dtype, the decoder's variant, config, options and code.

Trust: inductor's entries are pickles and its libraries native code. A compile cache is
code, like the worker's own: keep it where only framefarm's workers write (the default is
under the job's own S3 prefix, or the user's cache folder), never at a location others can
write.

The key and the location are pure functions; `CompileCache` does the I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import inspect
import io
import json
import os
import re
import sys
import tarfile
from dataclasses import dataclass

import torch

from infra.storage import is_s3, open_store, split_uri

CACHE_FORMAT = 1  # bump when the object's layout changes
DEFAULT_S3_PREFIX = "framefarm-cache/compile"
OFF = "off"
# Inductor's counters that tell a compile from a cache hit (torch._dynamo.utils.counters).
_MISS, _HIT = "fxgraph_cache_miss", "fxgraph_cache_hit"
_COUNTERS_MODULE = "torch._dynamo.utils"


# -- where and under which name: pure ------------------------------------------------------------


def default_cache_uri(output_uri: str, user_cache_dir: str) -> str:
    """Where a job's workers keep compiled code when the job does not say.

    S3 outputs: `framefarm-cache/compile` under the first component of the output's key
    (s3://BUCKET/PREFIX/renders/clip -> s3://BUCKET/PREFIX/framefarm-cache/compile), shared by
    every job under that prefix. Not the bucket's root: the workers' IAM policy
    (infra/iam.py) grants one prefix only, the one a deployment's outputs live under.
    Local outputs: the user's cache folder (workers of a local cluster share the machine).
    """
    if is_s3(output_uri):
        _, bucket, key = split_uri(output_uri)
        top = key.strip("/").split("/")[0]
        return f"s3://{bucket}/{top + '/' if top else ''}{DEFAULT_S3_PREFIX}"
    return os.path.join(user_cache_dir, "framefarm", "compile")


def resolve_cache_uri(option: str | None, output_uri: str, user_cache_dir: str) -> str | None:
    """The compile cache location from a job's option: None derives it, "off" turns it off."""
    if option is not None and option.strip().lower() == OFF:
        return None
    if option:
        split_uri(option)  # a malformed location fails here, before any work
        return option
    return default_cache_uri(output_uri, user_cache_dir)


def user_cache_dir(environ: dict[str, str]) -> str:
    """$XDG_CACHE_HOME, else ~/.cache (the XDG base directory default)."""
    return environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")


def compile_cache_key(facts: dict) -> str:
    """The object name for compiled code built under `facts` (JSON-able; see `cache_facts`).

    A readable head (variant, frame size, dtype, device architecture) and a digest of all
    the facts: any change in any of them names another object.
    """
    blob = json.dumps({"format": CACHE_FORMAT, **facts}, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:24]
    d = facts.get("decoder", {})
    head = "-".join(str(v) for v in (d.get("name", "decoder"), facts.get("latent_size", "?"),
                                     facts.get("dtype", "?"), facts.get("device", {}).get("arch", "?")))
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', head)}-{digest}.tar.gz"


def cache_facts(runtime: dict, decoder: dict, latent_height: int, latent_width: int, dtype: str) -> dict:
    """Everything the key covers, from the runtime's facts and the decoder's (both plain dicts)."""
    return {"runtime": {k: v for k, v in runtime.items() if k != "device"}, "device": runtime.get("device", {}),
            "decoder": decoder, "latent_size": f"{latent_width}x{latent_height}", "dtype": dtype}


# -- facts read off the process: the edge ------------------------------------------------------


def runtime_facts(device: torch.device) -> dict:
    """The software and hardware that compiled code depends on."""
    facts = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    try:
        facts["triton"] = importlib.metadata.version("triton")  # CUDA builds only
    except importlib.metadata.PackageNotFoundError:
        facts["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts["device"] = {"name": props.name, "arch": f"sm_{props.major}{props.minor}",
                           "cudnn": torch.backends.cudnn.version()}
    else:
        # Inductor's C++ back end compiles for the CPU's vector ISA (AVX2, AVX-512...).
        facts["device"] = {"name": "cpu", "arch": f"cpu-{torch.backends.cpu.get_cpu_capability()}".lower()}
    return facts


def decoder_facts(decoder) -> dict:
    """What of a decoder shapes its compiled code: class, variant, config, options, source."""
    cls = type(decoder)
    options = getattr(decoder, "options", None)
    if dataclasses.is_dataclass(options):
        options = dataclasses.asdict(options)
    module = sys.modules.get(cls.__module__)
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        source = ""
    config = getattr(decoder, "config", None)
    if isinstance(config, dict):
        # diffusers' private bookkeeping ("_use_default_values" is a list in set order, which
        # changes with every process's hash seed) would give each worker its own key.
        config = {k: v for k, v in config.items() if not k.startswith("_")}
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "name": getattr(decoder, "name", cls.__name__),
            "config": config, "options": options,
            "code": hashlib.sha256(source.encode()).hexdigest()[:16]}


def compiles(decoder) -> bool:
    """Whether this decoder runs `torch.compile`d code (its options say so)."""
    return bool(getattr(getattr(decoder, "options", None), "compile", False))


def inductor_counts() -> tuple[int, int]:
    """(FX graph cache misses, hits) in this process so far.

    Read without importing torch._dynamo (6.8 s of a cold H200 worker's start, paid only by
    a worker that compiles): a process that has not imported it has compiled nothing.
    """
    utils = sys.modules.get(_COUNTERS_MODULE)
    if utils is None:
        return 0, 0
    c = utils.counters["inductor"]
    return int(c.get(_MISS, 0)), int(c.get(_HIT, 0))


# -- the cache --------------------------------------------------------------------------------------


@dataclass
class CompileCache:
    """One worker process's inductor folder, filled from and saved to one object in a store.

    `activate` must run before the process compiles anything: inductor (and its compile
    subprocesses, which inherit the environment) reads the folder from
    TORCHINDUCTOR_CACHE_DIR when it compiles.
    """

    store_uri: str
    key: str
    local_dir: str

    @property
    def uri(self) -> str:
        return open_store(self.store_uri).uri_for(self.key)

    def activate(self) -> None:
        os.makedirs(self.local_dir, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = self.local_dir
        # Triton's own cache under inductor's folder (its default), so that it travels too.
        os.environ.pop("TRITON_CACHE_DIR", None)

    def load(self) -> bool:
        """Unpack the stored object into the local folder; False if there is none yet."""
        store = open_store(self.store_uri)
        if not store.exists(self.key):
            return False
        data = store.get_bytes(self.key)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            # The "data" filter refuses absolute paths, '..', links out of the folder and
            # device files: an object cannot write outside the folder.
            tar.extractall(self.local_dir, filter="data")
        return True

    def save(self) -> int:
        """Pack the local folder as the stored object (atomically replaced); returns its size."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
            for name in sorted(os.listdir(self.local_dir)):
                if name == "locks":  # inductor's lock files: per process, meaningless elsewhere
                    continue
                tar.add(os.path.join(self.local_dir, name), arcname=name)
        data = buf.getvalue()
        open_store(self.store_uri).put_bytes(self.key, data)
        return len(data)

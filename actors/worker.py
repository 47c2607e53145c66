"""What one GPU does with a shard, without Ray: decode, pipeline, encode, commit the segment.

`ShardWorker` is the real worker; `actors.ray_actors.DecodeWorker` is a thin Ray wrapper
around it. Start-up happens in stages (device, then decoders on first use), and decoders
are cached per spec so a model is loaded once and reused across shards and jobs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable

import torch

from actors import wan
from actors.compile_cache import (CompileCache, cache_facts, compile_cache_key, compiles, decoder_facts,
                                  inductor_counts, runtime_facts)
from actors.decoders import Decoder, TestPatternDecoder
from actors.pipeline import run_pipeline
from actors.protocol import (DecoderSpec, InputError, LatentSlice, SegmentRecord, SegmentTaken, ShardTask,
                             ShardWithdrawn, WorkerInfo, claim_key, segment_suffix,
                             sidecar_key)
from actors.sinks import nvenc_available, open_sink
from actors.startup import (COMPILE_FAILED, COMPILE_HIT, COMPILE_MISS, COMPILER_MODULES, BackgroundImport, StartupClock,
                            StartupReport)
from infra.checksum import sha256_file
from infra.scratch import make_scratch, sweep_stale
from infra.staged import move_into_place, tmp_sibling
from infra.storage import download_prefix, is_s3, open_store

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
log = logging.getLogger("framefarm")
SCRATCH_PREFIX = "framefarm-scratch-"
WEIGHTS_PREFIX = "framefarm-weights-"
COMPILER_IMPORT_ENV = "FRAMEFARM_COMPILER_IMPORT"  # "background" (default) or "inline"
# How many cuDNN convolution algorithms the autotune tries per shape: torch's default is 10
# (the heuristics' first ten); 0 tries every one. Read once per worker, to measure both.
CUDNN_LIMIT_ENV = "FRAMEFARM_CUDNN_BENCHMARK_LIMIT"


# PyTorch's caching allocator reserves more than the peak it hands out: 14.2 GiB reserved
# for a 9.68 GiB peak decoding Wan 2.1 at 720p in bf16 on an H200.
ALLOCATOR_RESERVE = 1.5


def check_fits(peak_bytes: int, device_bytes: int, height: int, width: int, device_name: str,
               weights_bytes: int = 0):
    """Refuse a frame size whose decode would not fit the device's memory: the stream's peak
    with the allocator's reserve, plus the model's weights."""
    need = int(peak_bytes * ALLOCATOR_RESERVE) + weights_bytes
    if need > device_bytes:
        raise InputError(f"frame size {width}x{height} needs about {need / 2**30:.1f} GiB per decode stream "
                         f"({peak_bytes / 2**30:.1f} GiB peak, the allocator's reserve and the weights), more "
                         f"than {device_name} has ({device_bytes / 2**30:.1f} GiB)")


def resolve_device(device: str) -> torch.device:
    if device == "cpu" or not torch.cuda.is_available():
        # `cuda` asked on a machine without CUDA (a fake-GPU test cluster, a laptop) decodes on
        # the CPU rather than failing: the same command works everywhere.
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def decoder_options(spec: DecoderSpec, device: torch.device) -> wan.DecoderOptions:
    """The Wan decoder's options for this spec on this device: the device's defaults, with
    compiling switched on or off where `spec.compile` says so."""
    options = wan.DecoderOptions.for_device(device)
    if spec.compile == "on":
        return dataclasses.replace(options, compile=True)
    if spec.compile == "off":
        return eager_options(options)
    return options


def build_decoder(spec: DecoderSpec, device: torch.device, options: wan.DecoderOptions | None = None) -> Decoder:
    """The one place that maps a decoder spec to a decoder on a device.

    `options`: the Wan decoder's options; None: `decoder_options(spec, device)`.
    """
    dtype = _DTYPES[spec.dtype]
    if spec.name == "test-pattern":
        return TestPatternDecoder(device=device, dtype=dtype)
    kw = {"options": options or decoder_options(spec, device)}
    if spec.random_weights:
        config = wan.ti2v_config() if spec.name == "wan2.2-ti2v" else None
        return wan.random_wan_decoder(config, device=device, dtype=dtype, seed=spec.seed, **kw)
    if is_s3(spec.weights):
        # The weights are read into memory; the downloaded copy need not outlive the load
        # (and if this process is killed mid-download, the next worker sweeps it).
        local = make_scratch(WEIGHTS_PREFIX)
        try:
            download_prefix(spec.weights, local)
            return wan.load_wan_decoder(local, device=device, dtype=dtype, **kw)
        finally:
            shutil.rmtree(local, ignore_errors=True)
    return wan.load_wan_decoder(spec.weights, device=device, dtype=dtype, **kw)


def eager_options(options):
    """The same decoder options without compiling (nor CUDA graphs, which capture compiled code)."""
    changes = {f.name: False for f in dataclasses.fields(options) if f.name in ("compile", "cuda_graphs")}
    return dataclasses.replace(options, **changes)


def warm_up_steps(decoder) -> int:
    """Decode steps until every compiled graph is built and every CUDA graph captured: the
    stream's first (its own shapes), the eager steady steps before a capture, the capture."""
    options = getattr(decoder, "options", None)
    if getattr(options, "cuda_graphs", False):
        return 2 + int(getattr(options, "graph_warmup", 1))
    return 2


def decoder_weight_bytes(decoder: Decoder) -> int:
    """Device memory the decoder's weights take (0 for one without weights)."""
    weight_bytes = getattr(decoder, "weight_bytes", None)
    return weight_bytes() if callable(weight_bytes) else 0


def describe_device(device: torch.device) -> WorkerInfo:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, memory = props.name, props.total_memory
    else:
        name, memory = "cpu", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return WorkerInfo(device=str(device), device_name=name, device_memory=memory, hostname=socket.gethostname(),
                      pid=os.getpid(), cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", ""))


class ShardWorker:
    def __init__(self, device: str = "auto", scratch_dir: str | None = None, clock: StartupClock | None = None,
                 node_id: str = "", gpu_ids: tuple[str, ...] = ()):
        # `clock` holds the phases before this one (a Ray wrapper's process and imports);
        # `node_id` and `gpu_ids` say where a cluster placed this worker, for its records.
        self._clock = clock or StartupClock()
        # The compiler's modules (about 7 s on an H200 host) load on a thread of their own once
        # a compiling decoder's weights are in, over its first, eager step: not earlier, since
        # an import holds the GIL and slowed the weights' load 3-4x (docs/benchmarks.md).
        # FRAMEFARM_COMPILER_IMPORT=inline imports them only when first needed (to measure).
        self._compiler = BackgroundImport(COMPILER_MODULES, self._clock)
        self._compiler_early = os.environ.get(COMPILER_IMPORT_ENV, "background") != "inline"
        with self._clock.phase("device"):
            self.device = resolve_device(device)
            if self.device.type == "cuda":
                # Every call has the same shapes (one latent frame): let cuDNN pick its fastest algorithms.
                torch.backends.cudnn.benchmark = True
                if os.environ.get(CUDNN_LIMIT_ENV):
                    torch.backends.cudnn.benchmark_limit = int(os.environ[CUDNN_LIMIT_ENV])
                # Create the CUDA context now, where it shows as its own phase, not inside the first shard.
                torch.empty(1, device=self.device)
            self.info = dataclasses.replace(describe_device(self.device), node_id=node_id, gpu_ids=tuple(gpu_ids))
            # Probed once, at start: whether NVENC opens here does not change while the worker
            # lives, and a job asking for an encoder that cannot open is refused, not retried.
            self.nvenc = nvenc_available()
        if scratch_dir:
            os.makedirs(scratch_dir, exist_ok=True)
        # Folders of workers killed on this machine (ray.kill, a lost node's OOM killer) ran
        # no cleanup: the first worker to start after them sweeps them.
        for prefix in (SCRATCH_PREFIX, WEIGHTS_PREFIX):
            sweep_stale(prefix, scratch_dir if prefix == SCRATCH_PREFIX else None)
        self.scratch_dir = make_scratch(SCRATCH_PREFIX, scratch_dir)
        self.steps = 0  # decode steps taken, read by progress() from another thread
        self._decoders: dict[DecoderSpec, Decoder] = {}
        self._prepared: set[tuple[DecoderSpec, int, int]] = set()
        self._compile = StartupReport()  # what the last prepared decoder did about compiled code
        self._ring: list = []  # the pipeline's pinned host buffers, kept across shards
        self._withdrawn: set[tuple[str, int]] = set()  # (run key, shard) copies the driver no longer wants

    def _counted(self, chunks, task: ShardTask):
        """The decoder's chunks, counted as they come (the progress a watcher reads); stopped
        at the next step once the driver withdraws this copy."""
        for chunk in chunks:
            self._check_wanted(task)
            self.steps += 1
            yield chunk

    def withdraw(self, run_key: str, shard_index: int) -> None:
        """The driver no longer wants this worker's copy of the shard (another copy committed
        it): called from another thread, it stops the copy at its next decode step, or before
        it commits; a copy not yet started stops at once. `run_key`: the task's."""
        self._withdrawn.add((run_key, shard_index))

    def _check_wanted(self, task: ShardTask) -> None:
        if (task.run_key, task.shard.index) in self._withdrawn:
            raise ShardWithdrawn(f"shard {task.shard.index}: another copy committed it; this copy stopped")

    def _claim(self, store, task: ShardTask) -> None:
        """Take the right to commit the shard's segment, or learn that another copy has it."""
        holder = f"{self.info.hostname} pid {self.info.pid} attempt {task.attempt}"
        if not store.create_bytes(claim_key(task.segment_key, task.attempt), holder.encode()):
            raise SegmentTaken(f"shard {task.shard.index}: another copy claimed its segment first")

    def progress(self) -> int:
        """Decode steps taken since the worker started: it moves while a shard makes progress."""
        return self.steps

    def close(self) -> None:
        """Remove this worker's scratch folder; the worker is not used again."""
        shutil.rmtree(self.scratch_dir, ignore_errors=True)

    @property
    def startup(self) -> StartupReport:
        """Every start-up phase so far: the process's, then each decoder's as it was prepared."""
        return dataclasses.replace(self._compile, phases=list(self._clock.phases))

    def decoder(self, spec: DecoderSpec) -> Decoder:
        if spec not in self._decoders:
            with self._clock.phase("weights", spec.name):
                self._decoders[spec] = build_decoder(spec, self.device)
            if self._compiler_early and compiles(self._decoders[spec]):
                self._compiler.start()  # over what comes before the first compiled step
        return self._decoders[spec]

    def prepare(self, spec: DecoderSpec, latent_height: int, latent_width: int,
                compile_cache: str | None = None) -> None:
        """Everything a first shard of this decoder and frame size would otherwise pay inside it,
        each a start-up phase: the weights; for a compiling decoder, its compiled code from
        `compile_cache` (a store URI; None: none) or a compile, saved there for the next worker;
        on a GPU, or when compiling, the first decode steps (cuDNN's autotune, compiling, CUDA
        graph capture). A decoder whose compile raises is rebuilt without compiling."""
        if (spec, latent_height, latent_width) in self._prepared:
            return
        decoder = self.decoder(spec)
        report = StartupReport()
        cache = None

        def load_compiled() -> None:
            """The compiler and its cached code: needed from the first compiled step, so they are
            waited for after the stream's first, eager step, which the wait then overlaps."""
            nonlocal cache
            if not compiles(decoder):
                return
            with self._clock.phase("compiler-import-wait"):
                self._compiler.wait()
            if not compile_cache:
                return
            key = compile_cache_key(cache_facts(runtime_facts(self.device), decoder_facts(decoder),
                                                latent_height, latent_width, spec.dtype))
            # One inductor folder per worker process, set before anything here compiles.
            cache = CompileCache(compile_cache, key, os.path.join(self.scratch_dir, "inductor"))
            cache.activate()
            report.compile_cache = cache.uri
            try:
                with self._clock.phase("compile-cache-load", key):
                    cache.load()
            except Exception as exc:  # noqa: BLE001 - an unreadable cache costs a compile, not the job
                log.warning("compile cache %s unusable (%s: %s); compiling", cache.uri, type(exc).__name__, exc)

        if self.device.type == "cuda" or compiles(decoder):
            misses, hits = inductor_counts()
            try:
                self._warm_up(decoder, latent_height, latent_width, after_first_step=load_compiled)
            except Exception as exc:  # noqa: BLE001 - any compile failure; eager shows a real fault again
                if not compiles(decoder):
                    raise
                report.compile, report.compile_error = COMPILE_FAILED, f"{type(exc).__name__}: {exc}"[:2000]
                log.warning("compiling the decoder failed on %s (%s); decoding without compiling",
                            self.info.device_name, report.compile_error)
                with self._clock.phase("weights", f"{spec.name}, not compiled"):
                    decoder = self._decoders[spec] = build_decoder(spec, self.device, eager_options(decoder.options))
                self._warm_up(decoder, latent_height, latent_width)
            else:
                if compiles(decoder):
                    misses, hits = (a - b for a, b in zip(inductor_counts(), (misses, hits)))
                    report.compile = COMPILE_MISS if misses else COMPILE_HIT
                    if misses and cache is not None:
                        try:
                            with self._clock.phase("compile-cache-save", cache.key):
                                cache.save()
                        except Exception as exc:  # noqa: BLE001 - the next worker compiles again, that is all
                            log.warning("could not save the compile cache to %s (%s: %s)", cache.uri,
                                        type(exc).__name__, exc)
        self._compile = report
        self._prepared.add((spec, latent_height, latent_width))

    def _warm_up(self, decoder: Decoder, latent_height: int, latent_width: int,
                 after_first_step: Callable[[], None] | None = None) -> None:
        """Decode zeros at this frame size until the decoder runs as it will in every shard;
        `after_first_step` runs between the stream's first (eager) step and the rest."""
        steps = warm_up_steps(decoder)
        warm = torch.zeros(decoder.z_dim, steps, latent_height, latent_width, device=self.device)
        chunks = decoder.stream(warm)
        size = f"{latent_width}x{latent_height} latents"
        compiled = compiles(decoder)
        graphs = bool(getattr(getattr(decoder, "options", None), "cuda_graphs", False))
        # A phase per step, to see where a warm-up goes: the stream's first step (eager), the
        # first steady one (dynamo traces every region, inductor compiles or loads its code;
        # cuDNN autotunes), further steady steps, the CUDA graph's capture.
        for i in range(steps):
            if i == 0:
                name = "first-step"
            elif i == 1:
                name = "compile" if compiled else "warm-up"
            elif graphs and i == steps - 1:
                name = "graph-capture"
            else:
                name = "compiled-steps" if compiled else "warm-up"
            with self._clock.phase(name, f"step {i + 1} of {steps}, {size}"):
                next(chunks)
                self._sync()
            if i == 0 and after_first_step is not None:
                after_first_step()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _encoder(self, requested: str) -> str:
        """The encoder a request means here: "auto" is NVENC where it opens, else libx264, the
        same on every shard (the stitcher refuses to join segments whose codec parameters
        differ). NVENC asked for where it cannot open is bad input: no retry opens it."""
        if requested == "auto":
            return "h264_nvenc" if self.nvenc else "libx264"
        if requested == "h264_nvenc" and not self.nvenc:
            raise InputError(f"encoder h264_nvenc does not open on {self.info.hostname} "
                             f"({self.info.device_name}): this GPU has no NVENC engine or the driver "
                             "lacks it; use --encoder libx264 or auto")
        return requested

    def check_input(self, spec: DecoderSpec, latent_height: int, latent_width: int,
                    encoder: str | None = None, compile_cache: str | None = None) -> dict:
        """Refuse a frame size this device cannot decode, before any decode work or output.

        With `encoder` (an mp4 job's request), also says which encoder "auto" is here, so that
        the driver can hand every shard of the job that one encoder: workers on other kinds of
        GPU would otherwise choose differently, and the stitcher joins only identical streams.
        """
        resolved = None if encoder is None else self._encoder(encoder)  # before the model loads
        decoder = self.decoder(spec)
        height, width = latent_height * decoder.spatial_scale, latent_width * decoder.spatial_scale
        peak = decoder.peak_memory_bytes(height, width)
        # Before the warm-up decodes at this size: a frame too large is a clear refusal, not an OOM.
        check_fits(peak, self.info.device_memory, height, width, self.info.device_name,
                   weights_bytes=decoder_weight_bytes(decoder))
        self.prepare(spec, latent_height, latent_width, compile_cache)
        info = {"peak_memory_bytes": peak, "height": height, "width": width,
                "startup": self.startup.as_dict()}
        if resolved is not None:
            info["encoder"] = resolved
        return info

    def render_shard(self, task: ShardTask, latents: torch.Tensor | LatentSlice) -> SegmentRecord:
        """Decode `latents` (the shard's CTHW slice, context included) into one committed segment.

        Returns the segment's record (also written as its sidecar); the frames go to storage.
        """
        shard = task.shard
        self._withdrawn = {w for w in self._withdrawn if w[0] == task.run_key}  # older runs' are done
        self._check_wanted(task)
        shared = isinstance(latents, LatentSlice)
        if shared:
            latents = latents.tensor()
        if latents.shape[1] != shard.decoded_latent_frames:
            raise ValueError(f"shard {shard.index}: got {latents.shape[1]} latent frames, "
                             f"expected {shard.decoded_latent_frames}")
        # A worker's first shard prepares its decoder here: start-up phases, not the shard's time.
        decode, encode = task.decode, task.encode
        size = self.check_input(decode.decoder, latents.shape[2], latents.shape[3],
                                compile_cache=decode.compile_cache)
        started = time.time()
        decoder = self.decoder(decode.decoder)
        height, width = size["height"], size["width"]
        store = open_store(task.output_uri)
        # A local store gets the segment written in place, under a name of this copy's own
        # (hidden, as a partial file's) that becomes the key once claimed: copying a few
        # hundred MB after the shard would lengthen every shard.
        in_store = store.local_path(task.segment_key)
        local = (in_store and tmp_sibling(in_store, f".a{task.attempt}")) or os.path.join(self.scratch_dir, f"{task.job_id}-{shard.index:05d}-a{task.attempt}"
                                         f"{segment_suffix(encode.format)}")
        # A GPU copy is made anyway; on the CPU, copy Ray's read-only memory too, so that
        # nothing in the decode can ever write into the object store.
        latents = latents.to(self.device, copy=shared and self.device.type == "cpu")
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        # The stream first: it checks its input, and a refusal then leaves no sink open.
        if decode.context_mode == "pruned":
            # Context latents only warm the cache of the convs that need them; no frame to drop.
            chunks, drop = decoder.stream(latents, context=shard.context), 0
        else:
            chunks, drop = decoder.stream(latents), shard.drop
        encoder = self._encoder(encode.encoder) if encode.format == "mp4" else encode.encoder
        sink = open_sink(encode.format, local, width, height, encode.fps, encoder=encoder,
                         crf=encode.crf, preset=encode.preset, threads=encode.threads,
                         frames=shard.frame_count)
        pipeline_started = time.time()
        chunks = self._counted(chunks, task)
        report, result = run_pipeline(chunks, sink, drop=drop, depth=decode.ring_depth,
                                      device=self.device, ring=self._ring)
        pipeline_ended = time.time()
        try:
            if result.frames != shard.frame_count:
                raise RuntimeError(f"shard {shard.index}: wrote {result.frames} frames, "
                                   f"expected {shard.frame_count}")
            sha256 = sha256_file(result.path)
            self._check_wanted(task)
            # One copy commits: a backup copy finishing second neither replaces the first's
            # segment (its bytes may differ: another GPU's encoder) nor deletes it.
            self._claim(store, task)
            if in_store is None:
                store.put_file(result.path, task.segment_key)
            else:
                move_into_place(result.path, in_store)
        finally:
            # This copy's own file (scratch, or the in-place name not moved to the key).
            if os.path.exists(result.path):
                os.remove(result.path)
        record = SegmentRecord(
            job_id=task.job_id, shard=shard, key=task.segment_key, frames=result.frames, bytes=result.bytes,
            sha256=sha256, attempt=task.attempt, width=width, height=height, started=started,
            pipeline_started=pipeline_started, pipeline_ended=pipeline_ended, ended=time.time(),
            worker=self.info, report=report, startup=self.startup)
        # The sidecar goes last: a segment without one is not committed and is redone on resume.
        store.put_bytes(sidecar_key(task.segment_key), record.to_json())
        return record

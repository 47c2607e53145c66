"""The vocabulary the driver and the workers speak: the job spec, shards, shard tasks, latent
slices, segment keys, and the frame arithmetic under them.

Both sides import this module; it imports nothing of framefarm above `actors/` (only the
standard library, torch, numpy and pydantic), so it can never pull the driver into a worker
or a worker's heavy dependencies (PyAV, diffusers) into the planner.

Wan's VAE compresses time 4x causally: latent frame 0 decodes to one pixel frame,
every later latent frame i to four, pixel frames 4i-3 .. 4i. A shard owns the latent
range [start, stop) and is decoded from `context_start` <= start with a fresh cache; the
frames that the context latents produce are decoded and then dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

import numpy as np
import torch
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

# Torch-free, for the stitcher's process; re-exported here as part of the vocabulary.
from actors.segments import FORMATS, Format, Segment, check_format, segment_suffix, video_name  # noqa: F401
from actors.startup import StartupReport

TEMPORAL_SCALE = 4

DecoderName = Literal["wan2.1", "wan2.2-ti2v", "test-pattern"]


class InputError(ValueError):
    """Bad user input, reported before any GPU work and before anything is written."""


class ShardWithdrawn(RuntimeError):
    """The driver no longer wants this copy of a shard (another copy committed it): the
    worker stopped it and wrote nothing."""


class SegmentTaken(RuntimeError):
    """Another copy of the shard claimed its segment key first; this copy committed nothing."""


# -- frame arithmetic -------------------------------------------------------------------------


def pixel_frames(latent_frames: int) -> int:
    """Pixel frames that `latent_frames` latent frames decode to (1 + 4(T-1))."""
    if latent_frames < 1:
        raise ValueError(f"latent_frames must be >= 1, got {latent_frames}")
    return 1 + TEMPORAL_SCALE * (latent_frames - 1)


def frame_start(latent: int) -> int:
    """First pixel frame (global index) produced by latent frame `latent`."""
    return 0 if latent == 0 else TEMPORAL_SCALE * latent - (TEMPORAL_SCALE - 1)


def frame_range(start: int, stop: int) -> tuple[int, int]:
    """Global pixel frames [first, end) owned by the latent range [start, stop)."""
    if not 0 <= start < stop:
        raise ValueError(f"bad latent range [{start}, {stop})")
    return frame_start(start), frame_start(stop)


def frames_to_drop(context_start: int, start: int) -> int:
    """Leading frames a stream started at `context_start` yields before latent `start`."""
    if context_start > start:
        raise ValueError(f"context_start {context_start} is after start {start}")
    return 0 if context_start == start else pixel_frames(start - context_start)


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first latent frame the shard owns
    stop: int  # one past its last latent frame
    context_start: int  # where its decode begins (start - context, floored at 0)

    @property
    def context(self) -> int:
        return self.start - self.context_start

    @property
    def latent_frames(self) -> int:
        return self.stop - self.start

    @property
    def decoded_latent_frames(self) -> int:
        return self.stop - self.context_start

    @property
    def frames(self) -> tuple[int, int]:
        return frame_range(self.start, self.stop)

    @property
    def frame_count(self) -> int:
        first, end = self.frames
        return end - first

    @property
    def drop(self) -> int:
        return frames_to_drop(self.context_start, self.start)


# -- output names -----------------------------------------------------------------------------


def segment_key(fingerprint: str, shard: Shard, fmt: str) -> str:
    """Deterministic: the same job and shard always land on the same key (idempotent retries)."""
    return (f"segments/{fingerprint}/{shard.index:05d}_{shard.start}-{shard.stop}"
            f"_c{shard.context_start}{segment_suffix(fmt)}")


def sidecar_key(key: str) -> str:
    """Written after the segment itself: its presence marks the segment as committed."""
    return key + ".json"


def claim_key(key: str, attempt: int) -> str:
    """Created exclusively by the one copy of a shard's attempt that may commit its segment:
    with a backup copy (same attempt) running, the first to finish claims the key and the
    other commits nothing. A retry is a new attempt: a claim its lost predecessor left does
    not block it."""
    return f"{key}.a{attempt}{CLAIM_SUFFIX}"


CLAIM_SUFFIX = ".claim"


# -- the job spec -----------------------------------------------------------------------------


class DecoderSpec(BaseModel):
    """Which decoder a worker builds; workers cache one per distinct spec."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: DecoderName = Field("wan2.1", description="Wan 2.1 VAE (of Wan2.2 T2V/I2V A14B), the TI2V-5B VAE, "
                                                   "or the test pattern")
    weights: str | None = Field(None, json_schema_extra={"metavar": "DIR|URI"}, description="diffusers-format VAE folder (config.json + safetensors): "
                                                  "local path or s3:// URI; default: none")
    random_weights: bool = Field(False, description="the real architecture with random weights (benchmarks)")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="decoder precision")
    seed: int = Field(0, description="seed of the random weights")
    # Compiled and eager decoding give the same frames to within rounding; a short job on a
    # worker without the compile cache may finish sooner eagerly than compiling (~23 s on an H200).
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the decoder's glue: auto (on CUDA: yes, with CUDA graphs; "
        "elsewhere: no), on, or off")

    @model_validator(mode="after")
    def _weights_given_once(self):
        if self.name == "test-pattern":
            if self.weights or self.random_weights:
                raise ValueError("decoder 'test-pattern' takes no weights: drop weights / random_weights")
        elif bool(self.weights) == self.random_weights:
            raise ValueError(f"decoder {self.name!r} needs exactly one of weights (a diffusers-format "
                             "VAE folder: path or s3:// URI) or random_weights=True")
        return self


class RenderSpec(BaseModel):
    """Everything that defines a render job. Fields are the CLI's long options."""

    model_config = ConfigDict(extra="forbid")

    latents: str | None = Field(None, description="latents file: local path or s3:// URI")
    output: str = Field(..., description="output folder: local path or s3://bucket/prefix")
    # Required: a default would let a notebook render a test pattern from real latents
    # without a word (the test-pattern decoder also takes 16 channels).
    decoder: DecoderSpec = Field(..., description="which decoder the workers build")
    # Names: a shard's `context` is the latents it decodes before its own; the decoder's
    # `receptive_field` is how many it needs for exact frames ("exact" picks that many).
    context: Literal["exact"] | int = Field(
        "exact", validation_alias=AliasChoices("context", "overlap"), json_schema_extra={"cli_aliases": ["--overlap"]},
        description="latent frames each shard decodes before its own (left context): 'exact' (the decoder's "
                    "receptive field) or N (faster, approximate: frames near shard starts differ); "
                    "--overlap is the deprecated name")
    # "pruned" runs each context latent only through the stages that still need it (same
    # frames, a fraction of the work); "full" decodes them whole (Wan only).
    context_mode: Literal["pruned", "full"] = Field(
        "pruned", description="decode context latents only through the decoder stages that need them "
                              "(same frames, less work), or in full")
    workers: int | None = Field(None, ge=1, description="decode actors; default: one per GPU (2 without GPUs)")
    shard_latents: int | None = Field(
        None, ge=1, validation_alias=AliasChoices("shard_latents", "shard_frames"),
        json_schema_extra={"cli_aliases": ["--shard-frames"]},
        description="latent frames each shard keeps (4 video frames each); default: one balanced shard per "
                    "worker; --shard-frames is the deprecated name")
    format: Format = Field("mp4", description="H.264 MP4, lossless FFV1 MKV (RGB exact), or PNG frames")
    fps: int | None = Field(None, ge=1, le=240, description="frame rate; default: the model's native rate "
                                                            "(16; 24 for wan2.2-ti2v)")
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="'cuda' asks Ray for a GPU per worker and waits for one (see --startup-timeout); "
                            "'auto' decodes on CPUs when the cluster has no GPU")
    encoder: Literal["auto", "libx264", "h264_nvenc"] = Field(
        "auto", description="H.264 encoder; 'auto' is NVENC where the GPU has it")
    crf: int = Field(18, ge=0, le=51, description="H.264 quality (lower is better, larger)")
    preset: str = Field("veryfast", description="libx264 preset")
    encoder_threads: int = Field(0, ge=0, description="libx264 threads; 0 lets it choose by core count")
    ring_depth: int = Field(2, ge=1, le=16, description="pinned host buffers in the frame pipeline's ring")
    max_attempts: int = Field(3, ge=1, description="tries per shard before the job fails")
    stall_s: float = Field(300.0, gt=0, description="seconds a running shard may go without a decode step "
                                                    "before it is abandoned, re-run elsewhere and its worker "
                                                    "replaced (a first step includes loading and compiling)")
    backups: bool = Field(True, description="when workers fall idle at the end of a job, run a backup copy of "
                                            "the slowest running shard on one; the first copy to commit wins")
    keep_segments: bool = Field(False, description="keep shard segments after the video is committed")
    overwrite: bool = Field(False, description="replace the render of another job already in OUTPUT "
                                               "(default: refuse; the same job again is already rendered)")
    price_per_gpu_hour: float = Field(3.36, ge=0, description="for the cost estimate (G7e on demand)")
    compile_cache: str | None = Field(
        None, description="where workers keep compiled decoder code: s3://... or a folder; default "
        "s3://BUCKET/PREFIX/framefarm-cache/compile for outputs under s3://BUCKET/PREFIX/..., "
        "~/.cache/framefarm/compile for local ones; 'off': every worker compiles")

    @field_validator("context", mode="before")
    @classmethod
    def _context(cls, v):
        if isinstance(v, str) and v != "exact":
            try:
                v = int(v)
            except ValueError:
                raise ValueError("context must be 'exact' or a number of latent frames") from None
        if isinstance(v, int) and v < 1:
            raise ValueError("context must be >= 1 latent frame (a stream's first latent decodes "
                             "to one frame, not four)")
        return v

    @model_validator(mode="after")
    def _native_fps(self):
        if self.fps is None:
            self.fps = 24 if self.decoder.name == "wan2.2-ti2v" else 16
        return self

    def fingerprint(self, latents_digest: str) -> str:
        """What makes two runs' segments interchangeable (for resuming a job)."""
        keep = self.model_dump(include={"decoder", "context", "context_mode", "shard_latents", "format", "fps",
                                        "encoder", "crf", "preset"})
        blob = json.dumps({"spec": keep, "latents": latents_digest}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- driver -> worker -------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodeSpec:
    """How a worker encodes its segment: the output part of a RenderSpec."""

    format: str
    fps: int
    encoder: str  # "auto" is resolved by the driver before the first shard (one encoder a job)
    crf: int
    preset: str
    threads: int  # 0: the encoder chooses by core count


@dataclass(frozen=True)
class DecodeSpec:
    """How a worker turns latents into frames: the decode part of a RenderSpec (`decoder` is
    which model; the rest, how its stream runs)."""

    decoder: DecoderSpec
    context_mode: str  # "pruned" or "full"
    ring_depth: int  # pinned host buffers in the frame pipeline's ring
    compile_cache: str | None = None  # where compiled decoder code is kept (a store URI); None: nowhere


@dataclass(frozen=True)
class ShardTask:
    """One shard of one job, as the driver hands it to a worker."""

    job_id: str  # the job's fingerprint
    shard: Shard
    output_uri: str  # the job's output prefix; the segment goes under `segment_key` there
    segment_key: str
    decode: DecodeSpec
    encode: EncodeSpec
    attempt: int = 1
    run_id: str = ""  # one run of the job (a driver's): withdrawals name it, not the job

    @property
    def decoder(self) -> DecoderSpec:
        return self.decode.decoder

    @property
    def run_key(self) -> str:
        """What a withdrawal of this copy names: a rerun of the same job (same fingerprint, on
        the same warm workers) must not meet the marks of an earlier run's losing copies."""
        return run_key(self.job_id, self.run_id)


def run_key(job_id: str, run_id: str) -> str:
    return f"{job_id}/{run_id}"


def shard_task(spec: RenderSpec, job_id: str, shard: Shard, *, encoder: str | None = None,
               compile_cache: str | None = None, attempt: int = 1, run_id: str = "") -> ShardTask:
    """The one place a job's spec becomes a worker's task. `encoder`: what "auto" resolved to."""
    decode = DecodeSpec(spec.decoder, spec.context_mode, spec.ring_depth, compile_cache)
    encode = EncodeSpec(spec.format, spec.fps, encoder or spec.encoder, spec.crf, spec.preset, spec.encoder_threads)
    return ShardTask(job_id, shard, spec.output, segment_key(job_id, shard, spec.format), decode, encode, attempt,
                     run_id)


@dataclass(frozen=True)
class LatentSlice:
    """A shard's latents in the form Ray moves cheaply: a numpy array of their bytes.

    Ray keeps numpy arrays out of band and gives a worker on the same node a zero-copy view,
    where a torch tensor is pickled: on the 2-core CI machine a 117 MB slice took 0.2-0.3 s
    to put and as long again to get, against 0.02-0.06 s and 0.005 s as numpy. Bytes plus
    the torch dtype, because bf16 has no numpy dtype.
    """

    data: np.ndarray  # uint8: the tensor's memory, its last dimension times the element size
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, latents: torch.Tensor) -> LatentSlice:
        t = latents.detach().to("cpu").contiguous()
        return cls(t.view(torch.uint8).numpy(), str(t.dtype).removeprefix("torch."), tuple(t.shape))

    def tensor(self) -> torch.Tensor:
        """The latents, sharing the array's memory: read-only when Ray delivered it."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            raw = torch.from_numpy(self.data)
        return raw.view(getattr(torch, self.dtype)).reshape(self.shape)


# -- worker -> driver -------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerInfo:
    """Where a worker runs: its device, host and process (and, under Ray, node and GPU ids)."""

    device: str
    device_name: str
    device_memory: int  # bytes
    hostname: str
    pid: int
    cuda_visible_devices: str = ""
    node_id: str = ""
    gpu_ids: tuple[str, ...] = ()

    @property
    def track(self) -> str:
        """One name per worker process, for timelines and start-up reports."""
        return f"{self.hostname} gpu {','.join(self.gpu_ids) or self.device} (pid {self.pid})"


# A pipelined shard whose GPU was busy this share of its wall time was paced by the GPU; the
# rest is the pipeline's fill and drain (the first chunk's decode, the last one's copy).
GPU_PACED_SHARE = 0.9


@dataclass
class PipelineReport:
    """What the frame pipeline measured over one shard (seconds, bytes, counts)."""

    mode: str  # "async", or "sync" for depth 0
    frames: int = 0
    chunks: int = 0
    wall_s: float = 0.0
    gpu_busy_s: float = 0.0  # decoder + frame conversion, by CUDA events (wall time on CPU)
    gpu_span_s: float = 0.0  # from the first chunk's start to the last chunk's end
    copy_s: float = 0.0  # device-to-host copies, by CUDA events
    host_busy_s: float = 0.0  # inside sink.write
    flush_s: float = 0.0  # the sink's final flush and commit, apart from the rest
    wait_for_buffer_s: float = 0.0  # decode loop blocked on a free host buffer
    buffer_waits: int = 0  # chunks that found the ring full (backpressure from the host)
    host_idle_s: float = 0.0  # host thread waiting for a chunk
    peak_gpu_bytes: int = 0
    # Decode steps' own times (ms: p50, p90, max): a uniformly slower step and a few slow
    # ones (a recompile, a capture) have different causes, and the sum alone hides which.
    step_ms: dict = field(default_factory=dict)
    # The process the decode loop ran in: the cores it may use and torch's CPU threads (a
    # Ray actor gets OMP_NUM_THREADS from its num_cpus), to compare a shard across hosts.
    cores: int = 0
    torch_threads: int = 0
    sink: dict = field(default_factory=dict)

    @property
    def gpu_utilization(self) -> float:
        return self.gpu_busy_s / self.gpu_span_s if self.gpu_span_s > 0 else 0.0

    @property
    def bottleneck(self) -> str:
        """The stage that set the pace.

        In a pipeline (async) that is the GPU when it was busy for nearly all of the shard's
        wall time; otherwise something kept it waiting: the host (its writes plus the sink's
        final flush, which follows the last chunk with nothing left to overlap, and is where a
        sink whose encoders run on threads of their own shows its lag) or the copies. Done one
        after another (sync), the stages add up and the largest is named. Waits are not
        evidence: in the async mode the decode loop also waits for a free buffer when the GPU
        itself is behind, since a buffer comes back only after its copy landed.
        """
        host = self.host_busy_s + self.flush_s
        if self.mode == "async" and self.wall_s > 0:
            if self.gpu_busy_s >= GPU_PACED_SHARE * self.wall_s:
                return "gpu"
            return "host" if host >= self.copy_s else "copy"
        stages = {"gpu": self.gpu_busy_s, "copy": self.copy_s, "host": host}
        return max(stages, key=stages.get)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["gpu_utilization"] = self.gpu_utilization
        d["bottleneck"] = self.bottleneck
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PipelineReport:
        """The inverse of `as_dict` (derived values are recomputed, not read)."""
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclass(frozen=True)
class SegmentRecord:
    """What a worker reports for a committed shard, and writes beside the segment (its sidecar).

    Times are seconds since the epoch: `started` when the shard's decode began (after any
    start-up), `pipeline_started`/`pipeline_ended` around the frame pipeline, `ended` once the
    segment was in storage.
    """

    job_id: str  # the job's fingerprint
    shard: Shard
    key: str
    frames: int
    bytes: int
    sha256: str
    attempt: int
    width: int
    height: int
    started: float
    pipeline_started: float
    pipeline_ended: float
    ended: float
    worker: WorkerInfo
    report: PipelineReport
    startup: StartupReport | None = None  # the worker's start-up so far (None in old sidecars)
    reused: bool = False  # found committed by an earlier run of the job, not decoded in this one

    @property
    def segment(self) -> Segment:
        return Segment(self.shard.index, self.key, self.frames, self.bytes, self.sha256)

    @property
    def codec(self) -> str | None:
        """The encoder that actually ran (None when the sink did not say)."""
        return self.report.sink.get("codec")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(shard=asdict(self.shard), worker=asdict(self.worker), report=self.report.as_dict(),
                 startup=None if self.startup is None else self.startup.as_dict())
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SegmentRecord:
        """Raises ValueError when `d` is not a record (a damaged or foreign sidecar)."""
        try:
            worker = dict(d["worker"])
            worker["gpu_ids"] = tuple(worker.get("gpu_ids", ()))
            return cls(**{**d, "shard": Shard(**d["shard"]), "worker": WorkerInfo(**worker),
                          "report": PipelineReport.from_dict(d["report"]),
                          "startup": None if d.get("startup") is None else StartupReport.from_dict(d["startup"])})
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a segment record: {type(exc).__name__}: {exc}") from exc

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict()).encode()

    @classmethod
    def from_json(cls, data: bytes) -> SegmentRecord:
        try:
            d = json.loads(data)
        except ValueError as exc:
            raise ValueError(f"not a segment record: {exc}") from exc
        if not isinstance(d, dict):
            raise ValueError("not a segment record: not a JSON object")
        return cls.from_dict(d)

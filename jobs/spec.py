"""The render job's options: one pydantic model shared by the CLI and the notebook API."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DecoderName = Literal["wan2.1", "wan2.2-ti2v", "test-pattern"]
Format = Literal["mp4", "ffv1", "png"]


class DecoderSpec(BaseModel):
    """Which decoder a worker builds; workers cache one per distinct spec."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: DecoderName = "wan2.1"
    weights: str | None = None  # diffusers-format folder: local path or s3:// URI
    random_weights: bool = False  # the real architecture with random weights (benchmarks)
    dtype: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0

    @model_validator(mode="after")
    def _weights_given_once(self):
        if self.name == "test-pattern":
            if self.weights or self.random_weights:
                raise ValueError("decoder 'test-pattern' takes no weights (drop --weights/--random-weights)")
        elif bool(self.weights) == self.random_weights:
            raise ValueError(f"decoder {self.name!r} needs exactly one of --weights DIR|s3://... "
                             "or --random-weights")
        return self


class RenderSpec(BaseModel):
    """Everything that defines a render job. Fields are the CLI's long options."""

    model_config = ConfigDict(extra="forbid")

    latents: str | None = Field(None, description="latents file: local path or s3:// URI")
    output: str = Field(..., description="output folder: local path or s3://bucket/prefix")
    # Required: a default would let a notebook render a test pattern from real latents
    # without a word (the test-pattern decoder also takes 16 channels).
    decoder: DecoderSpec
    overlap: Literal["exact"] | int = "exact"
    # How context latents are decoded: "pruned" runs each only through the stages that still
    # need it (same frames, a fraction of the work); "full" decodes them whole (Wan only).
    context_mode: Literal["pruned", "full"] = "pruned"
    workers: int | None = Field(None, ge=1, description="decode actors; default one per GPU (2 on CPU)")
    shard_frames: int | None = Field(None, ge=1, description="kept latent frames per shard")
    format: Format = "mp4"
    # Default: the decoder's model's native rate, 16 for Wan 2.1, 24 for Wan 2.2 TI2V-5B.
    fps: int | None = Field(None, ge=1, le=240)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    encoder: Literal["auto", "libx264", "h264_nvenc"] = "auto"
    crf: int = Field(18, ge=0, le=51)
    preset: str = "veryfast"
    encoder_threads: int = Field(0, ge=0, description="libx264 threads; 0 lets it choose by core count")
    pipeline: Literal["async", "sync"] = "async"
    depth: int = Field(2, ge=1, le=16)
    max_attempts: int = Field(3, ge=1)
    keep_segments: bool = Field(False, description="keep shard segments after the video is committed")
    price_per_gpu_hour: float = Field(3.36, ge=0, description="for the cost estimate (G7e on demand)")

    @field_validator("overlap", mode="before")
    @classmethod
    def _overlap(cls, v):
        if isinstance(v, str) and v != "exact":
            try:
                v = int(v)
            except ValueError:
                raise ValueError("overlap must be 'exact' or a number of latent frames") from None
        if isinstance(v, int) and v < 1:
            raise ValueError("overlap must be >= 1 latent frame (a stream's first latent decodes "
                             "to one frame, not four)")
        return v

    @model_validator(mode="after")
    def _native_fps(self):
        if self.fps is None:
            self.fps = 24 if self.decoder.name == "wan2.2-ti2v" else 16
        return self

    def fingerprint(self, latents_digest: str) -> str:
        """What makes two runs' segments interchangeable (for resuming a job)."""
        keep = self.model_dump(include={"decoder", "overlap", "context_mode", "shard_frames", "format", "fps", "encoder",
                                        "crf", "preset"})
        blob = json.dumps({"spec": keep, "latents": latents_digest}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

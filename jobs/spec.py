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

    name: DecoderName = Field("wan2.1", description="Wan 2.1 VAE (of Wan2.2 T2V/I2V A14B), the TI2V-5B VAE, "
                                                   "or the test pattern")
    weights: str | None = Field(None, json_schema_extra={"metavar": "DIR|URI"}, description="diffusers-format VAE folder (config.json + safetensors): "
                                                  "local path or s3:// URI; default: none")
    random_weights: bool = Field(False, description="the real architecture with random weights (benchmarks)")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="decoder precision")
    seed: int = Field(0, description="seed of the random weights")

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
    overlap: Literal["exact"] | int = Field(
        "exact", description="left context per shard: 'exact' (the decoder's receptive field) or N latent "
                             "frames (faster, approximate: frames near shard starts differ)")
    # "pruned" runs each context latent only through the stages that still need it (same
    # frames, a fraction of the work); "full" decodes them whole (Wan only).
    context_mode: Literal["pruned", "full"] = Field(
        "pruned", description="decode context latents only through the decoder stages that need them "
                              "(same frames, less work), or in full")
    workers: int | None = Field(None, ge=1, description="decode actors; default: one per GPU (2 without GPUs)")
    shard_frames: int | None = Field(None, ge=1, description="kept latent frames per shard; default: one "
                                                             "balanced shard per worker")
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
    pipeline: Literal["async", "sync"] = Field("async", description="the frame pipeline's mode")
    depth: int = Field(2, ge=1, le=16, description="pinned host buffers in the frame pipeline's ring")
    max_attempts: int = Field(3, ge=1, description="tries per shard before the job fails")
    keep_segments: bool = Field(False, description="keep shard segments after the video is committed")
    price_per_gpu_hour: float = Field(3.36, ge=0, description="for the cost estimate (G7e on demand)")
    compile_cache: str | None = Field(
        None, description="where workers keep compiled decoder code: s3://... or a folder; default "
        "s3://BUCKET/PREFIX/framefarm-cache/compile for outputs under s3://BUCKET/PREFIX/..., "
        "~/.cache/framefarm/compile for local ones; 'off': every worker compiles")

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

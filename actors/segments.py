"""A committed segment and the names of output formats: what the stitcher's process needs.

Pure (the standard library only): the stitcher's Ray process unpickles `Segment`s and
imports this module for them, and nothing heavier. When its class came from
`actors.protocol`, every job's stitcher imported torch (and, through the actor's module,
diffusers) before it could take its first segment: 7-9 s on the 2-core CI machine, about
13 s on the H200 host, longer than a warm farm's whole shard of 81 latents at 720p, so
the job waited for its stitcher after its last shard. `actors.protocol` re-exports these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Format = Literal["mp4", "ffv1", "png"]
FORMATS: tuple[str, ...] = get_args(Format)


def check_format(fmt: str) -> str:
    """`fmt` if it is a known output format ("mkv" is accepted as FFV1's container)."""
    if fmt not in FORMATS and fmt != "mkv":
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    return fmt


def segment_suffix(fmt: str) -> str:
    return {"mp4": ".mp4", "ffv1": ".mkv", "mkv": ".mkv", "png": ".tar"}[check_format(fmt)]


def video_name(fmt: str) -> str:
    return {"mp4": "video.mp4", "ffv1": "video.mkv", "mkv": "video.mkv", "png": "frames"}[check_format(fmt)]


@dataclass(frozen=True)
class Segment:
    """A committed segment file, as the stitcher verifies and joins it."""

    index: int  # the shard's
    key: str  # under the job's output prefix
    frames: int
    bytes: int
    sha256: str

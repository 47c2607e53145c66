"""Decoded chunks to the frame layouts the sinks take (their `layout` tag), on the chunk's device.

A decoder yields CFHW chunks in [-1, 1]; a sink takes uint8 frames in its `layout`:
  rgb24    [F, H, W, 3], rounded (never truncated) as Wan's pipelines do;
  yuv420p  [F, H*3/2, W], I420 planes stacked, BT.709 limited range, which is what the mp4
           sink tags its stream with. Half the bytes of RGB to copy, and no colour
           conversion left for the host.
Converting on the GPU before the device-to-host copy moves 4x (rgb24) or 8x (yuv420p) fewer
bytes than float frames would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# BT.709 (Kr 0.2126, Kb 0.0722) in limited range: Y in [16, 235], Cb/Cr in [16, 240].
_BT709_YUV = torch.tensor([
    [0.2126, 0.7152, 0.0722],
    [-0.2126 / 1.8556, -0.7152 / 1.8556, 0.5],
    [0.5, -0.7152 / 1.5748, -0.0722 / 1.5748],
])


def to_uint8_frames(chunk: torch.Tensor) -> torch.Tensor:
    """CFHW in [-1, 1] -> FHWC uint8, rounding (never truncating) as Wan's pipelines do."""
    x = chunk.float().clamp(-1.0, 1.0).add_(1.0).mul_(127.5).round_()  # out of place: the chunk may be shared
    return x.to(torch.uint8).permute(1, 2, 3, 0).contiguous()


def to_yuv420_frames(chunk: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
    """CFHW in [-1, 1] -> [F, H*3/2, W] uint8 I420 (BT.709, limited range), on the chunk's device.

    Starts from the same rounded 8-bit RGB as `to_uint8_frames`; chroma is the mean of each
    2x2 block. `matrix`: the RGB -> YCbCr matrix already on the chunk's device. Pass it in a
    loop: moving it there from pageable memory waits for the stream, which would stall a
    pipelined decode.
    """
    _, f, h, w = chunk.shape
    rgb = to_uint8_frames(chunk).float().div_(255.0)  # FHWC in [0, 1]
    if matrix is None:
        matrix = _BT709_YUV.to(rgb.device)
    yuv = rgb @ matrix.T  # FHW3: Y in [0, 1], Cb/Cr in [-0.5, 0.5]
    y = yuv[..., 0].mul(219.0).add_(16.0)
    chroma = torch.nn.functional.avg_pool2d(yuv[..., 1:].permute(0, 3, 1, 2), 2)  # F,2,H/2,W/2
    chroma = chroma.mul_(224.0).add_(128.0)
    out = torch.empty((f, h * 3 // 2, w), dtype=torch.uint8, device=chunk.device)
    flat = out.view(f, -1)  # I420: the Y plane, then U, then V, each row-major
    flat[:, : h * w] = y.round_().clamp_(0, 255).to(torch.uint8).reshape(f, -1)
    flat[:, h * w :] = chroma.round_().clamp_(0, 255).to(torch.uint8).reshape(f, -1)
    return out


def frame_converter(layout: str, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The conversion that hands a sink frames in its `layout`, run where the chunk is."""
    if layout == "yuv420p":
        matrix = _BT709_YUV.to(device)  # once per run, before the first step is queued
        return lambda chunk: to_yuv420_frames(chunk, matrix)
    if layout == "rgb24":
        return to_uint8_frames
    raise ValueError(f"unknown frame layout {layout!r}")

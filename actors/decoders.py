"""The decoder interface, and the test-pattern decoder that proves frames exact.

A decoder turns a range of normalized latents into pixel frames, one latent frame per
step, in order, starting from a fresh causal cache. It knows nothing of Ray, streams or
sinks: the frame pipeline decides where its steps run and where the frames go.

Shapes: latents are CTHW (channels, latent frames, latent height, latent width) as the
Wan pipeline's transformer leaves them; a decoded chunk is CFHW, 3 channels, F pixel
frames (1 for a stream's first latent, 4 for every later one), values in [-1, 1].
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Protocol

import torch

from actors.protocol import frame_start


class Decoder(Protocol):
    name: str
    z_dim: int  # latent channels
    spatial_scale: int  # pixels per latent pixel along each side
    receptive_field: int  # latent frames of left context that make a shard exact
    device: torch.device
    dtype: torch.dtype

    def stream(self, latents: torch.Tensor, context: int = 0) -> Iterator[torch.Tensor]:
        """Decode CTHW latents with a fresh cache; yield CFHW chunks on `device`, in order.

        The first `context` latents are left context only: they warm the cache and yield
        nothing; the chunks after them are those of a stream over all of `latents`.
        """
        ...

    def peak_memory_bytes(self, height: int, width: int) -> int:
        """Estimated peak device memory of one stream at this pixel size."""
        ...


# ---------------------------------------------------------------------------------------
# Test pattern
#
# Each frame carries its global index as a grid of black and white blocks, big enough to
# survive H.264 at any sane quality, so tests can read back which frames a video holds.
# Where the latent's index comes from: synthetic test latents carry it in channel 0
# (`pattern_latents`). The background is a causal mix of channel 1 over the last
# `receptive_field` latents, so a shard decoded with too little context gets a different
# colour: the pattern has the same kind of temporal dependency as Wan's decoder.

INDEX_BITS = 24
GRID_COLUMNS = 8
GRID_ROWS = INDEX_BITS // GRID_COLUMNS
MIN_BLOCK = 8  # pixels: smallest block that reads back after yuv420p + crf 30


class TestPatternDecoder:
    __test__ = False  # not a pytest class, despite the name
    name = "test-pattern"
    spatial_scale = 8

    def __init__(self, z_dim: int = 16, receptive_field: int = 3, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        if receptive_field < 1:
            raise ValueError("receptive_field must be >= 1")
        self.z_dim = z_dim
        self.receptive_field = receptive_field
        self.device = torch.device(device)
        self.dtype = dtype

    def peak_memory_bytes(self, height: int, width: int) -> int:
        return 8 * 3 * height * width * 4

    def stream(self, latents: torch.Tensor, context: int = 0) -> Iterator[torch.Tensor]:
        _, t, h, w = latents.shape
        height, width = h * self.spatial_scale, w * self.spatial_scale
        history: deque[float] = deque(maxlen=self.receptive_field)  # the causal cache
        for i in range(t):
            frame = latents[:, i].to(self.device, torch.float32)
            latent_index = int(round(frame[0].mean().item()))
            history.append(frame[1].mean().item())
            # Missing history (before the stream began) counts as zero, as Wan pads with zeros.
            tint = sum(history) / self.receptive_field
            if i < context:
                continue
            if i == 0:
                # A stream's first latent decodes to one frame, as in Wan.
                indices = [frame_start(latent_index) + (3 if latent_index > 0 else 0)]
            else:
                first = frame_start(latent_index)
                indices = list(range(first, first + 4))
            yield torch.stack(
                [draw_index_frame(f, height, width, tint, self.device) for f in indices], dim=1
            ).to(self.dtype)


def _block_size(height: int, width: int) -> int:
    block = min(height // (GRID_ROWS + 1), width // (GRID_COLUMNS + 1))
    if block < MIN_BLOCK:
        raise ValueError(f"{width}x{height} is too small for the test pattern")
    return block


def draw_index_frame(index: int, height: int, width: int, tint: float, device) -> torch.Tensor:
    """One CHW frame in [-1, 1]: `index` as a block grid over a tinted background."""
    block = _block_size(height, width)
    background = torch.tensor(
        [torch.tanh(torch.tensor(tint)).item(), 0.5 * torch.tanh(torch.tensor(2 * tint)).item(), -0.25],
        device=device,
    )
    frame = background.view(3, 1, 1).expand(3, height, width).clone()
    for bit in range(INDEX_BITS):
        row, col = divmod(bit, GRID_COLUMNS)
        value = 1.0 if (index >> bit) & 1 else -1.0
        y, x = row * block, col * block
        frame[:, y : y + block, x : x + block] = value
    return frame


def read_index(frame_hwc) -> int:
    """The index drawn into an HWC uint8 frame, read from the centre of each block."""
    height, width = frame_hwc.shape[:2]
    block = _block_size(height, width)
    index = 0
    for bit in range(INDEX_BITS):
        row, col = divmod(bit, GRID_COLUMNS)
        y, x = row * block + block // 2, col * block + block // 2
        q = max(1, block // 4)
        patch = frame_hwc[y - q : y + q, x - q : x + q]
        if float(patch.mean()) > 127.5:
            index |= 1 << bit
    return index


def pattern_latents(latent_frames: int, height: int, width: int, z_dim: int = 16,
                         seed: int = 0) -> torch.Tensor:
    """Synthetic CTHW latents for the test-pattern decoder: channel 0 holds each latent's index."""
    g = torch.Generator().manual_seed(seed)
    h, w = height // TestPatternDecoder.spatial_scale, width // TestPatternDecoder.spatial_scale
    latents = torch.randn(z_dim, latent_frames, h, w, generator=g)
    latents[0] = torch.arange(latent_frames, dtype=torch.float32).view(-1, 1, 1)
    return latents

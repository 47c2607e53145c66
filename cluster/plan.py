"""Shard planning: pure functions, no Ray, no CUDA.

The frame arithmetic and `Shard` itself are vocabulary both sides speak: `actors.protocol`.
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.protocol import Shard, pixel_frames

@dataclass(frozen=True)
class ShardPlan:
    latent_frames: int
    context: int
    shards: tuple[Shard, ...]
    # Decode work of one full context, in steady latent frames' worth: `context` when every
    # context latent is decoded in full, much less when only the stages that need it run.
    context_cost: float | None = None

    @property
    def frame_count(self) -> int:
        return pixel_frames(self.latent_frames)

    @property
    def decoded_latent_frames(self) -> int:
        return sum(s.decoded_latent_frames for s in self.shards)

    @property
    def overhead(self) -> float:
        """Context latent frames decoded per kept latent frame (0.0 means no waste)."""
        return (self.decoded_latent_frames - self.latent_frames) / self.latent_frames

    @property
    def compute_overhead(self) -> float:
        """Decode work spent on context per unit of kept work (equals `overhead` unpruned)."""
        cost = self.context if self.context_cost is None else self.context_cost
        return sum(s.context / self.context * cost for s in self.shards) / self.latent_frames


def plan_shards(
    latent_frames: int,
    workers: int,
    context: int,
    shard_latents: int | None = None,
    context_cost: float | None = None,
) -> ShardPlan:
    """Split [0, latent_frames) into contiguous shards, each with `context` latents of left context.

    Without `shard_latents`, makes one shard a worker, sized so that the work each decodes
    (kept plus context latents) is balanced: the first shard has no context to pay for, so
    it is given more kept frames. With `shard_latents`, cuts shards of that many kept latents
    (the last one shorter), which a driver schedules dynamically. `context_cost` is what a
    full context costs to decode, in latent frames' worth (default: `context`); balancing
    uses it, so pruned context gives later shards nearly as many kept frames as the first.
    """
    if latent_frames < 1:
        raise ValueError(f"latent_frames must be >= 1, got {latent_frames}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if context < 1:
        # A stream's first latent frame decodes to one frame, not four, so a shard that
        # starts after latent 0 needs at least one latent of context to own 4 frames each.
        raise ValueError(f"context must be >= 1 latent frame, got {context}")
    if shard_latents is not None:
        if shard_latents < 1:
            raise ValueError(f"shard_latents must be >= 1, got {shard_latents}")
        bounds = list(range(0, latent_frames, shard_latents)) + [latent_frames]
    else:
        bounds = _balanced_bounds(latent_frames, workers, context if context_cost is None else context_cost)
    shards = tuple(
        Shard(index=i, start=a, stop=b, context_start=max(0, a - context))
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))
    )
    return ShardPlan(latent_frames=latent_frames, context=context, shards=shards, context_cost=context_cost)


def _balanced_bounds(latent_frames: int, workers: int, context: float) -> list[int]:
    """Cut points so each shard decodes about the same number of latent frames.

    Shard 0 decodes only what it keeps; every later shard also decodes up to `context`
    extra. With n shards of equal decode work W: W*n = T + (n-1)*context, so shard 0 keeps W
    and the others W - context each (when the context is shorter than the video).
    """
    n = min(workers, latent_frames)
    while n > 1:
        work = (latent_frames + (n - 1) * context) / n
        if work - context >= 1:
            break
        n -= 1  # context dominates: fewer shards waste less
    if n == 1:
        return [0, latent_frames]
    work = (latent_frames + (n - 1) * context) / n
    bounds = [0]
    for i in range(1, n):
        bounds.append(round(work + (i - 1) * (work - context)))
    bounds.append(latent_frames)
    # Rounding can only collapse a shard when each keeps about one frame; drop duplicates.
    return sorted(set(bounds))

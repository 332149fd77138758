"""The epoch plan: which HR patches exist in an epoch and how they form video batches.

Spec sections 1-2.  Images in sorted name order; each is cut into
non-overlapping ``patch_size`` squares, left-to-right then top-to-bottom, on a
grid shifted by a per-image, per-epoch random offset in
``[0, W mod P] x [0, H mod P]``.  Consecutive patches form video batches of
``video_batch_size``; the first batch of each epoch has a random size in
``first_batch_range`` so key frames move between epochs.  The plan depends only
on (image sizes, config, run seed, epoch): every server and client computes the
same plan without talking to each other.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import torch

from .config import DegradationConfig
from .images import ImageInfo
from .seeding import make_generator


@dataclass(frozen=True)
class PatchRef:
    """One HR patch: its source image and top-left corner."""

    image: str
    x: int
    y: int


@dataclass(frozen=True)
class EpochPlan:
    seed: int
    epoch: int
    patches: tuple[PatchRef, ...]
    batch_starts: tuple[int, ...]  # start offset of each video batch, then len(patches)

    @property
    def num_patches(self) -> int:
        return len(self.patches)

    @property
    def num_batches(self) -> int:
        return len(self.batch_starts) - 1

    def batch(self, index: int) -> tuple[PatchRef, ...]:
        if not 0 <= index < self.num_batches:
            raise IndexError(f"video batch {index} out of range [0, {self.num_batches})")
        return self.patches[self.batch_starts[index]:self.batch_starts[index + 1]]

    def batch_of_patch(self, patch_index: int) -> int:
        return bisect.bisect_right(self.batch_starts, patch_index) - 1


def make_epoch_plan(images: Sequence[ImageInfo], cfg: DegradationConfig, seed: int, epoch: int) -> EpochPlan:
    """Compute the plan of ``epoch`` (see module doc). Pure and cheap."""
    if seed < 0 or epoch < 0:
        raise ValueError("seed and epoch must be non-negative integers")
    p = cfg.patch_size
    gen = make_generator(seed, epoch, "plan")
    patches: list[PatchRef] = []
    for info in sorted(images, key=lambda i: i.name):
        # one draw pair per image, in image order, whatever its size
        u = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
        ox = min(int(u[0] * (info.width % p + 1)), info.width % p)
        oy = min(int(u[1] * (info.height % p + 1)), info.height % p)
        for row in range(info.height // p):
            for col in range(info.width // p):
                patches.append(PatchRef(info.name, ox + col * p, oy + row * p))
    lo, hi = cfg.first_batch_range
    first = lo + int(torch.randint(0, hi - lo + 1, (1,), generator=gen).item())
    starts = [0]
    size = first
    while starts[-1] < len(patches):
        starts.append(min(starts[-1] + size, len(patches)))
        size = cfg.video_batch_size
    return EpochPlan(seed, epoch, tuple(patches), tuple(starts))

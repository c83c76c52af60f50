"""Streaming moments: count, mean and M2 per channel in float64, merged exactly.

Merging uses the parallel-axis formula of Chan, Golub & LeVeque (1979), so batches,
devices and processes combine in any order and give the same result as one pass over
the concatenated data (up to float64 rounding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor


@dataclass(frozen=True)
class Moments:
    """Count, mean and sum of squared deviations (M2), elementwise over any shape.

    Shapes: all three tensors share one shape, e.g. [C] per channel or [B, C] per batch.
    """

    count: Tensor
    mean: Tensor
    m2: Tensor

    @classmethod
    def of(cls, x: Tensor, *, compiled: bool = False) -> Moments:
        """Per-channel moments of `x` [N, C, ...] (every axis but 1 reduced) -> [C], no host sync.

        `compiled=True` runs `channel_moments` fused into one pass by `torch.compile` (see there).
        """
        x = x.detach()
        mean, m2 = (fused(channel_moments) if compiled else channel_moments)(x)
        return cls(torch.full_like(mean, x.numel() // x.shape[1]), mean, m2)

    @classmethod
    def stack(cls, parts: list[Moments]) -> Moments:
        """Stack along a new leading axis: [k, *shape]."""
        return cls(*(torch.stack([getattr(p, f) for p in parts]) for f in ("count", "mean", "m2")))

    def merge(self, other: Moments) -> Moments:
        """The moments of both data sets together (exact)."""
        return Moments.stack([self, other]).reduce(0)

    def reduce(self, dim: int | tuple[int, ...] = 0) -> Moments:
        """Merge the entries along `dim`, e.g. [B, C] -> [C] over batches, [C] -> [] over channels."""
        count = self.count.sum(dim, keepdim=True)
        mean = (self.count * self.mean).sum(dim, keepdim=True) / count
        m2 = self.m2.sum(dim, keepdim=True) + (self.count * (self.mean - mean) ** 2).sum(dim, keepdim=True)
        return Moments(count.squeeze(dim), mean.squeeze(dim), m2.squeeze(dim))

    def resample(self, weights: Tensor) -> Moments:
        """Merge along dim 0 with entry b repeated weights[r, b] times: [B, *s] -> [R, *s].

        With multinomial counts as weights this is a bootstrap over the entries (e.g. batches)
        that needs no second pass over the data.
        """
        w = weights.to(self.mean).view(*weights.shape, *(1,) * (self.mean.ndim - 1))
        count = (w * self.count).sum(1)
        mean = (w * self.count * self.mean).sum(1) / count
        m2 = (w * (self.m2 + self.count * (self.mean - mean.unsqueeze(1)) ** 2)).sum(1)
        return Moments(count, mean, m2)

    def var(self, correction: int = 1) -> Tensor:
        return self.m2 / (self.count - correction)

    def std(self, correction: int = 1) -> Tensor:
        """Standard deviation; correction=1 matches `torch.std`'s default."""
        return self.var(correction).sqrt()

    def rms(self) -> Tensor:
        """Root mean square, sqrt(E[x^2])."""
        return (self.m2 / self.count + self.mean**2).sqrt()

    def to(self, device: torch.device | str) -> Moments:
        return Moments(self.count.to(device), self.mean.to(device), self.m2.to(device))


def channel_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and M2 per channel of `x` [N, C, ...] in float64: one shifted pass of plain sums.

    Plain sums run several times faster than `torch.var_mean` on a CPU. Subtracting one
    image's channel means first keeps them well conditioned; each image's share is summed in
    float32 and the images are added in float64, so the error stays near float32's rounding
    of one image's sum, and does not depend on how images are split into batches. A
    channels_last tensor is reduced along its memory order ([N, H*W, C]), which avoids strided
    reductions that cost several times more.
    """
    if x.dtype in (torch.float16, torch.bfloat16):  # autocast outputs: reduce in float32
        x = x.float()
    n, c = x.shape[:2]
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        v, axis = x.permute(0, 2, 3, 1).reshape(n, -1, c), 1  # [N, H*W, C], a view
    else:
        v, axis = x.reshape(n, c, -1), 2  # [N, C, H*W], a view when contiguous
    shift = v[0].mean(axis - 1, keepdim=True)  # image 0's channel means
    d = v - shift
    count = n * v.shape[axis]
    total = d.sum(axis).double().sum(0)
    squares = d.square_().sum(axis).double().sum(0)
    return shift.flatten().double() + total / count, squares - total.square() / count


@cache
def fused(fn: Callable) -> Callable:
    """`fn` through `torch.compile`, made once per function. For the reductions here, the
    elementwise steps and the sums fuse into one read of each activation (eagerly, several
    passes). Needs a C++ compiler on a CPU, Triton on a GPU; the first call per memory layout
    compiles (seconds), later calls reuse the kernel whatever the shapes."""
    return torch.compile(fn, dynamic=True)

"""Streaming moments: count, mean and M2 per channel in float64, merged exactly.

Merging uses the parallel-axis formula of Chan, Golub & LeVeque (1979), so batches,
devices and processes combine in any order and give the same result as one pass over
the concatenated data (up to float64 rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    def of(cls, x: Tensor, dims: tuple[int, ...] = (0, 2, 3)) -> Moments:
        """Moments of `x` reduced over `dims` ([N, C, H, W] -> [C] by default), no host sync."""
        x = x.detach()
        if x.dtype in (torch.float16, torch.bfloat16):  # autocast outputs: reduce in float32
            x = x.float()
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        n = x.numel() // mean.numel()
        mean = mean.double()
        return cls(torch.full_like(mean, n), mean, var.double() * n)

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

"""Several processes, one measurement: probing and training under `torchrun`.

`torchrun --nproc_per_node=N [--nnodes=M ...] -m layer_probe responses ...` starts N*M copies of
the command; `process_group` joins them (NCCL on GPUs, gloo on CPUs). Each process probes its
own contiguous share of the batches; `Processes.merge` then combines the per-channel moments
exactly with `all_reduce` (the parallel-axis merge of `stats.Moments`, with processes in place
of batches), gathers the per-image ||F(x)||/||x|| and sums the top-1 counts, so every process
holds the result of one pass over all images. Rank 0 alone prints and writes.

Shares are cut at whole batches rather than drawn with a DistributedSampler, which pads the
last shard with repeated images (or drops images): here every image is counted exactly once,
the batches are those of a single-process run (which matters for `--bn-mode train`), and the
per-image arrays gathered in rank order are in the original image order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import LayerProbeError
from .probe import BlockNorms, PassResult, Recording
from .stats import Moments


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes started together (one process by default)."""

    rank: int = 0
    size: int = 1  # number of processes (torchrun's WORLD_SIZE)
    device: torch.device = torch.device("cpu")  # where collectives run: this process's GPU, or the CPU

    @property
    def active(self) -> bool:
        """True when there are other processes to combine with."""
        return self.size > 1

    @property
    def main(self) -> bool:
        """True for the one process that prints and writes files (rank 0)."""
        return self.rank == 0

    def shard(self, n: int, batch_size: int = 1) -> slice:
        """This process's contiguous share of `n` items, cut at multiples of `batch_size`.

        Every item belongs to exactly one share; the last one may be smaller. Example: 59
        images in batches of 10 on 2 processes -> slice(0, 30) and slice(30, 59).
        """
        n_batches = -(-n // batch_size)
        if n_batches < self.size:
            raise LayerProbeError(f"{n} images in batches of {batch_size} make {n_batches} batch(es), fewer than "
                                  f"the {self.size} processes; use a smaller --batch-size or fewer processes")
        first, last = self.rank * n_batches // self.size, (self.rank + 1) * n_batches // self.size
        return slice(first * batch_size, min(last * batch_size, n))

    def sum(self, x: Tensor) -> Tensor:
        """The sum of `x` over all processes (a new tensor; `x` itself in one process)."""
        if not self.active:
            return x
        x = x.clone()
        dist.all_reduce(x)
        return x

    def merge_moments(self, m: Moments) -> Moments:
        """The moments of all processes' data together, in every process (exact, float64).

        Two `all_reduce`s: counts and count*mean give the global mean; then each process adds
        its M2 and its count*(mean_r - mean)^2, the terms of `Moments.reduce` over processes.
        """
        if not self.active:
            return m
        count, weighted = self.sum(torch.stack([m.count, m.count * m.mean]))
        mean = weighted / count
        return Moments(count, mean, self.sum(m.m2 + m.count * (m.mean - mean) ** 2))

    def gather(self, x: Tensor) -> Tensor:
        """Concatenate every process's `x` ([k, n_rank], n_rank may differ) along dim 1 in rank order."""
        if not self.active:
            return x
        sizes = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(self.size)]
        dist.all_gather(sizes, torch.tensor(x.shape[1], device=x.device))
        sizes = [int(s) for s in sizes]
        padded = torch.nn.functional.pad(x, (0, max(sizes) - x.shape[1]))
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:, :s] for p, s in zip(parts, sizes)], dim=1)

    def merge(self, result: PassResult) -> PassResult:
        """Combine the probe passes of all processes into the pass over all their images.

        Every process gets the same result: one Moments per site (so `summarize` reads it as a
        single batch), the NaN/Inf counts summed, every block's per-image norms, the top-1 counts.
        """
        if not self.active:
            return result
        rec = result.recording
        names = [s.name for s in rec.layout.sites]
        local = [rec.moments(n) for n in names]  # one collective for all sites: concatenate, merge, split
        fields = ("count", "mean", "m2")
        merged = self.merge_moments(Moments(*(torch.cat([getattr(m, f) for m in local]) for f in fields)))
        sizes = [m.mean.numel() for m in local]
        per_site = [Moments(*parts) for parts in zip(*(getattr(merged, f).split(sizes) for f in fields))]
        nonfinite = self.sum(torch.stack([torch.stack(rec.nonfinite[n]).sum() for n in names]))
        filled = [name for name, norms in rec.blocks.items() if norms.f_norm]
        blocks = {name: BlockNorms() for name in rec.blocks}
        if filled:  # one gather for all blocks: [3 * blocks, images of this process]
            local_norms = [torch.cat(getattr(rec.blocks[b], f)) for b in filled for f in ("f_norm", "x_norm", "cosine")]
            for b, (f, x, cos) in zip(filled, self.gather(torch.stack(local_norms)).view(len(filled), 3, -1)):
                blocks[b] = BlockNorms([f], [x], [cos])
        counts = self.sum(torch.tensor([result.images, result.correct, result.labelled], device=self.device)).tolist()
        return PassResult(Recording(rec.layout, {n: [m] for n, m in zip(names, per_site)},
                                    {n: [c] for n, c in zip(names, nonfinite)}, blocks, rec.counted), *counts,
                          result.outputs)

    def wrap(self, model: nn.Module) -> nn.Module:
        """`model` inside DistributedDataParallel when there are other processes, else `model` itself."""
        if not self.active:
            return model
        gpu = [self.device] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=gpu)


@contextmanager
def process_group(device: str) -> Iterator[Processes]:
    """Join the processes that torchrun started, for the duration of the block.

    torchrun says so through RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/PORT); without
    them, or with one process, this yields a one-process `Processes` and nothing changes. On
    GPUs each process takes the GPU numbered by its LOCAL_RANK (so `cuda` means that one) and
    the processes talk through NCCL; on CPUs through gloo.

    Args:
        device: the device the command was asked to use ("cpu", "cuda", ...).
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        yield Processes(device=torch.device(device))
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    where = torch.device(device)
    if where.type == "cuda":
        where = torch.device("cuda", local_rank)
        torch.cuda.set_device(where)
    dist.init_process_group("nccl" if where.type == "cuda" else "gloo")
    try:
        yield Processes(rank, size, where)
    finally:
        dist.destroy_process_group()

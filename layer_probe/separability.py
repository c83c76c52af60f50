"""Class separability along the network: how linearly separable the classes are after each block.

Evidence for why the last layers respond more (Section 4.2's rise): if the last block, whose F(x)
is largest, is also where the classes become separable, the rise marks the block that does the
classification; if they are already separable before it, it does not. The measure is the test
top-1 of a linear classifier on the globally pooled output of each block (the residual stream after
it), fitted on one half of the images and scored on the other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .data import batches
from .probe import BNMode, Hooks, bn_statistics
from .sites import Block


def linear_probe_top1(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, classes: int,
                      ridge: float = 1e-3) -> float:
    """Top-1 (percent) on the test set of ridge regression onto one-hot labels, fitted on the training set.

    Closed form in float64 on standardised features (train mean and std), with a bias column:
    deterministic, no learning rate or epochs to tune. train_x: [N, D], train_y: [N] -> float.
    """
    mu, sd = train_x.double().mean(0), train_x.double().std(0).clamp_min(1e-12)
    a, b = ((train_x.double() - mu) / sd), ((test_x.double() - mu) / sd)
    a, b = (torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1) for z in (a, b))
    targets = torch.nn.functional.one_hot(train_y.long(), classes).double()
    weights = torch.linalg.solve(a.T @ a + ridge * len(a) * torch.eye(a.shape[1], dtype=a.dtype), a.T @ targets)
    return 100.0 * float(((b @ weights).argmax(1) == test_y).double().mean())


def separability(model: nn.Module, blocks: Sequence[Block], images: Tensor, labels: Tensor,
                 mean: tuple[float, ...], std: tuple[float, ...], *, classes: int = 10, batch_size: int = 500,
                 bn_mode: BNMode = "eval") -> list[float]:
    """Per block, the held-out top-1 of a linear probe on its pooled output (see the module docstring).

    The first half of `images` (uint8 [N, 32, 32, 3], in a class-mixed order) fits the probe, the second
    half scores it; the model is left as it was.
    """
    pooled: dict[str, list[Tensor]] = {b.name: [] for b in blocks}
    modules = dict(model.named_modules())

    def keep(name: str):  # noqa: ANN202 - a forward hook
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            if isinstance(out, Tensor) and out.dim() == 4:  # [N, C, H, W]; other outputs give NaN
                pooled[name].append(out.detach().float().mean((2, 3)).cpu())
        return hook

    with Hooks() as hooks, bn_statistics(model, bn_mode), torch.inference_mode():
        for b in blocks:
            hooks.add(modules[b.name], keep(b.name))
        for x, _ in batches(images, labels, batch_size, mean, std):
            model(x)
    half = len(labels) // 2
    y = labels.cpu()
    return [linear_probe_top1(f[:half], y[:half], f[half:], y[half:], classes) if len(f) == len(y) else float("nan")
            for f in (torch.cat(pooled[b.name]) if pooled[b.name] else torch.empty(0) for b in blocks)]

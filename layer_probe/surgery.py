"""Changing what a network computes, block by block: lesions and identity insertion.

- `lesion(model, block)`: delete one block for the duration of a `with` (a residual block keeps
  its shortcut and F(x) := 0; a plain block is bypassed, output := input, where shapes allow).
  Done with hooks, so the model's parameters are never touched.
- `lesion_deltas(model, blocks, ...)`: the top-1 change when each block is deleted in turn.
- `deepen(model, extra)`: the paper's construction argument (Section 3.1): a deeper network
  built from a trained shallower one plus identity layers computes the same function.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data import batches
from .errors import LayerProbeError
from .models import BasicBlock, CifarNet
from .probe import BNMode, Hooks, bn_statistics, hits, top1
from .sites import Block, find_sites


@dataclass
class Lesion:
    """A deleted block. `removable` turns False once a forward pass finds a plain block whose
    input and output shapes differ (it cannot be bypassed, so it is left in place)."""

    block: Block
    removable: bool = True


@contextmanager
def lesion(model: nn.Module, block: Block) -> Iterator[Lesion]:
    """Delete `block` while inside the `with`.

    A residual block computes x + 0 (its shortcut stays: option A/B transforms still apply). A
    plain block passes its input through, which only works when its input and output shapes match.
    A residual block whose own forward computes F(x) (an inline layer scale: `branch_out` is the
    block itself) has no module whose output is F(x) alone: it is left in place, not removable.
    """
    state = Lesion(block)
    if block.residual and block.branch_out == block.name:
        state.removable = False
        yield state
        return
    module = dict(model.named_modules())[block.branch_out if block.residual else block.name]

    def zero(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        return torch.zeros_like(out)

    def bypass(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        if args[0].shape != out.shape:
            state.removable = False
            return out
        return args[0]

    with Hooks() as hooks:
        hooks.add(module, zero if block.residual else bypass)
        yield state


def lesion_deltas(model: nn.Module, blocks: Sequence[Block], images: Tensor, labels: Tensor,
                  mean: tuple[float, ...], std: tuple[float, ...], *, batch_size: int = 500,
                  progress: bool = True) -> list[float]:
    """Top-1 change (percentage points) when each of `blocks` is deleted in turn; NaN where it cannot be.

    On a CifarNet each block's input is computed once per batch and only the network from the
    deleted block on is rerun: about half the work of one full pass per block (resnet110 has 54).
    """
    n_batches = math.ceil(len(labels) / batch_size)
    with tqdm(total=len(blocks) * n_batches, desc="lesions", leave=False, disable=not progress or None) as bar:
        if isinstance(model, CifarNet):
            base, accuracies, removable = _staged_lesions(model, blocks, images, labels, mean, std, batch_size, bar)
        else:
            base, accuracies, removable = top1(model, images, labels, mean, std, batch_size), [], []
            for block in blocks:
                with lesion(model, block) as cut:
                    accuracies.append(top1(model, images, labels, mean, std, batch_size))
                removable.append(cut.removable)
                bar.update(n_batches)
    return [a - base if ok else float("nan") for a, ok in zip(accuracies, removable)]


def _staged_lesions(model: CifarNet, blocks: Sequence[Block], images: Tensor, labels: Tensor,
                    mean: tuple[float, ...], std: tuple[float, ...], batch_size: int,
                    bar: tqdm) -> tuple[float, list[float], list[bool]]:
    """(top-1 intact, top-1 with each block deleted, whether it could be) in one walk down the blocks per batch."""
    chain = [(name, m) for name, m in model.named_modules() if isinstance(m, BasicBlock)]
    position = {b.name: i for i, b in enumerate(blocks)}
    correct = torch.zeros(len(blocks) + 1, dtype=torch.long, device=labels.device)  # [0]: intact
    removable = [True] * len(blocks)
    with bn_statistics(model, "eval"), torch.inference_mode():
        for x, y in batches(images, labels, batch_size, mean, std):
            h = model.stem(x)
            for k, (name, block) in enumerate(chain):
                if name in position:
                    i = position[name]
                    with lesion(model, blocks[i]) as cut:
                        out = h
                        for _, later in chain[k:]:
                            out = later(out)
                        correct[i + 1] += hits(model.head(out), y)
                    removable[i] &= cut.removable
                    bar.update(1)
                h = block(h)
            correct[0] += hits(model.head(h), y)
    accuracy = (100.0 * correct.double() / len(labels)).tolist()
    return accuracy[0], accuracy[1:], removable


def identity_block(planes: int, *, residual: bool) -> BasicBlock:
    """A block that computes the identity on the post-ReLU activations it receives.

    Residual: F(x) = 0 by a last BN with gamma = beta = 0, so relu(0 + x) = x for x >= 0.
    Plain: Dirac 3x3 kernels, BN set to undo its running statistics (mean 0, var 1 - eps,
    gamma 1, beta 0), and ReLU acting on non-negative inputs.
    """
    block = BasicBlock(planes, planes, 1, residual=residual).eval()
    with torch.no_grad():
        for conv, bn in ((block.conv1, block.bn1), (block.conv2, block.bn2)):
            nn.init.dirac_(conv.weight)
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)  # (x - 0) / sqrt(var + eps) = x exactly
            bn.weight.fill_(1.0)
            bn.bias.zero_()
        if residual:
            block.bn2.weight.zero_()
            block.bn2.bias.zero_()
    return block


def deepen(model: CifarNet, extra_blocks: int) -> CifarNet:
    """A copy of `model` with `extra_blocks` identity blocks added to each stage (depth + 6 * extra).

    The new blocks go at the end of each stage, where input and output shapes match, so the
    deeper network computes exactly the shallower one's function.
    """
    if not isinstance(model, CifarNet):
        raise LayerProbeError(f"deepen works on the CIFAR networks of layer_probe.models, not {type(model).__name__}")
    if extra_blocks < 0:
        raise LayerProbeError(f"extra_blocks must be 0 or more, got {extra_blocks}")
    deeper = copy.deepcopy(model).eval()
    for name in ("layer1", "layer2", "layer3"):
        stage: nn.Sequential = getattr(deeper, name)
        planes, residual = stage[0].conv2.out_channels, stage[0].residual
        blocks = list(stage) + [identity_block(planes, residual=residual) for _ in range(extra_blocks)]
        setattr(deeper, name, nn.Sequential(*blocks))
    return deeper


@dataclass(frozen=True)
class IdentityCheck:
    """A shallow network next to its identity-deepened copy, on the same images."""

    arch: str
    depth: int
    deep_depth: int
    bn_mode: str  # eval: BN's running statistics; train: each batch's
    max_logit_diff: float  # max |logit difference| over all images and classes
    error: float  # top-1 error (percent) of the shallow network
    deep_error: float  # ... and of the deeper one: equal when the construction is exact


def identity_check(model: CifarNet, arch: str, extra_blocks: int, images: Tensor, labels: Tensor,
                   mean: tuple[float, ...], std: tuple[float, ...], batch_size: int = 500, *,
                   bn_mode: BNMode = "eval") -> IdentityCheck:
    """Deepen `model` by identity blocks and measure how far the deeper network's outputs are from the shallow one's.

    Under batch statistics (`bn_mode="train"`) a residual identity block stays exact (γ = β = 0 makes F(x) = 0
    whatever BN normalises by), while a plain one cannot be: its BN normalises each batch afresh, so no fixed
    parameters make conv-BN-ReLU the identity on every batch.
    """
    deep = deepen(model, extra_blocks)
    diff, wrong, deep_wrong = 0.0, 0, 0
    with torch.inference_mode(), bn_statistics(model, bn_mode), bn_statistics(deep, bn_mode):
        for x, y in batches(images, labels, batch_size, mean, std):
            a, b = model(x), deep(x)
            diff = max(diff, float((a - b).abs().max()))
            wrong += len(y) - int(hits(a, y))
            deep_wrong += len(y) - int(hits(b, y))
    return IdentityCheck(arch, find_sites(model, quiet=True).depth, find_sites(deep, quiet=True).depth, bn_mode, diff,
                         100.0 * wrong / len(labels), 100.0 * deep_wrong / len(labels))

"""CIFAR-10 plain and residual networks of He et al. (2016), Section 4.2.

Depth 6n+2: a 3x3 conv with 16 filters, three stages of n blocks with 16, 32 and 64
filters (stride 2 at the start of stages 2 and 3), every 3x3 conv followed by BN,
global average pooling and a 10-way linear layer. Parameter names follow the public
CIFAR ResNet checkpoints (`conv1`, `bn1`, `layer1.0.conv1`, ..., `linear`) so they load
without renaming.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Shortcut = Literal["A", "B"]
Head = Literal["linear", "normalized"]


class ShortcutA(nn.Module):
    """Option A: parameter-free shortcut, subsample by 2 and zero-pad the new channels.

    The zeros go on both sides of the channel axis (planes // 4 each), the layout the
    public option-A checkpoints were trained with.
    """

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers; with `residual` the output is relu(F(x) + shortcut(x)).

    `bn2`'s output is the residual function F(x) just before the addition (Fig. 7 probes
    it there); a plain block has the same layers and parameters and no addition.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, *, residual: bool = True,
                 shortcut: Shortcut = "A"):
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if not residual:
            return
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ShortcutA(planes)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.residual:
            out = out + self.shortcut(x)
        return F.relu(out)


class CifarNet(nn.Module):
    """The 6n+2-layer CIFAR network, residual or plain. Input [N, 3, 32, 32] -> logits [N, 10]."""

    def __init__(self, n: int, *, residual: bool = True, shortcut: Shortcut = "A", head: Head = "linear",
                 num_classes: int = 10):
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        if head not in ("linear", "normalized"):
            raise ValueError(f"head must be 'linear' or 'normalized', got {head!r}")
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [BasicBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1,
                                 residual=residual, shortcut=shortcut) for i in range(n)]
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        # "normalized": the classifier sees unit-scale pooled features whatever the last block's scale
        # (an ablation: does the rise of the last layers' std serve the classifier's need for scale?)
        self.head_bn = nn.BatchNorm1d(64, affine=False) if head == "normalized" else None
        self.linear = nn.Linear(64, num_classes)
        _he_init(self)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """The first conv, BN and ReLU: the input of the first block."""
        return F.relu(self.bn1(self.conv1(x)))

    def head(self, out: torch.Tensor) -> torch.Tensor:
        """Global average pooling and the classifier: last block's output [N, 64, 8, 8] -> logits."""
        pooled = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(self.head_bn(pooled) if self.head_bn is not None else pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer3(self.layer2(self.layer1(self.stem(x)))))


def _he_init(model: nn.Module) -> None:
    """He initialisation of conv and linear weights (the paper's [13])."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in",
                                    nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def cifar_net(depth: int, *, residual: bool, shortcut: Shortcut = "A", head: Head = "linear") -> CifarNet:
    """Build the depth-`depth` CIFAR network; depth must be 6n+2."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR depth must be 6n+2 (8, 20, 32, 44, 56, 110, ...), got {depth}")
    return CifarNet((depth - 2) // 6, residual=residual, shortcut=shortcut, head=head)

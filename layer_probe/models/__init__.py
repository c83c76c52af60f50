"""Registry of model builders: the CIFAR plain/ResNet family and torchvision's ResNets.

    >>> list_models("plain*")
    ['plain8', 'plain20', 'plain32', 'plain44', 'plain56', 'plain110', 'plain1202']
    >>> model = build_model("resnet20", shortcut="B")
"""

from __future__ import annotations

import fnmatch
import re
from functools import partial
from typing import Any, Callable

from torch import nn

from ..errors import LayerProbeError
from .cifar import BasicBlock, CifarNet, ShortcutA, cifar_net

CIFAR_DEPTHS = (8, 20, 32, 44, 56, 110, 1202)  # 8 (n=1) is the tiny variant used by tests
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                     "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d")


def _torchvision(name: str, **kwargs: Any) -> nn.Module:
    import torchvision.models

    return getattr(torchvision.models, name)(weights=None, **kwargs)


CIFAR_ARCHS = tuple(f"{kind}{d}" for kind in ("resnet", "plain") for d in CIFAR_DEPTHS)
MODELS: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{d}": partial(cifar_net, d, residual=True) for d in CIFAR_DEPTHS},
    **{f"plain{d}": partial(cifar_net, d, residual=False) for d in CIFAR_DEPTHS},
    **{name: partial(_torchvision, name) for name in TORCHVISION_ARCHS},
}


def list_models(pattern: str = "*") -> list[str]:
    """Registered architecture names matching a shell-style pattern, in registry order."""
    return [name for name in MODELS if fnmatch.fnmatch(name, pattern)]


def is_cifar(arch: str) -> bool:
    """True for the CIFAR plain/ResNet family (32x32 inputs), False for ImageNet models."""
    return arch in CIFAR_ARCHS


def depth_of(name: str) -> int:
    """The depth in an architecture name or label ("resnet110" -> 110; 0 when it has none)."""
    digits = re.search(r"\d+", name)
    return int(digits.group()) if digits else 0


def is_plain(name: str) -> bool:
    """Whether an architecture name or label is one of the plain (shortcut-free) networks."""
    return name.startswith("plain")


def build_model(arch: str, **kwargs: Any) -> nn.Module:
    """Build a registered architecture with fresh (He-initialised) weights."""
    if arch not in MODELS:
        raise LayerProbeError(f"unknown architecture {arch!r}; see layer_probe.models.list_models() "
                              f"for the {len(MODELS)} known names (e.g. resnet56, plain20, resnet50)")
    try:
        return MODELS[arch](**kwargs)
    except (TypeError, ValueError, RuntimeError) as e:  # RuntimeError: e.g. a negative size
        raise LayerProbeError(f"cannot build {arch} with {kwargs}: {e}") from None


__all__ = ["BasicBlock", "CifarNet", "ShortcutA", "MODELS", "CIFAR_ARCHS", "CIFAR_DEPTHS", "build_model",
           "cifar_net", "depth_of", "is_cifar", "is_plain", "list_models"]

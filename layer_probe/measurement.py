"""One measurement path: `measure(model, data)` probes any model on any batches and returns `Responses`.

Fig. 7 on your own model:

    >>> import layer_probe
    >>> r = layer_probe.measure(model, loader)          # a DataLoader of (images, labels) or of images
    >>> r.to_dataframe(); layer_probe.plot_responses([r])

The CLI, `analyze`, `compare`, `report` and the probe during training all go through `measure_pass`,
so they count the same things the same way (non-finite values included) and record the same metadata.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from .data import batches
from .errors import LayerProbeError
from .precision import Precision, autocast, choose
from .probe import PassResult, bn_statistics, run_probe
from .results import Axes, Responses, summarize
from .sites import Layout, find_sites

Data = Iterable[Any] | Callable[[], Iterable[Any]]


@dataclass(frozen=True)
class ProbeConfig:
    """How responses are measured. The paper leaves these open; each is recorded in the results."""

    sites: str = "3x3"  # "3x3" (Fig. 7), "all-bn", or a regular expression over site names
    bn_mode: Literal["eval", "train"] = "eval"  # eval: BN running statistics; train: batch statistics
    axes: Axes = "all"  # all: std over N*C*H*W; channel: mean of per-channel stds
    batch_size: int = 256  # images per forward pass, where this package makes the batches
    ratios: bool = True  # also record ||F(x)||/||x|| and cos(F(x), x) per block
    amp: Literal["bf16", "auto"] | None = None  # autocast the forward (auto: only where faster); statistics float64
    compiled: bool = False  # fuse the statistics with torch.compile (same numbers, less overhead)


def measure(model: nn.Module, data: Data, config: ProbeConfig = ProbeConfig(), *, progress: bool = True,
            device: str | torch.device | None = None, meta: dict[str, Any] | None = None, **options: Any) -> Responses:
    """Fig. 7's responses of `model` on `data`: every site's std and every block's ||F(x)||/||x||.

    Args:
        model: any network with conv->BN layers (a CIFAR net of this package, torchvision's, your own).
        data: a DataLoader or any re-iterable of batches. A batch is an image tensor [N, 3, H, W], or a
            tuple/list whose first item is the images and second the labels. Without labels top-1 is NaN.
        config: the measurement options; keyword `options` override its fields
            (`sites`, `bn_mode`, `axes`, `ratios`, `amp`, `compiled`).
        device: where to run; default the model's. Batches are moved there.

    Example:
        >>> r = measure(torchvision.models.resnet18(), loader, bn_mode="train")
        >>> r["layer4.1.bn2"].std, r.to_dataframe()
    """
    return measure_pass(model, data, replace(config, **options), progress=progress, device=device, meta=meta)[0]


def measure_images(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: tuple[float, ...],
                   std: tuple[float, ...], config: ProbeConfig = ProbeConfig(), *, meta: dict[str, Any] | None = None,
                   **kwargs: Any) -> Responses:
    """`measure` on uint8 images [N, 32, 32, 3] with labels [N], normalised with `mean`/`std` in batches of
    `config.batch_size` (in the order given: `data.to_tensors` mixes the classes)."""
    return measure_pass(model, image_batches(images, labels, mean, std, config.batch_size), config,
                        meta={"batch_size": config.batch_size} | (meta or {}), total=len(labels), **kwargs)[0]


def image_batches(images: torch.Tensor, labels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                  batch_size: int) -> Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]:
    """A re-iterable source of normalised batches of uint8 images [N, 32, 32, 3], for `measure`."""
    return partial(batches, images, labels, batch_size, mean, std)


def measure_pass(model: nn.Module, data: Data, config: ProbeConfig = ProbeConfig(), *, progress: bool = True,
                 device: str | torch.device | None = None, meta: dict[str, Any] | None = None,
                 layout: Layout | None = None, total: int | None = None, classes: int | None = None,
                 merge: Callable[[PassResult], PassResult] | None = None) -> tuple[Responses, PassResult]:
    """`measure`, also returning the raw pass (per-batch moments, for bootstrap CIs).

    `layout` is the model's selected sites when already known (default: `config.sites` of `find_sites(model)`);
    `merge` combines this process's pass with those of other processes (`distributed.Processes.merge`).
    `classes` is the number of classes in the data: a model with another number of outputs (an ImageNet
    head on CIFAR-10) gets a one-line warning and no top-1.
    A second pass over `data` runs only when a site produced NaN/Inf, to count them exactly.
    """
    if device is not None:
        model = model.to(device)
    target = next(model.parameters()).device
    layout = layout or find_sites(model).select(config.sites)
    one_shot = not callable(data) and iter(data) is data
    amp = _amp(model, data, config.amp, target, one_shot)
    result = None
    for count_nonfinite in (False, True):
        if count_nonfinite and one_shot:
            raise LayerProbeError("data is a one-shot iterator, but a second pass is needed to count the "
                                  "non-finite values exactly; pass a list or a DataLoader")
        result = run_probe(model, layout, _batches(data, target), bn_mode=config.bn_mode, ratios=config.ratios,
                           total=total, amp=amp, progress=progress, count_nonfinite=count_nonfinite,
                           compiled=config.compiled)
        if merge is not None:  # every process gets the same merged pass, so all take the same branch here
            result = merge(result)
        if not result.any_nonfinite:
            break
    top1 = {}
    if classes and result.outputs and result.outputs != classes:
        print(f"warning: the model has {result.outputs} outputs but the data {classes} classes; top-1 is not "
              "reported (the responses are measured all the same)", file=sys.stderr)
        top1 = {"top1": float("nan")}
    # structure read from the model: residual or plain, and depth (weighted layers on the main path)
    settings = {"sites_rule": config.sites, "bn_mode": config.bn_mode, "amp": amp, "torch": torch.__version__,
                "residual": layout.residual, "depth": layout.depth}
    return summarize(result, axes=config.axes, meta=settings | (meta or {}) | top1), result


def _amp(model: nn.Module, data: Data, amp: str | None, device: torch.device, one_shot: bool) -> Literal["bf16"] | None:
    """The autocast to run: None for fp32. "auto" takes bf16 only where it times faster than fp32 on the first
    batch; "bf16" is kept, with a one-line warning where it is slower (CPUs without bf16 instructions)."""
    if amp is None:
        return None
    if one_shot:
        raise LayerProbeError(f"amp={amp!r} times a batch first, which a one-shot iterator cannot give back; "
                              "pass a list or a DataLoader")
    x, _ = next(iter(_batches(data, device)))

    def forward(precision: Precision) -> None:
        with torch.inference_mode(), autocast(device, precision):
            model(x)

    with bn_statistics(model, "eval"):  # a forward in train mode would move BN's running statistics
        choice = choose("auto", device, forward)
    if amp == "bf16" and choice.precision == "fp32":
        print(f"warning: bf16 runs slower than fp32 here ({choice}); amp='auto' would take fp32", file=sys.stderr)
    return "bf16" if amp == "bf16" or choice.precision == "bf16" else None


def _batches(data: Data, device: torch.device) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    """(images, labels or None) on `device` from whatever batches `data` yields."""
    for batch in data() if callable(data) else data:
        if isinstance(batch, torch.Tensor):
            x, y = batch, None
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            x = batch[0]
            y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        else:
            raise LayerProbeError(f"a batch must be an image tensor or a tuple/list (images, labels, ...), "
                                  f"got {type(batch).__name__}")
        yield x.to(device, non_blocking=True), (y.to(device, non_blocking=True) if y is not None else None)

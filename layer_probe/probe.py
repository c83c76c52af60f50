"""The probe: forward hooks that reduce each site's response to streaming moments.

Hooks are global state on the model, so every registration goes through `Probe`, a
context manager that keeps each handle and removes all of them in `finally`, and
restores the model's train/eval mode (and BN buffers) even when the forward raises.
Statistics are taken inside the hook, so in-place operations that later overwrite the
BN output (`out += shortcut(x)`, `ReLU(inplace=True)`) cannot change them; nothing is
moved to the host while batches run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data import batches
from .errors import LayerProbeError
from .sites import Block, Layout
from . import stats
from .stats import Moments

BNMode = Literal["eval", "train"]


def pair_norms(f: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image ||f||, ||x|| and cos(f, x) of f, x [N, ...], float64 [N] each."""
    f, x = f.float(), x.float()
    dims = tuple(range(1, f.ndim))  # reduced in place: flattening a channels_last tensor would copy it
    fn, xn = torch.linalg.vector_norm(f, dim=dims), torch.linalg.vector_norm(x, dim=dims)
    return fn.double(), xn.double(), ((f * x).sum(dims) / (fn * xn)).double()


@dataclass
class BlockNorms:
    """Per-image ||F(x)|| and ||x|| and the cosine between F(x) and x for one block, as lists of [N] batches.

    For a plain block F(x) stands for H(x) - x, what a residual block would have to add.
    """

    f_norm: list[Tensor] = field(default_factory=list)
    x_norm: list[Tensor] = field(default_factory=list)
    cosine: list[Tensor] = field(default_factory=list)

    def add(self, f: Tensor, x: Tensor, *, compiled: bool = False) -> None:
        """Record one batch: f and x are [N, ...] of the same shape."""
        fn, xn, cosine = (stats.fused(pair_norms) if compiled else pair_norms)(f.detach(), x.detach())
        self.f_norm.append(fn)
        self.x_norm.append(xn)
        self.cosine.append(cosine)

    def ratio(self) -> Tensor:
        """||F(x)|| / ||x|| per image, [N] float64."""
        return torch.cat(self.f_norm) / torch.cat(self.x_norm)


@dataclass
class Recording:
    """What a probe collected: per-batch moments per site, non-finite counts, block norms."""

    layout: Layout
    batches: dict[str, list[Moments]]  # site name -> one [C] Moments per batch
    nonfinite: dict[str, list[Tensor]]  # site name -> per batch: NaN/Inf count, or a 0/1 flag (see Probe)
    blocks: dict[str, BlockNorms]  # block name -> norms (only when ratios were asked for)

    def moments(self, name: str) -> Moments:
        """Per-channel moments of one site over all batches, [C]."""
        return Moments.stack(self.batches[name]).reduce(0)

    def batch_moments(self, name: str) -> Moments:
        """Per-batch, per-channel moments of one site, [B, C] (for bootstrap over batches)."""
        return Moments.stack(self.batches[name])


class Hooks:
    """The one place hooks are registered: keeps every handle and removes all of them on exit.

    Nestable, and an exception inside the `with` block never leaves a hook behind.
    """

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def add(self, module: nn.Module, hook: Callable, *, pre: bool = False) -> None:
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        self._handles.append(register(hook))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class Probe:
    """Context manager that records the responses of `layout`'s sites while the model runs.

    Non-finite values are flagged per batch at no cost; `count_nonfinite=True` counts them
    exactly, at the price of one more pass over each activation. `compiled=True` fuses each
    reduction into one pass with `torch.compile` (`stats.fused`); it is compiled on entry, so
    a missing compiler is reported before any batch runs.

    Example:
        >>> layout = find_sites(model).select("3x3")
        >>> with Probe(model, layout) as probe:
        ...     for x, _ in batches:
        ...         model(x)
        >>> probe.recording.moments("layer1.0.bn2").std()
    """

    def __init__(self, model: nn.Module, layout: Layout, *, bn_mode: BNMode = "eval", ratios: bool = False,
                 count_nonfinite: bool = False, compiled: bool = False):
        self.model, self.layout, self.bn_mode, self.ratios = model, layout, bn_mode, ratios
        self.count_nonfinite, self.compiled = count_nonfinite, compiled
        self.recording = Recording(layout, {s.name: [] for s in layout.sites}, {s.name: [] for s in layout.sites},
                                   {b.name: BlockNorms() for b in layout.blocks} if ratios else {})
        self._hooks = Hooks()
        self._modes: dict[nn.Module, bool] = {}
        self._bn_buffers: dict[str, Tensor] = {}

    def __enter__(self) -> Probe:
        self._modes = {m: m.training for m in self.model.modules()}
        try:
            self._set_mode()
            if self.compiled:
                self._compile()
            modules = dict(self.model.named_modules())
            for site in self.layout.sites:
                self._hooks.add(modules[site.name], self._site_hook(site.name))
            for block in self.layout.blocks if self.ratios else ():
                self._add_block(modules, block)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _set_mode(self) -> None:
        self.model.eval()
        if self.bn_mode == "train":  # batch statistics; keep the running ones untouched
            for name, m in self.model.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    self._bn_buffers.update({f"{name}.{k}": v.clone() for k, v in m.named_buffers()})
                    m.train()

    def _compile(self) -> None:
        """Compile the fused reductions for both memory layouts now, with one clear error if that fails."""
        device = next(self.model.parameters()).device
        quiet = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime is found" on every CPU compile
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            for x in (torch.ones(2, 3, 4, 5, device=device), torch.ones(2, 3, 4, 5, device=device).contiguous(
                      memory_format=torch.channels_last)):
                Moments.of(x, compiled=True)
                if self.ratios:
                    stats.fused(pair_norms)(x, x)
        except Exception as e:  # torch.compile raises many kinds: no compiler, no Triton, ...
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LayerProbeError(f"--compile: torch.compile failed on {device.type} ({reason}); "
                                  f"run without --compile") from None
        finally:
            quiet.setLevel(level)

    def _restore(self) -> None:
        self._hooks.remove()
        for m, training in self._modes.items():
            m.training = training
        if self._bn_buffers:
            buffers = dict(self.model.named_buffers())
            with torch.no_grad():
                for k, v in self._bn_buffers.items():
                    buffers[k].copy_(v)
            self._bn_buffers.clear()

    def _site_hook(self, name: str) -> Callable:
        batches, nonfinite = self.recording.batches[name], self.recording.nonfinite[name]

        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            m = Moments.of(out, compiled=self.compiled)
            batches.append(m)
            if self.count_nonfinite:  # an extra pass over the activations
                nonfinite.append(out.numel() - torch.isfinite(out).sum())
            else:  # free: any NaN/Inf value makes its channel's mean or M2 non-finite
                nonfinite.append((~torch.isfinite(m.mean + m.m2)).any().long())

        return hook

    def _add_block(self, modules: dict[str, nn.Module], block: Block) -> None:
        """Hooks that pair F(x) with x inside one block and record their per-image norms.

        Whichever of the two arrives first is held until the other arrives (both come
        before the addition, so neither has been overwritten in place yet).
        """
        norms = self.recording.blocks[block.name]
        pending: dict[str, Tensor] = {}

        def arrive(key: str, value: Tensor) -> None:
            other = pending.pop("x" if key == "f" else "f", None)
            if other is None:
                pending[key] = value
            elif key == "f":
                norms.add(value, other, compiled=self.compiled)
            else:
                norms.add(other, value, compiled=self.compiled)

        def block_input(module: nn.Module, args: tuple) -> None:
            arrive("x", args[0])

        if not block.residual:  # plain block: F(x) stands for H(x) - x where shapes match
            def block_output(module: nn.Module, args: tuple, out: Tensor) -> None:
                x = pending.pop("x")
                if x.shape == out.shape:
                    norms.add(out - x, x, compiled=self.compiled)

            self._hooks.add(modules[block.name], block_input, pre=True)
            self._hooks.add(modules[block.name], block_output)
            return
        self._hooks.add(modules[block.branch_out], lambda m, a, out: arrive("f", out))
        if block.shortcut is None:
            self._hooks.add(modules[block.name], block_input, pre=True)
        else:
            self._hooks.add(modules[block.shortcut], lambda m, a, out: arrive("x", out))


@dataclass(frozen=True)
class PassResult:
    """A recording plus the top-1 accuracy of the same pass."""

    recording: Recording
    images: int
    correct: int

    @property
    def any_nonfinite(self) -> bool:
        """Whether any site saw a NaN or Inf (one host sync)."""
        flags = [c for counts in self.recording.nonfinite.values() for c in counts]
        return bool(torch.stack(flags).any()) if flags else False

    @property
    def top1(self) -> float:
        """Top-1 accuracy in percent."""
        return 100.0 * self.correct / self.images if self.images else float("nan")


def run_probe(model: nn.Module, layout: Layout, batches: Iterable[tuple[Tensor, Tensor]], *,
              bn_mode: BNMode = "eval", ratios: bool = False, total: int | None = None,
              amp: Literal["bf16"] | None = None, progress: bool = True, count_nonfinite: bool = False,
              compiled: bool = False) -> PassResult:
    """One pass over `batches` ([N, 3, H, W] images, [N] labels) with the probe attached.

    Returns the recording and the top-1 accuracy measured in the same pass. `amp="bf16"`
    runs the forward under bf16 autocast; the statistics are still accumulated in float64.
    `compiled=True` fuses the statistics with `torch.compile` (see `Probe`).
    """
    device = next(model.parameters()).device
    correct, images = torch.zeros((), dtype=torch.long, device=device), 0
    with Probe(model, layout, bn_mode=bn_mode, ratios=ratios, count_nonfinite=count_nonfinite,
               compiled=compiled) as probe, torch.inference_mode():
        bar = tqdm(total=total, unit="img", desc="probe", disable=not progress or None, leave=False)
        with bar:
            for x, y in batches:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                    logits = model(x)
                correct += (logits.argmax(1) == y).sum()
                images += len(y)
                bar.update(len(y))
    return PassResult(probe.recording, images, int(correct))



def top1(model: nn.Module, images: Tensor, labels: Tensor, mean: tuple[float, ...], std: tuple[float, ...],
         batch_size: int = 500, *, channels_last: bool = False) -> float:
    """Top-1 accuracy in percent of `model` in eval mode on uint8 images [N, 32, 32, 3] (mode restored)."""
    was = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=labels.device)
    try:
        with torch.inference_mode():
            for x, y in batches(images, labels, batch_size, mean, std, channels_last=channels_last):
                correct += (model(x).argmax(1) == y).sum()
    finally:
        model.train(was)
    return 100.0 * int(correct) / len(labels)

"""The probe: forward hooks that reduce each site's response to streaming moments.

Hooks are global state on the model, so every registration goes through `Probe`, a
context manager that keeps each handle and removes all of them in `finally`, and
restores the model's train/eval mode (and BN buffers) even when the forward raises.
Statistics are taken inside the hook, so in-place operations that later overwrite the
BN output (`out += shortcut(x)`, `ReLU(inplace=True)`) cannot change them; nothing is
moved to the host while batches run. F(x) and x are read at the block's addition itself
(a `TorchFunctionMode` sees it, whatever op performs it) just before it runs.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from .data import batches
from .errors import LayerProbeError, first_line
from .sites import AT_ADDITION, Block, Hooks, Layout, Site, addition_op, is_norm
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
    counted: bool = False  # `nonfinite` holds counts; else 0/1 flags, which say only whether a batch had any

    def moments(self, name: str) -> Moments:
        """Per-channel moments of one site over all batches, [C]."""
        return Moments.stack(self.batches[name]).reduce(0)

    def batch_moments(self, name: str) -> Moments:
        """Per-batch, per-channel moments of one site, [B, C] (for bootstrap over batches)."""
        return Moments.stack(self.batches[name])


class _AtAdditions(TorchFunctionMode):
    """Hands the two operands of chosen additions to a reader, just before the addition runs.

    An addition is known by the module running it and its number among that call's additions
    of two same-shape tensors, as `find_sites` counted them; `enter`/`leave` are the hooks of
    every module that runs such additions. Work done by the probe's own hooks is not counted.
    """

    def __init__(self, readers: dict[tuple[str, int], Callable[[Tensor, Tensor], None]]):
        super().__init__()
        self.readers = readers
        self.stack: list[list] = []  # [module name, additions so far] per running call
        self.paused = 0

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None):
        if self.stack and not self.paused and addition_op(func, args, kwargs) is not None:
            frame = self.stack[-1]
            read = self.readers.get((frame[0], frame[1]))
            frame[1] += 1
            if read is not None:
                read(args[0], args[1])
        return func(*args, **(kwargs or {}))

    def enter(self, name: str) -> Callable:
        return lambda module, args: self.stack.append([name, 0])

    def leave(self, module: nn.Module, args: tuple, out: object) -> None:
        self.stack.pop()

    def reset(self, module: nn.Module, args: tuple) -> None:
        """At the start of each forward pass: nothing left over from one that raised."""
        self.stack.clear()



@contextmanager
def bn_statistics(model: nn.Module, bn_mode: BNMode) -> Iterator[None]:
    """`model` in eval mode with its BN layers on their running statistics ("eval") or on each batch's
    ("train"); every module's mode, and the running statistics train-mode BN would update, are restored."""
    modes = {m: m.training for m in model.modules()}
    saved = {}
    model.eval()
    if bn_mode == "train":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                saved[m] = {k: v.clone() for k, v in m.named_buffers(recurse=False)}
                m.train()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training
        with torch.no_grad():
            for m, buffers in saved.items():
                for k, v in buffers.items():
                    getattr(m, k).copy_(v)


def _say_fixed_statistics(modules: dict[str, nn.Module], layout: Layout, bn_mode: BNMode) -> None:
    """One warning line when some norm sites cannot follow `bn_mode`: torchvision's FrozenBatchNorm2d has no
    batch-statistics mode, and a BN that tracks no running statistics normalises by each batch in eval mode too."""
    norms = {s.name: modules[s.name] for s in layout.sites if s.name in modules and is_norm(modules[s.name])}
    if bn_mode == "train":
        fixed = [n for n, m in norms.items() if not isinstance(m, nn.modules.batchnorm._BatchNorm)]
        what = "have no batch-statistics mode and keep their fixed statistics"
    else:
        fixed = [n for n, m in norms.items()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is None]
        what = "track no running statistics and normalise by each batch"
    if fixed:
        print(f"warning: bn_mode={bn_mode!r}: {len(fixed)} of {len(norms)} norm site(s) {what} (e.g. {fixed[0]}, "
              f"a {type(norms[fixed[0]]).__name__})", file=sys.stderr)


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
                                   {b.name: BlockNorms() for b in layout.blocks} if ratios else {}, count_nonfinite)
        self._hooks = Hooks()
        self._statistics = ExitStack()
        self._additions: _AtAdditions | None = None

    def __enter__(self) -> Probe:
        try:
            self._statistics.enter_context(bn_statistics(self.model, self.bn_mode))
            if self.compiled:
                self._compile()
            modules = dict(self.model.named_modules())
            _say_fixed_statistics(modules, self.layout, self.bn_mode)
            readers: dict[tuple[str, int], list[Callable[[Tensor, Tensor], None]]] = {}
            for site in self.layout.sites:
                self._add_site(modules, site, readers)
            for block in self.layout.blocks if self.ratios else ():
                if block.residual:
                    readers.setdefault((block.module, block.ordinal), []).append(self._block_reader(block))
                else:
                    self._add_plain_block(modules[block.name], block)
            if readers:
                self._read_additions(modules, readers)
        except BaseException:
            self._restore()
            raise
        return self

    def _read_additions(self, modules: dict[str, nn.Module],
                        readers: dict[tuple[str, int], list[Callable[[Tensor, Tensor], None]]]) -> None:
        """Read F(x) and x at the blocks' additions: hooks on every module that adds, and the mode entered."""
        def read_all(todo: list[Callable[[Tensor, Tensor], None]]) -> Callable[[Tensor, Tensor], None]:
            def read(a: Tensor, b: Tensor) -> None:
                for reader in todo:
                    reader(a, b)
            return read

        self._additions = _AtAdditions({key: read_all(todo) for key, todo in readers.items()})
        self._hooks.add(self.model, self._additions.reset, pre=True)
        for name in self.layout.adders:
            self._hooks.add(modules[name], self._additions.enter(name), pre=True)
            self._hooks.add(modules[name], self._additions.leave)
        self._additions.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._restore()

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
            raise LayerProbeError(f"compiled statistics: torch.compile failed on {device.type} ({first_line(e)}); "
                                  f"measure without them (compiled=False; on the command line, drop --compile)") from None
        finally:
            quiet.setLevel(level)

    def _restore(self) -> None:
        if self._additions is not None:
            self._additions.__exit__(None, None, None)
            self._additions = None
        self._hooks.remove()
        self._statistics.close()

    def _add_site(self, modules: dict[str, nn.Module], site: Site,
                  readers: dict[tuple[str, int], list[Callable[[Tensor, Tensor], None]]]) -> None:
        """Reduce the site's response where `site.tap` says: the module's output, another module's input
        (a norm-act layer's BN value, before its activation), or the F(x) operand of its block's addition."""
        record = self._recorder(site.name)
        if site.tap == AT_ADDITION:
            block = next(b for b in self.layout.blocks if b.branch_out == site.name)
            readers.setdefault((block.module, block.ordinal), []).append(
                lambda a, b: record(b if block.f_operand else a))
        elif site.tap:
            self._hooks.add(modules[site.tap], lambda m, args: record(args[0]), pre=True)
        else:
            self._hooks.add(modules[site.name], lambda m, args, out: record(out))

    def _recorder(self, name: str) -> Callable[[Tensor], None]:
        batches, nonfinite = self.recording.batches[name], self.recording.nonfinite[name]

        def record(out: Tensor) -> None:
            if self._additions is not None:  # the statistics' own additions are not the model's
                self._additions.paused += 1
            try:
                m = Moments.of(out, compiled=self.compiled)
                batches.append(m)
                if self.count_nonfinite:  # an extra pass over the activations
                    nonfinite.append(out.numel() - torch.isfinite(out).sum())
                else:  # free: any NaN/Inf value makes its channel's mean or M2 non-finite
                    nonfinite.append((~torch.isfinite(m.mean + m.m2)).any().long())
            finally:
                if self._additions is not None:
                    self._additions.paused -= 1

        return record

    def _block_reader(self, block: Block) -> Callable[[Tensor, Tensor], None]:
        """Record ||F(x)||, ||x|| and their cosine from the two operands of the block's addition."""
        norms = self.recording.blocks[block.name]

        def read(a: Tensor, b: Tensor) -> None:
            f, x = (b, a) if block.f_operand else (a, b)
            norms.add(f, x, compiled=self.compiled)

        return read

    def _add_plain_block(self, module: nn.Module, block: Block) -> None:
        """Hooks on a plain block: F(x) stands for H(x) - x, where the block's input and output shapes match."""
        norms = self.recording.blocks[block.name]
        inputs: list[Tensor] = []

        def block_input(module: nn.Module, args: tuple) -> None:
            inputs.append(args[0])

        def block_output(module: nn.Module, args: tuple, out: object) -> None:
            x = inputs.pop()
            if isinstance(out, Tensor) and isinstance(x, Tensor) and x.shape == out.shape:
                norms.add(out - x, x, compiled=self.compiled)

        self._hooks.add(module, block_input, pre=True)
        self._hooks.add(module, block_output)


@dataclass(frozen=True)
class PassResult:
    """A recording plus the top-1 accuracy of the same pass."""

    recording: Recording
    images: int
    correct: int
    labelled: int  # images that came with labels: top-1 is over these
    outputs: int = 0  # width of the model's class scores (0: not seen)

    @property
    def any_nonfinite(self) -> bool:
        """Whether any site saw a NaN or Inf (one host sync)."""
        flags = [c for counts in self.recording.nonfinite.values() for c in counts]
        return bool(torch.stack(flags).any()) if flags else False

    @property
    def top1(self) -> float:
        """Top-1 accuracy in percent (NaN without labels)."""
        return 100.0 * self.correct / self.labelled if self.labelled else float("nan")


def logits_of(output: object) -> Tensor:
    """The class scores in a model's output: a tensor, the first item of a tuple/list, a dict's 'logits'
    (or its first value), or an object's `.logits` (Hugging Face style)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    elif isinstance(output, dict) and output:
        output = output.get("logits", next(iter(output.values())))
    elif hasattr(output, "logits"):
        output = output.logits
    if not isinstance(output, Tensor):
        raise LayerProbeError(f"cannot find the class scores in the model's output ({type(output).__name__})")
    return output


def hits(output: object, labels: Tensor) -> Tensor:
    """How many of `labels` the model's output gets right (top-1), as a 0-d tensor: no host sync."""
    return (logits_of(output).argmax(1) == labels).sum()


def run_probe(model: nn.Module, layout: Layout, batches: Iterable[tuple[Tensor, Tensor | None]], *,
              bn_mode: BNMode = "eval", ratios: bool = False, total: int | None = None,
              amp: Literal["bf16"] | None = None, progress: bool = True, count_nonfinite: bool = False,
              compiled: bool = False) -> PassResult:
    """One pass over `batches` ([N, 3, H, W] images, [N] labels or None) with the probe attached.

    Returns the recording and the top-1 accuracy measured in the same pass. `amp="bf16"`
    runs the forward under bf16 autocast; the statistics are still accumulated in float64.
    `compiled=True` fuses the statistics with `torch.compile` (see `Probe`).
    """
    device = next(model.parameters()).device
    correct, images, labelled, outputs = torch.zeros((), dtype=torch.long, device=device), 0, 0, 0
    with Probe(model, layout, bn_mode=bn_mode, ratios=ratios, count_nonfinite=count_nonfinite,
               compiled=compiled) as probe, torch.inference_mode():
        bar = tqdm(total=total, unit="img", desc="probe", disable=not progress or None, leave=False)
        with bar:
            for x, y in batches:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                    output = model(x)
                if y is not None:
                    outputs = logits_of(output).shape[-1]
                    correct += hits(output, y)
                    labelled += len(y)
                images += len(x)
                bar.update(len(x))
    return PassResult(probe.recording, images, int(correct), labelled, outputs)


def top1(model: nn.Module, images: Tensor, labels: Tensor, mean: tuple[float, ...], std: tuple[float, ...],
         batch_size: int = 500, *, channels_last: bool = False) -> float:
    """Top-1 accuracy in percent of `model` in eval mode on uint8 images [N, 32, 32, 3] (modes restored)."""
    correct = torch.zeros((), dtype=torch.long, device=labels.device)
    with bn_statistics(model, "eval"), torch.inference_mode():
        for x, y in batches(images, labels, batch_size, mean, std, channels_last=channels_last):
            correct += hits(model(x), y)
    return 100.0 * int(correct) / len(labels)

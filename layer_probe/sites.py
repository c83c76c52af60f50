"""Where to probe: Fig. 7's sites and the residual blocks, read from one recorded forward pass.

Fig. 7 (Section 4.2) records "the outputs of each 3x3 layer, after BN and before other
nonlinearity (ReLU/addition)"; in a residual block the last of them is the residual
function F(x) just before it is added to the shortcut x. Sites are named by their module
paths from `named_modules()`; `list_sites(model)` lists them and `format_layout` shows how
the model was read.

Nothing is taken from attribute names or from a traced graph. `find_sites` runs the model
once on a small random input and records every module call and every torch operation
(a `TorchFunctionMode` sees `+`, `+=`, `torch.add`, `Tensor.add_`, inside helpers, wrapped
functions and untraceable forwards alike). Each addition of two same-shape tensors is a
residual addition of the innermost module running it, the block. Of its two operands, x
is the block's input, or the one reached from the input through fewer convolutions (the
shortcut: identity, option A/B, a pre-activation projection); F(x) is the other. The
module that produced F(x) is the block's `branch_out` site: a BN, an SE module, a
layer-scale module, or a conv in a pre-activation block; when the block's own forward
computes F(x) (an inline `x * gamma`), F(x) is measured at the addition itself.
"""

from __future__ import annotations

import re
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .errors import LayerProbeError, first_line

Role = Literal["stem", "inner", "branch_out", "shortcut"]
SiteRule = str  # "3x3", "all-bn", or a regular expression over site names
AT_ADDITION = "+"  # Site.tap of a branch output the block's own forward computes: read at the addition
_ADDITIONS = {"add": "+", "__add__": "+", "__radd__": "+", "add_": "+=", "__iadd__": "+="}
_WEIGHTED = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear",
             "matmul", "mm", "bmm", "addmm", "einsum"}  # the layers counted on the way from x to an operand
_EXAMPLE_SIZES = (32, 224)  # input sides tried for the recorded pass: CIFAR, then ImageNet


@dataclass(frozen=True)
class Site:
    """One probed response. `index` is 1-based in network order among the selected sites.

    `tap` says where it is read: "" the module's output; a module path, that module's input
    (a norm-act layer: its BN output before the activation); "+" the F(x) operand of the
    block's addition (F(x) computed in the block's own forward).
    """

    index: int
    name: str  # module path of the BN (or of the module that produced F(x)), e.g. "layer2.0.bn2"
    role: Role  # stem (outside every block) | inner | branch_out (F(x), or its position in a plain net) | shortcut
    stage: int  # 0 outside the blocks, then 1, 2, ... for each stage of blocks
    block: int  # block number within its stage (0-based), -1 outside the blocks
    channels: int
    kernel: int  # kernel size of the conv feeding the site (3 for Fig. 7's sites; 0 if none)
    tap: str = ""


@dataclass(frozen=True)
class Block:
    """A block of the network: residual (output = F(x) + x) or plain (same layers, no addition).

    `shortcut` is the module whose output is the x added to F(x) (after any option-A/B
    transform); None means x is the block's own input or is computed in the block's forward.
    `op` is how the two were added ("+", "+=", "torch.add"), `f_operand` which operand (0, 1)
    was F(x), and `module`/`ordinal` locate the addition: the module running it and which of
    its additions it is (a module running several additions gives several blocks).
    """

    name: str
    branch_out: str
    residual: bool
    shortcut: str | None
    op: str = ""
    f_operand: int = 0
    module: str = ""
    ordinal: int = 0


@dataclass(frozen=True)
class Layout:
    """All sites of a model in network order, its blocks, and what was assumed reading it."""

    sites: tuple[Site, ...]
    blocks: tuple[Block, ...]
    notes: tuple[str, ...] = ()
    adders: tuple[str, ...] = ()  # every module that ran a same-shape addition (how the probe counts them)
    depth: int = 0  # weighted layers on the main path: every non-shortcut site's layer, plus the classifier

    @property
    def residual(self) -> bool:
        return any(b.residual for b in self.blocks)

    def select(self, rule: SiteRule = "3x3") -> Layout:
        """Keep the sites that match `rule`, renumbered 1..k in network order.

        Args:
            rule: "3x3" (Fig. 7: sites fed by a 3x3 conv, shortcut projections excluded; in
                a pre-activation block these are the BN after each 3x3 conv and the last
                3x3 conv itself, F(x); in a BN-free block, F(x)'s producer when a 3x3 conv
                feeds it), "all-bn" (every site, including branch outputs after 1x1 convs and
                projection shortcuts), or a regular expression matched against site names.
        """
        if rule == "3x3":
            keep = [s for s in self.sites if s.kernel == 3 and s.role != "shortcut"]
        elif rule == "all-bn":
            keep = list(self.sites)
        else:
            try:
                pattern = re.compile(rule)
            except re.error as e:
                raise LayerProbeError(f"sites {rule!r} is not '3x3', 'all-bn' or a valid regular expression: {e}") from None
            keep = [s for s in self.sites if pattern.search(s.name)]
        if not keep:
            raise LayerProbeError(f"no site matches {rule!r}; list the sites with layer_probe.sites.list_sites(model) "
                                  f"or `layer-probe sites CKPT`")
        return replace(self, sites=tuple(replace(s, index=i) for i, s in enumerate(keep, 1)))

    def __getitem__(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise LayerProbeError(f"unknown site {name!r}; see list_sites(model) for the valid names")


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


def is_norm(module: nn.Module) -> bool:
    """A batch-norm layer: BatchNorm*d and subclasses (SyncBatchNorm, timm's norm-act layers) or any
    module holding running statistics (torchvision's FrozenBatchNorm2d)."""
    buffers = dict(module.named_buffers(recurse=False))
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or {"running_mean", "running_var"} <= buffers.keys()


def addition_op(func: Callable, args: tuple, kwargs: dict | None) -> str | None:
    """"+", "+=" or "torch.add" when `func(*args)` adds two floating tensors of the same shape, else None."""
    op = _ADDITIONS.get(getattr(func, "__name__", ""))
    if op is None or len(args) < 2 or (kwargs or {}).get("alpha", 1) != 1:
        return None
    a, b = args[0], args[1]
    if not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.is_floating_point()):
        return None
    return "torch.add" if func is torch.add else op


_NOTED: weakref.WeakKeyDictionary[type, set[str]] = weakref.WeakKeyDictionary()  # notes printed per model class


def list_sites(model: nn.Module, rule: SiteRule = "all-bn") -> list[str]:
    """Names of the model's probe sites in network order."""
    return [s.name for s in find_sites(model).select(rule).sites]


def find_sites(model: nn.Module, example: Tensor | None = None, *, quiet: bool = False) -> Layout:
    """Discover every site and every block of `model` from one recorded forward pass (eval mode, no grad).

    Args:
        example: an input batch [N, C, H, W] (default: 2 seeded random images of 32x32, or
            224x224 when the model does not run on 32x32).
        quiet: do not print the notes (what was assumed where the structure is ambiguous).
    """
    record = _record(model, example)
    layout = _read(model, record)
    layout = replace(layout, depth=sum(s.role != "shortcut" for s in layout.sites) + 1)
    said = _NOTED.setdefault(type(model), set())
    for note in () if quiet else layout.notes:
        if note not in said:  # once per class: probing it every epoch, or its seeds one after another, says nothing new
            print(f"warning: {note}", file=sys.stderr)
            said.add(note)
    return layout


def format_layout(layout: Layout) -> str:
    """The sites (index, name, role, stage, block, channels, kernel) and, per block, the addition found."""
    width = max([28] + [len(s.name) + 1 for s in layout.sites])
    lines = [f"{'index':>5}  {'name':<{width}} {'role':<10} {'stage':>5} {'block':>5} {'channels':>8} {'kernel':>6}"]
    lines += [f"{s.index:>5}  {s.name:<{width}} {s.role:<10} {s.stage:>5} {s.block:>5} {s.channels:>8} "
              f"{s.kernel:>4}x{s.kernel}" + ("  (read at the addition)" if s.tap == AT_ADDITION else "")
              for s in layout.sites]
    if layout.blocks:
        named = max([24] + [len(b.name) + 1 for b in layout.blocks])
        lines += ["", f"{'block':<{named}} {'addition':<22} {'F(x) from':<{width}} x from"]
        lines += [f"{b.name:<{named}} {_expression(b):<22} {b.branch_out:<{width}} {b.shortcut or 'the block input'}"
                  for b in layout.blocks]
    return "\n".join(lines)


def _expression(block: Block) -> str:
    """How the block adds F(x) and x, operands in their order: 'F(x) += x', 'x + F(x)', 'none (plain)'."""
    if not block.residual:
        return "none (plain)"
    first, second = ("F(x)", "x") if block.f_operand == 0 else ("x", "F(x)")
    return f"torch.add({first}, {second})" if block.op == "torch.add" else f"{first} {block.op} {second}"


class _Node:
    """A tensor value made during the recorded pass: by which op (in which call), from which values."""

    __slots__ = ("seq", "call", "parents", "kernel", "weighted", "alias", "shape", "returners")

    def __init__(self, seq: int, call: int, parents: tuple[_Node, ...], shape: tuple[int, ...], *,
                 kernel: int | None = None, weighted: bool = False, alias: bool = False):
        self.seq, self.call, self.parents, self.shape = seq, call, parents, shape
        self.kernel, self.weighted, self.alias = kernel, weighted, alias
        self.returners: list[int] = []  # calls that returned this value (innermost first), not as their own input

    def real(self) -> _Node:
        """The value this one aliases (a view or no-op of the same data), or itself."""
        node = self
        while node.alias:
            node = node.parents[0]
        return node


@dataclass
class _Call:
    name: str
    parent: int  # index of the calling module's call, -1 for the model itself
    start: int  # first node number made during the call
    inputs: tuple[_Node, ...]
    output: _Node | None = None


@dataclass(frozen=True)
class _Addition:
    call: int
    ordinal: int
    op: str
    operands: tuple[_Node, _Node]
    result: _Node


@dataclass
class _Record:
    """Everything one forward pass showed: module calls, values, residual-candidate additions."""

    calls: list[_Call]
    additions: list[_Addition]
    first_call: dict[str, int]  # module path -> its first call
    times_called: dict[str, int]


class _Recorder(TorchFunctionMode):
    """Records every torch operation as a `_Node` and every same-shape addition, with the running module."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[int, _Node] = {}  # id(tensor) -> its current value
        self.keep: list[Tensor] = []  # holds every tensor seen, so that no id is reused during the pass
        self.calls: list[_Call] = []
        self.stack: list[int] = []
        self.additions: list[_Addition] = []
        self.counts: dict[int, int] = {}  # call -> additions seen so far
        self.seq = 0

    def node(self, t: Tensor) -> _Node:
        node = self.nodes.get(id(t))
        if node is None:  # an input, parameter or buffer
            node = self._new(t, ())
        return node

    def _new(self, t: Tensor, parents: tuple[_Node, ...], **kw: Any) -> _Node:
        self.seq += 1
        node = _Node(self.seq, self.stack[-1] if self.stack else -1, parents, tuple(t.shape), **kw)
        self.nodes[id(t)] = node
        self.keep.append(t)
        return node

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        inputs = [t for t in _tensors((args, kwargs))]
        parents = tuple(self.node(t) for t in inputs)
        op = addition_op(func, args, kwargs)
        result = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        in_place = name.endswith("_") or name.startswith("__i") or kwargs.get("inplace") is True
        for t in _tensors(result):
            if any(t is i for i in inputs) and not in_place:
                continue  # the same value handed back (a no-op): nothing new
            if any(t is i for i in inputs) or not parents:
                self._new(t, parents)  # in place: a new value in the same tensor
                continue
            first = inputs[0]
            alias = (len(inputs) == 1 and t.data_ptr() == first.data_ptr() and t.shape == first.shape
                     and t.stride() == first.stride() and t.dtype == first.dtype)
            weight = args[1] if len(args) > 1 and isinstance(args[1], Tensor) else None
            kernel = weight.shape[-1] if name.startswith("conv") and weight is not None and weight.ndim >= 3 else None
            self._new(t, parents, kernel=kernel, weighted=name in _WEIGHTED, alias=alias)
        if op is not None and self.stack:
            call = self.stack[-1]
            ordinal = self.counts.get(call, 0)
            self.counts[call] = ordinal + 1
            out = next(iter(_tensors(result)))
            self.additions.append(_Addition(call, ordinal, op, (parents[0], parents[1]), self.node(out)))
        return result

    def enter(self, name: str) -> Callable:
        def pre(module: nn.Module, args: tuple) -> None:
            inputs = tuple(self.node(t) for t in _tensors(args))
            self.calls.append(_Call(name, self.stack[-1] if self.stack else -1, self.seq + 1, inputs))
            self.stack.append(len(self.calls) - 1)

        return pre

    def leave(self, module: nn.Module, args: tuple, out: Any) -> None:
        index = self.stack.pop()
        call = self.calls[index]
        if isinstance(out, Tensor):
            node = self.node(out)
            call.output = node
            if not any(node is i for i in call.inputs):
                node.returners.append(index)


def _tensors(obj: Any) -> Iterator[Tensor]:
    """The tensors in nested tuples, lists and dicts, in order."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _record(model: nn.Module, example: Tensor | None) -> _Record:
    """Run `model` once in eval mode with every module hooked and every operation recorded (modes restored)."""
    reference = next(model.parameters(), None)
    if reference is None:
        raise LayerProbeError(f"{type(model).__name__} has no parameters: nothing to probe")
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first_conv.in_channels if first_conv is not None else 3
    generator = torch.Generator().manual_seed(0)
    examples = [example] if example is not None else [
        torch.randn(2, channels, side, side, generator=generator).to(reference.device, reference.dtype)
        for side in _EXAMPLE_SIZES]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    failures = []
    try:
        for x in examples:
            recorder = _Recorder()
            with Hooks() as hooks:
                for name, module in model.named_modules():
                    hooks.add(module, recorder.enter(name), pre=True)
                    hooks.add(module, recorder.leave)
                try:
                    with torch.no_grad(), recorder:
                        model(x)
                except Exception as e:  # noqa: BLE001 - any failure of the user's forward is reported below
                    failures.append(f"{tuple(x.shape)}: {type(e).__name__}: {first_line(e)}")
                    continue
            first: dict[str, int] = {}
            times: dict[str, int] = {}
            for i, c in enumerate(recorder.calls):
                first.setdefault(c.name, i)
                times[c.name] = times.get(c.name, 0) + 1
            return _Record(recorder.calls, recorder.additions, first, times)
    finally:
        for m, training in modes.items():
            m.training = training
    raise LayerProbeError(f"{type(model).__name__}: the forward pass that finds the sites failed on "
                          f"{'; '.join(failures)}; pass an example input of the right shape to find_sites")


def _within(calls: list[_Call], inner: int, outer: int) -> bool:
    """Whether call `inner` runs inside call `outer` (strictly)."""
    index = calls[inner].parent
    while index != -1:
        if index == outer:
            return True
        index = calls[index].parent
    return False


def _ancestry(node: _Node, call: _Call) -> dict[int, _Node]:
    """The values made during `call` that `node` was computed from (itself included), by id."""
    found: dict[int, _Node] = {}
    todo = [node]
    while todo:
        n = todo.pop()
        if id(n) in found or n.seq < call.start:
            continue
        found[id(n)] = n
        todo.extend(n.parents)
    return found


def _layers_from_input(node: _Node, call: _Call) -> int | None:
    """Most weighted layers (convs, linears) on a path from `call`'s input to `node`; None if there is no path."""
    inputs = {id(n) for n in call.inputs}
    if id(node) in inputs:
        return 0
    best: dict[int, int | None] = {id(n): 0 for n in call.inputs}
    for n in sorted(_ancestry(node, call).values(), key=lambda n: n.seq):
        if id(n) in inputs:
            continue
        paths = [best.get(id(p)) for p in n.parents]
        reach = [p for p in paths if p is not None]
        best[id(n)] = max(reach) + n.weighted if reach else None
    return best[id(node)]


def _kernel_above(node: _Node) -> int:
    """Kernel size of the nearest convolution on the first-input chain that leads to `node` (0 if none)."""
    n: _Node | None = node
    while n is not None and n.kernel is None:
        n = n.parents[0] if n.parents else None
    return n.kernel if n is not None else 0


@dataclass(frozen=True)
class _Found:
    """A site before numbering: where it sits in the recorded pass."""

    name: str
    value: _Node  # the recorded value the site measures
    call: int  # the call that made it
    channels: int
    kernel: int
    tap: str = ""


@dataclass(frozen=True)
class _Placed:
    """A block with where it ran: its call, its (F(x), x) operands (None in a plain net) and its shapes in and out."""

    block: Block
    call: int
    operands: tuple[_Node, _Node] | None
    shape_in: tuple[int, ...]
    shape_out: tuple[int, ...]


def _norm_sites(model: nn.Module, record: _Record) -> list[_Found]:
    """Every norm layer whose input came from a convolution, at its BN value (before a norm-act's activation)."""
    modules = dict(model.named_modules())
    found = []
    for name, index in record.first_call.items():
        call = record.calls[index]
        if not is_norm(modules[name]) or not call.inputs or call.output is None:
            continue
        kernel = call.inputs[0].real().kernel
        if kernel is None:
            continue
        value, tap = call.output, ""
        own = [n for n in _ancestry(call.output, call).values() if n.call == index]
        if own and max(own, key=lambda n: n.seq) is not call.output.real():  # a norm-act: BN, then an activation
            value = max(own, key=lambda n: n.seq)
            child = next((c for c in record.calls[index + 1:] if c.parent == index
                          and any(i is value for i in c.inputs)), None)
            tap = child.name if child is not None else ""
            value = value if child is not None else call.output
        found.append(_Found(name, value, index, value.shape[1] if len(value.shape) > 1 else 1, kernel, tap))
    return found


def _read(model: nn.Module, record: _Record) -> Layout:
    """Blocks from the additions, then every site's role, stage and block from where it sits."""
    kind = type(model).__name__
    calls = record.calls
    notes: list[str] = []
    norms = _norm_sites(model, record)
    by_name = {f.name: f for f in norms}
    blocks: list[_Placed] = []
    per_call: dict[int, list[_Addition]] = {}
    for a in record.additions:
        if record.first_call[calls[a.call].name] == a.call:
            per_call.setdefault(a.call, []).append(a)
    extra: list[_Found] = []
    for index, additions in per_call.items():
        call = calls[index]
        residual = []
        for a in additions:
            depths = [_layers_from_input(n, call) for n in a.operands]
            if depths[0] is None or depths[1] is None:
                continue  # an operand that does not come from the block's input: not a residual addition
            if depths[0] == depths[1]:
                notes.append(f"{kind}: in {call.name or 'the model'}, both operands of an addition ({a.op}) come from "
                             f"the block's input through {depths[0]} layer(s); the first was taken as F(x)")
            f = 1 if depths[1] > depths[0] else 0
            residual.append((a, f))
        if len(residual) > 1:
            notes.append(f"{kind}: {call.name or 'the model'} runs {len(residual)} residual additions; each is "
                         f"taken as its own block ({call.name}:1 ... {call.name}:{len(residual)})")
        # the model's own forward, or one running several additions (a loop over blocks), is no block itself:
        # each block is then the outermost module below it that returned F(x), where one did
        loop = len(residual) > 1 or call.parent == -1
        for k, (a, f) in enumerate(residual, 1):
            name = call.name if len(residual) == 1 else f"{call.name}:{k}"
            fx, x = a.operands[f], a.operands[1 - f]
            real = fx.real()
            made = [r for r in real.returners if _within(calls, r, index)]  # calls returning F(x), innermost first
            if not made:  # computed in the block's own forward: read at the addition
                branch = name
                extra.append(_Found(name, real, index, real.shape[1] if len(real.shape) > 1 else 1,
                                    _kernel_above(real), AT_ADDITION))
            else:
                branch = calls[made[0]].name
                if branch not in by_name:
                    extra.append(_Found(branch, real, made[0], real.shape[1] if len(real.shape) > 1 else 1,
                                        _kernel_above(real)))
            outer = [r for r in x.real().returners if _within(calls, r, index)]
            shortcut = calls[outer[-1]].name if outer and not any(x is i for i in call.inputs) else None
            block = Block(name, branch, True, shortcut, a.op, f, call.name, a.ordinal)
            owner, shape_in = (made[-1] if made else index, x.shape) if loop else (
                index, call.inputs[0].shape if call.inputs else x.shape)
            blocks.append(_Placed(block, owner, (fx, x), shape_in, a.result.shape))
    found = sorted(norms + extra, key=lambda s: s.value.seq)
    for name in dict.fromkeys([f.name for f in found] + [p.block.module for p in blocks]):
        if record.times_called.get(name, 0) > 1:  # a hook sees every call: one response would pool them all
            raise LayerProbeError(f"{kind}: {name} runs {record.times_called[name]} times in one forward pass (shared "
                                  "weights); its calls would pool into one response with no single place in network "
                                  "order, so layer-probe does not probe it")
    if not blocks:
        if norms:
            notes.append(f"{kind}: no residual addition found in a forward pass; treated as a plain network whose "
                         "blocks are the modules holding its conv-BN layers")
        blocks = _plain_blocks(record, norms)
    if not found:
        raise LayerProbeError(f"{kind}: no batch-norm layer after a convolution and no residual addition found in a "
                              "forward pass: nothing to probe")
    adders = tuple(dict.fromkeys(calls[a.call].name for a in record.additions))
    return Layout(_number(found, blocks, calls), tuple(b.block for b in blocks), tuple(dict.fromkeys(notes)), adders)


def _plain_blocks(record: _Record, norms: list[_Found]) -> list[_Placed]:
    """Without additions, a block is the module that calls conv-BN layers (not the model itself); F(x) stands at its last BN."""
    calls = record.calls
    parents: dict[int, list[_Found]] = {}
    for f in norms:
        parent = calls[f.call].parent
        if parent > 0:
            parents.setdefault(parent, []).append(f)
    blocks = []
    for parent, inside in parents.items():
        call = calls[parent]
        out = call.output.shape if call.output is not None else ()
        blocks.append(_Placed(Block(call.name, inside[-1].name, False, None), parent, None,
                              call.inputs[0].shape if call.inputs else out, out))
    return blocks


def _number(found: list[_Found], blocks: list[_Placed], calls: list[_Call]) -> tuple[Site, ...]:
    """Roles, stages and block numbers: a site belongs to the innermost block whose call made it.

    A stage starts at the first block and wherever a block changes the shape of its input or
    starts from another shape than the previous block ended with (Section 4.2's stages of
    feature map sizes).
    """
    numbers: dict[int, tuple[int, int]] = {}  # position in `blocks` -> (stage, block)
    stage, number, previous = 0, 0, None
    for i, b in enumerate(blocks):
        if stage == 0 or b.shape_in != b.shape_out or b.shape_in != previous:
            stage, number = stage + 1, 0
        numbers[i] = (stage, number)
        number, previous = number + 1, b.shape_out
    by_call: dict[int, list[int]] = {}
    for i, b in enumerate(blocks):
        by_call.setdefault(b.call, []).append(i)
    sites = []
    for k, f in enumerate(found, 1):
        owner = f.call
        while owner != -1 and owner not in by_call:
            owner = calls[owner].parent
        if owner == -1:
            sites.append(Site(k, f.name, "stem", 0, -1, f.channels, f.kernel, f.tap))
            continue
        mine = by_call[owner]
        i = next((j for j in mine if blocks[j].block.branch_out == f.name), mine[-1])
        block, operands = blocks[i].block, blocks[i].operands
        role: Role = "inner"
        if block.branch_out == f.name:
            role = "branch_out"
        elif operands is not None and id(f.value) not in _ancestry(operands[0], calls[owner]) and id(
                f.value) in _ancestry(operands[1], calls[owner]):
            role = "shortcut"
        sites.append(Site(k, f.name, role, *numbers[i], f.channels, f.kernel, f.tap))
    return tuple(sites)

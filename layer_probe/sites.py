"""Where to probe: Fig. 7's sites, the BN outputs that follow each conv, with their roles.

Fig. 7 (Section 4.2) records "the outputs of each 3x3 layer, after BN and before other
nonlinearity (ReLU/addition)". For a residual block the last BN output is the residual
function F(x) just before it is added to the shortcut x. Sites are named by their module
paths from `named_modules()`; `list_sites(model)` lists them.

Discovery reads the traced graph (torch.fx): an addition with one input coming from a BN
marks that BN as the block's `branch_out` and the other input as the shortcut x. When a
model cannot be traced, structural rules over the module tree take over.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import fx, nn

from .errors import LayerProbeError

Role = Literal["stem", "inner", "branch_out", "shortcut"]
SiteRule = str  # "3x3", "all-bn", or a regular expression over site names
_ADDS = (torch.add, operator.add, operator.iadd)


@dataclass(frozen=True)
class Site:
    """One probed BN output. `index` is 1-based in network order among the selected sites."""

    index: int
    name: str  # module path of the BN, e.g. "layer2.0.bn2"
    role: Role  # stem | inner | branch_out (F(x), or its position in a plain net) | shortcut
    stage: int  # 0 for the stem, then 1, 2, ... for each stage of blocks
    block: int  # block number within its stage (0-based), -1 for the stem
    channels: int
    kernel: int  # kernel size of the conv feeding the BN (3 for Fig. 7's sites)


@dataclass(frozen=True)
class Block:
    """A block of the network: residual (output = F(x) + x) or plain (same layers, no addition).

    `shortcut` is the module whose output is the x added to F(x) (after any option-A/B
    transform); None means x is the block's own input (an identity shortcut, or a plain block).
    """

    name: str
    branch_out: str
    residual: bool
    shortcut: str | None


@dataclass(frozen=True)
class Layout:
    """All conv->BN sites of a model in network order, and its blocks."""

    sites: tuple[Site, ...]
    blocks: tuple[Block, ...]

    @property
    def residual(self) -> bool:
        return any(b.residual for b in self.blocks)

    def select(self, rule: SiteRule = "3x3") -> Layout:
        """Keep the sites that match `rule`, renumbered 1..k in network order.

        Args:
            rule: "3x3" (Fig. 7: BN after each 3x3 conv, shortcut projections excluded),
                "all-bn" (every conv->BN, including branch outputs after 1x1 convs and
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
                raise LayerProbeError(f"--sites {rule!r} is not '3x3', 'all-bn' or a valid regular expression: {e}") from None
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


def list_sites(model: nn.Module, rule: SiteRule = "all-bn") -> list[str]:
    """Names of the model's probe sites in network order."""
    return [s.name for s in find_sites(model).select(rule).sites]


def find_sites(model: nn.Module) -> Layout:
    """Discover every conv->BN site and every block of `model` (graph first, module tree as fallback)."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any tracing failure falls back to the module tree
        return _from_modules(model)
    return _from_graph(model, graph)


def _from_graph(model: nn.Module, graph: fx.Graph) -> Layout:
    modules = dict(model.named_modules())
    order: list[tuple[str, int]] = []  # (bn name, kernel) in execution order
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.BatchNorm2d):
            src = node.args[0]
            if isinstance(src, fx.Node) and src.op == "call_module" and isinstance(modules.get(src.target), nn.Conv2d):
                if node.target not in (name for name, _ in order):
                    order.append((node.target, modules[src.target].kernel_size[0]))
    residual: dict[str, Block] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _ADDS:
            continue
        args = [a for a in node.args if isinstance(a, fx.Node)]
        if len(args) != 2:
            continue
        block = _owner(node)
        bns = [a for a in args if a.op == "call_module" and a.target in dict(order)]
        if not bns or block is None:
            continue
        # A projection shortcut ends in a BN too; F(x)'s BN is the block's own child.
        own = [a for a in bns if a.target.rpartition(".")[0] == block]
        branch = (own or bns)[0]
        other = args[1] if args[0] is branch else args[0]
        residual[branch.target] = Block(block, branch.target, True, _shortcut_module(other, block))
    return _assemble(model, order, residual)


def _owner(node: fx.Node) -> str | None:
    """Module path of the innermost module whose forward created `node`."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0]


def _shortcut_module(node: fx.Node, block: str) -> str | None:
    """The child of `block` that produced the shortcut x, or None if x is the block's input."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in stack.values():
        if path.rpartition(".")[0] == block:
            return path
    return None


def _from_modules(model: nn.Module) -> Layout:
    """Structural fallback: pair each BN with the conv registered just before it in the same parent."""
    order: list[tuple[str, int]] = []
    residual: dict[str, Block] = {}
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        prefix = f"{parent_name}." if parent_name else ""
        for (_, prev), (name, child) in zip(children, children[1:]):
            if isinstance(child, nn.BatchNorm2d) and isinstance(prev, nn.Conv2d):
                order.append((prefix + name, prev.kernel_size[0]))
        shortcut = next((n for n in ("shortcut", "downsample") if hasattr(parent, n)), None)
        bns = [prefix + n for n, c in children if isinstance(c, nn.BatchNorm2d)]
        if shortcut is not None and bns:
            module = getattr(parent, shortcut)
            has_module = isinstance(module, nn.Module) and not (isinstance(module, nn.Sequential) and len(module) == 0)
            residual[bns[-1]] = Block(parent_name, bns[-1], True, prefix + shortcut if has_module else None)
    return _assemble(model, order, residual)


def _assemble(model: nn.Module, order: list[tuple[str, int]], residual: dict[str, Block]) -> Layout:
    """Give every site its role, stage and block number; add plain blocks where there is no addition."""
    if not order:
        raise LayerProbeError(f"{type(model).__name__} has no Conv2d->BatchNorm2d pair to probe")
    modules = dict(model.named_modules())
    shortcut_paths = [b.shortcut for b in residual.values() if b.shortcut]
    blocks: dict[str, Block] = {b.name: b for b in residual.values()}
    parents = [name.rpartition(".")[0] for name, _ in order]
    if not residual:  # a plain net: a block's last BN stands where F(x) would be
        for name, parent in zip((n for n, _ in order), parents):
            if parent:
                blocks[parent] = Block(parent, name, False, None)
    stages: list[str] = []  # containers of blocks, e.g. "layer1"
    for b in blocks.values():
        container = b.name.rpartition(".")[0]
        if container not in stages:
            stages.append(container)
    by_block = {b.name: b for b in blocks.values()}
    sites = []
    for i, ((name, kernel), parent) in enumerate(zip(order, parents), 1):
        if any(name == p or name.startswith(p + ".") for p in shortcut_paths):
            role: Role = "shortcut"
            parent = next(p for p in shortcut_paths if name.startswith(p + ".")).rpartition(".")[0]
        elif parent in by_block:
            role = "branch_out" if by_block[parent].branch_out == name else "inner"
        else:
            role = "stem"
        if parent in by_block:
            container, _, number = parent.rpartition(".")
            stage, block = stages.index(container) + 1, int(number) if number.isdigit() else 0
        else:
            stage, block = 0, -1
        sites.append(Site(i, name, role, stage, block, modules[name].num_features, kernel))
    ordered_blocks = tuple(sorted(blocks.values(), key=lambda b: [s.name for s in sites].index(b.branch_out)))
    return Layout(tuple(sites), ordered_blocks)

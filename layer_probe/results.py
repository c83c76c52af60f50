"""Results: per-site responses in network order, the sorted view of Fig. 7, and per-block F(x) norms.

`Responses` is indexable by site name or 1-based index, converts to a pandas DataFrame,
and round-trips through JSON with its metadata (checkpoint, data, split, BN mode, axes,
versions).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from .files import write_text
from .data import batches
from .probe import PassResult, run_probe
from .sites import Layout, find_sites

if TYPE_CHECKING:
    import pandas as pd

Axes = Literal["all", "channel"]


@dataclass(frozen=True)
class SiteResponse:
    """The response statistics of one site. `rank` 1 is the largest std (Fig. 7, bottom)."""

    index: int
    name: str
    role: str
    stage: int
    block: int
    channels: int
    std: float  # pooled over all N*C*H*W elements (axes="all") or mean per-channel std (axes="channel")
    mean: float
    rms: float
    rank: int
    nonfinite: int  # NaN/Inf values seen; std and mean are NaN when this is not 0
    channel_std: tuple[float, ...] = ()


@dataclass(frozen=True)
class BlockResponse:
    """How large F(x) is next to x in one block, over images (ratio = ||F(x)|| / ||x|| per image).

    For a plain block F(x) stands for H(x) - x, what a residual block would have to add.
    """

    name: str
    branch_out: str
    residual: bool
    ratio_mean: float
    ratio_p05: float
    ratio_p50: float
    ratio_p95: float
    cosine_mean: float


@dataclass(frozen=True)
class Responses:
    """All sites of one model in network order, with the blocks' F(x) norms and the run's metadata."""

    sites: tuple[SiteResponse, ...]
    blocks: tuple[BlockResponse, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: int | str) -> SiteResponse:
        """A site by name or by its 1-based index."""
        for s in self.sites:
            if s.name == key or s.index == key:
                return s
        raise KeyError(f"no site {key!r}; names: {[s.name for s in self.sites]}")

    def __len__(self) -> int:
        return len(self.sites)

    @property
    def top1(self) -> float:
        return self.meta.get("top1", float("nan"))

    @property
    def label(self) -> str:
        return self.meta.get("label") or self.meta.get("arch", "model")

    def std(self) -> list[float]:
        """Std per site in network order (Fig. 7, top)."""
        return [s.std for s in self.sites]

    def sorted(self) -> tuple[SiteResponse, ...]:
        """Sites by std, descending (Fig. 7, bottom)."""
        return tuple(sorted(self.sites, key=lambda s: s.rank))

    def to_dataframe(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame([{k: v for k, v in asdict(s).items() if k != "channel_std"} for s in self.sites])

    def blocks_dataframe(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame([asdict(b) for b in self.blocks], columns=[f.name for f in fields(BlockResponse)])

    def to_json(self) -> str:
        payload = {**self.meta, "sites": [asdict(s) for s in self.sites], "blocks": [asdict(b) for b in self.blocks]}
        return json.dumps(payload, indent=1, allow_nan=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Responses:
        payload = json.loads(text)
        sites = tuple(SiteResponse(**{**s, "channel_std": tuple(s.get("channel_std", ()))}) for s in payload.pop("sites"))
        blocks = tuple(BlockResponse(**b) for b in payload.pop("blocks", []))
        return cls(sites, blocks, payload)

    def save(self, directory: str | Path) -> tuple[Path, Path]:
        """Write `responses.json` and `responses.csv` into `directory` (atomically)."""
        directory = Path(directory)
        write_text(directory / "responses.json", self.to_json())
        write_text(directory / "responses.csv", self.to_dataframe().to_csv(index=False))
        return directory / "responses.json", directory / "responses.csv"

    @classmethod
    def load(cls, path: str | Path) -> Responses:
        return cls.from_json(Path(path).read_text())


def summarize(result: PassResult, *, axes: Axes = "all", meta: dict[str, Any] | None = None) -> Responses:
    """Turn a probe pass into per-site responses (one host transfer for the whole model)."""
    rec = result.recording
    per_channel = {s.name: rec.moments(s.name) for s in rec.layout.sites}
    pooled = {name: m.reduce(0) for name, m in per_channel.items()}
    values = torch.stack([torch.stack([pooled[n].std(), pooled[n].mean, pooled[n].rms(),
                                       per_channel[n].std().mean()]) for n in per_channel]).cpu().tolist()
    channel_std = {n: tuple(m.std().cpu().tolist()) for n, m in per_channel.items()}
    nonfinite = {n: int(sum(int(c) for c in rec.nonfinite[n])) for n in per_channel}
    stds = [v[0] if axes == "all" else v[3] for v in values]
    order = sorted(range(len(stds)), key=lambda i: (-_sortable(stds[i]), i))
    rank = {i: r for r, i in enumerate(order, 1)}
    sites = tuple(SiteResponse(s.index, s.name, s.role, s.stage, s.block, s.channels, stds[i], values[i][1],
                               values[i][2], rank[i], nonfinite[s.name], channel_std[s.name])
                  for i, s in enumerate(rec.layout.sites))
    blocks = tuple(_block_response(b, rec.blocks[b.name]) for b in rec.layout.blocks if rec.blocks.get(b.name)
                   and rec.blocks[b.name].f_norm)
    info = {"top1": result.top1, "images": result.images, "axes": axes} | (meta or {})
    return Responses(sites, blocks, info)


def _block_response(block, norms) -> BlockResponse:  # noqa: ANN001 - sites.Block, probe.BlockNorms
    ratio = norms.ratio()
    q = torch.quantile(ratio, torch.tensor([0.05, 0.5, 0.95], dtype=ratio.dtype, device=ratio.device)).tolist()
    return BlockResponse(block.name, block.branch_out, block.residual, float(ratio.mean()), *q,
                         float(torch.cat(norms.cosine).mean()))


def _sortable(x: float) -> float:
    return -math.inf if math.isnan(x) else x


@dataclass(frozen=True)
class ProbeConfig:
    """How responses are measured. The paper leaves these open; each is recorded in the results."""

    sites: str = "3x3"  # "3x3" (Fig. 7), "all-bn", or a regular expression over site names
    bn_mode: Literal["eval", "train"] = "eval"  # eval: BN running statistics; train: batch statistics
    axes: Axes = "all"  # all: std over N*C*H*W; channel: mean of per-channel stds
    batch_size: int = 256  # images per forward pass
    ratios: bool = True  # also record ||F(x)||/||x|| and cos(F(x), x) per block
    amp: Literal["bf16"] | None = None  # autocast the forward; statistics stay float64
    compiled: bool = False  # fuse the statistics with torch.compile (same numbers, less overhead)


def measure_responses(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: tuple[float, ...],
                      std: tuple[float, ...], config: ProbeConfig = ProbeConfig(), *,
                      meta: dict[str, Any] | None = None, progress: bool = True, layout: Layout | None = None,
                      merge: Callable[[PassResult], PassResult] | None = None) -> Responses:
    """Probe `model` on uint8 images [N, 32, 32, 3] with labels [N] and summarise the responses.

    `layout` is the model's selected sites when already known (default: `config.sites` of `find_sites(model)`);
    `merge` combines this process's pass with those of other processes (`distributed.Processes.merge`).
    """
    return measure_batches(model, partial(batches, images, labels, config.batch_size, mean, std), config,
                           total=len(labels), meta=meta, progress=progress, layout=layout, merge=merge)


def measure_batches(model: torch.nn.Module, make_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
                    config: ProbeConfig = ProbeConfig(), *, total: int | None = None,
                    meta: dict[str, Any] | None = None, progress: bool = True, layout: Layout | None = None,
                    merge: Callable[[PassResult], PassResult] | None = None) -> Responses:
    """Probe `model` on the batches ([N, 3, H, W] normalised images, [N] labels) that `make_batches()` yields.

    `make_batches` is called once per pass (a second pass counts NaN/Inf values exactly, only if
    there are any), e.g. `partial(data.folder_batches, folder, index, 64, mean, std, "cuda")`.
    """
    layout = layout or find_sites(model).select(config.sites)
    for count_nonfinite in (False, True):
        result = run_probe(model, layout, make_batches(), bn_mode=config.bn_mode, ratios=config.ratios, total=total,
                           amp=config.amp, progress=progress, count_nonfinite=count_nonfinite,
                           compiled=config.compiled)
        if merge is not None:  # every process gets the same merged pass, so all take the same branch here
            result = merge(result)
        if not result.any_nonfinite:
            break
    settings = {"sites_rule": config.sites, "bn_mode": config.bn_mode, "amp": config.amp,
                "batch_size": config.batch_size, "torch": torch.__version__}
    return summarize(result, axes=config.axes, meta=settings | (meta or {}))


def format_table(responses: Responses) -> str:
    """A readable text table of the sites (network order, with each site's rank) and top-1."""
    m = responses.meta
    lines = [f"{m.get('arch', '?')}  {m.get('checkpoint', '')}",
             f"top-1 {responses.top1:.2f}% on {m.get('images', '?')} {m.get('split', '')} images; "
             f"BN {m.get('bn_mode', '?')}, std over {'all N*C*H*W elements' if m.get('axes') == 'all' else 'each channel (mean)'}",
             "", f"{'index':>5}  {'name':<24} {'role':<10} {'channels':>8} {'std':>9} {'rank':>5}"]
    lines += [f"{s.index:>5}  {s.name:<24} {s.role:<10} {s.channels:>8} {s.std:>9.4f} {s.rank:>5}" for s in responses.sites]
    if responses.blocks:
        lines += ["", f"{'block':<12} {'||F(x)||/||x||':>15} {'p5':>7} {'p95':>7} {'cos(F,x)':>9}"]
        lines += [f"{b.name:<12} {b.ratio_mean:>15.3f} {b.ratio_p05:>7.3f} {b.ratio_p95:>7.3f} {b.cosine_mean:>9.3f}"
                  for b in responses.blocks]
    return "\n".join(lines)

"""Results: per-site responses in network order, the sorted view of Fig. 7, and per-block F(x) norms.

`Responses` is indexable by site name or 1-based index, converts to a pandas DataFrame,
and round-trips through JSON with its metadata (checkpoint, data, split, BN mode, axes,
versions).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from .errors import LayerProbeError
from .files import write_text
from .probe import PassResult

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
    # filled in by `analysis.analyze`:
    std_low: float = math.nan  # 95% bootstrap CI of std (batches resampled)
    std_high: float = math.nan
    gamma_std: float = math.nan  # sqrt(mean(γ²) + var(β)): the std for a unit-variance normalised input
    z_var: float = math.nan  # variance of BN's normalised input, mean over channels: what gamma_std assumes is 1


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
    # filled in by `analysis.analyze`:
    number: int = 0  # 1-based, network order
    site_index: int = -1  # Fig. 7 index of the block's branch output
    std: float = math.nan  # of F(x), with its CI
    std_low: float = math.nan
    std_high: float = math.nan
    gamma_std: float = math.nan
    lesion_delta: float = math.nan  # top-1 change (percentage points) when the block is deleted; NaN: cannot be
    separability: float = math.nan  # held-out top-1 of a linear probe on the pooled output (`separability`)


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

    @property
    def residual(self) -> bool:
        """Whether the model has residual additions, as its structure showed when it was measured."""
        return bool(self._structure("residual"))

    @property
    def depth(self) -> int:
        """Weighted layers on the main path (convs and the classifier), read from the model's structure."""
        return int(self._structure("depth"))

    def _structure(self, key: str) -> Any:
        if key not in self.meta:
            raise LayerProbeError(f"{self.label}: these responses do not record the model's {key} "
                                  "(measure them again with layer_probe.measure)")
        return self.meta[key]

    def std(self) -> list[float]:
        """Std per site in network order (Fig. 7, top)."""
        return [s.std for s in self.sites]

    def sorted(self) -> tuple[SiteResponse, ...]:
        """Sites by std, descending (Fig. 7, bottom)."""
        return tuple(sorted(self.sites, key=lambda s: s.rank))

    def to_dataframe(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame([{k: v for k, v in _filled(s).items() if k != "channel_std"} for s in self.sites])

    def blocks_dataframe(self) -> pd.DataFrame:
        import pandas as pd

        columns = [f.name for f in fields(BlockResponse) if f.name not in _BLOCK_ANALYZED or self.analyzed]
        return pd.DataFrame([_filled(b) for b in self.blocks], columns=columns)

    @property
    def analyzed(self) -> bool:
        """Whether `analysis.analyze` filled in the CIs, γ predictions, lesions and separability."""
        return any(b.number for b in self.blocks) or any(not math.isnan(s.gamma_std) for s in self.sites)

    def to_json(self) -> str:
        payload = {**self.meta, "sites": [_filled(s) for s in self.sites], "blocks": [_filled(b) for b in self.blocks]}
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
    if not rec.counted and any(nonfinite.values()):  # flags per batch, not values: no count to report
        raise LayerProbeError("the pass flagged non-finite values without counting them: run it with "
                              "count_nonfinite=True (`measure` does so by itself)")
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


# the fields `analysis.analyze` fills in
_SITE_ANALYZED = {"std_low", "std_high", "gamma_std", "z_var"}
_BLOCK_ANALYZED = {"number", "site_index", "std", "std_low", "std_high", "gamma_std", "lesion_delta", "separability"}


def _filled(item: SiteResponse | BlockResponse) -> dict[str, Any]:
    """The fields of a site or block, without those `analyze` fills in while they are unset."""
    if isinstance(item, BlockResponse):
        extra, unset = _BLOCK_ANALYZED, item.number == 0
    else:  # γ's prediction is NaN at a site that is no BN layer: unset only when every analysed field is
        extra = _SITE_ANALYZED
        unset = all(math.isnan(getattr(item, k)) for k in extra)
    return {k: v for k, v in asdict(item).items() if not (unset and k in extra)}


def _percent(x: float) -> str:
    return "n/a (no labels)" if math.isnan(x) else f"{x:.2f}%"


def _sortable(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def format_table(responses: Responses) -> str:
    """A readable text table of the sites (network order, with each site's rank) and top-1."""
    m = responses.meta
    title = "  ".join(str(v) for v in (m.get("arch") or m.get("label"), m.get("checkpoint")) if v)
    images = " ".join(str(v) for v in (m.get("images", "?"), m.get("split")) if v)
    lines = [title or "model",
             f"top-1 {_percent(responses.top1)} on {images} images; "
             f"BN {m.get('bn_mode', '?')}, std over {'all N*C*H*W elements' if m.get('axes') == 'all' else 'each channel (mean)'}",
             "", f"{'index':>5}  {'name':<24} {'role':<10} {'channels':>8} {'std':>9} {'rank':>5}"]
    lines += [f"{s.index:>5}  {s.name:<24} {s.role:<10} {s.channels:>8} {s.std:>9.4f} {s.rank:>5}" for s in responses.sites]
    if responses.blocks:
        lines += ["", f"{'block':<12} {'||F(x)||/||x||':>15} {'p5':>7} {'p95':>7} {'cos(F,x)':>9}"]
        lines += [f"{b.name:<12} {b.ratio_mean:>15.3f} {b.ratio_p05:>7.3f} {b.ratio_p95:>7.3f} {b.cosine_mean:>9.3f}"
                  for b in responses.blocks]
    return "\n".join(lines)

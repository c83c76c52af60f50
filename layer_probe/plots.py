"""Report plots: Fig. 7's two panels (std by layer index; std sorted descending) and friends.

Plot functions take results and an optional axes, return the figure and never show it;
`save_figure` picks the format from the suffix and writes deterministic files (no dates
in SVG/PDF metadata, fixed hash salt) atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .analysis import Analysis
from .dynamics import History
from .errors import LayerProbeError
from .files import atomic_path
from .models import depth_of
from .results import Responses

Style = Literal["report", "paper"]
FORMATS = (".png", ".pdf", ".svg")
SINGLE_COLUMN = 3.4  # inches, a journal's single-column width


def check_suffix(path: str | Path) -> None:
    """Refuse an output format we cannot write before any work starts."""
    if Path(path).suffix.lower() not in FORMATS:
        raise LayerProbeError(f"{path}: plot format must be one of {', '.join(FORMATS)}")


def _style(style: Style) -> dict:
    import seaborn as sns

    base = sns.axes_style("whitegrid") if style == "report" else sns.axes_style("ticks")
    return base | sns.plotting_context("paper", font_scale=0.9) | {"svg.hashsalt": "layer-probe", "font.family": "DejaVu Sans"}


def _colors(responses: Sequence[Responses]) -> dict[int, tuple]:
    import seaborn as sns

    depths = sorted({r.depth for r in responses})
    return dict(zip(depths, sns.color_palette("colorblind", len(depths))))


def _panels(axes: Sequence[Axes] | None, rows: int, cols: int, figsize: tuple[float, float], **kw: object
            ) -> tuple[Figure, np.ndarray]:
    """The caller's axes (any sequence of rows*cols, so panels compose into their own figures), or new ones."""
    if axes is not None:
        axes = np.asarray(axes, dtype=object).reshape(rows, cols)
        return axes.flat[0].figure, axes
    fig, axes = plt.subplots(rows, cols, figsize=figsize, squeeze=False, layout="constrained", **kw)
    return fig, axes


def plot_responses(responses: Sequence[Responses], *, axes: Sequence[Axes] | None = None,
                   style: Style = "report") -> Figure:
    """Fig. 7: std of each site by layer index (top) and sorted in descending order (bottom).

    Plain nets are dashed, ResNets solid, one colour per depth. Networks of one group (`meta["group"]`:
    seed replicates of one architecture and recipe) are drawn as their mean with a min-max band.
    `axes`: the two panels to draw into.
    """
    groups: dict[str, list[Responses]] = {}
    for r in responses:
        groups.setdefault(r.meta.get("group", r.label), []).append(r)
    with plt.rc_context(_style(style)):
        fig, ((top,), (bottom,)) = _panels(axes, 2, 1, (SINGLE_COLUMN * 1.6, SINGLE_COLUMN * 1.7))
        own = axes is None
        colors = _colors(responses)
        for label, members in groups.items():
            r = members[0]
            kw = {"color": colors[r.depth], "linestyle": "-" if r.residual else "--", "linewidth": 1.0,
                  "label": label if len(members) == 1 else f"{label} ({len(members)} seeds)"}
            ordered = np.array([m.std() for m in members])
            ranked = -np.sort(-ordered, axis=1)
            for ax, x, values in ((top, [s.index for s in r.sites], ordered), (bottom, range(1, len(r) + 1), ranked)):
                ax.plot(x, values.mean(0), **kw)
                if len(members) > 1:
                    ax.fill_between(x, values.min(0), values.max(0), color=kw["color"], alpha=0.2, linewidth=0)
        top.set(xlabel="layer index (3×3 conv, network order)", ylabel="std of BN output")
        bottom.set(xlabel="layer index (sorted by std)", ylabel="std of BN output")
        if style == "paper":
            for ax in (top, bottom):
                ax.spines[["top", "right"]].set_visible(False)
        for ax in (top, bottom):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _legend(fig, top, own)
    return fig


def _legend(fig: Figure, ax: Axes, own: bool) -> None:
    """Beside the panels in a figure of our own; inside `ax` when drawing into the caller's axes."""
    if own:
        fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", frameon=False)
    else:
        ax.legend(frameon=False, fontsize="small")


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Save as PNG (300 dpi), PDF or SVG, chosen by the suffix; deterministic bytes for PDF/SVG."""
    path = Path(path)
    check_suffix(path)
    fmt = path.suffix.lower()[1:]
    metadata = {"png": {"Software": None}, "pdf": {"CreationDate": None, "ModDate": None, "Producer": None},
                "svg": {"Date": None}}[fmt]
    try:
        with atomic_path(path) as tmp, plt.rc_context({"svg.hashsalt": "layer-probe"}):
            fig.savefig(tmp, format=fmt, dpi=300, metadata=metadata)
    finally:
        plt.close(fig)
    return path


def plot_analysis(analysis: Analysis, *, axes: Sequence[Axes] | None = None, style: Style = "report") -> Figure:
    """The F(x) report against block number: std (with 95% CI) beside the gamma prediction,
    ||F(x)||/||x|| (5th-95th percentile band), cos(F(x), x), and the top-1 change when the block is deleted.
    `axes`: the four panels to draw into."""
    blocks = analysis.blocks
    n = [b.number for b in blocks]
    with plt.rc_context(_style(style)):
        fig, grid = _panels(axes, 4, 1, (SINGLE_COLUMN * 1.4, SINGLE_COLUMN * 2.6), sharex=True)
        own, axes = axes is None, grid[:, 0]
        axes[0].errorbar(n, [b.std for b in blocks], yerr=[[b.std - b.std_low for b in blocks],
                         [b.std_high - b.std for b in blocks]], fmt="o-", ms=3, lw=1, capsize=2, label="measured")
        axes[0].plot(n, [b.gamma_std for b in blocks], "s--", ms=3, lw=1, label="predicted by γ, β")
        axes[0].set_ylabel("std of F(x)")
        axes[0].legend(frameon=False, fontsize="small")
        axes[1].fill_between(n, [b.ratio_p05 for b in blocks], [b.ratio_p95 for b in blocks], alpha=0.3, lw=0)
        axes[1].plot(n, [b.ratio_mean for b in blocks], "o-", ms=3, lw=1)
        axes[1].set_ylabel("‖F(x)‖ / ‖x‖")
        axes[2].plot(n, [b.cosine_mean for b in blocks], "o-", ms=3, lw=1)
        axes[2].axhline(0, color="0.5", lw=0.5)
        axes[2].set_ylabel("cos(F(x), x)")
        axes[3].bar(n, [b.lesion_delta for b in blocks], color="C3")
        axes[3].set_ylabel("Δ top-1 when deleted (pp)")
        axes[3].set_xlabel("block (network order)")
        axes[3].xaxis.set_major_locator(MaxNLocator(integer=True))
        title = analysis.meta.get("label") or analysis.meta.get("arch", "")
        fig.suptitle(title, fontsize="medium") if own else axes[0].set_title(title, fontsize="medium")
    return fig


def plot_dynamics(histories: Sequence[History], *, bn_mode: str = "eval", axes: Sequence[Axes] | None = None,
                  style: Style = "report") -> Figure:
    """For each model: a heatmap of std (layer index x epoch) on a colour scale shared by all
    models, the mean std per stage against epoch, and the mean ||F(x)||/||x|| per stage.

    Each model's trajectory is under `bn_mode` from epoch 1 on; epoch 0 is always under batch
    statistics (`History.mode`). Std is drawn on log scales; the colours span the 1st to 99th
    percentile of all values, and values beyond saturate, marked by the colour bar's arrows."""
    import seaborn as sns
    from matplotlib.colors import LogNorm

    stds = pd.concat([h.mode(bn_mode)["std"] for h in histories])
    low, high = np.percentile(stds[stds > 0], [1, 99])
    norm = LogNorm(vmin=float(low), vmax=float(max(high, low * 1.01)))
    with plt.rc_context(_style(style)):
        own = axes is None
        fig, axes = _panels(axes, len(histories), 3, (SINGLE_COLUMN * 2.6, 1.9 * len(histories) + 0.4),
                            gridspec_kw={"width_ratios": [1.6, 1, 1]})
        for i, (row, h) in enumerate(zip(axes, histories)):
            matrix = h.std_matrix(bn_mode)
            sns.heatmap(matrix, ax=row[0], norm=norm, cmap="viridis", cbar=i == 0,
                        cbar_kws={"label": "std of BN output (log scale)", "extend": "both"},
                        xticklabels=max(1, matrix.shape[1] // 8), yticklabels=max(1, matrix.shape[0] // 6))
            row[0].invert_yaxis()
            row[0].set(title=h.label, xlabel="epoch", ylabel="layer index")
            stages = h.per_stage(bn_mode)
            for stage, part in stages.groupby("stage"):
                name = "stem" if stage == 0 else f"stage {stage}"
                row[1].plot(part.epoch, part["std"], lw=1, label=name, color=f"C{stage}")
                if part["ratio"].notna().any():
                    row[2].plot(part.epoch, part["ratio"], lw=1, label=name, color=f"C{stage}")
            row[1].set(xlabel="epoch", ylabel="mean std", yscale="log")
            row[2].set(xlabel="epoch", ylabel="mean ‖F(x)‖/‖x‖")
        _legend(fig, axes[0][1], own)
    return fig


def plot_training_curves(logs: dict[str, pd.DataFrame], *, axes: Sequence[Axes] | None = None,
                         style: Style = "report") -> Figure:
    """Fig. 6's style: training error (dashed) and test error (solid) per epoch, plain nets left, ResNets right."""
    with plt.rc_context(_style(style)):
        fig, grid = _panels(axes, 1, 2, (SINGLE_COLUMN * 2, SINGLE_COLUMN * 0.9), sharey=True)
        axes = grid[0]
        for ax, kind in zip(axes, ("plain", "resnet")):
            names = [n for n in logs if n.rsplit("/", 1)[-1].startswith(kind)]
            for i, name in enumerate(sorted(names, key=depth_of)):
                log = logs[name]
                ax.plot(log.epoch, log.train_error, "--", color=f"C{i}", lw=1)
                ax.plot(log.epoch, log.test_error, "-", color=f"C{i}", lw=1.2, label=name)
            ax.set(xlabel="epoch", title="plain" if kind == "plain" else "ResNet")
            if names:
                ax.legend(frameon=False, fontsize="small", title="dashed: train, solid: test",
                          title_fontsize="x-small")
        axes[0].set_ylabel("error (%)")
    return fig


def plot_rise(during: pd.DataFrame, ends: Mapping[str, pd.DataFrame] | None = None, *,
              axes: Sequence[Axes] | None = None, style: Style = "report") -> Figure:
    """The rise in the last layers (last site's std / the others' median): per epoch of training, one line per
    column of `during` (index: epoch); then one panel per table of `ends` (title -> table indexed by network),
    its `rise` (running statistics) and `rise_batch` (batch statistics) at the end of training. A dotted line
    marks 1, no rise."""
    ends = dict(ends or {})
    with plt.rc_context(_style(style)):
        fig, grid = _panels(axes, 1, 1 + len(ends), (SINGLE_COLUMN * (1 + len(ends)), SINGLE_COLUMN * 0.9))
        first, *rest = grid[0]
        for name, rise in during.items():
            first.plot(rise.index, rise.to_numpy(), lw=1, label=name)
        first.axhline(1, color="grey", lw=0.8, ls=":")
        first.set(title="during training", xlabel="epoch", ylabel="last site's std / others' median")
        first.legend(frameon=False, fontsize="small")
        for ax, (title, table) in zip(rest, ends.items()):
            y = np.arange(len(table))
            ax.plot(table["rise"], y, "o", label="running statistics")
            ax.plot(table["rise_batch"], y, "x", label="batch statistics")
            ax.axvline(1, color="grey", lw=0.8, ls=":")
            ax.set(title=title, yticks=y, yticklabels=table.index, xlabel="rise at the end of training")
            ax.invert_yaxis()
        if rest:
            rest[0].legend(frameon=False, fontsize="small")
    return fig

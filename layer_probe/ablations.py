"""Which training choice makes the rise of the std in the last layers? (Section 4.2, Fig. 7)

Each ablation retrains resnet20 with the `fast` recipe and one switch (`make ablations`), paired
with the shipped resnet20; the `faithful` resnet20 and its seed replicates give the spread a
difference must exceed. One hypothesis per ablation:

- `no-smoothing`: label smoothing caps how far the logits grow, and so the last block's scale;
- `normalized-head`: the classifier needs large-scale features (a BN without affine before it
  takes that need away);
- `frozen-last-bn`: the last BN's learned γ and β carry the rise (it keeps γ = 1, β = 0); whether
  the last block does more of the classification is read from its lesion damage and linear-probe gain;
- `faithful` against `no-smoothing`: weight decay on γ and β sets the response scale (the rise and
  the mean std over sites).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from torch import Tensor

from .analysis import AnalysisConfig, analyze, rise_ratio
from .checkpoint import checkpoints_dir, load_checkpoint
from .measurement import measure_images

ABLATIONS = ("no-smoothing", "normalized-head", "frozen-last-bn")
# each group -> (the group it is paired with, the hypothesis the pair tests)
PAIRS = {"no-smoothing": ("fast", "label smoothing caps logit growth"),
         "normalized-head": ("fast", "the classifier demands scale"),
         "frozen-last-bn": ("fast", "the last BN's learned γ and β carry the rise"),
         "faithful": ("no-smoothing", "weight decay on γ and β sets the response scale")}
# (statistic, BN mode) -> its column in the ablation table
STATISTICS = {("rise", "eval"): "rise", ("rise", "train"): "rise_batch",
              ("mean std", "eval"): "mean_std", ("mean std", "train"): "mean_std_batch"}


@dataclass(frozen=True)
class Run:
    """One trained network of the ablation study: its label, group and checkpoint."""

    label: str  # e.g. "fast", "no-smoothing", "faithful seed 1"
    group: str  # "fast" (the shipped run), an ablation name, or "faithful"
    path: Path


def find_runs(folder: str | Path | None = None) -> list[Run]:
    """The resnet20 runs that exist under `folder` (default: the repository's `checkpoints/`): the shipped
    one, the ablations, the faithful seeds."""
    folder = Path(folder) if folder is not None else checkpoints_dir()
    runs = [Run("fast", "fast", folder / "resnet20.pt")]
    runs += [Run(name, name, folder / "ablations" / f"resnet20-{name}.pt") for name in ABLATIONS]
    runs += [Run(f"faithful seed {s}", "faithful", folder / "faithful" / ("resnet20.pt" if s == 0 else
                                                                           f"resnet20-seed{s}.pt")) for s in range(3)]
    return [r for r in runs if r.path.exists()]


def ablation_table(runs: Sequence[Run], images: Tensor, labels: Tensor, config: AnalysisConfig = AnalysisConfig(),
                   *, progress: bool = True) -> pd.DataFrame:
    """Per run: top-1, the rise [CI], and the last block's γ-predicted std, ||F(x)||/||x||, lesion damage and
    gain in linear-probe top-1, each against the median of the other blocks (analyses are cached), all with
    BN's running statistics; and `rise_batch` and `mean_std_batch`, with batch statistics on the same images."""
    rows = []
    for run in runs:
        ckpt = load_checkpoint(run.path)
        a, _ = analyze(ckpt.model, images, labels, ckpt.mean, ckpt.std, config, meta={"label": run.label},
                       progress=progress, cache=True)
        batch = measure_images(ckpt.model, images, labels, ckpt.mean, ckpt.std, replace(config.probe, bn_mode="train"),
                               progress=False)
        e = a.rise.evidence
        rows.append({"run": run.label, "group": run.group, "top1": a.meta["top1"], "rise": a.rise.ratio,
                     "rise_low": a.rise.low, "rise_high": a.rise.high,
                     "rise_batch": float(rise_ratio(batch.std(), config.rise_k)),
                     "mean_std": float(np.mean([site.std for site in a.sites])),
                     "mean_std_batch": float(np.mean(batch.std())),
                     "gamma_std_last": e["gamma_std_last"], "gamma_std_rest": e["gamma_std_rest_median"],
                     "ratio_last": e["ratio_last_block"], "ratio_rest": e["ratio_other_blocks_median"],
                     "lesion_last": e["lesion_last_block"], "lesion_rest": e["lesion_other_blocks_median"],
                     "probe_gain_last": e["separability_gain_last_block"],
                     "probe_gain_rest": e["separability_gain_other_blocks_median"]})
    return pd.DataFrame(rows)


def verdicts(table: pd.DataFrame) -> pd.DataFrame:
    """Per pair of `PAIRS`, statistic and BN mode: the group's value (the mean over its runs) against the one it
    is paired with, and whether the difference falls outside the spread (max - min) of the faithful seeds, the
    only spread measured. Without two seeds, no verdict."""
    rows = []
    for (statistic, mode), column in STATISTICS.items():
        if column not in table:
            continue
        seeds = table[table.group == "faithful"][column]
        spread = float(seeds.max() - seeds.min()) if len(seeds) >= 2 else np.nan
        for name, (against, hypothesis) in PAIRS.items():
            value, base = (table[table.group == g][column] for g in (name, against))
            if value.empty or base.empty:
                continue
            diff = float(value.mean() - base.mean())
            verdict = (f"no verdict: {len(seeds)} seed replicate(s), two are needed" if np.isnan(spread) else
                       "outside the seed spread" if abs(diff) > spread else "within the seed spread")
            rows.append({"ablation": name, "against": against, "bn_mode": mode,
                         "statistic": statistic, "hypothesis": hypothesis, "value": float(value.mean()),
                         "baseline": float(base.mean()), "difference": diff, "seeds": len(seeds),
                         "seed_spread": spread, "verdict": verdict})
    return pd.DataFrame(rows)

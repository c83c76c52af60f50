"""Response dynamics: how each site's std and each block's ||F(x)||/||x|| change while a network trains.

`layer-probe train` appends them to `<checkpoint stem>.history.csv` after every epoch (epoch 0
is the initialisation), under BN's running statistics (`bn_mode` eval) and batch statistics
(train). This module reads those histories and answers the questions Fig. 7 cannot: do residual
functions start near zero or learn to be small, when do plain and residual nets part ways, and
does the rise in the last layers exist from the start?

At initialisation only batch statistics describe the network: its running statistics are still
BN's defaults (mean 0, variance 1), so eval-mode BN would pass the raw conv outputs through. The
figures "at initialisation" therefore always come from the batch-statistics rows.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .checkpoint import torch_load
from .errors import LayerProbeError
from .analysis import rise_ratio
from .models import depth_of, is_plain
from .train import HISTORY_FIELDS, epochs_path, history_path


@dataclass(frozen=True)
class History:
    """One run's response history in long format: one row per epoch, BN mode and site."""

    label: str
    frame: pd.DataFrame

    @property
    def plain(self) -> bool:
        return is_plain(self.label)

    @property
    def depth(self) -> int:
        return depth_of(self.label)

    def mode(self, bn_mode: str = "eval") -> pd.DataFrame:
        """The trajectory under one BN mode: its rows from epoch 1 on, and epoch 0 under batch statistics
        (the only ones that describe an untrained network)."""
        f = self.frame
        return f[((f.bn_mode == bn_mode) & (f.epoch > 0)) | ((f.bn_mode == "train") & (f.epoch == 0))]

    def std_matrix(self, bn_mode: str = "eval") -> pd.DataFrame:
        """std as a table: rows are sites (layer index), columns are epochs."""
        return self.mode(bn_mode).pivot(index="index", columns="epoch", values="std")

    def per_stage(self, bn_mode: str = "eval") -> pd.DataFrame:
        """Mean std and mean ||F(x)||/||x|| of each stage at each epoch."""
        return (self.mode(bn_mode).groupby(["epoch", "stage"])
                .agg(std=("std", "mean"), ratio=("ratio", "mean")).reset_index())

    def mean_std(self, bn_mode: str = "eval") -> pd.Series:
        """Per epoch: the mean std over sites."""
        return self.mode(bn_mode).groupby("epoch")["std"].mean()

    def mean_ratio(self, bn_mode: str = "eval") -> pd.Series:
        """Per epoch: the mean ||F(x)||/||x|| over blocks."""
        return self.mode(bn_mode).groupby("epoch")["ratio"].mean()

    def rise(self, bn_mode: str = "eval") -> pd.Series:
        """Per epoch: Fig. 7's rise (`analysis.rise_ratio`) of the sites' stds."""
        return self.std_matrix(bn_mode).apply(lambda column: rise_ratio(column.to_numpy()))


def read_history(path: str | Path, label: str | None = None) -> History:
    """A history from a `.history.csv`, from the checkpoint it sits beside, or from a training run folder."""
    path = Path(path)
    if path.is_dir():
        state = path / "state.pt"
        if not state.exists():
            raise LayerProbeError(f"{path}: not a training run folder (no state.pt)")
        saved = torch_load(state)  # untrusted like any checkpoint: damaged or hostile files give one clear error
        if not isinstance(saved, dict) or not isinstance(saved.get("history_csv"), str):
            raise LayerProbeError(f"{state}: not a saved training run (it holds no response history)")
        text = saved["history_csv"]
        name = path.name
    else:
        csv = path if path.name.endswith(".history.csv") else history_path(path)
        if not csv.exists():
            raise LayerProbeError(f"{path}: no response history found ({csv.name} is missing; histories are written "
                                  "by `layer-probe train` unless --no-probe was given)")
        try:
            text, name = csv.read_text(), csv.name.removesuffix(".history.csv")
        except UnicodeDecodeError as e:
            raise LayerProbeError(f"{csv}: not a readable response history ({e.reason})") from None
    try:
        frame = pd.read_csv(io.StringIO(text))
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise LayerProbeError(f"{path}: not a readable response history ({e})") from None
    missing = set(HISTORY_FIELDS) - set(frame.columns)
    if missing or frame.empty:
        raise LayerProbeError(f"{path}: not a response history (missing columns {sorted(missing)} or no rows)")
    return History(label or name, frame)


def ordering_epoch(resnet: History, plain: History, bn_mode: str = "eval") -> int | None:
    """The first epoch from which the ResNet's mean std stays below the plain net's to the end (None: never)."""
    r, p = resnet.mean_std(bn_mode), plain.mean_std(bn_mode)
    below = (r < p).reindex(sorted(set(r.index) & set(p.index)))
    if below.empty or not below.iloc[-1]:
        return None
    flips = np.flatnonzero(~below.to_numpy())
    return int(below.index[flips[-1] + 1]) if len(flips) else int(below.index[0])


def summary(histories: list[History]) -> pd.DataFrame:
    """Per model: mean std, rise and mean ratio at initialisation (batch statistics) and at the end (running
    statistics, and batch statistics where recorded), and for ResNets the epoch from which they respond less
    than the plain net of the same depth (running statistics)."""
    plains = {h.depth: h for h in histories if h.plain}
    rows = []
    for h in histories:
        last = int(h.frame.epoch.max())
        row = {"model": h.label, "epochs": last}
        for name, series in (("std", History.mean_std), ("rise", History.rise), ("ratio", History.mean_ratio)):
            final, batch = series(h, "eval"), series(h, "train")
            row |= {f"{name}_init": batch.get(0, np.nan), f"{name}_final": final.get(last, np.nan),
                    f"{name}_final_batch": batch.get(last, np.nan) if last > 0 else np.nan}
        partner = plains.get(h.depth) if not h.plain else None
        rows.append(row | {"below_plain_from_epoch": ordering_epoch(h, partner) if partner else None})
    return pd.DataFrame(rows)


def read_epochs(checkpoint: str | Path) -> pd.DataFrame:
    """The per-epoch training log written beside a checkpoint (train/test error in percent, lr, speed)."""
    path = epochs_path(checkpoint)
    if not path.exists():
        raise LayerProbeError(f"{checkpoint}: no training log ({path.name} is missing)")
    return pd.read_csv(path)

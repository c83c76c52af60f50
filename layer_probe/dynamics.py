"""Response dynamics: how each site's std and each block's ||F(x)||/||x|| change while a network trains.

`layer-probe train` appends them to `<checkpoint stem>.history.csv` after every epoch (epoch 0
is the initialisation). This module reads those histories and answers the questions Fig. 7
cannot: do residual functions start near zero or learn to be small, when do plain and residual
nets part ways, and does the rise in the last layers exist from the start?
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .checkpoint import torch_load
from .errors import LayerProbeError
from .models import depth_of, is_plain
from .train import epochs_path, history_path

HISTORY_COLUMNS = ["epoch", "index", "name", "role", "std", "ratio"]


@dataclass(frozen=True)
class History:
    """One run's response history in long format (one row per epoch and site), with a stage column."""

    label: str
    frame: pd.DataFrame

    @property
    def plain(self) -> bool:
        return is_plain(self.label)

    @property
    def depth(self) -> int:
        return depth_of(self.label)

    def std_matrix(self) -> pd.DataFrame:
        """std as a table: rows are sites (layer index), columns are epochs."""
        return self.frame.pivot(index="index", columns="epoch", values="std")

    def per_stage(self) -> pd.DataFrame:
        """Mean std and mean ||F(x)||/||x|| of each stage at each epoch."""
        return (self.frame.groupby(["epoch", "stage"])
                .agg(std=("std", "mean"), ratio=("ratio", "mean")).reset_index())

    def mean_std(self) -> pd.Series:
        """Per epoch: the mean std over sites."""
        return self.frame.groupby("epoch")["std"].mean()

    def rise(self) -> pd.Series:
        """Per epoch: the last site's std over the median std of the others (Fig. 7's rise)."""
        m = self.std_matrix()
        return m.iloc[-1] / m.iloc[:-1].median()


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
    missing = set(HISTORY_COLUMNS) - set(frame.columns)
    if missing or frame.empty:
        raise LayerProbeError(f"{path}: not a response history (missing columns {sorted(missing)} or no rows)")
    frame["stage"] = frame["name"].map(_stage)
    return History(label or name, frame)


def _stage(name: str) -> int:
    found = re.match(r"layer(\d+)\.", name)
    return int(found.group(1)) if found else 0


def ordering_epoch(resnet: History, plain: History) -> int | None:
    """The first epoch from which the ResNet's mean std stays below the plain net's to the end (None: never)."""
    r, p = resnet.mean_std(), plain.mean_std()
    below = (r < p).reindex(sorted(set(r.index) & set(p.index)))
    if below.empty or not below.iloc[-1]:
        return None
    flips = np.flatnonzero(~below.to_numpy())
    return int(below.index[flips[-1] + 1]) if len(flips) else int(below.index[0])


def summary(histories: list[History]) -> pd.DataFrame:
    """Per model: mean std and rise at initialisation and at the end, mean ratio at both, and
    for ResNets the epoch from which they respond less than the plain net of the same depth."""
    plains = {h.depth: h for h in histories if h.plain}
    rows = []
    for h in histories:
        first, last = h.frame.epoch.min(), h.frame.epoch.max()
        rise, mean_std = h.rise(), h.mean_std()
        ratios = h.frame.groupby("epoch")["ratio"].mean()
        partner = plains.get(h.depth) if not h.plain else None
        rows.append({"model": h.label, "epochs": int(last), "std_init": mean_std[first],
                     "std_final": mean_std[last], "rise_init": rise[first],
                     "rise_final": rise[last], "ratio_init": ratios[first], "ratio_final": ratios[last],
                     "below_plain_from_epoch": ordering_epoch(h, partner) if partner else None})
    return pd.DataFrame(rows)


def read_epochs(checkpoint: str | Path) -> pd.DataFrame:
    """The per-epoch training log written beside a checkpoint (train/test error in percent, lr, speed)."""
    path = epochs_path(checkpoint)
    if not path.exists():
        raise LayerProbeError(f"{checkpoint}: no training log ({path.name} is missing)")
    return pd.read_csv(path)

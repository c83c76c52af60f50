"""Integrity of the files in checkpoints/, not a test of the code: `make check-shipped` runs it.

Each file (the shipped five, the ablations, the faithful runs) matches its card's sha256 and its own epoch log and history, and the logs show Section 4.2's
degradation problem. These compare files the training wrote from the same variables, so they catch a
file changed or mixed up after training, not a bug in the code that wrote them.
"""

import hashlib

import pandas as pd
import pytest

from layer_probe.checkpoint import load_checkpoint
from test_shipped import CHECKPOINTS, shipped

TRAINED = sorted(CHECKPOINTS.glob("*.pt")) + sorted(CHECKPOINTS.glob("*/*.pt"))


@pytest.mark.parametrize("path", TRAINED, ids=[p.relative_to(CHECKPOINTS).with_suffix("").as_posix() for p in TRAINED])
def test_card_and_log_agree_with_the_file(path):
    name = path.relative_to(CHECKPOINTS).with_suffix("").as_posix()
    row = next((line for line in (CHECKPOINTS / "README.md").read_text().splitlines()
                if line.startswith(f"| {name} |")), "")
    assert hashlib.sha256(path.read_bytes()).hexdigest() in row
    meta = load_checkpoint(path).meta
    log = pd.read_csv(path.with_suffix(".epochs.csv"))
    assert log.epoch.tolist() == list(range(1, meta["recipe"]["epochs"] + 1)) and meta["epochs"] == len(log)
    assert meta["top1"] == pytest.approx(100 - log.test_error.iloc[-1])
    assert meta["train_error"] == pytest.approx(log.train_error.iloc[-1])
    history = pd.read_csv(path.with_suffix(".history.csv"))
    assert sorted(set(history.epoch)) == list(range(len(log) + 1))


def test_the_logs_show_the_degradation_problem():
    """Section 4.2: plain56 ends with a higher training error than plain20; resnet56 with a lower one than resnet20."""
    final = {p.stem: pd.read_csv(p.with_suffix(".epochs.csv")).train_error.iloc[-1]
             for p in shipped("plain20", "plain56", "resnet20", "resnet56")}
    assert final["plain56"] > final["plain20"] and final["resnet56"] < final["resnet20"], final

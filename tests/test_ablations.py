import math

import pandas as pd
import pytest
import torch

from conftest import run, trained_like
from layer_probe.ablations import Run, ablation_table, find_runs, verdicts
from layer_probe.analysis import AnalysisConfig
from layer_probe.checkpoint import save_checkpoint
from layer_probe.measurement import ProbeConfig

NORM = {"normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}


def test_find_runs_lists_the_resnet20_runs_that_exist(tmp_path):
    for rel in ("resnet20.pt", "ablations/resnet20-no-smoothing.pt", "faithful/resnet20.pt",
                "faithful/resnet20-seed2.pt", "faithful/plain20.pt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).touch()
    assert [(r.label, r.group) for r in find_runs(tmp_path)] == [
        ("fast", "fast"), ("no-smoothing", "no-smoothing"), ("faithful seed 0", "faithful"),
        ("faithful seed 2", "faithful")]


def test_table_reads_each_runs_analysis_and_its_batch_statistics(tmp_path):
    """Known answer: with β = 0, the last BN's running variance ×4 halves its eval-mode output, so the
    running-statistics rise halves, while batch statistics never read running variances: that rise stays put."""
    base, widened = trained_like("resnet8", seed=0), trained_like("resnet8", seed=0)
    for model in (base, widened):
        model.layer3[-1].bn2.bias.data.zero_()
    widened.layer3[-1].bn2.running_var.mul_(4)
    runs = []
    for model, (label, group) in zip((base, widened), [("fast", "fast"), ("no-smoothing", "no-smoothing")]):
        path = tmp_path / f"{label}.pt"
        save_checkpoint(path, model, "resnet8", meta=NORM)
        runs.append(Run(label, group, path))
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8, generator=g), torch.arange(40) % 10
    config = AnalysisConfig(probe=ProbeConfig(batch_size=10), bootstrap=50, lesion_images=None)
    table = ablation_table(runs, images, labels, config, progress=False).set_index("run")
    assert (table["rise_low"] <= table["rise_high"]).all()
    assert table.loc["no-smoothing", "rise"] == pytest.approx(table.loc["fast", "rise"] / 2, rel=1e-3)
    assert table.loc["no-smoothing", "rise_batch"] == pytest.approx(table.loc["fast", "rise_batch"], rel=1e-6)
    assert table.loc["fast", "rise_batch"] != pytest.approx(table.loc["fast", "rise"], rel=1e-2)
    assert table.loc["no-smoothing", "mean_std_batch"] == pytest.approx(table.loc["fast", "mean_std_batch"], rel=1e-6)
    assert table.loc["no-smoothing", "mean_std"] < table.loc["fast", "mean_std"]
    judged = verdicts(table.reset_index())
    assert judged[["statistic", "bn_mode", "verdict"]].values.tolist() == [
        [s, m, "no verdict: 0 seed replicate(s), two are needed"] for s in ("rise", "mean std") for m in ("eval", "train")]


def test_a_difference_counts_only_outside_the_seed_spread():
    table = pd.DataFrame({"run": ["fast", "no-smoothing", "frozen-last-bn", "s0", "s1", "s2"],
                          "group": ["fast", "no-smoothing", "frozen-last-bn", "faithful", "faithful", "faithful"],
                          "rise": [1.70, 1.20, 1.65, 1.50, 1.58, 1.54],
                          "rise_batch": [1.30, 1.29, 1.00, 1.10, 1.12, 1.11]})
    judged = verdicts(table).query("statistic == 'rise'").set_index(["ablation", "bn_mode"])
    assert math.isclose(judged.loc[("no-smoothing", "eval"), "seed_spread"], 0.08)
    assert judged.loc[("no-smoothing", "eval"), "verdict"] == "outside the seed spread"  # -0.50
    assert judged.loc[("frozen-last-bn", "eval"), "verdict"] == "within the seed spread"  # -0.05
    assert math.isclose(judged.loc[("no-smoothing", "train"), "seed_spread"], 0.02)
    assert judged.loc[("no-smoothing", "train"), "verdict"] == "within the seed spread"  # -0.01
    assert judged.loc[("frozen-last-bn", "train"), "verdict"] == "outside the seed spread"  # -0.30
    faithful = judged.loc[("faithful", "eval")]  # the seeds' mean 1.54 against no-smoothing's 1.20
    assert faithful.against == "no-smoothing" and math.isclose(faithful.difference, 0.34)
    assert faithful.verdict == "outside the seed spread"


def test_ablations_command_without_runs_is_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "ablations", "--checkpoints", tmp_path)
    assert code == 2 and err.strip() == f"layer-probe: error: no resnet20 runs under {tmp_path} (train them with `make ablations`)"

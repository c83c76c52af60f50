from dataclasses import replace

import pandas as pd
import pytest

from layer_probe.cli import main
from layer_probe.dynamics import ordering_epoch, read_history, summary
from layer_probe.errors import LayerProbeError
from layer_probe.train import RECIPES, TrainConfig, train


def write(tmp_path, label, stds_by_epoch, batch_stds=None):
    """A history file: stds_by_epoch[e] lists the eval-mode std of sites 1..S at epoch e (epoch 0's under batch
    statistics), batch_stds[e] those under batch statistics from epoch 1 (default: eval's + 1);
    ratios are half the std of every branch output (even index)."""
    batch_stds = batch_stds or [[s + 1 for s in stds] for stds in stds_by_epoch[1:]]
    names = ["bn1"] + [f"layer{1 + i // 4}.{(i // 2) % 2}.bn{1 + i % 2}" for i in range(len(stds_by_epoch[0]) - 1)]
    rows = []
    for mode, runs in (("train", [stds_by_epoch[0]] + batch_stds), ("eval", [[9.0] * len(names)] + stds_by_epoch[1:])):
        for epoch, stds in enumerate(runs):  # epoch 0's eval rows: raw conv outputs, which no figure may use
            for i, (name, s) in enumerate(zip(names, stds), 1):
                branch = name.endswith("bn2")
                stage = 0 if i == 1 else 1 + (i - 2) // 4
                rows.append({"epoch": epoch, "bn_mode": mode, "index": i, "name": name,
                             "role": "branch_out" if branch else ("stem" if i == 1 else "inner"), "stage": stage,
                             "block": -1 if i == 1 else ((i - 2) // 2) % 2, "std": s, "ratio": s / 2 if branch else None})
    path = tmp_path / f"{label}.history.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_summary_and_ordering_against_hand_computed_values(tmp_path):
    res = read_history(write(tmp_path, "resnet20", [[1, 2, 3, 4, 8], [1, 1, 1, 1, 3], [0.5, 0.5, 0.5, 0.5, 2]]))
    plain = read_history(write(tmp_path, "plain20", [[1, 1, 1, 1, 1], [1, 1, 2, 1, 1], [1, 1, 1, 1, 1]]))
    assert ordering_epoch(res, plain) == 2  # epoch 0: 3.6 vs 1; epoch 1: 1.4 vs 1.2; epoch 2: 0.8 vs 1
    assert ordering_epoch(res, plain, "train") == 2  # batch statistics: eval + 1 from epoch 1 on
    table = summary([res, plain]).set_index("model")
    assert table.loc["resnet20", "std_init"] == pytest.approx(3.6)  # batch statistics, never eval's 9
    assert table.loc["resnet20", "rise_init"] == pytest.approx(8 / 2.5)  # last over the median of the rest
    assert table.loc["resnet20", "rise_final"] == pytest.approx(4.0)
    assert table.loc["resnet20", "rise_final_batch"] == pytest.approx(3 / 1.5)
    assert table.loc["resnet20", "std_final_batch"] == pytest.approx(1.8)
    assert table.loc["resnet20", "ratio_init"] == pytest.approx((3 / 2 + 8 / 2) / 2)  # mean over the branch outputs (sites 3 and 5)
    assert table.loc["resnet20", "below_plain_from_epoch"] == 2 and pd.isna(table.loc["plain20", "below_plain_from_epoch"])
    assert list(res.per_stage().query("epoch == 0")["stage"]) == [0, 1]
    assert res.std_matrix().loc[:, 0].tolist() == [1, 2, 3, 4, 8]


def test_never_below_is_none(tmp_path):
    res = read_history(write(tmp_path, "resnet20", [[1, 1, 1], [2, 2, 2]]))
    plain = read_history(write(tmp_path, "plain20", [[2, 2, 2], [1, 1, 1]]))
    assert ordering_epoch(res, plain) is None


def test_history_from_checkpoint_history_file_and_run_folder_agree(tmp_path, tree):
    cfg = TrainConfig(arch="resnet8", out=tmp_path / "r8.pt", recipe=replace(RECIPES["fast"], epochs=1, batch_size=20),
                      data=str(tree), run_dir=tmp_path / "run", probe_images=20, progress=False, precision="fp32")
    train(cfg)
    a, b = read_history(cfg.out), read_history(tmp_path / "run")
    pd.testing.assert_frame_equal(a.frame, b.frame)
    assert a.label == "r8" and sorted(set(a.frame.epoch)) == [0, 1]
    assert main(["dynamics", str(cfg.out), "--plot", str(tmp_path / "dyn.png"), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "dyn.png").exists() and (tmp_path / "o" / "dynamics.csv").exists()


def test_missing_or_wrong_history(tmp_path):
    with pytest.raises(LayerProbeError, match="no response history"):
        read_history(tmp_path / "model.pt")
    (tmp_path / "x.history.csv").write_text("a,b\n1,2\n")
    with pytest.raises(LayerProbeError, match="not a response history"):
        read_history(tmp_path / "x.history.csv")


def test_damaged_history_file(tmp_path):
    (tmp_path / "y.history.csv").write_bytes(b'epoch,index\n"unterminated\n\xff\xfe')
    with pytest.raises(LayerProbeError, match="response history"):
        read_history(tmp_path / "y.history.csv")

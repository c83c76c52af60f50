from dataclasses import replace

import pytest

from layer_probe.cli import main
from layer_probe.train import RECIPES, TrainConfig, train

pytestmark = pytest.mark.slow


def test_report_writes_every_figure_and_table(tmp_path, tree, capsys):
    paths = []
    for arch in ("resnet8", "plain8"):
        cfg = TrainConfig(arch=arch, out=tmp_path / "ckpt" / f"{arch}.pt", recipe=replace(RECIPES["fast"], epochs=1,
                          batch_size=20), data=str(tree), run_dir=tmp_path / arch, probe_images=20, progress=False)
        paths.append(str(train(cfg)))
    out = tmp_path / "report"
    assert main(["report", *paths, "--out", str(out), "--data", str(tree), "--limit", "40", "--device", "cpu"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "fig7.png", "fig7.pdf", "comparison.json", "tests.csv", "dynamics.png", "dynamics.csv",
            "training_curves.png", "resnet8_blocks.png", "plain8_blocks.png"} <= names
    text = (out / "report.md").read_text()
    assert "resnet8 vs plain8" in text and "JPEG" in text and "![Fig. 7](fig7.png)" in text
    assert (out / "resnet8" / "analysis.json").exists() and (out / "plain8" / "responses.json").exists()

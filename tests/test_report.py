import hashlib
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from layer_probe.checkpoint import load_checkpoint, save_checkpoint
from layer_probe.cli import main
from layer_probe.models import build_model
from layer_probe.train import RECIPES, TrainConfig, train

pytestmark = pytest.mark.slow


def trained(tmp_path, tree, epochs=1):
    paths = []
    for arch in ("resnet8", "plain8"):
        cfg = TrainConfig(arch=arch, out=tmp_path / "ckpt" / f"{arch}.pt", recipe=replace(
            RECIPES["fast"], epochs=epochs, batch_size=20), data=str(tree), run_dir=tmp_path / arch, probe_images=20,
            progress=False, precision="fp32")
        paths.append(str(train(cfg)))
    return paths


def test_checkpoint_card_lists_each_file_with_its_checksum_and_log(tmp_path, tree, capsys):
    paths = trained(tmp_path, tree, epochs=2)
    card = tmp_path / "ckpt"
    assert main(["checkpoints", *paths, "--write", str(card)]) == 0
    printed = capsys.readouterr().out
    readme = (card / "README.md").read_text()
    assert (card / "training_curves.png").stat().st_size > 10_000 and "![training curves](training_curves.png)" in readme
    for path, arch in zip(paths, ("resnet8", "plain8")):
        row = next(line for line in readme.splitlines() if line.startswith(f"| {arch} |"))
        log = pd.read_csv(path.replace(".pt", ".epochs.csv"))
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        assert digest in row and digest in printed and "| fast | batch_size=20 | fp32 | 2 |" in row  # switches, precision
        assert f"| {log.train_error.iloc[-1]:.4g} | {100 - log.test_error.iloc[-1]:.4g} |" in row


def test_checkpoints_without_a_training_summary_are_refused(tmp_path, capsys):
    path = tmp_path / "bare.pt"
    save_checkpoint(path, build_model("resnet8"), "resnet8")
    assert main(["checkpoints", str(path)]) == 2
    assert "not trained by `layer-probe train`" in capsys.readouterr().err


def test_report_writes_every_figure_and_table(tmp_path, tree, capsys):
    paths = trained(tmp_path, tree)
    out = tmp_path / "report"
    assert main(["report", *paths, "--out", str(out), "--data", str(tree), "--limit", "40", "--device", "cpu"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "fig7.png", "fig7.pdf", "comparison.json", "tests.csv", "dynamics.png", "dynamics.csv",
            "training_curves.png", "resnet8_blocks.png", "plain8_blocks.png"} <= names
    text = (out / "report.md").read_text()
    assert "resnet8 vs plain8" in text and "JPEG" in text and "![Fig. 7](fig7.png)" in text
    assert (out / "resnet8" / "analysis.json").exists() and (out / "plain8" / "responses.json").exists()
    # the numbers in it are those of an independent measurement of the same files on the same images
    import json

    from conftest import stored_activations
    from layer_probe.data import CIFAR_MEAN, CIFAR_STD, batches, load_cifar10, to_tensors

    images, labels = to_tensors(load_cifar10(tree, "test"), 40)
    saved = json.loads((out / "resnet8" / "responses.json").read_text())
    model = load_checkpoint(paths[0]).model
    names = [s["name"] for s in saved["sites"]]
    stored, logits = stored_activations(model.eval(), names, list(batches(images, labels, 40, CIFAR_MEAN, CIFAR_STD)))
    assert [s["std"] for s in saved["sites"]] == pytest.approx([float(stored[n].std()) for n in names], rel=1e-6)
    assert saved["top1"] == pytest.approx(100 * float((logits.argmax(1) == labels).double().mean()))
    assert f"{saved['top1']:.4g}" in text  # the summary table carries it

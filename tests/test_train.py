from dataclasses import replace

import pandas as pd
import pytest
import torch

from layer_probe.checkpoint import load_checkpoint
from layer_probe.data import CIFAR_MEAN, CIFAR_STD, load_cifar10, to_tensors
from layer_probe.errors import LayerProbeError
from layer_probe.results import ProbeConfig, measure_responses
from layer_probe.train import RECIPES, TrainConfig, augment, epochs_path, history_path, lr_at, train

TINY = replace(RECIPES["fast"], epochs=2, batch_size=20)


def config(tmp_path, tree, **kw):
    return TrainConfig(arch="resnet8", out=tmp_path / "r8.pt", recipe=kw.pop("recipe", TINY), data=str(tree),
                       run_dir=tmp_path / "run", probe_images=20, progress=False, **kw)


def test_augment_keeps_shapes_and_pixels():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 32, 32, 3), dtype=torch.uint8)
    out = augment(images, g)
    assert out.shape == images.shape and out.dtype == torch.uint8
    for img, aug in zip(images, out):  # every output is a shifted, maybe flipped, zero-padded copy
        padded = torch.nn.functional.pad(img, (0, 0, 4, 4, 4, 4))
        found = any(torch.equal(aug, c) or torch.equal(aug, c.flip(1))
                    for dy in range(9) for dx in range(9) for c in [padded[dy:dy + 32, dx:dx + 32]])
        assert found
    flips = [torch.equal(a, i.flip(1)) for a, i in zip(augment(images, g), images)]
    assert 0 < sum(flips) < 64  # drawn per image, not once per batch


def test_schedules():
    paper = RECIPES["paper"]
    assert lr_at(paper, 0, 64000, "resnet56") == 0.1 and lr_at(paper, 0, 64000, "resnet110") == pytest.approx(0.01)
    assert lr_at(paper, 40000, 64000, "resnet56") == pytest.approx(0.01)
    assert lr_at(paper, 50000, 64000, "resnet56") == pytest.approx(0.001)
    fast = RECIPES["fast"]
    lrs = [lr_at(fast, i, 100, "resnet20") for i in range(100)]
    assert max(lrs) == pytest.approx(fast.lr) and lrs[-1] < 0.01 and lrs[0] < lrs[20]


def test_training_lowers_the_loss_and_writes_checkpoint_logs_and_history(tmp_path, tree):
    cfg = config(tmp_path, tree, recipe=replace(TINY, epochs=4))
    train(cfg)
    log = pd.read_csv(epochs_path(cfg.out))
    assert list(log["epoch"]) == [1, 2, 3, 4] and log["train_loss"].iloc[-1] < log["train_loss"].iloc[0]
    ckpt = load_checkpoint(cfg.out)
    assert ckpt.arch == "resnet8" and ckpt.meta["epochs"] == 4 and ckpt.meta["recipe"]["name"] == "fast"
    assert ckpt.meta["dataset"] == tree.name  # the data's name, not this machine's absolute path
    assert len(ckpt.meta["dataset_sha256"]) == 64 and ckpt.meta["top1"] == pytest.approx(100 - log["test_error"].iloc[-1])
    history = pd.read_csv(history_path(cfg.out))
    assert sorted(set(history["epoch"])) == [0, 1, 2, 3, 4] and len(history) == (1 + 4 * 2) * 7
    # epoch 0 with batch statistics only (an untrained net's running statistics are BN's defaults), then both
    assert history.groupby("epoch")["bn_mode"].apply(sorted).tolist() == [["train"] * 7] + [["eval"] * 7 + ["train"] * 7] * 4
    assert history[(history.role == "branch_out")]["ratio"].notna().all()


def test_epoch0_history_is_batch_statistics_of_the_seeded_initialisation(tmp_path, tree):
    cfg = config(tmp_path, tree, recipe=replace(TINY, epochs=0))
    train(cfg)
    history = pd.read_csv(history_path(cfg.out))
    torch.manual_seed(cfg.seed)
    from layer_probe.models import build_model
    fresh = build_model("resnet8").eval()  # the same seeded initialisation, probed independently
    images, labels = to_tensors(load_cifar10(tree, "test"), cfg.probe_images, seed=cfg.seed)
    r = measure_responses(fresh, images, labels, CIFAR_MEAN, CIFAR_STD, ProbeConfig(batch_size=500, bn_mode="train"),
                          progress=False)
    assert set(history["bn_mode"]) == {"train"}
    assert history["std"].tolist() == pytest.approx(r.std(), rel=1e-6)
    # known answer: BN with γ = 1, β = 0 on batch statistics outputs unit variance, up to its eps
    assert history["std"].tolist() == pytest.approx([1.0] * len(history), abs=1e-3)


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, tree):
    whole = config(tmp_path / "a", tree)
    train(whole)
    first = config(tmp_path / "b", tree, recipe=replace(TINY, epochs=2))
    # Interrupt after epoch 1 by running a 2-epoch recipe only to epoch 1: stop via a raising callback.
    import layer_probe.train as t

    original, calls = t.top1, {"n": 0}

    def evaluate_then_die(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # test evaluation of epoch 2: simulate a kill mid-epoch
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    t.top1 = evaluate_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            train(first)
    finally:
        t.top1 = original
    with pytest.raises(LayerProbeError, match="--resume"):
        train(first)
    train(first, resume=True)
    a, b = load_checkpoint(whole.out).model.state_dict(), load_checkpoint(first.out).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert pd.read_csv(epochs_path(first.out))["epoch"].tolist() == [1, 2]
    assert pd.read_csv(history_path(first.out))["std"].tolist() == pd.read_csv(history_path(whole.out))["std"].tolist()


def test_resume_refuses_another_recipe(tmp_path, tree):
    train(config(tmp_path, tree, recipe=replace(TINY, epochs=1)))
    with pytest.raises(LayerProbeError, match=r"another recipe \(epochs differ: epochs=1\)"):
        train(config(tmp_path, tree, recipe=replace(TINY, epochs=3)), resume=True)


def test_resuming_a_finished_run_keeps_the_checkpoint_bytes(tmp_path, tree, capsys):
    cfg = config(tmp_path, tree, recipe=replace(TINY, epochs=1))
    train(cfg)
    assert f"wrote {cfg.out}" in capsys.readouterr().out
    before = cfg.out.read_bytes()
    cfg.out.touch()
    stamp = cfg.out.stat().st_mtime_ns
    train(cfg, resume=True)
    assert cfg.out.read_bytes() == before and cfg.out.stat().st_mtime_ns == stamp
    printed = capsys.readouterr().out
    assert "already trained (1 epochs)" in printed and "wrote" not in printed

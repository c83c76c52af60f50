import io
from dataclasses import replace

import pandas as pd
import pytest
import torch

from layer_probe.checkpoint import load_checkpoint
from layer_probe.data import CIFAR_MEAN, CIFAR_STD, load_cifar10, to_tensors
from layer_probe.errors import LayerProbeError
from layer_probe.measurement import ProbeConfig, measure_images
from layer_probe.train import RECIPES, TrainConfig, augment, epochs_path, history_path, lr_at, train
from conftest import TINY, config


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
    assert len(ckpt.meta["dataset_sha256"]) == 64
    # top-1 recorded against the saved weights run here on every test image, by plain argmax
    images, labels = to_tensors(load_cifar10(tree, "test"))
    x = (images.permute(0, 3, 1, 2).float() / 255 - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        CIFAR_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        direct = 100.0 * float((ckpt.model.eval()(x).argmax(1) == labels).double().mean())
    assert ckpt.meta["top1"] == pytest.approx(direct, abs=1e-9)
    history = pd.read_csv(history_path(cfg.out))
    assert sorted(set(history["epoch"])) == [0, 1, 2, 3, 4] and len(history) == 5 * 2 * 7
    assert history.groupby("epoch")["bn_mode"].apply(sorted).tolist() == [["eval"] * 7 + ["train"] * 7] * 5
    assert history[(history.role == "branch_out")]["ratio"].notna().all()


def test_epoch0_history_is_batch_statistics_of_the_seeded_initialisation(tmp_path, tree):
    cfg = config(tmp_path, tree, recipe=replace(TINY, epochs=0))
    train(cfg)
    history = pd.read_csv(history_path(cfg.out))
    torch.manual_seed(cfg.seed)
    from layer_probe.models import build_model
    fresh = build_model("resnet8").eval()  # the same seeded initialisation, probed independently
    images, labels = to_tensors(load_cifar10(tree, "test"), cfg.probe_images, seed=cfg.seed)
    r = measure_images(fresh, images, labels, CIFAR_MEAN, CIFAR_STD, ProbeConfig(batch_size=500, bn_mode="train"),
                          progress=False)
    history = history[history.bn_mode == "train"]
    assert history["std"].tolist() == pytest.approx(r.std(), rel=1e-6)
    # known answer: BN with γ = 1, β = 0 on batch statistics outputs unit variance, up to its eps
    assert history["std"].tolist() == pytest.approx([1.0] * len(history), abs=1e-3)


def test_rederive_epoch0_keeps_a_matching_history_and_refuses_other_weights(tmp_path, tree):
    from layer_probe.train import rederive_epoch0

    cfg = config(tmp_path, tree, recipe=replace(TINY, epochs=1))
    train(cfg)
    path = history_path(cfg.out)
    recorded = pd.read_csv(path)
    rederive_epoch0(cfg.out, tree)
    assert pd.read_csv(path).equals(recorded)  # the run's own initialisation: rows and order kept
    tampered = recorded.copy()  # another initialisation: batch statistics keep std at 1, F(x)/x moves
    tampered.loc[tampered.epoch == 0, "ratio"] *= 1.01
    tampered.to_csv(path, index=False)
    with pytest.raises(LayerProbeError, match=r"epoch 0 \(\w+\) differs from a probe of the rebuilt"):
        rederive_epoch0(cfg.out, tree)
    assert pd.read_csv(path).equals(tampered)  # nothing rewritten


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
    assert not epochs_path(first.out).exists() and not history_path(first.out).exists()  # only with the checkpoint
    assert pd.read_csv(epochs_path(first.state_dir / "state.pt"))["epoch"].tolist() == [1]  # the run's own copy
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


def test_a_checkpoint_whose_saved_run_is_elsewhere_is_kept_or_refused_never_overwritten(tmp_path, tree, capsys):
    """A clone holds the checkpoints but not the runs that made them: `make faithful` there must not retrain."""
    cfg = config(tmp_path, tree, recipe=replace(TINY, epochs=1))
    train(cfg)
    before = cfg.out.read_bytes()
    elsewhere = replace(cfg, run_dir=tmp_path / "fresh-machine", data=str(tmp_path / "no-data-here"))
    capsys.readouterr()
    assert train(elsewhere, resume=True) == cfg.out  # the same settings: kept, and no data loaded
    assert capsys.readouterr().out == f"resnet8: already trained ({cfg.out} records these settings), kept\n"
    for other, resume in [(elsewhere, False), (replace(elsewhere, seed=1), True),
                          (replace(elsewhere, recipe=replace(TINY, epochs=2)), True)]:
        with pytest.raises(LayerProbeError, match="exists and .* holds no run of it: pass another --out"):
            train(other, resume=resume)
    assert cfg.out.read_bytes() == before and not (tmp_path / "fresh-machine" / "state.pt").exists()


def test_resume_across_a_precision_change_records_each_epochs_precision(tmp_path, tree, capsys, monkeypatch):
    train(config(tmp_path, tree, recipe=replace(TINY, epochs=1), precision="bf16"))
    out = train(config(tmp_path, tree, recipe=replace(TINY, epochs=1), precision="fp32"), resume=True)
    assert "already trained" in capsys.readouterr().out  # finished runs are kept
    cfg = config(tmp_path / "b", tree, precision="bf16")
    train_first_epoch(cfg, monkeypatch)
    train(replace(cfg, precision="fp32"), resume=True)
    printed = capsys.readouterr().out
    assert f"resuming after epoch 1 of 2 ({cfg.state_dir})" in printed and "epochs 1-1 ran in bf16" in printed
    assert pd.read_csv(epochs_path(cfg.out))["precision"].tolist() == ["bf16", "fp32"]
    assert load_checkpoint(cfg.out).meta["precision"] == "bf16+fp32" and out.exists()


def test_each_epoch_names_its_machine_and_a_log_saved_before_that_still_resumes(tmp_path, tree, monkeypatch):
    import layer_probe.train as t

    cfg = config(tmp_path, tree)
    monkeypatch.setattr(t, "machine", lambda device: "First CPU, 2 cores, avx2")
    train_first_epoch(cfg, monkeypatch)
    state = torch.load(cfg.state_dir / "state.pt", weights_only=False)
    log = pd.read_csv(io.StringIO(state["epochs_csv"]))
    assert log["device"].tolist() == ["First CPU, 2 cores, avx2"]
    state["epochs_csv"] = log.drop(columns="device").to_csv(index=False)  # as saved before logs named the machine
    torch.save(state, cfg.state_dir / "state.pt")
    monkeypatch.setattr(t, "machine", lambda device: "Second CPU, 2 cores, avx2 avx512f")
    train(cfg, resume=True)
    log = pd.read_csv(epochs_path(cfg.out), keep_default_na=False)
    assert list(log.columns) == list(t.EPOCH_FIELDS) and log["epoch"].tolist() == [1, 2]
    assert log["device"].tolist() == ["", "Second CPU, 2 cores, avx2 avx512f"]
    assert load_checkpoint(cfg.out).meta["device"] == "unrecorded + Second CPU, 2 cores, avx2 avx512f"


def train_first_epoch(cfg: TrainConfig, monkeypatch) -> None:
    """Train `cfg` (2 epochs) and stop, as a kill would, right after epoch 1's state is saved."""
    import layer_probe.train as t

    def save_then_stop(*args):
        original(*args)
        raise KeyboardInterrupt

    original = t._save_state
    monkeypatch.setattr(t, "_save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(t, "_save_state", original)


def test_recipes_decay_what_they_say_and_freeze_the_last_branch_bn():
    from layer_probe.train import initial_model, param_groups

    fast, faithful = RECIPES["fast"], RECIPES["faithful"]
    assert (faithful.decay_all, faithful.label_smoothing) == (True, 0.0) and RECIPES["paper"].decay_all
    assert replace(faithful, name="fast", decay_all=False, label_smoothing=0.1) == fast  # only the two departures
    model = initial_model("resnet8", fast, 0)
    decayed = {id(p) for g in param_groups(model, fast) if g["weight_decay"] > 0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names == {n for n, _ in model.named_parameters() if n.endswith("weight") and "bn" not in n}
    groups = param_groups(model, faithful)
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(model.parameters()))
    frozen = initial_model("resnet8", replace(fast, freeze_last_bn=True), 0)
    assert [n for n, p in frozen.named_parameters() if not p.requires_grad] == ["layer3.0.bn2.weight", "layer3.0.bn2.bias"]
    assert all("layer3.0.bn2" not in n for g in param_groups(frozen, fast) for p in g["params"]
               for n, q in frozen.named_parameters() if q is p)
    seeded = initial_model("resnet8", fast, 0).state_dict()  # the same seed rebuilds the same initialisation
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in seeded.items())


def test_frozen_bn_and_normalized_head_survive_training_and_reload(tmp_path, tree):
    cfg = config(tmp_path, tree, recipe=replace(TINY, epochs=1, freeze_last_bn=True, head="normalized"))
    train(cfg)
    ckpt = load_checkpoint(cfg.out)
    bn = ckpt.model.layer3[0].bn2
    assert torch.equal(bn.weight, torch.ones(64)) and torch.equal(bn.bias, torch.zeros(64))
    assert ckpt.model.head_bn is not None and not ckpt.model.head_bn.affine
    assert ckpt.meta["recipe"]["head"] == "normalized" and ckpt.meta["recipe"]["freeze_last_bn"]

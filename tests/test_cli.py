import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conftest import FOLDER_IMAGES, needs_compiler, run
from layer_probe.checkpoint import save_checkpoint
from layer_probe.cli import main
from layer_probe.data import IMAGENET_MEAN, IMAGENET_STD
from conftest import eval_crop
from conftest import stored_activations, trained_like


def test_responses_table(ckpt, tree, capsys):
    code, out, err = run(capsys, "responses", ckpt, "--data", tree, "--device", "cpu")
    assert code == 0 and "layer3.0.bn2" in out and "top-1" in out and "on 60 test images" in out


def test_responses_json_out_and_plot(ckpt, tree, capsys, tmp_path):
    code, out, _ = run(capsys, "responses", ckpt, "--data", tree, "--format", "json", "--limit", "30",
                       "--out", tmp_path / "out", "--plot", tmp_path / "fig7.svg", "--split", "train")
    assert code == 0
    payload = json.loads(out)
    assert {"checkpoint", "arch", "top1", "images", "sites"} <= payload.keys()
    assert payload["images"] == 30 and payload["split"] == "train" and payload["arch"] == "resnet8"
    assert set(payload["sites"][0]) >= {"index", "name", "role", "channels", "std", "mean", "rank"}
    assert json.loads((tmp_path / "out" / "responses.json").read_text())["sites"] == payload["sites"]
    assert (tmp_path / "out" / "responses.csv").exists() and (tmp_path / "fig7.svg").exists()


@needs_compiler
def test_compiled_statistics_give_the_same_table(ckpt, tree, capsys):
    _, eager, _ = run(capsys, "responses", ckpt, "--data", tree, "--format", "json")
    code, fused, err = run(capsys, "responses", ckpt, "--data", tree, "--format", "json", "--compile")
    assert code == 0 and "compiling the fused statistics" in err
    pairs = [(a["std"], b["std"]) for a, b in zip(json.loads(eager)["sites"], json.loads(fused)["sites"], strict=True)]
    assert all(abs(a - b) <= 1e-6 * a for a, b in pairs)


def test_csv_format(ckpt, tree, capsys):
    code, out, _ = run(capsys, "responses", ckpt, "--data", tree, "--format", "csv")
    assert code == 0 and out.splitlines()[0].startswith("index,name,role") and len(out.splitlines()) == 8


def test_sites_command(capsys):
    code, out, _ = run(capsys, "sites", "resnet50", "--sites", "3x3")
    sites, blocks = out.split("\n\n")
    assert code == 0 and "layer4.2.bn2" in sites and len(sites.splitlines()) == 1 + 16  # header + the 3x3 convs
    assert len(blocks.splitlines()) == 1 + 16  # header + one addition per bottleneck block
    assert blocks.splitlines()[1].split() == ["layer1.0", "F(x)", "+=", "x", "layer1.0.bn3", "layer1.0.downsample"]


@pytest.mark.parametrize("make, argv, message", [
    (None, ["responses", "missing.pt"], "no such file"),
    ("text", ["responses", "{p}"], "not a readable PyTorch checkpoint"),
    ("ambiguous", ["responses", "{p}"], "pass --arch resnet8 or --arch plain8"),
    ("ckpt", ["responses", "{p}", "--data", "{tmp}/none"], "dataset not found"),
    ("ckpt", ["responses", "{p}"], "LAYER_PROBE_DATA"),
    ("ckpt", ["responses", "{p}", "--plot", "{tmp}/fig.gif"], "plot format"),
    ("ckpt", ["responses", "{p}", "--sites", "nope"], "no site matches"),
    (None, ["train", "--arch", "resnet21"], "unknown architecture"),
])
def test_user_errors_are_one_line_with_exit_code_2(make, argv, message, tmp_path, capsys, ckpt, tree):
    path = tmp_path / "x.pt"
    if make == "text":
        path.write_text("hello")
    elif make == "ambiguous":
        torch.save(trained_like("resnet8").state_dict(), path)
    elif make == "ckpt":
        path = ckpt
    argv = [a.format(p=path, tmp=tmp_path) for a in argv]
    if argv[0] == "train":
        argv += ["--data", str(tree), "--out", str(tmp_path / "t.pt"), "--run-dir", str(tmp_path / "run")]
    code, out, err = run(capsys, *argv)
    assert code == 2, err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_argument_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["responses", "x.pt", "--limit", "0"])
    assert e.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_unwritable_out_is_reported_before_work(ckpt, tree, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(capsys, "responses", ckpt, "--data", tree, "--out", blocker / "sub")
    assert code == 2 and "cannot write" in err


@pytest.mark.parametrize("arch, n_sites, n_branch", [("resnet18", 20, 8),
                                                     pytest.param("resnet50", 53, 16, marks=pytest.mark.slow)])
def test_imagenet_folder_with_torchvision_weights(arch, n_sites, n_branch, image_folder, tmp_path, capsys):
    """A torchvision state_dict on an ImageNet-style folder: the arch read from the keys, std as torch.std gives it."""
    model = trained_like(arch)
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    code, out, err = run(capsys, "responses", tmp_path / "weights.pth", "--imagenet", image_folder, "--sites", "all-bn",
                         "--batch-size", 4, "--workers", 0, "--format", "json", "--device", "cpu")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["arch"] == arch and payload["images"] == 6 and payload["split"] == "val"
    assert len(payload["sites"]) == n_sites and [s["role"] for s in payload["sites"]].count("branch_out") == n_branch
    assert len(payload["blocks"]) == n_branch
    crops = np.stack([eval_crop(image_folder / cls / name) for cls, name, _, _ in FOLDER_IMAGES]) / 255
    x = torch.from_numpy((crops - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).permute(0, 3, 1, 2).float()
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    stored, logits = stored_activations(model, [s["name"] for s in payload["sites"]], [(x[:4], y[:4]), (x[4:], y[4:])])
    assert payload["top1"] == pytest.approx(100 * (logits.argmax(1) == y).double().mean().item())
    for s in payload["sites"]:
        a = stored[s["name"]]
        assert s["std"] == pytest.approx(a.std().item(), rel=1e-5)
        assert s["channel_std"] == pytest.approx(a.transpose(0, 1).reshape(a.shape[1], -1).std(1).tolist(), rel=1e-5)


def test_imagenet_and_data_together_is_an_error(ckpt, tree, image_folder, capsys):
    code, _, err = run(capsys, "responses", ckpt, "--data", tree, "--imagenet", image_folder)
    assert code == 2 and "either --data" in err


def test_compare_set_pairs_networks_by_seed_and_counts_where_a_claim_holds(tree, capsys, tmp_path, monkeypatch):
    """`--set faithful` reads checkpoints/faithful/, pairs resnet20 with plain20 of the same seed and reports
    "holds in k of n". Known answer: every BN's γ and β ×3 makes a network respond far more than its partner of
    the same seed; in seed 0 plain20 is scaled (the claim holds), in seed 1 resnet20 (it does not)."""
    from layer_probe import checkpoint

    monkeypatch.setattr(checkpoint, "repository_root", lambda: tmp_path)
    folder = tmp_path / "checkpoints" / "faithful"
    folder.mkdir(parents=True)
    for arch in ("plain20", "resnet20"):
        for seed in (0, 1):
            model = trained_like(arch, seed)
            if (arch == "plain20") == (seed == 0):
                for m in model.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.weight.data.mul_(3)
                        m.bias.data.mul_(3)
            meta = {"normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}, "seed": seed,
                    "recipe": {"name": "faithful"}}
            save_checkpoint(folder / (f"{arch}.pt" if seed == 0 else f"{arch}-seed{seed}.pt"), model, arch, meta=meta)
    code, out, _ = run(capsys, "compare", "--set", "faithful", "--data", tree, "--init-seeds", 0, "--bn-modes", "eval",
                       "--out", tmp_path / "o")
    assert code == 0
    claims = pd.read_csv(tmp_path / "o" / "claims.csv")
    assert claims[["claim", "recipe", "seed", "models", "holds"]].values.tolist() == [
        ["resnet_below_plain_20", "faithful", 0, "faithful/resnet20 vs faithful/plain20", True],
        ["resnet_below_plain_20", "faithful", 1, "faithful/resnet20-seed1 vs faithful/plain20-seed1", False]]
    row = next(line for line in out.splitlines() if line.split()[:3] == ["resnet_below_plain_20", "faithful", "eval"])
    assert row.split()[3:5] == ["1", "2"]  # holds in 1 of 2
    assert "claims holding under every BN mode and seed measured: none" in out


def test_compare_tests_every_claim_under_both_bn_modes_beside_initialisation(tree, capsys, tmp_path):
    norm = {"normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    paths = []
    for arch, seed in (("plain8", 1), ("resnet8", 2)):
        paths.append(tmp_path / f"{arch}.pt")
        save_checkpoint(paths[-1], trained_like(arch, seed), arch, meta=norm)
    code, out, _ = run(capsys, "compare", *paths, "--data", tree, "--init-seeds", 2, "--out", tmp_path / "o")
    assert code == 0 and "BN eval (running statistics)" in out and "BN train (batch statistics)" in out
    import pandas as pd

    claims = pd.read_csv(tmp_path / "o" / "claims.csv")
    assert claims[["claim", "bn_mode"]].values.tolist() == [["resnet_below_plain_8", "eval"],
                                                            ["resnet_below_plain_8", "train"]]
    closeness = pd.read_csv(tmp_path / "o" / "closeness.csv")
    assert closeness[["model", "bn_mode", "init_seeds"]].values.tolist() == [
        ["plain8", "eval", 2], ["plain8", "train", 2], ["resnet8", "eval", 2], ["resnet8", "train", 2]]
    assert (tmp_path / "o" / "train" / "resnet8" / "responses.json").exists()
    # the initialisation baseline is the architecture's seeded He init measured with batch statistics
    from layer_probe.analysis import closeness_summary
    from layer_probe.data import load_cifar10, to_tensors
    from layer_probe.measurement import ProbeConfig, measure_images
    from layer_probe.models import build_model

    images, labels = to_tensors(load_cifar10(tree, "test"))
    expected = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        r = measure_images(build_model("resnet8").eval(), images, labels, (0.5,) * 3, (0.25,) * 3,
                           ProbeConfig(bn_mode="train"), progress=False)
        expected.append(closeness_summary(r)["mean_ratio"])
    row = closeness[closeness.model == "resnet8"].iloc[0]
    assert row["init_mean_ratio"] == pytest.approx(np.mean(expected), rel=1e-9)

import os
import pickle
from pathlib import Path

import pytest
import torch
import torchvision

from layer_probe.checkpoint import infer_arch, load_checkpoint, read_file, save_checkpoint
from layer_probe.errors import LayerProbeError
from layer_probe.models import build_model


def public_layout(model):
    """The akamaster layout: {'state_dict': {'module.' + key}} without num_batches_tracked, plus best_prec1."""
    state = {f"module.{k}": v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    return {"state_dict": state, "best_prec1": 91.5}


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    model = build_model("resnet8", shortcut="B")
    save_checkpoint(tmp_path / "m.pt", model, "resnet8", {"shortcut": "B"}, {"top1": 12.5, "dataset_sha256": "ab"})
    ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt.arch == "resnet8" and ckpt.arch_kwargs == {"shortcut": "B"}
    assert ckpt.meta == {"top1": 12.5, "dataset_sha256": "ab"}
    assert same_weights(ckpt.model, model) and not ckpt.model.training
    assert list(tmp_path.iterdir()) == [tmp_path / "m.pt"]  # no temporary file left


def test_public_layout_needs_arch_and_loads_with_it(tmp_path):
    model = build_model("resnet20")
    torch.save(public_layout(model), tmp_path / "r.th")
    with pytest.raises(LayerProbeError, match="pass --arch resnet20 or --arch plain20"):
        load_checkpoint(tmp_path / "r.th")
    ckpt = load_checkpoint(tmp_path / "r.th", "resnet20")
    assert same_weights(ckpt.model, model) and ckpt.meta == {"reported_top1": 91.5}
    assert ckpt.mean == (0.485, 0.456, 0.406)  # ImageNet statistics for third-party CIFAR files


def test_bare_state_dict_with_option_b_is_inferred(tmp_path):
    torch.save(build_model("resnet20", shortcut="B").state_dict(), tmp_path / "b.pt")
    ckpt = load_checkpoint(tmp_path / "b.pt")
    assert ckpt.arch == "resnet20" and ckpt.arch_kwargs == {"shortcut": "B"}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "wide_resnet50_2", "resnext50_32x4d"])
def test_torchvision_architectures_are_inferred(arch):
    state = getattr(torchvision.models, arch)().state_dict()
    assert infer_arch("x", state) == (arch, {})


def test_wrong_architecture_names_missing_and_unexpected_keys(tmp_path):
    torch.save(build_model("resnet20").state_dict(), tmp_path / "r.pt")
    with pytest.raises(LayerProbeError, match=r"weights do not fit resnet32: \d+ missing .*layer1.3"):
        load_checkpoint(tmp_path / "r.pt", "resnet32")
    state = build_model("resnet20").state_dict()
    state["linear.weight"] = torch.zeros(5, 64)
    torch.save(state, tmp_path / "s.pt")
    with pytest.raises(LayerProbeError, match=r"wrong shapes: \['linear.weight \(5, 64\) != \(10, 64\)'\]"):
        load_checkpoint(tmp_path / "s.pt", "resnet20")


def test_conflicting_arch_and_nan_weights(tmp_path):
    save_checkpoint(tmp_path / "m.pt", build_model("resnet8"), "resnet8")
    with pytest.raises(LayerProbeError, match="says its architecture is resnet8"):
        load_checkpoint(tmp_path / "m.pt", "plain8")
    state = build_model("plain8").state_dict()
    state["layer1.0.bn1.weight"][3] = float("inf")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(LayerProbeError, match="NaN or Inf, e.g. layer1.0.bn1.weight"):
        load_checkpoint(tmp_path / "nan.pt", "plain8")


class CreatesFile:
    """Unpickling this calls os.system, which would create a file."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "payload": CreatesFile(marker)}, tmp_path / "evil.pt")
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(CreatesFile(marker), f)
    for name in ("evil.pt", "evil.pkl"):
        with pytest.raises(LayerProbeError, match="refused|not a readable"):
            load_checkpoint(tmp_path / name)
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [(b"", "empty file"), (b"\x89PNG\r\n\x1a\n" + bytes(100), "not a readable"),
                                              (None, "is a directory"), ("missing", "no such file")])
def test_broken_files_give_one_clear_error(tmp_path, content, message):
    path = tmp_path / "ckpt.pt"
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(LayerProbeError, match=message):
        load_checkpoint(path)


def test_truncated_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "m.pt", build_model("resnet8"), "resnet8")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(LayerProbeError, match="not a readable PyTorch checkpoint"):
        read_file(Path(tmp_path / "cut.pt"))


@pytest.mark.parametrize("layout", ["bare", "state_dict", "model", "net", "lightning", "data_parallel"])
def test_training_script_layouts_load(tmp_path, layout):
    model = build_model("resnet8", shortcut="B")
    sd = model.state_dict()
    payload = {"bare": sd, "state_dict": {"state_dict": sd, "epoch": 3}, "model": {"model": sd, "optimizer": {}},
               "net": {"net": sd}, "lightning": {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 1},
               "data_parallel": {"model": {f"module.{k}": v for k, v in sd.items()}}}[layout]
    torch.save(payload, tmp_path / "w.pt")
    assert same_weights(load_checkpoint(tmp_path / "w.pt").model, model)


def test_safetensors_and_a_user_model(tmp_path):
    from safetensors.torch import save_file

    from layer_probe.checkpoint import load_weights

    model = torchvision.models.resnet18()
    save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    assert same_weights(load_checkpoint(tmp_path / "w.safetensors").model, model)
    fresh = torchvision.models.resnet18()
    ckpt = load_weights(tmp_path / "w.safetensors", fresh, "torchvision:resnet18")
    assert ckpt.arch == "torchvision:resnet18" and same_weights(ckpt.model, model)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LayerProbeError, match=r"bad.safetensors: not a readable safetensors file"):
        read_file(tmp_path / "bad.safetensors")
    with pytest.raises(LayerProbeError, match=r"weights do not fit torchvision:resnet34"):
        load_weights(tmp_path / "w.safetensors", torchvision.models.resnet34(), "torchvision:resnet34")


def test_model_spec_from_a_file_torchvision_and_errors(tmp_path):
    from layer_probe.models.spec import build_spec

    (tmp_path / "mynet.py").write_text("from torch import nn\n\ndef build():\n    return nn.Conv2d(3, 4, 3)\n"
                                       "\ndef broken():\n    raise RuntimeError('no')\n")
    assert isinstance(build_spec(f"{tmp_path / 'mynet.py'}:build"), torch.nn.Conv2d)
    assert isinstance(build_spec("torchvision:resnet18"), torchvision.models.ResNet)
    for spec, message in [(f"{tmp_path / 'mynet.py'}:nothing", "defines no callable 'nothing'"),
                          (f"{tmp_path / 'mynet.py'}:broken", r"running .* failed \(RuntimeError: no\)"),
                          ("torchvision:resnet7", "torchvision has no model 'resnet7'"),
                          ("resnet18", "expected torchvision:NAME, timm:NAME or path/to/file.py:CALLABLE"),
                          (f"{tmp_path / 'none.py'}:build", "is not a Python file")]:
        with pytest.raises(LayerProbeError, match=message):
            build_spec(spec)


def test_describe_names_the_recipe_seed_and_replicate_group(tmp_path):
    model = build_model("resnet8")
    save_checkpoint(tmp_path / "a.pt", model, "resnet8", meta={"recipe": {"name": "faithful"}, "seed": 2})
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    assert load_checkpoint(tmp_path / "a.pt").describe("faithful/resnet8-seed2") == {
        "arch": "resnet8", "label": "faithful/resnet8-seed2", "recipe": "faithful", "seed": 2,
        "group": "faithful/resnet8"}
    assert load_checkpoint(tmp_path / "bare.pt", "resnet8").describe("mine") == {
        "arch": "resnet8", "label": "mine", "recipe": "", "seed": 0, "group": "mine"}

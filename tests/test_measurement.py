import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import layer_probe
from layer_probe import measurement
from layer_probe.analysis import AnalysisConfig, analyze
from layer_probe.errors import LayerProbeError
from layer_probe.measurement import ProbeConfig, measure_images
from layer_probe.precision import Choice
from conftest import fine_tuned, modes, trained_like


def random_images(n=12, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def reference_std(model, names, x):
    """Independent: clone each site's output in one plain forward and take torch.std over all of it."""
    store = {}
    modules = dict(model.named_modules())

    def keep(name):
        def hook(module, args, out):  # returns None: a hook's return value would replace the output
            store[name] = out.detach().clone()  # before torchvision's in-place ReLU overwrites it
        return hook

    hooks = [modules[n].register_forward_hook(keep(n)) for n in names]
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    return {n: float(store[n].double().std()) for n in names}, logits


def test_the_readme_example_on_torchvision_resnet18_with_and_without_labels():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x, y = random_images()
    with_labels = layer_probe.measure(model, DataLoader(TensorDataset(x, y), batch_size=5), progress=False)
    without = layer_probe.measure(model, DataLoader(x, batch_size=5), progress=False)
    expected, logits = reference_std(model, [s.name for s in with_labels.sites], x)
    assert with_labels.std() == pytest.approx([expected[s.name] for s in with_labels.sites], rel=1e-9)
    assert without.std() == with_labels.std()
    assert with_labels.top1 == pytest.approx(100.0 * float((logits.argmax(1) == y).float().mean()))
    assert without.top1 != without.top1  # NaN: no labels, no accuracy
    assert with_labels.meta["residual"] and with_labels.meta["depth"] == 18  # read from the structure, not a name
    assert len(with_labels) == 16 and with_labels["layer4.1.bn2"].role == "branch_out"


class Wrapped(nn.Module):
    """A CIFAR net whose forward returns its logits in another container."""

    def __init__(self, kind):
        super().__init__()
        self.net, self.kind = trained_like("resnet8"), kind

    def forward(self, x):
        logits = self.net(x)
        if self.kind == "tuple":
            return logits, x.mean()
        if self.kind == "dict":
            return {"aux": x.mean(), "logits": logits}
        return type("Output", (), {"logits": logits})()


@pytest.mark.parametrize("kind", ["tuple", "dict", "object"])
def test_top1_from_tuple_dict_and_logits_outputs(kind):
    model = Wrapped(kind).eval()
    x, y = random_images(16, 32)
    r = layer_probe.measure(model, [(x[:8], y[:8]), [x[8:], y[8:]]], progress=False)
    assert r.top1 == pytest.approx(100.0 * float((model.net(x).argmax(1) == y).float().mean()))


def test_options_override_the_config_and_are_recorded():
    x, y = random_images(8, 32)
    r = layer_probe.measure(trained_like("resnet8"), [(x, y)], ProbeConfig(sites="all-bn"), bn_mode="train",
                            progress=False)
    assert r.meta["bn_mode"] == "train" and r.meta["sites_rule"] == "all-bn"
    with pytest.raises(TypeError):
        layer_probe.measure(trained_like("resnet8"), [(x, y)], no_such_option=1)


def nan_model():
    model = trained_like("resnet8")
    with torch.no_grad():
        model.layer2[0].bn1.running_var[3] = -1.0  # a negative running variance: sqrt gives NaN in eval mode
    return model


def test_a_one_shot_iterator_works_until_a_second_pass_is_needed():
    x, y = random_images(8, 32)
    once = layer_probe.measure(trained_like("resnet8"), iter([(x, y)]), progress=False)
    assert once.std() == layer_probe.measure(trained_like("resnet8"), [(x, y)], progress=False).std()
    with pytest.raises(LayerProbeError, match="one-shot iterator"):
        layer_probe.measure(nan_model(), iter([(x, y)]), progress=False)


def test_analyze_and_measure_count_the_same_nonfinite_values():
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randint(0, 256, (12, 32, 32, 3), dtype=torch.uint8, generator=g), torch.zeros(12).long()
    mean, std = (0.5,) * 3, (0.25,) * 3
    measured = measure_images(nan_model(), images, labels, mean, std, ProbeConfig(batch_size=4), progress=False)
    analysed, responses = analyze(nan_model(), images, labels, mean, std,
                                  AnalysisConfig(probe=ProbeConfig(batch_size=4), bootstrap=10, lesion_images=None),
                                  progress=False)
    counts = {s.name: s.nonfinite for s in measured.sites}
    assert counts == {s.name: s.nonfinite for s in responses.sites}
    # channel 3 of layer2.0.bn1 (16x16 after the stride): every one of its values is NaN; nothing before it
    assert counts["layer2.0.bn1"] == 12 * 16 * 16 and counts["layer1.0.bn2"] == 0
    assert responses.meta["batch_size"] == 4 and responses.meta["torch"] == torch.__version__


def test_a_batch_of_the_wrong_kind_is_one_clear_error():
    with pytest.raises(LayerProbeError, match="a batch must be an image tensor"):
        layer_probe.measure(trained_like("resnet8"), [{"image": torch.zeros(2, 3, 32, 32)}], progress=False)


@pytest.mark.parametrize("amp, faster, expected, warns", [("auto", "bf16", "bf16", False), ("auto", "fp32", None, False),
                                                         ("bf16", "fp32", "bf16", True), ("bf16", "bf16", "bf16", False)])
def test_amp_auto_takes_the_faster_and_bf16_warns_where_slower(monkeypatch, capsys, amp, faster, expected, warns):
    timed = []
    monkeypatch.setattr(measurement, "choose",
                        lambda requested, device, step: timed.append(step) or Choice(faster, {"fp32": 1.0, "bf16": 2.0}))
    model = trained_like("resnet8")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = random_images(8, 32)
    r = layer_probe.measure(model, [(x, y)], amp=amp, progress=False)
    timed[0]("fp32")  # the timed step is an eval-mode forward: BN's running statistics stay put
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert r.meta["amp"] == expected
    assert ("bf16 runs slower than fp32 here" in capsys.readouterr().err) == warns


def test_timing_the_amp_leaves_every_modules_own_mode(monkeypatch):
    monkeypatch.setattr(measurement, "choose", lambda requested, device, step: step("fp32") or Choice("fp32"))
    model = fine_tuned()
    before = modes(model)
    layer_probe.measure(model, [random_images(4, 32)], amp="auto", progress=False)
    assert modes(model) == before and not before["layer1.0.bn1"] and before["layer1.0.bn2"]


def test_an_imagenet_head_on_cifar_classes_warns_and_reports_no_top1(capsys):
    model = torchvision.models.resnet18().eval()  # 1,000 outputs
    x, y = random_images(4, 32)
    r, _ = measurement.measure_pass(model, [(x, y)], classes=10, progress=False)
    assert r.top1 != r.top1 and len(r) == 16
    assert capsys.readouterr().err.splitlines() == [
        "warning: the model has 1000 outputs but the data 10 classes; top-1 is not reported (the responses are "
        "measured all the same)"]
    assert layer_probe.measure(trained_like("resnet8"), [(x, y)], progress=False).top1 >= 0  # 10 outputs: reported


def test_the_readme_python_example_runs_as_written():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Python\n.*?```python\n(.*?)```", readme, re.S).group(1)
    scope = {}
    exec(code, scope)  # noqa: S102 - the README's own three lines
    r = scope["r"]
    assert len(r) == 16 and r.meta["images"] == 64 and r.top1 != r.top1  # no labels: top-1 NaN

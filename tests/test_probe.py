import pytest
import torch
from conftest import batches, fine_tuned, modes, needs_compiler, no_hooks, stored_activations, trained_like
from torch import nn

from layer_probe import stats
from layer_probe.errors import LayerProbeError
from layer_probe.models import build_model
from layer_probe.probe import Probe, run_probe, top1
from layer_probe.results import summarize
from layer_probe.sites import find_sites


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=needs_compiler)], ids=["eager", "compiled"])
@pytest.mark.parametrize("arch", ["resnet8", "plain8"])
def test_streaming_std_equals_torch_std_over_stored_activations(arch, compiled):
    model, data = trained_like(arch), batches()
    layout = find_sites(model)
    stored, _ = stored_activations(model, [s.name for s in layout.sites], data)
    rec = run_probe(model, layout, data, progress=False, compiled=compiled).recording
    for s in layout.sites:
        a = stored[s.name]
        per_channel = a.transpose(0, 1).reshape(a.shape[1], -1)
        torch.testing.assert_close(rec.moments(s.name).std(), per_channel.std(1), rtol=1e-6, atol=0)
        torch.testing.assert_close(rec.moments(s.name).reduce(0).std(), a.std(), rtol=1e-6, atol=0)
        torch.testing.assert_close(rec.moments(s.name).reduce(0).mean, a.mean(), rtol=1e-6, atol=1e-9)


def test_probed_outputs_are_bit_identical_and_hooks_are_removed():
    model, data = trained_like("resnet8"), batches()
    with torch.inference_mode():
        bare = [model(x) for x, _ in data]
    with Probe(model, find_sites(model), ratios=True), torch.inference_mode():
        probed = [model(x) for x, _ in data]
    assert all(torch.equal(a, b) for a, b in zip(bare, probed))
    assert no_hooks(model)


def test_top1_from_the_same_pass():
    model, data = trained_like("resnet8"), batches()
    with torch.no_grad():
        expected = sum(int((model(x).argmax(1) == y).sum()) for x, y in data)
    result = run_probe(model, find_sites(model), data, progress=False)
    assert result.correct == expected and result.images == 15


def test_a_failed_compile_is_one_line_and_leaves_no_hook(monkeypatch):
    def broken(fn):
        raise RuntimeError("InductorError: no working C++ compiler found\n  long traceback text")

    model, data = trained_like("resnet8"), batches(1)
    monkeypatch.setattr(stats, "fused", broken)
    with pytest.raises(LayerProbeError, match=r"^compiled statistics: torch.compile failed on cpu \(InductorError: no working C\+\+ "
                       r"compiler found\); measure without them \(compiled=False; on the command line, drop --compile\)$"):
        run_probe(model, find_sites(model), data, progress=False, compiled=True)
    assert no_hooks(model) and not model.training


def test_hooks_removed_and_mode_restored_after_an_exception():
    model = trained_like("resnet8").train()
    model.layer1.eval()
    with pytest.raises(RuntimeError, match="boom"):
        with Probe(model, find_sites(model), bn_mode="train", ratios=True):
            model(torch.randn(2, 3, 32, 32))
            raise RuntimeError("boom")
    assert no_hooks(model)
    assert model.training and not model.layer1.training and model.layer2.training


def test_batch_statistics_mode_leaves_running_statistics_untouched():
    model = trained_like("resnet8")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec = run_probe(model, find_sites(model), batches(), bn_mode="train", progress=False).recording
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # batch statistics: each BN output is normalised per batch, so its per-channel mean is beta
    torch.testing.assert_close(rec.moments("layer1.0.bn1").mean.float(), model.layer1[0].bn1.bias.detach(),
                               rtol=0, atol=1e-5)
    assert not model.training


class InplaceBlock(nn.Module):
    """The public CIFAR ResNet idiom: `out = bn2(...); out += shortcut(x); relu_(out)`."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return self.relu(out)


def test_in_place_addition_and_relu_do_not_change_the_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(InplaceBlock(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    data = [(torch.randn(4, 3, 8, 8) + 1, torch.zeros(4, dtype=torch.long)) for _ in range(2)]
    layout = find_sites(model)
    assert layout["0.bn2"].role == "branch_out" and layout.blocks[0].shortcut is None
    stored, _ = stored_activations(model, ["0.bn1", "0.bn2"], data)
    result = run_probe(model, layout, data, ratios=True, progress=False).recording
    for name in ("0.bn1", "0.bn2"):  # bn1's output is overwritten by the in-place ReLU, bn2's by +=
        torch.testing.assert_close(result.moments(name).reduce(0).std(), stored[name].std(), rtol=1e-6, atol=0)
    x = torch.cat([d for d, _ in data]).flatten(1).double()
    f = stored["0.bn2"].flatten(1)
    torch.testing.assert_close(result.blocks["0"].ratio(), f.norm(dim=1) / x.norm(dim=1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=needs_compiler)], ids=["eager", "compiled"])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_block_ratio_and_cosine_against_an_independent_computation(shortcut, compiled):
    model, data = trained_like("resnet8"), batches()
    if shortcut == "B":
        model = build_model("resnet8", shortcut="B").eval()
    store = {}
    block = model.layer2[0]
    hooks = [block.bn2.register_forward_hook(lambda m, a, o: store.setdefault("f", []).append(o.clone())),
             block.shortcut.register_forward_hook(lambda m, a, o: store.setdefault("x", []).append(o.clone()))]
    with torch.no_grad():
        for x, _ in data:
            model(x)
    for h in hooks:
        h.remove()
    f, x = (torch.cat(store[k]).flatten(1).double() for k in ("f", "x"))
    rec = run_probe(model, find_sites(model), data, ratios=True, progress=False, compiled=compiled).recording
    torch.testing.assert_close(rec.blocks["layer2.0"].ratio(), f.norm(dim=1) / x.norm(dim=1), rtol=1e-5, atol=0)
    cos = (f * x).sum(1) / (f.norm(dim=1) * x.norm(dim=1))
    torch.testing.assert_close(torch.cat(rec.blocks["layer2.0"].cosine), cos, rtol=1e-4, atol=1e-5)


def test_plain_block_ratio_is_output_minus_input():
    model, data = trained_like("plain8"), batches(1)
    x_in = {}
    h = model.layer1[0].register_forward_pre_hook(lambda m, a: x_in.setdefault("x", a[0].clone()))
    with torch.no_grad():
        model(data[0][0])
    h.remove()
    with torch.no_grad():
        out = model.layer1[0](x_in["x"])
    expected = ((out - x_in["x"]).flatten(1).norm(dim=1) / x_in["x"].flatten(1).norm(dim=1)).double()
    rec = run_probe(model, find_sites(model), data, ratios=True, progress=False).recording
    torch.testing.assert_close(rec.blocks["layer1.0"].ratio(), expected, rtol=1e-5, atol=0)
    assert not rec.blocks["layer2.0"].f_norm  # shapes differ: no ratio


def test_non_finite_values_are_flagged_and_counted():
    model = trained_like("resnet8")
    with torch.no_grad():
        model.layer2[0].bn1.weight[0] = float("nan")
    data = batches(2)
    fast = run_probe(model, find_sites(model), data, progress=False)
    exact = run_probe(model, find_sites(model), data, progress=False, count_nonfinite=True)
    assert fast.any_nonfinite
    counts = {n: int(sum(c)) for n, c in exact.recording.nonfinite.items()}
    assert counts["layer1.0.bn2"] == 0
    assert counts["layer2.0.bn1"] == 2 * 5 * 16 * 16  # one NaN channel: every element of it
    assert counts["layer2.0.bn2"] == 2 * 5 * 32 * 16 * 16  # the next conv spreads it everywhere
    assert summarize(exact)["layer2.0.bn1"].nonfinite == 2 * 5 * 16 * 16
    with pytest.raises(LayerProbeError, match="flagged non-finite values without counting them"):
        summarize(fast)  # two flags are not two values


def test_top1_leaves_every_modules_own_mode():
    model = fine_tuned()
    before = modes(model)
    images, labels = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8), torch.randint(0, 10, (6,))
    top1(model, images, labels, (0.5,) * 3, (0.25,) * 3)
    assert modes(model) == before and not before["layer1.0.bn1"] and before["layer1.0.bn2"]

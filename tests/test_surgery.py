import copy
import math

import pytest
import torch

from layer_probe.errors import LayerProbeError
from layer_probe.models import build_model
from layer_probe.sites import find_sites
from layer_probe.probe import top1
from layer_probe.surgery import deepen, identity_block, lesion, lesion_deltas
from conftest import fine_tuned, modes, trained_like


def relu_input(seed=0, channels=16):
    return torch.relu(torch.randn(4, channels, 8, 8, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("residual", [True, False])
def test_identity_block_is_exactly_the_identity_on_non_negative_inputs(residual):
    x = relu_input()
    with torch.no_grad():
        assert torch.equal(identity_block(16, residual=residual)(x), x)


@pytest.mark.parametrize("arch", ["resnet8", "plain8"])
def test_deepen_keeps_the_function(arch):
    shallow = trained_like(arch)
    deep = deepen(shallow, 2)
    assert len(deep.layer1) == 3 and sum(isinstance(m, torch.nn.Conv2d) for m in deep.modules()) == 7 + 12
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (deep(x) - shallow(x)).abs().max().item() == 0.0
    assert len(find_sites(deep).sites) == 7 + 12


def test_deepen_errors():
    with pytest.raises(LayerProbeError):
        deepen(build_model("resnet18"), 1)
    with pytest.raises(LayerProbeError):
        deepen(build_model("resnet8"), -1)


def test_lesion_zeroes_f_and_keeps_the_shortcut():
    model = trained_like("resnet8")
    block = find_sites(model).blocks[1]  # layer2.0, option A shortcut
    x = relu_input(channels=16)
    with torch.no_grad(), lesion(model, block) as cut:
        out = model.layer2[0](x)
    assert cut.removable
    assert torch.equal(out, torch.relu(model.layer2[0].shortcut(x)))
    assert not model.layer2[0].bn2._forward_hooks


def test_identity_check_reports_equal_outputs_and_errors():
    from layer_probe.surgery import identity_check

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (30, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (30,), generator=g)
    check = identity_check(trained_like("plain8"), "plain8", 3, images, labels, (0.5,) * 3, (0.25,) * 3, batch_size=7)
    assert (check.depth, check.deep_depth) == (8, 26)
    assert check.max_logit_diff == 0.0 and check.error == check.deep_error


def _deleted(model, name):
    """A copy of `model` with block `name` physically deleted: F(x) := 0 by a zero last BN (the
    shortcut stays), or, for a plain block, replaced by nn.Identity."""
    copy_ = copy.deepcopy(model)
    stage, index = name.split(".")
    block = getattr(copy_, stage)[int(index)]
    with torch.no_grad():
        if block.residual:
            block.bn2.weight.zero_()
            block.bn2.bias.zero_()
        else:
            getattr(copy_, stage)[int(index)] = torch.nn.Identity()
    return copy_


@pytest.mark.parametrize("arch", ["resnet20", "plain20"])
def test_lesion_deltas_match_networks_with_the_block_taken_out(arch):
    model = trained_like(arch)
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (45, 32, 32, 3), dtype=torch.uint8, generator=g)
    mean, std = (0.5,) * 3, (0.25,) * 3
    with torch.no_grad():  # the model's own predictions as labels: every changed prediction counts
        labels = model(((images.permute(0, 3, 1, 2).float() / 255) - 0.5) / 0.25).argmax(1)
    blocks = find_sites(model).blocks
    deltas = lesion_deltas(model, blocks, images, labels, mean, std, batch_size=20, progress=False)
    base = top1(model, images, labels, mean, std)
    for block, delta in zip(blocks, deltas):
        shapes_match = block.name.split(".")[1] != "0" or block.name == "layer1.0"
        if block.residual or shapes_match:
            assert delta == pytest.approx(top1(_deleted(model, block.name), images, labels, mean, std) - base, abs=1e-9)
        else:
            assert math.isnan(delta)
    assert any(d != 0 for d in deltas if not math.isnan(d))  # the comparison has something to compare
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("arch", ["resnet8", "plain8"])
def test_identity_construction_under_each_bn_mode(arch):
    """Exact under running statistics for both; under batch statistics exact only for residual blocks."""
    from layer_probe.surgery import identity_check

    g = torch.Generator().manual_seed(0)
    images, labels = torch.randint(0, 256, (24, 32, 32, 3), dtype=torch.uint8, generator=g), torch.zeros(24).long()
    model = trained_like(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    running = identity_check(model, arch, 2, images, labels, (0.5,) * 3, (0.25,) * 3, batch_size=8)
    batch = identity_check(model, arch, 2, images, labels, (0.5,) * 3, (0.25,) * 3, batch_size=8, bn_mode="train")
    assert (running.bn_mode, batch.bn_mode) == ("eval", "train") and running.max_logit_diff == 0.0
    assert (batch.max_logit_diff == 0.0) == (arch == "resnet8")
    if arch == "plain8":
        assert batch.max_logit_diff > 1e-2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # running statistics untouched


@pytest.mark.parametrize("arch", ["resnet8", "plain8"])
def test_lesion_deltas_leave_every_modules_own_mode(arch):
    model = fine_tuned(arch)
    before = modes(model)
    images, labels = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8), torch.randint(0, 10, (6,))
    lesion_deltas(model, find_sites(model).blocks, images, labels, (0.5,) * 3, (0.25,) * 3, progress=False)
    assert modes(model) == before and not before["layer1.0.bn1"] and before["layer1.0.bn2"]

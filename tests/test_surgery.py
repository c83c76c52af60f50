import pytest
import torch

from layer_probe.errors import LayerProbeError
from layer_probe.models import build_model
from layer_probe.sites import find_sites
from layer_probe.surgery import deepen, identity_block, lesion
from test_probe import trained_like


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

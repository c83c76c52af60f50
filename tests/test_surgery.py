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

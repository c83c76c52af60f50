import pytest
import torch

from layer_probe.errors import LayerProbeError
from layer_probe.models import CIFAR_DEPTHS, ShortcutA, build_model, list_models


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_paper_networks():
    assert list_models("plain*") == [f"plain{d}" for d in CIFAR_DEPTHS]
    assert {"resnet20", "resnet56", "resnet110", "resnet1202", "resnet50", "resnext50_32x4d"} <= set(list_models())


def test_parameter_counts_match_the_paper():
    # Table 6 of the paper: ResNet-20 0.27M, ResNet-56 0.85M, ResNet-110 1.7M parameters.
    assert round(n_params(build_model("resnet20")) / 1e6, 2) == 0.27
    assert round(n_params(build_model("resnet56")) / 1e6, 2) == 0.85
    assert round(n_params(build_model("resnet110")) / 1e6, 1) == 1.7


@pytest.mark.parametrize("depth", [8, 20, 56])
def test_plain_and_option_a_share_parameters(depth):
    plain, res = build_model(f"plain{depth}"), build_model(f"resnet{depth}")
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in res.state_dict().items()}
    convs = [m for m in res.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == depth - 1 and all(c.kernel_size == (3, 3) for c in convs)  # + the linear layer = depth


def test_option_b_adds_projections():
    names = build_model("resnet20", shortcut="B").state_dict()
    assert "layer2.0.shortcut.0.weight" in names and "layer2.0.shortcut.1.running_var" in names
    assert "layer1.0.shortcut.0.weight" not in names


def test_forward_shapes():
    x = torch.randn(2, 3, 32, 32)
    for arch in ("resnet8", "plain8"):
        assert build_model(arch)(x).shape == (2, 10)


def test_shortcut_a_subsamples_and_pads_both_sides():
    x = torch.arange(2 * 16 * 4 * 4, dtype=torch.float32).view(2, 16, 4, 4)
    y = ShortcutA(32)(x)
    assert y.shape == (2, 32, 2, 2)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()


def test_plain_network_has_no_shortcut_addition():
    model = build_model("plain8").eval()
    block = model.layer1[0]
    x = torch.randn(1, 16, 8, 8)
    expected = torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x))))))
    assert torch.equal(block(x), expected)


def test_bad_names_and_depths():
    with pytest.raises(LayerProbeError, match="list_models"):
        build_model("resnet21")
    with pytest.raises(LayerProbeError, match="shortcut"):
        build_model("resnet20", shortcut="C")


def test_depth_and_family_from_names():
    from layer_probe.models import depth_of, is_plain

    assert [depth_of(n) for n in ("resnet110", "plain20", "wide_resnet50_2", "model")] == [110, 20, 50, 0]
    assert is_plain("plain56") and not is_plain("resnet56")

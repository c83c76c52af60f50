import pytest
import torch
import torchvision
from torch import nn

from layer_probe.errors import LayerProbeError
from layer_probe.models import build_model
from layer_probe.sites import find_sites, list_sites

RESNET8_SITES = ["bn1", "layer1.0.bn1", "layer1.0.bn2", "layer2.0.bn1", "layer2.0.bn2", "layer3.0.bn1", "layer3.0.bn2"]


def test_site_names_are_module_paths_in_network_order():
    assert list_sites(build_model("resnet8")) == RESNET8_SITES
    assert list_sites(build_model("plain8")) == RESNET8_SITES


def test_resnet20_roles_stages_and_shortcuts():
    layout = find_sites(build_model("resnet20")).select("3x3")
    assert [s.index for s in layout.sites] == list(range(1, 20))
    assert [s.role for s in layout.sites] == ["stem"] + ["inner", "branch_out"] * 9
    assert [(s.stage, s.block) for s in layout.sites[-2:]] == [(3, 2), (3, 2)]
    assert [s.channels for s in layout.sites if s.role == "branch_out"] == [16] * 3 + [32] * 3 + [64] * 3
    assert all(b.residual for b in layout.blocks) and len(layout.blocks) == 9
    assert layout.blocks[3].shortcut == "layer2.0.shortcut" and layout.blocks[3].branch_out == "layer2.0.bn2"


def test_plain20_marks_the_same_positions():
    res, plain = find_sites(build_model("resnet20")), find_sites(build_model("plain20"))
    assert [(s.name, s.role) for s in res.sites] == [(s.name, s.role) for s in plain.sites]
    assert not plain.residual and res.residual


def test_option_b_projection_is_a_shortcut_site():
    layout = find_sites(build_model("resnet20", shortcut="B"))
    shortcut = [s.name for s in layout.sites if s.role == "shortcut"]
    assert shortcut == ["layer2.0.shortcut.1", "layer3.0.shortcut.1"]
    assert "layer2.0.shortcut.1" not in [s.name for s in layout.select("3x3").sites]


@pytest.mark.parametrize("arch, n_sites, n_branch, n_3x3", [("resnet18", 20, 8, 16), ("resnet50", 53, 16, 16)])
def test_torchvision_resnets(arch, n_sites, n_branch, n_3x3):
    layout = find_sites(getattr(torchvision.models, arch)())
    assert len(layout.sites) == n_sites
    branch = [s.name for s in layout.sites if s.role == "branch_out"]
    assert len(branch) == n_branch
    assert branch[0] == ("layer1.0.bn2" if arch == "resnet18" else "layer1.0.bn3")
    assert len(layout.select("3x3").sites) == n_3x3
    assert layout["layer2.0.downsample.1"].role == "shortcut"
    assert {b.shortcut for b in layout.blocks} == {None, "layer1.0.downsample", "layer2.0.downsample",
                                                    "layer3.0.downsample", "layer4.0.downsample"} - (
        {"layer1.0.downsample"} if arch == "resnet18" else set())


@pytest.mark.parametrize("arch, blocks, bottleneck, width", [
    ("resnet18", (2, 2, 2, 2), False, 64), ("resnet34", (3, 4, 6, 3), False, 64),
    ("resnet50", (3, 4, 6, 3), True, 64), ("resnet101", (3, 4, 23, 3), True, 64),
    ("resnet152", (3, 8, 36, 3), True, 64), ("wide_resnet50_2", (3, 4, 6, 3), True, 128),
    ("resnext50_32x4d", (3, 4, 6, 3), True, 128)])
def test_every_torchvision_resnet(arch, blocks, bottleneck, width):
    """Per block its conv-BN sites (F(x) ends at bn3, after a 1x1 conv, in a Bottleneck), then any projection."""
    layout = find_sites(build_model(arch))
    per_block = ["inner", "inner", "branch_out"] if bottleneck else ["inner", "branch_out"]
    expected = [("bn1", "stem", 7)]
    for stage, n in enumerate(blocks, 1):
        for b in range(n):
            name = f"layer{stage}.{b}"
            kernels = (1, 3, 1) if bottleneck else (3, 3)
            expected += [(f"{name}.bn{i}", role, k) for i, (role, k) in enumerate(zip(per_block, kernels), 1)]
            if b == 0 and (stage > 1 or bottleneck):
                expected.append((f"{name}.downsample.1", "shortcut", 1))
    assert [(s.name, s.role, s.kernel) for s in layout.sites] == expected
    assert len(layout.blocks) == sum(blocks) and all(b.residual for b in layout.blocks)
    assert sum(s.role == "branch_out" for s in layout.sites) == sum(blocks)  # resnet50: 16
    three = layout.select("3x3").sites  # Fig. 7's rule: bn2 of each Bottleneck, both BNs of a BasicBlock
    assert len(three) == sum(blocks) * (1 if bottleneck else 2)
    assert layout["layer1.0.bn2"].channels == width


class Untraceable(nn.Module):
    """A residual block whose forward branches on data, so torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.shortcut = nn.Sequential()

    def forward(self, x):
        if x.sum() > 0:
            x = x + 0
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


def test_structural_fallback_when_tracing_fails():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Sequential(Untraceable()))
    layout = find_sites(model)
    assert [(s.name, s.role) for s in layout.sites] == [("1", "stem"), ("2.0.bn1", "inner"), ("2.0.bn2", "branch_out")]
    assert layout.blocks[0].residual and layout.blocks[0].shortcut is None


def test_selection_by_regex_and_errors():
    layout = find_sites(build_model("resnet20"))
    assert [s.name for s in layout.select(r"layer3\.\d\.bn2").sites] == [f"layer3.{i}.bn2" for i in range(3)]
    assert [s.index for s in layout.select(r"layer3\.\d\.bn2").sites] == [1, 2, 3]
    with pytest.raises(LayerProbeError, match="list_sites"):
        layout.select("nothing-matches")
    with pytest.raises(LayerProbeError, match="list_sites"):
        layout["layer9.bn1"]

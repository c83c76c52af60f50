"""A zoo of small hand-written residual nets, one per way a network can hide its structure.

Each net's sites, roles and blocks are asserted as literal lists. Every block stores the F(x)
and x it adds in its own forward (`seen`), the independent reference for the probe's
||F(x)||/||x||; stds are checked against torch.std of cloned outputs.
"""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from layer_probe.errors import LayerProbeError
from layer_probe.probe import run_probe
from layer_probe.sites import find_sites, format_layout


def conv_bn(cin, cout, k=3, stride=1, bn=nn.BatchNorm2d):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), bn(cout))


class Residual(nn.Module):
    """Base of the zoo's blocks: `add(f, x)` stores the two operands, then each block adds them its own way."""

    def remember(self, f, x):
        self.seen.append((f.detach().clone(), x.detach().clone()))

    def __init__(self):
        super().__init__()
        self.seen = []


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, 2, 1), nn.Conv2d(2, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class SEBlock(Residual):
    """timm's SE ResNet block: F(x) is the SE output; the projection's BN is part of x."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.se = SE(cout)
        self.downsample = conv_bn(cin, cout, 1, stride) if stride > 1 or cin != cout else None

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.se(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        self.remember(out, shortcut)
        out += shortcut
        return F.relu(out)


class PreActBody(nn.Module):
    """pytorchcv's pre-activation body: returns (F(x), the pre-activation of x)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        return self.conv2(F.relu(self.bn2(self.conv1(pre)))), pre


class PreActUnit(Residual):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = PreActBody(cin, cout, stride)
        self.identity_conv = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride > 1 or cin != cout else None

    def forward(self, x):
        f, pre = self.body(x)
        identity = x if self.identity_conv is None else self.identity_conv(pre)
        self.remember(f, identity)
        return f + identity


class LayerScale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((c,), 0.1))

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)


class NoBNBlock(Residual):
    """BN-free: F(x) ends in a layer-scale module (`inline=False`) or in `x * gamma` in the block's forward."""

    def __init__(self, c, inline=False):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.inline = inline
        if inline:
            self.gamma = nn.Parameter(torch.full((c,), 0.1))
        else:
            self.scale = LayerScale(c)

    def forward(self, x):
        out = self.conv2(F.gelu(self.conv1(x)))
        out = out * self.gamma.view(1, -1, 1, 1) if self.inline else self.scale(out)
        self.remember(out, x)
        return x + out


class ConvBlock(nn.Module):
    """pytorchcv's conv unit: conv, then its BN nested one level down."""

    def __init__(self, cin, cout, act=True, bn=nn.BatchNorm2d):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(cin, cout, 3, padding=1, bias=False), bn(cout), act

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(x) if self.act else x


class NestedBlock(Residual):
    """BN two levels inside the block (body.conv2.bn), an identity shortcut, the addition in either order."""

    def __init__(self, c, bn=nn.BatchNorm2d, x_first=False, how="+"):
        super().__init__()
        self.body = nn.Sequential()
        self.body.add_module("conv1", ConvBlock(c, c, bn=bn))
        self.body.add_module("conv2", ConvBlock(c, c, act=False, bn=bn))
        self.x_first, self.how = x_first, how

    def forward(self, x):
        f = self.body(x)
        self.remember(f, x)
        if self.how == "add_":
            return F.relu(x.clone().add_(f) if self.x_first else f.add_(x))
        if self.how == "wrapped":
            return F.relu(wrapped_add(x, f) if self.x_first else wrapped_add(f, x))
        if self.how == "torch.add":
            return F.relu(torch.add(x, f) if self.x_first else torch.add(f, x))
        return F.relu(x + f if self.x_first else f + x)


@torch.fx.wrap
def wrapped_add(a, b):
    return a + b


class Odd(Residual):
    """Untraceable (branches on data), convs registered before their BNs, the shortcut called `skip`."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.a = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.z = nn.BatchNorm2d(cout)
        self.y = nn.BatchNorm2d(cout)

    def forward(self, x):
        if x.sum() > -1e9:  # data-dependent: torch.fx cannot trace this
            f = self.y(self.b(F.relu(self.z(self.a(x)))))
        s = self.skip(x)
        self.remember(f, s)
        return F.relu(s + f)


class Net(nn.Module):
    """Stem conv-BN, the given blocks, pooling and a linear head. Input [N, 3, 8, 8]."""

    def __init__(self, *blocks, width=4, bn=nn.BatchNorm2d):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, width, 3, padding=1, bias=False), bn(width)
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.LazyLinear(10)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(x.mean((2, 3)))


def seeded(model):
    """Random BN statistics and affine parameters, so that no std is 1 by construction."""
    torch.manual_seed(0)
    model(torch.randn(2, 3, 8, 8))  # materialise the lazy head
    for m in model.modules():
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(m, name, None)
            if isinstance(t, torch.Tensor) and t.ndim == 1 and hasattr(m, "running_var"):
                with torch.no_grad():
                    t.copy_(torch.rand_like(t) + 0.5 if name in ("weight", "running_var") else torch.randn_like(t) * 0.1)
    return model.eval()


def sites(layout):
    return [(s.name, s.role, s.stage, s.block) for s in layout.sites]


def blocks(layout):
    return [(b.name, b.branch_out, b.shortcut, b.op, b.f_operand) for b in layout.blocks]


def data(n=3, size=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def check_ratios(model, layout):
    """The probe's ||F(x)||/||x|| and cosine equal those of the operands the blocks stored themselves."""
    residual = {name: m for name, m in model.named_modules() if isinstance(m, Residual)}
    for m in residual.values():
        m.seen.clear()
    rec = run_probe(model, layout, data(), ratios=True, progress=False).recording
    for b in layout.blocks:
        f = torch.cat([s[0] for s in residual[b.module].seen]).flatten(1).double()
        x = torch.cat([s[1] for s in residual[b.module].seen]).flatten(1).double()
        torch.testing.assert_close(rec.blocks[b.name].ratio(), f.norm(dim=1) / x.norm(dim=1), rtol=1e-5, atol=0)
        cos = torch.cat(rec.blocks[b.name].cosine)
        torch.testing.assert_close(cos, F.cosine_similarity(f, x, dim=1), rtol=1e-4, atol=1e-5)
    return rec


def check_stds(model, layout, rec, reference=None):
    """Each site's std against torch.std of cloned outputs (or of the block's stored F(x))."""
    modules = dict(model.named_modules())
    store = {s.name: [] for s in layout.sites}
    handles = [modules[s.name].register_forward_hook(lambda m, a, out, n=s.name: store[n].append(out.clone()))
               for s in layout.sites if not s.tap]
    with torch.no_grad():
        for m in modules.values():
            if isinstance(m, Residual):
                m.seen.clear()
        for x, _ in data():
            model(x)
    for h in handles:
        h.remove()
    for s in layout.sites:
        if s.tap:  # read at the addition or a norm-act's input: the block's own F(x), or `reference`
            values = reference(s) if reference else torch.cat([f for f, _ in modules[s.name].seen])
        else:
            values = torch.cat(store[s.name])
        torch.testing.assert_close(rec.moments(s.name).reduce(0).std(), values.double().std(), rtol=1e-6, atol=0)


def probe_all(model, expected_sites, expected_blocks):
    layout = find_sites(model)
    assert sites(layout) == expected_sites
    assert blocks(layout) == expected_blocks
    check_stds(model, layout, check_ratios(model, layout))
    return layout


STEM = [("bn", "stem", 0, -1)]


def test_squeeze_excitation_output_is_f_and_the_projection_is_x():
    model = seeded(Net(SEBlock(4, 4, 1), SEBlock(4, 8, 2)))
    probe_all(model, STEM + [
        ("blocks.0.bn1", "inner", 1, 0), ("blocks.0.bn2", "inner", 1, 0), ("blocks.0.se", "branch_out", 1, 0),
        ("blocks.1.downsample.1", "shortcut", 2, 0), ("blocks.1.bn1", "inner", 2, 0), ("blocks.1.bn2", "inner", 2, 0),
        ("blocks.1.se", "branch_out", 2, 0)], [
        ("blocks.0", "blocks.0.se", None, "+=", 0), ("blocks.1", "blocks.1.se", "blocks.1.downsample", "+=", 0)])


def test_pre_activation_blocks_returning_a_tuple():
    model = seeded(Net(PreActUnit(4, 4, 1), PreActUnit(4, 8, 2)))
    layout = probe_all(model, STEM + [  # body.bn1 follows a ReLU and an addition, not a conv: not a site
        ("blocks.0.body.bn2", "inner", 1, 0), ("blocks.0.body.conv2", "branch_out", 1, 0),
        ("blocks.1.body.bn2", "inner", 2, 0), ("blocks.1.body.conv2", "branch_out", 2, 0)], [
        ("blocks.0", "blocks.0.body.conv2", None, "+", 0),
        ("blocks.1", "blocks.1.body.conv2", "blocks.1.identity_conv", "+", 0)])
    # Fig. 7's rule here: the stem BN, each BN after a 3x3 conv, and the last 3x3 conv itself (F(x))
    assert [s.name for s in layout.select("3x3").sites] == [s.name for s in layout.sites]


@pytest.mark.parametrize("inline", [False, True], ids=["layer-scale module", "inline x * gamma"])
def test_bn_free_blocks_with_layer_scale(inline):
    model = seeded(Net(NoBNBlock(4, inline), NoBNBlock(4, inline)))
    branch = "blocks.{}" if inline else "blocks.{}.scale"
    layout = probe_all(model, STEM + [(branch.format(i), "branch_out", 1, i) for i in range(2)],
                       [(f"blocks.{i}", branch.format(i), None, "+", 1) for i in range(2)])
    assert [s.tap for s in layout.sites] == (["", "+", "+"] if inline else ["", "", ""])


@pytest.mark.parametrize("how, x_first", [("+", False), ("+", True), ("add_", False), ("add_", True),
                                          ("wrapped", False), ("torch.add", True)])
def test_nested_bn_and_every_way_of_adding(how, x_first):
    model = seeded(Net(NestedBlock(4, x_first=x_first, how=how), NestedBlock(4, x_first=x_first, how=how)))
    op = {"add_": "+=", "wrapped": "+"}.get(how, how)
    probe_all(model, STEM + [(f"blocks.{i}.body.conv{k}.bn", "branch_out" if k == 2 else "inner", 1, i)
                             for i in range(2) for k in (1, 2)],
              [(f"blocks.{i}", f"blocks.{i}.body.conv2.bn", None, op, int(x_first)) for i in range(2)])


def frozen_bn(c):
    return torchvision.ops.misc.FrozenBatchNorm2d(c)


class MyBN(nn.BatchNorm2d):
    """A user's BN subclass."""


@pytest.mark.parametrize("bn", [nn.SyncBatchNorm, frozen_bn, MyBN], ids=["SyncBatchNorm", "FrozenBatchNorm2d", "subclass"])
def test_batch_norm_subclasses_are_sites(bn):
    model = seeded(Net(NestedBlock(4, bn=bn), bn=bn))
    probe_all(model, STEM + [("blocks.0.body.conv1.bn", "inner", 1, 0), ("blocks.0.body.conv2.bn", "branch_out", 1, 0)],
              [("blocks.0", "blocks.0.body.conv2.bn", None, "+", 0)])


@pytest.mark.parametrize("bn, mode, fixed", [
    (frozen_bn, "train", "have no batch-statistics mode and keep their fixed statistics (e.g. bn, a FrozenBatchNorm2d)"),
    (lambda c: nn.BatchNorm2d(c, track_running_stats=False), "eval",
     "track no running statistics and normalise by each batch (e.g. bn, a BatchNorm2d)"),
    (nn.BatchNorm2d, "train", None), (nn.BatchNorm2d, "eval", None), (frozen_bn, "eval", None)])
def test_norm_layers_that_cannot_follow_the_bn_mode_are_one_warning_line(capsys, bn, mode, fixed):
    model = seeded(Net(NestedBlock(4, bn=bn), bn=bn))
    layout = find_sites(model)
    capsys.readouterr()
    run_probe(model, layout, data(), bn_mode=mode, progress=False)
    expected = f"warning: bn_mode={mode!r}: 3 of 3 norm site(s) {fixed}\n" if fixed else ""
    assert capsys.readouterr().err == expected


def test_timm_norm_act_is_read_before_its_activation():
    """A norm-act site is its BN value; when the block ends in one, F(x) is its activation's output."""
    timm_layers = pytest.importorskip("timm.layers")
    model = seeded(Net(NestedBlock(4, bn=timm_layers.BatchNormAct2d), bn=timm_layers.BatchNormAct2d))
    layout = find_sites(model)
    assert sites(layout) == STEM + [("blocks.0.body.conv1.bn", "inner", 1, 0), ("blocks.0.body.conv2.bn", "inner", 1, 0),
                                    ("blocks.0.body.conv2.bn.act", "branch_out", 1, 0)]
    assert [s.tap for s in layout.sites] == ["bn.drop", "blocks.0.body.conv1.bn.drop", "blocks.0.body.conv2.bn.drop", ""]
    modules = dict(model.named_modules())
    inputs = {s.name: [] for s in layout.sites}
    handles = [modules[s.name].register_forward_pre_hook(lambda m, a, n=s.name: inputs[n].append(a[0].clone()))
               for s in layout.sites]
    rec = check_ratios(model, layout)
    for h in handles:
        h.remove()

    def before_activation(site):  # the BN alone, by hand, on the inputs the norm-act layer received
        bn = modules[site.name]
        x = torch.cat(inputs[site.name][-len(data()):])
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

    check_stds(model, layout, rec, before_activation)
    assert isinstance(modules["blocks.0.body.conv2.bn.act"], nn.ReLU)


def test_untraceable_forward_with_odd_names_and_registration_order():
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(Odd(4, 8, 2))
    model = seeded(Net(Odd(4, 8, 2)))
    probe_all(model, STEM + [("blocks.0.z", "inner", 1, 0), ("blocks.0.y", "branch_out", 1, 0),
                             ("blocks.0.skip.1", "shortcut", 1, 0)],
              [("blocks.0", "blocks.0.y", "blocks.0.skip", "+", 1)])


class TwoAdditions(Residual):
    """A transformer-like block: two residual additions in one forward."""

    def __init__(self, c):
        super().__init__()
        self.first, self.second = ConvBlock(c, c, act=False), ConvBlock(c, c, act=False)

    def forward(self, x):
        x = x + self.first(x)
        return x + self.second(x)


class Doubled(nn.Module):
    def forward(self, x):
        return x + x


def test_ambiguous_structure_is_one_warning_line_each(capsys):
    layout = find_sites(seeded(Net(TwoAdditions(4))))
    assert blocks(layout) == [("blocks.0:1", "blocks.0.first.bn", None, "+", 1),
                              ("blocks.0:2", "blocks.0.second.bn", None, "+", 1)]
    assert [(s.name, s.role, s.stage, s.block) for s in layout.sites][1:] == [
        ("blocks.0.first.bn", "branch_out", 1, 0), ("blocks.0.second.bn", "branch_out", 1, 1)]
    assert capsys.readouterr().err == ("warning: Net: blocks.0 runs 2 residual additions; each is taken as its own "
                                       "block (blocks.0:1 ... blocks.0:2)\n")
    find_sites(seeded(Net(NestedBlock(4), Doubled())))
    assert capsys.readouterr().err == ("warning: Net: in blocks.1, both operands of an addition (+) come from the "
                                       "block's input through 0 layer(s); the first was taken as F(x)\n")


def test_a_note_is_printed_once_per_model_class(capsys):
    class PlainNet(Net):
        pass

    class OtherNet(Net):
        pass

    for cls in (PlainNet, PlainNet, OtherNet):  # e.g. a network's seeds, then another architecture
        find_sites(seeded(cls(nn.Sequential(conv_bn(4, 4), nn.ReLU()))))
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {kind}: no residual addition found in a forward pass; treated as a plain network whose blocks are "
        "the modules holding its conv-BN layers" for kind in ("PlainNet", "OtherNet")]


class LoopNet(nn.Module):
    """The model's own forward runs the stem and loops over its blocks: `for b in self.blocks: x = relu(x + b(x))`."""

    def __init__(self, c=4, n=3):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.blocks = nn.ModuleList(nn.Sequential(conv_bn(c, c), nn.ReLU(), conv_bn(c, c)) for _ in range(n))
        self.fc = nn.LazyLinear(10)
        self.seen = []

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        for b in self.blocks:
            f = b(x)
            self.seen.append((f.detach().clone(), x.detach().clone()))
            x = F.relu(x + f)
        return self.fc(x.mean((2, 3)))


def test_blocks_added_in_the_models_own_loop_are_the_modules_that_return_f(capsys):
    model = seeded(LoopNet())
    layout = find_sites(model)
    assert sites(layout) == STEM + [(f"blocks.{i}.{j}.1", role, 1, i) for i in range(3)
                                    for j, role in ((0, "inner"), (2, "branch_out"))]
    assert blocks(layout) == [(f":{i + 1}", f"blocks.{i}.2.1", None, "+", 1) for i in range(3)]
    assert "runs 3 residual additions" in capsys.readouterr().err
    model.seen.clear()
    rec = run_probe(model, layout, data(), ratios=True, progress=False).recording
    for i, b in enumerate(layout.blocks):  # the model stored each block's (F(x), x) in turn, three per batch
        f, x = (torch.cat([s[k] for s in model.seen[i::3]]).flatten(1).double() for k in (0, 1))
        torch.testing.assert_close(rec.blocks[b.name].ratio(), f.norm(dim=1) / x.norm(dim=1), rtol=1e-5, atol=0)
    check_stds(model, layout, rec)


def test_a_layer_run_twice_in_one_forward_pass_is_refused_in_one_line():
    class Twice(nn.Module):  # one block applied twice: shared weights
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.block = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), ConvBlock(4, 4)

        def forward(self, x):
            x = F.relu(self.bn(self.conv(x)))
            x = x + self.block(x)
            return x + self.block(x)

    with pytest.raises(LayerProbeError, match=r"^Twice: block.bn runs 2 times in one forward pass \(shared weights\); "
                                              r"its calls would pool into one response"):
        find_sites(Twice())


def test_nothing_to_probe_and_a_failing_forward_are_one_line_errors():
    with pytest.raises(LayerProbeError, match=r"^Sequential: no batch-norm layer after a convolution and no residual"):
        find_sites(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    with pytest.raises(LayerProbeError, match=r"^Linear: the forward pass that finds the sites failed on"):
        find_sites(nn.Linear(5, 2))


def test_the_listing_shows_each_addition():
    text = format_layout(find_sites(seeded(Net(Odd(4, 8, 2)))))
    assert text.splitlines()[-1].split() == ["blocks.0", "x", "+", "F(x)", "blocks.0.y", "blocks.0.skip"]


# Third-party networks, where the package is installed (CI does not need them)

def test_timm_seresnet18():
    timm = pytest.importorskip("timm")
    model = timm.create_model("seresnet18").eval()
    layout = find_sites(model, torch.randn(2, 3, 64, 64))
    assert [b.branch_out for b in layout.blocks] == [f"layer{s}.{i}.se" for s in range(1, 5) for i in range(2)]
    assert [b.shortcut for b in layout.blocks] == [None, None] + [f"layer{s}.{i}.downsample" if i == 0 else None
                                                                for s in range(2, 5) for i in range(2)]
    assert [s.role for s in layout.sites].count("branch_out") == 8
    assert layout["layer2.0.downsample.1"].role == "shortcut" and layout["layer2.0.bn2"].role == "inner"
    assert [(s.stage, s.block) for s in layout.sites if s.role == "branch_out"] == [
        (s, i) for s in range(1, 5) for i in range(2)]


def test_timm_resnetv2_50():
    timm = pytest.importorskip("timm")
    layout = find_sites(timm.create_model("resnetv2_50").eval(), torch.randn(2, 3, 64, 64))
    assert len(layout.blocks) == 16
    assert [s.name for s in layout.sites[:3]] == ["stages.0.blocks.0.norm2", "stages.0.blocks.0.norm3",
                                                  "stages.0.blocks.0.conv3"]
    assert [s.role for s in layout.sites] == ["inner", "inner", "branch_out"] * 16
    assert [s.kernel for s in layout.select("3x3").sites] == [3] * 16


def test_pytorchcv_preresnet20_cifar10():
    provider = pytest.importorskip("pytorchcv.model_provider")
    model = provider.get_model("preresnet20_cifar10").eval()
    layout = find_sites(model)
    assert len(layout.blocks) == 9
    assert [b.branch_out for b in layout.blocks][:2] == ["features.stage1.unit1.body.conv2.conv",
                                                         "features.stage1.unit2.body.conv2.conv"]
    assert [b.shortcut for b in layout.blocks][3] == "features.stage2.unit1.identity_conv"
    assert [(s.stage, s.block) for s in layout.sites if s.role == "branch_out"] == [
        (s, i) for s in range(1, 4) for i in range(3)]
    rec = run_probe(model, layout, [(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))], ratios=True,
                    progress=False).recording
    assert all(len(rec.blocks[b.name].f_norm) == 1 for b in layout.blocks)


@pytest.mark.parametrize("inline", [False, True], ids=["layer-scale module", "inline x * gamma"])
def test_a_lesion_removes_f_only_where_a_module_produces_it(inline):
    from layer_probe.surgery import lesion

    model = seeded(Net(NoBNBlock(4, inline), NoBNBlock(4, inline))).eval()
    block = find_sites(model, quiet=True).blocks[1]
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        intact = model(x)
        with lesion(model, block) as cut:
            lesioned = model(x)
        if not inline:  # by hand: the last block passes its input x on, F(x) = 0
            h = model.blocks[0](F.relu(model.bn(model.conv(x))))
            assert torch.allclose(lesioned, model.fc(h.mean((2, 3))), atol=1e-6)
    assert cut.removable != inline  # inline: no module outputs F(x) alone, so the block is left in place
    assert inline == torch.equal(intact, lesioned)


def test_gamma_predicts_the_std_at_bn_sites_only():
    """A pre-activation block's F(x) is a conv's output: BN's γ says nothing about it, so its prediction is NaN."""
    import math

    from layer_probe.analysis import AnalysisConfig, analyze
    from layer_probe.measurement import ProbeConfig

    model = seeded(Net(PreActUnit(4, 4, 1), PreActUnit(4, 8, 2)))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (16,), generator=g)
    config = AnalysisConfig(probe=ProbeConfig(batch_size=8), bootstrap=50, lesion_images=None)
    analysis, _ = analyze(model, images, labels, (0.5,) * 3, (0.25,) * 3, config, progress=False)
    assert [(s.name, math.isnan(s.gamma_std), math.isnan(s.z_var)) for s in analysis.sites] == [
        ("bn", False, False), ("blocks.0.body.bn2", False, False), ("blocks.0.body.conv2", True, True),
        ("blocks.1.body.bn2", False, False), ("blocks.1.body.conv2", True, True)]
    bn = model.blocks[1].body.bn2.requires_grad_(False)  # sqrt(mean(γ²) + var(β)), by hand
    assert analysis.sites[3].gamma_std == pytest.approx(
        float((bn.weight.double().square().mean() + bn.bias.double().var(correction=0)).sqrt()))
    assert all(math.isnan(b.gamma_std) for b in analysis.blocks) and not math.isnan(analysis.gamma_fit["z_var_median"])
    table = analysis.sites_dataframe()  # sites.csv: a conv site keeps its bootstrap CI
    assert table["std_low"].notna().all() and table["gamma_std"].isna().tolist() == [False, False, True, False, True]

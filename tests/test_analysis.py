import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from layer_probe.analysis import (AnalysisConfig, Analysis, Baseline, analyze, bootstrap_std, bootstrap_weights,
                                  closeness, compare, format_baselines, gamma_std, resnet_vs_plain)
from layer_probe.probe import run_probe
from layer_probe.measurement import ProbeConfig
from layer_probe.results import Responses, SiteResponse
from layer_probe.sites import find_sites
from layer_probe.stats import Moments
from conftest import trained_like

MEAN, STD = (0.5,) * 3, (0.25,) * 3


def data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g)


def run(model, cache=False, **kw):
    images, labels = data()
    config = AnalysisConfig(probe=ProbeConfig(batch_size=8), bootstrap=200, lesion_images=None, **kw)
    return analyze(model, images, labels, MEAN, STD, config, progress=False, cache=cache)


def test_a_block_whose_f_is_exactly_zero():
    model = trained_like("resnet8")
    with torch.no_grad():
        model.layer2[0].bn2.weight.zero_()
        model.layer2[0].bn2.bias.zero_()
    analysis, _ = run(model)
    block = analysis.blocks[1]
    assert block.name == "layer2.0" and block.ratio_mean == 0 and block.std == 0
    assert block.gamma_std == 0 and block.lesion_delta == 0


def test_lesion_leaves_the_model_unchanged():
    model = trained_like("resnet8")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = data()
    with torch.no_grad():
        logits = model(((images.permute(0, 3, 1, 2).float() / 255) - 0.5) / 0.25)
    run(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(((images.permute(0, 3, 1, 2).float() / 255) - 0.5) / 0.25), logits)


def test_plain_blocks_that_change_shape_cannot_be_removed():
    analysis, _ = run(trained_like("plain8"))
    deltas = [b.lesion_delta for b in analysis.blocks]
    assert not math.isnan(deltas[0]) and math.isnan(deltas[1]) and math.isnan(deltas[2])


def test_scaling_up_the_last_gamma_makes_a_rise_with_ci_above_one():
    model = trained_like("resnet8")
    flat, _ = run(model)
    with torch.no_grad():
        model.layer3[0].bn2.weight.mul_(20)
    raised, _ = run(model)
    assert raised.rise.rises and raised.rise.low > 1 and raised.rise.ratio > flat.rise.ratio
    assert raised.rise.evidence["gamma_std_last"] > raised.rise.evidence["gamma_std_rest_median"]


def test_gamma_prediction_equals_the_std_under_batch_statistics():
    # With BN in batch-statistics mode its normalised input has exactly zero mean and unit variance.
    model = trained_like("resnet8")
    images, labels = data(16)
    from layer_probe.data import batches
    rec = run_probe(model, find_sites(model), batches(images, labels, 16, MEAN, STD), bn_mode="train",
                    progress=False).recording
    modules = dict(model.named_modules())
    for name in ("bn1", "layer2.0.bn1", "layer3.0.bn2"):
        assert rec.moments(name).reduce(0).std(correction=0).item() == pytest.approx(gamma_std(modules[name]), rel=1e-3)


def test_normalised_input_variance_is_the_data_over_the_running_variance():
    # What gamma_std assumes is 1, measured from a hook on BN's input, independently of the probe.
    model = trained_like("resnet8")
    with torch.no_grad():
        model.layer3[0].bn2.running_var.mul_(4)  # running statistics wider than the data: z_var about 4x smaller
        model.layer2[0].bn2.weight[0] = 0  # a channel that says nothing about z
    seen = {}
    names = ("bn1", "layer2.0.bn2", "layer3.0.bn2")
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, []).append(i[0].detach()))
             for n in names]
    analysis, _ = run(model)
    for h in hooks:
        h.remove()
    by_name = {s.name: s for s in analysis.sites}
    for n in names:
        probe_pass = [x for x in seen[n] if len(x) == 8][:5]  # 40 images in batches of 8 (lesions rerun later)
        bn, x = modules[n], torch.cat(probe_pass).double()
        keep = bn.weight != 0
        expected = (x.var((0, 2, 3), correction=0) / (bn.running_var.double() + bn.eps))[keep].mean().item()
        assert by_name[n].z_var == pytest.approx(expected, rel=1e-4)
    assert analysis.gamma_fit["z_var_median"] == pytest.approx(np.median([s.z_var for s in analysis.sites]))


def test_bootstrap_equals_naive_resampling_of_stored_batches():
    torch.manual_seed(0)
    stored = [torch.randn(5, 3, 4, 4) * (1 + i) + i for i in range(6)]
    batch = Moments.stack([Moments.of(x) for x in stored])
    weights = bootstrap_weights(6, 20, seed=1)
    fast = bootstrap_std(batch, weights)
    for r in range(20):
        resampled = torch.cat([stored[b] for b in range(6) for _ in range(int(weights[r, b]))]).double()
        assert fast[r].item() == pytest.approx(resampled.std().item(), rel=1e-6)
    per_channel = bootstrap_std(batch, weights, axes="channel")
    resampled = torch.cat([stored[b] for b in range(6) for _ in range(int(weights[0, b]))]).double()
    assert per_channel[0].item() == pytest.approx(resampled.transpose(0, 1).reshape(3, -1).std(1).mean().item(), rel=1e-6)


def responses(label, stds, ratios=()):
    from layer_probe.results import BlockResponse

    sites = tuple(SiteResponse(i, f"s{i}", "inner", 1, 0, 4, s, 0.0, s, 0, 0) for i, s in enumerate(stds, 1))
    blocks = tuple(BlockResponse(f"b{i}", f"s{i}", True, r, r, r, r, 0.0) for i, r in enumerate(ratios))
    depth = int(label.removeprefix("resnet").removeprefix("plain"))
    return Responses(sites, blocks, {"arch": label, "label": label, "top1": 90.0, "depth": depth,
                                     "residual": label.startswith("resnet")})


def test_identical_models_give_no_evidence_that_resnets_respond_less():
    a = responses("resnet20", [0.5, 0.7, 0.9, 1.1])
    t = resnet_vs_plain(a, responses("plain20", [0.5, 0.7, 0.9, 1.1]))
    assert t.p_value == 1.0 and not t.holds


def test_wilcoxon_matches_scipy_and_effect_is_rank_biserial():
    rng = np.random.default_rng(0)
    plain = rng.uniform(0.5, 1.5, 19)
    res = plain - rng.uniform(0.05, 0.3, 19)
    res[3] = plain[3] + 0.01  # one layer against the trend
    t = resnet_vs_plain(responses("resnet20", res), responses("plain20", plain))
    assert t.p_value == pytest.approx(sps.wilcoxon(res, plain, alternative="less").pvalue)
    d = res - plain
    ranks = sps.rankdata(np.abs(d))
    assert t.effect == pytest.approx((ranks[d < 0].sum() - ranks[d > 0].sum()) / ranks.sum())
    assert t.holds and 0.8 < t.effect < 1


def test_compare_tests_pairs_and_depth_trend():
    models = [responses("plain20", np.linspace(1, 2, 19)), responses("resnet20", np.linspace(0.8, 1.2, 19), [0.2, 0.6]),
              responses("resnet56", np.linspace(0.5, 0.9, 55), [0.05, 0.2, 0.3]),
              responses("resnet110", np.linspace(0.3, 0.6, 109))]
    c = compare(models)
    assert [t.models for t in c.tests] == ["resnet20 vs plain20", "resnet20 > resnet56 > resnet110"]
    assert all(t.holds for t in c.tests)
    assert c.closeness["resnet56"] == {"below_0.1": 1 / 3, "below_0.25": 2 / 3, "below_0.5": 1.0}
    assert c.closeness["resnet20"]["below_0.5"] == 0.5 and math.isnan(c.closeness["plain20"]["below_0.5"])


def test_closeness_ignores_undefined_ratios():
    assert closeness([0.05, float("nan"), 0.3, 0.7]) == {"below_0.1": 1 / 3, "below_0.25": 1 / 3, "below_0.5": 2 / 3}


def test_analysis_json_round_trip(tmp_path):
    analysis, _ = run(trained_like("resnet8"))
    assert Analysis.from_json(analysis.to_json()).to_json() == analysis.to_json()
    analysis.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"analysis.json", "blocks.csv", "sites.csv"}


def test_decay_exponent_recovers_a_power_law():
    from layer_probe.analysis import decay_exponent

    k = np.arange(1, 10)
    assert decay_exponent(0.8 * k ** -0.4) == pytest.approx(-0.4)
    assert math.isnan(decay_exponent([0.5]))


class ToyResNet(torch.nn.Module):
    """x_0 = BN(conv(input)); x_k = x_{k-1} + BN(conv(x_{k-1})), no ReLU: with batch statistics every F has unit
    variance, so Var(x_k) = 1 + k when the branches are uncorrelated with the stream."""

    def __init__(self, blocks=8, width=64):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, padding=1, bias=False), torch.nn.BatchNorm2d(width))
        self.blocks = torch.nn.ModuleList(ToyBlock(width) for _ in range(blocks))

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x.mean((2, 3))[:, :10]


class ToyBlock(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(width, width, 3, padding=1, bias=False), torch.nn.BatchNorm2d(width)

    def forward(self, x):
        return x + self.bn(self.conv(x))


def test_ratio_at_initialisation_follows_the_variance_recursion():
    """Known answer: ||F(x_{k-1})|| / ||x_{k-1}|| ≈ sqrt(1 / k) for block k (Var F = 1, Var x_{k-1} = k)."""
    from layer_probe.analysis import closeness_summary
    from layer_probe.measurement import measure

    torch.manual_seed(0)
    model = ToyResNet()
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    r = measure(model, [x], bn_mode="train", progress=False)
    ratios = [b.ratio_mean for b in r.blocks]
    assert ratios == pytest.approx([math.sqrt(1 / k) for k in range(1, 9)], rel=0.05)
    assert closeness_summary(r)["decay_exponent"] == pytest.approx(-0.5, abs=0.05)
    assert all(s.std == pytest.approx(1.0, abs=1e-4) for s in r.sites)  # batch statistics: unit std at every site


def test_claims_table_reports_each_mode_and_whether_a_claim_holds_in_all():
    from layer_probe.analysis import claims_table

    def models(mode, deeper_lower):
        rs = [responses("plain20", np.linspace(1, 2, 19)), responses("resnet20", np.linspace(0.8, 1.2, 19)),
              responses("resnet56", np.linspace(0.5, 0.9, 55) * (1 if deeper_lower else 2))]
        for r in rs:
            r.meta["bn_mode"] = mode
        return rs

    table = claims_table([compare(models("eval", True)), compare(models("train", False))])
    assert table[["claim", "bn_mode", "holds", "holds_in_every_mode"]].values.tolist() == [
        ["resnet_below_plain_20", "eval", True, True], ["deeper_resnets_lower", "eval", True, False],
        ["resnet_below_plain_20", "train", True, True], ["deeper_resnets_lower", "train", False, False]]


def test_baseline_sets_trained_closeness_against_initialisation():
    from layer_probe.analysis import baseline
    from layer_probe.results import BlockResponse

    def with_ratios(label, ratios):
        sites = tuple(SiteResponse(i, f"s{i}", "branch_out", 1 + i // 3, 0, 4, 1.0, 0.0, 1.0, 0, 0)
                      for i in range(len(ratios)))
        blocks = tuple(BlockResponse(f"b{i}", f"s{i}", True, r, r, r, r, 0.0) for i, r in enumerate(ratios))
        return Responses(sites, blocks, {"label": label, "bn_mode": "eval"})

    b = baseline(with_ratios("r", [0.2, 0.3, 0.4, 0.6]), [with_ratios("i0", [0.4, 0.4, 0.6, 0.6]),
                                                          with_ratios("i1", [0.6, 0.6, 0.4, 0.4])])
    assert b.trained["mean_ratio"] == pytest.approx(0.375) and b.trained["below_0.5"] == 0.75
    assert b.init["mean_ratio"] == pytest.approx(0.5) and b.init["below_0.5"] == pytest.approx(0.5)
    assert b.stages == ({"stage": 1, "trained": pytest.approx(0.3), "init": pytest.approx(0.5)},
                        {"stage": 2, "trained": pytest.approx(0.6), "init": pytest.approx(0.5)})


def test_a_cached_analysis_is_the_same_and_is_keyed_by_the_weights(monkeypatch):
    model = trained_like("resnet8")
    first, _ = run(model, cache=True)
    calls = []
    import layer_probe.analysis as analysis_module

    monkeypatch.setattr(analysis_module, "lesion_deltas", lambda *a, **k: calls.append(1) or [0.0] * 3)
    again, responses = run(model, cache=True)  # served from the cache: no lesion pass
    assert again.to_json() == first.to_json() and calls == [] and len(responses) == 7
    with torch.no_grad():
        model.layer1[0].bn2.weight.mul_(2)
    changed, _ = run(model, cache=True)  # other weights, another entry
    assert calls == [1] and changed.sites[2].std != first.sites[2].std


def test_a_plain_net_and_its_resnet_twin_holding_the_same_weights_are_cached_apart():
    resnet, plain = trained_like("resnet8"), trained_like("plain8")
    same = [torch.equal(a, b) for a, b in zip(resnet.state_dict().values(), plain.state_dict().values())]
    assert len(resnet.state_dict()) == len(plain.state_dict()) and all(same)  # option A: no shortcut weights
    r, _ = run(resnet, cache=True)
    p, _ = run(plain, cache=True)
    assert [b.residual for b in r.blocks] == [True] * 3 and [b.residual for b in p.blocks] == [False] * 3


def test_replicates_are_paired_by_recipe_and_seed_and_counted():
    from layer_probe.analysis import claims_by_seed, claims_table

    def run_(label, stds, recipe, seed):
        r = responses(label, stds)
        r.meta.update(recipe=recipe, seed=seed, bn_mode="eval")
        return r

    models = []
    for seed, gap in ((0, 0.5), (1, 0.4), (2, -0.3)):  # seed 2's ResNet responds more than its plain net
        models += [run_("plain20", np.linspace(1, 2, 19), "faithful", seed),
                   run_("resnet20", np.linspace(1, 2, 19) - gap, "faithful", seed)]
    models += [run_("plain20", np.linspace(1, 2, 19), "fast", 0), run_("resnet20", np.linspace(0.5, 1.5, 19), "fast", 0)]
    table = claims_table([compare(models)])
    assert table[["recipe", "seed", "holds"]].values.tolist() == [
        ["faithful", 0, True], ["faithful", 1, True], ["faithful", 2, False], ["fast", 0, True]]
    counted = claims_by_seed(table).set_index("recipe")
    assert (counted.loc["faithful", "holds"], counted.loc["faithful", "tested"]) == (2, 3)
    assert counted.loc["faithful", "effect_min"] == -1.0 and counted.loc["fast", "tested"] == 1


def test_the_baselines_table_keeps_its_columns_under_long_labels():
    row = {"mean_ratio": 0.5, "below_0.5": 0.25, "decay_exponent": -0.4}
    table = format_baselines([Baseline(label, "eval", 3, row, row, ()) for label in ("r20", "faithful/resnet20-seed2")])
    assert [line.index(" eval ") for line in table.splitlines()[2:]] == [len("faithful/resnet20-seed2")] * 2

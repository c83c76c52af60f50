"""Is F(x) close to zero, and why does the std rise in the last layers? (Section 4.2, Fig. 7)

The paper reads three things off Fig. 7: ResNets respond less than their plain counterparts,
deeper ResNets respond less, and so the residual functions F(x) are "generally closer to zero
than the non-residual functions". This module turns each reading into a measurement:

- per block: std of F(x) with a bootstrap CI, ||F(x)||/||x|| and cos(F(x), x), the std that
  BN's gamma and beta alone predict, and the top-1 change when the block is deleted;
- per model: the rise of the std in the last layers (with CI) and its evidence;
- across models: paired Wilcoxon tests ResNet vs plain, the trend over depth, closeness to zero.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import stats as sps
from torch import Tensor, nn

from .data import subset
from .files import write_text
from .measurement import ProbeConfig, image_batches, measure_pass
from .probe import Recording
from .separability import separability
from .results import BlockResponse, Responses, SiteResponse
from .sites import Layout, find_sites, is_norm
from .stats import Moments
from .surgery import lesion_deltas

if TYPE_CHECKING:
    import pandas as pd

THRESHOLDS = (0.1, 0.25, 0.5)  # ||F(x)||/||x|| below which a block counts as "close to zero"


@dataclass(frozen=True)
class AnalysisConfig:
    probe: ProbeConfig = ProbeConfig(batch_size=100)  # small batches: the bootstrap resamples batches
    bootstrap: int = 1000  # bootstrap resamples for the CIs
    seed: int = 0
    lesion_images: int | None = 2000  # images per lesion pass (a seeded subset); None: all
    rise_k: int = 1  # the rise compares the last k sites (default: the last block's F(x)) with the rest
    separability: bool = True  # a linear probe after each block (one more forward pass)


@dataclass(frozen=True)
class Rise:
    """Fig. 7's rise of the std in the last layers: mean std of the last k sites / median std of the rest."""

    k: int
    ratio: float
    low: float
    high: float
    rises: bool  # the whole 95% CI lies above 1
    stages: tuple[dict[str, Any], ...]  # per stage: its last site over the median of its other sites
    evidence: dict[str, float]  # gamma, ||F(x)||/||x|| and lesion damage of the last block vs the others


@dataclass(frozen=True)
class Analysis:
    """The F(x) report for one model."""

    sites: tuple[SiteResponse, ...]  # with their bootstrap CIs, γ predictions and z_var filled in
    blocks: tuple[BlockResponse, ...]  # with number, site, std, γ prediction, lesion and separability filled in
    rise: Rise
    closeness: dict[str, float]  # share of residual blocks with mean ratio below each threshold
    gamma_fit: dict[str, float]  # agreement of measured and gamma-predicted std over sites
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def close_to_zero(self) -> bool:
        """The paper's reading, made concrete: most blocks have ||F(x)|| < ||x|| / 2."""
        return self.closeness.get("below_0.5", 0.0) > 0.5

    def blocks_dataframe(self) -> pd.DataFrame:
        return Responses(self.sites, self.blocks).blocks_dataframe()

    def sites_dataframe(self) -> pd.DataFrame:
        return Responses(self.sites, self.blocks).to_dataframe()

    def to_json(self) -> str:
        payload = {**self.meta, "sites": [asdict(s) for s in self.sites], "blocks": [asdict(b) for b in self.blocks],
                   "rise": asdict(self.rise), "closeness": self.closeness, "gamma_fit": self.gamma_fit,
                   "close_to_zero": self.close_to_zero}
        return json.dumps(payload, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Analysis:
        p = json.loads(text)
        p.pop("close_to_zero", None)
        rise = p.pop("rise")
        rise["stages"] = tuple(rise["stages"])
        sites = tuple(SiteResponse(**s | {"channel_std": tuple(s.get("channel_std", ()))}) for s in p.pop("sites"))
        return cls(sites, tuple(BlockResponse(**b) for b in p.pop("blocks")),
                   Rise(**rise), p.pop("closeness"), p.pop("gamma_fit"), p)

    @classmethod
    def load(cls, path: str | Path) -> Analysis:
        return cls.from_json(Path(path).read_text())

    def save(self, directory: str | Path) -> None:
        """Write analysis.json, blocks.csv and sites.csv into `directory` (atomically)."""
        directory = Path(directory)
        write_text(directory / "analysis.json", self.to_json())
        write_text(directory / "blocks.csv", self.blocks_dataframe().to_csv(index=False))
        write_text(directory / "sites.csv", self.sites_dataframe().to_csv(index=False))


def gamma_std(bn: nn.BatchNorm2d) -> float:
    """The pooled std of BN's output if its normalised input had zero mean and unit variance.

    Output channel c is gamma_c * z + beta_c; pooled over channels its variance is
    mean(gamma^2) + var(beta). A small gamma means a small response whatever the conv computed.
    """
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones(bn.num_features, dtype=torch.double)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(gamma)
    return math.sqrt(float(gamma.square().mean() + beta.var(correction=0)))


def z_var(bn: nn.BatchNorm2d, out: Moments) -> float:
    """Variance of BN's normalised input z = (y - beta) / gamma, from its output's per-channel moments.

    gamma_std assumes 1. In eval mode z is normalised by the running statistics, so this is the data's
    variance over the running variance: below 1 when those were gathered on more varied (augmented) batches.
    Channels with gamma = 0 carry no information about z and are left out.
    """
    var = out.var(correction=0).double().cpu()
    gamma = bn.weight.detach().double().cpu() if bn.weight is not None else torch.ones_like(var)
    keep = gamma != 0
    return float((var[keep] / gamma[keep].square()).mean()) if keep.any() else float("nan")


def bootstrap_weights(n: int, resamples: int, seed: int) -> Tensor:
    """Multinomial counts [resamples, n]: how often each of n items is drawn in each resample."""
    idx = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    return torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(resamples, n, dtype=torch.float64))


def bootstrap_std(batch: Moments, weights: Tensor, axes: str = "all") -> Tensor:
    """Std of one site for each resample of batches. batch: [B, C] moments; weights: [R, B] -> [R]."""
    per_channel = batch.to("cpu").resample(weights)  # [R, C]
    return per_channel.reduce(1).std() if axes == "all" else per_channel.std().mean(1)


def rise_ratio(stds: Sequence[float] | np.ndarray, k: int = 1) -> float | np.ndarray:
    """Fig. 7's rise: mean std of the last k sites over the median std of the rest. stds: [..., S] -> [...]."""
    stds = np.asarray(stds, dtype=float)
    return stds[..., -k:].mean(-1) / np.median(stds[..., :-k], axis=-1)


def rise(stds: Sequence[float], boot: np.ndarray, k: int = 1) -> tuple[float, float, float]:
    """(point, low, high): `rise_ratio` with its 95% CI from the bootstrap stds `boot` [R, S] of the S sites."""
    if not 1 <= k < len(stds):
        raise ValueError(f"rise needs 1 <= k < {len(stds)} sites, got k={k}")
    b = rise_ratio(boot, k)
    return float(rise_ratio(stds, k)), float(np.quantile(b, 0.025)), float(np.quantile(b, 0.975))


def analyze(model: nn.Module, images: Tensor, labels: Tensor, mean: tuple[float, ...], std: tuple[float, ...],
            config: AnalysisConfig = AnalysisConfig(), *, meta: dict[str, Any] | None = None,
            progress: bool = True, layout: Layout | None = None, cache: bool = False) -> tuple[Analysis, Responses]:
    """The F(x) report for one model on uint8 images [N, 32, 32, 3]: one probe pass plus the lesions.

    `layout` is the model's selected sites when already known (default: `config.probe.sites`).
    `cache=True` keeps the result in `<cache>/analyses/`, keyed by the weights, the images, the settings
    and this package's version, so notebooks that ask the same question share one computation.
    """
    pc = replace(config.probe, ratios=True)
    layout = layout or find_sites(model).select(pc.sites)
    if cache:  # keyed by the layout too: a plain net and its ResNet twin can hold the very same weights
        folder = _cache_folder(model, images, labels, mean, std, config, meta, layout)
        if (folder / "analysis.json").exists():
            return Analysis.load(folder / "analysis.json"), Responses.load(folder / "responses.json")
        analysis, responses = analyze(model, images, labels, mean, std, config, meta=meta, progress=progress,
                                      layout=layout)
        responses.save(folder)  # first: analysis.json marks a complete entry
        analysis.save(folder)
        return analysis, responses
    responses, result = measure_pass(model, image_batches(images, labels, mean, std, pc.batch_size), pc,
                                     meta={"batch_size": pc.batch_size} | (meta or {}), layout=layout,
                                     total=len(labels), progress=progress)
    rec: Recording = result.recording
    n_batches = len(next(iter(rec.batches.values())))
    weights = bootstrap_weights(n_batches, config.bootstrap, config.seed)
    boot = np.stack([bootstrap_std(rec.batch_moments(s.name), weights, pc.axes).numpy() for s in layout.sites], 1)
    low, high = np.quantile(boot, 0.025, axis=0), np.quantile(boot, 0.975, axis=0)
    norms = {name: m for name, m in model.named_modules() if is_norm(m)}  # γ predicts only a BN's response
    nan = float("nan")
    predicted = [gamma_std(norms[s.name]) if s.name in norms else nan for s in layout.sites]
    stds = responses.std()
    sites = tuple(replace(s, std_low=float(low[i]), std_high=float(high[i]), gamma_std=predicted[i],
                          z_var=z_var(norms[s.name], rec.moments(s.name)) if s.name in norms else nan)
                  for i, s in enumerate(responses.sites))
    keep = subset(len(labels), config.lesion_images, config.seed)
    deltas = lesion_deltas(model, layout.blocks, images[keep], labels[keep], mean, std, progress=progress)
    separable = separability(model, layout.blocks, images, labels, mean, std) if config.separability \
        else [float("nan")] * len(layout.blocks)
    by_block = {b.name: b for b in responses.blocks}
    site_of = {s.name: s for s in sites}
    blocks = []
    for number, (block, delta, sep) in enumerate(zip(layout.blocks, deltas, separable), 1):
        s = site_of.get(block.branch_out)
        # blocks without ratios (a plain block that changes shape) keep NaN for them
        r = by_block.get(block.name) or BlockResponse(block.name, block.branch_out, block.residual, nan, nan, nan, nan, nan)
        blocks.append(replace(r, number=number, site_index=s.index if s else -1, std=s.std if s else nan,
                              std_low=s.std_low if s else nan, std_high=s.std_high if s else nan,
                              gamma_std=gamma_std(norms[block.branch_out]) if block.branch_out in norms else nan,
                              lesion_delta=delta, separability=sep))
    point, lo, hi = rise(stds, boot, config.rise_k)
    analysis = Analysis(sites, tuple(blocks), Rise(config.rise_k, point, lo, hi, lo > 1.0, _stage_rises(sites, boot),
                                                   _rise_evidence(sites, blocks, config.rise_k)),
                        closeness([b.ratio_mean for b in blocks]),
                        _gamma_fit(stds, predicted, [s.z_var for s in sites]),
                        responses.meta | {"bootstrap": config.bootstrap, "lesion_images": len(keep),
                                          "probe_batch_size": pc.batch_size})
    return analysis, responses


def _cache_folder(model: nn.Module, images: Tensor, labels: Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                  config: AnalysisConfig, meta: dict[str, Any] | None, layout: Layout) -> Path:
    from . import __version__
    from .data import cache_dir

    schema = [f.name for cls in (SiteResponse, BlockResponse, Rise) for f in fields(cls)]  # a new field: a new entry
    digest = hashlib.sha256(repr((__version__, schema, mean, std, config, sorted((meta or {}).items()), layout)).encode())
    for tensor in (*model.state_dict().values(), images, labels):
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return cache_dir() / "analyses" / digest.hexdigest()[:32]


def closeness(ratios: Sequence[float]) -> dict[str, float]:
    """Share of blocks whose mean ||F(x)||/||x|| (plain: ||H(x) - x||/||x||) is below each threshold."""
    ratios = [r for r in ratios if not math.isnan(r)]
    return {f"below_{t}": (sum(r < t for r in ratios) / len(ratios) if ratios else float("nan")) for t in THRESHOLDS}


def decay_exponent(ratios: Sequence[float]) -> float:
    """b in ||F(x)||/||x|| ≈ a·k^b over blocks k = 1..B in network order (least squares on logs).

    At initialisation with batch statistics x grows along the residual stream while each F(x) stays
    of unit scale, so the ratio falls with k (De & Smith 2020): the exponent says how much of a small
    F(x) the architecture alone gives.
    """
    r = np.asarray(ratios, dtype=float)
    k = np.arange(1, len(r) + 1)
    ok = np.isfinite(r) & (r > 0)
    return float(np.polyfit(np.log(k[ok]), np.log(r[ok]), 1)[0]) if ok.sum() >= 2 else float("nan")


def closeness_summary(responses: Responses) -> dict[str, float]:
    """Mean ||F(x)||/||x|| over blocks, the share below each threshold, and the decay exponent."""
    ratios = [b.ratio_mean for b in responses.blocks]
    finite = [r for r in ratios if not math.isnan(r)]
    return {"mean_ratio": float(np.mean(finite)) if finite else float("nan"), **closeness(ratios),
            "decay_exponent": decay_exponent(ratios)}


@dataclass(frozen=True)
class Baseline:
    """How close F(x) is to zero in a trained network, and in the same architecture at initialisation.

    The initial networks are measured with batch statistics (their running statistics are BN's
    defaults); what the trained network has beyond them is learned, the rest is structural.
    """

    label: str
    bn_mode: str  # of the trained network's measurement
    seeds: int  # initialisations averaged
    trained: dict[str, float]
    init: dict[str, float]  # mean over the seeds
    stages: tuple[dict[str, float], ...]  # per stage: mean ratio trained and at initialisation


def baseline(trained: Responses, initial: Sequence[Responses]) -> Baseline:
    """`closeness_summary` of `trained` next to its mean over `initial` (fresh networks, batch statistics)."""
    inits = [closeness_summary(r) for r in initial]
    stage_of = {s.name: s.stage for s in trained.sites}

    def per_stage(r: Responses) -> dict[int, float]:
        by = {}
        for b in r.blocks:
            by.setdefault(stage_of.get(b.branch_out, 0), []).append(b.ratio_mean)
        return {k: float(np.nanmean(v)) for k, v in by.items()}

    t, i = per_stage(trained), [per_stage(r) for r in initial]
    stages = tuple({"stage": k, "trained": t[k], "init": float(np.mean([s.get(k, np.nan) for s in i]))}
                   for k in sorted(t))
    return Baseline(trained.label, trained.meta.get("bn_mode", "?"), len(initial), closeness_summary(trained),
                    {k: float(np.mean([d[k] for d in inits])) for k in inits[0]} if inits else {}, stages)


def _stage_rises(sites: Sequence[SiteResponse], boot: np.ndarray) -> tuple[dict[str, Any], ...]:
    """Per stage: its last site's std over the median of its other sites, with the CI."""
    out = []
    for stage in sorted({s.stage for s in sites if s.stage > 0}):
        cols = [i for i, s in enumerate(sites) if s.stage == stage]
        if len(cols) < 2:
            continue
        point, lo, hi = rise([sites[i].std for i in cols], boot[:, cols])
        out.append({"stage": stage, "last": sites[cols[-1]].name, "ratio": point, "low": lo, "high": hi,
                    "rises": lo > 1.0})
    return tuple(out)


def _finite_median(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.median(finite)) if finite else float("nan")


def _rise_evidence(sites: Sequence[SiteResponse], blocks: Sequence[BlockResponse], k: int) -> dict[str, float]:
    """What distinguishes the last layers: their gamma, their F(x) size, and the damage of deleting them."""
    last, rest = blocks[-1], blocks[:-1]
    gains = np.diff([np.nan] + [b.separability for b in blocks])  # what each block adds to the linear probe's top-1
    return {"separability_gain_last_block": float(gains[-1]),
            "separability_gain_other_blocks_median": _finite_median(list(gains[:-1])),"gamma_std_last": float(np.mean([s.gamma_std for s in sites[-k:]])),
            "gamma_std_rest_median": _finite_median([s.gamma_std for s in sites[:-k]]),
            "ratio_last_block": last.ratio_mean,
            "ratio_other_blocks_median": _finite_median([b.ratio_mean for b in rest]),
            "lesion_last_block": last.lesion_delta,
            "lesion_other_blocks_median": _finite_median([b.lesion_delta for b in rest])}


def _gamma_fit(measured: Sequence[float], predicted: Sequence[float], z_vars: Sequence[float]) -> dict[str, float]:
    """Agreement of measured and gamma-predicted std over the sites γ predicts (BN layers), and the median of what
    the prediction assumes is 1."""
    r = rho = float("nan")
    pairs = [(m, p) for m, p in zip(measured, predicted) if not math.isnan(p)]
    measured, predicted = [m for m, _ in pairs], [p for _, p in pairs]
    if len(measured) >= 3 and np.std(predicted) > 0 and np.std(measured) > 0:
        r, rho = float(sps.pearsonr(measured, predicted)[0]), float(sps.spearmanr(measured, predicted)[0])
    return {"pearson_r": r, "spearman_rho": rho, "z_var_median": _finite_median(z_vars)}


@dataclass(frozen=True)
class ClaimTest:
    """One statistical test of a claim read off Fig. 7, on networks measured under one BN mode.

    The sites of one network are not independent samples, so p-values over sites are descriptive:
    the unit of replication is the trained network (see `claims_by_seed`).
    """

    key: str  # e.g. "resnet_below_plain_20", "deeper_resnets_lower"
    claim: str
    models: str
    bn_mode: str  # eval: BN running statistics; train: batch statistics
    test: str
    statistic: float
    p_value: float  # descriptive (sites are not independent)
    effect: float
    effect_name: str
    holds: bool  # resnet_below_plain: p < alpha in the claimed direction; deeper_resnets_lower: means and medians fall
    recipe: str = ""  # the networks' training recipe, where recorded (`meta["recipe"]`)
    seed: int = 0


def resnet_vs_plain(resnet: Responses, plain: Responses, alpha: float = 0.05) -> ClaimTest:
    """One-sided paired Wilcoxon signed-rank test at matched layer index: is the ResNet's std smaller?

    Effect size: the matched-pairs rank-biserial correlation, +1 when every ResNet layer responds less.
    """
    if len(resnet) != len(plain):
        raise ValueError(f"{resnet.label} has {len(resnet)} sites and {plain.label} {len(plain)}: not matched")
    diff = np.asarray(resnet.std()) - np.asarray(plain.std())
    nonzero = diff[diff != 0]
    if len(nonzero) == 0:  # identical responses: no evidence either way
        statistic, p, effect = 0.0, 1.0, 0.0
    else:
        res = sps.wilcoxon(resnet.std(), plain.std(), alternative="less", zero_method="wilcox")
        ranks = sps.rankdata(np.abs(nonzero))
        effect = float((ranks[nonzero < 0].sum() - ranks[nonzero > 0].sum()) / ranks.sum())
        statistic, p = float(res.statistic), float(res.pvalue)
    return ClaimTest(f"resnet_below_plain_{resnet.depth}", "ResNet std < plain std at matched layers",
                     f"{resnet.label} vs {plain.label}", resnet.meta.get("bn_mode", "?"),
                     "Wilcoxon signed-rank, one-sided, paired by layer index (descriptive)", statistic, p, effect,
                     "rank-biserial r", p < alpha, resnet.meta.get("recipe", ""), resnet.meta.get("seed", 0))


def depth_trend(resnets: Sequence[Responses], alpha: float = 0.05) -> ClaimTest:
    """Do deeper ResNets respond less? Holds when both the mean and the median std fall with every step in depth.

    With one network per depth that is all the evidence there is; the Spearman correlation of depth and
    std over the pooled sites is given as a description, its p-value not as evidence (the sites of one
    network are not independent, and three networks are three samples). `alpha` is kept for symmetry.
    """
    ordered = sorted(resnets, key=lambda r: r.depth)
    depths = np.concatenate([[r.depth] * len(r) for r in ordered])
    res = sps.spearmanr(depths, np.concatenate([r.std() for r in ordered]), alternative="less")
    means = [float(np.mean(r.std())) for r in ordered]
    medians = [float(np.median(r.std())) for r in ordered]
    monotone = all(a > b for a, b in zip(means, means[1:])) and all(a > b for a, b in zip(medians, medians[1:]))
    return ClaimTest("deeper_resnets_lower", "deeper ResNets have smaller responses",
                     " > ".join(r.label for r in ordered), ordered[0].meta.get("bn_mode", "?"),
                     f"mean and median std fall with depth: means {[round(m, 3) for m in means]}, medians "
                     f"{[round(m, 3) for m in medians]}; Spearman over pooled sites (descriptive)",
                     float(res.statistic), float(res.pvalue), float(res.statistic), "Spearman rho", monotone,
                     ordered[0].meta.get("recipe", ""), ordered[0].meta.get("seed", 0))


def claims_by_seed(claims: pd.DataFrame) -> pd.DataFrame:
    """Per claim and BN mode: in how many of the tested networks (seeds) it holds, with the effect's mean and
    range over them. `claims` is `claims_table`'s output."""
    return (claims.groupby(["claim", "recipe", "bn_mode"], sort=False)
            .agg(holds=("holds", "sum"), tested=("holds", "size"), effect=("effect", "mean"),
                 effect_min=("effect", "min"), effect_max=("effect", "max")).reset_index())


def claims_table(comparisons: Sequence[Comparison]) -> pd.DataFrame:
    """Each claim under each BN mode compared (one `Comparison` per mode): claim, recipe, seed, bn_mode,
    statistic, p_value, effect, holds, and `holds_in_every_mode` (under every mode, for every seed tested)."""
    import pandas as pd

    frame = pd.concat([c.tests_dataframe() for c in comparisons], ignore_index=True)
    every = frame.groupby(["key", "recipe"])["holds"].transform("all")
    return frame.rename(columns={"key": "claim", "claim": "reading"}).assign(holds_in_every_mode=every)[
        ["claim", "recipe", "seed", "bn_mode", "models", "statistic", "p_value", "effect", "effect_name", "holds",
         "holds_in_every_mode", "reading", "test"]]


@dataclass(frozen=True)
class Comparison:
    """The claims of Section 4.2 tested on a set of models."""

    tests: tuple[ClaimTest, ...]
    closeness: dict[str, dict[str, float]]  # model label -> share of blocks below each ratio threshold
    summary: tuple[dict[str, Any], ...]  # per model: mean and median std, top-1

    def tests_dataframe(self):  # noqa: ANN201
        import pandas as pd

        return pd.DataFrame([asdict(t) for t in self.tests], columns=[f.name for f in fields(ClaimTest)],
                            dtype=object).infer_objects()

    def to_json(self) -> str:
        return json.dumps({"tests": [asdict(t) for t in self.tests], "closeness": self.closeness,
                           "models": list(self.summary)}, indent=1) + "\n"

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        write_text(directory / "comparison.json", self.to_json())
        write_text(directory / "tests.csv", self.tests_dataframe().to_csv(index=False))


def compare(models: Sequence[Responses], alpha: float = 0.05) -> Comparison:
    """Test Fig. 7's readings on `models`: each ResNet-n against plain-n, and the ResNets over depth.

    Networks are paired within a recipe and a seed (`meta["recipe"]`, `meta["seed"]`; "" and 0 when
    absent): with seed replicates every claim is tested once per seed, the trained network being the
    unit of replication (`claims_by_seed` counts in how many it holds).
    """
    tests = []
    runs = {}
    for r in models:
        runs.setdefault((r.meta.get("recipe", ""), r.meta.get("seed", 0)), []).append(r)
    for _, rs in sorted(runs.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        plains = {r.depth: r for r in rs if not r.residual}
        resnets = sorted((r for r in rs if r.residual), key=lambda r: r.depth)
        tests += [resnet_vs_plain(r, plains[r.depth], alpha) for r in resnets if r.depth in plains]
        if len({r.depth for r in resnets}) >= 2:
            tests.append(depth_trend(resnets, alpha))
    close = {r.label: closeness([b.ratio_mean for b in r.blocks]) for r in models}
    summary = tuple({"label": r.label, "arch": r.meta.get("arch"), "sites": len(r), "mean_std": float(np.mean(r.std())),
                     "median_std": float(np.median(r.std())), "top1": r.top1} for r in models)
    return Comparison(tuple(tests), close, summary)



def format_analysis(analysis: Analysis) -> str:
    """The per-block table and the verdicts, as text."""
    m, rise = analysis.meta, analysis.rise
    lines = [f"{m.get('arch', '?')}  {m.get('checkpoint', '')}",
             f"top-1 {m.get('top1', float('nan')):.2f}% on {m.get('images', '?')} {m.get('split', '')} images; "
             f"std CIs: {m.get('bootstrap')} bootstrap resamples of batches; lesions on {m.get('lesion_images')} images",
             "", f"{'block':>5} {'name':<10} {'site':>4} {'std':>7} {'95% CI':>15} {'γ-pred':>7} "
                 f"{'‖F‖/‖x‖':>8} {'cos':>6} {'Δtop-1':>7} {'probe %':>8}"]
    for b in analysis.blocks:
        lines.append(f"{b.number:>5} {b.name:<10} {b.site_index:>4} {b.std:>7.3f} [{b.std_low:>6.3f}, {b.std_high:>6.3f}] "
                     f"{b.gamma_std:>7.3f} {b.ratio_mean:>8.3f} {b.cosine_mean:>6.2f} {b.lesion_delta:>7.2f} "
                     f"{b.separability:>8.1f}")
    c, g, e = analysis.closeness, analysis.gamma_fit, rise.evidence
    lines += ["", f"measured vs γ-predicted std over sites: Pearson r = {g['pearson_r']:.3f}, "
                  f"Spearman ρ = {g['spearman_rho']:.3f}; BN's normalised input has median variance "
                  f"{g['z_var_median']:.2f} over sites (the prediction assumes 1)",
              "blocks with ‖F(x)‖/‖x‖ below 0.1 / 0.25 / 0.5: " + " / ".join(f"{v:.0%}" for v in c.values()),
              f"F(x) close to zero (most blocks below 0.5): {'yes' if analysis.close_to_zero else 'no'}",
              f"rise in the last layers: last {rise.k} site(s) / median of the rest = {rise.ratio:.2f} "
              f"[{rise.low:.2f}, {rise.high:.2f}] -> {'yes' if rise.rises else 'no'}"]
    lines += [f"  stage {s['stage']}: {s['last']} / median of the stage = {s['ratio']:.2f} [{s['low']:.2f}, {s['high']:.2f}]"
              for s in rise.stages]
    lines += [f"  last block: γ-pred std {e['gamma_std_last']:.3f} vs {e['gamma_std_rest_median']:.3f} (median of the rest); "
              f"‖F‖/‖x‖ {e['ratio_last_block']:.2f} vs {e['ratio_other_blocks_median']:.2f}; "
              f"Δtop-1 when deleted {e['lesion_last_block']:.1f} vs {e['lesion_other_blocks_median']:.1f} pp; "
              f"linear-probe top-1 gained {e['separability_gain_last_block']:+.1f} vs "
              f"{e['separability_gain_other_blocks_median']:+.1f} pp"]
    return "\n".join(lines)


def format_baselines(baselines: Sequence[Baseline]) -> str:
    """Trained against initialised: mean ||F(x)||/||x||, share below 0.5 and the decay exponent, per model and BN mode."""
    w = max([12] + [len(b.label) for b in baselines])
    lines = [f"{'model':<{w}} {'BN':<5} {'mean ‖F‖/‖x‖':>13} {'<0.5':>6} {'exponent':>9}   "
             f"{'at init (batch statistics, mean of seeds)':<40}",
             f"{'':<{w}} {'':<5} {'trained':>13} {'':>6} {'':>9}   {'mean':>6} {'<0.5':>6} {'exponent':>9}"]
    for b in baselines:
        t, i = b.trained, b.init
        lines.append(f"{b.label:<{w}} {b.bn_mode:<5} {t['mean_ratio']:>13.3f} {t['below_0.5']:>6.0%} "
                     f"{t['decay_exponent']:>9.2f}   {i['mean_ratio']:>6.3f} {i['below_0.5']:>6.0%} "
                     f"{i['decay_exponent']:>9.2f}")
    return "\n".join(lines)


def format_comparison(comparison: Comparison) -> str:
    """Per-model summary and the claim tests, as text (columns as wide as their longest entry)."""
    w = max([5] + [len(s["label"]) for s in comparison.summary])
    lines = [f"{'model':<{w}} {'top-1':>7} {'mean std':>9} {'median std':>11} {'‖F‖/‖x‖<0.5':>12}"]
    for s in comparison.summary:
        share = comparison.closeness[s["label"]]["below_0.5"]
        lines.append(f"{s['label']:<{w}} {s['top1']:>7.2f} {s['mean_std']:>9.3f} {s['median_std']:>11.3f} {share:>12.0%}")
    m = max([6] + [len(t.models) for t in comparison.tests])
    lines += ["", f"{'claim':<24} {'models':<{m}} {'statistic':>10} {'p (descr.)':>10} {'effect':>14}  holds"]
    for t in comparison.tests:
        lines.append(f"{t.key:<24} {t.models:<{m}} {t.statistic:>10.3f} {t.p_value:>10.2g} "
                     f"{t.effect_name[:8]:>8} {t.effect:>5.2f}  {'yes' if t.holds else 'no'}")
    return "\n".join(lines)

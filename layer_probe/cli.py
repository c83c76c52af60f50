"""Command line: `layer-probe SUBCOMMAND ...`. Each subcommand parses its arguments into the
library's configuration objects and calls one library function."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import matplotlib
import torch

from .checkpoint import FIG7
from .errors import LayerProbeError


def _shipped() -> list[str]:
    """The default set: the five networks of Fig. 7 shipped in checkpoints/ (a missing one is an error later)."""
    from .checkpoint import shipped

    return [str(p) for p in shipped(existing=False)]


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LayerProbeError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return name


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM ends any command like Ctrl-C: a file being written is removed, a finished epoch is already saved."""
    raise KeyboardInterrupt


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="CIFAR-10: cifar-10-batches-py folder, ImageFolder tree or .tar.gz (default: "
                                  "$LAYER_PROBE_DATA, else ../shared/datasets/cifar10-jpeg.tar.gz beside the "
                                  "repository, else $LAYER_PROBE_CACHE/cifar10, i.e. ~/.cache/layer-probe/cifar10)")
    p.add_argument("--download", action="store_true",
                   help="fetch CIFAR-10 (about 170 MB, needs network) into --data, or into the default folder when "
                        "no data is found")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def _add_probe_args(p: argparse.ArgumentParser, *, several: bool = False) -> None:
    _add_data_args(p)
    if several:
        p.add_argument("--arch", nargs="+", help="one architecture per checkpoint, for files that do not say")
    else:
        p.add_argument("--arch", help="architecture, when the checkpoint does not say (e.g. resnet20, plain20)")
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--limit", type=_positive, help="probe a seeded random subset of N images")
    p.add_argument("--batch-size", type=_positive, default=256)
    p.add_argument("--sites", default="3x3", help="'3x3' (Fig. 7), 'all-bn', or a regex over site names")
    p.add_argument("--bn-mode", choices=("eval", "train"), default="eval",
                   help="BN with running statistics (eval) or batch statistics (train)")
    p.add_argument("--axes", choices=("all", "channel"), default="all",
                   help="std over all N*C*H*W elements, or the mean of per-channel stds")
    p.add_argument("--amp", choices=("bf16", "auto"),
                   help="autocast the forward pass in bf16 (statistics stay float64; stds move slightly); auto: only "
                        "where bf16 times faster than fp32 on this machine; bf16 warns where it is slower")
    p.add_argument("--compile", action="store_true", help="fuse the statistics with torch.compile: same numbers, "
                   "a smaller overhead, up to a minute to compile the first time (needs a C++ compiler on a CPU)")
    p.add_argument("--mean", type=float, nargs=3, help="input normalisation mean (overrides the checkpoint)")
    p.add_argument("--std", type=float, nargs=3, help="input normalisation std (overrides the checkpoint)")


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="SPEC", help="the network the checkpoint's weights belong to: torchvision:NAME, "
                   "timm:NAME (pip install 'layer-probe[timm]') or path/to/file.py:CALLABLE; a file SPEC imports and "
                   "RUNS that Python file to build the network (the checkpoint is still read with weights_only=True)")


def _load_spec(spec: str, checkpoint: str | None, device: str):  # noqa: ANN202 - checkpoint.Checkpoint
    """--model SPEC: build the network, then load the checkpoint's weights into it (fresh weights without one)."""
    from .checkpoint import Checkpoint, load_weights
    from .models.spec import build_spec

    model = build_spec(spec)
    if checkpoint is None:
        return Checkpoint(model.to(device).eval(), spec, {}, "")
    return load_weights(checkpoint, model, spec, device=device)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (exit code 2), like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="layer-probe", description="Layer responses of plain and residual "
                                     "networks (He et al. 2016, Section 4.2, Fig. 7).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("responses", help="std of every 3x3 conv's BN output, in network order and sorted")
    p.add_argument("checkpoint")
    _add_probe_args(p)
    _add_model_arg(p)
    p.add_argument("--out", type=Path, help="write responses.json and responses.csv into this folder")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--plot", type=Path, help="write the two-panel Fig. 7 plot (.png, .pdf or .svg)")
    p.add_argument("--style", choices=("report", "paper"), default="report")
    p.add_argument("--imagenet", type=Path, metavar="DIR",
                   help="probe on an ImageNet-style folder DIR/<class>/*.JPEG instead of --data (resize 256, crop 224)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers decoding --imagenet images")

    p = sub.add_parser("analyze", help="is F(x) close to zero? per-block report with CIs, γ, lesions, the rise")
    p.add_argument("checkpoint")
    _add_probe_args(p)
    p.add_argument("--out", type=Path, help="write analysis.json, blocks.csv, sites.csv and responses.* here")
    p.add_argument("--plot", type=Path, help="per-block plot (.png, .pdf or .svg)")
    p.add_argument("--style", choices=("report", "paper"), default="report")
    p.add_argument("--bootstrap", type=_positive, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--lesion-images", type=_positive, default=2000, help="images per lesion pass")
    p.add_argument("--rise-k", type=_positive, default=1, help="the rise compares the last K sites with the rest")
    p.set_defaults(batch_size=100)

    p = sub.add_parser("ablations", help="which training choice makes the rise in the last layers (resnet20 runs)")
    p.add_argument("--checkpoints", type=Path, metavar="DIR",
                   help="where resnet20.pt, ablations/ and faithful/ are (default: the repository's checkpoints/)")
    p.add_argument("--limit", type=_positive, help="analyse a seeded random subset of N test images")
    p.add_argument("--out", type=Path, help="write ablations.csv and verdicts.csv here")
    _add_data_args(p)

    p = sub.add_parser("compare", help="Fig. 7 for several checkpoints, with the paper's claims tested")
    p.add_argument("checkpoints", nargs="*", help=f"default: checkpoints/{{{','.join(FIG7)}}}.pt")
    _add_probe_args(p, several=True)
    p.add_argument("--labels", nargs="+", help="one legend label per checkpoint")
    p.add_argument("--set", choices=("fast", "faithful", "all"),
                   help="the shipped networks of a recipe, with their seed replicates (default without checkpoints: fast)")
    p.add_argument("--bn-modes", nargs="+", choices=("eval", "train"), default=["eval", "train"],
                   help="test every claim under each (default: both running and batch statistics)")
    p.add_argument("--init-seeds", type=int, default=3, metavar="N",
                   help="also measure N freshly initialised networks of each architecture (batch statistics): how "
                        "much of a small F(x) the architecture gives before training (0: skip)")
    p.add_argument("--out", type=Path, help="write claims.csv, closeness.csv and per BN mode comparison.json, tests.csv "
                                            "and each model's responses here")
    p.add_argument("--plot", type=Path, help="Fig. 7's two panels for all models (.png, .pdf or .svg)")
    p.add_argument("--style", choices=("report", "paper"), default="report")

    p = sub.add_parser("dynamics", help="how the responses changed while each network trained")
    p.add_argument("runs", nargs="*", help="checkpoints (their .history.csv), history files or training run folders "
                                           f"(default: checkpoints/{{{','.join(FIG7)}}}.pt)")
    p.add_argument("--labels", nargs="+", help="one label per run")
    p.add_argument("--plot", type=Path, help="heatmaps and per-stage curves (.png, .pdf or .svg)")
    p.add_argument("--out", type=Path, help="write dynamics.csv (the summary table) here")
    p.add_argument("--style", choices=("report", "paper"), default="report")

    p = sub.add_parser("report", help="all figures and tables behind the notebooks, as files and report.md")
    p.add_argument("checkpoints", nargs="*", help=f"default: checkpoints/{{{','.join(FIG7)}}}.pt")
    p.add_argument("--out", type=Path, default=Path("report"), help="output folder (default: report/)")
    p.add_argument("--limit", type=_positive, help="use a seeded random subset of N test images")
    p.add_argument("--lang", choices=("en", "ko", "both"), default="en",
                   help="language of the notebooks' answers at the end of report.md (default: en)")
    _add_data_args(p)

    p = sub.add_parser("checkpoints", help="the trained checkpoints: recipe, epochs, wall time, errors, sha256")
    p.add_argument("checkpoints", nargs="*", help=f"default: checkpoints/{{{','.join(FIG7)}}}.pt that exist")
    p.add_argument("--write", type=Path, metavar="DIR",
                   help="also write DIR/README.md (this table, the degradation check) and DIR/training_curves.png")

    p = sub.add_parser("sites", help="list a model's probe sites with their roles, and each block's addition")
    p.add_argument("checkpoint", nargs="?", help="a checkpoint file, or an architecture name such as resnet50 "
                                                 "(optional with --model: fresh weights)")
    p.add_argument("--arch")
    p.add_argument("--sites", default="all-bn")
    _add_model_arg(p)

    p = sub.add_parser("train", help="train a CIFAR network, recording its responses every epoch")
    p.add_argument("--arch", required=True)
    p.add_argument("--recipe", choices=("paper", "fast", "faithful"), default="fast",
                   help="fast: 40 epochs for a small CPU; faithful: fast with weight decay on every parameter and "
                        "no label smoothing, as the paper's training; paper: Section 4.2 (for a GPU)")
    p.add_argument("--epochs", type=_positive, help="override the recipe's number of epochs")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto (default): time a few steps in both on this machine and take the faster")
    p.add_argument("--label-smoothing", type=float, metavar="X", help="override the recipe's label smoothing")
    p.add_argument("--decay-all", action="store_true", help="weight decay on every parameter, BN's γ and β included")
    p.add_argument("--head", choices=("linear", "normalized"),
                   help="normalized: BN without affine on the pooled features, before the linear classifier")
    p.add_argument("--freeze-last-bn", action="store_true",
                   help="hold the last block's branch-output BN at γ = 1, β = 0")
    p.add_argument("--out", type=Path, help="checkpoint path (default: checkpoints/ARCH.pt)")
    p.add_argument("--run-dir", type=Path, help="resumable state (default: ~/.cache/layer-probe/runs/<out folder>/<out stem>)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --run-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe-every", type=int, default=1, help="epochs between response probes")
    p.add_argument("--no-probe", action="store_true", help="do not record response dynamics")
    p.add_argument("--limit", type=_positive, help="train on a seeded subset of N images (smoke tests)")
    _add_data_args(p)
    return parser


def cmd_responses(args: argparse.Namespace) -> int:
    from .data import CLASSES, batches
    from .distributed import process_group
    from .measurement import measure_pass
    from .results import format_table

    _prepare_outputs(args)
    with process_group(_device(args.device)) as processes:  # several under torchrun, each probing its share
        if args.imagenet:
            ckpt, layout, make_batches, total, meta = _load_folder(args, processes)
        else:
            ckpt, layout, images, labels, meta = _load(args, args.checkpoint, args.arch)
            mine = processes.shard(len(labels), args.batch_size)
            make_batches = partial(batches, images[mine], labels[mine], args.batch_size, tuple(meta["mean"]),
                                   tuple(meta["std"]))
            total = len(labels[mine])
        responses, _ = measure_pass(ckpt.model, make_batches, _probe_config(args), total=total, layout=layout,
                                    meta=meta | {"processes": processes.size, "batch_size": args.batch_size},
                                    progress=processes.main, merge=processes.merge,
                                    classes=None if args.imagenet else len(CLASSES))
    bad = [s for s in responses.sites if s.nonfinite]
    if not processes.main:  # every process holds the merged responses; rank 0 alone writes and prints
        return 1 if bad else 0
    if args.out:
        responses.save(args.out)
    if args.plot:
        from .plots import plot_responses, save_figure
        save_figure(plot_responses([responses], style=args.style), args.plot)
    if args.format == "json":
        sys.stdout.write(responses.to_json())
    elif args.format == "csv":
        sys.stdout.write(responses.to_dataframe().to_csv(index=False))
    else:
        print(format_table(responses))
    for s in bad:
        print(f"warning: site {s.name} produced {s.nonfinite} non-finite value(s); its std is undefined", file=sys.stderr)
    return 1 if bad else 0


def _prepare_outputs(args: argparse.Namespace) -> None:
    """Refuse an unwritable --out or --plot before any work starts."""
    from .files import check_writable
    from .plots import check_suffix

    if args.out:
        check_writable(args.out)
    if args.plot:
        check_suffix(args.plot)
        check_writable(args.plot.parent)


def _load(args: argparse.Namespace, checkpoint: str, arch: str | None):  # noqa: ANN202
    """Load one checkpoint, check its sites, then load the images.

    Returns (checkpoint, selected sites, images, labels, the metadata every output records).
    """
    from .data import load_cifar10, to_tensors

    ckpt, layout, meta = _load_model(args, checkpoint, arch)
    data = load_cifar10(args.data, args.split, download=args.download)
    images, labels = to_tensors(data, args.limit, meta["device"])
    return ckpt, layout, images, labels, meta | {"data": data.source, "data_sha256": data.sha256, "split": args.split}


def _load_folder(args: argparse.Namespace, processes):  # noqa: ANN001, ANN202 - distributed.Processes
    """`responses --imagenet`: like `_load`, with this process's share of the folder as a batch factory.

    Returns (checkpoint, selected sites, batch factory, number of images, metadata).
    """
    from .data import folder_batches, load_image_folder, subset

    if args.data:
        raise LayerProbeError("pass either --data (CIFAR-10) or --imagenet DIR, not both")
    ckpt, layout, meta = _load_model(args, args.checkpoint, args.arch)
    data = load_image_folder(args.imagenet)
    index = subset(len(data), args.limit)
    index = index[processes.shard(len(index), args.batch_size)]
    make_batches = partial(folder_batches, data, index, args.batch_size, tuple(meta["mean"]), tuple(meta["std"]),
                           meta["device"], workers=args.workers)
    return ckpt, layout, make_batches, len(index), meta | {"data": data.source, "data_sha256": data.sha256,
                                                           "split": args.imagenet.name}


def _load_model(args: argparse.Namespace, checkpoint: str, arch: str | None):  # noqa: ANN202
    """One checkpoint on `--device` and its selected sites, with the metadata every output records about them."""
    from .checkpoint import load_checkpoint
    from .sites import find_sites

    device = _device(args.device)
    if getattr(args, "model", None):
        ckpt = _load_spec(args.model, checkpoint, device)
    else:
        ckpt = load_checkpoint(checkpoint, arch, device=device)
    layout = find_sites(ckpt.model).select(args.sites)
    meta = {"checkpoint": checkpoint, "arch_kwargs": ckpt.arch_kwargs, "limit": args.limit, "device": device,
            "mean": list(args.mean or ckpt.mean), "std": list(args.std or ckpt.std)} | ckpt.describe(ckpt.arch)
    return ckpt, layout, meta


def _probe_config(args: argparse.Namespace):  # noqa: ANN202
    from .measurement import ProbeConfig

    return ProbeConfig(sites=args.sites, bn_mode=args.bn_mode, axes=args.axes, batch_size=args.batch_size,
                       amp=args.amp, compiled=args.compile)


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import AnalysisConfig, analyze, format_analysis
    from .plots import plot_analysis, save_figure

    _prepare_outputs(args)
    ckpt, layout, images, labels, meta = _load(args, args.checkpoint, args.arch)
    config = AnalysisConfig(probe=_probe_config(args), bootstrap=args.bootstrap, lesion_images=args.lesion_images,
                            rise_k=args.rise_k)
    analysis, responses = analyze(ckpt.model, images, labels, tuple(meta["mean"]), tuple(meta["std"]), config,
                                  meta=meta, layout=layout)
    if args.out:
        analysis.save(args.out)
        responses.save(args.out)
    if args.plot:
        save_figure(plot_analysis(analysis, style=args.style), args.plot)
    print(format_analysis(analysis))
    return 0


def cmd_ablations(args: argparse.Namespace) -> int:
    from .ablations import ablation_table, find_runs, verdicts
    from .checkpoint import checkpoints_dir
    from .data import load_cifar10, to_tensors
    from .files import check_writable, write_text

    folder = args.checkpoints or checkpoints_dir()
    runs = find_runs(folder)
    if not runs:
        raise LayerProbeError(f"no resnet20 runs under {folder} (train them with `make ablations`)")
    if args.out:
        check_writable(args.out)
    images, labels = to_tensors(load_cifar10(args.data, "test", download=args.download), args.limit)
    table = ablation_table(runs, images, labels)
    judged = verdicts(table)
    if args.out:
        write_text(args.out / "ablations.csv", table.to_csv(index=False))
        write_text(args.out / "verdicts.csv", judged.to_csv(index=False))
    print(table.round(3).to_string(index=False), "", judged.round(3).to_string(index=False) if len(judged)
          else "no ablation runs yet", sep="\n")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .analysis import baseline, claims_table, compare, format_baselines, format_comparison
    from .data import CLASSES
    from .files import write_text
    from .measurement import measure_images
    from .plots import plot_responses, save_figure

    from .checkpoint import checkpoints_dir, shipped

    if args.checkpoints and args.set:
        raise LayerProbeError("pass checkpoints or --set, not both")
    recipes = ("fast", "faithful") if args.set == "all" else (args.set or "fast",)
    checkpoints = args.checkpoints or [str(p) for r in recipes for p in shipped(r, existing=r != "fast")]
    for option in ("arch", "labels"):
        given = getattr(args, option)
        if given and len(given) != len(checkpoints):
            raise LayerProbeError(f"--{option} needs one value per checkpoint ({len(checkpoints)}), got {len(given)}")
    _prepare_outputs(args)
    results, baselines = {mode: [] for mode in args.bn_modes}, []
    for i, path in enumerate(checkpoints):
        ckpt, layout, images, labels, meta = _load(args, path, args.arch[i] if args.arch else None)
        # a set's networks: "resnet20" (fast) or "faithful/resnet20-seed1", of the group "faithful/resnet20" that
        # Fig. 7 draws as one band
        within = Path(path).with_suffix("").relative_to(checkpoints_dir()) if args.set else None
        label = args.labels[i] if args.labels else within.as_posix() if within else ckpt.arch
        meta |= ckpt.describe(label)
        norm = tuple(meta["mean"]), tuple(meta["std"])
        batch_stats = replace(_probe_config(args), bn_mode="train")  # an untrained net's running statistics say nothing
        initial = [measure_images(ckpt.initialised(seed), images, labels, *norm, batch_stats, progress=False,
                                  meta={"label": f"{label} init {seed}"}, classes=len(CLASSES))
                   for seed in range(args.init_seeds)]
        for mode in args.bn_modes:
            r = measure_images(ckpt.model, images, labels, *norm, replace(_probe_config(args), bn_mode=mode),
                               meta=meta | {"label": label}, layout=layout, classes=len(CLASSES))
            results[mode].append(r)
            if initial:
                baselines.append(baseline(r, initial))
    comparisons = {mode: compare(rs) for mode, rs in results.items()}
    claims = claims_table(list(comparisons.values()))
    if args.out:
        for mode, comparison in comparisons.items():
            comparison.save(args.out / mode)
            for r in results[mode]:
                r.save(args.out / mode / r.label)
        write_text(args.out / "claims.csv", claims.to_csv(index=False))
        if baselines:
            write_text(args.out / "closeness.csv", _baseline_frame(baselines).to_csv(index=False))
    if args.plot:
        save_figure(plot_responses(results[args.bn_modes[0]], style=args.style), args.plot)
    for mode, comparison in comparisons.items():
        print(f"BN {mode} ({'running' if mode == 'eval' else 'batch'} statistics)", format_comparison(comparison),
              "", sep="\n")
    from .analysis import claims_by_seed

    print(claims_by_seed(claims).round(3).to_string(index=False))
    every = claims.groupby(["claim", "recipe"])["holds"].all()
    print("claims holding under every BN mode and seed measured: "
          + (", ".join(f"{c}" + (f" ({r})" if r else "") for (c, r), v in every.items() if v) or "none"))
    if baselines:
        print("", format_baselines(baselines), sep="\n")
    return 0


def _baseline_frame(baselines):  # noqa: ANN001, ANN202 - analysis.Baseline, pandas.DataFrame
    import pandas as pd

    return pd.DataFrame([{"model": b.label, "bn_mode": b.bn_mode, "init_seeds": b.seeds,
                          **{f"trained_{k}": v for k, v in b.trained.items()},
                          **{f"init_{k}": v for k, v in b.init.items()}} for b in baselines])


def cmd_dynamics(args: argparse.Namespace) -> int:
    from .dynamics import read_history, summary
    from .files import write_text
    from .plots import plot_dynamics, save_figure

    runs = args.runs or _shipped()
    if args.labels and len(args.labels) != len(runs):
        raise LayerProbeError(f"--labels needs one value per run ({len(runs)}), got {len(args.labels)}")
    _prepare_outputs(args)
    histories = [read_history(run, args.labels[i] if args.labels else None) for i, run in enumerate(runs)]
    table = summary(histories)
    if args.out:
        write_text(args.out / "dynamics.csv", table.to_csv(index=False))
    if args.plot:
        save_figure(plot_dynamics(histories, style=args.style), args.plot)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .files import check_writable
    from .report import build_report

    check_writable(args.out)
    if args.download:
        from .data import resolve_data
        resolve_data(args.data, download=True)
    checkpoints = args.checkpoints or _shipped()
    langs = ("en", "ko") if args.lang == "both" else (args.lang,)
    report = build_report(checkpoints, args.out, data=args.data, limit=args.limit, device=_device(args.device),
                          langs=langs)
    print(f"wrote {report}")
    return 0


def cmd_checkpoints(args: argparse.Namespace) -> int:
    from .files import check_writable
    from .report import checkpoint_table, write_checkpoint_card

    checkpoints = args.checkpoints or [p for p in _shipped() if Path(p).exists()]
    if not checkpoints:
        raise LayerProbeError("no checkpoints given and none in checkpoints/ (train them with `make checkpoints`)")
    if args.write:
        check_writable(args.write)
        print(f"wrote {write_checkpoint_card(checkpoints, args.write)}")
    print(checkpoint_table(checkpoints).to_string(index=False, max_colwidth=None))
    return 0


def cmd_sites(args: argparse.Namespace) -> int:
    from .models import MODELS, build_model
    from .sites import find_sites, format_layout

    if args.model:
        model = _load_spec(args.model, args.checkpoint, "cpu").model
    elif args.checkpoint is None:
        raise LayerProbeError("pass a checkpoint or an architecture name, or --model SPEC")
    elif args.checkpoint in MODELS and not Path(args.checkpoint).exists():
        model = build_model(args.checkpoint)
    else:
        from .checkpoint import load_checkpoint
        model = load_checkpoint(args.checkpoint, args.arch).model
    print(format_layout(find_sites(model).select(args.sites)))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .distributed import process_group
    from .train import RECIPES, TrainConfig, train

    recipe = RECIPES[args.recipe]
    switches = {"epochs": args.epochs, "label_smoothing": args.label_smoothing, "head": args.head,
                "decay_all": args.decay_all or None, "freeze_last_bn": args.freeze_last_bn or None}
    recipe = replace(recipe, **{k: v for k, v in switches.items() if v is not None})
    if not 0 <= recipe.label_smoothing < 1:
        raise LayerProbeError(f"--label-smoothing must be in [0, 1), got {recipe.label_smoothing}")
    if args.probe_every < 0:
        raise LayerProbeError(f"--probe-every must be 0 or more, got {args.probe_every}")
    out = args.out or Path("checkpoints") / f"{args.arch}.pt"
    config = TrainConfig(arch=args.arch, out=out, recipe=recipe, data=args.data, seed=args.seed,
                         device=_device(args.device), precision=args.precision, run_dir=args.run_dir,
                         probe_every=0 if args.no_probe else args.probe_every, limit=args.limit)
    if args.download:
        from .data import resolve_data
        resolve_data(args.data, download=True)
    with process_group(config.device) as processes:  # several under torchrun: DistributedDataParallel
        train(config, resume=args.resume, processes=processes)
    return 0


COMMANDS = {"responses": cmd_responses, "analyze": cmd_analyze, "ablations": cmd_ablations, "compare": cmd_compare, "dynamics": cmd_dynamics,
            "report": cmd_report, "checkpoints": cmd_checkpoints, "sites": cmd_sites, "train": cmd_train}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `layer-probe` command; returns the exit code (2 for user errors)."""
    args = build_parser().parse_args(argv)
    matplotlib.use("Agg")  # the commands write figure files and never open a window
    previous = signal.signal(signal.SIGTERM, _interrupt)
    if getattr(args, "compile", False):
        print("compiling the fused statistics (torch.compile: up to a minute the first time on a machine, "
              "then cached)", file=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except LayerProbeError as e:
        print(f"layer-probe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layer-probe: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)

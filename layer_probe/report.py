"""`layer-probe report`: the figures and numbers behind the notebooks' questions, without Jupyter.

Writes into one folder: Fig. 7 for all models with the claim tests, the F(x) report of each
model, the response dynamics, the training curves (Fig. 6's style), the identity construction
check, and `report.md` that ties them together.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from .analysis import AnalysisConfig, analyze, compare
from .answers import stored_answers
from .checkpoint import load_checkpoint
from .data import load_cifar10, to_tensors
from .dynamics import read_epochs, read_history, summary
from .errors import LayerProbeError
from .files import sha256, write_text
from .models import is_plain
from .plots import plot_analysis, plot_dynamics, plot_responses, plot_training_curves, save_figure
from .surgery import identity_check

JPEG_NOTE = ("Numbers come from the JPEG re-encoding of CIFAR-10 (quality 75, 4:2:0) when that is the data "
             "given; it is not pixel-identical to CIFAR-10, so accuracies are not comparable with the paper's.")


def build_report(checkpoints: Sequence[str | Path], out: str | Path, *, data: str | None = None,
                 limit: int | None = None, device: str = "cpu", progress: bool = True,
                 langs: Sequence[str] = ("en",)) -> Path:
    """Measure every checkpoint on the test split and write the report into `out`, ending with the notebooks'
    saved answers in each language of `langs`; returns report.md."""
    out = Path(out)
    test = load_cifar10(data, "test")
    images, labels = to_tensors(test, limit, device)
    models = [load_checkpoint(path, device=device) for path in checkpoints]
    lesion_images = min(len(labels), 1000)
    analyses, responses = [], []
    for ckpt in models:
        meta = {"checkpoint": ckpt.path, "arch": ckpt.arch, "label": ckpt.arch, "split": "test", "data": test.source,
                "data_sha256": test.sha256}
        a, r = analyze(ckpt.model, images, labels, ckpt.mean, ckpt.std, AnalysisConfig(lesion_images=lesion_images),
                       meta=meta, progress=progress)
        analyses.append(a)
        responses.append(r)
        a.save(out / ckpt.arch)
        r.save(out / ckpt.arch)
        save_figure(plot_analysis(a), out / f"{ckpt.arch}_blocks.png")
    comparison = compare(responses)
    comparison.save(out)
    for suffix in (".png", ".pdf"):
        save_figure(plot_responses(responses), out / f"fig7{suffix}")
    lines = [f"# Layer responses of {', '.join(c.arch for c in models)}", "", JPEG_NOTE, "",
             f"{len(labels)} test images from `{test.source}` (sha256 {test.sha256[:12]}…).", "",
             "## Fig. 7: std of each 3×3 layer's BN output", "", "![Fig. 7](fig7.png)", "",
             _markdown(pd.DataFrame(comparison.summary)), "", "### The paper's claims, tested", "",
             _markdown(comparison.tests_dataframe()[["claim", "models", "statistic", "p_value", "effect", "effect_name",
                                                      "holds"]]), ""]
    lines += ["## Is F(x) close to zero? Why does the std rise in the last layers?", ""]
    rows = [{"model": a.meta["arch"], "close_to_zero": a.close_to_zero, **a.closeness, **a.gamma_fit,
             "rise": a.rise.ratio, "rise_low": a.rise.low, "rise_high": a.rise.high, "rises": a.rise.rises,
             **a.rise.evidence} for a in analyses]
    lines += [_markdown(pd.DataFrame(rows)), ""]
    lines += [f"![{a.meta['arch']}]({a.meta['arch']}_blocks.png)" for a in analyses] + [""]
    histories = [h for c in models if (h := _optional(read_history, c.path, c.arch)) is not None]
    if histories:
        save_figure(plot_dynamics(histories), out / "dynamics.png")
        table = summary(histories)
        write_text(out / "dynamics.csv", table.to_csv(index=False))
        lines += ["## Response dynamics during training", "", "![dynamics](dynamics.png)", "", _markdown(table), ""]
    logs = {c.arch: log for c in models if (log := _optional(read_epochs, c.path)) is not None}
    if logs:
        save_figure(plot_training_curves(logs), out / "training_curves.png")
        finals = pd.DataFrame([{"model": k, "final_train_error": v.train_error.iloc[-1],
                                "final_test_error": v.test_error.iloc[-1]} for k, v in logs.items()])
        lines += ["## Training curves (Fig. 6's style) and degradation", "", "![training](training_curves.png)", "",
                  _markdown(finals), ""]
    shallow = [c for c in models if c.arch in ("resnet20", "plain20")]
    if shallow:
        checks = [identity_check(c.model, c.arch, 6, images, labels, c.mean, c.std, bn_mode=mode)
                  for c in shallow for mode in ("eval", "train")]
        write_text(out / "identity.json", json.dumps([asdict(c) for c in checks], indent=1) + "\n")
        lines += ["## Identity construction: a deeper net that is no worse", "",
                  _markdown(pd.DataFrame([asdict(c) for c in checks])), ""]
    report = out / "report.md"
    write_text(report, "\n".join(lines) + "\n" + stored_answers(langs))
    return report


def checkpoint_table(checkpoints: Sequence[str | Path], folder: str | Path | None = None) -> pd.DataFrame:
    """One row per trained checkpoint, from its metadata and bytes: what `checkpoints/README.md` lists.

    `model` is the file's path below `folder` without its suffix (e.g. `ablations/resnet20-no-smoothing`);
    `switches` lists where its recipe departs from the named recipe; `precision` is what its epochs ran in.
    """
    from .train import RECIPES

    rows = []
    for path in checkpoints:
        ckpt = load_checkpoint(path)
        meta, recipe = ckpt.meta, ckpt.meta.get("recipe", {})
        if "top1" not in meta:
            raise LayerProbeError(f"{path}: not trained by `layer-probe train` (no training summary in its metadata)")
        named = asdict(RECIPES[recipe["name"]]) if recipe.get("name") in RECIPES else {}
        switches = [f"{k}={v}" for k, v in recipe.items() if k in named and k != "epochs" and named[k] != v]
        label = Path(path).with_suffix("")
        label = label.relative_to(folder) if folder and label.is_relative_to(folder) else Path(label.name)
        rows.append({"model": label.as_posix(), "arch": ckpt.arch, "dataset": Path(meta["dataset"]).name,
                     "recipe": recipe.get("name"), "switches": " ".join(switches) or "-",
                     "precision": meta.get("precision") or ("bf16" if recipe.get("bf16") else "fp32"),
                     "epochs": meta["epochs"], "seed": meta["seed"], "wall_h": round(meta["wall_s"] / 3600, 2),
                     "device": meta["device"], "train_error": meta["train_error"], "top1": meta["top1"],
                     "dataset_sha256": meta["dataset_sha256"][:12],
                     "sha256": sha256(Path(path))})
    return pd.DataFrame(rows)


def write_checkpoint_card(checkpoints: Sequence[str | Path], folder: str | Path) -> Path:
    """Write `folder/README.md` (the table, the degradation check) and `folder/training_curves.png`."""
    folder = Path(folder)
    table = checkpoint_table(checkpoints, folder)
    logs = {c: read_epochs(path) for c, path in zip(table.model, checkpoints)}
    save_figure(plot_training_curves(logs), folder / "training_curves.png")
    final = dict(zip(table.model, table.train_error))
    datasets = ", ".join(f"`{d}`" for d in dict.fromkeys(table.pop("dataset")))
    lines = ["# Trained checkpoints", "",
             "Trained by this project's own code (`layer-probe train`; `make checkpoints` for the five networks "
             "of Fig. 7 under the `fast` recipe, `make ablations`, `make faithful` and `make replicates` for the "
             f"rest), on the training split of {datasets}; top-1 is measured in fp32 on its test split at the end "
             "of the last epoch. " + JPEG_NOTE, "",
             "`switches` lists where a run departs from its named recipe; `precision` is what its training steps "
             "ran in (the shipped five predate `--precision` and ran in bf16); wall_h is the training time in hours "
             "on `device` (2 CPU cores; other work shared the machine at times), the machines its epochs ran on "
             "(files trained before the logs named them give only the CPU architecture, x86_64; their precision "
             "tells the kind: bf16 ran on CPUs with bf16 instructions, fp32 where `--precision auto` found bf16 "
             "slower, on CPUs without them); train_error is the last epoch's, "
             "in percent, with augmentation (and label smoothing where the recipe has it) on; dataset_sha256 "
             "begins the checksum of the training data read; sha256 is the file's.", "",
             _markdown(table), "", "![training curves](training_curves.png)", "",
             "Training error (dashed) and test error (solid) per epoch, in the style of the paper's Fig. 6. "
             "Each model's log is `MODEL.epochs.csv`; the responses recorded after every epoch are in "
             "`MODEL.history.csv` (`layer-probe dynamics checkpoints/MODEL.pt`).", ""]
    lines += [f"- {line}" for line in degradation(final)]
    readme = folder / "README.md"
    write_text(readme, "\n".join(lines).rstrip() + "\n")
    return readme


def degradation(final_train_error: dict[str, float]) -> list[str]:
    """Section 4.2's degradation problem, read off final training errors (percent) by model name: for each
    of plain and ResNet with both depths 20 and 56 present, whether the deeper ends higher."""
    lines = []
    for deep, shallow in (("plain56", "plain20"), ("resnet56", "resnet20")):
        if deep in final_train_error and shallow in final_train_error:
            a, b = final_train_error[deep], final_train_error[shallow]
            lines.append(f"{deep}'s final training error, {a:.2f}%, is {'above' if a > b else 'below'} {shallow}'s, "
                         f"{b:.2f}%" + (" (the degradation problem)." if a > b and is_plain(deep) else "."))
    return lines


def _optional(reader, *args):  # noqa: ANN001, ANN202 - read_history or read_epochs and their result
    """What `reader` returns, or None when the file it needs is not there."""
    try:
        return reader(*args)
    except LayerProbeError:
        return None


def _markdown(frame: pd.DataFrame) -> str:
    """A pipe table (pandas' to_markdown needs an extra package)."""
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    return "\n".join([header, "|" + "---|" * len(frame.columns)] + ["| " + " | ".join(r) + " |" for r in cells])

"""Training the CIFAR networks of Section 4.2, with the response dynamics recorded as they train.

Two recipes:
- `paper`: Section 4.2 as written: SGD (momentum 0.9, weight decay 1e-4), batch 128, lr 0.1
  divided by 10 at 32k and 48k iterations, stop at 64k, 45k/5k train/validation split,
  4-pixel padding + random crop + flip; ResNet-110 warms up at lr 0.01 for 400 iterations.
- `fast`: for a small CPU: bf16 autocast, channels_last, batch 256, one-cycle lr, label
  smoothing, all 50k training images.

The whole split is held in memory as uint8 and augmented on tensors per image, with no
DataLoader. After every epoch (and once before the first step, epoch 0) the probe runs on a
fixed probe set and appends each site's std and each block's ||F(x)||/||x|| to a history.
State is saved atomically every epoch, so `--resume` after a kill loses at most the
unfinished epoch.
"""

from __future__ import annotations

import csv
import io
import math
import platform
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import save_checkpoint, torch_load
from .data import CIFAR_MEAN, CIFAR_STD, ImageSet, cache_dir, load_cifar10, normalize, subset, to_tensors
from .distributed import Processes
from .errors import LayerProbeError
from .files import atomic_path, check_writable, write_text
from .models import build_model
from .probe import top1
from .results import ProbeConfig, Responses, measure_responses


@dataclass(frozen=True)
class Recipe:
    """Optimisation settings. Iteration counts are optimizer steps."""

    name: Literal["paper", "fast"]
    epochs: int
    batch_size: int
    lr: float  # peak learning rate
    momentum: float
    weight_decay: float
    nesterov: bool
    label_smoothing: float
    bf16: bool  # autocast forward/backward in bf16 (evaluation stays fp32)
    schedule: Literal["steps", "onecycle"]
    milestones: tuple[int, ...] = ()  # iterations where lr is divided by 10 ("steps")
    warmup_iters: int = 0  # iterations at lr/10 before the schedule starts ("steps", ResNet-110)
    holdout: int = 0  # training images held out as a validation set


RECIPES = {
    # 64k iterations of 128 images out of 45k = 182 epochs.
    "paper": Recipe("paper", epochs=182, batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=False,
                    label_smoothing=0.0, bf16=False, schedule="steps", milestones=(32000, 48000), holdout=5000),
    "fast": Recipe("fast", epochs=40, batch_size=256, lr=0.2, momentum=0.9, weight_decay=5e-4, nesterov=True,
                   label_smoothing=0.1, bf16=True, schedule="onecycle"),
}


@dataclass(frozen=True)
class TrainConfig:
    arch: str
    out: Path  # final checkpoint; the epoch log and response history are written beside it
    recipe: Recipe
    data: str | None = None
    seed: int = 0
    device: str = "cpu"
    run_dir: Path | None = None  # resumable state; default: <cache>/runs/<out stem>
    probe_every: int = 1  # epochs between response probes; 0 disables them
    probe_images: int = 1000  # size of the fixed probe set (test images chosen by seed)
    limit: int | None = None  # use only this many training images (tests, smoke runs)
    progress: bool = True

    @property
    def state_dir(self) -> Path:
        return self.run_dir or cache_dir() / "runs" / self.out.stem


EPOCH_FIELDS = ("epoch", "train_loss", "train_error", "test_error", "val_error", "lr", "images_per_s", "epoch_s",
                "probe_s", "wall_s")
HISTORY_FIELDS = ("epoch", "index", "name", "role", "std", "ratio")


def lr_at(recipe: Recipe, it: int, total: int, arch: str) -> float:
    """Learning rate for iteration `it` of `total`."""
    if recipe.schedule == "steps":
        if arch == "resnet110" and it < 400:  # Section 4.2: warm up at 0.01 until training error < 80%
            return recipe.lr / 10
        return recipe.lr * 0.1 ** sum(it >= m for m in recipe.milestones)
    warm = max(1, int(0.2 * total))
    if it < warm:
        return recipe.lr * (0.1 + 0.9 * it / warm)
    return recipe.lr * max(0.0, (total - it) / (total - warm))


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """4-pixel zero padding, a random 32x32 crop and a random horizontal flip, drawn per image.

    images: [N, 32, 32, 3] uint8 -> [N, 32, 32, 3] uint8.
    """
    n = len(images)
    padded = F.pad(images, (0, 0, 4, 4, 4, 4))
    oy, ox = (torch.randint(0, 9, (2, n), generator=generator)).to(images.device)
    flip = torch.rand(n, generator=generator).to(images.device) < 0.5
    rows = (oy[:, None] + torch.arange(32, device=images.device))[:, :, None]
    cols = ox[:, None] + torch.arange(32, device=images.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]
    return padded[torch.arange(n, device=images.device)[:, None, None], rows, cols]


def train(config: TrainConfig, *, resume: bool = False, processes: Processes = Processes()) -> Path:
    """Train `config.arch`, resuming from `config.state_dir` when asked; returns the checkpoint path.

    With several `processes` (torchrun, see `distributed.process_group`) the model trains under
    DistributedDataParallel: every process draws the same batches and augmentations, trains on
    its share of each batch (BN statistics per process, as on the paper's two GPUs), and rank 0
    alone evaluates, probes and writes.
    """
    rc, device = config.recipe, torch.device(config.device)
    state_path = config.state_dir / "state.pt"
    check_writable(config.out.parent)  # both are written after every epoch: fail before any work, not after it
    check_writable(config.state_dir)
    if state_path.exists() and not resume:
        raise LayerProbeError(f"{config.state_dir} holds a saved run; pass --resume to continue it "
                              "or --run-dir to start another")
    state = _read_state(state_path, config) if resume and state_path.exists() else None
    if state is not None and state["epoch"] >= rc.epochs and config.out.exists():
        if processes.main:  # finished before: keep the file as it is, bytes included, and load no data
            print(f"{config.arch}: already trained ({state['epoch']} epochs), {config.out} kept", flush=True)
        return config.out
    train_set = load_cifar10(config.data, "train")
    test_set = load_cifar10(config.data, "test")
    torch.manual_seed(config.seed)
    model = build_model(config.arch).to(device)
    generator = torch.Generator().manual_seed(config.seed)
    index = subset(len(train_set), config.limit, config.seed)
    holdout = torch.randperm(len(index), generator=torch.Generator().manual_seed(config.seed))[:rc.holdout]
    keep = torch.ones(len(index), dtype=torch.bool)
    keep[holdout] = False
    x_all, y_all = (torch.from_numpy(a[index]).to(device) for a in (train_set.images, train_set.labels))
    x_train, y_train, x_val, y_val = x_all[keep], y_all[keep], x_all[~keep], y_all[~keep]
    x_test, y_test = to_tensors(test_set, device=device)
    probe_x, probe_y = to_tensors(test_set, config.probe_images, device, seed=config.seed)
    params = [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": rc.weight_decay},
              {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    optimizer = torch.optim.SGD(params, lr=rc.lr, momentum=rc.momentum, nesterov=rc.nesterov)
    steps = math.ceil(len(y_train) / rc.batch_size)
    total = steps * rc.epochs
    if processes.active:  # fail now rather than at the end of an epoch if the last, smallest batch cannot be shared
        processes.shard(len(y_train) - (steps - 1) * rc.batch_size)
    epoch, wall, epochs_csv, history_csv, summary = 0, 0.0, "", "", {"epochs": 0}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        epoch, wall, epochs_csv, history_csv = state["epoch"], state["wall_s"], state["epochs_csv"], state["history_csv"]
        summary = state["summary"]
    model = model.to(memory_format=torch.channels_last)
    net = processes.wrap(model)
    meta = _meta(config, train_set) | {"processes": processes.size}
    if epoch == 0 and processes.main:
        history_csv = _csv(HISTORY_FIELDS, _history_rows(0, _probe(model, probe_x, probe_y)))
        epochs_csv = _csv(EPOCH_FIELDS, [])
    done = epoch  # epochs finished before this call
    for epoch in range(done + 1, rc.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(y_train), generator=generator).to(device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        wrong = torch.zeros((), dtype=torch.long, device=device)
        lr = rc.lr
        quiet = not (config.progress and processes.main) or None
        for i in tqdm(range(steps), desc=f"epoch {epoch}/{rc.epochs}", leave=False, disable=quiet):
            idx = perm[i * rc.batch_size:(i + 1) * rc.batch_size]
            mine = processes.shard(len(idx))  # this process's share of the batch: all of it in one process
            x = normalize(augment(x_train[idx], generator)[mine], CIFAR_MEAN, CIFAR_STD).contiguous(
                memory_format=torch.channels_last)
            y = y_train[idx][mine]
            lr = lr_at(rc, (epoch - 1) * steps + i, total, config.arch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=rc.bf16):
                logits = net(x)
                loss = F.cross_entropy(logits, y, label_smoothing=rc.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            # DDP averages the processes' gradients; weighting each by its share of the batch makes the step that
            # of the whole batch's mean loss even when the batch splits unevenly (the weight is 1 in one process)
            (loss * (len(y) * processes.size / len(idx))).backward()
            optimizer.step()
            loss_sum += loss.detach().double() * len(y)
            wrong += (logits.detach().argmax(1) != y).sum()
        train_s = time.perf_counter() - t0
        loss_sum, wrong = processes.sum(loss_sum), processes.sum(wrong)
        if not processes.main:  # the others go on to the next epoch and wait there for rank 0
            continue
        test_error = 100.0 - top1(model, x_test, y_test, CIFAR_MEAN, CIFAR_STD, 1000, channels_last=True)
        val_error = 100.0 - top1(model, x_val, y_val, CIFAR_MEAN, CIFAR_STD, 1000, channels_last=True) \
            if len(y_val) else float("nan")
        t1 = time.perf_counter()
        if config.probe_every and epoch % config.probe_every == 0:
            history_csv += _csv(HISTORY_FIELDS, _history_rows(epoch, _probe(model, probe_x, probe_y)), header=False)
        probe_s = time.perf_counter() - t1
        wall += time.perf_counter() - t0
        row = {"epoch": epoch, "train_loss": float(loss_sum) / len(y_train), "train_error": 100.0 * int(wrong) / len(y_train),
               "test_error": test_error, "val_error": val_error, "lr": lr, "images_per_s": len(y_train) / train_s,
               "epoch_s": time.perf_counter() - t0, "probe_s": probe_s, "wall_s": wall}
        epochs_csv += _csv(EPOCH_FIELDS, [row], header=False)
        summary = {"epochs": epoch, "train_error": row["train_error"], "top1": 100.0 - test_error, "wall_s": wall}
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                 "epoch": epoch, "wall_s": wall, "epochs_csv": epochs_csv, "history_csv": history_csv,
                 "summary": summary, "config": _config_dict(config)}
        with atomic_path(state_path) as tmp:
            torch.save(state, tmp)
        write_text(epochs_path(config.out), epochs_csv)
        write_text(history_path(config.out), history_csv)
        print(f"{config.arch} epoch {epoch}/{rc.epochs}: loss {row['train_loss']:.3f}, train error "
              f"{row['train_error']:.2f}%, test error {test_error:.2f}%, {row['images_per_s']:.0f} img/s, "
              f"probe {probe_s:.1f}s", flush=True)
    if not processes.main:
        return config.out
    save_checkpoint(config.out, model, config.arch, {}, meta | summary)
    write_text(epochs_path(config.out), epochs_csv)
    write_text(history_path(config.out), history_csv)
    print(f"wrote {config.out}", flush=True)
    return config.out


def _read_state(path: Path, config: TrainConfig) -> dict[str, Any]:
    """A saved run, read on the CPU like any untrusted file (see `torch_load`).

    Refused unless it is a run of the same architecture and recipe: continuing with another
    recipe (e.g. another --epochs) would silently change the learning-rate schedule mid-run.
    """
    arch = config.arch
    state = torch_load(path)
    saved = state.get("config") if isinstance(state, dict) else None
    if not isinstance(saved, dict) or saved.get("arch") != arch:
        found = f"a run of {saved.get('arch')}" if isinstance(saved, dict) else "no training run"
        raise LayerProbeError(f"{path}: holds {found}, not of {arch}; pass another --run-dir to start a new run")
    recipe = saved.get("recipe")
    if isinstance(recipe, dict) and recipe != asdict(config.recipe):
        changed = sorted(k for k in recipe if recipe[k] != asdict(config.recipe).get(k))
        raise LayerProbeError(f"{path}: this run was started with another recipe ({', '.join(changed)} differ: "
                              f"{', '.join(f'{k}={recipe[k]}' for k in changed)}); resume with the same --recipe "
                              "and --epochs, or pass another --run-dir")
    return state


def history_path(checkpoint: str | Path) -> Path:
    """The response history written beside a checkpoint: `<stem>.history.csv`."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.history.csv")


def epochs_path(checkpoint: str | Path) -> Path:
    """The per-epoch log written beside a checkpoint: `<stem>.epochs.csv`."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.epochs.csv")


def _probe(model: nn.Module, images: Tensor, labels: Tensor) -> Responses:
    return measure_responses(model, images, labels, CIFAR_MEAN, CIFAR_STD, ProbeConfig(batch_size=500), progress=False)


def _history_rows(epoch: int, responses: Responses) -> list[dict[str, Any]]:
    ratio = {b.branch_out: b.ratio_mean for b in responses.blocks}
    return [{"epoch": epoch, "index": s.index, "name": s.name, "role": s.role, "std": s.std,
             "ratio": ratio.get(s.name, "")} for s in responses.sites]


def _csv(fields: tuple[str, ...], rows: list[dict[str, Any]], header: bool = True) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _meta(config: TrainConfig, data: ImageSet) -> dict[str, Any]:
    """What the checkpoint records of its training. The data by file name and sha256: a machine's own path
    says nothing on another machine."""
    return {"dataset": Path(data.source).name, "dataset_sha256": data.sha256,
            "train_images": len(data) if config.limit is None else min(config.limit, len(data)),
            "normalization": {"mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)},
            "recipe": asdict(config.recipe), "seed": config.seed, "device": _device_name(config.device),
            "probe_images": config.probe_images, "code_version": __version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}


def _config_dict(config: TrainConfig) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(replace(config, recipe=None)).items()} | {
        "recipe": asdict(config.recipe)}


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()

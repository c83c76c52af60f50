"""Training the CIFAR networks of Section 4.2, with the response dynamics recorded as they train.

Three recipes:
- `paper`: Section 4.2 as written: SGD (momentum 0.9, weight decay 1e-4 on every parameter, as
  the reference implementations of 2016 did), batch 128, lr 0.1 divided by 10 at 32k and 48k
  iterations, stop at 64k, 45k/5k train/validation split, 4-pixel padding + random crop + flip;
  ResNet-110 warms up at lr 0.01 for 400 iterations.
- `fast`: for a small CPU: channels_last, batch 256, one-cycle lr, label smoothing, weight decay
  on conv and linear weights only, all 50k training images.
- `faithful`: `fast` without its two departures from the paper's training: decay on every
  parameter (BN's γ and β included) and no label smoothing.

Precision is not part of a recipe: `--precision auto` times both on the machine at hand (see
`precision`), and each epoch records the one it ran in. Switches for ablations (`decay_all`,
`label_smoothing`, `head`, `freeze_last_bn`) are recipe fields, so the checkpoint records them.

The whole split is held in memory as uint8 and augmented on tensors per image, with no
DataLoader. Once before the first step (epoch 0) and after every epoch the probe runs on a fixed,
class-mixed probe set, under BN's running and batch statistics, and appends each site's std and
each block's ||F(x)||/||x|| to a history. At epoch 0 only the batch-statistics rows describe the
network: an untrained network's running statistics are BN's defaults, not its data's. State is saved atomically every epoch, so
`--resume` after a kill loses at most the unfinished epoch.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import load_checkpoint, save_checkpoint, torch_load
from .data import CIFAR_MEAN, CIFAR_STD, ImageSet, cache_dir, load_cifar10, normalize, subset, to_tensors
from .distributed import Processes
from .errors import LayerProbeError
from .files import atomic_path, check_writable, write_text
from .models import build_model, is_cifar
from .models.cifar import Head
from .precision import Precision, PrecisionChoice, autocast, choose, machine
from .probe import top1
from .measurement import ProbeConfig, measure_images
from .sites import find_sites


@dataclass(frozen=True)
class Recipe:
    """Optimisation settings. Iteration counts are optimizer steps."""

    name: str
    epochs: int
    batch_size: int
    lr: float  # peak learning rate
    momentum: float
    weight_decay: float
    nesterov: bool
    label_smoothing: float
    schedule: Literal["steps", "onecycle"]
    decay_all: bool = False  # weight decay on every parameter; else on conv and linear weights only
    head: Head = "linear"  # "normalized": BN without affine on the pooled features, before the classifier
    freeze_last_bn: bool = False  # the last block's branch-output BN keeps γ = 1, β = 0
    milestones: tuple[int, ...] = ()  # iterations where lr is divided by 10 ("steps")
    warmup_iters: int = 0  # iterations at lr/10 before the schedule starts ("steps", ResNet-110)
    holdout: int = 0  # training images held out as a validation set


_FAST = Recipe("fast", epochs=40, batch_size=256, lr=0.2, momentum=0.9, weight_decay=5e-4, nesterov=True,
               label_smoothing=0.1, schedule="onecycle")
RECIPES = {
    # 64k iterations of 128 images out of 45k = 182 epochs.
    "paper": Recipe("paper", epochs=182, batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=False,
                    label_smoothing=0.0, schedule="steps", decay_all=True, milestones=(32000, 48000), holdout=5000),
    "fast": _FAST,
    "faithful": replace(_FAST, name="faithful", decay_all=True, label_smoothing=0.0),
}


@dataclass(frozen=True)
class TrainConfig:
    arch: str
    out: Path  # final checkpoint; the epoch log and response history are written beside it
    recipe: Recipe
    data: str | None = None
    seed: int = 0
    device: str = "cpu"
    precision: PrecisionChoice = "auto"  # auto: time both on this machine and take the faster
    run_dir: Path | None = None  # resumable state; default: <cache>/runs/<out folder name>/<out stem>
    probe_every: int = 1  # epochs between response probes; 0 disables them
    probe_images: int = 1000  # size of the fixed probe set (test images chosen by seed)
    limit: int | None = None  # use only this many training images (tests, smoke runs)
    progress: bool = True

    @property
    def state_dir(self) -> Path:
        return self.run_dir or cache_dir() / "runs" / self.out.resolve().parent.name / self.out.stem


EPOCH_FIELDS = ("epoch", "train_loss", "train_error", "test_error", "val_error", "lr", "precision", "device",
                "images_per_s", "epoch_s", "probe_s", "wall_s")
HISTORY_FIELDS = ("epoch", "bn_mode", "index", "name", "role", "stage", "block", "std", "ratio")


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


def initial_model(arch: str, recipe: Recipe, seed: int) -> nn.Module:
    """The network a run of `arch` with `seed` starts from: the same weights every time (a test checks it)."""
    torch.manual_seed(seed)
    model = build_model(arch, **_arch_kwargs(arch, recipe))
    if recipe.freeze_last_bn:
        freeze_last_branch_bn(model)
    return model


def freeze_last_branch_bn(model: nn.Module) -> str:
    """Hold the last block's branch-output BN at γ = 1, β = 0 and exclude it from training; returns its name.

    The block is read from the model's structure (`find_sites`), not from its names.
    """
    layout = find_sites(model)
    if not layout.blocks:
        raise LayerProbeError("freeze_last_bn: the model has no blocks")
    name = layout.blocks[-1].branch_out
    bn = model.get_submodule(name)
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.affine:
        raise LayerProbeError(f"freeze_last_bn: the last block's branch output {name} is a {type(bn).__name__}, "
                              "not a BN layer with γ and β")
    with torch.no_grad():
        bn.weight.fill_(1.0)
        bn.bias.zero_()
    bn.requires_grad_(False)
    return name


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: which parameters weight decay reaches.

    `decay_all` decays every trained parameter (BN's γ and β included, as the reference code of
    2016 did); otherwise only conv and linear weights (ndim > 1) are decayed. Frozen parameters
    are left out.
    """
    trained = [p for p in model.parameters() if p.requires_grad]
    if recipe.decay_all:
        return [{"params": trained, "weight_decay": recipe.weight_decay}]
    return [{"params": [p for p in trained if p.ndim > 1], "weight_decay": recipe.weight_decay},
            {"params": [p for p in trained if p.ndim <= 1], "weight_decay": 0.0}]


@dataclass
class _Run:
    """What one call of `train` works with; `epoch`, `wall`, the logs and `summary` advance per epoch."""

    model: nn.Module
    net: nn.Module  # the model, wrapped for DistributedDataParallel when several processes train
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    probe: tuple[Tensor, Tensor]
    meta: dict[str, Any]
    precision: Precision
    device: str  # the machine this call's epochs run on (`precision.machine`), logged with each epoch's speed
    lr: float = 0.0  # the last step's
    epoch: int = 0
    wall: float = 0.0
    epochs_csv: str = ""
    history_csv: str = ""
    summary: dict[str, Any] | None = None


def train(config: TrainConfig, *, resume: bool = False, processes: Processes = Processes()) -> Path:
    """Train `config.arch`, resuming from `config.state_dir` when asked; returns the checkpoint path.

    With several `processes` (torchrun, see `distributed.process_group`) the model trains under
    DistributedDataParallel: every process draws the same batches and augmentations, trains on
    its share of each batch (BN statistics per process, as on the paper's two GPUs), and rank 0
    alone evaluates, probes and writes.
    """
    state_path = config.state_dir / "state.pt"
    check_writable(config.out.parent)  # both are written after every epoch: fail before any work, not after it
    check_writable(config.state_dir)
    if state_path.exists() and not resume:
        raise LayerProbeError(f"{config.state_dir} holds a saved run; pass --resume to continue it "
                              "or --run-dir to start another")
    state = _read_state(state_path, config) if resume and state_path.exists() else None
    if state is not None and state["epoch"] >= config.recipe.epochs and config.out.exists():
        if processes.main:  # finished before: keep the file as it is, bytes included, and load no data
            print(f"{config.arch}: already trained ({state['epoch']} epochs), {config.out} kept", flush=True)
        return config.out
    if state is None and config.out.exists():  # a finished run whose saved state is not on this machine
        if not (resume and _finished_as_asked(config)):
            raise LayerProbeError(f"{config.out} exists and {config.state_dir} holds no run of it: pass another "
                                  "--out, or remove it to train again")
        if processes.main:
            print(f"{config.arch}: already trained ({config.out} records these settings), kept", flush=True)
        return config.out
    if state is not None and processes.main:
        print(f"{config.arch}: resuming after epoch {state['epoch']} of {config.recipe.epochs} ({config.state_dir})",
              flush=True)
    run = _setup(config, state, processes)
    for epoch in range(run.epoch + 1, config.recipe.epochs + 1):
        t0 = time.perf_counter()
        loss, error, images_per_s = _train_epoch(run, config, epoch, processes)
        if processes.main:  # the others go on to the next epoch and wait there for rank 0
            line = _record_epoch(run, config, epoch, t0, loss, error, images_per_s)
            _save_state(run, config, state_path)
            print(line, flush=True)  # after the save: an epoch reported is an epoch kept
    if processes.main:
        _save_final(run, config)
    return config.out


def _setup(config: TrainConfig, state: dict[str, Any] | None, processes: Processes) -> _Run:
    """Data in memory, the seeded model and optimizer (or the saved run's), the precision, and epoch 0's probe."""
    rc, device = config.recipe, torch.device(config.device)
    train_set = load_cifar10(config.data, "train")
    test_set = load_cifar10(config.data, "test")
    model = initial_model(config.arch, rc, config.seed).to(device)
    generator = torch.Generator().manual_seed(config.seed)
    index = subset(len(train_set), config.limit, config.seed)
    holdout = torch.randperm(len(index), generator=torch.Generator().manual_seed(config.seed))[:rc.holdout]
    keep = torch.ones(len(index), dtype=torch.bool)
    keep[holdout] = False
    x_all, y_all = (torch.from_numpy(a[index]).to(device) for a in (train_set.images, train_set.labels))
    optimizer = torch.optim.SGD(param_groups(model, rc), lr=rc.lr, momentum=rc.momentum, nesterov=rc.nesterov)
    if processes.active:  # fail now rather than at the end of an epoch if the last, smallest batch cannot be shared
        train_n = int(keep.sum())
        processes.shard(train_n - (math.ceil(train_n / rc.batch_size) - 1) * rc.batch_size)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
    model = model.to(memory_format=torch.channels_last)
    precision = _choose_precision(model, config, device, processes, state)
    run = _Run(model, processes.wrap(model), optimizer, generator, (x_all[keep], y_all[keep]),
               (x_all[~keep], y_all[~keep]), to_tensors(test_set, device=device),
               to_tensors(test_set, config.probe_images, device, seed=config.seed),
               _meta(config, train_set) | {"processes": processes.size}, precision, machine(config.device))
    if state is not None:
        run.epoch, run.wall, run.summary = state["epoch"], state["wall_s"], state["summary"]
        # rewritten under today's columns: a log saved before a column existed leaves it empty in its rows
        run.epochs_csv, run.history_csv = _csv(EPOCH_FIELDS, _rows(state["epochs_csv"])), state["history_csv"]
    elif processes.main:
        run.epochs_csv = _csv(EPOCH_FIELDS, [])
        run.history_csv = _csv(HISTORY_FIELDS, probe_rows(model, 0, *run.probe))
    return run


def _choose_precision(model: nn.Module, config: TrainConfig, device: torch.device, processes: Processes,
                      state: dict[str, Any] | None) -> Precision:
    """The precision of this call's epochs, said in one line with the timings that chose it.

    Several processes take bf16 only when all of them found it faster. A resumed run may switch
    (it may continue on another machine); the line says so.
    """
    choice = choose(config.precision, device, step_timer(model, config.recipe.batch_size, device))
    precision = choice.precision
    if processes.active:
        votes = processes.sum(torch.tensor(int(precision == "bf16"), device=device))
        precision = "bf16" if int(votes) == processes.size else "fp32"
    before = _last_precision(state["epochs_csv"]) if state is not None else None
    if processes.main:
        switch = f"; epochs 1-{state['epoch']} ran in {before}" if before and before != precision else ""
        print(f"{config.arch}: {choice}{switch}", flush=True)
    return precision


def step_timer(model: nn.Module, batch_size: int, device: torch.device) -> Callable[[Precision], None]:
    """One forward-backward of a copy of `model` on a fixed random batch: the unit `precision.choose` times."""
    twin = copy.deepcopy(model).train()
    x = torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.zeros(batch_size, dtype=torch.long, device=device)

    def step(precision: Precision) -> None:
        with autocast(device, precision):
            loss = F.cross_entropy(twin(x), y)
        loss.backward()
        twin.zero_grad(set_to_none=True)

    return step


def _last_precision(epochs_csv: str) -> str | None:
    rows = _rows(epochs_csv)
    return rows[-1].get("precision") if rows else None


def _rows(epochs_csv: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(epochs_csv)))


def _train_epoch(run: _Run, config: TrainConfig, epoch: int, processes: Processes) -> tuple[float, float, float]:
    """One pass over the shuffled training images; returns the mean loss, error in percent and images/s."""
    rc, (x_train, y_train) = config.recipe, run.train
    device = y_train.device
    steps = math.ceil(len(y_train) / rc.batch_size)
    t0 = time.perf_counter()
    run.net.train()
    perm = torch.randperm(len(y_train), generator=run.generator).to(device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    wrong = torch.zeros((), dtype=torch.long, device=device)
    quiet = not (config.progress and processes.main) or None
    for i in tqdm(range(steps), desc=f"epoch {epoch}/{rc.epochs}", leave=False, disable=quiet):
        idx = perm[i * rc.batch_size:(i + 1) * rc.batch_size]
        mine = processes.shard(len(idx))  # this process's share of the batch: all of it in one process
        x = normalize(augment(x_train[idx], run.generator)[mine], CIFAR_MEAN, CIFAR_STD).contiguous(
            memory_format=torch.channels_last)
        y = y_train[idx][mine]
        run.lr = lr_at(rc, (epoch - 1) * steps + i, steps * rc.epochs, config.arch)
        for group in run.optimizer.param_groups:
            group["lr"] = run.lr
        with autocast(device, run.precision):
            logits = run.net(x)
            loss = F.cross_entropy(logits, y, label_smoothing=rc.label_smoothing)
        run.optimizer.zero_grad(set_to_none=True)
        # DDP averages the processes' gradients; weighting each by its share of the batch makes the step that
        # of the whole batch's mean loss even when the batch splits unevenly (the weight is 1 in one process)
        (loss * (len(y) * processes.size / len(idx))).backward()
        run.optimizer.step()
        loss_sum += loss.detach().double() * len(y)
        wrong += (logits.detach().argmax(1) != y).sum()
    images_per_s = len(y_train) / (time.perf_counter() - t0)
    loss_sum, wrong = processes.sum(loss_sum), processes.sum(wrong)
    return float(loss_sum) / len(y_train), 100.0 * int(wrong) / len(y_train), images_per_s


def _record_epoch(run: _Run, config: TrainConfig, epoch: int, t0: float, loss: float, train_error: float,
                  images_per_s: float) -> str:
    """Test and validation error, the response probe (both BN modes), and one line of the epoch log;
    returns the line to print."""
    model = run.model
    test_error = 100.0 - top1(model, *run.test, CIFAR_MEAN, CIFAR_STD, 1000, channels_last=True)
    val_error = 100.0 - top1(model, *run.val, CIFAR_MEAN, CIFAR_STD, 1000, channels_last=True) \
        if len(run.val[1]) else float("nan")
    t1 = time.perf_counter()
    if config.probe_every and epoch % config.probe_every == 0:
        run.history_csv += _csv(HISTORY_FIELDS, probe_rows(model, epoch, *run.probe), header=False)
    probe_s = time.perf_counter() - t1
    run.wall += time.perf_counter() - t0
    row = {"epoch": epoch, "train_loss": loss, "train_error": train_error, "test_error": test_error,
           "val_error": val_error, "lr": run.lr, "precision": run.precision, "device": run.device,
           "images_per_s": images_per_s, "epoch_s": time.perf_counter() - t0, "probe_s": probe_s, "wall_s": run.wall}
    run.epochs_csv += _csv(EPOCH_FIELDS, [row], header=False)
    run.epoch = epoch
    run.summary = {"epochs": epoch, "train_error": train_error, "top1": 100.0 - test_error, "wall_s": run.wall}
    return (f"{config.arch} epoch {epoch}/{config.recipe.epochs}: loss {loss:.3f}, train error {train_error:.2f}%, "
            f"test error {test_error:.2f}%, {images_per_s:.0f} img/s ({run.precision}), probe {probe_s:.1f}s")


def _save_state(run: _Run, config: TrainConfig, state_path: Path) -> None:
    """The resumable state, then the logs beside it, each file atomically. The checkpoint's folder gets the logs
    only with the checkpoint (`_save_final`), so an unfinished run leaves nothing half-done there."""
    state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "generator": run.generator.get_state(), "epoch": run.epoch, "wall_s": run.wall,
             "epochs_csv": run.epochs_csv, "history_csv": run.history_csv, "summary": run.summary,
             "config": _config_dict(config)}
    with atomic_path(state_path) as tmp:
        torch.save(state, tmp)
    _write_logs(run, state_path)


def _write_logs(run: _Run, beside: Path) -> None:
    """The epoch log and the response history beside `beside` (the run's state, or the checkpoint)."""
    write_text(epochs_path(beside), run.epochs_csv)
    write_text(history_path(beside), run.history_csv)


def _save_final(run: _Run, config: TrainConfig) -> None:
    """The checkpoint, recording every precision and machine its epochs ran in (a resumed run may have changed
    machine), then its logs beside it."""
    rows = _rows(run.epochs_csv)
    meta = run.meta | (run.summary or {"epochs": 0}) | {
        "precision": "+".join(dict.fromkeys(r["precision"] for r in rows)),
        "device": " + ".join(dict.fromkeys(r["device"] or "unrecorded" for r in rows))}
    save_checkpoint(config.out, run.model, config.arch, _arch_kwargs(config.arch, config.recipe), meta)
    _write_logs(run, config.out)
    print(f"wrote {config.out}", flush=True)


def _arch_kwargs(arch: str, recipe: Recipe) -> dict[str, Any]:
    """Constructor arguments a recipe asks of the architecture (the checkpoint records them to rebuild it)."""
    if recipe.head == "linear":
        return {}
    if not is_cifar(arch):
        raise LayerProbeError(f"head {recipe.head!r} is built for the CIFAR networks only, not {arch}")
    return {"head": recipe.head}


def _recorded_recipe(meta: dict[str, Any]) -> Recipe:
    """The recipe a checkpoint's metadata records; switches added since it was trained take their defaults."""
    known = {f.name for f in fields(Recipe)}
    recipe = Recipe(**{k: v for k, v in meta["recipe"].items() if k in known})
    return replace(recipe, milestones=tuple(recipe.milestones))


def _finished_as_asked(config: TrainConfig) -> bool:
    """Whether the checkpoint at `config.out` records this architecture, recipe, seed and all its epochs."""
    checkpoint = load_checkpoint(config.out)
    meta = checkpoint.meta
    return (checkpoint.arch == config.arch and "recipe" in meta and _recorded_recipe(meta) == config.recipe
            and meta.get("seed") == config.seed and meta.get("epochs") == config.recipe.epochs)


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


def probe_rows(model: nn.Module, epoch: int, images: Tensor, labels: Tensor) -> list[dict[str, Any]]:
    """One epoch's history rows: every site's std and every block's mean ||F(x)||/||x||, under BN's running
    statistics (eval) and batch statistics (train), on the probe set in batches of 500.

    At epoch 0 only the batch-statistics rows describe the network: its running statistics are still BN's
    defaults (mean 0, variance 1), so eval-mode BN passes the raw conv outputs through.
    """
    rows = []
    for mode in ("eval", "train"):
        r = measure_images(model, images, labels, CIFAR_MEAN, CIFAR_STD, ProbeConfig(batch_size=500, bn_mode=mode),
                           progress=False)
        ratio = {b.branch_out: b.ratio_mean for b in r.blocks}
        rows += [{"epoch": epoch, "bn_mode": mode, "index": s.index, "name": s.name, "role": s.role, "stage": s.stage,
                  "block": s.block, "std": s.std, "ratio": ratio.get(s.name, "")} for s in r.sites]
    return rows


def initial_rows(checkpoint: str | Path, data: str | Path | None = None) -> list[dict[str, Any]]:
    """Epoch 0's history rows of a trained checkpoint, probed afresh on its run's initialisation.

    The initialisation is rebuilt from what the checkpoint records (architecture, recipe, seed) and
    probed as `train` probes it (channels_last, the seeded probe set of `probe_images` test images).
    Rows the run recorded at epoch 0 are reproduced only when these are the weights it started from.
    """
    ckpt = load_checkpoint(checkpoint)
    meta = ckpt.meta
    if "seed" not in meta or "recipe" not in meta:
        raise LayerProbeError(f"{checkpoint}: not trained by `layer-probe train` (no seed or recipe in its metadata)")
    model = initial_model(ckpt.arch, _recorded_recipe(meta), meta["seed"]).to(memory_format=torch.channels_last)
    images, labels = to_tensors(load_cifar10(data, "test"), meta.get("probe_images", 1000), seed=meta["seed"])
    return probe_rows(model, 0, images, labels)


def rederive_epoch0(checkpoint: str | Path, data: str | Path | None = None) -> Path:
    """Rewrite a checkpoint's history with epoch 0 probed under both BN modes on its rebuilt initialisation.

    For histories recorded before epoch 0 was probed with batch statistics: their epoch-0 rows (std,
    and ||F(x)||/||x||, which identifies the weights even where batch statistics set every std to 1)
    are checked against the rebuilt initialisation first (to 2e-4: BN's float32 batch variance over
    500 × 32 × 32 positions moves by up to 1e-4 with the number of threads), so a history is only
    rewritten when the rebuilt weights are those its run started from. Later epochs are kept; histories without a
    `bn_mode` column get `eval` (all they recorded) and the stage and block of each site.
    """
    import pandas as pd

    path = history_path(checkpoint)
    old = pd.read_csv(path)
    fresh = pd.DataFrame(initial_rows(checkpoint, data))
    if "bn_mode" not in old.columns:
        old["bn_mode"] = "eval"
    for mode, recorded in old[old.epoch == 0].groupby("bn_mode"):
        rebuilt = fresh[fresh.bn_mode == mode]
        same = [np.allclose(pd.to_numeric(recorded[c]), pd.to_numeric(rebuilt[c]), rtol=2e-4, atol=0,
                            equal_nan=True) for c in ("std", "ratio") if c in recorded]
        if recorded["name"].tolist() != rebuilt["name"].tolist() or not all(same):
            raise LayerProbeError(f"{path}: epoch 0 ({mode}) differs from a probe of the rebuilt initialisation; "
                                  "not the weights this run started from")
    place = fresh[fresh.bn_mode == "eval"].set_index("name")[["stage", "block"]]
    later = old[old.epoch > 0].drop(columns=["stage", "block"], errors="ignore").join(place, on="name")
    frame = pd.concat([fresh, later[list(HISTORY_FIELDS)]], ignore_index=True)
    write_text(path, frame.to_csv(index=False, lineterminator="\n"))
    return path


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
            "recipe": asdict(config.recipe), "seed": config.seed,
            "probe_images": config.probe_images, "code_version": __version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}


def _config_dict(config: TrainConfig) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(replace(config, recipe=None)).items()} | {
        "recipe": asdict(config.recipe)}


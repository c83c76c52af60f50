"""Training speed: the `fast` recipe's step against a plain fp32 step fed by a per-image PIL DataLoader.

- fast: what `layer-probe train --recipe fast` does per step: uint8 images held as one tensor,
  `train.augment` (pad-4 crop and flip drawn per image, on tensors), `data.normalize`,
  channels_last, and the precision `train` would choose on this machine (`--precision auto`:
  bf16 autocast only where it times faster than fp32; printed per model).
- plain: the usual CIFAR pipeline: a Dataset of PIL images, torchvision's RandomCrop(32, padding=4),
  RandomHorizontalFlip, ToTensor and Normalize per image in DataLoader workers, fp32, default
  memory format.

Both train the same freshly initialised model on the same random images with the same optimizer
(SGD, momentum 0.9, Nesterov, weight decay 5e-4, label smoothing 0.1) and batch size; images/s
counts the steps after the warm-up ones, data loading included.

    python benchmarks/train_speed.py                                      # the full run (see benchmarks/README.md)
    python benchmarks/train_speed.py --models resnet20 --steps 10 --batch-size 128   # a quick look
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layer_probe.data import CIFAR_MEAN, CIFAR_STD, normalize
from layer_probe.models import build_model
from layer_probe.precision import autocast, choose, machine
from layer_probe.train import augment, step_timer


def step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, precision: str) -> None:
    with autocast(x.device, precision):
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def fast_batches(images: Tensor, labels: Tensor, batch_size: int, device: str) -> Iterator[tuple[Tensor, Tensor]]:
    """The fast recipe's input pipeline: [B, 3, 32, 32] channels_last batches, augmented on tensors."""
    images, labels = images.to(device), labels.to(device)
    generator = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(labels), generator=generator).to(device)
    for start in range(0, len(labels) - batch_size + 1, batch_size):
        idx = perm[start:start + batch_size]
        x = normalize(augment(images[idx], generator), CIFAR_MEAN, CIFAR_STD)
        yield x.contiguous(memory_format=torch.channels_last), labels[idx]


class PILImages(torch.utils.data.Dataset):
    """uint8 images served as PIL images through a per-image torchvision transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        from torchvision import transforms

        self.images, self.labels = images, labels
        self.transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                             transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def plain_batches(images: Tensor, labels: Tensor, batch_size: int, device: str, workers: int
                  ) -> Iterator[tuple[Tensor, Tensor]]:
    loader = torch.utils.data.DataLoader(PILImages(images.numpy(), labels.numpy()), batch_size=batch_size,
                                         shuffle=True, drop_last=True, num_workers=workers,
                                         pin_memory=device.startswith("cuda"))
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def images_per_s(arch: str, recipe: str, args: argparse.Namespace) -> tuple[float, str]:
    """Images/s of `recipe`'s steps, and the precision they ran in."""
    g = torch.Generator().manual_seed(0)
    n = (args.warmup + args.steps) * args.batch_size
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    torch.manual_seed(0)
    model = build_model(arch).to(args.device).train()
    precision = "fp32"
    if recipe == "fast":
        model = model.to(memory_format=torch.channels_last)
        choice = choose(args.precision, torch.device(args.device), step_timer(model, args.batch_size, torch.device(args.device)))
        print(f"  {arch} fast: {choice}", flush=True)
        precision = choice.precision
        batches = fast_batches(images, labels, args.batch_size, args.device)
    else:
        batches = plain_batches(images, labels, args.batch_size, args.device, args.workers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for i, (x, y) in enumerate(batches):
        if i == args.warmup:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        step(model, optimizer, x, y, precision)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return args.steps * args.batch_size / (time.perf_counter() - t0), precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet110"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model and recipe")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the plain pipeline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="of the fast path")
    args = parser.parse_args()
    print(f"# training speed: torch {torch.__version__}, {machine(args.device)}, "
          f"{torch.get_num_threads()} threads, batch {args.batch_size}, {args.steps} timed steps after "
          f"{args.warmup}, {args.workers} DataLoader workers for plain")
    rows = []
    for arch in args.models:
        (plain, _), (fast, precision) = images_per_s(arch, "plain", args), images_per_s(arch, "fast", args)
        rows.append(f"{arch:<10} {plain:>17.0f} {fast:>11.0f} {precision:>10} {fast / plain:>8.2f}x")
    print(f"{'model':<10} {'plain fp32 img/s':>17} {'fast img/s':>11} {'fast in':>10} {'speed-up':>9}", *rows, sep="\n")


if __name__ == "__main__":
    main()

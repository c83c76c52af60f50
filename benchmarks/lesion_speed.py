"""Lesion speed: `surgery.lesion_deltas` (each block's input computed once per batch, only the rest
of the network rerun per deletion) against one full forward pass per deleted block.

Both run the same freshly initialised model on the same random images in eval mode; the deltas
must come out identical, and the script says whether they did.

    python benchmarks/lesion_speed.py                                  # resnet20, resnet56, resnet110; 500 images
    python benchmarks/lesion_speed.py --models resnet110 --images 200  # a quick look
"""

from __future__ import annotations

import argparse
import time

import torch

from layer_probe.models import build_model
from layer_probe.probe import top1
from layer_probe.sites import find_sites
from layer_probe.surgery import lesion, lesion_deltas
from probe_overhead import machine

MEAN, STD = (0.5,) * 3, (0.25,) * 3


def full_passes(model: torch.nn.Module, blocks: list, images: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """The reference: one whole forward pass over the images per deleted block."""
    base = top1(model, images, labels, MEAN, STD)
    deltas = []
    for block in blocks:
        with lesion(model, block):
            deltas.append(top1(model, images, labels, MEAN, STD) - base)
    return deltas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "resnet110"])
    parser.add_argument("--images", type=int, default=500)
    args = parser.parse_args()
    print(f"{machine('cpu')}; torch {torch.__version__}, {torch.get_num_threads()} threads; {args.images} images")
    print(f"{'model':<10} {'blocks':>6} {'staged s':>9} {'full s':>8} {'full ÷ staged':>13}  identical")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (args.images,), generator=g)
    for name in args.models:
        model = build_model(name).eval()
        blocks = find_sites(model).blocks
        start = time.perf_counter()
        staged = lesion_deltas(model, blocks, images, labels, MEAN, STD, progress=False)
        t_staged = time.perf_counter() - start
        start = time.perf_counter()
        full = full_passes(model, blocks, images, labels)
        t_full = time.perf_counter() - start
        print(f"{name:<10} {len(blocks):>6} {t_staged:>9.1f} {t_full:>8.1f} {t_full / t_staged:>13.2f}  {staged == full}")


if __name__ == "__main__":
    main()

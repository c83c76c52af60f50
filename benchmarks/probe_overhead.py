"""What the probe costs: a bare eval forward pass against the probed pass, on the same batches.

For each model, in one process and on the same batches, the passes are timed in turn:
`bare` (forward + top-1, nothing attached), `probe` (every 3x3 site of Fig. 7, streaming moments;
`layer_probe.probe.run_probe` then `results.summarize`), `probe+ratios` (also ||F(x)||/||x||
per image and block), `probe bf16` (the same under `--amp bf16`), `compiled` and `compiled+ratios`
(the statistics fused by torch.compile, `--compile`) and `naive` (every 3x3 site's
output cloned and kept, `torch.std` at the end: the usual alternative). The ratio to `bare` is
taken per repeat and its median reported, which is less sensitive to other work on the machine, with the
range over repeats.

Peak memory is measured separately, each configuration in a fresh subprocess: the growth of the
peak resident set size (Linux VmHWM, reset after set-up through /proc/self/clear_refs; elsewhere
`resource.getrusage` ru_maxrss; on a GPU `torch.cuda.max_memory_allocated`) over the passes, with
k and 2k batches, to show what grows with the number of images. The naive method's memory is
also projected to 10,000 images (every 3x3 output kept in float32) and compared with the memory
this machine has.

Models are freshly initialised, the images random uint8 normalised like the real ones: speed
and memory do not depend on the weights. The bf16 and compiled passes report how much each site's std moves.

    python benchmarks/probe_overhead.py                          # the full run (see benchmarks/README.md)
    python benchmarks/probe_overhead.py --models resnet20 --batches 1 --repeats 3   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from layer_probe.data import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, normalize
from layer_probe.models import build_model, is_cifar
from layer_probe.precision import machine
from layer_probe.probe import run_probe
from layer_probe.results import summarize
from layer_probe.sites import Layout, find_sites

Batches = list[tuple[Tensor, Tensor]]
MODES = ("bare", "probe", "probe+ratios", "probe bf16", "compiled", "compiled+ratios", "naive")


def make_batches(arch: str, n_batches: int, batch_size: int, size: int, device: str, seed: int = 0) -> Batches:
    """Random uint8 images [B, size, size, 3], normalised as the model's real inputs would be, on `device`."""
    g = torch.Generator().manual_seed(seed)
    mean, std = (CIFAR_MEAN, CIFAR_STD) if is_cifar(arch) else (IMAGENET_MEAN, IMAGENET_STD)
    classes = 10 if is_cifar(arch) else 1000
    return [(normalize(torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, generator=g), mean, std)
             .to(device), torch.randint(0, classes, (batch_size,), generator=g).to(device)) for _ in range(n_batches)]


def bare(model: nn.Module, layout: Layout, batches: Batches) -> int:
    """The pass with nothing attached: forward and top-1, as `run_probe` does."""
    correct = torch.zeros((), dtype=torch.long, device=batches[0][0].device)
    with torch.inference_mode():
        for x, y in batches:
            correct += (model(x).argmax(1) == y).sum()
    return int(correct)


def probed(ratios: bool = False, amp: str | None = None, compiled: bool = False
           ) -> Callable[[nn.Module, Layout, Batches], list[float]]:
    def run(model: nn.Module, layout: Layout, batches: Batches) -> list[float]:
        return summarize(run_probe(model, layout, batches, ratios=ratios, amp=amp, progress=False,
                                   compiled=compiled)).std()
    return run


def naive(model: nn.Module, layout: Layout, batches: Batches) -> list[float]:
    """Keep every site's output, then `torch.std` over all of it."""
    modules = dict(model.named_modules())
    kept: dict[str, list[Tensor]] = {s.name: [] for s in layout.sites}
    handles = [modules[s.name].register_forward_hook(lambda m, a, out, n=s.name: kept[n].append(out.detach().clone()))
               for s in layout.sites]
    try:
        with torch.inference_mode():
            for x, _ in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(v).double().std().item() for v in kept.values()]


PASSES = {"bare": bare, "probe": probed(), "probe+ratios": probed(ratios=True), "probe bf16": probed(amp="bf16"),
          "compiled": probed(compiled=True), "compiled+ratios": probed(ratios=True, compiled=True), "naive": naive}


def timed(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def setup(args: argparse.Namespace, arch: str, n_batches: int) -> tuple[nn.Module, Layout, Batches, int, int]:
    torch.manual_seed(0)
    model = build_model(arch).to(args.device).eval()
    size, batch = (32, args.batch_size) if is_cifar(arch) else (args.imagenet_size, args.imagenet_batch)
    return model, find_sites(model).select("3x3"), make_batches(arch, n_batches, batch, size, args.device), size, batch


def site_bytes_per_image(model: nn.Module, layout: Layout, size: int, device: str) -> int:
    """float32 bytes of every 3x3 site's output for one image: what the naive method keeps per image."""
    shapes: list[torch.Size] = []
    modules = dict(model.named_modules())
    handles = [modules[s.name].register_forward_hook(lambda m, a, out: shapes.append(out.shape[1:]))
               for s in layout.sites]
    with torch.inference_mode():
        model(torch.zeros(1, 3, size, size, device=device))
    for h in handles:
        h.remove()
    return 4 * sum(s.numel() for s in shapes)


def _proc_status(key: str) -> int:
    """A size from /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _reset_peak() -> int:
    """Start peak tracking now; returns the baseline in bytes.

    On Linux, writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM) to the current RSS,
    so set-up (imports, model, batches) does not hide a smaller peak; elsewhere the
    baseline is `ru_maxrss`, the peak so far.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak() -> int:
    try:
        return _proc_status("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_memory(args: argparse.Namespace) -> None:
    """Child process: one configuration, prints its peak memory growth in MiB as JSON."""
    arch, mode = args.models[0], args.memory
    model, layout, batches, _, _ = setup(args, arch, args.batches)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.max_memory_allocated() if cuda else _reset_peak()
    PASSES[mode](model, layout, batches)
    after = torch.cuda.max_memory_allocated() if cuda else _peak()
    print(json.dumps({"growth_mib": (after - before) / 2**20}))


def memory_growth(args: argparse.Namespace, arch: str, mode: str, n_batches: int) -> float:
    command = [sys.executable, __file__, "--models", arch, "--memory", mode, "--batches", str(n_batches),
               "--batch-size", str(args.batch_size), "--imagenet-size", str(args.imagenet_size),
               "--imagenet-batch", str(args.imagenet_batch), "--device", args.device]
    # A fixed mmap threshold makes glibc return every large freed block at once, so the peak RSS is the peak of
    # live memory and not of memory the allocator kept after an earlier batch.
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
    run = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(run.stdout.strip().splitlines()[-1])["growth_mib"]


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), 0 elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return 0


def benchmark(args: argparse.Namespace, arch: str) -> None:
    model, layout, batches, size, batch = setup(args, arch, args.batches)
    images = batch * len(batches)
    print(f"\n## {arch}: {len(layout.sites)} 3x3 sites, {len(batches)} batch(es) of {batch} at {size}x{size}, "
          f"{args.repeats} repeats")
    modes = args.modes
    for mode in modes:  # warm-up: first-call costs (allocator, oneDNN kernels, compiling) are not the probe's
        PASSES[mode](model, layout, batches[:1])
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.repeats):
        for mode in modes[r % len(modes):] + modes[:r % len(modes)]:  # rotate the order between repeats
            times[mode].append(timed(lambda: PASSES[mode](model, layout, batches), args.device))
    print(f"{'mode':<16} {'s/pass':>8} {'img/s':>8} {'÷ bare':>7} {'range':>13}  peak memory growth, MiB "
          f"({len(batches)} / {2 * len(batches)} batches)")
    for mode in modes:
        ratios = [t / b for t, b in zip(times[mode], times["bare"])]
        median = statistics.median(times[mode])
        growth = "" if args.no_memory else " / ".join(f"{memory_growth(args, arch, mode, k):.0f}"
                                                      for k in (len(batches), 2 * len(batches)))
        print(f"{mode:<16} {median:>8.3f} {images / median:>8.0f} {statistics.median(ratios):>7.3f} "
              f"{min(ratios):>6.3f}–{max(ratios):<6.3f}  {growth}")
    fp32 = probed()(model, layout, batches)
    for mode in ("probe bf16", "compiled"):
        if mode in modes:
            change = [abs(b / a - 1) for a, b in zip(fp32, PASSES[mode](model, layout, batches))]
            print(f"{mode} vs probe, std per site: median change {100 * statistics.median(change):.2g}%, "
                  f"largest {100 * max(change):.2g}%")
    per_image = site_bytes_per_image(model, layout, size, args.device)
    print(f"naive keeps {per_image / 2**20:.2f} MiB per image: {per_image * 10_000 / 2**30:.1f} GiB for 10,000 images; "
          f"this machine has {available_bytes() / 2**30:.1f} GiB available, enough for about "
          f"{available_bytes() // per_image:,} images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet110", "resnet50"])
    parser.add_argument("--batch-size", type=int, default=256, help="CIFAR models (32x32 images)")
    parser.add_argument("--imagenet-size", type=int, default=224, help="image side for torchvision models")
    parser.add_argument("--imagenet-batch", type=int, default=64, help="batch size for torchvision models")
    parser.add_argument("--batches", type=int, default=4, help="batches per pass")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="passes to time (bare always)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory", choices=MODES, help=argparse.SUPPRESS)  # child process: one memory measurement
    args = parser.parse_args()
    args.modes = ["bare", *(m for m in args.modes if m != "bare")]
    if args.memory:
        measure_memory(args)
        return
    print(f"# probe overhead: torch {torch.__version__}, {machine(args.device)}, {torch.get_num_threads()} threads, "
          f"python {platform.python_version()}")
    for arch in args.models:
        benchmark(args, arch)


if __name__ == "__main__":
    main()

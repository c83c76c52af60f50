"""Precision chosen by measurement: bf16 autocast only where this machine runs it faster than fp32.

CPUs without bf16 instructions (AVX2-only, and AVX-512 without `avx512_bf16`) emulate bf16
and run autocast several times slower than fp32; CPUs with them run it faster. Neither can be
told reliably from flags alone, so `auto` times the actual work in both precisions and keeps
the faster.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

Precision = Literal["fp32", "bf16"]
PrecisionChoice = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16")


@dataclass(frozen=True)
class Choice:
    """The precision to run in, and the seconds per call that chose it (empty when it was not timed)."""

    precision: Precision
    seconds: dict[str, float] = field(default_factory=dict)
    reason: str = ""

    def __str__(self) -> str:
        timed = ", ".join(f"{p} {s * 1000:.0f} ms" for p, s in self.seconds.items())
        return f"precision {self.precision}" + (f" ({timed} per step{self.reason})" if timed else
                                                f" ({self.reason})" if self.reason else "")


def fastest(candidates: Mapping[str, Callable[[], object]], *, repeats: int = 3, warmup: int = 1,
            clock: Callable[[], float] = time.perf_counter) -> tuple[str, dict[str, float]]:
    """Time each callable (median of `repeats` calls after `warmup` untimed ones); the fastest name and all times.

    Ties go to the first candidate, so list the safer one first.
    """
    seconds = {}
    for name, call in candidates.items():
        for _ in range(warmup):
            call()
        times = []
        for _ in range(repeats):
            t0 = clock()
            call()
            times.append(clock() - t0)
        seconds[name] = statistics.median(times)
    return min(seconds, key=lambda n: seconds[n]), seconds


def choose(requested: PrecisionChoice, device: torch.device, step: Callable[[Precision], object]) -> Choice:
    """The precision for work whose unit is `step(precision)` (e.g. one forward-backward of the model).

    `requested` "fp32" or "bf16" is kept as given. "auto" takes bf16 on a CUDA GPU that supports it,
    and otherwise times `step` in both precisions on this machine and takes the faster.
    """
    if requested != "auto":
        return Choice(requested, {}, "as requested")
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return Choice("bf16" if ok else "fp32", {}, f"this GPU {'supports' if ok else 'lacks'} bf16")
    # three untimed calls each: oneDNN builds its kernels over the first few steps of a new shape
    name, seconds = fastest({p: (lambda p=p: step(p)) for p in PRECISIONS}, warmup=3)
    return Choice(name, seconds, "; the faster on this machine")


def autocast(device: torch.device, precision: Precision | None) -> AbstractContextManager:
    """bf16 autocast for "bf16", a no-op otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def machine(device: str, cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The GPU's name, or the CPU's model name, core count and the instruction sets that decide bf16's speed.

    Every speed this project reports names the machine it was measured on; the architecture alone
    (`x86_64`) cannot tell a CPU with bf16 instructions from one that runs bf16 ten times slower.
    """
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name, flags = platform.processor() or platform.machine(), set()
    try:
        first = Path(cpuinfo).read_text().split("\n\n")[0].splitlines()  # the first processor's entry
        info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first if ":" in line)}
        name, flags = info["model name"], set(info.get("flags", "").split())
    except (OSError, KeyError):
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    capped = [f"{v}={os.environ[v]}" for v in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if v in os.environ]
    return (f"{name}, {os.cpu_count()} cores, {' '.join(isa) or 'no AVX2'}"
            + (f" (capped: {' '.join(capped)})" if capped else ""))

"""Precision chosen by measurement: bf16 autocast only where this machine runs it faster than fp32.

CPUs without bf16 instructions (AVX2-only, and AVX-512 without `avx512_bf16`) emulate bf16
and run autocast several times slower than fp32; CPUs with them run it faster. Neither can be
told reliably from flags alone, so `auto` times the actual work in both precisions and keeps
the faster.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
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

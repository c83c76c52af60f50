import itertools

import pytest
import torch

from layer_probe import precision
from layer_probe.precision import Choice, choose, fastest, machine


def fake_clock(durations):
    """A clock whose successive (start, stop) readings are `durations` apart."""
    ticks = itertools.count()
    times = iter(durations)
    now = {"t": 0.0}

    def clock():
        if next(ticks) % 2:
            now["t"] += next(times)
        return now["t"]

    return clock


def test_fastest_takes_the_median_of_timed_calls_after_warmup():
    calls = []
    name, seconds = fastest({"fp32": lambda: calls.append("fp32"), "bf16": lambda: calls.append("bf16")},
                            repeats=3, warmup=1, clock=fake_clock([1.0, 5.0, 1.2, 0.5, 0.6, 9.0]))
    assert calls == ["fp32"] * 4 + ["bf16"] * 4  # one untimed warm-up, then three timed calls each
    assert seconds == pytest.approx({"fp32": 1.2, "bf16": 0.6}) and name == "bf16"


def test_fastest_breaks_ties_towards_the_first_candidate():
    assert fastest({"fp32": lambda: None, "bf16": lambda: None}, clock=fake_clock([1.0] * 6))[0] == "fp32"


@pytest.mark.parametrize("slow", ["bf16", "fp32"])
def test_auto_picks_the_faster_precision_on_a_cpu(monkeypatch, slow):
    timings = {"fp32": 0.3, "bf16": 0.1} if slow == "fp32" else {"fp32": 0.3, "bf16": 3.0}
    monkeypatch.setattr(precision, "fastest", lambda candidates, **kw: (min(timings, key=timings.get), timings))
    choice = choose("auto", torch.device("cpu"), lambda p: None)
    assert choice.precision == ("bf16" if slow == "fp32" else "fp32") and choice.seconds == timings
    assert str(choice).startswith(f"precision {choice.precision} (fp32 300 ms, bf16 ")


def test_a_requested_precision_is_kept_untimed():
    def never(p):
        raise AssertionError("timed")

    assert choose("fp32", torch.device("cpu"), never) == Choice("fp32", {}, "as requested")
    assert choose("bf16", torch.device("cpu"), never).precision == "bf16"


def test_auto_times_the_real_step_in_both_precisions():
    seen = []
    choice = choose("auto", torch.device("cpu"), seen.append)
    assert set(seen) == {"fp32", "bf16"} and choice.precision in ("fp32", "bf16")


def test_machine_names_the_cpu_model_cores_and_the_instruction_sets_that_decide_bf16(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
                       "flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n\n"
                       "processor\t: 1\nmodel name\t: another\nflags\t\t: fpu\n")
    monkeypatch.setattr(precision.os, "cpu_count", lambda: 2)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert machine("cpu", cpuinfo) == "Intel(R) Xeon(R) Platinum 8480+, 2 cores, avx2 avx512f avx512_bf16 amx_bf16"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx avx2\n")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert machine("cpu", cpuinfo) == "AMD EPYC, 2 cores, avx2 (capped: ONEDNN_MAX_CPU_ISA=AVX2)"

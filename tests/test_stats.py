import pytest
import torch
from conftest import needs_compiler

from layer_probe.stats import Moments


def test_streaming_moments_equal_torch_std_over_concatenation():
    torch.manual_seed(0)
    parts = [torch.randn(n, 8, 5, 5) * 3 + 7 for n in (1, 4, 13, 2)]
    merged = Moments.stack([Moments.of(p) for p in parts]).reduce(0)
    data = torch.cat(parts).double().transpose(0, 1).reshape(8, -1)
    torch.testing.assert_close(merged.std(), data.std(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(merged.mean, data.mean(1), rtol=1e-6, atol=0)
    pooled = merged.reduce(0)
    torch.testing.assert_close(pooled.std(), data.flatten().std(), rtol=1e-6, atol=0)
    torch.testing.assert_close(pooled.rms(), data.flatten().square().mean().sqrt(), rtol=1e-6, atol=0)


def test_merge_is_order_independent():
    torch.manual_seed(1)
    a, b, c = (Moments.of(torch.randn(3, 4, 2, 2) + i) for i in range(3))
    left, right = a.merge(b).merge(c), c.merge(a.merge(b))
    for f in ("count", "mean", "m2"):
        torch.testing.assert_close(getattr(left, f), getattr(right, f), rtol=1e-12, atol=1e-12)


def test_low_precision_inputs_are_reduced_in_float32():
    x = torch.randn(4, 3, 8, 8)
    m = Moments.of(x.bfloat16())
    ref = x.bfloat16().double().transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(m.std(), ref.std(1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=needs_compiler)], ids=["eager", "compiled"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_ill_conditioned_channels_keep_their_precision(compiled, layout):
    # A channel whose mean is 400 times its std (a "dead" BN channel with a large beta and tiny gamma).
    torch.manual_seed(2)
    x = torch.randn(64, 4, 6, 6) * torch.tensor([1.0, 0.01, 3.0, 0.5]).view(1, 4, 1, 1) + \
        torch.tensor([0.0, 4.0, -7.0, 100.0]).view(1, 4, 1, 1)
    m = Moments.of(x.contiguous(memory_format=layout), compiled=compiled)
    ref = x.double().transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(m.std(), ref.std(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(m.mean, ref.mean(1), rtol=1e-6, atol=1e-6)  # channel 0 has mean ~0


def test_two_dimensional_input():
    x = torch.randn(10, 3) + 2
    m = Moments.of(x)
    torch.testing.assert_close(m.std(), x.double().std(0), rtol=1e-6, atol=0)
    assert m.count.tolist() == [10.0, 10.0, 10.0]

import numpy as np
import pytest
import torch

from conftest import trained_like
from layer_probe.separability import linear_probe_top1, separability
from layer_probe.sites import find_sites


def clusters(n, classes=10, dim=32, spread=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + spread * torch.randn(n, dim, generator=g), y


def test_separable_features_are_classified_and_shuffled_labels_are_at_chance():
    x, y = clusters(2000)
    assert linear_probe_top1(x[:1000], y[:1000], x[1000:], y[1000:], 10) == pytest.approx(100.0)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    chance = linear_probe_top1(x[:1000], shuffled[:1000], x[1000:], shuffled[1000:], 10)
    assert 5.0 < chance < 15.0  # 10 classes: about 10%


def test_separability_probes_each_blocks_pooled_output():
    model = trained_like("resnet8")
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8, generator=g), torch.arange(40) % 10
    blocks = find_sites(model, quiet=True).blocks
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = separability(model, blocks, images, labels, (0.5,) * 3, (0.25,) * 3, batch_size=16, bn_mode="train")
    assert len(scores) == 3 and all(0.0 <= s <= 100.0 for s in scores)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and not model.training
    # independently: the last block's pooled output, by a hook, through the same probe
    out = {}
    h = model.layer3[0].register_forward_hook(lambda m, a, o: out.setdefault("x", []).append(o.mean((2, 3))) and None)
    from layer_probe.probe import bn_statistics
    from layer_probe.data import batches
    with torch.no_grad(), bn_statistics(model, "train"):
        for x, _ in batches(images, labels, 16, (0.5,) * 3, (0.25,) * 3):
            model(x)
    h.remove()
    f = torch.cat(out["x"])
    assert scores[-1] == linear_probe_top1(f[:20], labels[:20], f[20:], labels[20:], 10)
    assert np.isfinite(scores).all()

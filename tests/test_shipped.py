"""The networks in checkpoints/, measured afresh: top-1 against the card, epoch 0 of each history against the
run's rebuilt initialisation, and Fig. 7's readings (`check_shipped.py` holds the file-integrity checks).

Each test runs for the shipped files that exist (skipped when none do); the measurements use the JPEG
CIFAR-10 test split in ../shared (skipped when it is absent).
"""

from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import JPEG_TAR
from layer_probe.analysis import AnalysisConfig, analyze
from layer_probe.checkpoint import load_checkpoint
from layer_probe.data import load_cifar10, to_tensors
from layer_probe.probe import top1
from layer_probe.measurement import ProbeConfig, measure_images

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
SHIPPED = sorted(CHECKPOINTS.glob("*.pt"))
needs_data = pytest.mark.skipif(not JPEG_TAR.exists(), reason="the JPEG CIFAR-10 archive in ../shared is not present")
pytestmark = pytest.mark.slow


def shipped(*names: str) -> list[Path]:
    """The named checkpoints, or a skip when one of them has not been trained yet."""
    paths = [CHECKPOINTS / f"{n}.pt" for n in names]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"not shipped yet: {', '.join(missing)}")
    return paths


@pytest.fixture(scope="module")
def test_images():
    images, labels = to_tensors(load_cifar10(JPEG_TAR, "test"), 1000)
    return images, labels


@needs_data
@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_accuracy_on_jpeg_test_images_matches_the_card(path, test_images):
    ckpt = load_checkpoint(path)
    measured = top1(ckpt.model, *test_images, ckpt.mean, ckpt.std)
    assert abs(measured - ckpt.meta["top1"]) < 3.5  # 1,000 of the 10,000 images: about 3 standard errors


@needs_data
def test_batch_statistics_classify_nearly_as_well_as_running_ones(test_images):
    """The JPEG test files are sorted by class; probed in that order, batch statistics (batches of 100)
    normalise single-class batches and resnet20's top-1 falls to about 30%. In the class-mixed order
    `to_tensors` gives, it stays within a few points of eval mode (84.7% against 87.8% on these images)."""
    ckpt = load_checkpoint(shipped("resnet20")[0])
    images, labels = test_images
    config = ProbeConfig(bn_mode="train", batch_size=100)
    mixed = measure_images(ckpt.model, images, labels, ckpt.mean, ckpt.std, config, progress=False).top1
    order = torch.argsort(labels, stable=True)  # the files' own, class-sorted order
    pure = measure_images(ckpt.model, images[order], labels[order], ckpt.mean, ckpt.std, config, progress=False).top1
    assert mixed > top1(ckpt.model, images, labels, ckpt.mean, ckpt.std) - 5 and pure < 40, (mixed, pure)


@needs_data
@pytest.mark.parametrize("depth", [20, 56])
def test_resnets_respond_less_than_plain_nets(depth, test_images):
    means = {}
    for path in shipped(f"resnet{depth}", f"plain{depth}"):
        ckpt = load_checkpoint(path)
        responses = measure_images(ckpt.model, *test_images, ckpt.mean, ckpt.std, progress=False)
        means[path.stem] = sum(s.std for s in responses.sites) / len(responses.sites)
    assert means[f"resnet{depth}"] < means[f"plain{depth}"], means


@needs_data
def test_resnet56_std_rises_in_its_last_layers(test_images):
    ckpt = load_checkpoint(shipped("resnet56")[0])
    analysis, _ = analyze(ckpt.model, *test_images, ckpt.mean, ckpt.std, AnalysisConfig(lesion_images=200),
                          progress=False)
    assert analysis.rise.rises and analysis.rise.low > 1


@needs_data
@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_epoch0_history_is_the_runs_seeded_initialisation(path):
    """The rebuilt initialisation, probed afresh, gives the epoch-0 rows the history holds: the eval rows the
    run recorded itself (so the rebuilt weights are those it started from) and the batch-statistics rows."""
    from layer_probe.train import initial_rows

    history = pd.read_csv(path.with_suffix(".history.csv"))
    recorded = history[history.epoch == 0].sort_values(["bn_mode", "index"])
    fresh = pd.DataFrame(initial_rows(path, JPEG_TAR)).sort_values(["bn_mode", "index"])
    assert recorded[["bn_mode", "name", "role", "stage", "block"]].values.tolist() == \
        fresh[["bn_mode", "name", "role", "stage", "block"]].values.tolist()
    for mode, rel in (("eval", 1e-5), ("train", 2e-4)):  # BN's float32 batch variance moves ~1e-4 with the threads
        assert recorded[recorded.bn_mode == mode]["std"].tolist() == \
            pytest.approx(fresh[fresh.bn_mode == mode]["std"].tolist(), rel=rel)
    assert fresh[fresh.bn_mode == "train"]["std"].tolist() == pytest.approx([1.0] * (len(fresh) // 2), abs=1e-3)

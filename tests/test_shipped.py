"""The networks in checkpoints/: each matches its card and log, and together they show Fig. 7's readings.

Each test runs for the shipped files that exist (skipped when none do); the measurements use the JPEG
CIFAR-10 test split in ../shared (skipped when it is absent).
"""

import hashlib
from pathlib import Path

import pandas as pd
import pytest

from conftest import JPEG_TAR
from layer_probe.analysis import AnalysisConfig, analyze
from layer_probe.checkpoint import load_checkpoint
from layer_probe.data import load_cifar10, to_tensors
from layer_probe.probe import top1
from layer_probe.measurement import measure_images

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


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_card_and_log_agree_with_the_file(path):
    row = next((line for line in (CHECKPOINTS / "README.md").read_text().splitlines()
                if line.startswith(f"| {path.stem} |")), "")
    assert hashlib.sha256(path.read_bytes()).hexdigest() in row
    meta = load_checkpoint(path).meta
    log = pd.read_csv(path.with_suffix(".epochs.csv"))
    assert log.epoch.tolist() == list(range(1, meta["recipe"]["epochs"] + 1)) and meta["epochs"] == len(log)
    assert meta["top1"] == pytest.approx(100 - log.test_error.iloc[-1])
    assert meta["train_error"] == pytest.approx(log.train_error.iloc[-1])
    history = pd.read_csv(path.with_suffix(".history.csv"))
    assert sorted(set(history.epoch)) == list(range(len(log) + 1))


def test_the_logs_show_the_degradation_problem():
    """Section 4.2: plain56 ends with a higher training error than plain20; resnet56 with a lower one than resnet20."""
    final = {p.stem: pd.read_csv(p.with_suffix(".epochs.csv")).train_error.iloc[-1]
             for p in shipped("plain20", "plain56", "resnet20", "resnet56")}
    assert final["plain56"] > final["plain20"] and final["resnet56"] < final["resnet20"], final


@needs_data
@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_accuracy_on_jpeg_test_images_matches_the_card(path, test_images):
    ckpt = load_checkpoint(path)
    measured = top1(ckpt.model, *test_images, ckpt.mean, ckpt.std)
    assert abs(measured - ckpt.meta["top1"]) < 3.5  # 1,000 of the 10,000 images: about 3 standard errors


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

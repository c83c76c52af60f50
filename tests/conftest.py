"""Shared fixtures: tiny seeded data sets in every supported layout, and the ../shared files."""

from __future__ import annotations

import io
import pickle
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from layer_probe.checkpoint import save_checkpoint
from layer_probe.cli import main
from layer_probe.data import CLASSES
from layer_probe.measurement import ProbeConfig, measure_images
from layer_probe.models import build_model
from layer_probe.train import RECIPES, TrainConfig

matplotlib.use("Agg")  # figures are written to files, never shown

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
AKAMASTER20 = SHARED / "checkpoints" / "akamaster" / "resnet20-12fca82f.th"
JPEG_TAR = SHARED / "datasets" / "cifar10-jpeg.tar.gz"
needs_shared = pytest.mark.skipif(not (AKAMASTER20.exists() and JPEG_TAR.exists()),
                                  reason="../shared checkpoints and data are not present")
needs_compiler = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                                    reason="torch.compile needs a C++ compiler on a CPU")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session decodes into its own cache; no test reads the user's data variable."""
    monkeypatch.setenv("LAYER_PROBE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv("LAYER_PROBE_DATA", raising=False)


def synthetic_images(n_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images: each class has its own mean colour, plus noise. [N, 32, 32, 3] uint8, [N] labels."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 225, size=(len(CLASSES), 3))
    labels = np.repeat(np.arange(len(CLASSES)), n_per_class)
    noise = rng.normal(0, 25, size=(len(labels), 32, 32, 3))
    images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels


def write_tree(root: Path, n_per_class: int = 6, fmt: str = "PNG") -> Path:
    """An ImageFolder tree train/<class>/*.png and test/<class>/*.png (PNG keeps pixels exact)."""
    for split, seed in (("train", 0), ("test", 1)):
        images, labels = synthetic_images(n_per_class, seed)
        for i, (img, label) in enumerate(zip(images, labels)):
            d = root / split / CLASSES[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:04d}.{fmt.lower()}", format=fmt)
    return root


@pytest.fixture(scope="session")
def tree(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("tree") / "cifar", n_per_class=6)


@pytest.fixture(scope="session")
def tarball(tree: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tar") / "cifar.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(tree, arcname="cifar")
    return path


@pytest.fixture(scope="session")
def batches_folder(tmp_path_factory) -> Path:
    """torchvision's cifar-10-batches-py layout, 20 images per batch file."""
    root = tmp_path_factory.mktemp("pickled") / "cifar-10-batches-py"
    root.mkdir()
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        images, labels = synthetic_images(2, seed=10 + i)
        entry = {b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), b"labels": labels.tolist()}
        (root / name).write_bytes(pickle.dumps(entry))
    return root.parent


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


# ImageNet-style folder: (class, file, size (w, h), PIL mode); odd sizes, one below 224, grey, CMYK, RGBA PNG.
FOLDER_IMAGES = [("n0001", "a.JPEG", (300, 257), "RGB"), ("n0001", "b.JPEG", (259, 400), "L"),
                 ("n0001", "c.png", (150, 97), "RGBA"), ("n0002", "d.JPEG", (501, 231), "RGB"),
                 ("n0002", "e.JPEG", (224, 224), "CMYK"), ("n0002", "f.JPEG", (333, 333), "RGB")]


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """A tiny ImageFolder `val/<class>/<image>` of random images in every size and mode of FOLDER_IMAGES."""
    root = tmp_path_factory.mktemp("imagenet") / "val"
    rng = np.random.default_rng(0)
    for cls, name, (w, h), mode in FOLDER_IMAGES:
        (root / cls).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(h, w, 4), dtype=np.uint8)
        image = Image.fromarray(pixels, "RGBA").convert(mode)
        image.save(root / cls / name, format="PNG" if name.endswith(".png") else "JPEG")
    return root


@pytest.fixture(autouse=True)
def _no_archive_beside_the_repository(monkeypatch):
    """Tests run as on a clone without ../shared: data is found only where a test puts it or passes it."""
    from layer_probe import data

    monkeypatch.setattr(data, "repository_root", lambda: None)


# Shared by several test modules: tiny models with non-trivial BN, stored activations, fixtures.

def eval_crop(path) -> np.ndarray:
    """The standard ImageNet evaluation transform, by hand: shorter side to 256 (bilinear), centre 224x224."""
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        size = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
        im = im.resize(size, Image.BILINEAR)
        top, left = round((im.size[1] - 224) / 2), round((im.size[0] - 224) / 2)
        return np.asarray(im)[top:top + 224, left:left + 224]


TINY = replace(RECIPES["fast"], epochs=2, batch_size=20)


def config(tmp_path, tree, **kw):
    # a fixed precision: `auto` times the machine, and runs must be comparable bit for bit
    return TrainConfig(arch="resnet8", out=tmp_path / "r8.pt", recipe=kw.pop("recipe", TINY), data=str(tree),
                       run_dir=tmp_path / "run", probe_images=20, progress=False,
                       precision=kw.pop("precision", "bf16"), **kw)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "resnet8.pt"
    save_checkpoint(path, trained_like("resnet8"), "resnet8", meta={"normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}})
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def responses():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (24, 32, 32, 3), dtype=torch.uint8)
    labels = torch.randint(0, 10, (24,))
    return measure_images(trained_like("resnet8"), images, labels, (0.5,) * 3, (0.25,) * 3,
                             ProbeConfig(batch_size=10), meta={"arch": "resnet8"}, progress=False)


def batches(n_batches=3, size=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g))
            for _ in range(n_batches)]


def trained_like(arch, seed=0):
    """A model with non-trivial BN statistics and affine parameters."""
    torch.manual_seed(seed)
    model = build_model(arch)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.2, 2.0)
            m.bias.data.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def fine_tuned(arch="resnet8"):
    """A model in train mode whose first BN is held in eval mode, as when fine-tuning: every module's own mode
    must survive a measurement, not only the model's."""
    model = trained_like(arch).train()
    model.layer1[0].bn1.eval()
    return model


def modes(model):
    return {name: m.training for name, m in model.named_modules()}


def stored_activations(model, names, data):
    """Independent reference: clone every site's output and keep it."""
    store = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, a, out, n=n: store[n].append(out.detach().clone()))
               for n in names]
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in data])
    for h in handles:
        h.remove()
    return {n: torch.cat(v).double() for n, v in store.items()}, logits


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())

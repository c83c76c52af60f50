"""Shared fixtures: tiny seeded data sets in every supported layout, and the ../shared files."""

from __future__ import annotations

import io
import pickle
import shutil
import tarfile
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from layer_probe.data import CLASSES

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

import numpy as np
import pytest
import torch

from conftest import FOLDER_IMAGES, synthetic_images
from layer_probe.data import (CLASSES, IMAGENET_MEAN, IMAGENET_STD, batches, folder_batches, load_cifar10,
                              load_image_folder, normalize, to_tensors)
from layer_probe.errors import LayerProbeError


def test_image_folder_tree_reads_exact_pixels_in_class_order(tree):
    data = load_cifar10(tree, "test")
    images, labels = synthetic_images(6, seed=1)
    assert data.images.shape == (60, 32, 32, 3) and data.images.dtype == np.uint8
    order = np.lexsort((np.arange(60), labels))
    assert np.array_equal(data.labels, labels[order]) and np.array_equal(data.images, images[order])
    assert len(data.sha256) == 64 and data.skipped == ()


def test_tarball_equals_tree_and_is_cached(tarball, tree):
    from_tar = load_cifar10(tarball, "train")
    assert np.array_equal(from_tar.images, load_cifar10(tree, "train").images)
    cached = load_cifar10(tarball, "train")  # served from the uint8 cache
    assert np.array_equal(cached.images, from_tar.images) and cached.sha256 == from_tar.sha256


def test_torchvision_batches_folder(batches_folder):
    train, test = load_cifar10(batches_folder, "train"), load_cifar10(batches_folder, "test")
    assert len(train) == 5 * 20 and len(test) == 20
    images, labels = synthetic_images(2, seed=15)
    assert np.array_equal(test.images, images) and np.array_equal(test.labels, labels)


def test_data_from_environment_variable(tree, monkeypatch):
    monkeypatch.setenv("LAYER_PROBE_DATA", str(tree))
    assert len(load_cifar10(None, "test")) == 60


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(LayerProbeError, match="LAYER_PROBE_DATA"):
        load_cifar10(None)
    with pytest.raises(LayerProbeError, match="--download"):
        load_cifar10(tmp_path / "nowhere")
    with pytest.raises(LayerProbeError, match="no 'test/' folder"):
        load_cifar10(tmp_path)


def test_corrupt_and_wrongly_sized_images_are_skipped_with_a_warning(tmp_path, capsys):
    from conftest import write_tree
    from PIL import Image

    root = write_tree(tmp_path / "c", n_per_class=2)
    (root / "test" / "cat" / "bad.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (40, 40)).save(root / "test" / "dog" / "big.png")
    data = load_cifar10(root, "test")
    assert len(data) == 20 and len(data.skipped) == 2
    assert "skipped 2" in capsys.readouterr().err


def test_unknown_classes_and_truncated_tar(tmp_path, tarball):
    (tmp_path / "t" / "test" / "unicorn").mkdir(parents=True)
    from PIL import Image
    Image.new("RGB", (32, 32)).save(tmp_path / "t" / "test" / "unicorn" / "0.png")
    with pytest.raises(LayerProbeError, match="unicorn"):
        load_cifar10(tmp_path / "t", "test")
    raw = tarball.read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(LayerProbeError, match="truncated"):
        load_cifar10(tmp_path / "cut.tar.gz", "train")


def test_subset_is_seeded_and_spans_classes(tree):
    data = load_cifar10(tree, "test")
    x, y = to_tensors(data, limit=20)
    assert len(y) == 20 and len(set(y.tolist())) > 3
    assert torch.equal(to_tensors(data, limit=20)[1], y)
    with pytest.raises(LayerProbeError, match="positive"):
        to_tensors(data, limit=0)


def test_normalize_and_batches():
    images = torch.full((3, 32, 32, 3), 255, dtype=torch.uint8)
    x = normalize(images, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert x.shape == (3, 3, 32, 32)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))
    sizes = [len(y) for _, y in batches(images, torch.arange(3), 2, (0,) * 3, (1,) * 3)]
    assert sizes == [2, 1]
    with pytest.raises(LayerProbeError):
        next(batches(images, torch.arange(3), 0, (0,) * 3, (1,) * 3))
    assert CLASSES[0] == "airplane" and CLASSES[-1] == "truck"


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


def test_image_folder_batches_are_the_standard_eval_crops(image_folder):
    data = load_image_folder(image_folder)
    assert len(data) == 6 and data.classes == ("n0001", "n0002") and len(data.sha256) == 64
    index = np.array([0, 2, 3, 4, 5])
    got = list(folder_batches(data, index, 2, IMAGENET_MEAN, IMAGENET_STD, workers=2))
    assert [tuple(x.shape) for x, _ in got] == [(2, 3, 224, 224)] * 2 + [(1, 3, 224, 224)]
    assert torch.cat([y for _, y in got]).tolist() == [0, 0, 1, 1, 1]
    files = [image_folder / cls / name for cls, name, _, _ in FOLDER_IMAGES]
    expected = np.stack([eval_crop(files[i]) for i in index]).astype(np.float64) / 255
    expected = (expected - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(torch.cat([x for x, _ in got]).permute(0, 2, 3, 1).numpy(), expected, atol=1e-5)


def test_image_folder_errors(tmp_path):
    with pytest.raises(LayerProbeError, match="no such folder"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty" / "n0001").mkdir(parents=True)
    with pytest.raises(LayerProbeError, match="not an ImageFolder"):
        load_image_folder(tmp_path / "empty")

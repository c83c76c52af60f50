import json
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import utils as torchvision_utils

from conftest import FOLDER_IMAGES, eval_crop, synthetic_images
from layer_probe import data as data_module
from layer_probe.checkpoint import save_checkpoint
from layer_probe.cli import main
from layer_probe.data import (CLASSES, IMAGENET_MEAN, IMAGENET_STD, batches, folder_batches, load_cifar10,
                              load_image_folder, normalize, repository_root, resolve_data, to_tensors)
from layer_probe.errors import LayerProbeError
from conftest import trained_like

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


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
    with pytest.raises(LayerProbeError, match="--download"):
        load_cifar10(tmp_path / "nowhere")
    with pytest.raises(LayerProbeError, match="no 'test/' folder"):
        load_cifar10(tmp_path)


def test_repository_root_is_found_from_the_package_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `repository_root` was imported before conftest replaced it: this is the real one
    assert repository_root() == Path(__file__).resolve().parents[1]


def fresh_home(tmp_path, monkeypatch) -> Path:
    """A new user's machine: an empty home, no $LAYER_PROBE_CACHE; returns the default data folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LAYER_PROBE_CACHE")
    return tmp_path / "home" / ".cache" / "layer-probe" / "cifar10"


@pytest.mark.parametrize("present, installed, chosen", [
    ({"data", "env", "archive", "default"}, False, "data"),
    ({"env", "archive", "default"}, False, "env"),
    ({"archive", "default"}, False, "archive"),
    ({"default"}, False, "default"),
    ({"archive", "default"}, True, "default"),  # an installed package has no repository beside it
    ({"archive"}, True, None),
    (set(), False, None),
])
def test_resolution_order(present, installed, chosen, tmp_path, monkeypatch, tree, tarball, batches_folder):
    default = fresh_home(tmp_path, monkeypatch)
    default.mkdir(parents=True)  # the folder alone, without batches, is not data
    checkout = tmp_path / "clone" / "layer-probe"
    monkeypatch.setattr(data_module, "repository_root", lambda: None if installed else checkout)
    decoy = tmp_path / "shared" / "datasets" / "cifar10-jpeg.tar.gz"  # ../shared seen from the working directory
    decoy.parent.mkdir(parents=True)
    shutil.copy(tarball, decoy)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    sources = {"data": tree, "env": batches_folder, "archive": tmp_path / "clone" / "shared" / "datasets" /
               "cifar10-jpeg.tar.gz", "default": default}
    if "env" in present:
        monkeypatch.setenv("LAYER_PROBE_DATA", str(batches_folder))
    if "archive" in present:
        sources["archive"].parent.mkdir(parents=True)
        shutil.copy(tarball, sources["archive"])
    if "default" in present:
        shutil.copytree(batches_folder / "cifar-10-batches-py", default / "cifar-10-batches-py")
    given = tree if "data" in present else None
    if chosen is None:
        with pytest.raises(LayerProbeError) as e:
            resolve_data(given)
        message = str(e.value)
        assert "\n" not in message and str(default) in message and "about 170 MB" in message
        assert all(hint in message for hint in ("--data PATH", "LAYER_PROBE_DATA", "--download", "make demo"))
        return
    assert resolve_data(given) == sources[chosen]
    assert load_cifar10(given, "test").source == str(sources[chosen])


def test_cache_variable_moves_the_default_folder(tmp_path, monkeypatch, batches_folder):
    monkeypatch.setenv("LAYER_PROBE_CACHE", str(tmp_path / "cache"))
    shutil.copytree(batches_folder, tmp_path / "cache" / "cifar10")
    assert resolve_data(None) == tmp_path / "cache" / "cifar10"


def fake_download(monkeypatch, capsys, batches_folder: Path, error: Exception | None = None) -> list[tuple]:
    """Replace torchvision's downloader by a fake that records each call (with what was printed before it),
    then raises `error` or writes the small batches; returns the list of calls."""
    calls = []

    def download_and_extract_archive(url, download_root, extract_root=None, filename=None, md5=None,
                                     remove_finished=False):
        calls.append((url, Path(download_root), filename, md5, remove_finished, capsys.readouterr().err))
        if error is not None:
            raise error
        shutil.copytree(batches_folder / "cifar-10-batches-py", Path(download_root) / "cifar-10-batches-py")

    monkeypatch.setattr(torchvision_utils, "download_and_extract_archive", download_and_extract_archive)
    return calls


def test_download_fetches_cifar10_into_the_default_folder_once(tmp_path, monkeypatch, capsys, batches_folder,
                                                               tarball):
    default, calls = fresh_home(tmp_path, monkeypatch), fake_download(monkeypatch, capsys, batches_folder)
    test = load_cifar10(None, "test", download=True)
    assert [call[:5] for call in calls] == [(CIFAR10_URL, default, "cifar-10-python.tar.gz",
                                              "c58f30108f718f92721af3b95e74349a", True)]
    assert "downloading CIFAR-10 (about 170 MB)" in calls[0][5] and str(default) in calls[0][5]  # said before
    images, labels = synthetic_images(2, seed=15)
    assert test.source == str(default) and np.array_equal(test.images, images) and np.array_equal(test.labels, labels)
    assert load_cifar10(None, "train", download=True).source == str(default) and len(calls) == 1
    assert resolve_data(tmp_path / "mine", download=True) == tmp_path / "mine"  # into --data when it has no batches
    assert calls[-1][1] == tmp_path / "mine" and len(calls) == 2
    assert resolve_data(default, download=True) == default and resolve_data(tarball, download=True) == tarball
    assert len(calls) == 2  # data already there: nothing fetched


def test_demo_downloads_then_probes(tmp_path, monkeypatch, capsys, batches_folder):
    default, calls = fresh_home(tmp_path, monkeypatch), fake_download(monkeypatch, capsys, batches_folder)
    ckpt = tmp_path / "resnet8.pt"
    save_checkpoint(ckpt, trained_like("resnet8"), "resnet8")
    code = main(["responses", str(ckpt), "--download", "--limit", "10", "--device", "cpu",
                 "--plot", str(tmp_path / "out" / "fig7.png"), "--out", str(tmp_path / "out")])
    assert code == 0 and len(calls) == 1 and (tmp_path / "out" / "fig7.png").is_file()
    assert json.loads((tmp_path / "out" / "responses.json").read_text())["data"] == str(default)


@pytest.mark.parametrize("error", [urllib.error.URLError("[Errno -3] Temporary failure in name resolution"),
                                   ConnectionResetError(104, "Connection reset by peer")])
def test_offline_download_fails_in_one_line_that_says_what_to_do(error, tmp_path, monkeypatch, capsys,
                                                                 batches_folder):
    default, calls = fresh_home(tmp_path, monkeypatch), fake_download(monkeypatch, capsys, batches_folder, error)
    with pytest.raises(LayerProbeError) as e:
        resolve_data(None, download=True)
    message = str(e.value)
    assert message.startswith(f"could not download CIFAR-10 into {default} ({type(error).__name__}")
    assert "\n" not in message and "LAYER_PROBE_DATA" in message
    assert f"put the cifar-10-batches-py/ folder of cifar-10-python.tar.gz in {default}" in message
    ckpt = tmp_path / "resnet8.pt"
    save_checkpoint(ckpt, trained_like("resnet8"), "resnet8")
    code = main(["responses", str(ckpt), "--download", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"layer-probe: error: {message}\n"  # one line, no traceback
    assert calls[-1][5].startswith("downloading CIFAR-10 (about 170 MB)")  # after the notice that came first


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

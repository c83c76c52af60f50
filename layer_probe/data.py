"""CIFAR-10 as uint8 arrays: from torchvision's `cifar-10-batches-py`, an ImageFolder tree
(`train/<class>/*`, `test/<class>/*`) or a tar/tar.gz of one. ImageNet-style evaluation folders
are read lazily instead, through DataLoader workers (`load_image_folder`, `folder_batches`).

`resolve_data` chooses the source (--data, $LAYER_PROBE_DATA, the JPEG archive beside the
repository, the default folder, or a download into it). Decoded images are cached as uint8 arrays,
keyed by the source's checksum, so the second run starts in seconds. Classes are in the standard CIFAR-10 order.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .errors import LayerProbeError
from .files import atomic_path, sha256

Split = Literal["train", "test"]
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
DATA_ENV = "LAYER_PROBE_DATA"
SHARED_ARCHIVE = Path("shared", "datasets", "cifar10-jpeg.tar.gz")  # in the folder beside the repository root
CIFAR10_MB = 170  # torchvision's cifar-10-python.tar.gz
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class ImageSet:
    """One split of CIFAR-10 in memory."""

    images: np.ndarray  # [N, 32, 32, 3] uint8, RGB
    labels: np.ndarray  # [N] int64, index into CLASSES
    source: str  # the path it was read from
    split: Split
    sha256: str  # of the archive file, or of a folder's file listing
    skipped: tuple[str, ...] = ()  # unreadable or wrongly sized images left out

    def __len__(self) -> int:
        return len(self.labels)


def cache_dir() -> Path:
    """Where decoded data and training runs are kept: $LAYER_PROBE_CACHE or ~/.cache/layer-probe."""
    return Path(os.environ.get("LAYER_PROBE_CACHE", Path.home() / ".cache" / "layer-probe"))


def default_data_dir() -> Path:
    """Where `--download` puts CIFAR-10 and where it is found later: $LAYER_PROBE_CACHE/cifar10."""
    return cache_dir() / "cifar10"


def repository_root() -> Path | None:
    """The checkout this package runs from (pyproject.toml beside the package), or None when installed.

    Found from the package's own location, so the result does not depend on the working directory.
    """
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def resolve_data(data: str | Path | None, *, download: bool = False) -> Path:
    """The CIFAR-10 source to read: the CLI, the notebooks and `make demo` all choose it here.

    In order: `data` (the CLI's --data), else $LAYER_PROBE_DATA; else the JPEG archive
    ../shared/datasets/cifar10-jpeg.tar.gz beside the repository root; else `default_data_dir()`
    when it holds torchvision's cifar-10-batches-py/.

    Args:
        data: a cifar-10-batches-py folder (or its parent), an ImageFolder tree or a tar of one; None to look.
        download: fetch CIFAR-10 (about 170 MB) into `data` when it holds no batches, or into
            `default_data_dir()` when nothing is found, instead of failing.

    Returns:
        The path to read; `load_cifar10` records it as `ImageSet.source`.
    """
    given = data or os.environ.get(DATA_ENV)
    if given:
        path = Path(given).expanduser()
        if download and not path.is_file() and _batches_folder(path) is None:
            _download(path)
        if not path.exists():
            origin = "--data" if data else f"${DATA_ENV}"
            raise LayerProbeError(f"dataset not found: {path} (from {origin}); pass the path of a cifar-10-batches-py "
                                  "folder, an ImageFolder tree or a .tar.gz of one, or use --download on a machine "
                                  "with network access")
        return path
    root = repository_root()
    if root is not None and (root.parent / SHARED_ARCHIVE).is_file():
        return root.parent / SHARED_ARCHIVE
    default = default_data_dir()
    if download and _batches_folder(default) is None:
        _download(default)
    if _batches_folder(default) is None:
        raise LayerProbeError(f"no CIFAR-10 found: pass --data PATH or set {DATA_ENV} to a cifar-10-batches-py "
                              "folder, an ImageFolder tree (train/<class>/, test/<class>/) or a .tar.gz of one, or "
                              f"put torchvision's cifar-10-batches-py/ in {default}; with network access, --download "
                              f"(or `make demo`) fetches CIFAR-10 (about {CIFAR10_MB} MB) there")
    return default


def load_cifar10(data: str | Path | None, split: Split = "test", *, download: bool = False,
                 use_cache: bool = True) -> ImageSet:
    """Read one split of CIFAR-10 from the source `resolve_data` chooses, through the uint8 cache."""
    if split not in ("train", "test"):
        raise LayerProbeError(f"split must be 'train' or 'test', got {split!r}")
    path = resolve_data(data, download=download)
    batches = _batches_folder(path)
    digest = sha256(batches or path)
    cached = cache_dir() / "data" / f"{digest[:16]}-{split}.npz"
    if use_cache and cached.exists():
        with np.load(cached, allow_pickle=False) as z:
            return _warn_incomplete(ImageSet(z["images"], z["labels"], str(path), split, digest,
                                             tuple(z["skipped"].tolist())))
    if batches:
        images, labels, skipped = _read_batches(batches, split)
    elif path.is_dir():
        images, labels, skipped = _read_tree(_walk_folder(path, split), path, split)
    else:
        images, labels, skipped = _read_tree(_walk_tar(path, split), path, split)
    if use_cache:
        with atomic_path(cached) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels, skipped=np.array(skipped, dtype=str))
    return _warn_incomplete(ImageSet(images, labels, str(path), split, digest, tuple(skipped)))


def to_tensors(data: ImageSet, limit: int | None = None, device: str | torch.device = "cpu",
               seed: int = 0) -> tuple[Tensor, Tensor]:
    """Images and labels as tensors: [N, 32, 32, 3] uint8 and [N] int64.

    The images come in a seeded random order, a random subset of them with a `limit` (see `subset`).
    """
    if limit is not None and limit < 1:
        raise LayerProbeError(f"limit must be a positive number of images, got {limit}")
    if len(data) == 0:
        raise LayerProbeError(f"{data.source}: the {data.split} split has no images")
    index = subset(len(data), limit, seed)
    return torch.from_numpy(data.images[index]).to(device), torch.from_numpy(data.labels[index]).to(device)


def subset(n: int, limit: int | None, seed: int = 0) -> np.ndarray:
    """Indices of `limit` of `n` items (all of them without a limit) in a seeded random order.

    The files are sorted by class: in file order the first N would all be airplanes, and batches
    normalised with batch statistics (BN in train mode) would each hold a single class.
    """
    order = np.random.default_rng(seed).permutation(n)
    return order if limit is None else order[:limit]


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W], scaled to [0, 1] then normalised per channel."""
    x = images.permute(0, 3, 1, 2).float().div_(255)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def batches(images: Tensor, labels: Tensor, batch_size: int, mean: tuple[float, ...], std: tuple[float, ...],
            *, channels_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """Normalised batches in order, converted one batch at a time (the uint8 set stays small)."""
    if batch_size < 1:
        raise LayerProbeError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(labels), batch_size):
        x = normalize(images[start:start + batch_size], mean, std)
        yield (x.contiguous(memory_format=torch.channels_last) if channels_last else x), labels[start:start + batch_size]


IMAGENET_RESIZE, IMAGENET_CROP = 256, 224  # the standard evaluation transform: shorter side to 256, centre 224x224


@dataclass(frozen=True)
class ImageFolderSet:
    """An ImageNet-style folder `<class>/<image>`, read lazily: DataLoader workers decode, resize and crop.

    Labels index the sorted class-folder names (torchvision's ImageFolder order; for ImageNet's
    synset folders n01440764, ... it is the label order of torchvision's weights).
    """

    dataset: torch.utils.data.Dataset  # item i -> ([224, 224, 3] uint8 RGB, class index)
    source: str
    sha256: str  # of the folder's file listing (relative names, sizes, mtimes)
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.dataset)


def load_image_folder(root: str | Path) -> ImageFolderSet:
    """An evaluation folder such as `imagenet/val` (`<class>/*.JPEG`) with resize 256, centre crop 224.

    Any image size and mode (grey, CMYK, ...) is accepted: images are converted to RGB first.
    """
    from torchvision import datasets, transforms

    root = Path(root).expanduser()
    if not root.is_dir():
        raise LayerProbeError(f"{root}: no such folder; expected an ImageFolder such as imagenet/val, with one "
                              "sub-folder of images per class")
    transform = transforms.Compose([transforms.Resize(IMAGENET_RESIZE), transforms.CenterCrop(IMAGENET_CROP),
                                    _hwc_uint8])
    try:
        dataset = datasets.ImageFolder(str(root), transform=transform)
    except FileNotFoundError as e:
        raise LayerProbeError(f"{root}: not an ImageFolder ({e}); expected <class>/<image> sub-folders") from None
    return ImageFolderSet(dataset, str(root), sha256(root), tuple(dataset.classes))


def folder_batches(data: ImageFolderSet, index: np.ndarray, batch_size: int, mean: tuple[float, ...],
                   std: tuple[float, ...], device: str | torch.device = "cpu", *, workers: int = 4
                   ) -> Iterator[tuple[Tensor, Tensor]]:
    """Normalised batches [B, 3, 224, 224] and labels [B] of the images `index` of `data`, in that order.

    Workers decode into uint8 [B, 224, 224, 3], pinned when `device` is a GPU; the copy to the
    device does not block and `normalize` runs there, so only a quarter of float32's bytes cross.
    """
    from torch.utils.data import DataLoader, Subset

    if batch_size < 1:
        raise LayerProbeError(f"batch_size must be at least 1, got {batch_size}")
    device = torch.device(device)
    loader = DataLoader(Subset(data.dataset, index.tolist()), batch_size=batch_size, num_workers=workers,
                        pin_memory=device.type == "cuda")
    for x, y in loader:
        yield normalize(x.to(device, non_blocking=True), mean, std), y.to(device, non_blocking=True)


def _hwc_uint8(image: object) -> Tensor:
    """A PIL image as [H, W, 3] uint8 (a module-level function, so DataLoader workers can pickle it)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8))


def _download(root: Path) -> None:
    """Fetch torchvision's cifar-10-batches-py/ into `root`, with a progress bar; the archive is removed after."""
    from torchvision.datasets import CIFAR10, utils

    print(f"downloading CIFAR-10 (about {CIFAR10_MB} MB) from {CIFAR10.url} into {root}", file=sys.stderr)
    try:
        utils.download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5,
                                           remove_finished=True)
    except Exception as e:  # noqa: BLE001 - network, checksum and archive errors come in many types
        raise LayerProbeError(f"could not download CIFAR-10 into {root} ({type(e).__name__}: {e}); without "
                              f"network, put the cifar-10-batches-py/ folder of {CIFAR10.filename} in {root}, or "
                              f"pass --data PATH or set {DATA_ENV} to a copy of CIFAR-10") from None


def _batches_folder(path: Path) -> Path | None:
    """`path` itself or `path/cifar-10-batches-py` if it holds torchvision's pickled batches."""
    for candidate in (path, path / "cifar-10-batches-py"):
        if (candidate / "test_batch").is_file():
            return candidate
    return None


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and builtins only: a data file must not be able to run code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "bytes")}

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle API
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_batches(folder: Path, split: Split) -> tuple[np.ndarray, np.ndarray, list[str]]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        try:
            with open(folder / name, "rb") as f:
                entry = _ArrayUnpickler(f, encoding="bytes").load()
            data = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            images.append(data)
            labels.append(np.asarray(entry[b"labels"], dtype=np.int64))
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError) as e:
            raise LayerProbeError(f"{folder / name}: not a readable CIFAR-10 batch ({e})") from None
    return np.concatenate(images), np.concatenate(labels), []


def _class_of(parts: tuple[str, ...], split: Split) -> str | None:
    """The class folder of an image path `.../<split>/<class>/<file>`, or None if it is elsewhere."""
    return parts[-2] if len(parts) >= 3 and parts[-3] == split and parts[-1].lower().endswith(_IMAGE_SUFFIXES) else None


def _walk_folder(root: Path, split: Split) -> Iterator[tuple[str, str, bytes]]:
    split_dirs = [p for p in root.rglob(split) if p.is_dir()]
    if not split_dirs:
        raise LayerProbeError(f"{root}: no '{split}/' folder; expected {split}/<class>/<image> for the 10 CIFAR-10 "
                              "classes, or a cifar-10-batches-py folder")
    for p in sorted(split_dirs[0].glob("*/*")):
        cls = _class_of(p.parts, split)
        if cls is not None:
            yield str(p), cls, p.read_bytes()


def _walk_tar(path: Path, split: Split) -> Iterator[tuple[str, str, bytes]]:
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                cls = _class_of(Path(member.name).parts, split) if member.isfile() else None
                if cls is not None:
                    yield member.name, cls, tar.extractfile(member).read()
            # tarfile ends quietly at a cut or damaged header; a complete archive ends with a zero block
            tar.fileobj.seek(tar.offset)
            if tar.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"no end-of-archive marker after {tar.offset} bytes")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise LayerProbeError(f"{path}: not a readable tar archive of CIFAR-10 images "
                              f"({type(e).__name__}: {e}); is the file truncated?") from None


def _read_tree(entries: Iterator[tuple[str, str, bytes]], source: Path, split: Split
               ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode (name, class, bytes) entries into arrays; undecodable or non-32x32 images are skipped."""
    from PIL import Image, UnidentifiedImageError

    images, labels, skipped, unknown = [], [], [], set()
    for name, cls, raw in entries:
        if cls not in CLASSES:
            unknown.add(cls)
            continue
        try:
            with Image.open(io.BytesIO(raw)) as im:  # reads the header only: other sizes are never decoded
                arr = np.asarray(im.convert("RGB")) if im.size == (32, 32) else None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            skipped.append(name)
            continue
        if arr is None or arr.shape != (32, 32, 3):
            skipped.append(name)
            continue
        images.append(arr)
        labels.append(CLASSES.index(cls))
    if unknown:
        raise LayerProbeError(f"{source}: class folders {sorted(unknown)} are not CIFAR-10 classes {list(CLASSES)}")
    if not images:
        raise LayerProbeError(f"{source}: no readable images in the {split} split"
                              + (f" ({len(skipped)} unreadable or non-32x32, e.g. {skipped[0]})" if skipped else ""))
    return np.stack(images), np.asarray(labels, dtype=np.int64), skipped


def _warn_incomplete(data: ImageSet) -> ImageSet:
    """Warn about skipped images and classes without images, on every load (cached or not)."""
    if data.skipped:
        print(f"warning: {data.source}: skipped {len(data.skipped)} unreadable or non-32x32 image(s) in the "
              f"{data.split} split, e.g. {data.skipped[0]}", file=sys.stderr)
    present = set(np.unique(data.labels).tolist())
    missing = [c for i, c in enumerate(CLASSES) if i not in present]
    if missing:
        print(f"warning: {data.source}: no {data.split} images of class(es) {', '.join(missing)}", file=sys.stderr)
    return data

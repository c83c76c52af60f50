"""Checkpoints: the project's own format, and the bare state_dicts of public CIFAR ResNets.

The project's format is a dict that carries everything needed to rebuild the model:
`{"format": "layer-probe/1", "arch": "resnet56", "arch_kwargs": {...}, "state_dict": {...},
"meta": {...}}`. Files are always read with `torch.load(weights_only=True)`: a file that
needs arbitrary unpickling is refused and nothing in it runs. Other layouts load too: a bare
state_dict, one under 'state_dict', 'model' or 'net', keys with DataParallel's `module.` or
Lightning's `model.` prefix, and `.safetensors` files.
"""

from __future__ import annotations

import copy
import math
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .data import IMAGENET_MEAN, IMAGENET_STD, repository_root
from .errors import LayerProbeError, first_line
from .files import atomic_path
from .models import MODELS, build_model, is_cifar

FORMAT = "layer-probe/1"
STATE_KEYS = ("state_dict", "model", "net")  # where training scripts put the weights
PREFIXES = ("module.", "model.")  # DataParallel / DistributedDataParallel, PyTorch Lightning


@dataclass(frozen=True)
class Checkpoint:
    """A model rebuilt from a file, with what the file said about it."""

    model: nn.Module
    arch: str
    arch_kwargs: dict[str, Any]
    path: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> tuple[float, ...]:
        """Input normalisation mean; third-party CIFAR checkpoints default to ImageNet's."""
        return tuple(self.meta.get("normalization", {}).get("mean", IMAGENET_MEAN))

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.meta.get("normalization", {}).get("std", IMAGENET_STD))

    def describe(self, label: str) -> dict[str, Any]:
        """What a measurement records about this network: its arch, label, training recipe and seed, and its
        group, the label without a `-seedN` suffix, which joins seed replicates (Fig. 7 draws a group as one
        band; `analysis.compare` pairs networks within a recipe and seed)."""
        recipe = self.meta.get("recipe")
        return {"arch": self.arch, "label": label, "recipe": recipe.get("name", "") if isinstance(recipe, dict) else "",
                "seed": self.meta.get("seed", 0), "group": label.split("-seed")[0]}

    def initialised(self, seed: int = 0) -> nn.Module:
        """The same architecture at initialisation, in eval mode: its registered builder under `seed` (the
        CIFAR nets' He init), or else a copy of the model with every module's own `reset_parameters` under
        `seed`. The baseline against which "small" and "learned" are judged."""
        torch.manual_seed(seed)
        if self.arch in MODELS:
            return build_model(self.arch, **self.arch_kwargs).eval()
        model = copy.deepcopy(self.model)
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
        return model.eval()


def save_checkpoint(path: str | Path, model: nn.Module, arch: str, arch_kwargs: dict[str, Any] | None = None,
                    meta: dict[str, Any] | None = None) -> None:
    """Write the project's checkpoint format atomically (fp32 weights on the CPU).

    The same model and metadata give the same bytes: torch names the records inside the zip
    after the file it writes to, so it is handed an open file rather than the temporary path.
    """
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "arch": arch, "arch_kwargs": dict(arch_kwargs or {}), "state_dict": state,
               "meta": dict(meta or {})}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)


def torch_load(path: str | Path) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU, with every failure turned into one clear error.

    torch's own warnings about odd pickles are silenced: for an untrusted file the error says it all.
    """
    path = Path(path)
    if not path.exists():
        raise LayerProbeError(f"{path}: no such file")
    if path.is_dir():
        raise LayerProbeError(f"{path}: is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise LayerProbeError(f"{path}: empty file, not a checkpoint")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:unsupported GLOBAL|Unsupported global:?) (?:GLOBAL )?([\w.]+)", str(e))
        if found:
            raise LayerProbeError(f"{path}: refused: it asks to import {found.group(1)} while loading, which can run "
                                  "code; only tensors and plain containers are accepted") from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        raise LayerProbeError(f"{path}: not a readable PyTorch checkpoint (corrupt or not a pickle: "
                              f"{reason.group(1).strip() if reason else first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for damaged files
        raise LayerProbeError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {first_line(e)})") from None


def read_file(path: str | Path) -> dict[str, Any]:
    """A checkpoint file's contents (see `torch_load`) as a dict with a 'state_dict'.

    A bare state_dict is wrapped, and one found under 'model' or 'net' is moved to 'state_dict'.
    """
    obj = _read_safetensors(path) if str(path).endswith(".safetensors") else torch_load(path)
    if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return {"state_dict": obj}
    key = next((k for k in STATE_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
    if key is None:
        raise LayerProbeError(f"{path}: holds a {type(obj).__name__} without a 'state_dict'; expected a state_dict "
                              f"or a dict with one under {', '.join(repr(k) for k in STATE_KEYS)}")
    return obj | {"state_dict": obj[key]}


def _read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a .safetensors file (which holds nothing else, so nothing in it can run)."""
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise LayerProbeError(f"{path}: reading .safetensors needs the safetensors package: "
                              "pip install safetensors") from None
    path = Path(path)
    if not path.is_file():
        raise LayerProbeError(f"{path}: no such file")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise LayerProbeError(f"{path}: not a readable safetensors file ({first_line(e)})") from None


def strip_prefixes(state: dict[str, Tensor], expected: set[str] | None = None) -> dict[str, Tensor]:
    """Drop `module.` / `model.` prefixes shared by every key, while the keys do not fit `expected` (if given)."""
    while state and (expected is None or not expected & state.keys()):
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_weights(path: str | Path, model: nn.Module, label: str, *, device: str | torch.device = "cpu") -> Checkpoint:
    """Load the weights in `path` into `model` (a user's or a library's network) after the same checks.

    Args:
        label: what the model is called in messages and outputs, e.g. "timm:seresnet18".
    """
    obj = read_file(path)
    _check_entries(path, obj["state_dict"])
    state = strip_prefixes(obj["state_dict"], set(model.state_dict()))
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    _check_normalization(path, meta.get("normalization", {}))
    _check_fit(path, model, state, label)
    model.load_state_dict(state, strict=False)
    return Checkpoint(model.to(device).eval(), label, {}, str(path), meta)


def load_checkpoint(path: str | Path, arch: str | None = None, *, device: str | torch.device = "cpu",
                    **arch_kwargs: Any) -> Checkpoint:
    """Rebuild the model stored in `path`, in eval mode on `device`.

    Args:
        path: a layer-probe checkpoint, a bare state_dict, or `{'state_dict': ...}` (keys may
            carry DataParallel's `module.` prefix), e.g. the public akamaster CIFAR ResNets.
        arch: architecture name; needed when the file does not say and the keys cannot tell
            (plain and option-A ResNet weights have the same names and shapes).
    """
    obj = read_file(path)
    _check_entries(path, obj["state_dict"])
    state = strip_prefixes(obj["state_dict"])
    stored = obj.get("arch") if isinstance(obj.get("arch"), str) else None
    if stored and arch and arch != stored:
        raise LayerProbeError(f"{path}: the file says its architecture is {stored}, but --arch {arch} was given")
    stored_kwargs = obj.get("arch_kwargs") or {}
    if not isinstance(stored_kwargs, dict) or not all(isinstance(k, str) for k in stored_kwargs):
        raise LayerProbeError(f"{path}: 'arch_kwargs' must be a dict of keyword arguments, got {stored_kwargs!r:.80}")
    kwargs = stored_kwargs | arch_kwargs
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    _check_normalization(path, meta.get("normalization", {}))
    if not (arch or stored):
        arch, inferred = infer_arch(path, state)
        kwargs = inferred | kwargs
    arch = arch or stored
    if is_cifar(arch) and arch.startswith("resnet") and any(".shortcut.0.weight" in k for k in state):
        kwargs.setdefault("shortcut", "B")
    try:
        with torch.device("meta"):  # the file must fit the architecture before any memory is allocated for it
            skeleton = build_model(arch, **kwargs)
    except LayerProbeError as e:
        raise LayerProbeError(f"{path}: {e}") from None
    _check_fit(path, skeleton, state, arch)
    model = build_model(arch, **kwargs)
    model.load_state_dict(state, strict=False)
    reported = obj.get("best_prec1")
    if isinstance(reported, Tensor) and reported.numel() == 1:
        reported = reported.item()
    if isinstance(reported, (int, float)) and "top1" not in meta:
        meta = meta | {"reported_top1": float(reported)}
    return Checkpoint(model.to(device).eval(), arch, kwargs, str(path), meta)


def infer_arch(path: str | Path, state: dict[str, Tensor]) -> tuple[str, dict[str, Any]]:
    """Architecture name and constructor arguments from a state_dict's keys and shapes."""
    blocks = lambda stage: len({k.split(".")[1] for k in state if k.startswith(f"layer{stage}.")})  # noqa: E731
    if "linear.weight" in state and blocks(1) and not blocks(4):
        depth = 6 * blocks(1) + 2
        if any(".shortcut.0.weight" in k for k in state):
            return f"resnet{depth}", {"shortcut": "B"}
        raise LayerProbeError(f"{path}: CIFAR network of depth {depth}, but plain{depth} and option-A resnet{depth} "
                              f"have identical weights; pass --arch resnet{depth} or --arch plain{depth}")
    if "fc.weight" in state and blocks(4):
        counts = tuple(blocks(i) for i in range(1, 5))
        bottleneck = "layer1.0.conv3.weight" in state
        depth = {(False, (2, 2, 2, 2)): 18, (False, (3, 4, 6, 3)): 34, (True, (3, 4, 6, 3)): 50,
                 (True, (3, 4, 23, 3)): 101, (True, (3, 8, 36, 3)): 152}.get((bottleneck, counts))
        conv2 = state.get("layer1.0.conv2.weight")
        if depth is not None and conv2 is not None and conv2.ndim == 4:
            if conv2.shape[1] != conv2.shape[0]:  # grouped 3x3 convs: ResNeXt
                return {50: "resnext50_32x4d", 101: "resnext101_32x8d"}.get(depth, f"resnet{depth}"), {}
            if bottleneck and conv2.shape[0] == 128:
                return f"wide_resnet{depth}_2", {}
            return f"resnet{depth}", {}
    raise LayerProbeError(f"{path}: cannot tell the architecture from its keys; pass --arch "
                          "(see layer_probe.models.list_models())")


def _check_entries(path: str | Path, state: dict[Any, Any]) -> None:
    """Every entry is a plain dense tensor under a string name, and stores all of its values.

    A crafted file can hold a broadcast view ([10**12] values over one stored number); it
    would pass a shape check and then exhaust memory, so it is refused here.
    """
    names = [k for k in state if not isinstance(k, str)]
    if names:
        raise LayerProbeError(f"{path}: state_dict key {names[0]!r} is not a string")
    bad = [k for k, v in state.items() if not isinstance(v, Tensor) or v.layout != torch.strided or v.is_quantized]
    if bad:
        raise LayerProbeError(f"{path}: state_dict entry {bad[0]!r} is not a plain dense tensor")
    views = [k for k, v in state.items() if v.numel() * v.element_size() > v.untyped_storage().nbytes()]
    if views:
        raise LayerProbeError(f"{path}: state_dict entry {views[0]!r} claims more values than the file stores")


def _check_normalization(path: str | Path, normalization: Any) -> None:
    """The input normalisation in a file's metadata: {'mean': 3 numbers, 'std': 3 positive numbers}, either optional."""
    def numbers(values: Any, positive: bool) -> bool:
        return (isinstance(values, (list, tuple)) and len(values) == 3 and all(
            isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or not positive) for v in values))

    if not (isinstance(normalization, dict) and all(numbers(normalization[k], k == "std")
                                                    for k in ("mean", "std") if k in normalization)):
        raise LayerProbeError(f"{path}: meta 'normalization' must be {{'mean': [3 numbers], 'std': [3 positive "
                              f"numbers]}}, got {normalization!r:.80}; the file's metadata is damaged")


def _check_fit(path: str | Path, model: nn.Module, state: dict[str, Tensor], arch: str) -> None:
    """The weights fit `model`: no missing or unexpected keys, no wrong shapes or dtypes, no NaN/Inf.

    Values are scanned only once the shapes are known to be right, so the scan is bounded by the model's size.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                 f"wrong shapes: {shapes[:3]}" if shapes else ""]
        raise LayerProbeError(f"{path}: weights do not fit {arch}: " + "; ".join(p for p in parts if p))
    dtypes = [f"{k} {state[k].dtype}" for k, v in expected.items()
              if k in state and not torch.can_cast(state[k].dtype, v.dtype)]
    if dtypes:
        raise LayerProbeError(f"{path}: weights do not fit {arch}: wrong dtypes: {dtypes[:3]}")
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise LayerProbeError(f"{path}: {len(nonfinite)} tensor(s) hold NaN or Inf, e.g. {nonfinite[0]}")


FIG7 = ("plain20", "plain56", "resnet20", "resnet56", "resnet110")  # the five networks of Fig. 7, as shipped


RECIPE_SETS = {"fast": "", "faithful": "faithful"}  # recipe -> its folder below checkpoints/


def checkpoints_dir() -> Path:
    """`checkpoints/` of the repository (of the working directory when the package is installed)."""
    return (repository_root() or Path.cwd()) / "checkpoints"


def shipped(recipe: str = "fast", *, existing: bool = True) -> list[Path]:
    """The shipped checkpoints of Fig. 7's networks trained with `recipe`, in `FIG7` order, then their seed
    replicates (`NAME-seedN.pt`), below `checkpoints_dir()`; only those that exist unless `existing=False`."""
    folder = checkpoints_dir() / RECIPE_SETS[recipe]
    paths = [folder / f"{name}.pt" for name in FIG7]
    paths = [p for p in paths if p.exists()] if existing else paths
    return paths + sorted(folder.glob("*-seed*.pt"), key=lambda p: (FIG7.index(p.stem.split("-")[0])
                                                                      if p.stem.split("-")[0] in FIG7 else 99, p.stem))


def load_shipped(recipe: str = "fast") -> dict[str, Checkpoint]:
    """The shipped checkpoints of `recipe` that exist, loaded, by name ("resnet20", "resnet20-seed1"): what the
    notebooks start from."""
    return {p.stem: load_checkpoint(p) for p in shipped(recipe)}

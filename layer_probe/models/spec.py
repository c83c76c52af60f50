"""A network named by a SPEC: `torchvision:NAME`, `timm:NAME` or `path/to/file.py:CALLABLE`.

    >>> model = build_spec("torchvision:resnet18")          # fresh weights; load a checkpoint into it
    >>> model = build_spec("mynets.py:resnet20_se")          # runs mynets.py: only name files you trust

A file SPEC imports and runs the user's Python file (that is how its network is built); the
checkpoint itself is still read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from torch import nn

from ..errors import LayerProbeError


def build_spec(spec: str) -> nn.Module:
    """Build the network SPEC names, with fresh weights (nothing is downloaded)."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise LayerProbeError(f"--model {spec!r}: expected torchvision:NAME, timm:NAME or path/to/file.py:CALLABLE")
    if source == "torchvision":
        import torchvision.models

        try:
            model = torchvision.models.get_model(name, weights=None)
        except ValueError:
            raise LayerProbeError(f"--model {spec!r}: torchvision has no model {name!r}; see "
                                  "torchvision.models.list_models()") from None
    elif source == "timm":
        try:
            import timm
        except ImportError:
            raise LayerProbeError(f"--model {spec!r} needs timm: pip install 'layer-probe[timm]'") from None
        if not timm.is_model(name):
            raise LayerProbeError(f"--model {spec!r}: timm has no model {name!r}; see timm.list_models()")
        model = timm.create_model(name, pretrained=False)
    else:
        model = _from_file(spec, Path(source), name)
    if not isinstance(model, nn.Module):
        raise LayerProbeError(f"--model {spec!r}: {name} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _from_file(spec: str, path: Path, name: str) -> object:
    """Import the user's file (running it) and call `name()` from it."""
    if path.suffix != ".py" or not path.is_file():
        raise LayerProbeError(f"--model {spec!r}: {path} is not a Python file (expected path/to/file.py:CALLABLE)")
    module_name = f"layer_probe_user_{path.stem}"
    loader = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader)
    sys.modules[module_name] = module  # dataclasses and pickling look their module up here
    try:
        loader.loader.exec_module(module)
        build = getattr(module, name, None)
        if not callable(build):
            raise LayerProbeError(f"--model {spec!r}: {path} defines no callable {name!r}")
        return build()
    except LayerProbeError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's code can raise anything
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise LayerProbeError(f"--model {spec!r}: running {path} failed ({type(e).__name__}: {first})") from None

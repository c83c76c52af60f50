"""layer-probe: measure the layer responses of plain and residual networks (He et al. 2016, Fig. 7).

    >>> import layer_probe
    >>> r = layer_probe.measure(model, loader)        # any model, any DataLoader
    >>> r.to_dataframe(); layer_probe.plot_responses([r])
"""

__version__ = "0.1.0"

from .analysis import analyze, compare  # noqa: E402 - the modules below read __version__
from .checkpoint import load_checkpoint  # noqa: E402
from .measurement import measure  # noqa: E402
from .plots import plot_responses  # noqa: E402
from .results import Responses  # noqa: E402
from .sites import list_sites  # noqa: E402

__all__ = ["Responses", "analyze", "compare", "list_sites", "load_checkpoint", "measure", "plot_responses"]

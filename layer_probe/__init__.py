"""layer-probe: measure the layer responses of plain and residual networks (He et al. 2016, Fig. 7)."""

__version__ = "0.1.0"

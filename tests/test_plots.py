import pytest

from layer_probe.errors import LayerProbeError
from layer_probe.plots import plot_responses, save_figure
from test_results import responses  # noqa: F401 - fixture


@pytest.mark.parametrize("suffix", [".png", ".pdf", ".svg"])
def test_fig7_plot_formats(responses, tmp_path, suffix):  # noqa: F811
    path = save_figure(plot_responses([responses]), tmp_path / f"fig7{suffix}")
    head = path.read_bytes()[:16]
    assert {".png": b"\x89PNG", ".pdf": b"%PDF", ".svg": b"<?xml"}[suffix] in head


@pytest.mark.parametrize("suffix", [".pdf", ".svg"])
def test_vector_output_is_deterministic(responses, tmp_path, suffix):  # noqa: F811
    a = save_figure(plot_responses([responses], style="paper"), tmp_path / f"a{suffix}").read_bytes()
    b = save_figure(plot_responses([responses], style="paper"), tmp_path / f"b{suffix}").read_bytes()
    assert a == b


def test_unknown_format(responses, tmp_path):  # noqa: F811
    with pytest.raises(LayerProbeError, match="png, .pdf or .svg|.png, .pdf, .svg"):
        save_figure(plot_responses([responses]), tmp_path / "fig.jpg")

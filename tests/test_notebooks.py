"""Every notebook runs top to bottom in a fresh kernel, in the fast mode CI uses (1,000 images)."""

import os
from pathlib import Path

import pytest

from conftest import JPEG_TAR

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SHIPPED = [ROOT / "checkpoints" / f"{n}.pt" for n in ("plain20", "plain56", "resnet20", "resnet56", "resnet110")]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not all(p.exists() for p in SHIPPED), reason="the five shipped checkpoints are not there"),
              pytest.mark.skipif(not JPEG_TAR.exists() and "LAYER_PROBE_DATA" not in os.environ,
                                 reason="no CIFAR-10 data")]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_fast_mode(path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("LAYER_PROBE_IMAGES", os.environ.get("LAYER_PROBE_IMAGES", "1000"))
    if "LAYER_PROBE_DATA" not in os.environ:
        monkeypatch.setenv("LAYER_PROBE_DATA", str(JPEG_TAR))
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors

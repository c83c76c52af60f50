"""Every notebook runs top to bottom in a fresh kernel, in the fast mode CI uses (1,000 images).

The notebooks use the shipped checkpoints that exist; they need at least resnet20 and plain20.
"""

import os
from pathlib import Path

import pytest

from conftest import JPEG_TAR

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NEEDED = [ROOT / "checkpoints" / f"{n}.pt" for n in ("resnet20", "plain20")]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not all(p.exists() for p in NEEDED), reason="resnet20 and plain20 are not shipped"),
              pytest.mark.skipif(not JPEG_TAR.exists() and not os.environ.get("LAYER_PROBE_DATA"),
                                 reason="no CIFAR-10 data")]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_fast_mode(path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("LAYER_PROBE_IMAGES", os.environ.get("LAYER_PROBE_IMAGES", "1000"))
    # the kernel runs in notebooks/, so a relative path given to pytest must be made absolute
    monkeypatch.setenv("LAYER_PROBE_DATA", str(Path(os.environ.get("LAYER_PROBE_DATA") or JPEG_TAR).resolve()))
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors

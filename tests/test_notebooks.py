"""Every notebook runs top to bottom in a fresh kernel, in the fast mode CI uses (1,000 images).

The notebooks use the shipped checkpoints that exist; they need at least resnet20 and plain20.
"""

import os
from pathlib import Path

import pandas as pd
import pytest

from conftest import JPEG_TAR
from test_answers import numbers

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NEEDED = [ROOT / "checkpoints" / f"{n}.pt" for n in ("resnet20", "plain20")]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not all(p.exists() for p in NEEDED), reason="resnet20 and plain20 are not shipped"),
              pytest.mark.skipif(not JPEG_TAR.exists() and not os.environ.get("LAYER_PROBE_DATA"),
                                 reason="no CIFAR-10 data")]


def text_outputs(cell) -> list[str]:
    return [line for o in cell.get("outputs", []) if o.get("output_type") == "stream" for line in o["text"].splitlines()]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_fast_mode_and_prints_what_a_direct_computation_gives(path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    from layer_probe.data import load_cifar10

    monkeypatch.setenv("LAYER_PROBE_IMAGES", os.environ.get("LAYER_PROBE_IMAGES", "1000"))
    # the kernel runs in notebooks/, so a relative path given to pytest must be made absolute
    data = Path(os.environ.get("LAYER_PROBE_DATA") or JPEG_TAR).resolve()
    monkeypatch.setenv("LAYER_PROBE_DATA", str(data))
    notebook = nbformat.read(path, as_version=4)
    # nbclient raises on the first cell that fails
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    test = load_cifar10(data, "test")
    shipped = [n for n in ("plain20", "plain56", "resnet20", "resnet56", "resnet110")
               if (ROOT / "checkpoints" / f"{n}.pt").exists()]
    assert text_outputs(notebook.cells[1]) == [
        f"{os.environ['LAYER_PROBE_IMAGES']} test images from {data.name} (sha256 {test.sha256[:12]})",
        "shipped checkpoints: " + ", ".join(shipped)]
    # the answer, in English then Korean, rendered from this run's values: the same numbers in both
    en, ko = ["".join(o["data"]["text/markdown"]) for o in notebook.cells[-1].outputs
              if "text/markdown" in o.get("data", {})]
    assert f"{int(os.environ['LAYER_PROBE_IMAGES']):,}" in en and numbers(en) == numbers(ko)
    if path.stem.startswith("04"):  # the degradation lines, against the epoch logs read here
        final = {n: pd.read_csv(ROOT / "checkpoints" / f"{n}.epochs.csv").train_error.iloc[-1] for n in shipped}
        expected = [f"{d}'s final training error, {final[d]:.2f}%, is {'above' if final[d] > final[s] else 'below'} "
                    f"{s}'s, {final[s]:.2f}%" + (" (the degradation problem)." if d == "plain56" and final[d] > final[s]
                                                 else ".")
                    for d, s in (("plain56", "plain20"), ("resnet56", "resnet20")) if d in final and s in final]
        printed = [line for c in notebook.cells if c.cell_type == "code" for line in text_outputs(c)]
        assert [line for line in printed if "final training error" in line] == expected

"""notebooks/conflict_heatmaps.ipynb runs top to bottom (nbclient), on small data, in this interpreter's kernel."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "conflict_heatmaps.ipynb"

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def kernel_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """``python3`` when jupyter_client resolves it to this interpreter, else an explicit spec for it.

    jupyter_client starts a spec whose argv[0] is ``python`` with ``sys.executable``, so the venv's ipykernel
    runs the notebook; nothing is installed into the user's Jupyter folders.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
        if spec.argv and spec.argv[0] in {"python", "python3", sys.executable}:
            return "python3"
    except NoSuchKernel:
        pass
    folder = tmp_path / "jupyter" / "kernels" / "recon-test"
    folder.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "recon tests",
        "language": "python",
    }
    (folder / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "recon-test"


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    # every picture is explained: a markdown cell right before each plotting cell
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "plots." in cell.source and "import" not in cell.source:
            assert nb.cells[i - 1].cell_type == "markdown", cell.source


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("RECON_NOTEBOOK_RUN", str(tmp_path / "run"))  # not ../runs: the test leaves no trace
    monkeypatch.setenv("RECON_DIGITS_TRAIN", "512")
    monkeypatch.setenv("RECON_DIGITS_VAL", "256")
    monkeypatch.setenv("RECON_NOTEBOOK_EPOCHS", "2")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=kernel_name(tmp_path, monkeypatch),
        timeout=300,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # heatmap, cosine over time, scores, training curves, distribution
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "profiled 16 steps" in text and "layers still shared" in text
    assert (tmp_path / "run" / "profile" / "profile.json").exists()

"""Every notebook runs top to bottom in FAST mode (as a reader would run it).

Notebooks are executed in their own folder with CVTF_FAST=1, with nbclient,
the same way ``jupyter nbconvert --execute`` does. Outputs are not written
back: committed notebooks carry no outputs.
"""

import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(
    p for p in REPO_ROOT.glob("**/*.ipynb")
    if ".venv" not in p.parts and ".ipynb_checkpoints" not in p.parts and "runs" not in p.parts
)
BUDGET_SECONDS = 300  # about 2 minutes each is the aim; this is the hard stop


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[str(p.relative_to(REPO_ROOT)) for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, monkeypatch, tmp_path):
    monkeypatch.setenv("CVTF_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs"), f"{path.name}: committed notebooks carry no outputs"
    start = time.perf_counter()
    NotebookClient(notebook, timeout=BUDGET_SECONDS, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    seconds = time.perf_counter() - start
    print(f"{path.name}: {seconds:.0f} s")
    assert seconds < BUDGET_SECONDS


def test_notebooks_are_found():
    """Guards the glob above: the suite must not silently run no notebook."""
    names = {p.name for p in NOTEBOOKS}
    assert "tf_data_and_augmentation.ipynb" in names

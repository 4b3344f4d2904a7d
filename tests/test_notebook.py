"""A real Jupyter notebook on a real kernel (nbclient + ipykernel): examples/notebook.ipynb builds a model,
shards it with ``devices=`` in the kernel, generates, trains two steps, saves, runs ``tpfx.verify`` and
``tpfx.launch`` from a cell; every cell asserts its numbers against the unsharded model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "notebook.ipynb"


@pytest.mark.slow
@pytest.mark.one_process
def test_the_example_notebook_runs_on_a_kernel() -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
                   ).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "NOTEBOOK OK" in text
    assert "worst relative error" in text and ": ok;" in text

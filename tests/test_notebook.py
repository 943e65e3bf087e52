"""demo.ipynb is committed executed, matches its generator, and runs top to bottom today."""
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("torch")

from examples import make_notebook  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIGURE_CELLS = 8  # one head, two layers' heads, query x2, CLS, distance, rollout


def outputs(notebook, output_type=None):
    return [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output_type is None or output.output_type == output_type
    ]


def images(notebook):
    return [output for output in outputs(notebook) if "image/png" in output.get("data", {})]


def test_committed_notebook_is_the_generated_one_with_its_figures():
    committed = nbformat.read(make_notebook.NOTEBOOK, as_version=4)
    generated = make_notebook.build()
    assert [(c.cell_type, c.source) for c in committed.cells] == [
        (c.cell_type, c.source) for c in generated.cells
    ], "demo.ipynb differs from examples/make_notebook.py: run python examples/make_notebook.py"
    assert not outputs(committed, "error")
    assert len(images(committed)) == FIGURE_CELLS
    assert make_notebook.NOTEBOOK.stat().st_size < 1.5e6


def test_notebook_executes_top_to_bottom_and_draws_every_figure(tmp_path, monkeypatch):
    # The kernel starts in an empty folder (nothing is written into the
    # repository) and finds `examples` and `visualizer` through PYTHONPATH.
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    notebook = make_notebook.execute(make_notebook.build(), tmp_path, timeout=600)
    errors = outputs(notebook, "error")
    assert not errors, "\n".join(f"{e.ename}: {e.evalue}" for e in errors)
    assert len(images(notebook)) == FIGURE_CELLS
    assert list(tmp_path.iterdir()) == []

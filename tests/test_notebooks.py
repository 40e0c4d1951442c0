"""Every notebook in notebooks/ runs top to bottom on CPU (executed, not just parsed), and is saved
with its outputs (a reader on a code host sees the figures): re-run them with
`python notebooks/run.py`."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    # Every DeprecationWarning the notebook's own code triggers is shown (Python hides those raised
    # inside libraries), and none may be: the notebooks use no API that jax, flax or optax deprecate.
    show = "import warnings\nwarnings.simplefilter('always', DeprecationWarning)"
    nb.cells.insert(0, nbformat.v4.new_code_cell(show))
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors
    deprecations = [o.text for o in outputs if o.output_type == "stream" and "DeprecationWarning" in o.text]
    assert not deprecations, deprecations


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_saved_with_its_outputs(path):
    nb = json.loads(path.read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert figures, f"{path.name} is saved without figures: run `python notebooks/run.py {path.stem}`"
    assert not [o for o in outputs if o.get("output_type") == "error"], f"{path.name} was saved with an error"
    unexecuted = [
        c for c in nb["cells"] if c["cell_type"] == "code" and c.get("source") and c.get("execution_count") is None
    ]
    assert not unexecuted, f"{path.name} has cells that were not run"


def test_the_eight_notebooks_exist():
    assert {p.stem for p in NOTEBOOKS} >= {
        "optimizers",
        "modern_optimizers",
        "normalization",
        "schedules",
        "regularization",
        "augment",
        "transfer",
        "self_supervised",
    }


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebooks_cite_papers_not_notes(path):
    text = path.read_text()
    for phrase in ("the notes", "course notes", "eq. (", "Eq. (", "section 2.", "section 3.", "section 4."):
        assert phrase not in text, f"{path.name} cites material that does not ship: {phrase!r}"

"""Every notebook under notebooks/ executes top to bottom on CPU, and is committed without
outputs (figures are committed as PNGs under notebooks/figures/ instead)."""

import pathlib

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
  assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "paper_figures.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
           and (c.outputs or c.execution_count is not None)]
  assert not dirty, f"{path.name}: cells {dirty} hold outputs; clear them before committing"


def test_readme_links_figures_that_exist():
  readme = (ROOT / "README.md").read_text()
  linked = [part.split(")")[0] for part in readme.split("](")[1:]
            if part.startswith("notebooks/figures/")]
  assert linked and all((ROOT / p).is_file() for p in linked), linked


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, monkeypatch):
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.delenv("GALORE_JAX_SAVE_FIGURES", raising=False)  # the committed PNGs stay
  nb = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3").execute(
      cwd=str(path.parent))
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors

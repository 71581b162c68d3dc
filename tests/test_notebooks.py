"""Every notebook under notebooks/ executes top to bottom on CPU, and is committed without
outputs (figures are committed as PNGs under notebooks/figures/ instead)."""

import pathlib

import nbclient
import nbformat
import numpy as np
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


def _paper_figures_on(results, tmp_path, monkeypatch):
  """paper_figures.ipynb's code cells run in this process on a checkout whose
  benchmarks/results/ holds only ``results`` (name -> JSON); returns the cells' namespace."""
  import json  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  for name in ("galore_jax", "examples"):
    (tmp_path / name).symlink_to(ROOT / name)
  (tmp_path / "benchmarks" / "results").mkdir(parents=True)
  (tmp_path / "benchmarks" / "paper_numbers.json").symlink_to(
      ROOT / "benchmarks" / "paper_numbers.json")
  for name, data in results.items():
    (tmp_path / "benchmarks" / "results" / name).write_text(json.dumps(data))
  (tmp_path / "notebooks").mkdir()
  monkeypatch.chdir(tmp_path / "notebooks")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.delenv("GALORE_JAX_SAVE_FIGURES", raising=False)
  monkeypatch.setattr(sys, "path", list(sys.path))  # the notebook puts its ROOT first
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(plt, "show", lambda *a, **k: None)
  nb = nbformat.read(ROOT / "notebooks" / "paper_figures.ipynb", as_version=4)
  namespace, before = {}, set(plt.get_fignums())
  for cell in (c for c in nb.cells if c.cell_type == "code"):  # as the kernel would, in order
    code = compile(cell.source, "paper_figures.ipynb", "exec")
    exec(code, namespace)  # pylint: disable=exec-used
  namespace["AXES"] = {ax.get_title(): ax for n in sorted(set(plt.get_fignums()) - before)
                       for ax in plt.figure(n).axes}
  plt.close("all")
  return namespace


def test_paper_figures_draw_each_memory_row_under_its_method(tmp_path, monkeypatch):
  """The memory runs of gpu_session.sh (memory_1b_gpu.json, ...) are drawn; an SLTrain row is
  drawn as SLTrain's, never as the dense model's row of the same optimizer (GaLore Table 11's
  tokens/s beside ours is the dense model's: 1000 here, not SLTrain's 5000)."""
  row = {"model": "1b", "optimizer": "adamw", "per_layer": False, "optimizer_state_bytes": 1,
         "step_memory_bytes": 1, "model_flops_per_token": 1, "mfu": None}
  rows = [{**row, "method": "full", "peak_memory_bytes": 10 * 2**30, "tokens_per_s": 1000.0},
          {**row, "method": "sltrain", "peak_memory_bytes": 3 * 2**30, "tokens_per_s": 5000.0}]
  ns = _paper_figures_on({"memory_1b_gpu.json": {"benchmark": "memory", "device": "H100",
                                                  "rows": rows}}, tmp_path, monkeypatch)
  speed = [ax for title, ax in ns["AXES"].items() if title.startswith("tokens/s: the paper's")]
  assert [p.get_width() for p in speed[0].patches if p.get_hatch() == "//"] == [1000.0]
  memory = ns["MEMORY_ROWS"]
  assert {(r["method"], r["peak_memory_bytes"] // 2**30) for r in memory} == {
      ("full", 10), ("sltrain", 3)}


def test_paper_figures_put_each_table6_number_on_its_methods_bar(tmp_path, monkeypatch):
  """GaLore Table 6's optimizer-state estimates sit on the bar of the method they are of
  (adamw, galore_adamw) at their model size, not between the bars of other optimizers."""
  import json  # pylint: disable=import-outside-toplevel
  ax = _paper_figures_on({}, tmp_path, monkeypatch)["AXES"][
      "closed form (gj.memory.estimate), not measured"]
  bars = {c.get_label(): [p.get_x() + p.get_width() / 2 for p in c] for c in ax.containers}
  sizes = ["60m", "130m", "350m", "1b", "7b"]
  want = sorted((bars[p["method"]][sizes.index(p["model"])], p["optimizer_state_gb"])
                for p in json.loads((ROOT / "benchmarks" / "paper_numbers.json").read_text())[
                    "memory_estimate_gb"] if p.get("optimizer_state_gb"))
  drawn = sorted((float(x), float(y)) for line in ax.get_lines() if line.get_marker() == "_"
                 for x, y in zip(line.get_xdata(), line.get_ydata()))
  assert len(want) == 8 and len(drawn) == 8
  np.testing.assert_allclose(drawn, want)


def test_paper_figures_keep_each_refresh_bar_in_its_row(tmp_path, monkeypatch):
  """Refresh results of three models (issue 18's 60m files beside 350m's and 1b's): each bar
  stays inside the row of its label, no two overlap, and galore-torch's bar has its model's
  colour (it had room for two models: a third's bars slid into the next row)."""
  def result(model, part, rows):
    return {"benchmark": "refresh", "model": model, "device": "H100",
            part: {"results": rows}}
  train = {"optax.adamw": {"vs_optax_adamw": 1.0, "normal_step_s": 1.0, "refresh_step_s": 1.0},
           "galore_torch.GaLoreAdamW": {"vs_optax_adamw": 0.5, "normal_step_s": 1.0,
                                        "refresh_step_s": 3.0}}
  files = {f"refresh_{m}_gpu_{part}.json": result(m, part, rows) for m in ("60m", "350m", "1b")
           for part, rows in (("update", {"galore_adamw[power]": {"refresh_only_s": 0.1},
                                          "galore_adamw[svd]": {"refresh_only_s": 9.0}}),
                              ("train", train))}
  axes = _paper_figures_on(files, tmp_path, monkeypatch)["AXES"]
  for title in ("ours: refresh cost per method (refresh.py)",
                "ours: throughput with the refresh amortized"):
    ax = axes[title]
    bars = sorted((p.get_y(), p.get_y() + p.get_height(), p.get_facecolor(), p.get_hatch())
                  for p in ax.patches)
    assert len(bars) == 9 if "refresh cost" in title else len(bars) == 6
    for (lo, hi, *_), (next_lo, *_) in zip(bars, bars[1:]):
      assert hi <= next_lo + 1e-9  # no overlap
    for lo, hi, *_ in bars:
      assert round(lo) == round(hi) and abs((lo + hi) / 2 - round(lo)) < 0.5  # in its row
  by_row = {}
  for lo, hi, colour, hatch in sorted((p.get_y(), p.get_y() + p.get_height(), p.get_facecolor(),
                                       p.get_hatch()) for p in axes[
                                           "ours: refresh cost per method (refresh.py)"].patches):
    by_row.setdefault(round((lo + hi) / 2), []).append((colour, hatch))
  first, *_, torch_row = [by_row[k] for k in sorted(by_row)]
  assert [c for c, _ in torch_row] == [c for c, _ in first] and {h for _, h in torch_row} == {"//"}

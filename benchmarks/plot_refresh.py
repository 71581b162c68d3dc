r"""Plot what ``benchmarks/refresh.py`` measured: refresh cost and amortized throughput.

Reads one or more of its JSON files for one model and device (the GPU commands split the
work over several files; their rows are merged) and draws up to two panels into a PNG:

* ``update`` part: seconds a whole-model refresh adds to an optimizer update
  (``refresh_step_s - normal_step_s``), per basis method and for optax.contrib.galore, on a
  log scale;
* ``train`` part: effective tokens/s with the refresh amortized over ``T`` steps, relative to
  ``optax.adamw`` measured in the same run, with issue 4's 0.97 target drawn; under
  ``--staggered`` the worst single step relative to a normal one is written on the bar.

Ratios are only taken within one run: each train row is divided by the optax.adamw of its own
file (every train run times one); a label found in several files keeps its first row.

Usage::

  python -m benchmarks.plot_refresh benchmarks/results/refresh_1b_gpu*.json \
      --out benchmarks/results/refresh_1b_gpu.png

Example (as a library):

  >>> rows = merge([{"model": "60m", "platform": "cpu", "update": {"results": {
  ...     "galore_adamw[svd]": {"normal_step_s": 0.1, "refresh_step_s": 3.1}}}}], "update")
  >>> rows
  {'galore_adamw[svd]': {'normal_step_s': 0.1, 'refresh_step_s': 3.1}}
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

from examples.llama import plot as plot_lib

TARGET_VS_ADAMW = 0.97  # issue 4: effective throughput at T = 200 vs optax.adamw


def load(paths: Sequence[pathlib.Path]) -> list[dict]:
  """The results of ``refresh.py`` files, checked to be of one model on one platform, and of
  one run's settings (device, rank, T, dtype: the figure's title and labels are one run's)."""
  results = [plot_lib.read_result(path, "refresh") for path in paths]
  kinds = {(r.get("model"), r.get("platform")) for r in results}
  if len(kinds) > 1:
    raise SystemExit(f"files of several models / platforms {sorted(kinds)}: plot one at a time")
  for key in ("device", "rank", "update_proj_gap", "dtype"):
    if len(values := {repr(r.get(key)) for r in results}) > 1:
      raise SystemExit(f"files of several runs (their {key} differs: {sorted(values)}): plot"
                       " one at a time")
  return results


def merge(results: Sequence[dict], part: str) -> dict[str, dict]:
  """``{label: row}`` of ``part`` over the files; a label found in several keeps its first."""
  rows: dict[str, dict] = {}
  for result in results:
    for label, row in result.get(part, {}).get("results", {}).items():
      rows.setdefault(label, row)
  return rows


def _train_rows(results: Sequence[dict]) -> dict[str, dict]:
  """Train rows relative to the optax.adamw of their own file (files without one are left
  out: their ratios would mix runs)."""
  rows = {}
  for result in results:
    train = result.get("train", {}).get("results", {})
    if "optax.adamw" not in train:
      continue
    base = train["optax.adamw"]["effective_tokens_per_s"]
    for label, row in train.items():
      rows.setdefault(label, {**row, "vs_adamw": row["effective_tokens_per_s"] / base})
  return rows


def plot(results: Sequence[dict], out: pathlib.Path):
  """Draw the panels that the results have; returns the figure."""
  plt = plot_lib.pyplot()
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  update = {label: row["refresh_step_s"] - row["normal_step_s"]
            for label, row in merge(results, "update").items() if "refresh_step_s" in row}
  train = _train_rows(results)
  panels = [p for p, rows in (("update", update), ("train", train)) if rows]
  if not panels:
    raise SystemExit("no update or train results in these files")
  first = results[0]
  fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 0.45 * max(
      len(update), len(train)) + 1.8), squeeze=False)
  for ax, panel in zip(axes[0], panels):
    if panel == "update":
      labels = list(update)
      ax.barh(labels, [update[k] for k in labels], color="tab:blue")
      ax.set_xscale("log")
      ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
      ax.xaxis.set_minor_formatter(ticker.NullFormatter())
      ax.set_xlim(min(update.values()) / 2, max(update.values()) * 4)  # room for the labels
      ax.set_xlabel("seconds a whole-model refresh adds to tx.update (fp32)")
      for y, k in enumerate(labels):
        ax.annotate(f" {update[k]:.3g} s", (update[k], y), va="center", fontsize=8)
    else:
      labels = list(train)
      ratios = [train[k]["vs_adamw"] for k in labels]
      ax.barh(labels, ratios, color=["tab:orange" if "torch" in k else "tab:green"
                                     for k in labels])
      ax.axvline(TARGET_VS_ADAMW, color="k", ls="--", lw=1)
      ax.annotate(f"target {TARGET_VS_ADAMW} ", (TARGET_VS_ADAMW, 1.0), ha="right", va="bottom",
                  xycoords=("data", "axes fraction"), fontsize=8)
      ax.set_xlim(0, max(ratios) * 1.45)
      ax.set_xlabel(f"effective tokens/s vs optax.adamw\n(refresh amortized over "
                    f"T = {first['update_proj_gap']} steps)")
      for y, k in enumerate(labels):
        worst = train[k]["refresh_step_s"] / train[k]["normal_step_s"]
        note = f"  worst step {worst:.2f}x" if "staggered" in k else ""
        ax.annotate(f" {ratios[y]:.3f}{note}", (ratios[y], y), va="center", fontsize=8)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
  fig.suptitle(f"LLaMA-{first['model']} refresh, rank {first['rank']}, on {first['device']} "
               f"(jax {first['jax']})")
  return plot_lib.save(fig, out)


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
  """The command line: plots the given refresh.py results to --out; returns its path."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  p.add_argument("files", nargs="+", type=pathlib.Path, help="refresh.py JSON results")
  p.add_argument("--out", type=pathlib.Path, required=True, help="PNG to write")
  args = p.parse_args(argv)
  plot(load(args.files), args.out)
  print(f"wrote {args.out}")
  return args.out


if __name__ == "__main__":
  main()

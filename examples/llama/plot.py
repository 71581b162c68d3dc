r"""Plot the curves of LLaMA pretraining runs side by side.

Reads the ``metrics.jsonl`` that ``train.py`` writes and draws, for every run, training loss
and validation perplexity against tokens seen and device throughput (tokens/s, the median of
each log window) against step, into one PNG. A directory holding several runs (what
``--optimizer adamw,galore_adamw`` writes: one subdirectory per optimizer) gives one curve
per optimizer; several directories can be named at once.

Usage::

  python examples/llama/plot.py runs/quickstart                # -> runs/quickstart/curves.png
  python examples/llama/plot.py runs/a runs/b --out cmp.png --title "60m, rank 128"

Example (as a library):

  >>> import json, pathlib, tempfile
  >>> from examples.llama import plot
  >>> d = pathlib.Path(tempfile.mkdtemp())
  >>> _ = (d / "config.json").write_text(json.dumps({"optimizer": "adamw"}))
  >>> _ = (d / "metrics.jsonl").write_text(json.dumps(
  ...     {"step": 1, "tokens": 64, "loss": 5.0, "tokens_per_s": 10.0}) + "\n")
  >>> runs = plot.find_runs([d])
  >>> [(name, rows[0]["loss"]) for name, rows in runs.items()]
  [('adamw', 5.0)]
  >>> fig = plot.plot(runs, d / "curves.png")
  >>> (d / "curves.png").is_file()
  True
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Sequence


def _name(run_dir: pathlib.Path) -> str:
  """The run's optimizer from its config.json, else the directory's name."""
  try:
    return json.loads((run_dir / "config.json").read_text())["optimizer"]
  except (OSError, ValueError, KeyError):
    return run_dir.name


def _read(path: pathlib.Path) -> list[dict]:
  rows = []
  for i, line in enumerate(path.read_text().splitlines(), 1):
    if line.strip():
      try:
        row = json.loads(line)
      except ValueError as e:
        raise ValueError(f"{path}:{i}: not a JSON line ({e})") from None
      if not isinstance(row, dict):  # the panels look its keys up
        raise ValueError(f"{path}:{i}: not a JSON object (got {line.strip()[:40]})")
      rows.append(row)
  return rows


def find_runs(paths: Sequence[pathlib.Path]) -> dict[str, list[dict]]:
  """``{label: metrics rows}`` of every run under ``paths`` (a run directory holds a
  ``metrics.jsonl``; a comparison directory holds run directories one level down).

  Labels are the optimizer names; where two runs share one, the directory is prefixed.
  """
  found: list[pathlib.Path] = []
  for path in map(pathlib.Path, paths):
    if not path.is_dir():
      raise FileNotFoundError(f"{path}: no such run directory")
    runs = ([path] if (path / "metrics.jsonl").is_file() else
            sorted(p for p in path.iterdir() if (p / "metrics.jsonl").is_file()))
    if not runs:
      raise FileNotFoundError(f"{path}: no metrics.jsonl in it or in its subdirectories")
    found += runs
  names = [_name(r) for r in found]
  labels = [f"{r.parent.name}/{n}" if names.count(n) > 1 else n for r, n in zip(found, names)]
  if len(set(labels)) < len(labels):  # still ambiguous: the full paths
    labels = [str(r) for r in found]
  return {label: _read(r / "metrics.jsonl") for label, r in zip(labels, found)}


def pyplot():
  """``matplotlib.pyplot`` on the file-only Agg backend (no display needed), or a clear
  error where matplotlib is missing."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit(f"plotting needs matplotlib (pip install matplotlib): {e}") from None
  return plt


def save(fig, out: pathlib.Path):
  """Write ``fig`` to ``out`` (its directory made), free it and return it; ``SystemExit``
  naming ``out`` where it cannot be written (a file on its way, a directory of its name) or
  is no PNG path (matplotlib would write ``out.png`` for ``out``, or fail on ``out.txt``)."""
  if pathlib.Path(out).suffix.lower() != ".png":
    pyplot().close(fig)
    raise SystemExit(f"{out}: not a .png path (the figure is written as a PNG)")
  fig.tight_layout()
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
  except OSError as e:
    raise SystemExit(f"{out}: cannot write ({e.strerror or e})") from None
  finally:
    pyplot().close(fig)
  return fig


def read_result(path: pathlib.Path, benchmark: str) -> dict:
  """The JSON result that ``benchmarks/<benchmark>.py`` wrote at ``path``, or a clear
  ``SystemExit`` naming the file (unreadable, not JSON, another benchmark's)."""
  try:
    result = json.loads(pathlib.Path(path).read_text())
  except OSError as e:
    raise SystemExit(f"{path}: cannot read ({e.strerror})") from None
  except ValueError as e:
    raise SystemExit(f"{path}: not JSON ({e})") from None
  if not isinstance(result, dict) or result.get("benchmark") != benchmark:
    raise SystemExit(f"{path}: not a benchmarks/{benchmark}.py result")
  return result


def plot(runs: dict[str, list[dict]], out: pathlib.Path, title: str | None = None):
  """Three panels: train loss vs tokens, validation perplexity vs tokens (where evaluated),
  tokens/s vs step. Writes ``out`` (PNG) and returns the figure."""
  plt = pyplot()
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  fig, (ax_loss, ax_ppl, ax_speed) = plt.subplots(1, 3, figsize=(15, 4.2))
  for label, rows in runs.items():
    train = [r for r in rows if "loss" in r and "tokens" in r]
    ax_loss.plot([r["tokens"] for r in train], [r["loss"] for r in train], label=label)
    evals = [r for r in rows if "eval_ppl" in r]
    ax_ppl.plot([r["tokens"] for r in evals], [r["eval_ppl"] for r in evals], "o-", label=label)
    speed = [r for r in rows if "tokens_per_s" in r]
    ax_speed.plot([r["step"] for r in speed], [r["tokens_per_s"] for r in speed], label=label)
  for ax, ylabel, xlabel in ((ax_loss, "train loss", "tokens"),
                             (ax_ppl, "validation perplexity", "tokens"),
                             (ax_speed, "tokens/s (device step)", "step")):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.has_data():
      ax.legend()
  ax_ppl.set_yscale("log")  # from thousands at the start to tens: plain numbers as ticks
  plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
  ax_ppl.yaxis.set_major_formatter(plain)
  ax_ppl.yaxis.set_minor_formatter(plain)
  if title:
    fig.suptitle(title)
  return save(fig, out)


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
  """The command line: plots the runs' curves to --out (default: the first directory's
  curves.png); returns its path."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  p.add_argument("runs", nargs="+", type=pathlib.Path,
                 help="run directories (or directories of runs, e.g. a comparison's --out)")
  p.add_argument("--out", type=pathlib.Path, default=None,
                 help="PNG to write (default: curves.png in the first directory)")
  p.add_argument("--title", default=None, help="figure title")
  args = p.parse_args(argv)
  try:
    runs = find_runs(args.runs)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(str(e)) from None
  out = args.out or args.runs[0] / "curves.png"
  plot(runs, out, args.title)
  print(f"wrote {out} ({', '.join(runs)})")
  return out


if __name__ == "__main__":
  main()

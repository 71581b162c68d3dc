r"""Plot what ``benchmarks/sharding.py`` measured: state per device and refresh time vs N.

Reads its JSON (``summary``: layout -> optimizer -> device count -> figures) and draws two
panels: optimizer-state MiB held by one device, and the seconds of a refresh step, each
against the number of devices of the FSDP mesh, one line per (layout, optimizer).

Usage::

  python -m benchmarks.plot_sharding benchmarks/results/sharding_cpu.json \
      --out benchmarks/results/sharding_cpu.png

Example (as a library):

  >>> result = {"summary": {"unstacked": {"optax.contrib.galore": {
  ...     "1": {"state_bytes_per_device": 2**20}, "2": {"state_bytes_per_device": 2**20}}}}}
  >>> series(result, "state_bytes_per_device")
  {'unstacked / optax.contrib.galore': ([1, 2], [1048576, 1048576])}
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

from examples.llama import plot as plot_lib


def series(result: dict, key: str) -> dict[str, tuple[list[int], list[float]]]:
  """``{"layout / optimizer": (device counts, values of key)}`` where the key was measured."""
  out = {}
  for layout, optimizers in result["summary"].items():
    for name, by_count in optimizers.items():
      points = sorted((int(n), row[key]) for n, row in by_count.items()
                      if row.get(key) is not None)
      if points:
        out[f"{layout} / {name}"] = ([n for n, _ in points], [v for _, v in points])
  return out


def plot(result: dict, out: pathlib.Path):
  """Two panels, state MiB per device and refresh step seconds vs device count."""
  plt = plot_lib.pyplot()
  fig, (ax_bytes, ax_time) = plt.subplots(1, 2, figsize=(13, 4.5))
  for ax, key, scale, ylabel in (
      (ax_bytes, "state_bytes_per_device", 2**-20, "optimizer state per device (MiB)"),
      (ax_time, "refresh_step_s", 1.0, "refresh step (s)")):
    lines = series(result, key)
    for label, (counts, values) in lines.items():
      ax.plot(counts, [v * scale for v in values], marker="o", label=label,
              ls="--" if "contrib" in label else "-")
    counts = sorted({n for c, _ in lines.values() for n in c})
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.set_xlabel("devices (FSDP mesh)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if lines:
      ax.legend(fontsize=8)
  env = result.get("environment", {})
  fig.suptitle(f"LLaMA-{result.get('model')} sharded, rank {result.get('rank')}, on "
               f"{env.get('platform', '?')} (jax {env.get('jax', '?')})")
  return plot_lib.save(fig, out)


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
  """The command line: plots a sharding.py result to --out; returns its path."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  p.add_argument("file", type=pathlib.Path, help="sharding.py JSON result")
  p.add_argument("--out", type=pathlib.Path, required=True, help="PNG to write")
  args = p.parse_args(argv)
  result = plot_lib.read_result(args.file, "sharding")
  keys = ("state_bytes_per_device", "refresh_step_s")  # an empty one drew an empty figure
  if not (result.get("summary") and any(series(result, key) for key in keys)):
    raise SystemExit(f"{args.file}: not a benchmarks/sharding.py result with figures (no"
                     " summary, or one with nothing to draw)")
  plot(result, args.out)
  print(f"wrote {args.out}")
  return args.out


if __name__ == "__main__":
  main()

"""Memory and speed of one LLaMA training step per optimizer, with and without per-layer
updates: the GaLore paper's Table 11 (1B) and Fig. 1 / SLTrain Fig. 3 (7B) setup.

Each configuration trains a few steps of ``examples/llama/train.py`` in a process of its own
(so the device allocator's peak is its alone) at the paper's token batch of 256 (batch 1 x
256), with ``--remat``, pure bf16 and the config's full vocabulary (a BPE tokenizer trained
on the embedded corpus: the byte tokenizer would shrink the embedding).  Each row records
XLA's plan of the train step, the allocator's peak, the optimizer state and tokens/s, next to
the paper's figure where it gives one (its "GB" as printed: no paper states the unit).
GaLore's bases come from ``--basis-method power`` by default (the issue's measurement), whose
first basis is a randomized range finder: an exact SVD of a 7b model's gradients (``svd``)
takes minutes on a GPU (the whole 1b model's took 53.6 s on an H100), longer than a row's
timeout.

The configurations run headline first (``--order headline``, the default): per model, 8-bit
GaLore with per-layer updates (the paper's 22 GB 7B figure), then 8-bit Adam with per-layer
updates, then the rest; a run cut short by its budget keeps those.  The JSON and the table
list the rows in the usual order (method, optimizer, per-layer off then on), each with its
``run_index``.

``--methods full,sltrain`` also measures the example's ``--method sltrain`` (SLTrain:
``W = (alpha / r) BA + S``, the paper's rank and delta: 0.03, 0.05 at 7b) beside the dense
model, for issue 17's target: SLTrain's step memory below full-rank's (AdamW) at 60m and
350m.  With 8-bit Adam and per-layer updates it is SLTrain Fig. 3's "SLTrain8bit (per layer)"
row (7B: 18.3 GB), and with 8-bit GaLore projecting its factors (at the example's default
``--proj-rank``, 128 at 1b and 7b) a composition no paper measured.

Run (GPU, about 8 minutes):
  python -m benchmarks.memory --models 1b,7b --out benchmarks/results/memory_gpu.json
  python -m benchmarks.memory --models 60m,350m --optimizers adamw --methods full,sltrain \
      --per-layer off --out benchmarks/results/memory_sltrain_gpu.json
  python -m benchmarks.memory --models 1b,7b --optimizers adamw_8bit,galore_adamw_8bit \
      --methods sltrain --per-layer on --out benchmarks/results/memory_sltrain_8bit_gpu.json
CPU smoke run (what the tests run):
  python -m benchmarks.memory --models tiny --optimizers adamw,galore_adamw --dtype fp32 \\
      --tokenizer bytes --steps 2 --out /tmp/memory.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import subprocess
import sys
import tempfile

import benchmarks

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPTIMIZERS = ("adamw", "adamw_8bit", "galore_adamw", "galore_adamw_8bit")
METHODS = ("full", "sltrain")  # the example's --method: dense, or SLTrain's BA + S
# Run first, in this order (--order headline): (optimizer, per-layer) of the full model.
HEADLINE = (("galore_adamw_8bit", True), ("adamw_8bit", True))
RANKS = {"tiny": 16, "60m": 128, "350m": 256, "1b": 512, "7b": 1024}


# (method, optimizer) -> the papers' name of that row; the others have no published figure.
PAPER_ROWS = {**{("full", o): o for o in OPTIMIZERS}, ("sltrain", "adamw_8bit"): "sltrain_8bit"}


def paper_gb() -> dict:
  """(model, papers' row name, per-layer) -> the paper's memory in its "GB", from
  ``benchmarks/paper_numbers.json``: GaLore Table 11 (1B) and Fig. 1 (7B), then SLTrain Fig. 3
  for the rows GaLore does not print (8-bit Adam with per-layer updates at 7B, 8-bit SLTrain
  with per-layer updates) or gives only a bound of (7B BF16 Adam, ">= 58 GB": SLTrain measured
  67.4).

  Example:
    >>> paper_gb()[("7b", "sltrain_8bit", True)], paper_gb()[("1b", "galore_adamw_8bit", True)]
    (18.3, 5.63)
    >>> paper_gb()[("7b", "adamw", False)]
    67.4
  """
  numbers = json.loads((ROOT / "benchmarks" / "paper_numbers.json").read_text())["memory_gb"]
  order = {"galore_t11": 0, "galore_fig1": 0, "sltrain_fig3": 1}
  names = set(PAPER_ROWS.values())
  out = {}
  first = lambda n: ("bound" in n, order[n["source"]])  # a measured figure before a bound
  for n in sorted((n for n in numbers if n["source"] in order), key=first):
    if n["model"] in ("1b", "7b") and n["method"] in names:
      out.setdefault((n["model"], n["method"], n["per_layer"]), n["gb"])
  return out


def parse_args(argv=None) -> argparse.Namespace:
  """The command line, parsed; ``SystemExit`` on an unknown --methods name."""
  # train.py's choices, checked here rather than by every run (jax imports, no backend starts)
  from examples.llama import cli  # pylint: disable=import-outside-toplevel
  from galore_jax import subspace  # pylint: disable=import-outside-toplevel
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="1b,7b", help="comma list of example configs")
  p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma list")
  p.add_argument("--methods", default="full",
                 help="comma list of the example's --method: full, sltrain")
  p.add_argument("--per-layer", default="both", choices=["both", "on", "off"])
  p.add_argument("--order", default="headline", choices=["headline", "table"],
                 help="headline: per model, 8-bit GaLore then 8-bit Adam with per-layer"
                      " updates first; table: the table's order")
  p.add_argument("--steps", type=cli.POSITIVE, default=6,
                 help="steps per run (tokens/s: their median)")
  p.add_argument("--dtype", default="bf16", choices=sorted(cli.DTYPES))
  p.add_argument("--tokenizer", default="bpe", help="bpe keeps the config's vocabulary")
  p.add_argument("--timeout", type=cli.POSITIVE, default=240, help="seconds per run")
  p.add_argument("--basis-method", default="power", choices=sorted(subspace.METHODS),
                 help="GaLore's bases (the example's --basis-method): power, matmuls only;"
                      " svd takes an exact SVD, minutes at 7b on a GPU")
  p.add_argument("--out", type=pathlib.Path, required=True, help="the JSON file to write")
  args = p.parse_args(argv)
  benchmarks.comma_list(p, "--methods", args.methods, known=METHODS)
  benchmarks.comma_list(p, "--optimizers", args.optimizers, known=cli.OPTIMIZERS)  # train.py's
  benchmarks.comma_list(p, "--models", args.models, known=RANKS)
  benchmarks.check_out(args.out)
  return args


def configurations(args) -> list[tuple[str, str, str, bool]]:
  """``(model, method, optimizer, per_layer)`` in the table's order."""
  modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.per_layer]
  return [(model, method, optimizer, per_layer) for model in args.models.split(",")
          for method in args.methods.split(",") for optimizer in args.optimizers.split(",")
          for per_layer in modes]


def run_order(configs: list, order: str = "headline") -> list:
  """``configs`` in the order they run: as given (``table``), or per model the ``HEADLINE``
  rows of the full model first (``headline``).

  Example:
    >>> rows = [("7b", "full", o, p) for o in OPTIMIZERS for p in (False, True)]
    >>> [(o, p) for _, _, o, p in run_order(rows)][:3]
    [('galore_adamw_8bit', True), ('adamw_8bit', True), ('adamw', False)]
  """
  if order == "table":
    return list(configs)
  models = list(dict.fromkeys(c[0] for c in configs))
  rank = lambda c: next((i for i, h in enumerate(HEADLINE) if c[1:] == ("full", *h)),
                        len(HEADLINE))
  return sorted(configs, key=lambda c: (models.index(c[0]), rank(c)))  # stable: table order


def train_command(args, model: str, optimizer: str, per_layer: bool, out: pathlib.Path,
                  method: str = "full"):
  """The example's command line for one configuration."""
  cmd = [sys.executable, str(ROOT / "examples/llama/train.py"), "--model", model,
         "--optimizer", optimizer, "--rank", str(RANKS[model]), "--batch-size", "1",
         "--seq-len", "256", "--remat", "--dtype", args.dtype, "--tokenizer", args.tokenizer,
         "--steps", str(args.steps), "--log-every", "1", "--eval-every", "0",
         "--eval-tokens", "255", "--save-every", "0", "--max-docs", "2000",
         "--basis-method", args.basis_method, "--out", str(out)]
  return (cmd + (["--per-layer"] if per_layer else [])
          + (["--method", method] if method != "full" else []))


def run_one(args, config: tuple, workdir: pathlib.Path) -> dict:
  """One configuration's row: its summary.json figures, or the error that stopped it."""
  model, method, optimizer, per_layer = config
  out = workdir / f"{model}-{method}-{optimizer}-{'per_layer' if per_layer else 'whole'}"
  name = PAPER_ROWS.get((method, optimizer))
  paper = paper_gb().get((model, name, per_layer)) if name else None
  row = {"model": model, "method": method, "optimizer": optimizer, "per_layer": per_layer,
         "rank": RANKS[model], "paper_gb": paper}
  try:
    done = subprocess.run(train_command(args, model, optimizer, per_layer, out, method), cwd=ROOT,
                          capture_output=True, text=True, timeout=args.timeout, check=False)
  except subprocess.TimeoutExpired:
    return {**row, "error": f"timed out after {args.timeout} s"}
  if done.returncode != 0:
    lines = (done.stderr or done.stdout).strip().splitlines()
    return {**row, "error": lines[-1] if lines else f"exit code {done.returncode}"}
  summary = json.loads((out / "summary.json").read_text())
  keys = ("params", "optimizer_state_bytes", "step_memory_bytes", "peak_memory_bytes",
          "tokens_per_s", "model_flops_per_token", "mfu")
  return {**row, **{k: summary.get(k) for k in keys}}


def table(rows: list[dict]) -> str:
  """The rows as a markdown table (GiB = 2**30 bytes; the paper's figures as it prints them)."""
  gib = lambda b: "n/a" if b is None else f"{b / 2**30:.2f}"
  lines = ["| model | method | optimizer | per-layer | state GiB | step plan GiB | peak GiB |"
           " tokens/s | MFU | paper GB |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    first = f"| {r['model']} | {r.get('method', 'full')} | {r['optimizer']} | {r['per_layer']} |"
    if "error" in r:
      lines.append(f"{first} {r['error']} |")
      continue
    speed = "n/a" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
    mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"  # train.py's MFU
    lines.append(f"{first} "
                 f"{gib(r['optimizer_state_bytes'])} | {gib(r['step_memory_bytes'])} | "
                 f"{gib(r['peak_memory_bytes'])} | {speed} | {mfu} | {r['paper_gb'] or ''} |")
  return "\n".join(lines)


def write(args, argv, rows: list[dict], complete: bool) -> dict:
  """Write the JSON so far.  It is rewritten after each row, so a run stopped by a timeout
  keeps the rows it finished (``complete`` false).  The device is named only when complete:
  jax is imported after the runs, so that this process holds no device while they run."""
  result = {"benchmark": "memory", "complete": complete, "python": platform.python_version(),
            "command": "python -m benchmarks.memory " + " ".join(argv or sys.argv[1:]),
            "rows": rows}
  if complete:
    import jax  # pylint: disable=import-outside-toplevel
    result.update(device=jax.devices()[0].device_kind, jax=jax.__version__)
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(result, indent=2) + "\n")
  return result


def main(argv=None) -> dict:
  """Runs each configuration in a subprocess, rewriting --out after each; prints the table and
  returns the final result."""
  args = parse_args(argv)
  configs = configurations(args)
  done, rows = {}, []
  with tempfile.TemporaryDirectory() as tmp:
    for i, config in enumerate(run_order(configs, args.order)):
      done[config] = {**run_one(args, config, pathlib.Path(tmp)), "run_index": i}
      print(json.dumps(done[config]), flush=True)
      rows = [done[c] for c in configs if c in done]  # the table's order
      write(args, argv, rows, complete=False)
  result = write(args, argv, rows, complete=True)
  print(table(rows))
  return result


if __name__ == "__main__":
  main()

r"""Convergence: the seeds' comparison of GaLore with full-rank and low-rank baselines.

GaLore's Table 2 and SLTrain's Table 2 compare, at the same token budget per model
size, full-rank AdamW, GaLore, LoRA, ReLoRA, low-rank (W = BA) and SLTrain; here 8-bit GaLore
and LDAdam too (``METHODS``).  Every method trains the LLaMA example through its command line
(``python -m examples.llama.train``), each with the same data flags and seed, so every method
sees the same batches and tokens.  A method is only a set of train.py flags
(``--optimizer``, and ``--method lora|relora|lowrank|sltrain`` with ``--rank``,
``--lora-alpha``, ``--delta`` for the baselines), at its paper's learning rate
(``LEARNING_RATES``, cited); methods with the same flags but the optimizer (full, GaLore,
8-bit GaLore, LDAdam) run in one train.py process, which trains its ``--optimizer a,b,c`` list
on identical batches.  A process that fails (e.g. a ``--method`` this checkout lacks) marks
its methods failed and the rest go on.

Per run it records the validation perplexity against tokens (the curve), the final
perplexity, trainable parameters, weight + optimizer-state bytes, XLA's plan of one train
step, tokens/s, model FLOPs per token and MFU (train.py's summary.json and metrics.jsonl;
MFU is None where the device's peak is unknown, a CPU), into one JSON; and it draws
the seeds' panels (one per model size, one line per method: validation perplexity vs
tokens) and writes a markdown table.

CPU evidence (committed under ``benchmarks/results/convergence_9m_cpu``)::

  python -m benchmarks.convergence --sizes 9m --methods full,galore,galore8bit,ldadam \
      --tokens 100K --data debian-docs --tokenizer bytes --batch-size 8 --seq-len 128 \
      --evals 5 --eval-tokens 16K --dtype fp32 --out benchmarks/results/convergence_9m_cpu

GPU (pending; BENCHMARKS.md "Convergence"), 60m then 130m as time allows, the data prepared
once here (``python -m examples.llama.data.debian --download``) and carried (``runs/data``)::

  python -m benchmarks.convergence --sizes 60m --methods full,galore,galore8bit,ldadam \
      --tokens 15M --batch-size 128 --data debian-docs \
      --tokenizer runs/data/debian-docs/bpe-32000.json --extra "--attention cudnn" \
      --out $OUT/convergence_60m_optimizers

Several JSONs (runs spread over several calls) into one figure and table::

  python -m benchmarks.convergence --merge a.json b.json --out benchmarks/results/convergence_gpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time

import benchmarks
from examples.llama import cli
from examples.llama import model as model_lib
from examples.llama import outputs
from examples.llama import plot as plot_lib
from examples.llama.optimizers import DEFAULT_LR, default_rank


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the seeds' tables: train.py's optimizer and flags, and its learning rate."""

  label: str
  optimizer: str
  flags: tuple[str, ...] = ()  # besides --optimizer, --lr and the shared ones (shared_flags)
  uses_rank: bool = True  # trains at --rank (full-rank AdamW does not)


# The seeds' learning rates (peak; warmup 10%, cosine to 10%): name -> (lr, where it is from).
LEARNING_RATES = {
    "full": (1e-3, "galore.md 2.4: full-rank training 'usually needs <= 0.001' (GaLore's tuned"
                   " baseline lrs are not published); LDAdam's AdamW baseline (ldadam-sltrain.md"
                   " 1.6)"),
    "galore": (1e-2, "galore.md 2.4: lr 0.01 at every size 60M-1B, scale 0.25, T 200"),
    "galore8bit": (1e-2, "galore.md 2.6-2.7: 8-bit GaLore = GaLore with 8-bit Adam, GaLore's lr"),
    "ldadam": (1e-3, "ldadam-sltrain.md 1.6: lr 1e-3, betas (0.908, 0.99), rho 0.908"),
    "lora": (1e-3, "not published (galore.md 2.4, GaLore issue #68: the baselines' tuned lrs"
                   " were not released); the full-rank lr, alpha 32, dropout 0.05 (galore.md 2.5)"),
    "relora": (1e-3, "not published (galore.md 2.4, issue #68); the full-rank lr; no full-rank"
                     " warm-up (galore.md 2.5)"),
    "lowrank": (1e-3, "not published (galore.md 2.4, issue #68); the full-rank lr"),
    "sltrain": (3e-3, "ldadam-sltrain.md 2.6: lr 3e-3 at every size, delta 0.03, alpha per size"),
    "fira": (1e-2, "frontier.md 2: the GaLore protocol (lr 0.01, scale 0.25, T 200)"),
    "apollo": (1e-2, "frontier.md 3: the GaLore protocol's lr, alpha 1, random projection"),
    "apollo_mini": (1e-2, "frontier.md 3: rank 1, alpha sqrt(128); Table 2 also reports 0.02"),
}
# GaLore Table 2's rank per size (galore.md 2.4 / 2.5; SLTrain uses the same, 2.6); other sizes
# take the example's default_rank for galore_adamw, the same for every method.
PAPER_RANKS = {"60m": 128, "130m": 256, "350m": 256, "1b": 512}
LORA_ALPHA = f"{model_lib.LORA_ALPHA:g}"  # LoRA / ReLoRA (galore.md 2.5), the example's: "32"

METHODS = {
    "full": Method("Full-Rank (AdamW)", "adamw", uses_rank=False),
    "galore": Method("GaLore", "galore_adamw"),
    "galore8bit": Method("8-bit GaLore", "galore_adamw_8bit"),
    "ldadam": Method("LDAdam", "ldadamw"),
    "lora": Method("LoRA", "adamw", ("--method", "lora", "--lora-alpha", LORA_ALPHA)),
    "relora": Method("ReLoRA", "adamw", ("--method", "relora", "--lora-alpha", LORA_ALPHA)),
    "lowrank": Method("Low-Rank", "adamw", ("--method", "lowrank")),
    "sltrain": Method("SLTrain", "adamw", ("--method", "sltrain", "--delta", "0.03")),
    "fira": Method("Fira", "fira_adamw"),
    # After the shared flags, so these scales win over GaLore's 0.25 (frontier.md 3).
    "apollo": Method("APOLLO", "apollo_adamw", ("--galore-scale", "1")),
    "apollo_mini": Method("APOLLO-Mini", "apollo_mini", ("--galore-scale", f"{128 ** 0.5!r}")),
}


def rank_of(size: str) -> int:
  """The rank every low-rank method trains at on ``size``."""
  return PAPER_RANKS.get(size) or default_rank(model_lib.CONFIGS[size], "galore_adamw")


def shared_flags(size: str) -> list[str]:
  """The settings every method of ``size`` gets; each is read only by the methods it
  concerns (AdamW ignores the rank): GaLore's scale 0.25 and gap T 200 (galore.md 2.4),
  LDAdam's rho 0.908 (ldadam-sltrain.md 1.6), and one rank for every low-rank method."""
  return ["--rank", str(rank_of(size)), "--galore-scale", "0.25", "--update-proj-gap", "200",
          "--rho", "0.908"]


def method_flags(name: str, size: str, lr_override: dict[str, float]) -> list[str]:
  """train.py's flags of method ``name`` on ``size`` besides --optimizer and the shared ones;
  --lr only where it is not already train.py's default for the optimizer, so that methods
  that differ only in the optimizer share a process."""
  m = METHODS[name]
  flags = list(m.flags)
  if name == "sltrain":  # (the example's default: spelled out in the JSON's commands)
    flags += ["--lora-alpha", f"{model_lib.method_alpha(model_lib.CONFIGS[size], name):g}"]
  lr = lr_override.get(name, LEARNING_RATES[name][0])
  if lr != DEFAULT_LR.get(m.optimizer):
    flags += ["--lr", f"{lr:g}"]
  return flags


def groups(methods: list[str], size: str, lr_override) -> list[tuple[list[str], list[str]]]:
  """The train.py processes of ``size``: (methods, their shared flags), in ``methods`` order;
  methods whose flags differ only in the optimizer share one."""
  out: dict[tuple, list[str]] = {}
  for name in methods:
    key = tuple(method_flags(name, size, lr_override))
    taken = {METHODS[n].optimizer for n in out.get(key, [])}
    while METHODS[name].optimizer in taken:  # the same optimizer twice: a process of its own
      key += ("",)
      taken = {METHODS[n].optimizer for n in out.get(key, [])}
    out.setdefault(key, []).append(name)
  return [(names, [f for f in key if f]) for key, names in out.items()]


def common_flags(args, size: str, steps: int) -> list[str]:
  """The flags every method of ``size`` shares: the same data, batches, seed and schedule."""
  every = max(1, steps // args.evals)
  return ["--model", size, "--data", args.data, "--tokenizer", args.tokenizer,
          "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
          "--steps", str(steps), "--seed", str(args.seed), "--eval-every", str(every),
          "--eval-tokens", str(args.eval_tokens), "--log-every", str(max(1, every // 2)),
          "--save-every", "0", "--dtype", args.dtype, *(["--pack"] if args.pack else []),
          *shared_flags(size), *shlex.split(args.extra)]


def read_run(out: pathlib.Path) -> dict:
  """A finished train.py run in ``out``: its curve and summary figures."""
  summary = json.loads((out / "summary.json").read_text())
  rows = outputs.read_metrics(out / "metrics.jsonl")
  weights = summary.get("weight_bytes")
  state = summary["optimizer_state_bytes"]
  return {
      "curve": [{"tokens": r["tokens"], "eval_loss": r["eval_loss"], "eval_ppl": r["eval_ppl"]}
                for r in rows if "eval_ppl" in r],
      "final_ppl": summary["eval_ppl"], "final_eval_loss": summary["eval_loss"],
      "eval_tokens": summary.get("eval_tokens"),
      "params": summary["params"], "trainable_params": summary.get("trainable_params"),
      "weight_bytes": weights, "optimizer_state_bytes": state,
      "weight_plus_state_bytes": None if weights is None else weights + state,
      "step_memory_bytes": summary.get("step_memory_bytes"),
      "tokens_per_s": summary.get("tokens_per_s"),
      "model_flops_per_token": summary.get("model_flops_per_token"), "mfu": summary.get("mfu"),
      "peak_lr": summary.get("peak_lr"),
  }


def failure(output: str, returncode: int) -> str | None:
  """Why a train.py process failed, in one line (its own error line where it printed one)."""
  if returncode == 0:
    return None
  lines = [l for l in output.strip().splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith("train.py: error:")]
  return (errors or lines or [f"exit code {returncode}"])[-1]


def run_group(args, size: str, names: list[str], flags: list[str], steps: int) -> dict:
  """One train.py process for ``names``; their results by method (an ``error`` if it
  failed)."""
  optimizers = [METHODS[n].optimizer for n in names]
  out = args.out / "runs" / size / "+".join(names)
  cmd = [sys.executable, "-m", "examples.llama.train", *common_flags(args, size, steps), *flags,
         "--optimizer", ",".join(optimizers), "--out", str(out), "--overwrite"]
  print(f"[{size}] {', '.join(names)}: {shlex.join(cmd[1:])}", flush=True)
  started, began = time.perf_counter(), time.time()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    why = failure(proc.stderr or proc.stdout, proc.returncode)
  except subprocess.TimeoutExpired:
    why = f"timed out after --timeout {args.timeout:g} s"
  wall = time.perf_counter() - started
  results = {}
  for name, opt in zip(names, optimizers):
    base = {"method": METHODS[name].label, "optimizer": opt, "flags": flags,
            "lr": args.lr.get(name, LEARNING_RATES[name][0]), "lr_source": LEARNING_RATES[name][1],
            "rank": rank_of(size) if METHODS[name].uses_rank else None,
            "command": shlex.join(["python", *cmd[1:]]), "process_wall_s": wall}
    run_dir = out / opt if len(names) > 1 else out
    # (--overwrite clears an earlier run only once this one can start: a process refused
    # before leaves its summary, which is no result of this one)
    summary = run_dir / "summary.json"
    if not (summary.is_file() and summary.stat().st_mtime >= began - 1):
      results[name] = {**base, "error": why or "no summary.json"}
      print(f"  {name}: FAILED: {results[name]['error']}", flush=True)
    else:
      results[name] = {**base, **read_run(run_dir)}
      print(f"  {name}: val ppl {outputs.format_ppl(results[name]['final_ppl'])}", flush=True)
  return results


def _mib(b):
  return "n/a" if b is None else f"{b / 2**20:,.1f} MiB"


def table(runs: dict[str, dict[str, dict]]) -> str:
  """The markdown table: one row per size and method."""
  lines = ["| size | method | optimizer | peak lr | val ppl | vs full | trainable params |"
           " weights + opt. state | step memory (XLA plan) | tokens/s | MFU |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for size, rows in runs.items():
    full = rows.get("full", {}).get("final_ppl")
    for name, r in rows.items():
      if "error" in r:
        lines.append(f"| {size} | {r['method']} | {r['optimizer']} | {r['lr']:g} | failed: "
                     f"{r['error'][:80]} | | | | | | |")
        continue
      vs = ""
      if full and name != "full":
        # (a ratio only to a full-rank run on the same tokens: --merge stamps each run)
        other = [k for k in TRAINED_ON if r.get(k) != rows["full"].get(k)]
        vs = f"other {other[0]}" if other else f"{100 * (r['final_ppl'] / full - 1):+.1f}%"
      trainable = r["trainable_params"] or r["params"]
      tps = "n/a" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
      mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"  # train.py's MFU
      lines.append(f"| {size} | {r['method']} | {r['optimizer']} | {r['lr']:g} | "
                   f"{outputs.format_ppl(r['final_ppl'])} | {vs} | {trainable / 1e6:.2f}M | "
                   f"{_mib(r['weight_plus_state_bytes'])} | {_mib(r['step_memory_bytes'])} | "
                   f"{tps} | {mfu} |")
  return "\n".join(lines) + "\n"


def figure(runs: dict[str, dict[str, dict]], out: pathlib.Path, title: str | None = None):
  """The seeds' panels: one per model size, validation perplexity vs tokens, a line per
  method."""
  plt = plot_lib.pyplot()
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  n = len(runs)
  cols = min(n, 2)
  nrows = math.ceil(n / cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 4.5 * nrows), squeeze=False)
  plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
  for ax, (size, rows) in zip(axes.flat, runs.items()):
    for r in rows.values():
      if r.get("curve"):
        ax.plot([p["tokens"] for p in r["curve"]], [p["eval_ppl"] for p in r["curve"]], "o-",
                ms=3, label=f"{r['method']} ({outputs.format_ppl(r['final_ppl'])})")
    ax.set(title=f"LLaMA-{size}", xlabel="training tokens", ylabel="validation perplexity",
           yscale="log")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.grid(alpha=0.3)
    if ax.has_data():
      ax.legend(fontsize=8)
  for ax in list(axes.flat)[n:]:
    ax.axis("off")
  if title:
    fig.suptitle(title)
  return plot_lib.save(fig, out)


def environment() -> dict:
  """Versions and the device; called after the runs, so that this process holds no device
  (a GPU's memory) while they train."""
  import flax  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  d = jax.devices()[0]
  return {"jax": jax.__version__, "optax": optax.__version__, "flax": flax.__version__,
          "platform": d.platform, "device_kind": d.device_kind,
          "python": platform.python_version(), "cpu_count": os.cpu_count()}


def write(result: dict, out: pathlib.Path, stem: str) -> pathlib.Path:
  """``<stem>.json``, ``<stem>.png`` (panels) and ``<stem>.md`` (table) in ``out``."""
  out.mkdir(parents=True, exist_ok=True)
  result["table"] = table(result["runs"])
  path = out / f"{stem}.json"
  outputs.write_atomically(path, json.dumps(result, indent=1) + "\n")
  (out / f"{stem}.md").write_text(result["table"])
  if any(r.get("curve") for rows in result["runs"].values() for r in rows.values()):
    figure(result["runs"], out / f"{stem}.png", result.get("title"))
  print(result["table"])
  return path


# What a run was trained on: kept by --merge where every input agrees, and on each run.
SHARED = ("data", "tokenizer", "tokens", "title")
TRAINED_ON = SHARED[:3]


def merge(paths: list[pathlib.Path], out: pathlib.Path) -> pathlib.Path:
  """Several results into one figure and table (later files win for a size and method).  The
  inputs' ``data``, ``tokenizer``, ``tokens`` and ``title`` are kept where they all agree,
  and each run carries its own file's ``data``, ``tokenizer`` and ``tokens`` (a perplexity
  per byte is not one per BPE token): the table compares a run with full rank's only where
  they agree, and a size whose runs differ is said in a line."""
  runs: dict[str, dict] = {}
  results = [plot_lib.read_result(p, "convergence") for p in paths]
  for result in results:
    for size, rows in result["runs"].items():
      runs.setdefault(size, {}).update(
          {name: {**r, **{k: result[k] for k in TRAINED_ON if k in result}}
           for name, r in rows.items()})
  for size, rows in runs.items():
    if len({tuple(r.get(k) for k in TRAINED_ON) for r in rows.values()}) > 1:
      print(f"warning: --merge: {size}: runs trained on other data, tokenizer or tokens; no"
            " 'vs full' ratio across them", file=sys.stderr)
  shared = {k: results[0][k] for k in SHARED
            if k in results[0] and all(r.get(k) == results[0][k] for r in results)}
  return write({"benchmark": "convergence", "merged": [str(p) for p in paths], **shared,
                "runs": runs}, out, "convergence")


def parse_lr(text: str) -> dict[str, float]:
  """'lora=2e-3,relora=2e-3' -> {'lora': 0.002, 'relora': 0.002}."""
  out = {}
  for item in filter(None, text.split(",")):
    name, _, value = item.partition("=")
    if name not in METHODS:
      raise argparse.ArgumentTypeError(f"--lr: unknown method {name!r} (choose from "
                                       f"{', '.join(METHODS)})")
    try:
      out[name] = float(value)
    except ValueError:
      raise argparse.ArgumentTypeError(f"--lr: {value!r} is not a number") from None
    if not (math.isfinite(out[name]) and out[name] > 0):  # (train.py refuses it, each run)
      raise argparse.ArgumentTypeError(f"--lr: {value!r} is not a finite number > 0")
  return out


def parse_args(argv=None):
  """The command line, parsed and checked: sizes and methods as lists; ``SystemExit`` on an
  unknown one."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  a = p.add_argument
  a("--sizes", default="9m", help="comma list of examples/llama model sizes (60m,130m: the seeds')")
  a("--methods", default=",".join(METHODS), help=f"comma list among {', '.join(METHODS)}")
  a("--tokens", type=cli.parse_count, default="2M",
    help="training tokens per run (the same for every method)")
  a("--batch-size", type=cli.POSITIVE, default=64,
    help="sequences per step (train.py --batch-size)")
  a("--seq-len", type=cli.POSITIVE, default=256)
  a("--data", default="default", help="train.py --data (debian-docs: the larger corpus)")
  a("--tokenizer", default="bpe", help="train.py --tokenizer")
  a("--pack", action=argparse.BooleanOptionalAction, default=True,
    help="pack documents (every token of the corpus trained on) or truncate/pad as the papers")
  a("--dtype", default="bf16", choices=sorted(cli.DTYPES),
    help="train.py --dtype (bf16: pure bf16, as the papers)")
  a("--evals", type=cli.POSITIVE, default=8, help="validation points along each run")
  a("--eval-tokens", default="100K", help="validation token budget")
  a("--seed", type=int, default=0)
  a("--lr", type=parse_lr, default={}, help="override the papers' lrs: 'lora=2e-3,...'")
  a("--extra", default="", help="more train.py flags for every run, e.g. '--attention cudnn'")
  a("--timeout", type=cli.POSITIVE_FLOAT, default=None, help="seconds per train.py process")
  a("--out", type=pathlib.Path, default=pathlib.Path("runs/convergence"))
  a("--merge", type=pathlib.Path, nargs="+", default=None,
    help="instead of training: merge these result JSONs into --out/convergence.{json,png,md}")
  args = p.parse_args(argv)
  args.sizes = [s for s in args.sizes.split(",") if s]
  args.methods = [m for m in args.methods.split(",") if m]
  for flag, given in (("--sizes", args.sizes), ("--methods", args.methods)):
    if not given and args.merge is None:  # (a result of no row would be written)
      p.error(f"{flag}: none given")
  for s in args.sizes:
    if s not in model_lib.CONFIGS:
      p.error(f"--sizes: unknown {s!r} (choose from {', '.join(model_lib.CONFIGS)})")
    if args.seq_len > model_lib.CONFIGS[s].max_seq_len:  # train.py refuses it in every run
      p.error(f"--seq-len {args.seq_len} exceeds {s}'s max_seq_len"
              f" {model_lib.CONFIGS[s].max_seq_len}")
  for m in args.methods:
    if m not in METHODS:
      p.error(f"--methods: unknown {m!r} (choose from {', '.join(METHODS)})")
  try:  # checked here, passed on as given (the runs' recorded commands keep it)
    cli.parse_count(args.eval_tokens)
  except argparse.ArgumentTypeError as e:
    p.error(f"--eval-tokens: {e}")
  benchmarks.check_out(args.out, directory=True)  # before hours of training, not after
  return args


def main(argv=None) -> dict:
  """Trains every method at every size (or, with --merge, merges result files) and writes
  --out's JSON, figure and table; returns the result."""
  args = parse_args(argv)
  if args.merge:
    return json.loads(merge(args.merge, args.out).read_text())
  tokens = args.tokens
  steps = max(1, math.ceil(tokens / (args.batch_size * args.seq_len)))
  started = time.perf_counter()
  runs = {}
  for size in args.sizes:
    runs[size] = {}
    for names, flags in groups(args.methods, size, args.lr):
      runs[size].update(run_group(args, size, names, flags, steps))
    runs[size] = {m: runs[size][m] for m in args.methods}
  result = {
      "benchmark": "convergence", "sizes": args.sizes, "methods": args.methods,
      "tokens": steps * args.batch_size * args.seq_len, "steps": steps,
      "batch_size": args.batch_size, "seq_len": args.seq_len, "data": args.data,
      "tokenizer": args.tokenizer, "pack": args.pack, "dtype": args.dtype, "seed": args.seed,
      "common_flags": {s: common_flags(args, s, steps) for s in args.sizes},
      "learning_rates": {m: {"lr": args.lr.get(m, lr), "source": src}
                         for m, (lr, src) in LEARNING_RATES.items() if m in args.methods},
      "environment": (env := environment()), "total_wall_s": time.perf_counter() - started,
      "title": f"{args.data}, {args.tokenizer} tokenizer,"
               f" {steps * args.batch_size * args.seq_len:,} tokens per run",
      "runs": runs,
  }
  stem = f"convergence_{'+'.join(args.sizes)}_{env['platform']}"
  write(result, args.out, stem)
  return result


if __name__ == "__main__":
  main()

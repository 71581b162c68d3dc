r"""Side by side, one GPU run: every optimizer on the same LLaMA configs, into one JSON.

For each model (default 350m and 1b, at refresh.py's rank and batch) and each optimizer that
exists here -- ``optax.adamw``, ``optax.contrib.galore``, ``galore_adamw`` (``power`` basis),
``ldadamw``, ``adamw_8bit``, ``galore_adamw_8bit``, the APOLLO / Fira aliases where the installed
galore_jax has them, and with ``--torch`` ``torch.optim.AdamW`` and galore-torch's ``GaLoreAdamW``
where torch imports -- it measures, with ``benchmarks/train_steps.py``'s timing code: the normal
train step, the refresh step, tokens/s with the refresh amortized over T = 200
(``tokens_per_step * T / ((T - 1) normal_s + refresh_s)``), the refresh time (refresh step minus
normal step), the step's memory (JAX: XLA's plan of the compiled step; torch: the allocator's
peak of its own steps), and MFU: model FLOPs per token (``flops.flops_per_token``) x effective
tokens/s / the device's dense bf16 peak (``examples/llama/flops.py``; none for an unknown device).

Each (model, framework) is a job in a process of its own with a timeout; a job writes each row
as soon as it is measured, so a timed-out job keeps its finished rows and names the others.
Optimizers run in the order of :func:`jax_optimizers`, ``optax.contrib.galore`` (its exact-SVD
refresh is a minute at 1b) last; with the default timeouts (2 x (190 + 80) s) the whole run stays
under 10 minutes, and a row a job did not reach says so in the table.

GPU (one H100 / H200; under 10 minutes, jobs capped by --timeouts; galore-torch travels as a
wheel, BENCHMARKS.md "GPU runs"):
  python -m benchmarks.compare --models 350m,1b --torch --out benchmarks/results/compare_gpu.json
then the headline table of BENCHMARKS.md, between its ``compare:begin`` / ``compare:end``
markers, from that JSON:
  python -m benchmarks.compare --table benchmarks/results/compare_gpu.json
Throughput and memory vs rank (LDAdam Fig. 3 style; labels ``galore_adamw@r<rank>``):
  python -m benchmarks.compare --models 350m --optimizers optax.adamw --ranks 64,128,256,512 \
      --out benchmarks/results/compare_rank_gpu.json
CPU smoke run (what the tests run):
  python -m benchmarks.compare --models tiny --optimizers optax.adamw,galore_adamw \
      --out /tmp/compare.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys

import benchmarks
from examples.llama import plot

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = "benchmarks/results/compare_gpu.json"
GPU_COMMAND = (f"python -m benchmarks.compare --models 350m,1b --torch --out {DEFAULT_OUT} && "
               f"python -m benchmarks.compare --table {DEFAULT_OUT}")
BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"
TORCH_LABELS = ("torch.optim.AdamW", "galore_torch.GaLoreAdamW")
PLANNED = "_planned"  # a job's first line: the labels it will time
# Every label jax_optimizers may give (but the rank sweep's name@r<rank>), in its order.
LABELS = ("optax.adamw", "galore_adamw", "ldadamw", "adamw_8bit", "galore_adamw_8bit",
          "apollo_adamw", "apollo_mini", "fira_adamw", "optax.adamw (unrolled)",
          "optax.contrib.galore (unrolled)")


def jax_optimizers(cfg, rank: int, T: int, notes: dict, ranks=(), skipped=None) -> dict:
  """label -> (make_tx, unrolled) for every optimizer this galore_jax has, the headline ones
  first (a job that runs out of time loses the last), and
  ``galore_adamw`` / ``ldadamw`` at each of ``ranks``."""
  import optax  # pylint: disable=import-outside-toplevel
  import galore_jax as gj  # pylint: disable=import-outside-toplevel
  from benchmarks import train_steps  # pylint: disable=import-outside-toplevel
  from examples.llama import model as model_lib  # pylint: disable=import-outside-toplevel

  skipped = {} if skipped is None else skipped
  plan = dict(mask=model_lib.galore_targets, dimension_numbers=model_lib.LAYER_KERNEL_DIMS)
  galore = dict(rank=rank, update_proj_gap=T, scale=0.25, method="power", **plan)
  common = dict(rank=rank, update_proj_gap=T, scale=0.25)
  makers = {
      "optax.adamw": lambda: optax.adamw(1e-3),
      "galore_adamw": lambda: gj.galore_adamw(1e-3, **galore),
      "ldadamw": lambda: gj.ldadamw(1e-3, rank=rank, **plan),
      "adamw_8bit": lambda: gj.adamw_8bit(1e-3),
      "galore_adamw_8bit": lambda: gj.galore_adamw_8bit(1e-3, **galore),
  }
  # The successors, where this galore_jax has them (issue 19's names), at rank r, period T.
  for name in ("apollo_adamw", "apollo_mini", "fira_adamw"):
    if hasattr(gj, name):
      kwargs = dict(plan, update_proj_gap=T, **({} if name == "apollo_mini" else {"rank": rank}))
      if name == "fira_adamw":  # Fira's bases as GaLore's: its default, an exact SVD, is slow
        kwargs["method"] = "power"
      try:  # building a transform allocates nothing: a signature we guessed wrong shows here
        getattr(gj, name)(1e-3, **kwargs)
      except (TypeError, ValueError) as e:
        skipped[name] = f"{type(e).__name__}: {e}"
        continue
      makers[name] = lambda name=name, kwargs=kwargs: getattr(gj, name)(1e-3, **kwargs)
  for r in ranks:  # a rank sweep (LDAdam Fig. 3 style): labels name@r<rank>
    makers[f"galore_adamw@r{r}"] = lambda r=r: gj.galore_adamw(1e-3, **{**galore, "rank": r})
    makers[f"ldadamw@r{r}"] = lambda r=r: gj.ldadamw(1e-3, rank=r, **plan)
  rows = {label: (make, False) for label, make in makers.items()}
  # contrib cannot take the scanned kernels: it and its baseline run on the unrolled model.
  rows["optax.adamw (unrolled)"] = (lambda: optax.adamw(1e-3), True)
  rows["optax.contrib.galore (unrolled)"] = (
      lambda: train_steps.contrib_galore_unrolled(cfg, common, notes), True)
  return rows


def run_job(args) -> None:
  """One (model, framework) job, in this process: appends a JSON line per row to --rows."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from benchmarks import refresh  # pylint: disable=import-outside-toplevel
  from benchmarks import train_steps  # pylint: disable=import-outside-toplevel

  cfg, rank, batch, seq = refresh.SIZES[args.job_model]
  args.batch_size, args.seq_len = args.batch_size or batch, args.seq_len or seq
  tokens_BxT = jax.random.randint(jax.random.key(0), (args.batch_size, args.seq_len), 0, cfg.V,
                                  jnp.int32)
  rows_file = pathlib.Path(args.rows)

  def write(label, row):
    with rows_file.open("a") as f:
      f.write(json.dumps({"label": label, "row": row}) + "\n")

  if args.job == "torch":
    write(PLANNED, {"planned": list(TORCH_LABELS)})
    train_steps.torch_train_rows(cfg, rank, args, tokens_BxT, on_row=write)
    return
  notes = {}
  ranks = [int(r) for r in args.ranks.split(",") if r]
  skipped = {}
  optimizers = jax_optimizers(cfg, rank, args.update_proj_gap, notes, ranks, skipped)
  for label, why in skipped.items():
    write(label, {"skipped": why})
  wanted = args.optimizers.split(",") if args.optimizers else list(optimizers)
  wanted += [label for label in optimizers if "@r" in label and label not in wanted]
  for label in wanted:
    if label not in optimizers:
      write(label, {"skipped": "not in this galore_jax / optax"})
  optimizers = {k: v for k, v in optimizers.items() if k in wanted}
  write(PLANNED, {"planned": list(optimizers)})
  train_steps.time_jax_optimizers(
      cfg, optimizers, args, tokens_BxT, memory=True, on_row=write,
      on_error=lambda label, e: write(label, {"skipped": f"{type(e).__name__}: {e}"[:300]}))
  for label, note in notes.items():
    write(label, {"note": note})


def job_command(args, model: str, framework: str, rows: pathlib.Path) -> list[str]:
  """The command line of one (model, framework) job: this script with --job, the parent's
  timing flags, rows appended to ``rows``."""
  cmd = [sys.executable, "-m", "benchmarks.compare", "--job", framework, "--job-model", model,
         "--rows", str(rows), "--update-proj-gap", str(args.update_proj_gap),
         "--train-steps", str(args.train_steps), "--refresh-repeats", str(args.refresh_repeats),
         "--dtype", args.dtype, "--attention", args.attention,
         "--unroll", "all" if args.unroll is True else str(args.unroll)]
  for flag, value in (("--optimizers", args.optimizers), ("--batch-size", args.batch_size),
                      ("--seq-len", args.seq_len), ("--ranks", args.ranks)):
    if value:
      cmd += [flag, str(value)]
  return cmd


def run_jobs(args, rows_dir: pathlib.Path) -> dict:
  """Each (model, framework) job in a subprocess with its timeout; the rows it wrote."""
  env = dict(os.environ)
  if args.torch:  # torch shares the GPU: JAX must not grab 75% of it up front
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  frameworks = ["jax"] + (["torch"] if args.torch else [])
  models = {}
  for model in args.models.split(","):
    out = models[model] = {"rows": {}, "skipped": {}, "notes": {}}
    for framework in frameworks:
      rows = rows_dir / f"{model}_{framework}.jsonl"
      timeout = args.timeouts[framework]
      try:
        done = subprocess.run(job_command(args, model, framework, rows), cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout, check=False)
        failed = done.returncode and ((done.stderr or done.stdout).strip().splitlines()
                                      or [f"exit code {done.returncode}"])[-1]
      except subprocess.TimeoutExpired:
        failed = f"not reached: the {framework} job timed out after {timeout} s"
      lines = rows.read_text().splitlines() if rows.exists() else []
      planned = list(TORCH_LABELS) if framework == "torch" else []
      for line in map(json.loads, lines):
        label, row = line["label"], line["row"]
        if label == PLANNED:
          planned = row["planned"]
          continue
        kind = "skipped" if "skipped" in row else "notes" if "note" in row else "rows"
        out[kind][label] = row.get("skipped", row.get("note", row))
      if failed:  # the labels the job did not reach (one that failed keeps its own reason)
        for label in planned or [f"({framework} job)"]:
          if label not in out["rows"] and label not in out["skipped"]:
            out["skipped"][label] = failed
      print(f"{model} {framework}: {failed or 'done'}", flush=True)
  return models


def versions() -> dict:
  """Versions of what the run used (None where a package is not installed)."""
  out = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "optax", "flax", "galore_jax", "torch", "transformers",
               "galore-torch"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def summarize(args, models: dict) -> dict:
  """The JSON: per model its rows with tokens/s (T-amortized), refresh time, memory, MFU."""
  import jax  # pylint: disable=import-outside-toplevel  (after the jobs: no device held)
  from benchmarks import refresh  # pylint: disable=import-outside-toplevel
  from benchmarks import train_steps  # pylint: disable=import-outside-toplevel
  from examples.llama import flops  # pylint: disable=import-outside-toplevel

  device = jax.devices()[0]
  peak = flops.peak_tflops(device.device_kind)
  for model, out in models.items():
    cfg, rank, batch, seq = refresh.SIZES[model]
    B, S = args.batch_size or batch, args.seq_len or seq
    train_steps.amortize(out["rows"], B * S, args.update_proj_gap)
    unrolled_ratios(out["rows"])
    fpt = flops.flops_per_token(cfg, S)
    for row in out["rows"].values():
      row["refresh_s"] = row["refresh_step_s"] - row["normal_step_s"]
      row.update(flops.mfu(fpt, row["effective_tokens_per_s"], device.device_kind))
    out.update(rank=rank, batch_size=B, seq_len=S, tokens_per_step=B * S, params=cfg.num_params(),
               flops_per_token=fpt)
  return {"benchmark": "compare",
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
          "device": device.device_kind, "platform": device.platform, "peak_tflops": peak,
          "versions": versions(), "update_proj_gap": args.update_proj_gap, "dtype": args.dtype,
          "attention": args.attention, "basis_method": "power", "unroll": args.unroll,
          "command": "python -m benchmarks.compare " + " ".join(args.argv), "models": models}


def unrolled_ratios(rows: dict) -> None:
  """The rows that ran on the unrolled model (optax.contrib.galore cannot take the scanned
  kernels) compared with ``optax.adamw (unrolled)``, not with the scanned AdamW (in place).

  Example:
    >>> rows = {"optax.adamw": {"effective_tokens_per_s": 100.0, "vs_optax_adamw": 1.0},
    ...         "optax.adamw (unrolled)": {"effective_tokens_per_s": 120.0},
    ...         "optax.contrib.galore (unrolled)": {"effective_tokens_per_s": 60.0}}
    >>> unrolled_ratios(rows)
    >>> rows["optax.contrib.galore (unrolled)"]["vs_optax_adamw"]
    0.5
  """
  base = rows.get("optax.adamw (unrolled)")
  for label, row in rows.items():
    if base and label.endswith("(unrolled)"):
      row["vs_optax_adamw"] = row["effective_tokens_per_s"] / base["effective_tokens_per_s"]


def loop_name(unroll) -> str:
  """How ``--unroll`` ran the model's layers, in words."""
  return "unrolled" if unroll is True else "scanned" if unroll == 1 else f"unrolled by {unroll}"


def headline_table(result: dict | None) -> str:
  """BENCHMARKS.md's headline block: the table of a compare.py result, or "GPU run pending"."""
  if result is None:
    return (f"**GPU run pending.** The table is generated from one GPU run of\n\n"
            f"    {GPU_COMMAND}\n\nand has not been run yet: no number here until it has.")
  v = result["versions"]
  lines = [
      f"{result['date']}, {result['device']} ({result['platform']}), jax {v['jax']}, optax "
      f"{v['optax']}, flax {v['flax']}, galore_jax {v['galore_jax']}, torch {v['torch']}, "
      f"galore-torch {v['galore-torch']}; T = {result['update_proj_gap']}, {result['dtype']}, "
      f"GaLore bases by `{result['basis_method']}`, layer loop "
      f"{loop_name(result.get('unroll', 1))}. Command: `{result['command']}`.", ""]
  for model, out in result["models"].items():
    lines += [f"**{model}** (rank {out['rank']}, batch {out['batch_size']} x {out['seq_len']}, "
              f"{out['flops_per_token'] / 1e9:.2f} GFLOP/token)", "",
              "| optimizer | tokens/s (T-amortized) | vs optax.adamw (unrolled rows: its unrolled"
              " row) | refresh s | step memory GiB (XLA's plan)"
              " | MFU |", "|---|---|---|---|---|---|"]
    for label, row in out["rows"].items():
      if "@r" in label:  # the rank sweep is drawn by notebooks/paper_figures.ipynb
        continue
      memory = row.get("step_memory_bytes")
      if memory:
        memory = f"{memory / 2**30:.2f}"
      elif row.get("peak_memory_bytes"):  # torch's rows: another measure, so named
        memory = f"{row['peak_memory_bytes'] / 2**30:.2f} (allocator peak)"
      ratio = row.get("vs_optax_adamw")
      cells = [f"{row['effective_tokens_per_s']:,.0f}", "n/a" if ratio is None else f"{ratio:.3f}",
               f"{row['refresh_s']:.3f}" if row["refresh_s"] > 1e-3 else "-", memory or "n/a",
               "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"]
      lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [f"| {label} | not measured: {why} | | | | |" for label, why in out["skipped"].items()]
    lines += [""] + [f"{label}: {note}" for label, note in out["notes"].items()]
    lines.append("")
  return "\n".join(lines).rstrip()


def write_table(result_path: pathlib.Path, markdown: pathlib.Path) -> str:
  """Replaces the block between BEGIN and END in ``markdown`` by the headline table
  (``result_path`` "pending": the pending block).  A result that cannot be read is one line
  and leaves ``markdown`` as it is (a mistyped path replaced a measured table)."""
  pending = str(result_path) == "pending"
  result = None if pending else plot.read_result(result_path, "compare")
  text = markdown.read_text()
  if BEGIN not in text or END not in text:
    raise SystemExit(f"{markdown}: no {BEGIN} ... {END} markers")
  head, rest = text.split(BEGIN, 1)
  block = headline_table(result)
  markdown.write_text(f"{head}{BEGIN}\n{block}\n{END}{rest.split(END, 1)[1]}")
  return block


def parse_args(argv=None) -> argparse.Namespace:
  """The command line, parsed; ``args.argv`` keeps it as given and ``args.unroll`` is parsed
  as the example's --unroll."""
  from examples.llama import cli  # pylint: disable=import-outside-toplevel  (jax: no device)
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  a = p.add_argument
  a("--models", default="350m,1b", help="comma list of refresh.py sizes")
  a("--optimizers", default="", help="comma list of labels (default: all that exist)")
  a("--ranks", default="", help="also galore_adamw and ldadamw at each of these ranks")
  a("--torch", action="store_true", help="also torch AdamW and galore-torch (a job per model)")
  a("--timeouts", default="jax=190,torch=80", help="seconds per job, per framework")
  a("--update-proj-gap", type=cli.POSITIVE, default=200,
    help="T: refresh period, for amortization")
  a("--train-steps", type=cli.POSITIVE, default=5, help="timed normal steps per optimizer")
  a("--refresh-repeats", type=cli.POSITIVE, default=1, help="timed refresh steps per optimizer")
  a("--batch-size", type=cli.POSITIVE, default=None, help="default: refresh.py's for the size")
  a("--seq-len", type=cli.POSITIVE, default=None, help="default: refresh.py's for the size")
  a("--dtype", default="bf16", choices=["bf16", "fp32"])
  a("--attention", default="auto", choices=["auto", "xla", "cudnn"])
  a("--unroll", default="1",
    help="the model's decoder layers per loop iteration, or 'all' (the example's --unroll)")
  a("--out", type=pathlib.Path, default=None, help="the JSON file to write")
  a("--table", type=pathlib.Path, default=None,
    help="regenerate --markdown's headline table from this JSON ('pending': the block that"
    " says the GPU run is pending)")
  a("--markdown", type=pathlib.Path, default=ROOT / "BENCHMARKS.md")
  a("--job", choices=["jax", "torch"], help=argparse.SUPPRESS)
  a("--job-model", help=argparse.SUPPRESS)
  a("--rows", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  args.budget_s = 5.0  # refresh.py: a call slower than this is timed once
  try:  # a framework not named keeps its default
    given = {k: int(v) for k, v in (kv.split("=") for kv in args.timeouts.split(","))}
  except ValueError:
    given = {"": 0}
  if set(given) - {"jax", "torch"} or min(given.values()) < 1:
    p.error(f"--timeouts: expected jax=SECONDS,torch=SECONDS (ints >= 1), got {args.timeouts!r}")
  args.timeouts = {"jax": 190, "torch": 80, **given}
  for r in filter(None, args.ranks.split(",")):
    try:
      cli.POSITIVE(r)
    except argparse.ArgumentTypeError as e:
      p.error(f"--ranks: {e}")
  from benchmarks import refresh  # pylint: disable=import-outside-toplevel
  benchmarks.comma_list(p, "--models", args.models, known=refresh.SIZES)
  if args.optimizers:  # (a job skips a known one this galore_jax lacks; a typo is refused)
    benchmarks.comma_list(p, "--optimizers", args.optimizers, known=LABELS)
  benchmarks.check_out(args.out)
  try:
    args.unroll = cli.parse_unroll(args.unroll)
  except argparse.ArgumentTypeError as e:
    raise SystemExit(f"--unroll: {e}") from None
  return args


def main(argv=None) -> dict | str:
  """Runs a job (--job), regenerates the table (--table, returns its block) or runs every job
  and writes --out (returns the JSON)."""
  args = parse_args(argv)
  if args.job:
    return run_job(args)
  if args.table:
    block = write_table(args.table, args.markdown)
    print(block)
    return block
  if args.out is None:
    raise SystemExit("--out is required (or --table)")
  # The jobs' rows, kept beside --out until the JSON is written: a run killed before the
  # summary (which needs the device, so it comes after every job) leaves what it measured.
  rows_dir = args.out.parent / f"{args.out.stem}_rows"
  shutil.rmtree(rows_dir, ignore_errors=True)  # (an earlier run's, killed)
  rows_dir.mkdir(parents=True)
  models = run_jobs(args, rows_dir)
  result = summarize(args, models)
  print(headline_table(result))
  write_json(args.out, result)
  shutil.rmtree(rows_dir)
  return result


def write_json(path: pathlib.Path, result: dict) -> dict:
  """Writes ``result`` as indented JSON to ``path`` (parents made); returns ``result``."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=2) + "\n")
  return result


if __name__ == "__main__":
  main()

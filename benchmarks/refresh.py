r"""Refresh cost of GaLore's basis methods at LLaMA shapes, and its effect on training speed.

Three parts, all in one process on one device (``--parts``):

* ``matrix``: one matrix at a time, fp32, the side ``proj_type="std"`` projects: every
  method of ``galore_jax.subspace.METHODS`` through ``subspace.compute_bases`` (warm path:
  a previous ``Bases`` with ``refreshes=1``), and ``jnp.linalg.svd`` alone for reference.
* ``update``: one jitted ``tx.update`` on the 7 x L projected matrices of the model, fp32,
  stacked per kind as ``(L, out, in)`` with L a batch axis (bases computed batched, as in the
  LLaMA example), on a refresh step (count 0) and on a normal step, for
  ``galore_adamw(method=...)``, ``optax.contrib.galore`` (on the L unstacked matrices) and
  ``optax.adamw``.
* ``train``: jitted train steps of the Flax LLaMA of ``examples/llama/model.py`` (random
  tokens), normal and refresh, for ``optax.adamw``, ``optax.contrib.galore``,
  ``galore_adamw`` with each method and, with ``--torch``, ``torch.optim.AdamW`` and
  ``galore_torch.GaLoreAdamW`` on a ``transformers.LlamaForCausalLM`` of the same size (sdpa
  attention). Effective tokens/s amortize the refresh over T = ``--update-proj-gap`` steps:
  ``tokens_per_step * T / ((T - 1) * normal_s + refresh_s)``. ``--unroll`` sets the model's
  loop over layers for every row (as the example's flag); the baseline ``adamw_other_loop``
  times ``optax.adamw`` with the other loop (scanned / unrolled), on the same params and
  batch, so the ratio between the two rows is what unrolling buys. With ``--staggered`` the
  train part also runs ``galore_adamw(refresh=gj.staggered(T))`` for the methods named: each
  step of a period on which one leaf refreshes is timed (``refresh_steps_s``), the worst is its
  ``refresh_step_s`` (issue 4's target: no step over 2x a normal step) and the period
  amortizes them all: ``tokens_per_step * T / ((T - k) * normal_s + sum(refresh_steps_s))``.
  With ``--host-refresh`` it also runs ``galore_adamw`` with the refresh decided on the host
  (``galore_refresh``, a static argument: a normal and a refresh executable, neither with the
  ``lax.cond`` that on a GPU syncs the host every step), labelled ``galore_adamw[<m>,host]``.

Times are medians after a warm-up call; a call slower than ``--budget-s`` is timed once. The
previous basis of a warm refresh is a stand-in (the first r columns of the identity).

CPU (tiny shapes; one OpenBLAS thread, else LAPACK calls can spin-wait on a busy CPU):
  OPENBLAS_NUM_THREADS=1 python -m benchmarks.refresh --model tiny --torch --out benchmarks/results
GPU (H100; split so that each command stays under 10 minutes; a JSON file per command):
  python -m benchmarks.refresh --model 350m --parts matrix,update --out benchmarks/results
  python -m benchmarks.refresh --model 350m --parts train --attention cudnn --torch \
      --staggered randomized,power --out benchmarks/results
  python -m benchmarks.refresh --model 1b --parts matrix,update --out benchmarks/results
  python -m benchmarks.refresh --model 1b --parts train --attention cudnn \
      --methods svd --out benchmarks/results
  python -m benchmarks.refresh --model 1b --parts train --attention cudnn --torch \
      --baselines none --methods gram_eigh,randomized,power,random --out benchmarks/results
  python -m benchmarks.refresh --model 1b --parts train --attention cudnn --baselines none \
      --methods power --staggered randomized,power --out benchmarks/results
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import flax
import optax

import benchmarks
import galore_jax as gj
from benchmarks import train_steps
from examples.llama import cli
from examples.llama import flops
from examples.llama import model as model_lib

CONFIGS = model_lib.CONFIGS
# name -> (model config, rank, batch size, sequence length). Shapes and ranks as in
# optimizer_step.py's MODELS (tiny: its 128 x 352 x 2 layers on a 512-token vocab); batch
# sizes as in reference/anchors-h100.md.
SIZES = {
    "tiny": (dataclasses.replace(CONFIGS["9m"], name="tiny", L=2, V=512), 32, 4, 64),
    "60m": (CONFIGS["60m"], 128, 128, 256),
    "350m": (CONFIGS["350m"], 256, 64, 256),
    "1b": (CONFIGS["1b"], 512, 32, 256),
}
PARTS = ("matrix", "update", "train")
LAYER_DIMS = gj.DimensionNumbers(reduction_axis=2, output_axis=1)  # (L, out, in)


def matrix_shapes(cfg) -> dict[str, tuple[int, int]]:
  """The projected matrices of one layer, torch layout (out, in)."""
  D, F = cfg.D, cfg.F
  return {"q": (D, D), "k": (D, D), "v": (D, D), "o": (D, D),
          "gate": (F, D), "up": (F, D), "down": (D, F)}


# ----------------------------------------------------------------------------------------
# timing helpers
# ----------------------------------------------------------------------------------------


def median_s(fn, args, *, repeats: int, budget_s: float) -> float:
  """Median seconds of ``fn(*args)`` over ``repeats`` calls after a warm-up call; a warm-up
  slower than ``budget_s`` is the only sample. ``fn`` is compiled already (no call compiles)."""

  def once():
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start

  first = once()
  if first > budget_s:
    return first
  return statistics.median(once() for _ in range(repeats))


def compiled(fn, *args):
  """``fn`` jitted and compiled for ``args`` (the executable)."""
  return jax.jit(fn).lower(*args).compile()


# ----------------------------------------------------------------------------------------
# part 1: one matrix at a time
# ----------------------------------------------------------------------------------------


def time_matrix(cfg, rank, methods, args) -> dict:
  """Per-matrix refresh seconds of each method (std side, fp32, warm path)."""
  kinds = {"qkvo": (cfg.D, cfg.D), "gate_up": (cfg.F, cfg.D), "down": (cfg.D, cfg.F)}
  per_layer = {"qkvo": 4, "gate_up": 2, "down": 1}
  timing = dict(repeats=args.repeats, budget_s=args.budget_s)
  rows = {name: {} for name in ("jnp.linalg.svd", *methods)}
  for kind, (m, n) in kinds.items():
    g_1xmxn = jax.random.normal(jax.random.key(0), (1, m, n), jnp.float32)
    r = min(rank, m, n)
    left, right = gj.projection.projection_sides("std", m, n)
    prev = train_steps.with_warm_bases(gj.Bases(
        jnp.zeros((1, m, r)) if left else None, jnp.zeros((1, n, r)) if right else None,
        jnp.zeros([], jnp.int32)))
    svd = compiled(lambda g: jnp.linalg.svd(g, full_matrices=False), g_1xmxn[0])
    rows["jnp.linalg.svd"][kind] = median_s(svd, (g_1xmxn[0],), **timing)
    for name in methods:
      key = jax.random.key(1) if gj.subspace.METHODS[name].needs_key else None
      fn = compiled(lambda g, prev, key: gj.subspace.compute_bases(
          g, r, left=left, right=right, method=name, prev=prev, key=key), g_1xmxn, prev, key)
      rows[name][kind] = median_s(fn, (g_1xmxn, prev, key), **timing)
  for row in rows.values():  # all 7 x L matrices of the model, one by one
    row["model_looped_s"] = cfg.L * sum(per_layer[k] * row[k] for k in kinds)
  for row in rows.values():
    row["vs_jnp_svd"] = row["model_looped_s"] / rows["jnp.linalg.svd"]["model_looped_s"]
  return {"shapes": {k: list(s) for k, s in kinds.items()}, "matrices_per_layer": per_layer,
          "results": rows}


# ----------------------------------------------------------------------------------------
# part 2: one optimizer update on the whole model's matrices
# ----------------------------------------------------------------------------------------


def time_update(cfg, rank, methods, args) -> dict:
  """Seconds of one jitted tx.update, refresh step and normal step, at the model's shapes."""
  shapes = matrix_shapes(cfg)
  keys = jax.random.split(jax.random.key(0), len(shapes))
  g_stacked = {kind: jax.random.normal(k, (cfg.L, *s), jnp.float32)
               for k, (kind, s) in zip(keys, shapes.items())}
  g_unstacked = {f"{layer}.{kind}": g_Lxmxn[layer]
                 for kind, g_Lxmxn in g_stacked.items() for layer in range(cfg.L)}
  common = dict(rank=rank, update_proj_gap=args.update_proj_gap, scale=0.25)
  dims = {kind: LAYER_DIMS for kind in g_stacked}
  optimizers = {"optax.adamw": (optax.adamw(1e-3), g_stacked)}
  for name in methods:
    tx = gj.galore_adamw(1e-3, dimension_numbers=dims, method=name, **common)
    optimizers[f"galore_adamw[{name}]"] = (tx, g_stacked)
  optimizers["optax.contrib.galore"] = (optax.contrib.galore(1e-3, **common), g_unstacked)
  timing = dict(repeats=args.repeats, budget_s=args.budget_s)
  rows = {}
  for label, (tx, grads) in optimizers.items():
    state = train_steps.with_warm_bases(tx.init(grads))
    update = jax.jit(tx.update).lower(grads, state, grads).compile()
    at_count = lambda count: (grads, train_steps.with_count(state, count), grads)
    row = {"normal_step_s": median_s(update, at_count(1), **timing)}
    if train_steps.has_galore(state):
      row["refresh_step_s"] = median_s(update, at_count(0), **timing)
      row["refresh_only_s"] = row["refresh_step_s"] - row["normal_step_s"]
      row["refresh_vs_normal"] = row["refresh_step_s"] / row["normal_step_s"]
    rows[label] = row
    print(label, row, flush=True)
  for row in rows.values():
    row["normal_vs_adamw"] = row["normal_step_s"] / rows["optax.adamw"]["normal_step_s"]
  return {"num_matrices": 7 * cfg.L, "dtype": "float32",
          "layout": {"galore_adamw": "(L, out, in) per kind, L a batch axis",
                     "optax.contrib.galore": "7 x L 2-D (out, in) matrices, its side rule"
                                             " (basis on the larger side)"},
          "results": rows}


# ----------------------------------------------------------------------------------------
# part 3: training throughput
# ----------------------------------------------------------------------------------------


def jax_train_rows(cfg, rank, methods, args, tokens_BxT, notes) -> dict:
  """The train part's JAX rows: optax.adamw, the --baselines, galore_adamw per method
  (and --staggered / --host-refresh variants), timed by train_steps.time_jax_optimizers."""
  common = dict(rank=rank, update_proj_gap=args.update_proj_gap, scale=0.25)
  optimizers = {"optax.adamw": (lambda: optax.adamw(1e-3), False)}  # label -> (make tx, unrolled)
  if "adamw_unrolled" in args.baselines:
    optimizers["optax.adamw (unrolled)"] = (lambda: optax.adamw(1e-3), True)
  if "adamw_other_loop" in args.baselines:
    label, unroll = train_steps.other_loop(args.unroll)
    optimizers[label] = (lambda: optax.adamw(1e-3), False, unroll)
  if "contrib" in args.baselines:
    optimizers["optax.contrib.galore (unrolled)"] = (
        lambda: train_steps.contrib_galore_unrolled(cfg, common, notes), True)
  ldadamw = lambda: gj.ldadamw(1e-3, rank=rank, mask=model_lib.galore_targets,
                               dimension_numbers=model_lib.LAYER_KERNEL_DIMS)
  if "ldadamw" in args.baselines:  # no refresh: every step is the same (one power step)
    optimizers["ldadamw"] = (ldadamw, False)
  if "ldadamw_host" in args.baselines:  # step 0's SVD decided on the host: no cond
    optimizers["ldadamw[host]"] = (ldadamw, False, None, True)
  galore = lambda name, **kw: lambda: gj.galore_adamw(
      1e-3, mask=model_lib.galore_targets, dimension_numbers=model_lib.LAYER_KERNEL_DIMS,
      method=name, **common, **kw)
  for name in methods:
    optimizers[f"galore_adamw[{name}]"] = (galore(name), False)
  for name in args.staggered:
    optimizers[f"galore_adamw[{name},staggered]"] = (
        galore(name, refresh=gj.staggered(args.update_proj_gap)), False)
  for name in args.host_refresh:
    optimizers[f"galore_adamw[{name},host]"] = (galore(name), False, None, True)
  return train_steps.time_jax_optimizers(cfg, optimizers, args, tokens_BxT)


def time_train(cfg, rank, methods, args, notes, skipped) -> dict:
  """The train part: torch rows (with --torch; skipped ones recorded in ``skipped``) and JAX
  rows, amortized over T, with MFU; returns the part's dict."""
  B, S = args.batch_size, args.seq_len
  tokens_BxT = jax.random.randint(jax.random.key(0), (B, S), 0, cfg.V, jnp.int32)
  rows = {}
  if args.torch:
    try:
      rows.update(train_steps.torch_train_rows(cfg, rank, args, tokens_BxT))
    except (ImportError, RuntimeError) as e:
      for label in ("torch.optim.AdamW", "galore_torch.GaLoreAdamW"):
        skipped[label] = f"{type(e).__name__}: {e}"
  rows.update(jax_train_rows(cfg, rank, methods, args, tokens_BxT, notes))
  train_steps.amortize(rows, B * S, args.update_proj_gap)
  kind = jax.devices()[0].device_kind
  for row in rows.values():
    # The model runs on all S positions of a row (the loss drops the last one's logits).
    row.update(flops.mfu(flops.flops_per_token(cfg, S), row["effective_tokens_per_s"], kind,
                         args.peak_tflops))
  return {"batch_size": B, "seq_len": S, "tokens_per_step": B * S, "dtype": args.dtype,
          "attention": args.attention, "params": cfg.num_params(), "results": rows}


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------


def print_table(title, rows, columns):
  """Prints ``rows`` as a table of ``columns`` (key, header, format); a missing value is '-'."""
  print(f"\n{title}\n{'':34s}" + "".join(f"{h:>14s}" for _, h, _ in columns))
  for name, row in rows.items():
    cells = [fmt.format(row[k]) if row.get(k) is not None else "-" for k, _, fmt in columns]
    print(f"{name:34s}" + "".join(f"{c:>14s}" for c in cells))


def print_tables(result):
  """Prints a table per part in ``result``, then its notes and skipped rows."""
  if "matrix" in result:
    cols = [(k, f"{k} ms", "{:.3f}") for k in result["matrix"]["shapes"]]
    rows = {n: {**r, **{k: r[k] * 1e3 for k in result["matrix"]["shapes"]}}
            for n, r in result["matrix"]["results"].items()}
    print_table("per-matrix refresh (fp32, std side, one matrix)", rows, cols + [
        ("model_looped_s", "model loop s", "{:.4f}"), ("vs_jnp_svd", "vs svd", "{:.3f}")])
  if "update" in result:
    print_table("whole-model tx.update (fp32)", result["update"]["results"], [
        ("normal_step_s", "normal s", "{:.4f}"), ("refresh_step_s", "refresh s", "{:.4f}"),
        ("refresh_vs_normal", "refresh/norm", "{:.1f}"),
        ("normal_vs_adamw", "norm/adamw", "{:.2f}")])
  if "train" in result:
    print_table(f"train steps, T = {result['update_proj_gap']}", result["train"]["results"], [
        ("normal_step_s", "normal s", "{:.4f}"), ("refresh_step_s", "refresh s", "{:.4f}"),
        ("refresh_vs_normal", "refresh/norm", "{:.1f}"),
        ("effective_tokens_per_s", "eff tok/s", "{:,.0f}"), ("mfu", "MFU", "{:.1%}"),
        ("vs_optax_adamw", "vs adamw", "{:.3f}"), ("vs_galore_torch", "vs gal-torch", "{:.3f}")])
    first = next(iter(result["train"]["results"].values()))
    print(f"model FLOPs/token {first['model_flops_per_token']:.4g} (6N + 12 L D T,"
          " examples/llama/flops.py); MFU of the effective tokens/s against "
          + ("no known peak (--peak-tflops)" if first["peak_tflops"] is None
             else f"{first['peak_tflops']:g} TFLOP/s dense bf16"))
  for name, text in {**result["notes"], **result["skipped"]}.items():
    print(f"{name}: {text}")


def build_parser() -> argparse.ArgumentParser:
  """The command line's parser (the module docstring is its description and epilog)."""
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  a = p.add_argument
  a("--model", choices=SIZES, default="tiny", help="LLaMA size (shapes, rank, batch)")
  a("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
  a("--methods", default=None,
    help="comma list of basis methods (default: all of galore_jax.subspace.METHODS)")
  a("--rank", type=cli.POSITIVE, default=None, help="GaLore rank (default: the size's)")
  a("--update-proj-gap", type=int, default=200, help="T: refresh period, for amortization")
  a("--repeats", type=cli.POSITIVE, default=10, help="timed calls per measurement (parts 1, 2)")
  a("--train-steps", type=cli.POSITIVE, default=10, help="timed normal train steps per optimizer")
  a("--refresh-repeats", type=cli.POSITIVE, default=3,
    help="timed refresh train steps per optimizer")
  a("--budget-s", type=cli.NONNEGATIVE_FLOAT, default=5.0,
    help="a call slower than this is timed once")
  a("--batch-size", type=cli.POSITIVE, default=None, help="train batch (default: the size's)")
  a("--seq-len", type=cli.POSITIVE, default=None,
    help="train sequence length (default: the size's)")
  a("--dtype", choices=train_steps.DTYPES, default="bf16",
    help="train params and compute dtype")
  a("--attention", choices=["auto", "xla", "cudnn"], default="auto",
    help="jax.nn.dot_product_attention implementation (cudnn on GPU)")
  a("--baselines", default="adamw_unrolled,contrib",
    help="train part, besides optax.adamw and galore_adamw: comma list of adamw_unrolled"
         " (per-layer kernel leaves), adamw_other_loop (the other --unroll), contrib, ldadamw,"
         " ldadamw_host (its step-0 cond decided on the host), or none")
  a("--unroll", type=cli.parse_unroll, default=1,
    help="train part: the model's layers per loop iteration, or 'all' (the example's flag)")
  a("--peak-tflops", type=cli.POSITIVE_FLOAT, default=None,
    help="the device's dense bf16 peak for MFU (default: examples/llama/flops.py's table)")
  a("--staggered", default="",
    help="train part: comma list of methods to also time with refresh=gj.staggered(T)")
  a("--host-refresh", default="",
    help="train part: comma list of methods to also time with the refresh decided on the"
         " host (galore_refresh: a normal and a refresh executable, no cond in either)")
  a("--torch", action="store_true", help="also time torch AdamW and galore-torch (train part)")
  a("--tag", default="", help="appended to the JSON file's name (runs that must not collide)")
  a("--out", type=pathlib.Path, default=None, help="directory for the JSON file")
  return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
  """The command line, checked and resolved (parts, methods, the size's config, rank, batch
  and sequence length); ``SystemExit`` / ``ValueError`` on bad input.  Nothing runs."""
  args = build_parser().parse_args(argv)
  parts = [s.strip() for s in args.parts.split(",") if s.strip()]
  methods = ([s.strip() for s in args.methods.split(",") if s.strip()] if args.methods
             else list(gj.subspace.METHODS))
  args.staggered = [s.strip() for s in args.staggered.split(",") if s.strip()]
  args.host_refresh = [s.strip() for s in args.host_refresh.split(",") if s.strip()]
  for flag, names in (("--methods", methods), ("--staggered", args.staggered),
                      ("--host-refresh", args.host_refresh)):
    for name in names:
      try:
        gj.subspace.get_method(name)
      except ValueError as e:
        raise SystemExit(f"{flag}: {e}") from None
  if not parts or set(parts) - set(PARTS):
    raise SystemExit(f"--parts: choose from {', '.join(PARTS)}")
  args.baselines = [s.strip() for s in args.baselines.split(",") if s.strip() not in ("", "none")]
  known = ("adamw_unrolled", "adamw_other_loop", "contrib", "ldadamw", "ldadamw_host")
  if set(args.baselines) - set(known):
    raise SystemExit(f"--baselines: choose from {', '.join(known)}, none")
  if args.update_proj_gap < 2:
    raise SystemExit("--update-proj-gap must be >= 2")
  cfg, rank, batch, seq = SIZES[args.model]
  rank = args.rank or rank
  args.batch_size, args.seq_len = args.batch_size or batch, args.seq_len or seq
  if args.seq_len > cfg.max_seq_len:
    raise SystemExit(f"--seq-len must be <= {cfg.max_seq_len}")
  args.parts, args.methods, args.cfg, args.rank = parts, methods, cfg, rank
  args.default_batch = (batch, seq)
  benchmarks.check_out(args.out, directory=True)  # before the run, not after it
  return args


def main(argv: list[str] | None = None) -> dict:
  """Runs the parts asked for, prints their tables, writes the JSON to --out if given;
  returns the result."""
  args = parse(argv)
  parts, methods, cfg, rank = args.parts, args.methods, args.cfg, args.rank
  if args.torch:  # torch shares the GPU: JAX must not grab 75% of it up front
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

  device = jax.devices()[0]
  result = {
      "benchmark": "refresh", "model": args.model, "rank": rank, "dtype": args.dtype,
      "update_proj_gap": args.update_proj_gap, "methods": methods, "parts": parts,
      "shape": {"D": cfg.D, "F": cfg.F, "L": cfg.L, "N": cfg.N, "V": cfg.V},
      "device": str(device.device_kind), "platform": device.platform,
      "jax": jax.__version__, "optax": optax.__version__, "flax": flax.__version__,
      "torch": None, "python": platform.python_version(),
      "repeats": args.repeats, "train_steps": args.train_steps,
      "refresh_repeats": args.refresh_repeats, "budget_s": args.budget_s,
      "baselines": args.baselines, "torch_requested": args.torch, "staggered": args.staggered,
      "host_refresh": args.host_refresh,
      "unroll": args.unroll,
      "env": {k: os.environ.get(k) for k in (
          "OPENBLAS_NUM_THREADS", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_FLAGS")},
      "notes": {}, "skipped": {},
  }
  if args.torch:
    try:
      train_steps.galore_torch_adamw()
      import torch
      import transformers
      result.update(torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:
      pass
  if "matrix" in parts:
    result["matrix"] = time_matrix(cfg, rank, methods, args)
  if "update" in parts:
    result["update"] = time_update(cfg, rank, methods, args)
  if "train" in parts:
    result["train"] = time_train(cfg, rank, methods, args, result["notes"], result["skipped"])
  print_tables(result)
  if args.out:
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if parts == list(PARTS) else "_" + "_".join(parts)
    suffix += "" if methods == list(gj.subspace.METHODS) else "_" + "+".join(methods)
    if (args.batch_size, args.seq_len) != args.default_batch:  # e.g. 60m at 4K-token batches
      suffix += f"_b{args.batch_size}x{args.seq_len}"
    suffix += f"_{args.tag}" if args.tag else ""
    path = args.out / f"refresh_{args.model}_{device.platform}{suffix}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
  return result


if __name__ == "__main__":
  main()

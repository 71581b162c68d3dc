"""Optimizer-update time at LLaMA matrix shapes: normal step and refresh step.

Times one jitted ``tx.update`` on the gradients of a LLaMA model's projected
matrices (q, k, v, o, gate, up, down per layer, as the paper projects them) for
``optax.adamw``, ``optax.contrib.galore``, ``galore_jax.galore_adamw`` and
``galore_jax.ldadamw`` (its normal step: a power step, projections and error feedback), all
in one process on one device, and reports each as a ratio to ``optax.adamw``.  A
"refresh" step is one where every basis is recomputed (step 0 of a period).

Run:  OPENBLAS_NUM_THREADS=1 python -m benchmarks.optimizer_step --model 60m \
        --out benchmarks/results
(one OpenBLAS thread on a CPU: LAPACK calls can spin-wait on a busy machine)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

import benchmarks
import galore_jax as gj

# hidden, intermediate, layers, rank (paper Table 2 ranks; "tiny" for CPU smoke runs).
MODELS = {
    "tiny": (128, 352, 2, 32),
    "60m": (512, 1376, 8, 128),
    "130m": (768, 2048, 12, 256),
    "350m": (1024, 2736, 24, 256),
    "1b": (2048, 5461, 24, 512),
}


def llama_matrices(model: str, dtype) -> dict[str, jax.Array]:
  """Gradients shaped like the projected matrices (torch layout: out x in)."""
  d, f, layers, _ = MODELS[model]
  shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d),
            "gate": (f, d), "up": (f, d), "down": (d, f)}
  key = jax.random.key(0)
  grads = {}
  for layer in range(layers):
    for name, shape in shapes.items():
      key, sub = jax.random.split(key)
      grads[f"{layer}.{name}"] = jax.random.normal(sub, shape, dtype)
  return grads


def time_update(tx, grads, *, steps: int, refresh_step: bool) -> list[float]:
  """Seconds per jitted update; refresh_step=True times count == 0 each call."""
  params = grads
  state0 = tx.init(params)
  update = jax.jit(tx.update)
  updates, state = update(grads, state0, params)  # compile
  jax.block_until_ready(updates)
  if not refresh_step:
    updates, state = update(grads, state, params)  # now count == 2: no refresh
    jax.block_until_ready(updates)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    updates, new_state = update(grads, state0 if refresh_step else state, params)
    jax.block_until_ready(updates)
    times.append(time.perf_counter() - start)
    if not refresh_step:
      state = new_state
  return times


def main(argv=None):
  """Times each optimizer's update on the model's matrices, prints the rows and writes --out's
  JSON if given."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=MODELS, default="tiny")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error(f"argument --steps: must be >= 1, got {args.steps}")
  benchmarks.check_out(args.out, directory=True)

  dtype = jnp.dtype(args.dtype)
  rank = MODELS[args.model][3]
  grads = llama_matrices(args.model, dtype)
  # T is large so that only the timed refresh step refreshes.
  optimizers = {
      "optax.adamw": optax.adamw(1e-3),
      "optax.contrib.galore": optax.contrib.galore(
          1e-3, rank=rank, update_proj_gap=10**6, scale=0.25),
      "galore_jax.galore_adamw": gj.galore_adamw(
          1e-3, rank=rank, update_proj_gap=10**6, scale=0.25),
      # No refresh: every step after the first moves the bases by one power step.
      "galore_jax.ldadamw": gj.ldadamw(1e-3, rank=rank),
  }
  rows = {}
  for name, tx in optimizers.items():
    normal = statistics.median(time_update(tx, grads, steps=args.steps, refresh_step=False))
    rows[name] = {"normal_step_s": normal}
    if name not in ("optax.adamw", "galore_jax.ldadamw"):
      rows[name]["refresh_step_s"] = statistics.median(
          time_update(tx, grads, steps=max(1, args.steps // 5), refresh_step=True))
    print(name, rows[name], flush=True)
  base = rows["optax.adamw"]["normal_step_s"]
  for row in rows.values():
    row["normal_vs_adamw"] = row["normal_step_s"] / base
    if "refresh_step_s" in row:
      row["refresh_vs_own_normal"] = row["refresh_step_s"] / row["normal_step_s"]

  result = {
      "benchmark": "optimizer_step",
      "model": args.model,
      "rank": rank,
      "dtype": args.dtype,
      "num_matrices": len(grads),
      "device": str(jax.devices()[0].device_kind),
      "platform": jax.devices()[0].platform,
      "jax": jax.__version__,
      "optax": optax.__version__,
      "python": platform.python_version(),
      "env": {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "XLA_FLAGS")},
      "results": rows,
  }
  print(json.dumps(result, indent=2))
  if args.out:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"optimizer_step_{args.model}_{result['platform']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
  main()

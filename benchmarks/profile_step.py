r"""Where a train step's time goes: a ``jax.profiler`` trace of the example LLaMA's step, summed
by XLA op (issue 18, item 2).

For each optimizer it builds ``benchmarks/train_steps.py``'s train step of the Flax LLaMA of
``examples/llama/model.py`` (random tokens, ``--unroll`` for the loop over layers), takes
warm-up steps, traces ``--steps`` normal steps and reads the trace back
(``jax.profiler.ProfileData``): every device event that names its XLA op (``hlo_op``; the host
thread's events on a CPU) is summed per op and per kind of op (matmul, attention, fusion,
copy / transpose, collective, other), and the union of the events' intervals is the time the
device was busy.  The step's span minus that is idle time: on a GPU, a ``lax.cond`` that copies
its predicate to the host, launch gaps and host work show up there.  The JSON holds per
optimizer: wall seconds per step, tokens/s (the batch's tokens over the median wall step),
model FLOPs per token and MFU (``examples/llama/flops.py``, counted as ``refresh.py``'s train
rows; MFU n/a on a device without a known peak, a CPU, unless ``--peak-tflops``),
device-busy seconds per step, the idle fraction, the kinds' shares and the top ops (seconds
per step, share, events per step, one kernel name); with ``--hlo`` each step's optimized HLO
text is written beside it (``<label>.hlo.txt``), to map an op name to what it fuses.

GPU (one H200; about 400 s, benchmarks/gpu_session.sh's ``profile`` job; the trace
directories stay under --trace-dir):
  python -m benchmarks.profile_step --model 350m --unroll all --attention cudnn \
      --optimizers optax.adamw,galore_adamw --hlo --out benchmarks/results/profile_350m_gpu.json
  python -m benchmarks.profile_step --model 350m --unroll 1 --attention cudnn \
      --optimizers optax.adamw --out benchmarks/results/profile_350m_scan_gpu.json
  python -m benchmarks.profile_step --model 1b --unroll 1 --attention cudnn \
      --optimizers optax.adamw,galore_adamw --out benchmarks/results/profile_1b_scan_gpu.json
CPU (what the tests run):
  python -m benchmarks.profile_step --model tiny --batch-size 2 --seq-len 16 --attention xla \
      --out /tmp/profile.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

import benchmarks
import galore_jax as gj
from benchmarks import refresh
from benchmarks import train_steps
from examples.llama import cli
from examples.llama import flops
from examples.llama import model as model_lib

# Kinds of XLA ops, by the first pattern their op or kernel name matches.
KINDS = (
    ("attention", r"cudnn|flash|fmha|attention|custom-call"),
    ("matmul", r"gemm|cublas|dot|matmul|ynn|triton"),
    ("collective", r"all-reduce|all-gather|reduce-scatter|all-to-all|collective"),
    ("copy / transpose", r"copy|transpose"),
    ("fusion", r"fusion|loop|reduce|wrapped|convert|add|multiply|select|scatter|gather"),
)


def kind(name: str) -> str:
  """The kind of an XLA op or kernel name (:data:`KINDS`; "other" when none matches).

  Example:
    >>> kind("custom-call.3"), kind("loop_add_fusion"), kind("while.1")
    ('attention', 'fusion', 'other')
  """
  for label, pattern in KINDS:
    if re.search(pattern, name, re.IGNORECASE):
      return label
  return "other"


def optimizers(rank: int, update_proj_gap: int) -> dict:
  """label -> a function making the optimizer (the example's kernels projected)."""
  plan = dict(mask=model_lib.galore_targets, dimension_numbers=model_lib.LAYER_KERNEL_DIMS)
  return {
      "optax.adamw": lambda: optax.adamw(1e-3),
      "galore_adamw": lambda: gj.galore_adamw(1e-3, rank=rank, update_proj_gap=update_proj_gap,
                                              scale=0.25, method="power", **plan),
      "ldadamw": lambda: gj.ldadamw(1e-3, rank=rank, **plan),
  }


def device_events(trace_dir: pathlib.Path, module: str) -> tuple[str, list[tuple]]:
  """Where the events came from (``"device"`` or ``"host"``) and ``(op, kernel, start_ns,
  duration_ns, run)`` of every event of XLA module ``module`` in the newest trace under
  ``trace_dir``: the device planes' (a GPU's kernels), else the host's (a CPU runs the ops
  on host threads; on a GPU, host events would time the launches, not the kernels, which
  the row's ``events_from`` shows); ``run`` is the execution's ``run_id`` (one per step;
  ``None`` where the trace has none)."""
  path = max(trace_dir.rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
  data = jax.profiler.ProfileData.from_file(str(path))
  found = {"device": [], "host": []}
  for plane in data.planes:
    where = ("device" if plane.name.startswith("/device:") else
             "host" if plane.name.startswith("/host:CPU") else None)
    if where is None:
      continue
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if stats.get("hlo_module", "").startswith(module) and "hlo_op" in stats:
          found[where].append((stats["hlo_op"], event.name, event.start_ns, event.duration_ns,
                               stats.get("run_id")))
  return ("device", found["device"]) if found["device"] else ("host", found["host"])


def busy_ns(events) -> int:
  """Length of the union of the events' intervals.

  Example:
    >>> busy_ns([("a", "a", 0, 10, 1), ("b", "b", 5, 10, 1), ("c", "c", 20, 5, 1)])
    20
  """
  total, end = 0, None
  for start, stop in sorted((e[2], e[2] + e[3]) for e in events):
    if end is None or start > end:
      total, end = total + stop - start, stop
    elif stop > end:
      total, end = total + stop - end, stop
  return total


def summarize(events, steps: int, top: int) -> dict:
  """Per step (the median over the traced steps, told apart by ``run_id``; the whole trace
  over ``steps`` without one): busy and span seconds and the idle fraction; each kind's share
  of the op time and the ``top`` ops by time, over all traced steps.  (On a CPU the thunks
  nest, a ``while`` holding its body's ops, so the shares count some time twice; a GPU's
  kernels do not nest.)"""
  if not events:
    raise RuntimeError("the trace holds no event of the train step (no hlo_op stats)")
  runs: dict = {}
  for e in events:
    runs.setdefault(e[4], []).append(e)
  span_ns = lambda evs: max(e[2] + e[3] for e in evs) - min(e[2] for e in evs)
  if None in runs or len(runs) < 2:  # no run ids: the whole trace, spread over the steps
    busy, span = busy_ns(events) / steps, span_ns(events) / steps
  else:
    steps = len(runs)
    busy = statistics.median(busy_ns(r) for r in runs.values())
    span = statistics.median(span_ns(r) for r in runs.values())
  per_op: dict[str, list] = {}
  for op, kernel, _, duration, _ in events:
    entry = per_op.setdefault(op, [0, 0, kernel])
    entry[0] += duration
    entry[1] += 1
  total = sum(e[3] for e in events)
  kinds: dict[str, int] = {}
  for op, (ns, _, kernel) in per_op.items():
    label = kind(op if kind(op) != "other" else kernel)
    kinds[label] = kinds.get(label, 0) + ns
  ranked = sorted(per_op.items(), key=lambda item: -item[1][0])[:top]
  return {
      "busy_s_per_step": busy / 1e9,
      "span_s_per_step": span / 1e9,
      "idle_fraction": 1.0 - busy / span if span else 0.0,
      "kinds": {k: v / total for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
      "top_ops": [{"op": op, "kind": kind(op if kind(op) != "other" else kernel),
                   "s_per_step": ns / steps / 1e9, "share": ns / total,
                   "events_per_step": count / steps, "kernel": kernel}
                  for op, (ns, count, kernel) in ranked],
  }


def profile_one(cfg, make_tx, args, tokens_BxT, trace_dir: pathlib.Path, hlo_path=None) -> dict:
  """Warm-up, then ``args.steps`` traced normal steps of one optimizer: its summary row."""
  graphdef, params, rest = train_steps.train_model(cfg, args)
  tx = make_tx()
  step = train_steps.make_train_step(graphdef, rest, tx)
  state = train_steps.with_warm_bases(tx.init(params))
  host = {"refresh": False} if args.host_refresh and train_steps.has_galore(state) else {}
  if hlo_path is not None:
    hlo_path.write_text(step.lower(params, state, tokens_BxT, **host).compile().as_text())
  for _ in range(args.warmup):
    params, state, _ = jax.block_until_ready(
        step(params, train_steps.with_count(state, 1), tokens_BxT, **host))
  walls = []
  jax.profiler.start_trace(str(trace_dir))
  try:
    for _ in range(args.steps):
      start = time.perf_counter()
      params, state, _ = jax.block_until_ready(
          step(params, train_steps.with_count(state, 1), tokens_BxT, **host))
      walls.append(time.perf_counter() - start)
  finally:
    jax.profiler.stop_trace()
  where, events = device_events(trace_dir, "jit_step")
  row = summarize(events, args.steps, args.top)
  return {"wall_s_per_step": statistics.median(walls), "events_from": where, **row}


def speed(cfg, tokens_per_step: int, seq_len: int, wall_s: float, device_kind: str,
          peak_tflops: float | None = None) -> dict:
  """tokens/s of a step of ``tokens_per_step`` tokens taking ``wall_s``, and its MFU by
  ``examples/llama/flops.py``, as ``benchmarks/refresh.py`` counts its train rows: the step
  runs the model on all ``seq_len`` positions, ``flops_per_token(cfg, seq_len)`` each.

  Example:
    >>> row = speed(model_lib.CONFIGS["350m"], 64 * 256, 256, 0.05, "NVIDIA H100 80GB HBM3")
    >>> row["tokens_per_s"], round(row["mfu"], 4)
    (327680.0, 0.6913)
  """
  tokens_per_s = tokens_per_step / wall_s
  return {"tokens_per_s": tokens_per_s,
          **flops.mfu(flops.flops_per_token(cfg, seq_len), tokens_per_s, device_kind,
                      peak_tflops)}


def print_row(label: str, row: dict) -> None:
  """Prints one optimizer's summary line and its top ops."""
  print(f"\n{label}: {row['wall_s_per_step'] * 1e3:.2f} ms/step wall, "
        f"{row['tokens_per_s']:,.0f} tokens/s x {flops.format_per_token(row)} "
        f"({flops.format_mfu(row)}); device busy "
        f"{row['busy_s_per_step'] * 1e3:.2f} ms, idle {100 * row['idle_fraction']:.1f}% of the "
        "span; by kind: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in row["kinds"].items()))
  for op in row["top_ops"]:
    print(f"  {op['s_per_step'] * 1e3:8.3f} ms {100 * op['share']:5.1f}%  {op['kind']:16s} "
          f"{op['op']}  ({op['events_per_step']:g}/step; {op['kernel'][:60]})")


def parse(argv=None) -> argparse.Namespace:
  """The command line, parsed and checked (``SystemExit`` on an unknown optimizer or a count
  below 1)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  a = p.add_argument
  a("--model", choices=refresh.SIZES, default="tiny", help="LLaMA size (rank, batch: its own)")
  a("--optimizers", default="optax.adamw,galore_adamw",
    help="comma list of optax.adamw, galore_adamw (power basis), ldadamw")
  a("--unroll", type=cli.parse_unroll, default=1, help="layers per loop iteration, or 'all'")
  a("--attention", choices=["auto", "xla", "cudnn"], default="auto")
  a("--dtype", choices=train_steps.DTYPES, default="bf16")
  a("--batch-size", type=cli.POSITIVE, default=None)
  a("--seq-len", type=cli.POSITIVE, default=None)
  a("--steps", type=cli.POSITIVE, default=5, help="traced normal steps")
  a("--warmup", type=cli.POSITIVE, default=2,
    help="untraced steps first, at least one (the first compiles)")
  a("--top", type=cli.POSITIVE, default=25, help="ops listed per optimizer")
  a("--host-refresh", action="store_true",
    help="GaLore's refresh decided on the host (galore_refresh=False: no cond in the step)")
  a("--hlo", action="store_true", help="also write each step's optimized HLO beside --out")
  a("--peak-tflops", type=cli.POSITIVE_FLOAT, default=None,
    help="the device's dense bf16 peak for MFU (default: examples/llama/flops.py's table)")
  a("--trace-dir", type=pathlib.Path, default=None, help="keep the traces here")
  a("--out", type=pathlib.Path, default=None, help="the JSON file to write")
  args = p.parse_args(argv)
  known = optimizers(1, 2)
  args.optimizers = [s.strip() for s in args.optimizers.split(",") if s.strip()]
  if not args.optimizers or set(args.optimizers) - set(known):
    raise SystemExit(f"--optimizers: choose from {', '.join(known)}")
  benchmarks.check_seq_len(args.seq_len, {args.model: refresh.SIZES[args.model][0].max_seq_len})
  benchmarks.check_out(args.out)
  return args


def main(argv=None) -> dict:
  """Profiles each optimizer's train step, prints its row, writes --out's JSON if given;
  returns the result."""
  args = parse(argv)
  cfg, rank, batch, seq = refresh.SIZES[args.model]
  B, T = args.batch_size or batch, args.seq_len or seq
  tokens_BxT = jax.random.randint(jax.random.key(0), (B, T), 0, cfg.V, jnp.int32)
  device = jax.devices()[0]
  result = {"benchmark": "profile_step", "model": args.model, "rank": rank, "batch_size": B,
            "seq_len": T, "dtype": args.dtype, "attention": args.attention,
            "unroll": args.unroll, "host_refresh": args.host_refresh, "steps": args.steps,
            "device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
            "python": platform.python_version(), "results": {}}
  makers = optimizers(rank, 200)
  with tempfile.TemporaryDirectory() as tmp:
    root = args.trace_dir or pathlib.Path(tmp)
    for label in args.optimizers:
      hlo = None
      if args.hlo and args.out is not None:
        hlo = args.out.with_name(f"{args.out.stem}.{label}.hlo.txt")
        hlo.parent.mkdir(parents=True, exist_ok=True)
      row = profile_one(cfg, makers[label], args, tokens_BxT, root / label, hlo)
      row.update(speed(cfg, B * T, T, row["wall_s_per_step"], device.device_kind,
                       args.peak_tflops))
      result["results"][label] = row
      print_row(label, row)
  if args.out is not None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()

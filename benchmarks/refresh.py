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
import functools
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import flax
import optax
from flax import nnx
from optax.contrib import _galore as contrib_galore

import galore_jax as gj
from examples.llama import cli
from examples.llama import devices
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
DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32}  # train: params and compute
LAYER_DIMS = gj.DimensionNumbers(reduction_axis=2, output_axis=1)  # (L, out, in)
GALORE_STATES = (gj.GaLoreProjectionState, contrib_galore.GaLoreState)


def matrix_shapes(cfg) -> dict[str, tuple[int, int]]:
  """The projected matrices of one layer, torch layout (out, in)."""
  D, F = cfg.D, cfg.F
  return {"q": (D, D), "k": (D, D), "v": (D, D), "o": (D, D),
          "gate": (F, D), "up": (F, D), "down": (D, F)}


# ----------------------------------------------------------------------------------------
# timing and state helpers
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
  return jax.jit(fn).lower(*args).compile()


def has_galore(state) -> bool:
  is_galore = lambda x: isinstance(x, GALORE_STATES)
  return any(is_galore(x) for x in jax.tree.leaves(state, is_leaf=is_galore))


def with_count(state, count: int):
  """``state`` with every GaLore step counter (galore_jax and optax.contrib) set to
  ``count``: 0 makes the next update a refresh, 1 a normal step (for any T >= 2)."""
  is_galore = lambda x: isinstance(x, GALORE_STATES)
  set_count = lambda x: x._replace(count=jnp.full_like(x.count, count)) if is_galore(x) else x
  return jax.tree.map(set_count, state, is_leaf=is_galore)


def refresh_step_counts(state, update_proj_gap: int) -> list[int]:
  """The counts whose update refreshes in a period after the first: ``[0]`` (all leaves at
  once: every(T), optax.contrib), or ``T + o_j`` for the distinct offsets ``o_j`` of a
  ``gj.staggered(T)`` state (one leaf each)."""
  is_ours = lambda x: isinstance(x, gj.GaLoreProjectionState)
  ours = [x for x in jax.tree.leaves(state, is_leaf=is_ours) if is_ours(x)]
  offsets = ours[0].refresh_state if ours else None
  if not isinstance(offsets, jax.Array):  # every(T): None
    return [0]
  return sorted({update_proj_gap + int(o) for o in np.asarray(offsets)})


def with_warm_bases(state):
  """Every galore_jax basis set to an orthonormal stand-in (the first r columns of the
  identity) and marked as refreshed once, so that a refresh takes the warm-start path."""

  def warm(x):
    if not isinstance(x, gj.Bases):
      return x
    eye = lambda b: None if b is None else jnp.broadcast_to(
        jnp.eye(*b.shape[-2:], dtype=b.dtype), b.shape)
    return gj.Bases(eye(x.left), eye(x.right), jnp.ones_like(x.refreshes))

  return jax.tree.map(warm, state, is_leaf=lambda x: isinstance(x, gj.Bases))


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
    prev = with_warm_bases(gj.Bases(
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
    state = with_warm_bases(tx.init(grads))
    update = jax.jit(tx.update).lower(grads, state, grads).compile()
    row = {"normal_step_s": median_s(update, (grads, with_count(state, 1), grads), **timing)}
    if has_galore(state):
      row["refresh_step_s"] = median_s(update, (grads, with_count(state, 0), grads), **timing)
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


def unroll(params):
  """The layer kernels ``(L, in, out)`` as lists of L 2-D kernels (for optax.contrib)."""
  layers = {name: ({"kernel": [v["kernel"][i] for i in range(v["kernel"].shape[0])]}
                   if "kernel" in v else v) for name, v in params["layers"].items()}
  return {**params, "layers": layers}


def restack(params):
  layers = {name: ({"kernel": jnp.stack(v["kernel"])} if "kernel" in v else v)
            for name, v in params["layers"].items()}
  return {**params, "layers": layers}


def make_train_step(graphdef, rest, tx, to_model_params=lambda p: p):
  """Jitted (params, opt_state, tokens[, refresh]) -> (params, opt_state, loss); donates the
  state.  ``refresh`` (static; default None) is GaLore's ``galore_refresh``: the refresh
  decided on the host, no ``cond`` in the step."""

  def loss_fn(params, tokens_BxT):
    model = nnx.merge(graphdef, nnx.State(to_model_params(params)), rest)
    logits_BxTxV = model(tokens_BxT)[:, :-1]
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_BxTxV, tokens_BxT[:, 1:]).mean()

  @functools.partial(jax.jit, donate_argnums=(0, 1), static_argnames="refresh")
  def step(params, opt_state, tokens_BxT, refresh=None):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens_BxT)
    extra = {} if refresh is None else {"galore_refresh": refresh}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def time_jax_train(step, params, opt_state, tokens_BxT, args, host=False
                   ) -> tuple[float, list[float]]:
  """Median seconds of a normal train step, and of each refreshing step of a period (one, or
  one per leaf under ``gj.staggered``; the normal step again for a state without bases).
  ``host``: the refresh decided on the host (``step(..., refresh=...)``: two executables,
  neither with a ``cond``), each compiled and warmed up before it is timed."""

  def run(params, opt_state, refresh=False):
    start = time.perf_counter()
    kw = {"refresh": refresh} if host else {}
    out = jax.block_until_ready(step(params, opt_state, tokens_BxT, **kw))
    return out[0], out[1], time.perf_counter() - start

  params, opt_state, _ = run(params, with_count(opt_state, 1))  # compile + warm-up
  if host and has_galore(opt_state):  # the refresh executable, before it is timed
    params, opt_state, _ = run(params, with_count(opt_state, 0), True)
  normal_s, refresh_s = [], []
  for _ in range(args.train_steps):
    params, opt_state, t = run(params, with_count(opt_state, 1))
    normal_s.append(t)
  if not has_galore(opt_state):
    return statistics.median(normal_s), [statistics.median(normal_s)]
  for count in refresh_step_counts(opt_state, args.update_proj_gap):
    times = []
    for _ in range(args.refresh_repeats):
      params, opt_state, t = run(params, with_count(opt_state, count), True)
      times.append(t)
      if t > args.budget_s:
        break
    refresh_s.append(statistics.median(times))
  return statistics.median(normal_s), refresh_s


def train_model(cfg, args, unroll=None, *, abstract=False):
  """The Flax LLaMA of ``cfg`` at ``args.dtype`` with the layer loop ``unroll`` (default
  ``args.unroll``): (graphdef, params as a pure dict, rest); ``abstract``: shapes only."""
  dtype = DTYPES[args.dtype]
  make = lambda: model_lib.Llama(
      cfg, dtype=dtype, param_dtype=dtype, attention=args.attention,
      unroll=args.unroll if unroll is None else unroll, rngs=nnx.Rngs(0))
  model = nnx.eval_shape(make) if abstract else make()
  graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params_state), rest


def other_loop(unroll):
  """(label, unroll) of the ``adamw_other_loop`` baseline: unrolled for a scan, else a scan."""
  scanned = unroll is not True and unroll == 1  # True == 1 in Python
  return ("optax.adamw (unrolled loop)", True) if scanned else ("optax.adamw (scan loop)", 1)


def contrib_galore_unrolled(cfg, common, notes):
  """``optax.contrib.galore`` on the unrolled model (each layer kernel a 2-D leaf); says in
  ``notes`` why it cannot take the scanned kernels."""
  # optax.contrib.galore names every axis of a kernel (no batch axes): a scanned
  # (L, in, out) kernel could only be one (L*in, out) matrix, one basis for all layers.
  try:
    optax.contrib.galore(1e-3, weight_dimension_numbers=contrib_galore.GaLoreDimensionNumbers(
        reduction_axis=1, output_axis=2), **common).init({"k": jnp.zeros((cfg.L, 4, 4))})
  except ValueError as e:
    notes["optax.contrib.galore"] = (
        f"cannot project the scanned (L, in, out) kernels ({e}); timed on the unrolled "
        "variant: the same model with each layer kernel a separate 2-D (in, out) leaf, "
        "stacked inside the loss; compare it with 'optax.adamw (unrolled)'")
  contrib_dims = lambda p: jax.tree.map(
      lambda sel: contrib_galore.GaLoreDimensionNumbers(0, 1) if sel else None,
      gj.linear_kernels(p))
  return optax.contrib.galore(1e-3, weight_dimension_numbers=contrib_dims, **common)


def jax_train_rows(cfg, rank, methods, args, tokens_BxT, notes) -> dict:
  common = dict(rank=rank, update_proj_gap=args.update_proj_gap, scale=0.25)
  optimizers = {"optax.adamw": (lambda: optax.adamw(1e-3), False)}  # label -> (make tx, unrolled)
  if "adamw_unrolled" in args.baselines:
    optimizers["optax.adamw (unrolled)"] = (lambda: optax.adamw(1e-3), True)
  if "adamw_other_loop" in args.baselines:
    label, unroll = other_loop(args.unroll)
    optimizers[label] = (lambda: optax.adamw(1e-3), False, unroll)
  if "contrib" in args.baselines:
    optimizers["optax.contrib.galore (unrolled)"] = (
        lambda: contrib_galore_unrolled(cfg, common, notes), True)
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
  return time_jax_optimizers(cfg, optimizers, args, tokens_BxT)


def time_jax_optimizers(cfg, optimizers, args, tokens_BxT, *, memory=False,
                        on_row=lambda label, row: None, on_error=None) -> dict:
  """Times each ``label -> (make_tx, unrolled[, unroll[, host]])`` on the Flax LLaMA of
  ``cfg`` (``unroll``: that layer loop instead of ``args.unroll``'s, same params; ``host``:
  the refresh decided on the host, see :func:`time_jax_train`): normal step and
  the period's refresh steps; with ``memory``, also XLA's plan of the compiled step
  (``step_memory_bytes``). ``on_row(label, row)`` sees each row as soon as it is measured;
  with ``on_error(label, exception)`` an optimizer that fails (out of memory, say) is reported
  there and the next one runs, else the exception propagates."""
  graphdef, params, rest = train_model(cfg, args)
  rows = {}
  for label, (make_tx, unrolled, *extra) in optimizers.items():
    unroll, host = (*extra, None, False)[:2]
    g = graphdef if unroll is None else train_model(cfg, args, unroll, abstract=True)[0]
    try:
      rows[label] = _time_one(g, rest, params, make_tx, unrolled, args, tokens_BxT, memory,
                              host)
    except Exception as e:  # pylint: disable=broad-except
      if on_error is None:
        raise
      on_error(label, e)
      continue
    print(label, rows[label], flush=True)
    on_row(label, rows[label])
  return rows


def _time_one(graphdef, rest, params, make_tx, unrolled, args, tokens_BxT, memory,
              host=False) -> dict:
  """One optimizer's row (see :func:`time_jax_optimizers`)."""
  tx = make_tx()
  step = make_train_step(graphdef, rest, tx, *([restack] if unrolled else []))
  p = jax.tree.map(jnp.copy, unroll(params) if unrolled else params)  # the step donates p
  state = with_warm_bases(tx.init(p))
  row = {}
  if memory:  # compile once, and time that executable (host: the jit keeps both variants)
    compiled = step.lower(p, state, tokens_BxT, **({"refresh": False} if host else {})).compile()
    plan = devices.memory_plan(compiled)
    row["step_memory_bytes"] = plan and plan["total"]
    step = step if host else compiled
  normal_s, refresh_s = time_jax_train(step, p, state, tokens_BxT, args, host)
  return {"normal_step_s": normal_s, "refresh_step_s": max(refresh_s),
          "refresh_steps_s": refresh_s, **row}


@functools.cache  # the fallback leaves a bare package in sys.modules: load it once
def galore_torch_adamw():
  """``galore_torch.GaLoreAdamW``, also where bitsandbytes is missing (the GPU image).

  The package's ``__init__`` imports its 8-bit optimizer, hence bitsandbytes (a 43 MB wheel to
  carry); the AdamW module itself needs only torch. Without bitsandbytes, load that module
  under an empty package object so the ``__init__`` never runs.
  """
  try:
    import galore_torch  # pylint: disable=import-outside-toplevel
    return galore_torch.GaLoreAdamW
  except ImportError as e:
    if "bitsandbytes" not in str(e):
      raise
  import importlib  # pylint: disable=import-outside-toplevel
  import importlib.util  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel
  spec = importlib.util.find_spec("galore_torch")
  package = types.ModuleType("galore_torch")
  package.__path__ = list(spec.submodule_search_locations)
  sys.modules["galore_torch"] = package
  return importlib.import_module("galore_torch.adamw").AdamW


def torch_train_rows(cfg, rank, args, tokens_BxT, on_row=lambda label, row: None) -> dict:
  """torch.optim.AdamW and galore_torch.GaLoreAdamW on transformers' LlamaForCausalLM; on CUDA
  each row has the allocator's peak of its own steps (``peak_memory_bytes``)."""
  GaLoreAdamW = galore_torch_adamw()
  import torch
  import transformers

  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cpu" and jax.devices()[0].platform != "cpu":
    raise RuntimeError("torch has no CUDA here: its CPU times would not compare with JAX's")
  sync = torch.cuda.synchronize if device == "cuda" else lambda: None
  hf_cfg = transformers.LlamaConfig(
      vocab_size=cfg.V, hidden_size=cfg.D, intermediate_size=cfg.F, num_hidden_layers=cfg.L,
      num_attention_heads=cfg.N, num_key_value_heads=cfg.N, max_position_embeddings=cfg.max_seq_len,
      rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
      attn_implementation="sdpa")
  tokens = torch.from_numpy(np.asarray(tokens_BxT, np.int64)).to(device)
  rows = {}
  for label in ("torch.optim.AdamW", "galore_torch.GaLoreAdamW"):
    torch.manual_seed(0)
    if device == "cuda":
      torch.cuda.reset_peak_memory_stats()
    with torch.device(device):
      model = transformers.LlamaForCausalLM(hf_cfg).to(
          torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    lowrank = [p for n, p in model.named_parameters()
               if ".layers." in n and n.endswith("proj.weight")]
    if label == "torch.optim.AdamW":
      opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
      lowrank = []
    else:
      ids = {id(p) for p in lowrank}
      opt = GaLoreAdamW([
          {"params": [p for p in model.parameters() if id(p) not in ids]},
          {"params": lowrank, "rank": rank, "update_proj_gap": args.update_proj_gap,
           "scale": 0.25, "proj_type": "std"}], lr=1e-3, weight_decay=0.0)

    def run(count):
      for p in lowrank:  # galore-torch refreshes when state["step"] % T == 0 (an int)
        if "step" in opt.state[p]:
          opt.state[p]["step"] = count
      sync()
      start = time.perf_counter()
      model(input_ids=tokens, labels=tokens).loss.backward()
      opt.step()
      opt.zero_grad(set_to_none=True)
      sync()
      return time.perf_counter() - start

    run(0)  # warm-up (creates the optimizer state)
    normal_s = statistics.median(run(1) for _ in range(args.train_steps))
    refresh_s = normal_s
    if label != "torch.optim.AdamW":
      times = []
      for _ in range(args.refresh_repeats):
        times.append(run(0))
        if times[-1] > args.budget_s:
          break
      refresh_s = statistics.median(times)
    rows[label] = {"normal_step_s": normal_s, "refresh_step_s": refresh_s,
                   "refresh_steps_s": [refresh_s]}
    if device == "cuda":
      rows[label]["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    print(label, rows[label], flush=True)
    on_row(label, rows[label])
    del model, opt
    if device == "cuda":
      torch.cuda.empty_cache()  # hand the memory back before JAX allocates
  return rows


def amortize(rows: dict, tokens_per_step: int, T: int) -> None:
  """Adds to each timed row its tokens/s, effective tokens/s with the period's refresh steps
  amortized over T steps, and ratios to the baselines present (in place)."""
  for row in rows.values():
    row["refresh_vs_normal"] = row["refresh_step_s"] / row["normal_step_s"]
    row["tokens_per_s"] = tokens_per_step / row["normal_step_s"]
    steps = row["refresh_steps_s"]  # T steps, of which len(steps) refresh
    period_s = (T - len(steps)) * row["normal_step_s"] + sum(steps)
    row["effective_tokens_per_s"] = tokens_per_step * T / period_s
  for base, key in [("optax.adamw", "vs_optax_adamw"), ("torch.optim.AdamW", "vs_torch_adamw"),
                    ("galore_torch.GaLoreAdamW", "vs_galore_torch")]:
    if base in rows:
      for row in rows.values():
        row[key] = row["effective_tokens_per_s"] / rows[base]["effective_tokens_per_s"]


def time_train(cfg, rank, methods, args, notes, skipped) -> dict:
  B, S = args.batch_size, args.seq_len
  tokens_BxT = jax.random.randint(jax.random.key(0), (B, S), 0, cfg.V, jnp.int32)
  rows = {}
  if args.torch:
    try:
      rows.update(torch_train_rows(cfg, rank, args, tokens_BxT))
    except (ImportError, RuntimeError) as e:
      for label in ("torch.optim.AdamW", "galore_torch.GaLoreAdamW"):
        skipped[label] = f"{type(e).__name__}: {e}"
  rows.update(jax_train_rows(cfg, rank, methods, args, tokens_BxT, notes))
  amortize(rows, B * S, args.update_proj_gap)
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
  print(f"\n{title}\n{'':34s}" + "".join(f"{h:>14s}" for _, h, _ in columns))
  for name, row in rows.items():
    cells = [fmt.format(row[k]) if row.get(k) is not None else "-" for k, _, fmt in columns]
    print(f"{name:34s}" + "".join(f"{c:>14s}" for c in cells))


def print_tables(result):
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
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  a = p.add_argument
  a("--model", choices=SIZES, default="tiny", help="LLaMA size (shapes, rank, batch)")
  a("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
  a("--methods", default=None,
    help="comma list of basis methods (default: all of galore_jax.subspace.METHODS)")
  a("--rank", type=int, default=None, help="GaLore rank (default: the size's)")
  a("--update-proj-gap", type=int, default=200, help="T: refresh period, for amortization")
  a("--repeats", type=int, default=10, help="timed calls per measurement (parts 1, 2)")
  a("--train-steps", type=int, default=10, help="timed normal train steps per optimizer")
  a("--refresh-repeats", type=int, default=3, help="timed refresh train steps per optimizer")
  a("--budget-s", type=float, default=5.0, help="a call slower than this is timed once")
  a("--batch-size", type=int, default=None, help="train batch (default: the size's)")
  a("--seq-len", type=int, default=None, help="train sequence length (default: the size's)")
  a("--dtype", choices=DTYPES, default="bf16", help="train params and compute dtype")
  a("--attention", choices=["auto", "xla", "cudnn"], default="auto",
    help="jax.nn.dot_product_attention implementation (cudnn on GPU)")
  a("--baselines", default="adamw_unrolled,contrib",
    help="train part, besides optax.adamw and galore_adamw: comma list of adamw_unrolled"
         " (per-layer kernel leaves), adamw_other_loop (the other --unroll), contrib, ldadamw,"
         " ldadamw_host (its step-0 cond decided on the host), or none")
  a("--unroll", type=cli.parse_unroll, default=1,
    help="train part: the model's layers per loop iteration, or 'all' (the example's flag)")
  a("--peak-tflops", type=float, default=None,
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
  for name in methods + args.staggered + args.host_refresh:
    gj.subspace.get_method(name)  # raises on an unknown name
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
  return args


def main(argv: list[str] | None = None) -> dict:
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
      galore_torch_adamw()
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

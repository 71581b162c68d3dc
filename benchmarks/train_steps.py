"""Train steps of the Flax LLaMA, timed: the rows of ``benchmarks/refresh.py``'s train part
and of ``benchmarks/compare.py``'s jobs.

JAX optimizers on ``examples/llama/model.py``'s model (normal step and the period's refresh
steps, with the GaLore step counters set so that a chosen step refreshes), and, with torch,
``torch.optim.AdamW`` and ``galore_torch.GaLoreAdamW`` on a ``transformers.LlamaForCausalLM``
of the same size; :func:`amortize` turns the times into effective tokens/s over a period.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from optax.contrib import _galore as contrib_galore

import galore_jax as gj
from examples.llama import devices
from examples.llama import model as model_lib

DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32}  # train: params and compute
GALORE_STATES = (gj.GaLoreProjectionState, contrib_galore.GaLoreState)


# ----------------------------------------------------------------------------------------
# optimizer state helpers
# ----------------------------------------------------------------------------------------


def has_galore(state) -> bool:
  """Whether ``state`` holds a GaLore state (galore_jax's or optax.contrib's)."""
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
# JAX: the Flax LLaMA
# ----------------------------------------------------------------------------------------


def unroll(params):
  """The layer kernels ``(L, in, out)`` as lists of L 2-D kernels (for optax.contrib)."""
  layers = {name: ({"kernel": [v["kernel"][i] for i in range(v["kernel"].shape[0])]}
                   if "kernel" in v else v) for name, v in params["layers"].items()}
  return {**params, "layers": layers}


def restack(params):
  """The inverse of :func:`unroll`: each list of L 2-D kernels stacked to ``(L, in, out)``."""
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
  neither with a ``cond``), each compiled and warmed up before it is timed.  The refresh runs
  once untimed either way (the first run of a ``cond``'s branch is slow, 31 vs 7 ms on a
  CPU); slower than ``args.budget_s``, that run is the refresh's time."""

  def run(params, opt_state, refresh=False):
    start = time.perf_counter()
    kw = {"refresh": refresh} if host else {}
    out = jax.block_until_ready(step(params, opt_state, tokens_BxT, **kw))
    return out[0], out[1], time.perf_counter() - start

  params, opt_state, _ = run(params, with_count(opt_state, 1))  # compile + warm-up
  warm = None
  if has_galore(opt_state):  # the refresh (its executable, or its cond branch) run once
    if host:  # its own executable: compiled here, or its compile would be its time below
      step.lower(params, with_count(opt_state, 0), tokens_BxT, refresh=True).compile()
    params, opt_state, warm = run(params, with_count(opt_state, 0), True)  # before timing
  normal_s, refresh_s = [], []
  for _ in range(args.train_steps):
    params, opt_state, t = run(params, with_count(opt_state, 1))
    normal_s.append(t)
  if not has_galore(opt_state):
    return statistics.median(normal_s), [statistics.median(normal_s)]
  counts = refresh_step_counts(opt_state, args.update_proj_gap)

  def refresh_once(count):
    nonlocal params, opt_state
    params, opt_state, t = run(params, with_count(opt_state, count), True)
    return t

  for count in counts:  # the warm-up refreshed every leaf: it samples one refresh of all
    refresh_s.append(refresh_time(lambda: refresh_once(count), args,
                                  warm if len(counts) == 1 else None))
  return statistics.median(normal_s), refresh_s


def refresh_time(run_once, args, warm: float | None = None) -> float:
  """Median seconds of ``run_once()`` (one refreshing step, timed) over up to
  ``args.refresh_repeats`` runs, stopping after one slower than ``args.budget_s``; ``warm``,
  the untimed first run's seconds, when it was already slower (a minute's SVD at 1b: that
  run is the sample)."""
  if warm is not None and warm > args.budget_s:
    return warm
  times = []
  for _ in range(args.refresh_repeats):
    times.append(run_once())
    if times[-1] > args.budget_s:
      break
  return statistics.median(times)


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



# ----------------------------------------------------------------------------------------
# torch: transformers' LLaMA
# ----------------------------------------------------------------------------------------


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

    first = run(0)  # warm-up (creates the optimizer state; galore-torch's refreshes)
    normal_s = statistics.median(run(1) for _ in range(args.train_steps))
    refresh_s = normal_s
    if label != "torch.optim.AdamW":
      refresh_s = refresh_time(lambda: run(0), args, first)
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

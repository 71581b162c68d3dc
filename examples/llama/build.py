"""The model and its optimizer for the LLaMA example, real or abstract.

``build`` creates them (sharded when there is a mesh), ``abstract_build`` only their shapes
and shardings (to plan a step), ``dry_run`` the sizes and the plan of a run (a 7b run's on a
laptop); ``model_config`` fits the model to the tokenizer and ``check_vocab`` refuses token ids
without an embedding row.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import galore_jax as gj
from galore_jax import nn as gnn
from examples.llama import data as data_lib
from examples.llama import model as model_lib
from examples.llama.cli import DTYPES, num_steps
from examples.llama.devices import mesh_context
from examples.llama import optimizers
from examples.llama.optimizers import make_optimizer, method_of, method_rank_for


def model_config(args, tokenizer) -> model_lib.LlamaConfig:
  """The config of ``--model``, with the byte tokenizer's vocabulary when that is smaller."""
  cfg = model_lib.CONFIGS[args.model]
  if tokenizer.vocab_size < cfg.V and tokenizer.name == "bytes":
    cfg = dataclasses.replace(cfg, V=tokenizer.vocab_size)  # no unused embedding rows
  return cfg


def flags_config(args) -> model_lib.LlamaConfig:
  """``model_config`` from the flags alone, before any data or tokenizer file is read: the
  model's vocabulary is the config's except with the byte tokenizer, which needs no data."""
  if args.tokenizer == "bytes":
    return model_config(args, data_lib.load_tokenizer("bytes"))
  return model_lib.CONFIGS[args.model]


def check_mesh(args, mesh):
  """``--mesh`` divides every param of the model of the flags (``model.check_divisible``,
  on abstract shapes): a run checks it before it reads its data."""
  model_lib.check_divisible(lambda: model_lib.Llama(flags_config(args), method=method(args),
                                                    rngs=nnx.Rngs(0)), mesh)


def check_vocab(max_id: int, vocab: int, split: str):
  """Every id must have an embedding row (an id past it would make the loss NaN)."""
  if max_id >= vocab:
    raise SystemExit(f"{split} data has token id {max_id} >= model vocab {vocab}: use a"
                     f" tokenizer with at most {vocab} tokens (--tokenizer / --vocab-size)")


def method(args) -> model_lib.Method:
  """The layers' parameterisation of ``--method`` and its flags (rank: ``method_rank_for``,
  the same for every optimizer); the factors' rank axis is sharded where ``--mesh`` divides
  it (``model.shards_rank``)."""
  rank = method_rank_for(args)
  return model_lib.Method(method_of(args), rank=rank, alpha=optimizers.alpha_for(args),
                          dropout=getattr(args, "lora_dropout", 0.05),
                          delta=optimizers.delta_for(args),
                          shard_rank=model_lib.shards_rank(rank, getattr(args, "mesh", None) or {}))


def sizes(model) -> dict:
  """Element counts of ``model``'s weights (real or abstract): ``trainable_params`` (the
  ``nnx.Param``s, what the optimizer sees), ``params`` (those + LoRA's frozen bases),
  ``index_elements`` (SLTrain's supports) and ``weight_bytes`` (all of them)."""
  parts = {k: jax.tree.leaves(nnx.state(model, f)) for k, f in
           (("trainable", nnx.Param), ("frozen", gnn.Frozen), ("index", gnn.SparseIndex))}
  count = lambda k: sum(int(np.prod(x.shape)) for x in parts[k])
  return {"params": count("trainable") + count("frozen"), "trainable_params": count("trainable"),
          "index_elements": count("index"), "weight_bytes": gj.tree_bytes(parts)}


def build(args, name: str, cfg: model_lib.LlamaConfig, steps: int, mesh=None):
  """Model, optimizer and schedule; with a mesh, params and optimizer state are
  created sharded (params by ``model_lib.LOGICAL_RULES``, the state by galore_jax's
  rules: each basis follows the side it spans, the rank axis is replicated)."""
  param_dtype, dtype = DTYPES[args.dtype]

  def make():
    return model_lib.Llama(cfg, dtype=dtype, param_dtype=param_dtype, attention=args.attention,
                           remat=args.remat, unroll=args.unroll, method=method(args),
                           rngs=nnx.Rngs(args.seed))

  tx, schedule = make_optimizer(args, name, steps)
  if mesh is None:
    model = make()
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param), schedule
  model = model_lib.create_sharded(make, mesh)
  with mesh_context(mesh):
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  # State that other transforms of the chain make on one device (counts) is replicated.
  replicated = NamedSharding(mesh, P())
  nnx.update(optimizer, jax.tree.map(
      lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
      nnx.state(optimizer)))
  return model, optimizer, schedule


def check_optimizers(args, names: list[str]):
  """Builds each optimizer of ``names`` at the flags' settings (transforms only, no state),
  so a flag one of them refuses stops the command before any of them trains."""
  steps = num_steps(args)
  for name in names:
    make_optimizer(optimizers.with_defaults(args, name), name, steps)
    optimizers.host_refresh(optimizers.with_defaults(args, name), name)  # (--host-refresh on)


def state_bytes(optimizer) -> int:
  """Bytes of the optimizer's state (moments, bases, counters)."""
  return gj.tree_bytes(nnx.state(optimizer, nnx.OptState))


def abstract_build(args, name: str, cfg: model_lib.LlamaConfig, steps: int, mesh=None):
  """``build``'s model and optimizer, abstract (``jax.ShapeDtypeStruct`` values, nothing
  allocated: a 7b on a laptop).  With a ``mesh`` of devices (a ``jax.sharding.Mesh``) each
  value carries the sharding ``build`` creates it with there: the params by
  ``model_lib.LOGICAL_RULES``, the optimizer state by galore_jax's rules
  (``gj.sharding.abstract_state``, the layout its init gives sharded params), the rest (counts,
  keys) replicated; ready to lower a step as a run on the mesh compiles it."""
  with mesh_context(mesh):  # (the params' logical names resolve to their mesh axes)
    model, optimizer = nnx.eval_shape(lambda: build(args, name, cfg, steps)[:2])
  if mesh is None:
    return model, optimizer
  weights = sharded(model, mesh)
  nnx.update(model, weights)
  # Traced, the state cannot see its params' shardings under Auto axes: its layout is the
  # rules', the one the eager init of a real build gives it.
  state = gj.sharding.abstract_state(optimizer.tx,
                                     nnx.to_pure_dict(nnx.state(weights, nnx.Param)))
  variables = jax.tree.leaves(optimizer.opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  for variable, value in zip(variables, jax.tree.leaves(state), strict=True):
    variable.value = value
  nnx.update(optimizer, jax.tree.map(lambda x: on_mesh(x, mesh), nnx.state(optimizer)))
  return model, optimizer


def sharded(abstract, mesh):
  """The state of the abstract module ``abstract`` (built under ``mesh_context(mesh)``), each
  value a ``jax.ShapeDtypeStruct`` with its ``NamedSharding`` on ``mesh`` (by its logical
  names, ``model_lib.LOGICAL_RULES``)."""
  with mesh_context(mesh):
    specs = nnx.get_partition_spec(nnx.state(abstract))
  shard = lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))
  return jax.tree.map(shard, nnx.state(abstract), specs)


def on_mesh(x: jax.ShapeDtypeStruct, mesh) -> jax.ShapeDtypeStruct:
  """``x`` with its ``NamedSharding``'s spec on ``mesh``; replicated where it has none."""
  spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else P()
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))


def per_device_bytes(tx, make, mesh) -> dict[str, int]:
  """Bytes one device holds of the model's variables (``weight_bytes``) and of ``tx``'s state
  (``optimizer_state_bytes``) on ``mesh``, from each leaf's shard shape: the params sharded by
  ``model_lib.LOGICAL_RULES``, the state by galore_jax's rules (``gj.sharding.abstract_state``).
  ``make`` builds the model; it runs abstractly, nothing is allocated.  (Uneven leaves do not
  occur: ``model_lib.check_divisible`` refuses the mesh first.)"""
  with mesh_context(mesh):
    abstract = nnx.eval_shape(make)
  weights = sharded(abstract, mesh)
  state = gj.sharding.abstract_state(tx, nnx.to_pure_dict(nnx.state(weights, nnx.Param)))

  def on_one_device(tree):
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))

  return {"weight_bytes": on_one_device(weights), "optimizer_state_bytes": on_one_device(state)}


def dry_run(args, names: list[str], plan_step=None, mesh=None) -> dict:
  """Parameter count, optimizer-state bytes and (with ``plan_step``, train.py's) XLA's memory
  plan of one train step, all abstract (7b fits a laptop).  The model's vocabulary is the
  config's, or the byte tokenizer's with ``--tokenizer bytes`` (as a real run's).  With a
  ``mesh`` (``--mesh``) every param is checked to divide over it (``model.check_divisible``)
  and what one device holds of the weights and the state is sized (``per_device``).  A mesh of
  devices that exist (a ``jax.sharding.Mesh``: ``--cpu-devices N`` on a CPU host) has the
  sharded step planned, per device (``plan_step(..., mesh)``); an ``AbstractMesh`` (more
  devices than the host has) keeps one device's unsharded plan and says how to get the other.
  ``planned_devices`` in the summary: the devices the plan's step runs over (1: unsharded)."""
  cfg = flags_config(args)
  steps = num_steps(args)
  param_dtype, dtype = DTYPES[args.dtype]

  def make():
    return model_lib.Llama(cfg, dtype=dtype, param_dtype=param_dtype, method=method(args),
                           rngs=nnx.Rngs(args.seed))

  # A mesh of devices that exist is planned sharded; an AbstractMesh (no devices) only sized.
  devices = mesh.size if isinstance(mesh, jax.sharding.Mesh) else 1
  if mesh is not None:
    model_lib.check_divisible(make, mesh)
    print(f"--mesh {dict(mesh.shape)}: every param divides over it; the sizes below are the"
          " whole model's, except the lines 'per device on the mesh', and XLA's plan of the"
          + (" step is per device on it" if devices > 1 else " step is one device's, unsharded"))
    if devices == 1 and mesh.size > 1:
      print(f"  (for XLA's plan per device on the mesh, run the dry run where its {mesh.size}"
            f" devices exist: on a CPU host, add --cpu-devices {mesh.size})")
  out = {}
  for name in names:
    abstract_model = nnx.eval_shape(make)
    pure = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
    tx, _ = make_optimizer(args, name, steps)
    opt_state = jax.eval_shape(tx.init, pure)
    counts = sizes(abstract_model)
    # LoRA's frozen bases and SLTrain's indices are weights too, with no gradient or state
    closed = optimizers.closed_form(args, name, pure)._replace(weights=counts["weight_bytes"])
    rank = optimizers.rank_for(args, name) if name in optimizers.PROJECTING else None
    out[name] = {"model": args.model, "method": method_of(args), **counts,
                 "planned_devices": devices, "mesh": None if mesh is None else dict(mesh.shape),
                 "optimizer_state_bytes": gj.tree_bytes(opt_state), "dtype": args.dtype,
                 "projection_rank": rank, "closed_form_bytes": closed._asdict()}
    print(f"{args.model} --method {method_of(args)}: {counts['trainable_params'] / 1e6:.1f}M"
          f" trainable params of {counts['params'] / 1e6:.1f}M"
          + (f" (+ {counts['index_elements'] / 1e6:.2f}M sparse indices)"
             if counts["index_elements"] else "")
          + f", weights {counts['weight_bytes'] / 2**30:.3f} GiB; {name}"
          + (f" (projection rank {rank})" if rank is not None else "") + " optimizer state "
          f"{out[name]['optimizer_state_bytes'] / 2**30:.3f} GiB ({args.dtype})")
    print(f"  closed form (gj.memory.estimate): weights {closed.weights / 2**30:.3f} GiB,"
          f" gradients {closed.gradients / 2**30:.3f} GiB"
          f" ({'one layer and the rest' if args.per_layer else 'the whole model'}), optimizer"
          f" state {closed.optimizer_state / 2**30:.3f} GiB")
    if mesh is not None:
      out[name]["per_device"] = per_device_bytes(tx, make, mesh)
      held = out[name]["per_device"]
      print(f"  per device on the mesh: weights {held['weight_bytes'] / 2**30:.3f} GiB, {name}"
            f" optimizer state {held['optimizer_state_bytes'] / 2**30:.3f} GiB")
    plan = None if plan_step is None else plan_step(args, name, cfg, steps,
                                                    mesh if devices > 1 else None)
    if plan is not None:
      out[name]["step_memory"] = plan
      print(plan_lines(args, name, plan, devices))
  summary = out[names[0]] if len(names) == 1 else out
  args.out.mkdir(parents=True, exist_ok=True)
  # Its own file: a dry run is no run, so it neither blocks nor replaces one in --out.
  (args.out / "dry_run.json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary


def plan_lines(args, name: str, plan: dict[str, int], devices: int) -> str:
  """The printed lines of XLA's plan of ``name``'s train step over ``devices`` devices (1: one
  device's, unsharded), and which of its figures is a device's peak."""
  platform = jax.devices()[0].platform
  where = (f"per device on this mesh of {devices} {platform} devices" if devices > 1
           else f"one {platform} device")
  gib = lambda k: f"{plan[k] / 2**30:.3f} GiB"
  return (f"  {name} train step (XLA's plan, {where}, batch {args.batch_size} x"
          f" {args.seq_len}): " + ", ".join(f"{k} {gib(k)}" for k in plan) + "\n"
          f"  peak per device: total {gib('total')} (arguments + outputs - aliased +"
          " temporaries), the figure to hold against one device's memory"
          + ("" if platform == "gpu" else f" (a {platform} plan: a GPU's fusions differ)"))

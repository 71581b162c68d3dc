"""Pretrain a LLaMA with galore_jax or a baseline, the way the GaLore papers did.

The papers' setup (reference/galore.md section 2): sequence length 256, each
document truncated / padded with pad masked out of the loss, linear warmup over
10% of the steps then cosine decay to 10% of the peak, gradient clipping and
weight decay optional, evaluation perplexity on a fixed validation token budget.
Data: C4 when you have it, any local text, a Hugging Face dataset, or by default
the Python standard library's source shipped with the interpreter.

Examples:
  python examples/llama/train.py --model 60m --optimizer galore_adamw --rank 128 \\
      --lr 0.01 --batch-size 512 --grad-accum 2 --steps 10000 --data /data/c4 --tokenizer t5-base
  python examples/llama/train.py --model tiny --tokenizer bytes --optimizer adamw,galore_adamw \\
      --steps 200 --batch-size 8      # compare two optimizers on the same batches
  python examples/llama/train.py --model 7b --optimizer galore_adamw --rank 1024 --dry-run
  python examples/llama/train.py --model 350m --optimizer ldadamw --rank 256 --data /data/c4 \\
      --tokenizer t5-base    # LDAdam: betas (0.908, 0.99), rho 0.908, lr 1e-3, no clipping
  python examples/llama/train.py --model tiny --tokenizer bytes --cpu-devices 8 \\
      --mesh data=2,fsdp=2,tensor=2     # sharded (here over 8 CPU devices)
  python examples/llama/train.py --model 1b --mesh fsdp=8 --coordinator host0:1234 \\
      --num-processes 2 --process-id 0 # multi-host: the same command on every host
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import queue
import sys
import threading
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make `examples.llama` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import galore_jax as gj
from examples.llama import data as data_lib
from examples.llama import model as model_lib

OPTIMIZERS = ("adamw", "galore_adamw", "ldadamw")
# adamw / galore_adamw: the GaLore scripts; ldadamw: the LDAdam C4 scripts (reference notes 1.6).
DEFAULT_LR = {"adamw": 1e-3, "galore_adamw": 1e-2, "ldadamw": 1e-3}
REFRESH_POLICIES = {"every": gj.every, "staggered": gj.staggered, "lazy": gj.lazy}
DTYPES = {  # name -> (param dtype, compute dtype)
    "bf16": (jnp.bfloat16, jnp.bfloat16),  # pure bf16, as the papers
    "mixed": (jnp.float32, jnp.bfloat16),  # fp32 master weights, bf16 compute
    "fp32": (jnp.float32, jnp.float32),
}


def parse_count(text: str) -> int:
  """'20M' -> 20_000_000; accepts K / M / B suffixes."""
  scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(text[-1:].upper(), 1)
  try:
    return int(float(text[:-1] if scale > 1 else text) * scale)
  except ValueError:
    raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 1000, 20M, 1.3B)") from None


def parse_mesh(text: str) -> dict[str, int]:
  """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4}; axes among data, fsdp, tensor."""
  sizes = {}
  for item in text.split(","):
    name, eq, size = item.strip().partition("=")
    if not eq or name not in model_lib.MESH_AXES or name in sizes:
      raise argparse.ArgumentTypeError(
          f"bad mesh {text!r}: give axis=size pairs, each axis once, among"
          f" {', '.join(model_lib.MESH_AXES)} (e.g. data=2,fsdp=4)")
    try:
      sizes[name] = int(size)
    except ValueError:
      raise argparse.ArgumentTypeError(f"bad mesh {text!r}: size {size!r} is not an int") from None
    if sizes[name] < 1:
      raise argparse.ArgumentTypeError(f"bad mesh {text!r}: sizes must be >= 1")
  return sizes


def _int_at_least(low: int):
  """An argparse type: an int >= ``low``."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
    if value < low:
      raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value
  parse.__name__ = f"int >= {low}"
  return parse


POSITIVE, NONNEGATIVE = _int_at_least(1), _int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      epilog=__doc__.split("\n\n", 2)[2],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  a = p.add_argument
  a("--model", default="60m", choices=sorted(model_lib.CONFIGS), help="model size (reference configs)")
  a("--optimizer", default="galore_adamw",
    help=f"one of {', '.join(OPTIMIZERS)}, or a comma list to compare them on the same data")
  a("--rank", type=POSITIVE, default=128, help="GaLore / LDAdam rank")
  a("--rho", type=float, default=0.908,
    help="LDAdam rho: weight of the momentum in the matrix the subspace tracks")
  a("--update-proj-gap", type=POSITIVE, default=200, help="GaLore refresh gap T")
  a("--galore-scale", type=float, default=0.25, help="GaLore scale alpha")
  a("--proj-type", default="std", choices=gj.PROJ_TYPES,
    help="projection side rule (ldadamw: std is the LDAdam reference's, square -> left)")
  a("--basis-method", default="svd", choices=sorted(gj.subspace.METHODS),
    help="how GaLore computes bases at a refresh (svd: exact, as the paper)")
  a("--refresh", default="every", choices=sorted(REFRESH_POLICIES),
    help="GaLore refresh policy: every (paper), staggered (spread over the gap), lazy (Q-GaLore)")
  a("--lr", type=float, default=None,
    help="peak learning rate (default: adamw 1e-3, galore_adamw 1e-2, ldadamw 1e-3)")
  a("--warmup", type=NONNEGATIVE, default=None, help="warmup steps (default: 10%% of the steps)")
  a("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of the peak")
  a("--weight-decay", type=float, default=0.0)
  a("--grad-clip", type=float, default=0.0, help="global-norm clipping (0: off)")
  a("--batch-size", type=POSITIVE, default=64, help="sequences per optimizer step")
  a("--grad-accum", type=POSITIVE, default=1, help="micro-batches per step (batch-size must divide)")
  a("--seq-len", type=int, default=256)
  a("--steps", type=POSITIVE, default=1000, help="optimizer steps")
  a("--tokens", type=parse_count, default=None, help="train tokens (overrides --steps; 1.3B ok)")
  a("--log-every", type=POSITIVE, default=10)
  a("--eval-every", type=NONNEGATIVE, default=1000, help="0: only at the end")
  a("--eval-tokens", type=parse_count, default=10_000_000, help="validation token budget")
  a("--save-every", type=NONNEGATIVE, default=1000, help="checkpoint period in steps (0: off)")
  a("--data", default="default", help=data_lib.SOURCE_HELP)
  a("--max-docs", type=POSITIVE, default=None, help="cap documents per split (quick runs)")
  a("--tokenizer", default="auto", help=data_lib.TOKENIZER_HELP)
  a("--vocab-size", type=POSITIVE, default=None, help="BPE vocab size (default: the model's)")
  a("--pack", action="store_true", help="pack documents instead of truncate/pad")
  a("--out", type=pathlib.Path, default=pathlib.Path("runs/llama"), help="output directory")
  a("--resume", action="store_true", help="continue from the last complete checkpoint in --out")
  a("--seed", type=int, default=0)
  a("--dtype", default="bf16", choices=sorted(DTYPES), help="bf16: pure bf16; mixed: fp32 master")
  a("--remat", action="store_true", help="rematerialise layers in the backward pass")
  a("--attention", default="auto", choices=["auto", "xla", "cudnn"],
    help="attention kernel: auto = cuDNN's flash kernel on a GPU for bf16 (head dim <= 128),"
         " else XLA")
  a("--dry-run", action="store_true", help="build abstractly, print sizes, write summary.json, exit")
  g = p.add_argument_group("sharding and multi-host")
  g.add_argument("--mesh", type=parse_mesh, default=None,
                 help="device mesh, e.g. data=2,fsdp=4 (axes data, fsdp, tensor; the sizes"
                 " multiply to the device count); params follow model.LOGICAL_RULES, the batch"
                 " is split over data x fsdp. Default: one device, no sharding")
  g.add_argument("--mesh-axis-types", default="auto", choices=["auto", "explicit"],
                 help="jax.sharding.AxisType of the mesh axes")
  g.add_argument("--coordinator", default=None,
                 help="host:port of process 0: calls jax.distributed.initialize (multi-host)")
  g.add_argument("--num-processes", type=POSITIVE, default=None, help="with --coordinator")
  g.add_argument("--process-id", type=NONNEGATIVE, default=None, help="with --coordinator")
  g.add_argument("--cpu-devices", type=POSITIVE, default=None,
                 help="number of CPU devices per process (jax_num_cpu_devices; for testing)")
  return p


def setup_devices(args, parser: argparse.ArgumentParser) -> jax.sharding.Mesh | None:
  """Device count, distributed runtime and mesh, before anything else touches devices."""
  try:
    if args.cpu_devices is not None:
      jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.coordinator is not None:
      if args.num_processes is None or args.process_id is None:
        parser.error("--coordinator needs --num-processes and --process-id")
      # CPU devices talk through gloo across processes (no effect on GPU / TPU).
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      jax.distributed.initialize(coordinator_address=args.coordinator,
                                 num_processes=args.num_processes, process_id=args.process_id)
    elif args.num_processes is not None or args.process_id is not None:
      parser.error("--num-processes / --process-id need --coordinator")
  except RuntimeError as e:  # the backend was initialised already (e.g. in-process calls)
    parser.error(f"--cpu-devices / --coordinator must come before JAX starts: {e}")
  if args.mesh is None:
    return None
  shape = tuple(args.mesh.get(name, 1) for name in model_lib.MESH_AXES)
  if math.prod(shape) != jax.device_count():
    parser.error(f"--mesh {','.join(f'{k}={v}' for k, v in args.mesh.items())} has"
                 f" {math.prod(shape)} devices, but jax.device_count() is {jax.device_count()}")
  split = shape[0] * shape[1]
  if (args.batch_size // args.grad_accum) % split:
    parser.error(f"--batch-size / --grad-accum = {args.batch_size // args.grad_accum} is not"
                 f" divisible by the data x fsdp mesh size {split}")
  kind = {"auto": jax.sharding.AxisType.Auto, "explicit": jax.sharding.AxisType.Explicit}
  return jax.make_mesh(shape, model_lib.MESH_AXES,
                       axis_types=(kind[args.mesh_axis_types],) * len(shape))


def mesh_context(mesh):
  """The mesh and the model's logical rules, set for everything under it."""
  if mesh is None:
    return contextlib.nullcontext()
  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(mesh))
  stack.enter_context(nnx.logical_axis_rules(model_lib.LOGICAL_RULES))
  return stack


def is_main_process() -> bool:
  return jax.process_index() == 0


def to_device(tokens: np.ndarray, mesh, batch_axis: int) -> jax.Array:
  """A host batch (the same on every process) as a device array; with a mesh, split
  along ``batch_axis`` over the data and fsdp axes (each process places its share)."""
  if mesh is None:
    return jnp.asarray(tokens)
  spec = [None] * tokens.ndim
  spec[batch_axis] = ("data", "fsdp")
  sharding = NamedSharding(mesh, P(*spec))
  return jax.make_array_from_callback(tokens.shape, sharding, lambda index: tokens[index])


def check_args(args: argparse.Namespace) -> list[str]:
  names = [n.strip() for n in args.optimizer.split(",") if n.strip()]
  for name in names:
    if name not in OPTIMIZERS:
      raise SystemExit(f"--optimizer: unknown {name!r}; choose from {', '.join(OPTIMIZERS)}")
  if not names:
    raise SystemExit("--optimizer: give at least one optimizer")
  if args.batch_size % args.grad_accum:
    raise SystemExit(f"--batch-size {args.batch_size} is not divisible by --grad-accum {args.grad_accum}")
  cfg = model_lib.CONFIGS[args.model]
  if args.seq_len > cfg.max_seq_len:
    raise SystemExit(f"--seq-len {args.seq_len} exceeds --model {args.model}'s max_seq_len {cfg.max_seq_len}")
  if args.seq_len < 2:
    raise SystemExit("--seq-len must be at least 2")
  return names


def check_vocab(max_id: int, vocab: int, split: str):
  """Every id must have an embedding row (an id past it would make the loss NaN)."""
  if max_id >= vocab:
    raise SystemExit(f"{split} data has token id {max_id} >= model vocab {vocab}: use a"
                     f" tokenizer with at most {vocab} tokens (--tokenizer / --vocab-size)")


def num_steps(args) -> int:
  if args.tokens is not None:
    return max(1, math.ceil(args.tokens / (args.batch_size * args.seq_len)))
  return args.steps


def make_optimizer(args, name: str, steps: int) -> tuple[optax.GradientTransformation, Any]:
  """The papers' optimizer for `name` and its learning-rate schedule."""
  peak = args.lr if args.lr is not None else DEFAULT_LR[name]
  warmup = args.warmup if args.warmup is not None else steps // 10
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, peak, warmup_steps=warmup, decay_steps=max(steps, warmup + 1),
      end_value=peak * args.min_lr_ratio)
  if name == "adamw":
    tx = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=args.weight_decay)
  elif name == "ldadamw":
    # The reference's settings: betas (0.908, 0.99) for every leaf (embeddings, norms and
    # lm_head get AdamW with them), error feedback on, and its side rule: --proj-type std
    # means the reference's "std" here (square kernels projected on the output axis, the
    # left; galore_jax's "std" would take the right); left / right / reverse_std as given.
    proj_type = "ldadam_std" if args.proj_type == "std" else args.proj_type
    if proj_type not in gj.LDADAM_PROJ_TYPES:
      raise SystemExit(f"--proj-type {args.proj_type} is not available for ldadamw")
    tx = gj.ldadamw(
        schedule, rank=args.rank, b1=0.908, b2=0.99, eps=1e-8, rho=args.rho,
        weight_decay=args.weight_decay, proj_type=proj_type,
        mask=model_lib.galore_targets, dimension_numbers=model_lib.LAYER_KERNEL_DIMS)
  else:
    tx = gj.galore_adamw(
        schedule, rank=args.rank, update_proj_gap=args.update_proj_gap, scale=args.galore_scale,
        proj_type=args.proj_type, weight_decay=args.weight_decay,
        mask=model_lib.galore_targets, dimension_numbers=model_lib.LAYER_KERNEL_DIMS,
        refresh=REFRESH_POLICIES[args.refresh](args.update_proj_gap), method=args.basis_method,
        key=args.seed)
  if args.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(args.grad_clip), tx)
  return tx, schedule


def build(args, name: str, cfg: model_lib.LlamaConfig, steps: int, mesh=None):
  """Model, optimizer and schedule; with a mesh, params and optimizer state are
  created sharded (params by ``model_lib.LOGICAL_RULES``, the state by galore_jax's
  rules: each basis follows the side it spans, the rank axis is replicated)."""
  param_dtype, dtype = DTYPES[args.dtype]

  def make():
    return model_lib.Llama(cfg, dtype=dtype, param_dtype=param_dtype, attention=args.attention,
                           remat=args.remat, rngs=nnx.Rngs(args.seed))

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


def loss_terms(model, tokens_BxT, pad_id: int):
  """Summed next-token cross-entropy over non-pad targets, and their count."""
  logits_BxTxV = model(tokens_BxT[:, :-1])
  targets_BxT = tokens_BxT[:, 1:]
  mask_BxT = targets_BxT != pad_id
  ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
  return jnp.sum(ce_BxT * mask_BxT), jnp.sum(mask_BxT)


def explicit_mesh():
  """The mesh set with ``jax.set_mesh`` when its axes are Explicit, else ``None``."""
  mesh = jax.sharding.get_abstract_mesh()
  explicit = not mesh.empty and all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
  return mesh if explicit else None


def with_auto_axes(fn, out_specs):
  """``fn`` as is, or, under an Explicit mesh, run with Auto axes (the model is not
  written for sharding in types; the partitioner places its activations), its
  outputs handed back with the typed shardings ``out_specs()`` (a tree of
  ``PartitionSpec``, built only when needed)."""
  if explicit_mesh() is None:
    return fn
  return jax.sharding.auto_axes(fn, out_sharding=out_specs())


def step_fn(model, optimizer, tokens_AxBxT, pad_id: int):
  """One optimizer step over A micro-batches (gradient accumulation); jitted as
  ``train_step``.

  As the reference, each micro-batch loss is a mean over its own tokens and the
  step's gradient is the mean over micro-batches.
  """

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_and_grads(params, rest, tokens_AxBxT):
    def micro(params, tokens_BxT):
      total, count = loss_terms(nnx.merge(graphdef, params, rest), tokens_BxT, pad_id)
      return total / jnp.maximum(count, 1)

    def accumulate(carry, tokens_BxT):
      loss_sum, grad_sum = carry
      loss, grads = jax.value_and_grad(micro)(params, tokens_BxT)
      grad_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32), grad_sum, grads)
      return (loss_sum + loss, grad_sum), None

    # Accumulate in float32 whatever the param dtype, then hand the optimizer
    # gradients in the param dtype (its state dtypes follow them).
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (jnp.zeros([]), zeros), tokens_AxBxT)
    A = tokens_AxBxT.shape[0]
    grads = jax.tree.map(lambda s, p: (s / A).astype(p.dtype), grad_sum, params)
    return loss_sum / A, grads

  # Explicit axes: the gradients come back sharded as their params.
  param_specs = lambda: (P(), jax.tree.map(lambda p: jax.typeof(p).sharding.spec, params))
  loss, grads = with_auto_axes(loss_and_grads, param_specs)(params, rest, tokens_AxBxT)
  optimizer.update(model, grads)
  return loss, optax.tree.norm(grads)


train_step = nnx.jit(step_fn, static_argnames=("pad_id",))


def sharded_train_step(model, optimizer):
  """``train_step`` for a model and optimizer living on a mesh: the updated params
  and optimizer state are constrained to the shardings they have now.  (Under
  Auto axes the partitioner may otherwise hand them back sharded differently,
  and the next call would compile the step again.)"""
  if explicit_mesh() is not None:  # shardings are part of the types: nothing to pin
    return train_step
  shardings = jax.tree.map(lambda x: x.sharding, (nnx.state(model), nnx.state(optimizer)))

  @nnx.jit(static_argnames=("pad_id",))
  def step(model, optimizer, tokens_AxBxT, pad_id: int):
    out = step_fn(model, optimizer, tokens_AxBxT, pad_id)
    state = (nnx.state(model), nnx.state(optimizer))
    model_state, opt_state = jax.tree.map(jax.lax.with_sharding_constraint, state, shardings)
    nnx.update(model, model_state)
    nnx.update(optimizer, opt_state)
    return out

  return step


@nnx.jit(static_argnames=("pad_id",))
def eval_step(model, tokens_BxT, pad_id: int):
  graphdef, state = nnx.split(model)
  terms = lambda state, tokens: loss_terms(nnx.merge(graphdef, state), tokens, pad_id)
  return with_auto_axes(terms, lambda: (P(), P()))(state, tokens_BxT)


def evaluate(model, batches, pad_id: int, mesh=None) -> dict[str, float]:
  total, count = 0.0, 0
  for tokens in batches:
    t, c = eval_step(model, to_device(tokens, mesh, 0), pad_id=pad_id)
    total, count = total + float(t), count + int(c)
  loss = total / max(count, 1)
  return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_tokens": count}


def peak_memory_bytes() -> int | None:
  """The allocator's peak on the first local device since the process started (None where the
  backend keeps no statistics). It cannot be reset: with several optimizers in one process a
  later one reports at least the earlier ones' peak; see :func:`step_memory_bytes`."""
  stats = jax.local_devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def step_memory_bytes(step, *args, **kwargs) -> int | None:
  """XLA's memory plan for one call of the jitted ``step`` on these arguments: arguments +
  outputs that do not reuse an argument's buffer + temporaries, per device.

  It belongs to this optimizer's step alone (unlike the process-wide allocator peak), and is
  what decides whether a step fits. Called after the step has run, lowering and compiling hit
  jit's caches. None where the backend gives no memory analysis.
  """
  stats = step.lower(*args, **kwargs).compile().memory_analysis()
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


class Checkpoints:
  """Orbax checkpoints of model + optimizer state + data position.

  Orbax writes each step to a temporary directory and renames it when complete,
  so a run killed mid-save leaves nothing that `latest_step` would pick up.
  """

  def __init__(self, directory: pathlib.Path):
    self.mngr = ocp.CheckpointManager(
        directory.resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))

  def save(self, step: int, model, optimizer, meta: dict):
    state = {"params": nnx.state(model, nnx.Param), "opt": nnx.state(optimizer)}
    self.mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def restore_latest(self, model, optimizer) -> dict | None:
    step = self.mngr.latest_step()
    if step is None:
      return None
    state = {"params": nnx.state(model, nnx.Param), "opt": nnx.state(optimizer)}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = self.mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    nnx.update(model, restored.state["params"])
    nnx.update(optimizer, restored.state["opt"])
    return restored.meta

  def close(self):
    self.mngr.wait_until_finished()
    self.mngr.close()


class Prefetch:
  """Tokenizes the next batches in a background thread while the device trains.

  Yields ``(batch, data position after it)``: the position saved in a checkpoint
  is that of the last batch trained on, not of the last one prefetched.
  """

  def __init__(self, batches: data_lib.Batches, depth: int = 4):
    self.batches, self.queue = batches, queue.Queue(depth)
    self.stop = threading.Event()
    self.thread = threading.Thread(target=self._produce, daemon=True)
    self.thread.start()

  def _produce(self):
    while not self.stop.is_set():
      try:
        item = (next(self.batches), self.batches.state())
      except BaseException as e:  # handed to the consumer, raised there
        item = e
      while not self.stop.is_set():
        try:
          self.queue.put(item, timeout=0.1)
          break
        except queue.Full:
          pass
      if isinstance(item, BaseException):
        return

  def __next__(self):
    item = self.queue.get()
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self):
    self.stop.set()
    self.thread.join()


def state_bytes(optimizer) -> int:
  return gj.tree_bytes(nnx.state(optimizer, nnx.OptState))


def dry_run(args, names: list[str]) -> dict:
  """Parameter count and optimizer-state bytes, all abstract (7b fits a laptop)."""
  cfg = model_lib.CONFIGS[args.model]
  steps = num_steps(args)
  param_dtype, dtype = DTYPES[args.dtype]
  abstract_model = nnx.eval_shape(lambda: model_lib.Llama(
      cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(args.seed)))
  params = nnx.state(abstract_model, nnx.Param)
  pure = nnx.to_pure_dict(params)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(pure))
  out = {}
  for name in names:
    tx, _ = make_optimizer(args, name, steps)
    opt_state = jax.eval_shape(tx.init, pure)
    out[name] = {"model": args.model, "params": num_params, "trainable_params": num_params,
                 "optimizer_state_bytes": gj.tree_bytes(opt_state), "dtype": args.dtype}
    print(f"{args.model}: {num_params / 1e6:.1f}M params; {name} optimizer state "
          f"{out[name]['optimizer_state_bytes'] / 2**30:.3f} GiB ({args.dtype})")
  summary = out[names[0]] if len(names) == 1 else out
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary


def model_config(args, tokenizer) -> model_lib.LlamaConfig:
  cfg = model_lib.CONFIGS[args.model]
  if tokenizer.vocab_size < cfg.V and tokenizer.name == "bytes":
    cfg = dataclasses.replace(cfg, V=tokenizer.vocab_size)  # no unused embedding rows
  return cfg


def read_metrics(path: pathlib.Path, upto_step: int | None = None) -> list[dict]:
  """The rows of ``metrics.jsonl`` up to ``upto_step``; a line a killed run left
  half-written is dropped with a warning."""
  if not path.exists():
    return []
  rows = []
  for i, line in enumerate(path.read_text().splitlines()):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      print(f"warning: {path}: dropping unreadable line {i + 1} (a run killed mid-write?)",
            file=sys.stderr)
  return [r for r in rows if upto_step is None or r["step"] <= upto_step]


def write_atomically(path: pathlib.Path, text: str):
  """``path.write_text(text)`` through a temporary file and a rename, so a kill never
  leaves ``path`` truncated."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


# The flags that shape a run's trajectory, stored with each checkpoint; a resume
# with other values says which changed (--steps may grow to extend a run).
RUN_FLAGS = ("model", "rank", "rho", "update_proj_gap", "galore_scale", "proj_type",
             "basis_method", "refresh", "lr", "warmup", "min_lr_ratio", "weight_decay",
             "grad_clip", "batch_size", "grad_accum", "seq_len", "seed", "dtype", "pack",
             "tokenizer", "vocab_size")


def run_flags(args, name: str) -> dict:
  return {"optimizer": name, **{k: getattr(args, k) for k in RUN_FLAGS}}


def changed_flags(saved: dict | None, now: dict) -> list[str]:
  """``--flag old -> new`` for every run flag that differs from the checkpoint's."""
  if not saved:  # a checkpoint from before the flags were stored
    return []
  return [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {v!r}"
          for k, v in now.items() if k in saved and saved[k] != v]


def refuse_old_checkpoints(name: str, out: pathlib.Path):
  """Stops a run without ``--resume`` whose ``out`` holds checkpoints: Orbax would skip
  every save at or below the old run's latest step, and a later ``--resume`` would
  restore the old run, so two runs would be mixed."""
  if not (out / "checkpoints").is_dir():
    return
  ckpt = Checkpoints(out / "checkpoints")
  latest = ckpt.mngr.latest_step()
  ckpt.close()
  if latest is not None:
    raise SystemExit(
        f"[{name}] {out / 'checkpoints'} holds checkpoints of an earlier run (latest step"
        f" {latest}): pass --resume to continue it, or choose another --out")


def train(args, name: str, out: pathlib.Path, source, tokenizer, eval_set, mesh=None) -> dict:
  """Trains one optimizer; returns its summary (also written to out/summary.json).

  With a mesh everything runs under it.  Every process runs the same steps on the
  same batches; only process 0 writes files (metrics, config, summary), while the
  checkpoints are written by all of them together (Orbax)."""
  with mesh_context(mesh):
    return _train(args, name, out, source, tokenizer, eval_set, mesh)


def _train(args, name, out, source, tokenizer, eval_set, mesh) -> dict:
  main_process = is_main_process()
  out.mkdir(parents=True, exist_ok=True)
  steps = num_steps(args)
  cfg = model_config(args, tokenizer)
  model, optimizer, schedule = build(args, name, cfg, steps, mesh)
  batches = data_lib.Batches(source, tokenizer, seq_len=args.seq_len, batch_size=args.batch_size,
                             seed=args.seed, pack=args.pack)
  ckpt = Checkpoints(out / "checkpoints")
  metrics_path = out / "metrics.jsonl"
  start_step, flags = 0, run_flags(args, name)
  if args.resume:
    meta = ckpt.restore_latest(model, optimizer)
    if meta is not None:
      start_step = int(meta["step"])
      batches.restore(meta["data"])
      print(f"[{name}] resumed from step {start_step}")
      changed = changed_flags(meta.get("run"), flags)
      if changed:
        print(f"[{name}] warning: resuming a run saved with other flags: {'; '.join(changed)}",
              file=sys.stderr)
    elif args.resume:
      print(f"[{name}] --resume: no complete checkpoint in {out / 'checkpoints'}, starting fresh")
  step_jit = train_step if mesh is None else sharded_train_step(model, optimizer)
  # nnx.jit walks the model and optimizer graphs at every call: milliseconds of host time per
  # step, more for GaLore's larger state, and not hidden behind the device since the loop waits
  # for each loss. cached_partial walks them once and updates them in place.
  run_step = nnx.cached_partial(step_jit, model, optimizer)
  # Keep only what the restored state has seen (a killed run may have logged past it).
  write = write_atomically if main_process else (lambda *_: None)
  logged = read_metrics(metrics_path, start_step) if main_process else []  # this process's rows
  write(metrics_path, "".join(json.dumps(r) + "\n" for r in logged))
  write(out / "config.json", json.dumps(
      {**{k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()},
       "optimizer": name, "model_config": dataclasses.asdict(cfg), "steps_total": steps,
       "tokenizer_name": tokenizer.name, "vocab_size": tokenizer.vocab_size,
       "params": cfg.num_params(), "optimizer_state_bytes": state_bytes(optimizer),
       "mesh": None if mesh is None else dict(mesh.shape), "processes": jax.process_count()},
      indent=2) + "\n")

  A, tokens_per_step = args.grad_accum, args.batch_size * args.seq_len
  print(f"[{name}] {args.model}: {cfg.num_params() / 1e6:.1f}M params, optimizer state "
        f"{state_bytes(optimizer) / 2**20:.1f} MiB, {steps} steps x {tokens_per_step:,} tokens")
  last_eval, window, data_wait_s, step_memory = {}, [], 0.0, None
  bar = tqdm(total=steps, initial=start_step, desc=name, unit="step", dynamic_ncols=True,
             disable=None if main_process else True)
  prefetch = Prefetch(batches)
  try:
    with (metrics_path.open("a") if main_process else contextlib.nullcontext()) as log:
      for step in range(start_step + 1, steps + 1):
        waited = time.perf_counter()
        tokens, position = next(prefetch)
        data_wait_s += time.perf_counter() - waited  # > 0: the loader cannot keep up
        check_vocab(int(tokens.max()), cfg.V, "training")
        tokens_AxBxT = to_device(tokens.reshape(A, args.batch_size // A, args.seq_len), mesh, 1)
        start = time.perf_counter()
        loss, grad_norm = run_step(tokens_AxBxT, pad_id=tokenizer.pad_id)
        loss = float(loss)  # waits for the step
        window.append(time.perf_counter() - start)
        if step == start_step + 1:  # after the first step: the compile is cached
          step_memory = step_memory_bytes(step_jit, model, optimizer, tokens_AxBxT,
                                          pad_id=tokenizer.pad_id)
        if not math.isfinite(loss):
          raise SystemExit(f"[{name}] loss is {loss} at step {step}; lower --lr or add --grad-clip")
        row = None
        if step % args.log_every == 0 or step == steps:
          # The median step time of the window: a refresh step does not move it.
          step_time = float(np.median(window))
          row = {"step": step, "tokens": step * tokens_per_step, "loss": loss,
                 "lr": float(schedule(step - 1)), "grad_norm": float(grad_norm),
                 "tokens_per_s": tokens_per_step / step_time, "step_time_s": step_time,
                 "data_wait_s": data_wait_s, "peak_memory_bytes": peak_memory_bytes(),
                 "refreshes": int(gj.refresh_counts(optimizer.opt_state))}
          window, data_wait_s = [], 0.0
          bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}")
        if (args.eval_every and step % args.eval_every == 0) or step == steps:
          last_eval = evaluate(model, eval_set, tokenizer.pad_id, mesh)
          row = {**(row or {"step": step, "tokens": step * tokens_per_step, "loss": loss}),
                 **last_eval}
          tqdm.write(f"[{name}] step {step}: eval loss {last_eval['eval_loss']:.4f}, "
                     f"ppl {last_eval['eval_ppl']:.2f}")
        if row is not None:
          logged.append(row)
          if main_process:
            log.write(json.dumps(row) + "\n")
            log.flush()
        if args.save_every and (step % args.save_every == 0 or step == steps):
          ckpt.save(step, model, optimizer, {"step": step, "data": position, "run": flags})
        bar.update(1)
  finally:
    prefetch.close()
    bar.close()
    ckpt.close()
  if not last_eval:  # resumed a finished run
    last_eval = evaluate(model, eval_set, tokenizer.pad_id, mesh)

  rows = logged
  speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
  summary = {
      "optimizer": name, "model": args.model, "params": cfg.num_params(),
      "optimizer_state_bytes": state_bytes(optimizer),
      "step_memory_bytes": step_memory,
      "peak_memory_bytes": peak_memory_bytes(),
      "tokens_per_s": float(np.median(speeds)) if speeds else None,
      "data_wait_s": sum(r.get("data_wait_s", 0.0) for r in rows),
      "final_loss": rows[-1]["loss"] if rows else None, **last_eval,
      "data_corrupt_files": source.skipped,
  }
  if source.skipped and main_process:
    print(f"[{name}] warning: corrupt parts of {source.skipped} data file(s) were skipped"
          " (see the warnings above)",
          file=sys.stderr)
  write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
  if jax.process_count() > 1:  # every process reports what it computed
    print(f"[{name}] process {jax.process_index()}/{jax.process_count()}: "
          f"losses {json.dumps([r['loss'] for r in rows])}", flush=True)
  return summary


def print_table(summaries: dict[str, dict]):
  def fmt_bytes(b):
    return "n/a" if b is None else f"{b / 2**20:,.1f} MiB"

  print(f"\n{'optimizer':14s} {'opt state':>12s} {'step mem':>12s} {'peak mem':>12s} "
        f"{'tokens/s':>10s} {'val loss':>9s} {'val ppl':>9s}")
  for name, s in summaries.items():
    tps = "n/a" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:,.0f}"
    print(f"{name:14s} {fmt_bytes(s['optimizer_state_bytes']):>12s} "
          f"{fmt_bytes(s.get('step_memory_bytes')):>12s} "
          f"{fmt_bytes(s['peak_memory_bytes']):>12s} {tps:>10s} "
          f"{s.get('eval_loss', float('nan')):9.4f} {s.get('eval_ppl', float('nan')):9.2f}")
  print("step mem: XLA's plan for one train step; peak mem: the device allocator's peak since"
        " the process started (a later optimizer reports at least an earlier one's)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = build_parser()
  args = parser.parse_args(argv)
  names = check_args(args)
  mesh = setup_devices(args, parser)
  if args.dry_run:
    return dry_run(args, names)
  outs = {name: args.out / name if len(names) > 1 else args.out for name in names}
  if not args.resume:  # before any work: every optimizer's --out must be free
    for name, out in outs.items():
      refuse_old_checkpoints(name, out)
  source = data_lib.resolve_source(args.data, max_docs=args.max_docs)
  tokenizer = data_lib.load_tokenizer(
      args.tokenizer, source=source,
      vocab_size=args.vocab_size or model_lib.CONFIGS[args.model].V)
  eval_set = data_lib.eval_batches(source, tokenizer, seq_len=args.seq_len,
                                   batch_size=args.batch_size // args.grad_accum,
                                   eval_tokens=args.eval_tokens)
  check_vocab(max((int(b.max()) for b in eval_set), default=0),
              model_config(args, tokenizer).V, "validation")
  if is_main_process():
    print(f"data: {source.name}; tokenizer: {tokenizer.name} ({tokenizer.vocab_size} tokens); "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}"
          + ("" if mesh is None else f"; mesh {dict(mesh.shape)} ({args.mesh_axis_types}) over "
             f"{jax.process_count()} process(es)"))
  summaries = {}
  for name, out in outs.items():
    summaries[name] = train(args, name, out, source, tokenizer, eval_set, mesh)
  if is_main_process():
    print_table(summaries)
  if len(names) > 1 and is_main_process():
    (args.out / "comparison.json").write_text(json.dumps(summaries, indent=2) + "\n")
  return summaries


if __name__ == "__main__":
  main()

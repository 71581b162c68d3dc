"""The LLaMA example's training loop and its jitted steps; the command line's entry point.

  python examples/llama/train.py --help

``main(argv)`` parses the flags (cli.py), sets up the devices and the mesh (devices.py),
reads the data (data/), then trains each optimizer of ``--optimizer`` in turn on the same
batches (``train``) and returns their summaries.  Beside this file: build.py (the model and
its optimizer), optimizers.py (the optimizers and their schedules), checkpoints.py (save and
resume, integrity.py the checksums), stopping.py (SIGINT / SIGTERM) and outputs.py
(metrics.jsonl, config.json, summary.json, the final table).  Run as a script, errors are
one line each (``cli.run_command``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import pathlib
import shlex
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make `examples.llama` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import galore_jax as gj
from galore_jax import nn as gnn
from examples.llama import build as build_lib
from examples.llama import checkpoints, cli, clipping, flops, optimizers, outputs, stopping
from examples.llama import data as data_lib
from examples.llama import model as model_lib
from examples.llama import per_layer
from examples.llama.devices import (batch_sharding, check_same_everywhere, explicit_mesh,
                                    is_main_process, memory_plan, mesh_context,
                                    peak_memory_bytes, setup_devices, step_memory_bytes,
                                    to_device)

def loss_terms(model, tokens_BxT, pad_id: int):
  """Summed next-token cross-entropy over non-pad targets, and their count."""
  return model_lib.cross_entropy_terms(model(tokens_BxT[:, :-1]), tokens_BxT[:, 1:], pad_id)


def step_fn(model, optimizer, tokens_AxBxT, pad_id: int, galore_refresh: bool | None = None):
  """One optimizer step over A micro-batches (gradient accumulation); jitted as
  ``train_step``.  ``galore_refresh`` (static; ``optimizers.host_refresh``) is handed to the
  optimizer: the refresh decided on the host, no ``lax.cond`` in the step.

  As the reference, each micro-batch loss is a mean over its own tokens and the
  step's gradient is the mean over micro-batches.  With one micro-batch the gradient
  goes to the optimizer as autodiff returns it (in the param dtype): no accumulator
  exists.  With several, they are summed in a float32 accumulator of the params' shapes:
  bfloat16 keeps 8 bits of mantissa, so a bf16 sum of A micro-gradients would lose about
  log2(A) of them, while float32 sums are exact to bf16 precision for any practical A.
  """

  # The dropout streams (LoRA's) advance in the loss and are handed back; the frozen weights
  # and SLTrain's supports (``rest``) get no gradient and are not written.
  graphdef, params, rngs, rest = nnx.split(model, nnx.Param, nnx.RngState, ...)

  def loss_and_grads(params, rngs, rest, tokens_AxBxT):
    def micro(params, rngs, rest, tokens_BxT):
      # (copied: variables of this trace level, as the params' are)
      rngs, rest = jax.tree.map(lambda x: x, (rngs, rest))
      m = nnx.merge(graphdef, params, rngs, rest)
      total, count = loss_terms(m, tokens_BxT, pad_id)
      return total / jnp.maximum(count, 1), nnx.state(m, nnx.RngState)

    grad = jax.value_and_grad(micro, has_aux=True)
    if tokens_AxBxT.shape[0] == 1:  # no accumulation: no full-size float32 buffer
      (loss, rngs), grads = grad(params, rngs, rest, tokens_AxBxT[0])
      return loss, grads, rngs

    def accumulate(carry, tokens_BxT):
      loss_sum, grad_sum, rngs = carry
      (loss, rngs), grads = grad(params, rngs, rest, tokens_BxT)
      grad_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32), grad_sum, grads)
      return (loss_sum + loss, grad_sum, rngs), None

    # Accumulate in float32 whatever the param dtype, then hand the optimizer
    # gradients in the param dtype (its state dtypes follow them).
    # (zeros_like: under Explicit axes the sums are sharded as their params, as the scan's
    # carry must keep its type)
    zeros = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
    (loss_sum, grad_sum, rngs), _ = jax.lax.scan(
        accumulate, (jnp.zeros([]), zeros, rngs), tokens_AxBxT)
    A = tokens_AxBxT.shape[0]
    grads = jax.tree.map(lambda s, p: (s / A).astype(p.dtype), grad_sum, params)
    return loss_sum / A, grads, rngs

  # Explicit axes: the model runs with its shardings typed (model.py says where they need a
  # decision), and the gradients come back sharded as their params.
  loss, grads, rngs = loss_and_grads(params, rngs, rest, tokens_AxBxT)
  nnx.update(model, rngs)
  optimizer.update(model, grads, **refresh_kwargs(galore_refresh))
  return loss, clipping.global_norm(grads)  # float32, as the per-layer step's


def refresh_kwargs(galore_refresh: bool | None) -> dict:
  """The optimizer's extra argument for a host decision; none without one."""
  return {} if galore_refresh is None else {"galore_refresh": galore_refresh}


# The model's and the optimizer's buffers are donated: the step writes the new params and
# state into them, so a step holds one copy of each instead of two (at 7b, 21 GiB less).
train_step = nnx.jit(step_fn, static_argnames=("pad_id", "galore_refresh"),
                     donate_argnums=(0, 1))


def jitted_step(args):
  """The jitted train step of a run on one device: ``train_step``, or with ``--per-layer``
  the per-layer step (its optimizer updates inside the backward pass)."""
  if not args.per_layer:
    return train_step
  return per_layer.train_step(max_norm_of(args))


def max_norm_of(args) -> float | None:
  """The per-layer step's clip: ``--grad-clip``, ``None`` without one.

  Example:
    >>> max_norm_of(argparse.Namespace(grad_clip=0.0)) is None
    True
  """
  return args.grad_clip if args.grad_clip > 0 else None


def run_step_of(args, model, optimizer, mesh):
  """The jitted train step of a run: ``jitted_step`` on one device or on a mesh of Explicit
  axes (the shardings are part of the types), ``sharded_train_step`` on a mesh of Auto axes
  (of the per-layer step with ``--per-layer``)."""
  if mesh is None or explicit_mesh() is not None:
    return jitted_step(args)
  if not args.per_layer:
    return sharded_train_step(model, optimizer)
  return sharded_train_step(model, optimizer, jitted_step(args), functools.partial(
      per_layer.step_fn, max_norm=max_norm_of(args),
      stack_specs=per_layer.stack_specs(model, optimizer)))


def sharded_train_step(model, optimizer, jitted=train_step, fn=step_fn):
  """``jitted`` (a jitted ``fn``: ``train_step`` of ``step_fn``) for a model and optimizer
  living on a mesh: the updated params and optimizer state are constrained to the shardings
  they have now.  (Under Auto axes the partitioner may otherwise hand them back sharded
  differently, and the next call would compile the step again.)"""
  if explicit_mesh() is not None:  # shardings are part of the types: nothing to pin
    return jitted
  shardings = jax.tree.map(lambda x: x.sharding, (nnx.state(model), nnx.state(optimizer)))

  @nnx.jit(static_argnames=("pad_id", "galore_refresh"), donate_argnums=(0, 1))
  def step(model, optimizer, tokens_AxBxT, pad_id: int, galore_refresh: bool | None = None):
    out = fn(model, optimizer, tokens_AxBxT, pad_id, galore_refresh=galore_refresh)
    keep_shardings(model, optimizer, shardings)
    return out

  return step


def keep_shardings(model, optimizer, shardings) -> None:
  """Inside a jitted step: the model's and the optimizer's new state constrained to
  ``shardings`` (those they had before the step)."""
  state = (nnx.state(model), nnx.state(optimizer))
  model_state, opt_state = jax.tree.map(jax.lax.with_sharding_constraint, state, shardings)
  nnx.update(model, model_state)
  nnx.update(optimizer, opt_state)


def sharded_relora_step(model, optimizer):
  """``relora_step`` for a model and optimizer on a mesh, pinned as ``sharded_train_step``
  is: unpinned, the merge handed the params back laid out anew under Auto axes, and the
  train step compiled again after the first merge (its time counted in the speed)."""
  if explicit_mesh() is not None:
    return relora_step
  shardings = jax.tree.map(lambda x: x.sharding, (nnx.state(model), nnx.state(optimizer)))

  @nnx.jit(donate_argnums=(0, 1))
  def merge(model, optimizer, key):
    gnn.relora_merge(model, optimizer, key)
    keep_shardings(model, optimizer, shardings)

  return merge


@nnx.jit(donate_argnums=(0, 1))
def relora_step(model, optimizer, key):
  """ReLoRA's restart (``gnn.relora_merge``): the adapters folded into the bases, redrawn,
  and their optimizer state reset; the model computes the same function after it."""
  gnn.relora_merge(model, optimizer, key)


def relora_every(run) -> int:
  """The merge period of a ``--method relora`` run; 0 for the other methods."""
  if optimizers.method_of(run.args) != "relora":
    return 0
  return optimizers.relora_every(run.args, run.steps)


@nnx.jit(static_argnames=("pad_id",))
def eval_step(model, tokens_BxT, pad_id: int):
  """The summed loss over one batch's non-pad targets and their count, dropout off."""
  graphdef, state = nnx.split(nnx.view(model, deterministic=True, raise_if_not_found=False))
  return loss_terms(nnx.merge(graphdef, state), tokens_BxT, pad_id)


def evaluate(model, batches, pad_id: int, mesh=None) -> dict[str, float]:
  """The mean loss, perplexity and token count over ``batches``."""
  total, count = 0.0, 0
  for tokens in batches:
    t, c = eval_step(model, to_device(tokens, mesh, 0), pad_id=pad_id)
    total, count = total + float(t), count + int(c)
  loss = total / max(count, 1)
  return {"eval_loss": loss, "eval_ppl": outputs.perplexity(loss), "eval_tokens": count}


@dataclasses.dataclass
class Run:
  """One optimizer's run as the loop sees it: what it trains, where it writes, how far it is."""

  args: Any
  name: str
  out: pathlib.Path
  mesh: Any
  cfg: model_lib.LlamaConfig
  steps: int
  tokenizer: Any
  eval_set: list
  model: Any
  optimizer: Any
  schedule: Any
  batches: data_lib.Batches
  ckpt: checkpoints.Checkpoints
  flags: dict  # the run flags, saved with each checkpoint
  start_step: int
  step_jit: Any  # the jitted step (its memory plan is reported)
  run_step: Any  # the same, bound to the model and the optimizer
  main_process: bool
  stop: stopping.StopRequest
  host_refresh: Any = None  # optimizers.host_refresh's rule, or None (the step keeps its cond)
  merge: Any = None  # ReLoRA's restart (relora_step, pinned on a mesh)
  logged: list[dict] = dataclasses.field(default_factory=list)  # this process's metrics rows
  last_eval: dict = dataclasses.field(default_factory=dict)
  step_memory: int | None = None
  window: list[float] = dataclasses.field(default_factory=list)  # step times since the last log
  # The first step's time (its compile included): the speed only when nothing else is timed.
  first_step_s: float | None = None
  data_wait_s: float = 0.0  # waited for batches since the last log
  # Tokens trained on up to start_step, as a resume's checkpoint records them (None: one
  # saved before that record, taken as start_step batches of this run's size).
  start_tokens: int | None = 0
  resumed_at_end: bool = False  # from its run's last step: a run extended by --steps

  @property
  def tokens_per_step(self) -> int:
    """Tokens per optimizer step: batch size x sequence length."""
    return self.args.batch_size * self.args.seq_len

  def tokens_at(self, step: int) -> int:
    """Tokens trained on up to ``step``: a resume may have changed the batch's size."""
    if self.start_tokens is None:  # resumed from a checkpoint saved before the record
      return step * self.tokens_per_step
    return self.start_tokens + (step - self.start_step) * self.tokens_per_step


def train(args, name: str, out: pathlib.Path, source, tokenizer, eval_set, mesh=None,
          stop: stopping.StopRequest | None = None) -> dict:
  """Trains one optimizer; returns its summary (also written to out/summary.json).

  With a mesh everything runs under it.  Every process runs the same steps on the
  same batches; only process 0 writes files (metrics, config, summary), while the
  checkpoints are written by all of them together (Orbax).  A signal recorded in
  ``stop`` ends the run at the next step boundary, after a checkpoint (``Stopped``)."""
  args = optimizers.with_defaults(args, name)
  with mesh_context(mesh):
    return _train(args, name, out, source, tokenizer, eval_set, mesh,
                  stop or stopping.StopRequest())


def _train(args, name, out, source, tokenizer, eval_set, mesh, stop) -> dict:
  run = start_run(args, name, out, source, tokenizer, eval_set, mesh, stop)
  earlier = finished_summary(run)
  if earlier is not None:
    return earlier
  open_outputs(run)
  loop(run)
  return finish(run, source)


def start_run(args, name, out, source, tokenizer, eval_set, mesh, stop) -> Run:
  """Builds the model, the optimizer, the batches and the checkpoints; with ``--resume``
  restores the newest good checkpoint into them."""
  out.mkdir(parents=True, exist_ok=True)
  steps = cli.num_steps(args)
  if optimizers.method_of(args) == "relora":  # its default period follows --steps: record it
    args = argparse.Namespace(**{**vars(args),
                                 "relora_every": optimizers.relora_every(args, steps)})
  cfg = build_lib.model_config(args, tokenizer)
  model, optimizer, schedule = build_lib.build(args, name, cfg, steps, mesh)
  batches = data_lib.Batches(source, tokenizer, seq_len=args.seq_len, batch_size=args.batch_size,
                             seed=args.seed, pack=args.pack)
  ckpt = checkpoints.Checkpoints(out / "checkpoints")
  flags = checkpoints.run_flags(args, name)
  start_step, start_tokens, at_end = 0, 0, False
  if args.resume:
    try:
      start_step, start_tokens, at_end = checkpoints.resume(name, ckpt, model, optimizer,
                                                            batches, flags, steps)
    except BaseException:
      ckpt.close()  # Orbax's threads would otherwise fail noisily at exit
      raise
  step_jit = run_step_of(args, model, optimizer, mesh)
  # nnx.jit walks the model and optimizer graphs at every call: milliseconds of host time per
  # step, more for GaLore's larger state, and not hidden behind the device since the loop waits
  # for each loss. cached_partial walks them once and updates them in place.
  run_step = nnx.cached_partial(step_jit, model, optimizer)
  merge = relora_step if mesh is None else sharded_relora_step(model, optimizer)
  return Run(args=args, name=name, out=out, mesh=mesh, cfg=cfg, steps=steps, tokenizer=tokenizer,
             eval_set=eval_set, model=model, optimizer=optimizer, schedule=schedule,
             batches=batches, ckpt=ckpt, flags=flags, start_step=start_step, step_jit=step_jit,
             run_step=run_step, main_process=is_main_process(), stop=stop,
             host_refresh=optimizers.host_refresh(args, name), start_tokens=start_tokens,
             merge=merge, resumed_at_end=at_end)


def finished_summary(run: Run) -> dict | None:
  """With ``--resume``, the summary of a run that is finished already (nothing to train,
  said in a line); None when there is training to do (said when it starts afresh)."""
  summary = outputs.read_summary(run.out) if run.args.resume else None
  end = 0 if summary is None else logged_end(run)
  if summary is not None and summary.get("step", math.inf) < max(run.start_step, end):
    summary = None  # a shorter run's: an extension was killed before it wrote its own
  if run.args.resume and run.start_step >= run.steps:
    print(f"[{run.name}] the run in {run.out} is finished: its checkpoint is at step"
          f" {run.start_step}, --steps {run.steps}; nothing to train (a larger --steps"
          " extends it)")
  elif summary is not None and run.start_step > 0 and end >= run.steps:
    # Stopped by a signal (its checkpoint), then resumed to the end with --save-every 0.
    print(f"[{run.name}] the run in {run.out} is finished: its newest checkpoint, step"
          f" {run.start_step}, is older than its end, step {end}; nothing to train"
          " (a larger --steps extends it from that checkpoint)")
  elif run.start_step == 0 and summary is not None:
    if changed := checkpoints.finished_run_changes(run.out, run.flags):
      raise SystemExit(
          f"[{run.name}] the run in {run.out} is finished and kept no checkpoint, and this"
          f" command differs from it: {'; '.join(changed.values())}: rerun with its flags to"
          " see its summary, or start afresh with --overwrite or another --out")
    print(f"[{run.name}] the run in {run.out} is finished and kept no checkpoint to extend it"
          " from (--save-every 0): nothing to train")
  else:
    if run.args.resume and run.start_step == 0:
      print(f"[{run.name}] --resume: no complete checkpoint in {run.ckpt.directory}, starting"
            " fresh")
    return None
  if summary is None:  # killed after its last checkpoint: evaluate and write the summary
    return None
  run.ckpt.close()
  return summary


def logged_end(run: Run) -> int:
  """The last step in the run's ``metrics.jsonl`` (0: none): a finished run logged its end."""
  rows = outputs.read_metrics(run.out / "metrics.jsonl")
  return max((r["step"] for r in rows), default=0)


def open_outputs(run: Run):
  """Process 0 cuts metrics.jsonl back to the restored step and writes config.json; every
  process prints the run's sizes."""
  args, state_bytes = run.args, build_lib.state_bytes(run.optimizer)
  if run.main_process:
    run.logged = outputs.restart_metrics(run.out / "metrics.jsonl", run.start_step)
    outputs.write_config(run.out, args, run.name, run.cfg, run.steps, run.tokenizer, state_bytes,
                         run.mesh)
  sizes = build_lib.sizes(run.model)
  trainable = ("" if sizes["trainable_params"] == sizes["params"] else
               f" ({sizes['trainable_params'] / 1e6:.1f}M trainable, --method {args.method})")
  print(f"[{run.name}] {args.model}: {sizes['params'] / 1e6:.1f}M params{trainable}, optimizer"
        f" state {state_bytes / 2**20:.1f} MiB, {run.steps} steps x {run.tokens_per_step:,} tokens")
  for warning in (optimizers.warmup_warning(args, run.cfg, run.steps),
                  optimizers.relora_warning(args, run.steps)):
    if warning and run.main_process:
      print(f"[{run.name}] warning: {warning}")


def loop(run: Run):
  """Trains from the step after ``run.start_step`` to ``run.steps``, logging, evaluating and
  saving checkpoints on schedule; a stop request saves one and raises ``Stopped``."""
  args, steps = run.args, run.steps
  bar = tqdm(total=steps, initial=run.start_step, desc=run.name, unit="step", dynamic_ncols=True,
             disable=None if run.main_process else True)
  # No terminal (nohup, CI, a batch scheduler): tqdm stays silent, so a line per log step.
  plain_log = bar.disable and run.main_process
  prefetch = data_lib.Prefetch(run.batches)
  metrics_path = run.out / "metrics.jsonl"
  merge_every = relora_every(run)
  if merge_every and run.resumed_at_end and run.start_step % merge_every == 0:
    merge_at(run, run.start_step)  # the last step skips its merge: the extension owes it
  try:
    with (metrics_path.open("a") if run.main_process else contextlib.nullcontext()) as log:
      for step in range(run.start_step + 1, steps + 1):
        loss, grad_norm, position = train_on_next_batch(run, step, prefetch)
        if merge_every and step % merge_every == 0 and step < steps:  # before its checkpoint
          merge_at(run, step)
        row = None
        if step % args.log_every == 0 or step == steps:
          row = log_row(run, step, loss, grad_norm)
          bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}")
          if plain_log:
            print(f"[{run.name}] step {step}/{steps}: loss {loss:.4f}, lr {row['lr']:.3g}, "
                  f"{row['tokens_per_s']:,.0f} tokens/s x {flops.format_per_token(row)}"
                  f" ({flops.format_mfu(row)}),"
                  f" {row['refreshes']} refreshes", flush=True)
        if (args.eval_every and step % args.eval_every == 0) or step == steps:
          row = eval_row(run, step, loss, row)
        if row is not None:
          run.logged.append(row)
          if run.main_process:
            log.write(json.dumps(row) + "\n")
            log.flush()
        signum = run.stop.agreed()
        if signum or (args.save_every and (step % args.save_every == 0 or step == steps)):
          run.ckpt.save(step, run.model, run.optimizer,
                        {"step": step, "steps": steps, "tokens": run.tokens_at(step),
                         "data": position, "run": run.flags})
        bar.update(1)
        if signum:
          raise stopping.Stopped(signum, f"[{run.name}] stopped at step {step} by"
                                 f" {stopping.signal_name(signum)}; its checkpoint is saved")
  finally:
    prefetch.close()
    bar.close()
    run.ckpt.close()


def merge_at(run: Run, step: int):
  """ReLoRA's merge after ``step``, with that step's key."""
  run.merge(run.model, run.optimizer, jax.random.fold_in(jax.random.key(run.args.seed), step))


def train_on_next_batch(run: Run, step: int, prefetch) -> tuple[float, jax.Array, dict]:
  """One optimizer step on the next batch, timed; returns the loss, the gradient norm and
  the data position after the batch."""
  args = run.args
  waited = time.perf_counter()
  tokens, position = next(prefetch)
  run.data_wait_s += time.perf_counter() - waited  # > 0: the loader cannot keep up
  build_lib.check_vocab(int(tokens.max()), run.cfg.V, "training")
  A = args.grad_accum
  tokens_AxBxT = to_device(tokens.reshape(A, args.batch_size // A, args.seq_len), run.mesh, 1)
  start = time.perf_counter()
  kwargs = {"pad_id": run.tokenizer.pad_id}
  if run.host_refresh is not None:  # the optimizer's count before this update: step - 1
    kwargs["galore_refresh"] = run.host_refresh(step - 1)
  loss, grad_norm = run.run_step(tokens_AxBxT, **kwargs)
  loss = float(loss)  # waits for the step
  elapsed = time.perf_counter() - start
  if step == run.start_step + 1:  # the compile: out of the speed of a window with others
    run.first_step_s = elapsed
    run.step_memory = step_memory_bytes(run.step_jit, run.model, run.optimizer, tokens_AxBxT,
                                        **kwargs)  # (compiled already: jit's cache)
  else:
    run.window.append(elapsed)
  if not math.isfinite(loss):
    raise SystemExit(f"[{run.name}] loss is {loss} at step {step}; lower --lr or add --grad-clip")
  return loss, grad_norm, position


def log_row(run: Run, step: int, loss: float, grad_norm) -> dict:
  """The metrics row of a log step; starts a new timing window."""
  # The median step time of the window: a refresh step does not move it.
  step_time = float(np.median(run.window or [run.first_step_s]))
  row = {"step": step, "tokens": run.tokens_at(step), "loss": loss,
         "lr": float(run.schedule(step - 1)), "grad_norm": float(grad_norm),
         "tokens_per_s": run.tokens_per_step / step_time, "step_time_s": step_time,
         "data_wait_s": run.data_wait_s, "peak_memory_bytes": peak_memory_bytes(),
         "refreshes": per_layer.refresh_counts(run.optimizer.opt_state, run.cfg.L)}
  row.update(mfu_of(run, row["tokens_per_s"]))
  run.window, run.data_wait_s = [], 0.0
  return row


def mfu_of(run: Run, tokens_per_s: float | None) -> dict:
  """Model FLOPs per token (6N + 12 L D T, examples/llama/flops.py) and the fraction of the
  devices' dense bf16 peak that ``tokens_per_s`` reaches (``mfu``: None on a device without
  a known peak and no --peak-tflops, or without a speed)."""
  per_token = flops.train_flops_per_token(run.cfg, run.args.seq_len)
  if tokens_per_s is None:
    return {"model_flops_per_token": per_token, "mfu": None}
  return flops.mfu(per_token, tokens_per_s, jax.devices()[0].device_kind,
                   run.args.peak_tflops, jax.device_count())


def eval_row(run: Run, step: int, loss: float, row: dict | None) -> dict:
  """Evaluates on the validation batches; returns ``row`` (or a row of the step's loss)
  with the eval metrics added."""
  run.last_eval = evaluate(run.model, run.eval_set, run.tokenizer.pad_id, run.mesh)
  row = {**(row or {"step": step, "tokens": run.tokens_at(step), "loss": loss}),
         **run.last_eval}
  tqdm.write(f"[{run.name}] step {step}: eval loss {run.last_eval['eval_loss']:.4f}, "
             f"ppl {outputs.format_ppl(run.last_eval['eval_ppl'])}")
  return row


def finish(run: Run, source) -> dict:
  """The run's summary, written by process 0 to out/summary.json."""
  if not run.last_eval:  # resumed a finished run
    run.last_eval = evaluate(run.model, run.eval_set, run.tokenizer.pad_id, run.mesh)
  rows = run.logged
  speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
  summary = {
      "optimizer": run.name, "model": run.args.model, "step": max(run.start_step, run.steps),
      **build_lib.sizes(run.model),
      "method": optimizers.method_of(run.args),
      "peak_lr": optimizers.peak_lr(run.args, run.name),
      "peak_lr_is_default": run.args.lr is None,
      "optimizer_state_bytes": build_lib.state_bytes(run.optimizer),
      "step_memory_bytes": run.step_memory,
      "peak_memory_bytes": peak_memory_bytes(),
      "tokens_per_s": (speed := float(np.median(speeds)) if speeds else None),
      **mfu_of(run, speed),
      "data_wait_s": sum(r.get("data_wait_s", 0.0) for r in rows),
      "final_loss": rows[-1]["loss"] if rows else None, **run.last_eval,
      "data_corrupt_files": source.skipped, "data_corrupt_parts": source.skipped_parts,
  }
  if source.skipped and run.main_process:
    print(f"[{run.name}] warning: {source.skipped_parts} corrupt part(s) of {source.skipped}"
          " data file(s) were skipped (the first of each named above)", file=sys.stderr)
  if run.main_process:
    outputs.write_summary(run.out, summary)
  if jax.process_count() > 1:  # every process reports what it computed
    print(f"[{run.name}] process {jax.process_index()}/{jax.process_count()}: "
          f"losses {json.dumps([r['loss'] for r in rows])}", flush=True)
  return summary


def plan_step(args, name: str, cfg: model_lib.LlamaConfig, steps: int,
              mesh=None) -> dict | None:
  """XLA's memory plan of one train step of optimizer ``name`` (``devices.memory_plan``),
  compiled on abstract shapes: nothing is allocated, so a 7b plan runs on a laptop CPU.  On the
  current backend: without a ``mesh`` the step of one device, unsharded; with a ``mesh`` of
  devices (``jax.sharding.Mesh``: they exist, e.g. ``--cpu-devices``) the step a run on it
  compiles (``run_step_of``), on the model and optimizer as ``build`` shards them and the batch
  as ``to_device`` splits it, its plan per device.  Where the backend has no cuDNN,
  ``--attention cudnn`` is planned with XLA's attention (a GPU script's dry run on a CPU)."""
  if args.attention == "cudnn" and jax.default_backend() != "gpu":
    args = type(args)(**{**vars(args), "attention": "xla"})  # (an argparse.Namespace)
  A = args.grad_accum
  shape = (A, args.batch_size // A, args.seq_len)
  with mesh_context(mesh):  # as a run's step is traced (Explicit axes read it)
    model, optimizer = build_lib.abstract_build(args, name, cfg, steps, mesh)
    tokens_AxBxT = jax.ShapeDtypeStruct(
        shape, jnp.int32, sharding=None if mesh is None else batch_sharding(mesh, 3, 1))
    rule = optimizers.host_refresh(args, name)  # the run reports its first step's: t = 0
    kwargs = {} if rule is None else {"galore_refresh": rule(0)}
    step = run_step_of(args, model, optimizer, mesh)
    return memory_plan(step.lower(model, optimizer, tokens_AxBxT, pad_id=0, **kwargs).compile())


def load_data(args, mesh):
  """The source, the tokenizer and the validation batches, their ids checked against the
  model's vocab and the same on every process; process 0 prints what it loaded."""
  source = data_lib.resolve_source(args.data, max_docs=args.max_docs)
  tokenizer = data_lib.load_tokenizer(
      args.tokenizer, source=source,
      vocab_size=args.vocab_size or model_lib.CONFIGS[args.model].V)
  eval_set = data_lib.eval_batches(source, tokenizer, seq_len=args.seq_len,
                                   batch_size=args.batch_size // args.grad_accum,
                                   eval_tokens=args.eval_tokens)
  build_lib.check_vocab(max((int(b.max()) for b in eval_set), default=0),
                        build_lib.model_config(args, tokenizer).V, "validation")
  check_same_everywhere({"--data (its files and sizes)": source.listing,
                         "--tokenizer (its definition)": tokenizer.identity()})
  if is_main_process():
    print(f"data: {source.name}; tokenizer: {tokenizer.name} ({tokenizer.vocab_size} tokens); "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}"
          + ("" if mesh is None else f"; mesh {dict(mesh.shape)} ({args.mesh_axis_types}) over "
             f"{jax.process_count()} process(es)"))
  return source, tokenizer, eval_set


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """The command line: trains every optimizer of ``--optimizer`` and returns their summaries
  by name (with ``--dry-run``, the sizes ``build.dry_run`` returns).  SIGINT / SIGTERM stop
  it after a checkpoint, with ``SystemExit(128 + signal)`` and the resume command printed."""
  parser = cli.build_parser()
  args = parser.parse_args(argv)
  names = cli.check_args(args)
  mesh = setup_devices(args, parser)
  cli.check_backend(args, jax.default_backend())
  build_lib.check_optimizers(args, names)  # a refusal of the 2nd optimizer before the 1st trains
  if (unread := optimizers.unread_flags(args, names)) and is_main_process():
    print(f"warning: {', '.join(unread)}: no optimizer of this run ({', '.join(names)}) reads"
          f" {'it' if len(unread) == 1 else 'them'}; ignored")
  outs = {name: args.out / name if len(names) > 1 else args.out for name in names}
  # Before any work: --out must be a directory free of an earlier run, or --resume it, and
  # of a run still going (held: the lock's file, open until the command ends).
  held = outputs.claim_out(args.out, list(outs.values()), optimizers.OPTIMIZERS,
                           resume=args.resume, overwrite=args.overwrite, dry_run=args.dry_run,
                           lock=is_main_process())
  try:
    return claimed(args, names, outs, mesh, argv)
  finally:
    if held is not None:
      held.close()


def claimed(args, names: list[str], outs: dict, mesh, argv) -> dict[str, Any]:
  """``main`` once ``--out`` is claimed: the dry run, or each optimizer's training."""
  if args.dry_run:
    return build_lib.dry_run(args, names, plan_step, mesh)
  if mesh is not None:  # (the model's shapes follow from the flags: before the data loads)
    build_lib.check_mesh(args, mesh)
  source, tokenizer, eval_set = load_data(args, mesh)
  if args.overwrite:  # (only now: a command refused before here leaves the earlier run)
    outputs.replace_earlier(args.out, list(outs.values()), optimizers.OPTIMIZERS)
  summaries, stop = {}, stopping.StopRequest()
  try:
    with stop.catching():
      for name, out in outs.items():
        if stop.agreed():  # arrived while the previous optimizer finished
          raise stopping.Stopped(stop.signum, f"[{name}] not started: stopped by"
                                 f" {stopping.signal_name(stop.signum)}")
        summaries[name] = train(args, name, out, source, tokenizer, eval_set, mesh, stop)
  except stopping.Stopped as e:
    print(f"{e}; resume with: {resume_command(sys.argv[1:] if argv is None else argv)}",
          file=sys.stderr, flush=True)
    raise SystemExit(e.exit_code) from None
  if is_main_process():
    outputs.print_table(summaries)
  if len(names) > 1 and is_main_process():
    outputs.write_comparison(args.out, summaries)
  return summaries


def resume_command(argv: list[str]) -> str:
  """The command that continues this run."""
  script = os.path.relpath(__file__)
  argv = [a for a in argv if a != "--overwrite"]
  return shlex.join(["python", script, *argv, *([] if "--resume" in argv else ["--resume"])])


if __name__ == "__main__":
  cli.run_command(main)

"""The first optimizer steps of a wide LLaMA, with and without warm-up (issue 15).

A 3-step 7b run of the example with no warm-up reached eval loss 35 with galore_adamw.  The
cause is Adam's first steps at the full learning rate: with bias correction, step 1's update of
every weight is ``-lr * g / (|g| + eps) ~ -lr * sign(g)`` whatever the gradient's size, and a
one-batch gradient of a linear map is a sum of few outer products, so ``lr * sign(g)`` is far
from random: its spectral norm is a large fraction of ``lr * sqrt(m n)`` (a random sign
matrix's is about ``lr * (sqrt(m) + sqrt(n))``), while an N(0, 0.02) weight's is about
``0.02 * (sqrt(m) + sqrt(n))``: the step outgrows the weights as the model widens.  A warm-up
(the papers: 10% of the steps, 15K at 7b) makes step t's lr ``lr * t / warmup``.

This script measures it on the example's model and data (the embedded corpus, byte tokenizer):
for each config it takes one step of each optimizer at each lr and reports the validation loss
when only one part of the model (``embed``, ``layers``, ``norm``, ``lm_head``) or all of it
takes that step, each part's largest ``||dW||_2 / ||W||_2``, and the mean |change| of the
logits from the ``lm_head`` part (at most ``lr * ||h||_1 <= lr * D`` for unit-RMS ``h``); then
it runs the first ``--steps`` steps with no warm-up and with the paper's warm-up and records
the validation loss after each.  ``--layers`` keeps the config's width with fewer layers (what a
CPU can run at 7b width).  BENCHMARKS.md, "The first steps", has the results.

  python -m benchmarks.first_steps --models 60m,350m,1b,7b --layers 2 \\
      --optimizers adamw,galore_adamw --lrs 0.005,0.01 --out benchmarks/results/first_steps_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import benchmarks
from examples.llama import cli, optimizers, train
from examples.llama import data as data_lib
from examples.llama import model as model_lib

PARTS = ("embed", "layers", "norm", "lm_head")
# The papers' warm-up: 10% of the steps (reference/galore.md 2.4: 15K of 150K at 7b).
PAPER_WARMUP = {"60m": 1000, "130m": 2000, "350m": 6000, "1b": 10000, "7b": 15000}


def example_args(model: str, optimizer: str, lr: float, warmup: int, steps: int, rank):
  """The example's parsed flags for one run (pure bf16 as the papers, the power basis: its
  first basis from a randomized range finder, matmuls only; the example's default rank where
  ``rank`` is None)."""
  return cli.build_parser().parse_args([
      "--model", model, "--optimizer", optimizer, "--lr", str(lr), "--warmup", str(warmup),
      "--steps", str(steps), "--basis-method", "power", "--tokenizer", "bytes",
      *(["--rank", str(rank)] if rank else [])])


def build(cfg: model_lib.LlamaConfig, args):
  """The example's model (seed 0) and its ``nnx.Optimizer`` for ``args``."""
  param_dtype, dtype = cli.DTYPES[args.dtype]
  model = model_lib.Llama(cfg, dtype=dtype, param_dtype=param_dtype, attention="xla",
                          rngs=nnx.Rngs(0))
  tx, _ = optimizers.make_optimizer(args, args.optimizer, args.steps)
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def host_params(model):
  """The params as a host copy (the train step donates the device buffers)."""
  return jax.tree.map(np.asarray, nnx.state(model, nnx.Param))


def eval_loss(model, eval_set, pad_id) -> float:
  """The mean validation loss of ``model`` on ``eval_set`` (train.evaluate's)."""
  return train.evaluate(model, eval_set, pad_id)["eval_loss"]


def spectral_norm(w_xMxN, iters: int = 30) -> np.ndarray:
  """The largest singular value of each trailing (M, N) matrix, by power iteration."""
  w = jnp.asarray(w_xMxN, jnp.float32)
  v = jax.random.normal(jax.random.key(0), (*w.shape[:-2], w.shape[-1]))
  for _ in range(iters):
    u = jnp.einsum("...mn,...n->...m", w, v)
    v = jnp.einsum("...mn,...m->...n", w, u / jnp.linalg.norm(u, axis=-1, keepdims=True))
    v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
  return np.asarray(jnp.linalg.norm(jnp.einsum("...mn,...n->...m", w, v), axis=-1))


def update_over_weight(before, after) -> dict:
  """Per part, the largest ||dW||_2 / ||W||_2 over its matrices (a layer kernel is (L, in,
  out); q/k/v/o and the MLP's are matrices of each layer)."""
  worst = {}
  flat_b = jax.tree_util.tree_flatten_with_path(before)[0]
  flat_a = jax.tree.leaves(after)
  for (path, b), a in zip(flat_b, flat_a):
    if b.ndim < 2:
      continue
    b32 = b.astype(np.float32)
    ratio = float(np.max(spectral_norm(a.astype(np.float32) - b32) / spectral_norm(b32)))
    part = path[0].key
    worst[part] = max(worst.get(part, 0.0), ratio)
  return worst


def one_step_by_part(model, optimizer, cfg, lr, tokens_1xBxT, eval_set, pad_id) -> dict:
  """Validation loss before, and after one step applied to each part alone and to all; the
  model is left after the whole step (``all`` comes last), so that training can go on."""
  before = host_params(model)
  out = {"loss_before": eval_loss(model, eval_set, pad_id)}
  logits_before = np.asarray(model(eval_set[0][:, :-1]))
  train.train_step(model, optimizer, tokens_1xBxT, pad_id)
  after = host_params(model)
  out["update_over_weight_spectral"] = update_over_weight(before, after)
  for part in (*PARTS, "all"):
    keep = lambda path, b, a: a if part in ("all", path[0].key) else b
    # on the device: host arrays in the model would be sent again at every eval batch
    nnx.update(model, jax.device_put(jax.tree.map_with_path(keep, before, after)))
    out[f"loss_after_{part}"] = eval_loss(model, eval_set, pad_id)
    if part == "lm_head":
      shift = np.abs(np.asarray(model(eval_set[0][:, :-1])) - logits_before).mean()
      out["lm_head_logit_shift"] = float(shift)
      out["lm_head_logit_shift_over_lr_D"] = float(shift / (lr * cfg.D))
  return out


def first_steps(model, optimizer, batches, eval_set, pad_id) -> list[float]:
  """Validation loss after each step of the example's step, one per batch of ``batches``."""
  losses = []
  for tokens_BxT in batches:
    train.train_step(model, optimizer, tokens_BxT[None], pad_id)
    losses.append(eval_loss(model, eval_set, pad_id))
  return losses


def no_warmup_row(cfg, args, train_batches, eval_set, pad_id) -> dict:
  """``one_step_by_part`` on the first batch, then the no-warm-up run goes on from that step
  (its first loss is ``loss_after_all``) over the other batches."""
  model, optimizer = build(cfg, args)
  row = one_step_by_part(model, optimizer, cfg, args.lr, train_batches[0][None], eval_set,
                         pad_id)
  rest = first_steps(model, optimizer, train_batches[1:], eval_set, pad_id)
  return {**row, "losses_no_warmup": [row["loss_after_all"], *rest]}


def run(a, on_row=lambda result: None) -> dict:
  """One row per (model, optimizer, lr): the losses of the first steps with and without
  warm-up; returns the result dict (``complete``), passed to ``on_row`` after each row too."""
  source = data_lib.resolve_source("default")
  tokenizer = data_lib.load_tokenizer("bytes")
  pad_id = tokenizer.pad_id
  batches = data_lib.Batches(source, tokenizer, seq_len=a.seq_len, batch_size=a.batch_size)
  train_batches = [next(batches) for _ in range(a.steps)]
  eval_set = data_lib.eval_batches(source, tokenizer, seq_len=a.seq_len,
                                   batch_size=a.batch_size, eval_tokens=a.eval_tokens)
  rows = []
  result = lambda complete: {
      "benchmark": "first_steps", "complete": complete, "device": jax.devices()[0].device_kind,
      "jax": jax.__version__, "batch_size": a.batch_size, "seq_len": a.seq_len,
      "eval_tokens": a.eval_tokens, "basis_method": "power", "rows": rows}
  for name in a.models.split(","):
    cfg = model_lib.CONFIGS[name]
    cfg = dataclasses.replace(cfg, V=tokenizer.vocab_size, L=a.layers or cfg.L)
    rank = a.rank or model_lib.PAPER_RANKS.get(name)
    warmup = a.warmup_steps if a.warmup_steps is not None else PAPER_WARMUP.get(name, 100)
    for opt in a.optimizers.split(","):
      for lr in map(float, a.lrs.split(",")):
        args = lambda w: example_args(name, opt, lr, w, max(10 * warmup, a.steps), rank)
        row = {"model": name, "D": cfg.D, "layers": cfg.L, "optimizer": opt, "lr": lr,
               "rank": optimizers.rank_for(args(0), opt) if opt != "adamw" else None,
               **no_warmup_row(cfg, args(0), train_batches, eval_set, pad_id),
               "warmup": warmup,
               "losses_warmup": first_steps(*build(cfg, args(warmup)), train_batches, eval_set,
                                            pad_id)}
        print(json.dumps(row), flush=True)
        rows.append(row)
        on_row(result(False))
  return result(True)


def main(argv=None) -> dict:
  """The command line: runs :func:`run`, writes --out's JSON if given, returns the result."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="tiny", help="comma list of example configs")
  p.add_argument("--layers", type=cli.POSITIVE, default=None,
                 help="layers kept (default: the config's)")
  p.add_argument("--optimizers", default="adamw,galore_adamw")
  p.add_argument("--lrs", default="0.005", help="comma list of peak learning rates")
  p.add_argument("--rank", type=cli.POSITIVE, default=None,
                 help="GaLore rank (default: the papers' for the config, model.PAPER_RANKS)")
  p.add_argument("--steps", type=cli.POSITIVE, default=3, help="first steps run with each warm-up")
  p.add_argument("--warmup-steps", type=cli.NONNEGATIVE, default=None,
                 help="warm-up compared with none (default: the paper's for the config)")
  p.add_argument("--batch-size", type=cli.POSITIVE, default=2)
  p.add_argument("--seq-len", type=cli.POSITIVE, default=64)
  p.add_argument("--eval-tokens", type=cli.parse_count, default=512)
  p.add_argument("--out", type=pathlib.Path, default=None)
  a = p.parse_args(argv)
  models = benchmarks.comma_list(p, "--models", a.models, known=model_lib.CONFIGS)
  benchmarks.comma_list(p, "--optimizers", a.optimizers, known=optimizers.OPTIMIZERS)
  benchmarks.comma_list(p, "--lrs", a.lrs, parse=cli.POSITIVE_FLOAT)
  for name in models:  # kept: a deeper model is not the config's first steps
    if a.layers is not None and a.layers > model_lib.CONFIGS[name].L:
      p.error(f"--layers {a.layers}: more than {name}'s {model_lib.CONFIGS[name].L} layers")
  benchmarks.check_seq_len(a.seq_len, {m: model_lib.CONFIGS[m].max_seq_len for m in models})
  benchmarks.check_out(a.out)

  def write(result):  # after each row: a run cut short keeps the rows it finished
    if a.out:
      a.out.parent.mkdir(parents=True, exist_ok=True)
      a.out.write_text(json.dumps(result, indent=1) + "\n")

  result = run(a, write)
  write(result)
  return result


if __name__ == "__main__":
  main()

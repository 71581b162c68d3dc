"""Per-layer updates (examples/llama/per_layer.py): the same params and optimizer state as
the ordinary step after several steps, with and without clipping; one schedule clock."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import galore_jax as gj
from examples.llama import clipping
from examples.llama import model as model_lib
from examples.llama import per_layer

CFG = model_lib.CONFIGS["tiny"]
KERNEL = gj.DimensionNumbers(reduction_axis=0, output_axis=1)  # one layer's (in, out)


def _tx(name, schedule):
  def make():
    if name == "adamw":
      return optax.adamw(schedule, weight_decay=0.1)
    if name == "ldadamw":
      return gj.ldadamw(schedule, rank=8, weight_decay=0.1, mask=gj.linear_kernels,
                        dimension_numbers=KERNEL)
    return gj.galore_adamw(schedule, rank=8, update_proj_gap=2, weight_decay=0.1,
                           mask=gj.linear_kernels, dimension_numbers=KERNEL)
  return per_layer.layerwise(make(), make())


def _ordinary_step():
  """The ordinary jitted step: the whole gradient, then ``optimizer.update``; returns the
  loss and the gradient's norm."""

  @nnx.jit
  def ordinary(model, optimizer, tokens_AxBxT):
    def loss_fn(model):
      logits = model(tokens_AxBxT[0][:, :-1])
      return per_layer.mean_loss(logits, tokens_AxBxT[0][:, 1:], 0)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, optax.tree.norm(grads)

  return ordinary


def _run(name, per_layer_steps, max_norm, steps=4, unroll=1):
  """(params, optimizer state, losses, norms) after ``steps`` steps on fixed batches."""
  schedule = optax.linear_schedule(1e-3, 1e-2, steps)
  model = model_lib.Llama(CFG, attention="xla", unroll=unroll, rngs=nnx.Rngs(0))
  tx = _tx(name, schedule)
  if not per_layer_steps and max_norm is not None:
    tx_clip = optax.chain(optax.clip_by_global_norm(max_norm), tx)
    optimizer = nnx.Optimizer(model, tx_clip, wrt=nnx.Param)
  else:
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  step = (nnx.jit(per_layer.step_fn, static_argnames=("pad_id", "max_norm"))
          if per_layer_steps else _ordinary_step())
  rng = np.random.default_rng(1)
  losses, norms = [], []
  for _ in range(steps):
    tokens = jnp.asarray(rng.integers(1, CFG.V, (1, 4, 17)), jnp.int32)
    if per_layer_steps:
      loss, norm = step(model, optimizer, tokens, pad_id=0, max_norm=max_norm)
    else:
      loss, norm = step(model, optimizer, tokens)
    losses.append(float(loss))
    norms.append(float(norm))
  state = nnx.as_pure(optimizer.opt_state)
  if not per_layer_steps and max_norm is not None:
    state = state[1]
  return nnx.as_pure(nnx.state(model, nnx.Param)), state, losses, norms


def _assert_close(a, b):
  """Equal to round-off: the two steps sum in different orders (a per-layer backward scan,
  per-matrix vs batched SVDs).  Adam turns the round-off of a gradient entry near zero into
  a different step of at most the learning rate, so a few entries in a thousand may differ
  by more, never by more than a step."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  off = np.abs(a - b) > 2e-6 + 2e-3 * np.abs(b).max()
  assert off.mean() <= 1e-3 and np.abs(a - b).max() <= 1e-2 * max(np.abs(b).max(), 1.0), (
      f"{off.sum()} of {off.size} entries differ; max {np.abs(a - b).max():.3g}")


@pytest.mark.parametrize("name, max_norm", [
    ("galore_adamw", None), ("galore_adamw", 0.05), ("ldadamw", None)])
def test_per_layer_step_equals_the_ordinary_step(name, max_norm):
  ref = _run(name, False, max_norm)
  got = _run(name, True, max_norm)
  np.testing.assert_allclose(got[2], ref[2], rtol=1e-5)  # losses
  np.testing.assert_allclose(got[3], ref[3], rtol=1e-5)  # gradient norms (before the clip)
  for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(ref[0])):  # params
    _assert_close(a, b)
  assert jax.tree.structure(got[1]) == jax.tree.structure(ref[1])
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref[1])):  # optimizer state
    _assert_close(a, b)
  if max_norm is not None:
    assert min(ref[3]) > max_norm  # the clip acted on every step


def test_unrolled_forward_loop_gives_the_same_per_layer_steps():
  ref = _run("galore_adamw", True, 0.05, steps=2)
  got = _run("galore_adamw", True, 0.05, steps=2, unroll=True)
  # (two programs that XLA fuses differently: equal to float32 round-off, not bit for bit)
  np.testing.assert_allclose(got[2] + got[3], ref[2] + ref[3], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got[:2]), jax.tree.leaves(ref[:2])):
    _assert_close(a, b)


def test_one_schedule_clock():
  """Every layer's state and the rest's count one step per step (the reference's per-layer
  mode stepped its schedulers twice)."""
  _, state, _, _ = _run("galore_adamw", True, None, steps=3)
  counts = [np.ravel(x) for path, x in jax.tree_util.tree_flatten_with_path(state)[0]
            if "count" in jax.tree_util.keystr(path)]
  assert len(counts) >= 4  # projection, Adam, schedule: per layer and for the rest
  assert set(np.concatenate(counts).tolist()) == {3}


def test_the_example_trains_with_per_layer_updates(tmp_path):
  """--per-layer through the command line, with the 8-bit and Adafactor variants and a
  clip; a checkpoint holds the layerwise state."""
  from tests.llama.test_train import tiny_args  # pylint: disable=import-outside-toplevel
  from examples.llama import train  # pylint: disable=import-outside-toplevel

  summaries = train.main(tiny_args(tmp_path, "--optimizer", "galore_adamw_8bit,galore_adafactor",
                                   "--per-layer", "--grad-clip", "1.0", steps=2))
  for summary in summaries.values():
    assert np.isfinite(summary["eval_loss"]) and summary["step_memory_bytes"] > 0


def test_logged_refreshes_count_as_the_whole_model_step(tmp_path):
  """metrics.jsonl's refreshes: a stacked kernel's refresh counts once in both modes (the
  per-layer state keeps a counter per layer)."""
  from tests.llama.test_train import tiny_args  # pylint: disable=import-outside-toplevel
  from examples.llama import train  # pylint: disable=import-outside-toplevel

  logged = {}
  for mode in ([], ["--per-layer"]):
    out = tmp_path / ("per_layer" if mode else "whole")
    train.main(tiny_args(out, "--optimizer", "galore_adamw", "--eval-every", "0",
                         "--save-every", "0", *mode, steps=4))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged[bool(mode)] = [row["refreshes"] for row in rows]
  # 7 stacked kernels refreshed at steps 0 and 3 (--update-proj-gap 3)
  assert logged[True] == logged[False] == [7, 7, 7, 14]


@pytest.mark.parametrize("optimizer, flags", [
    ("galore_adamw", []), ("ldadamw", []), ("galore_adamw", ["--per-layer", "--grad-clip", "1.0"]),
    ("apollo_adamw", ["--basis-method", "svd", "--update-proj-gap", "2"])])
def test_host_refresh_gives_the_same_run(tmp_path, optimizer, flags):
  """--host-refresh on (a normal and a refresh executable, no lax.cond: on a GPU a cond is a
  host sync, once per layer in the per-layer step's backward loop) trains as off, to float32
  round-off (the programs differ, and XLA may fuse their sums differently)."""
  from tests.llama.test_train import tiny_args, losses  # pylint: disable=import-outside-toplevel
  from examples.llama import train  # pylint: disable=import-outside-toplevel

  runs = {}
  for mode in ("off", "on"):
    train.main(tiny_args(tmp_path / mode, "--optimizer", optimizer, "--host-refresh", mode,
                         "--eval-every", "0", *flags, steps=5))
    runs[mode] = losses(tmp_path / mode)
  assert [t for t, _ in runs["on"]] == [t for t, _ in runs["off"]] == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([x for _, x in runs["on"]], [x for _, x in runs["off"]], rtol=1e-6)


@pytest.mark.parametrize("flags, match", [
    (["--grad-accum", "2"], "--per-layer needs --grad-accum 1"),
    # the whole-model step keeps one lazy gap per stacked kernel, the per-layer step one per
    # layer: the runs parted after a few refreshes (7.6e-4 in the loss by step 9)
    (["--optimizer", "galore_adamw", "--refresh", "lazy"],
     "^--per-layer with --refresh lazy: .* choose one$"),
])
def test_per_layer_refuses_what_it_cannot_do(tmp_path, flags, match):  # (--mesh: it runs)
  from tests.llama.test_train import tiny_args  # pylint: disable=import-outside-toplevel
  from examples.llama import train  # pylint: disable=import-outside-toplevel

  with pytest.raises(SystemExit, match=match):
    train.main(tiny_args(tmp_path, "--per-layer", *flags))


@pytest.mark.parametrize("name", ["adamw", "galore_adamw"])
def test_per_layer_step_updates_the_donated_layers_in_place(name):
  """XLA's plan of the jitted per-layer step (buffers donated, as the example runs it) holds
  no second copy of the stacked layers' params and state: the backward loop writes each
  updated layer into the donated buffers.  Stacked outputs of the loop were whole new copies
  (at 7b, 12 GiB of bf16 weights), so temporaries exceeded the layers' bytes."""
  cfg = model_lib.LlamaConfig("deep", 256, 688, 4, 12, V=64, max_seq_len=64)
  model = model_lib.Llama(cfg, attention="xla", rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _tx(name, 1e-3), wrt=nnx.Param)
  tokens = jax.ShapeDtypeStruct((1, 1, 17), jnp.int32)
  stats = per_layer.train_step(None).lower(model, optimizer, tokens, pad_id=0).compile()
  stats = stats.memory_analysis()
  layers = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model.layers, nnx.Param)))
  assert stats.argument_size_in_bytes - stats.alias_size_in_bytes == 17 * 4  # all but tokens
  assert stats.temp_size_in_bytes < 0.5 * layers, (stats.temp_size_in_bytes, layers)


# 64 layers of width 64: each layer's norm has 64 entries, the stack 4096, bitsandbytes'
# floor for 8-bit state; a stacked (L, D) norm read as one L x D matrix would be factored.
STACK = model_lib.LlamaConfig("stack", 64, 176, 4, 64, V=260, max_seq_len=64)


def _example_run(name, per_layer_steps, steps=3, max_norm=0.5):
  """The example's own optimizer for ``name`` (``optimizers.make_optimizer``), ordinary or
  per-layer, on fixed batches: (params, state bytes besides the step counters, losses)."""
  from examples.llama import cli, optimizers  # pylint: disable=import-outside-toplevel

  args = cli.build_parser().parse_args([
      "--model", "tiny", "--optimizer", name, "--rank", "8", "--update-proj-gap", "2",
      "--grad-clip", str(max_norm), "--warmup", "0", "--lr", "1e-3"]
      + (["--per-layer"] if per_layer_steps else []))
  model = model_lib.Llama(STACK, attention="xla", rngs=nnx.Rngs(0))
  tx, _ = optimizers.make_optimizer(args, name, steps)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  ordinary = _ordinary_step()
  rng = np.random.default_rng(1)
  losses = []
  for _ in range(steps):
    tokens = jnp.asarray(rng.integers(1, STACK.V, (1, 2, 17)), jnp.int32)
    if per_layer_steps:
      loss, _ = nnx.jit(per_layer.step_fn, static_argnames=("pad_id", "max_norm"))(
          model, optimizer, tokens, pad_id=0, max_norm=max_norm)
    else:
      loss, _ = ordinary(model, optimizer, tokens)
    losses.append(float(loss))
  state = jax.tree.leaves(nnx.as_pure(optimizer.opt_state))
  # moments and bases (not the counters and keys, one per layer in the per-layer step)
  state_bytes = sum(x.nbytes for x in state
                    if jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == jnp.uint8)
  return nnx.as_pure(nnx.state(model, nnx.Param)), state_bytes, losses


@pytest.mark.parametrize("name", ["adamw_8bit", "galore_adamw_8bit", "galore_adafactor",
                                  "apollo_adamw", "apollo_mini"])
def test_the_examples_per_layer_optimizer_is_its_ordinary_one(name):
  """``--per-layer`` trains with the same optimizer as the ordinary step (the example's own,
  with its clip): each stacked layer's weights are tensors of their own in both, so the
  8-bit states keep a layer's 64-entry norms in float32 (bitsandbytes' floor is per tensor)
  and Adafactor keeps a full second moment for them, clipped per layer.  APOLLO's random
  projections are the ordinary step's: each layer is told its place in the stack
  (``gj.StackSlice``; every layer drew the same projection, and the losses differed by 1e-2)."""
  ref = _example_run(name, False)
  got = _example_run(name, True)
  np.testing.assert_allclose(got[2], ref[2], rtol=2e-5)  # losses
  assert got[1] == ref[1]  # the state's bytes: the same tensors, quantized the same way
  for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(ref[0])):  # params
    _assert_close(a, b)


def test_both_steps_clip_by_a_float32_norm():
  """The ordinary step's clip (``clipping.clip_by_global_norm``, the example's) and the
  per-layer step's share a float32 global norm: optax's, summed in bfloat16 for bf16
  gradients, was off by 2e-4 here (107.0 against 106.98), so the two steps' bf16 runs
  clipped by different factors and their losses parted by 7e-4 in 4 steps."""
  rng = np.random.default_rng(0)
  grads = {k: jnp.asarray(rng.standard_normal(shape) * 3, jnp.bfloat16)
           for k, shape in {"a": (64, 80), "b": (3, 50, 40), "c": (7,)}.items()}
  exact = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads.values()))
  got = float(clipping.global_norm(grads))
  assert abs(got - exact) <= 1e-6 * exact, (got, exact)
  assert abs(float(optax.tree.norm(grads)) - exact) > 1e-4 * exact  # what optax gives
  tx = clipping.clip_by_global_norm(1.0)
  clipped, _ = tx.update(grads, tx.init(grads))
  for k, g in grads.items():
    want = np.asarray(g, np.float64) / np.float32(np.asarray(got, jnp.bfloat16))
    np.testing.assert_allclose(np.asarray(clipped[k], np.float64), want, rtol=1e-2)

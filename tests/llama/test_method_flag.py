"""--method: the papers' parameter counts (abstract shapes only), a few steps of each method
on the tiny model (the loss falls, frozen weights and supports stay out of the optimizer,
ReLoRA's merge keeps the function), and the combinations the command line refuses."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from examples.llama import build as build_lib
from examples.llama import cli, train
from examples.llama import model as model_lib
from examples.llama import optimizers


def parse(*argv):
  return cli.build_parser().parse_args(["--optimizer", "adamw", *argv])


def sltrain_count(cfg, r, delta):
  """SLTrain's trainable params (ldadam-sltrain.md 2.1): r (in + out) + floor(delta in out)
  per attention / MLP map, dense embeddings, head and norms."""
  maps = [(cfg.D, cfg.D)] * 4 + [(cfg.D, cfg.F)] * 3
  per_layer = sum(r * (m + n) + math.floor(delta * m * n) for m, n in maps) + 2 * cfg.D
  return 2 * cfg.V * cfg.D + cfg.D + cfg.L * per_layer


@pytest.mark.parametrize("model, rank, want", [("60m", 128, 43.5), ("1b", 512, 645.5)])
def test_sltrain_trainable_params_are_the_references(tmp_path, model, rank, want):
  args = parse("--model", model, "--method", "sltrain", "--rank", str(rank), "--out",
               str(tmp_path))
  summary = build_lib.dry_run(args, ["adamw"])  # nnx.eval_shape: nothing allocated
  count = sltrain_count(model_lib.CONFIGS[model], rank, 0.03)
  assert summary["trainable_params"] == summary["params"] == count
  assert round(count / 1e6, 1) == want  # ldadam-sltrain.md 2.7 (derived there [D])
  nnz = count - sltrain_count(model_lib.CONFIGS[model], rank, 0.0)
  assert summary["index_elements"] == nnz  # int32 supports: not params, not optimized
  # the closed form's weights hold the supports too (they were the trainable params only)
  closed = summary["closed_form_bytes"]
  assert closed["weights"] == summary["weight_bytes"] == 2 * count + 4 * nnz  # bf16, int32
  assert closed["gradients"] == 2 * count
  if model == "60m":  # the same rank without S: the reference's Low-Rank, 42.8M
    low = build_lib.dry_run(parse("--model", model, "--method", "lowrank", "--rank", "128",
                                  "--out", str(tmp_path)), ["adamw"])
    assert low["trainable_params"] == count - nnz and round((count - nnz) / 1e6, 1) == 42.8


@pytest.mark.parametrize("model, method, alpha, delta", [
    ("60m", "sltrain", 32, 0.03), ("350m", "sltrain", 16, 0.03), ("1b", "sltrain", 8, 0.03),
    ("7b", "sltrain", 8, 0.05), ("1b", "lora", 32, 0.03), ("tiny", "sltrain", 32, 0.03)])
def test_method_settings_default_to_the_papers_per_size(model, method, alpha, delta):
  """--lora-alpha and --delta default to SLTrain's scripts' per size (ldadam-sltrain.md 2.6)
  and LoRA's 32 (galore.md 2.5); the resolved values are what config.json records; a flag
  given wins."""
  args = optimizers.with_defaults(parse("--model", model, "--method", method), "adamw")
  assert (args.lora_alpha, args.delta) == (alpha, delta)
  assert build_lib.method(args).alpha == alpha
  given = parse("--model", model, "--method", method, "--lora-alpha", "4", "--delta", "0.1")
  assert (optimizers.alpha_for(given), optimizers.delta_for(given)) == (4.0, 0.1)


# full: test_train.py; lora: relora's steps up to its first merge are lora's (same layers,
# same step), and each case costs a compile of the step.  A projecting optimizer projects
# the factors (ReLoRA's reset zeroes GaLore's low-rank moments and keeps its bases).
@pytest.mark.parametrize("method, name", [
    ("relora", "galore_adamw"), ("lowrank", "adamw"), ("sltrain", "ldadamw")])
def test_each_method_trains_the_tiny_model(method, name):
  # sltrain through the per-layer step (its supports ride the layer scan beside the params)
  args = parse("--model", "tiny", "--method", method, "--rank", "4", "--dtype", "fp32",
               "--lr", "1e-2", "--warmup", "0", "--relora-every", "3", "--steps", "6",
               "--proj-rank", "2", "--galore-scale", "1",
               *(["--per-layer"] if method == "sltrain" else []))
  step_fn = train.jitted_step(args)
  cfg = model_lib.CONFIGS["tiny"]
  model, optimizer, _ = build_lib.build(args, name, cfg, steps=6)
  fixed = lambda: [np.asarray(x) for x in jax.tree.leaves(
      nnx.state(model, nnx.Not(nnx.Any(nnx.Param, nnx.RngState))))]
  before = fixed()
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, cfg.V, (1, 2, 16)), jnp.int32)
  losses = []
  for step in range(1, 7):
    losses.append(float(step_fn(model, optimizer, tokens, pad_id=0)[0]))
    if method == "relora" and step == 3:
      want = train.eval_step(model, tokens[0], pad_id=0)
      train.relora_step(model, optimizer, jax.random.key(step))
      np.testing.assert_allclose(train.eval_step(model, tokens[0], pad_id=0), want, rtol=1e-5)
  assert losses[-1] < losses[0] - 0.1, losses
  # The frozen bases / supports: no optimizer state, no update (ReLoRA's merges aside).
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(nnx.as_pure(optimizer.opt_state))]
  assert not any("['base']" in p or "['index']" in p for p in paths), paths
  unchanged = [np.array_equal(a, b) for a, b in zip(before, fixed())]
  assert not any(unchanged) if method == "relora" else all(unchanged)  # ReLoRA: merged


@pytest.mark.parametrize("argv, match", [
    (["--method", "relora", "--per-layer", "--optimizer", "adamw"], "--per-layer"),
    (["--proj-rank", "8", "--optimizer", "galore_adamw"], "with --method full, --rank is"),
    (["--method", "lowrank", "--rank", "16", "--proj-rank", "16"], "below the factors' rank 16"),
    (["--method", "lora", "--delta", "0.05"], "--delta applies to --method sltrain; this run's"
     " is lora"),
    (["--lora-alpha", "16"], "--lora-alpha applies to --method lora | relora | sltrain; this"
     " run's is full"),
    (["--method", "lora", "--relora-every", "10"], "--relora-every applies to --method relora"),
    # (taken, recorded in config.json, and ignored: only the LoRA adapter has a dropout)
    (["--method", "lowrank", "--lora-dropout", "0.9"], "--lora-dropout applies to --method"
     " lora | relora; this run's is lowrank"),
    (["--method", "sltrain", "--lora-dropout", "0"], "--lora-dropout applies to --method lora"),
    # (trained on one device, without a word)
    (["--cpu-devices", "2"], "--cpu-devices makes CPU devices for a --mesh; this run has no"
     " mesh"),
])
def test_refused_combinations(argv, match):
  with pytest.raises(SystemExit, match=match):
    cli.check_args(cli.build_parser().parse_args(argv))


def test_relora_period_is_at_least_two(capsys):
  """Each merge's first step runs at learning rate 0: a period of 1 never trains, so it is
  refused, and the default (a quarter of the steps) is at least 2 on short runs."""
  with pytest.raises(SystemExit):
    cli.build_parser().parse_args(["--method", "relora", "--relora-every", "1"])
  assert "--relora-every" in capsys.readouterr().err
  args = cli.build_parser().parse_args(["--method", "relora", "--steps", "6"])
  assert optimizers.relora_every(args, 6) == 2
  _, schedule = optimizers.make_optimizer(args, "adamw", 6)
  assert sum(float(schedule(t)) > 0 for t in range(6)) >= 3

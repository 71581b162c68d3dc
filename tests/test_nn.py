"""``galore_jax.nn``: SLTrain's layer against a float64 NumPy oracle of its equations and its
custom VJP against autodiff of the naive dense layer; LoRA's start and ReLoRA's merge and
optimizer-state reset; frozen weights out of the optimizer."""

from __future__ import annotations

import io
import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import ad_checkpoint
import pytest
from flax import nnx

import galore_jax as gj
from galore_jax import nn

IN, OUT, R, DELTA, ALPHA = 7, 5, 2, 0.3, 3.0  # IN x OUT appears in no other shape


@pytest.fixture(scope="module")
def sltrain():
  layer = nn.SparsePlusLowRankLinear(IN, OUT, rank=R, delta=DELTA, alpha=ALPHA,
                                     rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  layer.b[...] = jnp.asarray(rng.standard_normal((R, OUT)), jnp.float32)  # B = 0 at init
  x = jnp.asarray(rng.standard_normal((2, 3, IN)), jnp.float32)
  return layer, x


def test_sltrain_forward_is_the_explicit_dense_weight(sltrain):
  layer, x = sltrain
  idx = np.asarray(layer.index[...])
  nnz = math.floor(DELTA * IN * OUT)
  assert idx.shape == (nnz,) and len(set(idx.tolist())) == nnz and np.all(np.diff(idx) > 0)
  assert idx.min() >= 0 and idx.max() < IN * OUT
  # Oracle: W = (alpha / r) A B + S, S[i // OUT, i % OUT] = values at i in the support.
  a, b, v = (np.asarray(p[...], np.float64) for p in (layer.a, layer.b, layer.values))
  w = ALPHA / R * a @ b
  for k, i in enumerate(idx):
    w[i // OUT, i % OUT] += v[k]
  np.testing.assert_allclose(layer(x), np.asarray(x, np.float64) @ w, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(layer.kernel(), w, rtol=1e-5, atol=1e-6)
  # Only the factors and values train; the support is not a param.
  trainable = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
  assert sorted(trainable) == ["a", "b", "values"]
  assert sum(x.size for x in jax.tree.leaves(trainable)) == R * (IN + OUT) + nnz


# bfloat16 (the papers' pure-bf16 runs): the same cotangents, in bf16, within its rounding.
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_sltrain_vjp_is_autodiff_of_the_naive_layer_and_saves_no_dense_weight(sltrain, dtype,
                                                                                  tol):
  layer, x = sltrain
  args = tuple(p.astype(dtype) for p in (x, layer.a[...], layer.b[...], layer.values[...]))
  index, scale = layer.index[...], layer.scale

  def naive(x, a, b, values):
    s = jnp.zeros((IN, OUT), dtype).reshape(-1).at[index].add(values).reshape(IN, OUT)
    return x @ (scale * a @ b + s)

  custom = lambda *p: nn.sparse_plus_low_rank(*p, index, scale)
  g = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, OUT)), dtype)
  y, vjp = jax.vjp(custom, *args)
  y0, vjp0 = jax.vjp(naive, *args)
  f32 = lambda t: np.asarray(t, np.float32)
  np.testing.assert_allclose(f32(y), f32(y0), rtol=tol, atol=tol)
  for got, want in zip(vjp(g), vjp0(g)):
    assert got.dtype == want.dtype == dtype
    np.testing.assert_allclose(f32(got), f32(want), rtol=tol, atol=tol * np.abs(f32(want)).max())
  saved = io.StringIO()
  with contextlib.redirect_stdout(saved):
    ad_checkpoint.print_saved_residuals(lambda *p: jnp.sum(custom(*p)), *args)
  assert f"[{IN},{OUT}]" not in saved.getvalue()  # the naive one saves W
  with contextlib.redirect_stdout(saved := io.StringIO()):
    ad_checkpoint.print_saved_residuals(lambda *p: jnp.sum(naive(*p)), *args)
  assert f"[{IN},{OUT}]" in saved.getvalue()


class TwoLoRA(nnx.Module):
  """Two LoRA layers and a plain param (it must keep its optimizer state at a merge)."""

  def __init__(self, rngs):
    self.l1 = nn.LoRALinear(6, 4, rank=2, alpha=4.0, rngs=rngs)
    self.l2 = nn.LoRALinear(4, 3, rank=2, alpha=4.0, rngs=rngs)
    self.bias = nnx.Param(jnp.zeros(3))

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x))) + self.bias[...]


# GaLore projecting the adapters (nn.factor_kernels): its low-rank moments restart, its bases
# (a per-leaf tuple, not params-shaped) are kept until its next refresh.
@pytest.mark.parametrize("make_tx, bases", [
    (lambda: optax.adamw(1e-2, weight_decay=0.1), 0),
    (lambda: gj.adamw_8bit(1e-2, min_8bit_size=1), 0),
    (lambda: gj.galore_adamw(1e-2, rank=1, mask=nn.factor_kernels), 4),  # one per adapter factor
    # (its state holds MaskedNode()s, in Variables: the merge failed after merging, the
    # adapters' state not reset)
    (lambda: optax.multi_transform(
        {"lora": gj.adamw_8bit(1e-2, min_8bit_size=1), "rest": optax.adamw(1e-3)},
        lambda p: jax.tree_util.tree_map_with_path(
            lambda k, _: "lora" if "lora" in jax.tree_util.keystr(k) else "rest", p)), 0),
], ids=["adamw", "adamw_8bit", "galore_adamw", "multi_transform"])
def test_relora_merge_keeps_the_function_and_resets_the_adapters_state(make_tx, bases):
  model = TwoLoRA(nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 6)), jnp.float32)
  base = lambda: np.tanh(np.asarray(x) @ model.l1.base[...]) @ model.l2.base[...]
  # LoRA starts equal to its base
  np.testing.assert_allclose(model(x), base(), rtol=1e-5, atol=1e-6)
  tx = make_tx()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  frozen = (model.l1.base[...], model.l2.base[...])
  step = nnx.jit(lambda m, o: o.update(m, nnx.grad(lambda m: jnp.sum((m(x) - 1.0) ** 2))(m)))
  for _ in range(2):
    step(model, optimizer)
  # The frozen bases got no update and have no optimizer state; the adapters trained.
  assert all(np.array_equal(a, b[...]) for a, b in zip(frozen, (model.l1.base, model.l2.base)))
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(nnx.as_pure(optimizer.opt_state))]
  assert paths and not any("['base']" in p for p in paths) and any("lora_a" in p for p in paths)
  assert sum(p.endswith((".left", ".right")) for p in paths) == bases, paths
  assert float(jnp.abs(model.l2.lora_b[...]).max()) > 0
  before, state_before = model(x), nnx.as_pure(optimizer.opt_state)
  assert nnx.jit(nn.relora_merge)(model, optimizer, jax.random.key(1)) == 2
  np.testing.assert_allclose(model(x), before, rtol=1e-5, atol=1e-6)
  assert not np.array_equal(model.l1.base[...], frozen[0])  # the adapter is in the base now
  assert float(jnp.abs(model.l1.lora_b[...]).max()) == 0
  fresh = tx.init(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  after = nnx.as_pure(optimizer.opt_state)
  leaves = lambda t: jax.tree_util.tree_leaves_with_path(t)
  for (path, new), (_, old), (_, init) in zip(leaves(after), leaves(state_before), leaves(fresh)):
    where = jax.tree_util.keystr(path)
    want = init if "['lora_" in where else old  # adapters as at init, the rest (bias, count) kept
    np.testing.assert_array_equal(new, want, err_msg=where)


def test_lora_dropout_only_in_training():
  layer = nn.LoRALinear(8, 8, rank=4, dropout=0.5, rngs=nnx.Rngs(0))
  layer.lora_b[...] = jnp.ones((4, 8))
  x = jnp.ones((2, 8))
  assert not np.allclose(layer(x), layer(x))  # a new mask per call
  eval_layer = nnx.view(layer, deterministic=True)
  want = x @ layer.base[...] + layer.scale * (x @ layer.lora_a[...]) @ layer.lora_b[...]
  np.testing.assert_allclose(eval_layer(x), want, rtol=1e-5)


def _relora_multiplier(t, *, steps, first_warmup, restart_warmup, every, min_ratio):
  """ReLoRA's learning-rate multiplier (its cosine schedule with multiple warm-ups), written
  from the formula: linear first warm-up; cosine from 1 to ``min_ratio`` after it; after
  each restart (every ``every`` steps, not at 0) a linear ramp from 0 to the cosine's value
  at the ramp's end.  As the reference requires, ``steps`` is a multiple of ``every``."""
  cosine = lambda s: min_ratio + (1 - min_ratio) * 0.5 * (
      1 + math.cos(math.pi * (s - first_warmup) / (steps - first_warmup)))
  if t < first_warmup:
    return t / first_warmup
  since = t % every
  if t >= every and since < restart_warmup:
    return since / restart_warmup * cosine(t - since + restart_warmup)
  return cosine(t)


@pytest.mark.parametrize("every, restart_warmup", [(50, 10), (40, 1), (40, 40)])
def test_relora_schedule_matches_the_reference_formula(every, restart_warmup):
  steps, first_warmup, peak, min_ratio = 200, 20, 3e-3, 0.1
  base = optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps=first_warmup,
                                            decay_steps=steps, end_value=peak * min_ratio)
  jagged = jax.jit(nn.relora_schedule(base, every, restart_warmup))
  got = np.array([float(jagged(t)) for t in range(steps)]) / peak
  want = np.array([_relora_multiplier(t, steps=steps, first_warmup=first_warmup,
                                      restart_warmup=restart_warmup, every=every,
                                      min_ratio=min_ratio) for t in range(steps)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert got[every] == 0.0 and got[2 * every] == 0.0  # each merge restarts from 0


def test_relora_schedule_refuses_a_ramp_longer_than_its_period():
  with pytest.raises(ValueError, match="warmup: expected at most every = 10 steps, got 11"):
    nn.relora_schedule(optax.constant_schedule(1.0), 10, 11)
  # A merge at every step: each step would be a restart's first, at rate 0.
  with pytest.raises(ValueError, match="every must be an int >= 2, got 1"):
    nn.relora_schedule(optax.constant_schedule(1.0), 1, 1)


@pytest.mark.parametrize("shard_rank", [True, False])
def test_factors_split_their_rank_axis_as_the_kernel_splits_the_axis_it_stands_in_for(shard_rank):
  """On a (fsdp, tensor) mesh, a kernel named ("embed", "heads") is split over both axes; so
  is each factor with shard_rank (A's rank axis stands in for "heads", B's for "embed"),
  while without it A keeps its rank axis and B its rows whole on every device."""
  mesh = jax.make_mesh((1, 1), ("fsdp", "tensor"))
  rules = (("embed", "fsdp"), ("heads", "tensor"))
  axes = ("embed", "heads")
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    layers = [cls(8, 6, rank=2, kernel_axes=axes, shard_rank=shard_rank, rngs=nnx.Rngs(0))
              for cls in (nn.LoRALinear, nn.LowRankLinear, nn.SparsePlusLowRankLinear)]
  a_spec = ("fsdp", "tensor") if shard_rank else ("fsdp", None)
  b_spec = ("fsdp", "tensor") if shard_rank else (None, "tensor")
  for layer in layers:
    a, b = (layer.lora_a, layer.lora_b) if isinstance(layer, nn.LoRALinear) else (layer.a, layer.b)
    assert tuple(a[...].sharding.spec) == a_spec, type(layer)
    assert tuple(b[...].sharding.spec) == b_spec, type(layer)
  assert tuple(layers[0].base[...].sharding.spec) == ("fsdp", "tensor")
  assert tuple(layers[2].values[...].sharding.spec) in ((), (None,))  # flat: replicated


def test_a_rank_the_mesh_does_not_divide_is_a_one_line_error_naming_shard_rank():
  """Without the check JAX refused with its own message (a shape and a NamedSharding, no
  argument); a rank the mesh divides, or shard_rank=False, builds as before."""
  rules = (("embed", "fsdp"), ("heads", "tensor"))
  with jax.set_mesh(jax.make_mesh((1, 1), ("fsdp", "tensor"))), nnx.logical_axis_rules(rules):
    nn.LowRankLinear(8, 6, rank=3, kernel_axes=("embed", "heads"), rngs=nnx.Rngs(0))
  mesh = jax.sharding.AbstractMesh((2, 1), ("fsdp", "tensor"))
  with jax.sharding.use_abstract_mesh(mesh), nnx.logical_axis_rules(rules):
    for cls in (nn.LoRALinear, nn.LowRankLinear, nn.SparsePlusLowRankLinear):
      make = lambda shard_rank: cls(8, 6, rank=3, kernel_axes=("embed", "heads"),
                                    shard_rank=shard_rank, rngs=nnx.Rngs(0))
      with pytest.raises(ValueError, match=r"^rank=3: shard_rank splits it as kernel axis"
                         r" 'embed' is split, over fsdp = 2 devices, .* pass shard_rank=False\."):
        nnx.eval_shape(lambda: make(True))
      layer = nnx.eval_shape(lambda: make(False))  # the rank axis replicated: no refusal
      a = layer.lora_a if isinstance(layer, nn.LoRALinear) else layer.a
      assert a.shape == (8, 3)


@pytest.mark.parametrize("make, match", [
    (lambda: nn.LoRALinear(4, 3, rank=2, dropout=1.0, rngs=nnx.Rngs(0)), "dropout"),
    (lambda: nn.LoRALinear(4, 3, rank=2, dropout=-0.1, rngs=nnx.Rngs(0)), "dropout"),
    (lambda: nn.LoRALinear(4, 3, rank=2, alpha=float("nan"), rngs=nnx.Rngs(0)), "alpha"),
    (lambda: nn.SparsePlusLowRankLinear(4, 3, rank=2, alpha=-1.0, rngs=nnx.Rngs(0)), "alpha"),
    (lambda: nn.LowRankLinear(0, 3, rank=1, rngs=nnx.Rngs(0)), "in_features"),
    (lambda: nn.LoRALinear(4.0, 3, rank=1, rngs=nnx.Rngs(0)), "in_features"),
    (lambda: nn.SparsePlusLowRankLinear(4, -1, rank=1, rngs=nnx.Rngs(0)), "out_features"),
    (lambda: nn.LowRankLinear(4, 3, rank=1, kernel_axes="embed", rngs=nnx.Rngs(0)),
     "kernel_axes"),
    (lambda: nn.LoRALinear(4, 3, rank=1, kernel_axes=("embed", "mlp", None), rngs=nnx.Rngs(0)),
     "kernel_axes"),
    (lambda: nn.SparsePlusLowRankLinear(4, 3, rank=1, delta="0.1", rngs=nnx.Rngs(0)), "delta"),
    (lambda: nn.sparse_support(jax.random.key(0), 4, 3, 2.0), "delta"),
    (lambda: nn.sparse_support(jax.random.key(0), 4, 3, -0.5), "delta"),
    (lambda: nn.sparse_support(jax.random.key(0), 0, 3, 0.5), "in_features"),
    (lambda: nn.sparse_support(jax.random.key(0), 4.0, 3, 0.5), "in_features"),
    (lambda: nn.sparse_support(jax.random.key(0), 4, -1, 0.5), "out_features"),
    (lambda: nn.sparse_support(jax.random.key(0), 4, True, 0.5), "out_features"),
    (lambda: nn.sparse_support("0", 4, 3, 0.5), "key"),
    # floor(delta * in * out) = 0: an empty sparse part (SLTrain as low-rank only, said
    # nowhere), whose zero-size values Orbax refuses to save
    (lambda: nn.sparse_support(jax.random.key(0), 4, 3, 0.05), r"delta \* in_features \*"
     r" out_features"),
    (lambda: nn.SparsePlusLowRankLinear(4, 3, rank=1, delta=1e-9, rngs=nnx.Rngs(0)),
     r"delta \* in_features \* out_features"),
    (lambda: nn.fan_in_uniform(0), "fan_in"),
    # "no" was read as True: the rank axis sharded
    (lambda: nn.LoRALinear(4, 3, rank=1, shard_rank="no", rngs=nnx.Rngs(0)), "shard_rank"),
    (lambda: nn.LowRankLinear(4, 3, rank=1, shard_rank=0, rngs=nnx.Rngs(0)), "shard_rank"),
])
def test_bad_layer_arguments_are_one_line(make, match):
  """dropout 1 left the adapter dead and a negative one turned it off; alpha <= 0 or nan
  flipped or poisoned the adapter's scale: all silently. A feature count of 0 was blamed on
  rank, a float or a negative one failed inside JAX; kernel_axes as one string was split into
  letters (P('e', 'm', ...)) and three names for a 2-D kernel passed into the factors'
  metadata; sparse_support's delta outside (0, 1] failed in jax.random.choice or a reshape,
  and fan_in 0 divided by zero: none named the argument.  sparse_support's own feature
  counts went unchecked: 0 gave an empty support, a negative one failed in
  jax.random.choice, a float or a bool passed.  shard_rank="no" sharded the rank axis."""
  with pytest.raises(ValueError, match=rf"^{match} must be"):
    make()


def test_sparse_support_takes_an_int_seed_as_merge_lora_does():
  """An int seed is jax.random.key(seed), as in merge_lora (it failed inside jax.random), and a
  legacy uint32[2] key is the same key."""
  want = nn.sparse_support(jax.random.key(3), 10, 20, 0.1)
  np.testing.assert_array_equal(nn.sparse_support(3, 10, 20, 0.1), want)
  np.testing.assert_array_equal(nn.sparse_support(jax.random.PRNGKey(3), 10, 20, 0.1), want)



def test_reset_state_refuses_a_mask_of_another_structure_in_one_line():
  """Before, optax's 15-line pytree error, naming no argument."""
  tx, params = optax.adam(0.1), {"a": jnp.ones(2), "b": jnp.ones(2)}
  with pytest.raises(ValueError, match=r"^mask: its structure must be the params' \(\['b'\] is"
                     r" in the params, not in mask\)\.$"):
    nn.reset_state(tx, tx.init(params), params, {"a": True})


def test_reset_state_names_a_none_in_the_mask():
  """A ``None`` where a param's flag goes: it said the param was "not in mask", which it is."""
  tx, params = optax.adam(0.1), {"a": jnp.ones(2), "b": {"c": jnp.ones(2)}}
  with pytest.raises(ValueError, match=r"^mask: \['b'\]\['c'\] is None, where each param takes"
                     r" True or False$"):
    nn.reset_state(tx, tx.init(params), params, {"a": True, "b": {"c": None}})


def test_relora_merge_with_an_optimizer_of_the_adapters_only():
  """nnx.Optimizer(model, tx, wrt=nn.LoRAParam) (train the adapters, not the bias): the merge
  keeps the function and restarts the adapters' state as tx.init would make it. Before, it
  read the state as made for every nnx.Param: 'Too few leaves for PyTreeDef'."""
  model = TwoLoRA(nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 6)), jnp.float32)
  tx = optax.adam(1e-2)
  optimizer = nnx.Optimizer(model, tx, wrt=nn.LoRAParam)
  loss = lambda m: jnp.sum((m(x) - 1.0) ** 2)
  step = nnx.jit(lambda m, o: o.update(
      m, nnx.grad(loss, argnums=nnx.DiffState(0, nn.LoRAParam))(m)))
  for _ in range(2):
    step(model, optimizer)
  before = model(x)
  assert nn.relora_merge(model, optimizer, jax.random.key(1)) == 2
  np.testing.assert_allclose(model(x), before, rtol=1e-5, atol=1e-6)
  adam = nnx.as_pure(optimizer.opt_state)[0]
  assert int(adam.count) == 2 and sorted(adam.mu) == ["l1", "l2"]  # no bias state
  for moment in (adam.mu, adam.nu):
    assert all(not np.any(v) for v in jax.tree.leaves(moment))  # restarted: zeros


@pytest.mark.parametrize("make_tx, field", [
    (lambda: gj.ldadamw(1e-2, rank=1, mask=nn.factor_kernels), "error"),
    (lambda: gj.fira_adamw(1e-2, rank=1, mask=nn.factor_kernels), "residual_norms"),
    (lambda: gj.apollo_mini(1e-2, mask=nn.factor_kernels), "norms"),
], ids=["ldadamw", "fira_adamw", "apollo_mini"])
def test_relora_merge_restarts_the_adapters_per_leaf_state_and_keeps_their_bases(make_tx, field):
  """LDAdam's error-feedback buffers and Fira's / APOLLO's norm-limiter norms are per-leaf
  tuples (one entry per param, not params-shaped trees): the merge left the old adapter's
  (the buffer of l1's B held 32 after it), fed into the new adapter's steps.  Now an adapter's
  entry restarts as tx.init makes it (zeros), the bias's is kept, and so are the adapters'
  bases (a zero basis would stop their updates until the next refresh)."""
  model = TwoLoRA(nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 6)), jnp.float32)
  optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
  step = nnx.jit(lambda m, o: o.update(m, nnx.grad(lambda m: jnp.sum((m(x) - 1.0) ** 2))(m)))
  for _ in range(3):
    step(model, optimizer)
  fields = lambda: jax.tree.map(np.asarray, tuple(
      getattr(nnx.as_pure(optimizer.opt_state)[0], f) for f in (field, "bases")))
  old, old_bases = fields()
  nn.relora_merge(model, optimizer, jax.random.key(1))
  new, new_bases = fields()
  adapters = jax.tree.leaves(nn.lora_mask(model))  # in the params' leaf order
  assert adapters == [False, True, True, True, True] and len(old) == 5
  for i, adapter in enumerate(adapters):
    if adapter:
      assert np.any(old[i]), i
      np.testing.assert_array_equal(new[i], np.zeros_like(old[i]))
  assert isinstance(new[0], optax.MaskedNode)  # the bias (not projected): none
  for got, want in zip(jax.tree.leaves(new_bases), jax.tree.leaves(old_bases), strict=True):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("x_dtype", [jnp.int32, jnp.bfloat16])
def test_sltrain_promotes_its_input_as_the_other_layers_do(x_dtype):
  """With dtype=None SLTrain cast its dense W to the input's dtype: an int32 input (one-hot
  rows) truncated W to integers (zeros out), and a bf16 one computed in bf16 where LoRA and
  low-rank layers promote to their float32 params."""
  rngs = lambda: nnx.Rngs(0)
  layers = [nn.SparsePlusLowRankLinear(6, 4, rank=2, delta=0.5, rngs=rngs()),
            nn.LowRankLinear(6, 4, rank=2, rngs=rngs()), nn.LoRALinear(6, 4, rank=2, rngs=rngs())]
  layers[0].b[...] = jnp.ones((2, 4))  # (B starts at zero: give A B a part in W)
  x = jnp.eye(6, dtype=x_dtype)
  for layer in layers:
    assert layer(x).dtype == jnp.float32, type(layer).__name__
  np.testing.assert_allclose(layers[0](x), np.asarray(layers[0].kernel()), rtol=1e-6)

"""``galore_adamw`` under ``flax.nnx.Optimizer``: fp32 and bf16 params, N-D attention kernels, and
a small training comparison with ``optax.adamw``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import galore_jax as gj
from nnx_init import fast_init


class MLP(nnx.Module):

  def __init__(self, din, width, dout, *, rngs, param_dtype=jnp.float32, depth=2):
    self.layers = nnx.List([
        nnx.Linear(din if i == 0 else width, width, param_dtype=param_dtype, rngs=rngs)
        for i in range(depth)
    ])
    self.norm = nnx.LayerNorm(width, param_dtype=param_dtype, rngs=rngs)
    self.head = nnx.Linear(width, dout, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = jax.nn.gelu(layer(x))
    return self.head(self.norm(x))


def galore_bases(optimizer):
  state = optimizer.opt_state[0]
  return [b for b in state.bases if isinstance(b, gj.Bases)]


def typeof_tree(tree):
  return [(jax.typeof(x).shape, jax.typeof(x).dtype, jax.typeof(x).weak_type)
          for x in jax.tree.leaves(nnx.as_pure(tree))]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_nnx_optimizer_train_step(dtype):
  din, width, dout, gap, steps = 12, 24, 6, 3, 8
  model = fast_init(lambda: MLP(din, width, dout, rngs=nnx.Rngs(0), param_dtype=dtype))
  tx = gj.galore_adamw(1e-2, rank=8, update_proj_gap=gap, scale=1.0, weight_decay=0.01,
                       mask=gj.linear_kernels)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  # Projected: the two hidden kernels; "head" (the output head), the norm and biases are not.
  assert len(galore_bases(optimizer)) == 2
  # 2-D kernels are taken as given: (12, 24) -> left basis 12 x 8; (24, 24) -> right 24 x 8.
  assert [(None if b.left is None else b.left.shape, None if b.right is None else b.right.shape)
          for b in galore_bases(optimizer)] == [((din, 8), None), (None, (width, 8))]
  state_types = typeof_tree(optimizer.opt_state)

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((32, din)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((32, dout)), jnp.float32)
  traces = []

  @nnx.jit
  def train_step(model, optimizer, x, y):
    traces.append(1)

    def loss_fn(model):
      return jnp.mean((model(x).astype(jnp.float32) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = []
  for t in range(steps):
    losses.append(float(train_step(model, optimizer, x, y)))
    for p in jax.tree.leaves(nnx.as_pure(nnx.state(model, nnx.Param))):
      assert p.dtype == dtype
    assert typeof_tree(optimizer.opt_state) == state_types, f"opt state avals changed at {t}"
    assert [int(b.refreshes) for b in galore_bases(optimizer)] == [t // gap + 1] * 2
  assert len(traces) == 1
  assert int(optimizer.step[...]) == steps
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.8 * losses[0], losses


class Attention(nnx.Module):
  """Self-attention with LinearGeneral-style N-D kernels: (d, heads, head_dim) and
  (heads, head_dim, d), plus a 2-D MLP kernel."""

  def __init__(self, d, heads, *, rngs):
    self.mha = nnx.MultiHeadAttention(num_heads=heads, in_features=d, qkv_features=d,
                                      decode=False, rngs=rngs)
    self.mlp = nnx.Linear(d, 2 * d, rngs=rngs)
    self.mlp_out = nnx.Linear(2 * d, d, rngs=rngs)

  def __call__(self, x):
    x = x + self.mha(x)
    return x + self.mlp_out(jax.nn.gelu(self.mlp(x)))


def attention_dims(params):
  """(d, h, hd) q/k/v kernels: input axis 0, output (1, 2); (h, hd, d) out kernel: input
  (0, 1), output 2; 2-D kernels (in, out); everything else None."""

  def dims(path, leaf):
    names = [getattr(k, "key", None) for k in path]
    if "kernel" not in names:
      return None
    if leaf.ndim == 2:
      return gj.DimensionNumbers(reduction_axis=0, output_axis=1)
    if "out" in names:
      return gj.DimensionNumbers(reduction_axis=(0, 1), output_axis=2)
    return gj.DimensionNumbers(reduction_axis=0, output_axis=(1, 2))

  return jax.tree_util.tree_map_with_path(dims, params)


def test_nnx_optimizer_with_nd_attention_kernels():
  d, heads = 8, 2
  model = fast_init(lambda: Attention(d, heads, rngs=nnx.Rngs(0)))
  tx = gj.galore_adamw(1e-2, rank=4, update_proj_gap=2, scale=1.0, mask=gj.linear_kernels,
                       dimension_numbers=attention_dims)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  bases = galore_bases(optimizer)
  assert len(bases) == 6  # q, k, v, out, mlp, mlp_out
  # With dimension numbers a kernel is viewed as (output, input), like a torch Linear weight:
  # q/k/v (d, h, hd) and out (h, hd, d) are 8 x 8, mlp (8 -> 16) is 16 x 8: std puts the basis
  # on the right (8 x 4); mlp_out (16 -> 8) is 8 x 16: left basis (8 x 4).
  sides = [(None if b.left is None else b.left.shape, None if b.right is None else b.right.shape)
           for b in bases]
  assert sides.count((None, (8, 4))) == 5
  assert sides.count(((8, 4), None)) == 1
  mu = optimizer.opt_state[0].inner_state.mu
  assert nnx.as_pure(mu)["mha"]["query"]["kernel"].shape == (8, 4)  # (m, r) coefficients
  assert nnx.as_pure(mu)["mlp_out"]["kernel"].shape == (4, 16)  # (r, n)

  losses = _regression_losses(model, optimizer, d, steps=5)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  assert [int(b.refreshes) for b in galore_bases(optimizer)] == [3] * 6


def _regression_losses(model, optimizer, d, steps):
  """The losses of ``steps`` nnx.jit training steps on one fixed random regression batch."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, 5, d)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((4, 5, d)), jnp.float32)

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  return [float(train_step(model, optimizer)) for _ in range(steps)]


@pytest.mark.parametrize("name", ["apollo_adamw", "fira_adamw"])
def test_nnx_optimizer_with_the_successors(name):
  """APOLLO and Fira under nnx.Optimizer on the N-D attention kernels: low-rank moments, one
  limiter norm per matrix, training steps under nnx.jit."""
  d, heads = 8, 2
  model = fast_init(lambda: Attention(d, heads, rngs=nnx.Rngs(0)))
  make = gj.apollo_adamw if name == "apollo_adamw" else gj.fira_adamw
  tx = make(1e-2, rank=4, update_proj_gap=2, mask=gj.linear_kernels,
            dimension_numbers=attention_dims)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  state = optimizer.opt_state[0]
  mu = nnx.as_pure(state.inner_state.mu)
  assert mu["mha"]["query"]["kernel"].shape == (8, 4) and mu["mlp_out"]["kernel"].shape == (4, 16)
  norms = [n for n in (state.norms if name == "apollo_adamw" else state.residual_norms)
           if not isinstance(n, optax.MaskedNode)]
  assert len(norms) == 6 and all(jnp.shape(nnx.as_pure(n)) == () for n in norms)

  losses = _regression_losses(model, optimizer, d, steps=5)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  assert int(gj.refresh_counts(optimizer.opt_state)) == 3 * 6


# --------------------------------------------------------------------------------------------
# training comparison with AdamW
# --------------------------------------------------------------------------------------------


def test_training_comparable_to_adamw():
  """A 3-layer MLP (width 64) fitted to a noisy random teacher (1024 samples, minibatches of
  128, 300 steps, cosine-decayed lr).  GaLore projects the two hidden 64-wide kernels and the
  16 -> 64 input kernel at rank 32 (half the width; the input kernel's rank is clipped to 16),
  refreshing every 50 steps.

  Measured on CPU (MSE against clean held-out targets): initial ~1.9, AdamW ~0.14, GaLore
  ~0.13; with the projected kernels frozen (only the head, norm and biases train) ~0.25. The
  training targets carry noise (std 0.3), which limits how closely either optimiser can fit
  the teacher, so the ratio of the held-out errors is a meaningful comparison. The bounds (<
  1.5x AdamW's, < 10% of the initial error) leave room for platform differences and still
  fail for a GaLore whose projected updates vanish or diverge.
  """
  din, width, dout, n, batch, steps = 16, 64, 8, 1024, 128, 300
  rng = np.random.default_rng(0)
  a = rng.standard_normal((din, 32)) / np.sqrt(din)
  b = rng.standard_normal((32, dout)) / np.sqrt(32)
  teacher = lambda x: np.tanh(x @ a) @ b  # noqa: E731
  x_train = rng.standard_normal((n, din))
  scale = teacher(x_train).std()
  y_train = teacher(x_train) / scale + 0.3 * rng.standard_normal((n, dout))
  x_test = rng.standard_normal((512, din))
  y_test = teacher(x_test) / scale
  x_train, y_train, x_test, y_test = (jnp.asarray(v, jnp.float32)
                                      for v in (x_train, y_train, x_test, y_test))

  def train(tx):
    model = fast_init(lambda: MLP(din, width, dout, rngs=nnx.Rngs(0), depth=3))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
      loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
      optimizer.update(model, grads)
      return loss

    test_mse = lambda: float(jnp.mean((model(x_test) - y_test) ** 2))  # noqa: E731
    initial = test_mse()
    for t in range(steps):
      i = (t * batch) % n
      train_step(model, optimizer, x_train[i:i + batch], y_train[i:i + batch])
    return initial, test_mse(), optimizer

  sched = lambda lr: optax.cosine_decay_schedule(lr, steps, alpha=0.05)  # noqa: E731
  init_a, adam_mse, _ = train(optax.adamw(sched(3e-3), weight_decay=0.0))
  init_g, galore_mse, optimizer = train(
      gj.galore_adamw(sched(1e-2), rank=width // 2, update_proj_gap=50, scale=1.0,
                      mask=gj.linear_kernels))

  assert init_a == init_g  # same initial model
  assert len(galore_bases(optimizer)) == 3
  assert [int(b.refreshes) for b in galore_bases(optimizer)] == [steps // 50] * 3
  assert adam_mse < 0.1 * init_a, (init_a, adam_mse)
  assert galore_mse < 0.1 * init_g, (init_g, galore_mse)
  assert galore_mse < 1.5 * adam_mse, (galore_mse, adam_mse)


TRANSFORMS = {
    "galore_adamw": lambda: gj.galore_adamw(1e-2, rank=2),
    "galore_adamw_8bit": lambda: gj.galore_adamw_8bit(1e-2, rank=2, min_8bit_size=1,
                                                      block_size=4),
    "galore_adafactor": lambda: gj.galore_adafactor(1e-2, rank=2),
    "ldadamw": lambda: gj.ldadamw(1e-2, rank=2),
    "apollo_adamw": lambda: gj.apollo_adamw(1e-2, rank=2),
    "fira_adamw": lambda: gj.fira_adamw(1e-2, rank=2),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_params_whose_sharding_metadata_is_a_named_sharding(name):
  """Flax takes a NamedSharding as a param's out_sharding (no mesh context needed). The
  optimizer state then gets NamedShardings too, each with its leaf's own spec: the spec the
  same model with a spec tuple (under jax.set_mesh) gives it; and a step is the plain-array
  step. Before, building the low-rank spec failed: 'tuple' object has no attribute
  'partitions'."""
  mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  w0 = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)

  class One(nnx.Module):
    def __init__(self, sharding):
      self.w = nnx.Param(jnp.asarray(w0), out_sharding=sharding)

  def specs(opt):  # (nnx.get_partition_spec itself cannot read a NamedSharding)
    variables = jax.tree.leaves(nnx.state(opt, nnx.OptState),
                                is_leaf=lambda v: isinstance(v, nnx.Variable))
    metadata = [v.get_metadata().get("out_sharding") for v in variables]
    return [tuple(getattr(s, "spec", s)) for s in metadata if s is not None]

  with jax.set_mesh(mesh):
    by_tuple = nnx.Optimizer(One(("fsdp", None)), TRANSFORMS[name](), wrt=nnx.Param)
  model = One(jax.sharding.NamedSharding(mesh, jax.P("fsdp", None)))
  optimizer = nnx.Optimizer(model, TRANSFORMS[name](), wrt=nnx.Param)
  assert specs(optimizer) == specs(by_tuple) and len(specs(optimizer)) >= 3
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, nnx.state(model, nnx.Param))
  optimizer.update(model, grads)
  tx = TRANSFORMS[name]()
  params = {"w": jnp.asarray(w0)}
  want = optax.apply_updates(params, tx.update({"w": jnp.full((8, 4), 0.5)}, tx.init(params),
                                               params)[0])
  np.testing.assert_allclose(model.w[...], want["w"], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# inside optax's masking combinators
# --------------------------------------------------------------------------------------------

MASKED_INNER = {
    "galore_adamw": lambda: gj.galore_adamw(1e-2, rank=2),
    "galore_adamw_8bit": lambda: gj.galore_adamw_8bit(1e-2, rank=2, min_8bit_size=8),
    "ldadamw": lambda: gj.ldadamw(1e-2, rank=2),
    "apollo_adamw": lambda: gj.apollo_adamw(1e-2, rank=2),
    "fira_adamw": lambda: gj.fira_adamw(1e-2, rank=2),
    "galore_adafactor": lambda: gj.galore_adafactor(1e-2, rank=2),
    "adamw_8bit": lambda: gj.adamw_8bit(1e-2, min_8bit_size=8),
}


def _kernels(tree):
  return jax.tree_util.tree_map_with_path(lambda p, _: "kernel" in jax.tree_util.keystr(p),
                                          tree)


@pytest.mark.parametrize("combinator", ["masked", "multi_transform"])
@pytest.mark.parametrize("name", list(MASKED_INNER))
def test_nnx_optimizer_with_a_transform_under_optax_masking(name, combinator):
  """optax.masked / multi_transform hand the inner transform the params with MaskedNode()
  for the leaves it does not own; under nnx.Optimizer those are Variables holding no array.
  Every projecting transform failed there (IndexError in flax_metadata.with_leaf_specs), the
  8-bit and Adafactor ones too.  Now two steps move the params as the same combinator on the
  pure params does."""
  def make():
    if combinator == "masked":
      return optax.masked(MASKED_INNER[name](), _kernels)
    labels = lambda p: jax.tree.map(lambda k: "a" if k else "b", _kernels(p))
    return optax.multi_transform({"a": MASKED_INNER[name](), "b": optax.adamw(1e-3)}, labels)

  model = nnx.Linear(8, 6, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, make(), wrt=nnx.Param)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tx, x = make(), jnp.linspace(-1.0, 1.0, 16).reshape(2, 8)
  state = tx.init(params)
  loss = lambda m: jnp.sum(m(x) ** 2)
  for _ in range(2):
    grads = nnx.grad(loss)(model)
    pure = nnx.to_pure_dict(grads)
    optimizer.update(model, grads)
    updates, state = tx.update(pure, state, params)
    params = optax.apply_updates(params, updates)
  got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("make", [lambda: optax.adamw(1e-3), lambda: gj.galore_adamw(1e-3, rank=2)],
                         ids=["adamw", "galore_adamw"])
def test_abstract_state_of_an_nnx_state_of_params(make):
  """gj.sharding.abstract_state(tx, nnx.state(model, nnx.Param)) failed with a pytree error
  of 14 lines: the shapes were traced without the mesh, so the Variables' sharding metadata
  differed from the shardings'.  Now it is the target state_shardings describes, with the
  params' own Variables' metadata."""
  mesh = jax.make_mesh((1, 1), ("fsdp", "tensor"))
  init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("fsdp", "tensor"))
  with jax.set_mesh(mesh):
    model = nnx.Linear(16, 32, kernel_init=init, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    target = gj.sharding.abstract_state(make(), params)
    real = nnx.Optimizer(model, make(), wrt=nnx.Param).opt_state
  got = jax.tree.leaves(target)
  want = jax.tree.leaves(nnx.as_pure(real))
  assert [(t.shape, t.dtype) for t in got] == [(w.shape, w.dtype) for w in want]
  shardings = jax.tree.leaves(gj.sharding.state_shardings(make(), params))
  assert [t.sharding for t in got] == shardings


def test_state_shardings_of_params_with_a_none_leaf():
  """The transforms' init takes a None leaf (no param there); state_shardings failed on it
  with a pytree error of many lines."""
  mesh = jax.make_mesh((1,), ("fsdp",))
  w = jax.device_put(jnp.zeros((8, 4)), jax.NamedSharding(mesh, jax.P("fsdp")))
  sh = gj.sharding.state_shardings(gj.galore_adamw(1e-3, rank=2), {"w": w, "n": None})
  assert tuple(sh[0].inner_state.mu["w"].spec) == ("fsdp", None)
  assert sh[0].inner_state.mu["n"] is None


# --------------------------------------------------------------------------------------------
# the functional pattern: tx.init / tx.update on an nnx.State of variables
# --------------------------------------------------------------------------------------------

FUNCTIONAL = {  # a refresh at the third step where the optimizer has one (update_proj_gap 2)
    "galore_adamw": lambda: gj.galore_adamw(1e-2, rank=2, update_proj_gap=2),
    "galore_adamw_8bit": lambda: gj.galore_adamw_8bit(1e-2, rank=2, min_8bit_size=8,
                                                      update_proj_gap=2),
    "galore_adafactor": lambda: gj.galore_adafactor(1e-2, rank=2, update_proj_gap=2),
    "fira_adamw": lambda: gj.fira_adamw(1e-2, rank=2, update_proj_gap=2),
    "apollo_adamw": lambda: gj.apollo_adamw(1e-2, rank=2, update_proj_gap=2),
    "apollo_mini": lambda: gj.apollo_mini(1e-2, update_proj_gap=2),
    "ldadamw": lambda: gj.ldadamw(1e-2, rank=2),
    "adamw_8bit": lambda: gj.adamw_8bit(1e-2, min_8bit_size=8),
}


@pytest.mark.parametrize("name", list(FUNCTIONAL))
def test_init_and_update_on_an_nnx_state_of_variables(name):
  """``tx.init(nnx.state(model, nnx.Param))`` and ``tx.update`` on such states, as optax's
  own transforms take them.  The projecting ones failed in update (a refresh cond whose
  branches differed: the stored bases in Param variables, the new ones bare), APOLLO in its
  norms, the 8-bit ones at the codes.  Now three steps equal the pure params' steps, and
  the updates come back in the variables the gradients came in, as optax's do."""
  model = nnx.Linear(8, 6, rngs=nnx.Rngs(0))
  variables = nnx.state(model, nnx.Param)
  params = nnx.to_pure_dict(variables)
  tx = FUNCTIONAL[name]()
  state, pure_state = tx.init(variables), tx.init(params)
  x = jnp.linspace(-1.0, 1.0, 16).reshape(2, 8)
  for _ in range(3):
    grads = nnx.state(nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model), nnx.Param)
    updates, state = jax.jit(tx.update)(grads, state, variables)
    pure_updates, pure_state = jax.jit(tx.update)(nnx.to_pure_dict(grads), pure_state, params)
    assert isinstance(updates["kernel"], nnx.Param)
    variables = optax.apply_updates(variables, updates)
    params = optax.apply_updates(params, pure_updates)
    nnx.update(model, variables)
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(variables)), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

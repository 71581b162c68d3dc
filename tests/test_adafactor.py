"""``scale_by_adafactor`` against a NumPy transcription of the reference's equations and against
optax's own Adafactor pieces; ``galore_projection`` with it under every ``on_refresh``;
``galore_adafactor``'s state bytes against its closed form; its argument checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_jax as gj
import test_hygiene as hygiene
from oracle import coefficients

B1, CLIP, DECAY, EPS = 0.9, 1.0, 0.8, 1e-30


def schedule(count):
  return 0.1 / (1.0 + jnp.asarray(count, jnp.float32))


def adafactor_numpy(grads, *, lr, b1, t0=0):
  """galore-torch's Adafactor step on one leaf (float64; a matrix factored, a vector not),
  from a zero state at count ``t0``; returns the updates and the final (v_row, v_col, ema)."""
  row = col = ema = 0.0
  out = []
  for i, g in enumerate(np.asarray(x, np.float64) for x in grads):
    t = t0 + i + 1
    beta = 1.0 - t ** -DECAY
    sq = g * g + EPS
    if g.ndim == 2:
      row = beta * row + (1 - beta) * sq.mean(axis=1)
      col = beta * col + (1 - beta) * sq.mean(axis=0)
      u = g / np.sqrt(np.outer(row / row.mean(), col))
    else:
      row = beta * row + (1 - beta) * sq
      u = g / np.sqrt(row)
    u = u / max(1.0, np.sqrt(np.mean(u * u)) / CLIP) * float(lr(t - 1))
    if b1 is not None:
      ema = b1 * ema + (1 - b1) * u
      u = ema
    out.append(u)
  return out, (row, col, ema)


def normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def run_inner(tx, grads):
  state = tx.init(grads[0])
  out = []
  for g in grads:
    u, state = jax.jit(tx.update)(g, state, g)  # optax's pieces read params' shapes
    out.append(u)
  return out, state


@pytest.mark.parametrize("b1", [None, B1])
def test_scale_by_adafactor_matches_the_reference_equations(b1):
  """Each matrix of a stacked leaf is its own Adafactor (statistics and clipping)."""
  shapes = {"w": (6, 4), "stack": (3, 5, 4), "b": (7,)}
  grads = [{k: normal(s, 10 * t + i) * (1 + t) for i, (k, s) in enumerate(shapes.items())}
           for t in range(5)]
  ours, _ = run_inner(gj.scale_by_adafactor(schedule, b1=b1), grads)
  for k, shape in shapes.items():
    slices = [(...,)] if len(shape) < 3 else [(j,) for j in range(shape[0])]
    for sl in slices:
      ref, _ = adafactor_numpy([np.asarray(g[k])[sl] for g in grads], lr=schedule, b1=b1)
      for t, (o, r) in enumerate(zip(ours, ref)):
        np.testing.assert_allclose(np.asarray(o[k])[sl], r, rtol=2e-5, atol=1e-7,
                                   err_msg=f"{k}{sl}, step {t}")


def test_scale_by_adafactor_is_optax_pieces_on_matrices_and_vectors():
  """On 2-D and 1-D leaves it is optax's factored RMS (always factored), block-RMS clipping,
  the learning rate and an undebiased EMA, in that order."""
  shapes = {"tall": (9, 4), "wide": (3, 8), "b": (5,)}
  grads = [{k: normal(s, 7 * t + i) for i, (k, s) in enumerate(shapes.items())}
           for t in range(4)]
  optax_tx = optax.chain(
      optax.scale_by_factored_rms(min_dim_size_to_factor=1, decay_rate=DECAY, epsilon=EPS),
      optax.clip_by_block_rms(CLIP),
      optax.scale_by_learning_rate(schedule, flip_sign=False),
      optax.ema(B1, debias=False))
  ref, _ = run_inner(optax_tx, grads)
  ours, _ = run_inner(gj.scale_by_adafactor(schedule, b1=B1), grads)
  for o, r in zip(ours, ref):
    for k in shapes:
      np.testing.assert_allclose(np.asarray(o[k]), np.asarray(r[k]), rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------------------------
# galore_projection(scale_by_adafactor(...)) and on_refresh
# --------------------------------------------------------------------------------------------

SHAPES = {"bias": (10,), "tall": (24, 10), "wide": (10, 24)}
RANK, GAP = 4, 3


def run_projection(on_refresh, params, steps):
  tx = gj.galore_projection(gj.scale_by_adafactor(schedule, b1=B1), rank=RANK,
                            update_proj_gap=GAP, on_refresh=on_refresh)
  state = tx.init(params)
  grads = [jax.tree.map(lambda p, t=t: normal(p.shape, 100 + t), params) for t in range(steps)]
  for g in grads:
    _, state = jax.jit(tx.update)(g, state)
  return state, grads


def test_on_refresh_keep_and_reset_with_adafactor():
  """on_refresh="reset" restarts the refreshed leaves' row, column and first-moment statistics
  (their shapes differ from the coefficients'); the counters and the unprojected leaf's
  statistics go on, as with "keep"."""
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  keep, _ = run_projection("keep", params, GAP + 1)
  reset, grads = run_projection("reset", params, GAP + 1)
  (rms_k, _, _, ema_k), (rms_r, _, step_r, ema_r) = keep.inner_state, reset.inner_state
  assert int(rms_r.count) == int(step_r.count) == int(ema_r.count) == GAP + 1
  for k, r in zip((rms_k.v_row, rms_k.v_col, ema_k.ema), (rms_r.v_row, rms_r.v_col, ema_r.ema)):
    np.testing.assert_array_equal(r["bias"], k["bias"])
  for i, name in enumerate(sorted(SHAPES)):
    if name == "bias":
      continue
    r = coefficients(np.asarray(grads[GAP][name]), reset.bases[i])
    _, (row, col, ema) = adafactor_numpy([r], lr=lambda _: schedule(GAP), b1=B1, t0=GAP)
    np.testing.assert_allclose(rms_r.v_row[name], row, rtol=1e-5)
    np.testing.assert_allclose(rms_r.v_col[name], col, rtol=1e-5)
    np.testing.assert_allclose(ema_r.ema[name], ema, rtol=1e-4, atol=1e-7)
    assert not np.allclose(rms_k.v_row[name], row, rtol=1e-3)  # "keep" carried them over


def test_on_refresh_reset_on_a_single_array():
  """Params that are one array: every array of the state has the coefficient tree's
  structure, and only the counters (scalars) are not per-leaf state."""
  state, grads = run_projection("reset", jnp.zeros((24, 10)), GAP + 1)
  rms = state.inner_state[0]
  assert int(rms.count) == int(state.inner_state[-1].count) == GAP + 1
  r = coefficients(np.asarray(grads[GAP]), state.bases[0])
  _, (row, col, _) = adafactor_numpy([r], lr=schedule, b1=B1, t0=GAP)
  np.testing.assert_allclose(rms.v_row, row, rtol=1e-5)
  np.testing.assert_allclose(rms.v_col, col, rtol=1e-5)


def test_on_refresh_transport_is_refused_for_adafactor():
  with pytest.raises(ValueError, match=r"on_refresh='transport' needs an Adam-shaped"):
    gj.galore_projection(gj.scale_by_adafactor(), on_refresh="transport")
  with pytest.raises(ValueError, match=r"on_refresh='transport' needs an Adam-shaped"):
    gj.galore_adafactor(1e-2, on_refresh="transport")


# --------------------------------------------------------------------------------------------
# galore_adafactor: state bytes, dtype, weight decay mask, argument checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("b1", [None, B1])
def test_state_bytes_closed_form(dtype, b1):
  shapes = {"tall": (64, 16), "wide": (12, 40), "emb": (30, 8), "bias": (10,)}
  params = {k: jax.ShapeDtypeStruct(s, dtype) for k, s in shapes.items()}
  tx = gj.galore_adafactor(
      1e-2, rank=RANK, b1=b1, mask=lambda p: {k: k in ("tall", "wide") for k in p})
  b, first = jnp.dtype(dtype).itemsize, b1 is not None
  expected = 0
  for m, n in (shapes["tall"], shapes["wide"]):  # projected; float32 statistics
    expected += b * RANK * min(m, n) + 4 * (max(m, n) + RANK) + first * b * RANK * max(m, n) + 4
  expected += 4 * (30 + 8) + first * b * 30 * 8  # "emb", not projected: Adafactor's
  expected += 4 * (10 + 1) + first * b * 10  # "bias": a full second moment, a (1,) placeholder
  # int32 counters: projection, second moment, step size, weight decay, first moment
  expected += 4 * (4 + first)
  state = jax.eval_shape(tx.init, params)
  assert gj.tree_bytes(state) == expected
  assert gj.tree_bytes(tx.init(jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), params))) \
      == expected


def test_weight_decay_mask_with_param_scale():
  params = {"b": jnp.full((4,), 2.0), "w": jnp.full((8, 4), 2.0)}
  zero = jax.tree.map(jnp.zeros_like, params)
  tx = gj.galore_adafactor(0.5, rank=2, weight_decay=0.1, scale_parameter=True,
                           weight_decay_mask={"b": False, "w": True})
  updates, _ = jax.jit(tx.update)(zero, tx.init(params), params)
  np.testing.assert_allclose(updates["b"], 0.0)
  # -(wd * lr * max(eps2, RMS(w)) * w) = -(0.1 * 0.5 * 2 * 2)
  np.testing.assert_allclose(updates["w"], -0.2, rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(decay_rate=-0.8), r"decay_rate must be a finite number > 0"),
    (dict(eps=1e-30), r"eps must be a pair"),
    (dict(eps=(1e-30, 0.0)), r"eps must be a pair of finite numbers > 0"),
    (dict(eps=(1e-30, float("inf"))), r"eps must be a pair of finite numbers > 0"),
    (dict(clip_threshold=0.0), r"clip_threshold must be a finite number > 0"),
    (dict(b1=1.0), r"b1=1.0 is not in \[0, 1\)"),
    (dict(relative_step=True), r"learning_rate=0.01 with relative_step=True"),
    (dict(warmup_init=True), r"warmup_init=True needs relative_step=True"),
    (dict(learning_rate=None), r"learning_rate is None"),
    (dict(rank=0), r"rank must be an int >= 1"),
    # (without b1 too: it was checked only where a first moment is kept, and passed here)
    (dict(mu_dtype="int8"), r"mu_dtype must be a real floating dtype or None, got 'int8'"),
])
def test_argument_errors(kwargs, match):
  kwargs = {"learning_rate": 1e-2, **kwargs}
  with pytest.raises(ValueError, match=match):
    gj.galore_adafactor(kwargs.pop("learning_rate"), **kwargs)


@pytest.mark.parametrize("make", [
    lambda lr: gj.scale_by_adafactor(learning_rate=lr),
    lambda lr: gj.adafactor.add_step_size_decay(lr, 0.1)], ids=["scale_by", "decay"])
@pytest.mark.parametrize("lr", [-0.1, float("nan"), "0.1"])
def test_the_module_pieces_check_their_learning_rate_as_galore_adafactor(make, lr):
  """A negative step climbed the loss, NaN stepped NaN and a string was taken, where
  galore_adafactor refused each."""
  with pytest.raises(ValueError, match=r"^learning_rate must be a finite number >= 0 or a"):
    make(lr)


def test_relative_step_warmup_init_is_a_flag():
  """"no" was read as True (the warm-up branch: 1e-6 instead of 0.01 at the first step)."""
  with pytest.raises(ValueError, match=r"^warmup_init must be True or False, got 'no' \(str\)\.$"):
    gj.adafactor.relative_step("no")
  assert float(gj.adafactor.relative_step(False)(0)) == pytest.approx(0.01)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mixed_tree_compiles_once_with_stable_state(dtype):
  """Scanned and attention kernels (dimension numbers), a bias; refreshes, reset, parameter
  scale and decay: one compilation, state avals unchanged, updates in the params' dtype."""
  params = hygiene.make_params(dtype)
  tx = gj.galore_adafactor(1e-2, rank=RANK, update_proj_gap=2, b1=B1, weight_decay=0.1,
                           scale_parameter=True, on_refresh="reset",
                           dimension_numbers=hygiene.DIMS)
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(1)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  state = tx.init(params)
  want = hygiene.avals(state)
  for t in range(5):  # refreshes at steps 0, 2 and 4
    params, state, updates = step(params, state, hygiene.make_grads(params, t))
    assert hygiene.avals(state) == want
    assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
  assert len(traces) == 1
  assert all(bool(jnp.all(jnp.isfinite(p.astype(jnp.float32)))) for p in jax.tree.leaves(params))


def test_default_batch_dims_scale_each_matrix_of_a_stack_by_its_own_rms():
  """``batch_dims=None`` reads a ``(L, m, n)`` leaf as ``L`` matrices (all but the last two
  axes are batch axes): ``scale_parameter``'s RMS too is per matrix, as with
  ``batch_dims=1`` (it was one RMS of the whole stack: layers of RMS 1, 10 and 100 all got
  the stack's 58, a step 60x too large for the first)."""
  rng = np.random.default_rng(0)
  layer_rms = np.array([1.0, 10.0, 100.0])[:, None, None]
  params = {"k": jnp.asarray(rng.standard_normal((3, 8, 16)) * layer_rms, jnp.float32)}
  grads = {"k": jnp.asarray(rng.standard_normal((3, 8, 16)), jnp.float32)}

  def update(batch_dims):
    tx = gj.galore_adafactor(1.0, rank=4, clip_threshold=None, scale=1.0, scale_parameter=True,
                             dimension_numbers={"k": gj.DimensionNumbers(1, 2)},
                             batch_dims=batch_dims)
    return tx.update(grads, tx.init(params), params)[0]["k"]

  np.testing.assert_allclose(update(None), update(1), rtol=1e-6)


@pytest.mark.parametrize("batch_dims", [None, 1])
@pytest.mark.parametrize("shape", [(6, 3, 8), (3, 3, 8)])
def test_param_scale_and_decay_per_tensor_of_a_stack_that_is_not_first(shape, batch_dims):
  """An ``(in, L, out)`` leaf with ``DimensionNumbers(0, 2)`` stacks its L matrices on axis
  1: its update and weight decay equal those of the same stack with L first, and the decay
  is the reference's lambda * eta * s_l * theta, s_l = max(eps2, RMS) of
  layer l.  (The decay reshaped the per-layer scales as if L led: a shape error for
  in != L, another layer's scale for in == L; ``batch_dims=1`` took RMS over axis 0.)"""
  rng = np.random.default_rng(0)
  layer_rms = np.array([1.0, 10.0, 100.0]).reshape(1, 3, 1)
  w = rng.standard_normal(shape) * layer_rms
  g = rng.standard_normal(shape)
  common = dict(rank=2, clip_threshold=None, scale=1.0, scale_parameter=True, weight_decay=0.1,
                batch_dims=batch_dims)

  def update(w, g, axes):
    tx = gj.galore_adafactor(0.5, dimension_numbers={"k": gj.DimensionNumbers(*axes)}, **common)
    params = {"k": jnp.asarray(w, jnp.float32)}
    return np.asarray(tx.update({"k": jnp.asarray(g, jnp.float32)}, tx.init(params), params)[0]["k"])

  to_front = (1, 0, 2)
  want = update(np.transpose(w, to_front), np.transpose(g, to_front), (1, 2))
  np.testing.assert_allclose(update(w, g, (0, 2)), np.transpose(want, to_front), rtol=1e-6)
  s = np.maximum(1e-3, np.sqrt(np.mean(w**2, axis=(0, 2), keepdims=True)))
  np.testing.assert_allclose(update(w, 0 * g, (0, 2)), -0.1 * 0.5 * s * w, rtol=1e-6)


def test_batch_dims_make_each_slice_a_tensor_of_its_own():
  """``batch_dims=1`` on stacked leaves is Adafactor applied to each slice alone: a stacked
  ``(L, D)`` norm keeps a full second moment per vector (not one factored L x D matrix),
  the update-RMS clip and ``scale_parameter``'s RMS are per slice."""
  params = {"w": jnp.full((3, 8, 6), 0.5), "norm": jnp.linspace(0.5, 2.0, 12).reshape(3, 4)}
  common = dict(rank=2, b1=0.9, scale_parameter=True, mask={"w": True, "norm": False})
  stacked = gj.galore_adafactor(0.1, batch_dims=1, dimension_numbers=gj.DimensionNumbers(1, 2),
                                **common)
  alone = gj.galore_adafactor(0.1, dimension_numbers=gj.DimensionNumbers(0, 1), **common)
  state = stacked.init(params)
  assert state[0].inner_state[0].v_row["norm"].shape == (3, 4)  # unfactored, per slice
  rng = np.random.default_rng(0)
  ref = jax.vmap(alone.init)(params)
  for _ in range(3):
    g = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape) * np.array(
        [1.0, 10.0, 100.0]).reshape((3,) + (1,) * (p.ndim - 1)), jnp.float32), params)
    u, state = stacked.update(g, state, params)
    u_ref, ref = jax.vmap(alone.update)(g, ref, params)
    for a, b in zip(jax.tree.leaves((u, state)), jax.tree.leaves((u_ref, ref))):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)
  # by default the stacked norm is one factored 3 x 4 matrix, clipped as one
  default = gj.galore_adafactor(0.1, dimension_numbers=gj.DimensionNumbers(1, 2), **common)
  assert default.init(params)[0].inner_state[0].v_row["norm"].shape == (3,)


@pytest.mark.parametrize("make", [
    lambda: gj.scale_by_adafactor(1e-2, b1=0.9),
    lambda: gj.galore_adafactor(1e-2, rank=2, mask={"c": False, "w": True}),
], ids=["scale_by_adafactor", "galore_adafactor"])
def test_a_complex_leaf_is_refused_naming_it(make):
  """The row and column statistics are real (float32): a complex gradient's imaginary part
  was dropped without a word."""
  params = {"c": jnp.ones((4, 4), jnp.complex64), "w": jnp.ones((8, 4))}
  tx = make()
  with pytest.raises(ValueError, match=r"scale_by_adafactor: \['c'\] is complex64"):
    tx.init(params)
  real = {"c": jnp.ones((4, 4)), "w": jnp.ones((8, 4))}
  state = tx.init(real)
  grads = dict(real, c=jnp.full((4, 4), 1j, jnp.complex64))
  with pytest.raises(ValueError, match=r"scale_by_adafactor: \['c'\] is complex64"):
    jax.jit(tx.update)(grads, state, real)

"""Fast basis methods of galore_jax.subspace -- "gram_eigh", "randomized", "power", "random"
-- and the shifted CholeskyQR orthonormalization they share.

Gradients are low-rank-plus-noise matrices made with NumPy.  Every method call is jitted and
cached per configuration, and tests that need the same configuration share one compiled
function (XLA:CPU compiles are the bulk of this file's time), so e.g. a cold and a warm call
of "power" on the same shapes are one compilation: "cold" is a zero basis with
``refreshes == 0``, as the optimizer passes before the first refresh.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_jax as gj
from galore_jax import draws
from galore_jax import guard
from galore_jax import subspace

NAMES = list(subspace.METHODS)
ESTIMATES = ["gram_eigh", "randomized", "power"]  # fast methods that read the gradient
NEEDS_KEY = ["randomized", "random"]
RANK = 4
KEY = jax.random.key(7)

SHAPES = {
    "tall": (40, 24),
    "wide": (24, 40),
    "square": (32, 32),
    "batched": (3, 40, 24),
}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def low_rank_plus_noise(shape, seed=0, signal_rank=8, noise=1e-2):
  """Rank-``signal_rank`` signal with geometrically decaying singular values (10, 7.5, ...)
  plus small Gaussian noise, float32."""
  rng = np.random.default_rng(seed)
  *batch, m, n = shape
  u = np.linalg.qr(rng.standard_normal((*batch, m, signal_rank)))[0]
  v = np.linalg.qr(rng.standard_normal((*batch, n, signal_rank)))[0]
  s = 10.0 * 0.75 ** np.arange(signal_rank)
  g = (u * s) @ np.swapaxes(v, -1, -2) + noise * rng.standard_normal(shape)
  return jnp.asarray(g, jnp.float32)


def np64(x):
  return np.asarray(x, np.float64)


def mT(x):
  return np.swapaxes(x, -1, -2)


def left_energy(g, p):
  """||P^T G||_F^2 per matrix of the stack."""
  return np.sum((mT(np64(p)) @ np64(g)) ** 2, axis=(-2, -1))


def right_energy(g, q):
  """||G Q||_F^2 per matrix of the stack."""
  return np.sum((np64(g) @ np64(q)) ** 2, axis=(-2, -1))


def exact_bases(g, rank=RANK):
  u, _, vh = np.linalg.svd(np64(g), full_matrices=False)
  return u[..., :, :rank], mT(vh[..., :rank, :])


def canonical(b):
  """NumPy version of the sign rule (largest-magnitude entry of each column positive)."""
  pivot = np.take_along_axis(b, np.argmax(np.abs(b), axis=-2)[..., None, :], axis=-2)
  return b * np.where(pivot < 0, -1.0, 1.0)


def assert_captures(g, p=None, q=None, frac=0.99):
  """``p`` / ``q`` capture at least ``frac`` of the energy of the exact top subspace."""
  r = (p if p is not None else q).shape[-1]
  u, v = exact_bases(g, r)
  if p is not None:
    assert np.all(left_energy(g, p) >= frac * left_energy(g, u))
  if q is not None:
    assert np.all(right_energy(g, q) >= frac * right_energy(g, v))


def assert_basis(b, shape, atol=1e-5):
  """float32, the shape, orthonormal columns, sign-canonical."""
  assert b.dtype == jnp.float32 and b.shape == shape
  b = np64(b)
  eye = mT(b) @ b
  np.testing.assert_allclose(eye, np.broadcast_to(np.eye(b.shape[-1]), eye.shape), atol=atol)
  pivot = np.take_along_axis(b, np.argmax(np.abs(b), axis=-2)[..., None, :], axis=-2)
  assert np.all(pivot > 0)


def orthonormal(shape, seed):
  return np.linalg.qr(np.random.default_rng(seed).standard_normal(shape))[0]


def bases(left=None, right=None, refreshes=1):
  f32 = lambda b: None if b is None else jnp.asarray(b, jnp.float32)
  return subspace.Bases(left=f32(left), right=f32(right), refreshes=jnp.int32(refreshes))


def no_basis(g, rank=RANK, left=True, right=True):
  """What the optimizer passes before the first refresh: zero bases, ``refreshes == 0``."""
  *batch, m, n = g.shape
  return bases(
      np.zeros((*batch, m, rank)) if left else None,
      np.zeros((*batch, n, rank)) if right else None,
      refreshes=0,
  )


def perturbed_exact(g, rank=RANK, eps=0.1, seed=3):
  """The exact top-``rank`` bases plus ``eps`` Gaussian noise, re-orthonormalized: the
  previous bases of a nearby gradient (``refreshes == 1``)."""
  u, v = exact_bases(g, rank)
  rng = np.random.default_rng(seed)
  noisy = lambda b: np.linalg.qr(b + eps * rng.standard_normal(b.shape))[0]
  return bases(noisy(u), noisy(v))


@functools.lru_cache(maxsize=None)
def jitted(method, rank, left, right):
  """A jitted ``method(g, rank, left=, right=, prev=, key=)``, one per configuration."""
  method = subspace.get_method(method)
  return jax.jit(
      lambda g, prev, key: method(g, rank, left=left, right=right, prev=prev, key=key)
  )


def call(method, g, rank=RANK, *, left=True, right=True, prev="cold", key=KEY):
  """``method`` on ``g``, jitted; ``prev="cold"``: :func:`no_basis`."""
  if isinstance(prev, str):
    prev = no_basis(g, rank, left, right)
  return jitted(method, rank, left, right)(g, prev, key)


# --------------------------------------------------------------------------------------------
# orthonormalize: one stack of hard cases, one compilation
# --------------------------------------------------------------------------------------------


def _conditioned(d, k, cond, rank, rng):
  u = np.linalg.qr(rng.standard_normal((d, k)))[0]
  v = np.linalg.qr(rng.standard_normal((k, k)))[0]
  s = np.logspace(0, -np.log10(cond), k)
  s[rank:] = 0.0
  return (u * s) @ v.T, u[:, : min(rank, 6)]


# (condition number, rank) of 60 x 12 matrices.  1e6 / 1e12 are past what plain
# CholeskyQR2 handles in float32 (it fails near 1e4); rank 1 and 6 are exactly deficient.
ORTH_CASES = [(10.0, 12), (1e6, 12), (1e12, 12), (10.0, 1), (10.0, 6)]


@functools.lru_cache(maxsize=None)
def _orth_stack():
  rng = np.random.default_rng(0)
  mats, strong = zip(*(_conditioned(60, 12, c, r, rng) for c, r in ORTH_CASES))
  gaussian = rng.standard_normal((60, 12))
  zero_column = rng.standard_normal((60, 12))
  zero_column[:, 2] = 0.0
  y = np.stack([*mats, gaussian, zero_column, np.zeros((60, 12))])
  return y, strong, np.asarray(jax.jit(subspace.orthonormalize)(jnp.asarray(y, jnp.float32)))


def test_orthonormalize_ill_conditioned_and_rank_deficient():
  y, strong, q = _orth_stack()
  assert q.dtype == np.float32 and q.shape == y.shape and np.all(np.isfinite(q))
  eye = mT(np64(q)) @ np64(q)
  np.testing.assert_allclose(eye, np.broadcast_to(np.eye(12), eye.shape), atol=1e-5)
  # the well-resolved directions of the input lie in the span (directions weaker than
  # float32 resolution come out as orthonormal filler)
  for qi, u in zip(q, strong):
    np.testing.assert_allclose(np.linalg.norm(mT(np64(qi)) @ u, axis=0), 1.0, atol=1e-4)


def test_orthonormalize_is_triangular_like_qr():
  y, _, q = _orth_stack()
  # Q^T Y upper triangular: Q[:, :j] spans Y[:, :j] for every j -- for the Gaussian
  # matrix (CholeskyQR) and the one with a zero column (the QR fallback)
  for i in (5, 6):
    r = mT(np64(q[i])) @ np64(y[i])
    np.testing.assert_allclose(np.tril(r, -1), 0.0, atol=1e-5)


def _conditionals(lowered_text: str) -> int:
  """The ``lax.cond`` / ``lax.switch`` in a lowered program (StableHLO ``if`` / ``case``)."""
  return lowered_text.count("stablehlo.if") + lowered_text.count("stablehlo.case")


def test_orthonormalize_with_a_fallback_selects_it_without_a_conditional():
  """Where the guard rejects a matrix (the zero ones, which have no roundoff to make
  filler from) the fallback is taken, by a select; the others are the CholeskyQR result."""
  y, _, q = _orth_stack()
  rng = np.random.default_rng(1)
  fallback = np.linalg.qr(rng.standard_normal(y.shape))[0].astype(np.float32)
  f = jax.jit(lambda y, b: subspace.orthonormalize(y, fallback=b))
  got = np.asarray(f(jnp.asarray(y, jnp.float32), jnp.asarray(fallback)))
  np.testing.assert_array_equal(got[-1], fallback[-1])  # the zero matrix
  np.testing.assert_array_equal(got[:-2], q[:-2])  # CholeskyQR accepted: as without it
  assert _conditionals(f.lower(jnp.asarray(y, jnp.float32), jnp.asarray(fallback)).as_text()) == 0
  assert _conditionals(jax.jit(subspace.orthonormalize).lower(jnp.asarray(y)).as_text()) == 1


def test_orthonormalize_rejects_more_columns_than_rows():
  with pytest.raises(ValueError, match="k <= d"):
    subspace.orthonormalize(jnp.ones((3, 4)))


# --------------------------------------------------------------------------------------------
# Quality: captured energy vs the exact top-r subspace (both sides)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", ESTIMATES)
def test_captures_top_subspace_energy_cold(name, shape):
  g = low_rank_plus_noise(SHAPES[shape], seed=1)
  *batch, m, n = g.shape
  p, q = call(name, g)
  assert_captures(g, p, q)
  assert_basis(p, (*batch, m, RANK))
  assert_basis(q, (*batch, n, RANK))


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", ["randomized", "power"])
def test_captures_top_subspace_energy_warm(name, shape):
  g = low_rank_plus_noise(SHAPES[shape], seed=2)
  *batch, m, n = g.shape
  p, q = call(name, g, prev=perturbed_exact(g))
  assert_captures(g, p, q)
  assert_basis(p, (*batch, m, RANK))
  assert_basis(q, (*batch, n, RANK))
  if name == "power":  # an estimate, not the SVD: the warm path ran
    assert not np.allclose(np.abs(np64(p)), np.abs(exact_bases(g)[0]), atol=1e-7)


def _cold_starts(g):
  """No basis yet, or one matrix of the stack with a zero basis although refreshes > 0 (a
  first refresh rejected as non-finite), or prev None (a direct call)."""
  one_zero = perturbed_exact(g)
  one_zero = bases(one_zero.left, np.asarray(one_zero.right) * [[[1]], [[0]], [[1]]])
  return no_basis(g), one_zero, None


def test_power_cold_svd_is_the_svd():
  g = low_rank_plus_noise(SHAPES["batched"], seed=5)
  want = [canonical(b) for b in exact_bases(g)]
  for prev in _cold_starts(g):
    got = call(subspace.Power(cold="svd"), g, prev=prev)
    for b, w in zip(got, want):
      np.testing.assert_allclose(b, w, atol=1e-4)


def test_power_cold_default_is_a_randomized_range_finder_without_an_svd():
  """The default first basis: Randomized(power_iters=2) from the key it is given, matmuls
  only (an exact SVD is the slow part on a GPU), and still the top subspace."""
  g = low_rank_plus_noise(SHAPES["batched"], seed=5)
  want = call(subspace.Randomized(power_iters=2, warm_start=False), g, prev=None)
  for prev in _cold_starts(g):
    got = call("power", g, prev=prev)
    for b, w in zip(got, want):
      np.testing.assert_allclose(b, w, atol=1e-5)
    assert_captures(g, *got)
  jaxpr = str(jax.make_jaxpr(lambda g: subspace.Power()(g, RANK, left=True, right=True))(g))
  assert "svd" not in jaxpr and "svd" in str(jax.make_jaxpr(
      lambda g: subspace.Power(cold="svd")(g, RANK, left=True, right=True))(g))


def test_power_starts_cold_from_the_keys_a_keyed_method_gets():
  """In a transform, power's first basis is drawn from the keys a keyed method gets from seed
  0 (one per leaf and matrix, ``BasisMethod.cold_key``): the bases of Randomized(power_iters=2)
  with key 0.  Keys by a matrix's place in the stack it is computed in would repeat across
  leaves and change with the stacking (one device, a mesh, one layer at a time)."""
  rank = 4  # rank + oversample < 16: the range finder, not its exact fallback
  grads = {"a": jax.random.normal(jax.random.key(1), (24, 16)),
           "b": jax.random.normal(jax.random.key(2), (24, 16))}

  def first_bases(method):
    tx = gj.galore_projection(rank=rank, method=method)
    _, state = tx.update(grads, tx.init(jax.tree.map(jnp.zeros_like, grads)))
    return jax.tree.leaves(state.bases)

  got = first_bases("power")
  want = first_bases(subspace.Randomized(power_iters=2, warm_start=False))
  assert len(got) == len(want) == 4  # each leaf: its right basis and refresh count
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5)


def test_power_orders_columns_by_singular_value():
  g = low_rank_plus_noise(SHAPES["tall"], seed=6)
  prev = perturbed_exact(g)
  # store the columns in reverse: the Rayleigh-Ritz rotation restores the order
  prev = bases(np.asarray(prev.left)[:, ::-1], np.asarray(prev.right)[:, ::-1])
  p, q = call("power", g, prev=prev)
  assert np.all(np.diff(np.linalg.norm(mT(np64(p)) @ np64(g), axis=-1)) < 0)
  u, v = exact_bases(g)
  np.testing.assert_allclose(np.abs(np.sum(np64(p) * u, axis=0)), 1.0, atol=1e-2)
  np.testing.assert_allclose(np.abs(np.sum(np64(q) * v, axis=0)), 1.0, atol=1e-2)


def test_gram_eigh_matches_svd_vectors():
  g = low_rank_plus_noise(SHAPES["batched"], seed=1)
  for got, want in zip(call("gram_eigh", g), exact_bases(g)):
    np.testing.assert_allclose(got, canonical(want), atol=1e-4)


def _flat_spectrum(side):
  """A tall Gaussian matrix (a flat spectrum: hard for a sketch) and its exact basis on
  one side as the previous basis.  Tall: the right side is the range side of the sketch,
  the left side its row side."""
  g = jnp.asarray(np.random.default_rng(8).standard_normal(SHAPES["tall"]), jnp.float32)
  u, v = exact_bases(g)
  return g, bases(u if side == "left" else None, v if side == "right" else None)


NO_SKETCH = subspace.Randomized(oversample=0, power_iters=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_randomized_warm_start_uses_the_previous_basis(side):
  # Without oversampling or power iterations a cold sketch misses much of the top
  # subspace of a flat spectrum; a warm start from the exact basis recovers it.
  g, prev = _flat_spectrum(side)
  u, v = exact_bases(g)
  p, q = call(NO_SKETCH, g, prev=prev)
  np.testing.assert_allclose(left_energy(g, p), left_energy(g, u), rtol=1e-4)
  np.testing.assert_allclose(right_energy(g, q), right_energy(g, v), rtol=1e-4)
  p_cold, _ = call(NO_SKETCH, g, prev=prev._replace(refreshes=np.int32(0)))
  assert left_energy(g, p_cold) < 0.9 * left_energy(g, u)


def test_randomized_options_are_used():
  g, prev = _flat_spectrum("left")
  cold = prev._replace(refreshes=np.int32(0))
  top = left_energy(g, exact_bases(g)[0])
  frac = lambda m: float(left_energy(g, call(m, g, prev=cold)[0]) / top)
  # oversampling and power iterations help; precision="default" (TF32 products with G on
  # a GPU; float32 on CPU) runs
  more = subspace.Randomized(oversample=12, power_iters=2, precision="default")
  assert frac(more) > frac(NO_SKETCH) + 0.1


def test_bf16_products_keep_the_quality_and_highest_stays_selectable():
  """The default precision of power and randomized rounds the products' operands to bfloat16
  (a tensor core's bf16 matmul, exact on a CPU): power gives a different basis than with full
  float32 (the rounding is real), both at >= 0.99 of the exact top-r energy, both
  orthonormal (float32 orthonormalization).  (The quality tests above run randomized at its
  default, test_randomized_options_are_used at "default": float32 on a CPU.)"""
  assert subspace.Power().precision == subspace.Randomized().precision == "bfloat16"
  assert subspace.GramEigh().precision == "highest"
  g = low_rank_plus_noise(SHAPES["wide"], seed=4)
  prev = perturbed_exact(g)
  # "power": the registry's instance, compiled once for the quality tests above too
  low, full = call("power", g, prev=prev), call(subspace.Power(precision="highest"), g, prev=prev)
  for bases_ in (low, full):
    assert_captures(g, *bases_)
    assert_basis(bases_[0], (24, RANK))
  assert not np.array_equal(np.asarray(low[0]), np.asarray(full[0]))


# --------------------------------------------------------------------------------------------
# One side at a time, as the optimizer calls them: only that side is stored
# --------------------------------------------------------------------------------------------


# ("svd": tests/test_subspace.py; "random" one side at a time: the optimizer test below)
@pytest.mark.parametrize("name", ESTIMATES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_one_side(name, side):
  g = low_rank_plus_noise(SHAPES["tall"], seed=4)
  left, right = side == "left", side == "right"
  d = 40 if left else 24
  warm = perturbed_exact(g)._replace(**{"right" if left else "left": None})
  for prev in ("cold", warm):
    p, q = call(name, g, left=left, right=right, prev=prev)
    b, other = (p, q) if left else (q, p)
    assert other is None
    assert_basis(b, (d, RANK))
    assert_captures(g, **{"p" if left else "q": b})


# --------------------------------------------------------------------------------------------
# compute_bases on one bf16 stack with two batch axes: 3 low-rank-plus-noise gradients and
# a rank-1, an all-zero and a non-finite one.  Rank-deficient and zero gradients get finite
# orthonormal bases from every method (never NaN: the CholeskyQR guard falls back to QR on
# zero columns); a non-finite gradient gets all-NaN bases, which keep_finite rejects.
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _stack():
  good = np.asarray(low_rank_plus_noise((3, 30, 20), seed=12))
  rng = np.random.default_rng(16)
  rank1 = np.outer(rng.standard_normal(30), rng.standard_normal(20))
  bad = rng.standard_normal((30, 20))
  bad[3, 4] = np.inf
  g = np.stack([good, np.stack([rank1, np.zeros((30, 20)), bad])])  # (2, 3, 30, 20)
  return jnp.asarray(g, jnp.bfloat16)


@functools.lru_cache(maxsize=None)
def jitted_compute_bases(name):
  return jax.jit(
      lambda g, prev, key: subspace.compute_bases(
          g, RANK, left=True, right=True, method=name, prev=prev, key=key
      )
  )


@functools.lru_cache(maxsize=None)
def _stack_bases(name, warm):
  g = _stack()
  prev = no_basis(g)
  if warm:  # an unrelated previous basis, for the warm-started methods
    prev = bases(orthonormal((2, 3, 30, RANK), 0), orthonormal((2, 3, 20, RANK), 1))
  return prev, jitted_compute_bases(name)(g, prev, KEY)


@pytest.mark.parametrize("name", NAMES)
def test_two_batch_axes_and_bf16_through_compute_bases(name):
  _, (p, q) = _stack_bases(name, warm=False)
  assert p.shape == (2, 3, 30, RANK) and q.shape == (2, 3, 20, RANK)
  assert_basis(p[0], (3, 30, RANK))
  assert_basis(q[0], (3, 20, RANK))
  if name != "random":
    g = np64(_stack()[0].astype(jnp.float32))
    assert_captures(g, p[0], q[0])


@pytest.mark.parametrize("name", NAMES)
def test_degenerate_gradients(name):
  for warm in (False, True) if name in ("power", "randomized") else (False,):
    prev, (p, q) = _stack_bases(name, warm)
    for b, old, d in ((p, prev.left, 30), (q, prev.right, 20)):
      assert_basis(b[1, :2], (2, d, RANK), atol=1e-4)  # rank-1 and zero: finite
      assert np.all(np.isnan(b[1, 2]))  # non-finite: NaN, rejected by keep_finite
      np.testing.assert_array_equal(guard.keep_finite(b, old)[1, 2], old[1, 2])
    if name != "random":  # the rank-1 gradient's direction is found
      u, v = exact_bases(np64(_stack()[1, 0].astype(jnp.float32)), 1)
      np.testing.assert_allclose(np.linalg.norm(mT(np64(p[1, 0])) @ u), 1.0, atol=1e-3)
      np.testing.assert_allclose(np.linalg.norm(mT(np64(q[1, 0])) @ v), 1.0, atol=1e-3)


@pytest.mark.parametrize("name", ESTIMATES)
def test_an_entry_far_above_the_rest_still_gives_an_orthonormal_basis(name):
  """One entry 1e30 times the rest: even max-normalized, the rest's products underflow
  float32, so the power iterations' unguarded CholeskyQR broke (NaN, and keep_finite then
  left the first refresh's basis at zero: the leaf never trained).  The basis is finite and
  orthonormal, and its first columns are that entry's row and column, as the SVD's are."""
  g = low_rank_plus_noise((30, 20), seed=3).at[3, 4].set(1e30)
  unrelated = bases(orthonormal((30, RANK), 0), orthonormal((20, RANK), 1))
  for prev in (no_basis(g), unrelated) if name != "gram_eigh" else (no_basis(g),):
    p, q = jitted_compute_bases(name)(g, prev, KEY)
    assert_basis(p, (30, RANK), atol=1e-4)
    assert_basis(q, (20, RANK), atol=1e-4)
    np.testing.assert_allclose([p[3, 0], q[4, 0]], [1.0, 1.0], atol=1e-5)


# --------------------------------------------------------------------------------------------
# Random: a function of the key only
# --------------------------------------------------------------------------------------------


def test_random_is_a_function_of_the_key_only():
  fn = jitted_compute_bases("random")  # compiled for the stack tests above
  rng = np.random.default_rng(19)
  g1, g2 = (jnp.asarray(rng.standard_normal(_stack().shape), jnp.bfloat16) for _ in range(2))
  prev = no_basis(g1)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  a, b, c = (fn(g, prev, k) for g, k in ((g1, k1), (g2, k1), (g1, k2)))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)  # same key, another gradient: identical
  for x, y in zip(a, c):
    assert not np.allclose(x, y, atol=1e-2)  # another key: another basis
  # matrices of the stack, and the left and right sides, get independent draws
  p, q = np.asarray(a[0]), np.asarray(a[1])
  assert not np.allclose(p[0, 0], p[0, 1], atol=1e-2)
  assert not np.allclose(p[..., :20, :], q, atol=1e-2)


@pytest.mark.parametrize("name", NEEDS_KEY)
def test_a_matrix_draws_from_its_own_key(name):
  """A matrix's basis depends on its own key, not on the stack it is computed in:
  a single key is one key per matrix, fold_in(key, i); splitting the stack with
  its keys gives the same bases (what lets a mesh restack matrices)."""
  g = jnp.asarray(np.random.default_rng(5).standard_normal((3, 40, 24)), jnp.float32)
  keys = draws.matrix_keys(KEY, (3,))
  np.testing.assert_array_equal(
      jax.random.key_data(keys),
      jax.random.key_data(jnp.stack([jax.random.fold_in(KEY, i) for i in range(3)])))

  def bases(g, key):
    return subspace.compute_bases(g, RANK, left=True, right=True, method=name, key=key)

  whole = bases(g, KEY)
  parts = [bases(g[:1], keys[:1]), bases(g[1:], keys[1:])]
  for side in (0, 1):
    np.testing.assert_allclose(
        np.concatenate([np.asarray(part[side]) for part in parts]),
        np.asarray(whole[side]), atol=1e-5)
  raw = bases(g, jax.random.key_data(KEY))  # a raw uint32 key means the same key
  np.testing.assert_array_equal(np.asarray(raw[0]), np.asarray(whole[0]))
  with pytest.raises(ValueError, match=r"one per matrix \(shape \(3,\)\)"):
    bases(g, keys[:2])


# --------------------------------------------------------------------------------------------
# Registry and options
# --------------------------------------------------------------------------------------------


def test_methods_registry_and_options():
  assert NAMES == ["svd", "gram_eigh", "randomized", "power", "random"]
  assert subspace.get_method("randomized") == subspace.Randomized()
  assert [n for n in NAMES if subspace.METHODS[n].needs_key] == NEEDS_KEY
  hash(subspace.Randomized(oversample=4))  # frozen: usable as a static argument
  with pytest.raises(ValueError, match="oversample"):
    subspace.Randomized(oversample=-1)
  with pytest.raises(ValueError, match="power_iters"):
    subspace.Randomized(power_iters=1.5)
  with pytest.raises(ValueError, match="precision"):
    subspace.Power(precision="double")
  with pytest.raises(ValueError, match="Power cold must be 'randomized' or 'svd', got 'qr'"):
    subspace.Power(cold="qr")


# --------------------------------------------------------------------------------------------
# Through the optimizer
# --------------------------------------------------------------------------------------------


def _avals(tree):
  return jax.tree.structure(tree), [
      (x.shape, x.dtype, jax.typeof(x).weak_type) for x in jax.tree.leaves(tree)
  ]


@pytest.mark.parametrize("name", NAMES)
def test_galore_adamw_runs_with_every_method(name):
  rng = np.random.default_rng(18)
  params = {
      "b": jnp.zeros(10),
      "tall": jnp.asarray(rng.standard_normal((24, 10)), jnp.float32),  # right basis
      "wide": jnp.asarray(rng.standard_normal((10, 24)), jnp.float32),  # left basis
  }
  grads = [
      jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
      for _ in range(5)
  ]
  tx = gj.galore_adamw(1e-2, rank=3, update_proj_gap=2, method=name)

  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  avals = _avals(state)
  history = []
  for g in grads:
    params, state = step(params, state, g)
    assert _avals(state) == avals
    history.append(state[0].bases)
  galore = state[0]
  arrays = jax.tree.leaves((params, galore._replace(rng_key=None), state[1:]))
  assert all(np.all(np.isfinite(x)) for x in arrays)
  assert (galore.rng_key is not None) == (name in NEEDS_KEY)
  tall, wide = galore.bases[1], galore.bases[2]
  assert int(tall.refreshes) == 3  # steps 0, 2, 4
  assert tall.left is None and wide.right is None
  assert_basis(tall.right, (10, 3), atol=1e-4)
  assert_basis(wide.left, (10, 3), atol=1e-4)
  # a refresh step changes the basis, the step after it does not
  np.testing.assert_array_equal(history[0][1].right, history[1][1].right)
  assert not np.allclose(history[1][1].right, history[2][1].right)

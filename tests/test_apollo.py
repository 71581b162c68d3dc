"""APOLLO / APOLLO-Mini (``scale_by_apollo``, ``apollo_adamw``, ``apollo_mini``) against the
float64 NumPy oracle of ``tests/oracle_successors.py``, and their state against the papers'
memory formulas.

The tree has a tall (24x10, right basis under ``std``), a wide (10x24, left) and a square
(12x12, right) matrix, a scanned ``(L=3, in=8, out=12)`` kernel (three 12x8 matrices, each with
its own projection, scale and limiter norm), an attention-style ``(d=12, heads=2,
head_dim=5)`` kernel whose ``(heads, head_dim)`` axes are one output side (one 10x12 matrix,
the oracle's reshape ``x.reshape(d, heads * head_dim).T``) and a bias (plain Adam).  7 steps with
``update_proj_gap=3``: refreshes at 0, 3 and 6, moments kept (or reset) across them.

The random projection is JAX's draw (``gj.subspace.Gaussian`` at the documented key:
``fold_in(fold_in(key, leaf index), refresh counter)``, one ``fold_in`` per matrix of a stack);
the oracle takes it from there and does everything else in float64.  Its distribution is
checked on its own below.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_jax as gj
from oracle import make_problem
from oracle import svd_bases
from oracle_successors import limit
from oracle_successors import successor_oracle

DN = gj.DimensionNumbers
SHAPES = {"bias": (10,), "scan": (3, 8, 12), "square": (12, 12), "tall": (24, 10),
          "wide": (10, 24), "attn": (12, 2, 5)}
DIMS = {"bias": None, "scan": DN(1, 2), "square": DN(1, 0), "tall": DN(1, 0), "wide": DN(1, 0),
        "attn": DN(0, (1, 2))}
LEAF = {k: i for i, k in enumerate(sorted(SHAPES))}  # index in jax.tree.leaves order
PROJECTED = {k: k != "bias" for k in SHAPES}
LEAVES, MATRICES = 5, 7  # projected: leaves, and matrices (the scan kernel holds three)
HP = dict(lr=1e-2, update_proj_gap=3, weight_decay=0.1)
STEPS = 7
KEY = 7


def to_matrices(name, x):
  """A leaf as the list of its matrices (the matrix view): the scan kernel's ``(L, in, out)``
  gives ``L`` matrices ``out x in``; the attention kernel's ``(d, heads, head_dim)`` one
  ``(heads * head_dim) x d`` matrix; a 2-D leaf is its own matrix."""
  x = np.asarray(x)
  if name == "attn":
    return [x.reshape(x.shape[0], -1).T]
  return [m.T for m in x] if name == "scan" else [x]


def from_matrices(name, mats):
  if name == "attn":
    return mats[0].T.reshape(SHAPES["attn"])
  return np.stack([m.T for m in mats]) if name == "scan" else mats[0]


def problem(seed=0):
  """Params and gradients with well-separated singular values (``oracle.make_problem``),
  the scan kernel built from three such matrices, the attention kernel from one."""
  flat = {k: s for k, s in SHAPES.items() if k not in ("scan", "attn")}
  flat.update({f"scan{i}": (12, 8) for i in range(3)})
  flat["attn"] = (10, 12)
  params, grads = make_problem(flat, STEPS, seed)

  def join(d):
    out = {k: d[k] for k in SHAPES if k not in ("scan", "attn")}
    out["scan"] = np.stack([d[f"scan{i}"].T for i in range(3)])
    out["attn"] = from_matrices("attn", [d["attn"]])
    return out

  return join(params), [join(g) for g in grads]


def as_matrices(tree):
  return {k: to_matrices(k, v) if PROJECTED[k] else np.asarray(v) for k, v in tree.items()}


def run(tx, params, grads):
  """Jitted steps; the updates of each step (NumPy) and the final state."""
  p = {k: jnp.asarray(v) for k, v in params.items()}
  state, update, out = tx.init(p), jax.jit(tx.update), []
  for g in grads:
    u, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, p)
    p = optax.apply_updates(p, u)
    out.append({k: np.asarray(v) for k, v in u.items()})
  return out, state


def side(shape, proj_type):
  m, n = shape
  return (m < n) if proj_type == "std" else (m >= n)


def gaussian_bases(rank, proj_type="std"):
  """The projection the transform regenerates, from the documented key (JAX's draw)."""

  @functools.lru_cache(maxsize=None)
  def leaf_bases(name, refresh, shape):  # a whole stack at once
    left = side(shape, proj_type)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(KEY), LEAF[name]), refresh + 1)
    stack = jnp.zeros((3, *shape)) if name == "scan" else jnp.zeros(shape)
    p, q = gj.subspace.Gaussian()(stack, min(rank, *shape), left=left, right=not left,
                                  key=key)
    return left, np.asarray(p if left else q, np.float64)

  def bases(name, j, refresh, g):
    left, b = leaf_bases(name, refresh, g.shape)
    b = b[j] if name == "scan" else b
    return (b, None) if left else (None, b)

  return bases


def exact_bases(rank, proj_type="std"):
  """The float64 SVD's top-``rank`` singular vectors, sign-canonical (``oracle.svd_bases``)."""

  def bases(name, j, refresh, g):
    p, q = svd_bases(g, rank)
    return (p, None) if side(g.shape, proj_type) else (None, q)

  return bases


def assert_updates_close(ours, ref, rtol=1e-4):
  """Each step's updates, leaf by leaf, within ``rtol`` of the leaf's largest entry."""
  for step, (o, r) in enumerate(zip(ours, ref)):
    for k, want in r.items():
      want = from_matrices(k, want) if isinstance(want, list) else want
      np.testing.assert_allclose(o[k], want, rtol=rtol, atol=rtol * np.abs(want).max(),
                                 err_msg=f"step {step}, leaf {k!r}")


CASES = {
    # APOLLO: rank 4 random projection, channel scale, limiter on, moments kept.
    "apollo": (lambda: gj.apollo_adamw(1e-2, rank=4, dimension_numbers=DIMS, key=KEY,
                                       update_proj_gap=3, weight_decay=0.1),
               dict(bases=gaussian_bases(4), scale=1.0)),
    # APOLLO-Mini: rank 1, one scale per matrix, alpha = sqrt(128).
    "mini": (lambda: gj.apollo_mini(1e-2, dimension_numbers=DIMS, key=KEY, update_proj_gap=3,
                                    weight_decay=0.1),
             dict(bases=gaussian_bases(1), scale=math.sqrt(128), tensor=True)),
    # APOLLO with SVD, the other side rule, moments reset on refresh, no limiter, alpha 2.
    "svd_reverse_reset": (
        lambda: gj.apollo_adamw(1e-2, rank=4, proj="svd", proj_type="reverse_std", scale=2.0,
                                on_refresh="reset", limiter_gamma=None, dimension_numbers=DIMS,
                                update_proj_gap=3, weight_decay=0.1),
        dict(bases=exact_bases(4, "reverse_std"), scale=2.0, gamma=None, reset=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_apollo_matches_oracle(case):
  make, kw = CASES[case]
  params, grads = problem()
  ours, state = run(make(), params, grads)
  ref, fired = successor_oracle("apollo", as_matrices(params), [as_matrices(g) for g in grads],
                                projected=PROJECTED, **HP, **kw)
  assert_updates_close(ours, ref)
  if kw.get("gamma", 1.01) is not None:  # the limiter fired on some steps, not on all
    assert 0 < sum(fired) < MATRICES * (STEPS - 1), fired
  assert int(gj.refresh_counts(state)) == 3 * LEAVES  # three refreshes of each projected leaf


def test_limiter_caps_a_jump():
  """A jump of the gradient outside the (SVD) subspace leaves the coefficients, and so the
  scales, as they were while the raw gradient grows: the update's norm grows by exactly
  gamma, and the state keeps that norm."""
  rng = np.random.default_rng(0)
  g = rng.standard_normal((8, 16))
  p = svd_bases(g, 4)[0]
  g1 = g + 10 * (np.eye(8) - p @ p.T) @ rng.standard_normal((8, 16))
  tx = gj.scale_by_apollo(4, proj="svd", update_proj_gap=5, limiter_gamma=1.01)
  state = tx.init({"w": jnp.zeros((8, 16))})
  u0, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state)
  u1, state = tx.update({"w": jnp.asarray(g1, jnp.float32)}, state)
  n0, n1 = np.linalg.norm(u0["w"]), np.linalg.norm(u1["w"])
  assert n1 == pytest.approx(1.01 * n0, rel=1e-5)
  assert float(state.norms[0]) == pytest.approx(n1, rel=1e-5)
  x, norm, fired = limit(10 * np.ones((2, 2)), 1.0, 1.01)  # the oracle's limiter
  assert fired and norm == pytest.approx(1.01) and np.linalg.norm(x) == pytest.approx(1.01)
  assert not limit(np.ones((2, 2)), 0.0, 1.01)[2]  # no previous norm: no limit


def test_random_projection_is_regenerated_not_stored():
  """The state holds the refresh counter, not the projection; the projection is the
  Gaussian of the documented key (N(0, 1/r) entries), does not read the gradient, and
  changes at a refresh only."""
  params = {"w": jnp.zeros((16, 64))}
  tx = gj.scale_by_apollo(8, key=KEY, update_proj_gap=2, limiter_gamma=None)
  state = tx.init(params)
  assert state.bases[0].left is None and state.bases[0].right is None
  g = jnp.asarray(np.random.default_rng(1).standard_normal((16, 64)), jnp.float32)
  rs = []
  for t in range(3):  # refreshes at 0 and 2
    _, state = tx.update({"w": g}, state)
    rs.append(np.asarray(state.inner_state.mu["w"]))  # (8, 64): the projected gradients
  assert int(state.bases[0].refreshes) == 2
  # mu after step 1 = (1 - b1) R (1 + b1): the same projection at steps 0 and 1.
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(KEY), 0), 1)
  p, _ = gj.subspace.Gaussian()(g, 8, left=True, right=False, key=key)
  np.testing.assert_allclose(rs[1], 0.1 * 1.9 * np.asarray(p.T @ g), rtol=1e-5, atol=1e-6)
  p2, _ = gj.subspace.Gaussian()(jnp.ones_like(g), 8, left=True, right=False, key=key)
  np.testing.assert_array_equal(np.asarray(p), np.asarray(p2))  # the gradient is not read
  big, _ = gj.subspace.Gaussian()(jnp.zeros((4000, 1)), 50, left=True, right=False, key=key)
  assert abs(float(jnp.mean(big))) < 3e-3 and float(jnp.var(big)) == pytest.approx(1 / 50, rel=0.02)


@pytest.mark.parametrize("proj", ["random", "svd"])
def test_a_host_decision_is_honoured_as_galore_projection_honours_it(proj):
  """``galore_refresh`` (a Python bool decided on the host) was ignored: APOLLO refreshed
  on its own clock whatever the caller said, and took ``"no"`` too.  Now the policy's own
  decisions, given on the host, give its updates and state (and no conditional); a
  ``False`` at step 0 draws nothing; anything but a bool is refused."""
  rng = np.random.default_rng(3)
  params = {"w": jnp.zeros((6, 8)), "b": jnp.zeros(3)}
  tx = gj.scale_by_apollo(2, proj=proj, update_proj_gap=2, key=KEY)
  device = jax.jit(tx.update)
  host = jax.jit(tx.update, static_argnames="galore_refresh")
  s_device = s_host = tx.init(params)
  for t in range(4):
    grads = {k: jnp.asarray(rng.standard_normal(p.shape), jnp.float32) for k, p in params.items()}
    u_device, s_device = device(grads, s_device)
    u_host, s_host = host(grads, s_host, galore_refresh=t % 2 == 0)
    for a, b in zip(_numbers(u_device, s_device), _numbers(u_host, s_host)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # (two programs: round-off)
  text = host.lower(params, s_host, galore_refresh=False).as_text()
  assert text.count("stablehlo.if") + text.count("stablehlo.case") == 0
  _, state = host(params, tx.init(params), galore_refresh=False)
  assert int(gj.refresh_counts(state)) == 0
  for bad in ["no", jnp.bool_(False)]:
    with pytest.raises(ValueError, match="^galore_refresh: expected a Python bool"):
      tx.update(params, s_host, galore_refresh=bad)


def _numbers(*trees):
  """The leaves of ``trees``, a typed PRNG key as its key data."""
  return [jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
          for x in jax.tree.leaves(trees)]


# ------------------------------------------------------------------------------ memory


F32 = 4  # bytes of every state element counted below (float32 params: moments and norms
# float32, the refresh counter int32)
# Per transform, not per matrix: the step count and Adam's count (int32 each) and, with a
# random projection, one typed PRNG key (two uint32 words).
PER_TRANSFORM = 4 + 4


def state_bytes(tx, params):
  return gj.tree_bytes(jax.eval_shape(tx.init, params)[0])  # the APOLLO state, no chain


@pytest.mark.parametrize("m, n", [(64, 256), (256, 64)], ids=["wide", "tall"])
def test_state_is_the_papers_formula(m, n):
  """Per projected matrix (n the larger side): APOLLO 2nr + 2, APOLLO-Mini 2n + 2 (two
  moments, the counter the projection is drawn from -- the paper's seed -- and the
  limiter's norm), APOLLO with SVD mr + 2nr + 2 (the basis is stored); all float32
  elements, plus the per-transform scalars."""
  n, small, r = max(m, n), min(m, n), 16
  params = {"w": jax.ShapeDtypeStruct((m, n if m == small else small), jnp.float32)}
  key = 8
  assert state_bytes(gj.apollo_adamw(1e-2, rank=r), params) == (
      F32 * (2 * n * r + 2) + PER_TRANSFORM + key)
  assert state_bytes(gj.apollo_mini(1e-2), params) == F32 * (2 * n + 2) + PER_TRANSFORM + key
  assert state_bytes(gj.apollo_adamw(1e-2, rank=r, proj="svd"), params) == (
      F32 * (small * r + 2 * n * r + 2) + PER_TRANSFORM)
  # Without the limiter there is no norm to keep.
  assert state_bytes(gj.apollo_adamw(1e-2, rank=r, limiter_gamma=None), params) == (
      F32 * (2 * n * r + 1) + PER_TRANSFORM + key)


def test_stacked_kernel_counts_per_matrix_and_per_leaf():
  """A scanned (L, in, out) kernel: moments and a limiter norm per matrix, one refresh
  counter for the leaf (its matrices' keys are folded in from it): L (2nr + 1) + 1."""
  L, d, f, r = 3, 32, 96, 8
  params = {"k": jax.ShapeDtypeStruct((L, d, f), jnp.float32)}
  tx = gj.apollo_adamw(1e-2, rank=r, dimension_numbers={"k": DN(1, 2)})
  assert state_bytes(tx, params) == F32 * (L * (2 * f * r + 1) + 1) + PER_TRANSFORM + 8


def test_mini_is_under_one_percent_of_adamw_on_60m_matrices():
  """The issue's target: APOLLO-Mini's state on the projected matrices of LLaMA-60M (q, k,
  v, o 512x512; gate, up, down 512x1376, per layer) under 1% of AdamW's."""
  shapes = [(512, 512)] * 4 + [(512, 1376)] * 2 + [(1376, 512)]
  params = {f"m{i}": jax.ShapeDtypeStruct(s, jnp.float32) for i, s in enumerate(shapes)}
  mini = gj.memory.estimate(params, "apollo_mini").optimizer_state
  adamw = gj.memory.estimate(params, "adamw").optimizer_state
  assert mini == sum(F32 * (2 * max(s) + 2) for s in shapes)
  assert mini / adamw < 0.01
  assert state_bytes(gj.apollo_mini(1e-2), params) == mini + PER_TRANSFORM + 8


def test_reset_of_a_partly_rejected_stack_resets_the_taken_layers_only():
  """proj="svd", on_refresh="reset": a stack of 3 layers whose layer 1 has a NaN on the second
  refresh keeps that layer's basis, and so its moments (Adam then adds the step, NaN where the
  gradient's column is); layers 0 and 2 restart.  Reference: the layers as leaves of their
  own."""
  gap, shape = 2, (3, 12, 8)
  rng = np.random.default_rng(3)
  grads = [jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(gap + 2)]
  grads[gap] = grads[gap].at[1, 2, 3].set(jnp.nan)

  def make(dims):
    return gj.scale_by_apollo(4, proj="svd", update_proj_gap=gap, on_refresh="reset",
                              limiter_gamma=None, dimension_numbers=dims)

  stacked, apart = make({"s": DN(1, 2)}), make({f"s{i}": DN(0, 1) for i in range(3)})
  s_state = stacked.init({"s": jnp.zeros(shape)})
  a_state = apart.init({f"s{i}": jnp.zeros(shape[1:]) for i in range(3)})
  for t, g in enumerate(grads):
    _, s_state = jax.jit(stacked.update)({"s": g}, s_state)
    _, a_state = jax.jit(apart.update)({f"s{i}": g[i] for i in range(3)}, a_state)
    got, want = s_state.inner_state, a_state.inner_state
    for i in range(3):
      for x, y in ((got.mu["s"][i], want.mu[f"s{i}"]), (got.nu["s"][i], want.nu[f"s{i}"])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6,
                                   err_msg=f"step {t}, layer {i}")
  assert np.isnan(np.asarray(got.mu["s"][1])).any() and not np.isnan(got.mu["s"][0]).any()

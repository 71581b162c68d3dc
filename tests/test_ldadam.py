"""LDAdam (``scale_by_ldadam`` / ``ldadamw``) and ``galore_projection(on_refresh="transport")``.

The oracle below is written from the reference algorithm's equations (reference notes, LDAdam
section 1.3, as of the 2024-10-31 fix), in float64 and in the reference's own orientation: a
left projector is ``P`` (m x r, orthonormal columns), a right projector is stored as ``P``
(r x n, orthonormal rows), compress ``P^T G`` / ``G P^T``, decompress ``P X`` / ``X P``, and
the change of basis is ``P_t^T P_{t-1}`` / ``P_{t-1} P_t^T``.  QR columns get a positive
``R`` diagonal; LDAdam's updates do not depend on the signs of the basis vectors (flipping
column ``j`` of ``P_t`` flips row ``j`` of ``Q``, of ``m`` and of the compressed gradient, and
``Q o Q``, the squares and ``P m`` are unchanged), so the tests compare updates, second
moments, full-space momenta ``P m`` and error buffers, never raw bases.

Tolerances.  Differences from the float64 oracle come from float32 rounding (unit roundoff
6e-8) amplified by the factorizations: the SVD / power-step subspace moves by about
``eps * sigma_1 / gap`` and Adam's ``m / sqrt(v)`` divides two rounded quantities.  On these
inputs (spectra with clear gaps) the measured worst relative error over eight steps is about
5e-6 of the largest entry; the tests allow 5e-5 (10x margin).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_jax as gj
from galore_jax import moments
from oracle import coefficients

DN = gj.DimensionNumbers
B1, B2, EPS, RHO = 0.908, 0.99, 1e-8, 0.908
REL = 5e-5  # relative to the largest entry, see the module docstring


# --------------------------------------------------------------------------------------------
# the float64 oracle
# --------------------------------------------------------------------------------------------


def qr_positive(y):
  q, r = np.linalg.qr(y)
  signs = np.where(np.diag(r) < 0, -1.0, 1.0)
  return q * signs


class LDAdamOracle:
  """One matrix, reference orientation (see the module docstring)."""

  def __init__(self, shape, side, rank, *, b1=B1, b2=B2, eps=EPS, rho=RHO, ef=True, qq_power=1):
    m, n = shape
    self.side, self.r, self.b1, self.b2 = side, rank, b1, b2
    self.eps, self.rho, self.ef = eps, rho, ef
    self.qq_power = qq_power  # 2 reproduces the pre-2024-10-31 bug: (Q o Q) applied twice
    self.P = np.zeros((m, rank) if side == "left" else (rank, n))
    low = (rank, n) if side == "left" else (m, rank)
    self.m, self.v = np.zeros(low), np.zeros(low)
    self.err = np.zeros(shape)
    self.t = 0
    self.abs_acted = False  # whether the transported bracket was ever negative

  def compress(self, P, x):
    return P.T @ x if self.side == "left" else x @ P.T

  def decompress(self, P, x):
    return P @ x if self.side == "left" else x @ P

  def momentum(self):
    return self.decompress(self.P, self.m)

  def step(self, g):
    b1, b2, t, r = self.b1, self.b2, self.t, self.r
    a = np.asarray(g, np.float64) + self.err                               # a_t = g_t + e_t
    P_prev = self.P
    if t == 0:                                                             # step 1: SVD
      u, _, vh = np.linalg.svd(a, full_matrices=False)
      P = u[:, :r] if self.side == "left" else vh[:r]
    else:                                                                  # one power step
      b = self.rho * self.decompress(P_prev, self.m) / (1 - b1**t) + (1 - self.rho) * a
      P = qr_positive(b @ (b.T @ P_prev)) if self.side == "left" else (
          qr_positive(b.T @ (b @ P_prev.T)).T)
    g_low = self.compress(P, a)                                            # step 2
    if self.side == "left":                                                # steps 3, 4
      Q = P.T @ P_prev
      m_t = Q @ self.m
    else:
      Q = P_prev @ P.T
      m_t = self.m @ Q
    if self.ef:                                                            # step 5
      self.err = (a - self.decompress(P, g_low)
                  + b1 / (1 - b1) * (self.decompress(P_prev, self.m) - self.decompress(P, m_t)))
    if t > 0:                                                              # step 6
      m_hat, v_hat = self.m / (1 - b1**t), self.v / (1 - b2**t)
      QQ = (Q * Q) ** self.qq_power
      if self.side == "left":
        bracket = QQ @ (v_hat - m_hat**2) + (Q @ m_hat) ** 2
      else:
        bracket = (v_hat - m_hat**2) @ QQ + (m_hat @ Q) ** 2
      self.abs_acted |= bool((bracket < 0).any())
      v_t = (1 - b2**t) * np.abs(bracket)
    else:
      v_t = self.v
    self.m = b1 * m_t + (1 - b1) * g_low                                   # step 7
    self.v = b2 * v_t + (1 - b2) * g_low**2
    direction = (self.m / (1 - b1 ** (t + 1))) / (np.sqrt(self.v / (1 - b2 ** (t + 1))) + self.eps)
    self.P, self.t = P, t + 1                                              # step 9
    return self.decompress(P, direction)                                   # step 8 (w/o lr)


class AdamOracle:
  """Non-projected leaves: AdamW form, eps after the sqrt of the bias-corrected v."""

  def __init__(self, shape, *, b1=B1, b2=B2, eps=EPS):
    self.m, self.v, self.t = np.zeros(shape), np.zeros(shape), 0
    self.b1, self.b2, self.eps = b1, b2, eps

  def step(self, g):
    b1, b2 = self.b1, self.b2
    self.m = b1 * self.m + (1 - b1) * g
    self.v = b2 * self.v + (1 - b2) * g * g
    self.t += 1
    return (self.m / (1 - b1**self.t)) / (np.sqrt(self.v / (1 - b2**self.t)) + self.eps)


# --------------------------------------------------------------------------------------------
# a mixed param tree: every orientation, a bias and a scanned kernel with a batch axis
# --------------------------------------------------------------------------------------------

SHAPES = {"wide": (6, 10), "tall": (10, 6), "square": (8, 8), "bias": (10,), "scan": (2, 6, 9)}
AS_GIVEN = DN(reduction_axis=1, output_axis=0)
DIMS = {"wide": AS_GIVEN, "tall": AS_GIVEN, "square": AS_GIVEN, "bias": None,
        "scan": DN(reduction_axis=1, output_axis=2)}  # (L, in, out): L matrices (out x in)
RANK = 3


def side_of(m, n, proj_type):
  """The side rule, written out independently: ours ('std') and the reference's."""
  if proj_type == "std":
    return "left" if m < n else "right"
  if proj_type == "ldadam_std":
    return "left" if m <= n else "right"
  return proj_type


def matrices(name, x):
  """The leaf as a list of (output, input) matrices, and the inverse map."""
  x = np.asarray(x, np.float64)
  if name == "scan":
    return [x[l].T for l in range(x.shape[0])], lambda ms: np.stack([mm.T for mm in ms])
  return [x], lambda ms: ms[0]


def grads_at(t, seed=0):
  """Gradients with decaying column weights (clear singular gaps), fresh each step."""
  rng = np.random.default_rng(1000 * seed + t)
  out = {}
  for name, shape in SHAPES.items():
    g = rng.standard_normal(shape)
    if len(shape) > 1:
      g = g * np.exp(-np.arange(shape[-1]) / 3.0)
    out[name] = g
  return out


class TreeOracle:
  """The oracle over the param tree: LDAdam per matrix, Adam for the bias."""

  def __init__(self, proj_type, **kw):
    self.leaves = {}
    for name, shape in SHAPES.items():
      if name == "bias":
        adam_kw = {k: v for k, v in kw.items() if k in ("b1", "b2", "eps")}
        self.leaves[name] = AdamOracle(shape, **adam_kw)
        continue
      mats, _ = matrices(name, np.zeros(shape))
      self.leaves[name] = [
          LDAdamOracle(mm.shape, side_of(*mm.shape, proj_type), min(RANK, *mm.shape), **kw)
          for mm in mats
      ]

  def step(self, grads):
    out = {}
    for name, g in grads.items():
      if name == "bias":
        out[name] = self.leaves[name].step(np.asarray(g, np.float64))
        continue
      mats, back = matrices(name, g)
      out[name] = back([o.step(mm) for o, mm in zip(self.leaves[name], mats)])
    return out

  def collect(self, what):
    """Per-leaf oracle quantity ('err', 'momentum', 'v') in the leaf's layout."""
    out = {}
    for name, shape in SHAPES.items():
      if name == "bias":
        continue
      get = {"err": lambda o: o.err, "momentum": lambda o: o.momentum(), "v": lambda o: o.v}[what]
      vals = [get(o) for o in self.leaves[name]]
      if what == "v":
        out[name] = np.stack(vals) if name == "scan" else vals[0]
      else:
        out[name] = matrices(name, np.zeros(shape))[1](vals)
    return out


def assert_close(got, want, rel=REL, what=""):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(np.max(np.abs(want)), 1e-30)
  err = np.max(np.abs(got - want)) / scale
  assert err <= rel, f"{what}: relative error {err:.2e} > {rel:.0e}"


def jnp_tree(tree, dtype=jnp.float32):
  return {k: jnp.asarray(v, dtype) for k, v in tree.items()}


def ld_state(opt_state):
  """The ScaleByLDAdamState in a state of scale_by_ldadam or of the ldadamw chain."""
  if isinstance(opt_state, gj.ScaleByLDAdamState):
    return opt_state
  return opt_state[0]


def state_momentum(state, name, names):
  """P m of a leaf, in the leaf's layout, from our state (NumPy)."""
  b = state.bases[names.index(name)]
  mu = np.asarray(state.mu[name], np.float64)
  if b.left is not None:
    full = np.asarray(b.left, np.float64) @ mu
  else:
    full = mu @ np.swapaxes(np.asarray(b.right, np.float64), -1, -2)
  return np.swapaxes(full, -1, -2) if name == "scan" else full


def avals(tree):
  def one(x):
    t = x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)
    return (tuple(t.shape), t.dtype, bool(getattr(t, "weak_type", False)))
  return jax.tree.structure(tree), [one(x) for x in jax.tree.leaves(tree)]


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def init_params(shapes=SHAPES, seed=99):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s) for k, s in shapes.items()}


# --------------------------------------------------------------------------------------------
# 1. the fp32 transform matches the float64 oracle (left, right, square, batch axes, EF on/off)
# --------------------------------------------------------------------------------------------


def test_matches_reference_oracle_with_error_feedback():
  """ldadamw on the mixed tree, steps 0 (SVD) to 7 (power steps): updates, params, v, P m
  and the error buffer against the oracle; state avals stable; one compilation."""
  lr, wd, steps = 0.01, 0.1, 8
  params = init_params()
  tx = gj.ldadamw(lr, rank=RANK, weight_decay=wd, dimension_numbers=DIMS)
  traces = []

  @jax.jit
  def update(grads, state, params):
    traces.append(1)
    return tx.update(grads, state, params)

  p = jnp_tree(params)
  state = tx.init(p)
  want_avals = avals(state)
  oracle = TreeOracle("ldadam_std")  # the default side rule is the reference's
  names = sorted(SHAPES)
  want_p = dict(params)
  for t in range(steps):
    g = grads_at(t)
    direction = oracle.step(g)
    want_u = {k: -lr * (direction[k] + wd * want_p[k]) for k in want_p}
    want_p = {k: want_p[k] + want_u[k] for k in want_p}
    updates, state = update(jnp_tree(g), state, p)
    p = optax.apply_updates(p, updates)
    assert avals(state) == want_avals, f"state avals changed at step {t}"
    s = ld_state(state)
    want_v, want_mom, want_err = (oracle.collect(w) for w in ("v", "momentum", "err"))
    for k in SHAPES:
      assert_close(updates[k], want_u[k], what=f"step {t} update {k}")
      assert_close(p[k], want_p[k], what=f"step {t} params {k}")
      if k != "bias":
        assert_close(s.nu[k], want_v[k], what=f"step {t} nu {k}")
        assert_close(state_momentum(s, k, names), want_mom[k], what=f"step {t} P m {k}")
        assert_close(s.error[names.index(k)], want_err[k], what=f"step {t} error {k}")
  assert int(s.count) == steps
  assert len(traces) == 1  # step 0 (SVD) and later steps (power step): one program
  # The orientation is what the side rule says; the scanned kernel has a basis per layer.
  bases = dict(zip(names, s.bases))
  assert bases["wide"].left.shape == (6, RANK) and bases["tall"].right.shape == (6, RANK)
  assert bases["square"].left.shape == (8, RANK)  # default "ldadam_std": square -> left
  assert bases["scan"].right.shape == (2, 6, RANK)  # each layer 9 x 6 (out x in) -> right
  assert isinstance(bases["bias"], optax.MaskedNode)


def test_matches_reference_oracle_without_error_feedback_library_side_rule():
  """scale_by_ldadam, error_feedback=False, proj_type="std" (this library's rule, still
  selectable): the square matrix is projected on the right; the tall one too."""
  shapes = {"square": (8, 8), "tall": (10, 6)}
  tx = gj.scale_by_ldadam(rank=RANK, proj_type="std", error_feedback=False)
  state = tx.init(jnp_tree(init_params(shapes)))
  assert state.error is None
  update = jax.jit(tx.update)
  oracles = {k: LDAdamOracle(s, side_of(*s, "std"), RANK, ef=False)
             for k, s in shapes.items()}
  assert oracles["square"].side == "right"
  for t in range(6):
    g = {k: v for k, v in grads_at(t, seed=2).items() if k in shapes}
    updates, state = update(jnp_tree(g), state)
    for k in shapes:
      assert_close(updates[k], oracles[k].step(g[k]), what=f"step {t} update {k}")
      assert_close(state.nu[k], oracles[k].v, what=f"step {t} nu {k}")
  assert state.bases[0].right.shape == (8, RANK)  # "square" (sorted first): right


# --------------------------------------------------------------------------------------------
# 2. full rank: what LDAdam shares with AdamW
# --------------------------------------------------------------------------------------------
#
# With r = the projected dimension, P_t is square orthogonal, so P_t P_t^T = I:
#  * the error buffer stays 0 (a - P P^T a = 0 and P_{t-1} m - P_t P_t^T P_{t-1} m = 0);
#  * the first moment is transported exactly: P_t m_t equals AdamW's first moment m_t for any
#    gradients (both are the same EMA of the same gradients);
#  * Q = P_t^T P_{t-1} is orthogonal, so Q o Q is doubly stochastic: the transported variance
#    keeps its sum over the projected axis, and sum (Q m)^2 = sum m^2.  If b1 == b2, Jensen's
#    inequality keeps v_hat >= m_hat^2 coordinate-wise through every transport and EMA step, so
#    the absolute value never acts and the sums of v over the projected axis equal AdamW's
#    (sums of the squared gradients' EMA).  With (Q o Q) applied twice (the pre-fix bug) the
#    rows of Q^(o4) sum to less than 1 and this conservation fails;
#  * Adam's element-wise normalisation is basis dependent, so the updates themselves are
#    AdamW's only when the basis is a signed permutation of the coordinate axes, e.g. for
#    gradients D_t S with fixed orthonormal rows S and positive diagonal D_t: then
#    LDAdam == AdamW.

FULL_SHAPES = {"wide": (4, 7), "tall": (7, 4)}  # std: wide -> left (r = 4 = m), tall -> right


@pytest.fixture(scope="module")
def full_rank():
  tx = gj.scale_by_ldadam(rank=4, b1=0.9, b2=0.9)
  return tx, jax.jit(tx.update)


def test_full_rank_invariants(full_rank):
  tx, update = full_rank
  b1 = b2 = 0.9
  rng = np.random.default_rng(5)
  state = tx.init(jnp_tree(init_params(FULL_SHAPES)))
  adam_m = {k: np.zeros(s) for k, s in FULL_SHAPES.items()}
  adam_v = {k: np.zeros(s) for k, s in FULL_SHAPES.items()}
  buggy = {k: LDAdamOracle(s, side_of(*s, "ldadam_std"), 4, b1=b1, b2=b2, qq_power=2)
           for k, s in FULL_SHAPES.items()}
  buggy_gap = 0.0
  names = sorted(FULL_SHAPES)
  differs_from_adamw = False
  for t in range(8):
    g = {k: rng.standard_normal(s) for k, s in FULL_SHAPES.items()}
    updates, state = update(jnp_tree(g), state)
    for k in FULL_SHAPES:
      adam_m[k] = b1 * adam_m[k] + (1 - b1) * g[k]
      adam_v[k] = b2 * adam_v[k] + (1 - b2) * g[k] ** 2
      axis = 0 if k == "wide" else 1  # the projected axis
      scale = np.max(np.abs(g[k]))
      np.testing.assert_allclose(np.asarray(state.error[names.index(k)]), 0, atol=1e-5 * scale)
      assert_close(state_momentum(state, k, names), adam_m[k], rel=1e-5, what=f"P m {k}")
      assert_close(np.sum(np.asarray(state.nu[k], np.float64), axis=axis),
                   np.sum(adam_v[k], axis=axis), rel=1e-5, what=f"sum v {k}")
      buggy[k].step(g[k])
      buggy_gap = max(buggy_gap, np.max(np.abs(
          np.sum(buggy[k].v, axis=axis) - np.sum(adam_v[k], axis=axis))) / np.max(adam_v[k]))
      adam_u = (adam_m[k] / (1 - b1 ** (t + 1))) / (np.sqrt(adam_v[k] / (1 - b2 ** (t + 1))) + EPS)
      differs_from_adamw |= not np.allclose(np.asarray(updates[k]), adam_u, atol=1e-3)
  assert buggy_gap > 1e-2  # the Q^(o4) transport breaks the conservation law
  assert differs_from_adamw  # general gradients: a rotating basis is not AdamW's


def test_full_rank_equals_adamw_on_a_fixed_coordinate_basis(full_rank):
  tx, update = full_rank
  b1 = b2 = 0.9
  rng = np.random.default_rng(6)
  rows = np.linalg.qr(rng.standard_normal((7, 4)))[0]  # 7 x 4, orthonormal columns
  state = tx.init(jnp_tree(init_params(FULL_SHAPES)))
  adam = {k: AdamOracle(s, b1=b1, b2=b2) for k, s in FULL_SHAPES.items()}
  for t in range(6):
    d = np.diag(rng.uniform(0.5, 2.0, 4) * np.array([8.0, 4.0, 2.0, 1.0]))
    g = {"wide": d @ rows.T, "tall": rows @ d}  # singular vectors: coordinate axes
    updates, state = update(jnp_tree(g), state)
    for k in FULL_SHAPES:
      assert_close(updates[k], adam[k].step(g[k]), rel=1e-4, what=f"step {t} {k}")


# --------------------------------------------------------------------------------------------
# 3. the second moment stays nonnegative; Q o Q is applied once
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("state_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_nu_nonnegative_on_adversarial_inputs(state_dtype):
  """b1 > b2 and gradients that collapse after one large step: m_hat^2 outlives v_hat, the
  re-centred variance goes negative and, once the basis rotates, the bracket does too: the
  absolute value must act (the oracle checks that it does); nu stays >= 0 and finite, the
  updates finite."""
  shape, b1, b2, rho = (6, 6), 0.99, 0.5, 0.3
  tx = gj.scale_by_ldadam(rank=3, b1=b1, b2=b2, rho=rho, state_dtype=state_dtype)
  update = jax.jit(tx.update)
  state = tx.init({"w": jnp.zeros(shape)})
  oracle = LDAdamOracle(shape, "right", 3, b1=b1, b2=b2, rho=rho)
  rng = np.random.default_rng(7)
  for t in range(10):
    g = rng.standard_normal(shape) * (100.0 if t < 1 else 1e-2)
    oracle.step(g)
    updates, state = update({"w": jnp.asarray(g, jnp.float32)}, state)
    nu = np.asarray(state.nu["w"], np.float32)
    assert np.all(np.isfinite(nu)) and np.all(nu >= 0), f"step {t}: nu = {nu.min()}"
    assert np.all(np.isfinite(np.asarray(updates["w"])))
  assert oracle.abs_acted
  assert state.nu["w"].dtype == state_dtype


def test_transport_uses_q_o_q_once():
  """A 45-degree rotation of a 2-D subspace: Q = [[c, s], [-s, c]], Q o Q = 1/2 everywhere.
  With zero mean the transported second moment is (Q o Q) v = the average of the two
  coordinates (the pre-fix (Q o Q)^(o2) = 1/4 would halve it)."""
  c = s = np.sqrt(0.5)
  q = jnp.asarray([[c, s], [-s, c]], jnp.float32)
  b1, b2, t = 0.9, 0.99, 5
  mu = jnp.zeros((2, 3))
  v = np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 4.0]])
  nu = jnp.asarray(v * (1 - b2**t), jnp.float32)  # v_hat = v
  for side in ("left", "right"):
    args = (q, None) if side == "left" else (None, q)
    x = nu if side == "left" else nu.T
    new_mu, new_nu = moments.transport_adam(mu if side == "left" else mu.T, x, *args,
                                                jnp.int32(t), b1, b2)
    want = np.broadcast_to(v.mean(axis=0), (2, 3)) * (1 - b2**t)
    got = np.asarray(new_nu) if side == "left" else np.asarray(new_nu).T
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(new_mu), 0)
  # A mean, moved by Q: the new second moment is the variance part plus (Q m_hat)^2.
  m = np.array([[1.0], [0.0]])
  v = np.array([[1.0], [0.0]])  # variance 0: all of the second moment is the mean's
  new_mu, new_nu = moments.transport_adam(
      jnp.asarray(m * (1 - b1**t), jnp.float32), jnp.asarray(v * (1 - b2**t), jnp.float32),
      q, None, jnp.int32(t), b1, b2)
  np.testing.assert_allclose(np.asarray(new_nu) / (1 - b2**t), (np.asarray(q) @ m) ** 2,
                             atol=1e-6)


# --------------------------------------------------------------------------------------------
# 4. gradient accumulation and clipping
# --------------------------------------------------------------------------------------------


def test_multisteps_and_clipping_compose():
  """MultiSteps(chain(clip_by_global_norm, ldadamw), k): each real step is LDAdam on the
  clipped mean gradient; clipping acts on the fresh gradient, the error is added after."""
  k, real_steps, max_norm, lr = 2, 4, 0.5, 0.05
  shapes = {"wide": (6, 10), "bias": (10,)}
  inner = optax.chain(optax.clip_by_global_norm(max_norm), gj.ldadamw(lr, rank=RANK))
  tx = optax.MultiSteps(inner, every_k_schedule=k)
  params = jnp_tree(init_params(shapes))
  state = tx.init(params)
  update = jax.jit(tx.update)
  ld, adam = LDAdamOracle((6, 10), "left", RANK), AdamOracle((10,))
  rng = np.random.default_rng(8)
  for real in range(real_steps):
    minis = [{n: rng.standard_normal(s) for n, s in shapes.items()} for _ in range(k)]
    for i, g in enumerate(minis):
      updates, state = update(jnp_tree(g), state, params)
      if i < k - 1:
        for u in jax.tree.leaves(updates):
          np.testing.assert_array_equal(np.asarray(u), 0)
    mean = {n: sum(m[n] for m in minis) / k for n in shapes}
    norm = np.sqrt(sum(np.sum(x**2) for x in mean.values()))
    assert norm > max_norm  # the clip binds
    clipped = {n: x * max_norm / norm for n, x in mean.items()}
    assert_close(updates["wide"], -lr * ld.step(clipped["wide"]), what=f"step {real} wide")
    assert_close(updates["bias"], -lr * adam.step(clipped["bias"]), what=f"step {real} bias")
    inner_state = ld_state(state.inner_opt_state[1])
    assert_close(inner_state.error[1], ld.err, what=f"step {real} error")  # not clipped
  assert int(inner_state.count) == real_steps
  assert np.sqrt(np.sum(ld.err**2)) > max_norm  # the buffer is larger than any clipped g


# --------------------------------------------------------------------------------------------
# 5. state hygiene, memory, arguments
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ef", [True, False])
def test_init_on_shape_dtype_structs_and_no_zero_size_leaves(ef):
  params = jnp_tree(init_params())
  tx = gj.ldadamw(1e-3, rank=RANK, dimension_numbers=DIMS, error_feedback=ef)
  real = tx.init(params)
  assert avals(tx.init(abstract(params))) == avals(real)
  assert avals(jax.eval_shape(tx.init, abstract(params))) == avals(real)
  after = jax.eval_shape(tx.update, params, real, params)[1]  # traced, not compiled
  assert avals(after) == avals(real)
  for state in (real, after):
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
      assert np.size(leaf) > 0, jax.tree_util.keystr(path)
  assert ld_state(real).count.dtype == jnp.int32
  assert (ld_state(real).error is None) == (not ef)

  # lax.cond(pred, update, identity) needs identical avals (checked when tracing).
  def maybe(state, pred):
    return jax.lax.cond(pred, lambda s: tx.update(params, s, params)[1], lambda s: s, state)
  jax.eval_shape(maybe, real, True)

  # Nothing projected: only Adam moments, no zero-size placeholders.
  small = {"b": jnp.zeros(3)}
  state = gj.ldadamw(1e-3, rank=2).init(small)
  assert all(np.size(x) > 0 for x in jax.tree.leaves(state))
  new_state = jax.eval_shape(gj.ldadamw(1e-3, rank=2).update, small, state, small)[1]
  assert avals(new_state) == avals(state)


def test_bf16_params_keep_bf16_state():
  params = jnp_tree(init_params(), jnp.bfloat16)
  tx = gj.ldadamw(1e-3, rank=RANK, dimension_numbers=DIMS)
  state = tx.init(params)
  s = ld_state(state)
  assert {x.dtype for x in jax.tree.leaves((s.mu, s.nu, s.bases, s.error))} <= {
      jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.int32)}
  out_updates, after = jax.eval_shape(tx.update, params, state, params)
  assert avals(after) == avals(state)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(out_updates))


def test_inject_hyperparams():
  """rank / proj_type static, betas, rho, eps and the learning rate injected as arrays."""
  tx = optax.inject_hyperparams(gj.ldadamw, static_args=("rank", "proj_type"))(
      learning_rate=1e-3, rank=2, b1=0.9, rho=0.5)
  params = {"w": jnp.zeros((6, 4))}
  state = tx.init(params)
  after = jax.eval_shape(tx.update, params, state, params)[1]
  assert avals(after) == avals(state)
  assert float(state.hyperparams["rho"]) == 0.5


def test_memory_accounting():
  """Per projected m x n matrix (left basis): m, v (r x n), P (m x r) as the reference, plus
  the full-shape error buffer (m n) that PyTorch keeps in .grad."""
  m, n, r = 16, 40, 4
  params = {"w": jax.ShapeDtypeStruct((m, n), jnp.float32)}
  with_ef = gj.tree_bytes(jax.eval_shape(gj.scale_by_ldadam(rank=r).init, params))
  without = gj.tree_bytes(jax.eval_shape(
      gj.scale_by_ldadam(rank=r, error_feedback=False).init, params))
  counters = 4 + 4  # count, refreshes (int32)
  assert without == 4 * (2 * r * n + m * r) + counters
  assert with_ef - without == 4 * m * n


def test_bad_arguments():
  with pytest.raises(ValueError, match="proj_type"):
    gj.scale_by_ldadam(rank=2, proj_type="full")
  with pytest.raises(ValueError, match="proj_type"):
    gj.ldadamw(1e-3, rank=2, proj_type="bogus")
  with pytest.raises(ValueError, match="rank"):
    gj.scale_by_ldadam(rank=0)
  for name in ("b1", "b2", "rho"):
    with pytest.raises(ValueError, match=rf"{name}=1.0 is not in \[0, 1\)"):
      gj.ldadamw(1e-3, rank=2, **{name: 1.0})
  with pytest.raises(ValueError, match="dimension_numbers"):
    gj.scale_by_ldadam(rank=2, mask={"k": True}).init({"k": jnp.zeros((2, 3, 4))})
  tx = gj.scale_by_ldadam(rank=2)
  state = tx.init({"w": jnp.zeros((4, 3))})
  with pytest.raises(ValueError, match="state"):
    tx.update({"w": jnp.zeros((4, 3)), "v": jnp.zeros((3, 5))}, state)


# --------------------------------------------------------------------------------------------
# 6. galore_projection(on_refresh="transport")
# --------------------------------------------------------------------------------------------

G_SHAPES = {"tall": (12, 5), "wide": (5, 12), "bias": (5,)}


def _change(new, old):
  return None if new is None else np.asarray(new, np.float64).T @ np.asarray(old, np.float64)


def _sides(x, ql, qr):
  if ql is not None:
    x = ql @ x
  if qr is not None:
    x = x @ qr.T
  return x


@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_galore_transport_rotates_moments_at_refresh(proj_type):
  b1, b2, gap, rank = 0.9, 0.99, 3, 2
  tx = gj.galore_projection(optax.scale_by_adam(b1=b1, b2=b2), rank=rank, update_proj_gap=gap,
                            proj_type=proj_type, on_refresh="transport", transport_betas=(b1, b2))
  update = jax.jit(tx.update)
  params = jnp_tree(init_params(G_SHAPES))
  state = tx.init(params)
  rng = np.random.default_rng(9)
  grads = [{k: rng.standard_normal(s) for k, s in G_SHAPES.items()} for _ in range(gap + 1)]
  states = []
  for g in grads:
    _, state = update(jnp_tree(g), state)
    states.append(state)
  names = sorted(G_SHAPES)  # bias, tall, wide

  # First refresh (step 0, no previous basis): nothing transported, plain Adam moments.
  s0 = states[0]
  for i, k in enumerate(names):
    r0 = grads[0][k] if k == "bias" else coefficients(grads[0][k], s0.bases[i])
    mu, nu = np.asarray(s0.inner_state.mu[k]), np.asarray(s0.inner_state.nu[k])
    np.testing.assert_allclose(mu, (1 - b1) * r0, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(nu, (1 - b2) * r0**2, rtol=1e-5, atol=1e-8)

  # Second refresh (step gap): transport with Q = P_new^T P_old, then the Adam step.
  before, after = states[gap - 1], states[gap]
  t = gap  # Adam's count before the step
  for i, k in enumerate(names):
    mu = np.asarray(before.inner_state.mu[k], np.float64)
    nu = np.asarray(before.inner_state.nu[k], np.float64)
    if k == "bias":
      r = grads[gap][k]
      want_mu, want_nu = b1 * mu + (1 - b1) * r, b2 * nu + (1 - b2) * r**2
    else:
      old, new = before.bases[i], after.bases[i]
      assert int(new.refreshes) == 2
      ql, qr = _change(new.left, old.left), _change(new.right, old.right)
      assert (ql is not None) == (proj_type == "full" or k == "wide")
      m_hat, v_hat = mu / (1 - b1**t), nu / (1 - b2**t)
      sq = lambda q: None if q is None else q * q  # noqa: E731
      mu_t = _sides(mu, ql, qr)  # rotated exactly by Q
      nu_t = (1 - b2**t) * np.abs(_sides(v_hat - m_hat**2, sq(ql), sq(qr))
                                  + _sides(m_hat, ql, qr) ** 2)
      r = coefficients(grads[gap][k], new)
      want_mu, want_nu = b1 * mu_t + (1 - b1) * r, b2 * nu_t + (1 - b2) * r**2
      # The transport really moved something: "keep" would differ.
      assert not np.allclose(b1 * mu + (1 - b1) * r, want_mu, atol=1e-4)
    assert_close(after.inner_state.mu[k], want_mu, rel=1e-5, what=f"mu {k}")
    assert_close(after.inner_state.nu[k], want_nu, rel=1e-5, what=f"nu {k}")


def test_galore_transport_argument_errors():
  params = {"w": jnp.zeros((6, 4))}
  with pytest.raises(ValueError, match="transport"):  # Lion: no known transport
    gj.galore_projection(optax.scale_by_lion(), rank=2, on_refresh="transport",
                         transport_betas=(0.9, 0.99)).init(params)
  with pytest.raises(ValueError, match="transport_betas"):
    gj.galore_projection(optax.scale_by_adam(), rank=2, on_refresh="transport")
  with pytest.raises(ValueError, match="transport_betas"):
    gj.galore_projection(optax.scale_by_adam(), rank=2, on_refresh="transport",
                         transport_betas=(0.9, 1.5))
  # An inner transform whose init needs the real params is checked at init.
  lion_partition = optax.partition({"a": optax.scale_by_lion()}, {"kernel": "a"})
  tx = gj.galore_projection(lion_partition, rank=2, on_refresh="transport",
                            transport_betas=(0.9, 0.99))
  with pytest.raises(ValueError, match="transport"):
    tx.init({"kernel": jnp.zeros((6, 4))})
  # galore_adamw passes its own betas; Adam inside a chain is found.
  tx = gj.galore_adamw(1e-3, rank=2, on_refresh="transport")
  jax.eval_shape(tx.update, params, tx.init(params), params)
  gj.galore_projection(optax.adam(1e-3), rank=2, on_refresh="transport",
                       transport_betas=(0.9, 0.999)).init(params)


def test_refresh_counts_counts_ldadam_every_step():
  params = {"w": jnp.zeros((6, 4)), "v": jnp.zeros((5, 3)), "b": jnp.zeros(3)}
  tx = gj.ldadamw(1e-2, rank=2)
  state = tx.init(params)
  assert int(gj.refresh_counts(state)) == 0
  grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
  for _ in range(3):
    _, state = tx.update(grads, state, params)
  assert int(gj.refresh_counts(state)) == 3 * 2  # every step, two projected leaves


def test_non_finite_gradient_keeps_the_basis_and_is_not_counted():
  # A NaN in one leaf's gradient: that leaf's new basis is rejected (the previous one kept,
  # finite) and its refresh not counted; the other leaf refreshes and counts as usual.
  rng = np.random.default_rng(3)
  params = {"w": jnp.zeros((6, 4)), "v": jnp.zeros((5, 3))}
  tx = gj.scale_by_ldadam(rank=2)
  update = jax.jit(tx.update)
  state = tx.init(params)
  for _ in range(2):
    grads = {k: jnp.asarray(rng.standard_normal(p.shape), jnp.float32) for k, p in params.items()}
    _, state = update(grads, state, params)
  before = [b for b in state.bases if isinstance(b, gj.Bases)]
  grads = {k: jnp.asarray(rng.standard_normal(p.shape), jnp.float32) for k, p in params.items()}
  grads["w"] = grads["w"].at[1, 2].set(jnp.nan)
  _, state = update(grads, state, params)
  after = [b for b in state.bases if isinstance(b, gj.Bases)]  # leaf order: v, w
  assert [int(b.refreshes) for b in after] == [3, 2]
  w_before = [x for x in jax.tree.leaves(before[1]) if x.ndim == 2]
  w_after = [x for x in jax.tree.leaves(after[1]) if x.ndim == 2]
  for x, y in zip(w_before, w_after):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.all(np.isfinite(np.asarray(y)))
  assert not np.allclose(*(np.asarray(jax.tree.leaves(b[0])[0]) for b in (before, after)))


def test_a_step_runs_one_conditional_and_a_zero_product_keeps_the_basis():
  """Only step 0's SVD sits behind a ``lax.cond``: the power step every later step runs
  has none (on a GPU each cond syncs the host).  A leaf whose gradient, error and momentum
  are all zero keeps its basis instead of taking arbitrary QR filler."""
  params = {"w": jnp.zeros((6, 4)), "v": jnp.zeros((5, 3))}
  tx = gj.ldadamw(1e-2, rank=2)
  update = jax.jit(tx.update)
  state = tx.init(params)
  text = update.lower(params, state, params).as_text()
  assert text.count("stablehlo.if") + text.count("stablehlo.case") == 1
  grads = {"w": jnp.zeros((6, 4)), "v": jnp.asarray(np.random.default_rng(0).standard_normal(
      (5, 3)), jnp.float32)}
  bases = []
  for _ in range(3):
    updates, state = update(grads, state, params)
    bases.append(state[0].bases[1])  # leaf order: v, w
  w_bases = [[x for x in jax.tree.leaves(b) if x.ndim == 2] for b in bases]
  assert len(w_bases[0]) == 1
  for later in w_bases[1:]:
    for x, y in zip(w_bases[0], later):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates["w"]))


def test_state_buffers_can_be_donated():
  """mu and nu are separate buffers (a jit that donates the state needs that)."""
  params = {"b": jnp.zeros(3), "w": jnp.zeros((6, 4))}
  tx = gj.ldadamw(1e-2, rank=2)
  state = tx.init(params)
  assert state[0].mu["w"] is not state[0].nu["w"]
  step = jax.jit(lambda g, s: tx.update(g, s, params), donate_argnums=(1,))
  grads = {"b": jnp.ones(3), "w": jnp.ones((6, 4))}
  for _ in range(2):
    _, state = step(grads, state)
  assert int(state[0].count) == 2


def test_a_host_decision_takes_the_branch_without_a_cond():
  """``galore_refresh=(step == 0)``, decided on the host and static, gives the updates and
  state of the step-count ``cond`` (through a chain with a clip), and a later step then
  has no conditional at all."""
  rng = np.random.default_rng(4)
  params = {"w": jnp.zeros((6, 4)), "v": jnp.zeros((5, 3)), "b": jnp.zeros(3)}
  tx = optax.chain(optax.clip_by_global_norm(1.0), gj.ldadamw(1e-2, rank=2))
  device = jax.jit(tx.update)
  host = jax.jit(tx.update, static_argnames="galore_refresh")
  s_device = s_host = tx.init(params)
  for t in range(4):
    grads = {k: jnp.asarray(rng.standard_normal(p.shape), jnp.float32) for k, p in params.items()}
    u_device, s_device = device(grads, s_device, params)
    u_host, s_host = host(grads, s_host, params, galore_refresh=t == 0)
    for a, b in zip(jax.tree.leaves((u_device, s_device)), jax.tree.leaves((u_host, s_host))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # (two programs: round-off)
  text = host.lower(params, s_host, params, galore_refresh=False).as_text()
  assert text.count("stablehlo.if") + text.count("stablehlo.case") == 0
  with pytest.raises(ValueError, match="galore_refresh: expected a Python bool"):
    tx.update(params, s_host, params, galore_refresh=jnp.bool_(False))


def test_a_first_step_without_the_svd_starts_the_power_step_from_coordinates():
  """``galore_refresh=False`` from step 0 on (a caller that counts its steps from 1) never
  runs the SVD: the power step starts from the initial basis, the first ``r`` coordinate
  vectors (the identity's columns), and spans :math:`a a^\\top I_{:, :r}` (NumPy, float64).
  From a zero basis it would stay zero and the leaf would never train."""
  rng = np.random.default_rng(7)
  params = {"w": jnp.zeros((6, 4))}
  g = rng.standard_normal((6, 4))
  tx = gj.scale_by_ldadam(rank=2, proj_type="left", error_feedback=False)
  state = tx.init(params)
  np.testing.assert_array_equal(state.bases[0].left, np.eye(6, 2))
  step = jax.jit(tx.update, static_argnames="galore_refresh")
  updates, state = step({"w": jnp.asarray(g, jnp.float32)}, state, galore_refresh=False)
  p = np.asarray(state.bases[0].left, np.float64)
  want, _ = np.linalg.qr(g @ g.T @ np.eye(6, 2))
  np.testing.assert_allclose(p @ p.T, want @ want.T, atol=1e-5)  # the same span
  np.testing.assert_allclose(p.T @ p, np.eye(2), atol=1e-5)
  assert np.abs(np.asarray(updates["w"])).max() > 0.5  # Adam's first step: ~ sign
  u = np.linalg.svd(g)[0][:, :2]
  gap = lambda p: np.abs(p @ p.T - u @ u.T).max()
  first_gap = gap(p)
  for _ in range(59):  # later power steps approach the top-2 left singular subspace
    _, state = step({"w": jnp.asarray(g, jnp.float32)}, state, galore_refresh=False)
  last_gap = gap(np.asarray(state.bases[0].left, np.float64))
  assert last_gap < min(3e-3, first_gap / 20), (first_gap, last_gap)

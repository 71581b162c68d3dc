"""Fira (``galore_projection(residual="fira")``, ``fira_adamw``) against the float64 NumPy oracle
of ``tests/oracle_successors.py``, and its state against the paper's memory formula.

Same tree and gradients as ``test_apollo.py`` (tall, wide, square, a scanned 3-matrix kernel,
an attention-style ``(d, heads, head_dim)`` kernel viewed as one matrix, a bias); the bases
are the float64 SVD's (``oracle.svd_bases``), refreshed at steps 0, 3, 6.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_jax as gj
from oracle import svd_bases
from oracle_successors import successor_oracle
from test_apollo import DIMS
from test_apollo import HP
from test_apollo import LEAF
from test_apollo import MATRICES
from test_apollo import PROJECTED
from test_apollo import STEPS
from test_apollo import as_matrices
from test_apollo import assert_updates_close
from test_apollo import exact_bases
from test_apollo import problem
from test_apollo import run

CASES = {
    # The paper's Fira: limiter 1.01, alpha 0.25, std side rule.
    "std": (dict(), dict(scale=0.25)),
    # The other side of every matrix, alpha 1, no limiter (the paper's ablation).
    "reverse_no_limiter": (dict(proj_type="reverse_std", scale=1.0, limiter_gamma=None),
                           dict(scale=1.0, gamma=None)),
    # The repository's form: alpha on the subspace's part only.
    "code_form": (dict(residual="fira_code"), dict(scale=0.25, code_form=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fira_matches_oracle(case):
  kw, oracle_kw = CASES[case]
  proj_type = kw.get("proj_type", "std")
  params, grads = problem()
  tx = gj.fira_adamw(1e-2, rank=4, dimension_numbers=DIMS, update_proj_gap=3,
                     weight_decay=0.1, **kw)
  ours, state = run(tx, params, grads)
  ref, fired = successor_oracle(
      "fira", as_matrices(params), [as_matrices(g) for g in grads],
      exact_bases(4, proj_type), projected=PROJECTED, **HP, **oracle_kw)
  assert_updates_close(ours, ref)
  if oracle_kw.get("gamma", 1.01) is not None:
    assert 0 < sum(fired) < MATRICES * (STEPS - 1), fired  # fired on some steps, not on all
    assert state[0].residual_norms[LEAF["scan"]].shape == (3,)  # one norm per matrix
    assert state[0].residual_norms[LEAF["attn"]].shape == ()  # one matrix: one norm
  else:
    assert state[0].residual_norms is None


def test_limiter_caps_a_jump():
  """A jump of the gradient outside the subspace: the scaled residual's norm grows by
  exactly gamma, and the state keeps that norm."""
  rng = np.random.default_rng(0)
  g = rng.standard_normal((8, 16))
  p = svd_bases(g, 4)[0]
  g1 = g + 10 * (np.eye(8) - p @ p.T) @ rng.standard_normal((8, 16))
  tx = gj.galore_projection(rank=4, update_proj_gap=5, scale=1.0, residual="fira")
  state = tx.init({"w": jnp.zeros((8, 16))})
  norms = []
  for grad in (g, g1):
    u, state = tx.update({"w": jnp.asarray(grad, jnp.float32)}, state)
    low = p @ (p.T @ np.asarray(u["w"], np.float64))  # the in-subspace part P N
    norms.append(np.linalg.norm(np.asarray(u["w"]) - low))
  assert norms[1] == pytest.approx(1.01 * norms[0], rel=1e-4)
  assert float(state.residual_norms[0]) == pytest.approx(norms[1], rel=1e-4)


@pytest.mark.filterwarnings("ignore:galore_projection. rank saves no optimizer memory")
def test_full_rank_subspace_leaves_no_residual():
  """At rank min(m, n) the subspace holds the whole gradient: Fira is GaLore."""
  params = {"w": jnp.zeros((6, 10)), "b": jnp.zeros(10)}
  grads = [{k: jnp.asarray(np.random.default_rng(t).standard_normal(v.shape), jnp.float32)
            for k, v in params.items()} for t in range(3)]

  def updates(tx):
    state, out = tx.init(params), []
    for g in grads:
      u, state = tx.update(g, state, params)
      out.append(u)
    return out

  for a, b in zip(updates(gj.fira_adamw(1e-2, rank=6, update_proj_gap=2)),
                  updates(gj.galore_adamw(1e-2, rank=6, update_proj_gap=2))):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7), a, b)


def test_state_is_the_papers_formula():
  """Per projected m x n matrix (m <= n): mr + 2nr + 1 float32 elements (basis, moments,
  the limiter's norm), plus the int32 refresh counter every GaLore leaf holds (not in the
  paper's count) and the per-transform step counts."""
  m, n, r = 64, 256, 16
  params = {"w": jax.ShapeDtypeStruct((m, n), jnp.float32)}
  per_transform = 4 + 4  # the step count and Adam's count, int32
  state = jax.eval_shape(gj.fira_adamw(1e-2, rank=r).init, params)[0]
  assert gj.tree_bytes(state) == 4 * (m * r + 2 * n * r + 1) + 4 + per_transform
  galore = jax.eval_shape(gj.galore_adamw(1e-2, rank=r).init, params)[0]
  assert gj.tree_bytes(state) - gj.tree_bytes(galore) == 4  # one float32 per matrix
  est = gj.memory.estimate(params, "fira_adamw", rank=r)
  assert est.optimizer_state == 4 * (m * r + 2 * n * r + 1)


def test_chain_is_galore_projection_with_a_residual():
  """fira_adamw is galore_adamw's chain with residual='fira': the same steps, moments and
  bases (only the update differs)."""
  params = {"w": jnp.zeros((6, 10))}
  g = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((6, 10)), jnp.float32)}
  _, fira = gj.fira_adamw(1e-2, rank=2).update(g, gj.fira_adamw(1e-2, rank=2).init(params),
                                                  params)
  _, galore = gj.galore_adamw(1e-2, rank=2).update(
      g, gj.galore_adamw(1e-2, rank=2).init(params), params)
  assert isinstance(fira[0], gj.GaLoreProjectionState)
  np.testing.assert_array_equal(fira[0].inner_state.mu["w"], galore[0].inner_state.mu["w"])
  np.testing.assert_array_equal(fira[0].bases[0].left, galore[0].bases[0].left)
  np.testing.assert_array_equal(fira[0].inner_state.nu["w"], galore[0].inner_state.nu["w"])
  assert int(fira[0].count) == int(galore[0].count) == 1  # the same step
  assert jax.tree.structure(fira[1:]) == jax.tree.structure(galore[1:])  # decay, lr: as it

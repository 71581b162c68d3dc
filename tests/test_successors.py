"""The optax contract of the GaLore successors (``apollo_adamw``, ``apollo_mini``,
``fira_adamw``, and the bare ``scale_by_apollo`` chained as its alias), as the other
transforms pass it: init on ShapeDtypeStructs, one compilation
across refresh and plain steps with stable state avals, parameter dtypes kept (bf16),
``optax.inject_hyperparams``, ``optax.MultiSteps`` and an Orbax round trip with exact resume.

The tree is test_hygiene's: a tall and a wide matrix, a bias (plain Adam), an attention kernel
``(d, heads, head_dim)`` viewed as one matrix and a scanned ``(L, d, f)`` kernel.  The 8-device
checks are ``successors_on_a_mesh`` in ``tests/sharding/cases.py``; the NNX one is in
``test_nnx.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import galore_jax as gj
from test_hygiene import DIMS
from test_hygiene import abstract
from test_hygiene import assert_trees_equal
from test_hygiene import avals
from test_hygiene import make_grads
from test_hygiene import make_params
from test_hygiene import run_steps

GAP = 2


def apollo_chain(learning_rate, *, rank=4, update_proj_gap=200, scale=1.0, limiter_gamma=1.01,
                 weight_decay=0.0, dimension_numbers=None):
  """The bare ``scale_by_apollo``, chained as ``apollo_adamw`` chains it (no ``**kwargs``:
  ``optax.inject_hyperparams`` reads a factory's parameters from its signature)."""
  return optax.chain(
      gj.scale_by_apollo(rank, update_proj_gap=update_proj_gap, scale=scale,
                         limiter_gamma=limiter_gamma, dimension_numbers=dimension_numbers),
      optax.add_decayed_weights(weight_decay), optax.scale_by_learning_rate(learning_rate))


ALIASES = {
    "apollo_adamw": lambda lr=1e-2, **kw: gj.apollo_adamw(lr, rank=4, **kw),
    "apollo_mini": lambda lr=1e-2, **kw: gj.apollo_mini(lr, **kw),
    "fira_adamw": lambda lr=1e-2, **kw: gj.fira_adamw(lr, rank=4, **kw),
    "scale_by_apollo": lambda lr=1e-2, **kw: apollo_chain(lr, **kw),
}
# Each factory as optax.inject_hyperparams wraps it (APOLLO-Mini's rank is 1 by its own
# default).
FACTORIES = {"apollo_adamw": gj.apollo_adamw, "apollo_mini": gj.apollo_mini,
             "fira_adamw": gj.fira_adamw, "scale_by_apollo": apollo_chain}


def make(name, lr=1e-2, **kw):
  kw.setdefault("update_proj_gap", GAP)
  return ALIASES[name](lr, weight_decay=0.1, dimension_numbers=DIMS, **kw)


@functools.lru_cache(maxsize=None)
def compiled(name):
  """One transform and one jitted update per alias, shared by the tests below."""
  tx = make(name)
  traces = []

  def update(grads, state, params):
    traces.append(1)
    return tx.update(grads, state, params)

  return tx, jax.jit(update), traces


@pytest.mark.parametrize("name", list(ALIASES))
def test_init_on_shapes_one_compilation_and_orbax_resume(name, tmp_path):
  params0 = make_params()
  tx, update, traces = compiled(name)
  real = tx.init(params0)
  assert avals(tx.init(abstract(params0))) == avals(real)
  assert avals(jax.eval_shape(tx.init, abstract(params0))) == avals(real)
  for leaf in jax.tree.leaves(real):
    assert np.size(leaf) > 0  # Orbax refuses zero-size arrays

  # 5 steps (refreshes at 0, 2, 4), one trace, stable avals; a save after step 3.
  params3, state3 = run_steps(update, params0, real, range(3))
  assert avals(state3) == avals(real)
  want_params, want_state = run_steps(update, params3, state3, range(3, 5))
  assert len(traces) == 1
  assert int(gj.refresh_counts(want_state)) == 3 * 4  # 3 refreshes of the 4 projected leaves

  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "ckpt", {"params": params3, "opt_state": state3})
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / "ckpt", {
      "params": abstract(params0), "opt_state": jax.eval_shape(tx.init, abstract(params0))})
  ckpt.close()
  assert type(restored["opt_state"][0]) is type(state3[0])
  assert_trees_equal(restored["opt_state"], state3)
  got_params, got_state = run_steps(update, restored["params"], restored["opt_state"], range(3, 5))
  assert_trees_equal(got_params, want_params)
  assert_trees_equal(got_state, want_state)


@pytest.mark.parametrize("name", list(ALIASES))
def test_bf16_params_keep_their_dtype(name):
  """Traced only (no compilation): updates in the params' dtype, state avals unchanged by a
  step (the limiter's norms stay float32, the moments bf16)."""
  params = make_params(jnp.bfloat16)
  tx = make(name)
  state = tx.init(params)
  updates, new_state = jax.eval_shape(tx.update, make_grads(params, 0), state, params)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  assert avals(new_state) == avals(state)
  norms = state[0].norms if "apollo" in name else state[0].residual_norms
  assert {x.dtype for x in jax.tree.leaves(norms)} == {jnp.dtype(jnp.float32)}
  assert state[0].inner_state.mu["tall"].dtype == jnp.bfloat16


# The combinators on a small tree (a wide matrix and a bias): they do not look inside.
SMALL = {"w": (10, 24), "b": (10,)}


def small(seed):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SMALL.items()}


@pytest.mark.parametrize("name", list(ALIASES))
def test_inject_hyperparams_matches_plain(name):
  factory = FACTORIES[name]
  kw = dict(rank=4, update_proj_gap=GAP, weight_decay=0.1, scale=0.5)
  if name == "apollo_mini":
    del kw["rank"]
  injected = optax.inject_hyperparams(factory, static_args=("rank", "update_proj_gap"))(
      learning_rate=1e-2, **kw)
  plain = factory(1e-2, **kw)
  params = small(0)
  p_plain, s_plain, p_inj, s_inj = params, plain.init(params), params, injected.init(params)
  u_plain, u_inj = jax.jit(plain.update), jax.jit(injected.update)
  for t in range(3):  # refreshes at 0 and 2
    g = small(t + 1)
    a, s_plain = u_plain(g, s_plain, p_plain)
    b, s_inj = u_inj(g, s_inj, p_inj)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a, b)
    p_plain, p_inj = optax.apply_updates(p_plain, a), optax.apply_updates(p_inj, b)
  assert float(s_inj.hyperparams["scale"]) == pytest.approx(0.5)
  assert float(s_inj.hyperparams["limiter_gamma"]) == pytest.approx(1.01)
  if name == "apollo_mini":  # injected at its own defaults: rank 1, one scale per matrix
    assert s_inj.inner_state[0].inner_state.mu["w"].shape == (1, 24)
    assert s_inj.hyperparams["scale"] == 0.5 and "scale_type" not in s_inj.hyperparams


@pytest.mark.parametrize("name", list(ALIASES))
def test_multisteps_is_one_step_on_the_mean_gradient(name):
  k = 2
  ms = optax.MultiSteps(ALIASES[name](update_proj_gap=GAP), every_k_schedule=k)
  ref = ALIASES[name](update_proj_gap=GAP)
  params = small(0)
  ms_state, ref_state = ms.init(params), ref.init(params)
  ms_update, ref_update = jax.jit(ms.update), jax.jit(ref.update)
  ms_params = ref_params = params
  for real in range(3):  # refreshes at real steps 0 and 2
    minis = [small(10 + real * k + i) for i in range(k)]
    for g in minis:
      updates, ms_state = ms_update(g, ms_state, ms_params)
      ms_params = optax.apply_updates(ms_params, updates)
    mean = jax.tree.map(lambda *gs: sum(gs) / k, *minis)
    ref_updates, ref_state = ref_update(mean, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, ref_updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 ms_params, ref_params)
  assert int(ms_state.inner_opt_state[0].count) == 3
  assert int(gj.refresh_counts(ms_state)) == 2

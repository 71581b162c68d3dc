"""``galore_projection`` / ``galore_adamw`` composed with optax combinators, refresh cadence,
``on_refresh``, the non-finite guard and the ``linear_kernels`` mask on a Flax NNX model."""

from __future__ import annotations

import inspect
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import galore_jax as gj
from nnx_init import fast_init
from oracle import coefficients

SHAPES = {"tall": (24, 10), "wide": (10, 24), "bias": (10,)}
RANK = 4
LR = 1e-2
RTOL, ATOL = 2e-5, 1e-7


def tree_normal(shapes, seed):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


def make_params(shapes=SHAPES, seed=0):
  return tree_normal(shapes, seed)


def make_grads(step, shapes=SHAPES, seed=1):
  return tree_normal(shapes, 1000 * seed + step + 1)


def assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def projected_bases(state):
  return [b for b in state.bases if isinstance(b, gj.Bases)]


def run(tx, params, steps, grads_fn=make_grads, **extra):
  """Jitted loop; returns the per-step updates, the final params and state."""
  update = jax.jit(tx.update)
  state = tx.init(params)
  history = []
  for t in range(steps):
    updates, state = update(grads_fn(t), state, params, **extra)
    params = optax.apply_updates(params, updates)
    history.append(updates)
  return history, params, state


# --------------------------------------------------------------------------------------------
# inject_hyperparams
# --------------------------------------------------------------------------------------------

STATIC = ("rank", "update_proj_gap", "proj_type")


@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_inject_hyperparams_matches_plain(proj_type):
  kw = dict(rank=RANK, update_proj_gap=3, proj_type=proj_type, scale=0.25, weight_decay=0.1)
  plain = gj.galore_adamw(LR, **kw)
  injected = optax.inject_hyperparams(gj.galore_adamw, static_args=STATIC)(
      learning_rate=LR, **kw
  )
  params = make_params()
  want, _, _ = run(plain, params, 7)  # refreshes at 0, 3, 6
  got, _, state = run(injected, params, 7)
  for g, w in zip(got, want):
    assert_trees_close(g, w)
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(LR)
  assert float(state.hyperparams["scale"]) == pytest.approx(0.25)
  inner = state.inner_state[0]
  assert isinstance(inner, gj.GaLoreProjectionState)
  assert int(inner.count) == 7
  assert [int(b.refreshes) for b in projected_bases(inner)] == [3, 3]


def test_inject_hyperparams_with_schedules():
  kw = dict(rank=RANK, update_proj_gap=3, scale=0.25, weight_decay=0.1)
  params = make_params()
  injected = optax.inject_hyperparams(gj.galore_adamw, static_args=STATIC)

  # A constant schedule is the same as the constant.
  constant, _, _ = run(gj.galore_adamw(LR, **kw), params, 7)
  got, _, _ = run(injected(learning_rate=optax.constant_schedule(LR), **kw), params, 7)
  for g, w in zip(got, constant):
    assert_trees_close(g, w)

  # A decaying schedule: injected (evaluated by inject_hyperparams from its own count) is the
  # same as the schedule given to the plain alias (evaluated by scale_by_learning_rate).
  sched = optax.linear_schedule(LR, LR / 10, transition_steps=6)
  want, _, _ = run(gj.galore_adamw(sched, **kw), params, 7)
  got, _, state = run(injected(learning_rate=sched, **kw), params, 7)
  for g, w in zip(got, want):
    assert_trees_close(g, w)
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(float(sched(6)))
  # ... and it really differs from the constant run after step 0.
  assert not np.allclose(np.asarray(got[-1]["tall"]), np.asarray(constant[-1]["tall"]))


# Every public alias, injected: what must be static is passed in static_args (the ints that
# shape the state), the rest (learning rate, scale, betas, ...) becomes an array.
ALIASES = ["galore_adamw", "galore_adamw_8bit", "galore_adafactor", "ldadamw", "adamw_8bit",
           "apollo_adamw", "apollo_mini", "fira_adamw"]
ALIAS_STATIC = ("rank", "update_proj_gap", "proj_type", "block_size", "min_8bit_size",
                "batch_dims", "numerics")
# galore_adamw's HF numerics too: injected, its eps_root default 0.0 becomes an array.
VARIANTS = [(name, {}) for name in ALIASES] + [("galore_adamw", {"numerics": "hf", "eps": 1e-6})]


@pytest.mark.parametrize("name, extra", VARIANTS, ids=[n + "".join(f"-{v}" for v in e.values())
                                                       for n, e in VARIANTS])
def test_inject_hyperparams_every_alias(name, extra):
  factory = getattr(gj, name)
  names = inspect.signature(factory).parameters
  kw = {k: v for k, v in dict(rank=RANK, update_proj_gap=2, min_8bit_size=8).items()
        if k in names and not (name == "apollo_mini" and k == "rank")} | extra
  injected = optax.inject_hyperparams(
      factory, static_args=tuple(a for a in ALIAS_STATIC if a in names))(learning_rate=LR, **kw)
  want, _, _ = run(factory(LR, **kw), make_params(), 3)  # refreshes at 0 and 2
  got, _, state = run(injected, make_params(), 3)
  for g, w in zip(got, want):
    assert_trees_close(g, w)
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(LR)


@pytest.mark.parametrize("static", [(), ("block_size", "min_8bit_size")])
def test_inject_hyperparams_names_the_static_args_8bit(static):
  """adamw_8bit's block size, small-tensor size and batch axes shape its state: injected as
  arrays, each is refused with the hint to make it static."""
  tx = optax.inject_hyperparams(gj.adamw_8bit, static_args=static)(learning_rate=LR)
  with pytest.raises(ValueError, match=r"(block_size|batch_dims) must be an int.*static_args"):
    tx.init(make_params())


@pytest.mark.parametrize("name", ALIASES)
def test_inject_hyperparams_names_every_static_arg_at_once(name):
  """Injected with nothing static, the first error names every argument that must be static
  (a user met rank, then update_proj_gap, then block_size ... one run at a time)."""
  factory = getattr(gj, name)
  kw = {"rank": RANK} if name == "ldadamw" else {}  # (ldadamw's rank has no default)
  needed, first = [], None
  for _ in range(len(ALIAS_STATIC) + 1):
    tx = optax.inject_hyperparams(factory, static_args=tuple(needed))(learning_rate=LR, **kw)
    try:
      tx.init(make_params())
      break
    except ValueError as e:
      first = first or str(e)
      needed.append(str(e).split()[0])
  assert needed, name  # something must be static (rank, at least)
  listed = first.split("(Under optax.inject_hyperparams")[1]
  assert all(arg in listed for arg in needed), (name, needed, first)


KEYED = [name for name in ALIASES if "key" in inspect.signature(getattr(gj, name)).parameters]


@pytest.mark.parametrize("name", KEYED)
def test_inject_hyperparams_names_the_static_key(name):
  """An int seed ``key`` becomes an int array when injected: refused with the hint to make it
  static (it read "key must be an int seed ..., got Array(3)" for the seed 3); static, the
  same updates as the plain alias."""
  factory = getattr(gj, name)
  names = inspect.signature(factory).parameters
  kw = {k: v for k, v in dict(rank=RANK, update_proj_gap=2, min_8bit_size=8, key=3).items()
        if k in names and not (name == "apollo_mini" and k == "rank")}
  static = tuple(a for a in ALIAS_STATIC if a in names)
  tx = optax.inject_hyperparams(factory, static_args=static)(learning_rate=LR, **kw)
  with pytest.raises(ValueError, match=r"^key must be .*static_args\.\)$"):
    tx.init(make_params())
  tx = optax.inject_hyperparams(factory, static_args=static + ("key",))(learning_rate=LR, **kw)
  want, _, _ = run(factory(LR, **kw), make_params(), 3)
  got, _, _ = run(tx, make_params(), 3)
  for g, w in zip(got, want):
    assert_trees_close(g, w)


# --------------------------------------------------------------------------------------------
# MultiSteps
# --------------------------------------------------------------------------------------------


def test_multisteps():
  k, gap, real_steps = 3, 2, 4
  kw = dict(rank=RANK, update_proj_gap=gap, scale=0.25, weight_decay=0.1)
  ms = optax.MultiSteps(gj.galore_adamw(LR, **kw), every_k_schedule=k)
  ref = gj.galore_adamw(LR, **kw)

  params = make_params()
  ms_update, ref_update = jax.jit(ms.update), jax.jit(ref.update)
  ms_state, ref_state = ms.init(params), ref.init(params)
  ref_params = params
  for real in range(real_steps):
    minis = [make_grads(real * k + i) for i in range(k)]
    for i, g in enumerate(minis):
      updates, ms_state = ms_update(g, ms_state, params)
      if i < k - 1:  # the first k-1 mini-steps return exact zeros
        for u in jax.tree.leaves(updates):
          np.testing.assert_array_equal(np.asarray(u), 0)
      params = optax.apply_updates(params, updates)

    # One galore_adamw step on the mean gradient.
    mean = jax.tree.map(lambda *gs: sum(gs) / k, *minis)
    ref_updates, ref_state = ref_update(mean, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, ref_updates)
    assert_trees_close(updates, ref_updates, rtol=1e-4, atol=1e-6)
    assert_trees_close(params, ref_params, rtol=1e-4, atol=1e-6)

    # The inner count and the refresh cadence count real steps, not mini-steps.
    inner = ms_state.inner_opt_state[0]
    assert isinstance(inner, gj.GaLoreProjectionState)
    assert int(inner.count) == real + 1
    want_refreshes = real // gap + 1
    assert [int(b.refreshes) for b in projected_bases(inner)] == [want_refreshes] * 2
    assert int(ms_state.gradient_step) == real + 1


@pytest.mark.parametrize("make", [
    lambda: gj.galore_adamw(LR, rank=RANK, method="randomized"),
    lambda: gj.galore_adamw(LR, rank=RANK, key=jax.random.key(3)),
    lambda: gj.apollo_adamw(LR, rank=RANK),
    lambda: gj.apollo_mini(LR),
])
def test_init_after_a_donating_step(make):
  """A step that donates the state deletes its buffers, the PRNG key among them: init
  handed out the transform's own key array, so every later init held a deleted key."""
  tx, params = make(), make_params()
  step = jax.jit(tx.update, donate_argnums=1)
  state = tx.init(params)
  step(make_grads(0), state, params)
  again = tx.init(params)
  jax.block_until_ready(step(make_grads(0), again, params))  # raised: Array has been deleted


# --------------------------------------------------------------------------------------------
# partition / masked
# --------------------------------------------------------------------------------------------


def test_partition():
  shapes = {"tall": (24, 10), "wide": (10, 24), "bias": (10,), "emb": (16, 6)}
  labels = {"tall": "galore", "wide": "galore", "bias": "adam", "emb": "adam"}
  kw = dict(rank=RANK, update_proj_gap=2, scale=0.25, weight_decay=0.1)
  tx = optax.partition(
      {"galore": gj.galore_adamw(LR, **kw), "adam": optax.adamw(LR, weight_decay=0.1)}, labels
  )
  params = make_params(shapes)
  got, _, state = run(tx, params, 5, grads_fn=lambda t: make_grads(t, shapes))

  sub = lambda tree, names: {n: tree[n] for n in names}  # noqa: E731
  g_names, a_names = ["tall", "wide"], ["bias", "emb"]
  want_g, _, g_state = run(gj.galore_adamw(LR, **kw), sub(params, g_names), 5,
                           grads_fn=lambda t: sub(make_grads(t, shapes), g_names))
  want_a, _, _ = run(optax.adamw(LR, weight_decay=0.1), sub(params, a_names), 5,
                     grads_fn=lambda t: sub(make_grads(t, shapes), a_names))
  for g, wg, wa in zip(got, want_g, want_a):
    assert_trees_close(sub(g, g_names), wg)
    assert_trees_close(sub(g, a_names), wa)

  inner = state.inner_states["galore"].inner_state[0]
  assert isinstance(inner, gj.GaLoreProjectionState)
  assert len(projected_bases(inner)) == 2  # emb is 2-D but belongs to the adam partition
  assert [int(b.refreshes) for b in projected_bases(inner)] == [3, 3]
  assert [int(b.refreshes) for b in projected_bases(g_state[0])] == [3, 3]


def test_inside_optax_masked():
  mask = {"tall": True, "wide": True, "bias": False}
  proj = lambda: gj.galore_projection(  # noqa: E731
      optax.scale_by_adam(), rank=RANK, update_proj_gap=2, scale=0.25
  )
  tx = optax.chain(optax.masked(proj(), mask), optax.scale_by_learning_rate(LR))
  params = make_params()
  got, _, state = run(tx, params, 5)

  sub = lambda tree: {"tall": tree["tall"], "wide": tree["wide"]}  # noqa: E731
  want, _, _ = run(optax.chain(proj(), optax.scale_by_learning_rate(LR)), sub(params), 5,
                   grads_fn=lambda t: sub(make_grads(t)))
  for t, (g, w) in enumerate(zip(got, want)):
    assert_trees_close(sub(g), w)
    # optax.masked passes the unmasked leaf through: only the learning rate applies.
    np.testing.assert_allclose(np.asarray(g["bias"]), -LR * np.asarray(make_grads(t)["bias"]),
                               rtol=1e-6)
  inner = state[0].inner_state
  assert isinstance(inner, gj.GaLoreProjectionState)
  assert int(inner.count) == 5
  assert len(projected_bases(inner)) == 2


# --------------------------------------------------------------------------------------------
# on_refresh
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_on_refresh_reset(proj_type):
  b1, b2, gap = 0.9, 0.999, 3
  make = lambda on_refresh: gj.galore_projection(  # noqa: E731
      optax.scale_by_adam(b1=b1, b2=b2), rank=RANK, update_proj_gap=gap,
      proj_type=proj_type, on_refresh=on_refresh,
  )
  params = make_params()
  names = sorted(SHAPES)  # leaf order: bias, tall, wide
  states = {}
  for mode in ("keep", "reset"):
    tx = make(mode)
    update = jax.jit(tx.update)
    state = tx.init(params)
    per_step = []
    for t in range(gap + 1):
      _, state = update(make_grads(t), state, params)
      per_step.append(state)
    states[mode] = per_step

  # Before the second refresh the two modes are identical.
  for t in range(gap):
    for a, b in zip(jax.tree.leaves(states["keep"][t]), jax.tree.leaves(states["reset"][t])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  keep, reset = states["keep"][gap], states["reset"][gap]
  g = make_grads(gap)
  for name, b_keep, b_reset in zip(names, keep.bases, reset.bases):
    mu_r, nu_r = reset.inner_state.mu[name], reset.inner_state.nu[name]
    mu_k, nu_k = keep.inner_state.mu[name], keep.inner_state.nu[name]
    if name == "bias":  # not projected: moments not reset, same as with "keep"
      assert isinstance(b_reset, optax.MaskedNode)
      np.testing.assert_array_equal(np.asarray(mu_r), np.asarray(mu_k))
      np.testing.assert_array_equal(np.asarray(nu_r), np.asarray(nu_k))
      continue
    # Same (refreshed) bases in both modes.
    for x, y in zip(jax.tree.leaves(b_keep), jax.tree.leaves(b_reset)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert int(b_reset.refreshes) == 2
    r = coefficients(g[name], b_reset)
    np.testing.assert_allclose(np.asarray(mu_r), (1 - b1) * r, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(nu_r), (1 - b2) * r**2, rtol=1e-4, atol=1e-8)
    # "keep" carries the old moments over: it differs.
    assert not np.allclose(np.asarray(mu_k), np.asarray(mu_r), rtol=1e-3, atol=1e-5)
    assert not np.allclose(np.asarray(nu_k), np.asarray(nu_r), rtol=1e-3, atol=1e-8)


def test_on_refresh_reset_keeps_the_moments_of_a_rejected_refresh():
  # An inner transform that skips non-finite steps (optax.apply_if_finite): on a refresh step
  # with a NaN in tall's gradient, tall keeps its basis, so its moments are kept too; wide's
  # refresh took, so its moments start afresh (and the skipped step leaves them at init).
  gap = 2
  inner = optax.apply_if_finite(optax.scale_by_adam(), max_consecutive_errors=5)
  tx = gj.galore_projection(inner, rank=RANK, update_proj_gap=gap, on_refresh="reset")
  params = make_params()
  update = jax.jit(tx.update)
  state = tx.init(params)
  for t in range(gap):
    _, state = update(make_grads(t), state, params)
  before = state.inner_state.inner_state
  g = make_grads(gap)
  g["tall"] = g["tall"].at[0, 0].set(jnp.nan)
  _, state = update(g, state, params)
  after = state.inner_state.inner_state
  assert int(state.inner_state.notfinite_count) == 1
  assert [int(b.refreshes) for b in projected_bases(state)] == [1, 2]  # tall, wide
  np.testing.assert_array_equal(np.asarray(after.mu["tall"]), np.asarray(before.mu["tall"]))
  np.testing.assert_array_equal(np.asarray(after.nu["tall"]), np.asarray(before.nu["tall"]))
  assert np.any(np.asarray(before.mu["wide"]) != 0)
  np.testing.assert_array_equal(np.asarray(after.mu["wide"]), 0.0)


@pytest.mark.parametrize("on_refresh", ["reset", "transport"])
def test_on_refresh_of_a_partly_rejected_stack_touches_the_taken_layers_only(on_refresh):
  # A stack of 3 layers whose layer 1 has a NaN on the second refresh (step 2): the guard keeps
  # that layer's basis, so its moments stay as they were, bit for bit (the inner transform
  # skips the non-finite step); layers 0 and 2 are reset or transported.  Reference: the same
  # transform on the layers as three leaves of their own.
  gap, shape = 2, (3, 12, 8)
  inner = optax.apply_if_finite(optax.scale_by_adam(), max_consecutive_errors=5)

  def make(dims):
    return gj.galore_projection(inner, rank=RANK, update_proj_gap=gap, on_refresh=on_refresh,
                                dimension_numbers=dims, transport_betas=(0.9, 0.999))

  def grads(t):
    g = tree_normal({"s": shape}, 7 + t)["s"]
    return g.at[1, 2, 3].set(jnp.nan) if t == gap else g

  stacked = make({"s": gj.DimensionNumbers(1, 2)})
  apart = make({f"s{i}": gj.DimensionNumbers(0, 1) for i in range(3)})
  states = [stacked.init({"s": jnp.zeros(shape)}),
            apart.init({f"s{i}": jnp.zeros(shape[1:]) for i in range(3)})]
  steps = [jax.jit(stacked.update), jax.jit(apart.update)]
  for t in range(gap + 2):
    if t == gap:
      before = states[0].inner_state.inner_state
    g = grads(t)
    _, states[0] = steps[0]({"s": g}, states[0])
    _, states[1] = steps[1]({f"s{i}": g[i] for i in range(3)}, states[1])
    if t == gap:
      after = states[0].inner_state.inner_state
      np.testing.assert_array_equal(after.mu["s"][1], before.mu["s"][1])
      np.testing.assert_array_equal(after.nu["s"][1], before.nu["s"][1])
      assert not np.allclose(np.asarray(after.mu["s"])[[0, 2]],
                             np.asarray(before.mu["s"])[[0, 2]], atol=1e-3)
    got, want = states[0].inner_state.inner_state, states[1].inner_state.inner_state
    for i in range(3):
      for x, y in ((got.mu["s"][i], want.mu[f"s{i}"]), (got.nu["s"][i], want.nu[f"s{i}"]),
                   (states[0].bases[0].left[i], states[1].bases[i].left)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# refresh cadence
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_every_cadence(proj_type):
  gap, steps = 3, 10
  tx = gj.galore_projection(optax.scale_by_adam(), rank=RANK, update_proj_gap=gap,
                            proj_type=proj_type)
  params = make_params()
  update = jax.jit(tx.update)
  state = tx.init(params)
  prev = projected_bases(state)
  for t in range(steps):
    _, state = update(make_grads(t), state, params)
    now = projected_bases(state)
    assert [int(b.refreshes) for b in now] == [t // gap + 1] * len(now), f"step {t}"
    for b_prev, b_now in zip(prev, now):
      for x, y in ((b_prev.left, b_now.left), (b_prev.right, b_now.right)):
        if x is None:
          assert y is None
          continue
        if t % gap == 0:  # refresh step: a new basis (fresh random gradient)
          assert not np.allclose(np.asarray(x), np.asarray(y)), f"step {t}"
          # orthonormal columns
          np.testing.assert_allclose(np.asarray(y).T @ np.asarray(y), np.eye(y.shape[-1]),
                                     atol=1e-5)
        else:  # no refresh: bitwise unchanged
          np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    prev = now
    assert int(state.count) == t + 1


def test_every_policy_object():
  assert gj.every(3) == gj.refresh.Every(3)
  assert hash(gj.every(3)) == hash(gj.refresh.Every(3))
  assert [bool(gj.every(3).due(jnp.int32(t), None)) for t in range(7)] == [
      True, False, False, True, False, False, True]
  # refresh=every(T) overrides update_proj_gap.
  tx = gj.galore_projection(rank=RANK, update_proj_gap=100, refresh=gj.every(2))
  params = make_params()
  update = jax.jit(tx.update)
  state = tx.init(params)
  for t in range(3):
    _, state = update(make_grads(t), state, params)
  assert [int(b.refreshes) for b in projected_bases(state)] == [2, 2]


# --------------------------------------------------------------------------------------------
# non-finite guard
# --------------------------------------------------------------------------------------------


def test_nan_gradient_on_refresh_keeps_previous_basis():
  gap = 2
  shapes = {"tall": (24, 10), "wide": (10, 24), "scan": (3, 8, 12)}
  dims = {"tall": gj.DimensionNumbers(1, 0), "wide": gj.DimensionNumbers(1, 0),
          "scan": gj.DimensionNumbers(reduction_axis=1, output_axis=2)}
  tx = gj.galore_projection(optax.scale_by_adam(), rank=RANK, update_proj_gap=gap,
                            dimension_numbers=dims)
  params = make_params(shapes)
  update = jax.jit(tx.update)
  state = tx.init(params)
  _, state = update(make_grads(0, shapes), state, params)  # refresh 1 (clean)
  _, state = update(make_grads(1, shapes), state, params)
  before = {n: b for n, b in zip(sorted(shapes), state.bases)}

  g = make_grads(2, shapes)  # step 2 refreshes
  g["tall"] = g["tall"].at[3, 4].set(jnp.nan)
  g["scan"] = g["scan"].at[1, 2, 3].set(jnp.nan)  # only layer 1 of the scanned kernel
  _, state = update(g, state, params)
  after = {n: b for n, b in zip(sorted(shapes), state.bases)}

  # tall: previous basis kept, finite.
  assert after["tall"].left is None
  np.testing.assert_array_equal(np.asarray(after["tall"].right), np.asarray(before["tall"].right))
  assert np.all(np.isfinite(np.asarray(after["tall"].right)))
  # wide (clean gradient): refreshed.
  assert not np.allclose(np.asarray(after["wide"].left), np.asarray(before["wide"].left))
  assert np.all(np.isfinite(np.asarray(after["wide"].left)))
  # scan: per matrix of the stack -- layer 1 keeps its basis, layers 0 and 2 refresh.
  sb, sa = np.asarray(before["scan"].right), np.asarray(after["scan"].right)
  assert np.all(np.isfinite(sa))
  np.testing.assert_array_equal(sa[1], sb[1])
  assert not np.allclose(sa[0], sb[0])
  assert not np.allclose(sa[2], sb[2])
  # The refresh counters: tall's rejected refresh is not counted; scan's partly taken one is.
  assert [int(after[n].refreshes) for n in ("scan", "tall", "wide")] == [2, 1, 2]


_INF_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np, optax
import galore_jax as gj
rng = np.random.default_rng(0)
params = {"tall": jnp.zeros((24, 10)), "wide": jnp.zeros((10, 24))}
grads = lambda: {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
                 for k, v in params.items()}
tx = gj.galore_projection(optax.scale_by_adam(), rank=4, update_proj_gap=1)
update = jax.jit(tx.update)
state = tx.init(params)
g = grads(); g["tall"] = g["tall"].at[0, 0].set(jnp.inf)
_, state = update(g, state, params)               # first refresh, +inf in one gradient
assert np.all(np.isfinite(np.asarray(state.bases[0].right)))
assert np.all(np.isfinite(np.asarray(state.bases[1].left)))
_, state = update(grads(), state, params)         # clean refresh
before = np.asarray(state.bases[0].right)
g = grads(); g["tall"] = g["tall"].at[3, 4].set(-jnp.inf)
_, state = update(g, state, params)               # later refresh, -inf: previous basis kept
np.testing.assert_array_equal(np.asarray(state.bases[0].right), before)
print("OK")
"""


def test_inf_gradient_on_refresh_keeps_a_finite_basis_and_does_not_hang():
  """An inf in a gradient on a refresh step must behave like a NaN: no NaN/inf basis, the
  previous basis kept.  Run in a subprocess with a timeout: LAPACK's gesdd (jax's CPU SVD)
  loops forever on a matrix containing inf (Reference-LAPACK/lapack#1409), so an unguarded
  refresh hangs the training process instead of failing."""
  try:
    proc = subprocess.run([sys.executable, "-c", _INF_SCRIPT], capture_output=True, text=True,
                          timeout=30)
  except subprocess.TimeoutExpired:
    pytest.fail("galore update with an inf in the gradient on a refresh step did not return "
                "within 30 s (the SVD of a non-finite matrix hangs on CPU)")
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# differentiating through an update (meta-learning)
# --------------------------------------------------------------------------------------------

# The aliases whose refresh computes a basis from the gradient (an SVD at step 0).
FROM_GRADIENT = ["galore_adamw", "galore_adamw_8bit", "galore_adafactor", "ldadamw", "fira_adamw"]


def meta_loss(tx, x):
  """Loss after one update on the gradient of ``0.5 |x W|^2`` (``W`` = "tall"), as a function of
  the params: the gradient ``x^T x W`` has rank ``len(x)``; "wide" gets a zero gradient."""
  inner = lambda p: 0.5 * jnp.sum((x @ p["tall"]) ** 2)  # noqa: E731

  def outer(p):
    g = jax.grad(inner)(p)
    updates, _ = tx.update(g, tx.init(p), p)
    return inner(optax.apply_updates(p, updates))
  return outer


@pytest.mark.parametrize("name", FROM_GRADIENT)
def test_grad_through_a_refresh_with_a_rank_deficient_gradient_is_finite(name):
  """A rank-1 gradient (batch of one) at rank 4 and an all-zero gradient: the SVD's derivative
  is 0/0 on repeated singular values, so a basis differentiated through it made every
  meta-gradient NaN.  The basis is state, held fixed by the update (as galore-torch computes
  it under no_grad): the meta-gradient is finite."""
  factory = getattr(gj, name)
  names = inspect.signature(factory).parameters
  # eps_root > 0, as optax advises for differentiating through Adam (sqrt'(0) is inf).
  kw = {k: v for k, v in dict(rank=RANK, update_proj_gap=2, min_8bit_size=8,
                              eps_root=1e-8).items() if k in names}
  x = jnp.ones((1, 24), jnp.float32)
  got = jax.grad(meta_loss(factory(LR, **kw), x))(make_params())
  for k, v in got.items():
    assert np.all(np.isfinite(np.asarray(v))), k


def test_grad_through_a_refresh_holds_the_basis_fixed():
  """The meta-gradient of galore_adamw at its first step against the closed form with the
  right basis ``Q`` (top-r right singular vectors of the gradient, from NumPy) held fixed:
  ``u = -lr * scale * n(g Q) Q^T`` with Adam's first step ``n(r) = r / (sqrt(r^2 + eps_root) +
  eps)``."""
  lr, scale, eps, eps_root = LR, 0.25, 1e-8, 1e-8
  x = jnp.asarray(np.random.default_rng(3).standard_normal((30, 24)), jnp.float32)
  params = make_params()
  tx = gj.galore_adamw(lr, rank=RANK, update_proj_gap=2, scale=scale, eps=eps,
                       eps_root=eps_root)
  got = jax.grad(meta_loss(tx, x))(params)["tall"]

  w = params["tall"]
  g0 = np.asarray(x).T @ np.asarray(x) @ np.asarray(w)
  q = jnp.asarray(np.linalg.svd(g0)[2][:RANK].T)  # (10, r): tall projects on the right

  def reference(w):
    g = x.T @ (x @ w)
    r = g @ q
    return 0.5 * jnp.sum((x @ (w - lr * scale * (r / (jnp.sqrt(r**2 + eps_root) + eps)) @ q.T))
                         ** 2)
  want = jax.grad(reference)(w)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# ensembles (vmap) trained in a lax.scan
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALIASES)
def test_vmapped_ensemble_in_a_scan_matches_lone_runs(name):
  """Regression guard: init and update vmapped over an ensemble of two and scanned over 3
  steps (refreshes at 0 and 2 inside the scan): the carry keeps its types, and each member's
  updates (member 1's checked) are those of its own jitted run."""
  factory = getattr(gj, name)
  names = inspect.signature(factory).parameters
  kw = {k: v for k, v in dict(rank=RANK, update_proj_gap=2, min_8bit_size=8).items()
        if k in names and not (name == "apollo_mini" and k == "rank")}
  tx = factory(LR, **kw)
  stack = lambda *trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)  # noqa: E731
  params = stack(make_params(seed=0), make_params(seed=1))
  grads = stack(*[stack(make_grads(t, seed=1), make_grads(t, seed=2)) for t in range(3)])

  def step(state, g):
    updates, state = jax.vmap(tx.update)(g, state, params)
    return state, updates
  _, got = jax.lax.scan(step, jax.vmap(tx.init)(params), grads)
  want, _, _ = run(tx, make_params(seed=1), 3, grads_fn=lambda t: make_grads(t, seed=2))
  for t in range(3):
    assert_trees_close(jax.tree.map(lambda u: u[t, 1], got), want[t], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# linear_kernels on a Flax NNX model
# --------------------------------------------------------------------------------------------


class Block(nnx.Module):

  def __init__(self, d, rngs):
    self.attn_norm = nnx.RMSNorm(d, rngs=rngs)
    self.q_proj = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.k_proj = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.v_proj = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.o_proj = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(d, rngs=rngs)
    self.up_proj = nnx.Linear(d, 2 * d, rngs=rngs)  # with bias
    self.down_proj = nnx.Linear(2 * d, d, rngs=rngs)

  def __call__(self, x):
    h = self.attn_norm(x)
    q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
    att = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1]), axis=-1)
    x = x + self.o_proj(att @ v)
    return x + self.down_proj(jax.nn.gelu(self.up_proj(self.mlp_norm(x))))


class TinyLM(nnx.Module):

  def __init__(self, vocab=11, d=8, rngs=None):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.block = Block(d, rngs)
    self.final_norm = nnx.LayerNorm(d, rngs=rngs)
    self.lm_head = nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, tokens):
    return self.lm_head(self.final_norm(self.block(self.embed(tokens))))


def test_linear_kernels_on_nnx_state():
  model = fast_init(lambda: TinyLM(rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  mask = gj.linear_kernels(params)
  selected = {
      jax.tree_util.keystr(path)
      for path, sel in jax.tree_util.tree_flatten_with_path(mask)[0] if sel
  }
  want = {f"['block']['{n}']['kernel'].value"
          for n in ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")}
  assert selected == want
  assert len(jax.tree.leaves(mask)) == len(jax.tree.leaves(params))

  # As the mask of galore_adamw: exactly those leaves get bases; the rest full-shape Adam.
  tx = gj.galore_adamw(1e-3, rank=4, update_proj_gap=2, mask=gj.linear_kernels)
  pure = nnx.as_pure(params)
  state = tx.init(pure)
  got = {
      jax.tree_util.keystr(path)
      for (path, _), b in zip(jax.tree_util.tree_flatten_with_path(pure)[0], state[0].bases)
      if isinstance(b, gj.Bases)
  }
  assert got == {s.removesuffix(".value") for s in want}
  mu = state[0].inner_state.mu
  assert mu["block"]["up_proj"]["kernel"].shape == (4, 16)  # (8, 16): 8 < 16 -> left, r x n
  assert mu["embed"]["embedding"].shape == (11, 8)
  assert mu["lm_head"]["kernel"].shape == (8, 11)

  # Also directly on the nnx.State (Variables as nodes) and through nnx.Optimizer.
  state_v = tx.init(params)
  assert [isinstance(b, gj.Bases) for b in state_v[0].bases] == [
      isinstance(b, gj.Bases) for b in state[0].bases]
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  tokens = jnp.arange(12).reshape(2, 6) % 11
  loss_fn = lambda m: jnp.mean(  # noqa: E731
      optax.softmax_cross_entropy_with_integer_labels(m(tokens), tokens))

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer)) for _ in range(4)]
  assert losses[-1] < losses[0]
  assert [int(b.refreshes) for b in optimizer.opt_state[0].bases if isinstance(b, gj.Bases)] \
      == [2] * 6


def test_linear_kernels_leaves_out_convolutions_and_heads():
  """Conv kernels (NNX and Linen names) and heads named ``output`` / ``classifier`` are not
  attention or MLP matrices: the paper leaves them at full shape. A module named ``output``
  that holds a ``dense`` (BERT's MLP down-projection) is still selected."""
  k2, k4 = jnp.zeros((8, 8)), jnp.zeros((3, 3, 4, 8))
  params = {
      "conv1": {"kernel": k4}, "Conv_0": {"kernel": k4},
      "stem": {"Conv_0": {"kernel": k4}},
      "output": {"kernel": k2},  # LLaMA (Meta naming) head
      "classifier": {"kernel": k2},  # BERT / ViT classification head
      "layer": {"output": {"dense": {"kernel": k2}}, "intermediate": {"dense": {"kernel": k2}}},
  }
  mask = gj.linear_kernels(params)
  selected = {jax.tree_util.keystr(p) for p, s in jax.tree_util.tree_flatten_with_path(mask)[0]
              if s}
  assert selected == {"['layer']['intermediate']['dense']['kernel']",
                      "['layer']['output']['dense']['kernel']"}
  # With that mask, a small CNN's init no longer asks for dimension_numbers.
  gj.galore_adamw(1e-3, rank=2, mask=gj.linear_kernels).init(params)

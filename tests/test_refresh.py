"""Refresh policies: every, every_step, staggered and lazy refresh exactly when specified."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import galore_jax as gj
from galore_jax import refresh

# Three projected leaves (one a stack of 3 layer matrices) and one that is not.
PARAMS = {"a": jnp.zeros((8, 4)), "b": jnp.zeros((6, 5)), "bias": jnp.zeros(5),
          "c": jnp.zeros((3, 7, 5))}
DIMS = {"a": None, "b": None, "bias": None, "c": gj.DimensionNumbers(1, 2)}
MASK = {"a": True, "b": True, "bias": False, "c": True}


def dims_fn(params):
  return {k: (gj.DimensionNumbers(1, 0) if k in "ab" else DIMS[k]) for k in params}


def run(policy, steps, grads_fn=None, method="svd"):
  """Refreshed-leaf flags per step (projected leaves a, b, c) and the final state."""
  tx = gj.galore_projection(rank=2, refresh=policy, mask=MASK, dimension_numbers=dims_fn,
                            method=method)
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  flags = []
  for t in range(steps):
    grads = grads_fn(t) if grads_fn else jax.tree.map(
        lambda p: jax.random.normal(jax.random.fold_in(jax.random.key(0), t), p.shape), PARAMS)
    _, new = update(grads, state)
    flags.append([int(n.refreshes - o.refreshes) for o, n in zip(state.bases, new.bases)
                  if isinstance(n, gj.Bases)])
    state = new
  return flags, state


def test_every_refreshes_on_multiples_of_the_gap():
  flags, state = run(gj.every(3), 10)
  assert flags == [[1, 1, 1] if t % 3 == 0 else [0, 0, 0] for t in range(10)]
  assert int(gj.refresh_counts(state)) == 3 * 4


def test_every_step():
  flags, _ = run(gj.every_step(), 4)
  assert flags == [[1, 1, 1]] * 4


@pytest.mark.parametrize("gap", [3, 4, 7])
def test_staggered_schedule(gap):
  flags, _ = run(gj.staggered(gap), 3 * gap + 2)
  offsets = [j * gap // 3 for j in range(3)]
  for t, row in enumerate(flags):
    want = [int(t == 0 or (t >= o and (t - o) % gap == 0)) for o in offsets]
    assert row == want, t
  # After step 0 no step refreshes more than ceil(N / T) leaves, and each leaf every T steps.
  assert max(sum(row) for row in flags[1:]) <= -(-3 // gap)
  for j in range(3):
    steps = [t for t, row in enumerate(flags) if row[j] and t > 0]
    assert all(b - a == gap for a, b in zip(steps, steps[1:]))


def test_staggered_spreads_refresh_work():
  # With more leaves than the gap, the work per step is still balanced.
  policy = gj.staggered(4)
  offsets = policy.init(10)
  per_step = [int(policy.due(jnp.int32(t), offsets).sum()) for t in range(1, 9)]
  assert max(per_step) - min(per_step) <= 1 and sum(per_step[:4]) == 10


def test_lazy_policy_update_rule():
  policy = gj.lazy(10, threshold=0.5, growth=3, window=2)
  state = policy.init(2)
  due = jnp.array([True, True])
  assert policy.due(jnp.int32(0), state).tolist() == [True, True]
  state = policy.update(state, jnp.int32(0), due, jnp.array([0.0, 0.0]))  # first: not recorded
  assert state.num_similarities.tolist() == [0, 0]
  assert policy.due(jnp.int32(10), state).tolist() == [True, True]
  state = policy.update(state, jnp.int32(10), due, jnp.array([0.9, 0.2]))
  state = policy.update(state, jnp.int32(20), due, jnp.array([0.8, 0.9]))
  # Full windows, means 0.85 and 0.55 >= 0.5: both gaps grow; the windows slide on.
  assert state.gap.tolist() == [30, 30] and state.num_similarities.tolist() == [2, 2]
  assert policy.due(jnp.int32(30), state).tolist() == [True, True]
  state = policy.update(state, jnp.int32(30), due, jnp.array([0.9, 0.0]))
  # Leaf 0: window (0.8, 0.9) -> grows again; leaf 1: (0.9, 0.0), mean 0.45 -> stays.
  assert state.gap.tolist() == [90, 30]
  assert [policy.due(jnp.int32(t), state).tolist() for t in (60, 90)] == [
      [False, True], [True, True]]


def _qgalore_refresh_steps(similarity, steps, gap=200, threshold=0.4, growth=2, window=5):
  """The refresh steps of one matrix under Q-GaLore's projector (written from its
  q_galore_projector.py): refresh when step % gap == 0; after the first, append the
  similarity to a queue of the last `window`; a full queue with mean >= threshold
  multiplies the gap by `growth`."""
  out, queue = [], []
  for t in range(steps):
    if t % gap == 0:
      if out:
        queue = (queue + [similarity(t)])[-window:]
        if len(queue) == window and sum(queue) / window >= threshold:
          gap = int(gap * growth)
      out.append(t)
  return out


@pytest.mark.parametrize("name", ["settled", "alternating"])
def test_lazy_matches_q_galore_schedule(name):
  similarity = {"settled": lambda t: 1.0,
                "alternating": lambda t: 0.9 if (t // 200) % 3 else 0.0}[name]
  want = _qgalore_refresh_steps(similarity, 20_000)
  if name == "settled":
    assert want == [0, 200, 400, 600, 800, 1000, 1200, 1600, 3200, 6400, 12800]
  policy = gj.lazy(200)
  due_at = jax.jit(jax.vmap(policy.due, (0, None)))  # every step of a chunk at once
  state, got, t = policy.init(1), [], 0
  while t < 20_000:
    steps = np.arange(t, t + 500)
    hits = np.flatnonzero(np.asarray(due_at(jnp.asarray(steps, jnp.int32), state))[:, 0])
    if not hits.size:
      t += 500
      continue
    t = int(steps[hits[0]])  # the next refresh: update the state, look on from t + 1
    got.append(t)
    state = policy.update(state, jnp.int32(t), jnp.array([True]),
                          jnp.array([similarity(t)], jnp.float32))
    t += 1
  assert got == want


def test_lazy_grows_the_gap_of_a_settled_subspace_only():
  fixed = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), PARAMS)

  def grads(t):  # leaves a, c: the same gradient each step (settled); b: fresh noise
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(2), t), PARAMS["b"].shape)
    return {**fixed, "b": noise}

  flags, state = run(gj.lazy(2, threshold=0.9, growth=2, window=2), 16, grads)
  steps = [[t for t, row in enumerate(flags) if row[j]] for j in range(3)]
  # Settled leaves: refreshes at 0, 2, 4 (two similarities of 1.0 recorded) -> gap 4: 8
  # (the window slides: still full of 1.0) -> gap 8: next at 16.
  assert steps[0] == [0, 2, 4, 8] and steps[2] == steps[0]
  assert state.refresh_state.gap.tolist()[0] == 8
  # Noisy leaf: leading vectors of independent matrices rarely align: the gap stays 2.
  assert steps[1] == list(range(0, 16, 2))


def test_a_rejected_refresh_is_not_counted_and_leaves_lazy_window_alone():
  # Leaf a's gradient is NaN on its second refresh (step 2): the non-finite guard keeps its
  # basis, so that refresh neither counts nor records a similarity (unchanged bases would
  # read 1.0 and push a towards a longer gap); b and c refresh normally.
  fixed = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), PARAMS)

  def grads(t):
    return {**fixed, "a": fixed["a"].at[0, 0].set(jnp.nan)} if t == 2 else fixed

  policy = gj.lazy(2, threshold=0.9, growth=2, window=2)
  flags, state = run(policy, 3, grads)
  assert flags == [[1, 1, 1], [0, 0, 0], [0, 1, 1]]
  assert state.refresh_state.num_similarities.tolist() == [0, 1, 1]
  np.testing.assert_allclose(state.refresh_state.similarities[:, -1], [0.0, 1.0, 1.0],
                             atol=1e-5)
  assert int(gj.refresh_counts(state)) == 5
  flags, state = run(policy, 6, grads)  # a's window fills two refreshes later than b's
  assert state.refresh_state.gap.tolist() == [2, 4, 4]


@pytest.mark.parametrize("nan_step, seed", [(2, 5), (0, 6)])
def test_lazy_similarity_of_a_partly_refreshed_stack_averages_the_layers_compared(nan_step, seed):
  # Leaf c stacks 3 layers, refreshed at steps 0 and 2.  Layer 1's gradient holds a NaN at
  # ``nan_step``, so the guard keeps that layer's basis there and takes the other two.
  # - At step 2: layer 1 keeps its basis (it would read similarity 1 with itself).
  # - At step 0: layer 1 keeps its zero basis, and at step 2 gets its first, with none to be
  #   compared with (it would read 0 against zero).
  # Either way the similarity recorded at step 2 is the mean over layers 0 and 2 only.
  rng = np.random.default_rng(seed)
  grads_at = {t: {k: jnp.asarray(rng.standard_normal(p.shape), jnp.float32)
                  for k, p in PARAMS.items()} for t in range(3)}
  grads_at[nan_step]["c"] = grads_at[nan_step]["c"].at[1, 3, 2].set(jnp.nan)
  _, state = run(gj.lazy(2, threshold=0.9, window=2), 3, grads_at.__getitem__)
  c = [b for b in state.bases if isinstance(b, gj.Bases)][2]
  assert c.left.shape == (3, 5, 2) and int(c.refreshes) == 2  # c's (5, 7) matrices: left

  def leading(g):  # NumPy float64: each layer's leading left vector of its (out, in) matrix
    return np.stack([np.linalg.svd(np.asarray(x, np.float64).T)[0][:, 0] for x in g])

  compared = np.array([0, 2])
  cos = np.abs(np.sum(leading(grads_at[0]["c"][compared]) * leading(grads_at[2]["c"][compared]),
                      axis=-1))
  assert int(state.refresh_state.num_similarities[2]) == 1
  np.testing.assert_allclose(float(state.refresh_state.similarities[2, -1]), cos.mean(),
                             atol=1e-5)
  layer_1 = 1.0 if nan_step == 2 else 0.0  # what counting layer 1 would add
  assert abs((cos.sum() + layer_1) / 3 - cos.mean()) > 0.1  # (so counting it would show)


def test_lazy_records_nothing_for_a_leafs_first_basis():
  # Leaf a's step-0 refresh is rejected (NaN): its first basis comes at step 2, with no
  # previous one to compare; it recorded similarity 0 against the zero basis.
  fixed = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), PARAMS)

  def grads(t):
    return {**fixed, "a": fixed["a"].at[0, 0].set(jnp.nan)} if t == 0 else fixed

  flags, state = run(gj.lazy(2, threshold=0.9, growth=2, window=2), 3, grads)
  assert flags == [[0, 1, 1], [0, 0, 0], [1, 1, 1]]
  assert state.refresh_state.num_similarities.tolist() == [0, 1, 1]


def test_basis_similarity_is_sign_and_batch_aware():
  old = jnp.stack([jnp.eye(4)[:, :2], jnp.eye(4)[:, :2]])
  new = old.at[1].set(-jnp.eye(4)[:, 1:3])  # layer 1's leading vector now orthogonal
  assert float(refresh.basis_similarity(old, -old)) == 1.0
  assert float(refresh.basis_similarity(old, new)) == pytest.approx(0.5)


E2 = jnp.stack([jnp.eye(3)[:, :2]] * 2)  # two (3, 2) bases


@pytest.mark.parametrize("args, match", [
    # a |cosine| above 1 (taken 0.5 or True), 0.5 for [2, 0], 0 for complex bases: silently
    ((E2, E2, jnp.array([0.5, 0.5])), r"taken must be a bool array of the batch shape \(2,\),"
                                      r" got float32 \(2,\)"),
    ((E2, E2, True), r"taken must be a bool array of the batch shape \(2,\), got bool \(\)"),
    ((E2, E2, jnp.array([2, 0])), r"got int32 \(2,\)"),
    ((E2 * 1j, E2 * 1j, None), r"^basis_similarity: old is complex64: expected real bases\.$"),
    ((E2, E2[..., :1, :], None), r"^basis_similarity: old and new must be \(\.\.\., d, r\)"
                                 r" bases of one shape, r >= 1, got \(2, 3, 2\) and \(2, 1, 2\)"),
    ((jnp.ones(3), jnp.ones(3), None), r"got \(3,\) and \(3,\)"),
    ((E2[..., :0], E2[..., :0], None), r"got \(2, 3, 0\) and \(2, 3, 0\)"),
])
def test_basis_similarity_bad_input_is_one_line(args, match):
  with pytest.raises(ValueError, match=match):
    refresh.basis_similarity(*args)


@pytest.mark.parametrize("policy", [gj.staggered(3), gj.lazy(2, window=2)], ids=str)
def test_policy_state_is_stable_and_checkpoints(policy, tmp_path):
  tx = gj.galore_adamw(1e-2, rank=2, refresh=policy, mask=MASK, dimension_numbers=dims_fn)
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  grads = lambda t: jax.tree.map(
      lambda p: jax.random.normal(jax.random.fold_in(jax.random.key(3), t), p.shape), PARAMS)
  avals = jax.tree.map(jax.typeof, state)
  for t in range(4):
    _, state = update(grads(t), state, PARAMS)
  assert jax.tree.map(jax.typeof, state) == avals
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "s", state)
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / "s", jax.eval_shape(tx.init, PARAMS))
  a, b = state, restored
  for t in range(4, 9):
    ua, a = update(grads(t), a, PARAMS)
    ub, b = update(grads(t), b, PARAMS)
    for x, y in zip(jax.tree.leaves(ua), jax.tree.leaves(ub)):
      np.testing.assert_array_equal(x, y)


def test_bad_policy_arguments():
  for bad in [lambda: gj.staggered(0), lambda: gj.lazy(0), lambda: gj.lazy(5, growth=0),
              lambda: gj.lazy(5, window=0)]:
    with pytest.raises(ValueError, match="must be an int >= 1"):
      bad()


@pytest.mark.parametrize("policy", [gj.every(3), gj.staggered(3)], ids=["shared", "per_leaf"])
def test_refresh_cond_takes_the_leaves_untransposed(policy):
  """A normal step writes no transposed copy of a gradient: the refresh ``cond`` (one for
  the tree, or one per leaf) gets the leaves as they are and views them as matrices inside
  its branch.  (A transposed view built outside is a ``cond`` operand that XLA writes out
  every step: 48 MiB written and read per step on the LLaMA-60M's bf16 kernels.)  Here
  ``a`` and ``b`` are viewed through DimensionNumbers(1, 0), ``c`` as (3, out=5, in=7):
  all three transpose."""
  tx = gj.galore_projection(rank=2, refresh=policy, mask=MASK, dimension_numbers=dims_fn)
  jaxpr = jax.make_jaxpr(tx.update)(PARAMS, tx.init(PARAMS)).jaxpr
  transposed = {v for e in jaxpr.eqns if e.primitive.name == "transpose" for v in e.outvars}
  conds = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
  assert conds and transposed  # the projections still transpose, outside the conds
  assert not [v for e in conds for v in e.invars if v in transposed]


@pytest.mark.parametrize("on_refresh", ["keep", "transport"])
def test_a_host_decision_gives_the_policys_steps_without_a_cond(on_refresh):
  """``galore_refresh=step % T == 0`` (decided on the host, a static argument) gives the
  same updates and state as the policy's own ``lax.cond``, through a chain with a clip;
  the normal step then has no conditional at all (a GPU syncs with its host on each)."""
  def make():
    return optax.chain(optax.clip_by_global_norm(1.0), gj.galore_adamw(
        1e-2, rank=2, update_proj_gap=3, mask=MASK, dimension_numbers=dims_fn,
        method="power", on_refresh=on_refresh))

  tx = make()
  device = jax.jit(tx.update)
  host = jax.jit(tx.update, static_argnames="galore_refresh")
  s_device = s_host = tx.init(PARAMS)
  for t in range(7):
    grads = jax.tree.map(
        lambda p: jax.random.normal(jax.random.fold_in(jax.random.key(1), t), p.shape), PARAMS)
    u_device, s_device = device(grads, s_device, PARAMS)
    u_host, s_host = host(grads, s_host, PARAMS, galore_refresh=t % 3 == 0)
    for a, b in zip(jax.tree.leaves((u_device, s_device)), jax.tree.leaves((u_host, s_host))):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  conditionals = lambda text: text.count("stablehlo.if") + text.count("stablehlo.case")
  assert conditionals(device.lower(PARAMS, s_device, PARAMS).as_text()) >= 1
  assert conditionals(host.lower(PARAMS, s_host, PARAMS, galore_refresh=False).as_text()) == 0


class _Scalar(gj.RefreshPolicy):
  shared = False  # per leaf, but answers for all at once

  def due(self, count, state):
    return count == 0


class _OneOfMany(gj.RefreshPolicy):  # shared, but answers per leaf
  def due(self, count, state):
    return jnp.array([count == 0])


class _Counted(gj.RefreshPolicy):  # shared, but answers with a number
  def due(self, count, state):
    return (count == 0).astype(jnp.int32)


@pytest.mark.parametrize("make", [
    lambda policy: gj.galore_projection(rank=2, refresh=policy),
    lambda policy: gj.scale_by_apollo(2, refresh=policy),
    lambda policy: gj.scale_by_apollo(2, proj="svd", refresh=policy)],
    ids=["galore", "apollo", "apollo_svd"])
@pytest.mark.parametrize("policy, want", [
    (_Scalar(), r"bool array of shape \(2,\) \(one per projected leaf\), got shape \(\) bool"),
    (_OneOfMany(), r"bool array of shape \(\) \(shared\), got shape \(1,\) bool"),
    (_Counted(), r"bool array of shape \(\) \(shared\), got shape \(\) int32")],
    ids=["scalar_per_leaf", "array_shared", "int_shared"])
def test_a_custom_policy_whose_due_has_the_wrong_shape_is_named(make, policy, want):
  """Such a policy failed inside JAX (iteration over a 0-d array, lax.cond's "Pred must
  be a scalar"), naming neither the policy nor the protocol it broke."""
  params = {"v": jnp.ones((6, 4)), "w": jnp.ones((5, 3))}
  tx = make(policy)
  with pytest.raises(ValueError, match=rf"^refresh: {type(policy).__name__}\.due must return"
                     rf" a {want}\."):
    jax.jit(tx.update)(params, tx.init(params))


def test_a_host_decision_needs_a_bool_and_the_every_policy():
  tx = gj.galore_projection(rank=2, mask=MASK, dimension_numbers=dims_fn)
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match="galore_refresh: expected a Python bool"):
    tx.update(PARAMS, state, galore_refresh=jnp.bool_(True))
  tx = gj.galore_projection(rank=2, mask=MASK, dimension_numbers=dims_fn,
                            refresh=gj.staggered(3))
  with pytest.raises(ValueError, match="galore_refresh: a host decision needs the refresh"):
    tx.update(PARAMS, tx.init(PARAMS), galore_refresh=False)


# APOLLO's random projection reads no gradient, so it takes no similarity-driven (lazy) policy.
@pytest.mark.parametrize("make,policy", [
    (gj.galore_adamw, gj.staggered(2)), (gj.galore_adamw, gj.lazy(2)),
    (gj.apollo_adamw, gj.staggered(2))],
    ids=["galore-staggered", "galore-lazy", "apollo-staggered"])
def test_nothing_projected_keeps_a_policy_state_orbax_saves(make, policy, tmp_path):
  """A transform whose mask selects nothing (the rest of a model whose layers update apart)
  keeps a one-leaf stand-in of the policy's state: zero-size arrays made Orbax refuse the
  whole checkpoint, and None would change the state's structure."""
  params = {"w": jnp.ones((8, 6)), "b": jnp.ones(6)}
  tx = make(1e-2, rank=2, refresh=policy, mask=lambda p: False)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(3):
    _, state = update(params, state, params)
  assert all(x.size > 0 for x in jax.tree.leaves(state[0].refresh_state))
  projecting = make(1e-2, rank=2, refresh=policy).init(params)[0].refresh_state
  assert jax.tree.structure(state[0].refresh_state) == jax.tree.structure(projecting)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "state", state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "state", state)
  assert jax.tree.structure(restored) == jax.tree.structure(state)


@pytest.mark.parametrize("policy", [gj.staggered(4), gj.lazy(4)], ids=str)
def test_policy_init_takes_a_leaf_count(policy):
  """staggered(4).init(-2) gave an empty state without a word; lazy's failed in JAX."""
  with pytest.raises(ValueError, match=r"^init: num_leaves must be an int >= 0, got -2\.$"):
    policy.init(-2)
  with pytest.raises(ValueError, match=r"^init: num_leaves must be an int >= 0, got 2\.0\.$"):
    policy.init(2.0)

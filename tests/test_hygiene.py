"""State hygiene of ``galore_projection`` / ``galore_adamw`` (DESIGN.md, "State hygiene").

The params are a mixed tree: a tall and a wide 2-D matrix (taken as given), a 1-D bias (not
projected), a 3-D attention-style kernel ``(d, heads, head_dim)`` viewed with dimension numbers as
one ``(heads*head_dim) x d`` matrix, and a scanned ``(L, d, f)`` kernel with a batch axis (one
basis per layer).
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import galore_jax as gj

DN = gj.DimensionNumbers
RANK = 4
GAP = 3

SHAPES = {
    "tall": (24, 10),
    "wide": (10, 24),
    "bias": (10,),
    "attn": {"kernel": (8, 2, 6)},  # (d, heads, head_dim)
    "scan": {"kernel": (3, 8, 12)},  # (L, d, f)
}
DIMS = {
    "tall": DN(reduction_axis=1, output_axis=0),  # as given: m=24 >= n=10 -> right under std
    "wide": DN(reduction_axis=1, output_axis=0),  # as given: m=10 < n=24 -> left under std
    "bias": None,  # not a matrix: not projected
    "attn": {"kernel": DN(reduction_axis=0, output_axis=(1, 2))},
    "scan": {"kernel": DN(reduction_axis=1, output_axis=2)},
}


def _is_shape(x):
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def _normal_tree(seed, dtype):
  shapes, treedef = jax.tree.flatten(SHAPES, is_leaf=_is_shape)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
      treedef, [jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype) for s in shapes]
  )


def make_params(dtype=jnp.float32, seed=0):
  return _normal_tree(seed, dtype)


def make_grads(params, step, seed=1):
  """Fresh random gradients per step (so every refresh gives a different basis); made with
  NumPy outside of jit (jax.random inside jit compiles slowly on CPU)."""
  dtype = jax.tree.leaves(params)[0].dtype
  return _normal_tree(1000 * seed + step + 1, dtype)


def make_tx(proj_type="std", **kw):
  kw.setdefault("rank", RANK)
  kw.setdefault("update_proj_gap", GAP)
  kw.setdefault("scale", 0.25)
  kw.setdefault("weight_decay", 0.1)
  return gj.galore_adamw(1e-2, proj_type=proj_type, dimension_numbers=DIMS, **kw)


@functools.lru_cache(maxsize=None)
def cached_tx(proj_type="std", **kw):
  """One transform (and one jitted update) per configuration, so that tests with the same
  configuration and param dtype share compilations."""
  tx = make_tx(proj_type, **kw)
  return tx, jax.jit(tx.update)


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def avals(tree):
  """(treedef, [(shape, dtype, weak_type), ...]) of arrays or ShapeDtypeStructs."""

  def one(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return (tuple(x.shape), x.dtype, bool(x.weak_type))
    t = jax.typeof(x)
    return (tuple(t.shape), t.dtype, bool(t.weak_type))

  return jax.tree.structure(tree), [one(x) for x in jax.tree.leaves(tree)]


def galore_state(opt_state):
  """The GaLoreProjectionState inside the galore_adamw chain."""
  state = opt_state[0]
  assert isinstance(state, gj.GaLoreProjectionState)
  return state


PROJ_TYPES = list(gj.PROJ_TYPES)
# Where each case compiles an update, a subset keeps the file fast: "std" has both a left- and
# a right-projected leaf, "reverse_std" the opposite, "full" both bases on every leaf ("left" /
# "right" are the same code paths one side at a time).
COMPILED_PROJ_TYPES = ["std", "reverse_std", "full"]


# --------------------------------------------------------------------------------------------
# init on abstract params
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_init_on_shape_dtype_structs_matches_real_init(proj_type):
  params = make_params()
  tx = make_tx(proj_type)
  real = tx.init(params)

  # init called directly on ShapeDtypeStructs (no tracing) works ...
  from_sds = tx.init(abstract(params))
  # ... and under eval_shape, on both abstract and real params.
  eval_sds = jax.eval_shape(tx.init, abstract(params))
  eval_real = jax.eval_shape(tx.init, params)

  assert avals(from_sds) == avals(real)
  assert avals(eval_sds) == avals(real)
  assert avals(eval_real) == avals(real)

  # The projected leaves really carry low-rank state.
  state = galore_state(real)
  assert isinstance(state.bases[1], optax.MaskedNode)  # "bias" (sorted leaf order: attn, bias, ...)
  assert state.inner_state.mu["bias"].shape == (10,)
  assert state.count.dtype == jnp.int32


# --------------------------------------------------------------------------------------------
# avals stable across update (refresh and non-refresh steps), and under lax.cond
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("proj_type", COMPILED_PROJ_TYPES)
def test_state_avals_stable_across_refresh_and_plain_steps(proj_type):
  params = make_params()
  tx, update = cached_tx(proj_type)
  state = tx.init(params)
  want = avals(state)
  for step in range(GAP + 2):  # steps 0 (refresh), 1, 2 (plain), 3 (refresh), 4 (plain)
    grads = make_grads(params, step)
    if step < 2:
      assert avals(jax.eval_shape(tx.update, grads, state, params)[1]) == want
    updates, state = update(grads, state, params)
    assert avals(state) == want, f"state avals changed at step {step}"
    assert avals(updates) == avals(params)
    params = optax.apply_updates(params, updates)
  assert int(galore_state(state).count) == GAP + 2
  assert all(
      int(b.refreshes) == 2
      for b in galore_state(state).bases
      if not isinstance(b, optax.MaskedNode)
  )


@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_state_avals_stable_under_random_lax_cond(proj_type):
  """optax common-test style: lax.cond(pred, update, identity) needs identical avals."""
  params = make_params()
  tx = make_tx(proj_type, update_proj_gap=2)
  state = tx.init(params)
  want = avals(state)

  @jax.jit
  def maybe_update(state, grads, pred):
    return jax.lax.cond(
        pred, lambda s: tx.update(grads, s, params)[1], lambda s: s, state
    )

  rng = np.random.default_rng(0)
  preds = rng.random(8) < 0.5
  preds[:2] = [True, False]  # make sure both branches are taken
  for step, pred in enumerate(preds):
    state = maybe_update(state, make_grads(params, step), jnp.asarray(pred))
    assert avals(state) == want
  assert int(galore_state(state).count) == int(preds.sum())


# --------------------------------------------------------------------------------------------
# one compilation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "which,extra",
    [
        ("galore_adamw", {}),
        ("galore_adamw", {"value": 1.5, "unexpected_kwarg": "ignored-python-string"}),
        ("galore_projection", {"value": 1.5}),
    ],
    ids=["adamw-no-extra", "adamw-extra-kwargs", "projection-extra-kwarg"],
)
def test_update_compiles_once(which, extra):
  params = make_params()
  if which == "galore_adamw":
    tx = make_tx("std", update_proj_gap=2)
  else:
    tx = gj.galore_projection(
        optax.scale_by_adam(), rank=RANK, update_proj_gap=2, dimension_numbers=DIMS
    )
  traces = []
  static = {k: v for k, v in extra.items() if isinstance(v, str)}
  dynamic = {k: jnp.float32(v) for k, v in extra.items() if not isinstance(v, str)}

  @jax.jit
  def step(params, state, grads, dynamic):
    traces.append(1)
    updates, state = tx.update(grads, state, params, **dynamic, **static)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for i in range(5):  # steps 0, 2, 4 refresh; 1, 3 do not
    params, state = step(params, state, make_grads(params, i), dynamic)
  assert len(traces) == 1
  jax.block_until_ready(params)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


def test_extra_args_are_forwarded_to_inner():
  """galore_projection forwards extra kwargs to an inner transform that uses them."""
  seen = []

  def scale_by_extra():
    def init_fn(params):
      del params
      return optax.EmptyState()

    def update_fn(updates, state, params=None, *, factor, **unused):
      seen.append(set(unused))
      return jax.tree.map(lambda u: u * factor, updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

  params = {"tall": jnp.ones((6, 3)), "bias": jnp.ones(3)}
  grads = {"tall": jnp.asarray(np.random.default_rng(0).standard_normal((6, 3)), jnp.float32),
           "bias": jnp.arange(3.0)}
  tx = gj.galore_projection(scale_by_extra(), rank=2, update_proj_gap=2, scale=1.0)
  state = tx.init(params)
  update = jax.jit(tx.update, static_argnames="other")
  up1, _ = update(grads, state, params, factor=1.0, other=3)
  up2, _ = update(grads, state, params, factor=2.0, other=3)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(2 * np.asarray(a), np.asarray(b),
                                              rtol=1e-6, atol=1e-7),
      up1, up2,
  )
  assert seen[-1] == {"other"}


# --------------------------------------------------------------------------------------------
# no zero-size leaves
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_no_zero_size_leaves(proj_type):
  params = make_params()
  tx = make_tx(proj_type)
  state = tx.init(params)
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    assert np.size(leaf) > 0, f"zero-size leaf at {jax.tree_util.keystr(path)}"
  # After an update: shapes via eval_shape (traces, no compile; the compiled avals are
  # checked equal to init's in test_state_avals_stable_*).
  state = jax.eval_shape(tx.update, make_grads(params, 0), state, params)[1]
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    assert np.size(leaf) > 0, f"zero-size leaf at {jax.tree_util.keystr(path)}"


def test_no_zero_size_leaves_when_nothing_is_projected():
  params = {"bias": jnp.zeros(5), "scale": jnp.ones(3)}
  tx = gj.galore_adamw(1e-2, rank=2)
  with pytest.warns(UserWarning, match="no leaf is projected"):
    state = tx.init(params)
  assert all(isinstance(b, optax.MaskedNode) for b in galore_state(state).bases)
  for leaf in jax.tree.leaves(state):
    assert np.size(leaf) > 0
  state2 = jax.eval_shape(tx.update, params, state, params)[1]
  assert avals(state2) == avals(state)


def test_state_with_rng_key():
  """``key`` (an int seed or a typed key) is stored as a typed PRNG key; the state stays
  jit-stable and has no zero-size leaves."""
  params = make_params()
  for key in (0, jax.random.key(3)):
    tx = make_tx("std", key=key)
    update = jax.jit(tx.update)
    state = tx.init(params)
    rng_key = galore_state(state).rng_key
    assert jnp.issubdtype(rng_key.dtype, jax.dtypes.prng_key)
    assert avals(jax.eval_shape(tx.init, abstract(params))) == avals(state)
    _, state2 = update(make_grads(params, 0), state, params)
    assert avals(state2) == avals(state)
    for leaf in jax.tree.leaves(state2):
      assert np.size(leaf) > 0


# --------------------------------------------------------------------------------------------
# Orbax save / restore against an abstract target, exact resume
# --------------------------------------------------------------------------------------------


def _check_same_types(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  ga, gb = galore_state(a), galore_state(b)
  assert type(ga) is type(gb) is gj.GaLoreProjectionState
  assert type(ga.inner_state) is type(gb.inner_state) is optax.ScaleByAdamState
  assert isinstance(gb.bases, tuple)
  for x, y in zip(ga.bases, gb.bases):
    assert type(x) is type(y)
    assert isinstance(y, (optax.MaskedNode, gj.Bases))
    if isinstance(y, gj.Bases):
      assert (x.left is None) == (y.left is None)
      assert (x.right is None) == (y.right is None)
  assert avals(a) == avals(b)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def run_steps(update, params, state, steps):
  """Steps with gradients 0.5 * params + noise (so the trajectory depends on the params)."""
  for t in steps:
    grads = jax.tree.map(lambda p, n: 0.5 * p + n, params, make_grads(params, t))
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize(
    "proj_type,dtype,key",
    [("std", jnp.float32, None), ("full", jnp.float32, None), ("std", jnp.bfloat16, None),
     ("std", jnp.float32, 0)],
    ids=["std-f32", "full-f32", "std-bf16", "std-f32-key"],
)
def test_orbax_roundtrip_and_exact_resume(tmp_path, proj_type, dtype, key):
  params0 = make_params(dtype)
  kw = {} if key is None else {"key": key}
  tx, update = cached_tx(proj_type, **kw)
  k, total = 4, 8  # refreshes at 0, 3 (before the save) and 6 (after the restore)

  # Uninterrupted run.
  want_params, want_state = run_steps(update, params0, tx.init(params0), range(total))

  # Interrupted run: k steps, save, restore against an abstract target, continue.
  params_k, state_k = run_steps(update, params0, tx.init(params0), range(k))
  ckpt = ocp.StandardCheckpointer()
  path = tmp_path / "ckpt"
  ckpt.save(path, {"params": params_k, "opt_state": state_k})
  ckpt.wait_until_finished()

  target = {
      "params": abstract(params0),
      "opt_state": jax.eval_shape(tx.init, abstract(params0)),
  }
  restored = ckpt.restore(path, target)
  ckpt.close()

  _check_same_types(state_k, restored["opt_state"])
  assert_trees_equal(state_k, restored["opt_state"])
  assert_trees_equal(params_k, restored["params"])

  got_params, got_state = run_steps(update, restored["params"], restored["opt_state"],
                                    range(k, total))
  jax.tree.map(
      lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
      got_params, want_params,
  )
  assert_trees_equal(got_state, want_state)
  assert int(galore_state(got_state).count) == total
  refreshes = [int(b.refreshes) for b in galore_state(got_state).bases
               if isinstance(b, gj.Bases)]
  assert refreshes and all(r == 3 for r in refreshes)


def test_orbax_checkpoint_manager(tmp_path):
  """The CheckpointManager / StandardSave / StandardRestore path gives the same state."""
  params = make_params()
  tx, update = cached_tx("reverse_std")
  _, state = run_steps(update, params, tx.init(params), range(2))
  with ocp.CheckpointManager(tmp_path / "mgr") as mngr:
    mngr.save(2, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()
    restored = mngr.restore(
        2, args=ocp.args.StandardRestore(jax.eval_shape(tx.init, abstract(params)))
    )
  _check_same_types(state, restored)
  assert_trees_equal(state, restored)


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "proj_type,dtype,extra",
    [
        ("std", jnp.float32, {}),
        ("std", jnp.bfloat16, {}),
        ("full", jnp.bfloat16, {}),
        ("std", jnp.bfloat16, {"basis_dtype": jnp.float32}),
        ("std", jnp.bfloat16, {"mu_dtype": jnp.float32}),
        ("std", jnp.float16, {}),
    ],
    ids=["std-f32", "std-bf16", "full-bf16", "std-bf16-f32-basis", "std-bf16-f32-mu",
         "std-f16"],
)
def test_updates_keep_param_dtype_and_state_dtypes_are_stable(proj_type, dtype, extra):
  params = make_params(dtype)
  tx, update = cached_tx(proj_type, **extra)
  state = tx.init(params)
  want = avals(state)

  bases = [b for b in galore_state(state).bases if isinstance(b, gj.Bases)]
  basis_dtype = extra.get("basis_dtype", dtype)
  for b in bases:
    for arr in (b.left, b.right):
      if arr is not None:
        assert arr.dtype == basis_dtype

  # Projected leaves come back in the param dtype.  A leaf that is not projected gets the
  # inner Adam's update as is, i.e. the dtype plain optax.adamw gives it (float32 for bf16
  # params with mu_dtype=float32; optax.apply_updates casts back).
  ref = optax.adamw(1e-2, mu_dtype=extra.get("mu_dtype"))
  ref_updates = jax.eval_shape(ref.update, params, ref.init(params), params)
  projected = [isinstance(b, gj.Bases) for b in galore_state(state).bases]

  for step in range(GAP + 2):
    updates, state = update(make_grads(params, step), state, params)
    for u, p, r, proj in zip(
        jax.tree.leaves(updates), jax.tree.leaves(params), jax.tree.leaves(ref_updates),
        projected,
    ):
      assert u.dtype == (p.dtype if proj else r.dtype)
    params = optax.apply_updates(params, updates)
    for p in jax.tree.leaves(params):
      assert p.dtype == dtype
    assert avals(state) == want, f"state avals changed at step {step}"
  assert all(bool(jnp.all(jnp.isfinite(p.astype(jnp.float32)))) for p in jax.tree.leaves(params))


def test_a_state_saved_before_residual_norms_restores_with_partial_restore(tmp_path):
  """``GaLoreProjectionState.residual_norms`` (None unless Fira) came with Fira (issue 19):
  a raw-optax checkpoint of the 5-field state is refused by a strict restore (a tree
  mismatch, no leaf differs) and reads back exactly with ``partial_restore=True``, as the
  README says. (Under ``nnx.Optimizer`` a None field is not in the state at all.)"""
  old_fields = [f for f in gj.GaLoreProjectionState._fields if f != "residual_norms"]
  Old = collections.namedtuple("GaLoreProjectionState", old_fields)
  params = make_params()
  tx, update = cached_tx("std")
  _, state = run_steps(update, params, tx.init(params), range(2))
  to_old = lambda s: Old(*(getattr(s, f) for f in old_fields))
  old = jax.tree.map(lambda s: to_old(s) if isinstance(s, gj.GaLoreProjectionState) else s,
                     state, is_leaf=lambda s: isinstance(s, gj.GaLoreProjectionState))
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "old", old)
  ckpt.wait_until_finished()
  target = jax.eval_shape(tx.init, abstract(params))
  with pytest.raises(ValueError, match="tree structures do not match"):
    ckpt.restore(tmp_path / "old", target)
  restored = ocp.PyTreeCheckpointer().restore(tmp_path / "old", args=ocp.args.PyTreeRestore(
      target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))
  ckpt.close()
  _check_same_types(state, restored)
  assert_trees_equal(state, restored)


def test_nnx_optimizer_state_has_no_none_fields():
  """Why the example's checkpoints did not change with ``residual_norms``: ``nnx.state``
  keeps only the fields that hold arrays."""
  from flax import nnx

  class One(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones((6, 4)))

  opt = nnx.Optimizer(One(), gj.galore_adamw(1e-2, rank=2), wrt=nnx.Param)
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(opt))]
  assert any("bases" in n for n in names)
  assert not any(f in n for n in names for f in ("residual_norms", "refresh_state", "rng_key"))

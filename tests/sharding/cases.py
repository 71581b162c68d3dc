"""Sharding checks that need 8 CPU devices, run in a fresh process by test_sharding.py.

``python tests/sharding/cases.py [name ...]`` prints one JSON line per case:
``{"case": name, "ok": bool, "error": traceback or null}``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import galore_jax as gj
from galore_jax import leaves as leaves_lib
from galore_jax import plans as plans_lib

CASES = {}
RANK = 4
STEPS = 3  # with update_proj_gap=2: refreshes at steps 0 and 2
MODES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}


def case(fn):
  CASES[fn.__name__] = fn
  return fn


def mesh_2x4(mode="auto", names=("fsdp", "tensor")):
  return jax.make_mesh((2, 4), names, axis_types=(MODES[mode],) * 2)


SPECS = {  # (shape, spec): a scanned (L, in, out) kernel, a plain matrix, a vector
    "k": ((4, 16, 32), P(None, "fsdp", "tensor")),
    "w": ((64, 32), P("fsdp", "tensor")),
    "b": ((32,), P("tensor")),
}
# w: (in, out) taken as the matrix (m=64, n=32) as given
DIMS = {"k": gj.DimensionNumbers(1, 2), "w": gj.DimensionNumbers(1, 0), "b": None}


def make_tx(**kw):
  kw.setdefault("update_proj_gap", 2)
  return gj.galore_adamw(
      1e-2, rank=RANK, weight_decay=0.1,
      mask={"k": True, "w": True, "b": False}, dimension_numbers=DIMS, **kw)


def values(seed=0):
  keys = jax.random.split(jax.random.key(seed), len(SPECS))
  return {
      name: jax.random.normal(k, shape)
      for k, (name, (shape, _)) in zip(keys, sorted(SPECS.items()))
  }


def put(tree, mesh):
  return {k: jax.device_put(v, NamedSharding(mesh, SPECS[k][1])) for k, v in tree.items()}


def grads_at(step):
  return values(100 + step)


def specs(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def same_shardings(a, b, where):
  """Equivalent shardings leaf by leaf (``P('x')`` and ``P('x', None)`` are the same)."""
  la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves(b)
  assert len(la) == len(lb), where
  for (path, x), y in zip(la, lb):
    sx = x if isinstance(x, jax.sharding.Sharding) else x.sharding
    sy = y if isinstance(y, jax.sharding.Sharding) else y.sharding
    at = jax.tree_util.keystr(path)
    assert sx.is_equivalent_to(sy, len(x.shape) if hasattr(x, "shape") else 0) or (
        _padded(sx.spec) == _padded(sy.spec)), f"{where} at {at}: {sx} != {sy}"


def _padded(spec, n=8):
  """A spec with trailing ``None`` s up to ``n`` entries: only trailing ones are dropped."""
  return tuple(spec) + (None,) * (n - len(spec))


def run_steps(tx, params, steps, jit=True, out_shardings=None):
  state = tx.init(params)
  update = tx.update
  if jit:
    update = jax.jit(tx.update, out_shardings=out_shardings)
  history = []
  for t in range(steps):
    updates, state = update(grads_at(t) if not _on_mesh(params) else
                            put(grads_at(t), _mesh_of(params)), state, params)
    params = optax.apply_updates(params, updates)
    history.append((updates, state))
  return params, state, history


def _on_mesh(params):
  return isinstance(params["w"].sharding, NamedSharding)


def _mesh_of(params):
  return params["w"].sharding.mesh


def close(a, b, tol, where):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys: compare their data
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol, err_msg=where)


@case
def rules():
  """state_shardings follows the rules for both axis types; eager init agrees."""
  for mode in MODES:
    mesh = mesh_2x4(mode)
    with jax.set_mesh(mesh):
      params = put(values(), mesh)
      tx = make_tx()
      sh = gj.sharding.state_shardings(tx, params)
      g = sh[0]
      # k: (L, in@fsdp, out@tensor) viewed (L, m=out, n=in): std -> m=32 >= n=16, right
      # basis (L, n, r) on fsdp; coefficients (L, m, r) on tensor, then the fsdp axis the
      # projected n frees (32 divides over 4 x 2).
      assert tuple(g.bases[1].right.spec) == (None, "fsdp", None), g.bases[1].right
      mu_k = g.inner_state.mu["k"]
      assert tuple(mu_k.spec) == (None, ("tensor", "fsdp"), None), mu_k
      # w: (64@fsdp, 32@tensor): right basis (32@tensor, r), moments (64@(fsdp, tensor), r)
      assert tuple(g.bases[2].right.spec) == ("tensor", None), g.bases[2].right
      mu_w = g.inner_state.mu["w"]
      assert tuple(mu_w.spec) == (("fsdp", "tensor"), None), mu_w
      assert tuple(g.inner_state.nu["b"].spec) == ("tensor",), g.inner_state.nu["b"]
      assert tuple(g.count.spec) == (), g.count
      assert all(s.mesh == mesh for s in jax.tree.leaves(sh))
      # no rank axis is ever sharded
      for b in (g.bases[1].right, g.bases[2].right):
        assert tuple(b.spec)[-1] is None
      # eager init on sharded params creates exactly these shardings
      same_shardings(tx.init(params), sh, f"eager init ({mode})")
      # abstract_state: shapes of init, shardings of state_shardings
      target = gj.sharding.abstract_state(tx, params)
      assert jax.tree.map(lambda s: s.shape, target) == jax.tree.map(
          jnp.shape, jax.eval_shape(tx.init, params))
      same_shardings(target, sh, "abstract_state")
      # counts and keys live on the mesh too (a multi-host jit needs one mesh)
      state = make_tx(method="randomized", key=3).init(params)
      for leaf in jax.tree.leaves(state[0]):
        assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh, leaf


@case
def rules_ldadam_and_full():
  """LDAdam's state and proj_type='full' follow the same rules."""
  mesh = mesh_2x4()
  with jax.set_mesh(mesh):
    params = put(values(), mesh)
    tx = gj.ldadamw(1e-2, rank=RANK, mask={"k": True, "w": True, "b": False},
                    dimension_numbers=DIMS)
    st = gj.sharding.state_shardings(tx, params)[0]
    w_basis = st.bases[2]
    assert tuple((w_basis.left if w_basis.left is not None else w_basis.right).spec)[-1] is None
    assert tuple(st.error[2].spec) == ("fsdp", "tensor"), st.error[2]
    tx = make_tx(proj_type="full")
    g = gj.sharding.state_shardings(tx, params)[0]
    assert tuple(g.bases[2].left.spec) == ("fsdp", None)
    assert tuple(g.bases[2].right.spec) == ("tensor", None)
    assert tuple(g.inner_state.mu["w"].spec) in ((None, None), ())


def _agree(mode, method, **kw):
  mesh = mesh_2x4(mode)
  tx = make_tx(method=method, **kw)
  ref_params, _, ref_hist = run_steps(tx, values(), STEPS)  # one device, no mesh
  with jax.set_mesh(mesh):
    params = put(values(), mesh)
    sh = gj.sharding.state_shardings(tx, params)
    out = None if mode == "explicit" else sh
    p_jit, _, hist = run_steps(tx, params, STEPS, out_shardings=(None, out) if out else None)
    for t, (_, state) in enumerate(hist):  # avals and shardings stable across updates
      same_shardings(state, sh, f"state after update {t} ({mode}, {method})")
      assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == jax.tree.map(
          lambda x: (x.shape, x.dtype), tx.init(params))
    p_eager, _, _ = run_steps(tx, params, STEPS, jit=False)
  close(p_jit, p_eager, 1e-5, f"jit vs eager ({mode}, {method})")
  # Every matrix draws from its own key, so the randomized methods (and power's cold
  # start) give one device's bases.
  tol = 2e-4
  close(p_jit, ref_params, tol, f"mesh vs one device ({mode}, {method})")


@case
def agree_auto_svd():
  _agree("auto", "svd")


@case
def agree_explicit_svd():
  _agree("explicit", "svd")


@case
def agree_auto_randomized():
  _agree("auto", "randomized")


@case
def agree_explicit_random():
  _agree("explicit", "random")


@case
def agree_explicit_power_staggered_transport():
  _agree("explicit", "power", refresh=gj.staggered(2), on_refresh="transport")


@case
def agree_auto_lazy_reset():
  _agree("auto", "gram_eigh", refresh=gj.lazy(2, threshold=0.5), on_refresh="reset")


def _same_shaped_steps(tx, layouts, steps, mesh=None):
  """``steps`` jitted updates of ``tx`` on same-shaped (64, 32) leaves, one per name of
  ``layouts`` (laid out by its spec on ``mesh``, or on one device); the params and state."""
  start = {n: jax.random.normal(jax.random.key(i), (64, 32)) for i, n in enumerate(layouts)}
  put = lambda t: t if mesh is None else {
      n: jax.device_put(x, NamedSharding(mesh, layouts[n])) for n, x in t.items()}
  params, update = put(start), jax.jit(tx.update)
  state = tx.init(params)
  for t in range(steps):
    g = {n: jax.random.normal(jax.random.key(10 * t + i), (64, 32))
         for i, n in enumerate(layouts)}
    updates, state = update(put(g), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@case
def per_leaf_policies_share_stacks():
  """staggered and lazy refresh a leaf when it is due; on a mesh, same-shaped leaves share a
  stack of at most one matrix per device (a stack costs one matrix's time, as one leaf on
  every device did), so 8 such leaves on 8 devices make one SVD call site, not 8; a stack
  whose leaves are not all due keeps the others' bases: the same steps as one device's."""
  layouts = {"q": P("fsdp", "tensor"), "o": P("tensor", "fsdp"), "v": P("fsdp", None)}
  for policy in (gj.staggered(2), gj.lazy(2, threshold=0.5, window=1)):
    tx = gj.galore_adamw(1e-2, rank=RANK, refresh=policy, method="svd",
                         mask={n: True for n in layouts})
    ref, state = _same_shaped_steps(tx, layouts, 5)
    counts = [int(b.refreshes) for b in state[0].bases]  # per leaf
    for mode in MODES:
      with jax.set_mesh(mesh_2x4(mode)):
        got, state = _same_shaped_steps(tx, layouts, 5, mesh_2x4(mode))
      close(got, ref, 2e-4, f"{policy}, {mode}")
      assert [int(b.refreshes) for b in state[0].bases] == counts, (policy, mode)
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
  with jax.set_mesh(mesh):
    params = {f"w{i}": jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, P("fsdp")))
              for i in range(8)}
    tx = gj.galore_adamw(1e-3, rank=4, refresh=gj.staggered(2),
                         mask=lambda p: jax.tree.map(lambda _: True, p))
    hlo = jax.jit(tx.update).lower(params, tx.init(params), params).compile().as_text()
  calls = [l for l in hlo.splitlines() if "gesdd" in l or "gesvd" in l]
  assert len(calls) == 1 and "f32[1,64,32]" in calls[0], len(calls)


@case
def ldadam_agrees():
  """LDAdam on a mesh (both axis types) matches one device."""
  tx = gj.ldadamw(1e-2, rank=RANK, mask={"k": True, "w": True, "b": False},
                  dimension_numbers=DIMS)
  ref, _, _ = run_steps(tx, values(), 3)
  for mode in MODES:
    mesh = mesh_2x4(mode)
    with jax.set_mesh(mesh):
      params = put(values(), mesh)
      got, state, _ = run_steps(tx, params, 3)
      same_shardings(state, gj.sharding.state_shardings(tx, params), f"ldadam {mode}")
    close(got, ref, 2e-4, f"ldadam {mode}")
  # Two same-shaped matrices laid out differently: one stack on the mesh (its SVD and power
  # steps spread), the same steps as one device's.
  layouts = {"q": P("fsdp", "tensor"), "o": P("tensor", "fsdp")}
  tx = gj.ldadamw(1e-2, rank=RANK, mask={"q": True, "o": True})
  ref, _ = _same_shaped_steps(tx, layouts, 3)
  for mode in MODES:
    with jax.set_mesh(mesh_2x4(mode)):
      got, _ = _same_shaped_steps(tx, layouts, 3, mesh_2x4(mode))
    close(got, ref, 2e-4, f"ldadam one stack, {mode}")


@case
def adafactor_agrees():
  """galore_adafactor's row and column statistics follow its coefficients' sharding; on a
  mesh (both axis types) it matches one device."""
  tx = gj.galore_adafactor(1e-2, rank=RANK, b1=0.9, weight_decay=0.1, update_proj_gap=2,
                           on_refresh="reset", mask={"k": True, "w": True, "b": False},
                           dimension_numbers=DIMS)
  ref, _, _ = run_steps(tx, values(), STEPS)
  for mode in MODES:
    mesh = mesh_2x4(mode)
    with jax.set_mesh(mesh):
      params = put(values(), mesh)
      sh = gj.sharding.state_shardings(tx, params)
      rms = sh[0].inner_state[0]
      # coefficients: w (64@(fsdp, tensor), r), k (L, 32@(tensor, fsdp), r) (each takes
      # over the mesh axis of its projected side); the rank axis is replicated
      assert _padded(rms.v_row["w"].spec) == _padded(P(("fsdp", "tensor"))), rms.v_row["w"]
      k_row = rms.v_row["k"]
      assert _padded(k_row.spec) == _padded(P(None, ("tensor", "fsdp"))), k_row
      assert _padded(rms.v_col["w"].spec) == _padded(P()), rms.v_col["w"]
      assert _padded(rms.v_row["b"].spec) == _padded(P("tensor")), rms.v_row["b"]
      got, state, _ = run_steps(tx, params, STEPS)
      same_shardings(state, sh, f"adafactor {mode}")
      # Eager init too (before, Auto axes replicated the factored statistics), for the
      # plain transform as well.
      same_shardings(tx.init(params), sh, f"adafactor init {mode}")
      plain = gj.scale_by_adafactor()
      same_shardings(plain.init(params), gj.sharding.state_shardings(plain, params),
                     f"scale_by_adafactor init {mode}")
    close(got, ref, 2e-4, f"adafactor {mode}")


@case
def refresh_is_spread():
  """Each of 8 devices factorises 1 of the 8 stacked matrices (no redundant SVD)."""
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
  with jax.set_mesh(mesh):
    params = {"k": jax.device_put(jnp.ones((8, 64, 32)), NamedSharding(mesh, P(None, "fsdp")))}
    tx = gj.galore_adamw(1e-3, rank=RANK, mask={"k": True},
                         dimension_numbers={"k": gj.DimensionNumbers(1, 2)})
    hlo = jax.jit(tx.update).lower(params, tx.init(params), params).compile().as_text()
  calls = [l for l in hlo.splitlines() if "gesdd" in l or "gesvd" in l]
  assert calls, "no SVD call found"
  for line in calls:
    operand = line.split("operand_layout_constraints={")[1]
    assert operand.startswith("f32[1,"), line[:300]
  # Matrices sharded on both axes (FSDP x tensor) reach the stack-sharded layout by
  # all-to-alls, one mesh axis at a time: nothing as large as the stack is gathered.
  for mode in MODES:
    mesh = mesh_2x4(mode)
    with jax.set_mesh(mesh):
      params = {"k": jax.device_put(jnp.ones((8, 64, 32)),
                                    NamedSharding(mesh, P(None, "fsdp", "tensor")))}
      hlo = jax.jit(tx.update).lower(params, tx.init(params), params).compile().as_text()
    gathered = _largest_gather(hlo)
    assert "all-to-all" in hlo and gathered < 8 * 64 * 32 // 4, (mode, gathered)
  # Same-shaped leaves laid out differently (a LLaMA's q and o kernels: embed on fsdp,
  # heads on tensor, and the other way round), and a stack already sharded along its
  # layer axis: only bases-sized arrays are gathered, never a stack of gradients.
  dims = gj.DimensionNumbers(1, 2)
  # A matrix axis sharded over both mesh axes (FSDP over every device) as well.
  layouts = [("auto", (2, 4), {"q": P(None, "fsdp", "tensor"), "o": P(None, "tensor", "fsdp")}),
             ("explicit", (2, 4), {"q": P(None, "fsdp", "tensor"), "o": P(None, "tensor", "fsdp")}),
             ("explicit", (8,), {"k": P("fsdp")}),
             # several such stacks (a LLaMA's q, k, v): each spreads alone, as under Auto
             *((mode, (8,), {"k": P("fsdp"), "v": P("fsdp")}) for mode in MODES),
             *((mode, (2, 4), {"w": P(None, ("fsdp", "tensor"))}) for mode in MODES)]
  for mode, shape, specs in layouts:
    mesh = jax.make_mesh(shape, ("fsdp", "tensor")[:len(shape)],
                         axis_types=(MODES[mode],) * len(shape))
    with jax.set_mesh(mesh):
      params = {k: jax.device_put(jnp.ones((8, 64, 64)), NamedSharding(mesh, spec))
                for k, spec in specs.items()}
      tx = gj.galore_adamw(1e-3, rank=8, mask={k: True for k in specs}, dimension_numbers=dims)
      hlo = jax.jit(tx.update).lower(params, tx.init(params), params).compile().as_text()
    bases = len(specs) * 8 * 64 * 8
    assert _largest_gather(hlo) <= bases, (mode, specs, _largest_gather(hlo), bases)
  # 6 layers on 8 devices: the stack is padded with 2 copies of a matrix; padding a stack
  # sharded along its layer axis by a concatenation replicated it (Auto axes).
  for mode in MODES:
    mesh = mesh_2x4(mode)
    with jax.set_mesh(mesh):
      params = {"k": jax.device_put(jnp.ones((6, 64, 32)), NamedSharding(mesh, P("fsdp")))}
      tx = gj.galore_adamw(1e-3, rank=4, mask={"k": True}, dimension_numbers=dims)
      hlo = jax.jit(tx.update).lower(params, tx.init(params), params).compile().as_text()
    assert _largest_gather(hlo) <= 8 * 32 * 4, (mode, _largest_gather(hlo))
  # LDAdam's step-0 SVD of 8 same-shaped matrices: one per device, as galore's refresh (it
  # refreshed each leaf as a stack of its own: every device factorized all 8).
  for mode in MODES:
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(MODES[mode],))
    with jax.set_mesh(mesh):
      params = {f"w{i}": jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, P("fsdp")))
                for i in range(8)}
      tx = gj.ldadamw(1e-3, rank=4, mask=lambda p: jax.tree.map(lambda _: True, p))
      hlo = jax.jit(tx.update).lower(params, tx.init(params), params).compile().as_text()
    calls = [l for l in hlo.splitlines() if "gesdd" in l or "gesvd" in l]
    assert len(calls) == 1 and "f32[1,64,32]" in calls[0], (mode, len(calls))


@case
def refresh_keeps_bases_sharded():
  """A refresh's new bases go from the stack-sharded layout of the spread to their state
  sharding without a whole copy on any device (Explicit axes): the largest all-gather of the
  refresh alone (jitted with the state's shardings out) is at most one device's share of the
  bases (of the padded stack where 6 layers are padded to 8), and the bases are those of one
  device.  The spread gathered the whole stack of bases on every device (1024 elements
  here) before resharding them.  Under Auto axes too where the bases are sharded on a matrix
  axis (it gathered the whole stack there as well); along a layer axis they still go
  through a whole copy (_spread._unpadded says why), and no more than that."""
  dims = {"k": gj.DimensionNumbers(1, 2)}
  layouts = [((8,), (8, 64, 32), P("fsdp"), MODES),  # layer-sharded: basis P('fsdp')
             ((8,), (8, 64, 32), P(None, None, "fsdp"), MODES),  # rows: (None, 'fsdp')
             ((2, 4), (8, 64, 32), P(None, None, ("fsdp", "tensor")), MODES),
             ((2, 4), (8, 64, 32), P(None, "tensor", "fsdp"), MODES),  # (None, 'fsdp')
             ((2, 4), (8, 64, 32), P(None, "fsdp", "tensor"), MODES),  # (None, 'tensor')
             ((2, 4), (8, 32, 64), P(None, "tensor", "fsdp"), MODES),  # right basis: tensor
             ((2, 4), (6, 64, 32), P("fsdp"), MODES),  # padded: ('fsdp',), 4 of 8 layers
             # a layer and a matrix axis: Auto axes gather a quarter of the gradients
             ((2, 4), (8, 64, 32), P("fsdp", None, "tensor"), ("explicit",))]
  for mesh_shape, shape, spec, modes in layouts:
    g = {"k": jax.random.normal(jax.random.key(3), shape)}
    lp = plans_lib.leaf_plans(g, None, dims, RANK, "std")
    tx = gj.galore_adamw(1e-3, rank=RANK, dimension_numbers=dims)

    def refresh(bases, g):
      return leaves_lib.refresh_bases(gj.every(1), gj.subspace.SVD(), jnp.int32(0), None, None,
                                      bases, jax.tree.leaves(g), lp, host_due=True)[0]

    want = jax.jit(refresh)(tx.init(g)[0].bases, g)
    for mode in modes:
      names = ("fsdp", "tensor")[:len(mesh_shape)]
      mesh = jax.make_mesh(mesh_shape, names, axis_types=(MODES[mode],) * len(names))
      with jax.set_mesh(mesh):
        gs = {"k": jax.device_put(g["k"], NamedSharding(mesh, spec))}
        bases = tx.init(gs)[0].bases
        out = jax.tree.map(lambda x: x.sharding, bases)
        step = jax.jit(refresh, out_shardings=out)
        hlo = step.lower(bases, gs).compile().as_text()
        got = step(bases, gs)
      basis = next(b for b in jax.tree.leaves(got) if b.ndim == 3)
      padded = -shape[0] % 8 + shape[0]  # the stack's length on 8 devices
      layered = mode == "auto" and tuple(spec)[0] is not None  # (a whole copy: see above)
      held = basis.size if layered else basis.addressable_shards[0].data.size
      bound = held * padded // shape[0]
      where = (mode, mesh_shape, shape, spec, basis.sharding.spec)
      assert _largest_gather(hlo) <= bound, (*where, _largest_gather(hlo), bound)
      same_shardings(got, out, f"bases {where}")
      for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # up to each column's sign
        np.testing.assert_allclose(np.abs(np.asarray(x)), np.abs(np.asarray(y)), atol=1e-4,
                                   err_msg=str(where))


@case
def update_inside_shard_map():
  """Data parallelism written by hand: ``update`` inside ``jax.shard_map`` (every mesh axis
  manual, or only the data axis of a 2x4 mesh; Auto and Explicit meshes), each device's
  gradients averaged with ``pmean``.  A manual axis has no devices to spread a refresh
  over: each device refreshes the data it holds, so every device keeps the same state, and
  the steps are one device's on the mean gradients."""
  txs = {
      "galore_adamw": gj.galore_adamw(1e-2, rank=RANK, update_proj_gap=2),
      "galore_adamw[random]": gj.galore_adamw(1e-2, rank=RANK, update_proj_gap=2,
                                              method="random"),
      "ldadamw": gj.ldadamw(1e-2, rank=RANK),
      "apollo_adamw[svd]": gj.apollo_adamw(1e-2, rank=RANK, update_proj_gap=2, proj="svd"),
  }
  params = {"w": values()["w"]}
  grads = [{"w": jax.random.normal(jax.random.key(t), (8, *params["w"].shape))}
           for t in range(3)]
  meshes = {f"{mode}, {'all' if axes is None else 'data'} manual": (mesh, axes)
            for mode in MODES for mesh, axes in (
                (jax.make_mesh((8,), ("data",), axis_types=(MODES[mode],)), None),
                (mesh_2x4(mode, ("data", "model")), {"data"}))}
  for name, tx in txs.items():
    ref, state = params, tx.init(params)
    for g in grads:
      u, state = jax.jit(tx.update)(jax.tree.map(lambda x: x.mean(0), g), state, ref)
      ref = optax.apply_updates(ref, u)
    for where, (mesh, axes) in meshes.items():

      def step(p, s, g):
        g = jax.tree.map(lambda x: jax.lax.pmean(x.mean(0), "data"), g)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

      kw = {} if axes is None else {"axis_names": axes}
      f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data")),
                                out_specs=(P(), P()), **kw))
      with jax.set_mesh(mesh):
        got = jax.device_put(params, NamedSharding(mesh, P()))
        state = tx.init(got)
        for g in grads:
          got, state = f(got, state, jax.device_put(g, NamedSharding(mesh, P("data"))))
      close(got, ref, 2e-5, f"{name}, {where}")
  # Gradients sharded over an axis left Explicit cannot be factorised whole: one line.
  mesh = mesh_2x4("explicit", ("data", "model"))
  tx = txs["galore_adamw"]
  f = jax.jit(jax.shard_map(lambda p, s, g: tx.update(g, s, p), mesh=mesh,
                            in_specs=(P(), P(), P()), out_specs=(P(), P()),
                            axis_names={"data"}))
  with jax.set_mesh(mesh):
    w = jax.device_put(params, NamedSharding(mesh, P(None, "model")))
    try:
      f(w, tx.init(w), w)
      raise AssertionError("no error for gradients sharded over an Explicit axis")
    except ValueError as e:
      assert re.fullmatch(r"galore_jax: inside jax.shard_map, the refresh needs gradients"
                          r" that are whole on each device; these are sharded as"
                          r" P\(None, 'model'\) over .*\.", str(e)), e


def _largest_gather(hlo: str) -> int:
  """Elements of the largest f32 all-gather in compiled HLO text (0 if none)."""
  sizes = [math.prod(int(d) for d in shape.split(",") if d)
           for shape in re.findall(r"= f32\[([0-9,]*)\][^ ]* all-gather", hlo)]
  return max(sizes, default=0)


def _three_steps(tx, params, grads):
  state = tx.init(params)
  for _ in range(3):
    u, state = jax.jit(tx.update)(grads, state, params)
    params = optax.apply_updates(params, u)
  return params


@case
def same_shaped_leaves_share_a_stack():
  """Two leaves of one shape refresh as one stack over 8 devices (a matrix each).
  Each matrix draws from its own key, not its stack's, so the random methods
  give one device's bases exactly."""
  shape, names = (4, 32, 16), ("a", "b")
  params = {n: jax.random.normal(jax.random.key(i), shape) for i, n in enumerate(names)}
  grads = {n: jax.random.normal(jax.random.key(9 + i), shape) for i, n in enumerate(names)}
  for method in ("randomized", "random"):
    tx = gj.galore_adamw(1e-2, rank=RANK, mask={n: True for n in names},
                         dimension_numbers={n: gj.DimensionNumbers(1, 2) for n in names},
                         update_proj_gap=1, method=method)
    want = _three_steps(tx, params, grads)
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
    with jax.set_mesh(mesh):
      put8 = lambda t: {n: jax.device_put(x, NamedSharding(mesh, P(None, "fsdp")))
                        for n, x in t.items()}
      got = _three_steps(tx, put8(params), put8(grads))
    close(got, want, 2e-4, f"{method}: mesh vs one device")


@case
def several_matrices_per_device():
  """12 stacked matrices on 8 devices (in passes of one matrix per device,
  :func:`refresh_in_passes_of_any_stack`; spread whole, 2 per device after padding): every
  factorization call takes one matrix (CPU), the refresh agrees with one device, and never
  hangs (batched LAPACK calls on several CPU devices at once can deadlock)."""
  stack = jax.random.normal(jax.random.key(7), (12, 32, 16))
  grads = jax.random.normal(jax.random.key(8), (12, 32, 16))
  dims = {"k": gj.DimensionNumbers(1, 2)}
  for method in ("svd", "power", "gram_eigh", "randomized", "random"):
    _agrees_on_8(method, stack, grads, dims, check_calls=method == "svd")


@case
def refresh_in_passes():
  """16 stacked matrices on 8 devices: the refresh runs in 2 passes of one matrix per device
  (pass ``j`` takes matrices ``2 i + j``, :func:`galore_jax.leaves.spread_in_passes`) and
  agrees with one device: each matrix keeps its own key and warm start."""
  stack = jax.random.normal(jax.random.key(7), (16, 32, 16))
  grads = jax.random.normal(jax.random.key(8), (16, 32, 16))
  for method in ("power", "randomized"):
    _agrees_on_8(method, stack, grads, {"k": gj.DimensionNumbers(1, 2)}, check_calls=False)


@case
def refresh_in_passes_of_any_stack():
  """12 and 20 stacked matrices on 8 devices, which 8 does not divide: the refresh runs in
  passes of one matrix per device too (the stack's 4 runs give 2 matrices each; 20: three
  passes, the last repeating one matrix of each run), where it spread the stack whole, padded
  to 16 (24), 2 (3) whole matrices per device at once.  No device of the compiled refresh
  step holds more than one whole matrix, both axis types; 20 agrees with one device."""
  d, e = 32, 16
  for size in (12, 20):
    stack = jax.random.normal(jax.random.key(7), (size, d, e))
    grads = jax.random.normal(jax.random.key(8), (size, d, e))
    tx = gj.galore_adamw(1e-2, rank=RANK, mask={"k": True}, update_proj_gap=1,
                         dimension_numbers={"k": gj.DimensionNumbers(1, 2)}, method="power")
    for mode in MODES:
      mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(MODES[mode],))
      with jax.set_mesh(mesh):
        params = {"k": jax.device_put(stack, NamedSharding(mesh, P(None, "fsdp")))}
        hlo = jax.jit(tx.update).lower(params, tx.init(params), params).compile().as_text()
      whole = [math.prod(int(n) for n in lead.split(",") if n) for lead in
               re.findall(rf"f32\[([0-9,]*?),?(?:{d},{e}|{e},{d})\]", hlo)]
      assert whole and max(whole) == 1, (size, mode, sorted(set(whole)))
  _agrees_on_8("power", stack, grads, {"k": gj.DimensionNumbers(1, 2)}, check_calls=False)


def _agrees_on_8(method, stack, grads, dims, check_calls):
  """Three GaLore steps of a stack, FSDP over 8 devices on both axis types, agree with one
  device; with ``check_calls``, every SVD call takes one matrix."""
  tx = gj.galore_adamw(1e-2, rank=RANK, mask={"k": True}, dimension_numbers=dims,
                       update_proj_gap=1, method=method)
  want = _three_steps(tx, {"k": stack}, {"k": grads})
  for mode in MODES:
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(MODES[mode],))
    with jax.set_mesh(mesh):
      put8 = lambda x: jax.device_put(x, NamedSharding(mesh, P(None, "fsdp")))
      got = _three_steps(tx, {"k": put8(stack)}, {"k": put8(grads)})
      if check_calls:
        params = {"k": put8(stack)}
        hlo = jax.jit(tx.update).lower(params, tx.init(params), params).compile().as_text()
        calls = [l for l in hlo.splitlines() if "gesdd" in l or "gesvd" in l]
        assert calls and all(
            l.split("operand_layout_constraints={")[1].startswith("f32[1,") for l in calls)
    close(got, want, 2e-4, f"{method} {mode}")


@case
def nnx_optimizer():
  """nnx.Optimizer with sharding-annotated params: low-rank state gets low-rank
  specs (no IndivisibleError, rank replicated) under both axis types."""
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      part = nnx.with_partitioning
      self.lin = nnx.Linear(
          64, 30, rngs=rngs,  # 30: not divisible by the 4 tensor devices... on purpose
          kernel_init=part(nnx.initializers.lecun_normal(), ("fsdp", None)),
          bias_init=part(nnx.initializers.zeros, (None,)))
      self.out = nnx.Linear(
          30, 32, use_bias=False, rngs=rngs,
          kernel_init=part(nnx.initializers.lecun_normal(), (None, "tensor")))

    def __call__(self, x):
      return self.out(jax.nn.relu(self.lin(x)))

  for mode in MODES:
    with jax.set_mesh(mesh_2x4(mode)):
      eight_bit = dict(min_8bit_size=64, block_size=16)  # the 64 x 30 kernel's: 8-bit
      for tx in (gj.galore_adamw(1e-2, rank=3), gj.ldadamw(1e-2, rank=3),
                 gj.galore_adafactor(1e-2, rank=3, b1=0.9), gj.adamw_8bit(1e-2, **eight_bit),
                 gj.galore_adamw_8bit(1e-2, rank=3, **eight_bit)):
        # A model of its own per optimizer: trained by the ones before, the loss reached 0.
        model = Net(nnx.Rngs(0))
        opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
        state = nnx.state(opt, nnx.OptState)
        for leaf in jax.tree.leaves(state):
          if leaf.ndim == 2 and 3 in leaf.shape:  # low-rank: the rank axis is whole
            axis = leaf.shape.index(3)
            spec = tuple(leaf.sharding.spec) + (None,) * 2
            assert spec[axis] is None, (leaf.shape, leaf.sharding)

        @nnx.jit
        def step(model, opt, x):
          loss, g = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
          opt.update(model, g)
          return loss

        x = jnp.ones((16, 64))
        losses = [float(step(model, opt, x)) for _ in range(3)]
        assert losses[-1] < losses[0], losses
        after = nnx.state(opt, nnx.OptState)
        same_shardings(after, state, f"nnx {mode}")

        # The Flax recipe: state created under jit, sharded by its metadata, gets the
        # same shardings as eager init (bases and 8-bit absmax too: their metadata holds
        # their own spec; before, it had none, and Auto replicated them while Explicit
        # failed).
        @nnx.jit
        def create(tx=tx):
          opt = nnx.Optimizer(Net(nnx.Rngs(0)), tx, wrt=nnx.Param)
          s = nnx.state(opt)
          nnx.update(opt, jax.lax.with_sharding_constraint(s, nnx.get_partition_spec(s)))
          return opt

        eager = nnx.state(nnx.Optimizer(Net(nnx.Rngs(0)), tx, wrt=nnx.Param), nnx.OptState)
        same_shardings(nnx.state(create(), nnx.OptState), eager, f"nnx jit-created {mode}")


@case
def nd_kernels_under_explicit_axes():
  """Attention-shaped kernels whose merged axes are sharded in every pattern (only
  the minor axis, as a GQA k_proj's head_dim; both; the major one), and stacked experts
  ``(L, E, d, f)`` whose expert axis is sharded behind an unsharded layer axis, train
  under Explicit axes like on one device, their updates in the params' own sharding."""
  dims = {"k": gj.DimensionNumbers(0, (1, 2)), "o": gj.DimensionNumbers((0, 1), 2),
          "e": gj.DimensionNumbers(2, 3)}
  shapes = {"k": (32, 8, 4), "o": (8, 4, 32), "e": (2, 4, 16, 32)}  # e: (L, E, d, f)
  layouts = [{"k": P("fsdp", None, "tensor"), "o": P("tensor", "fsdp", None),
              "e": P(None, "tensor", "fsdp")},
             {"k": P(None, "fsdp", "tensor"), "o": P(None, "tensor", "fsdp"),
              "e": P("fsdp", "tensor")}]
  named = list(enumerate(shapes.items()))
  values0 = {n: jax.random.normal(jax.random.key(i), s) for i, (n, s) in named}
  grads = {n: jax.random.normal(jax.random.key(7 + i), s) for i, (n, s) in named}
  mesh = mesh_2x4("explicit")
  for make in (gj.galore_adamw, gj.ldadamw):
    tx = make(1e-2, rank=RANK, mask={n: True for n in shapes}, dimension_numbers=dims)
    want = _three_steps(tx, values0, grads)
    for specs in layouts:
      with jax.set_mesh(mesh):
        put = lambda t: {n: jax.device_put(x, NamedSharding(mesh, specs[n])) for n, x in t.items()}
        params = put(values0)
        got = _three_steps(tx, params, put(grads))
        for n in shapes:
          assert got[n].sharding.is_equivalent_to(params[n].sharding, 3), (n, got[n].sharding)
      close(got, want, 2e-4, f"{make.__name__} {specs}")


@case
def unsupported_meshes_are_clear_errors():
  """A mesh mixing Explicit and Auto axes, and Explicit-sharded gradients with no
  jax.set_mesh, get a ValueError that says what to do (not an XLA error)."""
  for tx in (gj.galore_adamw(1e-2, rank=RANK), gj.ldadamw(1e-2, rank=RANK)):
    mixed = jax.make_mesh((2, 4), ("data", "tensor"),
                          axis_types=(AxisType.Explicit, AxisType.Auto))
    with jax.set_mesh(mixed):
      w = {"w": jax.device_put(jnp.ones((64, 32)), NamedSharding(mixed, P(None, "tensor")))}
      try:
        jax.jit(tx.update)(w, tx.init(w), w)
        raise AssertionError("mixed axis types: no error")
      except ValueError as e:
        assert "mixes axis types" in str(e), e
    mesh = mesh_2x4("explicit")
    w = {"w": jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, P("fsdp", "tensor")))}
    try:
      jax.jit(tx.update)(w, tx.init(w), w)
      raise AssertionError("Explicit without set_mesh: no error")
    except ValueError as e:
      assert "jax.set_mesh" in str(e), e


def orbax_round_trip(state, target):
  """``state`` saved with Orbax and restored onto ``target`` (abstract arrays with
  shardings)."""
  import orbax.checkpoint as ocp

  with tempfile.TemporaryDirectory() as d:
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(f"{d}/state", state)
      ckpt.wait_until_finished()
      return ckpt.restore(f"{d}/state", target)


@case
def checkpoint_onto_another_mesh():
  """Orbax: a state saved on a 2x4 mesh restores onto an 8-device fsdp mesh with
  the target's shardings and the same values."""
  tx = make_tx()
  mesh_a = mesh_2x4()
  with jax.set_mesh(mesh_a):
    params = put(values(), mesh_a)
    _, state, _ = run_steps(tx, params, 3,
                            out_shardings=(None, gj.sharding.state_shardings(tx, params)))
  mesh_b = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
  specs_b = {"k": P(None, None, "fsdp"), "w": P("fsdp"), "b": P()}
  params_b = {k: jax.device_put(v, NamedSharding(mesh_b, specs_b[k]))
              for k, v in values().items()}
  target = gj.sharding.abstract_state(tx, params_b)
  restored = orbax_round_trip(state, target)
  same_shardings(restored, target, "restored")
  assert tuple(restored[0].bases[2].right.sharding.spec) == (None, None)  # w: (64@fsdp, 32)
  assert tuple(restored[0].inner_state.mu["w"].sharding.spec) == ("fsdp", None)
  close(restored, state, 0.0, "restored values")
  with jax.set_mesh(mesh_b):  # and training goes on there
    grads = {k: jax.device_put(v, NamedSharding(mesh_b, specs_b[k]))
             for k, v in grads_at(3).items()}
    jax.jit(tx.update)(grads, restored, params_b)


@case
def adam_8bit_on_a_mesh():
  """8-bit states (adamw_8bit, galore_adamw_8bit) on a 2x4 mesh, both axis types: codes
  and float32 moments take the param's (or the coefficients') sharding, an absmax the
  first axis's when its shards hold whole blocks (with batch_dims: the batch axes', then
  the blocks' of each slice); init, jitted steps (without out_shardings) and an Orbax round
  trip keep them, and the steps agree with one device."""
  txs = {
      "adamw_8bit": gj.adamw_8bit(1e-2, weight_decay=0.1, min_8bit_size=256),
      "adamw_8bit per layer": gj.adamw_8bit(  # k: 4 tensors of 16@fsdp x 32@tensor
          1e-2, weight_decay=0.1, min_8bit_size=256, batch_dims={"k": 1, "w": 0, "b": 0}),
      "galore_adamw_8bit": gj.galore_adamw_8bit(
          1e-2, rank=RANK, update_proj_gap=2, weight_decay=0.1, min_8bit_size=256,
          mask={"k": True, "w": True, "b": False}, dimension_numbers=DIMS),
  }
  for mode in MODES:
    mesh = mesh_2x4(mode)
    for name, tx in txs.items():
      ref_params, _, _ = run_steps(tx, values(), STEPS)
      with jax.set_mesh(mesh):
        params = put(values(), mesh)
        sh = gj.sharding.state_shardings(tx, params)
        adam = sh[0] if name.startswith("adamw_8bit") else sh[0].inner_state
        if name == "adamw_8bit per layer":  # 2 blocks per slice, one per fsdp shard
          assert tuple(adam.mu["k"].absmax.spec) == (None, "fsdp"), adam.mu["k"]
        if name.startswith("adamw_8bit"):  # w: (64@fsdp, 32@tensor), 4 whole blocks per shard
          assert tuple(adam.mu["w"].codes.spec) == ("fsdp", "tensor"), adam.mu["w"]
          assert tuple(adam.mu["w"].absmax.spec) == ("fsdp",), adam.mu["w"]
        else:  # k's (L, 32@(tensor, fsdp), r) coefficients: the first axis is not sharded
          codes = adam.mu["k"].codes
          assert tuple(codes.spec) == (None, ("tensor", "fsdp"), None), adam.mu["k"]
          assert tuple(adam.nu["k"].absmax.spec) in ((), (None,)), adam.nu["k"]
        assert tuple(adam.mu["b"].spec) == ("tensor",), adam.mu["b"]  # 32 < 256: float32
        same_shardings(tx.init(params), sh, f"eager init ({mode}, {name})")
        # No out_shardings under Auto axes either: the codes replace the old ones in their
        # layout (the partitioner had placed them replicated, or on fewer axes).
        p_jit, state, hist = run_steps(tx, params, STEPS)
        for t, (_, st) in enumerate(hist):
          same_shardings(st, sh, f"state after update {t} ({mode}, {name})")
      close(p_jit, ref_params, 1e-3 if name == "galore_adamw_8bit" else 1e-5,
            f"mesh vs one device ({mode}, {name})")
      restored = orbax_round_trip(state, gj.sharding.abstract_state(tx, params))
      same_shardings(restored, sh, f"restored ({mode}, {name})")
      close(restored, state, 0.0, f"restored values ({mode}, {name})")


@case
def partly_rejected_stack_on_a_mesh():
  """A NaN in layer 1 of the stacked kernel k on the second refresh (step 2): the guard keeps
  that layer's basis, and lazy's similarity and on_refresh (reset; 8-bit transport, whose flat
  absmax holds 2 blocks per layer) follow the taken layers only, on a mesh (both axis types)
  as on one device; the kept layer's moments stay bit for bit (the step is skipped)."""
  def grads(t):
    g = grads_at(t)
    return {**g, "k": g["k"].at[1, 3, 5].set(jnp.nan)} if t == 2 else g

  inners = {"reset": optax.scale_by_adam(),
            "transport": gj.scale_by_adam_8bit(block_size=64, min_8bit_size=1)}
  for on_refresh, inner in inners.items():
    tx = gj.galore_projection(
        optax.apply_if_finite(inner, 5), rank=RANK, refresh=gj.lazy(2, threshold=0.5),
        on_refresh=on_refresh, transport_betas=(0.9, 0.999),
        mask={"k": True, "w": True, "b": False}, dimension_numbers=DIMS)
    for mode in (None, *MODES):
      mesh = mesh_2x4(mode or "auto")
      with jax.set_mesh(mesh) if mode else contextlib.nullcontext():
        place = (lambda x: put(x, mesh)) if mode else (lambda x: x)
        state, update = tx.init(place(values())), jax.jit(tx.update)
        for t in range(STEPS):
          before = state.inner_state.inner_state
          _, state = update(place(grads(t)), state)
        # layer 1 of each array (a flat absmax too: its blocks 2 and 3)
        kept = lambda s: [np.asarray(x).reshape(4, -1)[1]  # noqa: E731
                          for x in jax.tree.leaves(s.mu["k"])]
        for x, y in zip(kept(state.inner_state.inner_state), kept(before)):
          np.testing.assert_array_equal(x, y, err_msg=f"{on_refresh}, {mode}")
      if mode is None:
        ref = state
      else:
        close(state, ref, 2e-4, f"{on_refresh}, {mode} vs one device")


@case
def successors_on_a_mesh():
  """APOLLO (random, regenerated), APOLLO-Mini and Fira on a 2x4 mesh, both axis types: the
  moments follow the coefficient rules, the limiter's norms the batch axes, a regenerated
  projection leaves only its counter; init, jitted steps and an Orbax round trip keep the
  shardings, and the steps agree with one device."""
  common = dict(update_proj_gap=2, weight_decay=0.1, mask={"k": True, "w": True, "b": False},
                dimension_numbers=DIMS)
  txs = {
      "apollo_adamw": gj.apollo_adamw(1e-2, rank=RANK, **common),
      "apollo_mini": gj.apollo_mini(1e-2, **common),
      "fira_adamw": gj.fira_adamw(1e-2, rank=RANK, **common),
  }
  # All six (axis type, optimizer) pairs: a regenerated projection, Fira's residual and
  # APOLLO-Mini's tensor scale each under Auto and Explicit axes (where every sharding must
  # type-check).  (APOLLO with SVD refreshes through galore_projection's machinery, covered
  # by the cases above.)
  runs = [(mode, name) for mode in ("explicit", "auto") for name in txs]
  for mode, name in runs:
    tx, mesh = txs[name], mesh_2x4(mode)
    ref_params, _, _ = run_steps(tx, values(), STEPS)
    with jax.set_mesh(mesh):
      params = put(values(), mesh)
      sh = gj.sharding.state_shardings(tx, params)
      g = sh[0]
      # k: (L, in@fsdp, out@tensor) viewed (L, m=out, n=in), right basis: moments
      # (L, m@(tensor, fsdp), r); one limiter norm per layer, the layer axis unsharded.
      mu_k = g.inner_state.mu["k"]
      assert tuple(mu_k.spec) == (None, ("tensor", "fsdp"), None), g.inner_state
      norms = g.norms if name.startswith("apollo") else g.residual_norms
      assert _padded(norms[1].spec) == _padded(P()), norms[1]
      if name.startswith("apollo"):  # the projection is not stored, its counter is
        assert g.bases[1].left is None and g.bases[1].right is None, g.bases[1]
      else:
        assert tuple(g.bases[2].right.spec) == ("tensor", None), g.bases[2]
      same_shardings(tx.init(params), sh, f"eager init ({mode}, {name})")
      out = None if mode == "explicit" else (None, sh)
      p_jit, state, hist = run_steps(tx, params, STEPS, out_shardings=out)
      for t, (_, st) in enumerate(hist):
        same_shardings(st, sh, f"state after update {t} ({mode}, {name})")
    close(p_jit, ref_params, 1e-5, f"mesh vs one device ({mode}, {name})")
    restored = orbax_round_trip(state, gj.sharding.abstract_state(tx, params))
    same_shardings(restored, sh, f"restored ({mode}, {name})")
    close(restored, state, 0.0, f"restored values ({mode}, {name})")


@case
def power_warm_starts_on_a_mesh():
  """Power's refreshes after the first start from the previous basis on a mesh too, as on
  one device (the spread's padding once read as "no basis yet" and sent every refresh down
  the cold path, a fresh SVD): one leaf, so 7 of the 8 stacked matrices are padding."""
  method = gj.subspace.Power(cold="svd", precision="highest")
  tx = gj.galore_projection(optax.scale_by_adam(), rank=4, refresh=gj.every_step(),
                            method=method)
  params = {"w": jnp.zeros((16, 64))}
  grads = [{"w": jax.random.normal(jax.random.key(t), (16, 64))} for t in range(3)]

  def bases(mesh=None):
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for g in grads:
      g = g if mesh is None else jax.device_put(g, NamedSharding(mesh, P()))
      _, state = update(g, state)
      out.append(np.asarray(state.bases[0].left))
    return out

  ref = bases()
  exact = np.linalg.svd(np.asarray(grads[2]["w"]))[0][:, :4]
  assert np.abs(np.abs(ref[2].T @ exact) - np.eye(4)).max() > 1e-2  # warm != a fresh SVD
  for mode in MODES:
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(MODES[mode],))
    with jax.set_mesh(mesh):
      got = bases(mesh)
    for t in range(3):
      np.testing.assert_allclose(got[t], ref[t], atol=1e-4, err_msg=f"{mode}, step {t}")
  # A scanned kernel whose layer axis is sharded, 6 layers on 8 devices: the padding of a
  # stack sharded along its layer axis (Explicit axes) was zeros, the cold path's trigger.
  tx = gj.galore_projection(optax.scale_by_adam(), rank=4, refresh=gj.every_step(),
                            method=method, dimension_numbers={"k": gj.DimensionNumbers(1, 2)})
  params = {"k": jnp.zeros((6, 64, 32))}
  grads = [{"k": jax.random.normal(jax.random.key(t), (6, 64, 32))} for t in range(3)]

  def stacked(mesh=None):
    put = lambda t: t if mesh is None else jax.device_put(
        t, NamedSharding(mesh, P("fsdp", None, "tensor")))
    state, update, out = tx.init(put(params)), jax.jit(tx.update), []
    for g in grads:
      _, state = update(put(g), state)
      b = state.bases[0]
      out.append(np.asarray(b.left if b.right is None else b.right))
    return out

  ref = stacked()
  for mode in MODES:
    with jax.set_mesh(mesh_2x4(mode)):
      got = stacked(mesh_2x4(mode))
    for t in range(3):
      np.testing.assert_allclose(got[t], ref[t], atol=1e-4, err_msg=f"{mode} stack, step {t}")


FSDP = {  # a LLaMA layer's kernels, (L, in, out), FSDP on the hidden size (the side std
  # projects); h's coefficients (100 rows) do not divide over 8 devices, their rank (16) does
    "q": ((2, 64, 64), P(None, "fsdp", None)),
    "gate": ((2, 64, 176), P(None, "fsdp", None)),
    "down": ((2, 176, 64), P(None, None, "fsdp")),
    "h": ((2, 64, 100), P(None, "fsdp", None)),
}


@case
def pure_fsdp_shards_low_rank_state():
  """Pure FSDP (8 devices, one axis): each projected leaf's low-rank moments take over the
  fsdp axis of the projected side (per device 1/8 of them, before a whole copy), on the other
  side where 8 divides it, else on the rank axis (h; not under APOLLO's regenerated random
  projection, which is unsharded: h's moments stay whole); every transform agrees with one
  device, both axis types."""
  grads = {k: 0.1 * jax.random.normal(jax.random.key(i + 7), shape)
           for i, (k, (shape, _)) in enumerate(FSDP.items())}
  start = {k: jax.random.normal(jax.random.key(i), shape)
           for i, (k, (shape, _)) in enumerate(FSDP.items())}
  rank = 16
  common = dict(rank=rank, mask=lambda p: jax.tree.map(lambda _: True, p),
                dimension_numbers=gj.DimensionNumbers(1, 2))
  txs = {
      "galore_adamw": gj.galore_adamw(1e-2, update_proj_gap=2, **common),
      "galore_adamw_8bit": gj.galore_adamw_8bit(
          1e-2, update_proj_gap=2, min_8bit_size=64, block_size=16, **common),
      "galore_adafactor": gj.galore_adafactor(1e-2, update_proj_gap=2, b1=0.9, **common),
      "ldadamw": gj.ldadamw(1e-2, **common),
      "apollo_adamw": gj.apollo_adamw(1e-2, update_proj_gap=2, **common),
      "fira_adamw": gj.fira_adamw(1e-2, update_proj_gap=2, **common),
  }

  def steps(tx, params, g, out=None):
    state = tx.init(params)
    update = jax.jit(tx.update, out_shardings=out)
    for _ in range(STEPS):
      u, state = update(g, state, params)
      params = optax.apply_updates(params, u)
    return params, state

  for name, tx in txs.items():
    ref, _ = steps(tx, start, grads)
    for mode in MODES:
      mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(MODES[mode],))
      with jax.set_mesh(mesh):
        on = lambda t: {k: jax.device_put(v, NamedSharding(mesh, FSDP[k][1]))
                        for k, v in t.items()}
        params = on(start)
        sh = gj.sharding.state_shardings(tx, params)
        same_shardings(tx.init(params), sh, f"eager init ({mode}, {name})")
        # (Auto: pinned, else the partitioner may return some state replicated)
        got, state = steps(tx, params, on(grads), None if mode == "explicit" else (None, sh))
        same_shardings(state, sh, f"after the steps ({mode}, {name})")
      coef = {"q": (2, 64, rank), "gate": (2, 176, rank), "down": (2, rank, 176),
              "h": (2, 100, rank)}
      for path, x in jax.tree_util.tree_leaves_with_path(state):
        key = next((k for k in coef if f"'{k}'" in jax.tree_util.keystr(path)), None)
        if key is None or x.shape != coef[key]:
          continue
        whole = key == "h" and name == "apollo_adamw"
        shard = x.addressable_shards[0].data
        assert shard.size == x.size // (1 if whole else 8), (name, mode, key, x.sharding)
        spec = tuple(x.sharding.spec) + (None,) * 3
        on_rank = spec[1 if key == "down" else 2] == "fsdp"  # (down: r x 176)
        assert on_rank == (key == "h" and not whole), (name, mode, key, x.sharding)
      close(got, ref, 1e-3 if "8bit" in name else 2e-5, f"mesh vs one device ({mode}, {name})")


LAYERED = {  # (L, in, out) kernels, FSDP on the hidden size; "lay" shards its layer axis
    "q": ((16, 64, 64), P(None, "fsdp", None)),
    "o": ((16, 64, 64), P(None, None, "fsdp")),
    "gate": ((16, 64, 176), P(None, "fsdp", None)),
    "down": ((16, 176, 64), P(None, None, "fsdp")),
    "lay": ((16, 64, 64), P("fsdp", None, None)),
}
COLLECTIVE = re.compile(r"= (\(.*\)|\S+) (?:all-gather|all-to-all|collective-permute|all-reduce"
                        r"|reduce-scatter)(?:-start)?\(")


@case
def back_projection_gathers_a_few_layers():
  """The normal step's projections under pure FSDP (8 devices), a few layers at a time: the
  gradient's projection sums over the sharded side (partial coefficients of every layer on
  each device, then an all-reduce or reduce-scatter), and its way back meets a low-rank
  update sharded as its moments with a basis sharded on the other side, so every device
  needs all of it (an all-gather).  No collective of the compiled normal step (update and
  apply, no refresh) holds more than 8 layers' coefficients of the largest leaf (a pass
  takes the device count's worth of layers: two passes here, not 16 of one layer each, which
  a GPU would run as small serial steps); both were whole stacks of 16 layers.  The
  layer-sharded leaf keeps its layers where they are (no remat); the run agrees with one
  device."""
  _projects_in_passes(LAYERED, (8,), ("fsdp",))


LAYERED_12 = {  # 12 layers on 8 devices: no multiple of 8 divides them
    "q": ((12, 64, 64), P(None, ("stage", "fsdp"), None)),
    "o": ((12, 64, 64), P(None, None, ("stage", "fsdp"))),
    "gate": ((12, 64, 176), P(None, ("stage", "fsdp"), None)),
    "down": ((12, 176, 64), P(None, None, ("stage", "fsdp"))),
    "lay": ((12, 64, 64), P("stage", "fsdp", None)),
}


@case
def projections_in_passes_of_any_layer_count():
  """As :func:`back_projection_gathers_a_few_layers`, with 12 layers on 8 devices (FSDP over
  both axes of a (4, 2) mesh; one leaf's layers split 4 ways): no divisor of 12 is a multiple
  of 8, and every stack's coefficients went through a collective whole (12 layers); a pass
  now takes 8 layers, 2 of each run of 3 (the last pass's first repeats), so no collective
  holds more than 8 layers' coefficients of the largest leaf, the split layers stay where
  they are (no remat), and the run agrees with one device."""
  _projects_in_passes(LAYERED_12, (4, 2), ("stage", "fsdp"))


def _projects_in_passes(layered, mesh_shape, names):
  """A refresh and two normal steps of ``layered`` on a mesh of ``mesh_shape`` (both axis types)
  agree with one device, and no collective of the compiled normal step holds more than 8
  layers' coefficients of the largest leaf (gate, down: 176 x 16 each)."""
  rank, worst, layers = 16, 176 * 16, 8
  tx = gj.galore_adamw(1e-2, rank=rank, mask=lambda p: jax.tree.map(lambda _: True, p),
                       dimension_numbers=gj.DimensionNumbers(1, 2))
  start = {k: jax.random.normal(jax.random.key(i), shape)
           for i, (k, (shape, _)) in enumerate(layered.items())}
  grads = [{k: jax.random.normal(jax.random.key(10 * t + i), shape)
            for i, (k, (shape, _)) in enumerate(layered.items())} for t in range(3)]

  def step(p, s, g, refresh):
    u, s = tx.update(g, s, p, galore_refresh=refresh)
    return optax.apply_updates(p, u), s

  def steps(params, grads, jit):  # a refresh, then two normal steps
    state = tx.init(params)
    for t, g in enumerate(grads):
      params, state = jit(params, state, g, t == 0)
    return params

  ref = steps(start, grads, jax.jit(step, static_argnums=3))
  for mode in ("explicit", "auto"):
    mesh = jax.make_mesh(mesh_shape, names, axis_types=(MODES[mode],) * len(names))
    with jax.set_mesh(mesh):
      on = lambda t: {k: jax.device_put(v, NamedSharding(mesh, layered[k][1]))
                      for k, v in t.items()}
      params = on(start)
      sh = (jax.tree.map(lambda x: x.sharding, params), gj.sharding.state_shardings(tx, params))
      jit = jax.jit(step, static_argnums=3, out_shardings=sh)
      hlo = jit.lower(params, tx.init(params), params, False).compile().as_text()
      got = steps(params, [on(g) for g in grads], jit)
    sizes = [math.prod(int(d) for d in dims.split(",") if d)  # (a tuple: each of its arrays)
             for shapes in COLLECTIVE.findall(hlo) for dims in re.findall(r"\[([0-9,]*)\]", shapes)]
    assert sizes and max(sizes) <= layers * worst, (mode, sorted(sizes)[-4:], layers * worst)
    close(got, ref, 2e-5, f"mesh vs one device ({mode})")


def _train_step_plans(mode: str, refresh: bool | None, names=("adamw", "galore")) -> dict:
  """Per device (8 devices, pure FSDP), the compiled plan ``(arguments, temporaries)`` of a
  train step of a scanned, rematerialised model (its backward, then the update) by AdamW and
  by GaLore (its basis on the sharded side of every leaf; with ``refresh``, a refresh step;
  with ``None``, a step whose refresh is a ``lax.cond``), of those in ``names``."""
  def loss(p, x):
    def layer(h, w):
      if jax.sharding.get_abstract_mesh().axis_types[0] == AxisType.Explicit:
        w = jax.tree.map(lambda a: jax.sharding.reshard(a, P()), w)  # FSDP's gather
      a = h + jnp.tanh(h @ w["q"]) @ w["q"].T
      return a + jax.nn.silu(a @ w["gate"]) @ w["gate"].T, None
    return jnp.sum(jax.lax.scan(jax.checkpoint(layer), x, p)[0] ** 2)

  galore = gj.galore_adamw(1e-2, rank=16, mask=lambda p: jax.tree.map(lambda _: True, p),
                           dimension_numbers=gj.DimensionNumbers(1, 2), method="power")
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(MODES[mode],))
  plans = {}
  with jax.set_mesh(mesh):
    params = {k: jax.device_put(jax.random.normal(jax.random.key(i), LAYERED[k][0],
                                                  jnp.bfloat16), NamedSharding(mesh, spec))
              for i, (k, spec) in enumerate((k, LAYERED[k][1]) for k in ("q", "gate"))}
    x = jax.device_put(jnp.ones((64, 64), jnp.bfloat16), NamedSharding(mesh, P("fsdp")))
    for name, tx in ((n, t) for n, t in (("adamw", optax.adamw(1e-2)), ("galore", galore))
                     if n in names):
      def step(p, s, x, tx=tx, extra=({} if name == "adamw" or refresh is None
                                                     else {"galore_refresh": refresh})):
        u, s = tx.update(jax.grad(loss)(p, x), s, p, **extra)
        return optax.apply_updates(p, u), s

      sh = (jax.tree.map(lambda a: a.sharding, params), gj.sharding.state_shardings(tx, params))
      jit = jax.jit(step, out_shardings=sh, donate_argnums=(0, 1))
      m = jit.lower(params, tx.init(params), x).compile().memory_analysis()
      plans[name] = (m.argument_size_in_bytes, m.temp_size_in_bytes)
  return plans


@case
def train_step_plan_below_adamw():
  """A normal train step (:func:`_train_step_plans`): GaLore's compiled plan per device
  (arguments + temporaries) is not above AdamW's, its state being smaller.  It was
  (1.015x): the passes of a layer stack's projections wrote into zeros, which depend on
  nothing, and XLA created them (and a copy per loop) before the backward pass, whose peak
  they joined; the way back now writes into the gradient, dead once projected (0.92x)."""
  for mode in MODES:
    plans = _train_step_plans(mode, refresh=False)
    assert plans["galore"][0] < plans["adamw"][0], (mode, plans)  # its state is smaller
    assert sum(plans["galore"]) <= sum(plans["adamw"]), (mode, plans)


@case
def refresh_step_plan_below_adamw():
  """A refresh step (:func:`_train_step_plans`, power iterations) plans per device no more
  than AdamW's step.  It planned 1.016x: each leaf's stack, resharded along its layers for
  the factorization (in float32 on XLA:CPU), depends on nothing but its gradient, so XLA
  resharded every leaf's stack at once right after the backward pass (1b FSDP=8: 1.06x
  AdamW, 7b 1.31x); chained (:func:`galore_jax.leaves.after_bases`), one stack's copy is
  live at a time (0.99x); in passes, each leaf's projection after its refresh, 0.93x.

  A step whose refresh is a ``lax.cond`` (no host decision: a jitted step as a library user
  writes it) plans no more than the host's refresh step.  Under Auto axes it planned 0.964x
  AdamW's where the refresh step plans 0.934x: the projections waited for their refresh
  (:func:`galore_jax.leaves.after_refresh`) only on a step the host said refreshes, so next
  to the ``cond`` XLA made every leaf's projection operand right after the backward pass,
  live across the refresh branch (LLaMA-7b FSDP=8, batch 8 x 256: 0.962x AdamW); now 0.908x
  (7b: 0.871x)."""
  for mode in MODES:
    plans = _train_step_plans(mode, refresh=True)
    assert sum(plans["galore"]) <= sum(plans["adamw"]), (mode, plans)
    cond = _train_step_plans(mode, refresh=None, names=("galore",))["galore"]
    assert sum(cond) <= sum(plans["galore"]), (mode, cond, plans)


@case
def relora_merge_on_a_mesh():
  """ReLoRA's merge of LoRA layers whose factors split their rank axis (shard_rank: A on
  (fsdp, tensor), B on (fsdp, tensor)) folds B A into the base and restarts the adapters, the
  base and the factors keeping their shardings under Explicit axes (train.py pins them under
  Auto).  Under Explicit axes
  the product A B contracted an axis split over tensor in A and over fsdp in B: JAX refused
  it ('dot_general requires contracting dimensions to have consistent sharding')."""
  from flax import nnx
  from galore_jax import nn

  rules = (("embed", "fsdp"), ("heads", "tensor"))
  for mode in MODES:
    with jax.set_mesh(mesh_2x4(mode)), nnx.logical_axis_rules(rules), \
        nnx.use_eager_sharding(True):
      layer = nn.LoRALinear(16, 8, rank=8, alpha=4.0, kernel_axes=("embed", "heads"),
                            rngs=nnx.Rngs(0))
      layer.lora_b[...] = jax.device_put(jnp.ones((8, 8)), layer.lora_b[...].sharding)
      optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)
      before = {k: getattr(layer, k)[...].sharding for k in ("base", "lora_a", "lora_b")}
      w0, a = (np.asarray(getattr(layer, k)[...], np.float64) for k in ("base", "lora_a"))
      assert nnx.jit(nn.relora_merge)(layer, optimizer, jax.random.key(1)) == 1
      close(layer.base[...], w0 + 0.5 * a @ np.ones((8, 8)), 1e-5, f"merged base {mode}")
      assert not np.any(np.asarray(layer.lora_b[...]))
      bound = 1 / math.sqrt(16)
      assert np.all(np.abs(np.asarray(layer.lora_a[...])) <= bound)
      for k, s in before.items():  # (under Auto axes the partitioner places them)
        assert mode == "auto" or getattr(layer, k)[...].sharding.is_equivalent_to(s, 2), k


NN_RULES = (("embed", "fsdp"), ("mlp", "tensor"))


def nn_layers():
  """galore_jax.nn's low-rank layers, by kind: ``(in, out, kernel_axes) -> layer``."""
  from flax import nnx
  from galore_jax import nn
  return {
      "lora": lambda n, m, axes: nn.LoRALinear(n, m, rank=4, alpha=8.0, kernel_axes=axes,
                                               rngs=nnx.Rngs(0)),
      "lowrank": lambda n, m, axes: nn.LowRankLinear(n, m, rank=4, kernel_axes=axes,
                                                     rngs=nnx.Rngs(0)),
      "sltrain": lambda n, m, axes: nn.SparsePlusLowRankLinear(
          n, m, rank=4, delta=0.25, alpha=8.0, kernel_axes=axes, rngs=nnx.Rngs(0)),
  }


def nn_layer_oracle(layer, kind, x, c):
  """Float64 NumPy oracle of a ``kind`` layer of :func:`nn_layers`: its dense kernel ``W``
  and the gradients of ``sum(layer(x) * c)`` by parameter name (``dW = x^T c``, then
  ``dA = scale dW B^T``, ``dB = scale A^T dW``, SLTrain's ``dvalues = dW.flat[index]``)."""
  from flax import nnx
  f64 = lambda v: np.asarray(v, np.float64)
  params = {k: f64(v[...]) for (k,), v in nnx.state(layer, nnx.Param).flat_state()}
  names = ("lora_a", "lora_b") if kind == "lora" else ("a", "b")
  a_, b_ = params[names[0]], params[names[1]]
  scale = 1.0 if kind == "lowrank" else layer.scale
  w = scale * a_ @ b_
  if kind == "lora":
    w = w + f64(layer.base[...])
  if kind == "sltrain":
    np.add.at(w.reshape(-1), np.asarray(layer.index[...]), params["values"])
  dw = np.einsum("bti,bto->io", f64(x), c)
  want = {names[0]: scale * dw @ b_.T, names[1]: scale * a_.T @ dw}
  if kind == "sltrain":
    want["values"] = dw.reshape(-1)[np.asarray(layer.index[...])]
  return w, want


@case
def nn_layers_on_explicit_axes():
  """galore_jax.nn's layers called directly under Explicit axes (no ``auto_axes``): with
  shard_rank, A's rank axis splits as the kernel's out axis and B's as its in axis, and JAX
  refused to contract them in the forward pass ('dot_general requires contracting dimensions
  to have consistent sharding'); SLTrain's scatter and its backward's sums had no output
  sharding.  Output and gradients match a float64 NumPy oracle of the dense kernel, each
  gradient split as its parameter, in both kernel orientations and under Auto axes too."""
  from flax import nnx

  build = nn_layers()
  for mode, kind, axes in ((mo, k, a) for mo in MODES for k in build
                           for a in (("embed", "mlp"), ("mlp", "embed"))):
    where = f"{kind} {axes} {mode}"
    with jax.set_mesh(mesh_2x4(mode)), nnx.logical_axis_rules(NN_RULES), \
        nnx.use_eager_sharding(True):
      layer = build[kind](8, 16, axes)
      b = layer.lora_b if kind == "lora" else layer.b  # a nonzero B (LoRA, SLTrain start at 0)
      b[...] = jax.device_put(jax.random.normal(jax.random.key(1), b.shape), b[...].sharding)
      batch = "fsdp" if axes[1] != "embed" else None  # (a dense kernel's output takes fsdp)
      x = jax.device_put(jax.random.normal(jax.random.key(2), (4, 3, 8)), P(batch, None, None))
      c = np.asarray(jax.random.normal(jax.random.key(3), (4, 3, 16)), np.float64)
      loss = lambda m, x: jnp.sum(m(x) * c)
      y, grads = nnx.jit(lambda m, x: (m(x), nnx.grad(loss)(m, x)))(layer, x)
      w, want = nn_layer_oracle(layer, kind, x, c)
      close(y, np.asarray(x, np.float64) @ w, 1e-5, f"output {where}")
      for (k,), g in nnx.to_flat_state(grads):
        close(g[...], want[k], 1e-4, f"d{k} {where}")
        if mode == "explicit":
          assert g[...].sharding.is_equivalent_to(getattr(layer, k)[...].sharding, 2), where


@case
def nn_layers_take_out_sharding():
  """galore_jax.nn's layers take ``out_sharding`` as ``nnx.Linear`` does: under Explicit axes
  an input split over ``tensor`` along the axis a ``("mlp", "embed")`` kernel contracts (an
  attention output or an MLP's hidden, before ``o_proj`` / ``down_proj``) meets a kernel split
  the same way, and JAX will not guess the output's split ('Contracting dimensions are
  sharded ...'): the layers took no ``out_sharding`` to say it.  The output is typed as asked,
  and it and the gradients match a float64 NumPy oracle, each gradient split as its input."""
  from flax import nnx

  axes, out = ("mlp", "embed"), P("fsdp", None, None)
  for kind, make in nn_layers().items():
    with jax.set_mesh(mesh_2x4("explicit")), nnx.logical_axis_rules(NN_RULES), \
        nnx.use_eager_sharding(True):
      layer = make(8, 16, axes)
      for i, ((name,), _) in enumerate(nnx.state(layer, nnx.Param).flat_state()):
        v = getattr(layer, name)  # nonzero factors (LoRA's and SLTrain's B start at 0)
        v[...] = jax.device_put(jax.random.normal(jax.random.key(i), v.shape) / 4,
                                v[...].sharding)
      x = jax.device_put(jax.random.normal(jax.random.key(2), (4, 3, 8)),
                         P("fsdp", None, "tensor"))
      c = np.asarray(jax.random.normal(jax.random.key(3), (4, 3, 16)), np.float64)
      loss = lambda m, x: jnp.sum(m(x, out_sharding=out) * c)
      y, (grads, dx) = nnx.jit(lambda m, x: (m(x, out_sharding=out),
                                             nnx.grad(loss, argnums=(0, 1))(m, x)))(layer, x)
      assert y.sharding.spec == out, (kind, y.sharding.spec)
      w, want = nn_layer_oracle(layer, kind, x, c)
      close(y, np.asarray(x, np.float64) @ w, 1e-5, f"output {kind}")
      close(dx, c @ w.T, 1e-5, f"dx {kind}")
      assert dx.sharding.is_equivalent_to(x.sharding, 3), kind
      for (k,), g in nnx.to_flat_state(grads):
        close(g[...], want[k], 1e-4, f"d{k} {kind}")
        assert g[...].sharding.is_equivalent_to(getattr(layer, k)[...].sharding, 2), (kind, k)


REMAT = "Involuntary full rematerialization"  # XLA's warning: an array replicated whole


def main(names):
  for name in names or CASES:
    start = time.perf_counter()
    # (CASES_LOG: a file the test reads if this process dies mid-case)
    path = os.environ.get("CASES_LOG")
    with open(path, "w+b") if path else tempfile.TemporaryFile() as log:
      # XLA warns on the C++ side, to fd 2: each case's warnings are counted, then passed on.
      sys.stderr.flush()
      saved = os.dup(2)
      os.dup2(log.fileno(), 2)
      try:
        CASES[name]()
        result = {"case": name, "ok": True, "error": None}
      except Exception:  # noqa: BLE001 -- reported to the test
        result = {"case": name, "ok": False, "error": traceback.format_exc()}
      finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
      log.seek(0)
      text = log.read().decode(errors="replace")
    sys.stderr.write(text)
    result["remat"] = text.count(REMAT)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
  jax.config.update("jax_num_cpu_devices", 8)  # before anything touches a device
  main(sys.argv[1:])

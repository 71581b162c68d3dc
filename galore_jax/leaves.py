"""Leaf machinery shared by the projecting transforms (``galore_projection``,
``scale_by_ldadam``, ``scale_by_apollo``): zero state of projected leaves, the refresh of
their bases (stacked over same-shaped leaves and spread over a mesh's devices, or
regenerated from the key) and the refresh policy's bookkeeping.

Every function takes the leaves of a tree in ``jax.tree.leaves`` order with their
:class:`~galore_jax.plans.LeafPlan` s (``None`` for a leaf that is not projected).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from galore_jax import _checks
from galore_jax import _passes
from galore_jax import _spread
from galore_jax import draws
from galore_jax import guard
from galore_jax import projection
from galore_jax import refresh as refresh_lib
from galore_jax import subspace
from galore_jax._explicit import context_mesh
from galore_jax._explicit import padded
from galore_jax._explicit import reshaped_like
from galore_jax._explicit import sharding_of
from galore_jax._explicit import spec_names
from galore_jax._explicit import typed_sharding
from galore_jax._explicit import zeros
from galore_jax.flax_metadata import actual_spec_or
from galore_jax.flax_metadata import in_variable
from galore_jax.flax_metadata import param_items
from galore_jax.flax_metadata import with_leaf_specs
from galore_jax.plans import LeafPlan
from galore_jax.sharding import basis_spec
from galore_jax.sharding import coefficient_spec


def check_fits(state_bases: Sequence[Any], plans: Sequence[LeafPlan | None], name: str,
               stored: bool = True) -> None:
  """A one-line ``ValueError`` unless a state's per-leaf ``bases`` fit the leaves being
  updated: as many entries, bases exactly where a leaf is projected, with the leaf's
  shapes (``stored=False``: bases regenerated from the key, whose state holds only their
  refresh counter, :func:`regenerate`).  Shapes are static, so under ``jax.jit`` too the
  error names the first leaf that does not fit, not a broadcasting failure deep inside
  the step.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from galore_jax import leaves, plans
    >>> lp = plans.leaf_plans({"w": jnp.zeros((6, 4))}, None, None, 2, "std")
    >>> leaves.check_fits([optax.MaskedNode()], lp, "galore_projection")
    Traceback (most recent call last):
    ...
    ValueError: galore_projection: the state does not fit the updates at ['w'] (matrices (6, 4) projected on the right at rank 2, but the state holds no bases): was it made for other params?
  """
  if len(state_bases) != len(plans):
    raise ValueError(
        f"{name} state has {len(state_bases)} leaves but the updates have {len(plans)}:"
        " was the state made for other params?"
    )
  for bases, plan in zip(state_bases, plans):
    problem = _misfit(bases, plan, stored)
    if problem:
      where = plan.where if plan is not None else "a leaf that is not projected"
      raise ValueError(
          f"{name}: the state does not fit the updates at {where} ({problem}): was it"
          " made for other params?")


def check_moments(mu: Any, leaves: Sequence[Any], plans: Sequence[LeafPlan | None],
                  name: str) -> None:
  """A one-line ``ValueError`` where a leaf's moment (a leaf of ``mu``, one per update
  leaf) is not shaped like its coefficients, or like the leaf where it is not projected:
  the bases fit a matrix of another height too, and a regenerated projection stores none.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import leaves, plans
    >>> g = {"w": jnp.zeros((6, 4))}
    >>> lp = plans.leaf_plans(g, None, None, 2, "std")
    >>> leaves.check_moments({"w": jnp.zeros((8, 2))}, [g["w"]], lp, "scale_by_ldadam")
    Traceback (most recent call last):
    ...
    ValueError: scale_by_ldadam: the state does not fit the updates at ['w'] (moments (8, 2), coefficients (6, 2)): was it made for other params?
  """
  for m, leaf, plan in zip(jax.tree.leaves(mu), leaves, plans):
    want = (jnp.shape(leaf) if plan is None else
            projection.coefficient_shape(plan.view, plan.rank, plan.left, plan.right))
    if tuple(jnp.shape(m)) != tuple(want):
      where = "a leaf that is not projected" if plan is None else plan.where
      raise ValueError(
          f"{name}: the state does not fit the updates at {where} (moments"
          f" {tuple(jnp.shape(m))}, {'update' if plan is None else 'coefficients'}"
          f" {tuple(want)}): was it made for other params?")


def check_configs(state: Any, refresh: refresh_lib.RefreshPolicy,
                  plans: Sequence[LeafPlan | None], name: str, **optional: Any) -> None:
  """``_checks.check_config`` of a projecting transform's state: its ``refresh_state``
  against the refresh policy's (abstract) initial state for ``plans``, and each field named
  in ``optional`` (``None`` or ``True``, as ``check_config`` takes them).

  Example:
    >>> import jax.numpy as jnp
    >>> import galore_jax as gj
    >>> from galore_jax import leaves, plans
    >>> params = {"w": jnp.zeros((6, 4))}
    >>> state = gj.galore_projection(rank=2).init(params)
    >>> lp = plans.leaf_plans(params, None, None, 2, "std")
    >>> leaves.check_configs(state, gj.staggered(4), lp, "galore_projection")
    Traceback (most recent call last):
    ...
    ValueError: galore_projection: the state does not match this transform's configuration at .refresh_state (the state holds None, this transform keeps an array there): was it made by a differently configured transform?
  """
  _checks.check_config(state.refresh_state,
                       jax.eval_shape(lambda: policy_init(refresh, plans)), "refresh_state", name)
  for field, want in optional.items():
    _checks.check_config(getattr(state, field), want, field, name)


def _misfit(bases, plan: LeafPlan | None, stored: bool = True) -> str:
  """Why ``bases`` are not a state for a leaf with ``plan`` ('' when they are)."""
  is_bases = isinstance(bases, subspace.Bases)
  if plan is None:
    return "the state holds bases for it" if is_bases else ""
  v = plan.view
  side = "on both sides" if plan.left and plan.right else (
      "on the left" if plan.left else "on the right")
  wanted = f"matrices {(*v.batch_shape, v.m, v.n)} projected {side} at rank {plan.rank}"
  if not is_bases:
    return f"{wanted}, but the state holds no bases"
  expect = {"left": (*v.batch_shape, v.m, plan.rank) if plan.left and stored else None,
            "right": (*v.batch_shape, v.n, plan.rank) if plan.right and stored else None}
  got = {"left": None if bases.left is None else tuple(jnp.shape(bases.left)),
         "right": None if bases.right is None else tuple(jnp.shape(bases.right))}
  if got != expect:
    return f"{wanted}, but the state's bases have shapes {got}"
  return ""


def zero_bases(plan: LeafPlan, dtype, like=None, item=None, stored: bool = True,
               coordinates: bool = False) -> subspace.Bases:
  """Zero bases of a leaf; sharded by the rules of :mod:`galore_jax.sharding` when the
  leaf's sharding ``like`` is known, and carrying those rules in their metadata when the
  param is a Flax variable ``item``.  ``stored=False``: only the refresh counter (bases
  regenerated from the key, :func:`regenerate`).  ``coordinates=True``: the first ``r``
  coordinate vectors instead of zeros, an orthonormal start for a method that refines
  the previous basis (LDAdam's power step).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import leaves, plans
    >>> (plan,) = plans.leaf_plans({"w": jnp.zeros((6, 4))}, None, None, 2, "std")
    >>> b = leaves.zero_bases(plan, jnp.float32)
    >>> b.left is None, b.right.shape, int(b.refreshes)
    (True, (4, 2), 0)
  """
  batch, m, n, r = plan.view.batch_shape, plan.view.m, plan.view.n, plan.rank
  spec = None if like is None else like.spec

  def side_zeros(d, side):
    z = zeros((*batch, d, r), dtype, like, basis_spec(spec, plan.view, side))
    if coordinates:  # (added to the sharded zeros: the sum keeps their sharding)
      z = z + jnp.eye(d, r, dtype=dtype)
    return in_variable(item, z, lambda s: basis_spec(s, plan.view, side))

  return subspace.Bases(
      left=side_zeros(m, "left") if plan.left and stored else None,
      right=side_zeros(n, "right") if plan.right and stored else None,
      refreshes=zeros([], jnp.int32, like, P()),
  )


def all_zero_bases(params: Any, plans: Sequence[LeafPlan | None], dtype=None,
                   stored: bool = True, coordinates: bool = False) -> list:
  """:func:`zero_bases` of every projected leaf of ``params`` (in ``dtype``, default the
  leaf's own; carrying the params' Flax metadata; ``stored`` and ``coordinates`` as
  there), ``optax.MaskedNode()`` for the others.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import leaves, plans
    >>> params = {"b": jnp.zeros(4), "w": jnp.zeros((6, 4))}
    >>> b, w = leaves.all_zero_bases(params, plans.leaf_plans(params, None, None, 2, "std"))
    >>> b, w.right.shape
    (MaskedNode(), (4, 2))
  """
  leaves = jax.tree.leaves(params)
  items = param_items(params, len(leaves))
  return [optax.MaskedNode() if plan is None else
          zero_bases(plan, dtype or leaf.dtype, sharding_of(leaf), item, stored, coordinates)
          for leaf, plan, item in zip(leaves, plans, items)]


def coefficient_zeros(plan: LeafPlan, leaf) -> jax.Array:
  """Zeros shaped (and sharded) like the leaf's low-rank coefficients, in their dtype
  (:func:`galore_jax.projection.coefficient_dtype`).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import leaves, plans
    >>> w = jnp.zeros((6, 4))
    >>> (plan,) = plans.leaf_plans({"w": w}, None, None, 2, "std")
    >>> leaves.coefficient_zeros(plan, w).shape
    (6, 2)
  """
  like = sharding_of(leaf)
  shape = projection.coefficient_shape(plan.view, plan.rank, plan.left, plan.right)
  spec = coefficient_spec(None if like is None else like.spec, plan.view, plan.left, plan.right,
                          None if like is None else like.mesh, _shardable_rank(plan))
  return zeros(shape, projection.coefficient_dtype(leaf.dtype), like, spec)


def low_rank_tree(tree: Any, plans: Sequence[LeafPlan | None]) -> Any:
  """A tree of coefficient-shaped leaves (Flax variables kept) whose projected variables
  carry the coefficient's spec in their metadata, not the param's
  (:func:`galore_jax.flax_metadata.with_leaf_specs`).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import leaves
    >>> leaves.low_rank_tree({"w": jnp.zeros((6, 2))}, [None])["w"].shape
    (6, 2)
  """
  return with_leaf_specs(tree, [
      None if plan is None else _coefficient_metadata(plan, value)
      for plan, value in zip(plans, jax.tree.leaves(tree))
  ])


def _coefficient_metadata(plan: LeafPlan, value) -> Callable:
  """The metadata spec of a low-rank leaf: the spec ``value`` has when it has one (mesh
  axes: a param's logical names cannot say that the coefficients took over a mesh axis of
  the projected side), else :func:`coefficient_spec` of the param's spec on the mesh set
  with ``jax.set_mesh``."""
  return actual_spec_or(
      sharding_of(value),
      lambda spec: coefficient_spec(spec, plan.view, plan.left, plan.right,
                                    rank=_shardable_rank(plan)))


def _shardable_rank(plan: LeafPlan) -> int | None:
  """The rank where the coefficients' rank axis may be sharded, else ``None``."""
  return plan.rank if plan.shard_rank else None


def coefficient_tree(params: Any, plans: Sequence[LeafPlan | None]) -> Any:
  """The tree an inner transform's state is made for: ``params`` with each projected leaf
  replaced by :func:`coefficient_zeros` (its metadata spec too, :func:`low_rank_tree`).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import leaves, plans
    >>> params = {"b": jnp.zeros(3), "w": jnp.zeros((6, 4))}
    >>> tree = leaves.coefficient_tree(params, plans.leaf_plans(params, None, None, 2, "std"))
    >>> tree["b"].shape, tree["w"].shape
    ((3,), (6, 2))
  """
  leaves, treedef = jax.tree.flatten(params)
  proxies = [leaf if plan is None else coefficient_zeros(plan, leaf)
             for leaf, plan in zip(leaves, plans)]
  return low_rank_tree(jax.tree.unflatten(treedef, proxies), plans)


def matrices(leaves: Sequence[Any], plans: Sequence[LeafPlan | None]) -> list:
  """Each projected leaf as its stack of matrices ``(*batch, m, n)``; ``None`` elsewhere.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import leaves, plans
    >>> tree = [jnp.zeros(3), jnp.zeros((6, 4))]
    >>> [None if x is None else x.shape
    ...  for x in leaves.matrices(tree, plans.leaf_plans(tree, None, None, 2, "std"))]
    [None, (6, 4)]
  """
  return [None if plan is None else projection.to_matrix(leaf, plan.view)
          for leaf, plan in zip(leaves, plans)]


def coefficients(leaves: Sequence[Any], mats: Sequence[Any], plans: Sequence[LeafPlan | None],
                 bases: Sequence[Any]) -> list:
  """What the inner transform sees: each projected leaf's matrices (``mats``, from
  :func:`matrices`) projected on its ``bases``, :math:`P^T G Q`; the other leaves as they
  are.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import leaves, plans, subspace
    >>> tree = [jnp.ones(3), jnp.ones((6, 4))]
    >>> lp = plans.leaf_plans(tree, None, None, 2, "std")
    >>> b = [None, subspace.Bases(None, jnp.eye(4, 2), jnp.int32(1))]
    >>> [x.shape for x in leaves.coefficients(tree, leaves.matrices(tree, lp), lp, b)]
    [(3,), (6, 2)]
  """
  return [leaf if plan is None else projection.project(
              mat, bases[i].left, bases[i].right, shard_rank=plan.shard_rank)
          for i, (leaf, mat, plan) in enumerate(zip(leaves, mats, plans))]


def groups(
    indices: Sequence[int], plans: Sequence[LeafPlan | None], alone_from: int | None = None
) -> list[list[int]]:
  """Leaves whose matrices share a shape, rank and sides: refreshed as one stack.  A leaf
  of at least ``alone_from`` matrices is a stack of its own.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import leaves, plans
    >>> tree = [jnp.zeros((6, 4)), jnp.zeros((5, 4)), jnp.zeros((6, 4))]
    >>> leaves.groups([0, 1, 2], plans.leaf_plans(tree, None, None, 2, "std"))
    [[0, 2], [1]]
  """
  found: dict[tuple, list[int]] = {}
  for i in indices:
    p = plans[i]
    if alone_from is not None and math.prod(p.view.batch_shape) >= alone_from:
      found[("alone", i)] = [i]
    else:
      found.setdefault((p.view.m, p.view.n, p.rank, p.left, p.right), []).append(i)
  return list(found.values())


def stacks(
    indices: Sequence[int], plans: Sequence[LeafPlan | None], mesh
) -> list[list[int]]:
  """The stacks in which one refresh factorizes the leaves ``indices``: each leaf alone on
  one device (``mesh=None``); under a mesh, :func:`groups`, so that same-shaped leaves
  spread over the devices together (one matrix each, not a copy of every leaf on every
  device), except that a leaf with a matrix for every device spreads alone: stacking it
  gains no spread and costs a gather (with Auto axes the layouts are unknown here, and
  concatenating leaves laid out differently, a LLaMA's q and o kernels, gathers the whole
  stack; with Explicit axes the concatenation needs the layer axes whole).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from galore_jax import leaves, plans
    >>> tree = [jnp.zeros((6, 4)), jnp.zeros((6, 4))]
    >>> lp = plans.leaf_plans(tree, None, None, 2, "std")
    >>> mesh = jax.make_mesh((1,), ("d",))
    >>> leaves.stacks([0, 1], lp, None), leaves.stacks([0, 1], lp, mesh)
    ([[0], [1]], [[0], [1]])
  """
  if mesh is None:
    return [[i] for i in indices]
  return groups(indices, plans, mesh.size)


def per_leaf_stacks(
    indices: Sequence[int], plans: Sequence[LeafPlan | None], mesh
) -> list[list[int]]:
  """The stacks of a per-leaf refresh policy (``staggered``, ``lazy``), each in a
  ``lax.cond`` of its own: each leaf alone on one device; under a mesh, :func:`stacks` cut
  into stacks of at most one matrix per device.  Such a stack costs one matrix's
  factorisation, as one leaf does (padded with copies, every device factorised it), so it
  refreshes whenever one of its leaves is due, and the others keep their bases.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from galore_jax import leaves, plans
    >>> tree = [jnp.zeros((6, 4))] * 3
    >>> lp = plans.leaf_plans(tree, None, None, 2, "std")
    >>> leaves.per_leaf_stacks([0, 1, 2], lp, None)
    [[0], [1], [2]]
  """
  if mesh is None:
    return [[i] for i in indices]
  out = []
  for group in stacks(indices, plans, mesh):
    out.append([])
    size = 0
    for i in group:
      n = math.prod(plans[i].view.batch_shape)
      if out[-1] and size + n > mesh.size:
        out.append([])
        size = 0
      out[-1].append(i)
      size += n
  return out


def _none_taken(bases: subspace.Bases) -> jax.Array:
  """A leaf's per-matrix flags of a step that takes no new basis: all false, laid out as its
  bases' batch axes (as the flags of a refresh are, so both branches of a ``cond`` agree)."""
  return jnp.any(jnp.zeros_like(bases.basis, bool), axis=(-2, -1))


def _refresh_due(projected, due, bases, plans, mesh, group_refresh) -> tuple:
  """A per-leaf policy's refresh: per stack of :func:`per_leaf_stacks`, a ``lax.cond`` on
  whether any of its leaves is due; the leaves that are not keep their bases (and take no
  matrix).  Returns the bases and the guard's per-matrix flags, as :func:`refresh_bases`."""
  bases, taken = list(bases), [None] * len(bases)
  due_of = dict(zip(projected, due))
  for group in per_leaf_stacks(projected, plans, mesh):
    flags = [due_of[i] for i in group]

    def refresh_some(old, group=group, flags=flags):
      new, took = group_refresh(group, dict(zip(group, old)))
      if len(group) == 1:
        return new, took
      keep = lambda flag: lambda n, o: jnp.where(flag, n, o)
      return ([jax.tree.map(keep(f), n, o) for n, o, f in zip(new, old, flags)],
              [t & f for t, f in zip(took, flags)])

    old = [bases[i] for i in group]
    new, took = jax.lax.cond(jnp.any(jnp.stack(flags)), refresh_some,
                             lambda old: (old, [_none_taken(b) for b in old]), old)
    for i, b, t in zip(group, new, took):
      bases[i], taken[i] = b, t
  return tuple(bases), tuple(taken)


def after_bases(mats: dict, done: Sequence[Any]) -> dict:
  """``mats`` once the bases ``done`` (a previous stack's refresh) exist: each plus a zero
  that XLA cannot fold, ``min(refreshes, 0)`` of those bases (a counter, never negative;
  it counts a refresh after checking the new bases are finite, so it waits for them).

  Under a mesh a stack is resharded along its matrices (in float32 on XLA:CPU, which widens
  bf16 collectives) before it is factorized; the stacks of a refresh depend on nothing but
  the gradients, so XLA resharded every leaf's stack right after the backward pass, all
  live at once next to the gradients: a float32 copy of every gradient per device (the 7b
  FSDP=8 refresh step planned 1.31x AdamW).  Chained (:func:`galore_jax._passes.after`), one
  stack's copy is live at a time; ``-0.0`` becomes ``+0.0``, which no factorization tells
  apart.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import leaves, subspace
    >>> done = [subspace.Bases(None, jnp.ones((3, 1)), jnp.int32(2))]
    >>> leaves.after_bases({0: jnp.array([[1.0, -2.0]])}, done)[0].tolist()
    [[1.0, -2.0]]
  """
  return _passes.after(mats, [b.refreshes for b in done])


def after_refresh(mats: Sequence[Any], bases: Sequence[Any]) -> list:
  """Each leaf's matrix ``mats[i]`` once its refreshed ``bases[i]`` exist (as
  :func:`after_bases`), for a step on a mesh that refreshes or may (a ``lax.cond``).  Its
  projection's copies of the gradient (a transposed view; on XLA:CPU a float32 operand)
  depend on nothing but the gradient, so XLA made every leaf's right after the backward
  pass, live across the whole refresh (7b FSDP=8 refresh-step plan 1.01x AdamW's; waiting,
  0.90x; with the refresh in a ``cond``, 0.96x and 0.87x).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from galore_jax import leaves, subspace
    >>> mats = [None, jnp.ones((2, 2))]
    >>> bases = [optax.MaskedNode(), subspace.Bases(None, jnp.ones((2, 1)), jnp.int32(1))]
    >>> [None if m is None else m.tolist() for m in leaves.after_refresh(mats, bases)]
    [None, [[1.0, 1.0], [1.0, 1.0]]]
  """
  return [m if m is None or not isinstance(b, subspace.Bases) else after_bases({0: m}, [b])[0]
          for m, b in zip(mats, bases)]


def stack(pieces: Sequence[jax.Array]) -> jax.Array:
  """Concatenates ``(..., d, e)`` stacks along one flattened batch axis.  Under Explicit
  axes the pieces are first given the first piece's matrix-axis sharding and an unsharded
  batch axis, so the concatenation type-checks.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import leaves
    >>> leaves.stack([jnp.zeros((4, 3)), jnp.zeros((2, 5, 4, 3))]).shape
    (11, 4, 3)
  """
  flat = [_merge_batch(x) for x in pieces]
  first = typed_sharding(flat[0])
  if first is not None and len(flat) > 1:  # (one piece keeps its layer-axis sharding)
    spec = P(None, *tuple(first.spec)[1:])
    flat = [jax.reshard(x, spec) for x in flat]
  return flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=0)


def _merge_batch(x: jax.Array) -> jax.Array:
  """``(..., d, e)`` as ``(B, d, e)``.  Under Explicit axes, several batch axes merge under
  Auto axes: a merge such as experts sharded behind an unsharded layer axis, ``(L, E@t, d,
  e)``, has no block layout of ``B`` that JAX's types can follow, so XLA moves what it must;
  ``B`` comes out sharded over the batch axes' mesh axes where they divide it."""
  if x.ndim == 2:
    return x[None]
  typed = typed_sharding(x)
  if typed is None or x.ndim == 3:
    return x.reshape(-1, *x.shape[-2:])
  spec = tuple(typed.spec) + (None,) * (x.ndim - len(typed.spec))
  names = [a for e in spec[:-2] for a in spec_names(e)]
  shards = math.prod(typed.mesh.shape[a] for a in names)
  merged = tuple(names) if names and math.prod(x.shape[:-2]) % shards == 0 else None
  return jax.sharding.auto_axes(lambda y: y.reshape(-1, *y.shape[-2:]),
                                out_sharding=P(merged, *spec[-2:]))(x)


def _key_stack(group, sizes, leaf_key, sliced):
  """Raw key data ``(sum(sizes), 2)``, one key per matrix of the group (``fold_in`` of
  its leaf's key and its index in the leaf, or in the stack it is a slice of): a plain
  uint32 stack that the spread can pad and shard.  Returns it with the key implementation
  to rewrap it with."""
  leaf_keys = [leaf_key(i) for i in group]
  first = 0 if sliced is None else sliced.index  # the slice's place in the stacked leaf
  data = jnp.concatenate([
      jax.random.key_data(draws.matrix_keys(k, (size,), start=first * size))
      for k, size in zip(leaf_keys, sizes)])
  return data, jax.random.key_impl(leaf_keys[0])


def spread_in_passes(fn, stacks, mesh, extras, out_like) -> list:
  """:func:`galore_jax._spread.spread` of ``fn`` over ``stacks`` (``(B, ...)`` or ``None``),
  in passes of one matrix per device where ``B`` is above ``mesh``'s device count ``n``,
  unsharded or of a layout unknown while tracing (Auto axes): the passes of
  :func:`galore_jax._passes.passes` (where ``n`` divides ``B``, pass ``j`` takes matrices
  ``i * (B // n) + j``; else the stack's ``gcd(B, n)`` runs give ``n / gcd`` matrices each,
  the last pass repeating a few, whose first results are kept), so a stack sharded along
  ``B`` gives each device its own, and each pass waits on the previous one's output (a zero
  XLA cannot fold, :func:`galore_jax._passes.after`, as :func:`after_bases`').

  Spread whole, a layer stack went to its batch layout at once: per device ``B // n`` whole
  matrices in float32 and a relaid copy (7b FSDP=8: 1.3 GiB for an MLP kernel's stack of 32),
  its factorization's workspace next to every gradient; a pass holds one matrix's.

  Example (no mesh: one spread of the whole stack):
    >>> import jax.numpy as jnp
    >>> from galore_jax import leaves
    >>> g = jnp.arange(12.0).reshape(3, 2, 2)
    >>> out, = leaves.spread_in_passes(lambda x: [2 * x], [g], None, (), [g])
    >>> out[:, 0, 1].tolist()
    [2.0, 10.0, 18.0]
  """
  b = next(x.shape[0] for x in stacks if x is not None)
  p = None if mesh is None else _passes.passes(b, mesh.size)
  if p is None or not all(_batch_unsharded(x) for x in (*stacks, *out_like) if x is not None):
    return _spread.spread(fn, stacks, mesh, extras, out_like=out_like)
  runs = lambda xs: [None if x is None else _passes.as_runs(x, p) for x in xs]
  parts, likes, outs = runs(stacks), runs(out_like), []
  for j in range(p.count):
    pass_j = [None if x is None else _whole_batch(_passes.take(x, p, j), p) for x in parts]
    if outs:
      pass_j[0] = _passes.after(pass_j[0], [next(y for y in outs[-1] if y is not None)])
    outs.append(_spread.spread(fn, pass_j, mesh, extras, out_like=[
        None if x is None else _passes.take(x, p, j) for x in likes]))
  return [None if outs[0][k] is None else _passes.joined([o[k] for o in outs], p)
          for k in range(len(outs[0]))]


def _whole_batch(x: jax.Array, p: _passes.Passes) -> jax.Array:
  """A pass ``x`` of several matrices of each run (Auto axes) with its stack axis whole on
  each device, before the spread lays it out along that axis: left to the partitioner, the
  pass's slice took the spread's layout, split over the runs and the matrices of each (8
  devices: 4 x 2), which it could reach from a matrix axis's only through a whole copy of the
  stack.  From a whole stack axis, the spread's layout is one all-to-all."""
  if p.per_run == 1 or typed_sharding(x) is not None:
    return x
  free = P.UNCONSTRAINED
  return jax.lax.with_sharding_constraint(x, P(None, *(free,) * (x.ndim - 1)))


def _batch_unsharded(x: jax.Array) -> bool:
  """Whether the first axis of ``x`` is whole on each device as far as tracing tells (Auto
  axes: unknown, a strided split serves any layout; Explicit axes: its type)."""
  typed = typed_sharding(x)
  return typed is None or padded(typed.spec, x.ndim)[0] is None


def refresh_group(
    group: Sequence[int],
    mats: Sequence[jax.Array | None],
    plans: Sequence[LeafPlan | None],
    bases: Sequence[Any],
    method: subspace.BasisMethod,
    leaf_key: Callable[[int], jax.Array] | None,
    mesh,
    sliced: draws.StackSlice | None = None,
) -> tuple[list[subspace.Bases], list[jax.Array]]:
  """New bases of the leaves of ``group`` (see :func:`groups`), computed by ``method`` from
  their matrices ``mats[i]`` as one stack and accepted through the non-finite guard
  (:func:`galore_jax.guard.accept`), and per leaf the guard's flags: which of its matrices
  took their new basis (:func:`galore_jax.guard.taken`, of the leaf's batch shape).

  Under a ``mesh`` the stack is spread over its devices, each factorizing its share.
  ``bases[i]`` is leaf ``i``'s current :class:`~galore_jax.subspace.Bases` (the warm start);
  ``leaf_key(i)`` its PRNG key when the method draws (``None``: it gets none).  Each matrix
  draws from its own key (``fold_in`` of its leaf's key and its index in the leaf, or with
  ``sliced`` in the stacked leaf it is a slice of), so a basis is the same whichever stack it
  is in.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import leaves, plans, subspace
    >>> tree = [jnp.diag(jnp.array([1.0, 3.0, 2.0]))]
    >>> lp = plans.leaf_plans(tree, None, None, 1, "std")
    >>> old = [leaves.zero_bases(lp[0], jnp.float32)]
    >>> (new,), (taken,) = leaves.refresh_group([0], tree, lp, old, subspace.SVD(), None, None)
    >>> new.right[:, 0].tolist(), int(new.refreshes), bool(taken)
    ([0.0, 1.0, 0.0], 1, True)
  """
  plan = plans[group[0]]
  sizes = [math.prod(plans[i].view.batch_shape) for i in group]
  g = stack([mats[i] for i in group])
  prev_l = stack([bases[i].left for i in group]) if plan.left else None
  prev_r = stack([bases[i].right for i in group]) if plan.right else None
  refreshes = jnp.max(jnp.stack([bases[i].refreshes for i in group]))
  keys, impl = (None, None) if leaf_key is None else _key_stack(group, sizes, leaf_key, sliced)

  def compute(g, prev_l, prev_r, keys, refreshes):
    if keys is not None:
      keys = jax.random.wrap_key_data(keys, impl=impl)
    return subspace.compute_bases(
        g, plan.rank, left=plan.left, right=plan.right, method=method,
        prev=subspace.Bases(prev_l, prev_r, refreshes), key=keys)

  p, q = spread_in_passes(compute, [g, prev_l, prev_r, keys], mesh, (refreshes,),
                          (prev_l, prev_r))
  out, taken, start = [], [], 0
  for i, size in zip(group, sizes):

    def piece(x, like):  # (in the leaf's own layout: the stack's is the first leaf's)
      return None if x is None else reshaped_like(x[start:start + size], like)

    left, right = piece(p, bases[i].left), piece(q, bases[i].right)
    out.append(guard.accept(left, right, bases[i]))
    taken.append(guard.taken(left, right, bases[i]))
    start += size
  return out, taken


def refreshed(old: Sequence[Any], new: Sequence[Any], taken: Sequence[Any] | None = None
              ) -> list:
  """Per leaf, whether its bases were refreshed by this step (a refresh was due and the
  non-finite guard took at least one new matrix): a boolean, or with ``taken`` (the guard's
  per-matrix flags that :func:`refresh_bases` returns) for a leaf that stacks matrices one
  per matrix, true where it took a new basis (a stack may be refreshed in part: a NaN in
  some layers' gradients).  ``False`` (a Python bool) for leaves that are not projected,
  and for a basis that is the old one itself (a step the host decided not to refresh):
  nothing downstream then branches on it.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from galore_jax import leaves, subspace
    >>> b = lambda n: subspace.Bases(None, jnp.zeros((2, 1)), jnp.int32(n))
    >>> [bool(x) for x in leaves.refreshed([optax.MaskedNode(), b(1)],
    ...                                    [optax.MaskedNode(), b(2)])]
    [False, True]
    >>> s = lambda n: subspace.Bases(None, jnp.zeros((3, 2, 1)), jnp.int32(n))  # a stack
    >>> leaves.refreshed([s(1)], [s(2)], [jnp.array([True, False, True])])[0].tolist()
    [True, False, True]
  """
  taken = [None] * len(old) if taken is None else taken
  return [False if not isinstance(o, subspace.Bases) or n is o
          else t if t is not None and jnp.ndim(t) else n.refreshes > o.refreshes
          for o, n, t in zip(old, new, taken)]


def refresh_bases(
    refresh: refresh_lib.RefreshPolicy,
    method: subspace.BasisMethod,
    count: jax.Array,
    refresh_state: Any,
    rng_key: jax.Array | None,
    bases: Sequence[Any],
    leaves: Sequence[Any],
    plans: Sequence[LeafPlan | None],
    host_due: bool | None = None,
    sliced: draws.StackSlice | None = None,
) -> tuple:
  """Stored bases after this step's refreshes, and per leaf the guard's flags (which of its
  matrices took a new basis, for :func:`refreshed`; ``None`` for a leaf that is not
  projected): the leaves the policy says are due get new bases by :func:`refresh_group`
  (through the non-finite guard).  A shared policy refreshes every leaf in one ``lax.cond``
  (other steps pay nothing), a per-leaf one runs a ``lax.cond`` per leaf (under a mesh,
  per stack of :func:`per_leaf_stacks`).
  ``host_due`` (a Python bool, see :func:`galore_jax.refresh.host_decision`) replaces a
  shared policy's decision and the ``cond``: the step holds the refresh or not, and no
  branch (on a GPU a ``cond`` copies its predicate to the host and waits for it, a sync per
  step).  Under a mesh, same-shaped leaves form one stack spread over the devices
  (:func:`stacks`).  Leaf ``i``'s refresh at step
  ``count`` draws from ``fold_in(fold_in(rng_key, i), count)`` when ``method`` needs a key
  (for a slice of stacked leaves, ``sliced``, as the stacked leaf would:
  :class:`~galore_jax.draws.StackSlice`), and so does a method that draws only to start
  cold, with ``rng_key`` ``key(0)`` when ``None``
  (:attr:`~galore_jax.subspace.BasisMethod.cold_key`).

  The leaves enter the ``cond`` as they are and become matrices inside the refresh branch:
  a matrix view that transposes (a ``(L, in, out)`` kernel as ``(L, out, in)``), built
  outside, would be a ``cond`` operand, so XLA would write every gradient transposed on
  every step; inside, a normal step's only transpose feeds the projection's matmul, which
  takes it as its dimension numbers.

  Example:
    >>> import jax.numpy as jnp
    >>> import galore_jax as gj
    >>> from galore_jax import leaves, plans, subspace
    >>> g = [jnp.diag(jnp.array([1.0, 3.0, 2.0]))]
    >>> lp = plans.leaf_plans(g, None, None, 1, "std")
    >>> old = [leaves.zero_bases(lp[0], jnp.float32)]
    >>> (new,), (taken,) = leaves.refresh_bases(gj.every(2), subspace.SVD(), jnp.int32(0),
    ...                                         None, None, old, g, lp)
    >>> new.right[:, 0].tolist(), int(new.refreshes), bool(taken)
    ([0.0, 1.0, 0.0], 1, True)
  """
  projected = [i for i, plan in enumerate(plans) if plan is not None]
  if not projected:  # nothing to refresh (the policy's state is a stand-in: policy_init)
    return tuple(bases), (None,) * len(bases)
  due = (refresh_lib.due_now(refresh, count, refresh_state, len(projected))
         if host_due is None else host_due)
  mesh = context_mesh(leaves)

  offset = 0 if sliced is None else sliced.leaf_offset
  seed = jax.random.key(0) if rng_key is None else rng_key  # a cold_key method's default
  leaf_key = lambda i: draws.leaf_key(seed, i + offset, count)
  keyed = method.needs_key or method.cold_key

  def group_refresh(group, bases, after=None):
    mats = {i: projection.to_matrix(leaves[i], plans[i].view) for i in group}
    if after is not None:
      mats = after_bases(mats, after)
    return refresh_group(
        group, mats, plans, bases, method, leaf_key if keyed else None, mesh, sliced)

  if not refresh.shared:
    return _refresh_due(projected, due, bases, plans, mesh, group_refresh)
  found = stacks(projected, plans, mesh)

  def refresh_all(bases):
    bases, taken, after = list(bases), [None] * len(bases), None
    for group in found:
      new, took = group_refresh(group, bases, after if mesh is not None else None)
      for i, b, t in zip(group, new, took):
        bases[i], taken[i] = b, t
      after = new
    return tuple(bases), tuple(taken)

  def refresh_none(bases):
    return bases, tuple(None if plan is None else _none_taken(b) for b, plan in zip(bases, plans))

  if host_due is not None:
    return refresh_all(bases) if host_due else refresh_none(tuple(bases))
  return jax.lax.cond(due, refresh_all, refresh_none, tuple(bases))


def regenerate(
    refresh: refresh_lib.RefreshPolicy,
    method: subspace.BasisMethod,
    count: jax.Array,
    refresh_state: Any,
    rng_key: jax.Array,
    bases: Sequence[Any],
    mats: Sequence[jax.Array | None],
    plans: Sequence[LeafPlan | None],
    sliced: draws.StackSlice | None = None,
    host_due: bool | None = None,
) -> tuple[list, list]:
  """For a method that does not read the gradient (``method.reads_gradient`` false):
  bases regenerated from the key instead of stored.  The state keeps, per leaf, only the
  refresh counter :math:`c` (a :class:`~galore_jax.subspace.Bases` without arrays); a
  refresh due at this step (the policy's ``due``) adds one to it, and the basis is
  ``method`` drawn from ``fold_in(fold_in(rng_key, i), c)`` for leaf ``i``, one key per
  matrix of its stack (:func:`galore_jax.draws.matrix_keys`; for a slice of stacked
  leaves, ``sliced``, as the stacked leaf would draw it), at every step.  The
  non-finite guard has nothing to do: such a basis is finite whatever the gradient.
  ``host_due`` (a Python bool, :func:`galore_jax.refresh.host_decision`) replaces a shared
  policy's decision.

  Returns:
    ``(stored, now)``: per leaf, the bases to store (counters) and this step's bases with
    their arrays.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import galore_jax as gj
    >>> from galore_jax import leaves, plans, subspace
    >>> g = [jnp.zeros((6, 4))]
    >>> lp = plans.leaf_plans(g, None, None, 2, "std")
    >>> old = [leaves.zero_bases(lp[0], jnp.float32, stored=False)]
    >>> (stored,), (now,) = leaves.regenerate(gj.every(2), subspace.Gaussian(), jnp.int32(0),
    ...                                       None, jax.random.key(0), old, g, lp)
    >>> stored.right is None, int(stored.refreshes), now.right.shape
    (True, 1, (4, 2))
  """
  stored, now = list(bases), list(bases)
  if all(plan is None for plan in plans):  # nothing to draw (nor a policy state to read)
    return stored, now
  projected = sum(plan is not None for plan in plans)
  due = (refresh_lib.due_now(refresh, count, refresh_state, projected)
         if host_due is None else jnp.asarray(host_due))
  for j, (i, plan) in enumerate((i, p) for i, p in enumerate(plans) if p is not None):
    flag = due if refresh.shared else due[j]
    counter = bases[i].refreshes + flag.astype(bases[i].refreshes.dtype)
    stored[i] = bases[i]._replace(refreshes=counter)
    offset = 0 if sliced is None else sliced.leaf_offset
    keys = draws.slice_keys(draws.leaf_key(rng_key, i + offset, counter),
                               plan.view.batch_shape, sliced)
    one = sliced is not None and not plan.view.batch_shape  # drawn as a stack of one
    g = mats[i][None] if one else mats[i]
    left, right = method(g, plan.rank, left=plan.left, right=plan.right, prev=None, key=keys)
    if one:
      left, right = (None if x is None else x[0] for x in (left, right))
    now[i] = subspace.Bases(left, right, counter)
  return stored, now


def policy_init(refresh: refresh_lib.RefreshPolicy, plans: Sequence[LeafPlan | None]) -> Any:
  """The refresh policy's initial state for the projected leaves of ``plans``.  With none
  (a transform whose mask selects nothing, or the rest of a model whose layers are updated
  apart) it is the state of one leaf, which nothing reads: zero-size arrays would make
  Orbax refuse the whole checkpoint, and the state keeps the structure it has with
  projected leaves (``optax.tree.map_params`` builds it from placeholders, which project
  nothing).

  Example:
    >>> import jax.numpy as jnp
    >>> import galore_jax as gj
    >>> from galore_jax import leaves, plans
    >>> leaves.policy_init(gj.staggered(4), [None]).tolist()
    [0]
    >>> leaves.policy_init(gj.staggered(4), plans.leaf_plans([jnp.ones((4, 4))] * 2, None,
    ...                                                      None, 2, "std")).tolist()
    [0, 2]
  """
  return refresh.init(max(sum(plan is not None for plan in plans), 1))


def policy_update(
    refresh: refresh_lib.RefreshPolicy,
    count: jax.Array,
    refresh_state: Any,
    old_bases: Sequence[Any],
    new_bases: Sequence[Any],
    refreshed: Sequence[Any],
) -> Any:
  """The refresh policy's state after this step: which leaves refreshed (for a shared
  policy, whether all did) and, for policies that read it, each refreshed leaf's basis
  similarity (0 where it did not refresh; ``old_bases`` / ``new_bases`` with their arrays).
  ``refreshed`` is :func:`refreshed`'s: a leaf whose flags are per matrix refreshed if any
  matrix did, and its similarity averages over those matrices only (a layer whose basis
  the guard kept would read 1.0, as if its subspace had settled) that had a basis before (a
  layer's first one, its earlier refreshes rejected, would read its overlap with zero).

  Example:
    >>> import jax.numpy as jnp
    >>> import galore_jax as gj
    >>> from galore_jax import leaves
    >>> leaves.policy_update(gj.every(2), jnp.int32(0), None, [], [], []) is None
    True
  """
  projected = [i for i, flag in enumerate(refreshed) if flag is not False]
  if not projected:  # no projected leaf: its state is a stand-in (policy_init)
    return refresh_state
  per_matrix = {i: refreshed[i] for i in projected if jnp.ndim(refreshed[i])}
  took = jnp.stack([jnp.any(per_matrix[i]) if i in per_matrix else refreshed[i]
                    for i in projected])
  took = jnp.all(took) if refresh.shared else took
  similarity = jnp.zeros((len(projected),), jnp.float32)
  if refresh.uses_similarity:
    # A first basis (a leaf's or a matrix's earlier refreshes rejected, say) has none to be
    # compared with; a stored basis is orthonormal, so a matrix has one where it is not zero.
    compared = {i: flags & jnp.any(old_bases[i].basis != 0, axis=(-2, -1))
                for i, flags in per_matrix.items()}
    similarity = jnp.where(took, jnp.stack([
        refresh_lib.basis_similarity(old_bases[i].basis, new_bases[i].basis,
                                     taken=compared.get(i))
        for i in projected
    ]), 0.0)
    took = took & jnp.stack([jnp.any(compared[i]) if i in compared
                             else old_bases[i].refreshes > 0 for i in projected])
  return refresh.update(refresh_state, count, took, similarity)


def warn_if_no_savings(plans: Sequence[LeafPlan | None], name: str, stored: bool = True
                       ) -> None:
  """Warns (once, naming the leaves) where a projected leaf's low-rank state -- its bases
  and two coefficient-shaped moments, as with Adam -- is no smaller than Adam's two
  full-shape moments: per matrix, left ``r (m + 2n) >= 2mn``, right ``r (n + 2m) >= 2mn``.
  Such a rank (at or above about half the smaller side) costs memory instead of saving it.
  ``stored=False`` (bases regenerated from the key): the moments alone, ``r >= min(m, n)``.
  Where no leaf at all is projected (a mask that selects none, or selects only leaves that
  are not matrices) it warns that every leaf is updated at full rank: a warning, as that may
  be meant (the rest of a model whose layers are updated apart).

  Example:
    >>> import warnings
    >>> import jax.numpy as jnp
    >>> from galore_jax import leaves, plans
    >>> lp = plans.leaf_plans({"w": jnp.zeros((8, 8))}, None, None, 6, "std")
    >>> with warnings.catch_warnings(record=True) as caught:
    ...   warnings.simplefilter("always")
    ...   leaves.warn_if_no_savings(lp, "galore_projection")
    >>> print(caught[0].message)
    galore_projection: rank saves no optimizer memory at ['w'] (bases plus two low-rank moments hold at least as much as Adam's two full moments); lower the rank or leave the leaf out with mask.
  """
  if plans and all(plan is None for plan in plans):  # (no plans: a params stand-in)
    warnings.warn(
        f"{name}: no leaf is projected (the mask selects none, or none that it selects is a"
        " non-empty real matrix): every leaf is updated at full rank, saving no memory.",
        UserWarning, stacklevel=3)
    return
  wasted = []
  for plan in plans:
    if plan is None:
      continue
    v, r = plan.view, plan.rank
    basis = (v.m * r if plan.left else 0) + (v.n * r if plan.right else 0)
    moments = (r if plan.left else v.m) * (r if plan.right else v.n)
    if basis * stored + 2 * moments >= 2 * v.m * v.n:
      wasted.append(plan.where)
  if wasted:
    held = "bases plus two low-rank moments hold" if stored else "two low-rank moments hold"
    warnings.warn(
        f"{name}: rank saves no optimizer memory at {', '.join(wasted)} ({held} at least"
        " as much as Adam's two full moments); lower the rank or leave the leaf out with"
        " mask.", UserWarning, stacklevel=3)


class _PerLeaf:
  """Stands, in a state initialised on a params stand-in, for a per-leaf tuple."""

  def __repr__(self):
    return "PerLeaf()"


def per_leaf_tuple(values: Sequence[Any], params: Any) -> Any:
  """``values`` (one per leaf of ``params``) as a state field: a tuple.  For a params
  stand-in with no leaves -- what ``optax.tree.map_params`` initialises a transform on, to
  find the params-shaped parts of its state -- one opaque leaf instead, so that the tuple,
  which is not params-shaped, is left alone (or handed whole to ``transform_non_params``).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import leaves
    >>> leaves.per_leaf_tuple([1, 2], {"a": jnp.zeros(2), "b": jnp.zeros(3)})
    (1, 2)
  """
  stand_in = (not jax.tree.leaves(params) and jax.tree.structure(params).num_nodes == 1
              and not isinstance(params, (dict, list, tuple, type(None))))
  return _PerLeaf() if stand_in else tuple(values)

"""Leaf machinery shared by the projecting transforms (``galore_projection``,
``scale_by_ldadam``): zero state of projected leaves and the refresh of their bases, stacked
over same-shaped leaves and spread over a mesh's devices.

Every function takes the leaves of a tree in ``jax.tree.leaves`` order with their
:class:`~galore_jax.plans.LeafPlan` s (``None`` for a leaf that is not projected).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from galore_jax import _spread
from galore_jax import guard
from galore_jax import projection
from galore_jax import subspace
from galore_jax._explicit import sharding_of
from galore_jax._explicit import typed_sharding
from galore_jax._explicit import zeros
from galore_jax.flax_metadata import in_variable
from galore_jax.flax_metadata import with_leaf_specs
from galore_jax.plans import LeafPlan
from galore_jax.sharding import basis_spec
from galore_jax.sharding import coefficient_spec


def check_fits(num_state_leaves: int, leaves: Sequence[Any], name: str) -> None:
  """A ``ValueError`` unless a state made for ``num_state_leaves`` leaves fits ``leaves``.

  Example:
    >>> from galore_jax import leaves
    >>> leaves.check_fits(2, [1.0], "galore_projection")
    Traceback (most recent call last):
    ...
    ValueError: galore_projection state has 2 leaves but the updates have 1: was the state made for other params?
  """
  if num_state_leaves != len(leaves):
    raise ValueError(
        f"{name} state has {num_state_leaves} leaves but the updates have {len(leaves)}:"
        " was the state made for other params?"
    )


def zero_bases(plan: LeafPlan, dtype, like=None, item=None) -> subspace.Bases:
  """Zero bases of a leaf; sharded by the rules of :mod:`galore_jax.sharding` when the
  leaf's sharding ``like`` is known, and carrying those rules in their metadata when the
  param is a Flax variable ``item``.

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
    return in_variable(item, z, lambda s: basis_spec(s, plan.view, side))

  return subspace.Bases(
      left=side_zeros(m, "left") if plan.left else None,
      right=side_zeros(n, "right") if plan.right else None,
      refreshes=zeros([], jnp.int32, like, P()),
  )


def coefficient_zeros(plan: LeafPlan, leaf) -> jax.Array:
  """Zeros shaped (and sharded) like the leaf's low-rank coefficients.

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
  spec = coefficient_spec(None if like is None else like.spec, plan.view, plan.left, plan.right)
  return zeros(shape, leaf.dtype, like, spec)


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
      None if plan is None else
      (lambda spec, plan=plan: coefficient_spec(spec, plan.view, plan.left, plan.right))
      for plan in plans
  ])


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
  flat = [x.reshape(-1, *x.shape[-2:]) if x.ndim != 2 else x[None] for x in pieces]
  first = typed_sharding(flat[0])
  if first is not None and len(flat) > 1:  # (one piece keeps its layer-axis sharding)
    spec = P(None, *tuple(first.spec)[1:])
    flat = [jax.reshard(x, spec) for x in flat]
  return flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=0)


def _key_stack(group, sizes, leaf_key):
  """Raw key data ``(sum(sizes), 2)``, one key per matrix of the group (``fold_in`` of
  its leaf's key and its index in the leaf): a plain uint32 stack that the spread can pad
  and shard.  Returns it with the key implementation to rewrap it with."""
  leaf_keys = [leaf_key(i) for i in group]
  data = jnp.concatenate([
      jax.random.key_data(subspace.matrix_keys(k, (size,)))
      for k, size in zip(leaf_keys, sizes)])
  return data, jax.random.key_impl(leaf_keys[0])


def refresh_group(
    group: Sequence[int],
    mats: Sequence[jax.Array | None],
    plans: Sequence[LeafPlan | None],
    bases: Sequence[Any],
    method: subspace.BasisMethod,
    leaf_key: Callable[[int], jax.Array] | None,
    mesh,
) -> list[subspace.Bases]:
  """New bases of the leaves of ``group`` (see :func:`groups`), computed by ``method`` from
  their matrices ``mats[i]`` as one stack and accepted through the non-finite guard
  (:func:`galore_jax.guard.accept`).

  Under a ``mesh`` the stack is spread over its devices, each factorizing its share.
  ``bases[i]`` is leaf ``i``'s current :class:`~galore_jax.subspace.Bases` (the warm start);
  ``leaf_key(i)`` its PRNG key when the method needs one.  Each matrix draws from its own
  key (``fold_in`` of its leaf's key and its index in the leaf), so a basis is the same
  whichever stack it is in.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import leaves, plans, subspace
    >>> tree = [jnp.diag(jnp.array([1.0, 3.0, 2.0]))]
    >>> lp = plans.leaf_plans(tree, None, None, 1, "std")
    >>> old = [leaves.zero_bases(lp[0], jnp.float32)]
    >>> (new,) = leaves.refresh_group([0], tree, lp, old, subspace.SVD(), None, None)
    >>> new.right[:, 0].tolist(), int(new.refreshes)
    ([0.0, 1.0, 0.0], 1)
  """
  plan = plans[group[0]]
  sizes = [math.prod(plans[i].view.batch_shape) for i in group]
  g = stack([mats[i] for i in group])
  prev_l = stack([bases[i].left for i in group]) if plan.left else None
  prev_r = stack([bases[i].right for i in group]) if plan.right else None
  refreshes = jnp.max(jnp.stack([bases[i].refreshes for i in group]))
  keys, impl = _key_stack(group, sizes, leaf_key) if method.needs_key else (None, None)

  def compute(g, prev_l, prev_r, keys, refreshes):
    if keys is not None:
      keys = jax.random.wrap_key_data(keys, impl=impl)
    return subspace.compute_bases(
        g, plan.rank, left=plan.left, right=plan.right, method=method,
        prev=subspace.Bases(prev_l, prev_r, refreshes), key=keys)

  p, q = _spread.spread(compute, [g, prev_l, prev_r, keys], mesh, (refreshes,))
  out, start = [], 0
  for i, size in zip(group, sizes):
    batch = plans[i].view.batch_shape

    def piece(x):
      return None if x is None else x[start:start + size].reshape(*batch, *x.shape[-2:])

    out.append(guard.accept(piece(p), piece(q), bases[i]))
    start += size
  return out


def refreshed(old: Sequence[Any], new: Sequence[Any]) -> list:
  """One boolean per leaf: whether its bases were refreshed by this step (a refresh was
  due and the non-finite guard took at least one new matrix).  ``False`` (a Python bool)
  for leaves that are not projected.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from galore_jax import leaves, subspace
    >>> b = lambda n: subspace.Bases(None, jnp.zeros((2, 1)), jnp.int32(n))
    >>> [bool(x) for x in leaves.refreshed([optax.MaskedNode(), b(1)],
    ...                                    [optax.MaskedNode(), b(2)])]
    [False, True]
  """
  return [n.refreshes > o.refreshes if isinstance(o, subspace.Bases) else False
          for o, n in zip(old, new)]

"""Per-leaf plans: which leaves are projected, and how.

A transform resolves its ``mask``, ``dimension_numbers`` and ``rank`` against the params
(or updates) leaf by leaf into one :class:`LeafPlan` per projected leaf (``None`` for the
others): the leaf's matrix view, its rank clipped to the matrix, and the sides its bases
sit on by the ``proj_type`` side rule.  Plans are static Python data, recomputed from
shapes at ``init`` and at every traced ``update``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from galore_jax import _checks
from galore_jax.projection import DimensionNumbers
from galore_jax.projection import MatrixView
from galore_jax.projection import matrix_view
from galore_jax.projection import projection_sides


class LeafPlan(NamedTuple):
  """Static per-leaf recipe: how the leaf is a stack of matrices and where it is
  projected.

  Attributes:
    view: the leaf as matrices ``(*batch, m, n)``.
    rank: ``r``, at most ``min(m, n)``.
    left: a left basis ``(*batch, m, r)`` is kept.
    right: a right basis ``(*batch, n, r)`` is kept.
    where: the leaf's path (for messages).
    shard_rank: whether the coefficients' rank axis may take the mesh axes the projected
      side frees, where the other side does not divide them
      (:func:`galore_jax.projection.coefficient_matrix_spec`); ``False`` for a projection
      regenerated unsharded at every step (APOLLO's random one), against which XLA would
      gather the whole gradient to produce rank-sharded coefficients.

  Example:
    >>> import jax.numpy as jnp
    >>> import galore_jax as gj
    >>> from galore_jax import plans
    >>> kernel = jnp.zeros((4, 16, 32))                  # (layers, in, out)
    >>> (plan,) = plans.leaf_plans([kernel], True, gj.DimensionNumbers(1, 2), 8, "std")
    >>> plan.view.batch_shape, plan.view.m, plan.view.n, plan.rank, plan.right
    ((4,), 32, 16, 8, True)
  """

  view: MatrixView
  rank: int
  left: bool
  right: bool
  where: str = "leaf"
  shard_rank: bool = True


def _selected(tree, mask, dims, single_dims: bool, shapes, where) -> list[bool]:
  """Which leaves the mask selects (default: 2-D leaves, or those with dimension
  numbers when they are given per leaf)."""
  if mask is None:
    if single_dims:
      return [len(s) == 2 for s in shapes]
    return [d is not None for d in dims]
  selected = per_leaf(mask, tree, "mask")
  for sel, w in zip(selected, where):
    if not _checks.is_bool(sel):
      raise ValueError(f"mask must hold bools; at {w} it holds {sel!r}.")
  selected = [bool(s) for s in selected]
  if not single_dims:
    selected = [s and d is not None for s, d in zip(selected, dims)]
  return selected


def leaf_plans(
    tree: Any,
    mask: Any,
    dimension_numbers: Any,
    rank: Any,
    proj_type: str,
) -> list[LeafPlan | None]:
  """Resolves, leaf by leaf, whether and how ``tree``'s leaves are projected.

  Args:
    tree: params or updates (only paths and shapes are read).
    mask: ``None`` or a bool pytree / prefix / callable (optax convention).
    dimension_numbers: ``None``, one :class:`~galore_jax.DimensionNumbers`, a pytree of
      them (``None`` = not a matrix) or a callable of ``tree`` returning one.
    rank: an int, a pytree prefix of ints or a callable; clipped to ``min(m, n)``.
    proj_type: the side rule (:func:`galore_jax.projection.projection_sides`).

  Returns:
    One :class:`LeafPlan` per projected leaf, ``None`` for the others (the unselected,
    non-float and empty ones), in ``jax.tree.leaves`` order.

  Raises:
    ValueError: naming the argument (and the leaf) that does not fit.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import plans
    >>> tree = {"b": jnp.zeros(4), "w": jnp.zeros((6, 4))}
    >>> b, w = plans.leaf_plans(tree, None, None, 8, "std")
    >>> b is None, w.rank, w.left, w.right          # rank clipped to min(6, 4)
    (True, 4, False, True)
  """
  paths_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  shapes = [jnp.shape(leaf) for _, leaf in paths_leaves]
  where = [jax.tree_util.keystr(path) or "<root>" for path, _ in paths_leaves]
  if callable(dimension_numbers) and not isinstance(dimension_numbers, DimensionNumbers):
    dimension_numbers = dimension_numbers(tree)  # then a single value acts as one given so
  single_dims = dimension_numbers is None or isinstance(dimension_numbers, DimensionNumbers)
  if mask is None and isinstance(dimension_numbers, DimensionNumbers):
    _check_fits_two_dims(dimension_numbers)
  dims = per_leaf(dimension_numbers, tree, "dimension_numbers")
  selected = _selected(tree, mask, dims, single_dims, shapes, where)
  ranks = per_leaf(rank, tree, "rank")
  plans = []
  for sel, (_, leaf), shape, d, r, w in zip(selected, paths_leaves, shapes, dims, ranks, where):
    if not (sel and _projectable(leaf, w)) or 0 in shape:  # an empty leaf has no subspace
      plans.append(None)
      continue
    view = matrix_view(shape, d, w)
    r = min(_checks.rank(r, f" for {w}"), view.m, view.n)
    plans.append(LeafPlan(view, r, *projection_sides(proj_type, view.m, view.n), w))
  return plans


def _check_fits_two_dims(dims: DimensionNumbers) -> None:
  """With ``mask=None`` only 2-D leaves are selected: one set of dimension numbers that
  names a third axis (from either end) fits none of them (an N-D kernel it was meant for
  would go unprojected, or a 2-D leaf would fail), so it is refused in one line."""
  axes = [a for field in dims for a in (field if isinstance(field, (tuple, list)) else (field,))]
  beyond = [a for a in axes if not -2 <= a < 2]  # (from either end)
  if beyond:
    raise ValueError(
        f"dimension_numbers={dims!r} names axis {max(beyond, key=abs)}, but mask=None selects"
        " only 2-D leaves: give a mask selecting the N-D leaves it describes, or a pytree of"
        " dimension numbers (None for the leaves that are not matrices).")


def _projectable(leaf, where: str) -> bool:
  """Real floating leaves are projected; integer and bool leaves never are (they have no
  subspace); complex ones are refused: the bases and their factorisations are real."""
  _checks.real_array(leaf, where, "complex leaves cannot be projected; leave it out with mask"
                     " (it then goes through the inner transform at full shape).")
  return bool(jnp.issubdtype(jnp.result_type(leaf), jnp.floating))


class _Box:
  """Holds one per-leaf value so that ``None`` survives tree flattening."""

  __slots__ = ("value",)

  def __init__(self, value):
    self.value = value


def per_leaf(
    value: Any,
    tree: Any,
    name: str,
    is_value: Callable[[Any], bool] = lambda x: x is None,
) -> list[Any]:
  """Resolves a per-leaf argument against ``tree`` into a flat list.

  ``value`` is a single value for every leaf, a pytree prefix of ``tree`` (its
  leaves broadcast over the matching subtrees), or a callable of ``tree``
  returning either.  Values for which ``is_value`` is true are leaves even if
  they are pytree nodes (``None``, ``DimensionNumbers``).

  Returns:
    One value per leaf of ``tree``, in ``jax.tree.leaves`` order.

  Raises:
    ValueError: naming ``name`` if the structure does not fit ``tree``.

  Example:
    >>> from galore_jax import plans
    >>> tree = {"a": {"x": 1.0, "y": 2.0}, "b": 3.0}
    >>> plans.per_leaf({"a": 8, "b": None}, tree, "rank")
    [8, 8, None]
  """
  if callable(value) and not isinstance(value, DimensionNumbers):
    value = value(tree)

  def is_leaf(x):
    return is_value(x) or isinstance(x, DimensionNumbers)

  def spread(v, subtree):
    return jax.tree.map(lambda _: _Box(v), subtree)

  try:
    boxed = jax.tree.map(spread, value, tree, is_leaf=is_leaf)
  except (ValueError, TypeError) as e:
    details = " ".join(str(e).split())  # JAX's explanation spans lines: keep one
    raise ValueError(
        f"{name}: its structure does not match the params/updates tree (it must"
        f" be a single value, a pytree prefix of params, or a callable of"
        f" params returning one). Details: {details}"
    ) from None
  return [b.value for b in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, _Box))]

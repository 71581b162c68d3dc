"""Which leaves to project: ready masks and per-leaf argument resolution."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from galore_jax import projection

# A key containing one of these marks a leaf that GaLore leaves to the inner
# optimizer at full shape, as the paper does for embeddings, the untied output
# head and the norms.
_EXCLUDED = ("embed", "lm_head", "norm", "logit")


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def linear_kernels(params: Any) -> Any:
  """Mask selecting the attention and MLP kernels of a Flax model.

  A leaf is selected when its path has a key named ``kernel`` (Flax ``Linear``,
  ``LinearGeneral``, ``Einsum`` and Linen ``Dense`` weights), it has at least two
  axes, and no key of its path names an embedding, the output head or a norm
  (``embed``, ``lm_head``, ``norm``, ``logit``, or a key equal to ``head``).
  Embeddings, ``lm_head``, norm scales and biases are left to the inner
  optimizer at full shape, as in the paper.  Kernels with more than two axes
  also need ``dimension_numbers``.

  Args:
    params: a pytree of parameters (or updates; only paths and shapes are read).

  Returns:
    A pytree of bools with the structure of ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> import galore_jax as gj
    >>> params = {"embed": {"embedding": jnp.zeros((10, 4))},
    ...           "mlp": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)},
    ...           "lm_head": {"kernel": jnp.zeros((4, 10))}}
    >>> gj.linear_kernels(params)
    {'embed': {'embedding': False}, 'lm_head': {'kernel': False}, 'mlp': {'bias': False, 'kernel': True}}
  """

  def select(path, leaf) -> bool:
    names = [_key_name(k).lower() for k in path]
    if "kernel" not in names or len(np.shape(leaf)) < 2:
      return False
    return not any(
        name == "head" or any(word in name for word in _EXCLUDED)
        for name in names
    )

  return jax.tree_util.tree_map_with_path(select, params)


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
    >>> from galore_jax import targets
    >>> tree = {"a": {"x": 1.0, "y": 2.0}, "b": 3.0}
    >>> targets.per_leaf({"a": 8, "b": None}, tree, "rank")
    [8, 8, None]
  """
  if callable(value) and not isinstance(value, projection.DimensionNumbers):
    value = value(tree)

  def is_leaf(x):
    return is_value(x) or isinstance(x, projection.DimensionNumbers)

  def spread(v, subtree):
    return jax.tree.map(lambda _: _Box(v), subtree)

  try:
    boxed = jax.tree.map(spread, value, tree, is_leaf=is_leaf)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{name}: its structure does not match the params/updates tree (it must"
        f" be a single value, a pytree prefix of params, or a callable of"
        f" params returning one). Details: {e}"
    ) from None
  return [b.value for b in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, _Box))]

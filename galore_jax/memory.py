"""Optimizer-state memory accounting."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def tree_bytes(tree: Any) -> int:
  """Bytes held by the array leaves of ``tree`` (arrays or ShapeDtypeStructs).

  Use it on an optimizer state -- real, or abstract from ``jax.eval_shape`` so
  that nothing is allocated -- to compare optimizers.  For GaLore on an
  ``m x n`` matrix (``m <= n``) with Adam this counts the paper's
  :math:`mr + 2nr` (basis plus two moments) instead of AdamW's :math:`2mn`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import galore_jax as gj
    >>> params = {"w": jax.ShapeDtypeStruct((1024, 256), jnp.float32)}
    >>> adamw = jax.eval_shape(optax.adamw(1e-3).init, params)
    >>> galore = jax.eval_shape(gj.galore_adamw(1e-3, rank=32).init, params)
    >>> gj.tree_bytes(adamw), gj.tree_bytes(galore)
    (2097156, 294924)
    >>> gj.tree_bytes({"key": jax.random.key(0)})   # typed keys count too
    8
  """
  return int(
      sum(
          # .itemsize of the dtype itself: typed PRNG key dtypes have one too.
          np.prod(leaf.shape, dtype=np.int64) * leaf.dtype.itemsize
          for leaf in jax.tree.leaves(tree)
          if hasattr(leaf, "shape") and hasattr(leaf, "dtype")
      )
  )

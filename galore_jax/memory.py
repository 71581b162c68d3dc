r"""Memory accounting: bytes of a state as it is, and a closed form per optimizer.

:func:`tree_bytes` counts what a state holds (real, or abstract from ``jax.eval_shape``).
:func:`estimate` gives the same from a formula, split the papers' way into weights,
gradients and optimizer state, for a params tree of any size (nothing is traced or
allocated, so a 7B plan takes milliseconds).  Per projected ``m x n`` matrix with rank
:math:`r` (``std`` side rule: the basis on the smaller side) the state holds, in elements:

=================== ==========================================================
``adamw``           :math:`2mn` (two moments)
``galore_adamw``    :math:`\min(m, n)\, r + 2\max(m, n)\, r` (basis, two low-rank moments)
``ldadamw``         the same plus :math:`mn` with error feedback (the error buffer)
=================== ==========================================================

and unprojected leaves hold Adam's two full moments.  Scalar counters (step counts, a
refresh count per projected leaf: a few bytes) are left out.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from galore_jax import plans as plans_lib

OPTIMIZERS = ("adamw", "galore_adamw", "ldadamw")


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


class MemoryEstimate(NamedTuple):
  """Bytes of one training step's model-sized buffers, the papers' way.

  Attributes:
    weights: the params.
    gradients: one gradient per param, in the param's dtype (the whole tree is alive at
      once unless updates run per layer).
    optimizer_state: the optimizer's state (module docstring), scalar counters aside.
  """

  weights: int
  gradients: int
  optimizer_state: int

  @property
  def total(self) -> int:
    """Weights + gradients + optimizer state (activations and temporaries aside)."""
    return self.weights + self.gradients + self.optimizer_state


def estimate(
    params: Any,
    optimizer: str = "adamw",
    *,
    rank: Any = 128,
    proj_type: str = "std",
    mask: Any = None,
    dimension_numbers: Any = None,
    state_dtype: Any = None,
    error_feedback: bool = True,
) -> MemoryEstimate:
  """Closed-form memory of ``optimizer`` on ``params`` (arrays or ShapeDtypeStructs).

  Args:
    params: the params tree; only shapes and dtypes are read.
    optimizer: one of :data:`OPTIMIZERS`.
    rank, proj_type, mask, dimension_numbers: as for :func:`galore_jax.galore_adamw`
      (which leaves are projected, how, and at which rank).
    state_dtype: dtype of moments, bases and error buffers; default each leaf's dtype
      (as the transforms' defaults).
    error_feedback: ``ldadamw`` keeps its full-size error buffer.

  Returns:
    A :class:`MemoryEstimate`.

  Raises:
    ValueError: for an unknown ``optimizer`` or arguments that do not fit ``params``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import galore_jax as gj
    >>> params = {"w": jax.ShapeDtypeStruct((1024, 256), jnp.bfloat16)}
    >>> gj.memory.estimate(params, "adamw")
    MemoryEstimate(weights=524288, gradients=524288, optimizer_state=1048576)
    >>> gj.memory.estimate(params, "galore_adamw", rank=32).optimizer_state  # (256 + 2048) * 32 * 2
    147456
  """
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"optimizer={optimizer!r} is not one of {OPTIMIZERS}.")
  leaves = jax.tree.leaves(params)
  weights = sum(_nbytes(np.prod(jnp.shape(x), dtype=np.int64), x.dtype) for x in leaves)
  if optimizer == "adamw":
    plans = [None] * len(leaves)
  else:
    plans = plans_lib.leaf_plans(params, mask, dimension_numbers, rank, proj_type)
  state = 0
  for leaf, plan in zip(leaves, plans):
    dtype = state_dtype or leaf.dtype
    size = int(np.prod(jnp.shape(leaf), dtype=np.int64))
    if plan is None:
      state += _nbytes(2 * size, dtype)
      continue
    state += _nbytes(_projected_elements(plan, optimizer, error_feedback), dtype)
  return MemoryEstimate(weights=int(weights), gradients=int(weights), optimizer_state=state)


def _projected_elements(plan: plans_lib.LeafPlan, optimizer: str, error_feedback: bool) -> int:
  """State elements of one projected leaf: bases, two low-rank moments (and LDAdam's error
  buffer), over every matrix of its stack."""
  v, r = plan.view, plan.rank
  basis = (v.m * r if plan.left else 0) + (v.n * r if plan.right else 0)
  moments = 2 * (r if plan.left else v.m) * (r if plan.right else v.n)
  error = v.m * v.n if optimizer == "ldadamw" and error_feedback else 0
  return int(np.prod(v.batch_shape, dtype=np.int64)) * (basis + moments + error)


def _nbytes(elements, dtype) -> int:
  return int(elements) * jnp.dtype(dtype).itemsize

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
``fira_adamw``      ``galore_adamw``'s plus 1 (the limiter's norm): :math:`mr + 2nr + 1`
``apollo_adamw``    :math:`2\max(m, n)\, r + 2` (two moments, the projection's counter --
                    the paper's seed -- and the limiter's norm; ``proj="svd"`` adds the
                    basis :math:`\min(m, n)\, r`)
``apollo_mini``     the same at rank 1: :math:`2\max(m, n) + 2`
=================== ==========================================================

and unprojected leaves hold Adam's two full moments.  The 8-bit optimizers
(``adamw_8bit``, ``galore_adamw_8bit``) keep each moment array of :math:`k \ge`
``min_8bit_size`` entries as :math:`k` one-byte codes plus a float32 absmax per block of
``block_size``, smaller ones in float32; ``galore_adafactor`` keeps float32 row and column
statistics per matrix (:math:`4(a + c)` bytes for an ``a x c`` one, a full-size statistic
plus one entry for a vector) and, with ``b1``, a first moment.  Scalar counters (step
counts, a refresh count per projected leaf: a few bytes) are left out, except APOLLO's:
there the refresh counter is what the projection is drawn from, the paper's seed.  The
limiter's norms (APOLLO, Fira) and APOLLO's counter are float32 / int32 whatever the
params' dtype; a stacked leaf of :math:`L` matrices holds :math:`L` norms and one counter.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from galore_jax import _checks
from galore_jax import plans as plans_lib
from galore_jax import projection

OPTIMIZERS = ("adamw", "adamw_8bit", "galore_adamw", "galore_adamw_8bit", "galore_adafactor",
              "ldadamw", "fira_adamw", "apollo_adamw", "apollo_mini")
_PROJECTED = ("galore_adamw", "galore_adamw_8bit", "galore_adafactor", "ldadamw",
              "fira_adamw", "apollo_adamw", "apollo_mini")
_APOLLO = ("apollo_adamw", "apollo_mini")
# The optimizers whose transforms take a first-moment dtype (``mu_dtype``); every projected
# one but ldadamw takes a ``basis_dtype``.
_MU_DTYPE = ("adamw", "galore_adamw", "fira_adamw", "galore_adafactor")


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
    rank: Any = None,
    proj_type: str = "std",
    mask: Any = None,
    dimension_numbers: Any = None,
    state_dtype: Any = None,
    error_feedback: bool = True,
    b1: float | None = None,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    proj: str = "random",
    limiter: bool = True,
    batch_dims: Any = None,
    basis_dtype: Any = None,
    mu_dtype: Any = None,
) -> MemoryEstimate:
  """Closed-form memory of ``optimizer`` on ``params`` (arrays or ShapeDtypeStructs).

  Args:
    params: the params tree; only shapes and dtypes are read.
    optimizer: one of :data:`OPTIMIZERS`.
    rank, proj_type, mask, dimension_numbers: as for :func:`galore_jax.galore_adamw`
      (which leaves are projected, how, and at which rank); ``rank`` defaults to the
      optimizer's own (1 for ``apollo_mini``, else 128). APOLLO-Mini is rank 1 by
      definition, so ``apollo_mini`` here takes no other rank (a paper's rank passed to every
      optimizer would draw it as APOLLO): ``apollo_adamw`` at that rank gives the state of
      ``gj.apollo_mini(rank=...)``.
    state_dtype: dtype (real floating) of moments, bases and error buffers; default each
      leaf's dtype (as the transforms' defaults; 8-bit moments and Adafactor's statistics
      have their own, and a float16 leaf's coefficients have float32 moments, unless
      ``ldadamw``'s ``state_dtype`` says otherwise:
      :func:`galore_jax.projection.coefficient_dtype`).
    error_feedback: ``ldadamw`` keeps its full-size error buffer.
    b1: ``galore_adafactor``'s first moment, in ``[0, 1)`` (``None``: none).
    block_size, min_8bit_size: the 8-bit optimizers' (as :func:`galore_jax.adamw_8bit`).
    proj: APOLLO's projection: ``"random"`` (regenerated, not stored) or ``"svd"``
      (stored).
    limiter: the norm-growth limiter is on (APOLLO, Fira: ``limiter_gamma`` not ``None``).
    batch_dims: the 8-bit and Adafactor optimizers' (as :func:`galore_jax.adamw_8bit`):
      leading axes of a leaf that stack separate tensors (of a projected leaf, of its
      coefficients); ``None``: their defaults (none for the 8-bit ones, all but the last two
      axes for Adafactor).
    basis_dtype: dtype of the stored bases, as the transforms' ``basis_dtype`` (all
      projected optimizers but ``ldadamw``, which has none); default ``state_dtype``'s.
    mu_dtype: dtype of the first moment, as the transforms' ``mu_dtype`` (``adamw``,
      ``galore_adamw``, ``fira_adamw``, ``galore_adafactor``; the others have none);
      default ``state_dtype``'s.

  Returns:
    A :class:`MemoryEstimate`.

  Raises:
    ValueError: for an unknown ``optimizer``, a ``rank`` other than 1 for ``apollo_mini``
      or arguments that do not fit ``params``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import galore_jax as gj
    >>> params = {"w": jax.ShapeDtypeStruct((1024, 256), jnp.bfloat16)}
    >>> gj.memory.estimate(params, "adamw")
    MemoryEstimate(weights=524288, gradients=524288, optimizer_state=1048576)
    >>> gj.memory.estimate(params, "galore_adamw", rank=32).optimizer_state  # (256 + 2048) * 32 * 2
    147456
    >>> gj.memory.estimate(params, "apollo_mini").optimizer_state  # 2 * 1024 * 2 + 4 + 4
    4104
    >>> gj.memory.estimate(params, "galore_adamw", rank=32, mu_dtype=jnp.float32
    ...                    ).optimizer_state  # 256 * 32 * 2 + 1024 * 32 * (4 + 2)
    212992
  """
  _check_choices(optimizer, rank, proj, proj_type, block_size, min_8bit_size, b1,
                 error_feedback, limiter)
  state_dtype = _checks.float_dtype(state_dtype, "state_dtype")
  basis_dtype = _checks.float_dtype(basis_dtype, "basis_dtype")
  mu_dtype = _checks.float_dtype(mu_dtype, "mu_dtype")
  # a transform without the argument keeps its default (as b1 or proj apply to some only)
  basis_dtype = None if optimizer == "ldadamw" else basis_dtype
  mu_dtype = mu_dtype if optimizer in _MU_DTYPE else None
  leaves = jax.tree.leaves(params)
  dims = ([None] * len(leaves) if batch_dims is None
          else _checks.batch_dims(batch_dims, params))
  weights = sum(_nbytes(np.prod(jnp.shape(x), dtype=np.int64), jnp.result_type(x))
                for x in leaves)
  plans = [None] * len(leaves)
  if optimizer in _PROJECTED:
    if rank is None:
      rank = 1 if optimizer == "apollo_mini" else 128
    plans = plans_lib.leaf_plans(params, mask, dimension_numbers, rank, proj_type)
  state = 0
  for leaf, plan, b in zip(leaves, plans, dims):
    dtype = state_dtype or jnp.result_type(leaf)  # (a Python float leaf: float32)
    shape = tuple(jnp.shape(leaf))
    if plan is not None:
      v, r = plan.view, plan.rank
      shape = projection.coefficient_shape(v, r, plan.left, plan.right)
      if b is not None and optimizer in ("galore_adamw_8bit", "galore_adafactor"):
        # the inner transform's batch_dims count the coefficients' axes (an N-D leaf's fewer)
        _checks.batch_count(b, len(shape), f"batch_dims at {plan.where} (its coefficients)")
      basis = (v.m * r if plan.left else 0) + (v.n * r if plan.right else 0)
      basis *= not (optimizer in _APOLLO and proj == "random")  # regenerated
      error = v.m * v.n if optimizer == "ldadamw" and error_feedback else 0
      matrices = int(np.prod(v.batch_shape, dtype=np.int64))
      state += _nbytes(matrices * basis, basis_dtype or dtype) + _nbytes(matrices * error, dtype)
      state += _scalar_bytes(optimizer, matrices, limiter)
      dtype = _coefficient_moments_dtype(optimizer, dtype, state_dtype)
    state += _moments_bytes(optimizer, shape, dtype, mu_dtype or dtype, b1, block_size,
                            min_8bit_size, b)
  return MemoryEstimate(weights=int(weights), gradients=int(weights), optimizer_state=state)


def _check_choices(optimizer, rank, proj, proj_type, block_size, min_8bit_size, b1,
                   error_feedback, limiter) -> None:
  """:func:`estimate`'s checks of its scalar arguments, each a one-line ``ValueError``
  (as the transform behind ``optimizer`` refuses them)."""
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"optimizer={optimizer!r} is not one of {OPTIMIZERS}.")
  if optimizer == "apollo_mini" and rank is not None and not _is_one(rank):
    raise ValueError(f"rank={rank!r}: apollo_mini is rank 1 by definition; leave rank unset "
                     "(apollo_adamw at that rank holds the same state).")
  if rank is not None and _checks.is_single(rank):
    _checks.int_at_least(rank, 1, "rank")  # (a per-leaf rank is checked leaf by leaf)
  if proj not in ("random", "svd"):
    raise ValueError(f"proj={proj!r} is not one of ('random', 'svd').")
  if optimizer in _PROJECTED and proj_type not in _proj_types(optimizer):
    raise ValueError(f"proj_type={proj_type!r} is not one of {_proj_types(optimizer)} (those"
                     f" of {optimizer}).")
  if optimizer.endswith("_8bit"):
    _checks.block_size(block_size)
    _checks.int_at_least(min_8bit_size, 0, "min_8bit_size")
  if b1 is not None:
    _checks.unit_interval(b1, "b1")
  _checks.flag(error_feedback, "error_feedback")
  _checks.flag(limiter, "limiter")


def _coefficient_moments_dtype(optimizer: str, dtype, state_dtype):
  """The dtype of a projected leaf's moments: its coefficients' (float32 for a float16 leaf:
  :func:`galore_jax.projection.coefficient_dtype`), but ``ldadamw``'s given ``state_dtype``."""
  return dtype if optimizer == "ldadamw" and state_dtype else projection.coefficient_dtype(dtype)


def _proj_types(optimizer: str) -> tuple[str, ...]:
  """The ``proj_type`` s the transform behind ``optimizer`` accepts."""
  if optimizer == "ldadamw":
    return projection.LDADAM_PROJ_TYPES
  if optimizer in (*_APOLLO, "fira_adamw"):
    return projection.ONE_SIDED_PROJ_TYPES
  return projection.PROJ_TYPES


def _is_one(rank) -> bool:
  """Whether ``rank`` is 1 (an int 1: a pytree or callable of ranks is not)."""
  return _checks.is_int(rank) and rank == 1


def _scalar_bytes(optimizer, matrices, limiter) -> int:
  """Per-matrix scalars of a projected leaf of ``matrices`` matrices: the limiter's float32
  norms (APOLLO, Fira) and APOLLO's int32 refresh counter (one per leaf)."""
  norms = 4 * matrices if limiter and optimizer in (*_APOLLO, "fira_adamw") else 0
  return norms + (4 if optimizer in _APOLLO else 0)


def _moments_bytes(optimizer, shape, dtype, mu_dtype, b1, block_size, min_8bit_size,
                   batch_dims) -> int:
  """Bytes of the optimizer's moments of one array: a leaf, or a projected leaf's stack of
  coefficients, of ``shape``, whose ``batch_dims`` leading axes stack separate tensors; the
  first moment in ``mu_dtype``, the second in ``dtype`` (8-bit and Adafactor ones aside)."""
  size = int(np.prod(shape, dtype=np.int64))
  if optimizer.endswith("_8bit"):
    b = batch_dims or 0
    k, n = int(np.prod(shape[:b], dtype=np.int64)), int(np.prod(shape[b:], dtype=np.int64))
    one = k * (n + 4 * -(-n // block_size)) if n >= max(min_8bit_size, 1) else 4 * size
    return 2 * one
  if optimizer == "galore_adafactor":
    b = max(len(shape) - 2, 0) if batch_dims is None else batch_dims
    rows_cols = (int(np.prod(shape[:-1])) + int(np.prod(shape[:-2])) * shape[-1]
                 if len(shape) - b >= 2 else size + int(np.prod(shape[:b], dtype=np.int64)))
    return 4 * rows_cols + (_nbytes(size, mu_dtype) if b1 is not None else 0)
  return _nbytes(size, mu_dtype) + _nbytes(size, dtype)


def _nbytes(elements, dtype) -> int:
  return int(elements) * jnp.dtype(dtype).itemsize

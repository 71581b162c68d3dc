r"""Norm ratios and the norm-growth limiter: what APOLLO and Fira add to a projection.

Both read an adaptive optimizer's effect in the subspace, the ratio of the norm of its
output :math:`N` (Adam's normalized step on the coefficients) to the norm of its input
:math:`R` (the coefficients), and carry that ratio to full-rank directions:

* APOLLO (:func:`galore_jax.scale_by_apollo`) scales the raw gradient by it, channel by
  channel or once per matrix: :math:`U = G\,\operatorname{diag}(s)`;
* Fira (``galore_projection(residual="fira")``) scales the part of the gradient the
  projection drops: :math:`S = (G - P R)\,\operatorname{diag}(\phi)`.

A channel is a column of the matrix when the basis is on the left (the coefficients
:math:`R = P^\top G` are ``r x n``: one ratio per column, the norms taken over the rank
axis) and a row when it is on the right (:math:`R = G Q` is ``m x r``: one per row): the
side that is not projected.

Both then bound the growth of the full-rank part from step to step (the norm-growth
limiter): with :math:`\gamma` (1.01 in both papers) and the Frobenius norm of each matrix,

.. math::
  U \leftarrow U \cdot \frac{\gamma\, \ell_{t-1}}{\|U\|}
    \quad\text{if } \|U\| > \gamma\, \ell_{t-1},\qquad
  \ell_t = \|U\| \text{ (after the limiter)}

with :math:`\ell_{-1} = 0` meaning "no previous step": the first step is not limited.  The
state holds :math:`\ell`, one float32 per matrix (:func:`zero_norms`).
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from galore_jax import _checks
from galore_jax._explicit import sharding_of
from galore_jax._explicit import zeros
from galore_jax.flax_metadata import in_variable
from galore_jax.flax_metadata import param_items
from galore_jax.plans import LeafPlan
from galore_jax.sharding import per_matrix_spec

_F32 = jnp.float32


def check_gamma(gamma: Any, name: str = "limiter_gamma") -> Any:
  """``gamma`` unchanged, or a one-line ``ValueError`` unless it is a finite number > 1;
  ``None`` (no limiter) and arrays (``optax.inject_hyperparams``) pass.  Below 1 the
  limiter shrinks every step; at 1 the stored norm can never grow, so the steps stay capped
  by the smallest one ever taken; ``inf`` (or a nan) never limits, a limiter turned off
  without saying so.

  Example:
    >>> from galore_jax import scaling
    >>> scaling.check_gamma(1.01), scaling.check_gamma(None)
    (1.01, None)
    >>> scaling.check_gamma(float("inf"))
    Traceback (most recent call last):
    ...
    ValueError: limiter_gamma=inf: the norm-growth limiter's gamma must be a finite number > 1 (each step's norm may grow by that factor; the papers use 1.01), or None to turn it off.
  """
  if isinstance(gamma, bool) or (
      gamma is not None and not isinstance(gamma, numbers.Real) and not _checks.is_array(gamma)):
    raise ValueError(f"{name}={gamma!r}: expected a number > 1, or None to turn it off.")
  if isinstance(gamma, numbers.Real) and not (_checks.finite_real(gamma) and gamma > 1):
    raise ValueError(
        f"{name}={gamma!r}: the norm-growth limiter's gamma must be a finite number > 1 (each"
        " step's norm may grow by that factor; the papers use 1.01), or None to turn it off.")
  return gamma


def norm_ratio(
    num: jax.Array, den: jax.Array, left: bool, *, tensor: bool = False, eps: float = 0.0
) -> jax.Array:
  r"""Per channel (or per matrix with ``tensor``) :math:`\|N\| / (\|R\| + \epsilon)`, float32,
  shaped to broadcast against the full matrices ``(*batch, m, n)``: ``(*batch, 1, n)`` for
  a left basis (``left``: the coefficients are ``(*batch, r, n)``, norms over the rank
  axis), ``(*batch, m, 1)`` for a right one, ``(*batch, 1, 1)`` with ``tensor``.  Where the
  denominator is 0 the ratio is 0.

  Args:
    num: :math:`N`, coefficients ``(*batch, a, c)`` (the inner optimizer's output).
    den: :math:`R`, coefficients of the same shape (its input).
    left: whether the basis is on the left (the rank axis is ``a``).
    tensor: one ratio per matrix (Frobenius norms) instead of one per channel.
    eps: :math:`\epsilon` (Fira); APOLLO uses 0.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import scaling
    >>> n = jnp.array([[3.0, 0.0], [4.0, 1.0]])        # r x n = 2 x 2, left basis
    >>> r = jnp.array([[1.0, 0.0], [0.0, 0.0]])
    >>> scaling.norm_ratio(n, r, True).tolist()          # column 2 has ||R|| = 0
    [[5.0, 0.0]]
  """
  for arg, x in (("num", num), ("den", den)):
    _checks.real_array(x, f"norm_ratio: {arg}", "expected real coefficients.")
  if jnp.shape(num) != jnp.shape(den):
    raise ValueError(f"norm_ratio: num and den must have one shape, got {jnp.shape(num)} and"
                     f" {jnp.shape(den)}.")
  _checks.nonnegative(eps, "eps")
  left, tensor = _checks.flag(left, "left"), _checks.flag(tensor, "tensor")
  axes = (-2, -1) if tensor else ((-2,) if left else (-1,))

  def norm(x):
    x = x.astype(_F32)
    return jnp.sqrt(jnp.sum(x * x, axis=axes, keepdims=True))

  den = norm(den) + eps
  return jnp.where(den > 0, norm(num) / jnp.where(den > 0, den, 1.0), 0.0)


def limit_growth(u: jax.Array, prev: jax.Array, gamma: Any) -> tuple[jax.Array, jax.Array]:
  r"""The norm-growth limiter (module docstring) on each matrix of ``u`` ``(*batch, m, n)``:
  ``u`` rescaled where its norm exceeds ``gamma`` times the previous one ``prev``
  ``(*batch)`` (0: no previous step, no limit), and the norms after it.  A non-finite norm
  (a NaN gradient) is not stored: the previous one stays.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import scaling
    >>> u, norm = scaling.limit_growth(jnp.full((1, 2, 2), 1.0), jnp.array([1.0]), 1.01)
    >>> round(float(u[0, 0, 0]), 4), round(float(norm[0]), 4)   # ||u|| = 2 -> 1.01
    (0.505, 1.01)
  """
  if gamma is None:
    raise ValueError("gamma=None: expected a number > 1 (limit_growth always limits).")
  check_gamma(gamma, "gamma")
  _checks.real_array(u, "limit_growth: u", "expected real matrices.")
  if jnp.shape(prev) != u.shape[:-2]:
    raise ValueError(f"limit_growth: prev must have u's batch shape {u.shape[:-2]}, got"
                     f" {jnp.shape(prev)}.")
  u = u.astype(_F32)
  norm = jnp.sqrt(jnp.sum(u * u, axis=(-2, -1)))
  cap = gamma * prev
  over = (prev > 0) & (norm > cap)
  factor = jnp.where(over, cap / jnp.where(over, norm, 1.0), 1.0)
  limited = jnp.where(over, cap, norm)
  return u * factor[..., None, None], jnp.where(jnp.isfinite(limited), limited, prev)


def zero_norms(params: Any, plans: Sequence[LeafPlan | None]) -> list:
  """Per leaf of ``params``: the limiter's norms :math:`\\ell` of a projected leaf, float32
  zeros of shape ``batch_shape`` (one per matrix; ``()`` for a plain 2-D leaf), sharded
  like the leaf's batch axes (:func:`galore_jax.sharding.per_matrix_spec`) and carrying
  that spec in a Flax variable; ``optax.MaskedNode()`` for the others.

  Example:
    >>> import jax.numpy as jnp
    >>> import galore_jax as gj
    >>> from galore_jax import plans, scaling
    >>> params = {"b": jnp.zeros(4), "k": jnp.zeros((3, 6, 4))}   # 3 stacked matrices
    >>> lp = plans.leaf_plans(params, None, {"b": None, "k": gj.DimensionNumbers(1, 2)},
    ...                       2, "std")
    >>> b, k = scaling.zero_norms(params, lp)
    >>> b, k.shape, k.dtype
    (MaskedNode(), (3,), dtype('float32'))
  """
  leaves = jax.tree.leaves(params)
  if len(plans) != len(leaves):  # (zip cut the norms to the shorter)
    raise ValueError(f"zero_norms: plans has {len(plans)} entries for {len(leaves)} leaves of"
                     " params: one plan (or None) per leaf.")
  out = []
  for leaf, plan, item in zip(leaves, plans, param_items(params, len(leaves))):
    if plan is None:
      out.append(optax.MaskedNode())
      continue
    like = sharding_of(leaf)
    spec = per_matrix_spec(None if like is None else like.spec, plan.view)
    z = zeros(plan.view.batch_shape, _F32, like, spec)
    out.append(in_variable(item, z, lambda s, plan=plan: per_matrix_spec(s, plan.view)))
  return out

"""One gradient matrix -> orthonormal bases of its dominant subspace.

Every function here takes a stack of matrices ``g_Bxmxn`` (leading axes are batch
axes: scanned layers, or a size-1 axis for a plain matrix) and returns bases as
*columns*: a left basis ``P`` of shape ``(..., m, r)`` spans the column space of
``G``, a right basis ``Q`` of shape ``(..., n, r)`` spans its row space.  The
computation runs in float32 whatever the input dtype; the caller casts the result
to the dtype it stores.

Two guarantees hold for every method:

* **sign-canonical** -- each basis vector is flipped so that its entry of largest
  magnitude is positive (the first such entry on ties).  SVD routines only
  determine singular vectors up to sign, and LAPACK / cuSOLVER builds disagree;
  after this rule CPU and GPU runs, and this library and an independent NumPy
  oracle, see the same basis.
* **non-finite guard** -- :func:`keep_finite` keeps the previous basis of every
  matrix whose new basis contains a NaN or inf (a failed SVD returns NaNs).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Basis methods the library knows.  ``svd`` is the paper's (exact, reduced SVD).
METHODS = ("svd",)
# Methods announced by the design (faster refresh); named here so that the error
# for them says "not available yet" rather than "unknown".
PLANNED_METHODS = ("gram_eigh", "randomized", "power", "random")


class Bases(NamedTuple):
  """Orthonormal bases of one projected leaf.

  Attributes:
    left: ``(*batch, m, r)`` basis of the column space, or ``None`` when the
      leaf is not projected on the left.
    right: ``(*batch, n, r)`` basis of the row space, or ``None``.
    refreshes: int32 scalar, how many times this leaf's bases were recomputed
      (for logging; the refresh policy decides when).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import galore_jax as gj
    >>> params = {"w": jnp.zeros((8, 4))}
    >>> tx = gj.galore_projection(optax.scale_by_adam(), rank=2)
    >>> grads = {"w": jax.random.normal(jax.random.key(0), (8, 4))}
    >>> _, state = tx.update(grads, tx.init(params))
    >>> bases = state.bases[0]          # one entry per leaf, in jax.tree.leaves order
    >>> bases.left is None, bases.right.shape, int(bases.refreshes)
    (True, (4, 2), 1)
  """

  left: jax.Array | None
  right: jax.Array | None
  refreshes: jax.Array


def canonical_signs(basis: jax.Array) -> jax.Array:
  r"""Flips each column so that its entry of largest magnitude is positive.

  .. math::
    b_j \leftarrow \operatorname{sign}(b_{i^*j})\, b_j,
    \qquad i^* = \operatorname{argmax}_i |b_{ij}| \text{ (first on ties)}

  A zero column stays zero.

  Args:
    basis: ``(..., d, r)`` array whose columns are basis vectors.

  Returns:
    The array with every column sign-canonical.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import subspace
    >>> subspace.canonical_signs(jnp.array([[0.6, 1.0], [-0.8, 0.0]]))
    Array([[-0.6,  1. ],
           [ 0.8,  0. ]], dtype=float32)
  """
  idx = jnp.argmax(jnp.abs(basis), axis=-2, keepdims=True)
  pivot = jnp.take_along_axis(basis, idx, axis=-2)
  return basis * jnp.where(pivot < 0, -1, 1).astype(basis.dtype)


def svd_bases(
    g_Bxmxn: jax.Array, rank: int, *, left: bool, right: bool
) -> tuple[jax.Array | None, jax.Array | None]:
  r"""Top-``rank`` singular vectors of each matrix, from an fp32 reduced SVD.

  .. math::
    G = U \Sigma V^\top,\qquad P = U_{:, :r},\qquad Q = V_{:, :r}

  Args:
    g_Bxmxn: ``(*batch, m, n)`` matrices, any float dtype.
    rank: ``r <= min(m, n)``.
    left: whether to return ``P`` (``(*batch, m, r)``).
    right: whether to return ``Q`` (``(*batch, n, r)``).

  Returns:
    ``(P or None, Q or None)`` in float32, sign-canonical.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import subspace
    >>> p, q = subspace.svd_bases(jnp.diag(jnp.array([1.0, 3.0, 2.0])), 2,
    ...                           left=True, right=False)
    >>> p
    Array([[0., 0.],
           [1., 0.],
           [0., 1.]], dtype=float32)
  """
  g = g_Bxmxn.astype(jnp.float32)
  # LAPACK's gesdd never returns on a matrix holding inf, so such matrices are
  # not handed to it: they get a NaN basis, which keep_finite then rejects.
  finite = jnp.all(jnp.isfinite(g), axis=(-2, -1), keepdims=True)
  u, _, vh = jnp.linalg.svd(jnp.where(finite, g, 0.0), full_matrices=False)
  p = canonical_signs(u[..., :, :rank]) if left else None
  q = canonical_signs(jnp.swapaxes(vh[..., :rank, :], -1, -2)) if right else None
  nan_if_bad = lambda b: None if b is None else jnp.where(finite, b, jnp.nan)
  return nan_if_bad(p), nan_if_bad(q)


def compute_bases(
    g_Bxmxn: jax.Array, rank: int, *, left: bool, right: bool, method: str
) -> tuple[jax.Array | None, jax.Array | None]:
  """Bases of ``g_Bxmxn`` by the method named ``method`` (see :data:`METHODS`).

  Every method returns ``(P or None, Q or None)`` in float32, sign-canonical,
  spanning (an approximation of) the top-``rank`` singular subspaces; with
  ``"svd"`` it is :func:`svd_bases`.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import subspace
    >>> p, q = subspace.compute_bases(jnp.ones((3, 5, 4)), 2, left=False,
    ...                               right=True, method="svd")
    >>> q.shape
    (3, 4, 2)
  """
  if method == "svd":
    return svd_bases(g_Bxmxn, rank, left=left, right=right)
  raise ValueError(f"method={method!r} is not one of {METHODS}.")


def keep_finite(new: jax.Array, old: jax.Array) -> jax.Array:
  """Per matrix of the stack: ``new`` where it is all finite, else ``old``.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import subspace
    >>> new = jnp.array([[[1.0]], [[jnp.nan]]])
    >>> subspace.keep_finite(new, jnp.zeros_like(new))[:, 0, 0]
    Array([1., 0.], dtype=float32)
  """
  ok = jnp.all(jnp.isfinite(new), axis=(-2, -1), keepdims=True)
  return jnp.where(ok, new, old.astype(new.dtype))

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

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp


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
  u, _, vh = jnp.linalg.svd(g_Bxmxn.astype(jnp.float32), full_matrices=False)
  p = canonical_signs(u[..., :, :rank]) if left else None
  q = canonical_signs(jnp.swapaxes(vh[..., :rank, :], -1, -2)) if right else None
  return p, q


class BasisMethod:
  """How a refresh computes bases: a frozen object called as

  ``method(g_Bxmxn, rank, *, left, right, prev, key) -> (P or None, Q or None)``

  with ``g_Bxmxn`` finite float32 matrices, ``prev`` the leaf's current
  :class:`Bases` (``prev.refreshes == 0``: no basis yet, for warm starts) and
  ``key`` a PRNG key for this leaf and step when :attr:`needs_key` (else
  ``None``).  It returns float32, sign-canonical bases of the top-``rank``
  singular subspaces (exact or approximate).
  """

  needs_key: ClassVar[bool] = False

  def __call__(self, g_Bxmxn, rank, *, left, right, prev, key):
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class SVD(BasisMethod):
  """The paper's method: exact reduced SVD (:func:`svd_bases`).

  Example:
    >>> import galore_jax as gj
    >>> gj.galore_projection(rank=4, method=gj.subspace.SVD()) is not None
    True
  """

  def __call__(self, g_Bxmxn, rank, *, left, right, prev=None, key=None):
    del prev, key
    return svd_bases(g_Bxmxn, rank, left=left, right=right)


# Names accepted by ``galore_projection(method=...)`` -> default instances.
METHODS: dict[str, BasisMethod] = {"svd": SVD()}


def get_method(method: str | BasisMethod) -> BasisMethod:
  """Resolves ``method`` (a name in :data:`METHODS` or a :class:`BasisMethod`).

  Example:
    >>> from galore_jax import subspace
    >>> subspace.get_method("svd")
    SVD()
  """
  if isinstance(method, BasisMethod):
    return method
  if isinstance(method, str) and method in METHODS:
    return METHODS[method]
  raise ValueError(
      f"method={method!r} is not one of {tuple(METHODS)} nor a"
      " galore_jax.subspace.BasisMethod."
  )


def compute_bases(
    g_Bxmxn: jax.Array,
    rank: int,
    *,
    left: bool,
    right: bool,
    method: str | BasisMethod,
    prev: Bases | None = None,
    key: jax.Array | None = None,
) -> tuple[jax.Array | None, jax.Array | None]:
  """Bases of ``g_Bxmxn`` by ``method`` (a name in :data:`METHODS` or a
  :class:`BasisMethod`), in float32, sign-canonical.

  A matrix of the stack holding inf or NaN is not handed to the method (LAPACK's
  SVD never returns on inf): its bases come back all-NaN, which
  :func:`keep_finite` then rejects, keeping the previous basis.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import subspace
    >>> p, q = subspace.compute_bases(jnp.ones((3, 5, 4)), 2, left=False,
    ...                               right=True, method="svd")
    >>> q.shape
    (3, 4, 2)
  """
  g = g_Bxmxn.astype(jnp.float32)
  finite = jnp.all(jnp.isfinite(g), axis=(-2, -1), keepdims=True)
  p, q = get_method(method)(
      jnp.where(finite, g, 0.0), rank, left=left, right=right, prev=prev, key=key
  )
  nan_if_bad = lambda b: None if b is None else jnp.where(finite, b, jnp.nan)
  return nan_if_bad(p), nan_if_bad(q)


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

r"""One gradient matrix -> orthonormal bases of its dominant subspace.

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
* **non-finite guard** -- :func:`compute_bases` returns NaN bases for a matrix that
  holds a NaN or inf, and :mod:`galore_jax.guard` then keeps its previous basis.

Methods: ``galore_projection(method=name)``, or an object with options --
:class:`SVD`, :class:`GramEigh`, :class:`Randomized`, :class:`Power`,
:class:`Random`.  With :math:`d = \min(m, n)`, :math:`e = \max(m, n)`,
:math:`k = r + p` and flops counted per matrix (a product of ``d x e`` by
``e x k`` is :math:`2dek`):

================ ========================================= =================================
name             algorithm                                 cost (leading)
================ ========================================= =================================
``"svd"``        exact reduced SVD (the paper)             :math:`O(mnd)`
``"gram_eigh"``  ``eigh`` of the ``d x d`` Gram matrix     :math:`2d^2e`, ``d x d`` eigh
``"randomized"`` range finder, power iterations (GaLore 2) :math:`(4+4q)dek`, ``k x k`` eigh
``"power"``      one warm block power step (LDAdam)        :math:`6der`, ``r x r`` eigh
``"random"``     Gaussian from the key (GoLore, APOLLO)    :math:`O(dr^2)`, no gradient
================ ========================================= =================================

:class:`Gaussian` (APOLLO's projection, entries :math:`\mathcal{N}(0, 1/r)`, not
orthonormalized) is not in :data:`METHODS`: it is not a basis for GaLore's
:math:`P P^\top`, and :func:`galore_jax.scale_by_apollo` uses it by default.

All but ``"svd"`` are matmuls plus small factorizations, batched over the
leading axes, and orthonormalize with :func:`orthonormalize` (shifted
CholeskyQR) instead of Householder QR: in JAX on GPU batched QR and SVD are
the slow part of a refresh (tens of seconds for a 1B model) while matmuls are
cheap.  Which to use:

* ``"svd"`` -- exact; the reference, and fine on CPU or for small models.
* ``"gram_eigh"`` -- the same subspace for GaLore's purposes (it only loses
  directions with :math:`\sigma_i < 2.4\cdot 10^{-4}\sigma_1`) at the cost of a
  ``d x d`` ``eigh``; the choice when an exact refresh is wanted cheaply.
* ``"randomized"`` -- the cheapest fresh estimate; approximate where the
  spectrum decays slowly past ``r`` (raise ``power_iters`` / ``oversample``),
  and nearly exact from the second refresh on when the subspace moves slowly
  (``warm_start``).
* ``"power"`` -- the cheapest method that reads the gradient; it tracks the
  subspace from refresh to refresh (a randomized range finder on the first), so it suits
  frequent refreshes (LDAdam refreshes every step), not rare ones after which
  the subspace has changed a lot.
* ``"random"`` -- ignores the gradient: a uniformly random subspace, regenerable
  from the key (GoLore's unbiased late-training projector; APOLLO).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from galore_jax import _checks
from galore_jax import draws
from galore_jax._linalg import BF16
from galore_jax._linalg import gram
from galore_jax._linalg import max_normalize
from galore_jax._linalg import mm
from galore_jax._linalg import mT
from galore_jax._linalg import safe_div


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

  @property
  def basis(self) -> jax.Array:
    """The side this leaf is projected on: ``left`` where it is set, else ``right``
    (a leaf is projected on one side).

    Example:
      >>> import jax.numpy as jnp
      >>> from galore_jax import subspace
      >>> subspace.Bases(None, jnp.ones((4, 2)), jnp.int32(1)).basis.shape
      (4, 2)
    """
    return self.left if self.left is not None else self.right


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
  if jnp.ndim(basis) < 2 or jnp.shape(basis)[-2] < 1:  # (an IndexError, or argmax of nothing)
    raise ValueError("canonical_signs: basis must be (..., d, r) with d >= 1, got shape"
                     f" {jnp.shape(basis)}.")
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
  ``key`` a PRNG key for this leaf and step, or one per matrix of the stack
  (see :func:`~galore_jax.draws.matrix_keys`), when :attr:`needs_key` or
  :attr:`cold_key` (else ``None``).  It returns float32, sign-canonical bases of the
  top-``rank`` singular subspaces (exact or approximate).

  A method whose :attr:`reads_gradient` is false (:class:`Random`, :class:`Gaussian`)
  reads only the shape of ``g_Bxmxn``: its bases are a function of the key, so a
  transform may regenerate them from the key instead of storing them
  (:func:`galore_jax.scale_by_apollo` does).
  """

  needs_key: ClassVar[bool] = False
  reads_gradient: ClassVar[bool] = True
  #: Draws only to start cold (no previous basis) and keeps no key in the state: a refresh
  #: passes it the keys a keyed method would get from seed 0 (or from the transform's
  #: ``key`` when one is given), so its draws too are the same in whichever stack a matrix
  #: is computed (one device or a mesh, all layers or one: :class:`~galore_jax.draws.StackSlice`).
  cold_key: ClassVar[bool] = False

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


# ------------------------------------------------------------------------------------
# Fast methods: matmuls plus small factorizations, batched over the leading axes.
# ------------------------------------------------------------------------------------

_TINY = float(jnp.finfo(jnp.float32).tiny)
# Shift of the shifted CholeskyQR rounds relative to tr(Y^T Y) (= k, unit columns):
# about 5 float32 roundoffs.  Smaller shifts let the Cholesky fail on rank-deficient
# input (seen at d = 4096 .. 11008); larger ones leave the output of a shifted round
# worse conditioned, so that more rounds are needed.
_SHIFT = 3e-7
_SHIFTED_ROUNDS = 3
# The guard's demand on max|Q^T Q - I| (the rounds reach about 1e-6).
_ORTH_TOL = 1e-4


def _cholesky_qr_round(y: jax.Array, shift: jax.Array) -> jax.Array:
  """One (shifted) CholeskyQR round on ``y`` with its columns scaled to unit norm:
  ``L L^T = Y^T Y + (shift tr(Y^T Y) + tiny) I``, ``Q = Y L^{-T}``."""
  y = safe_div(y, jnp.sqrt(jnp.sum(y * y, axis=-2, keepdims=True)))
  a = gram(y)
  eye = jnp.eye(a.shape[-1], dtype=a.dtype)
  tr = jnp.trace(a, axis1=-2, axis2=-1)[..., None, None]
  # Only the lower triangle is read; a non-positive pivot gives NaNs (the guard's job).
  chol = jax.lax.linalg.cholesky(a + (shift * tr + _TINY) * eye, symmetrize_input=False)
  return jax.lax.linalg.triangular_solve(
      chol, y, left_side=False, lower=True, transpose_a=True
  )


def orthonormalize(y_Bxdxk: jax.Array, *, tol: float = _ORTH_TOL,
                   fallback: jax.Array | None = None) -> jax.Array:
  r"""Orthonormal basis of the column span of each matrix, by shifted CholeskyQR.

  Four rounds of (columns scaled to unit norm, then)

  .. math::
    L L^\top = Y^\top Y + s I \;\text{(Cholesky)},\qquad Y \leftarrow Y L^{-\top}

  the first three with a small shift :math:`s = 3\cdot 10^{-7}\,
  \operatorname{tr}(Y^\top Y)`, the last without.  Plain CholeskyQR2 fails in
  float32 once the condition number passes about :math:`10^4` (the Gram matrix
  squares it); the shift keeps the Cholesky from failing on ill-conditioned or
  rank-deficient input and each shifted round shrinks the condition number, so
  that the unshifted round leaves :math:`\max|Q^\top Q - I| \approx 10^{-6}`
  (tested to condition numbers of :math:`10^{12}` and rank-deficient
  ``11008 x 1024`` input).  Only matmuls, a ``k x k`` Cholesky and a triangular
  solve per round: on GPU much faster than batched Householder QR.  Like QR, the
  first ``j`` output columns span the first ``j`` input columns (the factors are
  triangular).  Directions of the input weaker than float32 resolution (a
  rank-deficient input) come out as orthonormal filler made from its roundoff.

  Guard: a matrix whose result has :math:`\max|Q^\top Q - I| >` ``tol`` or is
  not finite -- in practice an all-zero input or a zero column, which have no
  roundoff to make filler from -- gets the ``Q`` of ``jnp.linalg.qr`` instead
  (orthonormal for any input; its extra columns arbitrary).  That QR runs
  inside a ``lax.cond``, only when some matrix of the stack needs it (under
  ``vmap`` the cond becomes a select and it always runs).  With ``fallback`` such a
  matrix gets its ``fallback`` instead, by a select: no ``lax.cond``, which on a GPU
  copies its predicate to the host and waits for it, a sync per call (what a step that
  orthonormalizes every time, as LDAdam's, cannot afford).

  Args:
    y_Bxdxk: ``(*batch, d, k)`` finite matrices, ``k <= d``, any float dtype.
    tol: orthonormality the guard demands.
    fallback: ``None``, or ``(*batch, d, k)`` matrices with orthonormal columns (a
      previous basis) for the matrices the guard rejects.

  Returns:
    ``(*batch, d, k)`` float32 with orthonormal columns.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from galore_jax import subspace
    >>> y = jax.random.normal(jax.random.key(0), (2, 50, 4))
    >>> q = subspace.orthonormalize(y)
    >>> bool(jnp.allclose(jnp.swapaxes(q, -1, -2) @ q, jnp.eye(4), atol=1e-5))
    True
    >>> z = subspace.orthonormalize(jnp.zeros((5, 2)))   # zero input: the QR guard
    >>> bool(jnp.allclose(z.T @ z, jnp.eye(2)))
    True
  """
  if jnp.ndim(y_Bxdxk) < 2 or y_Bxdxk.shape[-1] < 1:
    raise ValueError("orthonormalize: y_Bxdxk must be (..., d, k) with k >= 1, got shape"
                     f" {jnp.shape(y_Bxdxk)}.")
  d, k = y_Bxdxk.shape[-2:]
  if k > d:
    raise ValueError(f"orthonormalize needs k <= d columns, got shape {y_Bxdxk.shape}.")
  # Scale the columns so that squares neither over- nor underflow; the methods call
  # _orthonormalize on products of a max-normalized G.
  return _orthonormalize(_max_normalize_columns(y_Bxdxk.astype(jnp.float32)), tol, fallback)


def _max_normalize_columns(y: jax.Array) -> jax.Array:
  """Each column divided by its largest magnitude (a zero column stays zero): the span is
  unchanged."""
  return safe_div(y, jnp.max(jnp.abs(y), axis=-2, keepdims=True))


def _orthonormalize(y: jax.Array, tol: float | None = _ORTH_TOL,
                    fallback: jax.Array | None = None) -> jax.Array:
  """:func:`orthonormalize` of float32 ``y`` whose squared entries neither over- nor
  underflow.  ``tol=None``: no QR guard, for the intermediate steps of an iteration whose
  final step is guarded; a matrix whose rounds fail (a numerically rank-deficient ``y``,
  as an entry so far above the rest that their squares underflow, breaks the unshifted
  Cholesky) gets its input back with columns max-normalized, which spans the same space."""
  k = y.shape[-1]
  # One loop body for all rounds keeps the compiled program small.
  shifts = jnp.array([_SHIFT] * _SHIFTED_ROUNDS + [0.0], jnp.float32)
  q = jax.lax.fori_loop(
      0, len(shifts), lambda i, q: _cholesky_qr_round(q, shifts[i]), y
  )
  finite = jnp.all(jnp.isfinite(q), axis=(-2, -1), keepdims=True)
  if tol is None:
    return jnp.where(finite, q, _max_normalize_columns(y))
  err = jnp.max(jnp.abs(gram(q) - jnp.eye(k, dtype=q.dtype)), axis=(-2, -1), keepdims=True)
  ok = (err <= tol) & finite  # (XLA:CPU's max may skip NaNs: finiteness tested on its own)
  if fallback is not None:
    return jnp.where(ok, q, fallback.astype(q.dtype))

  def with_qr(q):
    return jnp.where(ok, q, jnp.linalg.qr(y)[0])

  return jax.lax.cond(jnp.all(ok), lambda q: q, with_qr, q)


def _as_range(g_Bxmxn: jax.Array) -> tuple[jax.Array, bool]:
  """``(A, transposed)``: ``A`` is ``G`` (``m <= n``) or ``G^T``, so ``A`` is
  ``d x e`` with ``d = min(m, n)``; ``A``'s range side is ``G``'s left side
  unless ``transposed``."""
  m, n = g_Bxmxn.shape[-2:]
  return (g_Bxmxn, False) if m <= n else (mT(g_Bxmxn), True)


def _descending_eigh(c: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  """Top-``rank`` eigenpairs of symmetric ``c``, largest first."""
  lam, w = jnp.linalg.eigh(c)
  return lam[..., ::-1][..., :rank], w[..., :, ::-1][..., :, :rank]


def _finish(range_b, row_b, transposed, left, right):
  """Maps range/row-side bases of ``A`` back to ``(P, Q)`` of ``G``, sign-canonical."""
  p, q = (row_b, range_b) if transposed else (range_b, row_b)
  p = canonical_signs(p) if left else None
  q = canonical_signs(q) if right else None
  return p, q


def _check_precision(precision):
  if isinstance(precision, str) and precision == BF16:
    return
  try:
    jax.lax.Precision(precision)
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(
        f"precision={precision!r}: expected 'default', 'high', 'highest' or 'bfloat16'."
    ) from e


def _nonzero(x: jax.Array) -> jax.Array:
  """Per matrix of the stack: whether it has a nonzero entry, ``(*batch, 1, 1)``."""
  return jnp.any(x != 0, axis=(-2, -1), keepdims=True)


@dataclasses.dataclass(frozen=True)
class GramEigh(BasisMethod):
  r"""Top eigenvectors of the smaller Gram matrix (float32 ``eigh``).

  With :math:`d = \min(m, n)` and :math:`A = G` (:math:`m \le n`) or
  :math:`G^\top`:

  .. math::
    A A^\top = U \Lambda U^\top,\qquad
    U_r = \text{top-}r\text{ eigenvectors},\qquad
    V_r = \operatorname{orth}(A^\top U_r)
    \;\;(= A^\top U_r \Lambda_r^{-1/2} \text{ in exact arithmetic})

  and :math:`U_r, V_r` are returned as :math:`P, Q` (swapped when
  :math:`m > n`); the other side is only computed when asked for.  Cost: a
  ``d x d`` Gram (:math:`d^2 e` flops) and a ``d x d`` ``eigh``.  Squaring the
  spectrum loses the directions with :math:`\sigma_i \lesssim 2.4\cdot
  10^{-4}\sigma_1` (:math:`\sqrt{\epsilon_{32}}`), which GaLore's top ``r``
  never needs.

  Attributes:
    precision: ``jax.lax.Precision`` name of the products with :math:`G`
      (``"highest"``, the default: full float32, since the Gram squares the spectrum;
      ``"default"`` lets a GPU use TF32), or ``"bfloat16"`` (operands rounded to bf16).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import subspace
    >>> g = jnp.diag(jnp.array([1.0, 3.0, 2.0]))
    >>> p, q = subspace.GramEigh()(g, 2, left=True, right=True, prev=None, key=None)
    >>> p
    Array([[0., 0.],
           [1., 0.],
           [0., 1.]], dtype=float32)
    >>> bool(jnp.allclose(q, p))
    True
  """

  precision: str = "highest"

  def __post_init__(self):
    _check_precision(self.precision)

  def __call__(self, g_Bxmxn, rank, *, left, right, prev=None, key=None):
    del prev, key
    a, transposed = _as_range(max_normalize(g_Bxmxn.astype(jnp.float32)))
    need_row = left if transposed else right
    _, u = _descending_eigh(mm(a, mT(a), self.precision), rank)
    row = _orthonormalize(mm(mT(a), u, self.precision)) if need_row else None
    return _finish(u, row, transposed, left, right)


def _rayleigh_ritz(a, basis, rank, need_row, precision):
  """Best rank-``rank`` singular pairs of ``a`` within the span of orthonormal
  ``basis`` (range side): ``B = basis^T A``, ``eigh(B B^T)``, sorted."""
  b = mm(mT(basis), a, precision)  # k x e
  _, w = _descending_eigh(gram(mT(b)), rank)  # B B^T, k x k
  u = mm(basis, w)
  row = _orthonormalize(mm(mT(b), w)) if need_row else None
  return u, row


@dataclasses.dataclass(frozen=True)
class Randomized(BasisMethod):
  r"""Randomized SVD (Halko et al. range finder; GaLore 2's refresh).

  With :math:`A = G` or :math:`G^\top` (whichever makes the range side the
  smaller, :math:`d = \min(m, n)`, :math:`e = \max(m, n)`) and
  :math:`k = r + p < d` (else the sketch would be the whole space, and it
  computes :class:`GramEigh` instead):

  .. math::
    Y = A\Omega,\qquad
    Y \leftarrow A\big(A^\top \operatorname{orth}(Y)\big)\;\;(q \text{ times}),
    \qquad Q_Y = \operatorname{orth}(Y) \\
    B = Q_Y^\top A \;(k\times e),\qquad B B^\top = W \Lambda W^\top,\qquad
    U_r = Q_Y W_{:, :r},\qquad V_r = \operatorname{orth}(B^\top W_{:, :r})

  :math:`\Omega` is ``e x k`` standard Gaussian from the matrix's own key
  (:func:`~galore_jax.draws.matrix_keys`).  With
  ``warm_start`` and a previous basis (``prev.refreshes > 0`` and that basis
  nonzero), its first ``r`` columns are the previous basis instead: the row-side
  basis as is, or :math:`A^\top X` of a range-side basis :math:`X` (one extra
  product).  ``orth`` is :func:`orthonormalize` (shifted CholeskyQR), the small
  problem an ``eigh`` of ``k x k``: no large factorization.  Cost: :math:`2q+2`
  products of :math:`A` with a ``k``-column matrix (:math:`2dek` flops each),
  :math:`q+1` orthonormalizations of ``d x k`` (one more of ``e x r`` when the
  other side is asked for) and a ``k x k`` ``eigh``.  Accuracy grows with
  ``oversample`` :math:`p` and ``power_iters`` :math:`q` (the error shrinks like
  :math:`(\sigma_{k+1}/\sigma_r)^{2q+1}`); a warm start makes it nearly exact
  when the subspace moved little since the last refresh.

  Attributes:
    oversample: extra sketch columns :math:`p`.
    power_iters: power (subspace) iterations :math:`q`.
    warm_start: start from the previous basis when there is one.
    precision: the products with :math:`G` (the ``e x k`` / ``d x k`` sketches and
      :math:`B`): ``"bfloat16"`` (default; operands rounded to bfloat16, float32
      accumulation: a tensor core's bf16 matmul), or a ``jax.lax.Precision`` name
      (``"highest"``: full float32; ``"default"``: TF32 on a GPU, one bf16 pass on a
      TPU, float32 on a CPU).  See :class:`Power` for the measurement behind the default.
      The orthonormalizations, the ``k x k`` Gram and ``eigh`` stay full float32, and so
      does the exact fallback (:class:`GramEigh`) when ``k >= d``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from galore_jax import subspace
    >>> g = jnp.diag(jnp.array([1.0, 3.0, 2.0, 0.5, 0.1]))
    >>> method = subspace.Randomized(oversample=2)
    >>> p, q = method(g, 2, left=True, right=False, prev=None,
    ...               key=jax.random.key(0))
    >>> jnp.round(p, 2) + 0.0     # + 0.0: no negative zeros in the printout
    Array([[0., 0.],
           [1., 0.],
           [0., 1.],
           [0., 0.],
           [0., 0.]], dtype=float32)
  """

  oversample: int = 8
  power_iters: int = 1
  warm_start: bool = True
  precision: str = BF16
  needs_key: ClassVar[bool] = True

  def __post_init__(self):
    for name in ("oversample", "power_iters"):
      _checks.int_at_least(getattr(self, name), 0, f"Randomized {name}")
    _checks.flag(self.warm_start, "Randomized warm_start")
    _check_precision(self.precision)

  def __call__(self, g_Bxmxn, rank, *, left, right, prev=None, key=None):
    if rank + self.oversample >= min(g_Bxmxn.shape[-2:]):
      # The sketch would span the whole range side: the exact method is cheaper.
      # (its Gram squares the spectrum: bf16 operands would blur it; full float32 there)
      exact = "highest" if self.precision == BF16 else self.precision
      return GramEigh(exact)(g_Bxmxn, rank, left=left, right=right)
    a, transposed = _as_range(max_normalize(g_Bxmxn.astype(jnp.float32)))
    need_row = left if transposed else right
    *batch, d, e = a.shape
    k = rank + self.oversample
    omega = draws.normal(draws.matrix_keys(key, tuple(batch)), (e, k))

    if self.warm_start and prev is not None:
      prev_range, prev_row = (
          (prev.right, prev.left) if transposed else (prev.left, prev.right)
      )
      start = None
      if prev_row is not None:
        start = prev_row.astype(jnp.float32)[..., :k]
      elif prev_range is not None:
        start = mm(mT(a), prev_range.astype(jnp.float32)[..., :k], self.precision)
      if start is not None:
        ok = (jnp.asarray(prev.refreshes) > 0) & _nonzero(start)
        j = start.shape[-1]
        omega = omega.at[..., :j].set(jnp.where(ok, start, omega[..., :j]))

    y = mm(a, omega, self.precision)
    for _ in range(self.power_iters):
      y = _orthonormalize(y, tol=None)
      y = mm(a, mm(mT(a), y, self.precision), self.precision)
    u, row = _rayleigh_ritz(a, _orthonormalize(y), rank, need_row, self.precision)
    return _finish(u, row, transposed, left, right)


@dataclasses.dataclass(frozen=True)
class Power(BasisMethod):
  r"""One warm-started block power step from the previous basis (LDAdam).

  For a basis :math:`X` on one side of :math:`A` (:math:`A = G` for a left
  basis, :math:`G^\top` for a right one; with both sides stored, the smaller
  one):

  .. math::
    Z = \operatorname{orth}\big(A (A^\top X)\big),\qquad
    M = A^\top Z,\qquad M^\top M = W \Lambda W^\top,\qquad
    X' = Z W,\qquad Y' = \operatorname{orth}(M W)

  i.e. one subspace iteration followed by a Rayleigh-Ritz rotation, so the
  columns are ordered by decreasing estimated singular value; :math:`Y'` is
  the other side's basis, computed only when asked for.  Cost: three products
  of :math:`G` with an ``r``-column matrix, one ``d x r`` orthonormalization and an
  ``r x r`` ``eigh`` -- the cheapest method that uses the gradient.  It tracks a
  slowly moving subspace (error shrinks by :math:`(\sigma_{r+1}/\sigma_r)^2`
  per refresh); it is not a fresh top-``r`` estimate after a large change.

  With no previous basis (``prev`` is ``None``, ``prev.refreshes == 0``, or a
  matrix of the stack has an all-zero basis) it starts cold: by default
  (``cold="randomized"``) a :class:`Randomized` range finder (two power iterations,
  oversample 8, matmuls only; its sketch from ``key``, which a refresh derives from seed 0
  as for a keyed method: :attr:`BasisMethod.cold_key`), or with ``cold="svd"`` the exact
  :func:`svd_bases`.  On a GPU the exact SVD is the slow part (53.6 s for a whole
  LLaMA-1B on an H100, minutes at 7b), which the first step of a run would pay.
  The switch is a ``lax.cond``, so warm refreshes never run the cold start.

  Precision.  The three products with :math:`G` (:math:`A^\top X`, :math:`A(\cdot)`,
  :math:`A^\top Z`) run in ``precision``, by default ``"bfloat16"``: operands rounded to
  bfloat16, products accumulated in float32 (half a TF32 matmul's time on a tensor core,
  a sixth of full float32's bf16x6 emulation); the orthonormalization, the ``r x r``
  Gram and ``eigh`` stay full float32.  Measured on a CPU (which rounds the operands
  exactly as a tensor core does; it has no TF32), the captured fraction of the exact
  top-``r`` energy is the same as with ``"highest"`` to 1e-5: 0.9992-0.9995 on the
  quality tests' matrices (tests/test_methods.py, >= 0.99 required), 0.9991-1.0 on the
  28 kernels of a LLaMA-20M's bf16 gradients at rank 64 (warm from the previous batch's
  basis), and 0.8353 / 0.9478 / 0.9985 on 256 x 688 matrices with flat,
  :math:`i^{-1/2}` and :math:`i^{-1}` spectra (the same with either precision): the
  error of one power step dwarfs bf16's rounding.  TF32 (``"default"`` on a GPU) is
  more precise than bf16, so it passes too; ``"highest"`` is the previous default.
  A bf16 model's gradient is bf16 already, so only the ``r``-column operand is rounded.

  Attributes:
    precision: ``"bfloat16"`` (default) or a ``jax.lax.Precision`` name (``"highest"``:
      full float32; ``"default"``: TF32 on a GPU, float32 on a CPU) for the products
      with :math:`G`.
    cold: the first basis: ``"randomized"`` (default) or ``"svd"`` (exact).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import subspace
    >>> g = jnp.diag(jnp.array([1.0, 3.0, 2.0]))
    >>> prev = subspace.Bases(left=None, refreshes=jnp.int32(1),
    ...                       right=jnp.array([[0.1, 0.0], [1.0, 0.1], [0.0, 1.0]]))
    >>> _, q = subspace.Power()(g, 2, left=False, right=True, prev=prev, key=None)
    >>> jnp.round(q, 2) + 0.0     # the 0.1 error shrank by (1/3)**2
    Array([[0.01, 0.  ],
           [1.  , 0.  ],
           [0.  , 1.  ]], dtype=float32)
  """

  precision: str = BF16
  cold: str = "randomized"
  cold_key: ClassVar[bool] = True

  def __post_init__(self):
    _check_precision(self.precision)
    if self.cold not in ("randomized", "svd"):
      raise ValueError(f"Power cold must be 'randomized' or 'svd', got {self.cold!r}.")

  def __call__(self, g_Bxmxn, rank, *, left, right, prev=None, key=None):
    g = g_Bxmxn.astype(jnp.float32)
    m, n = g.shape[-2:]

    def exact():
      if self.cold == "svd":
        return svd_bases(g, rank, left=left, right=right)
      sketch = Randomized(power_iters=2, warm_start=False, precision=self.precision)
      return sketch(g, rank, left=left, right=right, key=key)

    has_l = prev is not None and prev.left is not None
    has_r = prev is not None and prev.right is not None
    if not (has_l or has_r):
      return exact()
    # Iterate on the stored side; with both stored, on the smaller (cheaper) one.
    work_right = n <= m if (has_l and has_r) else has_r
    x = (prev.right if work_right else prev.left).astype(jnp.float32)[..., :rank]
    if x.shape[-1] != rank:
      raise ValueError(
          f"Power: the previous basis has {x.shape[-1]} columns, rank is {rank}."
      )

    def warm():
      a = max_normalize(mT(g) if work_right else g)
      z = _orthonormalize(mm(a, mm(mT(a), x, self.precision), self.precision))
      need_row = left if work_right else right
      u, row = _rayleigh_ritz(a, z, rank, need_row, self.precision)
      return _finish(u, row, work_right, left, right)

    cold = (jnp.asarray(prev.refreshes) == 0) | ~jnp.all(_nonzero(x))
    return jax.lax.cond(cold, exact, warm)


@dataclasses.dataclass(frozen=True)
class Random(BasisMethod):
  r"""A random orthonormal basis from ``key`` alone (GoLore, APOLLO).

  .. math::
    P = \operatorname{orth}(\Omega_P),\quad Q = \operatorname{orth}(\Omega_Q),
    \qquad \Omega \sim \mathcal{N}(0, 1)^{d \times r}

  from independent keys ``fold_in(k, 0)`` / ``fold_in(k, 1)`` of the matrix's
  own key ``k`` (:func:`~galore_jax.draws.matrix_keys`): a uniformly
  distributed subspace (an orthonormalized Gaussian), the gradient itself is
  not used.  The same key gives the same basis, so a basis can be regenerated
  from its key instead of stored.  GoLore uses it late in training (where the
  top singular directions of a small-batch gradient are mostly noise), APOLLO
  throughout with channel-wise rescaling.  Cost: one ``d x r``
  :func:`orthonormalize`.  Columns carry no order.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from galore_jax import subspace
    >>> rand = subspace.Random()
    >>> p, _ = rand(jnp.ones((6, 4)), 2, left=True, right=False, prev=None,
    ...             key=jax.random.key(3))
    >>> p2, _ = rand(jnp.zeros((6, 4)), 2, left=True, right=False, prev=None,
    ...              key=jax.random.key(3))
    >>> p.shape, bool(jnp.all(p == p2))
    ((6, 2), True)
  """

  needs_key: ClassVar[bool] = True
  reads_gradient: ClassVar[bool] = False

  def __call__(self, g_Bxmxn, rank, *, left, right, prev=None, key=None):
    del prev
    *batch, m, n = g_Bxmxn.shape
    keys = draws.matrix_keys(key, tuple(batch))
    draw = lambda i, d: self.from_gaussian(draws.normal(draws.fold_in_each(keys, i), (d, rank)))
    return (draw(0, m) if left else None), (draw(1, n) if right else None)

  def from_gaussian(self, omega_Bxdxr: jax.Array) -> jax.Array:
    """The basis made of a standard Gaussian draw: orthonormalized, sign-canonical."""
    return canonical_signs(_orthonormalize(omega_Bxdxr))


@dataclasses.dataclass(frozen=True)
class Gaussian(Random):
  r"""APOLLO's random projection: a Gaussian sketch from ``key`` alone, entries
  :math:`\mathcal{N}(0, 1/r)`, neither orthonormalized nor sign-canonical.

  .. math::
    P = \Omega_P / \sqrt{r},\quad Q = \Omega_Q / \sqrt{r},
    \qquad \Omega \sim \mathcal{N}(0, 1)^{d \times r}

  drawn like :class:`Random` (keys ``fold_in(k, 0)`` / ``fold_in(k, 1)`` of the
  matrix's own key ``k``, :func:`~galore_jax.draws.matrix_keys`).  The scale makes the
  coefficients keep the gradient's column norms in expectation (Johnson-Lindenstrauss):
  :math:`\mathbb{E}\,\|P^\top g\|^2 = \|g\|^2`, which is what APOLLO's channel-wise
  scale (a ratio of coefficient norms) and its learning rates assume.  An orthonormal
  basis (:class:`Random`) would shrink those norms by about :math:`\sqrt{r/d}`.  Not a
  basis in the sense of the other methods (not in :data:`METHODS`): GaLore's
  :math:`P P^\top` is then no projection.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from galore_jax import subspace
    >>> p, _ = subspace.Gaussian()(jnp.zeros((2000, 4)), 100, left=True, right=False,
    ...                            key=jax.random.key(0))
    >>> p.shape, round(float(jnp.mean(p * p) * 100), 1)       # variance 1 / r
    ((2000, 100), 1.0)
  """

  def from_gaussian(self, omega_Bxdxr: jax.Array) -> jax.Array:
    """The sketch: the draw scaled by :math:`1 / \\sqrt{r}`."""
    return omega_Bxdxr * (1.0 / math.sqrt(omega_Bxdxr.shape[-1]))


# Names accepted by ``galore_projection(method=...)`` -> default instances.
METHODS: dict[str, BasisMethod] = {
    "svd": SVD(),
    "gram_eigh": GramEigh(),
    "randomized": Randomized(),
    "power": Power(),
    "random": Random(),
}


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
  """Bases of ``g_Bxmxn`` (real matrices) by ``method`` (a name in :data:`METHODS` or a
  :class:`BasisMethod`), in float32, sign-canonical; ``rank`` is clipped to ``min(m, n)``,
  as the transforms clip theirs.

  The bases are not differentiated: ``jax.grad`` through an update treats them as
  constants, like the rest of the optimizer state.

  A matrix of the stack holding inf or NaN is not handed to the method (LAPACK's
  SVD never returns on inf): its bases come back all-NaN, which
  :func:`galore_jax.guard.keep_finite` then rejects, keeping the previous basis.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import subspace
    >>> p, q = subspace.compute_bases(jnp.ones((3, 5, 4)), 2, left=False,
    ...                               right=True, method="svd")
    >>> q.shape
    (3, 4, 2)
  """
  _checks.int_at_least(rank, 1, "compute_bases: rank")
  left = _checks.flag(left, "compute_bases: left")  # ("no" read as True)
  right = _checks.flag(right, "compute_bases: right")
  g_Bxmxn = jnp.asarray(g_Bxmxn)
  if g_Bxmxn.ndim < 2:
    raise ValueError("compute_bases: g_Bxmxn must have at least 2 axes (..., m, n), got shape"
                     f" {g_Bxmxn.shape}.")
  _checks.real_array(g_Bxmxn, "compute_bases: g_Bxmxn",
                     "expected real matrices (the bases are real).")
  rank = min(rank, *g_Bxmxn.shape[-2:])  # as the transforms' plans clip it
  # The basis is state that the update holds fixed (galore-torch computes it under no_grad):
  # differentiated through, an SVD's derivative is 0/0 on repeated singular values (a gradient
  # of rank < r, or all zero), and jax.grad through a refresh step came back NaN.
  g, prev = jax.lax.stop_gradient((g_Bxmxn.astype(jnp.float32), prev))
  finite = jnp.all(jnp.isfinite(g), axis=(-2, -1), keepdims=True)
  p, q = get_method(method)(
      jnp.where(finite, g, 0.0), rank, left=left, right=right, prev=prev, key=key
  )
  nan_if_bad = lambda b: None if b is None else jnp.where(finite, b, jnp.nan)
  return nan_if_bad(p), nan_if_bad(q)

"""The non-finite guard: a refresh never installs a basis that holds a NaN or inf.

A gradient with a NaN or inf (an overflowed bf16 step, a bad batch) would make every later
projection NaN.  :func:`galore_jax.subspace.compute_bases` hands no such matrix to a basis
method and returns NaN bases for it; :func:`accept` then keeps, matrix by matrix, the
previous basis wherever the new one is not finite, and counts the refresh only when at least
one new matrix was taken.  Both transforms (``galore_projection`` and ``scale_by_ldadam``)
accept new bases only through :func:`accept`.

A leaf that stacks matrices (a scanned ``(L, d, f)`` kernel) may be refreshed in part: its
counter goes up, yet some layers keep their basis.  :func:`taken` says which, one flag per
matrix; ``galore_jax.leaves.refreshed`` hands them on, so a lazy policy's similarity averages
over the taken layers only and ``on_refresh`` resets or transports the moments of those
layers only: a kept layer's moments stay in the basis they are expressed in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from galore_jax._explicit import place_like
from galore_jax.subspace import Bases


def keep_finite(new: jax.Array, old: jax.Array) -> jax.Array:
  """Per matrix of the stack: ``new`` where it is all finite, else ``old``.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import guard
    >>> new = jnp.array([[[1.0]], [[jnp.nan]]])
    >>> guard.keep_finite(new, jnp.zeros_like(new))[:, 0, 0]
    Array([1., 0.], dtype=float32)
  """
  ok = jnp.all(jnp.isfinite(new), axis=(-2, -1), keepdims=True)
  return jnp.where(ok, new, old.astype(new.dtype))


def taken(left: jax.Array | None, right: jax.Array | None, old: Bases) -> jax.Array:
  """Per matrix of the stack (a bool array of the batch shape, ``()`` for one matrix):
  whether a refresh that computed ``left`` / ``right`` (the sides ``old`` has; the others
  are ignored) installs a new basis there, i.e. some side is all finite, which
  :func:`keep_finite` takes.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import guard, subspace
    >>> old = subspace.Bases(left=None, right=jnp.zeros((3, 4, 1)), refreshes=jnp.int32(1))
    >>> guard.taken(None, jnp.zeros((3, 4, 1)).at[1, 2].set(jnp.nan), old).tolist()
    [True, False, True]
  """
  news = [new for new, prev in ((left, old.left), (right, old.right)) if prev is not None]
  finite = [jnp.all(jnp.isfinite(x), axis=(-2, -1)) for x in news]
  return finite[0] if len(finite) == 1 else finite[0] | finite[1]


def count_refresh(old: Bases, left: jax.Array | None, right: jax.Array | None) -> jax.Array:
  """``old.refreshes`` after a refresh that computed ``left`` / ``right`` (the sides ``old``
  has; the others are ignored): one more, unless every new matrix is non-finite, so
  :func:`keep_finite` rejects the refresh wholly and it does not count (:func:`taken` is
  false for every matrix).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import guard, subspace
    >>> old = subspace.Bases(left=None, right=jnp.zeros((2, 3, 1)), refreshes=jnp.int32(1))
    >>> bad = jnp.full((2, 3, 1), jnp.nan)                   # every new matrix rejected
    >>> int(guard.count_refresh(old, None, bad))
    1
    >>> int(guard.count_refresh(old, None, bad.at[1].set(0.0)))  # one taken
    2
  """
  return old.refreshes + jnp.any(taken(left, right, old)).astype(old.refreshes.dtype)


def accept(left: jax.Array | None, right: jax.Array | None, old: Bases) -> Bases:
  """The bases after a refresh that computed ``left`` / ``right``: each matrix kept from
  ``old`` where its new basis is not finite, stored in the old dtype and (under Explicit
  axes) the old sharding; ``refreshes`` counted by :func:`count_refresh`.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import guard, subspace
    >>> old = subspace.Bases(left=None, right=jnp.ones((2, 3, 1), jnp.bfloat16),
    ...                      refreshes=jnp.int32(1))
    >>> new = jnp.zeros((2, 3, 1)).at[0].set(jnp.nan)
    >>> b = guard.accept(None, new, old)
    >>> b.right[:, 0, 0].tolist(), b.right.dtype, int(b.refreshes)
    ([1.0, 0.0], dtype(bfloat16), 2)
  """

  def guarded(new, prev):
    if prev is None:
      return None
    return place_like(keep_finite(new, prev).astype(prev.dtype), prev)

  return Bases(guarded(left, old.left), guarded(right, old.right),
               count_refresh(old, left, right))

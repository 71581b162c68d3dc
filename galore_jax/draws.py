r"""Which PRNG key each matrix draws from.

The randomized basis methods (:mod:`galore_jax.subspace`) and APOLLO's projection draw
one sketch per matrix, and that sketch must not depend on how the matrices are grouped
when they are computed: one device or a mesh (same-shaped leaves are stacked and spread
over the devices), all the layers of a scanned model at once or one layer at a time (the
LLaMA example's per-layer updates).  So every matrix has its own key:

.. math::
  k_{i,t} = \operatorname{fold\_in}(\operatorname{fold\_in}(\mathit{key}, i), t),
  \qquad k_{i,t,j} = \operatorname{fold\_in}(k_{i,t}, j)

for leaf :math:`i` of the transform's tree at refresh (or step) :math:`t`
(:func:`leaf_key`) and matrix :math:`j` of the leaf's ``(*batch, m, n)`` stack, in
row-major order (:func:`matrix_keys`).  An update that sees one slice of stacked leaves is
told which (:class:`StackSlice`), and numbers its leaves and matrices as the stacked
update would (:func:`slice_keys`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from galore_jax import _checks

STACK_SLICE = "galore_stack_slice"  # the extra arg of update() for a slice of stacked leaves


class StackSlice(NamedTuple):
  r"""What an update sees of a larger, stacked update: slice ``index`` of the leading axis
  of every leaf, the leaves being consecutive in the stacked update's tree from its leaf
  ``leaf_offset`` on (a scanned model's layers updated one layer at a time, the rest of the
  model first).  Passed as ``tx.update(grads, state, params, galore_stack_slice=...)`` to
  a transform whose state was made for one slice, it makes its random draws (a refresh's
  sketches, APOLLO's projection) those the stacked update draws for that slice: leaf ``i``
  keys as leaf ``i + leaf_offset`` and its matrix ``k`` as the stack's matrix ``index * K
  + k`` (``K`` matrices per slice; :func:`matrix_keys`).  Methods without a key ignore it.

  Example:
    >>> import galore_jax as gj
    >>> gj.StackSlice(index=3, leaf_offset=1)
    StackSlice(index=3, leaf_offset=1)
  """

  index: Any  # an int, or an int32 scalar array (traced in a loop over the layers)
  leaf_offset: int = 0


def stack_slice(extra_args: dict) -> StackSlice | None:
  """``extra_args``'s ``galore_stack_slice`` (a :class:`StackSlice`), or ``None`` when
  absent; anything else is a one-line ``ValueError``.

  Example:
    >>> from galore_jax import draws
    >>> draws.stack_slice({"galore_stack_slice": draws.StackSlice(2)}).index
    2
  """
  value = extra_args.get(STACK_SLICE)
  if value is None:
    return None
  if not isinstance(value, StackSlice):
    raise ValueError(f"{STACK_SLICE}: expected a galore_jax.StackSlice(index, leaf_offset),"
                     f" got {value!r}")
  _checks.int_at_least(value.leaf_offset, 0, f"{STACK_SLICE}: leaf_offset")
  _check_index(value.index)
  return value


def _check_index(index) -> None:
  """A slice index is an int >= 0, or an integer scalar array (traced in a loop over the
  layers: its value is the loop's).  A negative one drew wrapped keys, a float or a bool
  another slice's, without a word."""
  if not (_is_integer(index) and jnp.ndim(index) == 0
          and (isinstance(index, (jax.Array, np.ndarray)) or index >= 0)):
    raise ValueError(f"{STACK_SLICE}: index must be an int >= 0 or an integer scalar array,"
                     f" got {index!r}.")


def slice_keys(key: jax.Array, batch: tuple[int, ...], stack: StackSlice | None) -> jax.Array:
  """The keys a ``(*batch, m, n)`` leaf's matrices draw from: ``key`` itself (one key for
  the leaf, :func:`matrix_keys` folds in each matrix's index), or, for a slice of a stack,
  one key per matrix, numbered as in the stack, shape ``batch`` or ``(1,)`` for a single
  matrix (whose caller gives it a stack axis of 1).

  Example:
    >>> import jax
    >>> from galore_jax import draws
    >>> key = jax.random.key(0)
    >>> keys = draws.slice_keys(key, (), draws.StackSlice(index=2))
    >>> keys.shape, bool(keys[0] == draws.matrix_keys(key, (4,))[2])
    ((1,), True)
  """
  if stack is None:
    return key
  size = math.prod(batch)
  return matrix_keys(key, (size,), start=stack.index * size).reshape(batch or (1,))


def matrix_keys(key: jax.Array | None, batch: tuple[int, ...], start: Any = 0) -> jax.Array:
  """One PRNG key per matrix of a ``(*batch, m, n)`` stack, shape ``batch``.

  A key array of shape ``batch`` (``batch`` not empty) is one key per matrix and
  comes back as is; a single key stands for the keys ``fold_in(key, start + i)``, ``i``
  the matrix's row-major index in the stack (``None``: ``key(0)``; ``start``, an int or
  an int array, numbers a stack that is a slice of a larger one as that one would).  The
  randomized methods draw each matrix's Gaussian from its own key, so a
  matrix's basis does not depend on which stack it is computed in:
  ``galore_projection`` stacks leaves differently on one device and over a mesh
  and gets the same bases.  Raw ``uint32`` keys are accepted.

  Example:
    >>> import jax
    >>> from galore_jax import draws
    >>> keys = draws.matrix_keys(jax.random.key(1), (2, 3))
    >>> keys.shape, bool(keys[1, 0] == jax.random.fold_in(jax.random.key(1), 3))
    ((2, 3), True)
    >>> bool(draws.matrix_keys(jax.random.key(1), (3,), start=3)[0] == keys[1, 0])
    True
  """
  if key is None:
    key = jax.random.key(0)
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.dtype != jnp.uint32 or key.ndim < 1:  # (an int seed failed inside JAX)
      raise ValueError("matrix_keys: key must be a PRNG key, raw uint32 key data or None, got"
                       f" {key.dtype} shape {key.shape} (for a seed, pass"
                       " jax.random.key(seed)).")
    key = jax.random.wrap_key_data(key)
  if batch and key.shape == tuple(batch):
    return key
  if key.shape != ():
    raise ValueError(
        f"key must be one PRNG key or one per matrix (shape {tuple(batch)}), got"
        f" shape {key.shape}.")
  _check_integer(start, "matrix_keys: start")
  index = start + jnp.arange(math.prod(batch), dtype=jnp.int32)
  flat = jax.vmap(jax.random.fold_in, (None, 0))(key, index)
  return flat.reshape(batch)


def fold_in_each(keys: jax.Array, data: int) -> jax.Array:
  """``fold_in(k, data)`` for every key ``k`` of the array ``keys``.

  Example:
    >>> import jax
    >>> from galore_jax import draws
    >>> keys = draws.matrix_keys(jax.random.key(0), (2,))
    >>> bool(draws.fold_in_each(keys, 5)[1] == jax.random.fold_in(keys[1], 5))
    True
  """
  _check_integer(data, "fold_in_each: data")
  flat = jax.vmap(jax.random.fold_in, (0, None))(keys.reshape(-1), data)
  return flat.reshape(keys.shape)


def normal(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Standard normal float32 ``(*keys.shape, *shape)``: one ``shape`` draw per key,
  each drawn flat and reshaped (XLA:CPU compiles a flat draw several times faster
  than a batched one).

  Example:
    >>> import jax
    >>> from galore_jax import draws
    >>> draws.normal(draws.matrix_keys(jax.random.key(0), (3,)), (4, 2)).shape
    (3, 4, 2)
  """
  if not all(_is_integer(s) and jnp.ndim(s) == 0 and s >= 0 for s in shape):
    raise ValueError(f"normal: shape must be non-negative ints, got {tuple(shape)!r}.")
  draw = lambda k: jax.random.normal(k, (math.prod(shape),), jnp.float32)
  return jax.vmap(draw)(keys.reshape(-1)).reshape(*keys.shape, *shape)


def leaf_key(key: jax.Array, i: Any, step: Any) -> jax.Array:
  """Leaf ``i``'s key at ``step``: ``fold_in(fold_in(key, i), step)``, derived (not split)
  from the stored key, so the state never changes and any draw can be made again.

  Example:
    >>> import jax
    >>> from galore_jax import draws
    >>> k = draws.leaf_key(jax.random.key(0), 2, 7)
    >>> bool(k == jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 2), 7))
    True
  """
  _check_integer(i, "leaf_key: i")
  _check_integer(step, "leaf_key: step")
  return jax.random.fold_in(jax.random.fold_in(key, i), step)


def _check_integer(value, name: str) -> None:
  """A number folded into a key is an int or an integer array (traced: a loop's index);
  ``fold_in`` truncated a float (1.9 drew index 1's keys) and took a bool, silently."""
  if not _is_integer(value):
    raise ValueError(f"{name} must be an int or an integer array, got {value!r}.")


def _is_integer(value) -> bool:
  """Whether ``value`` is an int (not a bool) or an array of an integer dtype."""
  if isinstance(value, (jax.Array, np.ndarray)):
    return bool(jnp.issubdtype(value.dtype, jnp.integer))
  return _checks.is_int(value)

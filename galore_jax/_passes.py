"""A stack of matrices worked on in passes over a mesh's devices, so that no device holds a
whole stack's intermediates at once (the projections of a layer stack,
:mod:`galore_jax.projection`; the refresh's factorizations, :mod:`galore_jax.leaves`), and
the zero that makes one computation wait for another.  Private: the rule, the split and the
zero live here once for both."""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from galore_jax._explicit import padded
from galore_jax._explicit import typed_sharding


class Passes(NamedTuple):
  """A stack of ``runs * length`` matrices cut into ``runs`` contiguous runs of ``length``;
  pass ``j`` takes ``per_run`` consecutive matrices of every run from :meth:`start` on, one
  pass as many matrices as the mesh has devices.  Made by :func:`passes`."""

  runs: int
  length: int
  per_run: int

  @property
  def count(self) -> int:
    """How many passes cover every matrix."""
    return -(-self.length // self.per_run)

  def start(self, j):
    """Where pass ``j`` (an int, or a traced index) starts in each run: ``j * per_run``, the
    last pass ending at the run's end (its first matrices then repeat the previous pass's,
    so every pass has one shape)."""
    last = self.length - self.per_run
    return min(j * self.per_run, last) if isinstance(j, int) else jnp.minimum(
        j * self.per_run, last)


def passes(layers: int, devices: int) -> Passes | None:
  """How a stack of ``layers`` matrices is worked on in passes of ``devices`` matrices, or
  ``None`` for all at once (``layers <= devices``).  The runs are ``gcd(layers, devices)``:
  the ways a layer axis is split evenly over mesh axes divide both, so each device's share
  of it is whole runs, and a pass takes the same share of it on every device (a loop over a
  split axis would gather it).  Where ``devices`` divides ``layers``, pass ``j`` takes
  matrices ``i * (layers // devices) + j``; otherwise the last pass repeats a few matrices
  (12 layers on 8 devices: 16 computed), where padding the stack would copy it whole.

  Example:
    >>> from galore_jax import _passes
    >>> _passes.passes(16, 8), _passes.passes(8, 8)
    (Passes(runs=8, length=2, per_run=1), None)
    >>> p = _passes.passes(12, 8)                 # 4 runs of 3, two of each per pass
    >>> p, p.count, [p.start(j) for j in range(p.count)]
    (Passes(runs=4, length=3, per_run=2), 2, [0, 1])
  """
  if layers <= devices:
    return None
  runs = math.gcd(layers, devices)
  return Passes(runs, layers // runs, devices // runs)


def as_runs(x: jax.Array, p: Passes) -> jax.Array:
  """A stack ``(L, ...)`` as ``(runs, length, ...)``, its first axis's sharding (Explicit
  axes) on the runs.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _passes
    >>> _passes.as_runs(jnp.zeros((12, 2)), _passes.passes(12, 8)).shape
    (4, 3, 2)
  """
  typed = typed_sharding(x)
  if typed is None:
    return x.reshape(p.runs, p.length, *x.shape[1:])
  first, *rest = padded(typed.spec, x.ndim)
  return jnp.reshape(x, (p.runs, p.length, *x.shape[1:]), out_sharding=P(first, None, *rest))


def take(runs: jax.Array, p: Passes, j) -> jax.Array:
  """Pass ``j`` (an int, or a traced index) of a stack in runs (:func:`as_runs`): its
  ``runs * per_run`` matrices as one stack, sharded as the runs are.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _passes
    >>> p = _passes.passes(12, 8)
    >>> _passes.take(_passes.as_runs(jnp.arange(12), p), p, 1).tolist()  # 1-2, 4-5, ...
    [1, 2, 4, 5, 7, 8, 10, 11]
  """
  static = isinstance(j, int)  # (passes unrolled in Python: a plain slice)
  if p.per_run == 1:  # (one matrix of each run: an index, no reshape)
    return runs[:, j] if static else jax.lax.dynamic_index_in_dim(runs, j, 1, False)
  start = p.start(j)
  part = (runs[:, start:start + p.per_run] if static
          else jax.lax.dynamic_slice_in_dim(runs, start, p.per_run, 1))
  shape = (p.runs * p.per_run, *runs.shape[2:])
  typed = typed_sharding(part)
  if typed is None:
    return part.reshape(shape)
  first, _, *rest = padded(typed.spec, part.ndim)
  return jnp.reshape(part, shape, out_sharding=P(first, *rest))


def put(runs: jax.Array, p: Passes, j, y: jax.Array) -> jax.Array:
  """``runs`` (a stack in runs, :func:`as_runs`) with pass ``j`` set to ``y`` (a stack as
  :func:`take` gives).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _passes
    >>> p = _passes.passes(12, 8)
    >>> out = _passes.put(jnp.zeros((4, 3), int), p, 1, jnp.arange(1, 9))
    >>> out.tolist()
    [[0, 1, 2], [0, 3, 4], [0, 5, 6], [0, 7, 8]]
  """
  if p.per_run == 1:
    return jax.lax.dynamic_update_index_in_dim(runs, y, j, 1)
  shape = (p.runs, p.per_run, *y.shape[1:])
  typed = typed_sharding(y)
  if typed is None:
    y = y.reshape(shape)
  else:
    first, *rest = padded(typed.spec, y.ndim)
    y = jnp.reshape(y, shape, out_sharding=P(first, None, *rest))
  return jax.lax.dynamic_update_slice_in_dim(runs, y, p.start(j), 1)


def joined(ys: Sequence[jax.Array], p: Passes) -> jax.Array:
  """The stack ``(L, ...)`` whose pass ``j`` is ``ys[j]`` (one per pass, as :func:`take`
  gives them; a repeated matrix is taken from its first pass), for passes unrolled in
  Python: a concatenation, where :func:`put` would write into a buffer made before them.
  Stacks whose first axis is whole on each device (Explicit axes) or of a layout unknown
  while tracing (Auto axes).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _passes
    >>> p = _passes.passes(12, 8)
    >>> ys = [_passes.take(_passes.as_runs(jnp.arange(12), p), p, j) for j in range(p.count)]
    >>> _passes.joined(ys, p).tolist()
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
  """
  pieces = []
  for j, y in enumerate(ys):
    y = y.reshape(p.runs, p.per_run, *y.shape[1:])
    pieces.append(y[:, j * p.per_run - p.start(j):])
  out = jnp.concatenate(pieces, axis=1)
  return out.reshape(p.runs * p.length, *out.shape[2:])


def after(tree: Any, done: Sequence[jax.Array]) -> Any:
  """Each array of ``tree`` plus a zero that XLA cannot fold, made from ``done``, so that
  what reads ``tree`` waits until ``done`` exists: ``min(x, 0)`` of an integer array (the
  caller's contract: never negative; a refresh counter), ``min(any(isnan(x)), 0)`` of a
  float one.  Not an ``optimization_barrier``: XLA:CPU removes those before it schedules.
  Adding a zero keeps every value (``-0.0`` becomes ``+0.0``).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _passes
    >>> _passes.after({0: jnp.array([1.0, -2.0])}, [jnp.int32(3), jnp.ones(2)])[0].tolist()
    [1.0, -2.0]
  """
  zeros = [jnp.minimum(jnp.min(d), 0) if jnp.issubdtype(d.dtype, jnp.integer)
           else jnp.minimum(jnp.any(jnp.isnan(d)).astype(jnp.int32), 0) for d in done]
  zero = jnp.min(jnp.stack(zeros))
  return jax.tree.map(lambda x: x + zero.astype(x.dtype), tree)

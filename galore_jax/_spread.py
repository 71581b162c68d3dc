"""A batched factorization spread over the devices of a mesh: each device factorizes its
share of a stack of matrices, so no SVD is repeated (see :mod:`galore_jax.sharding`)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from galore_jax._explicit import all_explicit
from galore_jax._explicit import padded
from galore_jax._explicit import reshard_to
from galore_jax._explicit import spec_names
from galore_jax._explicit import spec_without
from galore_jax._explicit import typed_sharding


def _place(x: jax.Array, spec: P, mesh) -> jax.Array:
  """``x`` resharded (Explicit axes) or constrained (Auto axes) to ``spec``."""
  if all_explicit(mesh):
    return jax.reshard(x, spec)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def spread(
    fn, stacks: Sequence[jax.Array | None], mesh, extras: Sequence[Any] = (),
    out_like: Sequence[jax.Array | None] = (),
) -> list[jax.Array | None]:
  """Runs the per-matrix function ``fn`` on stacks of matrices spread over ``mesh``.

  Each stack ``(B, d, e)`` (all with the same ``B``; ``None`` passes through;
  per-matrix data of another shape, such as raw PRNG key data ``(B, 2)``, is a
  stack too) is padded to a multiple of the mesh's device count (:func:`_padded`) and
  sharded along ``B`` over every mesh axis, its other axes whole on each device;
  ``fn`` maps the padded stacks to output stacks of the same length, which come
  back unpadded.  Under Explicit axes output ``i`` goes from its ``B``-sharded layout to
  ``out_like[i]``'s (an array of its unpadded shape, the state it replaces) without a whole
  copy on any device; otherwise (Auto axes, or no ``out_like[i]``) it ends with its stack
  axis whole, its matrix axes as the partitioner lays them out (:func:`_unpadded`).
  ``extras`` (scalars: replicated) are passed after the stacks; ``fn``
  must not close over other traced values.  ``fn`` must treat the matrices of a
  stack independently (a batched SVD, QR, matmul ...), so each device works on
  its own matrices: no redundant factorisation.  With ``mesh=None`` this is
  ``fn(*stacks, *extras)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _spread
    >>> out = _spread.spread(lambda a: [2 * a], [jnp.ones((3, 2, 2))], None)
    >>> out[0].shape
    (3, 2, 2)
  """
  if mesh is None:
    return list(fn(*stacks, *extras))
  b = next(x.shape[0] for x in stacks if x is not None)
  pad = -b % mesh.size
  first = next(x for x in stacks if x is not None)
  spec, path = _spread_path(first, mesh)
  # Explicit axes: the path fits the first stack's layout only; Auto axes: every stack's.  A
  # previous basis sent in one jump to the batch layout was replicated whole (a cond operand).
  shared_path = typed_sharding(first) is None
  axes = _stack_axes(first)
  chunks = math.prod(mesh.shape[a] for a in axes)

  def prepare(x, path):
    if x is None:
      return None
    if pad:
      x = _padded(_on_axes(x, axes), pad, chunks)
    for step in path:  # (a step's missing entries are left free: any rank of stack)
      x = _place(x, P(*step, *(P.UNCONSTRAINED,) * (x.ndim - len(step))), mesh)
    return _place(x, _along_batch(spec, x), mesh)

  prepared = [prepare(x, path if i == 0 or shared_path else ()) for i, x in enumerate(stacks)]
  per_device = (b + pad) // mesh.size
  if per_device > 1 and jax.default_backend() == "cpu":
    fn = _one_matrix_per_device(fn, len(stacks), mesh.size, spec)
  if all_explicit(mesh):
    # The factorisations are not written for sharding in types: run them with
    # Auto axes on the batch-sharded stacks (nothing moves at the boundary).
    outs = jax.sharding.auto_axes(lambda *xs: list(fn(*xs)), out_sharding=spec)(
        *prepared, *extras)
  else:
    outs = fn(*prepared, *extras)
  like = list(out_like) + [None] * (len(outs) - len(out_like))
  outs = [None if y is None else _place(y, _along_batch(spec, y), mesh) for y in outs]
  return [None if y is None else _unpadded(y, b, axes, l, mesh) for y, l in zip(outs, like)]


def _stack_axes(x: jax.Array) -> tuple:
  """The mesh axes of the stack axis of ``x`` in its type (Explicit axes; else none)."""
  typed = typed_sharding(x)
  return () if typed is None else spec_names(padded(typed.spec, x.ndim)[0])


def _on_axes(x: jax.Array, axes: tuple) -> jax.Array:
  """``x`` with its stack axis sharded over the mesh ``axes`` where its type shards it
  otherwise (a basis of merged batch axes, next to the gradients), so :func:`_padded` cuts
  every stack into the same runs."""
  typed = typed_sharding(x)
  spec = None if typed is None else padded(typed.spec, x.ndim)
  if spec is None or spec_names(spec[0]) == axes:
    return x
  return jax.reshard(x, P(axes or None, *(spec_without(e, axes) for e in spec[1:])))


def _padded(x: jax.Array, pad: int, chunks: int) -> jax.Array:
  """The stack ``x``, each of its ``chunks`` equal runs of matrices followed by
  ``pad // chunks`` copies of the run's first matrix (their results are dropped).

  Runs: where the stack axis is sharded over Explicit axes, one run per shard, so every
  device pads its own matrices and the unpadded outputs keep the stack's layout
  (:func:`_unpadded`); else one run, the copies after the stack.
  Not zeros: a zero previous basis reads as "no basis yet" to a warm-started method
  (``Power``), which then sent the whole stack down its cold path at every refresh on a
  mesh.  A ``pad`` whose new entries are then set: XLA pads a stack sharded along its batch
  axis in place, where a concatenation replicated it on every device (Auto axes).  A stack of
  one matrix is broadcast along a new axis: padded, its size-1 axis took the batch sharding
  back (Shardy), and the matrix went through a full rematerialization."""
  if x.shape[0] == 1:  # copies of one matrix: a new axis, which takes no stack sharding back
    return jnp.broadcast_to(x[0], (1 + pad, *x.shape[1:]))
  if chunks == 1:  # one run: no reshape, which XLA's partitioner would have to follow
    index = jax.lax.broadcasted_iota(jnp.int32, (x.shape[0] + pad,) + (1,) * (x.ndim - 1), 0)
    y = jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, pad, 0)] + [(0, 0, 0)] * (x.ndim - 1))
    return jnp.where(index < x.shape[0], y, x[:1])
  runs = x.reshape(chunks, -1, *x.shape[1:])
  index = jax.lax.broadcasted_iota(jnp.int32, (1, runs.shape[1] + pad // chunks)
                                   + (1,) * (x.ndim - 1), 1)
  y = jax.lax.pad(runs, jnp.zeros((), x.dtype),
                  [(0, 0, 0), (0, pad // chunks, 0)] + [(0, 0, 0)] * (x.ndim - 1))
  y = jnp.where(index < runs.shape[1], y, runs[:, :1])
  return y.reshape(-1, *x.shape[1:])


def _unpadded(y: jax.Array, b: int, axes: tuple, like, mesh) -> jax.Array:
  """The first ``b`` matrices of the output ``y`` of a stack padded by :func:`_padded` in
  one run per shard of the mesh ``axes``, placed as ``like`` (or replicated).

  Under Explicit axes, ``y`` moves to ``like``'s spec at its padded length (the stack
  axis keeps the runs' mesh axes, the others move onto the matrix axis: an all-to-all,
  or a gather of one device's share where ``like`` is replicated over an axis), then each
  run drops its copies on its own device.  Slicing the padding off first would not
  type-check (the padded axis does not divide), and an elementwise op between ``y`` and a
  differently sharded ``like`` (the non-finite guard's select) names one mesh axis twice
  (a ``DuplicateSpecError``).

  Under Auto axes the layouts are unknown while tracing: the mesh axes leave ``B`` one at a
  time, minor first (the reverse of :func:`_spread_path`, the matrix axes left to the
  partitioner), and ``B`` ends whole on every device, so the state's layout reaches the
  matrix axes through the non-finite guard's select: bases sharded on a matrix axis get no
  whole copy (along a layer axis, they get one).  Replicated at once, ``y`` was a
  whole copy on every device; left sharded along ``B``, the propagation merged its layout
  into the state's through that select: a jitted step without ``out_shardings`` returned
  ``P(None, 'fsdp', None)`` bases as ``P('tensor', 'fsdp')``, and so on at every refresh."""
  typed = None if like is None else typed_sharding(like)
  if typed is None:
    order = tuple(mesh.axis_names)[::-1]  # as _spread_path's
    for k in range(len(order) - 1, -1, -1):
      y = _place(y, P(order[:k] or None, *(P.UNCONSTRAINED,) * (y.ndim - 1)), mesh)
    return y[:b]
  target = padded(typed.spec, y.ndim)
  used = {a for e in target for a in spec_names(e)}
  # First a gather over the mesh axes that ``like`` does not use (the stack axis's minor
  # ones: a device's share of ``like``); then the all-to-all.  In one jump, an axis moved
  # off the major end of the stack axis took the whole stack through a gather.
  kept = tuple(a for a in spec_names(padded(typed_sharding(y).spec, y.ndim)[0]) if a in used)
  y = reshard_to(y, P(kept or None, *(None,) * (y.ndim - 1)))
  y = reshard_to(y, P(axes or None, *(spec_without(e, axes) for e in target[1:])))
  chunks = math.prod(typed.mesh.shape[a] for a in axes)
  runs = y.reshape(chunks, -1, *y.shape[1:])[:, :b // chunks]
  return reshard_to(runs.reshape(b, *y.shape[1:]), P(*target))


def _along_batch(spec: P, x: jax.Array) -> P:
  """``spec``'s batch entry for a stack ``x`` of any rank, its other axes whole."""
  return P(tuple(spec)[0], *(None,) * (x.ndim - 1))


def _spread_path(x: jax.Array, mesh) -> tuple[P, list[P]]:
  """Where :func:`spread` puts a stack ``(B, d, e)``: ``B`` over every mesh axis,
  and, when ``x``'s sharding is known (Explicit axes), the steps that get it there
  one matrix axis at a time (with Auto axes, steps that name only ``B``'s entry, for a
  stack of any layout).  Each step moves one axis's mesh axes onto ``B``
  (an all-to-all); XLA's partitioner handles such a step well, while a jump
  that moves both matrix axes at once goes through a full gather.  With Auto axes
  the layout is unknown while tracing: the mesh axes move minor first, so a matrix
  axis sharded over several of them in mesh order (``P(("data", "fsdp"))``, FSDP
  over every device) keeps its major ones until they move in turn; major first,
  that layout was gathered whole."""
  every = tuple(mesh.axis_names)
  typed = typed_sharding(x)
  if typed is None:  # Auto axes: move one mesh axis at a time, wherever it is now
    order = every[::-1]
    return P(order, None, None), [P(order[:k]) for k in range(1, len(order))]
  entries = list(tuple(typed.spec) + (None,) * (3 - len(typed.spec)))
  batch, path = list(spec_names(entries[0])), []
  for dim in (1, 2):
    if entries[dim] is not None:
      batch += spec_names(entries[dim])
      entries[dim] = None
      path.append(P(tuple(batch), entries[1], entries[2]))
  order = tuple(batch) + tuple(a for a in every if a not in batch)
  return P(order, None, None), path


def _one_matrix_per_device(fn, num_stacks: int, n: int, spec: P):
  """``fn`` applied to stacks of ``n * k`` matrices as ``k`` calls on ``n`` matrices,
  one per device.  On CPU, a batched LAPACK call with more than one matrix per
  device waits on a thread pool that the other devices' calls hold (jaxlib's
  batch-parallel LAPACK kernels deadlock when several CPU devices run them at
  once); one matrix per call runs inline."""

  def run(*args):
    stacks, extras = args[:num_stacks], args[num_stacks:]

    def split(x):  # (n * k, d, e) -> (k, n, d, e), device axis second
      return None if x is None else jnp.swapaxes(x.reshape(n, -1, *x.shape[1:]), 0, 1)

    def body(xs):
      xs = [None if x is None else jax.lax.with_sharding_constraint(x, _along_batch(spec, x))
            for x in xs]
      return list(fn(*xs, *extras))

    outs = jax.lax.map(body, [split(x) for x in stacks])
    return [None if y is None else jnp.swapaxes(y, 0, 1).reshape(-1, *y.shape[2:])
            for y in outs]

  return run

"""A batched factorization spread over the devices of a mesh: each device factorizes its
share of a stack of matrices, so no SVD is repeated (see :mod:`galore_jax.sharding`)."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from galore_jax._explicit import all_explicit
from galore_jax._explicit import padded
from galore_jax._explicit import typed_sharding


def _place(x: jax.Array, spec: P, mesh) -> jax.Array:
  """``x`` resharded (Explicit axes) or constrained (Auto axes) to ``spec``."""
  if all_explicit(mesh):
    return jax.reshard(x, spec)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def spread(
    fn, stacks: Sequence[jax.Array | None], mesh, extras: Sequence[Any] = ()
) -> list[jax.Array | None]:
  """Runs the per-matrix function ``fn`` on stacks of matrices spread over ``mesh``.

  Each stack ``(B, d, e)`` (all with the same ``B``; ``None`` passes through;
  per-matrix data of another shape, such as raw PRNG key data ``(B, 2)``, is a
  stack too) is padded to a multiple of the mesh's device count (:func:`_padding`) and
  sharded along ``B`` over every mesh axis, its other axes whole on each device;
  ``fn`` maps the padded stacks to output stacks of the same length, which come
  back unpadded (sharded along ``B``; the caller reshards them to where they
  live).  ``extras`` (scalars: replicated) are passed after the stacks; ``fn``
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
  spec, path = _spread_path(next(x for x in stacks if x is not None), mesh)

  def prepare(x, path):
    if x is None:
      return None
    if pad:
      x = _padded(x, pad)
    for step in path:
      x = _place(x, step, mesh)
    return _place(x, _along_batch(spec, x), mesh)

  prepared = [prepare(x, path if i == 0 else ()) for i, x in enumerate(stacks)]
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
  # The outputs (bases: small) are shared with every device before unpadding.
  return [None if y is None else _place(y, P(), mesh)[:b] for y in outs]


def _padded(x: jax.Array, pad: int) -> jax.Array:
  """The stack ``x`` and ``pad`` copies of its first matrix (their results are dropped).

  Not zeros: a zero previous basis reads as "no basis yet" to a warm-started method
  (``Power``), which then sent the whole stack down its cold path at every refresh on a
  mesh.  With Auto axes, a ``pad`` whose new entries are then set: XLA pads a stack sharded
  along its batch axis in place, where a concatenation replicated it on every device.
  Where the stack axis is sharded over Explicit axes, which cannot slice one matrix out,
  the first matrix is a masked sum over that axis (an all-reduce of one matrix)."""
  typed = typed_sharding(x)
  if typed is None or padded(typed.spec, x.ndim)[0] is None:
    index = jax.lax.broadcasted_iota(jnp.int32, (x.shape[0] + pad,) + (1,) * (x.ndim - 1), 0)
    y = jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, pad, 0)] + [(0, 0, 0)] * (x.ndim - 1))
    return jnp.where(index < x.shape[0], y, x[:1])
  first = jax.lax.broadcasted_iota(jnp.int32, (x.shape[0],) + (1,) * (x.ndim - 1), 0) == 0
  one = jnp.sum(jnp.where(first, x, jnp.zeros((), x.dtype)), axis=0, keepdims=True,
                dtype=x.dtype)  # exact: one term is not zero
  copies = jax.reshard(jnp.broadcast_to(one, (pad, *x.shape[1:])), typed.spec)
  return jnp.concatenate([x, copies], axis=0)


def _along_batch(spec: P, x: jax.Array) -> P:
  """``spec``'s batch entry for a stack ``x`` of any rank, its other axes whole."""
  return P(tuple(spec)[0], *(None,) * (x.ndim - 1))


def _spread_path(x: jax.Array, mesh) -> tuple[P, list[P]]:
  """Where :func:`spread` puts a stack ``(B, d, e)``: ``B`` over every mesh axis,
  and, when ``x``'s sharding is known (Explicit axes), the steps that get it there
  one matrix axis at a time.  Each step moves one axis's mesh axes onto ``B``
  (an all-to-all); XLA's partitioner handles such a step well, while a jump
  that moves both matrix axes at once goes through a full gather.  With Auto axes
  the layout is unknown while tracing: the mesh axes move minor first, so a matrix
  axis sharded over several of them in mesh order (``P(("data", "fsdp"))``, FSDP
  over every device) keeps its major ones until they move in turn; major first,
  that layout was gathered whole."""
  every = tuple(mesh.axis_names)
  typed = typed_sharding(x)
  if typed is None:  # Auto axes: move one mesh axis at a time, wherever it is now
    free = P.UNCONSTRAINED
    order = every[::-1]
    return P(order, None, None), [P(order[:k], free, free) for k in range(1, len(order))]
  entries = list(tuple(typed.spec) + (None,) * (3 - len(typed.spec)))
  names = lambda e: () if e is None else (e if isinstance(e, tuple) else (e,))
  batch, path = list(names(entries[0])), []
  for dim in (1, 2):
    if entries[dim] is not None:
      batch += names(entries[dim])
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

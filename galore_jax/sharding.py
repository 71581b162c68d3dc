r"""Shardings of GaLore state, and a refresh spread over the devices of a mesh.

A projected leaf is seen as matrices ``(*batch, m, n)`` (see
:mod:`galore_jax.projection`); its param's partition spec, carried through that
view, gives one spec entry per batch axis and one each for ``m`` and ``n``.  The
optimizer state follows the param on purpose:

* a left basis ``(*batch, m, r)`` is ``P(*batch, m, None)`` and a right basis
  ``(*batch, n, r)`` is ``P(*batch, n, None)``: the basis inherits the sharding
  of the side it spans, its rank axis is replicated;
* coefficients and the inner transform's low-rank moments ``(*batch, r|m, n|r)``
  keep the sharding of the side that is not projected, and take over the mesh axes of
  the projected side where they divide that other side, else on the rank axis where they divide the
  rank (:func:`coefficient_spec`): under FSDP, which shards the side ``std`` projects, the
  low-rank state is sharded, not copied;
* leaves that are not projected keep the param's spec (optax's ``zeros_like``);
* one value per matrix ``(*batch)`` (the norm-growth limiter's norms of APOLLO and Fira)
  keeps the sharding of the batch axes (:func:`per_matrix_spec`); bases regenerated from
  the key (APOLLO's random projection) are not state, only their refresh counter is;
* 8-bit moments (:func:`galore_jax.scale_by_adam_8bit`, alone or inside GaLore): the
  codes have the moment's shape and take its spec (a step's new codes are laid out as the
  old ones, under Auto axes too); a moment's absmax, one per block of
  its row-major elements, is sharded like the moment's first axis when each shard of
  that axis holds whole blocks and is replicated otherwise
  (:func:`galore_jax.quantization.absmax_spec`).

The public names are the spec rules (:func:`matrix_spec` and :func:`mergeable_spec`,
defined with the views in :mod:`galore_jax.projection`; :func:`basis_spec`,
:func:`coefficient_spec`, :func:`per_matrix_spec`) and :func:`state_shardings` /
:func:`abstract_state`.
:func:`state_shardings` gives these shardings for any optax transform built with
galore_jax (usable as ``jax.jit`` ``out_shardings`` and, through
:func:`abstract_state`, as Orbax restore targets).  ``galore_projection`` applies
the same rules itself: its ``init`` creates sharded state for sharded params
(eagerly, or under an Explicit mesh), and Flax ``nnx.Optimizer`` sees the
low-rank spec in the variable metadata, not the param's.

Refresh under a mesh: the SVD of a sharded matrix either fails
(Explicit axes) or is gathered and repeated on every device (Auto axes).  When a
mesh with more than one device is set with ``jax.set_mesh``, the matrices that a
refresh factorises are stacked, padded to a multiple of the device count and
sharded along the stack over every mesh axis: each device factorises its share
and the new bases go back to their state sharding.  With Explicit axes no device holds
more of them than its share of the state (of the padded stack where a sharded layer axis
is padded).  With Auto axes the layouts are unknown while tracing: the mesh axes leave
the stack one at a time, the stack axis ends whole and the partitioner lays out the matrix
axes (bases sharded on a matrix axis get no whole copy; bases sharded along a layer axis get
one).  The stack moves to its stack-sharded layout one mesh axis at a time (all-to-alls): XLA's
partitioner would turn a single jump from matrices sharded on two axes (FSDP x
tensor) into a full gather of the stack.  Without ``jax.set_mesh`` nothing is
spread: with Auto axes the partitioner gathers each matrix and every device
repeats the refresh (and on several CPU devices jaxlib's batched LAPACK kernels
can then deadlock; galore_jax's spread runs one matrix per device per call on
CPU); arrays sharded over Explicit axes need ``jax.set_mesh`` (a clear error
otherwise), and a mesh mixing Explicit and Auto axes is refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from galore_jax import _checks
from galore_jax._explicit import sharding_of
from galore_jax.projection import coefficient_matrix_spec
from galore_jax.projection import matrix_spec
from galore_jax.projection import mergeable_spec

__all__ = (
    "abstract_state",
    "basis_spec",
    "coefficient_spec",
    "matrix_spec",
    "mergeable_spec",
    "per_matrix_spec",
    "state_shardings",
)


def basis_spec(spec, view, side: str) -> P:
  """Spec of the ``side`` (``"left"``: ``m x r``, ``"right"``: ``n x r``) basis of a
  leaf with param spec ``spec``: the spanned side keeps its sharding, the rank
  axis is replicated.

  Example:
    >>> from galore_jax import projection, sharding
    >>> view = projection.matrix_view((64, 32), None)
    >>> tuple(sharding.basis_spec(("data", "model"), view, "right"))
    ('model', None)
  """
  if side not in ("left", "right"):  # (any other read as "right": the other side's spec)
    raise ValueError(f"basis_spec: side must be 'left' or 'right', got {side!r}.")
  *batch, m, n = matrix_spec(spec, view)
  return P(*batch, m if side == "left" else n, None)


def per_matrix_spec(spec, view) -> P:
  """Spec of one value per matrix of a leaf, ``(*batch)`` (the norm-growth limiter's
  norms): the batch axes keep their sharding.

  Example:
    >>> import galore_jax as gj
    >>> from galore_jax import projection, sharding
    >>> view = projection.matrix_view((4, 16, 32), gj.DimensionNumbers(1, 2))
    >>> tuple(sharding.per_matrix_spec(("layers", "fsdp", None), view))
    ('layers',)
  """
  *batch, _, _ = matrix_spec(spec, view)
  return P(*batch)


def coefficient_spec(spec, view, left: bool, right: bool, mesh=None, rank=None) -> P:
  """Spec of the coefficients (and low-rank moments) ``(*batch, r|m, n|r)`` of a leaf
  with param spec ``spec``: a projected side's axis is the rank, not sharded; with one
  side projected, its mesh axes move to the other side where they divide it, else to the
  rank axis where they divide ``rank`` (:func:`galore_jax.projection.coefficient_matrix_spec`),
  so that under FSDP each device holds its share of the low-rank state, not a copy.

  Args:
    spec: the param's partition spec (``None``: replicated).
    view: the leaf's :class:`~galore_jax.projection.MatrixView`.
    left, right: the projected sides.
    mesh: the mesh whose axis sizes decide whether the freed axes divide the other
      side; default the one set with ``jax.set_mesh`` (none set: no axis moves).
    rank: the rank, where the freed axes go when they do not divide the other side
      (``None``: they do not go there).

  Example:
    >>> import jax
    >>> from galore_jax import projection, sharding
    >>> view = projection.matrix_view((64, 32), None)
    >>> tuple(sharding.coefficient_spec(("data", "model"), view, False, True))
    ('data', None)
    >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
    >>> tuple(sharding.coefficient_spec(("data", "model"), view, False, True, mesh))
    (('data', 'model'), None)
  """
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  sizes = None if mesh.empty else dict(mesh.shape)
  return P(*coefficient_matrix_spec(
      matrix_spec(spec, view), view.m, view.n, left, right, sizes, rank))


def _explicit_twin(mesh):
  """``mesh`` (a ``Mesh`` or an ``AbstractMesh``) with every axis Explicit."""
  explicit = (jax.sharding.AxisType.Explicit,) * len(mesh.axis_names)
  if isinstance(mesh, jax.sharding.AbstractMesh):
    return jax.sharding.AbstractMesh(mesh.axis_sizes, mesh.axis_names, axis_types=explicit)
  return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=explicit)


def _set(mesh):
  """The context that sets ``mesh``: ``jax.set_mesh``, or for an ``AbstractMesh`` (no
  devices: shardings planned, nothing placed) ``jax.sharding.use_abstract_mesh``."""
  if isinstance(mesh, jax.sharding.AbstractMesh):
    return jax.sharding.use_abstract_mesh(mesh)
  return jax.set_mesh(mesh)


def abstract_state(tx, params, param_shardings=None):
  """``jax.eval_shape(tx.init, params)`` with the shardings of :func:`state_shardings`
  attached: a tree of ``jax.ShapeDtypeStruct`` ready as an Orbax restore target
  (arrays land sharded) or for ``jax.jit(tx.init, out_shardings=...)``.

  Args: as :func:`state_shardings` (whose ``ValueError`` it raises for params with no
  ``NamedSharding`` and no ``param_shardings``).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import galore_jax as gj
    >>> mesh = jax.make_mesh((1,), ("fsdp",))
    >>> w = jax.device_put(jnp.zeros((8, 4)), jax.NamedSharding(mesh, jax.P("fsdp")))
    >>> target = gj.sharding.abstract_state(gj.galore_adamw(1e-3, rank=2), {"w": w})
    >>> tuple(target[0].inner_state.mu["w"].sharding.spec)        # 8 x 2 moments
    ('fsdp', None)
  """
  shardings = state_shardings(tx, params, param_shardings)
  shapes = jax.eval_shape(tx.init, _strip(params))
  # The shardings' tree, not the shapes': traced under the mesh, its Flax Variables (an
  # nnx.State of params) carry the state's own sharding metadata.
  return jax.tree.unflatten(jax.tree.structure(shardings), [
      jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
      for s, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings))])


def _strip(params):
  """Params as plain ShapeDtypeStructs (no sharding), for shape-only tracing."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), params)


def state_shardings(tx, params, param_shardings=None):
  """Shardings of ``tx.init(params)`` for sharded params, by the rules of this module.

  Works for any optax transform: the state is traced once under an Explicit twin
  of the params' mesh, where optax's ``zeros_like`` carries each param's
  sharding to its moments and galore_jax's transforms apply the low-rank rules;
  the specs are then put back on the params' own mesh (Auto or Explicit).
  State leaves with no sharding of their own (counts, keys) are replicated.  The mesh may
  be a ``jax.sharding.AbstractMesh``: the shardings of a run on devices this host does not
  have (``shard_shape`` then gives what each device would hold).

  Args:
    tx: an ``optax.GradientTransformation``.
    params: the params (arrays or ``jax.ShapeDtypeStruct``) whose ``.sharding``
      is a ``NamedSharding``; or any params with ``param_shardings`` given.
    param_shardings: optional tree of ``NamedSharding`` (or ``None`` for
      replicated) matching ``params``.

  Returns:
    A tree of ``NamedSharding`` with the structure of ``tx.init(params)``.

  Raises:
    ValueError: if ``tx`` is no transform, no param carries a ``NamedSharding``, they use
      different meshes, or ``param_shardings`` holds something else (a ``PartitionSpec``,
      a mesh) or has another tree structure than ``params``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import galore_jax as gj
    >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
    >>> params = {"w": jax.ShapeDtypeStruct(
    ...     (64, 32), jnp.float32, sharding=jax.NamedSharding(mesh, jax.P("data", "model")))}
    >>> sh = gj.sharding.state_shardings(gj.galore_adamw(1e-3, rank=4), params)
    >>> tuple(sh[0].bases[0].right.spec), tuple(sh[0].inner_state.mu["w"].spec)
    (('model', None), (('data', 'model'), None))
  """
  if not callable(getattr(tx, "init", None)):  # (only its init is traced)
    raise ValueError("state_shardings: tx must be an optax.GradientTransformation, got"
                     f" {_checks.got(tx)}.")
  shardings = param_shardings
  if shardings is None:
    shardings = jax.tree.map(sharding_of, params)
  is_none = lambda x: x is None
  for path, s in jax.tree_util.tree_flatten_with_path(shardings, is_leaf=is_none)[0]:
    if s is not None and not isinstance(s, NamedSharding):  # (a spec has no mesh)
      raise ValueError(
          f"state_shardings: param_shardings{jax.tree_util.keystr(path)} is"
          f" {s!r:.80} ({'a PartitionSpec' if isinstance(s, P) else type(s).__name__}),"
          " expected a jax.sharding.NamedSharding (a PartitionSpec with its mesh:"
          " NamedSharding(mesh, spec)) or None for a replicated param.")
  difference = _checks.tree_difference(params, shardings, ("the params", "param_shardings"),
                                       is_none)
  if difference:  # (tree-mapped below with an error of many lines)
    raise ValueError(f"state_shardings: param_shardings must have the params' tree structure"
                     f" (a NamedSharding or None per param); {difference}.")
  named = [s for s in jax.tree.leaves(shardings, is_leaf=is_none) if s is not None]
  meshes = {s.mesh for s in named}
  if not named:
    raise ValueError(
        "state_shardings: no param carries a NamedSharding; pass sharded params"
        " or param_shardings."
    )
  if len(meshes) > 1:
    raise ValueError(f"state_shardings: params use {len(meshes)} different meshes.")
  (mesh,) = meshes
  twin = _explicit_twin(mesh)
  typed = jax.tree.map(  # (a None param, which the transforms' init takes, stays None)
      lambda x, s: None if x is None else jax.ShapeDtypeStruct(
          jnp.shape(x), x.dtype, sharding=NamedSharding(twin, P() if s is None else s.spec)),
      params, shardings, is_leaf=is_none)
  with _set(twin):
    shapes = jax.eval_shape(tx.init, typed)

  def back(s):
    sh = getattr(s, "sharding", None)
    spec = sh.spec if isinstance(sh, NamedSharding) else P()
    return NamedSharding(mesh, spec)

  return jax.tree.map(back, shapes)

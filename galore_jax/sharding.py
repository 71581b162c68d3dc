r"""Shardings of GaLore state, and a refresh spread over the devices of a mesh.

A projected leaf is seen as matrices ``(*batch, m, n)`` (see
:mod:`galore_jax.projection`); its param's partition spec, carried through that
view, gives one spec entry per batch axis and one each for ``m`` and ``n``.  The
optimizer state follows the param on purpose:

* a left basis ``(*batch, m, r)`` is ``P(*batch, m, None)`` and a right basis
  ``(*batch, n, r)`` is ``P(*batch, n, None)``: the basis inherits the sharding
  of the side it spans, the rank axis is replicated;
* coefficients and the inner transform's low-rank moments ``(*batch, r|m, n|r)``
  keep the sharding of the side that is not projected;
* leaves that are not projected keep the param's spec (optax's ``zeros_like``).

:func:`state_shardings` gives these shardings for any optax transform built with
galore_jax (usable as ``jax.jit`` ``out_shardings`` and, through
:func:`abstract_state`, as Orbax restore targets).  ``galore_projection`` applies
the same rules itself: its ``init`` creates sharded state for sharded params
(eagerly, or under an Explicit mesh), and Flax ``nnx.Optimizer`` sees the
low-rank spec in the variable metadata, not the param's.

Refresh under a mesh (:func:`spread`): the SVD of a sharded matrix either fails
(Explicit axes) or is gathered and repeated on every device (Auto axes).  When a
mesh with more than one device is set with ``jax.set_mesh``, the matrices that a
refresh factorises are stacked, padded to a multiple of the device count and
sharded along the stack over every mesh axis: each device factorises its share
and the bases are then gathered back to their state sharding.  The stack moves
to its stack-sharded layout one mesh axis at a time (all-to-alls): XLA's
partitioner would turn a single jump from matrices sharded on two axes (FSDP x
tensor) into a full gather of the stack.  Without ``jax.set_mesh`` nothing is
spread: with Auto axes the partitioner gathers each matrix and every device
repeats the refresh (and on several CPU devices jaxlib's batched LAPACK kernels
can then deadlock; galore_jax's spread runs one matrix per device per call on
CPU); arrays sharded over Explicit axes need ``jax.set_mesh`` (a clear error
otherwise), and a mesh mixing Explicit and Auto axes is refused.
"""

from __future__ import annotations

import string
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# Flax variable metadata entries that hold a partition spec.
_SPEC_METADATA = ("out_sharding", "sharding", "sharding_names", "optimizer_sharding")


# --------------------------------------------------------------------------------------------
# Spec rules
# --------------------------------------------------------------------------------------------


def _merge(entries: Sequence[Any]) -> Any:
  """Spec entry of axes flattened together (major first).  Sharding survives the
  reshape only when the sharded axes come first: then the merged axis is sharded
  over their mesh axes in order.  Anything else is replicated (correct, if not
  optimal)."""
  if len(entries) == 1:
    return entries[0]
  sharded = [e is not None for e in entries]
  if not any(sharded):
    return None
  k = sharded.index(False) if not all(sharded) else len(entries)
  if any(sharded[k:]):
    return None
  names = []
  for e in entries[:k]:
    names.extend(e if isinstance(e, tuple) else (e,))
  return names[0] if len(names) == 1 else tuple(names)


def matrix_spec(spec: Sequence[Any] | None, view) -> tuple[Any, ...]:
  """A leaf's spec carried to its matrix view: ``(*batch entries, m entry, n entry)``.

  Args:
    spec: the param's partition spec (or Flax logical names), ``None`` for
      replicated; shorter than the leaf's rank means trailing ``None``.
    view: the leaf's :class:`~galore_jax.projection.MatrixView`.

  Example:
    >>> import galore_jax as gj
    >>> from galore_jax import projection, sharding
    >>> view = projection.matrix_view((4, 16, 32), gj.DimensionNumbers(1, 2))
    >>> sharding.matrix_spec(("layers", "fsdp", "tensor"), view)   # (L, in, out)
    ('layers', 'tensor', 'fsdp')
  """
  batch, out, red = _view_entries(spec, view)
  return (*batch, _merge(out), _merge(red))


def _view_entries(spec, view) -> tuple[list, list, list]:
  """A leaf's spec entries in its view's axis order (``perm``), split into the batch
  axes, the axes merged into ``m`` and those merged into ``n``."""
  entries = _padded(spec or (), len(view.shape))
  permuted = [entries[a] for a in view.perm]
  nb = len(view.batch_shape)
  k = nb + view.out_ndim
  return permuted[:nb], permuted[nb:k], permuted[k:]


def _keepable(entries: Sequence[Any]) -> list[Any]:
  """The entries of axes flattened together with what :func:`_merge` cannot keep
  (a sharded axis after an unsharded one) set to ``None``."""
  if _merge(entries) is None:
    return [None] * len(entries)
  return list(entries)


def mergeable_spec(spec: Sequence[Any] | None, view) -> P:
  """The spec, in the view's axis order (``perm``), that a leaf must have before
  its axes are merged into ``(*batch, m, n)``: each merged group keeps its
  sharding only where :func:`matrix_spec` can express it.

  Example:
    >>> import galore_jax as gj
    >>> from galore_jax import projection, sharding
    >>> view = projection.matrix_view((16, 4, 8), gj.DimensionNumbers(0, (1, 2)))
    >>> tuple(sharding.mergeable_spec(("fsdp", None, "tensor"), view))  # head_dim only
    (None, None, 'fsdp')
  """
  batch, out, red = _view_entries(spec, view)
  return P(*batch, *_keepable(out), *_keepable(red))


def reshard_to(x: jax.Array, spec: P) -> jax.Array:
  """``x`` resharded to ``spec`` under Explicit axes when it is not there already.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import sharding
    >>> sharding.reshard_to(jnp.ones(2), jax.P()).tolist()
    [1.0, 1.0]
  """
  typed = typed_sharding(x)
  if typed is None or _padded(typed.spec, x.ndim) == _padded(spec, x.ndim):
    return x
  return jax.reshard(x, spec)


def _padded(spec, ndim: int) -> tuple:
  """``spec``'s entries with trailing ``None`` s up to ``ndim`` (one spelling per spec)."""
  return tuple(spec) + (None,) * (ndim - len(tuple(spec)))


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
  *batch, m, n = matrix_spec(spec, view)
  return P(*batch, m if side == "left" else n, None)


def coefficient_spec(spec, view, left: bool, right: bool) -> P:
  """Spec of the coefficients (and low-rank moments) ``(*batch, r|m, n|r)``: a
  projected side is replicated, the other keeps the param's sharding.

  Example:
    >>> from galore_jax import projection, sharding
    >>> view = projection.matrix_view((64, 32), None)
    >>> tuple(sharding.coefficient_spec(("data", "model"), view, False, True))
    ('data', None)
  """
  *batch, m, n = matrix_spec(spec, view)
  return P(*batch, None if left else m, None if right else n)


# --------------------------------------------------------------------------------------------
# Shardings of arrays, tracers and Flax variables
# --------------------------------------------------------------------------------------------


def _is_explicit(s: NamedSharding) -> bool:
  return any(t == jax.sharding.AxisType.Explicit for t in s.mesh.axis_types)


def sharding_of(x: Any) -> NamedSharding | None:
  """The ``NamedSharding`` of an array, a ``ShapeDtypeStruct`` or a tracer whose type
  carries one (Explicit mesh axes); ``None`` when there is none to follow (a
  single-device array, or a tracer under Auto axes, where the partitioner
  decides).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import sharding
    >>> sharding.sharding_of(jnp.zeros(3)) is None       # single device
    True
  """
  if isinstance(x, jax.core.Tracer):
    try:
      s = jax.typeof(x).sharding
    except Exception:  # noqa: BLE001 -- no typed sharding on this tracer
      return None
    if isinstance(s, NamedSharding) and _is_explicit(s):
      return s
    return None
  s = getattr(x, "sharding", None)
  return s if isinstance(s, NamedSharding) else None


def typed_sharding(x: Any) -> NamedSharding | None:
  """``x``'s sharding when it is part of its type (a mesh with Explicit axes),
  for a concrete array as for a tracer; ``None`` otherwise.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from galore_jax import sharding
    >>> mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    >>> x = jax.device_put(jnp.zeros(4), jax.NamedSharding(mesh, jax.P("fsdp")))
    >>> sharding.sharding_of(x) is not None, sharding.typed_sharding(x) is None
    (True, True)
  """
  s = sharding_of(x)
  return s if s is not None and _is_explicit(s) else None


def zeros(shape, dtype, like: NamedSharding | None, spec: P) -> jax.Array:
  """``jnp.zeros(shape, dtype)`` sharded as ``spec`` on ``like``'s mesh (no sharding
  when ``like`` is ``None``); works eagerly (also multi-host) and under an
  Explicit mesh inside ``jit``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> from galore_jax import sharding
    >>> sharding.zeros((2, 3), jnp.float32, None, P()).shape
    (2, 3)
  """
  if like is None:
    return jnp.zeros(shape, dtype)
  target = NamedSharding(like.mesh, spec)
  if isinstance(like.mesh, jax.sharding.AbstractMesh):
    return jnp.zeros(shape, dtype, out_sharding=target)
  return jnp.zeros(shape, dtype, device=target)


def on_mesh_of(tree: Any, leaves: Sequence[Any]) -> Any:
  """``tree`` with every concrete array that is not on a mesh (counts, keys made by
  ``jnp.zeros`` / ``jax.random.key``) replicated on the mesh of the first of
  ``leaves`` that has a concrete ``NamedSharding``; unchanged when none has one
  (one device, or tracing).  Keeps a whole state on one mesh, as a multi-host
  ``jit`` requires.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from galore_jax import sharding
    >>> mesh = jax.make_mesh((1,), ("fsdp",))
    >>> w = jax.device_put(jnp.zeros(4), jax.NamedSharding(mesh, jax.P("fsdp")))
    >>> count = sharding.on_mesh_of(jnp.zeros([], jnp.int32), [w])
    >>> count.sharding.mesh == mesh, tuple(count.sharding.spec)
    (True, ())
  """
  like = next(
      (s for s in map(sharding_of, leaves)
       if s is not None and not isinstance(s.mesh, jax.sharding.AbstractMesh)), None)
  if like is None:
    return tree
  replicated = NamedSharding(like.mesh, P())

  def place(x):
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and not isinstance(
        x.sharding, NamedSharding):
      return jax.device_put(x, replicated)
    return x

  return jax.tree.map(place, tree)


def is_variable(x: Any) -> bool:
  """Whether ``x`` is a Flax NNX ``Variable`` (duck-typed: the core library does not
  import Flax).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import sharding
    >>> sharding.is_variable(jnp.zeros(2))
    False
  """
  return hasattr(x, "get_metadata") and hasattr(type(x), "from_metadata")


def variable_with_spec(variable: Any, value: Any, spec_fn) -> Any:
  """A copy of a Flax ``Variable`` holding ``value``, each spec in its metadata
  (``out_sharding``, ``optimizer_sharding``, ...) replaced by ``spec_fn(spec)``.
  ``nnx.Optimizer`` copies a param's metadata onto the optimizer state built from
  it; for a low-rank leaf the metadata must describe the low-rank shape.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from galore_jax import sharding
    >>> with jax.set_mesh(jax.make_mesh((1,), ("fsdp",))):
    ...   w = nnx.Param(jnp.zeros((8, 4)), out_sharding=("fsdp", None))
    >>> low = sharding.variable_with_spec(w, jnp.zeros((8, 2)), lambda s: (s[0], None))
    >>> low.get_metadata()["out_sharding"], low.get_value().shape
    (('fsdp', None), (8, 2))
  """
  meta = dict(variable.get_metadata())
  for k in _SPEC_METADATA:
    if meta.get(k) is not None and not isinstance(meta[k], (NamedSharding, str)):
      meta[k] = tuple(spec_fn(tuple(meta[k])))
    elif isinstance(meta.get(k), NamedSharding):
      meta[k] = NamedSharding(meta[k].mesh, spec_fn(tuple(meta[k].spec)))
  return type(variable).from_metadata(value, meta)


# --------------------------------------------------------------------------------------------
# State shardings for any transform
# --------------------------------------------------------------------------------------------


def _explicit_twin(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
  return jax.sharding.Mesh(
      mesh.devices, mesh.axis_names,
      axis_types=(jax.sharding.AxisType.Explicit,) * len(mesh.axis_names),
  )


def abstract_state(tx, params, param_shardings=None):
  """``jax.eval_shape(tx.init, params)`` with the shardings of :func:`state_shardings`
  attached: a tree of ``jax.ShapeDtypeStruct`` ready as an Orbax restore target
  (arrays land sharded) or for ``jax.jit(tx.init, out_shardings=...)``.

  Args: as :func:`state_shardings`.

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
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
  )


def _strip(params):
  """Params as plain ShapeDtypeStructs (no sharding), for shape-only tracing."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), params)


def state_shardings(tx, params, param_shardings=None):
  """Shardings of ``tx.init(params)`` for sharded params, by the rules of this module.

  Works for any optax transform: the state is traced once under an Explicit twin
  of the params' mesh, where optax's ``zeros_like`` carries each param's
  sharding to its moments and galore_jax's transforms apply the low-rank rules;
  the specs are then put back on the params' own mesh (Auto or Explicit).
  State leaves with no sharding of their own (counts, keys) are replicated.

  Args:
    tx: an ``optax.GradientTransformation``.
    params: the params (arrays or ``jax.ShapeDtypeStruct``) whose ``.sharding``
      is a ``NamedSharding``; or any params with ``param_shardings`` given.
    param_shardings: optional tree of ``NamedSharding`` (or ``None`` for
      replicated) matching ``params``.

  Returns:
    A tree of ``NamedSharding`` with the structure of ``tx.init(params)``.

  Raises:
    ValueError: if no param carries a ``NamedSharding`` or they use different
      meshes.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import galore_jax as gj
    >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
    >>> params = {"w": jax.ShapeDtypeStruct(
    ...     (64, 32), jnp.float32, sharding=jax.NamedSharding(mesh, jax.P("data", "model")))}
    >>> sh = gj.sharding.state_shardings(gj.galore_adamw(1e-3, rank=4), params)
    >>> tuple(sh[0].bases[0].right.spec), tuple(sh[0].inner_state.mu["w"].spec)
    (('model', None), ('data', None))
  """
  shardings = param_shardings
  if shardings is None:
    shardings = jax.tree.map(sharding_of, params)
  is_none = lambda x: x is None
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
  specs = jax.tree.map(
      lambda s: P() if s is None else s.spec, shardings, is_leaf=is_none)
  typed = jax.tree.map(
      lambda x, spec: jax.ShapeDtypeStruct(
          jnp.shape(x), x.dtype, sharding=NamedSharding(twin, spec)),
      params, specs,
  )
  with jax.set_mesh(twin):
    shapes = jax.eval_shape(tx.init, typed)

  def back(s):
    sh = getattr(s, "sharding", None)
    spec = sh.spec if isinstance(sh, NamedSharding) else P()
    return NamedSharding(mesh, spec)

  return jax.tree.map(back, shapes)


# --------------------------------------------------------------------------------------------
# Explicit-mode arithmetic and the spread refresh
# --------------------------------------------------------------------------------------------


def einsum(subscripts: str, *operands, **kwargs) -> jax.Array:
  """``jnp.einsum`` that also type-checks under Explicit mesh axes: when an operand
  is sharded in its type, each output axis keeps the sharding it has in the
  first operand that shards it, and contracted axes are reduced (an all-reduce).
  Otherwise it is ``jnp.einsum``.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import sharding
    >>> sharding.einsum("mn,nr->mr", jnp.ones((4, 3)), jnp.ones((3, 2))).shape
    (4, 2)
  """
  typed = [typed_sharding(x) for x in operands]
  if not any(s is not None and any(e is not None for e in s.spec) for s in typed):
    return jnp.einsum(subscripts, *operands, **kwargs)
  inputs, out = subscripts.replace(" ", "").split("->")
  inputs = inputs.split(",")
  if any("." in i for i in inputs) or "." in out:
    inputs, out = _expand_ellipsis(inputs, out, operands)
  entry = {}
  for letters, s, x in zip(inputs, typed, operands):
    spec = tuple(s.spec) + (None,) * (jnp.ndim(x) - len(s.spec)) if s else ()
    for c, e in zip(letters, spec):
      if e is not None and c not in entry:
        entry[c] = e
  used, out_spec = set(), []
  for c in out:
    e = entry.get(c)
    names = e if isinstance(e, tuple) else (e,)
    if e is None or used & set(names):
      out_spec.append(None)
    else:
      used |= set(names)
      out_spec.append(e)
  mesh = next(s for s in typed if s is not None).mesh
  return jnp.einsum(
      subscripts, *operands, out_sharding=NamedSharding(mesh, P(*out_spec)), **kwargs)


def _expand_ellipsis(inputs, out, operands):
  """Replaces ``...`` by explicit letters (same batch rank for every operand)."""
  free = [c for c in string.ascii_letters if c not in "".join(inputs) + out]
  nb = max(jnp.ndim(x) - len(i.replace("...", "")) for i, x in zip(inputs, operands))
  batch = "".join(free[:nb])
  return [i.replace("...", batch) for i in inputs], out.replace("...", batch)


def context_mesh(leaves: Sequence[Any] = ()):
  """The mesh set with ``jax.set_mesh`` if it has more than one device, else ``None``
  (then refreshes run where the data is, as on one device).

  Raises a ``ValueError`` for what the refresh cannot run under: a mesh that mixes
  Explicit and Auto axes, or ``leaves`` (the gradients) sharded over Explicit axes
  of a multi-device mesh with no ``jax.set_mesh`` around the update.

  Example:
    >>> from galore_jax import sharding
    >>> sharding.context_mesh() is None
    True
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    for x in leaves:
      typed = typed_sharding(x)
      if typed is not None and typed.mesh.size > 1:
        raise ValueError(
            "galore_jax: the gradients are sharded over Explicit mesh axes"
            f" {typed.mesh.axis_names}, but no mesh is set: call the update under"
            " jax.set_mesh(mesh).")
    return None
  if mesh.size <= 1:
    return None
  kinds = set(mesh.axis_types)
  if len(kinds) > 1:
    raise ValueError(
        "galore_jax: the refresh does not support a mesh that mixes axis types"
        f" ({dict(zip(mesh.axis_names, mesh.axis_types))}); make every axis Explicit"
        " or every axis Auto.")
  return mesh


def all_explicit(mesh) -> bool:
  """Whether every axis of ``mesh`` is Explicit.

  Example:
    >>> import jax
    >>> from galore_jax import sharding
    >>> mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Explicit,))
    >>> sharding.all_explicit(mesh)
    True
  """
  return all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


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
  stack too) is padded with zeros to a multiple of the mesh's device count and
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
    >>> from galore_jax import sharding
    >>> out = sharding.spread(lambda a: [2 * a], [jnp.ones((3, 2, 2))], None)
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
      typed = typed_sharding(x)
      extra = (jnp.zeros((pad, *x.shape[1:]), x.dtype) if typed is None
               else jnp.zeros((pad, *x.shape[1:]), x.dtype, out_sharding=typed))
      x = jnp.concatenate([x, extra], axis=0)
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


def _along_batch(spec: P, x: jax.Array) -> P:
  """``spec``'s batch entry for a stack ``x`` of any rank, its other axes whole."""
  return P(tuple(spec)[0], *(None,) * (x.ndim - 1))


def _spread_path(x: jax.Array, mesh) -> tuple[P, list[P]]:
  """Where :func:`spread` puts a stack ``(B, d, e)``: ``B`` over every mesh axis,
  and, when ``x``'s sharding is known (Explicit axes), the steps that get it there
  one matrix axis at a time.  Each step moves one axis's mesh axes onto ``B``
  (an all-to-all); XLA's partitioner handles such a step well, while a jump
  that moves both matrix axes at once goes through a full gather."""
  every = tuple(mesh.axis_names)
  typed = typed_sharding(x)
  if typed is None:  # Auto axes: move one mesh axis at a time, wherever it is now
    free = P.UNCONSTRAINED
    return P(every, None, None), [P(every[:k], free, free) for k in range(1, len(every))]
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


def place_like(x: jax.Array, like: jax.Array) -> jax.Array:
  """``x`` resharded to ``like``'s typed sharding under Explicit axes (so that
  ``lax.cond`` branches agree); unchanged otherwise.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import sharding
    >>> sharding.place_like(jnp.ones(3), jnp.zeros(3)).tolist()
    [1.0, 1.0, 1.0]
  """
  s = typed_sharding(like)
  if s is None or typed_sharding(x) == s:
    return x
  return jax.reshard(x, s.spec)


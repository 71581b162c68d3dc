"""Explicit mesh axes: shims that let the projection, the state and the refresh type-check
when shardings are part of array types (``jax.sharding.AxisType.Explicit``), and are plain
``jnp`` calls otherwise.  Private: the public sharding rules are in
:mod:`galore_jax.sharding`."""

from __future__ import annotations

import string
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def is_explicit(s: NamedSharding) -> bool:
  """Whether ``s``'s mesh has an Explicit axis (shardings are then part of array types).

  Example:
    >>> import jax
    >>> from galore_jax import _explicit
    >>> mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    >>> _explicit.is_explicit(jax.NamedSharding(mesh, jax.P()))
    False
  """
  return any(t == jax.sharding.AxisType.Explicit for t in s.mesh.axis_types)


def sharding_of(x: Any) -> NamedSharding | None:
  """The ``NamedSharding`` of an array, a ``ShapeDtypeStruct`` or a tracer whose type
  carries one (Explicit mesh axes); ``None`` when there is none to follow (a
  single-device array, or a tracer under Auto axes, where the partitioner
  decides).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _explicit
    >>> _explicit.sharding_of(jnp.zeros(3)) is None       # single device
    True
  """
  if isinstance(x, jax.core.Tracer):
    try:
      s = jax.typeof(x).sharding
    except Exception:  # noqa: BLE001 -- no typed sharding on this tracer
      return None
    if isinstance(s, NamedSharding) and is_explicit(s):
      return s
    return None
  s = getattr(x, "sharding", None)
  return s if isinstance(s, NamedSharding) else None


def typed_sharding(x: Any) -> NamedSharding | None:
  """``x``'s sharding when it is part of its type (a mesh with Explicit axes),
  for a concrete array as for a tracer; ``None`` otherwise.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from galore_jax import _explicit
    >>> mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    >>> x = jax.device_put(jnp.zeros(4), jax.NamedSharding(mesh, jax.P("fsdp")))
    >>> _explicit.sharding_of(x) is not None, _explicit.typed_sharding(x) is None
    (True, True)
  """
  s = sharding_of(x)
  return s if s is not None and is_explicit(s) else None


def typed_spec(x: Any) -> P | None:
  """``x``'s partition spec when its sharding is part of its type (Explicit axes), else
  ``None``: an ``out_spec`` / ``out_sharding`` that keeps ``x``'s layout.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _explicit
    >>> _explicit.typed_spec(jnp.zeros(3)) is None
    True
  """
  typed = typed_sharding(x)
  return None if typed is None else typed.spec


def padded(spec, ndim: int) -> tuple:
  """``spec``'s entries with trailing ``None`` s up to ``ndim`` (one spelling per spec).

  Example:
    >>> from galore_jax import _explicit
    >>> _explicit.padded(("data",), 3)
    ('data', None, None)
  """
  return tuple(spec) + (None,) * (ndim - len(tuple(spec)))


def spec_names(entry: Any) -> tuple:
  """The mesh axes of one partition-spec entry (``None``, a name or a tuple of names).

  Example:
    >>> from galore_jax import _explicit
    >>> _explicit.spec_names(None), _explicit.spec_names("fsdp"), _explicit.spec_names(("a", "b"))
    ((), ('fsdp',), ('a', 'b'))
  """
  return () if entry is None else tuple(entry) if isinstance(entry, tuple) else (entry,)


def spec_entry(names: Sequence[Any]) -> Any:
  """The spec entry of the mesh axes ``names`` (the inverse of :func:`spec_names`).

  Example:
    >>> from galore_jax import _explicit
    >>> _explicit.spec_entry(()), _explicit.spec_entry(["a"]), _explicit.spec_entry(["a", "b"])
    (None, 'a', ('a', 'b'))
  """
  return None if not names else names[0] if len(names) == 1 else tuple(names)


def spec_without(entry: Any, drop: Any) -> Any:
  """The spec ``entry`` without the mesh axes of ``drop`` (an entry, or a tuple of axes).

  Example:
    >>> from galore_jax import _explicit
    >>> _explicit.spec_without(("a", "b"), "a"), _explicit.spec_without("a", ("a",))
    ('b', None)
  """
  return spec_entry([a for a in spec_names(entry) if a not in spec_names(drop)])


def reshard_to(x: jax.Array, spec: P) -> jax.Array:
  """``x`` resharded to ``spec`` under Explicit axes when it is not there already.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _explicit
    >>> _explicit.reshard_to(jnp.ones(2), jax.P()).tolist()
    [1.0, 1.0]
  """
  typed = typed_sharding(x)
  if typed is None or padded(typed.spec, x.ndim) == padded(spec, x.ndim):
    return x
  return jax.reshard(x, spec)


def broadcastable_to(x: jax.Array, like: jax.Array) -> jax.Array:
  """``x`` resharded, under Explicit axes, to broadcast against ``like`` (same rank): each
  axis sharded as ``like``'s, axes of length 1 not sharded.  Unchanged otherwise.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _explicit
    >>> _explicit.broadcastable_to(jnp.ones((1, 3)), jnp.zeros((2, 3))).shape
    (1, 3)
  """
  typed = typed_sharding(like)
  if typed is None:
    return x
  spec = padded(typed.spec, like.ndim)
  return reshard_to(x, P(*(None if d == 1 else e for d, e in zip(x.shape, spec))))


def zeros(shape, dtype, like: NamedSharding | None, spec: P) -> jax.Array:
  """``jnp.zeros(shape, dtype)`` sharded as ``spec`` on ``like``'s mesh (no sharding
  when ``like`` is ``None``); works eagerly (also multi-host) and under an
  Explicit mesh inside ``jit``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> from galore_jax import _explicit
    >>> _explicit.zeros((2, 3), jnp.float32, None, P()).shape
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
    >>> from galore_jax import _explicit
    >>> mesh = jax.make_mesh((1,), ("fsdp",))
    >>> w = jax.device_put(jnp.zeros(4), jax.NamedSharding(mesh, jax.P("fsdp")))
    >>> count = _explicit.on_mesh_of(jnp.zeros([], jnp.int32), [w])
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


def einsum(subscripts: str, *operands, out_spec: P | None = None, **kwargs) -> jax.Array:
  """``jnp.einsum`` that also type-checks under Explicit mesh axes: when an operand
  is sharded in its type, the output is sharded as ``out_spec`` when given, else each
  output axis keeps the sharding it has in the first operand that shards it, and
  contracted axes are reduced (an all-reduce).  Otherwise it is ``jnp.einsum``
  (``out_spec`` unused: the partitioner places the result).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _explicit
    >>> _explicit.einsum("mn,nr->mr", jnp.ones((4, 3)), jnp.ones((3, 2))).shape
    (4, 2)
  """
  operands = _cpu_upcast(operands, kwargs.get("preferred_element_type"))
  typed = [typed_sharding(x) for x in operands]
  if not any(s is not None and any(e is not None for e in s.spec) for s in typed):
    return jnp.einsum(subscripts, *operands, **kwargs)
  mesh = next(s for s in typed if s is not None).mesh
  if out_spec is not None:
    out = NamedSharding(mesh, out_spec)
    return jnp.einsum(subscripts, *operands, out_sharding=out, **kwargs)
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
  used, entries = set(), []
  for c in out:
    e = entry.get(c)
    names = spec_names(e)
    if e is None or used & set(names):
      entries.append(None)
    else:
      used |= set(names)
      entries.append(e)
  return jnp.einsum(
      subscripts, *operands, out_sharding=NamedSharding(mesh, P(*entries)), **kwargs)


def _cpu_upcast(operands, preferred) -> tuple:
  """On CPU, 16-bit float operands of a float32-accumulated einsum in float32: XLA:CPU has no
  kernel for some bf16 x bf16 -> f32 dots (an operand read transposed, as a kernel with
  dimension numbers (0, 1) is), and fails at run time.  Exact, and only where speed does not
  matter; other backends keep the low-precision matmul."""
  if jax.default_backend() != "cpu" or preferred is None or jnp.dtype(preferred) != jnp.float32:
    return operands
  low = (jnp.bfloat16, jnp.float16)
  return tuple(x.astype(jnp.float32) if jnp.dtype(x.dtype) in low else x for x in operands)


def _expand_ellipsis(inputs, out, operands):
  """Replaces ``...`` by explicit letters (same batch rank for every operand)."""
  free = [c for c in string.ascii_letters if c not in "".join(inputs) + out]
  nb = max(jnp.ndim(x) - len(i.replace("...", "")) for i, x in zip(inputs, operands))
  batch = "".join(free[:nb])
  return [i.replace("...", batch) for i in inputs], out.replace("...", batch)


def all_explicit(mesh) -> bool:
  """Whether every axis of ``mesh`` is Explicit.

  Example:
    >>> import jax
    >>> from galore_jax import _explicit
    >>> mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Explicit,))
    >>> _explicit.all_explicit(mesh)
    True
  """
  return all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def require_mesh(typed: NamedSharding) -> None:
  """A one-line ``ValueError`` when arrays sharded over Explicit axes (``typed``, their
  sharding) meet no ``jax.set_mesh``: the layouts this library asks for are
  ``PartitionSpec`` s, which only a context mesh resolves.

  Example:
    >>> import jax
    >>> from galore_jax import _explicit
    >>> mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Explicit,))
    >>> with jax.set_mesh(mesh):
    ...   _explicit.require_mesh(jax.NamedSharding(mesh, jax.P()))
  """
  if jax.sharding.get_abstract_mesh().empty:
    raise ValueError(
        "galore_jax: the arrays are sharded over Explicit mesh axes"
        f" {typed.mesh.axis_names}, but no mesh is set: call init and update under"
        " jax.set_mesh(mesh).")


def context_mesh(leaves: Sequence[Any] = ()):
  """The mesh set with ``jax.set_mesh`` if it has more than one device or an Explicit
  axis, else ``None`` (then refreshes run where the data is, as on one device).  A
  one-device mesh with Explicit axes still counts: its arrays' types carry a sharding, which
  the factorizations only accept through the mesh's refresh path.

  Inside ``jax.shard_map`` or ``pmap`` (a Manual axis) also ``None``: each device refreshes
  what it holds.  Raises a ``ValueError`` for what the refresh cannot run under: a mesh that
  mixes Explicit and Auto axes, or ``leaves`` (the gradients) sharded over Explicit axes
  with no ``jax.set_mesh`` around the update or inside ``shard_map``.

  Example:
    >>> from galore_jax import _explicit
    >>> _explicit.context_mesh() is None
    True
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    for x in leaves:
      typed = typed_sharding(x)
      if typed is not None:
        require_mesh(typed)
    return None
  if mesh.size <= 1 and jax.sharding.AxisType.Explicit not in mesh.axis_types:
    return None
  if jax.sharding.AxisType.Manual in mesh.axis_types:
    return _manual(mesh, leaves)
  kinds = set(mesh.axis_types)
  if len(kinds) > 1:
    raise ValueError(
        "galore_jax: the refresh does not support a mesh that mixes axis types"
        f" ({dict(zip(mesh.axis_names, mesh.axis_types))}); make every axis Explicit"
        " or every axis Auto.")
  return mesh


def _manual(mesh, leaves: Sequence[Any]) -> None:
  """``None`` inside ``jax.shard_map`` / ``pmap`` (Manual axes): each device refreshes the
  data it holds, as it runs the rest of the update (data parallelism by hand keeps the same
  gradients, so the same bases, on every device).  The refresh does not spread over the
  axes left Auto; gradients sharded over axes left Explicit are a one-line ``ValueError``."""
  for x in leaves:
    typed = typed_sharding(x)
    if typed is not None and any(e is not None for e in typed.spec):
      raise ValueError(
          "galore_jax: inside jax.shard_map, the refresh needs gradients that are whole on"
          f" each device; these are sharded as {typed.spec} over the mesh's Explicit axes"
          f" ({dict(zip(mesh.axis_names, mesh.axis_types))}).")
  return None


def place_like(x: jax.Array, like: jax.Array) -> jax.Array:
  """``x`` resharded to ``like``'s typed sharding under Explicit axes (so that
  ``lax.cond`` branches agree); unchanged otherwise.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _explicit
    >>> _explicit.place_like(jnp.ones(3), jnp.zeros(3)).tolist()
    [1.0, 1.0, 1.0]
  """
  s = typed_sharding(like)
  if s is None or typed_sharding(x) == s:
    return x
  return jax.reshard(x, s.spec)


def reshaped_like(x: jax.Array, like: jax.Array) -> jax.Array:
  """``x`` reshaped to ``like``'s shape and, under Explicit axes, laid out as ``like`` (a
  reshape that splits a sharded axis, which JAX's types cannot follow, runs under Auto
  axes).  A plain reshape otherwise.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _explicit
    >>> _explicit.reshaped_like(jnp.ones((6, 2)), jnp.zeros((2, 3, 2))).shape
    (2, 3, 2)
  """
  typed, now = typed_sharding(like), typed_sharding(x)
  if typed is None or now is None or not any(tuple(typed.spec) + tuple(now.spec)):
    return x.reshape(like.shape)  # (whole on each device: as inside a shard_map)
  if x.shape == like.shape:
    return reshard_to(x, typed.spec)
  return jax.sharding.auto_axes(lambda y: y.reshape(like.shape), out_sharding=typed.spec)(x)

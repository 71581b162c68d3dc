"""Matrix views of N-D leaves, the projection side rule, project / project back.

A leaf is seen as a stack of matrices ``(*batch, m, n)``:

* a plain 2-D leaf without dimension numbers is taken as given (``m`` = axis 0,
  ``n`` = axis 1), exactly as galore-torch treats a torch array of that shape;
* with :class:`DimensionNumbers`, the matrix is ``(output, input)`` -- like a
  torch ``Linear`` weight -- with ``m`` the product of the output axes and ``n``
  the product of the reduction (input) axes.  Axes named by neither are batch
  axes: a scanned-layer kernel ``(L, d, f)`` is ``L`` matrices, each with its own
  basis; an attention kernel ``(d, heads, head_dim)`` with output axes
  ``(1, 2)`` is one ``(heads*head_dim) x d`` matrix.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from galore_jax import _checks
from galore_jax import _passes
from galore_jax._explicit import einsum
from galore_jax._explicit import padded
from galore_jax._explicit import place_like
from galore_jax._explicit import require_mesh
from galore_jax._explicit import reshard_to
from galore_jax._explicit import spec_entry
from galore_jax._explicit import spec_names
from galore_jax._explicit import spec_without
from galore_jax._explicit import typed_sharding
from galore_jax._explicit import zeros

#: The side rules of ``proj_type`` (see :func:`galore_jax.galore_projection`).
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
#: The side rules that project one side: APOLLO and Fira scale the channels of the other.
ONE_SIDED_PROJ_TYPES = ("std", "reverse_std", "left", "right")
#: LDAdam's: one side, and its reference's rule for square matrices (``"ldadam_std"``).
LDADAM_PROJ_TYPES = ("std", "ldadam_std", "reverse_std", "left", "right")


class DimensionNumbers(NamedTuple):
  """Which axes of a leaf form the matrix (muon-style).

  Attributes:
    reduction_axis: the input axis or axes (contracted with the activations).
    output_axis: the output axis or axes.

  Each field is an int or a tuple of ints; negative values count from the end.
  Unnamed axes are batch axes.

  Example:
    >>> import galore_jax as gj
    >>> dense = gj.DimensionNumbers(reduction_axis=0, output_axis=1)  # (in, out)
    >>> qkv = gj.DimensionNumbers(reduction_axis=0, output_axis=(1, 2))  # (d, h, hd)
    >>> scanned = gj.DimensionNumbers(reduction_axis=1, output_axis=2)  # (L, in, out)
  """

  reduction_axis: int | Sequence[int] = 0
  output_axis: int | Sequence[int] = 1


class MatrixView(NamedTuple):
  """Static recipe turning a leaf into ``(*batch, m, n)`` and back (made by
  :func:`matrix_view`)."""

  shape: tuple[int, ...]
  perm: tuple[int, ...]  # original axes in (batch, output, reduction) order
  batch_shape: tuple[int, ...]
  m: int
  n: int
  out_ndim: int = 1  # how many of the permuted axes after the batch axes form m


def _axes(value, ndim: int, field: str, where: str) -> tuple[int, ...]:
  try:
    axes = (value,) if _checks.is_int(value) else tuple(value)
  except TypeError:  # neither an int nor a sequence
    axes = ()
  if not axes or not all(_checks.is_int(a) for a in axes):
    raise ValueError(
        f"dimension_numbers for {where}: {field} must be an int or a non-empty"
        f" tuple of ints (not bools), got {value!r}."
    )
  out = []
  for a in map(int, axes):
    if not -ndim <= a < ndim:
      raise ValueError(
          f"dimension_numbers for {where}: {field}={value!r} does not fit a"
          f" leaf with ndim={ndim}."
      )
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"dimension_numbers for {where}: {field} repeats an axis.")
  return tuple(out)


def matrix_view(
    shape: Sequence[int], dims: DimensionNumbers | None, where: str = "leaf"
) -> MatrixView:
  """Resolves how a leaf of ``shape`` is viewed as a stack of matrices.

  Args:
    shape: the leaf's shape.
    dims: its dimension numbers, or ``None`` for a 2-D leaf taken as given.
    where: the leaf's path, used in error messages.

  Returns:
    A :class:`MatrixView`.

  Raises:
    ValueError: if ``shape`` is not of non-negative ints, or ``dims`` does not fit it.

  Example:
    >>> import galore_jax as gj
    >>> from galore_jax import projection
    >>> v = projection.matrix_view((4, 16, 32), gj.DimensionNumbers(1, 2))
    >>> v.batch_shape, v.m, v.n
    ((4,), 32, 16)
  """
  if not all(_checks.is_int(s) and s >= 0 for s in shape):  # (int() truncated 2.5 to 2)
    raise ValueError(f"matrix_view: shape must be non-negative ints, got {tuple(shape)!r}.")
  shape = tuple(int(s) for s in shape)
  ndim = len(shape)
  if dims is None:
    if ndim != 2:
      raise ValueError(
          f"{where} has shape {shape}: only 2-D leaves can be projected without"
          " dimension_numbers; pass dimension_numbers (e.g. galore_jax.DimensionNumbers("
          "reduction_axis=1, output_axis=2) for a stack of (in, out) kernels on axis 0, or"
          " (reduction_axis=0, output_axis=(1, 2)) for a (d, heads, head_dim) kernel) or"
          " leave it out with mask."
      )
    dims = DimensionNumbers(reduction_axis=1, output_axis=0)
  if not isinstance(dims, DimensionNumbers):
    raise ValueError(
        f"dimension_numbers for {where} must be a galore_jax.DimensionNumbers or"
        f" None, got {dims!r}."
    )
  red = _axes(dims.reduction_axis, ndim, "reduction_axis", where)
  out = _axes(dims.output_axis, ndim, "output_axis", where)
  if set(red) & set(out):
    raise ValueError(
        f"dimension_numbers for {where}: reduction_axis {dims.reduction_axis!r}"
        f" and output_axis {dims.output_axis!r} share an axis."
    )
  batch = tuple(a for a in range(ndim) if a not in red and a not in out)
  return MatrixView(
      shape=shape,
      perm=batch + out + red,
      batch_shape=tuple(shape[a] for a in batch),
      m=math.prod(shape[a] for a in out),
      n=math.prod(shape[a] for a in red),
      out_ndim=len(out),
  )


# How a partition spec flows through a view: the sharding of the matrix ``(*batch, m, n)``
# that a leaf's transpose and reshape produce.


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
  return spec_entry([name for e in entries[:k] for name in spec_names(e)])


def matrix_spec(spec: Sequence[Any] | None, view) -> tuple[Any, ...]:
  """A leaf's spec carried to its matrix view: ``(*batch entries, m entry, n entry)``.

  Args:
    spec: the param's partition spec (or Flax logical names), ``None`` for
      replicated; shorter than the leaf's rank means trailing ``None``.
    view: the leaf's :class:`~galore_jax.projection.MatrixView`.

  Example:
    >>> import galore_jax as gj
    >>> from galore_jax import projection
    >>> view = projection.matrix_view((4, 16, 32), gj.DimensionNumbers(1, 2))
    >>> projection.matrix_spec(("layers", "fsdp", "tensor"), view)   # (L, in, out)
    ('layers', 'tensor', 'fsdp')
  """
  batch, out, red = _view_entries(spec, view)
  return (*batch, _merge(out), _merge(red))


def _view_entries(spec, view) -> tuple[list, list, list]:
  """A leaf's spec entries in its view's axis order (``perm``), split into the batch
  axes, the axes merged into ``m`` and those merged into ``n``."""
  if isinstance(spec, str) or not (spec is None or isinstance(spec, (P, Sequence))):
    raise ValueError("matrix_spec: spec must be None or a sequence of entries (a"
                     f" PartitionSpec or a tuple), got {spec!r}.")
  if spec is not None and len(spec) > len(view.shape):
    raise ValueError(f"matrix_spec: spec {tuple(spec)!r} has {len(spec)} entries, more than"
                     f" the leaf's {len(view.shape)} axes.")
  entries = padded(spec or (), len(view.shape))
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
    >>> from galore_jax import projection
    >>> view = projection.matrix_view((16, 4, 8), gj.DimensionNumbers(0, (1, 2)))
    >>> tuple(projection.mergeable_spec(("fsdp", None, "tensor"), view))  # head_dim only
    (None, None, 'fsdp')
  """
  batch, out, red = _view_entries(spec, view)
  return P(*batch, *_keepable(out), *_keepable(red))


def _divides(names: Sequence[Any], size: int, axis_sizes) -> bool:
  """Whether the mesh axes ``names`` (all of ``axis_sizes``) split ``size`` evenly."""
  return all(a in axis_sizes for a in names) and size % math.prod(
      axis_sizes[a] for a in names) == 0


def coefficient_matrix_spec(
    mat_spec: Sequence[Any], m: int, n: int, left: bool, right: bool, axis_sizes=None,
    rank: int | None = None,
) -> tuple[Any, ...]:
  """Sharding of the coefficients ``(*batch, r|m, n|r)`` of matrices ``(*batch, m, n)``
  sharded as ``mat_spec`` (:func:`matrix_spec`).  With one side projected, the mesh axes
  that side's sharding frees move to the other side, after its own, where ``axis_sizes``
  (mesh axis -> size; ``None``: none move) says they divide it, else to the rank axis
  where they divide ``rank`` (LLaMA-1B's MLP width, 5461, by no power-of-two device
  count);
  otherwise the rank axis is not sharded.  Why: FSDP shards the hidden size, the side
  ``std`` projects, and without the move every device would hold whole coefficients and
  low-rank moments; with it, a projection is a reduce-scatter over those axes and its way
  back an all-gather of the (small) low-rank update.

  Example:
    >>> from galore_jax import projection
    >>> projection.coefficient_matrix_spec(("fsdp", None), 64, 32, False, True)
    ('fsdp', None)
    >>> projection.coefficient_matrix_spec((None, "fsdp"), 64, 32, False, True, {"fsdp": 8})
    ('fsdp', None)
    >>> projection.coefficient_matrix_spec(("tensor", "fsdp"), 64, 32, False, True,
    ...                                    {"fsdp": 4, "tensor": 2})
    (('tensor', 'fsdp'), None)
    >>> projection.coefficient_matrix_spec((None, "fsdp"), 5461, 2048, False, True,
    ...                                    {"fsdp": 8}, rank=512)         # 8 does not divide
    (None, 'fsdp')
  """
  if axis_sizes is not None and not all(_checks.is_int(v) and v > 0 for v in axis_sizes.values()):
    raise ValueError("coefficient_matrix_spec: axis_sizes must map mesh axes to positive"
                     f" ints, got {axis_sizes!r}.")
  *batch, m_e, n_e = mat_spec
  if left and right:
    return (*batch, None, None)
  kept, freed, size = (n_e, m_e, n) if left else (m_e, n_e, m)
  moved, on_rank = kept, None
  if spec_names(freed) and axis_sizes is not None:
    if _divides(spec_names(kept) + spec_names(freed), size, axis_sizes):
      moved = spec_entry(spec_names(kept) + spec_names(freed))
    elif rank is not None and _divides(spec_names(freed), rank, axis_sizes):
      on_rank = freed
  return (*batch, on_rank, moved) if left else (*batch, moved, on_rank)


def to_matrix(x: jax.Array, view: MatrixView) -> jax.Array:
  """Leaf -> ``(*batch, m, n)``: transpose to (batch, output, reduction) axes and
  flatten each group.

  Example:
    >>> import jax.numpy as jnp
    >>> import galore_jax as gj
    >>> from galore_jax import projection
    >>> x = jnp.zeros((4, 16, 2, 8))            # (L, d, heads, head_dim)
    >>> view = projection.matrix_view(x.shape, gj.DimensionNumbers(1, (2, 3)))
    >>> projection.to_matrix(x, view).shape
    (4, 16, 16)
  """
  if tuple(x.shape) != view.shape:  # (one of as many elements reshaped without a word)
    raise ValueError(f"to_matrix: x has shape {tuple(x.shape)}, but the view is of shape"
                     f" {view.shape}.")
  xt = jnp.transpose(x, view.perm)
  typed = typed_sharding(x)
  if typed is None:
    return xt.reshape(*view.batch_shape, view.m, view.n)
  require_mesh(typed)
  # Explicit axes: first drop the shardings the merge cannot keep (see
  # :func:`matrix_spec`), then merge with the spec it can.
  xt = reshard_to(xt, mergeable_spec(typed.spec, view))
  return jnp.reshape(xt, (*view.batch_shape, view.m, view.n),
                     out_sharding=P(*matrix_spec(typed.spec, view)))


def from_matrix(x_mat: jax.Array, view: MatrixView, like: jax.Array | None = None) -> jax.Array:
  """``(*batch, m, n)`` -> leaf of the original shape (inverse of to_matrix); under
  Explicit axes in the sharding of ``like`` (the leaf it updates) when given.

  Example:
    >>> import jax.numpy as jnp
    >>> import galore_jax as gj
    >>> from galore_jax import projection
    >>> x = jnp.arange(24.0).reshape(2, 3, 4)
    >>> view = projection.matrix_view(x.shape, gj.DimensionNumbers(1, 2))
    >>> bool((projection.from_matrix(projection.to_matrix(x, view), view) == x).all())
    True
  """
  if tuple(x_mat.shape) != (*view.batch_shape, view.m, view.n):
    raise ValueError(f"from_matrix: x_mat has shape {tuple(x_mat.shape)}, but the view's"
                     f" matrices are {(*view.batch_shape, view.m, view.n)}.")
  permuted = tuple(view.shape[a] for a in view.perm)
  inverse = tuple(sorted(range(len(view.perm)), key=view.perm.__getitem__))
  typed = typed_sharding(x_mat)
  if typed is None:
    return jnp.transpose(x_mat.reshape(permuted), inverse)
  # Explicit axes: bring the matrix to the layout of ``like``'s view (replicated
  # without ``like``), split it, transpose back and take ``like``'s own sharding.
  target = typed_sharding(like) if like is not None else None
  spec = target.spec if target is not None else ()
  x_mat = reshard_to(x_mat, P(*matrix_spec(spec, view)))
  split = mergeable_spec(spec, view)
  out = jnp.transpose(jnp.reshape(x_mat, permuted, out_sharding=split), inverse)
  return out if like is None else place_like(out, like)


def projection_sides(proj_type: str, m: int, n: int) -> tuple[bool, bool]:
  """The reference side rule: ``(project on the left, project on the right)``.

  ``std`` keeps the basis on the smaller side (right if ``m >= n``, else left),
  so the low-rank state is ``r x max(m, n)``; ``reverse_std`` is the opposite.
  ``optax.contrib.galore`` projects the larger side too, but views a kernel with dimension
  numbers as ``(input, output)`` and breaks ties to the left: it agrees with
  ``reverse_std`` on every non-square matrix and on plain 2-D leaves, and projects a square
  matrix viewed through dimension numbers (e.g. a ``(16, 4, 4)`` attention kernel) on the
  input side where ``reverse_std`` takes the output side.  ``full`` projects both sides.
  ``ldadam_std`` is ``std`` except that a square matrix is projected on the left (its
  output axis), as the LDAdam reference does (:func:`galore_jax.scale_by_ldadam` only).

  Example:
    >>> from galore_jax import projection
    >>> projection.projection_sides("std", 1376, 512)
    (False, True)
    >>> projection.projection_sides("reverse_std", 1376, 512)
    (True, False)
  """
  if proj_type == "std":
    return (m < n, m >= n)
  if proj_type == "reverse_std":
    return (m >= n, m < n)
  if proj_type == "left":
    return (True, False)
  if proj_type == "right":
    return (False, True)
  if proj_type == "full":
    return (True, True)
  if proj_type == "ldadam_std":  # the LDAdam reference's rule: square matrices on the left
    return (m <= n, m > n)
  raise ValueError(f"proj_type={proj_type!r} is not one of {PROJ_TYPES}.")


def coefficient_dtype(dtype: Any) -> jnp.dtype:
  """The dtype of a leaf's coefficients, in which the inner transform sees them and keeps
  its state: the leaf's, or float32 for a dtype of narrower exponent range (float16).  A
  coefficient sums a row or column of the gradient and the inner Adam squares it: float16
  (at most 65504) overflows on gradients of about 2e4, squares of 256, and flushes squares
  of 1e-4 to zero, where the float32 run does not; bfloat16 has float32's range.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import projection
    >>> projection.coefficient_dtype(jnp.float16), projection.coefficient_dtype(jnp.bfloat16)
    (dtype('float32'), dtype(bfloat16))
  """
  dtype = jnp.dtype(dtype)
  if jnp.finfo(dtype).maxexp < jnp.finfo(jnp.float32).maxexp:
    return jnp.dtype(jnp.float32)
  return dtype


def project(
    g_Bxmxn: jax.Array, left: jax.Array | None, right: jax.Array | None, *,
    shard_rank: bool = True,
) -> jax.Array:
  r"""Coefficients of ``G`` in the subspace: :math:`P^\top G`, :math:`G Q` or
  :math:`P^\top G Q`, accumulated in float32 and returned in :func:`coefficient_dtype`
  (``G``'s dtype; float32 for float16); under Explicit axes sharded as
  :func:`coefficient_matrix_spec` says (its rank axis only with ``shard_rank``, the leaf
  plan's).  On a mesh, a stack whose sum runs over a sharded side (FSDP) is projected a
  few layers at a time, as :func:`project_back` says: each device holds that many layers'
  partial coefficients before their all-reduce or reduce-scatter, not the whole stack's.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import projection
    >>> q = jnp.eye(3)[:, :2]                       # right basis, n x r
    >>> projection.project(jnp.ones((4, 3)), None, q).shape
    (4, 2)
  """
  _check_operands("project", g_Bxmxn=g_Bxmxn, left=left, right=right)
  r = (left if left is not None else right).shape[-1]
  rank = r if shard_rank else None
  p = _passes_of(g_Bxmxn, _summed_sharded(g_Bxmxn, left, right))
  if p is None:
    return _projected(g_Bxmxn, left, right, rank)
  spec = _coefficients_spec(g_Bxmxn, left is not None, right is not None, rank)
  *batch, m, n = g_Bxmxn.shape
  shape = (*batch, r if left is not None else m, r if right is not None else n)
  return _by_layers(lambda *x: _projected(*x, rank), (g_Bxmxn, left, right), shape,
                    coefficient_dtype(g_Bxmxn.dtype), spec, p)


def _check_operands(name: str, **arrays) -> None:
  """One line for a complex array (cast to float32, its imaginary part was dropped without
  a word) or no basis on either side."""
  for arg, x in arrays.items():
    if x is not None:
      _checks.real_array(x, f"{name}: {arg}", "expected real arrays (the subspace is real).")
  if arrays["left"] is None and arrays["right"] is None:
    raise ValueError(f"{name}: left and right are both None: expected a basis on at least one"
                     " side.")


def _summed_sharded(g, left, right) -> bool:
  """Under Explicit axes, whether projecting ``g`` sums over a sharded axis (the side a
  basis spans): each device then holds partial coefficients of every matrix it has."""
  typed = typed_sharding(g)
  if typed is None:
    return False
  *_, a, b = padded(typed.spec, g.ndim)
  return bool((left is not None and a is not None) or (right is not None and b is not None))


def _projected(g_Bxmxn, left, right, rank) -> jax.Array:
  """:func:`project` in one product (every layer of a stack at once)."""
  f32 = jnp.float32
  c = g_Bxmxn
  spec = _coefficients_spec(g_Bxmxn, left is not None, right is not None, rank)
  if left is not None:
    c = einsum("...mr,...mn->...rn", left, c, preferred_element_type=f32,
               out_spec=None if right is not None else spec)
  if right is not None:
    c = einsum("...mn,...nr->...mr", c, right, preferred_element_type=f32, out_spec=spec)
  return c.astype(coefficient_dtype(g_Bxmxn.dtype))


def _coefficients_spec(g: jax.Array, left: bool, right: bool, rank: int | None) -> P | None:
  """Under Explicit axes, the spec of ``g``'s coefficients (:func:`coefficient_matrix_spec`
  on ``g``'s mesh); ``None`` otherwise."""
  typed = typed_sharding(g)
  if typed is None:
    return None
  mat_spec = padded(typed.spec, g.ndim)
  return P(*coefficient_matrix_spec(
      mat_spec, g.shape[-2], g.shape[-1], left, right, dict(typed.mesh.shape), rank))


def _moved_names(c: jax.Array, left: jax.Array | None, right: jax.Array | None):
  """``c``'s padded spec and the mesh axes of its one projected side's basis (those
  :func:`coefficient_matrix_spec` may have moved onto ``c``'s other side); ``None``
  unless ``c`` is sharded in its type and one side is projected."""
  typed = typed_sharding(c)
  if typed is None or (left is None) == (right is None):
    return None
  basis = left if left is not None else right
  basis_typed = typed_sharding(basis)
  side = padded(basis_typed.spec, basis.ndim)[-2] if basis_typed is not None else None
  return padded(typed.spec, c.ndim), side


def full_spec(c: jax.Array, left: jax.Array | None, right: jax.Array | None) -> P | None:
  r"""Under Explicit axes and with one side projected, the spec of the coefficients ``c``
  projected back (:math:`P C` or :math:`C Q^\top`): the projected side's from its basis,
  the other side's from ``c`` without the mesh axes the basis holds (those
  :func:`coefficient_matrix_spec` moved there); ``None`` otherwise (then the partitioner,
  or the einsum's own rule for ``full``, places it).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import projection
    >>> projection.full_spec(jnp.ones((4, 2)), None, jnp.eye(3)[:, :2]) is None  # one device
    True
  """
  found = _moved_names(c, left, right)
  if found is None:
    return None
  (*batch, a, b), side = found
  if left is not None:
    return P(*batch, side, spec_without(b, side))
  return P(*batch, spec_without(a, side), side)


def unmoved(c: jax.Array, left: jax.Array | None, right: jax.Array | None) -> jax.Array:
  """Coefficient-shaped ``c`` resharded, under Explicit axes, so that its unprojected side
  is sharded as the full matrices' (without the mesh axes :func:`coefficient_matrix_spec`
  moved there from the projected side) and its rank axis not at all: an all-gather of the
  small array before a product with a full-size one.  Unchanged otherwise.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import projection
    >>> projection.unmoved(jnp.ones((4, 2)), None, jnp.eye(3)[:, :2]).shape
    (4, 2)
  """
  found = _moved_names(c, left, right)
  if found is None:
    return c
  (*batch, a, b), side = found
  if left is not None:
    return reshard_to(c, P(*batch, None, spec_without(b, side)))
  return reshard_to(c, P(*batch, spec_without(a, side), None))


def project_back(
    c: jax.Array,
    left: jax.Array | None,
    right: jax.Array | None,
    *,
    out_dtype=jnp.float32,
    into: jax.Array | None = None,
) -> jax.Array:
  r"""Back to full space: :math:`P C`, :math:`C Q^\top` or :math:`P C Q^\top`,
  accumulated in float32 and returned in ``out_dtype`` (default float32; the caller
  scales and casts).  A low-precision ``out_dtype`` (the leaf's bfloat16) is emitted by
  the last matmul itself, so no float32 matrix of the full shape is written to memory
  and read back.

  On a mesh, a stack of matrices whose coefficients must be gathered (FSDP: the low-rank
  update is sharded on the side the basis does not span, the product on the side it spans,
  so every device needs all of it) is projected back a few layers at a time, as
  :func:`project` projects a stack whose sum runs over devices: a device holds that many
  layers' gathered coefficients, not the whole stack's (a pass takes as many layers as the
  mesh has devices; see :func:`_passes_of`).
  The bytes gathered stay those of the coefficients, once: gathering the basis instead would
  add an all-to-all of the full-size product.  ``into``, an array of the result's shape and
  dtype whose values are not needed after (the gradient the coefficients came from), lends
  those passes its buffer to write into; without it they write into zeros.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import projection
    >>> q = jnp.eye(3)[:, :2]
    >>> projection.project_back(jnp.ones((4, 2)), None, q)[0]
    Array([1., 1., 0.], dtype=float32)
  """
  _check_operands("project_back", c=c, left=left, right=right)
  out_dtype = _checks.float_dtype(out_dtype, "project_back: out_dtype") or jnp.float32
  p = _passes_of(c, _gathered(c, left, right))
  if p is None:
    return _product(c, left, right, out_dtype)
  rows = (left if left is not None else c).shape[-2]
  cols = right.shape[-2] if right is not None else c.shape[-1]
  shape = (*c.shape[:-2], rows, cols)
  fits = into is not None and into.shape == shape and into.dtype == jnp.dtype(out_dtype)
  return _by_layers(lambda *x: _product(*x, out_dtype), (c, left, right), shape, out_dtype,
                    full_spec(c, left, right), p, into if fits else None)


def _product(c, left, right, out_dtype) -> jax.Array:
  """:func:`project_back` in one product (every layer of a stack at once)."""
  f32 = jnp.float32

  def emit(a, b, last):
    # The matmul emits out_dtype only when both operands already have it (a low-precision
    # product with float32 accumulation); mixed operands accumulate in float32 and cast.
    same = jnp.dtype(a.dtype) == jnp.dtype(b.dtype) == jnp.dtype(out_dtype)
    return out_dtype if last and same else f32

  out, spec = c, full_spec(c, left, right)
  if left is not None:
    out = einsum("...mr,...rn->...mn", left, out, out_spec=spec,
                 preferred_element_type=emit(left, out, right is None))
  if right is not None:
    out = einsum("...mr,...nr->...mn", out, right, out_spec=spec,
                 preferred_element_type=emit(out, right, True))
  return out.astype(out_dtype)


def _gathered(c: jax.Array, left: jax.Array | None, right: jax.Array | None) -> bool:
  """Under Explicit axes with one side projected, whether the product with the basis must
  gather coefficients ``c``: their unprojected side or rank axis holds mesh axes that the
  product's (:func:`full_spec`) does not."""
  found = _moved_names(c, left, right)
  if found is None:
    return False
  (*_, a, b), side = found
  product = (None, spec_without(b, side)) if left is not None else (spec_without(a, side), None)
  return (a, b) != product


def _passes_of(x: jax.Array, collective: bool) -> _passes.Passes | None:
  """The passes (along the first batch axis) in which a projection of ``x`` runs
  (:func:`galore_jax._passes.passes`: as many layers per pass as the mesh has devices, the
  same share of a split layer axis on every device, in any layer count), or ``None`` for all
  at once: no batch axis, one device or no mesh set, inside ``shard_map``, no more layers
  than devices, or (Explicit axes) a product that needs no ``collective`` (a gather or a sum
  over devices).  A pass then holds a few layers' share of the stack, and a GPU runs a few
  passes of a leaf (one layer per pass would be L small serial steps)."""
  mesh = jax.sharding.get_abstract_mesh()
  if (x.ndim < 3 or mesh.empty or mesh.size <= 1
      or jax.sharding.AxisType.Manual in mesh.axis_types):
    return None
  if typed_sharding(x) is not None and not collective:
    return None
  return _passes.passes(x.shape[0], mesh.size)


def _by_layers(fn, operands, shape, dtype, spec: P | None, p: _passes.Passes,
               into=None) -> jax.Array:
  """``fn(*operands)`` (stacks along their first axis, or ``None``; its result of ``shape``
  and ``dtype``, sharded as ``spec`` under Explicit axes) in the passes ``p``
  (:func:`galore_jax._passes.take`), so that a pass takes the same share of a split layer
  axis on every device, and a collective that ``fn`` needs moves one pass's share.  The
  passes write into ``into`` (of the result's shape and dtype; its values are overwritten)
  where given, else into zeros."""
  runs = lambda x: None if x is None else _passes.as_runs(x, p)
  parts = [runs(x) for x in operands]

  def body(j, out):
    return _passes.put(out, p, j, fn(*(None if x is None else _passes.take(x, p, j)
                                       for x in parts)))

  # Zeros depend on nothing, so XLA may create them (and a copy per loop) long before the
  # loop, e.g. before a train step's backward pass, where they add to its peak; a buffer
  # that comes after the loop's operands (the gradient, dead once projected) does not.
  in_runs = (p.runs, p.length, *shape[1:])
  if spec is None:
    init = jnp.zeros(in_runs, dtype) if into is None else runs(into)
    return jax.lax.fori_loop(0, p.count, body, init).reshape(shape)
  first, *rest = padded(spec, len(shape))
  like = next(typed_sharding(x) for x in operands if x is not None)
  typed = None if into is None else typed_sharding(into)
  laid_out = typed is not None and padded(typed.spec, len(shape)) == (first, *rest)
  init = runs(into) if laid_out else zeros(in_runs, dtype, like, P(first, None, *rest))
  out = jax.lax.fori_loop(0, p.count, body, init)
  return jnp.reshape(out, shape, out_sharding=P(first, *rest))


def coefficient_shape(
    view: MatrixView, rank: int, left: bool, right: bool
) -> tuple[int, ...]:
  """Shape of the projected gradient of a leaf (what the inner transform sees):
  ``r x n`` for a left basis, ``m x r`` for a right one, ``r x r`` for both.

  Example:
    >>> from galore_jax import projection
    >>> view = projection.matrix_view((1376, 512), None)
    >>> projection.coefficient_shape(view, 128, *projection.projection_sides("std", 1376, 512))
    (1376, 128)
  """
  _checks.int_at_least(rank, 1, "coefficient_shape: rank")
  return (*view.batch_shape, rank if left else view.m, rank if right else view.n)

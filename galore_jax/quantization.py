r"""Block-wise 8-bit dynamic quantization of optimizer state, as bitsandbytes (>= 0.44)
defines it.

A tensor of ``n`` elements is read in row-major order and cut into blocks of ``B`` = 256
elements (the last one padded with zeros).  Each block ``b`` keeps its float32 absolute
maximum :math:`a_b = \max_{i \in b} |x_i|` and each element one byte, the index of the
entry of a 256-entry float32 code :math:`c` (sorted ascending) nearest to :math:`x_i / a_b`:

.. math::
  q_i = \operatorname*{arg\,min}_k |c_k - x_i / a_b|,\qquad \tilde x_i = c_{q_i}\, a_b

(:math:`x_i / a_b` is the float32 quotient as XLA computes it, which may be :math:`x_i` times
the rounded :math:`1 / a_b`, an ulp from the exact quotient, as bitsandbytes multiplies by
the reciprocal too; the code nearest to that float32 is then found exactly, a value halfway
between two codes taking the lower one, as ``argmin``; a block whose absmax is 0 holds
zeros whatever its codes; a value beyond :math:`\pm 2^{126}`
(about 8.5e37, infinities included) is stored as :math:`\pm 2^{126}`, and a NaN as 0,
left out of its block's absmax).  The codes are
bitsandbytes' ``create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)``, "dynamic tree"
quantization: for :math:`i = 0..6`, the midpoints of :math:`k_i` equal steps of
:math:`[0.1, 1]` scaled by :math:`10^{i-6}`, with :math:`k_i = 2^i` and their negatives
in the signed map (Adam's first moment), :math:`k_i = 2^{i+1}` in the unsigned one (the
second), plus 0 and 1: 254 + 2 entries each, spanning seven decades.  The construction
repeats bitsandbytes' float32 arithmetic (torch's ``linspace``), so the maps are equal
bit for bit.

Stored: a :class:`Quantized` of arrays only, ``codes`` (uint8, the tensor's shape) and
``absmax`` (float32, :math:`\lceil n/B \rceil`): :math:`n + 4\lceil n/B\rceil` bytes.

A stack of tensors (``batch_dims`` leading axes, as a scanned model stacks its layers'
weights) is quantized tensor by tensor: each trailing slice is blocked on its own, as
bitsandbytes blocks each layer's parameter, and the absmax is ``(*batch, blocks)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from galore_jax import _checks
from galore_jax._explicit import require_mesh
from galore_jax._explicit import typed_sharding
from galore_jax._explicit import zeros as sharded_zeros

BLOCK_SIZE = 256


def _linspace32(n: int) -> np.ndarray:
  """torch's float32 ``linspace(0.1, 1, n)`` on CPU: a float32 step, each point computed
  from the nearer end in double precision and rounded once."""
  start, end = np.float32(0.1), np.float32(1.0)
  step = np.float64((end - start) / np.float32(n - 1))
  j = np.arange(n)
  return np.where(j < n // 2, np.float64(start) + step * j,
                  np.float64(end) - step * (n - 1 - j)).astype(np.float32)


def _build_map(signed: bool) -> np.ndarray:
  values = [np.array([0.0, 1.0], np.float32)]
  for i in range(7):
    bounds = _linspace32((2 ** i if signed else 2 ** (i + 1)) + 1)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2)
    scaled = means * np.float32(10.0 ** (i - 6))
    values += [scaled, -scaled] if signed else [scaled]
  return np.sort(np.concatenate(values))


_MAPS = {signed: _build_map(signed) for signed in (True, False)}


def _thresholds(code: np.ndarray) -> np.ndarray:
  """float32 thresholds ``t`` with ``t[i] < v`` exactly when the exact midpoint of
  ``code[i]`` and ``code[i + 1]`` is below the float32 ``v``: the midpoint rounded to
  float32, or the float just below that when the rounding went up.  Counting them decides
  "nearest code" to a float32 without rounding error (the quotient itself is rounded)."""
  mid = (code[:-1].astype(np.float64) + code[1:]) / 2
  rounded = mid.astype(np.float32)
  t = np.where(rounded > mid, np.nextafter(rounded, np.float32(-np.inf)), rounded)
  assert t.size == 255 and np.all(np.diff(t) > 0)
  return t.astype(np.float32)


_THRESHOLDS = {signed: _thresholds(_MAPS[signed]) for signed in (True, False)}
_ZERO = int(np.flatnonzero(_MAPS[True] == 0)[0])  # 127: the signed map's zero code


def dynamic_map(signed: bool = True) -> np.ndarray:
  """The 256 float32 codes (sorted ascending) of bitsandbytes'
  ``create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)``.

  Example:
    >>> from galore_jax import quantization
    >>> code = quantization.dynamic_map(signed=True)
    >>> code.shape, code.dtype, code[[0, 127, 128, 255]].tolist()
    ((256,), dtype('float32'), [-0.992968738079071, 0.0, 5.500000384017767e-07, 1.0])
    >>> quantization.dynamic_map(signed=False)[:2].tolist()   # 0 and the smallest code
    [0.0, 3.2500003044333425e-07]
  """
  return _MAPS[_checks.flag(signed, "dynamic_map: signed")].copy()


class Quantized(NamedTuple):
  """A block-wise quantized tensor: arrays only (Orbax- and ``jit``-safe).

  Attributes:
    codes: uint8, the tensor's shape: per element, an index into the dynamic map.
    absmax: float32 ``(ceil(size / block_size),)``: per block of the row-major
      flattened tensor, its largest absolute value; for a stack of tensors quantized one
      by one, ``(*batch, ceil(slice_size / block_size))`` (its ``ndim - 1`` leading axes
      are the codes' leading axes).
  """

  codes: jax.Array
  absmax: jax.Array


def num_blocks(size: int, block_size: int = BLOCK_SIZE) -> int:
  """:math:`\\lceil` ``size / block_size`` :math:`\\rceil`, the number of absmax values
  (``size`` an int >= 0, ``block_size`` a power of two).

  Example:
    >>> from galore_jax import quantization
    >>> quantization.num_blocks(1000), quantization.num_blocks(1024)
    (4, 4)
  """
  block_size = _checks.block_size(block_size)
  if not _checks.is_int(size) or size < 0:
    raise ValueError(f"num_blocks: size must be an int >= 0, got {_checks.got(size)}.")
  return -(-int(size) // block_size)


def block_size_of(q: Quantized) -> int:
  r"""The block size ``q`` was quantized with, read from its shapes (block sizes are
  powers of two, so a tensor of ``n`` elements in ``k > 1`` blocks has the one with
  :math:`n/k \le B < n/(k-1)`; a single block reads as the smallest power of two that
  holds it, which blocks the same; a tensor without elements, in no blocks, as 1).

  Example:
    >>> from galore_jax import quantization
    >>> quantization.block_size_of(quantization.zeros((1000,), block_size=256))
    256
  """
  size, blocks = slice_size(q), int(q.absmax.shape[-1])
  if blocks == 0:  # no elements: any block size blocks them alike
    return 1
  return 1 << max(0, (-(-size // blocks) - 1).bit_length())


def batch_dims_of(q: Quantized) -> int:
  """How many leading axes of ``q``'s codes index separately quantized tensors.

  Example:
    >>> from galore_jax import quantization
    >>> quantization.batch_dims_of(quantization.zeros((8, 1000), batch_dims=1))
    1
  """
  return int(q.absmax.ndim) - 1


def slice_size(q: Quantized) -> int:
  """Elements of each separately quantized tensor of ``q`` (all of them without batch axes).

  Example:
    >>> from galore_jax import quantization
    >>> quantization.slice_size(quantization.zeros((8, 1000), batch_dims=1))
    1000
  """
  return int(np.prod(q.codes.shape[batch_dims_of(q):], dtype=np.int64))


def _blocks(x: jax.Array, batch_dims: int, block_size: int) -> jax.Array:
  """``x`` as ``(*batch, num_blocks, block_size)``: each trailing slice flattened, cut into
  blocks, its last one zero-padded."""
  # Sizes spelled out, not -1: reshape cannot infer an axis of a tensor without elements.
  batch = x.shape[:batch_dims]
  size = int(np.prod(x.shape[batch_dims:], dtype=np.int64))
  blocks = num_blocks(size, block_size)
  flat = x.reshape(*batch, size)
  pad = blocks * block_size - size
  return jnp.pad(flat, [(0, 0)] * batch_dims + [(0, pad)]).reshape(*batch, blocks, block_size)


def _unblock(blocks: jax.Array, shape, batch_dims: int) -> jax.Array:
  """The inverse of :func:`_blocks`: padding dropped, ``shape`` restored."""
  batch = tuple(shape[:batch_dims])
  size = int(np.prod(shape[batch_dims:], dtype=np.int64))
  padded_size = blocks.shape[-2] * blocks.shape[-1]
  return blocks.reshape(*batch, padded_size)[..., :size].reshape(shape)


def _nearest_code(v: jax.Array, signed: bool) -> jax.Array:
  """Index of the code nearest to each float32 ``v`` (ties: the lower code): the number
  of midpoints below ``v``, by a branchless binary search over the 255 thresholds (eight
  look-ups of a small table, which fuse into one elementwise pass)."""
  t = jnp.asarray(_THRESHOLDS[signed])
  idx = jnp.where(t[127] < v, 128, 0)  # the first look-up is one scalar for every v
  for step in (64, 32, 16, 8, 4, 2, 1):
    idx = jnp.where(t[idx + step - 1] < v, idx + step, idx)
  return idx.astype(jnp.uint8)


def _quantize(x, signed, block_size, batch_dims, keep_sign=False):
  # Saturated at 2^126: an infinite absmax made its whole block inf / inf = NaN for good
  # (Adam's (1 - b2) g^2 overflows for a finite |g| > 1.8e19), and XLA divides by an
  # absmax above 2^126 as a product with its reciprocal, a subnormal flushed to zero (every
  # code of the block 0).  Smaller values are unchanged.  Unsigned: negatives are stored as
  # 0 (see quantize), not left to inflate the absmax.  A NaN (from a NaN gradient) is stored
  # as 0: XLA's max propagates it on a GPU, and may skip it on a CPU, so one NaN made its
  # whole block NaN for good or not depending on the backend (bitsandbytes' fmaxf skips it).
  big = 1 / jnp.finfo(jnp.float32).tiny
  blocks = jnp.clip(_blocks(x.astype(jnp.float32), batch_dims, block_size),
                    -big if signed else 0.0, big)
  blocks = jnp.where(jnp.isnan(blocks), 0.0, blocks)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  scaled = blocks / jnp.where(absmax > 0, absmax, 1.0)[..., None]
  codes = _nearest_code(scaled, signed)
  if signed and keep_sign:  # the zero code is +0: a negative value takes the next one down
    codes = jnp.where(jnp.signbit(scaled) & (codes == _ZERO), _ZERO - 1, codes).astype(jnp.uint8)
  return Quantized(_unblock(codes, x.shape, batch_dims), absmax)


def _dequantize(q, signed, block_size, dtype):
  batch_dims = batch_dims_of(q)
  values = jnp.asarray(_MAPS[signed])[q.codes]
  blocks = _blocks(values, batch_dims, block_size) * q.absmax[..., None]
  return _unblock(blocks, q.codes.shape, batch_dims).astype(dtype)


def absmax_spec(spec, shape, block_size: int, mesh, batch_dims: int = 0) -> P:
  """The partition spec of the ``absmax`` of a tensor of ``shape`` whose codes have the
  partition ``spec`` (the tensor's own) on ``mesh``: the blocks follow the first axis's
  sharding when every device's slice of that axis holds whole blocks; otherwise the
  absmax (1/64 of the codes' bytes) is replicated, as it is when the first axis's names
  are not ``mesh``'s (logical names).  With ``batch_dims`` leading batch
  axes, the absmax's batch axes keep theirs and the rule holds for each slice's blocks.

  Example:
    >>> import jax
    >>> from galore_jax import quantization
    >>> mesh = jax.sharding.AbstractMesh((2, 4), ("fsdp", "tensor"))
    >>> tuple(quantization.absmax_spec(("fsdp", "tensor"), (64, 32), 256, mesh))
    ('fsdp',)
    >>> tuple(quantization.absmax_spec(("fsdp", None), (2, 100), 256, mesh))  # blocks span rows
    ()
    >>> tuple(quantization.absmax_spec((None, "fsdp"), (4, 512), 256, mesh, batch_dims=1))
    (None, 'fsdp')
  """
  block_size = _checks.block_size(block_size)
  batch_dims = _checks.batch_count(batch_dims, len(tuple(shape)))
  spec = tuple(spec or ()) + (None,) * (len(shape) - len(tuple(spec or ())))
  batch = spec[:batch_dims]
  blocks_replicated = P(*batch) if any(a is not None for a in batch) else P()
  shape = tuple(shape[batch_dims:])
  first = spec[batch_dims] if shape else None
  if first is None:
    return blocks_replicated
  names = first if isinstance(first, tuple) else (first,)
  if any(name not in mesh.shape for name in names):  # logical names: sizes unknown
    return blocks_replicated
  shards = int(np.prod([mesh.shape[name] for name in names]))
  rest = int(np.prod(shape[1:], dtype=np.int64))
  if shape[0] % shards or (shape[0] // shards) * rest % block_size:
    return blocks_replicated
  return P(*batch, first)


def _out_shardings(x: NamedSharding, shape, block_size: int, batch_dims: int) -> Quantized:
  return Quantized(x.spec, absmax_spec(x.spec, shape, block_size, x.mesh, batch_dims))


def quantize(x: jax.Array, *, signed: bool, block_size: int = BLOCK_SIZE,
             batch_dims: int = 0, keep_sign: bool = False) -> Quantized:
  r"""Block-wise dynamic quantization (module docstring): per block of ``block_size``
  elements of the row-major flattened ``x``, its absmax :math:`a` and, per element, the
  index of the code nearest to :math:`x / a` (``signed`` map, or the unsigned one for
  non-negative tensors).  With ``signed=False`` a negative entry is stored as 0, clamped
  before the absmax is taken: a check of the values is not possible under ``jit``, and
  left as they were, one negative entry would set its block's absmax and coarsen every
  other entry's code (the unsigned map has no negative codes; Adam's second moment, which it
  is for, is never negative, and is stored as bitsandbytes stores it).  A NaN is stored as
  0 and does not enter the absmax: the rest of its block keeps its codes.  With
  ``batch_dims``, each slice ``x[i_1, ..., i_b]`` is a tensor of its own (its blocks do not
  run into the next slice's).  With ``signed`` and ``keep_sign``, a negative entry whose
  nearest code is 0 takes the largest negative code (:math:`-5.5 \cdot 10^{-7} a`) instead,
  as bitsandbytes' 8-bit optimizers store their first moment, so that a small moment keeps
  its sign (its ``quantize_blockwise`` alone, the default here, rounds to 0).  Under
  Explicit mesh axes the codes keep ``x``'s sharding and the absmax follows
  :func:`absmax_spec`.  ``x`` is a real array or array-like (``jnp.asarray``); a complex one
  is refused (the map holds real values).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import quantization
    >>> q = quantization.quantize(jnp.array([0.5, -2.0, 0.0]), signed=True, block_size=2)
    >>> q.codes.tolist(), q.absmax.tolist()
    ([201, 0, 127], [2.0, 0.0])
    >>> [round(v, 4) for v in quantization.dequantize(q, signed=True).tolist()]
    [0.4953, -1.9859, 0.0]
    >>> quantization.quantize(jnp.ones((2, 3)), signed=True, block_size=4, batch_dims=1).absmax
    Array([[1.],
           [1.]], dtype=float32)
    >>> x = jnp.array([1.0, -1e-9])
    >>> [quantization.quantize(x, signed=True, keep_sign=k).codes.tolist() for k in (False, True)]
    [[255, 127], [255, 126]]
  """
  x = jnp.asarray(x)  # (an Array as it is, sharding and all)
  _checks.real_array(x, "quantize: x", "the 8-bit map holds real values; quantize its real"
                     " and imaginary parts apart.")
  block_size = _checks.block_size(block_size)
  batch_dims = _checks.batch_count(batch_dims, len(x.shape))
  signed = _checks.flag(signed, "quantize: signed")
  keep_sign = _checks.flag(keep_sign, "quantize: keep_sign")
  typed = typed_sharding(x)
  if typed is None:
    return _quantize(x, signed, block_size, batch_dims, keep_sign)
  require_mesh(typed)
  # Reshaping into blocks is not expressible with shardings in types: let the partitioner
  # place the block view, and pin the results to the state's layout.
  return jax.sharding.auto_axes(
      lambda y: _quantize(y, signed, block_size, batch_dims, keep_sign),
      out_sharding=_out_shardings(typed, x.shape, block_size, batch_dims))(x)


def dequantize(q: Quantized, *, signed: bool, dtype=jnp.float32) -> jax.Array:
  r""":math:`c_{q_i} a_b`: the tensor ``q`` stands for, shaped (and, under Explicit mesh
  axes, sharded) like its codes, in ``dtype`` (a real floating dtype; ``None``: float32);
  the block size is read from the shapes (:func:`block_size_of`).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import quantization
    >>> x = jnp.linspace(-1.0, 1.0, 1000).reshape(10, 100)
    >>> y = quantization.dequantize(quantization.quantize(x, signed=True), signed=True)
    >>> y.shape, bool(jnp.max(jnp.abs(y - x)) < 0.01)
    ((10, 100), True)
  """
  if not (hasattr(q, "codes") and hasattr(q, "absmax")):
    raise ValueError("dequantize: q must be a Quantized (codes, absmax), as quantize returns;"
                     f" got {_checks.got(q)}.")
  if q.codes.dtype != jnp.uint8:
    raise ValueError(f"dequantize: q.codes must be uint8 (the 8-bit codes), got {q.codes.dtype}.")
  _check_blocking(q)
  signed = _checks.flag(signed, "dequantize: signed")
  dtype = _checks.float_dtype(dtype, "dtype") or jnp.float32
  block_size = block_size_of(q)
  typed = typed_sharding(q.codes)
  if typed is None:
    return _dequantize(q, signed, block_size, dtype)
  require_mesh(typed)
  return jax.sharding.auto_axes(
      lambda c, a: _dequantize(Quantized(c, a), signed, block_size, dtype),
      out_sharding=typed.spec)(q.codes, q.absmax)


def _check_blocking(q: Quantized) -> None:
  """``q.absmax`` is float32 and blocks ``q.codes`` as :func:`quantize` would: its leading
  axes the codes' batch axes, its last the blocks of each slice at some block size (read
  from the shapes, as :func:`block_size_of`); else a ``ValueError`` naming both shapes."""
  absmax, codes = q.absmax, q.codes
  if absmax.dtype != jnp.float32:
    raise ValueError(f"dequantize: q.absmax must be float32 (each block's absolute maximum),"
                     f" got {absmax.dtype}.")
  batch = absmax.ndim - 1
  if not (0 <= batch <= codes.ndim and absmax.shape[:-1] == codes.shape[:batch]
          and num_blocks(slice_size(q), block_size_of(q)) == absmax.shape[-1]):
    raise ValueError(f"dequantize: q.absmax of shape {tuple(absmax.shape)} blocks no codes of"
                     f" shape {tuple(codes.shape)}: expected (*the codes' batch axes, blocks per"
                     " slice), as quantize returns it.")


def zeros(shape, *, block_size: int = BLOCK_SIZE, like: NamedSharding | None = None,
          batch_dims: int = 0) -> Quantized:
  """A quantized tensor of zeros (all codes 0 and absmax 0, as bitsandbytes initialises
  its state): the codes sharded as ``like`` (the tensor's sharding; none when ``None``),
  the absmax by :func:`absmax_spec`; ``batch_dims`` as for :func:`quantize`.

  Example:
    >>> from galore_jax import quantization
    >>> q = quantization.zeros((64, 100))
    >>> q.codes.dtype, q.absmax.shape
    (dtype('uint8'), (25,))
  """
  shape = tuple(shape)
  block_size = _checks.block_size(block_size)
  batch_dims = _checks.batch_count(batch_dims, len(shape))
  spec = P() if like is None else like.spec
  aspec = P() if like is None else absmax_spec(spec, shape, block_size, like.mesh, batch_dims)
  blocks = num_blocks(np.prod(shape[batch_dims:], dtype=np.int64), block_size)
  return Quantized(
      sharded_zeros(shape, jnp.uint8, like, spec),
      sharded_zeros(shape[:batch_dims] + (blocks,), jnp.float32, like, aspec),
  )

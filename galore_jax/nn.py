"""Flax NNX layers of the low-rank baselines GaLore is compared with, and ReLoRA's hook.

The GaLore paper (Table 2) and SLTrain (Tables 2-4) pretrain LLaMA with every attention and
MLP linear layer replaced by one of these; embeddings, norms and ``lm_head`` stay dense.
Kernels follow Flax's ``(in, out)`` convention, ``y = x W``:

- :class:`LoRALinear`: ``W = W0 + (alpha / r) A B``, ``W0`` frozen (a :class:`Frozen`
  variable, not an ``nnx.Param``: ``nnx.state(model, nnx.Param)`` and ``nnx.Optimizer(...,
  wrt=nnx.Param)`` never see it), ``A`` ``(in, r)`` and ``B`` ``(r, out)`` trainable
  (:class:`LoRAParam`), ``B = 0`` at init, dropout on the adapter's input.
- :class:`LowRankLinear`: ``W = A B``, both trainable (the papers' "Low-Rank").
- :class:`SparsePlusLowRankLinear` (SLTrain): ``W = (alpha / r) A B + S``, ``S`` with a
  fixed random support of density ``delta`` whose values train and whose flat indices are a
  :class:`SparseIndex` variable (never an optimizer's); the product runs through
  :func:`sparse_plus_low_rank`, whose backward recomputes ``W`` instead of saving it.
- ReLoRA (:func:`relora_merge`, :func:`relora_schedule`): every ``N`` steps fold each
  LoRA into its base, restart the adapters and their optimizer state, and warm the learning
  rate up again (the jagged schedule).
- :func:`factor_kernels`: the mask of these layers' trainable factors, for a projecting
  optimizer (GaLore, LDAdam, Fira, APOLLO) that should project them as it would dense kernels.

The layers run on a mesh under Auto or Explicit axes (``kernel_axes`` names their logical
axes); their gradients are split as their parameters are.  Like ``nnx.Linear`` they take an
``out_sharding`` where Explicit axes need the output's split said (an input split along the
contracted axis as the kernel is: an attention output before ``o_proj``).

This module needs Flax (``pip install galore_jax[flax]``); the optimizers never import it.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec as P

from galore_jax import _checks
from galore_jax import _explicit
from galore_jax import flax_metadata


class Frozen(nnx.Variable):
  """A weight that is not trained (LoRA's base): not an ``nnx.Param``, so no gradient, no
  update and no optimizer state reach it."""


class SparseIndex(nnx.Variable):
  """Integer positions of a sparse matrix's values (SLTrain's support): not trainable."""


class LoRAParam(nnx.Param):
  """A LoRA adapter factor: an ``nnx.Param`` (it trains) that ReLoRA restarts."""


def drawn_in_float32(init: Callable) -> Callable:
  """``init`` drawing in float32 and rounding once to the dtype asked for, as PyTorch
  references initialise a model in float32 and then cast it.  (``jax.random.normal`` and
  ``uniform`` drawn directly in bfloat16 take their uniform variate at bf16 precision: 128
  distinct values, a normal's tails cut at 2.9 sigma and its mean 0.01 sigma off zero, in
  every matrix alike.)

  Example:
    >>> init = drawn_in_float32(nnx.initializers.normal(1.0))
    >>> w = init(jax.random.key(0), (100_000,), jnp.bfloat16)
    >>> w.dtype, len(jnp.unique(w)) > 1000, bool(jnp.abs(w).max() > 4)
    (dtype(bfloat16), True, True)
  """
  return lambda key, shape, dtype=jnp.float32: init(key, shape, jnp.float32).astype(dtype)


def fan_in_uniform(fan_in: int) -> Callable:
  """The initialiser ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (PyTorch's ``nn.Linear`` and
  ``kaiming_uniform_(a=sqrt(5))``: LoRA's and SLTrain's ``A``, SLTrain's values).

  Example:
    >>> w = fan_in_uniform(4)(jax.random.key(0), (1000,))
    >>> bool(jnp.all(jnp.abs(w) <= 0.5))
    True
  """
  bound = 1.0 / math.sqrt(_checks.int_at_least(fan_in, 1, "fan_in"))
  return drawn_in_float32(lambda key, shape, dtype: jax.random.uniform(
      key, shape, dtype, -bound, bound))


def _meta(axes, i: int | None, shard_rank: bool = False) -> dict:
  """``out_sharding`` metadata of a kernel (``i`` None) or of its factor ``A`` (``i`` 0) or
  ``B`` (1): the logical axis names ``(in, out)``; a factor's rank axis takes the name of the
  kernel axis it stands in for (``shard_rank``) or none, replicated.  Nothing without
  ``axes``."""
  if axes is None:
    return {}
  if i is None or shard_rank:
    # A (in, r) splits r as the kernel splits out, B (r, out) r as it splits in: each
    # factor then holds 1 / (devices) of itself, like the kernel, whichever side FSDP takes.
    return {"out_sharding": tuple(axes)}
  return {"out_sharding": (axes[0], None) if i == 0 else (None, axes[1])}


def _check_rank_shards(rank: int, axes, shard_rank: bool) -> None:
  """A one-line ``ValueError`` where ``shard_rank`` would split the rank axis over mesh axes
  (of the mesh and logical rules set now) that do not divide it: JAX's own error names
  neither the argument nor the way out.  First ``axes`` itself (a string would be split
  into letters, a third name would reach the factors' metadata) and ``shard_rank``."""
  is_name = lambda a: isinstance(a, str) or (
      isinstance(a, tuple) and all(isinstance(x, str) for x in a))
  if axes is not None and not (isinstance(axes, (tuple, list)) and len(axes) == 2
                               and all(a is None or is_name(a) for a in axes)):
    raise ValueError("kernel_axes must be None or the kernel's two logical axis names (in,"
                     f" out), each a str, a tuple of str or None, got {axes!r}.")
  _checks.flag(shard_rank, "shard_rank")  # ("no" read as True)
  mesh = jax.sharding.get_abstract_mesh()
  if not shard_rank or axes is None or mesh.empty:
    return
  rules = dict(flax_spmd.get_logical_axis_rules())
  for name in axes:
    mapped = rules.get(name, name)
    names = () if mapped is None else (mapped,) if isinstance(mapped, str) else tuple(mapped)
    size = math.prod(mesh.shape.get(axis, 1) for axis in names)
    if rank % size:
      raise ValueError(f"rank={rank}: shard_rank splits it as kernel axis {name!r} is split,"
                       f" over {' x '.join(names)} = {size} devices, which do not divide it;"
                       " choose a rank they divide or pass shard_rank=False.")


def _check_dtypes(dtype, param_dtype) -> None:
  """At construction, not in the first call (or in an initializer's own words)."""
  _checks.float_dtype(dtype, "dtype")
  if _checks.float_dtype(param_dtype, "param_dtype") is None:
    raise ValueError("param_dtype: expected a floating dtype, got None.")


def _check_rank(rank, in_features, out_features) -> int:
  _checks.int_at_least(in_features, 1, "in_features")
  _checks.int_at_least(out_features, 1, "out_features")
  rank = _checks.int_at_least(rank, 1, "rank")
  if rank > min(in_features, out_features):
    raise ValueError(f"rank must be at most min(in_features, out_features) ="
                     f" {min(in_features, out_features)}, got {rank}.")
  return rank


def _cast(dtype, *xs):
  return xs if dtype is None else tuple(x.astype(dtype) for x in xs)


def _rank_whole(a):
  """``a`` ``(..., in, r)`` with its rank axis gathered under Explicit mesh axes (as is).

  With ``shard_rank`` the rank axis of ``A`` is split as the kernel splits ``out`` and that
  of ``B`` as it splits ``in``: JAX will not contract two differently split axes, but it
  contracts a whole axis with a split one, as it does an activation with a dense kernel.
  ``A`` is the small side to gather (``in x r``, once per call, like FSDP's weight gather).
  """
  typed = _explicit.typed_sharding(a)
  if typed is None:
    return a
  return _explicit.reshard_to(a, P(*_explicit.padded(typed.spec, a.ndim)[:-1], None))


def _rank_out(out_sharding, ndim: int):
  """The spec of ``x A`` (``ndim`` axes, the rank last) in a layer asked for ``out_sharding``:
  the leading axes split as the output's, the rank whole (JAX would not guess it where ``x``
  and ``A`` split their contracted axis alike).  ``None`` for ``None``."""
  if out_sharding is None:
    return None
  spec = getattr(out_sharding, "spec", out_sharding)  # a NamedSharding or a PartitionSpec
  return P(*_explicit.padded(spec, ndim)[:-1], None)


class LoRALinear(nnx.Module):
  """``y = x W0 + (alpha / r) dropout(x) A B``: a frozen base and a trainable rank-``r``
  adapter (LoRA, Hu et al. 2021; GaLore's Table 2 runs it from scratch with alpha 32,
  dropout 0.05).

  ``W0`` ``(in, out)`` is a :class:`Frozen` drawn by ``kernel_init``; ``A`` ``(in, r)`` is
  ``U(+-1/sqrt(in))`` and ``B`` ``(r, out)`` zero, so the layer starts equal to its base.
  :meth:`merge` folds the adapter into the base (ReLoRA). ``kernel_axes``: logical axis
  names ``(in, out)`` put in the variables' ``out_sharding`` metadata; with ``shard_rank``
  (the default) a factor's rank axis takes the name of the kernel axis it stands in for
  (``A`` is named ``(in, out)``, ``B`` too), so each factor splits over the kernel's mesh
  axes, whichever side they are on; ``shard_rank=False`` replicates the rank axis (for a
  rank those mesh axes do not divide). Dropout (``nnx.Dropout``, stream ``"dropout"`` of
  ``rngs``) is off under ``deterministic=True`` (``nnx.view(model, deterministic=True)``).

  Example:
    >>> layer = LoRALinear(4, 3, rank=2, rngs=nnx.Rngs(0))
    >>> x = jnp.ones((5, 4))
    >>> bool(jnp.allclose(layer(x), x @ layer.base[...]))
    True
    >>> len(jax.tree.leaves(nnx.state(layer, nnx.Param)))  # A and B only
    2
  """

  def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float = 32.0,
               dropout: float = 0.0, kernel_init: Callable = nnx.initializers.lecun_normal(),
               dtype=None, param_dtype=jnp.float32, kernel_axes=None, shard_rank: bool = True,
               rngs: nnx.Rngs):
    self.rank = _check_rank(rank, in_features, out_features)
    _check_dtypes(dtype, param_dtype)
    _check_rank_shards(self.rank, kernel_axes, shard_rank)
    self.scale = float(_checks.positive(alpha, "alpha")) / self.rank
    if not (isinstance(dropout, numbers.Real) and 0 <= dropout < 1):  # (1: a dead adapter)
      raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}.")
    self.dtype = dtype
    key = rngs.params()
    self.base = Frozen(drawn_in_float32(kernel_init)(key, (in_features, out_features),
                                                     param_dtype),
                       **_meta(kernel_axes, None))
    a_init = fan_in_uniform(in_features)(rngs.params(), (in_features, self.rank), param_dtype)
    self.lora_a = LoRAParam(a_init, **_meta(kernel_axes, 0, shard_rank))
    self.lora_b = LoRAParam(jnp.zeros((self.rank, out_features), param_dtype),
                            **_meta(kernel_axes, 1, shard_rank))
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

  def __call__(self, x, out_sharding=None):
    """``x W0 + (alpha / r) dropout(x) A B``; ``out_sharding`` as ``nnx.Linear``'s (the
    output's sharding, where Explicit mesh axes need it said)."""
    x, w0, a, b = _cast(self.dtype, x, self.base[...], _rank_whole(self.lora_a[...]),
                        self.lora_b[...])
    h = self.dropout(x) if self.dropout is not None else x
    ha = jnp.matmul(h, a, out_sharding=_rank_out(out_sharding, x.ndim))
    return (jnp.matmul(x, w0, out_sharding=out_sharding)
            + jnp.matmul(ha * jnp.asarray(self.scale, h.dtype), b, out_sharding=out_sharding))

  def merge(self, key: jax.Array):
    """``W0 <- W0 + (alpha / r) A B`` (in float32), then ``A`` redrawn from ``key``
    (``U(+-1/sqrt(in))``) and ``B = 0``: the layer computes the same function, and a new
    adapter starts from zero. Works on stacked layers (leading axes of an ``nnx.vmap``)."""
    a, b = _rank_whole(self.lora_a[...]), self.lora_b[...]
    delta = self.scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
    self.base[...] = (self.base[...].astype(jnp.float32) + delta).astype(self.base.dtype)
    self.lora_a[...] = _explicit.place_like(  # A's own sharding, not the gathered one
        fan_in_uniform(a.shape[-2])(key, a.shape, a.dtype), self.lora_a[...])
    self.lora_b[...] = jnp.zeros_like(self.lora_b[...])


class LowRankLinear(nnx.Module):
  """``y = x A B``: the weight is a trainable rank-``r`` product (the papers' "Low-Rank",
  ``W = BA`` in PyTorch's layout), ``A`` ``(in, r)`` ``U(+-1/sqrt(in))`` and ``B`` ``(r,
  out)`` ``U(+-1/sqrt(r))``: two PyTorch ``nn.Linear`` layers in a row.  ``kernel_axes``
  and ``shard_rank`` as for :class:`LoRALinear`.

  Example:
    >>> layer = LowRankLinear(6, 5, rank=2, rngs=nnx.Rngs(0))
    >>> layer.a.shape, layer.b.shape
    ((6, 2), (2, 5))
    >>> bool(jnp.allclose(layer(jnp.eye(6)), layer.a[...] @ layer.b[...]))
    True
  """

  def __init__(self, in_features: int, out_features: int, *, rank: int, dtype=None,
               param_dtype=jnp.float32, kernel_axes=None, shard_rank: bool = True,
               rngs: nnx.Rngs):
    rank = _check_rank(rank, in_features, out_features)
    _check_dtypes(dtype, param_dtype)
    _check_rank_shards(rank, kernel_axes, shard_rank)
    self.dtype = dtype
    a = fan_in_uniform(in_features)(rngs.params(), (in_features, rank), param_dtype)
    b = fan_in_uniform(rank)(rngs.params(), (rank, out_features), param_dtype)
    self.a = nnx.Param(a, **_meta(kernel_axes, 0, shard_rank))
    self.b = nnx.Param(b, **_meta(kernel_axes, 1, shard_rank))

  def __call__(self, x, out_sharding=None):
    """``x A B``; ``out_sharding`` as ``nnx.Linear``'s."""
    x, a, b = _cast(self.dtype, x, _rank_whole(self.a[...]), self.b[...])
    xa = jnp.matmul(x, a, out_sharding=_rank_out(out_sharding, x.ndim))
    return jnp.matmul(xa, b, out_sharding=out_sharding)


def sparse_support(key: jax.Array | int, in_features: int, out_features: int,
                   delta: float) -> jax.Array:
  """``floor(delta * in * out)`` distinct flat row-major positions of an ``(in, out)``
  matrix, uniformly at random, sorted (int32): SLTrain's fixed support (``delta`` in
  ``(0, 1]``, at least one position; ``key`` a PRNG key or an int seed).

  Example:
    >>> idx = sparse_support(jax.random.key(0), 10, 20, 0.03)
    >>> idx.shape, bool(jnp.all(jnp.diff(idx) > 0))
    ((6,), True)
  """
  _check_delta(delta)
  size = (_checks.int_at_least(in_features, 1, "in_features")
          * _checks.int_at_least(out_features, 1, "out_features"))
  if size >= 2**31:
    raise ValueError(f"in_features * out_features must be below 2**31 (int32 indices), "
                     f"got {size}.")
  nnz = math.floor(delta * size)
  if nnz == 0:  # (an empty S: low-rank only, unsaid; and Orbax refuses zero-size arrays)
    raise ValueError(f"delta * in_features * out_features must be at least 1 (an entry of S),"
                     f" got {delta!r} * {in_features} * {out_features}.")
  return jnp.sort(jax.random.choice(_checks.prng_key(key), size, (nnz,),
                                    replace=False)).astype(jnp.int32)


def _check_delta(delta) -> None:
  if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta <= 1:
    raise ValueError(f"delta must be a number in (0, 1], got {delta!r}.")


def dense_kernel(a, b, values, index, scale: float):
  """``W = scale A B`` with ``values`` added at the flat positions ``index`` (the kernel
  of :func:`sparse_plus_low_rank`, in ``a``'s dtype).

  Example:
    >>> w = dense_kernel(jnp.ones((2, 1)), jnp.ones((1, 3)), jnp.array([5.]),
    ...                  jnp.array([4]), 0.5)
    >>> w.tolist()
    [[0.5, 0.5, 0.5], [0.5, 5.5, 0.5]]
  """
  w = (_rank_whole(a) * jnp.asarray(scale, a.dtype)) @ b.astype(a.dtype)
  flat = w.reshape(-1)  # Explicit axes: each shard adds the values that fall in it
  flat = flat.at[index].add(values.astype(w.dtype), out_sharding=_explicit.typed_spec(flat))
  return jnp.reshape(flat, w.shape, out_sharding=_explicit.typed_spec(w))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def sparse_plus_low_rank(x, a, b, values, index, scale: float, out_sharding=None):
  """``y = x W`` with ``W = scale A B + S`` (:func:`dense_kernel`), whose backward
  recomputes ``W`` from the factors: it saves ``x, A, B, values, index``, never ``W``
  (SLTrain's memory claim). With ``G`` the output cotangent and ``dW = x^T G`` (over every
  leading axis of ``x``)::

      dx = G W^T,  dA = scale dW B^T,  dB = scale A^T dW,  dvalues = dW.flat[index]

  ``index`` gets no cotangent (it is an integer support). Shapes: ``x (..., in)``, ``a
  (in, r)``, ``b (r, out)``, ``values`` and ``index`` ``(nnz,)``; ``scale`` a Python
  number (static: not differentiated, and not traced: pass it as a constant, not a ``jit``
  argument); ``out_sharding``: the output's sharding (a ``PartitionSpec``), where Explicit
  mesh axes need it said.

  Example:
    >>> x, a, b = jnp.ones((2, 3)), jnp.ones((3, 1)), jnp.ones((1, 4))
    >>> values, index = jnp.array([1.]), jnp.array([0])
    >>> sparse_plus_low_rank(x, a, b, values, index, 2.0)[0].tolist()
    [7.0, 6.0, 6.0, 6.0]
  """
  w = dense_kernel(a, b, values, index, scale).astype(x.dtype)
  return jnp.matmul(x, w, out_sharding=out_sharding)


def _splr_fwd(x, a, b, values, index, scale, out_sharding):
  y = sparse_plus_low_rank(x, a, b, values, index, scale, out_sharding)
  return y, (x, a, b, values, index)


def _splr_bwd(scale, out_sharding, residuals, g):
  x, a, b, values, index = residuals
  w = dense_kernel(a, b, values, index, scale)
  # Under Explicit mesh axes each gradient is split as its input is (the einsums name it:
  # JAX will not guess the split of a sum over a sharded axis); plain einsums otherwise.
  spec, f32 = _explicit.typed_spec, jnp.float32
  dx = _explicit.einsum("...o,io->...i", g, w.astype(g.dtype), out_spec=spec(x)).astype(x.dtype)
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  dw = _explicit.einsum("ni,no->io", x2, g2, out_spec=spec(w), preferred_element_type=f32)
  da = scale * _explicit.einsum("io,ro->ir", dw, b.astype(f32), out_spec=spec(a))
  db = scale * _explicit.einsum("ir,io->ro", a.astype(f32), dw, out_spec=spec(b))
  dvalues = dw.reshape(-1).at[index].get(out_sharding=spec(values))
  zero_index = np.zeros(index.shape, dtype=jax.dtypes.float0)
  return (dx, da.astype(a.dtype), db.astype(b.dtype), dvalues.astype(values.dtype), zero_index)


sparse_plus_low_rank.defvjp(_splr_fwd, _splr_bwd)


class SparsePlusLowRankLinear(nnx.Module):
  """SLTrain (Han et al. 2024): ``y = x W``, ``W = (alpha / r) A B + S``.

  ``A`` ``(in, r)`` ``U(+-1/sqrt(in))``, ``B`` ``(r, out)`` zero, so at init ``W = S``;
  ``S`` holds ``floor(delta * in * out)`` trainable ``values`` (``U(+-1/sqrt(in))``) at a
  random support drawn once from ``rngs.params()`` (:func:`sparse_support`) and kept as a
  :class:`SparseIndex` (flat row-major positions of the ``(in, out)`` kernel), which no
  optimizer sees. The product is :func:`sparse_plus_low_rank`: a dense ``W`` built by
  scatter-add, recomputed in the backward pass. Trainable parameters per layer:
  ``r (in + out) + floor(delta in out)``.  ``kernel_axes`` and ``shard_rank`` as for
  :class:`LoRALinear` (the flat values and indices are replicated).

  Example:
    >>> layer = SparsePlusLowRankLinear(8, 6, rank=2, delta=0.25, rngs=nnx.Rngs(0))
    >>> layer.values.shape, layer.index.shape
    ((12,), (12,))
    >>> bool(jnp.allclose(layer(jnp.eye(8)), layer.kernel()))
    True
  """

  def __init__(self, in_features: int, out_features: int, *, rank: int, delta: float = 0.03,
               alpha: float = 32.0, dtype=None, param_dtype=jnp.float32, kernel_axes=None,
               shard_rank: bool = True, rngs: nnx.Rngs):
    rank = _check_rank(rank, in_features, out_features)
    _check_dtypes(dtype, param_dtype)
    _check_rank_shards(rank, kernel_axes, shard_rank)
    self.scale = float(_checks.positive(alpha, "alpha")) / rank
    self.dtype = dtype
    index = sparse_support(rngs.params(), in_features, out_features, delta)
    flat = {} if kernel_axes is None else {"out_sharding": (None,)}  # replicated
    self.index = SparseIndex(index, **flat)
    init = fan_in_uniform(in_features)
    self.values = nnx.Param(init(rngs.params(), index.shape, param_dtype), **flat)
    self.a = nnx.Param(init(rngs.params(), (in_features, rank), param_dtype),
                       **_meta(kernel_axes, 0, shard_rank))
    self.b = nnx.Param(jnp.zeros((rank, out_features), param_dtype),
                       **_meta(kernel_axes, 1, shard_rank))

  def kernel(self):
    """The dense ``(in, out)`` weight (in the compute dtype)."""
    a, b, values = _cast(self.dtype, self.a[...], self.b[...], self.values[...])
    return dense_kernel(a, b, values, self.index[...], self.scale)

  def __call__(self, x, out_sharding=None):
    """``x W``; ``out_sharding`` as ``nnx.Linear``'s."""
    a, b, values = self.a[...], self.b[...], self.values[...]
    # dtype None: x and the params promoted together, as the other layers' matmuls do
    # (sparse_plus_low_rank computes in x's dtype: an int32 x would truncate W)
    dtype = self.dtype if self.dtype is not None else jnp.result_type(x, a, b, values)
    x, a, b, values = _cast(dtype, x, a, b, values)
    return sparse_plus_low_rank(x, a, b, values, self.index[...], self.scale, out_sharding)


# The trainable factors' names in the layers above: what factor_kernels selects.
FACTOR_NAMES = ("lora_a", "lora_b", "a", "b")


def factor_kernels(params: Any) -> Any:
  """Mask selecting the trainable factor matrices of this module's layers: LoRA's adapters
  ``A`` and ``B``, the ``A`` and ``B`` of :class:`LowRankLinear` and of SLTrain's
  :class:`SparsePlusLowRankLinear` (a leaf whose last key is one of ``FACTOR_NAMES`` and that
  has at least two axes).  SLTrain's sparse values, the frozen bases and the supports are
  never selected.  The ``mask`` of a projecting optimizer (GaLore, LDAdam, APOLLO, Fira) that
  trains a model of these layers; ``gj.linear_kernels`` selects the dense kernels.

  Args:
    params: a pytree of parameters (or updates; only paths and shapes are read).

  Returns:
    A pytree of bools with the structure of ``params``.

  Example:
    >>> model = LowRankLinear(6, 5, rank=2, rngs=nnx.Rngs(0))
    >>> factor_kernels(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    {'a': True, 'b': True}
  """

  def select(path, leaf) -> bool:
    # The last dict key names the leaf (an nnx.Variable adds its ``.value`` attribute after).
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return bool(keys) and keys[-1] in FACTOR_NAMES and len(np.shape(leaf)) >= 2

  return jax.tree_util.tree_map_with_path(select, params)


# ReLoRA ---------------------------------------------------------------------------------


def merge_lora(model: nnx.Module, key: jax.Array) -> int:
  """Folds every :class:`LoRALinear` of ``model`` into its base (:meth:`LoRALinear.merge`,
  each with its own key); returns how many it merged.

  Example:
    >>> layer = LoRALinear(4, 3, rank=2, rngs=nnx.Rngs(0))
    >>> merge_lora(layer, jax.random.key(1))
    1
  """
  key, merged = _checks.prng_key(key), 0
  for _, module in nnx.iter_modules(model):
    if isinstance(module, LoRALinear):
      module.merge(jax.random.fold_in(key, merged))
      merged += 1
  return merged


def lora_mask(model: nnx.Module, wrt: Any = nnx.Param):
  """The trainable params of ``model`` (``nnx.state(model, wrt)`` as a pure dict: ``wrt``
  the filter of its ``nnx.Optimizer``) with ``True`` at LoRA adapter factors
  (:class:`LoRAParam`), ``False`` elsewhere.

  Example:
    >>> lora_mask(LoRALinear(4, 3, rank=2, rngs=nnx.Rngs(0)))
    {'lora_a': True, 'lora_b': True}
  """
  state = nnx.state(model, wrt)
  flags = jax.tree.map(lambda v: isinstance(v, LoRAParam), state,
                       is_leaf=lambda v: isinstance(v, nnx.Variable))
  return nnx.to_pure_dict(flags)


def reset_state(tx, state, params, mask):
  """``state`` (of ``tx``, for ``params``) with the state of every param where ``mask`` is
  ``True`` replaced by what ``tx.init(params)`` makes for it (zero moments, and galore_jax's
  per-param error-feedback buffers and limiter norms); counts, keys and projection bases are
  kept. Any transform that
  ``optax.tree_map_params`` understands works (adamw, galore_jax's 8-bit Adam, chains).
  ``params`` and ``mask``: nested dicts (``nnx.to_pure_dict``).

  Example:
    >>> tx = optax.adam(0.1)
    >>> params = {"a": jnp.ones(2), "b": jnp.full(2, 5.0)}
    >>> state = tx.update(params, tx.init(params))[1]
    >>> new = reset_state(tx, state, params, {"a": True, "b": False})
    >>> new[0].mu["a"].tolist(), new[0].mu["b"].tolist(), int(new[0].count)
    ([0.0, 0.0], [0.5, 0.5], 1)
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(mask, is_leaf=lambda x: x is None)
  if nones := [jax.tree_util.keystr(p) for p, m in flat if m is None]:  # (an empty subtree)
    raise ValueError(f"mask: {nones[0]} is None, where each param takes True or False")
  where = _checks.tree_difference(params, mask, ("the params", "mask"))
  if where:
    raise ValueError(f"mask: its structure must be the params' ({where}).")
  fresh = tx.init(params)
  per_param = lambda x: not isinstance(x, dict)  # a param's state may be a tree (8-bit)
  flags = optax.tree_map_params(
      tx, lambda _, m: bool(m), fresh, mask, is_leaf=per_param,
      transform_non_params=functools.partial(_per_leaf_flags, jax.tree.leaves(mask)))
  return jax.tree.map(lambda flag, new, old: new if flag else old, flags, fresh, state,
                      is_leaf=lambda x: isinstance(x, bool))


def _per_leaf_flags(mask_leaves: list, value: Any) -> Any:
  """Which leaves of a non-params part of a state to reset.  galore_jax's per-leaf tuples
  (one entry per param: ``optax.tree_map_params`` hands them here whole) restart a masked
  param's bare array, its error-feedback buffer or limiter norm; a basis (a structure) is
  kept, as a zero one would stop the param's updates until the next refresh.  The rest (counts,
  keys) is kept."""
  keep = lambda v: jax.tree.map(lambda _: False, v)
  if not (type(value) is tuple and len(value) == len(mask_leaves)):
    return keep(value)
  return tuple(bool(m) if isinstance(v, (jax.Array, np.ndarray)) else keep(v)
               for m, v in zip(mask_leaves, value))


def relora_merge(model: nnx.Module, optimizer: nnx.Optimizer, key: jax.Array) -> int:
  """ReLoRA's restart, in place: :func:`merge_lora` on ``model``, then the adapters'
  optimizer state reset (:func:`reset_state` over :func:`lora_mask`); the model computes
  the same function after it. ``optimizer``: an ``nnx.Optimizer(model, tx, wrt=...)``
  (``nnx.Param``, or :class:`LoRAParam` to train the adapters alone). Jit it with
  ``nnx.jit`` (donate both). Under Auto mesh axes a jit lays its outputs out as XLA
  chooses (it may replicate the adapters and their state): pin them to the shardings they
  had (``jax.lax.with_sharding_constraint`` inside the jit, as the LLaMA example's
  ``sharded_relora_step`` does); Explicit axes keep them. Returns the merges made.

  Example:
    >>> model = LoRALinear(4, 3, rank=2, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param)
    >>> relora_merge(model, optimizer, jax.random.key(1))
    1
  """
  wrt = optimizer.wrt  # the state is tx.init of these params, not of every nnx.Param
  params = nnx.to_pure_dict(nnx.state(model, wrt))  # (shapes only: the same after the merge)
  # A Variable around MaskedNode() (optax.masked's, multi_transform's) holds no leaf.
  variables = jax.tree.leaves(optimizer.opt_state, is_leaf=flax_metadata.variable_leaf)
  is_var = lambda v: isinstance(v, nnx.Variable)
  old = jax.tree.unflatten(jax.tree.structure(optimizer.tx.init(params)),
                           [v[...] if is_var(v) else v for v in variables])
  new = jax.tree.leaves(reset_state(optimizer.tx, old, params, lora_mask(model, wrt)))
  merged = merge_lora(model, key)  # (after what may fail: no merge with its state kept)
  for var, value in zip(variables, new):
    var[...] = value
  return merged


def relora_schedule(schedule: optax.ScalarOrSchedule, every: int, warmup: int
                    ) -> optax.Schedule:
  """ReLoRA's jagged learning rate (its ``get_cosine_schedule_with_multiple_warmups``):
  ``schedule(t)`` in the first ``every`` steps; after each merge, at ``t0`` a multiple of
  ``every``, the rate restarts from 0 and ramps linearly to where ``schedule`` is at the end
  of the ramp, ``schedule(t0 + warmup) * (t - t0) / warmup`` for ``t0 <= t < t0 + warmup``,
  then follows ``schedule`` again (the merge's first step, at rate 0, refills the reset
  moments).

  Example:
    >>> s = relora_schedule(lambda t: 1.0 - t / 100, every=10, warmup=4)
    >>> [round(float(s(t)), 4) for t in (5, 10, 11, 12, 14, 20)]
    [0.95, 0.0, 0.215, 0.43, 0.86, 0.0]
  """
  if not callable(schedule):  # a constant rate, as optax takes one
    schedule = optax.constant_schedule(_checks.learning_rate(schedule))
  # every >= 2: with a merge at every step, every step would run at rate 0.
  every = _checks.int_at_least(every, 2, "every")
  warmup = _checks.int_at_least(warmup, 1, "warmup")
  if warmup > every:
    raise ValueError(f"warmup: expected at most every = {every} steps, got {warmup}")

  def jagged(t):
    since_merge = t % every
    ramp = since_merge / warmup * schedule(t - since_merge + warmup)
    return jnp.where((t >= every) & (since_merge < warmup), ramp, schedule(t))
  return jagged

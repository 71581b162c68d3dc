r"""Adam with 8-bit optimizer state (bitsandbytes' block-wise ``Adam8bit``) as an Optax
transform.

Each step dequantizes the moments (:mod:`galore_jax.quantization`), runs Adam in float32
with optax's ``scale_by_adam`` numerics and quantizes the new moments again, the first with
the signed dynamic map, the second with the unsigned one, each block of 256 elements
with its own float32 absmax taken from the new values.  Tensors of fewer than
``min_8bit_size`` elements keep float32 moments.  A leaf that stacks tensors (a scanned
model's layers) is one tensor per slice with ``batch_dims``: as bitsandbytes sees each
layer's parameter.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from galore_jax import _checks
from galore_jax import quantization
from galore_jax._explicit import sharding_of
from galore_jax._explicit import zeros
from galore_jax.flax_metadata import actual_spec_or
from galore_jax.flax_metadata import in_variable
from galore_jax.flax_metadata import is_variable
from galore_jax.flax_metadata import on_values
from galore_jax.flax_metadata import variable_leaf
from galore_jax.quantization import Quantized


class ScaleByAdam8bitState(NamedTuple):
  """State of :func:`scale_by_adam_8bit`.

  Attributes:
    count: int32 number of updates taken.
    mu: first moments, the params' structure: per leaf a
      :class:`~galore_jax.quantization.Quantized` (signed map) or, for leaves of fewer
      than ``min_8bit_size`` elements, a float32 array.
    nu: second moments, likewise (unsigned map).

  Example:
    >>> import jax.numpy as jnp
    >>> import galore_jax as gj
    >>> state = gj.scale_by_adam_8bit().init({"w": jnp.zeros((64, 128)), "b": jnp.zeros(8)})
    >>> state.mu["w"].codes.dtype, state.mu["w"].absmax.shape, state.mu["b"].dtype
    (dtype('uint8'), (32,), dtype('float32'))
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def is_quantized(x: Any) -> bool:
  """Whether ``x`` is a quantized moment (``is_leaf`` for trees of moments).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import adam8bit, quantization
    >>> adam8bit.is_quantized(quantization.zeros((4,))), adam8bit.is_quantized(jnp.zeros(4))
    (True, False)
  """
  return isinstance(x, Quantized)


def moment_shape(x: Any) -> tuple[int, ...]:
  """The shape of the tensor a moment stands for (a quantized one: its codes').

  Example:
    >>> from galore_jax import adam8bit, quantization
    >>> adam8bit.moment_shape(quantization.zeros((64, 100)))
    (64, 100)
  """
  return tuple(jnp.shape(x.codes if is_quantized(x) else x))


def load(moment: Any, signed: bool) -> jax.Array:
  """A moment as float32: dequantized (``signed``: with the signed map), or the float32
  array itself.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import adam8bit
    >>> adam8bit.load(jnp.ones(2), True).tolist()
    [1.0, 1.0]
  """
  if is_quantized(moment):
    return quantization.dequantize(moment, signed=signed)
  return moment


def store(value: jax.Array, like: Any, signed: bool) -> Any:
  """``value`` stored as the moment ``like`` is: quantized with its block size, or as a
  float32 array.  A ``signed`` moment (the first) keeps the sign of its small entries
  (``quantize(keep_sign=True)``), as bitsandbytes' optimizers store it.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import adam8bit, quantization
    >>> q = adam8bit.store(jnp.ones(300), quantization.zeros((300,)), False)
    >>> q.absmax.tolist()
    [1.0, 1.0]
  """
  if is_quantized(like):
    q = quantization.quantize(
        value, signed=signed, block_size=quantization.block_size_of(like),
        batch_dims=quantization.batch_dims_of(like), keep_sign=signed)
    return q._replace(codes=_laid_out_as(q.codes, like.codes))
  return value.astype(jnp.float32)


def _laid_out_as(new: jax.Array, old: jax.Array) -> jax.Array:
  """``new``, which the partitioner lays out as ``old`` under Auto mesh axes.

  The block view of :func:`galore_jax.quantization.quantize` hides the layout from the
  partitioner, which placed a jitted step's new codes as it liked (replicated, or on fewer
  axes), undoing the state's sharding.  A select that always takes ``new`` but reads ``old``
  gives both one layout by sharding propagation.  (``jax.experimental.shard_alike`` did this;
  jax 0.11 removed it.)  The tests/sharding case ``adam_8bit_on_a_mesh`` checks it holds.
  """
  return jnp.where(True, new, old)


def _none(x) -> bool:
  return x is None


def _finite_or_zero(finite, x):
  """``x`` where ``finite`` holds, else 0; ``x`` itself where ``finite`` is None."""
  return x if finite is None else jnp.where(finite, x, jnp.zeros_like(x))


def _zero_moment(item, block_size, min_8bit_size, batch_dims):
  """The zero moment of a param leaf.  For a Flax Variable, the codes (or the float32
  moment) go into a copy of it, as optax's ``zeros_like`` keeps the variable: they have
  the param's shape, so its metadata (its partition spec) holds for them, and
  ``nnx.Optimizer`` keeps the Quantized node around them; the absmax goes into a copy
  whose spec is :func:`galore_jax.quantization.absmax_spec`'s."""
  leaf = item.get_value() if is_variable(item) else item
  like = sharding_of(leaf)
  shape = tuple(jnp.shape(leaf))

  def wrap(x):
    return in_variable(item, x, lambda spec: spec)

  if int(np.prod(shape[batch_dims:], dtype=np.int64)) >= max(min_8bit_size, 1):
    q = quantization.zeros(shape, block_size=block_size, like=like, batch_dims=batch_dims)
    mesh = like.mesh if like is not None else jax.sharding.get_abstract_mesh()
    absmax = actual_spec_or(sharding_of(q.absmax), lambda spec: (
        P() if mesh.empty else quantization.absmax_spec(spec, shape, block_size, mesh,
                                                        batch_dims)))
    return Quantized(wrap(q.codes), in_variable(item, q.absmax, absmax))
  return wrap(zeros(shape, jnp.float32, like, None if like is None else like.spec))


# Cast to the real moments, a complex gradient lost its imaginary part without a word.
_REAL_MOMENTS = ("its moments are real (8-bit codes, or float32 below min_8bit_size): give"
                 " complex leaves optax.adam instead (optax.multi_transform).")


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    block_size: int = quantization.BLOCK_SIZE,
    min_8bit_size: int = 4096,
    batch_dims: Any = 0,
) -> optax.GradientTransformation:
  r"""Adam's scaling with block-wise 8-bit moments (bitsandbytes >= 0.44 ``Adam8bit``).

  With :math:`\mathcal D` the block-wise dequantization and :math:`\mathcal Q_\pm` /
  :math:`\mathcal Q_+` the block-wise quantization of :mod:`galore_jax.quantization` with
  the signed map (for :math:`\mu`) / the unsigned one (for :math:`\nu \ge 0`), in
  float32 (a bf16 gradient is cast to float32 first):

  .. math::
    \mu_t = \beta_1 \mathcal D(\bar\mu_{t-1}) + (1-\beta_1) g_t,\quad
    \nu_t = \beta_2 \mathcal D(\bar\nu_{t-1}) + (1-\beta_2) g_t^2,\quad
    u_t = \frac{\mu_t / (1-\beta_1^t)}{\sqrt{\nu_t/(1-\beta_2^t) + \epsilon_{root}}
      + \epsilon}

  and the state keeps :math:`\bar\mu_t = \mathcal Q_\pm(\mu_t)`,
  :math:`\bar\nu_t = \mathcal Q_+(\nu_t)` (absmax of the new values).  Leaves of fewer
  than ``min_8bit_size`` elements keep float32 moments: for them it is exactly
  ``optax.scale_by_adam`` (float32 params).  bitsandbytes computes the same
  :math:`u_t` (its ``eps`` too is added after the bias-corrected square root).  As in
  bitsandbytes, where an 8-bit moment's gradient entry is not finite (inf or NaN), that
  entry's :math:`\mu_t`, :math:`\nu_t` and :math:`u_t` are 0 (its block's other entries
  are untouched).  A finite gradient whose square overflows
  (:math:`|g| > 1.8 \cdot 10^{19}`) steps 0, as in optax (:math:`\mu / \sqrt{\infty}`);
  its :math:`\bar\nu` saturates at :math:`2^{126}`, so its block stays finite, the other
  elements' moments rounding to zero next to it.  The first moment is stored keeping the
  sign of its small entries (``quantize(keep_sign=True)``), as bitsandbytes stores it: a
  negative one becomes the largest negative code, :math:`-5.5 \cdot 10^{-7}` times its
  block's absmax.  Next to a huge finite gradient that is huge too, over a second moment
  rounded to 0, so that element's update is huge (:math:`10^{15}` to :math:`10^{16}` at each
  of the steps after one gradient entry of :math:`10^{20}`) until the block's absmax has
  decayed (by :math:`\beta_1` per step, hundreds of steps): clip the gradients
  (``optax.clip_by_global_norm``) where such a gradient can occur.

  State bytes, exactly (``gj.tree_bytes``): for leaves of :math:`k_i` tensors (the product
  of their ``batch_dims`` leading axes; 1 without) of :math:`n_i` elements each and block
  size :math:`B`,

  .. math::
    4 + \sum_{n_i \ge \texttt{min\_8bit\_size}} 2\,k_i\,(n_i + 4\lceil n_i/B\rceil)
      + \sum_{n_i < \texttt{min\_8bit\_size}} 8\,k_i n_i

  (the count, one byte per element and a float32 absmax per block for each 8-bit moment,
  float32 moments otherwise): about 2.03 bytes per element against AdamW's 8 in float32.

  Sharding: the codes and float32 moments take the param's sharding; an absmax follows
  the blocks along the param's first axis when each device holds whole blocks, else it is
  replicated (:func:`galore_jax.quantization.absmax_spec`).

  Args:
    b1, b2, eps, eps_root: as in ``optax.scale_by_adam``.
    block_size: elements per quantization block, a power of two (bitsandbytes: 256).
    min_8bit_size: leaves with fewer elements keep float32 moments (bitsandbytes: 4096).
    batch_dims: how many leading axes of a leaf index separate tensors, each quantized in
      blocks of its own and held to ``min_8bit_size`` alone (a scanned model's stacked
      layers: 1): an int for every leaf, a tree of ints with the params' structure, or a
      function of the params giving one (evaluated on the updates too).  Inside
      :func:`galore_jax.galore_projection` it counts the axes of the coefficients (a
      projected leaf's batch axes).

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`ScaleByAdam8bitState`;
    its updates have the gradients' dtype.

  Raises:
    ValueError: for a beta outside ``[0, 1)``, a ``block_size`` that is not a power of
      two, ``min_8bit_size < 0``, a ``batch_dims`` that does not fit the params or a
      complex leaf (the moments are real).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import galore_jax as gj
    >>> params = {"w": jnp.zeros((128, 64)), "b": jnp.zeros(64)}
    >>> tx = gj.scale_by_adam_8bit()
    >>> state = tx.init(params)
    >>> state.mu["w"].codes.dtype, state.mu["w"].absmax.shape, state.mu["b"].dtype
    (dtype('uint8'), (32,), dtype('float32'))
    >>> gj.tree_bytes(state) == 4 + 2 * (128 * 64 + 4 * 32) + 8 * 64
    True
    >>> grads = {"w": jnp.ones((128, 64)), "b": jnp.ones(64)}
    >>> updates, state = tx.update(grads, state)
    >>> round(float(updates["w"][0, 0]), 4), round(float(updates["b"][0]), 4)  # first step: g / |g|
    (1.0, 1.0)
  """
  _checks.unit_interval(b1, "b1")
  _checks.unit_interval(b2, "b2")
  _checks.nonnegative(eps, "eps")
  _checks.nonnegative(eps_root, "eps_root")
  block_size = _checks.block_size(block_size, _checks.STATIC_HINT)
  min_8bit_size = _checks.int_at_least(min_8bit_size, 0, "min_8bit_size",
                                        _checks.STATIC_HINT)

  def init_fn(params):
    _checks.real_leaves(params, "scale_by_adam_8bit", _REAL_MOMENTS)
    items, treedef = jax.tree.flatten(params, is_leaf=variable_leaf)
    dims = _checks.batch_dims(batch_dims, params, is_leaf=variable_leaf)
    moments = lambda: treedef.unflatten([
        _zero_moment(p, block_size, min_8bit_size, b) for p, b in zip(items, dims)])
    return ScaleByAdam8bitState(count=jnp.zeros([], jnp.int32), mu=moments(), nu=moments())

  def update_fn(updates, state, params=None):
    del params
    _checks.initialized(state, "scale_by_adam_8bit")
    updates = _checks.number_leaves_as_arrays(updates)
    _checks.floating_leaves(updates, "scale_by_adam_8bit")
    _checks.real_leaves(updates, "scale_by_adam_8bit", _REAL_MOMENTS)
    _checks.state_fits(init_fn, state, updates, "scale_by_adam_8bit")
    treedef = jax.tree.structure(updates)
    mu_q, nu_q = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
    mu = treedef.unflatten([load(m, True) for m in mu_q])
    nu = treedef.unflatten([load(v, False) for v in nu_q])
    # From here to the update, optax.scale_by_adam's own steps on float32 moments: where
    # the state and the gradient are float32 this is optax, operation for operation.  A
    # bf16 gradient is cast first: (1 - b1) g and (1 - b2) g^2 in bf16 would round every
    # increment to 8 bits of mantissa (bitsandbytes too upcasts g).
    g32 = jax.tree.map(lambda g: g.astype(jnp.float32), updates)
    mu = optax.tree.update_moment(g32, mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(g32, nu, b2, 2)
    # bitsandbytes' rule for a non-finite gradient entry of an 8-bit moment: its moments
    # restart from 0 and it takes no step.  Stored as they come, inf saturated at 2^126 in
    # both moments and surfaced hundreds of steps later as a step of about 1e8.
    kept = treedef.unflatten([
        jnp.isfinite(g) if is_quantized(m) else None for g, m in zip(jax.tree.leaves(g32), mu_q)])
    mu, nu = (jax.tree.map(_finite_or_zero, kept, m, is_leaf=_none) for m in (mu, nu))
    count_inc = optax.safe_increment(state.count)
    mu_hat = optax.tree.bias_correction(mu, b1, count_inc)
    nu_hat = optax.tree.bias_correction(nu, b2, count_inc)
    updates = jax.tree.map(
        lambda m, v, g: (m / (jnp.sqrt(v + eps_root) + eps)).astype(g.dtype),
        mu_hat, nu_hat, updates)
    updates = jax.tree.map(_finite_or_zero, kept, updates, is_leaf=_none)
    return updates, ScaleByAdam8bitState(
        count=count_inc,
        mu=treedef.unflatten(
            [store(m, old, True) for m, old in zip(treedef.flatten_up_to(mu), mu_q)]),
        nu=treedef.unflatten(
            [store(v, old, False) for v, old in zip(treedef.flatten_up_to(nu), nu_q)]),
    )

  return optax.GradientTransformation(init_fn, on_values(update_fn))


def adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 1e-4,
    mask: Any | Callable[[Any], Any] | None = None,
    *,
    block_size: int = quantization.BLOCK_SIZE,
    min_8bit_size: int = 4096,
    batch_dims: Any = 0,
) -> optax.GradientTransformation:
  r"""AdamW with 8-bit optimizer state: ``optax.adamw`` with :func:`scale_by_adam_8bit`
  in place of ``optax.scale_by_adam``.

  .. math::
    \theta_t = \theta_{t-1} - \eta_t\,(u_t + \lambda\,\theta_{t-1})

  with :math:`u_t` of :func:`scale_by_adam_8bit`; built as
  ``optax.chain(scale_by_adam_8bit(...), optax.add_decayed_weights(weight_decay, mask),
  optax.scale_by_learning_rate(learning_rate))``.  ``weight_decay`` defaults to optax's
  1e-4 (bitsandbytes' ``AdamW8bit``: 1e-2).

  Args:
    learning_rate: a float or an optax schedule.
    b1, b2, eps, eps_root: as in ``optax.adamw``.
    weight_decay, mask: decoupled weight decay and which leaves it applies to.
    block_size, min_8bit_size, batch_dims: as in :func:`scale_by_adam_8bit`.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import galore_jax as gj
    >>> w = jnp.zeros((64, 128))                   # 8192 entries: 8-bit moments
    >>> target = jax.random.normal(jax.random.key(0), w.shape)
    >>> loss = lambda w: jnp.mean((w - target) ** 2)
    >>> tx = gj.adamw_8bit(0.05, weight_decay=0.0)
    >>> state = tx.init(w)
    >>> for _ in range(50):
    ...   updates, state = tx.update(jax.grad(loss)(w), state, w)
    ...   w = optax.apply_updates(w, updates)
    >>> bool(loss(w) < 0.05 * loss(jnp.zeros_like(w)))
    True
  """
  return optax.chain(
      scale_by_adam_8bit(b1, b2, eps, eps_root, block_size=block_size,
                         min_8bit_size=min_8bit_size, batch_dims=batch_dims),
      _checks.decayed_weights(weight_decay, mask, "mask"),
      optax.scale_by_learning_rate(_checks.learning_rate(learning_rate)),
  )

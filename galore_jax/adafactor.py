r"""Adafactor's scaling as a gradient-only optax transform, in the reference's order.

Shazeer and Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory Cost
<https://arxiv.org/abs/1804.04235>`_, 2018, as implemented by Hugging Face ``transformers``
and galore-torch's ``GaLoreAdafactor``.  For a gradient leaf :math:`G` (a stack of matrices
over its two trailing axes; leading axes are batch axes, each matrix its own Adafactor), with
:math:`t` = count + 1, :math:`\hat\beta_{2,t} = 1 - t^{-c}` (:math:`c` = ``decay_rate``) and
:math:`S = G \odot G + \epsilon_1`:

.. math::
  R_t = \hat\beta_{2,t} R_{t-1} + (1-\hat\beta_{2,t})\,\operatorname{mean}_{\text{cols}} S,
  \qquad
  C_t = \hat\beta_{2,t} C_{t-1} + (1-\hat\beta_{2,t})\,\operatorname{mean}_{\text{rows}} S \\
  U = G \big/ \sqrt{R_t C_t^\top / \operatorname{mean}(R_t)}, \qquad
  U \leftarrow U / \max\!\big(1, \operatorname{RMS}(U)/d\big) \\
  U \leftarrow \eta_t\, U, \qquad
  M_t = \beta_1 M_{t-1} + (1-\beta_1)\, U,\;\; U \leftarrow M_t

A leaf with fewer than two axes keeps a full :math:`V_t` (same recurrence on :math:`S`,
:math:`U = G/\sqrt{V_t}`).  ``batch_dims`` names a leaf's leading batch axes explicitly (a
scanned model stacks its layers' weights, norms included, along one): the tensor is then
the rest, factored when it has two axes or more, its RMS taken over it alone.
The learning rate :math:`\eta_t` is multiplied in after the
clipping and *before* the first moment, as the reference does: with a schedule the first
moment averages already-scaled steps.  Unlike ``optax.scale_by_factored_rms`` (which needs the
params, factors the two largest axes of a leaf and only when both reach 128), every matrix is
factored and nothing but the gradients is read, so the transform runs inside
:func:`galore_jax.galore_projection` on low-rank coefficients.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from galore_jax import _checks
from galore_jax._explicit import sharding_of
from galore_jax._explicit import zeros
from galore_jax.flax_metadata import in_variable
from galore_jax.flax_metadata import is_variable
from galore_jax.flax_metadata import variable_leaf


class ScaleByFactoredRmsState(NamedTuple):
  """State of Adafactor's factored second moment; the statistics are float32 whatever the
  leaves' dtype (as the reference, which upcasts; a matrix's are two vectors).

  Attributes:
    count: int32 number of updates taken.
    v_row: per leaf, the row statistics ``(*batch, m)`` of a matrix (mean over its last
      axis); for a leaf with fewer than two axes, its full second moment.
    v_col: per leaf, the column statistics ``(*batch, n)``; ``(*batch, 1)`` zeros for a
      leaf that is not factored (``(1,)`` without batch axes).

  Example:
    >>> import jax.numpy as jnp
    >>> import galore_jax as gj
    >>> state = gj.scale_by_adafactor(1e-2).init({"w": jnp.zeros((6, 4)), "b": jnp.zeros(8)})
    >>> rms = state[0]
    >>> rms.v_row["w"].shape, rms.v_col["w"].shape, rms.v_row["b"].shape, rms.v_col["b"].shape
    ((6,), (4,), (8,), (1,))
  """

  count: jax.Array
  v_row: Any
  v_col: Any


# (optax 0.2.8 has no message of its own for this)
NO_PARAMS = ("this transform reads the params (Adafactor's parameter scale, its weight"
             " decay): call update(updates, state, params).")


def _ndim(x) -> int:
  return jnp.ndim(jax.tree.leaves(x)[0] if is_variable(x) else x)


def leaf_batch_dims(batch_dims: Any, tree: Any) -> list[int]:
  """Per leaf of ``tree`` (Flax variables as leaves), its leading batch axes:
  ``batch_dims`` resolved as :func:`scale_by_adafactor` documents (``None``: all but a
  leaf's last two axes).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import adafactor
    >>> tree = {"norms": jnp.zeros((4, 8)), "w": jnp.zeros((4, 8, 2))}
    >>> adafactor.leaf_batch_dims(None, tree), adafactor.leaf_batch_dims(1, tree)
    ([0, 1], [1, 1])
  """
  if batch_dims is None:
    return [max(_ndim(x) - 2, 0) for x in jax.tree.leaves(tree, is_leaf=variable_leaf)]
  return _checks.batch_dims(batch_dims, tree, is_leaf=variable_leaf)


def _zeros_without(item, axis: int | None, batch_dims: int = 0):
  """Float32 zeros shaped (and, under a mesh, sharded) like the array or Flax variable
  ``item`` with ``axis`` reduced (``None``: a ``(*batch, 1)`` placeholder, replicated); a
  variable keeps its metadata with that axis dropped from its spec, so that
  ``nnx.Optimizer`` shards the statistic by it."""
  x = jax.tree.leaves(item)[0] if is_variable(item) else item
  if axis is None:
    placeholder = jnp.zeros(x.shape[:batch_dims] + (1,), jnp.float32)
    return in_variable(item, placeholder, lambda spec: (None,) * (batch_dims + 1))

  def drop(entries):  # a spec (padded to the rank) or the shape, without ``axis``
    entries = list(entries) + [None] * (x.ndim - len(entries))
    del entries[axis]
    return tuple(entries)

  # The statistic keeps the param's sharding on its other axes (as state_shardings says),
  # under Auto axes too, where an eager zeros_like of an abstract value was replicated.
  like = sharding_of(x)
  z = zeros(drop(x.shape), jnp.float32, like, None if like is None else P(*drop(like.spec)))
  return in_variable(item, z, drop)


def _scale_leaf(g, v_row, v_col, beta, eps, factored):
  """One leaf's scaled gradient and new statistics (float32 inside); ``factored``: its
  trailing two axes are a factored matrix."""
  g32 = g.astype(jnp.float32)
  sq = g32 * g32 + eps
  if not factored:
    v = beta * v_row + (1.0 - beta) * sq
    return (g32 * jax.lax.rsqrt(v)).astype(g.dtype), v.astype(v_row.dtype), v_col
  row = beta * v_row + (1.0 - beta) * jnp.mean(sq, axis=-1)
  col = beta * v_col + (1.0 - beta) * jnp.mean(sq, axis=-2)
  row_factor = jax.lax.rsqrt(row / jnp.mean(row, axis=-1, keepdims=True))
  u = g32 * row_factor[..., :, None] * jax.lax.rsqrt(col)[..., None, :]
  return u.astype(g.dtype), row.astype(v_row.dtype), col.astype(v_col.dtype)


# Cast to the real statistics, a complex gradient lost its imaginary part without a word.
_REAL_STATISTICS = ("its row and column statistics are real (float32): give complex leaves"
                    " optax.adam instead (optax.multi_transform).")


def _factored_rms(decay_rate, eps, factored, batch_dims) -> optax.GradientTransformation:
  """The factored second moment (the first two lines of the module's equations)."""

  def factors(tree):
    """Per leaf: its batch axes, and whether it is factored (two axes or more after them)."""
    dims = leaf_batch_dims(batch_dims, tree)
    return dims, [factored and _ndim(x) - b >= 2
                  for x, b in zip(jax.tree.leaves(tree, is_leaf=variable_leaf), dims)]

  def init_fn(params):
    params = _checks.number_leaves_as_arrays(params)
    _checks.real_leaves(params, "scale_by_adafactor", _REAL_STATISTICS)
    items, treedef = jax.tree.flatten(params, is_leaf=variable_leaf)
    dims, flags = factors(params)
    rows = [_zeros_without(p, -1) if f else jax.tree.map(
        lambda x: jnp.zeros_like(x, jnp.float32), p) for p, f in zip(items, flags)]
    cols = [_zeros_without(p, -2 if f else None, b) for p, f, b in zip(items, flags, dims)]
    return ScaleByFactoredRmsState(count=jnp.zeros([], jnp.int32),
                                   v_row=treedef.unflatten(rows), v_col=treedef.unflatten(cols))

  def update_fn(updates, state, params=None):
    del params
    t = optax.safe_increment(state.count).astype(jnp.float32)
    beta = 1.0 - t ** (-jnp.asarray(decay_rate, jnp.float32))
    updates = _checks.number_leaves_as_arrays(updates)
    _checks.floating_leaves(updates, "scale_by_adafactor")
    _checks.real_leaves(updates, "scale_by_adafactor", _REAL_STATISTICS)
    treedef = jax.tree.structure(updates)
    out = [_scale_leaf(g, r, c, beta, eps, f) for g, r, c, f in zip(
        treedef.flatten_up_to(updates), treedef.flatten_up_to(state.v_row),
        treedef.flatten_up_to(state.v_col), factors(updates)[1])]
    pick = lambda k: treedef.unflatten([o[k] for o in out])
    return pick(0), ScaleByFactoredRmsState(
        optax.safe_increment(state.count), v_row=pick(1), v_col=pick(2))

  return optax.GradientTransformation(init_fn, update_fn)


def _clip_by_matrix_rms(threshold, batch_dims) -> optax.GradientTransformation:
  """``U / max(1, RMS(U) / threshold)``, the RMS over each tensor: a leaf's axes after its
  batch axes (by default its two trailing axes; a whole leaf of fewer axes).  For 2-D
  leaves this is ``optax.clip_by_block_rms``."""

  def clip(u, b):
    u32 = u.astype(jnp.float32)
    rms = jnp.sqrt(jnp.mean(u32 * u32, axis=tuple(range(b, u.ndim)), keepdims=True))
    return (u32 / jnp.maximum(1.0, rms / threshold)).astype(u.dtype)

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    dims = leaf_batch_dims(batch_dims, updates)
    return treedef.unflatten([clip(u, b) for u, b in zip(leaves, dims)]), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _step_size(learning_rate) -> optax.GradientTransformationExtraArgs:
  """Multiplies by :math:`\\eta_t` (a float or a schedule of the count) and, when the extra
  argument ``param_scale`` (a tree of per-leaf scalars, :func:`with_param_scale`) is given,
  by each leaf's scale."""
  _checks.learning_rate(learning_rate)

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, param_scale=None, **extra_args):
    del params, extra_args
    eta = learning_rate(state.count) if callable(learning_rate) else learning_rate
    eta = jnp.asarray(eta, jnp.float32)
    if param_scale is None:
      updates = jax.tree.map(lambda u: (u * eta).astype(u.dtype), updates)
    else:  # a scale per tensor of a stack: (*batch,), broadcast over each tensor's axes
      scaled = lambda u, s: (u * (eta * s).reshape(s.shape + (1,) * (u.ndim - s.ndim)))
      updates = jax.tree.map(lambda u, s: scaled(u, s).astype(u.dtype), updates, param_scale)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_decay_rate(decay_rate):
  if not _checks.is_array(decay_rate) and not (
      _checks.finite_real(decay_rate) and decay_rate > 0):
    raise ValueError(
        f"decay_rate must be a finite number > 0 (beta2_t = 1 - t**-decay_rate; the"
        f" reference's decay_rate=-0.8 is 0.8 here), got {_checks.got(decay_rate)}.")
  return decay_rate


def scale_by_adafactor(
    learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    b1: float | None = None,
    decay_rate: float = 0.8,
    eps: float = 1e-30,
    clip_threshold: float | None = 1.0,
    factored: bool = True,
    mu_dtype: Any | None = None,
    batch_dims: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adafactor's scaling, gradient-only, in the order of the module's equations.

  ``chain(factored second moment, clip the update RMS per matrix, multiply by the
  learning rate, optax.ema(b1, debias=False))``: the update is the descent direction
  (no sign flip), like ``optax.scale_by_adam``.  Runs as the inner transform of
  :func:`galore_jax.galore_projection` (it never reads ``params``).  Its statistics are
  real: a complex leaf is refused in one line.

  Args:
    learning_rate: :math:`\eta_t`, a float or a schedule, multiplied in after the clipping
      and before the first moment (the reference's order; with a schedule and ``b1`` this
      differs from scaling afterwards).  ``None``: no scaling here (apply it after).
    b1: the first moment's decay :math:`\beta_1` (``optax.ema`` without debiasing), or
      ``None`` for none.
    decay_rate: :math:`c` in :math:`\hat\beta_{2,t} = 1 - t^{-c}`, > 0 (the reference's
      ``decay_rate=-0.8`` is ``0.8`` here, as in optax).
    eps: :math:`\epsilon_1`, added to the squared gradient.
    clip_threshold: :math:`d`; ``None`` disables the clipping.
    factored: ``False`` keeps a full second moment for every leaf.
    mu_dtype: dtype of the first moment; default the updates'.
    batch_dims: a leaf's leading axes that index separate tensors (a scanned model's layer
      axis: 1), each factored (when it has two axes or more) and clipped on its own: an
      int, a tree of ints with the params' structure or a function of the params giving
      one (evaluated on the updates too); inside :func:`galore_jax.galore_projection`
      they count the coefficients' axes.  ``None``: all but each leaf's last two axes.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; the extra argument ``param_scale`` (a
    tree of per-leaf scalars) multiplies the learning rate per leaf
    (:func:`with_param_scale`).

  Example:
    >>> import jax.numpy as jnp
    >>> import galore_jax as gj
    >>> tx = gj.scale_by_adafactor(0.1)
    >>> g = {"w": jnp.array([[1.0, 2.0], [4.0, 8.0]])}
    >>> state = tx.init(g)
    >>> state[0].v_row["w"].shape, state[0].v_col["w"].shape
    ((2,), (2,))
    >>> u, state = tx.update(g, state)
    >>> bool(jnp.allclose(u["w"], 0.1))    # rank-1 G: V = G * G exactly, U = 0.1 sign(G)
    True
  """
  if b1 is not None:
    _checks.unit_interval(b1, "b1")
  mu_dtype = _checks.float_dtype(mu_dtype, "mu_dtype")  # (with b1 None too, as galore_adamw)
  factored = _checks.flag(factored, "factored")
  _checks.positive(eps, "eps")  # (0 makes a zero gradient's update 0 / 0)
  steps = [_factored_rms(_check_decay_rate(decay_rate), eps, factored, batch_dims)]
  if clip_threshold is not None:
    steps.append(
        _clip_by_matrix_rms(_checks.positive(clip_threshold, "clip_threshold"), batch_dims))
  if learning_rate is not None:
    steps.append(_step_size(learning_rate))
  if b1 is not None:
    steps.append(optax.ema(b1, debias=False, accumulator_dtype=mu_dtype))
  chain = optax.chain(*steps)
  want = _STEP_STATES[:1] + tuple(
      t for t, on in zip(_STEP_STATES[1:], (clip_threshold, learning_rate, b1)) if on is not None)

  def update_fn(updates, state, params=None, **extra_args):
    # A state made with the other b1, clip_threshold or learning_rate (None or set) has a step
    # more or less: say so here, not with optax's "The number of updates and states has to
    # be the same in chain!".
    ema = state[-1] if isinstance(state, tuple) and state else None
    _checks.check_config(
        ema if isinstance(ema, optax.EmaState) else None, None if b1 is None else True,
        "ema", "scale_by_adafactor",
        f"was it made with {'b1 set (a first moment)' if b1 is None else 'b1=None'}?")
    held = tuple(map(type, state)) if isinstance(state, tuple) else (type(state),)
    if held != want:
      raise ValueError(
          f"scale_by_adafactor: the state holds the steps ({_step_names(held)}), this"
          f" transform chains ({_step_names(want)}): was it made with clip_threshold or"
          " learning_rate None where this one sets it, or the reverse?")
    _checks.state_fits(chain.init, state, updates, "scale_by_adafactor")
    return chain.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(chain.init, update_fn)


# The state of each step scale_by_adafactor may chain, in order, and what it is called.
_STEP_STATES = (ScaleByFactoredRmsState, optax.EmptyState, optax.ScaleByScheduleState,
                optax.EmaState)
_STEP_NAMES = ("second moment", "clipping", "step size", "first moment")


def _step_names(states: tuple[type, ...]) -> str:
  name = dict(zip(_STEP_STATES, _STEP_NAMES))
  return ", ".join(name.get(t, t.__name__) for t in states)


def relative_step(warmup_init: bool = False) -> optax.Schedule:
  r"""Adafactor's relative step size as a schedule of the count (``relative_step=True``
  in the reference): :math:`\eta_t = \min(10^{-2}, 1/\sqrt{t})`, or
  :math:`\min(10^{-6} t, 1/\sqrt{t})` with ``warmup_init``, where :math:`t` = count + 1.

  Example:
    >>> from galore_jax import adafactor
    >>> [round(float(adafactor.relative_step()(c)), 4) for c in (0, 20_000)]
    [0.01, 0.0071]
    >>> round(float(adafactor.relative_step(warmup_init=True)(9)), 9)     # 1e-6 * 10
    1e-05
  """
  warmup_init = _checks.flag(warmup_init, "warmup_init")

  def schedule(count):
    t = jnp.asarray(count, jnp.float32) + 1.0
    cap = 1e-6 * t if warmup_init else 1e-2
    return jnp.minimum(cap, jax.lax.rsqrt(t))

  return schedule


def with_param_scale(
    tx: optax.GradientTransformation, eps: float = 1e-3, batch_dims: Any = 0,
    batch_axes: Callable[[Any], list] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Calls ``tx`` with the extra argument ``param_scale``: per leaf of the params,
  :math:`\max(\epsilon_2, \operatorname{RMS}(\theta))` of the whole (full-rank) weights
  before the update (the reference's ``scale_parameter=True``); per tensor of a stack,
  shaped ``(*batch,)``, with ``batch_dims`` (as :func:`galore_jax._checks.batch_dims`), or
  with ``batch_axes(params)``: per leaf, the axes (any, in the order the inner transform's
  leaf carries them) that index its tensors.  The same scales go along as
  ``param_scale_like_params``, shaped to broadcast to each param (size 1 but on those
  axes), for :func:`add_step_size_decay`, which scales the params themselves.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import galore_jax as gj
    >>> from galore_jax import adafactor
    >>> tx = adafactor.with_param_scale(gj.scale_by_adafactor(1.0, clip_threshold=None))
    >>> p = {"w": jnp.full((2, 2), 3.0), "b": jnp.zeros(2)}
    >>> u, _ = tx.update(p, tx.init(p), p)
    >>> u["w"].tolist(), u["b"].tolist()       # G / sqrt(V) = 1, times RMS(w) = 3; 0 / eps
    ([[3.0, 3.0], [3.0, 3.0]], [0.0, 0.0])
  """
  _checks.positive(eps, "eps")
  tx = optax.with_extra_args_support(tx)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(NO_PARAMS)
    params = _checks.number_leaves_as_arrays(params)
    leaves, treedef = jax.tree.flatten(params)
    axes = (batch_axes(params) if batch_axes is not None else
            [tuple(range(b)) for b in _checks.batch_dims(batch_dims, params)])
    rms = [jnp.maximum(eps, _rms_over_tensors(p, a)) for p, a in zip(leaves, axes)]
    scales = treedef.unflatten([_in_axis_order(r, a) for r, a in zip(rms, axes)])
    return tx.update(updates, state, params, param_scale=scales,
                     param_scale_like_params=treedef.unflatten(rms), **extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def _rms_over_tensors(p: jax.Array, batch: tuple[int, ...]) -> jax.Array:
  """RMS of ``p`` over all axes but ``batch``, those kept as size 1 (it broadcasts to ``p``)."""
  return jnp.sqrt(jnp.mean(jnp.square(p.astype(jnp.float32)), keepdims=True,
                           axis=tuple(a for a in range(p.ndim) if a not in batch)))


def _in_axis_order(r: jax.Array, batch: tuple[int, ...]) -> jax.Array:
  """``r`` (size 1 but on ``batch``) shaped ``(r.shape[a] for a in batch)``, in that order."""
  kept = sorted(batch)
  return jnp.transpose(r.reshape([r.shape[a] for a in kept]), [kept.index(a) for a in batch])


def add_step_size_decay(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    mask: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adafactor's weight decay: adds :math:`\lambda\, \eta_t\, s\, \theta` to the updates,
  with the same step size :math:`\eta_t` (times the leaf's param scale :math:`s` when
  :func:`with_param_scale` gives it, else 1) as the update, before the sign flip.  The
  scale is read from the extra argument ``param_scale_like_params`` (shaped to broadcast
  to each param, so a stack's tensors need not lead), else ``param_scale`` (per tensor of
  a stack whose axes lead).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import adafactor
    >>> tx = adafactor.add_step_size_decay(0.5, 0.1)
    >>> p = {"w": jnp.ones(2)}
    >>> u, _ = tx.update({"w": jnp.zeros(2)}, tx.init(p), p)
    >>> u["w"].tolist()
    [0.05000000074505806, 0.05000000074505806]
  """
  _checks.nonnegative(weight_decay, "weight_decay")
  step = _step_size(learning_rate)

  def update_fn(updates, state, params=None, *, param_scale_like_params=None, **extra_args):
    if params is None:
      raise ValueError(NO_PARAMS)
    if isinstance(weight_decay, numbers.Real) and weight_decay == 0.0:
      return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))
    decay = jax.tree.map(lambda p: weight_decay * p, params)
    if param_scale_like_params is not None:
      decay = jax.tree.map(lambda d, s: d * s, decay, param_scale_like_params)
      extra_args = {k: v for k, v in extra_args.items() if k != "param_scale"}
    decay, state = step.update(decay, state, **extra_args)
    return jax.tree.map(lambda u, d: (u + d).astype(u.dtype), updates, decay), state

  tx = optax.GradientTransformationExtraArgs(step.init, update_fn)
  if mask is None:
    return tx
  masked = optax.masked(tx, mask, mask_compatible_extra_args=True)

  def init_fn(params):
    _checks.mask_fits(mask, params, "weight_decay_mask")
    return masked.init(params)

  return optax.GradientTransformationExtraArgs(init_fn, masked.update)

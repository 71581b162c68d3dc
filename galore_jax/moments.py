r"""What a refresh does to the inner transform's state (``on_refresh``).

When a leaf's basis changes, the inner state's coefficient-shaped moments are expressed in
the old basis.  ``"keep"`` leaves them (the paper), ``"reset"`` re-initialises them, and
``"transport"`` carries Adam's moments into the new basis as LDAdam does: with the change of
basis :math:`Q_L = P_{new}^\top P_{old}` (left), :math:`Q_R = Q_{new}^\top Q_{old}` (right),
:math:`T(X) = Q_L X Q_R^\top` (a missing side is the identity), Adam's count :math:`t` and
its bias-corrected moments :math:`\hat m = \mu/(1-\beta_1^t)`,
:math:`\hat v = \nu/(1-\beta_2^t)`:

.. math::
  \mu' = T(\mu),\qquad
  \nu' = (1-\beta_2^t)\,\big|\,T_{\circ 2}(\hat v - \hat m^2) + T(\hat m)^2\big|

where :math:`T_{\circ 2}` uses the element-wise squares :math:`Q\circ Q` (once): each
coordinate's variance is carried as a variance, its mean as a mean, and the absolute value
keeps :math:`\nu \ge 0`.  :func:`galore_jax.scale_by_ldadam` applies the same transport
every step.

8-bit Adam states (:class:`galore_jax.ScaleByAdam8bitState`) get the same treatment:
``"reset"`` re-initialises a leaf's quantized moments (codes and absmax), ``"transport"``
dequantizes them, transports and quantizes again.

A leaf that stacks matrices (a scanned model's layers) may be refreshed in part, where the
non-finite guard kept some layers' bases (``galore_jax.guard``): its flag is then one per
matrix, and only the matrices refreshed are reset or transported.  The state arrays lead
with the stack's axes (Adam's and Adafactor's moments, 8-bit codes, an absmax with
``batch_dims``); a flat absmax follows the matrices when each holds whole blocks, else (its
blocks straddle two layers) the moment is chosen matrix by matrix dequantized and quantized
again: a kept matrix's values in a block it shares move by the 8-bit map's rounding.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from galore_jax import _checks
from galore_jax import adam8bit
from galore_jax import quantization
from galore_jax._explicit import einsum
from galore_jax._explicit import typed_spec
from galore_jax._linalg import HIGHEST

ON_REFRESH = ("keep", "reset", "transport")

_NO_TRANSPORT = (
    "on_refresh='transport' needs an Adam-shaped inner state (an"
    " optax.ScaleByAdamState or galore_jax.ScaleByAdam8bitState with coefficient-shaped"
    " mu and nu, e.g. optax.scale_by_adam, optax.adam or galore_jax.scale_by_adam_8bit"
    " inside inner); this inner transform has no known transport: use on_refresh='keep'"
    " or 'reset'."
)


def change_of_basis(new: jax.Array | None, old: jax.Array | None) -> jax.Array | None:
  """``new^T old`` for column bases ``(*batch, d, r)``: the ``r x r`` matrix taking
  coefficients in the old basis to coefficients in the new one (float32).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import moments
    >>> moments.change_of_basis(jnp.eye(3)[:, :2], jnp.eye(3)[:, 1:]).tolist()
    [[0.0, 0.0], [1.0, 0.0]]
  """
  if new is None:
    return None
  return einsum(
      "...dr,...ds->...rs", new.astype(jnp.float32), old.astype(jnp.float32),
      precision=HIGHEST, preferred_element_type=jnp.float32,
  )


def _apply_sides(x, q_left, q_right):
  """``q_left @ x @ q_right^T`` on the trailing two axes (a side that is ``None`` is
  left alone), float32, in ``x``'s layout (its rank axis may be sharded)."""
  keep = typed_spec(x)
  if q_left is not None:
    x = einsum("...ij,...jn->...in", q_left, x, precision=HIGHEST,
               preferred_element_type=jnp.float32, out_spec=keep)
  if q_right is not None:
    x = einsum("...mj,...ij->...mi", x, q_right, precision=HIGHEST,
               preferred_element_type=jnp.float32, out_spec=keep)
  return x


def _square(q):
  return None if q is None else q * q


def transport_adam(mu, nu, q_left, q_right, count, b1, b2):
  r"""LDAdam's projection-aware transport of Adam moments (float32 in and out); the
  formula is in the module docstring, :math:`t` = ``count``.  The caller keeps the old
  moments where ``count == 0`` (nothing to transport).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import moments
    >>> q = jnp.array([[0.0, 1.0], [1.0, 0.0]])      # the new basis swaps the old one's columns
    >>> mu, nu = jnp.array([[1.0, 2.0]]), jnp.array([[3.0, 4.0]])
    >>> new_mu, new_nu = moments.transport_adam(mu, nu, None, q, 1, 0.9, 0.99)
    >>> new_mu.tolist(), [round(v, 4) for v in new_nu[0].tolist()]
    ([[2.0, 1.0]], [4.0, 3.0])
  """
  t = jnp.asarray(count)
  bc1 = 1.0 - jnp.asarray(b1, jnp.float32) ** t
  bc2 = 1.0 - jnp.asarray(b2, jnp.float32) ** t
  bc1 = jnp.where(t > 0, bc1, 1.0)  # count == 0: moments are zero, no division by 0
  bc2 = jnp.where(t > 0, bc2, 1.0)
  mu = mu.astype(jnp.float32)
  nu = nu.astype(jnp.float32)
  new_mu = _apply_sides(mu, q_left, q_right)
  m_hat = mu / bc1
  variance = _apply_sides(nu / bc2 - m_hat * m_hat, _square(q_left), _square(q_right))
  new_m_hat = new_mu / bc1
  new_nu = bc2 * jnp.abs(variance + new_m_hat * new_m_hat)
  return new_mu, new_nu


def _is_adam_state(x) -> bool:
  return isinstance(x, optax.ScaleByAdamState)


def _coef_matcher(coeffs):
  """A predicate: is a subtree shaped like the coefficient tree ``coeffs``?"""
  coef_def = jax.tree.structure(coeffs)
  coef_shapes = [jnp.shape(c) for c in jax.tree.leaves(coeffs)]

  def is_coef_tree(x):
    if jax.tree.structure(x) != coef_def:
      return False
    return [jnp.shape(v) for v in jax.tree.leaves(x)] == coef_shapes

  return is_coef_tree


def _is_adam_8bit_state(x) -> bool:
  return isinstance(x, adam8bit.ScaleByAdam8bitState)


def _adam_8bit_matcher(coeffs):
  """A predicate: is a subtree a ``ScaleByAdam8bitState`` whose moments (quantized or
  float32 leaves) stand for the coefficient tree ``coeffs``?"""
  coef_def = jax.tree.structure(coeffs)
  coef_shapes = [tuple(jnp.shape(c)) for c in jax.tree.leaves(coeffs)]

  def fits(moments_tree):
    leaves, tdef = jax.tree.flatten(moments_tree, is_leaf=adam8bit.is_quantized)
    return tdef == coef_def and [adam8bit.moment_shape(m) for m in leaves] == coef_shapes

  return lambda x: _is_adam_8bit_state(x) and fits(x.mu) and fits(x.nu)


def _lead(flag, x):
  """A leaf's refresh flag (a bool, or one per matrix of its stack) laid over the leading
  axes of ``x``, an array of its state; where ``x`` does not lead with the stack's axes,
  whether any matrix refreshed."""
  if jnp.ndim(flag) == 0:
    return flag
  if jnp.shape(x)[:flag.ndim] != flag.shape:
    return jnp.any(flag)
  return flag.reshape(flag.shape + (1,) * (jnp.ndim(x) - flag.ndim))


def _where_tree(flag, new, old, signed: bool):
  """``new`` where ``flag`` (:func:`_lead`), else ``old``, for one leaf's moment: an array or
  a quantized one (``signed``: its map), whose flat absmax (no batch axes) follows the
  matrices when each holds whole blocks; when its blocks straddle two, the moment is chosen
  dequantized and quantized again (a kept matrix's values move by the map's rounding, in the
  blocks it shares with a taken one: elsewhere a block's codes come back as they were)."""
  if not (adam8bit.is_quantized(old) and jnp.ndim(flag)
          and quantization.batch_dims_of(old) < jnp.ndim(flag)):
    return jax.tree.map(lambda a, b: jnp.where(_lead(flag, b), a, b), new, old)
  if math.prod(old.codes.shape[flag.ndim:]) % quantization.block_size_of(old):
    values = [adam8bit.load(m, signed) for m in (new, old)]
    return adam8bit.store(jnp.where(_lead(flag, values[1]), *values), old, signed)
  blocks = flag.shape + (-1,)  # each matrix's blocks
  absmax = jnp.where(flag[..., None], new.absmax.reshape(blocks), old.absmax.reshape(blocks))
  return old._replace(codes=jnp.where(_lead(flag, old.codes), new.codes, old.codes),
                      absmax=absmax.reshape(old.absmax.shape))


def _transportable(inner_state, coeffs) -> int:
  """How many Adam states (``optax.ScaleByAdamState`` with coefficient-shaped moments, or
  :class:`~galore_jax.ScaleByAdam8bitState` standing for them) ``inner_state`` holds."""
  is_coef_tree = _coef_matcher(coeffs)
  is_8bit = _adam_8bit_matcher(coeffs)
  return sum(
      1 for node in jax.tree.leaves(inner_state, is_leaf=_is_adam_state)
      if _is_adam_state(node) and is_coef_tree(node.mu) and is_coef_tree(node.nu)
  ) + sum(map(is_8bit, jax.tree.leaves(inner_state, is_leaf=_is_adam_8bit_state)))


def check(on_refresh: str, inner, transport_betas) -> tuple[Any, Any] | None:
  """Construction-time checks of ``on_refresh`` and ``transport_betas``; returns the
  betas (``None`` unless transporting).  An ``inner`` whose ``init`` needs the real params
  is checked at init instead (:func:`check_init`).

  Example:
    >>> import optax
    >>> import galore_jax as gj
    >>> from galore_jax import moments
    >>> moments.check("transport", optax.scale_by_adam(), (0.9, 0.999))
    (0.9, 0.999)
    >>> moments.check("transport", gj.scale_by_adam_8bit(min_8bit_size=1), (0.9, 0.999))
    (0.9, 0.999)
    >>> moments.check("transport", optax.scale_by_lion(), (0.9, 0.99))
    Traceback (most recent call last):
    ...
    ValueError: on_refresh='transport' needs an Adam-shaped inner state (an optax.ScaleByAdamState or galore_jax.ScaleByAdam8bitState with coefficient-shaped mu and nu, e.g. optax.scale_by_adam, optax.adam or galore_jax.scale_by_adam_8bit inside inner); this inner transform has no known transport: use on_refresh='keep' or 'reset'.
  """
  if on_refresh not in ON_REFRESH:
    raise ValueError(f"on_refresh={on_refresh!r}; expected one of {ON_REFRESH}.")
  if on_refresh != "transport":
    return None
  probe = {"w": jax.ShapeDtypeStruct((2, 2), jnp.float32)}
  try:
    state = jax.eval_shape(inner.init, probe)
  except Exception:  # noqa: BLE001 -- needs the real params: checked at init
    state = None
  if state is not None and _transportable(state, probe) == 0:
    raise ValueError(_NO_TRANSPORT)
  if transport_betas is None:
    raise ValueError(
        "on_refresh='transport' needs transport_betas=(b1, b2), the betas of"
        " the inner Adam (they cannot be read from the transform)."
    )
  return _checks.betas(transport_betas, "transport_betas")


def check_init(on_refresh: str, inner_state, coeffs) -> None:
  """At init: a ``ValueError`` when transporting an inner state that has no Adam moments
  shaped like the coefficient tree ``coeffs``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from galore_jax import moments
    >>> coeffs = {"w": jnp.zeros((4, 2))}
    >>> moments.check_init("transport", optax.scale_by_adam().init(coeffs), coeffs)
  """
  if on_refresh == "transport" and not _transportable(inner_state, coeffs):
    raise ValueError(_NO_TRANSPORT)


def _per_leaf_matcher(coeffs):
  """A predicate: is a subtree per-leaf state of the coefficient tree ``coeffs``, i.e. of its
  structure, whatever the shapes (Adam's moments, Adafactor's row and column statistics)?
  When ``coeffs`` is a single array every array has its structure: then scalars (counters)
  are not taken."""
  coef_def = jax.tree.structure(coeffs)
  single = coef_def.num_nodes == 1

  def is_per_leaf(x):
    return jax.tree.structure(x) == coef_def and not (single and jnp.ndim(x) == 0)

  return is_per_leaf


def _reset(inner_state, fresh_state, coeffs, flags):
  """Replaces, in every per-leaf subtree of ``inner_state`` (moments, statistics), the
  leaves whose flag is set by their freshly initialised values."""
  is_coef_tree = _per_leaf_matcher(coeffs)

  def reset(cur, fresh):
    if not is_coef_tree(cur):
      return cur
    cur_leaves, tdef = jax.tree.flatten(cur)
    fresh_leaves = jax.tree.leaves(fresh)
    out = [
        c if f is False else jnp.where(_lead(f, c), z, c)
        for c, z, f in zip(cur_leaves, fresh_leaves, flags)
    ]
    return jax.tree.unflatten(tdef, out)

  return jax.tree.map(reset, inner_state, fresh_state, is_leaf=is_coef_tree)


def _reset_8bit(inner_state, fresh_state, coeffs, flags):
  """Replaces, in every 8-bit Adam state of ``inner_state`` whose moments stand for
  ``coeffs``, the moments (codes and absmax, or float32) of the leaves whose flag is set
  by their freshly initialised values."""
  is_8bit = _adam_8bit_matcher(coeffs)
  tdef = jax.tree.structure(coeffs)

  def reset_moments(cur, fresh, signed):
    return tdef.unflatten([
        c if f is False else _where_tree(f, z, c, signed)
        for c, z, f in zip(tdef.flatten_up_to(cur), tdef.flatten_up_to(fresh), flags)
    ])

  def reset(node, fresh):
    if not is_8bit(node):
      return node
    return node._replace(mu=reset_moments(node.mu, fresh.mu, True),
                         nu=reset_moments(node.nu, fresh.nu, False))

  return jax.tree.map(reset, inner_state, fresh_state, is_leaf=_is_adam_8bit_state)


def _transported(mu, nu, new, old, count, betas):
  """:func:`transport_adam` of one leaf's float32 moments from its ``old`` bases to its
  ``new`` ones."""
  q_left = change_of_basis(new.left, old.left)
  q_right = change_of_basis(new.right, old.right)
  return transport_adam(mu, nu, q_left, q_right, count, *betas)


def _transport_8bit(inner_state, coeffs, old_bases, new_bases, flags, betas):
  """As :func:`_transport`, for the 8-bit Adam states of ``inner_state``: a flagged leaf's
  moments are dequantized, transported and quantized again."""
  is_8bit = _adam_8bit_matcher(coeffs)
  tdef = jax.tree.structure(coeffs)

  def transport(node):
    if not is_8bit(node):
      return node
    mus, nus = tdef.flatten_up_to(node.mu), tdef.flatten_up_to(node.nu)
    for i, (mu, nu) in enumerate(zip(tuple(mus), tuple(nus))):
      if flags[i] is False:
        continue
      t_mu, t_nu = _transported(adam8bit.load(mu, True), adam8bit.load(nu, False),
                                new_bases[i], old_bases[i], node.count, betas)
      ok = flags[i] & (node.count > 0)
      mus[i] = _where_tree(ok, adam8bit.store(t_mu, mu, True), mu, True)
      nus[i] = _where_tree(ok, adam8bit.store(t_nu, nu, False), nu, False)
    return node._replace(mu=tdef.unflatten(mus), nu=tdef.unflatten(nus))

  return jax.tree.map(transport, inner_state, is_leaf=_is_adam_8bit_state)


def _transport(inner_state, coeffs, old_bases, new_bases, flags, betas):
  """Transports (:func:`transport_adam`), in every Adam state of ``inner_state`` whose
  moments are coefficient-shaped, the moments of the leaves whose flag is set from their
  ``old_bases`` to their ``new_bases``."""
  is_coef_tree = _coef_matcher(coeffs)

  def transport(node):
    if not (_is_adam_state(node) and is_coef_tree(node.mu) and is_coef_tree(node.nu)):
      return node
    mus, tdef = jax.tree.flatten(node.mu)
    nus = jax.tree.leaves(node.nu)
    out_mu, out_nu = [], []
    for i, (mu, nu) in enumerate(zip(mus, nus)):
      if flags[i] is False:
        out_mu.append(mu)
        out_nu.append(nu)
        continue
      t_mu, t_nu = _transported(mu, nu, new_bases[i], old_bases[i], node.count, betas)
      ok = flags[i] & (node.count > 0)
      out_mu.append(jnp.where(_lead(ok, mu), t_mu.astype(mu.dtype), mu))
      out_nu.append(jnp.where(_lead(ok, nu), t_nu.astype(nu.dtype), nu))
    return node._replace(
        mu=jax.tree.unflatten(tdef, out_mu), nu=jax.tree.unflatten(tdef, out_nu)
    )

  return jax.tree.map(transport, inner_state, is_leaf=_is_adam_state)


def on_refresh_update(
    on_refresh: str,
    inner,
    inner_state,
    coeffs,
    old_bases: Sequence[Any],
    new_bases: Sequence[Any],
    refreshed: Sequence[Any],
    betas,
):
  """The inner state after this step's refreshes, before the inner update.

  Args:
    on_refresh: ``"keep"``, ``"reset"`` or ``"transport"``.
    inner: the inner transform (``"reset"`` re-initialises from ``inner.init(coeffs)``).
    inner_state: its state, in the old bases.
    coeffs: the coefficient tree of this step (structure and shapes of the moments).
    old_bases, new_bases: per leaf, the bases before and after the refresh.
    refreshed: per leaf, whether it refreshed (:func:`galore_jax.leaves.refreshed`): a
      bool, or one per matrix of a stacked leaf (only those matrices are reset or
      transported); ``False`` for leaves that are not projected.  A leaf's first refresh
      (no previous basis) transports nothing.
    betas: ``(b1, b2)`` of the inner Adam (``"transport"`` only).

  Returns:
    The adjusted inner state.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from galore_jax import moments
    >>> inner = optax.scale_by_adam()
    >>> coeffs = {"w": jnp.ones((4, 2))}
    >>> _, state = inner.update(coeffs, inner.init(coeffs))
    >>> out = moments.on_refresh_update("reset", inner, state, coeffs, [None], [None],
    ...                                 [jnp.bool_(True)], None)
    >>> float(out.mu["w"].sum()), int(out.count)     # moments reset, count kept
    (0.0, 1)
  """
  flags = [f for f in refreshed if f is not False]
  if on_refresh == "keep" or not flags:
    return inner_state
  if on_refresh == "reset":
    fresh = inner.init(coeffs)
    inner_state = _reset(inner_state, fresh, coeffs, refreshed)
    return _reset_8bit(inner_state, fresh, coeffs, refreshed)
  # Only leaves that had a basis before this refresh have moments to carry.
  had_basis = [
      f if f is False else f & (old.refreshes > 0) for f, old in zip(refreshed, old_bases)]
  return jax.lax.cond(
      jnp.any(jnp.stack([jnp.any(f) for f in had_basis if f is not False])),
      lambda s: _transport_8bit(
          _transport(s, coeffs, old_bases, new_bases, had_basis, betas),
          coeffs, old_bases, new_bases, had_basis, betas),
      lambda s: s,
      inner_state,
  )

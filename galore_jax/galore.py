r"""GaLore: gradient low-rank projection as an Optax combinator.

Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection <https://arxiv.org/abs/2403.03507>`_, ICML 2024.

For a selected leaf with gradient :math:`G_t \in \mathbb{R}^{m\times n}` the
combinator keeps orthonormal bases :math:`P \in \mathbb{R}^{m\times r}` and/or
:math:`Q \in \mathbb{R}^{n\times r}`, refreshed from the top-:math:`r` singular
vectors of the current gradient on the steps the refresh policy picks, and runs
any inner optax transform :math:`\rho` on the low-rank coefficients:

.. math::
  R_t = P^\top G_t \;\;(\text{left}),\quad G_t Q \;\;(\text{right}),\quad
  P^\top G_t Q \;\;(\text{full}) \\
  N_t = \rho(R_t) \\
  \Delta_t = \alpha\, P N_t,\;\; \alpha\, N_t Q^\top,\;\;
  \alpha\, P N_t Q^\top

Leaves that are not selected go through :math:`\rho` at full shape, unscaled.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from galore_jax import projection
from galore_jax import refresh as refresh_lib
from galore_jax import sharding
from galore_jax import subspace
from galore_jax import targets

ON_REFRESH = ("keep", "reset", "transport")
_HIGHEST = jax.lax.Precision.HIGHEST


class GaLoreProjectionState(NamedTuple):
  """State of :func:`galore_projection`.

  Attributes:
    count: int32 number of updates taken; a refresh at step ``t`` sees the
      count before its increment.
    inner_state: state of the inner transform, initialised on the
      coefficient-shaped tree (full shape for leaves that are not projected).
    bases: one entry per leaf of the params, in ``jax.tree.leaves`` order: a
      :class:`galore_jax.subspace.Bases` for a projected leaf, else
      ``optax.MaskedNode()``.  A tuple, not a params-shaped tree, so that no
      param metadata (e.g. a Flax sharding) is copied onto low-rank arrays.
    refresh_state: the refresh policy's state (``None`` for ``every``).
    rng_key: typed PRNG key when ``key`` was given, else ``None``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import galore_jax as gj
    >>> params = {"b": jnp.zeros(4), "w": jnp.zeros((6, 4))}
    >>> state = gj.galore_projection(rank=2).init(params)
    >>> state.bases[0], state.bases[1].right.shape      # "b" is not projected
    (MaskedNode(), (4, 2))
    >>> state.inner_state.mu["w"].shape, int(state.count)
    ((6, 2), 0)
  """

  count: jax.Array
  inner_state: optax.OptState
  bases: tuple[Any, ...]
  refresh_state: Any
  rng_key: jax.Array | None


class _Plan(NamedTuple):
  """Static per-leaf recipe: how the leaf is a matrix and where it is projected."""

  view: projection.MatrixView
  rank: int
  left: bool
  right: bool


def _check_rank(rank: Any, where: str) -> int:
  if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
    raise ValueError(
        f"rank{where} must be an int >= 1, got {rank!r}. (Under"
        " optax.inject_hyperparams pass it in static_args.)"
    )
  return int(rank)


def _typed_key(key: jax.Array | int) -> jax.Array:
  """An int seed or a PRNG key -> a typed PRNG key (what the state stores)."""
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  if isinstance(key, numbers.Integral) and not isinstance(key, bool):
    return jax.random.key(int(key))
  if isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,):
    return jax.random.wrap_key_data(key)  # legacy jax.random.PRNGKey
  raise ValueError(f"key must be an int seed or a jax.random.key, got {key!r}.")


def _plans(tree, mask, dimension_numbers, rank, proj_type) -> list[_Plan | None]:
  """Resolves, leaf by leaf, whether and how ``tree``'s leaves are projected."""
  paths_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  shapes = [jnp.shape(leaf) for _, leaf in paths_leaves]
  where = [jax.tree_util.keystr(path) or "<root>" for path, _ in paths_leaves]

  single_dims = dimension_numbers is None or isinstance(
      dimension_numbers, projection.DimensionNumbers
  )
  dims = targets.per_leaf(dimension_numbers, tree, "dimension_numbers")
  if mask is None:
    if single_dims:
      selected = [len(s) == 2 for s in shapes]
    else:
      selected = [d is not None for d in dims]
  else:
    selected = targets.per_leaf(mask, tree, "mask")
    for sel, w in zip(selected, where):
      if not isinstance(sel, bool) and not (
          hasattr(sel, "dtype") and jnp.shape(sel) == () and sel.dtype == bool
      ):
        raise ValueError(f"mask must hold bools; at {w} it holds {sel!r}.")
    selected = [bool(s) for s in selected]
    if not single_dims:
      selected = [s and d is not None for s, d in zip(selected, dims)]
  ranks = targets.per_leaf(rank, tree, "rank")

  plans = []
  for sel, shape, d, r, w in zip(selected, shapes, dims, ranks, where):
    if not sel:
      plans.append(None)
      continue
    view = projection.matrix_view(shape, d, w)
    r = min(_check_rank(r, f" for {w}"), view.m, view.n)
    left, right = projection.projection_sides(proj_type, view.m, view.n)
    plans.append(_Plan(view, r, left, right))
  return plans


def _param_items(params, num_leaves: int) -> list:
  """The params' leaves with Flax ``Variable`` s kept whole (their metadata holds the
  partition spec), or ``None`` s when the params hold no variables."""
  items = jax.tree.leaves(params, is_leaf=sharding.is_variable)
  if len(items) != num_leaves or not any(sharding.is_variable(x) for x in items):
    return [None] * num_leaves
  return items


def _in_variable(item, value, spec_fn):
  """``value`` in a copy of the param variable ``item`` whose spec metadata is
  ``spec_fn(param spec)``, so that ``nnx.Optimizer`` (and the Flax recipe of sharding
  state by its metadata) gives it its own sharding; ``value`` itself otherwise."""
  if value is None or not sharding.is_variable(item):
    return value
  return sharding.variable_with_spec(item, value, spec_fn)


def _zeros_bases(plan: _Plan, dtype, like=None, item=None) -> subspace.Bases:
  """Zero bases of a leaf; sharded by the rules of :mod:`galore_jax.sharding`
  when the leaf's sharding ``like`` is known, and carrying those rules in their
  metadata when the param is a Flax variable ``item``."""
  batch, m, n, r = plan.view.batch_shape, plan.view.m, plan.view.n, plan.rank
  spec = None if like is None else like.spec

  def zeros(d, side):
    z = sharding.zeros(
        (*batch, d, r), dtype, like, sharding.basis_spec(spec, plan.view, side))
    return _in_variable(item, z, lambda s: sharding.basis_spec(s, plan.view, side))

  return subspace.Bases(
      left=zeros(m, "left") if plan.left else None,
      right=zeros(n, "right") if plan.right else None,
      refreshes=sharding.zeros([], jnp.int32, like, jax.sharding.PartitionSpec()),
  )


def _coefficient_zeros(plan: _Plan, leaf) -> jax.Array:
  like = sharding.sharding_of(leaf)
  shape = projection.coefficient_shape(plan.view, plan.rank, plan.left, plan.right)
  spec = sharding.coefficient_spec(
      None if like is None else like.spec, plan.view, plan.left, plan.right)
  return sharding.zeros(shape, leaf.dtype, like, spec)


def _low_rank_tree(proxy_tree, plans):
  """Gives each projected leaf that sits in a Flax ``Variable`` the coefficient's
  spec in its metadata (``nnx.Optimizer`` copies it onto the optimizer state),
  instead of the param's, whose shape differs."""
  items, treedef = jax.tree.flatten(proxy_tree, is_leaf=sharding.is_variable)
  if not any(sharding.is_variable(x) for x in items):
    return proxy_tree
  out = []
  for item, plan in zip(items, plans):
    if plan is not None and sharding.is_variable(item):
      item = sharding.variable_with_spec(
          item, jax.tree.leaves(item)[0],
          lambda spec, plan=plan: sharding.coefficient_spec(
              spec, plan.view, plan.left, plan.right))
    out.append(item)
  return jax.tree.unflatten(treedef, out)


def _accept(p, q, old: subspace.Bases) -> subspace.Bases:
  """New bases, each matrix kept from ``old`` where its new basis is not finite,
  in the old dtype and (under Explicit axes) the old sharding.  ``refreshes``
  counts the refresh unless every new matrix was rejected."""

  def guarded(new, prev):
    if prev is None:
      return None
    return sharding.place_like(subspace.keep_finite(new, prev).astype(prev.dtype), prev)

  return subspace.Bases(
      guarded(p, old.left), guarded(q, old.right), subspace.count_refresh(old, p, q)
  )


def _groups(indices, plans, alone_from: int | None = None) -> list[list[int]]:
  """Leaves whose matrices share a shape, rank and sides: refreshed as one stack.
  A leaf of at least ``alone_from`` matrices is a stack of its own."""
  groups: dict[tuple, list[int]] = {}
  for i in indices:
    p = plans[i]
    if alone_from is not None and math.prod(p.view.batch_shape) >= alone_from:
      groups[("alone", i)] = [i]
    else:
      groups.setdefault((p.view.m, p.view.n, p.rank, p.left, p.right), []).append(i)
  return list(groups.values())


def _stack(pieces: list[jax.Array]) -> jax.Array:
  """Concatenates ``(..., d, e)`` stacks along one flattened batch axis.  Under
  Explicit axes the pieces are first given the first piece's matrix-axis
  sharding and an unsharded batch axis, so the concatenation type-checks."""
  flat = [x.reshape(-1, *x.shape[-2:]) if x.ndim != 2 else x[None] for x in pieces]
  first = sharding.typed_sharding(flat[0])
  if first is not None and len(flat) > 1:  # (one piece keeps its layer-axis sharding)
    spec = jax.sharding.PartitionSpec(None, *tuple(first.spec)[1:])
    flat = [jax.reshard(x, spec) for x in flat]
  return flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=0)


def _refresh_group(group, mats, plans, bases, method, leaf_key, mesh):
  """New bases of the leaves of ``group`` (see :func:`_groups`), refreshed as one
  stack; under a ``mesh`` the stack is spread over its devices
  (:func:`galore_jax.sharding.spread`).  ``bases`` maps each leaf index of the
  group to its current bases; ``leaf_key(i)`` is leaf ``i``'s PRNG key (or
  ``None``).  Each matrix draws from its own key (``fold_in`` of its leaf's key
  and its index in the leaf), so a basis is the same whichever stack it is in."""
  plan = plans[group[0]]
  sizes = [math.prod(plans[i].view.batch_shape) for i in group]
  g = _stack([mats[i] for i in group])
  prev_l = _stack([bases[i].left for i in group]) if plan.left else None
  prev_r = _stack([bases[i].right for i in group]) if plan.right else None
  refreshes = jnp.max(jnp.stack([bases[i].refreshes for i in group]))
  keys = None
  if method.needs_key:  # raw key data: a plain uint32 stack that spread can pad and shard
    leaf_keys = [leaf_key(i) for i in group]
    impl = jax.random.key_impl(leaf_keys[0])
    keys = jnp.concatenate([
        jax.random.key_data(subspace.matrix_keys(k, (size,)))
        for k, size in zip(leaf_keys, sizes)])

  def compute(g, prev_l, prev_r, keys, refreshes):
    if keys is not None:
      keys = jax.random.wrap_key_data(keys, impl=impl)
    return subspace.compute_bases(
        g, plan.rank, left=plan.left, right=plan.right, method=method,
        prev=subspace.Bases(prev_l, prev_r, refreshes), key=keys)

  p, q = sharding.spread(compute, [g, prev_l, prev_r, keys], mesh, (refreshes,))
  out, start = [], 0
  for i, size in zip(group, sizes):
    batch = plans[i].view.batch_shape

    def piece(x):
      return None if x is None else x[start:start + size].reshape(*batch, *x.shape[-2:])

    out.append(_accept(piece(p), piece(q), bases[i]))
    start += size
  return out


# --------------------------------------------------------------------------------------------
# Projection-aware transport of Adam moments (shared with galore_jax.ldadam)
# --------------------------------------------------------------------------------------------


def _change_of_basis(new: jax.Array | None, old: jax.Array | None) -> jax.Array | None:
  """``new^T old`` for column bases ``(*batch, d, r)``: the ``r x r`` matrix taking
  coefficients in the old basis to coefficients in the new one (float32)."""
  if new is None:
    return None
  return sharding.einsum(
      "...dr,...ds->...rs", new.astype(jnp.float32), old.astype(jnp.float32),
      precision=_HIGHEST, preferred_element_type=jnp.float32,
  )


def _apply_sides(x, q_left, q_right):
  """``q_left @ x @ q_right^T`` on the trailing two axes (a side that is ``None`` is
  left alone), float32."""
  if q_left is not None:
    x = sharding.einsum("...ij,...jn->...in", q_left, x, precision=_HIGHEST,
                   preferred_element_type=jnp.float32)
  if q_right is not None:
    x = sharding.einsum("...mj,...ij->...mi", x, q_right, precision=_HIGHEST,
                   preferred_element_type=jnp.float32)
  return x


def _square(q):
  return None if q is None else q * q


def _transport_adam(mu, nu, q_left, q_right, count, b1, b2):
  r"""LDAdam's projection-aware transport of Adam moments (float32 in and out).

  With :math:`t` = ``count`` > 0 Adam steps taken, :math:`\hat m = \mu/(1-\beta_1^t)`,
  :math:`\hat v = \nu/(1-\beta_2^t)` and :math:`T(X) = Q_L X Q_R^\top` (a missing
  side is the identity):

  .. math::
    \mu' = T(\mu),\qquad
    \nu' = (1-\beta_2^t)\,\big|\,T_{\circ 2}(\hat v - \hat m^2) + T(\hat m)^2\big|

  where :math:`T_{\circ 2}` uses :math:`Q\circ Q` (element-wise squares, once).  The
  caller keeps the old moments where ``count == 0``.
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


def _transportable(inner_state, coeffs) -> int:
  """How many ``optax.ScaleByAdamState`` with coefficient-shaped moments
  ``inner_state`` holds."""
  is_coef_tree = _coef_matcher(coeffs)
  return sum(
      1 for node in jax.tree.leaves(inner_state, is_leaf=_is_adam_state)
      if _is_adam_state(node) and is_coef_tree(node.mu) and is_coef_tree(node.nu)
  )


def _transport_refreshed(inner_state, coeffs, old_bases, new_bases, flags, betas):
  """Transports (:func:`_transport_adam`), in every Adam state of ``inner_state`` whose
  moments are coefficient-shaped, the moments of the leaves whose flag is set from
  their ``old_bases`` to their ``new_bases``."""
  b1, b2 = betas
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
      new, old = new_bases[i], old_bases[i]
      q_left = _change_of_basis(new.left, old.left)
      q_right = _change_of_basis(new.right, old.right)
      t_mu, t_nu = _transport_adam(mu, nu, q_left, q_right, node.count, b1, b2)
      ok = flags[i] & (node.count > 0)
      out_mu.append(jnp.where(ok, t_mu.astype(mu.dtype), mu))
      out_nu.append(jnp.where(ok, t_nu.astype(nu.dtype), nu))
    return node._replace(
        mu=jax.tree.unflatten(tdef, out_mu), nu=jax.tree.unflatten(tdef, out_nu)
    )

  return jax.tree.map(transport, inner_state, is_leaf=_is_adam_state)


def _check_betas(betas) -> tuple[Any, Any]:
  try:
    b1, b2 = betas
  except (TypeError, ValueError):
    raise ValueError(
        f"transport_betas must be a pair (b1, b2), got {betas!r}."
    ) from None
  for name, b in (("b1", b1), ("b2", b2)):
    if isinstance(b, numbers.Real) and not 0.0 <= float(b) < 1.0:
      raise ValueError(f"transport_betas: {name}={b!r} is not in [0, 1).")
  return b1, b2


def _probe_transport(inner) -> None:
  """Construction-time check that ``inner`` has an Adam-shaped state, on a dummy
  param tree (abstractly); inner transforms whose init needs the real params are
  checked at init instead."""
  probe = {"w": jax.ShapeDtypeStruct((2, 2), jnp.float32)}
  try:
    state = jax.eval_shape(inner.init, probe)
  except Exception:  # noqa: BLE001 -- needs the real params: checked at init
    return
  if _transportable(state, probe) == 0:
    raise ValueError(_NO_TRANSPORT)


_NO_TRANSPORT = (
    "on_refresh='transport' needs an Adam-shaped inner state (an"
    " optax.ScaleByAdamState with coefficient-shaped mu and nu, e.g."
    " optax.scale_by_adam or optax.adam inside inner); this inner transform has no"
    " known transport: use on_refresh='keep' or 'reset'."
)


def _reset_refreshed(inner_state, fresh_state, coeffs, flags):
  """Replaces, in every coefficient-shaped subtree of ``inner_state`` (moments),
  the leaves of refreshed params by their freshly initialised values."""
  is_coef_tree = _coef_matcher(coeffs)

  def reset(cur, fresh):
    if not is_coef_tree(cur):
      return cur
    cur_leaves, tdef = jax.tree.flatten(cur)
    fresh_leaves = jax.tree.leaves(fresh)
    out = [
        c if f is False else jnp.where(f, z, c)
        for c, z, f in zip(cur_leaves, fresh_leaves, flags)
    ]
    return jax.tree.unflatten(tdef, out)

  return jax.tree.map(reset, inner_state, fresh_state, is_leaf=is_coef_tree)


def galore_projection(
    inner: optax.GradientTransformation | None = None,
    *,
    rank: int | Any = 128,
    update_proj_gap: int = 200,
    scale: float | jax.Array = 0.25,
    proj_type: str = "std",
    mask: Any | Callable[[Any], Any] | None = None,
    dimension_numbers: Any | Callable[[Any], Any] | None = None,
    refresh: refresh_lib.RefreshPolicy | None = None,
    method: str | subspace.BasisMethod = "svd",
    on_refresh: str = "keep",
    transport_betas: tuple[float, float] | None = None,
    basis_dtype: Any | None = None,
    key: jax.Array | int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``inner`` on low-rank projections of the selected gradients.

  For each selected leaf, viewed as a stack of matrices :math:`G`
  (see ``dimension_numbers``), with bases refreshed when the policy says so:

  .. math::
    R = \operatorname{proj}(G),\qquad
    N, s' = \texttt{inner.update}(R, s, \text{params}=\text{None}),\qquad
    \Delta = \alpha \operatorname{proj}^{-1}(N)

  where ``proj`` is :math:`P^\top G`, :math:`G Q` or :math:`P^\top G Q` by the
  side rule of ``proj_type`` and :math:`\alpha` = ``scale``.  Leaves that are not
  selected pass through ``inner`` unchanged at full shape and unscaled, so one
  chain serves a whole model (embeddings and norms get plain Adam, as in the
  paper).

  A refresh recomputes the bases from an fp32 factorisation of the current
  gradient (``method="svd"``: :math:`P = U_{:, :r}`, :math:`Q = V_{:, :r}`),
  makes every basis vector sign-canonical (largest-magnitude entry positive)
  and keeps the previous basis of any matrix whose new basis is not finite.
  With the default policy ``every(update_proj_gap)`` it happens when
  ``count % update_proj_gap == 0`` (count before the increment: step 0 computes
  the first basis), all leaves together inside one ``lax.cond``, so other
  steps pay nothing for it.

  Args:
    inner: the transform run in the subspace; default ``optax.scale_by_adam()``.
      It sees coefficient-shaped trees and ``params=None``, so it must be
      gradient-only (Adam, Adafactor, Lion, SGD momentum, ...; not ``adamw``).
    rank: ``r``, an int or a per-leaf pytree (prefix) / callable of params;
      clipped to ``min(m, n)``.
    update_proj_gap: ``T`` of the default policy ``every(T)``.
    scale: :math:`\alpha`, applied when projecting back.
    proj_type: ``"std"`` (basis on the smaller side: right if ``m >= n`` else
      left, as galore-torch), ``"reverse_std"`` (the opposite; what
      ``optax.contrib.galore`` does), ``"left"``, ``"right"`` or ``"full"``.
      With ``"full"``, the coefficients :math:`P^\top G Q` of the gradient a
      basis was computed from are diagonal up to round-off, and Adam with a
      tiny ``eps`` turns that round-off into full-size steps (in galore-torch
      too); prefer a larger ``eps`` or a warmup that starts at zero.
    mask: which leaves to project: a bool pytree (or prefix), or a callable of
      params returning one (optax convention; e.g.
      :func:`galore_jax.linear_kernels`).  ``None`` selects every leaf with
      ``ndim == 2`` -- or, when ``dimension_numbers`` is a pytree or callable,
      every leaf whose dimension numbers are not ``None``.
    dimension_numbers: how N-D leaves are matrices: ``None`` (2-D leaves taken
      as given, ``m`` = axis 0), one :class:`~galore_jax.DimensionNumbers` for
      every selected leaf, a pytree of them (``None`` = not a matrix) or a
      callable of params returning one.  With dimension numbers the matrix is
      ``(output, input)``; unnamed axes are batch axes with one basis each.
    refresh: a refresh policy (:func:`galore_jax.every` ...); overrides
      ``update_proj_gap``.
    method: how bases are computed: a name in ``galore_jax.subspace.METHODS``
      (``"svd"``: exact) or a :class:`galore_jax.subspace.BasisMethod`.
    on_refresh: what happens to the inner state of a refreshed leaf: ``"keep"``
      (the paper: moments stay in the old coordinates), ``"reset"`` (its
      coefficient-shaped inner state is re-initialised) or ``"transport"``
      (LDAdam's projection-aware transport, for an Adam-shaped inner state).
      Counters shared by all leaves (Adam's ``count``) are not reset, so with
      ``"reset"`` Adam's bias correction does not restart: right after a reset
      its steps on that leaf are up to about
      :math:`(1-\beta_1)/\sqrt{1-\beta_2} \approx 3` times larger than a
      fresh Adam's until the moments refill.  A leaf whose refresh the
      non-finite guard rejected wholly kept its basis, and keeps its inner
      state under ``"reset"`` too.  With ``"transport"``, every
      ``optax.ScaleByAdamState`` inside the inner state whose moments are
      coefficient-shaped is carried into the new basis.  With the change of
      basis :math:`Q_L = P_{new}^\top P_{old}` (left),
      :math:`Q_R = Q_{new}^\top Q_{old}` (right; both for ``"full"``),
      :math:`T(X) = Q_L X Q_R^\top`, Adam's count :math:`t` and its
      bias-corrected moments :math:`\hat m = \mu/(1-\beta_1^t)`,
      :math:`\hat v = \nu/(1-\beta_2^t)`:

      .. math::
        \mu \leftarrow T(\mu),\qquad
        \nu \leftarrow (1-\beta_2^t)\,\big|\,T_{\circ 2}(\hat v - \hat m^2)
          + T(\hat m)^2\big|

      (:math:`T_{\circ 2}` uses the element-wise squares :math:`Q\circ Q`: each
      coordinate's variance is carried as a variance, its mean as a mean; the
      absolute value keeps :math:`\nu \ge 0`).  A leaf's first refresh (no
      previous basis) transports nothing.  The inner transform's betas cannot
      be read from it: pass them as ``transport_betas``.
    transport_betas: ``(b1, b2)`` of the inner Adam, needed by (and only used
      with) ``on_refresh="transport"``; :func:`galore_adamw` passes its own.
    basis_dtype: dtype the bases are stored in; default each leaf's dtype (as
      galore-torch).  The factorisation itself always runs in float32.
    key: PRNG key (or int seed) kept in the state for randomised methods
      (default seed 0 when the method needs one).  Each leaf's refresh at step
      ``t`` uses ``fold_in(fold_in(key, leaf_index), t)``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; extra args are forwarded to
    ``inner``.  Its state is a :class:`GaLoreProjectionState`.

  Raises:
    ValueError: for ``rank < 1``, ``update_proj_gap < 1``, an unknown
      ``proj_type`` / ``method`` / ``on_refresh``, dimension numbers that do not
      fit a leaf, or a mask / rank / dimension-numbers tree whose structure does
      not match the params; for ``on_refresh="transport"`` without
      ``transport_betas`` or with an inner state that has no Adam moments
      (e.g. ``optax.scale_by_lion()``).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import galore_jax as gj
    >>> params = {"w": jnp.ones((32, 16)), "b": jnp.zeros(16)}
    >>> tx = optax.chain(
    ...     gj.galore_projection(optax.scale_by_adam(), rank=4,
    ...                          update_proj_gap=50, scale=0.25),
    ...     optax.scale_by_learning_rate(1e-2))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(0), p.shape), params)
    >>> updates, state = tx.update(grads, state, params)
    >>> state[0].bases[1].right.shape        # leaf "w": 32 >= 16, right basis 16 x 4
    (16, 4)
    >>> state[0].inner_state.mu["w"].shape   # Adam moments are 32 x 4
    (32, 4)
  """
  if inner is None:
    inner = optax.scale_by_adam()
  inner = optax.with_extra_args_support(inner)
  if not callable(rank) and jax.tree.structure(rank) == jax.tree.structure(0):
    _check_rank(rank, "")  # a single rank: check it now, not at init
  if proj_type not in projection.PROJ_TYPES:
    raise ValueError(
        f"proj_type={proj_type!r} is not one of {projection.PROJ_TYPES}."
    )
  method = subspace.get_method(method)
  if on_refresh not in ON_REFRESH:
    raise ValueError(
        f"on_refresh={on_refresh!r}; expected one of {ON_REFRESH}."
    )
  if on_refresh == "transport":
    if transport_betas is None:
      raise ValueError(
          "on_refresh='transport' needs transport_betas=(b1, b2), the betas of"
          " the inner Adam (they cannot be read from the transform)."
      )
    transport_betas = _check_betas(transport_betas)
    _probe_transport(inner)
  if refresh is None:
    refresh = refresh_lib.every(update_proj_gap)
  elif not isinstance(refresh, refresh_lib.RefreshPolicy):
    raise ValueError(
        "refresh must be a galore_jax refresh policy such as"
        f" galore_jax.every(200), got {refresh!r}."
    )
  if key is None and method.needs_key:
    key = 0  # a fixed default seed keeps runs reproducible
  rng_key = None if key is None else _typed_key(key)

  def plans_for(tree):
    return _plans(tree, mask, dimension_numbers, rank, proj_type)

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    plans = plans_for(params)
    proxies, bases = [], []
    for leaf, plan, item in zip(leaves, plans, _param_items(params, len(leaves))):
      if plan is None:
        proxies.append(leaf)
        bases.append(optax.MaskedNode())
        continue
      proxies.append(_coefficient_zeros(plan, leaf))
      bases.append(_zeros_bases(
          plan, basis_dtype or leaf.dtype, sharding.sharding_of(leaf), item))
    num_projected = sum(p is not None for p in plans)
    proxy_tree = _low_rank_tree(jax.tree.unflatten(treedef, proxies), plans)
    inner_state = inner.init(proxy_tree)
    if on_refresh == "transport" and not _transportable(inner_state, proxy_tree):
      raise ValueError(_NO_TRANSPORT)
    return sharding.on_mesh_of(GaLoreProjectionState(
        count=jnp.zeros([], jnp.int32),
        inner_state=inner_state,
        bases=tuple(bases),
        refresh_state=refresh.init(num_projected),
        rng_key=rng_key,
    ), leaves)

  def update_fn(updates, state, params=None, **extra_args):
    del params  # the inner transform is gradient-only
    leaves, treedef = jax.tree.flatten(updates)
    plans = plans_for(updates)
    if len(state.bases) != len(leaves):
      raise ValueError(
          f"galore_projection state has {len(state.bases)} leaves but the"
          f" updates have {len(leaves)}: was the state made for other params?"
      )
    mats = [
        None if plan is None else projection.to_matrix(leaf, plan.view)
        for leaf, plan in zip(leaves, plans)
    ]
    projected = [i for i, plan in enumerate(plans) if plan is not None]
    due = refresh.due(state.count, state.refresh_state)

    def leaf_key(i):
      # A key per leaf and step, derived (not split) from the stored key: the
      # state never changes and any refresh can be regenerated.
      if not method.needs_key:
        return None
      return jax.random.fold_in(jax.random.fold_in(state.rng_key, i), state.count)

    mesh = sharding.context_mesh(leaves)

    def refresh_group(group, bases):
      return _refresh_group(group, mats, plans, bases, method, leaf_key, mesh)

    if refresh.shared:
      # Under a mesh, same-shaped leaves form one stack that spreads over the devices.
      # With Auto axes their layouts are unknown here, and concatenating leaves laid
      # out differently (a LLaMA's q and o kernels) gathers the whole stack: a leaf
      # with a matrix for every device spreads alone.
      alone = None if mesh is None or sharding.all_explicit(mesh) else mesh.size
      groups = (_groups(projected, plans, alone) if mesh is not None
                else [[i] for i in projected])

      def refresh_all(bases):
        bases = list(bases)
        for group in groups:
          for i, b in zip(group, refresh_group(group, bases)):
            bases[i] = b
        return tuple(bases)

      bases = jax.lax.cond(due, refresh_all, lambda b: b, state.bases)
      leaf_due = {i: due for i in projected}
    else:
      bases = list(state.bases)
      leaf_due = {}
      for j, i in enumerate(projected):
        leaf_due[i] = due[j]
        bases[i] = jax.lax.cond(
            due[j], lambda b, i=i: refresh_group([i], {i: b})[0], lambda b: b, bases[i])
      bases = tuple(bases)

    coeffs = [
        leaf if plan is None
        else projection.project(mat, bases[i].left, bases[i].right)
        for i, (leaf, mat, plan) in enumerate(zip(leaves, mats, plans))
    ]
    coeff_tree = jax.tree.unflatten(treedef, coeffs)

    # The leaves whose refresh took: due, and not wholly rejected by the non-finite guard
    # (such a leaf kept its basis: its moments stay, and lazy must not record similarity 1).
    took = {i: bases[i].refreshes > state.bases[i].refreshes for i in projected}

    inner_state = state.inner_state
    if on_refresh == "reset" and projected:
      flags = [took.get(i, False) for i in range(len(leaves))]
      inner_state = _reset_refreshed(
          inner_state, inner.init(coeff_tree), coeff_tree, flags
      )
    elif on_refresh == "transport" and projected:
      # Only leaves that had a basis before this refresh have moments to carry.
      flags = [
          leaf_due[i] & (state.bases[i].refreshes > 0) if i in leaf_due else False
          for i in range(len(leaves))
      ]
      inner_state = jax.lax.cond(
          jnp.any(jnp.stack([flags[i] for i in projected])),
          lambda s: _transport_refreshed(
              s, coeff_tree, state.bases, bases, flags, transport_betas),
          lambda s: s,
          inner_state,
      )
    inner_updates, inner_state = inner.update(
        coeff_tree, inner_state, None, **extra_args
    )

    out = []
    for i, (leaf, u, plan) in enumerate(
        zip(leaves, jax.tree.leaves(inner_updates), plans)
    ):
      if plan is None:
        out.append(u)
        continue
      # Emitted in the leaf's dtype by the matmul (float32 accumulation): the update
      # leaves in that dtype anyway, and a bf16 model skips a float32 full-size pass.
      full = projection.project_back(
          u, bases[i].left, bases[i].right, out_dtype=leaf.dtype) * scale
      out.append(projection.from_matrix(full, plan.view, leaf).astype(leaf.dtype))

    similarity = jnp.zeros((len(projected),), jnp.float32)
    if refresh.uses_similarity and projected:
      similarity = jnp.stack([
          refresh_lib.basis_similarity(
              *(b.left if b.left is not None else b.right
                for b in (state.bases[i], bases[i])))
          for i in projected
      ])
    refreshed = due  # (no projected leaf: nothing to correct)
    if projected:
      took_N = jnp.stack([took[i] for i in projected])
      refreshed = jnp.all(took_N) if refresh.shared else took_N
    if refresh.uses_similarity and projected:
      similarity = jnp.where(refreshed, similarity, 0.0)  # leaves that did not refresh: 0
    return jax.tree.unflatten(treedef, out), GaLoreProjectionState(
        count=optax.safe_increment(state.count),
        inner_state=inner_state,
        bases=bases,
        refresh_state=refresh.update(
            state.refresh_state, state.count, refreshed, similarity
        ),
        rng_key=state.rng_key,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def refresh_counts(opt_state: Any) -> jax.Array:
  """Total basis refreshes so far, over every projected leaf (for logging).

  Finds each state with a ``bases`` tuple (:class:`GaLoreProjectionState`,
  :class:`galore_jax.ScaleByLDAdamState`) inside a (possibly nested) optimizer
  state and sums the ``refreshes`` counters of its leaves; a stacked leaf
  (scanned layers) counts once per refresh.  LDAdam refreshes every step.  A
  refresh whose every new basis the non-finite guard rejected is not counted.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import galore_jax as gj
    >>> params = {"w": jnp.zeros((6, 4)), "v": jnp.zeros((5, 3))}
    >>> tx = gj.galore_adamw(1e-2, rank=2, update_proj_gap=2)
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   _, state = tx.update(params, state, params)
    >>> int(gj.refresh_counts(state))      # steps 0 and 2, two leaves
    4
  """
  total = jnp.zeros([], jnp.int32)

  def has_bases(x):
    return isinstance(x, tuple) and isinstance(getattr(x, "bases", None), tuple)

  for node in jax.tree.leaves(opt_state, is_leaf=has_bases):
    if has_bases(node):
      for b in node.bases:
        if isinstance(b, subspace.Bases):
          total = total + b.refreshes
  return total


def galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int | Any = 128,
    update_proj_gap: int = 200,
    scale: float | jax.Array = 0.25,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any | None = None,
    weight_decay: float = 0.0,
    weight_decay_mask: Any | Callable[[Any], Any] | None = None,
    mask: Any | Callable[[Any], Any] | None = None,
    dimension_numbers: Any | Callable[[Any], Any] | None = None,
    refresh: refresh_lib.RefreshPolicy | None = None,
    method: str | subspace.BasisMethod = "svd",
    on_refresh: str = "keep",
    basis_dtype: Any | None = None,
    key: jax.Array | int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""GaLore-AdamW: Adam on low-rank gradient coefficients, decoupled decay.

  .. math::
    \Delta_t = -\eta_t \left( \alpha\,\operatorname{proj}^{-1}\!\Big(
      \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}\Big) + \lambda\, \theta_{t-1}
    \right)

  with Adam's bias-corrected moments :math:`\hat m_t, \hat v_t` of the projected
  gradient (optax ``scale_by_adam`` numerics) and weight decay :math:`\lambda`
  in full space, not scaled by :math:`\alpha`.  Built as::

    optax.chain(
        galore_projection(optax.scale_by_adam(b1, b2, eps, eps_root, mu_dtype), ...),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate))

  Differences from galore-torch's ``GaLoreAdamW`` (documented, not bugs): it adds
  ``eps`` to :math:`\sqrt{v}` before bias correction (its default eps is
  1e-6), and decays with the already-updated weights; both move results by
  amounts that vanish with small eps / small ``lr * weight_decay``.

  Args:
    learning_rate: a float or an optax schedule.
    rank, update_proj_gap, scale, proj_type, mask, dimension_numbers, refresh,
      method, on_refresh, basis_dtype, key: as in :func:`galore_projection`
      (``on_refresh="transport"`` uses ``b1`` and ``b2`` as its betas).
    b1, b2, eps, eps_root, mu_dtype: as in ``optax.scale_by_adam``.
    weight_decay: decoupled weight decay :math:`\lambda`.
    weight_decay_mask: which leaves are decayed (default: all), optax
      convention.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import galore_jax as gj
    >>> target = jax.random.normal(jax.random.key(0), (32, 16))
    >>> params = {"w": jnp.zeros((32, 16))}
    >>> loss = lambda p: jnp.mean((p["w"] - target) ** 2)
    >>> tx = gj.galore_adamw(0.1, rank=4, update_proj_gap=10, scale=1.0)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> state = tx.init(params)
    >>> for _ in range(100):
    ...   params, state = step(params, state)
    >>> bool(loss(params) < 0.2 * loss({"w": jnp.zeros((32, 16))}))
    True
  """
  return optax.chain(
      galore_projection(
          optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype),
          rank=rank,
          update_proj_gap=update_proj_gap,
          scale=scale,
          proj_type=proj_type,
          mask=mask,
          dimension_numbers=dimension_numbers,
          refresh=refresh,
          method=method,
          on_refresh=on_refresh,
          transport_betas=(b1, b2),
          basis_dtype=basis_dtype,
          key=key,
      ),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )

r"""APOLLO and APOLLO-Mini: Adam's scaling, estimated in a random subspace, on the raw gradient.

Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
<https://arxiv.org/abs/2412.05270>`_, MLSys 2025.  Written from the paper's equations.

For a selected leaf, viewed as a stack of matrices :math:`G \in \mathbb{R}^{m\times n}`
with a basis on the left (the mirror image for a right one: :math:`R = G Q`, one scale
per row), :math:`P \in \mathbb{R}^{m\times r}` with entries :math:`\mathcal{N}(0, 1/r)`
drawn again on the steps the refresh policy picks (every :math:`T` = 200 steps):

.. math::
  R_t = P^\top G_t \;\;(r\times n),\qquad
  \tilde R_t = \frac{\hat M_t}{\sqrt{\hat V_t} + \epsilon}
    \;\;(\text{Adam's bias-corrected moments of } R_t) \\
  s_j = \frac{\|\tilde R_t[:, j]\|}{\|R_t[:, j]\|} \;\;(\text{channel}),\qquad
  s = \frac{\|\tilde R_t\|_F}{\|R_t\|_F} \;\;(\text{tensor}) \\
  U_t = \operatorname{lim}\big(G_t \operatorname{diag}(s)\big),\qquad
  \Delta_t = \alpha\, U_t

where :math:`\operatorname{lim}` is the norm-growth limiter (:mod:`galore_jax.scaling`,
:math:`\gamma = 1.01`).  With the decoupled weight decay and the learning rate of
:func:`apollo_adamw`: :math:`W \leftarrow W - \eta\alpha U_t - \eta\lambda W`.

Memory.  The projection is regenerated from the key at every step instead of stored (its
state is the leaf's refresh counter, from which the key of each matrix is derived), so a
projected ``m x n`` matrix (``m <= n``) holds :math:`2nr + 2` values: the two ``r x n``
moments, the counter (the paper's seed) and the limiter's norm -- APOLLO-Mini (``r = 1``)
:math:`2n + 2`.  With ``proj="svd"`` the basis is a function of the gradient and is
stored: :math:`mr + 2nr + 2`.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from galore_jax import _checks
from galore_jax import draws
from galore_jax import flax_metadata
from galore_jax import leaves as leaves_lib
from galore_jax import moments
from galore_jax import plans as plans_lib
from galore_jax import projection
from galore_jax import refresh as refresh_lib
from galore_jax import scaling
from galore_jax import subspace
from galore_jax._explicit import broadcastable_to
from galore_jax._explicit import on_mesh_of

#: ``proj_type`` values of :func:`scale_by_apollo` (a scale needs one projected side).
APOLLO_PROJ_TYPES = projection.ONE_SIDED_PROJ_TYPES
#: ``scale_type`` values of :func:`scale_by_apollo`.
SCALE_TYPES = ("channel", "tensor")
#: ``proj`` names of :func:`scale_by_apollo` and their basis methods.
PROJECTIONS = {"random": subspace.Gaussian(), "svd": subspace.SVD()}
#: APOLLO-Mini's :math:`\alpha` (the paper's :math:`\sqrt{128}`).
MINI_SCALE = math.sqrt(128)


class ScaleByApolloState(NamedTuple):
  """State of :func:`scale_by_apollo`.

  Attributes:
    count: int32 number of updates taken.
    inner_state: ``optax.ScaleByAdamState`` of Adam on the coefficient-shaped tree
      (``(*batch, r, n)`` for a left basis, ``(*batch, m, r)`` for a right one, float32
      for a float16 leaf; full shape for leaves that are not projected).
    bases: one entry per leaf, in ``jax.tree.leaves`` order: a projected leaf's
      :class:`galore_jax.subspace.Bases` -- with ``proj="random"`` (any method that does
      not read the gradient) only its ``refreshes`` counter, the projection being drawn
      again from the key; with ``proj="svd"`` the stored basis too -- else
      ``optax.MaskedNode()``.
    norms: with the limiter, one entry per leaf: the limiter's previous norms of a
      projected leaf, float32 ``(*batch)``, else ``optax.MaskedNode()``; ``None``
      without it.
    refresh_state: the refresh policy's state (``None`` for ``every``).
    rng_key: typed PRNG key of the projections (``None`` with ``proj="svd"``).

  Example:
    >>> import jax.numpy as jnp
    >>> import galore_jax as gj
    >>> params = {"b": jnp.zeros(4), "w": jnp.zeros((6, 16))}
    >>> state = gj.scale_by_apollo(rank=2).init(params)
    >>> state.inner_state.mu["w"].shape, state.bases[1].left, state.norms[1].shape
    ((2, 16), None, ())
  """

  count: jax.Array
  inner_state: optax.ScaleByAdamState
  bases: tuple[Any, ...]
  norms: tuple[Any, ...] | None
  refresh_state: Any
  rng_key: jax.Array | None


def _projection_method(proj) -> subspace.BasisMethod:
  if isinstance(proj, subspace.BasisMethod):
    return proj
  if isinstance(proj, str) and proj in PROJECTIONS:
    return PROJECTIONS[proj]
  raise ValueError(
      f"proj={proj!r} is not one of {tuple(PROJECTIONS)} nor a"
      " galore_jax.subspace.BasisMethod.")


def _check(proj_type, scale_type, on_refresh, refresh, proj, method, limiter_gamma):
  """Construction-time checks of :func:`scale_by_apollo`'s arguments (one line each)."""
  if proj_type not in APOLLO_PROJ_TYPES:
    raise ValueError(
        f"proj_type={proj_type!r} is not one of {APOLLO_PROJ_TYPES} (APOLLO scales the"
        " channels of the side that is not projected; 'full' projects both).")
  if scale_type not in SCALE_TYPES:
    raise ValueError(f"scale_type={scale_type!r} is not one of {SCALE_TYPES}.")
  if on_refresh not in ("keep", "reset"):
    raise ValueError(
        f"on_refresh={on_refresh!r}; expected 'keep' or 'reset' (APOLLO does not transport"
        " its moments, with either proj).")
  refresh_lib.check_drawn(refresh, method, f"proj={proj!r}", "use proj='svd', or every /"
                          " staggered")
  scaling.check_gamma(limiter_gamma)


def scale_by_apollo(
    rank: int | Any = 128,
    *,
    proj: str | subspace.BasisMethod = "random",
    scale_type: str = "channel",
    scale: float | jax.Array = 1.0,
    update_proj_gap: int = 200,
    proj_type: str = "std",
    refresh: refresh_lib.RefreshPolicy | None = None,
    mask: Any | Callable[[Any], Any] | None = None,
    dimension_numbers: Any | Callable[[Any], Any] | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    limiter_gamma: float | jax.Array | None = 1.01,
    on_refresh: str = "keep",
    basis_dtype: Any | None = None,
    key: jax.Array | int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""APOLLO's update direction: the raw gradient, scaled per channel (or per matrix) by
  the gain Adam shows in a random low-rank projection (module docstring).

  Leaves that are not selected get plain Adam (``optax.scale_by_adam`` numerics, the same
  betas), at full shape and unscaled, as ``galore_projection`` gives them.  The subspace
  machinery is ``galore_projection``'s: leaf plans (``mask``, ``dimension_numbers``,
  per-leaf ``rank``, the ``proj_type`` side rule; unnamed axes of an N-D kernel are batch
  axes, each matrix with its own projection, scale and limiter norm), refresh policies,
  basis methods and sharding rules.

  Args:
    rank: ``r``, an int or a per-leaf pytree (prefix) / callable of params; clipped to
      ``min(m, n)``.
    proj: ``"random"`` (the paper: :class:`galore_jax.subspace.Gaussian`, entries
      :math:`\mathcal{N}(0, 1/r)`, regenerated from the key, not stored), ``"svd"`` (the
      paper's "APOLLO w. SVD": the top-``r`` singular vectors, stored) or any
      :class:`galore_jax.subspace.BasisMethod` (one that does not read the gradient, such
      as :class:`~galore_jax.subspace.Random`, is regenerated; an orthonormal random basis
      shrinks :math:`\|R_{:,j}\|` by about :math:`\sqrt{r/m}` and so scales the update by
      :math:`\sqrt{m/r}` against the Gaussian: lower ``scale`` to match).
    scale_type: ``"channel"`` (APOLLO: one scale per column of a left-projected matrix,
      per row of a right-projected one) or ``"tensor"`` (APOLLO-Mini: one per matrix).
    scale: :math:`\alpha`, multiplying the update of projected leaves (1 for APOLLO,
      :data:`MINI_SCALE` for APOLLO-Mini).
    update_proj_gap: ``T`` of the default policy ``every(T)``.
    proj_type: the side rule of :func:`galore_jax.galore_projection` without ``"full"``;
      ``"std"`` projects the smaller side, as the paper (``m <= n``, ``R`` is ``r x n``).
    refresh: a refresh policy; overrides ``update_proj_gap`` (``lazy`` only with a
      projection computed from the gradient).
    mask, dimension_numbers: which leaves are projected and how N-D leaves are matrices,
      as in :func:`galore_jax.galore_projection`.
    b1, b2, eps, eps_root: Adam's, as in ``optax.scale_by_adam``.
    limiter_gamma: :math:`\gamma` of the norm-growth limiter on :math:`U`, a finite number
      > 1 (1.01), or ``None`` to turn it off (then no norms are stored: :math:`2nr + 1` per matrix).
    on_refresh: what happens to a refreshed leaf's moments: ``"keep"`` (they stay, in
      the old projection's coordinates) or ``"reset"`` (of a stacked leaf, the matrices
      whose new ``"svd"`` basis the non-finite guard took: a rejected one keeps its basis).
    basis_dtype: dtype of stored bases (``proj="svd"``); default each leaf's dtype.
    key: PRNG key (or int seed) of the projections (default seed 0 when the method needs
      one).  Leaf ``i``'s projection after its :math:`c`-th refresh is drawn from
      ``fold_in(fold_in(key, i), c)`` (one key per matrix of the leaf, folded in).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ScaleByApolloState` (its ``update`` reads ``galore_stack_slice``:
    :class:`galore_jax.StackSlice`, and ``galore_refresh``: a refresh decided on the host,
    as :func:`galore_jax.galore_projection` reads it, with the policy ``every(T)`` only).

  Raises:
    ValueError: for ``rank < 1``, an unknown ``proj`` / ``proj_type`` / ``scale_type`` /
      ``on_refresh``, a ``limiter_gamma`` that is not a finite number > 1, a ``lazy``
      policy with a projection that does not read the gradient, or arguments that do not
      fit the params.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import galore_jax as gj
    >>> params = {"w": jnp.zeros((8, 32))}
    >>> tx = gj.scale_by_apollo(rank=4)
    >>> grads = {"w": jax.random.normal(jax.random.key(0), (8, 32))}
    >>> updates, state = tx.update(grads, tx.init(params))
    >>> ratio = updates["w"] / grads["w"]           # one scale per column
    >>> bool(jnp.allclose(ratio, ratio[0], rtol=1e-5)), state.inner_state.mu["w"].shape
    (True, (4, 32))
  """
  if _checks.is_single(rank):
    _checks.rank(rank)
  method = _projection_method(proj)
  _checks.positive(scale, "scale")
  basis_dtype = _checks.float_dtype(basis_dtype, "basis_dtype")
  refresh = refresh_lib.resolve(refresh, update_proj_gap)
  _check(proj_type, scale_type, on_refresh, refresh, proj, method, limiter_gamma)
  stored = method.reads_gradient
  _checks.betas((b1, b2), "scale_by_apollo")
  _checks.nonnegative(eps, "scale_by_apollo: eps")
  _checks.nonnegative(eps_root, "scale_by_apollo: eps_root")
  inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root)
  rng_key = _checks.prng_key(0 if key is None else key)  # (checked even where unused)
  rng_key = rng_key if method.needs_key else None
  limited = limiter_gamma is not None

  def plans_for(tree):
    plans = plans_lib.leaf_plans(tree, mask, dimension_numbers, rank, proj_type)
    # a regenerated projection is unsharded: no rank-sharded coefficients (LeafPlan)
    return plans if stored else [None if p is None else p._replace(shard_rank=False)
                                 for p in plans]

  def init_fn(params):
    leaves = jax.tree.leaves(params)
    plans = plans_for(params)
    proxy_tree = leaves_lib.coefficient_tree(params, plans)
    leaves_lib.warn_if_no_savings(plans, "scale_by_apollo", stored)
    bases = leaves_lib.all_zero_bases(params, plans, basis_dtype, stored)
    return on_mesh_of(ScaleByApolloState(
        count=jnp.zeros([], jnp.int32),
        inner_state=inner.init(proxy_tree),
        bases=leaves_lib.per_leaf_tuple(bases, params),
        norms=(leaves_lib.per_leaf_tuple(scaling.zero_norms(params, plans), params)
               if limited else None),
        refresh_state=leaves_lib.policy_init(refresh, plans),
        # A copy per init: a step that donates the state deletes its key, and a later
        # init returning the transform's own array would hand out a deleted one.
        rng_key=None if rng_key is None else jnp.copy(rng_key),
    ), leaves)

  def update_fn(updates, state, params=None, **extra_args):
    del params  # gradient-only
    _checks.initialized(state, "scale_by_apollo")
    leaves, treedef = jax.tree.flatten(updates)
    plans = plans_for(updates)
    leaves_lib.check_fits(state.bases, plans, "scale_by_apollo", stored)
    leaves_lib.check_moments(state.inner_state.mu, leaves, plans, "scale_by_apollo")
    leaves_lib.check_configs(state, refresh, plans, "scale_by_apollo",
                             norms=True if limited else None,
                             rng_key=None if rng_key is None else True)
    mats = leaves_lib.matrices(leaves, plans)
    args = (refresh, method, state.count, state.refresh_state, state.rng_key, state.bases)
    stack = draws.stack_slice(extra_args)  # a layer of stacked leaves: draw as they would
    host_due = refresh_lib.host_decision(refresh, extra_args)
    if stored:
      kept, taken = leaves_lib.refresh_bases(*args, leaves, plans, host_due, stack)
      bases = kept
    else:
      kept, bases = leaves_lib.regenerate(*args, mats, plans, stack, host_due)
      taken = None  # a drawn basis is finite (no guard): every matrix of a due leaf is new
    refreshed = leaves_lib.refreshed(state.bases, kept, taken)  # per matrix of a stack
    coeffs = leaves_lib.coefficients(leaves, mats, plans, bases)
    coeff_tree = jax.tree.unflatten(treedef, coeffs)
    inner_state = moments.on_refresh_update(
        on_refresh, inner, state.inner_state, coeff_tree, state.bases, bases, refreshed, None)
    adam, inner_state = inner.update(coeff_tree, inner_state)
    out, norms = _scaled(leaves, mats, coeffs, jax.tree.leaves(adam), plans, state.norms,
                         scale, scale_type == "tensor", limiter_gamma if limited else None)
    return jax.tree.unflatten(treedef, out), ScaleByApolloState(
        count=optax.safe_increment(state.count),
        inner_state=inner_state,
        bases=tuple(kept),
        norms=norms,
        refresh_state=leaves_lib.policy_update(
            refresh, state.count, state.refresh_state, state.bases, kept, refreshed),
        rng_key=state.rng_key,
    )

  return optax.GradientTransformationExtraArgs(init_fn, flax_metadata.on_values(update_fn))


def _scaled(leaves, mats, coeffs, adam, plans, norms, scale, tensor, gamma):
  """APOLLO's full-space updates: each projected matrix's raw gradient times its channel
  (or tensor) scale, through the limiter, times ``scale``; Adam's update for the other
  leaves.  Returns them and the limiter's norms (``None`` without the limiter)."""
  out, new_norms = [], []
  for i, (leaf, u, plan) in enumerate(zip(leaves, adam, plans)):
    if plan is None:
      out.append(u)
      new_norms.append(optax.MaskedNode())
      continue
    s = scaling.norm_ratio(u, coeffs[i], plan.left, tensor=tensor)
    full = mats[i].astype(jnp.float32) * broadcastable_to(s, mats[i])
    if gamma is not None:
      full, norm = scaling.limit_growth(full, norms[i], gamma)
      new_norms.append(norm)
    out.append(projection.from_matrix(full * scale, plan.view, leaf).astype(leaf.dtype))
  return out, (tuple(new_norms) if gamma is not None else None)


def apollo_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int | Any = 128,
    proj: str | subspace.BasisMethod = "random",
    scale_type: str = "channel", scale: float | jax.Array = 1.0,
    update_proj_gap: int = 200,
    proj_type: str = "std",
    refresh: refresh_lib.RefreshPolicy | None = None,
    mask: Any | Callable[[Any], Any] | None = None,
    dimension_numbers: Any | Callable[[Any], Any] | None = None,
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
    limiter_gamma: float | jax.Array | None = 1.01,
    on_refresh: str = "keep", basis_dtype: Any | None = None, key: jax.Array | int | None = None,
    weight_decay: float = 0.0,
    weight_decay_mask: Any | Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
  r"""APOLLO-AdamW: :func:`scale_by_apollo` with decoupled weight decay.

  .. math::
    \Delta_t = -\eta_t \big( \alpha\, U_t + \lambda\, \theta_{t-1} \big)

  with :math:`U_t` the limited, channel-scaled gradient (Adam for leaves that are not
  projected) and :math:`\lambda` = ``weight_decay``, not scaled by :math:`\alpha`.  Built
  as::

    optax.chain(
        scale_by_apollo(rank, proj=proj, scale_type=scale_type, scale=scale, ...),
        _checks.decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate))

  The paper's pre-training settings (LLaMA on C4): lr 0.01, :math:`\alpha` 1, rank
  :math:`d/4` (or :math:`d/8`), :math:`T` = 200, :math:`\gamma` = 1.01, weight decay 0.

  Args:
    learning_rate: a float or an optax schedule.
    rank, proj, scale_type, scale, update_proj_gap, proj_type, refresh, mask,
      dimension_numbers, b1, b2, eps, eps_root, limiter_gamma, on_refresh, basis_dtype,
      key: as in :func:`scale_by_apollo` (under ``optax.inject_hyperparams`` pass
      ``rank`` and ``update_proj_gap`` in ``static_args``).
    weight_decay, weight_decay_mask: decoupled weight decay and which leaves it applies
      to (default: all; optax convention).

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import galore_jax as gj
    >>> tx = gj.apollo_adamw(0.05, rank=4, update_proj_gap=20)
    >>> target = jax.random.normal(jax.random.key(0), (16, 32))
    >>> loss = lambda w: jnp.mean((w - target) ** 2)
    >>> @jax.jit
    ... def step(w, state):
    ...   updates, state = tx.update(jax.grad(loss)(w), state, w)
    ...   return optax.apply_updates(w, updates), state
    >>> w = jnp.zeros((16, 32))
    >>> state = tx.init(w)
    >>> for _ in range(100):
    ...   w, state = step(w, state)
    >>> bool(loss(w) < 0.2 * loss(jnp.zeros((16, 32))))
    True
  """
  return optax.chain(
      scale_by_apollo(
          rank, proj=proj, scale_type=scale_type, scale=scale,
          update_proj_gap=update_proj_gap, proj_type=proj_type, refresh=refresh, mask=mask,
          dimension_numbers=dimension_numbers, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
          limiter_gamma=limiter_gamma, on_refresh=on_refresh, basis_dtype=basis_dtype,
          key=key),
      _checks.decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(_checks.learning_rate(learning_rate)),
  )


def apollo_mini(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int | Any = 1,
    scale_type: str = "tensor",
    scale: float | jax.Array = MINI_SCALE,
    **apollo_args,
) -> optax.GradientTransformation:
  r"""APOLLO-Mini: :func:`apollo_adamw` at rank 1 with one scale per matrix and
  :math:`\alpha = \sqrt{128}` (the paper's), so that a projected ``m x n`` matrix holds
  :math:`2n + 2` values (``m <= n``): two ``1 x n`` moments, the projection's counter and
  the limiter's norm.

  The paper's pre-training settings: lr 0.01 (0.02 did better in its Table 2), :math:`T`
  = 200, :math:`\gamma` = 1.01.

  Args:
    learning_rate: a float or an optax schedule.
    rank, scale_type, scale: APOLLO-Mini's defaults (1, ``"tensor"``, :data:`MINI_SCALE`).
    **apollo_args: ``proj``, ``update_proj_gap``, ``proj_type``, ``refresh``, ``mask``,
      ``dimension_numbers``, ``b1``, ``b2``, ``eps``, ``eps_root``, ``limiter_gamma``,
      ``on_refresh``, ``basis_dtype``, ``key``, ``weight_decay``, ``weight_decay_mask``: as in
      :func:`apollo_adamw`.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp
    >>> import galore_jax as gj
    >>> state = gj.apollo_mini(1e-2).init({"w": jnp.zeros((64, 256))})
    >>> state[0].inner_state.mu["w"].shape, gj.tree_bytes(state[0].bases[0])  # a counter
    ((1, 256), 4)
  """
  return apollo_adamw(learning_rate, rank=rank, scale_type=scale_type, scale=scale,
                      **apollo_args)


# apollo_mini's signature is apollo_adamw's at its own defaults: optax.inject_hyperparams reads
# a factory's parameters from its signature and cannot pass a **apollo_args on (it called
# apollo_adamw(apollo_args={...})).
_MINI_DEFAULTS = {"rank": 1, "scale_type": "tensor", "scale": MINI_SCALE}
_ADAMW_SIGNATURE = inspect.signature(apollo_adamw)
apollo_mini.__signature__ = _ADAMW_SIGNATURE.replace(parameters=[
    q.replace(default=_MINI_DEFAULTS.get(q.name, q.default))
    for q in _ADAMW_SIGNATURE.parameters.values()])

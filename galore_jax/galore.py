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

import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from galore_jax import _checks
from galore_jax import adafactor
from galore_jax import draws
from galore_jax import flax_metadata
from galore_jax import hf_adam
from galore_jax import leaves as leaves_lib
from galore_jax import moments
from galore_jax import plans as plans_lib
from galore_jax import projection
from galore_jax import quantization
from galore_jax import refresh as refresh_lib
from galore_jax import scaling
from galore_jax import subspace
from galore_jax._explicit import broadcastable_to
from galore_jax._explicit import context_mesh
from galore_jax._explicit import on_mesh_of
from galore_jax.adam8bit import scale_by_adam_8bit

#: ``residual`` values of :func:`galore_projection`.
RESIDUALS = (None, "fira", "fira_code")
#: :math:`\epsilon` of Fira's column gain :math:`\|N_j\| / (\|R_j\| + \epsilon)`.
FIRA_EPS = 1e-8


class GaLoreProjectionState(NamedTuple):
  """State of :func:`galore_projection`.

  Attributes:
    count: int32 number of updates taken; a refresh at step ``t`` sees the
      count before its increment.
    inner_state: state of the inner transform, initialised on the
      coefficient-shaped tree (full shape for leaves that are not projected; float32
      coefficients for a float16 leaf).
    bases: one entry per leaf of the params, in ``jax.tree.leaves`` order: a
      :class:`galore_jax.subspace.Bases` for a projected leaf, else
      ``optax.MaskedNode()``.  A tuple, not a params-shaped tree, so that no
      param metadata (e.g. a Flax sharding) is copied onto low-rank arrays.
    refresh_state: the refresh policy's state (``None`` for ``every``).
    rng_key: typed PRNG key when ``key`` was given, else ``None``.
    residual_norms: with ``residual="fira"`` and the limiter on, one entry per leaf (as
      ``bases``): the norm-growth limiter's previous norms of a projected leaf's scaled
      residual, float32 ``(*batch)`` (one per matrix), else ``optax.MaskedNode()``;
      ``None`` otherwise.

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
  residual_norms: tuple[Any, ...] | None = None


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
    residual: str | None = None,
    limiter_gamma: float | jax.Array | None = 1.01,
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

  On a GPU that ``lax.cond`` copies its predicate to the host and waits for it: a
  sync in every step, which a small step feels.  A caller that counts steps can
  decide on the host instead, ``tx.update(grads, state, params,
  galore_refresh=step % T == 0)`` (a Python bool; ``step`` is this transform's
  count, the updates applied before), under a jit that takes it as a static
  argument: it compiles a normal step and a refresh step, neither with a branch.
  Only with the policy ``every(T)``; a decision that differs from the policy's
  refreshes on the caller's steps instead.  The bases start at zero, so a first step
  passed ``False`` gives the projected leaves zero updates until the first ``True``.

  Args:
    inner: the transform run in the subspace; default ``optax.scale_by_adam()``.
      It sees coefficient-shaped trees and ``params=None``, so it must be
      gradient-only (Adam, :func:`galore_jax.scale_by_adafactor`, Lion, SGD
      momentum, ...; not ``adamw``, nor ``optax.scale_by_factored_rms``, which
      reads the params' shapes).  The coefficients have the leaf's dtype, but a
      float16 leaf's are float32 (its state too; float16 overflows on them:
      :func:`galore_jax.projection.coefficient_dtype`).
    rank: ``r``, an int or a per-leaf pytree (prefix) / callable of params;
      clipped to ``min(m, n)``.
    update_proj_gap: ``T`` of the default policy ``every(T)``.
    scale: :math:`\alpha`, applied when projecting back.
    proj_type: ``"std"`` (basis on the smaller side: right if ``m >= n`` else
      left, as galore-torch), ``"reverse_std"`` (the opposite; what
      ``optax.contrib.galore`` does except on square matrices viewed through
      dimension numbers: see :func:`galore_jax.projection.projection_sides`),
      ``"left"``, ``"right"`` or ``"full"``.
      With ``"full"``, the coefficients :math:`P^\top G Q` of the gradient a
      basis was computed from are diagonal up to round-off, and Adam with a
      tiny ``eps`` turns that round-off into full-size steps (in galore-torch
      too); prefer a larger ``eps`` or a warmup that starts at zero.
    mask: which leaves to project: a bool pytree (or prefix), or a callable of
      params returning one (optax convention; e.g.
      :func:`galore_jax.linear_kernels`).  ``None`` selects every leaf with
      ``ndim == 2`` -- or, when ``dimension_numbers`` is a pytree or callable,
      every leaf whose dimension numbers are not ``None`` (one set that names a third
      axis fits no 2-D leaf: refused with ``mask=None``).
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
      per-leaf inner state -- Adam's moments, Adafactor's row and column
      statistics -- is re-initialised) or ``"transport"``
      (LDAdam's projection-aware transport, for an Adam-shaped inner state).
      Counters shared by all leaves (Adam's ``count``) are not reset, so with
      ``"reset"`` Adam's bias correction does not restart: right after a reset
      its steps on that leaf are up to about
      :math:`(1-\beta_1)/\sqrt{1-\beta_2} \approx 3` times larger than a
      fresh Adam's until the moments refill.  A leaf whose refresh the
      non-finite guard rejected wholly kept its basis, and keeps its inner
      state under ``"reset"`` and ``"transport"``; so does each matrix of a
      stacked leaf (a layer of a scanned kernel) whose new basis the guard
      rejected while it took others'.  With ``"transport"``, every
      ``optax.ScaleByAdamState`` inside the inner state whose moments are
      coefficient-shaped is carried into the new basis (and every
      :class:`galore_jax.ScaleByAdam8bitState`: dequantized, carried, quantized
      again).  With the change of basis :math:`Q_L = P_{new}^\top P_{old}` (left),
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
    residual: ``None`` (GaLore: the part of the gradient outside the subspace is
      dropped) or ``"fira"`` (Fira, Chen et al. 2024: it is added back, scaled by the
      inner transform's gain measured in the subspace).  For a left basis, with
      :math:`R = P^\top G` (``r x n``) and the inner output :math:`N`:

      .. math::
        \phi_j = \frac{\|N_{:,j}\|}{\|R_{:,j}\| + \epsilon},\qquad
        S = (G - P R)\,\operatorname{diag}(\phi),\qquad
        \Delta = \alpha\,(P N + \operatorname{lim}(S))

      (:math:`\epsilon` = :data:`FIRA_EPS`); for a right basis the mirror image,
      :math:`R = G Q`, one gain per row :math:`\phi_i = \|N_{i,:}\| / (\|R_{i,:}\|
      + \epsilon)`, :math:`S = \operatorname{diag}(\phi)(G - R Q^\top)`.  ``scale``
      :math:`\alpha` multiplies both terms; :math:`\operatorname{lim}` is the
      norm-growth limiter of :mod:`galore_jax.scaling` with ``limiter_gamma``, its
      previous norms in the state (one float32 per matrix).  Leaves that are not
      projected are not affected.  Not with ``proj_type="full"`` (no channel to scale).
      ``"fira_code"``: the form the Fira repository's optimizer computes (its
      ``fira_adamw.py``, which produced the paper's tables), where :math:`\alpha` scales
      the subspace's part only and the residual subtracts :math:`\alpha P R`:
      :math:`S = (G - \alpha P R)\operatorname{diag}(\phi)`,
      :math:`\Delta = \alpha P N + \operatorname{lim}(S)`.  At :math:`\alpha = 1` the two
      agree; at the paper's 0.25 the code's residual is about 4x the paper equation's and
      carries :math:`(1 - \alpha)` of the subspace's gradient, scaled by :math:`\phi`.
    limiter_gamma: :math:`\gamma` of Fira's norm-growth limiter, a finite number > 1 (1.01,
      the paper's), or ``None`` to turn it off; only read with a Fira ``residual``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; extra args are forwarded to
    ``inner``.  Its state is a :class:`GaLoreProjectionState`.

  Raises:
    ValueError: for ``rank < 1``, ``update_proj_gap < 1``, an unknown
      ``proj_type`` / ``method`` / ``on_refresh`` / ``residual``, ``residual="fira"``
      with ``proj_type="full"``, a ``limiter_gamma`` that is not a finite number > 1,
      dimension numbers that do not fit a leaf, or a mask / rank / dimension-numbers tree
      whose structure does not match the params; for ``on_refresh="transport"`` without
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
  if not all(callable(getattr(inner, f, None)) for f in ("init", "update")):
    raise ValueError(f"inner must be an optax.GradientTransformation (e.g."
                     f" optax.scale_by_adam()), got {_checks.got(inner)}.")
  inner = optax.with_extra_args_support(inner)
  if _checks.is_single(rank):
    _checks.rank(rank)  # a single rank: check it now, not at init
  if proj_type not in projection.PROJ_TYPES:
    raise ValueError(f"proj_type={proj_type!r} is not one of {projection.PROJ_TYPES}.")
  _checks.positive(scale, "scale")
  given, method = method, subspace.get_method(method)
  basis_dtype = _checks.float_dtype(basis_dtype, "basis_dtype")
  transport_betas = moments.check(on_refresh, inner, transport_betas)
  refresh = refresh_lib.resolve(refresh, update_proj_gap)
  refresh_lib.check_drawn(refresh, method, f"method={given!r}", "use another method, or"
                          " every / staggered")
  if residual not in RESIDUALS:
    raise ValueError(f"residual={residual!r} is not one of {RESIDUALS}.")
  if residual is not None and proj_type == "full":
    raise ValueError(
        f"residual={residual!r} scales channels of the side that is not projected;"
        " proj_type='full' projects both: use 'std', 'reverse_std', 'left' or 'right'.")
  limited = residual is not None and scaling.check_gamma(limiter_gamma) is not None
  if key is None and method.needs_key:
    key = 0  # a fixed default seed keeps runs reproducible
  rng_key = None if key is None else _checks.prng_key(key)

  def plans_for(tree):
    return plans_lib.leaf_plans(tree, mask, dimension_numbers, rank, proj_type)

  def init_fn(params):
    leaves = jax.tree.leaves(params)
    plans = plans_for(params)
    bases = leaves_lib.all_zero_bases(params, plans, basis_dtype)
    proxy_tree = leaves_lib.coefficient_tree(params, plans)
    inner_state = inner.init(proxy_tree)
    moments.check_init(on_refresh, inner_state, proxy_tree)
    leaves_lib.warn_if_no_savings(plans, "galore_projection")
    return on_mesh_of(GaLoreProjectionState(
        count=jnp.zeros([], jnp.int32),
        inner_state=inner_state,
        bases=leaves_lib.per_leaf_tuple(bases, params),
        refresh_state=leaves_lib.policy_init(refresh, plans),
        # A copy per init: a step that donates the state deletes its key, and a later
        # init returning the transform's own array would hand out a deleted one.
        rng_key=None if rng_key is None else jnp.copy(rng_key),
        residual_norms=(leaves_lib.per_leaf_tuple(scaling.zero_norms(params, plans), params)
                        if limited else None),
    ), leaves)

  def update_fn(updates, state, params=None, **extra_args):
    del params  # the inner transform is gradient-only
    _checks.initialized(state, "galore_projection")
    leaves, treedef = jax.tree.flatten(updates)
    plans = plans_for(updates)
    leaves_lib.check_fits(state.bases, plans, "galore_projection")
    leaves_lib.check_configs(state, refresh, plans, "galore_projection",
                             residual_norms=True if limited else None,
                             rng_key=None if rng_key is None else True)
    host_due = refresh_lib.host_decision(refresh, extra_args)
    bases, taken = leaves_lib.refresh_bases(refresh, method, state.count, state.refresh_state,
                                            state.rng_key, state.bases, leaves, plans, host_due,
                                            draws.stack_slice(extra_args))
    mats = leaves_lib.matrices(leaves, plans)  # (after: a transpose here only feeds a matmul)
    # A step that may refresh (the host said so, or a ``cond`` decides) projects each leaf
    # once its bases exist: on a mesh, fewer gradient copies live across the refresh.
    if host_due is not False and context_mesh(leaves) is not None:
      mats = leaves_lib.after_refresh(mats, bases)
    refreshed = leaves_lib.refreshed(state.bases, bases, taken)  # per matrix of a stack
    coeff_tree = jax.tree.unflatten(treedef, leaves_lib.coefficients(leaves, mats, plans, bases))
    _checks.state_fits(inner.init, state.inner_state, coeff_tree, "galore_projection",
                       structure=False)  # (the inner's own checks know its configuration)
    inner_state = moments.on_refresh_update(
        on_refresh, inner, state.inner_state, coeff_tree, state.bases, bases, refreshed,
        transport_betas)
    inner_updates, inner_state = _inner_update(inner, coeff_tree, inner_state, extra_args)
    if residual is None:
      out = _project_back(leaves, mats, jax.tree.leaves(inner_updates), plans, bases, scale)
      norms = None
    else:
      out, norms = _fira_back(
          residual, leaves, mats, jax.tree.leaves(coeff_tree), jax.tree.leaves(inner_updates),
          plans, bases, state.residual_norms, scale, limiter_gamma if limited else None)
    return jax.tree.unflatten(treedef, out), GaLoreProjectionState(
        count=optax.safe_increment(state.count),
        inner_state=inner_state,
        bases=bases,
        refresh_state=leaves_lib.policy_update(
            refresh, state.count, state.refresh_state, state.bases, bases, refreshed),
        rng_key=state.rng_key,
        residual_norms=norms,
    )

  return optax.GradientTransformationExtraArgs(init_fn, flax_metadata.on_values(update_fn))


def _inner_update(inner, coeff_tree, inner_state, extra_args):
  """``inner.update`` on the coefficients, with ``params=None``; an inner transform that
  reads params gets a one-line error that says why (optax's says the caller passed none)."""
  try:
    return inner.update(coeff_tree, inner_state, None, **extra_args)
  except ValueError as e:
    if "requires the current value of parameters" not in str(e):  # optax's NO_PARAMS_MSG
      raise
  raise ValueError(
      "galore_projection: the inner transform reads params (weight decay, say), but it sees"
      " the projected coefficients and params=None: put optax.add_decayed_weights after"
      " galore_projection in the chain, as galore_jax.galore_adamw does.")


def _project_back(leaves, mats, inner_updates, plans, bases, scale) -> list:
  """Full-space updates: ``scale`` times the inner updates projected back, for projected
  leaves; the inner updates themselves for the others.  ``mats``, the gradients' matrices,
  are not needed after: projecting back on a mesh may write into their buffers."""
  out = []
  for i, (leaf, u, plan) in enumerate(zip(leaves, inner_updates, plans)):
    if plan is None:
      out.append(u)
      continue
    # Emitted in the leaf's dtype by the matmul (float32 accumulation): the update
    # leaves in that dtype anyway, and a bf16 model skips a float32 full-size pass.
    full = projection.project_back(
        u, bases[i].left, bases[i].right, out_dtype=leaf.dtype, into=mats[i]) * scale
    out.append(projection.from_matrix(full, plan.view, leaf).astype(leaf.dtype))
  return out


def _fira_back(form, leaves, mats, coeffs, inner_updates, plans, bases, norms, scale, gamma):
  """Fira's full-space updates: the inner updates projected back plus the scaled, limited
  residual, each scaled by ``scale`` as ``form`` ("fira" or "fira_code", ``galore_projection``'s
  ``residual``) says, and the limiter's norms (``None`` without the limiter); the inner
  updates themselves for leaves that are not projected."""
  inside = 1.0 if form == "fira" else scale  # the code form scales P R and P N, not S
  out, new_norms = [], []
  for i, (leaf, u, plan) in enumerate(zip(leaves, inner_updates, plans)):
    if plan is None:
      out.append(u)
      new_norms.append(optax.MaskedNode())
      continue
    b = bases[i]
    gain = broadcastable_to(scaling.norm_ratio(u, coeffs[i], plan.left, eps=FIRA_EPS), mats[i])
    rest = (mats[i].astype(jnp.float32)
            - projection.project_back(coeffs[i], b.left, b.right) * inside) * gain
    if gamma is not None:
      rest, norm = scaling.limit_growth(rest, norms[i], gamma)
      new_norms.append(norm)
    if form == "fira":
      full = (projection.project_back(u, b.left, b.right) + rest) * scale
    else:
      full = projection.project_back(u, b.left, b.right) * scale + rest
    out.append(projection.from_matrix(full, plan.view, leaf).astype(leaf.dtype))
  return out, (tuple(new_norms) if gamma is not None else None)


def refresh_counts(opt_state: Any) -> jax.Array:
  """Total basis refreshes so far, over every projected leaf (for logging).

  Finds each state with a ``bases`` tuple (:class:`GaLoreProjectionState`,
  :class:`galore_jax.ScaleByLDAdamState`, :class:`galore_jax.ScaleByApolloState`) inside
  a (possibly nested) optimizer state and sums the ``refreshes`` counters of its leaves; a
  stacked leaf (scanned layers) counts once per refresh.  LDAdam refreshes every step;
  APOLLO's random projection counts when it is drawn anew (not at every regeneration).  A
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
        if isinstance(b, subspace.Bases):  # (a state stacked per layer: one per layer)
          total = total + jnp.sum(b.refreshes)
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
    numerics: str = "optax",
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
        _checks.decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate))

  galore-torch's ``GaLoreAdamW`` (Hugging Face's ``AdamW`` numerics) adds ``eps`` to
  :math:`\sqrt{v_t}` before bias correction, which at its default eps 1e-6 moves the first
  hundreds of steps wherever gradients are near 1e-4 or smaller: ``numerics="hf"`` (with
  ``eps=1e-6``) computes that (:func:`galore_jax.scale_by_adam_hf`).  It also decays the
  already-updated weights, a difference of order :math:`\eta^2 \lambda` that stays.

  Args:
    learning_rate: a float or an optax schedule.
    rank, update_proj_gap, scale, proj_type, mask, dimension_numbers, refresh,
      method, on_refresh, basis_dtype, key: as in :func:`galore_projection`
      (``on_refresh="transport"`` uses ``b1`` and ``b2`` as its betas).
    b1, b2, eps, eps_root, mu_dtype: as in ``optax.scale_by_adam``.
    weight_decay: decoupled weight decay :math:`\lambda`.
    weight_decay_mask: which leaves are decayed (default: all), optax
      convention.
    numerics: ``"optax"`` (``optax.scale_by_adam``'s) or ``"hf"`` (galore-torch's and
      Hugging Face ``AdamW``'s, :func:`galore_jax.scale_by_adam_hf`; ``eps_root`` must then
      be 0).

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
  return _decoupled_chain(
      _adam(numerics, b1, b2, eps, eps_root, mu_dtype),
      learning_rate, (b1, b2), weight_decay=weight_decay,
      weight_decay_mask=weight_decay_mask, rank=rank, update_proj_gap=update_proj_gap,
      scale=scale, proj_type=proj_type, mask=mask, dimension_numbers=dimension_numbers,
      refresh=refresh, method=method, on_refresh=on_refresh, basis_dtype=basis_dtype, key=key)


NUMERICS = ("optax", "hf")


def _adam(numerics, b1, b2, eps, eps_root, mu_dtype, correct_bias=True
          ) -> optax.GradientTransformation:
  """galore_adamw's inner Adam: optax's numerics, or Hugging Face's / galore-torch's (with
  ``correct_bias``, as their ``AdamW``'s)."""
  mu_dtype = _checks.float_dtype(mu_dtype, "mu_dtype")  # an int dtype would truncate mu
  _checks.nonnegative(eps, "eps")
  _checks.nonnegative(eps_root, "eps_root")
  if numerics not in NUMERICS:
    raise ValueError(f"numerics={numerics!r} is not one of {NUMERICS}.")
  if numerics == "optax":
    return optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype)
  if isinstance(eps_root, numbers.Real) and eps_root != 0:  # (arrays: inject_hyperparams)
    raise ValueError(f"eps_root={eps_root!r}: numerics='hf' has no eps_root (leave it 0).")
  return hf_adam.scale_by_adam_hf(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype,
                                  correct_bias=correct_bias)


def fira_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int | Any = 128, update_proj_gap: int = 200,
    scale: float | jax.Array = 0.25,
    proj_type: str = "std",
    limiter_gamma: float | jax.Array | None = 1.01,
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
    mu_dtype: Any | None = None,
    weight_decay: float = 0.0, weight_decay_mask: Any | Callable[[Any], Any] | None = None,
    mask: Any | Callable[[Any], Any] | None = None,
    dimension_numbers: Any | Callable[[Any], Any] | None = None,
    refresh: refresh_lib.RefreshPolicy | None = None,
    method: str | subspace.BasisMethod = "svd",
    on_refresh: str = "keep", basis_dtype: Any | None = None, key: jax.Array | int | None = None,
    residual: str = "fira",
) -> optax.GradientTransformationExtraArgs:
  r"""Fira-AdamW: :func:`galore_adamw` plus the scaled full-rank residual and its
  norm-growth limiter (Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
  Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_).

  .. math::
    \Delta_t = -\eta_t \Big( \alpha \big( \operatorname{proj}^{-1}(N_t)
      + \operatorname{lim}(S_t) \big) + \lambda\, \theta_{t-1} \Big)

  with :math:`N_t` the Adam step of the projected gradient :math:`R_t` and :math:`S_t` the
  part of the gradient outside the subspace, each channel scaled by
  :math:`\|N_{t,j}\| / (\|R_{t,j}\| + \epsilon)` (``galore_projection``'s ``residual``).
  Built as::

    optax.chain(
        galore_projection(optax.scale_by_adam(b1, b2, eps, eps_root, mu_dtype),
                          residual="fira", limiter_gamma=limiter_gamma, ...),
        _checks.decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate))

  A projected ``m x n`` matrix (``m <= n``) holds :math:`mr + 2nr + 1` values (the
  paper's: basis, moments, the limiter's norm), plus the refresh counter every GaLore
  leaf has.  The pre-training settings are GaLore's (lr 0.01, :math:`\alpha` 0.25,
  :math:`T` 200), :math:`\gamma` 1.01.

  ``residual="fira_code"`` is the update of the Fira repository's optimizer (a copy of
  Hugging Face's ``AdamW``), which ran the paper's tables: :math:`\Delta_t =
  -\eta_t(c_t(\alpha \operatorname{proj}^{-1}(N_t) + \operatorname{lim}(S'_t)) +
  \lambda\theta_{t-1})` with :math:`N_t = m_t / (\sqrt{v_t} + \epsilon)` (no bias
  correction), :math:`S'_t` the gradient less :math:`\alpha` times its part in the
  subspace, channel-scaled by :math:`N_t`'s gains (see :func:`galore_projection`), and the
  bias correction :math:`c_t = \sqrt{1 - \beta_2^t} / (1 - \beta_1^t)` on the whole step
  (:func:`galore_jax.scale_by_hf_bias_correction`), leaves that are not projected
  included.  Two differences are left: that code decays the already updated weight
  (:math:`\eta^2 \lambda` apart) and limits to :math:`\gamma (\|S'_{t-1}\| + 10^{-8})`.
  Its ``eps`` default is 1e-6 (pass ``eps=1e-6``).  At :math:`\alpha = 0.25` its residual
  is about 4x the paper equation's and carries 3/4 of the subspace's gradient.

  Args:
    learning_rate: a float or an optax schedule.
    rank, update_proj_gap, scale, proj_type, mask, dimension_numbers, refresh, method,
      on_refresh, basis_dtype, key: as in :func:`galore_projection` (``proj_type`` not
      ``"full"``; ``on_refresh="transport"`` uses ``b1`` and ``b2`` as its betas).
    limiter_gamma: :math:`\gamma`, or ``None`` for no limiter.
    b1, b2, eps, eps_root, mu_dtype: as in ``optax.scale_by_adam``.
    weight_decay, weight_decay_mask: as in :func:`galore_adamw`.
    residual: ``"fira"`` (the paper's equation, above) or ``"fira_code"`` (the released
      code's).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import galore_jax as gj
    >>> import jax, jax.numpy as jnp
    >>> tx = gj.fira_adamw(1e-2, rank=2)
    >>> params = {"w": jnp.zeros((8, 32))}
    >>> grads = {"w": jax.random.normal(jax.random.key(0), (8, 32))}
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> state[0].residual_norms[0] > 0, gj.tree_bytes(state[0].residual_norms)
    (Array(True, dtype=bool), 4)
  """
  inner, after = _adam("optax", b1, b2, eps, eps_root, mu_dtype), optax.identity()
  if _fira_form(residual) == "fira_code":  # its AdamW: the step size corrects the bias last
    inner = _adam("hf", b1, b2, eps, eps_root, mu_dtype, correct_bias=False)
    after = hf_adam.scale_by_hf_bias_correction(b1, b2)
  return _decoupled_chain(
      inner, learning_rate, (b1, b2), weight_decay=weight_decay,
      weight_decay_mask=weight_decay_mask, after=after, rank=rank,
      update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, mask=mask,
      dimension_numbers=dimension_numbers, refresh=refresh, method=method,
      on_refresh=on_refresh, basis_dtype=basis_dtype, key=key, residual=residual,
      limiter_gamma=limiter_gamma)


def _fira_form(residual):
  if residual not in ("fira", "fira_code"):
    raise ValueError(f"fira_adamw: residual must be 'fira' or 'fira_code', got {residual!r}.")
  return residual


def _decoupled_chain(inner, learning_rate, betas, *, weight_decay=0.0,
                     weight_decay_mask=None, after=optax.identity(), **projection_args):
  """``galore_projection(inner)`` (then ``after``), then decoupled weight decay in full
  space and the learning rate: the AdamW-style aliases.  ``betas`` are the inner Adam's (for
  ``on_refresh="transport"``), checked here since optax does not."""
  for name, beta in zip(("b1", "b2"), betas):
    _checks.unit_interval(beta, name)
  return optax.chain(
      galore_projection(inner, transport_betas=betas, **projection_args), after,
      _checks.decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(_checks.learning_rate(learning_rate)),
  )


def galore_adafactor(
    learning_rate: optax.ScalarOrSchedule | None,
    *,
    rank: int | Any = 128,
    update_proj_gap: int = 200,
    scale: float | jax.Array = 0.25,
    proj_type: str = "std",
    b1: float | None = None,
    decay_rate: float = 0.8,
    eps: tuple[float, float] = (1e-30, 1e-3),
    clip_threshold: float | None = 1.0,
    weight_decay: float = 0.0,
    weight_decay_mask: Any | Callable[[Any], Any] | None = None,
    scale_parameter: bool = False,
    relative_step: bool = False,
    warmup_init: bool = False,
    mu_dtype: Any | None = None,
    batch_dims: Any = None,
    mask: Any | Callable[[Any], Any] | None = None,
    dimension_numbers: Any | Callable[[Any], Any] | None = None,
    refresh: refresh_lib.RefreshPolicy | None = None, method: str | subspace.BasisMethod = "svd",
    on_refresh: str = "keep", basis_dtype: Any | None = None, key: jax.Array | int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""GaLore-Adafactor: Adafactor on low-rank gradient coefficients (galore-torch's
  ``GaLoreAdafactor``).

  .. math::
    \Delta_t = -\Big( \alpha\,\operatorname{proj}^{-1}(U_t)
      + \lambda\, \eta_t\, s\, \theta_{t-1} \Big)

  where :math:`U_t` is :func:`galore_jax.scale_by_adafactor` of the projected gradient
  (factored second moment of the coefficients, update-RMS clipping, times :math:`\eta_t`,
  then the optional first moment, in that order), :math:`\eta_t` the learning rate (or
  the relative step), :math:`s = \max(\epsilon_2, \operatorname{RMS}(\theta_{t-1}))` of
  the full weights with ``scale_parameter`` (else 1) and :math:`\lambda` the weight decay,
  in full space and not scaled by :math:`\alpha`.  Leaves that are not projected get the
  same Adafactor at full shape (factored when they have two axes or more).  Built as::

    optax.chain(
        galore_projection(scale_by_adafactor(learning_rate, b1=b1, ...), ...),
        adafactor.add_step_size_decay(learning_rate, weight_decay, weight_decay_mask),
        optax.scale(-1.0))        # wrapped in adafactor.with_param_scale(., eps[1])

  State bytes per projected ``m x n`` matrix (``proj_type="std"``, rank :math:`r`,
  :math:`b` bytes per entry of the leaf's dtype, :math:`b_\mu` of ``mu_dtype``): the basis
  :math:`r \min(m, n)` entries, the factored second moment of the
  :math:`\max(m, n) \times r` coefficients, :math:`\max(m, n) + r` float32 entries, and
  the first moment :math:`r \max(m, n)` when ``b1`` is set:

  .. math::
    b\, r\min(m,n) + 4\,\big(\max(m,n) + r\big) + [b_1]\, b_\mu\, r\max(m,n) + 4

  (the last 4: the basis's int32 refresh counter; for coefficients :math:`a \times c` under
  other ``proj_type`` s the moments are :math:`4(a + c) + [b_1]\, b_\mu ac`), against
  Adafactor's :math:`4(m + n) + [b_1]\, b_\mu mn`; plus a few int32 counters for the
  whole tree.

  Defaults follow galore-torch's C4 scripts, not its constructor: ``relative_step`` and
  ``scale_parameter`` are off (the reference defaults both on) and ``learning_rate`` is
  the step size.

  Args:
    learning_rate: a float or an optax schedule; ``None`` with ``relative_step=True``.
    rank, update_proj_gap, scale, proj_type, mask, dimension_numbers, refresh,
      method, basis_dtype, key: as in :func:`galore_projection`.
    on_refresh: ``"keep"`` (the reference) or ``"reset"`` (the refreshed leaf's row,
      column and first-moment statistics restart from zero; the decay schedule
      :math:`\hat\beta_{2,t}` does not, so its next steps are larger until the
      statistics refill, and the clipping bounds them); ``"transport"`` is refused
      (it is defined for Adam moments only).
    b1: first-moment decay (``optax.ema`` without debiasing) or ``None`` (the
      reference's default; the paper used one).
    decay_rate: :math:`c` of :math:`\hat\beta_{2,t} = 1 - t^{-c}`, > 0 (the
      reference's ``-0.8`` is ``0.8`` here).
    eps: :math:`(\epsilon_1, \epsilon_2)`: added to the squared gradient; the floor of
      the param scale (``scale_parameter`` only).
    clip_threshold: :math:`d` of the update-RMS clipping (per matrix of the
      coefficients); ``None`` disables it.
    weight_decay: :math:`\lambda`, times the step size (the reference's
      :math:`\theta \leftarrow \theta - \lambda \eta_t s\, \theta`).
    weight_decay_mask: which leaves are decayed (default: all), optax convention.
    scale_parameter: multiply the step size of each leaf by :math:`s`, from the full
      weights (the reference's ``scale_parameter=True``).
    relative_step, warmup_init: the step size
      :func:`galore_jax.adafactor.relative_step` (``learning_rate`` must be ``None``).
    mu_dtype: dtype of the first moment; default the leaf's (the reference keeps
      float32 for bf16 weights: ``mu_dtype=jnp.float32``).
    batch_dims: leading axes of a leaf that stack separate tensors, as in
      :func:`galore_jax.scale_by_adafactor` (a scanned model's layers: 1 for its stacked
      leaves, so that their norms are each a vector of their own, unfactored, and
      ``scale_parameter``'s RMS is per layer); ``None``: all but each leaf's last two.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    ValueError: as :func:`galore_projection`; for ``on_refresh="transport"``; a
      ``learning_rate`` with ``relative_step=True`` or none without it;
      ``warmup_init`` without ``relative_step``; ``eps`` not a pair of positive
      numbers; ``decay_rate <= 0``; ``clip_threshold <= 0``; ``b1`` outside [0, 1).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import galore_jax as gj
    >>> params = {"b": jnp.zeros(16), "w": jnp.zeros((64, 16))}
    >>> tx = gj.galore_adafactor(1e-2, rank=4, b1=0.9)
    >>> state = tx.init(params)
    >>> rms, *_, ema = state[0].inner_state        # coefficients of "w" are 64 x 4
    >>> rms.v_row["w"].shape, rms.v_col["w"].shape, ema.ema["w"].shape
    ((64,), (4,), (64, 4))
    >>> grads = {"b": jnp.ones(16), "w": jax.random.normal(jax.random.key(0), (64, 16))}
    >>> updates, state = tx.update(grads, state, params)
    >>> round(float(updates["b"][0]), 6)     # -(1 - b1) * lr * G / sqrt(V), V = G * G
    -0.001
  """
  eps1, eps2 = _adafactor_eps(eps)
  scale_parameter, relative_step, warmup_init = (_checks.flag(v, n) for v, n in (
      (scale_parameter, "scale_parameter"), (relative_step, "relative_step"),
      (warmup_init, "warmup_init")))
  learning_rate = _adafactor_step_size(learning_rate, relative_step, warmup_init)
  inner = adafactor.scale_by_adafactor(
      learning_rate, b1=b1, decay_rate=decay_rate, eps=eps1, clip_threshold=clip_threshold,
      mu_dtype=mu_dtype, batch_dims=batch_dims)
  tx = optax.chain(
      galore_projection(
          inner, rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
          mask=mask, dimension_numbers=dimension_numbers, refresh=refresh, method=method,
          on_refresh=on_refresh, basis_dtype=basis_dtype, key=key),
      adafactor.add_step_size_decay(learning_rate, weight_decay, weight_decay_mask),
      optax.scale(-1.0),
  )
  if not scale_parameter:
    return tx

  def tensor_axes(params):  # per leaf, the axes its tensors stack on, in the inner's order
    plans = plans_lib.leaf_plans(params, mask, dimension_numbers, rank, proj_type)
    counts = adafactor.leaf_batch_dims(batch_dims, leaves_lib.coefficient_tree(params, plans))
    return [tuple(range(b)) if plan is None else plan.view.perm[:b]
            for b, plan in zip(counts, plans)]

  return adafactor.with_param_scale(tx, eps2, batch_axes=tensor_axes)


def _adafactor_eps(eps) -> tuple[Any, Any]:
  try:
    eps1, eps2 = eps
  except (TypeError, ValueError):
    raise ValueError(f"eps must be a pair (eps1, eps2), got {eps!r}.") from None
  if not all(_checks.finite_real(e) and e > 0 for e in (eps1, eps2)):
    raise ValueError(f"eps must be a pair of finite numbers > 0, got {eps!r}.")
  return eps1, eps2


def _adafactor_step_size(learning_rate, relative_step, warmup_init):
  if warmup_init and not relative_step:
    raise ValueError("warmup_init=True needs relative_step=True.")
  if relative_step:
    if learning_rate is not None:
      raise ValueError(
          f"learning_rate={learning_rate!r} with relative_step=True: pass learning_rate=None"
          " (the step size is min(1e-2, 1/sqrt(t))) or relative_step=False.")
    return adafactor.relative_step(warmup_init)
  if learning_rate is None:
    raise ValueError("learning_rate is None: pass a float or a schedule, or relative_step=True.")
  return _checks.learning_rate(learning_rate)


def galore_adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int | Any = 128,
    update_proj_gap: int = 200,
    scale: float | jax.Array = 0.25,
    proj_type: str = "std",
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
    block_size: int = quantization.BLOCK_SIZE, min_8bit_size: int = 4096,
    batch_dims: Any = 0,
    weight_decay: float = 0.0,
    weight_decay_mask: Any | Callable[[Any], Any] | None = None,
    mask: Any | Callable[[Any], Any] | None = None,
    dimension_numbers: Any | Callable[[Any], Any] | None = None,
    refresh: refresh_lib.RefreshPolicy | None = None, method: str | subspace.BasisMethod = "svd",
    on_refresh: str = "keep", basis_dtype: Any | None = None, key: jax.Array | int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""8-bit GaLore: :func:`galore_adamw` with :func:`galore_jax.scale_by_adam_8bit` (the
  low-rank Adam moments block-wise quantized, as the paper's 8-bit GaLore with
  bitsandbytes) as the inner transform.

  .. math::
    \Delta_t = -\eta_t \left( \alpha\,\operatorname{proj}^{-1}(u_t) + \lambda\,\theta_{t-1}
    \right)

  with :math:`u_t` the 8-bit Adam step of the projected gradient.  Built as::

    optax.chain(
        galore_projection(scale_by_adam_8bit(b1, b2, eps, eps_root, ...), ...),
        _checks.decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate))

  Coefficient moments of fewer than ``min_8bit_size`` elements (and unprojected leaves
  that small: norms, biases) stay float32, as in galore-torch's ``GaLoreAdamW8bit``.
  ``on_refresh`` works on the quantized moments: ``"reset"`` re-initialises them,
  ``"transport"`` dequantizes, transports and quantizes again.

  Args:
    learning_rate: a float or an optax schedule.
    b1, b2, eps, eps_root: as in ``optax.scale_by_adam`` (``on_refresh="transport"``
      uses ``b1`` and ``b2`` as its betas).
    block_size, min_8bit_size, batch_dims: as in :func:`galore_jax.scale_by_adam_8bit`
      (``batch_dims`` counts the coefficients' leading axes: 1 for a scanned model's
      stacked leaves, whose coefficients are ``(L, a, c)``).
    weight_decay, weight_decay_mask: as in :func:`galore_adamw`.
    rank, update_proj_gap, scale, proj_type, mask, dimension_numbers, refresh, method,
      on_refresh, basis_dtype, key: as in :func:`galore_projection`.  Each is a named
      argument, so ``optax.inject_hyperparams`` can inject ``learning_rate`` (and
      ``scale``, ``b1``, ...) with ``rank``, ``update_proj_gap``, ``block_size``,
      ``min_8bit_size`` and ``batch_dims`` in its ``static_args``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import galore_jax as gj
    >>> params = {"w": jnp.zeros((4096, 64))}
    >>> tx = gj.galore_adamw_8bit(1e-3, rank=16)
    >>> state = tx.init(params)
    >>> state[0].inner_state.mu["w"].codes.shape     # 4096 x 16 moments, one byte each
    (4096, 16)
    >>> updates, state = tx.update({"w": jnp.ones((4096, 64))}, state, params)
    >>> updates["w"].shape
    (4096, 64)
  """
  return _decoupled_chain(
      scale_by_adam_8bit(b1, b2, eps, eps_root, block_size=block_size,
                         min_8bit_size=min_8bit_size, batch_dims=batch_dims),
      learning_rate, (b1, b2), weight_decay=weight_decay,
      weight_decay_mask=weight_decay_mask, rank=rank, update_proj_gap=update_proj_gap,
      scale=scale, proj_type=proj_type, mask=mask, dimension_numbers=dimension_numbers,
      refresh=refresh, method=method, on_refresh=on_refresh, basis_dtype=basis_dtype, key=key)

r"""LDAdam: Adam from low-dimensional gradient statistics, as an Optax transform.

Robert, Safaryan, Modoranu and Alistarh, `LDAdam: Adaptive Optimization from
Low-Dimensional Gradient Statistics <https://arxiv.org/abs/2410.16103>`_,
ICLR 2025.

For a selected leaf, viewed as a stack of matrices (left projection shown; the
right one is the mirror image), with :math:`t` the number of steps taken before
this one, :math:`g_t` the gradient, :math:`e_t` the error-feedback buffer
(:math:`e_0 = 0`), :math:`P_{-1} = 0` and :math:`m_{-1} = v_{-1} = 0`:

.. math::
  a_t = g_t + e_t \\
  P_t = \begin{cases}
    \text{top-}r \text{ left singular vectors of } a_0 & t = 0 \\
    \operatorname{orth}\big(b_t b_t^\top P_{t-1}\big),\;\;
    b_t = \rho\, \frac{P_{t-1} m_{t-1}}{1-\beta_1^t} + (1-\rho)\, a_t & t > 0
  \end{cases} \\
  \tilde g = P_t^\top a_t,\qquad Q = P_t^\top P_{t-1},\qquad \tilde m = Q\, m_{t-1} \\
  \tilde v = (1-\beta_2^t)\,\Big|\,(Q\circ Q)(\hat v - \hat m^2) + (Q \hat m)^2\Big|,
  \quad \hat m = \frac{m_{t-1}}{1-\beta_1^t},\; \hat v = \frac{v_{t-1}}{1-\beta_2^t}
  \quad (\tilde v = 0 \text{ at } t = 0) \\
  e_{t+1} = \big(a_t - P_t \tilde g\big)
    + \frac{\beta_1}{1-\beta_1}\big(P_{t-1} m_{t-1} - P_t \tilde m\big) \\
  m_t = \beta_1 \tilde m + (1-\beta_1)\tilde g,\qquad
  v_t = \beta_2 \tilde v + (1-\beta_2)\tilde g^2 \\
  u_t = P_t \Big[\frac{m_t / (1-\beta_1^{t+1})}
    {\sqrt{v_t/(1-\beta_2^{t+1})} + \epsilon}\Big]

(:math:`\circ` and the squares are element-wise).  This is the reference
algorithm as of its 2024-10-31 fix: the second moment is carried as a variance
through :math:`Q \circ Q` once (the first release applied it twice).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from galore_jax import galore
from galore_jax import projection
from galore_jax import sharding
from galore_jax import subspace

#: ``proj_type`` values of :func:`scale_by_ldadam` (``"full"`` has no LDAdam form).
LDADAM_PROJ_TYPES = ("std", "ldadam_std", "reverse_std", "left", "right")

_HIGHEST = jax.lax.Precision.HIGHEST
_F32 = jnp.float32


class ScaleByLDAdamState(NamedTuple):
  """State of :func:`scale_by_ldadam`.

  Attributes:
    count: int32 number of updates taken (the :math:`t` of the step about to run).
    mu: first moments, a params-shaped tree: the low-rank coefficients
      :math:`m` (``(*batch, r, n)`` for a left basis, ``(*batch, m, r)`` for a
      right one, in the leaf's matrix view) for projected leaves, the full-shape
      Adam moment for the others.
    nu: second moments, shaped like ``mu``.
    bases: one entry per leaf of the params, in ``jax.tree.leaves`` order: the
      basis :math:`P_{t-1}` of a projected leaf as a
      :class:`galore_jax.subspace.Bases` (``left`` ``(*batch, m, r)`` or
      ``right`` ``(*batch, n, r)``; zeros before the first step), else
      ``optax.MaskedNode()``.
    error: ``None`` without error feedback; else one entry per leaf: the
      error-feedback buffer :math:`e_t` (the leaf's full shape) of a projected
      leaf, ``optax.MaskedNode()`` for the others.

  Example:
    >>> import jax.numpy as jnp
    >>> import galore_jax as gj
    >>> params = {"b": jnp.zeros(4), "w": jnp.zeros((6, 4))}
    >>> state = gj.scale_by_ldadam(rank=2).init(params)
    >>> state.mu["w"].shape, state.mu["b"].shape, state.bases[1].right.shape
    ((6, 2), (4,), (4, 2))
    >>> state.error[0], state.error[1].shape             # "b" has no buffer
    (MaskedNode(), (6, 4))
  """

  count: jax.Array
  mu: Any
  nu: Any
  bases: tuple[Any, ...]
  error: tuple[Any, ...] | None


def _mT(x):
  return jnp.swapaxes(x, -1, -2)


def _mm(a, b):
  return jnp.matmul(a, b, precision=_HIGHEST, preferred_element_type=_F32)


def _max_normalize(x):
  """Each matrix divided by its largest magnitude (the power step is scale
  invariant; this keeps ``B B^T P`` inside float32's range)."""
  s = jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True)
  return x / jnp.where(s > 0, s, 1.0)


def _keep_finite(new, prev):
  return None if prev is None else subspace.keep_finite(new, prev)


def _power_step(b_Bxmxn, old: subspace.Bases) -> tuple[Any, Any]:
  """One block power step warm-started from the previous basis, then an
  orthonormalization that keeps the column order (Gram-Schmidt / QR-like):
  ``orth(B B^T P)`` for a left basis, ``orth(B^T B Q)`` for a right one."""
  b = _max_normalize(b_Bxmxn)
  if old.left is not None:
    y = _mm(b, _mm(_mT(b), old.left.astype(_F32)))
  else:
    y = _mm(_mT(b), _mm(b, old.right.astype(_F32)))
  basis = subspace.canonical_signs(subspace.orthonormalize(y))
  return (basis, None) if old.left is not None else (None, basis)


def _ldadam_plans(tree, mask, dimension_numbers, rank, proj_type):
  """galore's per-leaf plans; ``"ldadam_std"`` = ``"std"`` except that square
  matrices are projected on the left (the LDAdam reference's tie rule)."""
  base = "std" if proj_type == "ldadam_std" else proj_type
  plans = galore._plans(tree, mask, dimension_numbers, rank, base)
  if proj_type == "ldadam_std":
    plans = [
        p if p is None or p.view.m != p.view.n else p._replace(left=True, right=False)
        for p in plans
    ]
  return plans


def scale_by_ldadam(
    *,
    rank: int | Any,
    b1: float = 0.908,
    b2: float = 0.99,
    eps: float = 1e-8,
    rho: float = 0.908,
    proj_type: str = "std",
    error_feedback: bool = True,
    mask: Any | Callable[[Any], Any] | None = None,
    dimension_numbers: Any | Callable[[Any], Any] | None = None,
    state_dtype: Any | None = None,
) -> optax.GradientTransformation:
  r"""LDAdam's update direction: Adam on a subspace that follows the gradient.

  For each selected leaf (see the module docstring for the full recurrence):
  at step 0 the basis is the top-``rank`` singular subspace of the gradient
  (fp32 SVD); at every later step it moves by **one** block power step,
  warm-started from the previous basis, on the momentum-blended gradient
  :math:`b_t = \rho P_{t-1} m_{t-1}/(1-\beta_1^t) + (1-\rho) a_t`.  The Adam
  moments are transported to the new basis (the first by
  :math:`Q = P_t^\top P_{t-1}`, the second as a variance through
  :math:`Q\circ Q`, re-centred and kept nonnegative by an absolute value), and
  the part of the gradient and of the momentum that the projection drops is
  fed back into the next gradient (generalized error feedback).  The result is
  the Adam direction :math:`P_t\,\hat m_t / (\sqrt{\hat v_t} + \epsilon)`
  (AdamW form: ``eps`` after the square root of the bias-corrected
  :math:`v`), to be scaled by the learning rate (see :func:`ldadamw`).  Leaves
  that are not selected get plain Adam with the same betas, in the same form.

  Side rule.  ``proj_type`` follows :func:`galore_jax.galore_projection` (with
  dimension numbers the matrix is ``(output, input)``, like a torch weight):
  ``"std"`` is a left basis when ``m < n`` and a right one when ``m >= n``.  The
  LDAdam reference's ``'std'`` is left when ``m <= n``: the two agree except on
  square matrices (e.g. the attention projections of a LLaMA), which the
  reference projects on the left (its output axis) and ``"std"`` on the right.
  ``"ldadam_std"`` is the reference's rule, for faithful reproductions.  The
  reference's ``'reverse_std'`` (left when ``m >= n``) is ours for every shape.
  ``"full"`` is not available: LDAdam projects one side.

  Memory.  Per projected ``m x n`` matrix with a left basis the state holds
  ``m``, ``v`` (``r x n`` each) and ``P`` (``m x r``), as the reference; with
  ``error_feedback`` it also holds the error buffer :math:`e`, a full ``m x n``
  array.  PyTorch keeps that buffer in ``.grad`` at no extra cost; JAX has no
  persistent gradient buffer, so here it costs ``m n`` elements of
  ``state_dtype`` per matrix (as much as the weight).  ``error_feedback=False``
  drops it.

  Gradient clipping and accumulation.  The transform sees the gradient that
  the chain hands it, so ``optax.chain(optax.clip_by_global_norm(c),
  scale_by_ldadam(...))`` clips the fresh gradient :math:`g_t` only; the error
  :math:`e_t` is added afterwards, unclipped.  (In the reference ``.grad``
  holds :math:`g_t + e_t` and a clip would act on the sum; its LDAdam runs do
  not clip.)  Under ``optax.MultiSteps`` the step sees the mean of the
  micro-batch gradients, like the reference's loss/``k`` accumulation onto
  ``.grad``.

  Args:
    rank: ``r``, an int or a per-leaf pytree (prefix) / callable of params;
      clipped to ``min(m, n)`` (the reference raises when ``r`` exceeds the
      projected dimension, and accepts, with a forced side, ranks between
      ``min(m, n)`` and that dimension).
    b1: :math:`\beta_1` (reference default 0.908).
    b2: :math:`\beta_2` (reference default 0.99).
    eps: :math:`\epsilon`, added after the square root of the bias-corrected
      second moment.
    rho: :math:`\rho`, the weight of the momentum in the matrix the power step
      tracks (reference default 0.908).
    proj_type: ``"std"``, ``"ldadam_std"``, ``"reverse_std"``, ``"left"`` or
      ``"right"`` (see "Side rule").
    error_feedback: keep and feed back the error buffer.
    mask: which leaves are projected; as in
      :func:`galore_jax.galore_projection` (``None``: every 2-D leaf).
    dimension_numbers: how N-D leaves are matrices; as in
      :func:`galore_jax.galore_projection` (unnamed axes are batch axes, with a
      basis each).
    state_dtype: dtype of ``mu``, ``nu``, the bases and the error buffer;
      default each leaf's dtype (as the reference).  All arithmetic runs in
      float32.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`ScaleByLDAdamState`.

  Raises:
    ValueError: for an unknown ``proj_type``, ``rank < 1``, a mask / rank /
      dimension-numbers tree that does not fit the params, or dimension
      numbers that do not fit a leaf.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import galore_jax as gj
    >>> params = {"w": jnp.zeros((8, 12)), "b": jnp.zeros(12)}
    >>> tx = gj.scale_by_ldadam(rank=3)
    >>> state = tx.init(params)
    >>> grads = {"w": jax.random.normal(jax.random.key(0), (8, 12)),
    ...          "b": jnp.ones(12)}
    >>> updates, state = tx.update(grads, state)
    >>> state.bases[1].left.shape, state.mu["w"].shape    # 8 < 12: left basis
    ((8, 3), (3, 12))
    >>> jnp.round(updates["b"][:3], 4)                     # plain Adam: ~ sign(g)
    Array([1., 1., 1.], dtype=float32)
  """
  if proj_type not in LDADAM_PROJ_TYPES:
    raise ValueError(
        f"proj_type={proj_type!r} is not one of {LDADAM_PROJ_TYPES} (LDAdam"
        " projects one side; 'full' has no LDAdam form)."
    )
  if not callable(rank) and jax.tree.structure(rank) == jax.tree.structure(0):
    galore._check_rank(rank, "")
  for name, value in (("b1", b1), ("b2", b2), ("rho", rho)):
    # (arrays, e.g. from optax.inject_hyperparams, are the caller's to check)
    if isinstance(value, numbers.Real) and not 0.0 <= float(value) < 1.0:
      raise ValueError(f"scale_by_ldadam: {name}={value!r} is not in [0, 1).")

  def plans_for(tree):
    return _ldadam_plans(tree, mask, dimension_numbers, rank, proj_type)

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    plans = plans_for(params)
    moments, bases, error = [], [], []
    for leaf, plan, item in zip(leaves, plans, galore._param_items(params, len(leaves))):
      dtype = state_dtype or leaf.dtype
      like = sharding.sharding_of(leaf)  # state follows the param's sharding
      full_spec = jax.sharding.PartitionSpec() if like is None else like.spec
      if plan is None:
        moments.append(sharding.zeros(jnp.shape(leaf), dtype, like, full_spec))
        bases.append(optax.MaskedNode())
        error.append(optax.MaskedNode())
        continue
      moments.append(galore._coefficient_zeros(plan, leaf).astype(dtype))
      bases.append(galore._zeros_bases(plan, dtype, like, item))
      error.append(galore._in_variable(
          item, sharding.zeros(jnp.shape(leaf), dtype, like, full_spec), lambda s: s))
    moment_tree = galore._low_rank_tree(jax.tree.unflatten(treedef, moments), plans)
    return sharding.on_mesh_of(ScaleByLDAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=moment_tree,
        nu=moment_tree,
        bases=tuple(bases),
        error=tuple(error) if error_feedback else None,
    ), leaves)

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    plans = plans_for(updates)
    if len(state.bases) != len(leaves):
      raise ValueError(
          f"scale_by_ldadam state has {len(state.bases)} leaves but the updates"
          f" have {len(leaves)}: was the state made for other params?"
      )
    mus, nus = jax.tree.leaves(state.mu), jax.tree.leaves(state.nu)
    t = state.count
    bc1 = 1.0 - jnp.asarray(b1, _F32) ** t  # 0 at t = 0: only used where t > 0
    bc1_next = 1.0 - jnp.asarray(b1, _F32) ** (t + 1)
    bc2_next = 1.0 - jnp.asarray(b2, _F32) ** (t + 1)
    projected = [i for i, plan in enumerate(plans) if plan is not None]

    # Full-space quantities of the projected leaves: a = g + e and P_{t-1} m_{t-1}.
    a, prev_momentum = {}, {}
    for i in projected:
      a[i] = projection.to_matrix(leaves[i], plans[i].view).astype(_F32)
      if error_feedback:
        a[i] = a[i] + projection.to_matrix(state.error[i], plans[i].view).astype(_F32)
      old = state.bases[i]
      prev_momentum[i] = projection.project_back(mus[i].astype(_F32), old.left, old.right)

    # New bases: an SVD at step 0, one warm-started power step afterwards (one
    # lax.cond for every leaf, so later steps never run the SVD).
    mesh = sharding.context_mesh(leaves)

    def per_device(fn, i, stacks):
      """``fn`` on leaf ``i``'s matrices; under a mesh, each device takes its
      share (:func:`galore_jax.sharding.spread`) and the bases come back in the
      state's sharding."""
      if mesh is None:
        return fn(*stacks)
      old = state.bases[i]
      batch = plans[i].view.batch_shape
      flat = [None if x is None else galore._stack([x]) for x in stacks]
      p, q = sharding.spread(fn, flat, mesh)
      back = lambda x, like: None if x is None else sharding.place_like(
          x.reshape(*batch, *x.shape[-2:]), like)
      return back(p, old.left), back(q, old.right)

    def first_bases():
      return [
          per_device(
              lambda g, i=i: subspace.compute_bases(
                  g, plans[i].rank, left=plans[i].left, right=plans[i].right,
                  method="svd"),
              i, [a[i]])
          for i in projected
      ]

    def later_bases():
      scale = jnp.asarray(rho, _F32) / jnp.where(t > 0, bc1, 1.0)
      return [
          per_device(
              lambda b, left, right: _power_step(b, subspace.Bases(left, right, None)),
              i, [scale * prev_momentum[i] + (1.0 - rho) * a[i],
                  state.bases[i].left, state.bases[i].right])
          for i in projected
      ]

    new_bases = jax.lax.cond(t == 0, first_bases, later_bases) if projected else []

    out, new_mu, new_nu = [], list(mus), list(nus)
    new_basis_list, new_error = list(state.bases), (
        list(state.error) if error_feedback else None)
    for i, (g, plan) in enumerate(zip(leaves, plans)):
      mu, nu = mus[i].astype(_F32), nus[i].astype(_F32)
      if plan is None:  # plain Adam, AdamW form
        g = g.astype(_F32)
        mu = b1 * mu + (1.0 - b1) * g
        nu = b2 * nu + (1.0 - b2) * g * g
        u = (mu / bc1_next) / (jnp.sqrt(nu / bc2_next) + eps)
        out.append(u.astype(leaves[i].dtype))
        new_mu[i], new_nu[i] = mu.astype(mus[i].dtype), nu.astype(nus[i].dtype)
        continue
      old = state.bases[i]
      p, q = new_bases[projected.index(i)]
      # A basis that is not finite (non-finite gradient) keeps the previous one.  The
      # step uses the basis as stored (rounded to the state dtype, as the reference),
      # so that the error feedback accounts with the same P as the next step.
      new = subspace.Bases(
          _keep_finite(p, old.left), _keep_finite(q, old.right),
          subspace.count_refresh(old, p, q))
      stored = new._replace(
          left=None if new.left is None else new.left.astype(old.left.dtype),
          right=None if new.right is None else new.right.astype(old.right.dtype))
      new = jax.tree.map(lambda x: x.astype(_F32), stored._replace(refreshes=None))
      g_low = projection.project(a[i], new.left, new.right)
      q_left = galore._change_of_basis(new.left, old.left)
      q_right = galore._change_of_basis(new.right, old.right)
      mu_t, nu_t = galore._transport_adam(mu, nu, q_left, q_right, t, b1, b2)
      nu_t = jnp.where(t > 0, nu_t, nu)  # t = 0: nothing to transport (v = 0)
      if error_feedback:
        # (a - P g~) + c (P_{t-1} m_{t-1} - P m~), with one projection back.
        c = b1 / (1.0 - b1)
        err = a[i] + c * prev_momentum[i] - projection.project_back(
            g_low + c * mu_t, new.left, new.right)
        new_error[i] = projection.from_matrix(err, plan.view, state.error[i]).astype(
            state.error[i].dtype)
      mu = b1 * mu_t + (1.0 - b1) * g_low
      nu = b2 * nu_t + (1.0 - b2) * g_low * g_low
      direction = (mu / bc1_next) / (jnp.sqrt(nu / bc2_next) + eps)
      full = projection.project_back(direction, new.left, new.right)
      out.append(projection.from_matrix(full, plan.view, leaves[i]).astype(leaves[i].dtype))
      new_mu[i], new_nu[i] = mu.astype(mus[i].dtype), nu.astype(nus[i].dtype)
      new_basis_list[i] = stored

    return jax.tree.unflatten(treedef, out), ScaleByLDAdamState(
        count=optax.safe_increment(state.count),
        mu=jax.tree.unflatten(treedef, new_mu),
        nu=jax.tree.unflatten(treedef, new_nu),
        bases=tuple(new_basis_list),
        error=tuple(new_error) if error_feedback else None,
    )

  return optax.GradientTransformation(init_fn, update_fn)


def ldadamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int | Any,
    b1: float = 0.908,
    b2: float = 0.99,
    eps: float = 1e-8,
    rho: float = 0.908,
    weight_decay: float = 0.0,
    weight_decay_mask: Any | Callable[[Any], Any] | None = None,
    proj_type: str = "std",
    error_feedback: bool = True,
    mask: Any | Callable[[Any], Any] | None = None,
    dimension_numbers: Any | Callable[[Any], Any] | None = None,
    state_dtype: Any | None = None,
) -> optax.GradientTransformation:
  r"""LDAdamW: :func:`scale_by_ldadam` with decoupled weight decay.

  .. math::
    \Delta_t = -\eta_t \big( u_t + \lambda\, \theta_{t-1} \big)

  with :math:`u_t` the LDAdam direction (Adam for leaves that are not
  projected) and :math:`\lambda` = ``weight_decay``; the same as the reference
  ``LDAdamW``'s :math:`\theta(1-\eta\lambda) - \eta u`.  Built as::

    optax.chain(
        scale_by_ldadam(rank=rank, b1=b1, b2=b2, eps=eps, rho=rho, ...),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate))

  The reference's settings for C4 pretraining are lr 1e-3, betas
  (0.908, 0.99), eps 1e-8, ``rho`` 0.908, weight decay 0, no clipping.

  Args:
    learning_rate: a float or an optax schedule.
    rank, b1, b2, eps, rho, proj_type, error_feedback, mask, dimension_numbers,
      state_dtype: as in :func:`scale_by_ldadam`.
    weight_decay: decoupled weight decay :math:`\lambda`.
    weight_decay_mask: which leaves are decayed (default: all), optax
      convention.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import galore_jax as gj
    >>> target = jax.random.normal(jax.random.key(0), (16, 32))
    >>> params = {"w": jnp.zeros((16, 32))}
    >>> loss = lambda p: jnp.mean((p["w"] - target) ** 2)
    >>> tx = gj.ldadamw(0.05, rank=4)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> state = tx.init(params)
    >>> for _ in range(100):
    ...   params, state = step(params, state)
    >>> bool(loss(params) < 0.2 * loss({"w": jnp.zeros((16, 32))}))
    True
  """
  return optax.chain(
      scale_by_ldadam(
          rank=rank,
          b1=b1,
          b2=b2,
          eps=eps,
          rho=rho,
          proj_type=proj_type,
          error_feedback=error_feedback,
          mask=mask,
          dimension_numbers=dimension_numbers,
          state_dtype=state_dtype,
      ),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )

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

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from galore_jax import _checks
from galore_jax import leaves as leaves_lib
from galore_jax import moments
from galore_jax import plans as plans_lib
from galore_jax import projection
from galore_jax import refresh as refresh_lib
from galore_jax import subspace
from galore_jax._explicit import all_explicit
from galore_jax._explicit import context_mesh
from galore_jax._explicit import einsum
from galore_jax._explicit import on_mesh_of
from galore_jax._explicit import sharding_of
from galore_jax._explicit import zeros
from galore_jax.flax_metadata import in_variable
from galore_jax.flax_metadata import param_items

#: ``proj_type`` values of :func:`scale_by_ldadam` (``"full"`` has no LDAdam form).
LDADAM_PROJ_TYPES = projection.LDADAM_PROJ_TYPES

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
      ``right`` ``(*batch, n, r)``; before the first step the first ``r``
      coordinate vectors, the identity's first columns), else
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


@dataclasses.dataclass(frozen=True)
class _PowerStep(subspace.BasisMethod):
  """LDAdam's basis update, given the block power step's product ``Y`` (``B B^T P`` for a
  left basis, ``B^T B Q`` for a right one; :func:`_power_product`): its orthonormalization,
  which keeps the column order (Gram-Schmidt / QR-like).  A matrix whose product cannot be
  orthonormalized (a zero ``B``) keeps its previous basis, chosen by a select: this runs
  every step, and a ``lax.cond`` would sync a GPU with its host."""

  def __call__(self, y_Bxdxr, rank, *, left, right, prev, key=None):
    del rank, left, right, key  # the previous basis gives the side and the width
    p = prev.basis.astype(_F32)
    basis = subspace.canonical_signs(subspace.orthonormalize(y_Bxdxr, fallback=p))
    return (basis, None) if prev.left is not None else (None, basis)


def _power_product(a, mu, old, scale, weight):
  r"""The block power step's product for :math:`B = s P_0 M_0 + w a` (``scale`` ``s``,
  ``weight`` ``w``; :math:`P_0 M_0` the previous momentum in full space, for a left basis
  :math:`P_0`, or :math:`M_0 Q_0^\top` for a right one): :math:`B B^\top P_0` or
  :math:`B^\top B Q_0`.  ``B`` is never formed: with :math:`Z = B^\top P_0 = s M_0^\top
  (P_0^\top P_0) + w a^\top P_0`, :math:`B Z = s P_0 (M_0 Z) + w a Z`, so the full-size
  ``a`` is read twice and nothing full-size is written.  Each of the two products is divided
  by a bound on :math:`\max|B|` (:math:`|P_0 M_0|` is at most the largest column norm of
  :math:`M_0`, ``P_0`` having orthonormal columns), which keeps float32's range as dividing
  ``B`` would (:math:`|B^\top P| \le \sqrt{m} \max|B|`).  For a right basis the same runs on
  :math:`B^\top`, by the einsums' subscripts (no transpose is written)."""
  left = old.left is not None
  p0 = (old.left if left else old.right).astype(_F32)  # (d, r)
  # (r, e) for a left basis; (e, r) for a right one; e sharded as a's (a small gather)
  m0 = projection.unmoved(mu, old.left, old.right).astype(_F32)
  a_sub, m_sub = ("de", "re") if left else ("ed", "er")  # right: B^T's a^T and M_0^T
  hi = dict(precision=jax.lax.Precision.HIGHEST, preferred_element_type=_F32)
  col_norms = jnp.sqrt(jnp.sum(m0 * m0, axis=-2 if left else -1))
  peak = (scale * jnp.max(col_norms, axis=-1) + weight * jnp.max(jnp.abs(a), axis=(-2, -1)))
  inv = (1.0 / jnp.where(peak > 0, peak, 1.0))[..., None, None]
  gram = einsum("...dr,...ds->...rs", p0, p0, **hi)
  z = (scale * einsum(f"...{m_sub},...rs->...es", m0, gram, **hi)
       + weight * einsum(f"...{a_sub},...dr->...er", a, p0, **hi)) * inv
  mz = einsum(f"...{m_sub},...es->...rs", m0, z, **hi)
  return (scale * einsum("...dr,...rs->...ds", p0, mz, **hi)
          + weight * einsum(f"...{a_sub},...es->...ds", a, z, **hi)) * inv


def scale_by_ldadam(
    *,
    rank: int | Any,
    b1: float = 0.908,
    b2: float = 0.99,
    eps: float = 1e-8,
    rho: float = 0.908,
    proj_type: str = "ldadam_std",
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

  Side rule.  With dimension numbers the matrix is ``(output, input)``, like a
  torch weight.  The default ``"ldadam_std"`` is the LDAdam reference's
  ``'std'``: a left basis when ``m <= n``, a right one when ``m > n``, so a
  square matrix (the q, k, v, o projections of a LLaMA) is projected on the
  left, its output axis.  ``"std"`` is this library's rule (as
  :func:`galore_jax.galore_projection` and galore-torch: left when ``m < n``,
  right when ``m >= n``); it differs from the default on square matrices only,
  which it projects on the right (it was this transform's default until
  issue 18).  The reference's ``'reverse_std'`` (left when ``m >= n``) is ours for
  every shape.  ``"full"`` is not available: LDAdam projects one side.

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

  Host decision.  Step 0's SVD and the later steps' power step are the two branches of a
  ``lax.cond`` on the step count, which on a GPU copies its predicate to the host and
  waits, a sync per step.  A loop that counts its steps can pass ``galore_refresh=(step ==
  0)`` to ``update`` (a Python bool, a static argument of its jit; as for
  :func:`galore_jax.galore_projection`): each step then holds only its own branch.  A
  first step passed ``False`` takes the power step from the initial basis, the first ``r``
  coordinate vectors, instead of the SVD.

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
    proj_type: ``"ldadam_std"`` (default, the reference's rule), ``"std"``,
      ``"reverse_std"``, ``"left"`` or ``"right"`` (see "Side rule").
    error_feedback: keep and feed back the error buffer.
    mask: which leaves are projected; as in
      :func:`galore_jax.galore_projection` (``None``: every 2-D leaf).
    dimension_numbers: how N-D leaves are matrices; as in
      :func:`galore_jax.galore_projection` (unnamed axes are batch axes, with a
      basis each).
    state_dtype: dtype of ``mu``, ``nu``, the bases and the error buffer;
      default each leaf's dtype (as the reference), but float32 for the moments of a
      float16 leaf's coefficients (:func:`galore_jax.projection.coefficient_dtype`: their
      squares overflow float16).  A float16 error buffer overflows where the gradients do
      not (it holds about ``b1 / (1 - b1)`` times a change of momentum): ``float32`` for a
      float16 model with gradients of 1e4 or more.  All arithmetic runs in float32.

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
    >>> sq = {"q": jnp.zeros((8, 8))}                      # square: left by default
    >>> gj.scale_by_ldadam(rank=3).init(sq).bases[0].left.shape
    (8, 3)
    >>> gj.scale_by_ldadam(rank=3, proj_type="std").init(sq).bases[0].right.shape
    (8, 3)
    >>> jnp.round(updates["b"][:3], 4)                     # plain Adam: ~ sign(g)
    Array([1., 1., 1.], dtype=float32)
  """
  if proj_type not in LDADAM_PROJ_TYPES:
    raise ValueError(
        f"proj_type={proj_type!r} is not one of {LDADAM_PROJ_TYPES} (LDAdam"
        " projects one side; 'full' has no LDAdam form)."
    )
  if _checks.is_single(rank):
    _checks.rank(rank)
  for name, value in (("b1", b1), ("b2", b2), ("rho", rho)):
    _checks.unit_interval(value, f"scale_by_ldadam: {name}")
  _checks.nonnegative(eps, "scale_by_ldadam: eps")
  error_feedback = _checks.flag(error_feedback, "scale_by_ldadam: error_feedback")
  state_dtype = _checks.float_dtype(state_dtype, "scale_by_ldadam: state_dtype")

  def plans_for(tree):
    return plans_lib.leaf_plans(tree, mask, dimension_numbers, rank, proj_type)

  def init_fn(params):
    params = _checks.number_leaves_as_arrays(params)
    leaves, treedef = jax.tree.flatten(params)
    plans = plans_for(params)
    items = param_items(params, len(leaves))

    def moment_zeros():  # (called once per moment: mu and nu must not share buffers)
      return leaves_lib.low_rank_tree(jax.tree.unflatten(treedef, [
          zeros(jnp.shape(leaf), state_dtype or leaf.dtype, *_full_sharding(leaf))
          if plan is None else
          leaves_lib.coefficient_zeros(plan, leaf).astype(
              state_dtype or projection.coefficient_dtype(leaf.dtype))
          for leaf, plan in zip(leaves, plans)]), plans)

    # Coordinate vectors, not zeros: a power step then has a start even where a caller's
    # galore_refresh=False skips step 0's SVD (from a zero basis it would stay zero).
    bases = leaves_lib.all_zero_bases(params, plans, state_dtype, coordinates=True)
    error = [
        optax.MaskedNode() if plan is None else in_variable(
            item, zeros(jnp.shape(leaf), state_dtype or leaf.dtype, *_full_sharding(leaf)),
            lambda s: s)
        for leaf, plan, item in zip(leaves, plans, items)]
    leaves_lib.warn_if_no_savings(plans, "scale_by_ldadam")
    return on_mesh_of(ScaleByLDAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=moment_zeros(),
        nu=moment_zeros(),
        bases=leaves_lib.per_leaf_tuple(bases, params),
        error=leaves_lib.per_leaf_tuple(error, params) if error_feedback else None,
    ), leaves)

  def update_fn(updates, state, params=None, **extra_args):
    del params
    _checks.initialized(state, "scale_by_ldadam")
    _checks.floating_leaves(updates, "scale_by_ldadam")
    first = refresh_lib.host_flag(extra_args)  # step 0's SVD, decided on the host
    leaves, treedef = jax.tree.flatten(_checks.number_leaves_as_arrays(updates))
    plans = plans_for(updates)
    leaves_lib.check_fits(state.bases, plans, "scale_by_ldadam")
    leaves_lib.check_moments(state.mu, leaves, plans, "scale_by_ldadam")
    _checks.check_config(state.error, True if error_feedback else None, "error",
                         "scale_by_ldadam")
    mus, nus = jax.tree.leaves(state.mu), jax.tree.leaves(state.nu)
    errors = state.error if error_feedback else [None] * len(leaves)
    bc_next = _bias_corrections(state.count, b1, b2)
    a = _full_space(leaves, plans, errors)
    bases = _new_bases(a, mus, plans, state, context_mesh(leaves), b1, rho, first)
    out, new_mu, new_nu, new_error = [], [], [], []
    for i, (g, plan) in enumerate(zip(leaves, plans)):
      if plan is None:
        u, mu, nu = _adam_leaf(g, mus[i], nus[i], bc_next, b1, b2, eps)
        err = errors[i]
      else:
        u, mu, nu, err = _projected_leaf(
            g, projection.to_matrix(a[i], plan.view), mus[i], nus[i], state.bases[i],
            bases[i], errors[i],
            plan, state.count, bc_next, b1, b2, eps)
      out.append(u)
      new_mu.append(mu)
      new_nu.append(nu)
      new_error.append(err)
    return jax.tree.unflatten(treedef, out), ScaleByLDAdamState(
        count=optax.safe_increment(state.count),
        mu=jax.tree.unflatten(treedef, new_mu),
        nu=jax.tree.unflatten(treedef, new_nu),
        bases=tuple(bases),
        error=tuple(new_error) if error_feedback else None,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _full_sharding(leaf):
  """``(like, spec)`` for a full-shape state array: the param's own sharding, if any."""
  like = sharding_of(leaf)
  return like, jax.sharding.PartitionSpec() if like is None else like.spec


def _full_space(leaves, plans, errors) -> dict:
  """``a = g + e`` of the projected leaves, float32 in the leaf's own layout (its matrix
  view is taken where it is used: a transposing view made here would be an operand of the
  step-0 ``cond``, written out transposed every step), keyed by leaf index.  (The previous
  momentum ``P_{t-1} m_{t-1}`` is never formed in full space: the power step and the error
  feedback take it as its low-rank factors.)"""
  a = {}
  for i, plan in enumerate(plans):
    if plan is None:
      continue
    a[i] = leaves[i].astype(_F32)
    if errors[i] is not None:
      a[i] = a[i] + errors[i].astype(_F32)
  return a


def _new_bases(a, mus, plans, state, mesh, b1, rho, first=None) -> list:
  """The bases of this step, stored as the state keeps them: an SVD of ``a`` at step 0,
  one warm-started power step on the momentum-blended gradient afterwards (one
  ``lax.cond`` for every leaf, so later steps never run the SVD), each through the
  non-finite guard and spread over the mesh like galore's refresh (the power step's
  ``d x r`` products, not the full matrices).  ``first`` (a Python bool: the caller's
  ``galore_refresh``) replaces the ``cond`` by the branch it names."""
  projected = list(a)
  t = state.count
  mat = lambda i: projection.to_matrix(a[i], plans[i].view)  # inside a branch: see _full_space

  def refresh(mats, method):
    new = list(state.bases)
    for group in leaves_lib.stacks(projected, plans, mesh):
      # (No per-matrix flags: every matrix's moments move by Q = P_t^T P_{t-1}, a matrix
      # the guard kept by P^T P, the identity up to the stored basis's rounding.)
      got, _ = leaves_lib.refresh_group(group, mats, plans, state.bases, method, None, mesh)
      for i, b in zip(group, got):
        new[i] = b
    return new

  def later():
    bc1 = 1.0 - jnp.asarray(b1, _F32) ** t  # 0 at t = 0: only used where t > 0
    scale = jnp.asarray(rho, _F32) / jnp.where(t > 0, bc1, 1.0)
    products = {i: _unstacked(_power_product(mat(i), mus[i], state.bases[i], scale,
                                             1.0 - rho), mesh)
                for i in projected}
    return refresh(products, _PowerStep())

  if not projected:
    return list(state.bases)
  svd = lambda: refresh({i: mat(i) for i in projected}, subspace.SVD())
  if first is not None:
    return svd() if first else later()
  return jax.lax.cond(t == 0, svd, later)


def _unstacked(product, mesh):
  """The power step's ``(..., d, r)`` product with its batch axes whole on each device (Auto
  axes).  Left free, the spread's stack-sharded layout reached back into the product's
  einsums, whose ``(e, r)`` operand (sharded as the coefficients, over both mesh axes) then
  moved there in one jump: replicated whole.  Where a layer axis is sharded (FSDP over
  layers; the example's rules never shard it) this gathers the product, a basis's size."""
  if mesh is None or all_explicit(mesh):
    return product
  free = P.UNCONSTRAINED
  spec = P(*(None,) * (product.ndim - 2), free, free)
  return jax.lax.with_sharding_constraint(product, NamedSharding(mesh, spec))


def _bias_corrections(t, b1, b2):
  """``1 - b1^(t+1)`` and ``1 - b2^(t+1)``: the corrections of this step's moments."""
  return 1.0 - jnp.asarray(b1, _F32) ** (t + 1), 1.0 - jnp.asarray(b2, _F32) ** (t + 1)


def _adam_leaf(g, mu, nu, bc_next, b1, b2, eps):
  """Plain Adam (AdamW form) for a leaf that is not projected; a complex leaf keeps its
  phase in the first moment and takes :math:`|g|^2` in the second, as optax's Adam."""
  bc1_next, bc2_next = bc_next
  compute = jnp.promote_types(g.dtype, _F32)  # float32, or complex64 for a complex leaf
  g32 = g.astype(compute)
  m = b1 * mu.astype(compute) + (1.0 - b1) * g32
  v = b2 * nu.astype(compute) + (1.0 - b2) * (g32 * jnp.conj(g32)).real
  u = (m / bc1_next) / (jnp.sqrt(v.real / bc2_next) + eps)
  return u.astype(g.dtype), m.astype(mu.dtype), v.astype(nu.dtype)


def _projected_leaf(g, a, mu, nu, old, stored, error, plan, t, bc_next, b1, b2, eps):
  """One LDAdam step of a projected leaf: its moments transported to the new basis
  (which the step uses as stored, rounded to the state dtype as the reference, so that
  the error feedback accounts with the same basis as the next step), the error fed
  back, the Adam direction projected back."""
  new = jax.tree.map(lambda x: x.astype(_F32), stored._replace(refreshes=None))
  bc1_next, bc2_next = bc_next
  m32, v32 = mu.astype(_F32), nu.astype(_F32)
  g_low = projection.project(a, new.left, new.right)
  q_left = moments.change_of_basis(new.left, old.left)
  q_right = moments.change_of_basis(new.right, old.right)
  mu_t, nu_t = moments.transport_adam(m32, v32, q_left, q_right, t, b1, b2)
  nu_t = jnp.where(t > 0, nu_t, v32)  # t = 0: nothing to transport (v = 0)
  if error is not None:
    # (a - P g~) + c (P_{t-1} m_{t-1} - P m~): one projection back, through both bases.
    c = b1 / (1.0 - b1)
    err = a + _back_through_both(c * m32, old, -(g_low + c * mu_t), new)
    error = projection.from_matrix(err, plan.view, error).astype(error.dtype)
  m = b1 * mu_t + (1.0 - b1) * g_low
  v = b2 * nu_t + (1.0 - b2) * g_low * g_low
  direction = (m / bc1_next) / (jnp.sqrt(v / bc2_next) + eps)
  full = projection.project_back(direction, new.left, new.right)
  u = projection.from_matrix(full, plan.view, g).astype(g.dtype)
  return u, m.astype(mu.dtype), v.astype(nu.dtype), error


def _back_through_both(c_old, old, c_new, new):
  r""":math:`P_{old} C_{old} + P_{new} C_{new}` (right bases: :math:`C_{old} Q_{old}^\top +
  C_{new} Q_{new}^\top`) as one matmul of inner width ``2r``: one full-size product
  instead of two, at the default precision of the projections it replaces."""
  # (in the full matrices' layout first: the concatenation is along the rank axis, which
  # the coefficients may shard)
  c_old, c_new = (projection.unmoved(c, new.left, new.right) for c in (c_old, c_new))
  spec = projection.full_spec(c_new, new.left, new.right)
  if new.left is not None:
    both = jnp.concatenate([old.left.astype(_F32), new.left], axis=-1)
    return einsum("...mr,...rn->...mn", both, jnp.concatenate([c_old, c_new], axis=-2),
                  preferred_element_type=_F32, out_spec=spec)
  both = jnp.concatenate([old.right.astype(_F32), new.right], axis=-1)
  return einsum("...mr,...nr->...mn", jnp.concatenate([c_old, c_new], axis=-1), both,
                preferred_element_type=_F32, out_spec=spec)


def ldadamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int | Any,
    b1: float = 0.908, b2: float = 0.99, eps: float = 1e-8, rho: float = 0.908,
    proj_type: str = "ldadam_std",
    error_feedback: bool = True,
    mask: Any | Callable[[Any], Any] | None = None,
    dimension_numbers: Any | Callable[[Any], Any] | None = None,
    state_dtype: Any | None = None,
    weight_decay: float = 0.0,
    weight_decay_mask: Any | Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
  r"""LDAdamW: :func:`scale_by_ldadam` with decoupled weight decay.

  .. math::
    \Delta_t = -\eta_t \big( u_t + \lambda\, \theta_{t-1} \big)

  with :math:`u_t` the LDAdam direction (Adam for leaves that are not
  projected) and :math:`\lambda` = ``weight_decay``; the same as the reference
  ``LDAdamW``'s :math:`\theta(1-\eta\lambda) - \eta u`.  Built as::

    optax.chain(
        scale_by_ldadam(rank=rank, b1=b1, b2=b2, eps=eps, rho=rho, ...),
        _checks.decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate))

  The reference's settings for C4 pretraining are lr 1e-3, betas
  (0.908, 0.99), eps 1e-8, ``rho`` 0.908, weight decay 0, no clipping.

  Args:
    learning_rate: a float or an optax schedule.
    rank, b1, b2, eps, rho, proj_type, error_feedback, mask, dimension_numbers,
      state_dtype: as in :func:`scale_by_ldadam`.
    weight_decay, weight_decay_mask: decoupled weight decay :math:`\lambda`, and
      which leaves it applies to (default: all; optax convention).

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import galore_jax as gj
    >>> tx = gj.ldadamw(0.05, rank=4)
    >>> target = jax.random.normal(jax.random.key(0), (16, 32))
    >>> loss = lambda w: jnp.mean((w - target) ** 2)
    >>> def step(_, carry):                  # the params are one 16 x 32 matrix
    ...   w, state = carry
    ...   updates, state = tx.update(jax.grad(loss)(w), state, w)
    ...   return optax.apply_updates(w, updates), state
    >>> w0 = jnp.zeros((16, 32))
    >>> w, _ = jax.lax.fori_loop(0, 100, step, (w0, tx.init(w0)))
    >>> bool(loss(w) < 0.2 * loss(w0))
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
      _checks.decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(_checks.learning_rate(learning_rate)),
  )

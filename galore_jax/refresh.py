"""Refresh policies: on which steps each projected leaf recomputes its basis.

A policy is a small frozen object with pure methods, so it can sit in a
transform's closure and be compared and hashed (``inject_hyperparams`` static
args).  Its per-leaf state, if any, is a tuple of small arrays stored in the
optimizer state (so Orbax checkpoints it and resumes exactly).

The protocol:

* ``init(num_leaves) -> state``: initial policy state (``None`` if stateless).
* ``due(count, state) -> bool array``: whether to refresh at step ``count``
  (the count *before* the increment); shape ``()`` when :attr:`shared` (every
  leaf refreshes together: one ``lax.cond`` for the whole model) or
  ``(num_leaves,)`` otherwise.
* ``update(state, count, due, similarity) -> state``: the state after the
  step; ``due`` (shaped as ``due()`` returns it) says which leaves refreshed: due,
  and not wholly rejected by the non-finite guard (a gradient with a NaN or inf
  keeps the previous basis); ``similarity`` is a float32 ``(num_leaves,)``
  array, for each leaf that refreshed the overlap of its new and previous bases
  (see :func:`basis_similarity`; for a stack of matrices, over those the guard took;
  0 where it did not refresh).

Policies: :func:`every` (the paper's), :func:`every_step` (LDAdam),
:func:`staggered` (spreads leaves over the period, so no step after the first carries
every refresh) and :func:`lazy` (Q-GaLore's adaptive gap).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from galore_jax import _checks


# Under optax.inject_hyperparams the gap must be static: say so in the error.
HINT = ("update_proj_gap (under optax.inject_hyperparams pass it in"
        " static_args)")


class RefreshPolicy:
  """Base class of refresh policies (see the module docstring).

  Example: a policy that refreshes on the first ``k`` steps only.

    >>> import dataclasses
    >>> import jax.numpy as jnp
    >>> import galore_jax as gj
    >>> @dataclasses.dataclass(frozen=True)
    ... class FirstSteps(gj.RefreshPolicy):
    ...   k: int
    ...   def due(self, count, state):
    ...     return count < self.k
    >>> [bool(FirstSteps(2).due(jnp.int32(t), None)) for t in range(4)]
    [True, True, False, False]
  """

  shared: ClassVar[bool] = True
  # Whether update() reads `similarity` (computed only for such policies).
  uses_similarity: ClassVar[bool] = False

  def init(self, num_leaves: int) -> Any:
    del num_leaves
    return None

  def due(self, count: jax.Array, state: Any) -> jax.Array:
    raise NotImplementedError

  def update(
      self, state: Any, count: jax.Array, due: jax.Array, similarity: jax.Array
  ) -> Any:
    del count, due, similarity
    return state


@dataclasses.dataclass(frozen=True)
class Every(RefreshPolicy):
  """Refresh every leaf when ``count % update_proj_gap == 0`` (see :func:`every`).

  Example:
    >>> import galore_jax as gj
    >>> gj.refresh.Every(200) == gj.every(200)
    True
  """

  update_proj_gap: int

  def __post_init__(self):
    object.__setattr__(
        self, "update_proj_gap", _checks.int_at_least(self.update_proj_gap, 1, HINT))

  def due(self, count: jax.Array, state: Any) -> jax.Array:
    del state
    return count % self.update_proj_gap == 0


def every(update_proj_gap: int = 200) -> Every:
  r"""The paper's schedule: refresh on steps :math:`t \equiv 0 \pmod T`.

  ``t`` is the step count before the increment, so step 0 computes the first
  basis, then steps ``T, 2T, ...`` -- as ``iter % update_proj_gap == 0`` in
  galore-torch.

  Args:
    update_proj_gap: the gap ``T >= 1`` between refreshes.

  Returns:
    A :class:`RefreshPolicy`.

  Example:
    >>> import jax.numpy as jnp
    >>> import galore_jax as gj
    >>> policy = gj.every(3)
    >>> [bool(policy.due(jnp.int32(t), None)) for t in range(7)]
    [True, False, False, True, False, False, True]
  """
  return Every(update_proj_gap)


def every_step() -> Every:
  """Refresh every leaf on every step (LDAdam's schedule, with a cheap method).

  Example:
    >>> import galore_jax as gj
    >>> gj.every_step()
    Every(update_proj_gap=1)
  """
  return Every(1)


@dataclasses.dataclass(frozen=True)
class Staggered(RefreshPolicy):
  """Leaf ``j`` of ``N`` refreshes at step 0, then at ``o_j, o_j + T, ...``
  with ``o_j = floor(j T / N)`` (see :func:`staggered`)."""

  update_proj_gap: int
  shared: ClassVar[bool] = False

  def __post_init__(self):
    gap = _checks.int_at_least(self.update_proj_gap, 1, "update_proj_gap")
    object.__setattr__(self, "update_proj_gap", gap)

  def init(self, num_leaves: int) -> jax.Array:
    _checks.int_at_least(num_leaves, 0, "init: num_leaves")
    gap = self.update_proj_gap
    return jnp.asarray([j * gap // max(num_leaves, 1) for j in range(num_leaves)], jnp.int32)

  def due(self, count: jax.Array, state: jax.Array) -> jax.Array:
    offsets = state
    on_phase = (count >= offsets) & ((count - offsets) % self.update_proj_gap == 0)
    return (count == 0) | on_phase


def staggered(update_proj_gap: int = 200) -> Staggered:
  r"""Every leaf refreshes every ``T`` steps, but not all on the same step.

  All leaves compute a basis at step 0.  After that leaf :math:`j` of the
  :math:`N` projected leaves refreshes when :math:`t \ge o_j` and
  :math:`t \equiv o_j \pmod T` with :math:`o_j = \lfloor jT/N \rfloor`: with
  :math:`N \le T` no step after the first refreshes more than one leaf, so the
  refresh cost never piles up on one step.  The offsets live in the state.

  Example:
    >>> import jax.numpy as jnp
    >>> import galore_jax as gj
    >>> policy = gj.staggered(4)
    >>> offsets = policy.init(2)                     # two leaves: offsets 0, 2
    >>> for t in range(7):
    ...   print(t, policy.due(jnp.int32(t), offsets).tolist())
    0 [True, True]
    1 [False, False]
    2 [False, True]
    3 [False, False]
    4 [True, False]
    5 [False, False]
    6 [False, True]
  """
  return Staggered(update_proj_gap)


_MAX_GAP = 2**30


class LazyState(NamedTuple):
  """Per-leaf state of :func:`lazy`."""

  gap: jax.Array  # int32 (N,), current gap of each leaf
  similarities: jax.Array  # float32 (N, window), the latest basis similarities, oldest first
  num_similarities: jax.Array  # int32 (N,), how many of them are filled (at most window)


@dataclasses.dataclass(frozen=True)
class Lazy(RefreshPolicy):
  """Q-GaLore's layer-adaptive gap (see :func:`lazy`)."""

  update_proj_gap: int
  threshold: float = 0.4
  growth: int = 2
  window: int = 5
  shared: ClassVar[bool] = False
  uses_similarity: ClassVar[bool] = True

  def __post_init__(self):
    gap = _checks.int_at_least(self.update_proj_gap, 1, "update_proj_gap")
    object.__setattr__(self, "update_proj_gap", gap)
    object.__setattr__(self, "growth", _checks.int_at_least(self.growth, 1, "growth"))
    object.__setattr__(self, "window", _checks.int_at_least(self.window, 1, "window"))
    # A similarity is a |cosine|, in [0, 1]: a threshold past 1 would never grow a gap.
    if (isinstance(self.threshold, bool) or not isinstance(self.threshold, numbers.Real)
        or not 0.0 <= self.threshold <= 1.0):
      raise ValueError(f"threshold must be a number in [0, 1] (a basis similarity is a"
                       f" |cosine|), got {self.threshold!r}.")

  def init(self, num_leaves: int) -> LazyState:
    n = _checks.int_at_least(num_leaves, 0, "init: num_leaves")
    return LazyState(
        gap=jnp.full((n,), self.update_proj_gap, jnp.int32),
        similarities=jnp.zeros((n, self.window), jnp.float32),
        num_similarities=jnp.zeros((n,), jnp.int32),
    )

  def due(self, count: jax.Array, state: LazyState) -> jax.Array:
    return count % state.gap == 0

  def update(self, state, count, due, similarity) -> LazyState:
    # A refresh with a previous basis (not the first one) records its similarity.
    record = due & (count > 0)
    sims = jnp.where(
        record[:, None],
        jnp.concatenate([state.similarities[:, 1:], similarity[:, None]], axis=1),
        state.similarities,
    )
    num = jnp.where(record, jnp.minimum(state.num_similarities + 1, self.window),
                    state.num_similarities)
    grow = record & (num >= self.window) & (sims.mean(axis=1) >= self.threshold)
    grow &= state.gap <= _MAX_GAP // self.growth  # int32: a gap past 2**30 steps stops growing
    return LazyState(
        gap=jnp.where(grow, state.gap * self.growth, state.gap),
        similarities=sims,
        num_similarities=num,
    )


def lazy(
    update_proj_gap: int = 200,
    threshold: float = 0.4,
    growth: int = 2,
    window: int = 5,
) -> Lazy:
  r"""Q-GaLore's lazy, layer-adaptive refresh (Zhang et al., 2024).

  Each leaf :math:`j` has a gap :math:`T_j`, initially ``T``, and refreshes when
  :math:`t \equiv 0 \pmod{T_j}` (so at step 0).  At each of its refreshes after the
  first, the similarity of its new and previous bases (:func:`basis_similarity`:
  Q-GaLore's cosine of the leading vectors, made sign-invariant) enters a sliding
  window of the last ``window`` ones; when the window is full and its mean is at
  least ``threshold`` (in [0, 1]), :math:`T_j \leftarrow` ``growth`` :math:`\cdot T_j` (it
  only grows).  The window slides on, so a leaf whose subspace stays settled
  grows its gap at each further refresh: with ``T = 200``, ``window = 5`` and a
  fixed subspace the refreshes are at 0, 200, ..., 1000, 1200, 1600, 3200, 6400,
  ... as in Q-GaLore's projector.  A leaf is one gradient leaf: the layers of a
  scanned ``(L, d, f)`` kernel share one gap (their similarity is averaged over the layers
  whose refresh the non-finite guard took: a layer that kept its basis, its gradient
  holding a NaN or inf, is left out, as it would read 1.0; so is a layer's first basis, with
  none before it to be compared with).

  Example:
    >>> import jax.numpy as jnp
    >>> import galore_jax as gj
    >>> policy = gj.lazy(100, threshold=0.4, growth=2, window=5)
    >>> state = policy.init(3)
    >>> state.gap.tolist(), policy.due(jnp.int32(0), state).tolist()
    ([100, 100, 100], [True, True, True])
  """
  return Lazy(update_proj_gap, threshold, growth, window)


def resolve(refresh: Any, update_proj_gap: int) -> RefreshPolicy:
  """A transform's policy: ``refresh`` itself, or ``every(update_proj_gap)`` when it is
  ``None``; a one-line ``ValueError`` for anything that is not a :class:`RefreshPolicy`.

  Example:
    >>> from galore_jax import refresh
    >>> refresh.resolve(None, 50)
    Every(update_proj_gap=50)
  """
  if refresh is None:
    return every(update_proj_gap)
  if not isinstance(refresh, RefreshPolicy):
    raise ValueError(
        "refresh must be a galore_jax refresh policy such as"
        f" galore_jax.every(200), got {refresh!r}."
    )
  return refresh


HOST_REFRESH = "galore_refresh"  # the extra arg of update() that decides on the host


def check_drawn(policy: RefreshPolicy, method: Any, what: str, fix: str) -> None:
  """A one-line ``ValueError`` for a policy that compares successive bases
  (:attr:`~RefreshPolicy.uses_similarity`: :func:`lazy`) with a basis method that draws
  its bases without reading the gradient (``method.reads_gradient`` false): their overlap
  says nothing of the subspace, so the gap would never grow.  ``what`` names the method
  as the caller gave it, ``fix`` says what to give instead.

  Example:
    >>> import galore_jax as gj
    >>> from galore_jax import refresh, subspace
    >>> refresh.check_drawn(gj.lazy(10), subspace.Random(), "method='random'", "use svd")
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: method='random' draws its bases: ... need bases computed from the gradient: use svd.
  """
  if policy.uses_similarity and not getattr(method, "reads_gradient", True):
    raise ValueError(f"{what} draws its bases: refresh policies that compare successive bases"
                     f" (lazy) need bases computed from the gradient: {fix}.")


def due_now(policy: RefreshPolicy, count: jax.Array, state: Any, num_leaves: int) -> jax.Array:
  """``policy.due(count, state)``, checked against the protocol (a bool array of shape
  ``()`` for a shared policy, else ``(num_leaves,)``, one per projected leaf) so that a
  custom policy that breaks it is named in one ``ValueError`` line, not met inside JAX.
  Shapes and dtypes only (fine under ``jit``).

  Example:
    >>> import jax.numpy as jnp
    >>> import galore_jax as gj
    >>> from galore_jax import refresh
    >>> refresh.due_now(gj.every(2), jnp.int32(4), None, 3).tolist()
    True
  """
  due = jnp.asarray(policy.due(count, state))
  want = () if policy.shared else (num_leaves,)
  if due.shape != want or due.dtype != bool:
    which = "shared" if policy.shared else "one per projected leaf"
    raise ValueError(f"refresh: {type(policy).__name__}.due must return a bool array of shape"
                     f" {want} ({which}), got shape {due.shape} {due.dtype}.")
  return due


def host_flag(extra_args: dict) -> bool | None:
  """``extra_args``'s ``galore_refresh``: a Python (or NumPy) bool a caller decided on the
  host, as a ``bool``; ``None`` when absent.  Anything else (a JAX array, which may be
  traced) is a one-line ``ValueError``.

  Example:
    >>> from galore_jax import refresh
    >>> refresh.host_flag({"galore_refresh": True}), refresh.host_flag({})
    (True, None)
  """
  value = extra_args.get(HOST_REFRESH)
  if value is None:
    return None
  if not isinstance(value, (bool, np.bool_)):  # not an array: it may be traced
    raise ValueError(f"{HOST_REFRESH}: expected a Python bool (whether this step refreshes,"
                     f" decided on the host) or None, got {value!r}")
  return bool(value)


def host_decision(policy: RefreshPolicy, extra_args: dict) -> bool | None:
  """The refresh decision a caller made on the host for this step (:func:`host_flag`), or
  ``None`` when it made none (the policy decides on the device).  A decision needs an
  :class:`Every` policy, which a host can follow (``step % update_proj_gap == 0``);
  anything else is a one-line ``ValueError``.

  Example:
    >>> import galore_jax as gj
    >>> from galore_jax import refresh
    >>> refresh.host_decision(gj.every(200), {"galore_refresh": False})
    False
    >>> refresh.host_decision(gj.every(200), {}) is None
    True
  """
  value = host_flag(extra_args)
  if value is not None and not isinstance(policy, Every):
    raise ValueError(f"{HOST_REFRESH}: a host decision needs the refresh policy every(T),"
                     f" which a host can follow; this transform's is {policy!r}")
  return value


def basis_similarity(old: jax.Array, new: jax.Array, taken: jax.Array | None = None
                     ) -> jax.Array:
  r"""Sign-invariant overlap of the leading vectors of two bases.

  :math:`|\langle b^{\text{old}}_1, b^{\text{new}}_1 \rangle|` for
  ``(..., d, r)`` bases (columns ordered by singular value), averaged over any
  batch axes: Q-GaLore's cosine of the leading singular vectors, made
  independent of the SVD's sign choice.  ``taken`` (a bool array of the batch
  shape) averages over the matrices it marks only (0 where it marks none): those
  whose refresh the non-finite guard took, a kept basis being no measure of drift.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import refresh
    >>> e = jnp.eye(3)[:, :2]
    >>> float(refresh.basis_similarity(e, -e)), float(refresh.basis_similarity(e, e[:, ::-1]))
    (1.0, 0.0)
    >>> two, other = jnp.stack([e, e]), jnp.stack([e[:, ::-1], e])
    >>> float(refresh.basis_similarity(two, other, taken=jnp.array([True, False])))
    0.0
  """
  _check_similarity_args(old, new, taken)
  f32 = jnp.float32
  cos = jnp.abs(jnp.sum(old[..., :, 0].astype(f32) * new[..., :, 0].astype(f32), axis=-1))
  if taken is None:
    return jnp.mean(cos)
  return jnp.sum(jnp.where(taken, cos, 0.0)) / jnp.maximum(jnp.sum(taken), 1)


def _check_similarity_args(old, new, taken) -> None:
  """One line for what :func:`basis_similarity` would misread: a ``taken`` of numbers (0.5
  or 2 counted as weights, a |cosine| above 1), complex bases (0), shapes that do not
  pair."""
  shapes = (jnp.shape(old), jnp.shape(new))
  if shapes[0] != shapes[1] or len(shapes[0]) < 2 or shapes[0][-1] < 1:
    raise ValueError("basis_similarity: old and new must be (..., d, r) bases of one shape,"
                     f" r >= 1, got {shapes[0]} and {shapes[1]}.")
  for arg, x in (("old", old), ("new", new)):
    _checks.real_array(x, f"basis_similarity: {arg}", "expected real bases.")
  batch = shapes[0][:-2]
  if taken is not None and (jnp.result_type(taken) != jnp.bool_ or jnp.shape(taken) != batch):
    raise ValueError(f"basis_similarity: taken must be a bool array of the batch shape {batch},"
                     f" got {jnp.result_type(taken)} {jnp.shape(taken)}.")

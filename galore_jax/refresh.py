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
* ``update(state, count, due) -> state``: the state after the step.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar

import jax
import jax.numpy as jnp


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

  def init(self, num_leaves: int) -> Any:
    del num_leaves
    return None

  def due(self, count: jax.Array, state: Any) -> jax.Array:
    raise NotImplementedError

  def update(self, state: Any, count: jax.Array, due: jax.Array) -> Any:
    del count, due
    return state


@dataclasses.dataclass(frozen=True)
class Every(RefreshPolicy):
  """Refresh every leaf when ``count % update_proj_gap == 0`` (see :func:`every`).

  Example:
    >>> import galore_jax as gj
    >>> gj.Every(200) == gj.every(200)
    True
  """

  update_proj_gap: int

  def __post_init__(self):
    gap = self.update_proj_gap
    if isinstance(gap, bool) or not isinstance(gap, numbers.Integral) or gap < 1:
      raise ValueError(
          f"update_proj_gap must be an int >= 1, got {gap!r}. (Under"
          " optax.inject_hyperparams pass it in static_args.)"
      )
    object.__setattr__(self, "update_proj_gap", int(gap))

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

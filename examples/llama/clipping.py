"""The gradient's global norm and its clip, as both training steps take them.

The norm is summed in float32 whatever the gradients' dtype: summed in bfloat16, as
``optax.tree.norm`` sums bf16 gradients, it is off by about 1e-3, and the ordinary step and
the per-layer step (which sums it layer by layer) would clip differently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def sum_of_squares(tree):
  """Sum of squares of a tree's entries, in float32 whatever their dtype (the cast fuses into
  the reduction: no float32 copy is written)."""
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


def global_norm(tree):
  """The float32 global norm of a tree (:func:`sum_of_squares`)."""
  return jnp.sqrt(sum_of_squares(tree))


def clip(grads, norm, max_norm):
  """``optax.clip_by_global_norm``'s scaling, with the global norm given."""
  if max_norm is None:
    return grads
  trigger = jnp.squeeze(norm < max_norm)
  return jax.tree.map(
      lambda t: jax.lax.select(trigger, t, (t / norm.astype(t.dtype)) * max_norm), grads)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """``optax.clip_by_global_norm`` with the global norm in float32 (:func:`global_norm`),
  as the per-layer step clips: the ordinary step's clip in the example."""

  def update(updates, state, params=None):
    del params
    return clip(updates, global_norm(updates), max_norm), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)

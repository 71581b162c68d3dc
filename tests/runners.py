"""Runs galore_jax on given gradient sequences, for comparison with the oracle and galore-torch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import galore_jax as gj


def run_galore_jax(params, grads_per_step, *, lr, rank, update_proj_gap, scale, proj_type,
                   b1, b2, eps, weight_decay, numerics="optax"):
  """gj.galore_adamw on dicts of NumPy arrays; returns the params after each step."""
  tx = gj.galore_adamw(lr, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                       proj_type=proj_type, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                       numerics=numerics)
  return run_transform(tx, params, grads_per_step)


def run_transform(tx, params, grads_per_step):
  """Any optax transform on dicts of NumPy arrays (jitted update); the params after each
  step."""
  p = {k: jnp.asarray(v) for k, v in params.items()}
  state = tx.init(p)
  update = jax.jit(tx.update)
  history = []
  for grads in grads_per_step:
    updates, state = update({k: jnp.asarray(v) for k, v in grads.items()}, state, p)
    p = optax.apply_updates(p, updates)
    history.append({k: np.asarray(v) for k, v in p.items()})
  return history

"""``galore_stack_slice``: a transform updating one slice of stacked leaves at a time (a
scanned model's layers, as the LLaMA example's per-layer updates do) draws the random
sketches the stacked update draws for that slice, so both give the same updates.

The stacked update sees ``{"a": bias, "w": (L, m, n)}`` (``w`` is leaf 1); each slice
update sees ``{"w": (m, n)}`` (leaf 0) with its own state, ``StackSlice(l, leaf_offset=1)``.
Without the slice every layer draws the same sketch, unlike the stacked update: the test
checks that it then differs, so it can fail.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import galore_jax as gj
from galore_jax import draws

L, M, N, RANK, STEPS = 3, 24, 32, 3, 5
STACKED = gj.DimensionNumbers(reduction_axis=1, output_axis=2)
ONE = gj.DimensionNumbers(reduction_axis=0, output_axis=1)  # a slice, viewed as the stack's

OPTIMIZERS = {
    "galore_random": lambda dims: gj.galore_adamw(
        1e-2, rank=RANK, update_proj_gap=2, method="random", dimension_numbers=dims),
    "galore_randomized": lambda dims: gj.galore_adamw(
        1e-2, rank=RANK, update_proj_gap=2, method="randomized", dimension_numbers=dims),
    "galore_power": lambda dims: gj.galore_adamw(  # its first basis: a keyed range finder
        1e-2, rank=RANK, update_proj_gap=2, method="power", dimension_numbers=dims),
    "apollo": lambda dims: gj.apollo_adamw(
        1e-2, rank=RANK, update_proj_gap=2, dimension_numbers=dims),
    "apollo_mini": lambda dims: gj.apollo_mini(1e-2, update_proj_gap=2, dimension_numbers=dims),
}


def grads_at(t):
  keys = jax.random.split(jax.random.key(t), 2)
  return {"a": jax.random.normal(keys[0], (5,)), "w": jax.random.normal(keys[1], (L, M, N))}


def run(name, sliced: bool):
  """Per step, the stacked update's ``w`` and each slice update's, stacked."""
  tx_all = OPTIMIZERS[name]({"a": None, "w": STACKED})
  tx_one = OPTIMIZERS[name]({"w": ONE})
  params = {"a": jnp.zeros((5,)), "w": jnp.zeros((L, M, N))}
  state_all = tx_all.init(params)
  states = [tx_one.init({"w": params["w"][l]}) for l in range(L)]

  @jax.jit
  def one(g, state, l):
    extra = {"galore_stack_slice": gj.StackSlice(l, leaf_offset=1)} if sliced else {}
    return tx_one.update({"w": g}, state, {"w": jnp.zeros((M, N))}, **extra)

  out = []
  for t in range(STEPS):
    g = grads_at(t)
    u_all, state_all = jax.jit(tx_all.update)(g, state_all, params)
    u_layers = []
    for l in range(L):
      u, states[l] = one(g["w"][l], states[l], jnp.int32(l))
      u_layers.append(u["w"])
    out.append((u_all["w"], jnp.stack(u_layers)))
  return out


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_slices_draw_what_the_stacked_update_draws(name):
  for t, (stacked, slices) in enumerate(run(name, sliced=True)):
    np.testing.assert_allclose(slices, stacked, rtol=1e-5, atol=1e-7, err_msg=f"step {t}")
  # without the slice, the layers' sketches are the same draw: not the stacked update's
  stacked, slices = run(name, sliced=False)[0]
  assert not np.allclose(slices, stacked, rtol=1e-3)


def test_a_bad_stack_slice_is_a_one_line_error():
  tx = gj.galore_adamw(1e-2, rank=2, method="random")
  params = {"w": jnp.zeros((6, 4))}
  state = tx.init(params)
  # (an index of -1 drew wrapped keys, 1.5 matrix 3's, True matrix 1's; a str failed in JAX)
  index = "index must be an int >= 0 or an integer scalar array, got"
  for bad, match in [((1, 0), "expected a galore_jax.StackSlice"),
                     (gj.StackSlice(1, leaf_offset=-1), "leaf_offset must be an int >= 0"),
                     (gj.StackSlice(-1), f"{index} -1"), (gj.StackSlice(1.5), f"{index} 1.5"),
                     (gj.StackSlice(True), f"{index} True"), (gj.StackSlice("a"), f"{index} 'a'"),
                     (gj.StackSlice(jnp.float32(1)), index),
                     (gj.StackSlice(jnp.array([1, 2])), index)]:
    with pytest.raises(ValueError, match=match) as info:
      tx.update(params, state, params, galore_stack_slice=bad)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("call, match", [
    # each truncated the float (or took the bool) and drew another matrix's keys, silently
    (lambda k: draws.matrix_keys(k, (2,), start=1.5), r"^matrix_keys: start must be an int"),
    (lambda k: draws.fold_in_each(draws.matrix_keys(k, (2,)), 1.9),
     r"^fold_in_each: data must be an int"),
    (lambda k: draws.leaf_key(k, 1.9, 2), r"^leaf_key: i must be an int"),
    (lambda k: draws.leaf_key(k, 1, True), r"^leaf_key: step must be an int"),
    (lambda k: draws.leaf_key(k, 1, jnp.float32(2)), r"^leaf_key: step must be an int"),
])
def test_draw_indices_are_integers(call, match):
  with pytest.raises(ValueError, match=match + r" or an integer array, got"):
    call(jax.random.key(0))


def test_traced_integer_indices_draw():
  """An index traced in a loop (an int32 array) is the loop's: it draws as its int."""
  key = jax.random.key(0)
  got = jax.jit(lambda i: jax.random.key_data(draws.leaf_key(key, i, i + 1)))(jnp.int32(2))
  np.testing.assert_array_equal(got, jax.random.key_data(draws.leaf_key(key, 2, 3)))


@pytest.mark.parametrize("call, match", [
    # an int seed failed inside JAX ("invalid PRNG key data: expected key_data.ndim >= 1")
    (lambda: draws.matrix_keys(0, (2,)),
     r"^matrix_keys: key must be a PRNG key, raw uint32 key data or None, got int32 shape \(\)"
     r" \(for a seed, pass jax\.random\.key\(seed\)\)\.$"),
    # a negative size failed in MLIR ("Invalid type")
    (lambda: draws.normal(draws.matrix_keys(jax.random.key(0), (3,)), (-4, 2)),
     r"^normal: shape must be non-negative ints, got \(-4, 2\)\.$"),
])
def test_draws_bad_input_is_one_line(call, match):
  with pytest.raises(ValueError, match=match):
    call()

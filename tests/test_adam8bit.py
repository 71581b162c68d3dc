"""galore_jax.scale_by_adam_8bit / adamw_8bit: optax's Adam where the state is float32, the
NumPy oracle of Adam with block-wise 8-bit state, bitsandbytes' Adam8bit, and the closed
form of the state's bytes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_jax as gj
from galore_jax import quantization
from oracle_8bit import oracle_adam_8bit

STEPS = 5


def grads_at(shapes, step):
  rng = np.random.default_rng(step)
  return {k: jnp.asarray(rng.standard_normal(s) * (1 + step), jnp.float32)
          for k, s in shapes.items()}


def run(tx, shapes, steps=STEPS):
  """The updates and the state after every step (one jitted update, zero params)."""
  params = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
  state = tx.init(params)
  update = jax.jit(tx.update)
  out, states = [], []
  for t in range(steps):
    u, state = update(grads_at(shapes, t), state, params)
    out.append(u)
    states.append(state)
  return out, states


def test_small_leaves_are_optax_adam():
  shapes = {"b": (64,), "w": (40, 100)}  # both under 4096 elements: float32 moments
  ours, states = run(gj.scale_by_adam_8bit(b1=0.8, b2=0.99, eps=1e-6), shapes)
  ref, ref_states = run(optax.scale_by_adam(b1=0.8, b2=0.99, eps=1e-6), shapes)
  jax.tree.map(np.testing.assert_array_equal, ours, ref)
  jax.tree.map(np.testing.assert_array_equal, [(s.mu, s.nu) for s in states],
               [(s.mu, s.nu) for s in ref_states])


def test_matches_oracle_of_8bit_adam():
  shapes = {"w": (48, 100), "b": (300,)}  # w: 19 blocks, the last padded; b: float32
  ours, states = run(gj.scale_by_adam_8bit(min_8bit_size=1000), shapes)
  state = states[-1]
  for name in shapes:
    ref, stored = oracle_adam_8bit([grads_at(shapes, t)[name] for t in range(STEPS)],
                                   min_8bit_size=1000)
    for t in range(STEPS):
      np.testing.assert_allclose(np.asarray(ours[t][name]), ref[t], rtol=2e-6, atol=1e-6)
    if stored is None:
      assert state.mu[name].dtype == jnp.float32
      continue
    for moment, (codes, absmax) in zip((state.mu[name], state.nu[name]), stored):
      # float32 arithmetic of XLA and NumPy may differ by an ulp: a code may flip to its
      # neighbour at a near-tie, nothing more
      np.testing.assert_allclose(np.asarray(moment.absmax), absmax, rtol=1e-6)
      diff = np.abs(np.asarray(moment.codes, int) - codes)
      assert diff.max() <= 1 and np.mean(diff) < 1e-3


def test_large_leaves_within_quantization_error_of_optax():
  shapes = {"w": (128, 256)}
  ours, (*_, state) = run(gj.scale_by_adam_8bit(), shapes, steps=20)
  ref, (*_, ref_state) = run(optax.scale_by_adam(), shapes, steps=20)
  np.testing.assert_array_equal(ours[0]["w"], ref[0]["w"])  # the state is read from step 1
  for moment, want, signed in ((state.mu, ref_state.mu, True), (state.nu, ref_state.nu, False)):
    got = np.asarray(quantization.dequantize(moment["w"], signed=signed))
    # each step rounds to within 0.7% of a block's absmax; the moving average damps it
    err = np.abs(got - np.asarray(want["w"])) / np.abs(got).max()
    assert err.max() < 0.05 and err.mean() < 0.005
  for t in range(1, 20):
    err = np.abs(np.asarray(ours[t]["w"]) - np.asarray(ref[t]["w"]))  # Adam steps are ~1
    assert np.mean(err) < 0.01 and np.max(err) < 0.2


def test_matches_bitsandbytes_adam8bit():
  torch = pytest.importorskip("torch")
  bnb = pytest.importorskip("bitsandbytes")
  shapes = {"w": (64, 128), "b": (64,)}
  lr = 1e-2
  init = {k: np.random.default_rng(1).standard_normal(s).astype(np.float32)
          for k, s in shapes.items()}
  torch_params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in init.items()}
  opt = bnb.optim.Adam8bit(list(torch_params.values()), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                           weight_decay=0.0, min_8bit_size=4096)
  tx = gj.adamw_8bit(lr, weight_decay=0.0)
  params = {k: jnp.asarray(v) for k, v in init.items()}
  state = tx.init(params)
  for t in range(STEPS):
    grads = grads_at(shapes, t)
    for k, p in torch_params.items():
      p.grad = torch.from_numpy(np.array(grads[k]))
    try:
      opt.step()
    except Exception as e:  # noqa: BLE001 -- no CPU kernel in this build
      pytest.skip(f"bitsandbytes Adam8bit does not run here: {e}")
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  adam_state = state[0]
  assert torch_params["w"].numel() >= 4096 and adam_state.mu["w"].codes.shape == (64, 128)
  for k, p in torch_params.items():
    diff = np.abs(np.asarray(params[k]) - p.detach().numpy())
    # bitsandbytes' CPU kernel rounds small moments coarsely (a search of the map that
    # stops early): a few elements move by a few percent of a step
    assert np.quantile(diff, 0.99) < 0.01 * lr and diff.max() < 0.1 * lr
  ref_state = opt.state[torch_params["w"]]
  np.testing.assert_allclose(np.asarray(adam_state.mu["w"].absmax), ref_state["absmax1"].numpy(),
                             rtol=1e-4)


def closed_form_bytes(shapes, block_size=256, min_8bit_size=4096):
  """4 (count) + per leaf: 2 (n + 4 ceil(n / B)) when quantized, else 8 n."""
  total = 4
  for shape in shapes:
    n = int(np.prod(shape))
    total += 2 * (n + 4 * -(-n // block_size)) if n >= min_8bit_size else 8 * n
  return total


def test_state_bytes_equal_the_closed_form():
  params = {
      "emb": jax.ShapeDtypeStruct((1000, 96), jnp.bfloat16),
      "scan": jax.ShapeDtypeStruct((3, 64, 100), jnp.float32),
      "below": jax.ShapeDtypeStruct((4095,), jnp.float32),
      "at": jax.ShapeDtypeStruct((4096,), jnp.float32),
      "norm": jax.ShapeDtypeStruct((96,), jnp.bfloat16),
  }
  shapes = [p.shape for p in params.values()]
  state = jax.eval_shape(gj.adamw_8bit(1e-3).init, params)
  assert gj.tree_bytes(state) == closed_form_bytes(shapes)
  state = jax.eval_shape(gj.scale_by_adam_8bit(block_size=64, min_8bit_size=100).init, params)
  assert gj.tree_bytes(state) == closed_form_bytes(shapes, 64, 100)


@pytest.mark.parametrize("kwargs, match", [
    ({"block_size": 100}, "block_size must be a power of two"),
    ({"block_size": 0}, "block_size must be an int >= 1"),
    ({"min_8bit_size": -1}, "min_8bit_size must be an int >= 0"),
    ({"b1": 1.0}, "b1=1.0 is not in"),
    ({"b2": -0.1}, "b2=-0.1 is not in"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    gj.scale_by_adam_8bit(**kwargs)


"""galore_jax.scale_by_adam_8bit / adamw_8bit: optax's Adam where the state is float32, the
NumPy oracle of Adam with block-wise 8-bit state, bitsandbytes' Adam8bit, and the closed
form of the state's bytes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_jax as gj
from galore_jax import quantization
from oracle import project, project_back, svd_bases
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


def test_a_bf16_gradient_enters_the_moments_in_float32():
  """The moments' increments (1 - b1) g and (1 - b2) g^2 of a bf16 gradient are float32
  (computed in bf16 they were 5e-3 off, and 9% of the 8-bit codes of nu one code off)."""
  g = jnp.asarray(np.random.default_rng(0).standard_normal((64, 64)) * 3, jnp.bfloat16)
  g64 = np.asarray(g, np.float64)
  params = jnp.zeros((64, 64), jnp.bfloat16)
  tx = gj.scale_by_adam_8bit(min_8bit_size=10**9)  # float32 moments
  _, state = tx.update(g, tx.init(params))
  np.testing.assert_allclose(np.asarray(state.mu, np.float64), 0.1 * g64, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(state.nu, np.float64), 1e-3 * g64**2, rtol=1e-6)
  tx = gj.scale_by_adam_8bit()  # 8-bit moments: the codes of the float32 values
  _, state = tx.update(g, tx.init(params))
  g32 = np.asarray(g, np.float32)
  want = quantization.quantize(jnp.asarray(np.float32(1e-3) * g32 * g32), signed=False)
  np.testing.assert_array_equal(state.nu.codes, want.codes)


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


def test_galore_8bit_steps_are_galore_over_the_oracle_of_8bit_adam():
  """galore_adamw_8bit, step by step, against the equations: the coefficients G Q on the
  bases of a float64 SVD at steps 0, 3, 6, their moments Adam's with 8-bit storage (the
  oracle), the step lr (alpha x the update back-projected, + wd p); an unprojected leaf is
  8-bit AdamW.  (Its tests compared it with itself: a 4x scale passed them.)"""
  lr, scale, wd, rank, gap, steps = 1e-2, 0.25, 0.1, 16, 3, 7  # scale: the documented default
  rng = np.random.default_rng(3)
  params = {"w": rng.standard_normal((96, 64)).astype(np.float32),  # coefficients 96 x 16
            "e": rng.standard_normal((40, 50)).astype(np.float32)}  # 2000 elements, whole
  grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
           for _ in range(steps)]
  tx = gj.galore_adamw_8bit(lr, rank=rank, update_proj_gap=gap, weight_decay=wd,
                            min_8bit_size=1000, mask={"w": True, "e": False})
  p, update, ours = jax.tree.map(jnp.asarray, params), jax.jit(tx.update), []
  state = tx.init(p)
  for g in grads:
    u, state = update(jax.tree.map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, u)
    ours.append({k: np.asarray(v, np.float64) for k, v in p.items()})
  bases = [svd_bases(grads[t - t % gap]["w"], rank) for t in range(steps)]
  coeffs = [project(np.float64(g["w"]), "right", *b).astype(np.float32)
            for g, b in zip(grads, bases)]
  adam = {"w": oracle_adam_8bit(coeffs, min_8bit_size=1000)[0],
          "e": oracle_adam_8bit([g["e"] for g in grads], min_8bit_size=1000)[0]}
  ref = {k: np.float64(v) for k, v in params.items()}
  for t in range(steps):
    step = {"w": scale * project_back(np.float64(adam["w"][t]), "right", *bases[t]),
            "e": np.float64(adam["e"][t])}
    ref = {k: v - lr * (step[k] + wd * v) for k, v in ref.items()}
    for k in ref:  # a float32 near-tie may put one coefficient's code a neighbour away
      err = np.abs(ours[t][k] - ref[k])
      assert np.median(err) < 1e-7 and err.max() < 5e-5, (t, k, err.max())  # a step ~1e-3


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


def test_an_overflowing_square_leaves_its_block_finite():
  """A finite gradient of 1e20 overflows (1 - b2) g^2 to inf: the block's nu absmax was
  inf and its 256 elements NaN from the next step on.  Now the outlier's nu saturates
  (2^126): its updates are 0, as optax's float32 Adam gives (m / sqrt(inf)), and the other
  elements' moments round to zero against the outlier's absmax, as they do next to any
  outlier (1e18 in bitsandbytes too): at step t they take the step of Adam restarted then,
  (0.1 g / (1 - 0.9^t)) / sqrt(1e-3 g^2 / (1 - 0.999^t)).  Other blocks are unaffected."""
  shapes = {"w": (64, 128)}  # 32 blocks; the outlier is in the first
  g = np.full(shapes["w"], 1e-3, np.float32)
  spiked = g.copy()
  spiked[0, 5] = 1e20
  steps = 4
  tx = gj.scale_by_adam_8bit()
  params = {"w": jnp.zeros(shapes["w"])}
  runs = []
  for first in (spiked, g):
    state, got = tx.init(params), []
    for t in range(steps):
      u, state = jax.jit(tx.update)({"w": jnp.asarray(first if t == 0 else g)}, state)
      got.append(np.asarray(u["w"]))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))
    runs.append(np.stack(got))
  ours, clean = runs
  ref, state = [], optax.scale_by_adam().init(params)
  for t in range(steps):
    u, state = optax.scale_by_adam().update({"w": jnp.asarray(spiked if t == 0 else g)}, state)
    ref.append(np.asarray(u["w"]))
  np.testing.assert_array_equal(ours[:, 0, 5], np.stack(ref)[:, 0, 5])  # all 0
  np.testing.assert_array_equal(ours[:, 2:], clean[:, 2:])  # rows 2..63: other blocks
  t = np.arange(1, steps + 1)[:, None]
  restarted = (0.1e-3 / (1 - 0.9**t)) / (np.sqrt(1e-9 / (1 - 0.999**t)) + 1e-8)
  others = np.delete(ours[:, :2].reshape(steps, -1), 5, axis=1)  # the outlier's block
  np.testing.assert_allclose(others, np.broadcast_to(restarted, others.shape),
                             rtol=5e-5)  # optax's bias corrections use float32 betas: 2e-5
  np.testing.assert_array_equal(others[0], clean[0, 0, 0])  # step 1: the state is not read


def test_galore_8bit_survives_an_overflowing_coefficient():
  """The same overflow in the projected gradient (a 1e20 entry between two refreshes):
  GaLore's 8-bit coefficient moments stay finite (they were NaN from the next step)."""
  tx = gj.galore_adamw_8bit(1e-3, rank=16, min_8bit_size=256)
  params = {"w": jnp.zeros((1024, 64))}
  state, update = tx.init(params), jax.jit(tx.update)
  rng = np.random.default_rng(0)
  for t in range(3):
    g = rng.standard_normal((1024, 64)).astype(np.float32) * 1e-3
    g[3, 5] = 1e20 if t == 1 else g[3, 5]  # step 0 refreshed the basis
    updates, state = update({"w": jnp.asarray(g)}, state, params)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves((updates, state)))
  assert np.abs(updates["w"]).max() > 0

@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_a_non_finite_gradient_entry_restarts_and_takes_no_step(bad):
  """bitsandbytes' rule: a non-finite entry's moments restart from 0 and its step is 0; the
  rest of its block goes on as without it.  (An inf was stored saturated at 2^126 in both
  moments, zeroed its block's other first moments and came back ~220 steps later as a step
  of 3e8; a NaN stepped NaN.)"""
  shape, steps = (64, 128), 300
  g = np.ones(shape, np.float32)
  spiked = g.copy()
  spiked[0, 0] = bad
  grads = [spiked if t == 1 else g for t in range(steps)]
  tx = gj.scale_by_adam_8bit()
  state, got = tx.init(jnp.zeros(shape)), []
  update = jax.jit(tx.update)
  for grad in grads:
    u, state = update(jnp.asarray(grad), state)
    got.append(np.asarray(u))
  got = np.stack(got)
  assert got[1, 0, 0] == 0 and np.all(np.isfinite(got)) and np.abs(got).max() < 1.5
  ref, _ = oracle_adam_8bit(grads[:8])
  np.testing.assert_allclose(got[:8], np.stack(ref), rtol=2e-6, atol=1e-6)
  clean, _ = oracle_adam_8bit([g] * 8)  # the block's other entries: as if nothing happened
  np.testing.assert_allclose(got[:8, 0, 1:], np.stack(clean)[:, 0, 1:], rtol=2e-6)


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
  state, update = tx.init(params), jax.jit(tx.update)
  for t in range(STEPS):
    grads = grads_at(shapes, t)
    for k, p in torch_params.items():
      p.grad = torch.from_numpy(np.array(grads[k]))
    try:
      opt.step()
    except Exception as e:  # noqa: BLE001 -- no CPU kernel in this build
      pytest.skip(f"bitsandbytes Adam8bit does not run here: {e}")
    updates, state = update(grads, state, params)
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
  # 8-bit GaLore: the inner state is the closed form over the coefficient shapes
  tx = gj.galore_adamw_8bit(1e-3, rank=16, mask={k: k == "emb" for k in params})
  state = jax.eval_shape(tx.init, params)
  coeff_shapes = [(1000, 16) if k == "emb" else p.shape for k, p in params.items()]
  assert gj.tree_bytes(state[0].inner_state) == closed_form_bytes(coeff_shapes)


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
  with pytest.raises(ValueError, match=match):
    gj.galore_adamw_8bit(1e-3, rank=4, **kwargs)


# ------------------------------------------------------------------ 8-bit GaLore

GALORE_SHAPES = {"w": (256, 64), "b": (64,)}  # w's 256 x 16 moments: 4096 elements, 8-bit


def galore_run(tx, steps=4):
  """The states of a GaLore chain after each of ``steps`` steps on gradients that change
  direction every step (the refresh at step 2 turns the basis)."""
  return run(tx, GALORE_SHAPES, steps)[1]


@functools.cache
def galore_pair(on_refresh):
  kw = dict(rank=16, update_proj_gap=2, on_refresh=on_refresh)
  return (galore_run(gj.galore_adamw_8bit(1e-2, **kw)),
          galore_run(gj.galore_adamw(1e-2, **kw)))


def moments_of(state):
  inner = state[0].inner_state
  return (quantization.dequantize(inner.mu["w"], signed=True),
          quantization.dequantize(inner.nu["w"], signed=False))


def test_galore_8bit_reset_reinitialises_quantized_moments():
  ours, ref = galore_pair("reset")
  inner = ours[2][0].inner_state
  assert isinstance(inner.mu["w"], quantization.Quantized)
  # The bases depend on the gradients only, so both runs project alike; after the reset
  # at step 2 the moments are (1 - b1) R and (1 - b2) R^2 in both: the 8-bit state is
  # exactly their quantization.
  want = ref[2][0].inner_state
  for moment, float_moment, signed in ((inner.mu, want.mu, True), (inner.nu, want.nu, False)):
    q = quantization.quantize(float_moment["w"], signed=signed)
    np.testing.assert_array_equal(moment["w"].codes, q.codes)
    np.testing.assert_array_equal(moment["w"].absmax, q.absmax)
  np.testing.assert_array_equal(inner.mu["b"], want.mu["b"])  # unprojected: not reset
  keep, _ = galore_pair("keep")
  assert not np.array_equal(keep[2][0].inner_state.mu["w"].codes, inner.mu["w"].codes)


def test_galore_8bit_transport_carries_quantized_moments():
  ours, ref = galore_pair("transport")
  keep, _ = galore_pair("keep")
  for t in (2, 3):  # the refresh step and the next
    for got, want in zip(moments_of(ours[t]), ref[t][0].inner_state[1:]):
      scale = float(jnp.max(jnp.abs(want["w"])))
      err = np.abs(np.asarray(got) - np.asarray(want["w"])) / scale
      assert err.mean() < 0.005 and err.max() < 0.05  # float transport, within rounding
    # ...and not what keeping the moments gives: the rotated first moment is another one
    want_mu = np.asarray(ref[t][0].inner_state.mu["w"])
    kept_mu = np.asarray(moments_of(keep[t])[0])
    assert np.abs(kept_mu - want_mu).mean() / np.abs(want_mu).max() > 0.02


def test_orbax_round_trip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  states = galore_run(gj.galore_adamw_8bit(1e-2, rank=16, update_proj_gap=2), steps=2)
  plain = run(gj.adamw_8bit(1e-2), {"w": (64, 100)}, steps=2)[1][-1]
  for name, state in (("galore", states[-1]), ("adamw", plain)):
    assert all(x.size for x in jax.tree.leaves(state))  # Orbax refuses zero-size arrays
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(tmp_path / name, state)
      ckpt.wait_until_finished()
      restored = ckpt.restore(tmp_path / name, jax.eval_shape(lambda: state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    jax.tree.map(np.testing.assert_array_equal, restored, state)


def test_state_shardings_follow_the_params():
  mesh = jax.make_mesh((1, 1), ("fsdp", "tensor"))
  spec = jax.P("fsdp", "tensor")
  params = {"w": jax.ShapeDtypeStruct((256, 64), jnp.float32,
                                      sharding=jax.NamedSharding(mesh, spec)),
            "b": jax.ShapeDtypeStruct((64,), jnp.float32,
                                      sharding=jax.NamedSharding(mesh, jax.P("tensor")))}
  sh = gj.sharding.state_shardings(gj.adamw_8bit(1e-3), params)[0]
  assert tuple(sh.mu["w"].codes.spec) == ("fsdp", "tensor")  # the param's own
  assert tuple(sh.nu["w"].absmax.spec) == ("fsdp",)          # blocks along rows
  assert tuple(sh.mu["b"].spec) == ("tensor",)
  tx = gj.galore_adamw_8bit(1e-3, rank=16)
  target = gj.sharding.abstract_state(tx, params)
  # 256 x 16 coefficients: the rank side replicated, the rows also over the tensor axis the
  # projected side frees
  mu = target[0].inner_state.mu["w"]
  assert mu.codes.shape == (256, 16)
  assert tuple(mu.codes.sharding.spec) == (("fsdp", "tensor"), None)
  assert tuple(mu.absmax.sharding.spec) == (("fsdp", "tensor"),)  # blocks along the rows
  assert jax.tree.map(jnp.shape, target) == jax.tree.map(
      jnp.shape, jax.eval_shape(tx.init, params))


@pytest.mark.parametrize("name", ["adamw_8bit", "galore_adamw_8bit"])
def test_under_nnx_optimizer(name):
  """``nnx.Optimizer`` keeps the quantized nodes (the codes in a copy of the param's
  variable, with its metadata) and steps as the transform on plain arrays does (up to
  float32 rounding: the jitted programs fuse differently)."""
  nnx = pytest.importorskip("flax.nnx")
  tx = (gj.adamw_8bit(1e-2) if name == "adamw_8bit" else
        gj.galore_adamw_8bit(1e-2, rank=32))  # 32 x 256 moments: 8-bit
  model = nnx.Linear(128, 256, rngs=nnx.Rngs(0))
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  adam = optimizer.opt_state[0] if name == "adamw_8bit" else optimizer.opt_state[0].inner_state
  assert isinstance(adam.mu["kernel"], quantization.Quantized)
  assert isinstance(adam.mu["kernel"].codes, nnx.Variable)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 128)), jnp.float32)
  loss = lambda m: jnp.mean(m(x) ** 2)
  state, update = tx.init(params), jax.jit(tx.update)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(loss)(model)
    optimizer.update(model, grads)
    return grads

  for _ in range(2):
    grads = step(model, optimizer)
    updates, state = update(nnx.as_pure(grads), state, params)
    params = optax.apply_updates(params, updates)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # other fusions
  jax.tree.map(close, nnx.as_pure(nnx.state(model, nnx.Param)), params)


def test_batch_dims_make_each_slice_a_tensor_of_its_own():
  """``batch_dims=1`` on stacked leaves is the transform applied to each slice alone (as
  bitsandbytes sees a scanned model's layers): the same updates and moments, codes and
  absmax included, over several steps; the 4096-element floor holds per slice."""
  params = {"w": jnp.zeros((3, 40, 100)), "norm": jnp.zeros((3, 2000))}  # 4000, 2000 / slice
  stacked = gj.scale_by_adam_8bit(batch_dims=1, min_8bit_size=3000)
  alone = gj.scale_by_adam_8bit(min_8bit_size=3000)
  state, ref = stacked.init(params), jax.vmap(alone.init)(params)
  assert state.mu["w"].absmax.shape == (3, 16) and state.mu["norm"].dtype == jnp.float32
  assert jax.tree.structure(state) == jax.tree.structure(ref)
  rng = np.random.default_rng(0)
  for _ in range(3):
    g = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    u, state = jax.jit(stacked.update)(g, state)
    u_ref, ref = jax.jit(jax.vmap(alone.update))(g, ref)
    for a, b in zip(jax.tree.leaves((u, state.mu, state.nu)),
                    jax.tree.leaves((u_ref, ref.mu, ref.nu))):
      a, b = np.asarray(a), np.asarray(b)
      if a.dtype == np.uint8:  # a value within rounding of a code boundary may round apart
        diff = np.abs(a.astype(int) - b)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
      else:  # equal to float32 rounding (the two programs fuse differently)
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-9)
  # without batch_dims the (3, 2000) stack is one tensor of 6000: quantized
  assert gj.scale_by_adam_8bit(min_8bit_size=3000).init(params).mu["norm"].codes.shape == (3, 2000)


def test_batch_dims_must_fit_the_params():
  tx = gj.adamw_8bit(1e-3, batch_dims={"w": 3})
  with pytest.raises(ValueError, match=r"batch_dims: expected an int in \[0, 2\]"):
    tx.init({"w": jnp.zeros((4, 4))})
  with pytest.raises(ValueError, match="batch_dims must be an int, a tree of ints"):
    gj.adamw_8bit(1e-3, batch_dims={"v": 1}).init({"w": jnp.zeros((4, 4))})


@pytest.mark.parametrize("on_refresh", ["reset", "transport"])
@pytest.mark.parametrize("batch_dims", [0, 1], ids=["flat_absmax", "absmax_per_layer"])
def test_galore_8bit_partly_rejected_stack_touches_the_taken_layers_only(on_refresh, batch_dims):
  """A stack of 3 layers whose layer 1 has a NaN on the second refresh (step 2): the guard
  keeps that layer's basis, so its quantized moments (codes and its blocks' absmax) stay bit
  for bit (the inner transform skips the non-finite step); layers 0 and 2 are reset or
  transported.  Each layer's 4 x 12 coefficients are 3 blocks of 16, with or without batch
  axes.  Reference: the layers as leaves of their own."""
  gap, shape = 2, (3, 12, 8)
  rng = np.random.default_rng(4)
  grads = [jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(gap + 2)]
  grads[gap] = grads[gap].at[1, 2, 3].set(jnp.nan)

  def make(dims, batch):
    inner = gj.scale_by_adam_8bit(block_size=16, min_8bit_size=1, batch_dims=batch)
    return gj.galore_projection(optax.apply_if_finite(inner, 5), rank=4, update_proj_gap=gap,
                                on_refresh=on_refresh, dimension_numbers=dims,
                                transport_betas=(0.9, 0.999))

  stacked = make({"s": gj.DimensionNumbers(1, 2)}, batch_dims)
  apart = make({f"s{i}": gj.DimensionNumbers(0, 1) for i in range(3)}, 0)
  s_state = stacked.init({"s": jnp.zeros(shape)})
  a_state = apart.init({f"s{i}": jnp.zeros(shape[1:]) for i in range(3)})
  moments = lambda state: state.inner_state.inner_state  # noqa: E731
  for t, g in enumerate(grads):
    before = moments(s_state)
    _, s_state = jax.jit(stacked.update)({"s": g}, s_state)
    _, a_state = jax.jit(apart.update)({f"s{i}": g[i] for i in range(3)}, a_state)
    got, want = moments(s_state), moments(a_state)
    for name, signed in (("mu", True), ("nu", False)):
      q, q0 = getattr(got, name)["s"], getattr(before, name)["s"]
      layers = np.asarray(quantization.dequantize(q, signed=signed))
      for i in range(3):
        ref = quantization.dequantize(getattr(want, name)[f"s{i}"], signed=signed)
        np.testing.assert_allclose(layers[i], ref, rtol=1e-4, atol=1e-6, err_msg=f"step {t}")
      if t == gap:
        np.testing.assert_array_equal(q.codes[1], q0.codes[1])
        per_layer = lambda a: np.asarray(a).reshape(3, -1)  # noqa: E731
        np.testing.assert_array_equal(per_layer(q.absmax)[1], per_layer(q0.absmax)[1])
        assert not np.array_equal(per_layer(q.absmax)[0], per_layer(q0.absmax)[0])


@pytest.mark.parametrize("on_refresh", ["reset", "transport"])
def test_galore_8bit_partly_rejected_stack_whose_blocks_straddle_layers(on_refresh):
  """As above, each layer's 48 coefficients in blocks of 32 without batch axes: blocks
  straddle two layers.  The kept layer 1 keeps its moments to the 8-bit map's rounding (its
  straddled blocks are quantized again); layers 0 and 2 are reset or transported.  Reset
  zeroed all three layers' moments (the whole leaf went as any of its layers)."""
  gap, shape = 2, (3, 12, 8)
  rng = np.random.default_rng(4)
  grads = [jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(gap + 2)]
  grads[gap] = grads[gap].at[1, 2, 3].set(jnp.nan)
  inner = gj.scale_by_adam_8bit(block_size=32, min_8bit_size=1)
  tx = gj.galore_projection(optax.apply_if_finite(inner, 5), rank=4, update_proj_gap=gap,
                            on_refresh=on_refresh, transport_betas=(0.9, 0.999),
                            dimension_numbers={"s": gj.DimensionNumbers(1, 2)})
  state = tx.init({"s": jnp.zeros(shape)})
  moments = lambda state: state.inner_state.inner_state  # noqa: E731
  for g in grads[:gap + 1]:
    before = moments(state)
    _, state = jax.jit(tx.update)({"s": g}, state)
  for name, signed in (("mu", True), ("nu", False)):
    was, got = (np.asarray(quantization.dequantize(getattr(m, name)["s"], signed=signed))
                for m in (before, moments(state)))
    assert np.abs(was[1]).max() > 0
    np.testing.assert_allclose(got[1], was[1], atol=0.02 * np.abs(was[1]).max(), err_msg=name)
    if on_refresh == "reset":  # (zero, to the signed map's smallest code in a shared block)
      np.testing.assert_allclose(got[[0, 2]], 0.0, atol=1e-5 * np.abs(was).max(), err_msg=name)
    else:  # (each layer's basis changed)
      assert not np.allclose(got[[0, 2]], was[[0, 2]], atol=1e-3), name


@pytest.mark.parametrize("make", [
    lambda: gj.scale_by_adam_8bit(),                        # small leaf: float32 moments
    lambda: gj.adamw_8bit(1e-2, min_8bit_size=1),           # 8-bit moments
    lambda: gj.galore_adamw_8bit(1e-2, rank=2, mask={"c": False, "w": True}),
], ids=["scale_by_adam_8bit", "adamw_8bit", "galore_adamw_8bit"])
def test_a_complex_leaf_is_refused_naming_it(make):
  """The moments are real (codes, or float32): a complex gradient's imaginary part was
  dropped without a word, and a complex param stepped along the real axis only."""
  params = {"c": jnp.ones((4, 4), jnp.complex64), "w": jnp.ones((8, 4))}
  tx = make()
  with pytest.raises(ValueError, match=r"scale_by_adam_8bit: \['c'\] is complex64"):
    tx.init(params)
  real = {"c": jnp.ones((4, 4)), "w": jnp.ones((8, 4))}
  state = tx.init(real)  # a state for real params, then complex updates
  grads = dict(real, c=jnp.full((4, 4), 1j, jnp.complex64))
  with pytest.raises(ValueError, match=r"scale_by_adam_8bit: \['c'\] is complex64"):
    jax.jit(tx.update)(grads, state, real)


def test_a_stack_of_no_tensors_steps():
  """A leaf with batch_dims=1 and 0 slices of 300 elements has 8-bit moments (each slice is
  held to min_8bit_size alone) but nothing in them: its step raised a ZeroDivisionError."""
  params = {"s": jnp.zeros((0, 300)), "w": jnp.ones((2, 300))}
  tx = gj.adamw_8bit(1e-2, batch_dims=1, min_8bit_size=256)
  state = tx.init(params)
  assert isinstance(state[0].mu["s"], quantization.Quantized)
  u, state = jax.jit(tx.update)(params, state, params)
  assert u["s"].shape == (0, 300) and u["w"].shape == (2, 300)

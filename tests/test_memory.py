"""galore_jax.memory: the closed form equals the bytes the transforms' states hold."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

import galore_jax as gj

DN = gj.DimensionNumbers

# A LLaMA-like tree: scanned (L, in, out) kernels, an attention (L, d, heads, head_dim)
# kernel, an embedding and a norm scale that are not projected.
PARAMS = {
    "embed": jax.ShapeDtypeStruct((100, 32), jnp.float32),
    "layers": {
        "q": {"kernel": jax.ShapeDtypeStruct((3, 32, 4, 8), jnp.float32)},
        "up": {"kernel": jax.ShapeDtypeStruct((3, 32, 88), jnp.float32)},
        "down": {"kernel": jax.ShapeDtypeStruct((3, 88, 32), jnp.float32)},
        "norm": {"scale": jax.ShapeDtypeStruct((3, 32), jnp.float32)},
    },
}
DIMS = {"embed": None, "layers": {"q": {"kernel": DN(1, (2, 3))}, "up": {"kernel": DN(1, 2)},
                                  "down": {"kernel": DN(1, 2)}, "norm": {"scale": None}}}
MASK = gj.linear_kernels
# The layers' leaves stack 3 tensors each (the 8-bit and Adafactor optimizers' batch_dims).
BATCH = {"embed": 0, "layers": {"q": {"kernel": 1}, "up": {"kernel": 1}, "down": {"kernel": 1},
                                "norm": {"scale": 1}}}


def _array_bytes(state) -> int:
  """Bytes of the state's arrays with at least one axis (scalar counters aside)."""
  return gj.tree_bytes([x for x in jax.tree.leaves(state) if x.ndim > 0])


CASES = [
    ("adamw", {}, lambda: optax.adamw(1e-3)),
    ("galore_adamw", {"rank": 8}, lambda: gj.galore_adamw(
        1e-3, rank=8, mask=MASK, dimension_numbers=DIMS)),
    ("galore_adamw", {"rank": 8, "proj_type": "full"}, lambda: gj.galore_adamw(
        1e-3, rank=8, proj_type="full", mask=MASK, dimension_numbers=DIMS)),
    ("galore_adamw", {"rank": {"embed": 1, "layers": 6}, "proj_type": "reverse_std"},
     lambda: gj.galore_adamw(1e-3, rank={"embed": 1, "layers": 6}, proj_type="reverse_std",
                             mask=MASK, dimension_numbers=DIMS)),
    ("adamw_8bit", {"min_8bit_size": 512}, lambda: gj.adamw_8bit(1e-3, min_8bit_size=512)),
    ("galore_adamw_8bit", {"rank": 8, "min_8bit_size": 512}, lambda: gj.galore_adamw_8bit(
        1e-3, rank=8, min_8bit_size=512, mask=MASK, dimension_numbers=DIMS)),
    ("galore_adafactor", {"rank": 8}, lambda: gj.galore_adafactor(
        1e-3, rank=8, mask=MASK, dimension_numbers=DIMS)),
    ("galore_adafactor", {"rank": 8, "b1": 0.9, "proj_type": "full"}, lambda: gj.galore_adafactor(
        1e-3, rank=8, b1=0.9, proj_type="full", mask=MASK, dimension_numbers=DIMS)),
    ("adamw_8bit", {"min_8bit_size": 64, "batch_dims": BATCH},
     lambda: gj.adamw_8bit(1e-3, min_8bit_size=64, batch_dims=BATCH)),
    ("galore_adamw_8bit", {"rank": 8, "min_8bit_size": 500, "batch_dims": BATCH},
     lambda: gj.galore_adamw_8bit(1e-3, rank=8, min_8bit_size=500, batch_dims=BATCH,
                                  mask=MASK, dimension_numbers=DIMS)),
    ("galore_adafactor", {"rank": 8, "batch_dims": BATCH}, lambda: gj.galore_adafactor(
        1e-3, rank=8, batch_dims=BATCH, mask=MASK, dimension_numbers=DIMS)),
    ("ldadamw", {"rank": 8}, lambda: gj.ldadamw(
        1e-3, rank=8, mask=MASK, dimension_numbers=DIMS)),
    ("ldadamw", {"rank": 8, "error_feedback": False, "proj_type": "ldadam_std"},
     lambda: gj.ldadamw(1e-3, rank=8, error_feedback=False, proj_type="ldadam_std",
                        mask=MASK, dimension_numbers=DIMS)),
    # the transforms' own basis_dtype / mu_dtype (estimate counted the leaves' dtype)
    ("adamw", {"mu_dtype": "bfloat16"}, lambda: optax.adamw(1e-3, mu_dtype="bfloat16")),
    ("galore_adamw", {"rank": 8, "basis_dtype": "bfloat16", "mu_dtype": "float32"},
     lambda: gj.galore_adamw(1e-3, rank=8, basis_dtype="bfloat16", mu_dtype="float32",
                             mask=MASK, dimension_numbers=DIMS)),
    ("galore_adamw_8bit", {"rank": 8, "min_8bit_size": 512, "basis_dtype": "bfloat16"},
     lambda: gj.galore_adamw_8bit(1e-3, rank=8, min_8bit_size=512, basis_dtype="bfloat16",
                                  mask=MASK, dimension_numbers=DIMS)),
    ("galore_adafactor", {"rank": 8, "b1": 0.9, "basis_dtype": "bfloat16", "mu_dtype": "bfloat16"},
     lambda: gj.galore_adafactor(1e-3, rank=8, b1=0.9, basis_dtype="bfloat16",
                                 mu_dtype="bfloat16", mask=MASK, dimension_numbers=DIMS)),
    ("ldadamw", {"rank": 8, "basis_dtype": "bfloat16"},  # ldadamw has no basis_dtype
     lambda: gj.ldadamw(1e-3, rank=8, mask=MASK, dimension_numbers=DIMS)),
    ("ldadamw", {"rank": 8, "state_dtype": "float16"},
     lambda: gj.ldadamw(1e-3, rank=8, state_dtype="float16", mask=MASK, dimension_numbers=DIMS)),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name, kwargs, make", CASES,
                         ids=[f"{n}-{'-'.join(str(v) for v in k.values() if v is not BATCH)}"
                              f"{'-stacked' if 'batch_dims' in k else ''}" for n, k, _ in CASES])
def test_closed_form_equals_the_state(name, kwargs, make, dtype):
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), PARAMS)
  state = jax.eval_shape(make().init, params)
  mask_dims = {} if name.startswith("adamw") else {"mask": MASK, "dimension_numbers": DIMS}
  est = gj.memory.estimate(params, name, **mask_dims, **kwargs)
  assert est.optimizer_state == _array_bytes(state)
  assert est.weights == est.gradients == gj.tree_bytes(params)


def test_galore_state_by_hand():
  """One 64 x 16 matrix at rank 4, std (basis on the 16 side): 16*4 + 2*64*4 elements."""
  params = {"w": jax.ShapeDtypeStruct((64, 16), jnp.bfloat16)}
  est = gj.memory.estimate(params, "galore_adamw", rank=4)
  assert est == gj.memory.MemoryEstimate(2 * 64 * 16, 2 * 64 * 16, 2 * (16 * 4 + 2 * 64 * 4))
  assert est.total == 2 * 64 * 16 * 2 + est.optimizer_state


def test_unknown_optimizer():
  with pytest.raises(ValueError, match="optimizer='sgd' is not one of"):
    gj.memory.estimate({"w": jnp.zeros((2, 2))}, "sgd")


# APOLLO and Fira: the closed form counts the papers' per-matrix scalars too (the limiter's
# float32 norms, APOLLO's int32 counter the projection is drawn from), so it equals the whole
# state's bytes less the per-transform scalars (the step count, Adam's count, the PRNG key)
# and, for Fira, GaLore's refresh counters (one int32 per projected leaf, not in the paper).
SUCCESSORS = [
    ("apollo_adamw", {"rank": 8}, lambda: gj.apollo_adamw(
        1e-3, rank=8, mask=MASK, dimension_numbers=DIMS)),
    ("apollo_adamw", {"rank": 8, "proj": "svd", "limiter": False}, lambda: gj.apollo_adamw(
        1e-3, rank=8, proj="svd", limiter_gamma=None, mask=MASK, dimension_numbers=DIMS)),
    ("apollo_mini", {}, lambda: gj.apollo_mini(1e-3, mask=MASK, dimension_numbers=DIMS)),
    ("fira_adamw", {"rank": 8, "proj_type": "reverse_std"}, lambda: gj.fira_adamw(
        1e-3, rank=8, proj_type="reverse_std", mask=MASK, dimension_numbers=DIMS)),
    ("fira_adamw", {"rank": 8, "basis_dtype": "bfloat16", "mu_dtype": "bfloat16"},
     lambda: gj.fira_adamw(1e-3, rank=8, basis_dtype="bfloat16", mu_dtype="bfloat16",
                           mask=MASK, dimension_numbers=DIMS)),
    ("apollo_adamw", {"rank": 8, "proj": "svd", "basis_dtype": "bfloat16"},
     lambda: gj.apollo_adamw(1e-3, rank=8, proj="svd", basis_dtype="bfloat16", mask=MASK,
                             dimension_numbers=DIMS)),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name, kwargs, make", SUCCESSORS,
                         ids=[f"{n}-{'-'.join(map(str, k.values()))}" for n, k, _ in SUCCESSORS])
def test_successors_closed_form_equals_the_state(name, kwargs, make, dtype):
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), PARAMS)
  state = jax.eval_shape(make().init, params)[0]
  est = gj.memory.estimate(params, name, mask=MASK, dimension_numbers=DIMS, **kwargs)
  per_transform = gj.tree_bytes((state.count, state.inner_state.count, state.rng_key))
  refresh_counters = 0 if name.startswith("apollo") else 4 * 3  # q, up, down
  assert est.optimizer_state == gj.tree_bytes(state) - per_transform - refresh_counters


def test_apollo_mini_is_rank_one():
  """APOLLO-Mini is rank 1 by definition: estimate refuses another rank (a paper's rank passed
  to every optimizer drew Mini as large as APOLLO), takes rank 1, and names apollo_adamw,
  whose state at that rank is that of ``gj.apollo_mini(rank=...)``."""
  kw = {"mask": MASK, "dimension_numbers": DIMS}
  mini = gj.memory.estimate(PARAMS, "apollo_mini", **kw)
  assert gj.memory.estimate(PARAMS, "apollo_mini", rank=1, **kw) == mini
  for rank in (8, {"embed": 1, "layers": 1}):
    with pytest.raises(ValueError, match=r"rank=.*: apollo_mini is rank 1 by definition"):
      gj.memory.estimate(PARAMS, "apollo_mini", rank=rank, **kw)
  state = jax.eval_shape(gj.apollo_mini(1e-3, rank=8, **kw).init, PARAMS)[0]
  per_transform = gj.tree_bytes((state.count, state.inner_state.count, state.rng_key))
  apollo = gj.memory.estimate(PARAMS, "apollo_adamw", rank=8, **kw)
  assert apollo.optimizer_state == gj.tree_bytes(state) - per_transform
  assert mini.optimizer_state < apollo.optimizer_state


# What a transform refuses, the closed form refuses too (it would count a state no
# optimizer can hold): transform, estimate's optimizer, the arguments, the message.
REFUSED = [
    (lambda: gj.ldadamw(1e-3, rank=2, proj_type="full"), "ldadamw", {"proj_type": "full"},
     r"proj_type='full' is not one of"),
    (lambda: gj.apollo_adamw(1e-3, rank=2, proj_type="full"), "apollo_adamw",
     {"proj_type": "full"}, r"proj_type='full' is not one of"),
    (lambda: gj.fira_adamw(1e-3, rank=2, proj_type="full"), "fira_adamw", {"proj_type": "full"},
     r"proj_type='full'"),
    (lambda: gj.galore_adamw(1e-3, rank=2, proj_type="ldadam_std"), "galore_adamw",
     {"proj_type": "ldadam_std"}, r"proj_type='ldadam_std' is not one of"),
    (lambda: gj.adamw_8bit(1e-3, block_size=100), "adamw_8bit", {"block_size": 100},
     r"block_size must be a power of two"),
    (lambda: gj.galore_adamw_8bit(1e-3, block_size=0), "galore_adamw_8bit", {"block_size": 0},
     r"block_size must be an int >= 1"),
    (lambda: gj.adamw_8bit(1e-3, min_8bit_size=-1), "adamw_8bit", {"min_8bit_size": -1},
     r"min_8bit_size must be an int >= 0"),
    (lambda: gj.galore_adamw(1e-3, rank=2, basis_dtype="int8"), "galore_adamw",
     {"basis_dtype": "int8"}, r"basis_dtype must be a real floating dtype or None, got 'int8'"),
    (lambda: gj.galore_adamw(1e-3, rank=2, mu_dtype="int8"), "galore_adamw",
     {"mu_dtype": "int8"}, r"mu_dtype must be a real floating dtype or None, got 'int8'"),
    (lambda: gj.galore_adafactor(1e-3, rank=2, b1=1.5), "galore_adafactor", {"b1": 1.5},
     r"b1=1.5 is not in \[0, 1\)"),
    # (the closed form counted the error buffer of a truthy string, and not of None)
    (lambda: gj.ldadamw(1e-3, rank=2, error_feedback="no"), "ldadamw",
     {"error_feedback": "no"}, r"error_feedback must be True or False, got 'no' \(str\)"),
]


@pytest.mark.parametrize("value", ["no", None, 1])
def test_limiter_is_a_flag(value):
  """The transforms take ``limiter_gamma`` (None: off); the closed form's ``limiter`` says
  which: a string counted the limiter's norms, None dropped them, without a word."""
  with pytest.raises(ValueError, match=rf"^limiter must be True or False, got {value!r}"):
    gj.memory.estimate({"w": jnp.zeros((8, 6))}, "fira_adamw", rank=2, limiter=value)


@pytest.mark.parametrize("make,optimizer,kwargs,match", REFUSED,
                         ids=[f"{o}-{k}" for _, o, k, _ in REFUSED])
def test_closed_form_refuses_what_the_transform_refuses(make, optimizer, kwargs, match):
  with pytest.raises(ValueError, match=match):
    make()
  with pytest.raises(ValueError, match=match):
    gj.memory.estimate({"w": jnp.zeros((8, 6))}, optimizer, **kwargs)


@pytest.mark.parametrize("state_dtype", ["int8", "no-such-dtype", jnp.complex64])
def test_state_dtype_must_be_a_float_dtype(state_dtype):
  """Moments, bases and error buffers are real floating arrays: another ``state_dtype`` is
  refused in one line naming it (an int8 one was counted at a byte an entry, an unknown
  name raised numpy's TypeError)."""
  with pytest.raises(ValueError, match=r"^state_dtype must be a real floating dtype or None, got"):
    gj.memory.estimate({"w": jnp.zeros((8, 6))}, "galore_adamw", rank=2, state_dtype=state_dtype)


@pytest.mark.parametrize("name", ["galore_adamw_8bit", "galore_adafactor"])
def test_batch_dims_count_the_coefficients_axes(name):
  """A projected leaf's ``batch_dims`` counts the axes of its coefficients, which an N-D
  kernel has fewer of: (4, 2, 8) as one 16 x 4 matrix has 2-D coefficients, so 3 (the
  leaf's axes) is refused by the transform, and by the closed form, which counted it."""
  params = {"q": jax.ShapeDtypeStruct((4, 2, 8), jnp.float32)}
  kw = {"rank": 2, "mask": True, "dimension_numbers": DN(0, (1, 2)), "batch_dims": 3}
  match = r"batch_dims.*: expected an int in \[0, 2\] \(the tensor's axes\), got 3"
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(getattr(gj, name)(1e-3, **kw).init, params)
  with pytest.raises(ValueError, match=match):
    gj.memory.estimate(params, name, **kw)
  kw["batch_dims"] = 2  # (as many as the coefficients have: every entry its own tensor)
  state = jax.eval_shape(getattr(gj, name)(1e-3, **kw).init, params)
  assert gj.memory.estimate(params, name, **kw).optimizer_state == _array_bytes(state)

"""Bad arguments give a ValueError naming the argument, at construction or at init."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax import nnx

import galore_jax as gj
from galore_jax import nn as gnn

DN = gj.DimensionNumbers

PARAMS = {"w": jnp.zeros((6, 4)), "b": jnp.zeros(4), "k3": jnp.zeros((4, 2, 3))}


def projection(**kw):
  return gj.galore_projection(optax.scale_by_adam(), **kw)


def adamw(**kw):
  return gj.galore_adamw(1e-3, **kw)


FACTORIES = pytest.mark.parametrize("factory", [projection, adamw], ids=["projection", "adamw"])


# --------------------------------------------------------------------------------------------
# raised at construction
# --------------------------------------------------------------------------------------------

CONSTRUCTION = [
    ({"rank": 0}, r"rank"),
    ({"rank": -1}, r"rank"),
    ({"rank": True}, r"rank"),
    ({"update_proj_gap": 0}, r"update_proj_gap"),
    ({"update_proj_gap": -3}, r"update_proj_gap"),
    ({"update_proj_gap": 2.5}, r"update_proj_gap"),
    ({"proj_type": "bogus"}, r"proj_type"),
    ({"proj_type": "STD"}, r"proj_type"),
    ({"method": "bogus"}, r"method"),
    ({"method": 3}, r"method=3 is not one of"),
    ({"on_refresh": "bogus"}, r"on_refresh"),
    ({"refresh": "every"}, r"refresh"),
    ({"refresh": 200}, r"refresh"),
    ({"refresh": lambda count: count % 2 == 0}, r"refresh"),
    ({"basis_dtype": jnp.int32}, r"basis_dtype must be a real floating dtype or None"),
    ({"basis_dtype": "foo"}, r"basis_dtype must be a real floating dtype or None, got 'foo'"),
]


@FACTORIES
@pytest.mark.parametrize(
    "kwargs,match", CONSTRUCTION,
    ids=[",".join(f"{k}={'<callable>' if callable(v) else repr(v)}" for k, v in kw.items())
         for kw, _ in CONSTRUCTION],
)
def test_bad_argument_at_construction(factory, kwargs, match):
  with pytest.raises(ValueError, match=match):
    factory(**{"rank": 2, **kwargs})


@pytest.mark.parametrize("make", [
    lambda d: gj.apollo_adamw(1e-2, rank=2, proj="svd", basis_dtype=d),
    lambda d: gj.ldadamw(1e-2, rank=2, state_dtype=d),
    lambda d: gj.galore_adamw_8bit(1e-2, rank=2, basis_dtype=d),
    lambda d: gj.galore_adamw(1e-2, rank=2, mu_dtype=d),
    lambda d: gj.fira_adamw(1e-2, rank=2, mu_dtype=d),
    lambda d: gj.galore_adafactor(1e-2, rank=2, b1=0.9, mu_dtype=d),
], ids=["apollo_adamw", "ldadamw", "galore_adamw_8bit", "galore_adamw_mu", "fira_adamw_mu",
        "galore_adafactor_mu"])
def test_state_dtypes_must_be_floating(make):
  """An integer basis would truncate to zeros and train nothing, silently."""
  with pytest.raises(ValueError, match=r"dtype must be a real floating dtype or None"):
    make(jnp.int8)
  make(jnp.bfloat16).init(PARAMS)


LR_MAKERS = {
    "galore_adamw": lambda lr: gj.galore_adamw(lr, rank=2),
    "fira_adamw": lambda lr: gj.fira_adamw(lr, rank=2),
    "galore_adamw_8bit": lambda lr: gj.galore_adamw_8bit(lr, rank=2),
    "galore_adafactor": lambda lr: gj.galore_adafactor(lr, rank=2),
    "ldadamw": lambda lr: gj.ldadamw(lr, rank=2),
    "apollo_adamw": lambda lr: gj.apollo_adamw(lr, rank=2),
    "apollo_mini": gj.apollo_mini,
    "adamw_8bit": gj.adamw_8bit,
}


@pytest.mark.parametrize("name", list(LR_MAKERS))
def test_a_learning_rate_of_none_is_refused(name):
  """optax.scale_by_learning_rate(None) scales by nothing and skips the sign flip: the
  aliases stepped up the gradient at a learning rate of 1."""
  with pytest.raises(ValueError, match=r"^learning_rate is None: pass a float or a schedule"):
    LR_MAKERS[name](None)
  tx = LR_MAKERS[name](1e-2)
  updates, _ = tx.update({"b": jnp.ones(4)}, tx.init({"b": jnp.zeros(4)}), {"b": jnp.zeros(4)})
  assert float(updates["b"][0]) < 0  # descent


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, "1e-3"], ids=repr)
@pytest.mark.parametrize("name", list(LR_MAKERS))
def test_a_learning_rate_that_is_no_finite_number_at_least_0_is_refused(name, bad):
  """A NaN or inf rate stepped every weight to NaN / inf, a negative one up the gradient,
  a string failed at the first step deep in optax; a schedule and an array still pass."""
  with pytest.raises(ValueError, match=r"^learning_rate must be a finite number >= 0 or a"
                                       r" schedule, got "):
    LR_MAKERS[name](bad)
  LR_MAKERS[name](optax.constant_schedule(1e-3))
  LR_MAKERS[name](jnp.asarray(1e-3))


@pytest.mark.parametrize("name,make", [
    ("galore_projection", lambda: gj.galore_projection(optax.scale_by_adam(), rank=2)),
    ("scale_by_ldadam", lambda: gj.scale_by_ldadam(rank=2)),
    ("scale_by_apollo", lambda: gj.scale_by_apollo(rank=2)),
    ("scale_by_adam_8bit", gj.scale_by_adam_8bit)])
def test_an_update_before_init_is_one_line(name, make):
  """It failed on an attribute of None (``'NoneType' object has no attribute 'bases'``)."""
  params = {"w": jnp.zeros((8, 6))}
  with pytest.raises(ValueError, match=rf"^{name}: the state is None: call init\(params\)"):
    make().update(params, None, params)


@pytest.mark.parametrize("make,name", [
    (lambda v: gj.ldadamw(1e-3, rank=2, error_feedback=v), "error_feedback"),
    (lambda v: gj.galore_adafactor(1e-3, rank=2, scale_parameter=v), "scale_parameter"),
    (lambda v: gj.galore_adafactor(None, rank=2, relative_step=v), "relative_step"),
    (lambda v: gj.scale_by_adafactor(1e-3, factored=v), "factored"),
    (lambda v: gj.subspace.Randomized(warm_start=v), "warm_start")])
def test_a_flag_that_is_no_bool_is_refused(make, name):
  """A string such as "no" read as True: ldadamw(error_feedback="no") kept its buffers."""
  with pytest.raises(ValueError, match=rf"{name} must be True or False, got 'no' \(str\)"):
    make("no")


def test_compute_bases_and_hf_adam_refuse_what_they_would_misread():
  g = jnp.ones((8, 5))
  for rank in (0, -1, 2.0):  # -1 sliced a basis of all but the last column
    with pytest.raises(ValueError, match=r"^compute_bases: rank must be an int >= 1, got"):
      gj.subspace.compute_bases(g, rank, left=True, right=False, method="svd")
  with pytest.raises(ValueError, match=r"mu_dtype"):  # an int first moment truncated
    gj.scale_by_adam_hf(mu_dtype=jnp.int32)


@pytest.mark.parametrize("inner", ["adam", optax.adam], ids=["str", "function"])
def test_an_inner_that_is_no_transform_is_one_line(inner):
  with pytest.raises(ValueError, match=r"^inner must be an optax.GradientTransformation"):
    gj.galore_projection(inner, rank=2)


@pytest.mark.parametrize("inner", [optax.adamw(1e-3), optax.add_decayed_weights(0.1)],
                         ids=["adamw", "add_decayed_weights"])
def test_an_inner_that_reads_params_is_one_line_that_says_why(inner):
  """optax's own error said params were not passed to update, though the caller passed them:
  the inner transform sees coefficients and params=None."""
  tx = gj.galore_projection(inner, rank=2)
  with pytest.raises(ValueError, match=r"^galore_projection: the inner transform reads params"
                                       r" .*add_decayed_weights after galore_projection"):
    tx.update(PARAMS, tx.init(PARAMS), PARAMS)


def test_scale_by_adafactor_refuses_a_state_for_other_shapes():
  """It broadcast an (8, 6) state against (1, 8, 6) updates and went on."""
  tx = gj.scale_by_adafactor(1e-2)
  state = tx.init({"w": jnp.zeros((8, 6))})
  with pytest.raises(ValueError, match=r"^scale_by_adafactor: the state does not fit the"
                                       r" updates at .*\['w'\]"):
    tx.update({"w": jnp.ones((1, 8, 6))}, state)


@pytest.mark.parametrize("layer", [
    lambda **kw: gnn.LoRALinear(8, 6, rank=2, rngs=nnx.Rngs(0), **kw),
    lambda **kw: gnn.LowRankLinear(8, 6, rank=2, rngs=nnx.Rngs(0), **kw),
    lambda **kw: gnn.SparsePlusLowRankLinear(8, 6, rank=2, rngs=nnx.Rngs(0), **kw)])
def test_nn_layers_check_their_dtypes_at_construction(layer):
  """dtype="foo" failed at the first call, an int param_dtype in an initializer's words."""
  with pytest.raises(ValueError, match=r"^dtype"):
    layer(dtype="foo")
  with pytest.raises(ValueError, match=r"^param_dtype"):
    layer(param_dtype=jnp.int32)


def test_relora_takes_a_constant_rate_and_merge_an_int_seed():
  s = gnn.relora_schedule(1e-3, every=10, warmup=2)  # was: 'float' object is not callable
  assert [float(s(t)) for t in (5, 10, 11)] == pytest.approx([1e-3, 0.0, 5e-4])
  assert gnn.merge_lora(gnn.LoRALinear(4, 3, rank=2, rngs=nnx.Rngs(0)), 3) == 1


def test_galore_adafactor_without_params_is_one_line():
  tx = gj.galore_adafactor(1e-2, rank=2)
  with pytest.raises(ValueError, match=r"reads the params .* update\(updates, state, params\)"):
    tx.update(PARAMS, tx.init(PARAMS))


def test_on_refresh_transport_needs_adam_moments_and_betas():
  """on_refresh="transport" works with Adam (galore_adamw passes its betas); it needs the
  inner Adam's betas, and an inner state without Adam moments has no known transport."""
  adamw(rank=2, on_refresh="transport").init(PARAMS)
  projection(rank=2, on_refresh="transport", transport_betas=(0.9, 0.999)).init(PARAMS)
  with pytest.raises(ValueError, match=r"on_refresh='transport' needs transport_betas"):
    projection(rank=2, on_refresh="transport")
  with pytest.raises(ValueError, match=r"on_refresh='transport' needs an Adam-shaped"):
    gj.galore_projection(optax.scale_by_lion(), rank=2, on_refresh="transport",
                         transport_betas=(0.9, 0.99))


def test_every_policy_validates_gap():
  for gap in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="update_proj_gap"):
      gj.every(gap)


@pytest.mark.parametrize("make", [gj.every, gj.staggered, gj.lazy,
                                  lambda gap: gj.apollo_adamw(1e-3, rank=2, update_proj_gap=gap)],
                         ids=["every", "staggered", "lazy", "apollo_adamw"])
def test_a_gap_beyond_int32_is_refused(make):
  """The step counters are int32: lazy(2**32 + 3) refreshed every 3 steps, every(2**31) was
  an OverflowError from inside a jitted step."""
  with pytest.raises(ValueError, match=r"update_proj_gap .*must be an int <= 2147483647"):
    make(2**32 + 3)
  make(2**31 - 1)


def test_a_seed_beyond_64_bits_is_refused():
  with pytest.raises(ValueError, match=r"^key: an int seed must fit in 64 bits"):
    gj.galore_adamw(1e-3, rank=2, method="random", key=2**70)


# --------------------------------------------------------------------------------------------
# rank that can only be checked against the params: raised at init at the latest
# --------------------------------------------------------------------------------------------


@FACTORIES
@pytest.mark.parametrize("rank", [2.5, "4", None, 0.0], ids=repr)
def test_non_int_rank(factory, rank):
  with pytest.raises(ValueError, match="rank"):
    factory(rank=rank).init(PARAMS)


@FACTORIES
@pytest.mark.parametrize("name,value", [
    ("mask", {"w": True}), ("rank", {"w": 2, "b": 2}),
    ("dimension_numbers", {"w": None, "b": None, "extra": None})])
def test_a_per_leaf_tree_that_does_not_fit_is_one_line(factory, name, value):
  """A per-leaf argument whose tree does not fit the params: one line naming the argument
  (JAX's explanation of the mismatch, which spans lines, joined into it)."""
  with pytest.raises(ValueError) as info:
    factory(**{"rank": 2, name: value}).init(PARAMS)
  message = str(info.value)
  assert message.startswith(f"{name}: its structure does not match") and "\n" not in message


@FACTORIES
def test_per_leaf_rank_checked_at_init(factory):
  params = {"w": PARAMS["w"], "v": jnp.zeros((5, 7))}
  tx = factory(rank={"w": 2, "v": 0})  # a pytree: only checkable against the params
  with pytest.raises(ValueError, match=r"rank for \['v'\]"):
    tx.init(params)
  with pytest.raises(ValueError, match="rank"):
    factory(rank={"w": 2, "v": -1, "extra": 3}).init(params)  # structure mismatch
  with pytest.raises(ValueError, match="rank"):
    factory(rank={"w": 2}).init(params)  # structure mismatch (missing leaf)


def test_inject_hyperparams_without_static_args_names_them():
  """A rank / gap turned into an array by inject_hyperparams is refused with a hint."""
  tx = optax.inject_hyperparams(gj.galore_adamw, static_args=("update_proj_gap",))(
      learning_rate=1e-3, rank=2, update_proj_gap=5)
  with pytest.raises(ValueError, match=r"rank.*static_args"):
    tx.init(PARAMS)
  tx = optax.inject_hyperparams(gj.galore_adamw, static_args=("rank",))(
      learning_rate=1e-3, rank=2, update_proj_gap=5)
  with pytest.raises(ValueError, match=r"update_proj_gap.*static_args"):
    tx.init(PARAMS)


# --------------------------------------------------------------------------------------------
# dimension numbers (raised at init: they are checked against the leaves)
# --------------------------------------------------------------------------------------------

DIMS_CASES = [
    # axis out of range for the 2-D leaves mask=None selects (one DimensionNumbers for all)
    (dict(dimension_numbers=DN(reduction_axis=0, output_axis=2)),
     r"dimension_numbers.*names axis 2, but mask=None selects only 2-D leaves"),
    (dict(dimension_numbers=DN(reduction_axis=-3, output_axis=1)),
     r"dimension_numbers.*names axis -3, but mask=None selects only 2-D leaves"),
    # per-leaf: axis out of range for the 3-D leaf
    (dict(dimension_numbers={"w": None, "b": None, "k3": DN(reduction_axis=0, output_axis=3)}),
     r"dimension_numbers.*k3.*ndim=3"),
    # a 3-D leaf selected by the mask with no dimension numbers
    (dict(mask={"w": True, "b": False, "k3": True}), r"dimension_numbers"),
    # a 1-D leaf selected by the mask
    (dict(mask={"w": True, "b": True, "k3": False}), r"dimension_numbers"),
    # reduction and output share an axis
    (dict(dimension_numbers={"w": None, "b": None, "k3": DN(reduction_axis=0, output_axis=(0, 1))}),
     r"dimension_numbers.*share an axis"),
    (dict(dimension_numbers=DN(reduction_axis=1, output_axis=1)),
     r"dimension_numbers.*share an axis"),
    # an axis repeated, an empty axis tuple, a non-int axis
    (dict(dimension_numbers={"w": None, "b": None, "k3": DN(reduction_axis=0, output_axis=(1, 1))}),
     r"dimension_numbers.*repeats"),
    (dict(dimension_numbers={"w": None, "b": None, "k3": DN(reduction_axis=(), output_axis=1)}),
     r"dimension_numbers.*reduction_axis"),
    (dict(dimension_numbers={"w": None, "b": None, "k3": DN(reduction_axis="0", output_axis=1)}),
     r"dimension_numbers.*reduction_axis"),
    # structure mismatch (pytree and callable)
    (dict(dimension_numbers={"w": DN(0, 1), "k3": DN(0, (1, 2))}), r"dimension_numbers"),
    (dict(dimension_numbers=lambda p: [DN(0, 1)]), r"dimension_numbers"),
    # not a DimensionNumbers
    (dict(dimension_numbers={"w": (0, 1), "b": None, "k3": None}), r"dimension_numbers"),
]


@FACTORIES
@pytest.mark.parametrize("kwargs,match", DIMS_CASES, ids=[str(i) for i in range(len(DIMS_CASES))])
def test_bad_dimension_numbers_at_init(factory, kwargs, match):
  tx = factory(rank=2, **kwargs)  # fine until the leaves are known
  with pytest.raises(ValueError, match=match):
    tx.init(PARAMS)


# --------------------------------------------------------------------------------------------
# masks (raised at init)
# --------------------------------------------------------------------------------------------

MASK_CASES = [
    ({"w": True}, r"mask"),  # missing leaves
    ({"w": True, "b": False, "k3": False, "extra": True}, r"mask"),  # extra key
    ([True, False, False], r"mask"),  # other container
    (lambda p: {"w": True}, r"mask"),  # callable returning a wrong structure
    ({"w": 1, "b": 0, "k3": 0}, r"mask.*bool"),  # ints, not bools
    ({"w": "yes", "b": False, "k3": False}, r"mask.*bool"),
    ({"w": jnp.ones(3, bool), "b": False, "k3": False}, r"mask.*bool"),  # non-scalar array
    ({"w": 1.0, "b": False, "k3": False}, r"mask.*bool"),
]


@FACTORIES
@pytest.mark.parametrize("mask,match", MASK_CASES, ids=[str(i) for i in range(len(MASK_CASES))])
def test_bad_mask_at_init(factory, mask, match):
  tx = factory(rank=2, mask=mask, dimension_numbers=None)
  with pytest.raises(ValueError, match=match):
    tx.init(PARAMS)


@FACTORIES
def test_good_masks_are_accepted(factory):
  """Bools, numpy / jax scalar bools and a prefix are fine (the counterpart of the above)."""
  for mask in ({"w": True, "b": False, "k3": False},
               {"w": np.bool_(True), "b": jnp.array(False), "k3": False},
               gj.linear_kernels, False):
    factory(rank=2, mask=mask).init(PARAMS)


# --------------------------------------------------------------------------------------------
# update with a state made for other params
# --------------------------------------------------------------------------------------------


def test_state_for_other_params():
  tx = projection(rank=2)
  state = tx.init({"w": PARAMS["w"]})
  with pytest.raises(ValueError, match="state"):
    tx.update({"w": PARAMS["w"], "v": jnp.zeros((3, 5))}, state)


@FACTORIES
def test_numpy_integers_are_accepted(factory):
  """``rank`` / ``update_proj_gap`` computed with NumPy (``np.int64``) are integers too."""
  params = {"w": jnp.zeros((6, 4))}
  state = factory(rank=np.int64(2), update_proj_gap=np.int32(3)).init(params)
  bases = state.bases if isinstance(state, gj.GaLoreProjectionState) else state[0].bases
  assert bases[0].right.shape == (4, 2)


# --------------------------------------------------------------------------------------------
# leaves that cannot be projected, states that do not fit, ranks that save nothing
# --------------------------------------------------------------------------------------------

BOTH = pytest.mark.parametrize(
    "make", [lambda **kw: gj.galore_adamw(1e-2, **kw), lambda **kw: gj.ldadamw(1e-2, **kw)],
    ids=["galore_adamw", "ldadamw"])


def _bases(state):
  return state[0].bases


@BOTH
def test_integer_and_bool_leaves_are_never_projected(make):
  params = {"w": jnp.ones((6, 4)), "i": jnp.ones((6, 4), jnp.int32),
            "t": jnp.ones((6, 4), bool)}
  bases = dict(zip(["i", "t", "w"], _bases(make(rank=2).init(params))))
  assert isinstance(bases["w"], gj.Bases)
  assert bases["i"] == optax.MaskedNode() and bases["t"] == optax.MaskedNode()


@BOTH
def test_a_complex_leaf_is_refused_naming_it(make):
  params = {"w": jnp.ones((6, 4)), "c": jnp.ones((6, 4), jnp.complex64)}
  with pytest.raises(ValueError, match=r"\['c'\] is complex64: complex leaves cannot be projected"):
    make(rank=2).init(params)
  make(rank=2, mask={"w": True, "c": False}).init(params)  # left out: fine


def test_ldadamw_keeps_the_phase_of_unprojected_complex_leaves():
  """Unprojected leaves get Adam: for a complex leaf, optax's (|g|^2 second moment)."""
  params = {"c": jnp.ones((3,), jnp.complex64)}
  grads = [{"c": jnp.array([1 + 1j, 2j, -1], jnp.complex64)},
           {"c": jnp.array([0.5 - 1j, 1j, 3], jnp.complex64)}]
  ours = gj.ldadamw(1e-1, rank=2)
  ref = optax.adamw(1e-1, b1=0.908, b2=0.99, eps=1e-8, weight_decay=0.0)
  s, r = ours.init(params), ref.init(params)
  for g in grads:
    u, s = ours.update(g, s, params)
    v, r = ref.update(g, r, params)
    np.testing.assert_allclose(np.asarray(u["c"]), np.asarray(v["c"]), rtol=1e-6)
  assert np.abs(np.asarray(u["c"]).imag).max() > 0.01


@BOTH
def test_a_state_for_other_params_names_the_leaf_under_jit(make):
  tx = make(rank=2)
  state = tx.init({"v": jnp.ones(3), "w": jnp.ones((8, 4))})
  step = jax.jit(tx.update)
  with pytest.raises(ValueError, match=r"at \['w'\] \(matrices \(8, 6\) projected on the right at"
                     r" rank 2, but the state's bases have shapes"):
    step({"v": jnp.ones(3), "w": jnp.ones((8, 6))}, state, None)
  with pytest.raises(ValueError, match=r"at \['v'\] .* the state holds no bases"):
    step({"v": jnp.ones((8, 4)), "w": jnp.ones(3)}, state, None)


@BOTH
def test_a_rank_that_saves_nothing_warns_once_naming_the_leaves(make):
  params = {"big": jnp.ones((64, 32)), "small": jnp.ones((8, 8)), "wide": jnp.ones((6, 16))}
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    # 8 x 8 at rank 6: 6 * (8 + 16) = 144 >= 2 * 64; 64 x 32 at 6 and 6 x 16 at 2 save
    make(rank={"big": 6, "small": 6, "wide": 2}).init(params)
  (message,) = [str(w.message) for w in caught]
  assert "rank saves no optimizer memory at ['small']" in message
  assert "big" not in message and "wide" not in message
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    make(rank=2).init(params)  # saves on every leaf: no warning


MAP_PARAMS = [
    ("galore_adamw", lambda: gj.galore_adamw(1e-2, rank=2)),
    ("galore_lazy_transport", lambda: gj.galore_adamw(1e-2, rank=2, refresh=gj.lazy(2),
                                                      on_refresh="transport")),
    ("galore_lion", lambda: optax.chain(gj.galore_projection(optax.scale_by_lion(), rank=2),
                                        optax.scale(-1e-2))),
    ("galore_random_key", lambda: gj.galore_adamw(1e-2, rank=2, method="random")),
    ("galore_adamw_8bit", lambda: gj.galore_adamw_8bit(1e-2, rank=2, min_8bit_size=8)),
    ("galore_adafactor", lambda: gj.galore_adafactor(1e-2, rank=2, b1=0.9)),
    ("ldadamw", lambda: gj.ldadamw(1e-2, rank=2)),
    ("ldadamw_no_error_feedback", lambda: gj.ldadamw(1e-2, rank=2, error_feedback=False)),
    ("apollo_adamw", lambda: gj.apollo_adamw(1e-2, rank=2)),
    ("apollo_mini", lambda: gj.apollo_mini(1e-2)),
    ("apollo_svd", lambda: gj.apollo_adamw(1e-2, rank=2, proj="svd")),
    ("fira_adamw", lambda: gj.fira_adamw(1e-2, rank=2)),
]


@pytest.mark.parametrize("make", [m for _, m in MAP_PARAMS], ids=[n for n, _ in MAP_PARAMS])
def test_empty_leaves_are_not_projected(make):
  """A matrix with a zero-size axis has no subspace: it is left to the inner transform (whose
  update of it is empty), and the non-empty matrix beside it projects as usual."""
  params = {"e": jnp.ones((0, 6)), "w": jnp.ones((8, 6))}
  tx = make()
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(params, state, params)
  assert updates["e"].shape == (0, 6) and bool(jnp.isfinite(updates["w"]).all())
  bases = _bases(state)
  assert bases[0] == optax.MaskedNode() and isinstance(bases[1], gj.Bases)


@pytest.mark.parametrize("make", [m for _, m in MAP_PARAMS], ids=[n for n, _ in MAP_PARAMS])
def test_optax_tree_map_params(make):
  """optax's contract for any transform (its contrib common tests): identity leaves the
  state unchanged; a cast reaches the params-shaped moments and nothing else."""
  params = {"b": jnp.ones(4), "w": jnp.ones((8, 4))}
  tx = make()
  state = tx.update(params, tx.init(params), params)[1]
  same = optax.tree.map_params(tx, lambda v: v, state)
  assert jax.tree.structure(same) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(state)):
    assert a is b
  cast = optax.tree.map_params(tx, lambda v: v.astype(jnp.bfloat16), state)
  moments = [n for n in jax.tree.leaves(cast[0], is_leaf=lambda x: isinstance(x, dict))
             if isinstance(n, dict)]
  assert moments and all(x.dtype == jnp.bfloat16 for m in moments for x in jax.tree.leaves(m))
  for b in _bases(cast):
    if isinstance(b, gj.Bases):
      assert b.refreshes.dtype == jnp.int32
      assert all(x.dtype == jnp.float32 for x in (b.left, b.right) if x is not None)


# --------------------------------------------------------------------------------------------
# APOLLO and Fira
# --------------------------------------------------------------------------------------------

SUCCESSORS = [
    (lambda: gj.scale_by_apollo(2, proj="bogus"),
     r"proj='bogus' is not one of \('random', 'svd'\)"),
    (lambda: gj.scale_by_apollo(2, proj_type="full"), r"proj_type='full' is not one of"),
    (lambda: gj.scale_by_apollo(2, scale_type="row"), r"scale_type='row' is not one of"),
    (lambda: gj.scale_by_apollo(2, on_refresh="transport"), r"on_refresh='transport'; expected"),
    (lambda: gj.scale_by_apollo(2, proj="svd", on_refresh="transport"),  # (svd has a basis)
     r"^on_refresh='transport'; expected 'keep' or 'reset' \(APOLLO does not transport its"
     r" moments, with either proj\)\.$"),
    (lambda: gj.scale_by_apollo(0), r"rank must be an int >= 1"),
    (lambda: gj.scale_by_apollo(2, refresh=gj.lazy(10)),
     r"^proj='random' draws its bases: .* \(lazy\) need bases computed from the gradient:"
     r" use proj='svd', or every / staggered\.$"),
    # (galore took it: a drawn basis's overlap with the last says nothing of the gradient)
    (lambda: gj.galore_projection(method="random", refresh=gj.lazy(10)),
     r"^method='random' draws its bases: refresh policies that compare successive bases"
     r" \(lazy\) need bases computed from the gradient: use another method, or every /"
     r" staggered\.$"),
    (lambda: gj.galore_adamw(1e-2, method="random", refresh=gj.lazy(10)), r"method='random'"),
    # (galore refused it: the key is checked whether or not the method draws)
    (lambda: gj.scale_by_apollo(2, proj="svd", key="abc"),
     r"^key must be an int seed or a jax.random.key"),
    (lambda: gj.apollo_adamw(1e-2, limiter_gamma=0.5), r"limiter_gamma=0.5: .* must be a"
     r" finite number > 1"),
    (lambda: gj.apollo_mini(1e-2, limiter_gamma="1.01"), r"limiter_gamma='1.01': expected a"),
    (lambda: gj.galore_projection(residual="bogus"), r"residual='bogus' is not one of"),
    (lambda: gj.fira_adamw(1e-2, proj_type="full"), r"residual='fira' scales channels"),
    (lambda: gj.fira_adamw(1e-2, limiter_gamma=0.9), r"limiter_gamma=0.9"),
    (lambda: gj.memory.estimate({"w": jnp.zeros((4, 4))}, "apollo_adamw", proj="qr"),
     r"proj='qr' is not one of"),
    # one rank for every leaf: checked once, without the inject_hyperparams hint
    (lambda: gj.memory.estimate({"w": jnp.zeros((4, 4))}, "galore_adamw", rank=-3),
     r"^rank must be an int >= 1, got -3\.$"),
    # a basis similarity is a |cosine|: a threshold past 1 would never grow a gap
    (lambda: gj.lazy(10, threshold=2.0), r"^threshold must be a number in \[0, 1\]"),
    # betas outside [0, 1), which optax.scale_by_adam accepts
    (lambda: gj.galore_adamw(1e-2, b2=1.0), r"^b2=1.0 is not in \[0, 1\)"),
    (lambda: gj.fira_adamw(1e-2, b1=-0.1), r"^b1=-0.1 is not in \[0, 1\)"),
    (lambda: gj.apollo_adamw(1e-2, b2=1.5), r"scale_by_apollo: b2=1.5 is not in \[0, 1\)"),
]


@pytest.mark.parametrize("make", [
    lambda gamma: gj.fira_adamw(1e-2, limiter_gamma=gamma),
    lambda gamma: gj.galore_projection(residual="fira", limiter_gamma=gamma),
    lambda gamma: gj.apollo_adamw(1e-2, limiter_gamma=gamma),
    lambda gamma: gj.apollo_mini(1e-2, limiter_gamma=gamma),
], ids=["fira_adamw", "galore_projection", "apollo_adamw", "apollo_mini"])
def test_a_limiter_gamma_that_limits_nothing_or_everything_is_refused(make):
  """inf (or nan) was accepted and never limited (the limiter off, unsaid); 1.0 capped every
  step by the smallest one taken.  A gamma > 1 and None (no limiter) still build."""
  for gamma in (float("inf"), float("nan"), 1.0, 1):
    with pytest.raises(ValueError, match=rf"^limiter_gamma={gamma!r}: the norm-growth"
                       r" limiter's gamma must be a finite number > 1 \(.*\), or None to"
                       r" turn it off\.$"):
      make(gamma)
  make(1.01), make(None), make(jnp.float32(1.01))  # (an array: inject_hyperparams')


@pytest.mark.parametrize("make,match", SUCCESSORS, ids=[str(i) for i in range(len(SUCCESSORS))])
def test_successors_bad_arguments_are_one_line_errors(make, match):
  with pytest.raises(ValueError, match=match) as info:
    make()
  assert "\n" not in str(info.value)


def test_apollo_state_for_other_params_names_the_leaf():
  """The random projection is not stored: the moments' shapes tell a state made for other
  params (a stored SVD basis is checked as galore_projection's)."""
  tx = gj.scale_by_apollo(2)
  state = tx.init({"w": jnp.ones((8, 4))})
  with pytest.raises(ValueError, match=r"scale_by_apollo: the state does not fit the updates at"
                     r" \['w'\] \(moments \(8, 2\), coefficients \(6, 2\)\)"):
    jax.jit(tx.update)({"w": jnp.ones((6, 4))}, state)
  with pytest.raises(ValueError, match=r"holds no bases"):
    tx.update({"w": jnp.ones((8, 4))}, tx.init({"w": jnp.ones(3)}))
  svd = gj.scale_by_apollo(2, proj="svd")
  with pytest.raises(ValueError, match=r"state's bases have shapes"):
    svd.update({"w": jnp.ones((8, 6))}, svd.init({"w": jnp.ones((8, 4))}))


FITTING = [*MAP_PARAMS, ("adamw_8bit", lambda: gj.adamw_8bit(1e-2, min_8bit_size=8)),
           ("scale_by_adam_hf", gj.scale_by_adam_hf)]  # (hf: the moments broadcast silently)


TRANSFORMS = [("scale_by_adafactor", gj.scale_by_adafactor),
              ("scale_by_adam_8bit", lambda: gj.scale_by_adam_8bit(min_8bit_size=8)),
              ("scale_by_adam_hf", gj.scale_by_adam_hf),
              ("galore_projection", lambda: gj.galore_projection(rank=2)),
              ("scale_by_ldadam", lambda: gj.scale_by_ldadam(rank=2)),
              ("scale_by_apollo", lambda: gj.scale_by_apollo(2))]


@pytest.mark.parametrize("name,make", TRANSFORMS, ids=[n for n, _ in TRANSFORMS])
def test_a_state_for_a_tree_of_other_leaves_is_one_line_naming_the_transform(name, make):
  """Adafactor, 8-bit Adam and HF's Adam met a leaf more or less in JAX's words ("Dict key
  mismatch"), naming neither the transform nor its state, where the projecting transforms
  said "was the state made for other params?"."""
  params = {"b": jnp.ones(4), "w": jnp.ones((8, 4))}
  tx = make()
  for other in [{"w": jnp.ones((8, 4))}, {**params, "v": jnp.ones(3)}]:
    with pytest.raises(ValueError, match=rf"^{name}[: ].*other params\?") as info:
      jax.jit(tx.update)(other, tx.init(params), other)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("make", [m for _, m in FITTING], ids=[n for n, _ in FITTING])
def test_a_state_for_other_shapes_is_one_line_naming_the_leaf(make):
  """An update whose shapes the state was not made for -- a projected matrix of another
  height, whose bases still fit, or an unprojected vector of another length -- is one
  ValueError line naming the leaf, under jit, not a broadcasting failure inside the step."""
  params = {"b": jnp.ones(4), "w": jnp.ones((8, 4))}
  tx = make()
  state = tx.init(params)
  for other, leaf in [({"b": jnp.ones(4), "w": jnp.ones((6, 4))}, "'w'"),
                      ({"b": jnp.ones(5), "w": jnp.ones((8, 4))}, "'b'|not projected")]:
    with pytest.raises(ValueError, match=rf"the state does not fit the updates at .*({leaf})"
                       ) as info:
      jax.jit(tx.update)(other, state, other)
    assert "\n" not in str(info.value)


DECAYING = [
    ("galore_adamw", gj.galore_adamw), ("galore_adamw_8bit", gj.galore_adamw_8bit),
    ("galore_adafactor", gj.galore_adafactor), ("fira_adamw", gj.fira_adamw),
    ("ldadamw", functools.partial(gj.ldadamw, rank=2)), ("apollo_adamw", gj.apollo_adamw),
    ("apollo_mini", gj.apollo_mini),
    ("adamw_8bit", lambda lr, **kw: gj.adamw_8bit(
        lr, **{("mask" if k == "weight_decay_mask" else k): v for k, v in kw.items()})),
]


@pytest.mark.parametrize("make", [m for _, m in DECAYING], ids=[n for n, _ in DECAYING])
def test_a_weight_decay_mask_that_does_not_fit_is_one_line_at_init(make):
  """optax's own error for a mask tree that is no prefix of the params spans lines and
  names no argument."""
  params = {"b": jnp.ones(4), "w": jnp.ones((8, 4))}
  name = "mask" if make is DECAYING[-1][1] else "weight_decay_mask"
  for mask in [{"w": True}, {"w": True, "b": {"x": False}}, lambda p: {"w": True}]:
    with pytest.raises(ValueError, match=rf"^{name}: its structure does not match the params"
                       ) as info:
      make(1e-2, weight_decay=0.1, weight_decay_mask=mask).init(params)
    assert "\n" not in str(info.value)
  tx = make(1e-2, weight_decay=0.1, weight_decay_mask={"b": False, "w": True})
  state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, state, params)
  assert float(jnp.abs(updates["b"]).max()) == 0.0 < float(jnp.abs(updates["w"]).min())


@pytest.mark.parametrize("make", [m for _, m in DECAYING], ids=[n for n, _ in DECAYING])
def test_a_weight_decay_mask_of_other_values_than_bools_is_refused(make):
  """optax reads a mask leaf by truthiness: "no" decayed the leaf, as the projection's
  ``mask`` already refused."""
  params = {"b": jnp.ones(4), "w": jnp.ones((8, 4))}
  name = "mask" if make is DECAYING[-1][1] else "weight_decay_mask"
  for mask, bad in [({"b": False, "w": "no"}, "'no'"), (lambda p: {"b": 0, "w": True}, "0"),
                    ({"b": jnp.zeros(4, bool), "w": True}, "Array")]:
    with pytest.raises(ValueError, match=rf"^{name} must hold bools; at .* it holds {bad}"):
      make(1e-2, weight_decay=0.1, weight_decay_mask=mask).init(params)
  tx = make(1e-2, weight_decay=0.1, weight_decay_mask={"b": jnp.bool_(False), "w": True})
  tx.init(params)


@pytest.mark.parametrize("make", [gj.galore_adamw, gj.galore_adamw_8bit, gj.galore_adafactor,
                                  gj.fira_adamw, gj.apollo_adamw, gj.apollo_mini,
                                  lambda scale: gj.galore_projection(scale=scale),
                                  lambda scale: gj.scale_by_apollo(2, scale=scale)])
@pytest.mark.parametrize("scale", [0.0, -0.25])
def test_a_scale_that_is_not_positive_is_refused(make, scale):
  """A negative alpha would reverse the projected update without a word."""
  with pytest.raises(ValueError, match=rf"^scale must be a finite number > 0, got {scale}\.$"):
    make(1e-2, scale=scale) if make in (gj.galore_adamw, gj.galore_adamw_8bit,
                                        gj.galore_adafactor, gj.fira_adamw, gj.apollo_adamw,
                                        gj.apollo_mini) else make(scale)


@pytest.mark.parametrize("block_size", [3, 0, 100])
def test_quantize_and_zeros_refuse_a_block_size_that_is_no_power_of_two(block_size):
  """dequantize reads the block size back from the shapes, which only a power of two allows."""
  with pytest.raises(ValueError, match="^block_size must be"):
    gj.quantization.quantize(jnp.ones(8), signed=True, block_size=block_size)
  with pytest.raises(ValueError, match="^block_size must be"):
    gj.quantization.zeros((8,), block_size=block_size)


@pytest.mark.parametrize("make", [gj.galore_adamw, functools.partial(gj.ldadamw, rank=2),
                                  gj.apollo_adamw])
def test_one_nd_dimension_numbers_without_a_mask_is_refused(make):
  """mask=None selects 2-D leaves only: one set of dimension numbers naming a 4-D kernel's
  axes used to leave that kernel unprojected without a word (or fail on a 2-D leaf)."""
  dims = gj.DimensionNumbers((0, 1, 2), 3)
  for params in ({"conv": jnp.ones((3, 3, 8, 16))},
                 {"conv": jnp.ones((3, 3, 8, 16)), "dense": jnp.ones((8, 4))}):
    with pytest.raises(ValueError, match=r"names axis 3, but mask=None selects only 2-D leaves"
                       ) as info:
      make(1e-2, rank=2, dimension_numbers=dims).init(params)
    assert "\n" not in str(info.value)
  # An axis counted from the end beyond a matrix's two: a 2-D leaf failed, naming it only,
  # and a model of N-D kernels only was left unprojected with a warning.
  for params in ({"conv": jnp.ones((3, 3, 8, 16))},
                 {"conv": jnp.ones((3, 3, 8, 16)), "dense": jnp.ones((8, 4))}):
    with pytest.raises(ValueError, match=r"names axis -4, but mask=None selects only 2-D leaves"
                       ):
      make(1e-2, rank=2, dimension_numbers=gj.DimensionNumbers((-4, -3), -1)).init(params)
  state = make(1e-2, rank=2, dimension_numbers=dims, mask={"conv": True}).init(
      {"conv": jnp.ones((3, 3, 8, 16))})
  assert gj.tree_bytes(state) < 2 * 4 * 3 * 3 * 8 * 16  # projected: less than Adam's moments


def test_hf_numerics_arguments_are_one_line_errors():
  """galore_adamw(numerics=...) names the choices; HF's Adam has no eps_root to honour."""
  with pytest.raises(ValueError, match=r"^numerics='torch' is not one of \('optax', 'hf'\)\.$"):
    gj.galore_adamw(1e-2, numerics="torch")
  with pytest.raises(ValueError, match=r"^eps_root=1e-08: numerics='hf' has no eps_root"):
    gj.galore_adamw(1e-2, numerics="hf", eps_root=1e-8)


@pytest.mark.parametrize("make", [gj.scale_by_adam_hf, gj.scale_by_hf_bias_correction])
def test_hf_transforms_refuse_integer_updates_and_a_missing_state(make):
  """HF's step is cast back to the update's dtype: an int32 gradient came back as zeros
  without a word (optax.scale_by_adam steps it in float).  No state: an AttributeError."""
  tx, name = make(), make.__name__
  g = {"b": jnp.ones(2), "w": jnp.array([1, 2], jnp.int32)}
  with pytest.raises(ValueError, match=rf"^{name}: \['w'\] is int32: the updates must be"
                     r" floating \(the step, cast back to int32, would truncate\)\."):
    jax.jit(tx.update)(g, tx.init(g))
  with pytest.raises(ValueError, match=rf"^{name}: the state is None: call init"):
    tx.update({"w": jnp.ones(2)}, None)


INTEGER_STEPPED = [  # (transform, the name its message gives)
    (gj.scale_by_adafactor(), "scale_by_adafactor"),
    (gj.scale_by_adam_8bit(), "scale_by_adam_8bit"),
    (gj.scale_by_ldadam(rank=2), "scale_by_ldadam"),
    (gj.galore_adamw_8bit(1e-2, rank=2), "scale_by_adam_8bit"),
    (gj.galore_adafactor(1e-2, rank=2), "scale_by_adafactor")]


@pytest.mark.parametrize("tx,name", INTEGER_STEPPED, ids=[n for _, n in INTEGER_STEPPED[:3]]
                         + ["galore_adamw_8bit", "galore_adafactor"])
def test_transforms_that_cast_their_step_back_refuse_integer_updates(tx, name):
  """Adafactor, 8-bit Adam and LDAdam cast the step back to the update's dtype: an int32
  gradient (here an unprojected vector) came back as zeros without a word."""
  params = {"b": jnp.ones(3), "w": jnp.ones((4, 3))}
  grads = {"b": jnp.array([1, 2, 3], jnp.int32), "w": jnp.ones((4, 3))}
  with pytest.raises(ValueError, match=rf"^{name}: \['b'\] is int32: the updates must be"
                     r" floating \(the step, cast back to int32, would truncate\)\."):
    jax.jit(tx.update)(grads, tx.init(params), params)


# --------------------------------------------------------------------------------------------
# hyperparameters: range and type
# --------------------------------------------------------------------------------------------

# each public constructor, the float hyperparameters it takes that must be finite and >= 0
# (scale: > 0), and the name its error gives them
HYPER = [
    ("galore_adamw", lambda **kw: gj.galore_adamw(1e-3, rank=2, **kw),
     {"eps": "eps", "eps_root": "eps_root", "weight_decay": "weight_decay", "scale": "scale"}),
    ("fira_adamw", lambda **kw: gj.fira_adamw(1e-3, rank=2, **kw),
     {"eps": "eps", "eps_root": "eps_root", "weight_decay": "weight_decay", "scale": "scale"}),
    ("galore_adamw_8bit", lambda **kw: gj.galore_adamw_8bit(1e-3, rank=2, **kw),
     {"eps": "eps", "eps_root": "eps_root", "weight_decay": "weight_decay", "scale": "scale"}),
    ("galore_adafactor", lambda **kw: gj.galore_adafactor(1e-3, rank=2, **kw),
     {"weight_decay": "weight_decay", "scale": "scale"}),
    ("galore_projection", lambda **kw: gj.galore_projection(rank=2, **kw), {"scale": "scale"}),
    ("ldadamw", lambda **kw: gj.ldadamw(1e-3, rank=2, **kw),
     {"eps": "scale_by_ldadam: eps", "weight_decay": "weight_decay"}),
    ("scale_by_ldadam", lambda **kw: gj.scale_by_ldadam(rank=2, **kw),
     {"eps": "scale_by_ldadam: eps"}),
    ("apollo_adamw", lambda **kw: gj.apollo_adamw(1e-3, rank=2, **kw),
     {"eps": "scale_by_apollo: eps", "eps_root": "scale_by_apollo: eps_root",
      "weight_decay": "weight_decay", "scale": "scale"}),
    ("apollo_mini", lambda **kw: gj.apollo_mini(1e-3, **kw),
     {"eps": "scale_by_apollo: eps", "weight_decay": "weight_decay", "scale": "scale"}),
    ("scale_by_apollo", lambda **kw: gj.scale_by_apollo(2, **kw),
     {"eps": "scale_by_apollo: eps", "eps_root": "scale_by_apollo: eps_root", "scale": "scale"}),
    ("adamw_8bit", lambda **kw: gj.adamw_8bit(1e-3, **kw),
     {"eps": "eps", "eps_root": "eps_root", "weight_decay": "weight_decay"}),
    ("scale_by_adam_8bit", lambda **kw: gj.scale_by_adam_8bit(**kw),
     {"eps": "eps", "eps_root": "eps_root"}),
    ("scale_by_adafactor", lambda **kw: gj.scale_by_adafactor(1e-3, **kw), {"eps": "eps"}),
    ("add_step_size_decay",
     lambda **kw: gj.adafactor.add_step_size_decay(1e-3, **{"weight_decay": 0.0, **kw}),
     {"weight_decay": "weight_decay"}),
    ("scale_by_adam_hf", lambda **kw: gj.scale_by_adam_hf(**kw), {"eps": "eps"}),
]
RANGE_CASES = [(n, make, arg, shown, bad) for n, make, args in HYPER
               for arg, shown in args.items()
               for bad in (float("nan"), float("inf"), -1.0)]


@pytest.mark.parametrize(
    "make,arg,shown,bad", [c[1:] for c in RANGE_CASES],
    ids=[f"{n}-{arg}={bad}" for n, _, arg, _, bad in RANGE_CASES])
def test_a_hyperparameter_out_of_range_is_one_line_naming_it(make, arg, shown, bad):
  """A negative eps can cancel the root it is added to (ldadamw(eps=-1) stepped -4.8e4), a
  nan or inf eps, weight decay or scale poisons every step: all were accepted."""
  with pytest.raises(ValueError, match=rf"^{shown} must be a finite number >=? 0, got {bad!r}\.$"
                     ) as info:
    make(**{arg: bad})
  assert "\n" not in str(info.value)


HYPER_MAKERS = {n: make for n, make, _ in HYPER}
TYPED = [(n, arg, shown) for n, _, args in HYPER for arg, shown in args.items()] + [
    ("galore_adamw", "b1", "b1"), ("fira_adamw", "b2", "b2"), ("galore_adamw_8bit", "b1", "b1"),
    ("galore_adafactor", "b1", "b1"), ("galore_adafactor", "decay_rate", "decay_rate"),
    ("galore_adafactor", "clip_threshold", "clip_threshold"),
    ("ldadamw", "rho", "scale_by_ldadam: rho"), ("ldadamw", "b2", "scale_by_ldadam: b2"),
    ("apollo_adamw", "b1", "scale_by_apollo: b1"), ("adamw_8bit", "b2", "b2"),
    ("scale_by_adam_hf", "b1", "scale_by_adam_hf: b1")]


@pytest.mark.parametrize("name,arg,shown", TYPED, ids=[f"{n}-{a}" for n, a, _ in TYPED])
def test_a_hyperparameter_that_is_no_number_is_one_line_naming_it(name, arg, shown):
  """scale='0.25' or b1='0.9' failed at the first step with a TypeError naming no argument
  ("Only integer scalar arrays can be converted to a scalar index")."""
  off = name == "galore_adafactor" and arg in ("b1", "clip_threshold")  # None: turned off
  for bad, shows in [("0.5", r"'0\.5' \(str\)")] + [(None, r"None \(NoneType\)")] * (not off):
    with pytest.raises(ValueError, match=rf"^{shown} must be a (finite )?number .*got {shows}\.$"
                       ) as info:
      HYPER_MAKERS[name](**{arg: bad})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", list(HYPER_MAKERS))
def test_ints_numpy_scalars_and_arrays_are_hyperparameters_too(name):
  """The checks take a Python int, a NumPy scalar and a (0-d) array for a float: each steps as
  the float does."""
  args = next(args for n, _, args in HYPER if n == name)
  ints = {arg: 0 if arg == "eps_root" else 1 for arg in args}
  params = {"b": jnp.ones(4), "w": jnp.arange(32.0).reshape(8, 4) / 10}
  grads = jax.tree.map(lambda p: jnp.sin(3 * p) + 0.1, params)

  def step(kw):
    tx = HYPER_MAKERS[name](**kw)
    return tx.update(grads, tx.init(params), params)[0]

  want = step({k: float(v) for k, v in ints.items()})
  for cast in (int, np.int64, np.float32, np.float64, jnp.float32):
    got = step({k: cast(v) for k, v in ints.items()})
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-6, err_msg=f"{cast.__name__}")


FLOAT_LEAF = [
    ("galore_adamw", lambda: gj.galore_adamw(1e-2, rank=2)),
    ("galore_adamw_8bit", lambda: gj.galore_adamw_8bit(1e-2, rank=2)),
    ("galore_adafactor", lambda: gj.galore_adafactor(1e-2, rank=2)),
    ("galore_adafactor_param_scale", lambda: gj.galore_adafactor(
        1e-2, rank=2, b1=0.9, weight_decay=0.1, scale_parameter=True)),
    ("scale_by_adafactor", lambda: gj.scale_by_adafactor(1e-2)),
    ("ldadamw", lambda: gj.ldadamw(1e-2, rank=2)),
    ("ldadamw_no_error_feedback", lambda: gj.ldadamw(1e-2, rank=2, error_feedback=False)),
    ("apollo_adamw", lambda: gj.apollo_adamw(1e-2, rank=2)),
    ("adamw_8bit", lambda: gj.adamw_8bit(1e-2)),
    ("scale_by_adam_hf", gj.scale_by_adam_hf),
    ("scale_by_hf_bias_correction", gj.scale_by_hf_bias_correction),
]


@pytest.mark.parametrize("make", [m for _, m in FLOAT_LEAF], ids=[n for n, _ in FLOAT_LEAF])
def test_a_python_float_leaf_is_a_0d_array(make):
  """optax.adam takes {"w": w, "s": 1.0}; Adafactor, LDAdam and the 8-bit Adam failed on
  the float ('float' object has no attribute 'shape' / 'dtype' / 'astype'): they now step
  it as the 0-d float32 array it stands for."""
  w = jnp.arange(32.0).reshape(8, 4) / 10
  tx = make()
  runs = []
  for cast in (float, jnp.float32):
    params = {"s": cast(1.5), "w": w}
    state, out = tx.init(params), []
    for k in range(2):
      grads = {"s": cast(0.5 - k), "w": jnp.cos(w + k)}
      step = tx.update if k == 0 else jax.jit(tx.update)  # (eagerly too: no tracers)
      updates, state = step(grads, state, params)
      out.append(updates)
    runs.append(out)
  for got, want in zip(*runs):
    np.testing.assert_allclose(got["s"], want["s"], rtol=1e-6)
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)


@pytest.mark.parametrize("optimizer", ["galore_adamw", "ldadamw", "galore_adafactor",
                                       "apollo_adamw", "adamw_8bit"])
def test_memory_estimate_counts_a_python_float_leaf_as_float32(optimizer):
  w = jnp.ones((8, 4))
  kw = {} if optimizer == "adamw_8bit" else {"rank": 2}
  got = gj.memory.estimate({"s": 1.0, "w": w}, optimizer, **kw)
  assert got == gj.memory.estimate({"s": jnp.float32(1.0), "w": w}, optimizer, **kw)


OTHER_CONFIG = [  # (name, the state's maker, the updating transform's maker, the field)
    ("galore_to_fira", lambda: gj.galore_adamw(1e-2, rank=2),
     lambda: gj.fira_adamw(1e-2, rank=2), "residual_norms"),
    ("fira_to_galore", lambda: gj.fira_adamw(1e-2, rank=2),
     lambda: gj.galore_adamw(1e-2, rank=2), "residual_norms"),
    ("fira_no_limiter", lambda: gj.fira_adamw(1e-2, rank=2, limiter_gamma=None),
     lambda: gj.fira_adamw(1e-2, rank=2), "residual_norms"),
    ("every_to_staggered", lambda: gj.galore_adamw(1e-2, rank=2),
     lambda: gj.galore_adamw(1e-2, rank=2, refresh=gj.staggered(4)), "refresh_state"),
    ("staggered_to_lazy", lambda: gj.galore_adamw(1e-2, rank=2, refresh=gj.staggered(4)),
     lambda: gj.galore_adamw(1e-2, rank=2, refresh=gj.lazy(4)), "refresh_state"),
    ("lazy_to_every", lambda: gj.galore_adamw(1e-2, rank=2, refresh=gj.lazy(4)),
     lambda: gj.galore_adamw(1e-2, rank=2), "refresh_state"),
    ("svd_to_random", lambda: gj.galore_adamw(1e-2, rank=2),
     lambda: gj.galore_adamw(1e-2, rank=2, method="random", key=5), "rng_key"),
    ("error_feedback_off_to_on", lambda: gj.ldadamw(1e-2, rank=2, error_feedback=False),
     lambda: gj.ldadamw(1e-2, rank=2), "error"),
    ("error_feedback_on_to_off", lambda: gj.ldadamw(1e-2, rank=2),
     lambda: gj.ldadamw(1e-2, rank=2, error_feedback=False), "error"),
    ("apollo_no_limiter", lambda: gj.apollo_adamw(1e-2, rank=2, limiter_gamma=None),
     lambda: gj.apollo_adamw(1e-2, rank=2), "norms"),
    ("apollo_every_to_staggered", lambda: gj.apollo_adamw(1e-2, rank=2),
     lambda: gj.apollo_adamw(1e-2, rank=2, refresh=gj.staggered(4)), "refresh_state"),
]


@pytest.mark.parametrize("made,used,field", [c[1:] for c in OTHER_CONFIG],
                         ids=[c[0] for c in OTHER_CONFIG])
def test_a_state_of_another_configuration_is_one_line_naming_the_field(made, used, field):
  """galore_adamw's state stepped by fira_adamw, a staggered policy's by a lazy one, LDAdam's
  without error feedback by one with failed with "'NoneType' object is not subscriptable"
  or "has no attribute 'gap'" (or, the other way round, dropped the field or drew from
  key 0 instead of the key given): now one line naming the field, under jit too."""
  params = {"b": jnp.ones(4), "w": jnp.ones((8, 4))}
  state = made().init(params)
  with pytest.raises(ValueError, match=rf"does not match this transform's configuration at"
                     rf" \.{field} \(") as info:
    jax.jit(used().update)(params, state, params)
  assert "\n" not in str(info.value)


def test_a_stacked_leaf_without_dimension_numbers_is_one_line_with_dims_that_fit_it():
  """A 3-D leaf the mask selects, without dimension_numbers: one line naming it, whose first
  suggestion (a stack of (in, out) kernels on axis 0, as a scanned model's) does fit it."""
  params = {"w": jnp.ones((3, 8, 6))}
  with pytest.raises(ValueError, match=r"^\['w'\] has shape \(3, 8, 6\): only 2-D leaves can be"
                     r" projected without dimension_numbers; pass dimension_numbers \(e\.g\."
                     r" galore_jax\.DimensionNumbers\(reduction_axis=1, output_axis=2\) for a"
                     r" stack of \(in, out\) kernels on axis 0") as info:
    gj.galore_adamw(1e-2, rank=2, mask={"w": True}).init(params)
  assert "\n" not in str(info.value)
  dims = gj.DimensionNumbers(reduction_axis=1, output_axis=2)
  tx = gj.galore_adamw(1e-2, rank=2, mask={"w": True}, dimension_numbers={"w": dims})
  jax.jit(tx.update)(params, tx.init(params), params)


_OTHER_STEPS = r"was it made with clip_threshold or learning_rate None where this one sets it"


@pytest.mark.parametrize("wrap", [lambda t: gj.galore_projection(t, rank=2), lambda t: t],
                         ids=["in_galore_projection", "alone"])
@pytest.mark.parametrize("made, used, says", [
    ({"b1": None}, {"b1": 0.9}, r"the state does not match this transform's configuration at"
     r" \.ema \(the state holds None, this transform keeps a value there\): was it made with"
     r" b1=None\?"),
    ({"b1": 0.9}, {}, r"the state does not match this transform's configuration at \.ema"
     r" \(the state holds an EmaState, this transform keeps None there\): was it made with b1"
     r" set \(a first moment\)\?"),
    ({}, {"clip_threshold": None}, r"the state holds the steps \(second moment, clipping, step"
     r" size\), this transform chains \(second moment, step size\): " + _OTHER_STEPS),
    ({"clip_threshold": None}, {}, r"the state holds the steps \(second moment, step size\),"
     r" this transform chains \(second moment, clipping, step size\): " + _OTHER_STEPS),
    ({"learning_rate": None}, {"clip_threshold": None}, r"the state holds the steps \(second"
     r" moment, clipping\), this transform chains \(second moment, step size\): "
     + _OTHER_STEPS),
], ids=["b1_none_to_set", "b1_set_to_none", "clip_to_none", "none_to_clip",
        "lr_none_to_clip_none"])
def test_an_adafactor_state_of_another_configuration_is_one_line(wrap, made, used, says):
  """A state made with b1, clip_threshold or learning_rate None stepped by a transform that
  sets it (or the reverse, or one for the other) failed with optax's "The number of updates
  and states has to be the same in chain!", naming no argument, or inside a step."""
  params = {"b": jnp.ones(4), "w": jnp.ones((8, 4))}
  make = lambda kw: wrap(gj.scale_by_adafactor(**{"learning_rate": 1e-2, **kw}))
  state = make(made).init(params)
  with pytest.raises(ValueError, match=r"^scale_by_adafactor: " + says) as info:
    jax.jit(make(used).update)(params, state, params)
  assert "\n" not in str(info.value)
  jax.jit(make(made).update)(params, state, params)  # its own configuration steps


@pytest.mark.parametrize("made,used,name,holds,keeps", [
    (lambda: gj.galore_adamw(1e-2, rank=16), lambda: gj.galore_adamw_8bit(1e-2, rank=16),
     "galore_projection", "an array", "a Quantized"),
    (lambda: gj.galore_adamw_8bit(1e-2, rank=16), lambda: gj.galore_adamw(1e-2, rank=16),
     "galore_projection", "a Quantized", "an array"),
    (optax.scale_by_adam, gj.scale_by_adam_8bit, "scale_by_adam_8bit", "an array",
     "a Quantized"),
], ids=["galore_adamw_to_8bit", "galore_8bit_to_adamw", "adam_to_8bit"])
def test_float_and_8bit_moments_are_not_taken_for_each_other(made, used, name, holds, keeps):
  """galore_adamw's state stepped by galore_adamw_8bit was accepted, its moments kept in
  float32 (4 bytes an entry, not 1); the reverse failed with "can't multiply sequence by
  non-int of type 'float'"."""
  params = {"w": jnp.ones((256, 64))}  # 256 x 16 coefficients: 8-bit moments (>= 4096)
  state = made().init(params)
  with pytest.raises(ValueError, match=rf"^{name}: the state holds {holds} at \.mu\['w'\]"
                     rf" where this transform keeps {keeps} \(8-bit moments for float ones")\
      as info:
    jax.jit(used().update)(params, state, params)
  assert "\n" not in str(info.value)


@FACTORIES
def test_dimension_numbers_take_numpy_ints_and_refuse_bools(factory):
  """np.int64 axes failed ("'numpy.int64' object is not iterable"); True / False were taken
  as axes 1 / 0."""
  params = {"k": jnp.arange(24.0).reshape(4, 3, 2) / 10}
  grads = jax.tree.map(jnp.cos, params)

  def step(dims):
    tx = factory(rank=1, dimension_numbers={"k": dims}, mask={"k": True})
    return tx.update(grads, tx.init(params), params)[0]["k"]

  want = step(DN(0, (1, 2)))
  np.testing.assert_array_equal(step(DN(np.int64(0), (np.int32(1), np.int64(2)))), want)
  np.testing.assert_array_equal(step(DN(np.int64(0), np.array([1, 2]))), want)
  for dims, field in [(DN(True, 0), "reduction_axis"), (DN(0, (False, True)), "output_axis")]:
    with pytest.raises(ValueError, match=rf"^dimension_numbers for \['k'\]: {field} must be an"
                       r" int or a non-empty tuple of ints \(not bools\), got") as info:
      step(dims)
    assert "\n" not in str(info.value)


def test_state_shardings_refuses_a_partition_spec_in_one_line():
  """A PartitionSpec (or a mesh) for a NamedSharding failed with "'P' object has no attribute
  'mesh'"; a NamedSharding of the same spec still gives the state's shardings."""
  mesh = jax.make_mesh((1, 1), ("data", "model"))
  params = {"w": jnp.ones((64, 32))}
  tx = gj.galore_adamw(1e-3, rank=4)
  for given, shown in [({"w": jax.P("data")}, r"\['w'\] is P\('data',\) \(a PartitionSpec\)"),
                       ({"w": mesh}, r"\['w'\] is Mesh\(.*\(Mesh\)"),
                       (jax.P("data"), r" is P\('data',\) \(a PartitionSpec\)")]:
    with pytest.raises(ValueError, match=rf"^state_shardings: param_shardings{shown}, expected a"
                       r" jax.sharding.NamedSharding") as info:
      gj.sharding.state_shardings(tx, params, given)
    assert "\n" not in str(info.value)
  sh = gj.sharding.state_shardings(tx, params, {"w": jax.NamedSharding(mesh, jax.P("data"))})
  assert tuple(sh[0].inner_state.mu["w"].spec) == ("data", None)


def test_state_shardings_names_where_param_shardings_departs_from_the_params():
  """param_shardings of another tree structure failed inside a tree-map, with a pytree
  error of a dozen lines (or "unhashable type: 'dict'" for a subtree where a param is a
  leaf)."""
  mesh = jax.make_mesh((1,), ("data",))
  ns = jax.NamedSharding(mesh, jax.P("data"))
  params = {"b": jnp.ones(4), "w": jnp.ones((8, 4))}
  tx = gj.galore_adamw(1e-3, rank=2)
  for given, where in [
      ({"w": ns}, r"\['b'\] is in the params, not in param_shardings"),
      ({"b": None, "w": ns, "x": ns}, r"\['x'\] is in param_shardings, not in the params"),
      ({"b": None, "w": {"k": ns}}, r"at \['w'\] a leaf in the params, a subtree in"
                                    r" param_shardings"),
  ]:
    with pytest.raises(ValueError, match=r"^state_shardings: param_shardings must have the"
                       rf" params' tree structure \(.*\); {where}\.$") as info:
      gj.sharding.state_shardings(tx, params, given)
    assert "\n" not in str(info.value)
  sh = gj.sharding.state_shardings(tx, params, {"b": None, "w": ns})  # None: replicated
  assert tuple(sh[0].inner_state.mu["w"].spec) == ("data", None)
  assert sh[0].inner_state.mu["b"].is_fully_replicated


NOTHING = lambda p: jax.tree.map(lambda _: False, p)


@pytest.mark.parametrize("make,name", [
    (lambda mask: gj.galore_adamw(1e-2, rank=2, mask=mask), "galore_projection"),
    (lambda mask: gj.galore_adafactor(1e-2, rank=2, mask=mask), "galore_projection"),
    (lambda mask: gj.ldadamw(1e-2, rank=2, mask=mask), "scale_by_ldadam"),
    (lambda mask: gj.apollo_adamw(1e-2, rank=2, mask=mask), "scale_by_apollo"),
], ids=["galore_adamw", "galore_adafactor", "ldadamw", "apollo_adamw"])
def test_a_mask_that_projects_nothing_warns_once(make, name):
  """A mask that selects no matrix ran the full-rank optimizer without a word (a warning,
  not an error: the rest of a model whose layers are updated apart is that on purpose); a
  params stand-in (optax.tree.map_params) does not warn."""
  params = {"b": jnp.ones(4), "w": jnp.ones((8, 4))}
  for mask in (NOTHING, {"b": False, "w": False}, None):
    one = {"b": params["b"]} if mask is None else params  # mask=None: 2-D leaves only
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      make(mask).init(one)
    (message,) = [str(w.message) for w in caught]
    assert message.startswith(f"{name}: no leaf is projected (the mask selects none")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tx = make(None)
    state = tx.init(params)
    optax.tree.map_params(tx, lambda v: v.astype(jnp.bfloat16), state)

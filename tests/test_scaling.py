"""galore_jax.scaling's building blocks refuse what they would compute wrongly, in one line."""

import jax.numpy as jnp
import pytest

from galore_jax import plans
from galore_jax import scaling

ONES = jnp.ones((2, 3))


@pytest.mark.parametrize("call, match", [
    # each returned a wrong ratio without a word: a complex one 0, a mismatched pair a
    # broadcast, eps -1 zero, left "no" the left ratio
    (lambda: scaling.norm_ratio(ONES * 1j, ONES, True),
     r"^norm_ratio: num is complex64: expected real coefficients\.$"),
    (lambda: scaling.norm_ratio(jnp.ones((3, 3)), ONES, True),
     r"^norm_ratio: num and den must have one shape, got \(3, 3\) and \(2, 3\)\.$"),
    (lambda: scaling.norm_ratio(ONES, ONES, True, eps=-1.0),
     r"^eps must be a finite number >= 0, got -1\.0\.$"),
    (lambda: scaling.norm_ratio(ONES, ONES, "no"), r"^left must be True or False, got 'no'"),
    # gamma 0.5 shrank every step, None raised a TypeError, complex u lost its imaginary part,
    # a prev of another batch shape failed in a comparison
    (lambda: scaling.limit_growth(jnp.ones((3, 2, 2)), jnp.ones(3), 0.5),
     r"^gamma=0\.5: the norm-growth limiter's gamma must be a finite number > 1"),
    (lambda: scaling.limit_growth(jnp.ones((3, 2, 2)), jnp.ones(3), None),
     r"^gamma=None: expected a number > 1 \(limit_growth always limits\)\.$"),
    (lambda: scaling.limit_growth(jnp.ones((3, 2, 2)) * 1j, jnp.ones(3), 1.01),
     r"^limit_growth: u is complex64: expected real matrices\.$"),
    (lambda: scaling.limit_growth(jnp.ones((3, 2, 2)), jnp.ones(2), 1.01),
     r"^limit_growth: prev must have u's batch shape \(3,\), got \(2,\)\.$"),
])
def test_bad_input_is_one_line(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_an_array_gamma_and_eps_are_the_callers():
  """optax.inject_hyperparams hands them over as arrays: they pass (as scaling.check_gamma and
  the transforms' own checks let them)."""
  u, norm = scaling.limit_growth(jnp.full((1, 2, 2), 1.0), jnp.array([1.0]), jnp.float32(1.01))
  assert abs(float(norm[0]) - 1.01) < 1e-6 and abs(float(u[0, 0, 0]) - 0.505) < 1e-6
  r = scaling.norm_ratio(ONES, ONES, True, eps=jnp.float32(0.0))
  assert r.shape == (1, 3) and bool(jnp.all(r == 1.0))


def test_zero_norms_needs_a_plan_per_leaf():
  """A plan list shorter than the params gave norms for the first leaves only."""
  params = {"a": jnp.zeros((6, 4)), "b": jnp.zeros((6, 4))}
  lp = plans.leaf_plans(params, None, None, 2, "std")
  with pytest.raises(ValueError, match=r"^zero_norms: plans has 1 entries for 2 leaves of"
                                       r" params: one plan \(or None\) per leaf\.$"):
    scaling.zero_norms(params, lp[:1])

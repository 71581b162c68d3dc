"""``galore_jax.galore_adamw`` against the independent NumPy oracle in ``tests/oracle.py``.

Params are a tall (24x10), a wide (10x24) and a square (16x16) matrix, three small matrices for
which rank 6 is clipped to min(m, n) (12x5, 5x12, and 6x6 where rank == min), and a 1-D bias.
Gradients
are given per step (fresh random singular vectors, well-separated singular values), so the
projector changes at every refresh while the Adam moments are carried over.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runners import run_galore_jax  # noqa: E402
from oracle import (  # noqa: E402
    PROJ_TYPES,
    canonical_signs,
    galore_adamw_oracle,
    make_problem,
    projection_side,
)

import galore_jax as gj  # noqa: E402

SHAPES = {
    "tall": (24, 10), "wide": (10, 24), "square": (16, 16),
    "tall_clip": (12, 5), "wide_clip": (5, 12), "square_clip": (6, 6),
    "bias": (10,),
}
RANK = 6  # clipped to 5, 5, 6 on the *_clip leaves
HP = dict(lr=1e-2, update_proj_gap=3, scale=0.25, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1)
STEPS = 10
RTOL, ATOL = 1e-5, 1e-6


def zero_first_step(lr):
    """Schedule lr(t) = 0 at t == 0, else lr (traceable; also takes a Python int)."""
    return lambda t: jnp.where(t == 0, 0.0, lr)


def assert_histories_close(ours, ref, rtol=RTOL, atol=ATOL):
    assert len(ours) == len(ref)
    for step, (o, r) in enumerate(zip(ours, ref)):
        assert set(o) == set(r)
        for k in r:
            assert o[k].shape == r[k].shape, (k, o[k].shape, r[k].shape)
            np.testing.assert_allclose(o[k], r[k], rtol=rtol, atol=atol,
                                       err_msg=f"step {step}, leaf {k!r}")


# ---------------------------------------------------------------------------------------------
# The library against the oracle.


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_galore_adamw_matches_oracle(proj_type):
    """Every proj_type, refreshes at steps 0, 3, 6, 9, clipped and unclipped leaves.

    For ``full`` the step-0 update is skipped with lr(0) = 0 (see the caveat in oracle.py): its
    coefficients' off-diagonal entries are rounding noise that Adam blows up to +-1.
    """
    params, grads = make_problem(SHAPES, STEPS, seed=1234)
    hp = dict(HP, rank=RANK, proj_type=proj_type)
    if proj_type == "full":
        hp["lr"] = zero_first_step(HP["lr"])
    ref = galore_adamw_oracle(params, grads, **hp)
    ours = run_galore_jax(params, grads, **hp)
    for o in ours:
        for k, v in o.items():
            assert v.dtype == np.float32, (k, v.dtype)
    assert_histories_close(ours, ref)


def test_galore_adamw_full_constant_lr_large_eps():
    """``full`` with a constant lr, including step 0; eps=1e-2 drowns the step-0 noise."""
    params, grads = make_problem(SHAPES, STEPS, seed=4321)
    hp = dict(HP, rank=RANK, proj_type="full", eps=1e-2)
    assert_histories_close(run_galore_jax(params, grads, **hp),
                           galore_adamw_oracle(params, grads, **hp))


@pytest.mark.parametrize("update_proj_gap", [1, 200])
def test_galore_adamw_refresh_every_step_and_never(update_proj_gap):
    """Gap 1 refreshes at every step; gap 200 only at step 0 (the first basis is kept)."""
    params, grads = make_problem(SHAPES, 6, seed=77)
    hp = dict(HP, rank=RANK, proj_type="std", update_proj_gap=update_proj_gap)
    assert_histories_close(run_galore_jax(params, grads, **hp),
                           galore_adamw_oracle(params, grads, **hp))


def test_galore_adamw_no_weight_decay_default_hparams():
    """Library defaults for b1, b2, eps, weight_decay (0.9, 0.999, 1e-8, 0.0)."""
    params, grads = make_problem(SHAPES, 5, seed=99)
    tx = gj.galore_adamw(3e-3, rank=3, update_proj_gap=2, scale=0.5, proj_type="std")
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(p)
    update = jax.jit(tx.update)
    ours = []
    for g in grads:
        u, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, p)
        p = optax.apply_updates(p, u)
        ours.append({k: np.asarray(v) for k, v in p.items()})
    ref = galore_adamw_oracle(params, grads, lr=3e-3, rank=3, update_proj_gap=2, scale=0.5,
                              proj_type="std")
    assert_histories_close(ours, ref)


def test_galore_adamw_one_row_and_one_column_leaves_through_zero_gradients():
    """Regression guard for degenerate leaves: 1 x n and m x 1 matrices (rank 4 clipped to 1,
    a 1 x 1 basis on the small side) whose gradient is all zero at refreshes (steps 0 and 3).
    The 1 x 1 basis is [[1]] whatever the SVD returns for a zero matrix (sign-canonical), so
    the oracle's answer is unique: it is plain AdamW scaled by ``scale``, and the library's
    matches it."""
    shapes = {"row": (1, 7), "col": (7, 1)}
    params, grads = make_problem(shapes, 6, seed=5)
    for t in (0, 3):
        grads[t] = {k: np.zeros_like(v) for k, v in grads[t].items()}
    hp = dict(HP, rank=4, proj_type="std", scale=1.0)
    ref = galore_adamw_oracle(params, grads, **hp)
    plain = galore_adamw_oracle(params, grads, **hp, projected={k: False for k in shapes})
    assert_histories_close(ref, plain, rtol=1e-12, atol=0)
    assert_histories_close(run_galore_jax(params, grads, **hp), ref)


# ---------------------------------------------------------------------------------------------
# Self-checks of the oracle (no library involved).


def test_canonical_signs():
    b = np.array([[0.1, -3.0, 2.0, -1.0],
                  [-0.9, 1.0, -2.0, 1.0],
                  [0.2, 0.5, 0.0, 0.0]])
    out = canonical_signs(b)
    np.testing.assert_array_equal(out, b * np.array([-1.0, -1.0, 1.0, -1.0]))
    # Ties in |.| are broken by the first index; the input is untouched.
    assert b[0, 3] == -1.0
    # Idempotent and invariant to a prior sign flip of any column.
    np.testing.assert_array_equal(canonical_signs(out), out)
    np.testing.assert_array_equal(canonical_signs(-b), out)


def test_projection_side_table():
    expect = {
        "std": ("right", "left", "right"),
        "reverse_std": ("left", "right", "left"),
        "left": ("left",) * 3,
        "right": ("right",) * 3,
        "full": ("full",) * 3,
    }
    for pt, sides in expect.items():
        got = tuple(projection_side(s, pt) for s in [(24, 10), (10, 24), (16, 16)])
        assert got == sides, pt


def test_oracle_unprojected_is_optax_adamw():
    """With nothing projected, the oracle's optax modes are exactly optax.adamw (float64)."""
    params, grads = make_problem(SHAPES, 6, seed=5)
    ref = galore_adamw_oracle(params, grads, rank=RANK, proj_type="std",
                              projected={k: False for k in params}, **HP)
    with jax.enable_x64(True):
        tx = optax.adamw(HP["lr"], b1=HP["b1"], b2=HP["b2"], eps=HP["eps"],
                         weight_decay=HP["weight_decay"])
        p = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in params.items()}
        state = tx.init(p)
        update = jax.jit(tx.update)
        for step, g in enumerate(grads):
            u, state = update({k: jnp.asarray(v, dtype=jnp.float64) for k, v in g.items()},
                              state, p)
            p = optax.apply_updates(p, u)
            for k in p:
                np.testing.assert_allclose(np.asarray(p[k]), ref[step][k], rtol=1e-12,
                                           atol=1e-14)


def test_oracle_moments_survive_refresh():
    """A refresh must not reset the moments: compare with a manual two-basis computation."""
    params, grads = make_problem({"w": (12, 5)}, 2, seed=3)
    hp = dict(HP, rank=2, proj_type="right", update_proj_gap=1, weight_decay=0.0)
    out = galore_adamw_oracle(params, grads, **hp)
    g0, g1 = (np.float64(g["w"]) for g in grads)
    q0 = canonical_signs(np.linalg.svd(g0)[2][:2].T)
    q1 = canonical_signs(np.linalg.svd(g1)[2][:2].T)
    c0, c1 = g0 @ q0, g1 @ q1
    b1, b2, eps = HP["b1"], HP["b2"], HP["eps"]
    m = (1 - b1) * (b1 * c0 + c1)
    v = (1 - b2) * (b2 * c0**2 + c1**2)
    n = (m / (1 - b1**2)) / (np.sqrt(v / (1 - b2**2)) + eps)
    np.testing.assert_allclose(out[1]["w"] - out[0]["w"], -HP["lr"] * HP["scale"] * n @ q1.T,
                               rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left"])
def test_galore_adamw_hf_numerics_matches_the_oracles_torch_eps(proj_type):
    """``numerics="hf"``: eps added to the uncorrected sqrt(v) (the oracle's eps_mode="torch").
    eps = 1e-3 against gradients of about 1e-2 makes the placement matter: optax's numerics
    miss the same oracle by far more than the tolerance."""
    params, grads = make_problem(SHAPES, STEPS, seed=77)
    grads = [{k: v * 1e-2 for k, v in g.items()} for g in grads]
    hp = dict(HP, rank=RANK, proj_type=proj_type, eps=1e-3)
    ref = galore_adamw_oracle(params, grads, eps_mode="torch", **hp)
    assert_histories_close(run_galore_jax(params, grads, numerics="hf", **hp), ref)
    optax_numerics = run_galore_jax(params, grads, **hp)
    assert max(np.abs(o["tall"] - r["tall"]).max() for o, r in zip(optax_numerics, ref)) > 1e-3


def test_scale_by_adam_hf_is_hugging_faces_adamw_step():
    """Three steps of HF AdamW's update, written out in float64: m sqrt(1 - b2^t) / (1 - b1^t)
    / (sqrt(v) + eps), with the moments in optax.ScaleByAdamState."""
    rng = np.random.default_rng(5)
    grads = [rng.standard_normal((4, 3)) * 10.0 ** rng.integers(-6, -2) for _ in range(3)]
    b1, b2, eps = 0.8, 0.95, 1e-6
    # and correct_bias=False with the factor applied later: the same updates
    split = optax.chain(gj.scale_by_adam_hf(b1=b1, b2=b2, eps=eps, correct_bias=False),
                        gj.scale_by_hf_bias_correction(b1, b2))
    for tx in (gj.scale_by_adam_hf(b1=b1, b2=b2, eps=eps), split):
        state = tx.init(jnp.zeros((4, 3)))
        m = v = np.zeros((4, 3))
        for t, g in enumerate(grads, 1):
            u, state = tx.update(jnp.asarray(g, jnp.float32), state)
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            want = m * np.sqrt(1 - b2 ** t) / (1 - b1 ** t) / (np.sqrt(v) + eps)
            np.testing.assert_allclose(np.asarray(u), want, rtol=2e-5, err_msg=f"step {t}")
        if tx is not split:
            assert isinstance(state, optax.ScaleByAdamState) and int(state.count) == 3

"""Parity of ``galore_jax.galore_adafactor`` with galore-torch's ``GaLoreAdafactor``, fp32 on CPU.

The same params, gradients, rank, T and alpha on a tall and a wide matrix (the basis on either
side), a matrix whose rank is clipped and a vector (plain Adafactor, unfactored), for several steps
across refreshes: without and with a first moment, a constant lr and a schedule (which the
reference multiplies in before its first moment), weight decay, and the reference's relative step
and parameter scale. galore-torch's SVD is made sign-canonical (``canonical_svd``, see
test_galore_torch.py), as in the GaLoreAdamW parity test.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
galore_torch = pytest.importorskip("galore_torch")

import galore_jax as gj  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from oracle import make_problem  # noqa: E402
from runners import run_transform  # noqa: E402
from test_galore_torch import canonical_svd  # noqa: E402,F401 -- the fixture
from test_galore_torch import run_torch_optimizer  # noqa: E402

SHAPES = {"tall": (24, 10), "wide": (10, 24), "tall_clip": (12, 5), "bias": (10,)}
RANK, GAP, SCALE, STEPS = 6, 3, 0.25, 8  # refreshes at steps 0, 3 and 6
RTOL, ATOL = 1e-5, 1e-6


def warmup(t):
    """A schedule that changes every step (the order of lr and first moment matters)."""
    return 0.05 * jnp.minimum(1.0, (jnp.asarray(t, jnp.float32) + 1.0) / 4.0)


CASES = {
    "no_b1": dict(lr=0.05, b1=None, weight_decay=0.0),
    "b1_schedule_decay": dict(lr=warmup, b1=0.9, weight_decay=0.1),
    "relative_step_param_scale": dict(lr=None, b1=0.9, weight_decay=0.1, relative_step=True,
                                      scale_parameter=True),
    "warmup_init": dict(lr=None, b1=None, weight_decay=0.0, relative_step=True,
                        warmup_init=True),
}
# Initial params: its steps are about 1e-6 t, resolved in fp32 only next to small weights.
PARAM_SCALE = {"warmup_init": 1e-3}


def run_torch(params, grads, *, lr, b1, weight_decay, relative_step=False,
              scale_parameter=False, warmup_init=False):
    def make(groups):
        return galore_torch.GaLoreAdafactor(
            groups, lr=None if relative_step else 1.0, beta1=b1, weight_decay=weight_decay,
            relative_step=relative_step, scale_parameter=scale_parameter,
            warmup_init=warmup_init)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return run_torch_optimizer(
            make, params, grads, lr=lr,
            galore=dict(rank=RANK, update_proj_gap=GAP, scale=SCALE, proj_type="std"))


def run_jax(params, grads, *, lr, b1, weight_decay, **flags):
    tx = gj.galore_adafactor(lr, rank=RANK, update_proj_gap=GAP, scale=SCALE, b1=b1,
                             weight_decay=weight_decay, **flags)
    return run_transform(tx, params, grads)


@pytest.mark.parametrize("case", CASES)
def test_galore_adafactor_matches_galore_torch(canonical_svd, case):  # noqa: F811
    params, grads = make_problem(SHAPES, STEPS, seed=7, param_scale=PARAM_SCALE.get(case, 0.5))
    ref = run_torch(params, grads, **CASES[case])
    ours = run_jax(params, grads, **CASES[case])
    moved = max(np.max(np.abs(r[k] - params[k])) for r in ref for k in params)
    assert moved > 1e-5  # the comparison is not vacuous
    for step, (r, o) in enumerate(zip(ref, ours)):
        for k in r:
            np.testing.assert_allclose(o[k], r[k], rtol=RTOL, atol=ATOL,
                                       err_msg=f"step {step}, leaf {k!r}")
            # the steps taken so far, to 1e-5 of the largest (or the fp32 rounding of the
            # params, two ulps)
            ulps = 2 * np.spacing(np.max(np.abs(r[k])))
            np.testing.assert_allclose(o[k] - params[k], r[k] - params[k], rtol=RTOL,
                                       atol=max(RTOL * moved, ulps),
                                       err_msg=f"step {step}, leaf {k!r}")


def test_lr_order_matters():
    """With a schedule and a first moment, scaling by the lr after the first moment (the usual
    optax order) moves the result well beyond the tolerance: the parity above checks the
    reference's order."""
    params, grads = make_problem(SHAPES, STEPS, seed=7)
    hp = dict(CASES["b1_schedule_decay"], weight_decay=0.0)
    ours = run_jax(params, grads, **hp)
    lr = hp.pop("lr")
    tx = gj.galore_projection(gj.scale_by_adafactor(None, b1=hp["b1"]), rank=RANK,
                              update_proj_gap=GAP, scale=SCALE)
    import optax  # pylint: disable=import-outside-toplevel
    after = run_transform(optax.chain(tx, optax.scale_by_learning_rate(lr)), params, grads)
    gap = max(np.max(np.abs(ours[-1][k] - after[-1][k])) for k in params)
    assert gap > 100 * ATOL

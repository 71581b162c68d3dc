"""Parity with the PyTorch reference ``galore-torch`` (GaLoreAdamW), fp32 on CPU.

(a) The NumPy oracle with eps_mode="torch", decay_mode="torch" against GaLoreAdamW: validates the
    oracle itself against the reference implementation.
(b) ``galore_jax.galore_adamw`` against GaLoreAdamW, within 1e-4 relative.

Two known differences are neutralised here, in the test:
* galore-torch's SVD has no sign convention; ``torch.linalg.svd`` (as used by
  ``galore_torch.galore_projector``) is wrapped so that each column of U and each row of Vh is
  sign-canonical (its largest-|.| entry positive, first index on ties), the same rule as ours.
* eps placement (galore-torch adds eps to the uncorrected sqrt(v)): in (b) eps=1e-10 on both
  sides makes it irrelevant. The decay ordering (decay after the update in galore-torch) differs
  by O(lr^2 wd), negligible at the tolerance of (b) with wd=0.01.

galore-torch's reverse_std ``project_back`` picks the side from the shape of the low-rank tensor
and gets it wrong (crash) when that tensor is square; such leaves are left out
(``_torch_side_ok``; here only the 5x12 leaf under reverse_std).

For ``full`` in (b) the step-0 update is skipped (lr(0) = 0, set on the torch param groups and
as an optax schedule): P^T G Q is then diagonal up to rounding noise, which Adam with eps=1e-10
turns into +-1 entries, so no two fp32 implementations agree on that step (see oracle.py). (a)
uses eps=1e-3, far above that noise.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
galore_torch = pytest.importorskip("galore_torch")
from galore_torch import galore_projector  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runners import run_galore_jax  # noqa: E402
from oracle import (  # noqa: E402
    PROJ_TYPES,
    galore_adamw_oracle,
    make_problem,
    projection_side,
)

# rank 6 is clipped to min(m, n) on the *_clip leaves (5, 5, and 6 == min for the square one).
SHAPES = {
    "tall": (24, 10), "wide": (10, 24), "square": (16, 16),
    "tall_clip": (12, 5), "wide_clip": (5, 12), "square_clip": (6, 6),
    "bias": (10,),
}
RANK = 6


def _canonical_torch(basis: "torch.Tensor") -> "torch.Tensor":
    """Flip each column so that its largest-|.| entry is positive (first index on ties)."""
    idx = basis.abs().argmax(dim=0)
    pivots = basis[idx, torch.arange(basis.shape[1])]
    signs = torch.where(pivots < 0, -1.0, 1.0).to(basis.dtype)
    return basis * signs


@pytest.fixture
def canonical_svd(monkeypatch):
    """Make the SVD used by galore_torch.galore_projector sign-canonical."""
    orig_svd = galore_projector.torch.linalg.svd

    def svd(a, full_matrices=True, **kwargs):
        u, s, vh = orig_svd(a, full_matrices=full_matrices, **kwargs)
        return _canonical_torch(u), s, _canonical_torch(vh.T).T

    monkeypatch.setattr(galore_projector.torch.linalg, "svd", svd)
    return svd


def _torch_side_ok(shape, rank, proj_type) -> bool:
    """Whether galore-torch's project_back picks the same side as its project (2-D leaves)."""
    if len(shape) != 2 or proj_type not in ("std", "reverse_std"):
        return True
    m, n = shape
    r = min(rank, m, n)
    side = projection_side(shape, proj_type)
    low = (r, n) if side == "left" else (m, r)
    if proj_type == "std":
        back = "right" if low[0] >= low[1] else "left"
    else:
        back = "left" if low[0] <= low[1] else "right"
    return back == side


def zero_first_step(lr):
    """Schedule lr(t) = 0 at t == 0, else lr. Used for ``full``: at step 0 its coefficients
    P^T G Q are diagonal up to rounding noise, which Adam maps to about +-1 with a tiny eps, so
    no two fp32 implementations agree on that step (see oracle.py)."""

    def schedule(t):
        if isinstance(t, int):
            return 0.0 if t == 0 else lr
        import jax.numpy as jnp  # traced optax count

        return jnp.where(t == 0, 0.0, lr)

    return schedule


def _shapes_for(rank, proj_type):
    return {k: s for k, s in SHAPES.items() if _torch_side_ok(s, rank, proj_type)}


def run_galore_torch(params, grads_per_step, *, lr, rank, update_proj_gap, scale, proj_type,
                     b1, b2, eps, weight_decay):
    """GaLoreAdamW with 2-D leaves in a GaLore group and the rest in a plain group."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return run_torch_optimizer(
            lambda groups: galore_torch.GaLoreAdamW(
                groups, lr=1.0, betas=(b1, b2), eps=eps, weight_decay=weight_decay,
                no_deprecation_warning=True),
            params, grads_per_step, lr=lr,
            galore=dict(rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                        proj_type=proj_type))


def run_torch_optimizer(make, params, grads_per_step, *, lr, galore):
    """``make(param_groups)``'s optimizer on float32 copies of ``params``: 2-D leaves in a
    group with the GaLore settings ``galore``, the rest in a plain group; the group lr set to
    ``lr(t)`` (or ``lr``; ``None`` leaves it alone) before step ``t``. Returns the params
    after each step."""
    tparams = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float32))
               for k, v in params.items()}
    groups = [
        {"params": [p for p in tparams.values() if p.ndim == 2], **galore},
        {"params": [p for p in tparams.values() if p.ndim != 2]},
    ]
    opt = make(groups)
    history = []
    for t, grads in enumerate(grads_per_step):
        for group in opt.param_groups:
            if lr is not None:
                group["lr"] = float(lr(t)) if callable(lr) else lr
        for k, p in tparams.items():
            p.grad = torch.tensor(grads[k], dtype=torch.float32)
        opt.step()
        history.append({k: p.detach().numpy().copy() for k, p in tparams.items()})
    return history


# ---------------------------------------------------------------------------------------------
# (a) oracle (torch modes) vs galore-torch.

# lr, wd and eps are large on purpose so that the eps placement and the decay order both move the
# result far beyond the tolerance (checked in test_oracle_modes_are_distinguishable).
A_HP = dict(lr=0.1, update_proj_gap=3, scale=0.25, b1=0.9, b2=0.999, eps=1e-3,
            weight_decay=0.5)
A_STEPS = 10
A_RTOL, A_ATOL = 2e-5, 2e-6


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_oracle_matches_galore_torch(canonical_svd, proj_type):
    params, grads = make_problem(_shapes_for(RANK, proj_type), A_STEPS, seed=11)
    hp = dict(A_HP, rank=RANK, proj_type=proj_type)
    ref = run_galore_torch(params, grads, **hp)  # eps=1e-3 drowns the step-0 noise of full
    ours = galore_adamw_oracle(params, grads, eps_mode="torch", decay_mode="torch", **hp)
    for step, (r, o) in enumerate(zip(ref, ours)):
        for k in r:
            np.testing.assert_allclose(o[k], r[k], rtol=A_RTOL, atol=A_ATOL,
                                       err_msg=f"step {step}, leaf {k!r}")


def test_oracle_modes_are_distinguishable():
    """Each mode flag on its own changes the result well beyond the tolerance used in (a)."""
    params, grads = make_problem(SHAPES, A_STEPS, seed=11)
    hp = dict(A_HP, rank=RANK, proj_type="std")
    base = galore_adamw_oracle(params, grads, eps_mode="torch", decay_mode="torch", **hp)[-1]
    for modes in (dict(eps_mode="optax", decay_mode="torch"),
                  dict(eps_mode="torch", decay_mode="optax")):
        other = galore_adamw_oracle(params, grads, **modes, **hp)[-1]
        for k in base:
            assert np.max(np.abs(other[k] - base[k])) > 50 * (A_ATOL + A_RTOL * np.max(
                np.abs(base[k]))), (modes, k)


def test_sign_rule_matters_for_galore_torch(monkeypatch):
    """Sanity: without the sign fix, flipped bases across refreshes change galore-torch's result,
    so the canonical-sign wrapper above is really needed (and really applied)."""
    params, grads = make_problem({"tall": (24, 10)}, 7, seed=5)
    hp = dict(A_HP, rank=4, proj_type="std")
    orig_svd = galore_projector.torch.linalg.svd
    calls = []

    def flipping_svd(a, full_matrices=True, **kwargs):
        u, s, vh = orig_svd(a, full_matrices=full_matrices, **kwargs)
        calls.append(1)
        u, vh = _canonical_torch(u), _canonical_torch(vh.T).T
        if len(calls) == 2:  # second refresh: flip the first right basis vector
            vh = vh.clone()
            vh[0] = -vh[0]
        return u, s, vh

    monkeypatch.setattr(galore_projector.torch.linalg, "svd", flipping_svd)
    flipped = run_galore_torch(params, grads, **hp)[-1]["tall"]
    assert len(calls) == 3  # refreshes at steps 0, 3, 6
    ours = galore_adamw_oracle(params, grads, eps_mode="torch", decay_mode="torch", **hp)
    assert np.max(np.abs(flipped - ours[-1]["tall"])) > 1e-3


# ---------------------------------------------------------------------------------------------
# (b) galore_jax.galore_adamw vs galore-torch.

B_HP = dict(lr=1e-2, update_proj_gap=4, scale=0.25, b1=0.9, b2=0.999, eps=1e-10,
            weight_decay=0.01)
B_STEPS = 12
B_RTOL = 1e-4


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_galore_jax_matches_galore_torch(canonical_svd, proj_type):
    params, grads = make_problem(_shapes_for(RANK, proj_type), B_STEPS, seed=23)
    hp = dict(B_HP, rank=RANK, proj_type=proj_type)
    if proj_type == "full":
        hp["lr"] = zero_first_step(B_HP["lr"])
    ref = run_galore_torch(params, grads, **hp)
    ours = run_galore_jax(params, grads, **hp)
    for step, (r, o) in enumerate(zip(ref, ours)):
        for k in r:
            assert o[k].dtype == np.float32, (k, o[k].dtype)
            np.testing.assert_allclose(o[k], r[k], rtol=B_RTOL, atol=B_RTOL * 0.1,
                                       err_msg=f"step {step}, leaf {k!r}")


# galore-torch's own eps (1e-6) on gradients near 1e-4, a LLaMA's scale: its eps placement
# (before bias correction) moves every step here, so only numerics="hf" follows it.
HF_HP = dict(lr=1e-2, update_proj_gap=4, scale=0.25, b1=0.9, b2=0.999, eps=1e-6,
             weight_decay=0.0)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_hf_numerics_match_galore_torch_at_its_default_eps(canonical_svd, proj_type):
    params, grads = make_problem(_shapes_for(RANK, proj_type), B_STEPS, seed=29)
    grads = [{k: (v * 1e-4).astype(np.float32) for k, v in g.items()} for g in grads]
    hp = dict(HF_HP, rank=RANK, proj_type=proj_type)
    ref = run_galore_torch(params, grads, **hp)
    ours = run_galore_jax(params, grads, numerics="hf", **hp)
    optax_numerics = run_galore_jax(params, grads, **hp)
    for step, (r, o) in enumerate(zip(ref, ours)):
        for k in r:
            np.testing.assert_allclose(o[k], r[k], rtol=B_RTOL, atol=B_RTOL * 0.1,
                                       err_msg=f"step {step}, leaf {k!r}")
    worst = max(np.abs(o[k] - r[k]).max() for o, r in zip(optax_numerics, ref) for k in r)
    assert worst > 10 * B_RTOL, worst  # optax's numerics do not follow it


@pytest.mark.parametrize("proj_type", ["std", "left", "right"])
def test_flax_kernels_take_galore_torchs_sides_through_dimension_numbers(canonical_svd,
                                                                       proj_type):
  """A Flax kernel is ``(in, out)``, galore-torch's weight ``(out, in)``: as the README says,
  ``DimensionNumbers(0, 1)`` projects a square kernel (and any under left / right) on
  galore-torch's side; the kernel taken as it is projects the other one."""
  import galore_jax as gj  # pylint: disable=import-outside-toplevel
  from runners import run_transform  # pylint: disable=import-outside-toplevel
  params, grads = make_problem({"square": (16, 16), "wide": (10, 24)}, B_STEPS, seed=31)
  hp = dict(B_HP, rank=RANK, proj_type=proj_type)
  ref = run_galore_torch(params, grads, **hp)  # torch's (out, in) weights
  flax = lambda tree: {k: v.T.copy() for k, v in tree.items()}  # the same layers' kernels

  def ours(dims):
    tx = gj.galore_adamw(hp["lr"], rank=RANK, update_proj_gap=hp["update_proj_gap"],
                         scale=hp["scale"], proj_type=proj_type, eps=hp["eps"],
                         weight_decay=hp["weight_decay"], dimension_numbers=dims)
    return [flax(p) for p in run_transform(tx, flax(params), [flax(g) for g in grads])]

  for r, o in zip(ref, ours(gj.DimensionNumbers(0, 1))):
    for k in r:
      np.testing.assert_allclose(o[k], r[k], rtol=B_RTOL, atol=B_RTOL * 0.1, err_msg=k)
  as_given = ours(None)[-1]
  moved = [k for k in ref[-1] if np.abs(as_given[k] - ref[-1][k]).max() > 1e-3]
  assert moved == (["square"] if proj_type == "std" else ["square", "wide"]), moved

"""Independent NumPy oracle of GaLore-AdamW, used by the reference tests.

Everything here is computed in **float64** (inputs of any float dtype are upcast), so the oracle's
own rounding error is far below the fp32 tolerances the tests use.

Notation, for a 2-D leaf whose gradient is G (m x n), rank r = min(rank, m, n):

* SVD of the current gradient: G = U S Vh (reduced). Left basis P = U[:, :r] (m x r), right
  basis Q = Vh[:r].T (n x r). Every basis vector (each column of P and of Q, independently) is
  made sign-canonical by ``canonical_signs``: its entry of largest absolute value is positive.
* Projection side by ``proj_type``: std: m >= n -> right, else left; reverse_std: m >= n -> left,
  else right; left; right; full (both sides).
* Coefficients and projection back:
  left:  C = P^T G (r x n),   back(N) = P N;
  right: C = G Q   (m x r),   back(N) = N Q^T;
  full:  C = P^T G Q (r x r), back(N) = P N Q^T.
* The bases are recomputed at step t (0-based, counted before the increment) when
  t % update_proj_gap == 0, so step 0 always computes them. The Adam moments are kept as they
  are across refreshes (no reset, no rotation).
* Adam on C (1-D leaves: on the full gradient, no projection and no scale), t' = t + 1:
  m <- b1 m + (1 - b1) C,   v <- b2 v + (1 - b2) C^2.
  eps_mode="optax" (optax.scale_by_adam):
      N = (m / (1 - b1^t')) / (sqrt(v / (1 - b2^t')) + eps),   D = N
  eps_mode="torch" (galore-torch / HF AdamW: eps on the uncorrected sqrt(v), bias correction
  folded into the step size):
      N = m / (sqrt(v) + eps),   D = N * sqrt(1 - b2^t') / (1 - b1^t')
  Projected leaves then use D <- scale * back(D); non-projected leaves use D as is.
* Weight decay (applied to every leaf), lr = lr(t) for a schedule:
  decay_mode="optax" (add_decayed_weights, then scale by -lr):  p <- p - lr (D + wd p)
  decay_mode="torch" (decay after the update, on the updated p):
      p' = p - lr D;  p <- p' - lr wd p'

Caveat for tests of ``full``: at step 0, C = P^T G Q is diagonal by construction, its off-diagonal
entries are pure rounding noise (~1e-7 |G| in fp32, ~1e-16 here), and Adam's first step maps
them to about C / (|C| + eps), i.e. to +-1 when eps is tiny. Any fp32 implementation (galore-torch
included) then disagrees with this float64 oracle. The tests therefore use, for ``full``, either a
schedule with lr(0) = 0 (the noisy moments are swamped at step 1 by a gradient in the old basis)
or an eps well above the noise.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


def canonical_signs(basis: np.ndarray) -> np.ndarray:
    """Flip each column of ``basis`` so that its entry of largest |.| is positive.

    Ties in |.| are broken by the first index (``np.argmax`` of the absolute values). Returns a
    new array; the input is not modified.
    """
    basis = np.asarray(basis)
    if basis.ndim != 2:
        raise ValueError(f"basis must be 2-D (vectors as columns), got shape {basis.shape}")
    idx = np.argmax(np.abs(basis), axis=0)
    pivots = basis[idx, np.arange(basis.shape[1])]
    signs = np.where(pivots < 0, -1.0, 1.0).astype(basis.dtype)
    return basis * signs[None, :]


def projection_side(shape: Sequence[int], proj_type: str) -> str:
    """Which side a (m, n) gradient is projected on: 'left', 'right' or 'full'."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right", "full"):
        return proj_type
    raise ValueError(f"unknown proj_type {proj_type!r}")


def svd_bases(g: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Sign-canonical bases (P, Q) of g = U S Vh: P = U[:, :r] (m x r), Q = Vh[:r].T (n x r)."""
    g = np.asarray(g, dtype=np.float64)
    r = min(rank, *g.shape)
    u, _, vh = np.linalg.svd(g, full_matrices=False)
    return canonical_signs(u[:, :r]), canonical_signs(vh[:r].T)


def project(g: np.ndarray, side: str, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Coefficients C of g: P^T G (left), G Q (right) or P^T G Q (full)."""
    if side == "left":
        return p.T @ g
    if side == "right":
        return g @ q
    return p.T @ g @ q


def coefficients(g, bases) -> np.ndarray:
    """float64 :func:`project` of g on a galore_jax ``Bases`` (its sides that are set)."""
    p = None if bases.left is None else np.asarray(bases.left, np.float64)
    q = None if bases.right is None else np.asarray(bases.right, np.float64)
    side = "full" if p is not None and q is not None else ("left" if p is not None else "right")
    return project(np.asarray(g, np.float64), side, p, q)


def project_back(n: np.ndarray, side: str, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Full-shape matrix from coefficients: P N (left), N Q^T (right) or P N Q^T (full)."""
    if side == "left":
        return p @ n
    if side == "right":
        return n @ q.T
    return p @ n @ q.T


def galore_adamw_oracle(
    params: Mapping[str, np.ndarray],
    grads_per_step: Sequence[Mapping[str, np.ndarray]],
    *,
    lr: float | Callable[[int], float],
    rank: int,
    update_proj_gap: int,
    scale: float,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    eps_mode: str = "optax",
    decay_mode: str = "optax",
    projected: Mapping[str, bool] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Run GaLore-AdamW on given per-step gradients; return the params (float64) after each step.

    ``grads_per_step[k]`` is the gradient dict used at step k (same keys and shapes as
    ``params``). ``projected`` optionally overrides which leaves are projected (default: every
    leaf with ndim == 2). ``lr`` is a float or a schedule ``lr(t)`` of the 0-based step t (the
    optax convention: the first update uses ``lr(0)``). See the module docstring for the exact
    math and the two modes.
    """
    if eps_mode not in ("optax", "torch"):
        raise ValueError(f"eps_mode must be 'optax' or 'torch', got {eps_mode!r}")
    if decay_mode not in ("optax", "torch"):
        raise ValueError(f"decay_mode must be 'optax' or 'torch', got {decay_mode!r}")

    cur = {k: np.asarray(v, dtype=np.float64).copy() for k, v in params.items()}
    if projected is None:
        projected = {k: v.ndim == 2 for k, v in cur.items()}
    side = {k: projection_side(cur[k].shape, proj_type) for k in cur if projected[k]}
    bases: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    mom1: dict[str, np.ndarray] = {}
    mom2: dict[str, np.ndarray] = {}

    history = []
    for t, grads in enumerate(grads_per_step):  # t: step count before the increment
        t1 = t + 1
        lr_t = float(lr(t)) if callable(lr) else float(lr)
        bc1 = 1.0 - b1**t1
        bc2 = 1.0 - b2**t1
        new = {}
        for k, p in cur.items():
            g = np.asarray(grads[k], dtype=np.float64)
            if g.shape != p.shape:
                raise ValueError(f"grad {k!r} has shape {g.shape}, param has {p.shape}")
            if projected[k]:
                if t % update_proj_gap == 0:
                    bases[k] = svd_bases(g, rank)
                c = project(g, side[k], *bases[k])
            else:
                c = g
            if k not in mom1:
                mom1[k] = np.zeros_like(c)
                mom2[k] = np.zeros_like(c)
            mom1[k] = b1 * mom1[k] + (1.0 - b1) * c
            mom2[k] = b2 * mom2[k] + (1.0 - b2) * c * c
            if eps_mode == "optax":
                d = (mom1[k] / bc1) / (np.sqrt(mom2[k] / bc2) + eps)
            else:
                d = mom1[k] / (np.sqrt(mom2[k]) + eps) * (np.sqrt(bc2) / bc1)
            if projected[k]:
                d = scale * project_back(d, side[k], *bases[k])
            if decay_mode == "optax":
                new[k] = p - lr_t * (d + weight_decay * p)
            else:
                p_mid = p - lr_t * d
                new[k] = p_mid - lr_t * weight_decay * p_mid
        cur = new
        history.append({k: v.copy() for k, v in cur.items()})
    return history


# ----------------------------------------------------------------------------------------------
# Test-data helper (shared by the test files).


def make_problem(
    shapes: Mapping[str, Sequence[int]], steps: int, seed: int, param_scale: float = 0.5
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Float32 initial params and ``steps`` gradient dicts with well-conditioned spectra.

    Each 2-D gradient is U diag(s) V^T with fresh random orthonormal U, V at every step and
    linearly spaced singular values s (largest / smallest = 10, so neighbouring singular values
    differ by a sizeable fraction of the largest one), times a random magnitude in [0.5, 2].
    1-D gradients are Gaussian.
    """
    rng = np.random.default_rng(seed)
    params = {
        k: (param_scale * rng.standard_normal(tuple(s))).astype(np.float32)
        for k, s in shapes.items()
    }
    grads_per_step = []
    for _ in range(steps):
        grads = {}
        for k, s in shapes.items():
            if len(s) == 2:
                m, n = s
                kk = min(m, n)
                u, _ = np.linalg.qr(rng.standard_normal((m, kk)))
                v, _ = np.linalg.qr(rng.standard_normal((n, kk)))
                sv = np.linspace(1.0, 0.1, kk) * rng.uniform(0.5, 2.0)
                g = (u * sv) @ v.T
            else:
                g = rng.standard_normal(tuple(s))
            grads[k] = g.astype(np.float32)
        grads_per_step.append(grads)
    return params, grads_per_step

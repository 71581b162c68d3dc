"""Independent float64 NumPy oracles of APOLLO / APOLLO-Mini and Fira, written from the papers'
equations (frontier.md sections 2 and 3), not from any implementation.

The oracles work on matrices: each projected leaf is given as a list of 2-D matrices (an N-D
kernel's matrices, in its matrix view) and each matrix is updated on its own -- nothing in
either method couples two matrices (Adam is element-wise, the scales are per channel or per
matrix, the limiter per matrix).  Unprojected leaves are any-shape arrays with plain Adam.

Notation for one m x n matrix G with a left basis P (m x r); a right basis Q (n x r) is the
mirror image (R = G Q, channels are rows):

* R = P^T G (r x n); Adam on R with optax's numerics, t' = t + 1:
  M <- b1 M + (1 - b1) R,  V <- b2 V + (1 - b2) R^2,
  N = (M / (1 - b1^t')) / (sqrt(V / (1 - b2^t')) + eps).
* APOLLO channel:  s_j = ||N[:, j]|| / ||R[:, j]|| (0 where ||R[:, j]|| = 0),  U = G diag(s);
  APOLLO tensor:   s = ||N||_F / ||R||_F,  U = s G.
* Fira:  phi_j = ||N[:, j]|| / (||R[:, j]|| + eps_f),  S = (G - P R) diag(phi),
  U = P N + lim(S).
* Limiter (gamma): with l the previous post-limiter norm (0 before the first step: no limit),
  if ||X||_F > gamma l: X <- X gamma l / ||X||_F;  l <- ||X||_F.  APOLLO limits U, Fira S.
* Update with weight decay wd (optax order): p <- p - lr (alpha U + wd p) for projected
  matrices (alpha = scale), p <- p - lr (N + wd p) for unprojected leaves.
* Bases: given per matrix and refresh by the caller (``bases(name, j, refresh_index, g)``
  returns (P, Q) with one of them None); the caller's refresh rule is
  t % update_proj_gap == 0 (step 0 refreshes).  With ``reset`` the moments of a matrix are
  zeroed when it refreshes (Adam's count is not).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

F64 = np.float64


def limit(x: np.ndarray, prev: float, gamma: float | None) -> tuple[np.ndarray, float, bool]:
  """The norm-growth limiter on one matrix: (limited x, its norm, whether it fired)."""
  norm = float(np.linalg.norm(x))
  if gamma is None:
    return x, norm, False
  if prev > 0 and norm > gamma * prev:
    return x * (gamma * prev / norm), gamma * prev, True
  return x, norm, False


def _channel_norms(x: np.ndarray, left: bool, tensor: bool) -> np.ndarray:
  if tensor:
    return np.array([[np.linalg.norm(x)]])
  return np.linalg.norm(x, axis=0, keepdims=True) if left else np.linalg.norm(
      x, axis=1, keepdims=True)


def successor_oracle(
    method: str,
    params: Mapping[str, np.ndarray | Sequence[np.ndarray]],
    grads_per_step: Sequence[Mapping[str, np.ndarray | Sequence[np.ndarray]]],
    bases: Callable[[str, int, int, np.ndarray], tuple[np.ndarray | None, np.ndarray | None]],
    *,
    lr: float,
    update_proj_gap: int,
    scale: float,
    projected: Mapping[str, bool],
    tensor: bool = False,
    gamma: float | None = 1.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    fira_eps: float = 1e-8,
    weight_decay: float = 0.0,
    reset: bool = False,
    code_form: bool = False,
) -> tuple[list[dict], list[int]]:
  """Runs ``method`` ("apollo" or "fira") on given gradients.

  A projected leaf's params and gradients are lists of 2-D matrices; the others arrays.
  Returns the updates (``-lr (...)``, float64, same layout) after each step, and per step
  how many matrices the limiter fired on.  ``code_form``: Fira as its repository computes
  it, ``c (alpha P N + lim((G - alpha P R) phi))`` in place of ``alpha (P N + lim((G - P R)
  phi))``, with N and phi from Adam without bias correction and c the correction.
  """
  assert method in ("apollo", "fira")
  cur = {k: ([np.asarray(m, F64) for m in v] if projected[k] else np.asarray(v, F64))
         for k, v in params.items()}
  mom: dict = {}
  basis: dict = {}
  prev_norm: dict = {}
  history, fired_per_step = [], []
  for t, grads in enumerate(grads_per_step):
    bc1, bc2 = 1.0 - b1 ** (t + 1), 1.0 - b2 ** (t + 1)
    step, fired = {}, 0

    def adam(key, c, refreshed=False):
      m, v = mom.get(key, (np.zeros_like(c), np.zeros_like(c)))
      if refreshed and reset:
        m, v = np.zeros_like(c), np.zeros_like(c)
      m = b1 * m + (1 - b1) * c
      v = b2 * v + (1 - b2) * c * c
      mom[key] = (m, v)
      if code_form:  # Hugging Face AdamW's numerics, the bias correction applied last
        return m / (np.sqrt(v) + eps)
      return (m / bc1) / (np.sqrt(v / bc2) + eps)

    last = np.sqrt(bc2) / bc1 if code_form else 1.0

    for name, p in cur.items():
      if not projected[name]:
        g = np.asarray(grads[name], F64)
        step[name] = -lr * (last * adam(name, g) + weight_decay * p)
        continue
      out = []
      for j, (pm, gm) in enumerate(zip(p, grads[name])):
        g = np.asarray(gm, F64)
        key = (name, j)
        refreshed = t % update_proj_gap == 0
        if refreshed:
          basis[key] = bases(name, j, t // update_proj_gap, g)
        pl, qr = basis[key]
        left = pl is not None
        r = pl.T @ g if left else g @ qr
        n = adam(key, r, refreshed)
        if method == "apollo":
          den = _channel_norms(r, left, tensor)
          s = np.where(den > 0, _channel_norms(n, left, tensor) / np.where(den > 0, den, 1), 0)
          u, prev_norm[key], hit = limit(g * s, prev_norm.get(key, 0.0), gamma)
          u = scale * u
        else:
          phi = _channel_norms(n, left, False) / (_channel_norms(r, left, False) + fira_eps)
          back = (lambda x: pl @ x) if left else (lambda x: x @ qr.T)
          inside = scale if code_form else 1.0
          rest, prev_norm[key], hit = limit((g - inside * back(r)) * phi,
                                            prev_norm.get(key, 0.0), gamma)
          u = scale * back(n) + rest if code_form else scale * (back(n) + rest)
        fired += hit
        out.append(-lr * (last * u + weight_decay * pm))
      step[name] = out
    cur = {k: ([a + b for a, b in zip(cur[k], step[k])] if projected[k] else cur[k] + step[k])
           for k in cur}
    history.append(step)
    fired_per_step.append(fired)
  return history, fired_per_step

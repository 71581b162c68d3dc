"""Adam with the numerics of Hugging Face's ``AdamW`` and of galore-torch's ``GaLoreAdamW``
(a copy of it): ``eps`` is added to the uncorrected :math:`\\sqrt{v_t}` and the bias
corrections are folded into the step size.  optax's ``scale_by_adam`` (and
``torch.optim.AdamW``) add ``eps`` to the corrected :math:`\\sqrt{\\hat v_t}`; the two differ by
a factor :math:`1 / \\sqrt{1 - \\beta_2^t}` on ``eps``, about 32 at step 1 with
:math:`\\beta_2 = 0.999`, which matters where gradients are small against ``eps`` (a LLaMA's
are often near 1e-4, against galore-torch's default eps 1e-6)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from galore_jax import _checks


def scale_by_adam_hf(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    mu_dtype: Any | None = None,
    correct_bias: bool = True,
) -> optax.GradientTransformation:
  r"""Adam as Hugging Face's ``AdamW`` and galore-torch compute it:

  .. math::
    m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \quad
    u_t = \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t} \cdot \frac{m_t}{\sqrt{v_t} + \epsilon}

  that is :math:`\hat m_t / (\sqrt{\hat v_t} + \epsilon / \sqrt{1 - \beta_2^t})`, where
  ``optax.scale_by_adam`` gives :math:`\hat m_t / (\sqrt{\hat v_t} + \epsilon)`.  The state is
  ``optax.ScaleByAdamState``, so checkpoints, ``on_refresh="transport"`` and every tool
  that reads Adam's moments take it as they take optax's.  ``correct_bias=False`` (the
  option of the same name in Hugging Face's ``AdamW``) leaves the step-size factor out:
  :math:`u_t = m_t / (\sqrt{v_t} + \epsilon)`; :func:`scale_by_hf_bias_correction` applies
  it later (where something between reads the uncorrected step, as Fira's code does).

  Args:
    b1, b2: the moments' decay rates, in [0, 1).
    eps: added to :math:`\sqrt{v_t}` (galore-torch's default: 1e-6).
    mu_dtype: the first moment's dtype (default: the updates').
    correct_bias: multiply by :math:`\sqrt{1 - \beta_2^t} / (1 - \beta_1^t)`.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp
    >>> import galore_jax as gj
    >>> tx = gj.scale_by_adam_hf(eps=1e-6)
    >>> g = {"w": jnp.array([1e-4, -1e-6])}
    >>> u, _ = tx.update(g, tx.init(g))
    >>> [round(float(x), 4) for x in u["w"]]        # optax's would be [0.9901, -0.5]
    [0.7597, -0.0307]
  """
  _checks.betas((b1, b2), "scale_by_adam_hf")
  _checks.positive(eps, "eps")
  mu_dtype = _checks.float_dtype(mu_dtype, "mu_dtype")
  correct_bias = _checks.flag(correct_bias, "correct_bias")
  adam = optax.scale_by_adam(b1=b1, b2=b2, mu_dtype=mu_dtype)

  def update_fn(updates, state, params=None):
    del params
    _checks.initialized(state, "scale_by_adam_hf")
    updates = _floating(updates, "scale_by_adam_hf")
    _checks.state_fits(adam.init, state, updates, "scale_by_adam_hf")
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    step = _step_factor(b1, b2, count) if correct_bias else 1.0
    updates = jax.tree.map(
        lambda m, v, g: (step * m / (jnp.sqrt(v) + eps)).astype(g.dtype), mu, nu, updates)
    mu = optax.tree.cast(mu, mu_dtype)
    return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(adam.init, update_fn)


def _floating(updates, name: str):
  """``updates`` with a Python number leaf as the 0-d array it stands for, or a one-line
  ``ValueError`` naming a leaf that is not floating: HF's step is cast back to the update's
  dtype, and an integer one truncated it (to zeros, without a word)."""
  updates = _checks.number_leaves_as_arrays(updates)
  _checks.floating_leaves(updates, name)
  return updates


def _step_factor(b1, b2, count) -> jax.Array:
  """:math:`\\sqrt{1 - \\beta_2^t} / (1 - \\beta_1^t)` at ``t = count`` (float32)."""
  t = count.astype(jnp.float32)
  return jnp.sqrt(1.0 - jnp.asarray(b2, jnp.float32) ** t) / (
      1.0 - jnp.asarray(b1, jnp.float32) ** t)


def scale_by_hf_bias_correction(b1: float = 0.9, b2: float = 0.999
                                ) -> optax.GradientTransformation:
  r"""Multiplies the updates by Hugging Face ``AdamW``'s step-size factor
  :math:`\sqrt{1 - \beta_2^t} / (1 - \beta_1^t)` (its own count :math:`t`, from 1): after
  ``scale_by_adam_hf(correct_bias=False)`` and anything between, the two are
  ``scale_by_adam_hf()``.

  Example:
    >>> import jax.numpy as jnp
    >>> import galore_jax as gj
    >>> tx = gj.scale_by_hf_bias_correction()
    >>> u, _ = tx.update({"w": jnp.ones(1)}, tx.init({"w": jnp.ones(1)}))
    >>> round(float(u["w"][0]), 4)                   # sqrt(1 - 0.999) / (1 - 0.9)
    0.3162
  """
  _checks.betas((b1, b2), "scale_by_hf_bias_correction")

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    _checks.initialized(state, "scale_by_hf_bias_correction")
    updates = _floating(updates, "scale_by_hf_bias_correction")
    count = optax.safe_increment(state.count)
    step = _step_factor(b1, b2, count)
    return (jax.tree.map(lambda u: (step * u).astype(u.dtype), updates),
            optax.ScaleByScheduleState(count=count))

  return optax.GradientTransformation(init_fn, update_fn)

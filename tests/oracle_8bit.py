"""An independent NumPy oracle of bitsandbytes' block-wise 8-bit optimizer state: the
dynamic maps from their definition, block-wise quantize / dequantize by exact nearest code,
and Adam whose moments are stored that way."""

from __future__ import annotations

import numpy as np

from galore_jax import quantization


def oracle_map(signed):
  """The dynamic map from its definition, in float64: for i = 0..6 the midpoints of
  k_i equal steps of [0.1, 1] times 10**(i - 6) (k_i = 2**i, with negatives, when signed;
  2**(i+1) otherwise), plus 0 and 1, sorted."""
  values = [0.0, 1.0]
  for i in range(7):
    k = 2 ** i if signed else 2 ** (i + 1)
    means = 0.1 + 0.9 * (np.arange(k) + 0.5) / k
    values += list(10.0 ** (i - 6) * means) + (list(-10.0 ** (i - 6) * means) if signed else [])
  return np.sort(np.array(values))


def oracle_quantize(x, signed, block_size, keep_sign=False):
  """Per row-major block: absmax, and per element the first index of the code nearest to
  x / absmax (float64 distances; the division in float32, as stored values are); with
  ``keep_sign`` a negative x whose nearest code is 0.0 takes the nearest negative code."""
  code = quantization.dynamic_map(signed).astype(np.float64)
  flat = np.asarray(x, np.float32).reshape(-1)
  nb = -(-flat.size // block_size)
  blocks = np.zeros(nb * block_size, np.float32)
  blocks[:flat.size] = flat
  blocks = blocks.reshape(nb, block_size)
  absmax = np.abs(blocks).max(axis=1)
  v = (blocks / np.where(absmax > 0, absmax, np.float32(1))[:, None]).astype(np.float64)
  codes = np.argmin(np.abs(v[..., None] - code), axis=-1)
  if keep_sign:
    negative = np.flatnonzero(code < 0)[-1]
    codes = np.where(np.signbit(v) & (code[codes] == 0), negative, codes)
  codes = codes.reshape(-1)[:flat.size]
  return codes.reshape(np.shape(x)), absmax


def oracle_dequantize(codes, absmax, signed, block_size):
  code = quantization.dynamic_map(signed)
  flat = code[np.asarray(codes).reshape(-1)]
  scale = np.repeat(np.asarray(absmax), block_size)[:flat.size]
  return (flat * scale).reshape(np.shape(codes))


def oracle_adam_8bit(grads, b1=0.9, b2=0.999, eps=1e-8, block_size=256, min_8bit_size=4096):
  """Adam on a sequence of float32 gradients of one tensor, its moments stored block-wise
  in 8 bits (or in float32 below ``min_8bit_size`` elements): each step dequantizes,
  updates in float32 and quantizes the new moments again.  Returns the updates and the
  final stored moments ``((mu_codes, mu_absmax), (nu_codes, nu_absmax))`` (``None`` s
  for float32 moments)."""
  shape = np.shape(grads[0])
  quantized = np.prod(shape) >= max(min_8bit_size, 1)
  f32 = np.float32
  mu = nu = np.zeros(shape, f32)
  stored = None
  updates = []
  for t, g in enumerate(grads, start=1):
    g = np.asarray(g, f32)
    finite = np.isfinite(g) | (not quantized)
    g = np.where(finite, g, f32(0))  # bitsandbytes: a non-finite entry restarts, no step
    mu = np.where(finite, f32(1 - b1) * g + f32(b1) * mu, f32(0))
    nu = np.where(finite, f32(1 - b2) * (g * g) + f32(b2) * nu, f32(0))
    mu_hat = mu / (f32(1) - f32(b1) ** f32(t))
    nu_hat = nu / (f32(1) - f32(b2) ** f32(t))
    updates.append(np.where(finite, mu_hat / (np.sqrt(nu_hat) + f32(eps)), f32(0)))
    if quantized:  # the state keeps the quantized moments: continue from what they hold
      stored = tuple(oracle_quantize(m, signed, block_size, keep_sign=signed)
                     for m, signed in ((mu, True), (nu, False)))
      mu = oracle_dequantize(*stored[0], True, block_size)
      nu = oracle_dequantize(*stored[1], False, block_size)
  return updates, stored

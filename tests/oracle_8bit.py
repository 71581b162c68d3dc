"""An independent NumPy oracle of bitsandbytes' block-wise 8-bit optimizer state: the
dynamic maps from their definition, block-wise quantize / dequantize by exact nearest
code."""

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


def oracle_quantize(x, signed, block_size):
  """Per row-major block: absmax, and per element the first index of the code nearest to
  x / absmax (float64 distances; the division in float32, as stored values are)."""
  code = quantization.dynamic_map(signed).astype(np.float64)
  flat = np.asarray(x, np.float32).reshape(-1)
  nb = -(-flat.size // block_size)
  blocks = np.zeros(nb * block_size, np.float32)
  blocks[:flat.size] = flat
  blocks = blocks.reshape(nb, block_size)
  absmax = np.abs(blocks).max(axis=1)
  v = (blocks / np.where(absmax > 0, absmax, np.float32(1))[:, None]).astype(np.float64)
  codes = np.argmin(np.abs(v[..., None] - code), axis=-1).reshape(-1)[:flat.size]
  return codes.reshape(np.shape(x)), absmax


def oracle_dequantize(codes, absmax, signed, block_size):
  code = quantization.dynamic_map(signed)
  flat = code[np.asarray(codes).reshape(-1)]
  scale = np.repeat(np.asarray(absmax), block_size)[:flat.size]
  return (flat * scale).reshape(np.shape(codes))


"""Bases of galore_jax.subspace: exact SVD subspace, sign rule, non-finite guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from galore_jax import guard
from galore_jax import subspace


def _decaying(key, shape):
  """Random matrices with a clearly decaying spectrum (distinct singular values)."""
  *batch, m, n = shape
  k1, k2 = jax.random.split(key)
  u = jnp.linalg.qr(jax.random.normal(k1, (*batch, m, m)))[0]
  v = jnp.linalg.qr(jax.random.normal(k2, (*batch, n, n)))[0]
  s = 2.0 ** -jnp.arange(min(m, n), dtype=jnp.float32)
  return (u[..., :, : min(m, n)] * s) @ jnp.swapaxes(v[..., :, : min(m, n)], -1, -2)


def test_canonical_signs_rule():
  b = jnp.array([[0.5, -3.0, 2.0], [-0.9, 3.0, -2.0], [0.1, 1.0, 0.0]])
  out = np.asarray(subspace.canonical_signs(b))
  # column 0: largest |.| is -0.9 -> flipped; column 1: tie (-3, 3) -> first wins -> flipped;
  # column 2: tie (2, -2) -> first (2) wins -> kept.
  np.testing.assert_array_equal(out, np.asarray(b) * np.array([-1.0, -1.0, 1.0]))


def test_canonical_signs_is_sign_invariant():
  b = jax.random.normal(jax.random.key(0), (7, 4))
  flips = jnp.array([1.0, -1.0, -1.0, 1.0])
  np.testing.assert_array_equal(
      subspace.canonical_signs(b), subspace.canonical_signs(b * flips))


@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (8, 8), (3, 9, 6)])
def test_svd_bases_span_top_subspace_like_numpy(shape):
  g = _decaying(jax.random.key(1), shape)
  r = 3
  p, q = subspace.svd_bases(g, r, left=True, right=True)
  u, _, vh = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
  p_ref = u[..., :, :r]
  q_ref = np.swapaxes(vh[..., :r, :], -1, -2)
  # The same subspaces, and the same vectors up to the sign rule.
  for got, ref in ((p, p_ref), (q, q_ref)):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.abs(got), np.abs(ref), atol=1e-5)
    pivot = np.take_along_axis(got, np.argmax(np.abs(got), axis=-2)[..., None, :], axis=-2)
    assert np.all(pivot > 0)
    eye = np.swapaxes(got, -1, -2) @ got
    np.testing.assert_allclose(eye, np.broadcast_to(np.eye(r), eye.shape), atol=1e-5)


def test_svd_bases_one_side_only_and_bf16_input():
  g = _decaying(jax.random.key(2), (10, 6)).astype(jnp.bfloat16)
  p, q = subspace.svd_bases(g, 2, left=False, right=True)
  assert p is None and q.shape == (6, 2) and q.dtype == jnp.float32


def test_keep_finite_per_matrix_of_the_stack():
  old = jnp.zeros((3, 4, 2))
  new = jnp.ones((3, 4, 2)).at[1, 2, 0].set(jnp.nan).at[2, 0, 1].set(jnp.inf)
  out = np.asarray(guard.keep_finite(new, old))
  np.testing.assert_array_equal(out[0], 1.0)
  np.testing.assert_array_equal(out[1:], 0.0)


def test_compute_bases_rejects_unknown_method():
  with pytest.raises(ValueError, match="method"):
    subspace.compute_bases(jnp.ones((3, 3)), 1, left=True, right=False, method="nope")


@pytest.mark.parametrize("method", sorted(subspace.METHODS))
def test_compute_bases_clips_a_rank_above_the_matrix_as_the_transforms_do(method):
  """A rank above min(m, n) is clipped to it, as the transforms' plans clip theirs (svd and the
  eigh methods clipped it by chance; random raised a broadcasting error): orthonormal
  columns, min(m, n) of them, on each side."""
  g = jax.random.normal(jax.random.key(0), (2, 6, 4))
  p, q = subspace.compute_bases(g, 10, left=True, right=True, method=method,
                                key=jax.random.key(1))
  for b, d in ((p, 6), (q, 4)):
    assert b.shape == (2, d, 4), (method, b.shape)
    gram = np.einsum("bik,bil->bkl", b, b)
    np.testing.assert_allclose(gram, np.broadcast_to(np.eye(4), gram.shape), atol=2e-3)


@pytest.mark.parametrize("g, match", [
    (jnp.ones((6, 4), jnp.complex64) * 1j,  # (the real part's bases came back, silently)
     r"^compute_bases: g_Bxmxn is complex64: expected real matrices \(the bases are real\)\.$"),
    (jnp.ones(5), r"^compute_bases: g_Bxmxn must have at least 2 axes \(\.\.\., m, n\), got"
                  r" shape \(5,\)\.$"),
])
def test_compute_bases_bad_input_is_one_line(g, match):
  with pytest.raises(ValueError, match=match):
    subspace.compute_bases(g, 2, left=True, right=False, method="svd")


@pytest.mark.parametrize("call, match", [
    # a truthy string or int was taken as True: "no" computed the left basis
    (lambda: subspace.compute_bases(jnp.ones((6, 4)), 2, left="no", right=True, method="svd"),
     r"^compute_bases: left must be True or False, got 'no' \(str\)\.$"),
    (lambda: subspace.compute_bases(jnp.ones((6, 4)), 2, left=False, right=1, method="svd"),
     r"^compute_bases: right must be True or False, got 1\.$"),
    # a 1-D basis: an IndexError; no columns: a reduction's ValueError of zero-size arrays
    (lambda: subspace.canonical_signs(jnp.ones(4)),
     r"^canonical_signs: basis must be \(\.\.\., d, r\) with d >= 1, got shape \(4,\)\.$"),
    (lambda: subspace.orthonormalize(jnp.ones((6, 0))),
     r"^orthonormalize: y_Bxdxk must be \(\.\.\., d, k\) with k >= 1, got shape \(6, 0\)\.$"),
])
def test_basis_helpers_bad_input_is_one_line(call, match):
  with pytest.raises(ValueError, match=match):
    call()

"""galore_jax.quantization: the dynamic maps and block-wise quantize / dequantize, against an
independent NumPy oracle of the definition and, when it is installed, bitsandbytes itself."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from galore_jax import quantization
from oracle_8bit import bitsandbytes_map
from oracle_8bit import oracle_dequantize
from oracle_8bit import oracle_map
from oracle_8bit import oracle_quantize


def heavy_tailed(shape, seed, signed=True):
  """Values over many decades (Adam moments are), some blocks all zero."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape) * np.exp(rng.uniform(-12, 3, shape))
  x.reshape(-1)[:300] = 0.0  # the first block is zero: absmax 0
  return (x if signed else x * x).astype(np.float32)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_the_definition(signed):
  code = quantization.dynamic_map(signed)
  assert code.dtype == np.float32 and code.shape == (256,)
  assert np.all(np.diff(code) > 0)
  want = oracle_map(signed)
  # float32 construction (bitsandbytes' own arithmetic): within 2 ulp of the exact values,
  # and bit for bit bitsandbytes' table (its bytes, kept in the oracle)
  np.testing.assert_allclose(code, want, rtol=2.5e-7, atol=0)
  np.testing.assert_allclose(bitsandbytes_map(signed), want, rtol=2.5e-7, atol=0)
  assert code.tobytes() == bitsandbytes_map(signed).astype("<f4").tobytes()
  if signed:
    assert code[127] == 0.0 and code[255] == 1.0 and np.array_equal(code[:127], -code[254:127:-1])
  else:
    assert code[0] == 0.0 and code[255] == 1.0


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed):
  torch = pytest.importorskip("torch")
  del torch
  functional = pytest.importorskip("bitsandbytes.functional")
  ref = functional.create_dynamic_map(signed, max_exponent_bits=7, total_bits=8).numpy()
  assert np.array_equal(quantization.dynamic_map(signed), ref)  # bit for bit


_quantize = jax.jit(quantization.quantize, static_argnames=("signed", "block_size"))
_dequantize = jax.jit(quantization.dequantize, static_argnames=("signed",))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape, block_size", [
    ((48, 100), 256),     # last block padded
    ((3, 16, 64), 256),   # whole blocks, N-D
    ((1000,), 64),
    ((7,), 256),          # fewer elements than a block
])
def test_quantize_matches_oracle(signed, shape, block_size):
  x = heavy_tailed(shape, seed=sum(shape), signed=signed)
  q = _quantize(jnp.asarray(x), signed=signed, block_size=block_size)
  codes, absmax = oracle_quantize(x, signed, block_size)
  assert q.codes.dtype == jnp.uint8 and q.codes.shape == shape
  assert q.absmax.dtype == jnp.float32 and q.absmax.shape == (-(-x.size // block_size),)
  np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
  np.testing.assert_array_equal(np.asarray(q.codes), codes)
  y = _dequantize(q, signed=signed)
  np.testing.assert_array_equal(np.asarray(y), oracle_dequantize(codes, absmax, signed, block_size))
  assert quantization.block_size_of(q) == block_size or absmax.size == 1


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_code_is_exact_at_midpoints(signed):
  """Values at (the float32 roundings of) every midpoint between codes, and their float32
  neighbours: the nearest code by exact distances, the lower one on an exact tie."""
  code = quantization.dynamic_map(signed).astype(np.float64)
  mid = ((code[:-1] + code[1:]) / 2).astype(np.float32)
  v = np.concatenate([mid, np.nextafter(mid, -np.inf), np.nextafter(mid, np.inf), [1.0]])
  v = v.astype(np.float32)  # one block whose absmax is 1: the values are not rescaled
  q = _quantize(jnp.asarray(v), signed=signed, block_size=1024)
  assert float(q.absmax[0]) == 1.0
  np.testing.assert_array_equal(np.asarray(q.codes), oracle_quantize(v, signed, 1024)[0])


def test_zero_block_and_round_trip_error():
  x = heavy_tailed((64, 64), seed=3)
  q = _quantize(jnp.asarray(x), signed=True, block_size=256)
  y = np.asarray(_dequantize(q, signed=True))
  assert np.all(y[:1] == 0.0) and float(q.absmax[0]) == 0.0  # a zero block stays zero
  # the widest gap of the map is 1/64 of a block's absmax (its top decade)
  bound = np.repeat(np.asarray(q.absmax), 256).reshape(x.shape) * (0.9 / 128 + 1e-7)
  assert np.all(np.abs(y - x) <= bound)



@pytest.mark.parametrize("signed", [True, False])
def test_values_beyond_2_to_126_saturate(signed):
  """Infinities and finite values above 2^126 are stored as +-2^126 (the oracle of the
  saturated values): an infinite absmax made its block NaN (inf / inf), and XLA flushed
  the codes of a block whose absmax exceeds 2^126 to 0 (a subnormal reciprocal)."""
  big = np.float32(2.0 ** 126)
  rng = np.random.default_rng(5)
  x = heavy_tailed((512,), seed=5, signed=signed)
  x[256:] = 10.0 ** rng.uniform(30, 37, 256)  # the second block: nonzero codes next to 2^126
  x[256::2] *= -1 if signed else 1
  x[300:302] = [-np.inf if signed else np.inf, 3e38]
  q = _quantize(jnp.asarray(x), signed=signed, block_size=256)
  codes, absmax = oracle_quantize(np.clip(x, -big, big), signed, 256)
  np.testing.assert_array_equal(np.asarray(q.absmax), [0.0, big])
  np.testing.assert_array_equal(np.asarray(q.codes), codes)
  y = np.asarray(_dequantize(q, signed=signed))
  assert np.all(np.isfinite(y)) and y[301] == big and np.count_nonzero(y[256:]) > 100


def test_keep_sign_gives_a_small_negative_the_nearest_negative_code():
  """bitsandbytes' 8-bit optimizers store their first moment so that no negative entry
  reads back as 0 (their kernel's "same sign after quantization" step): such an entry takes
  the largest negative code, the others keep their nearest codes."""
  x = heavy_tailed((2, 512), seed=9)
  x[:, 300:310] = -np.float32(1e-9) * np.abs(x).max()  # nearest code: 0
  x[:, 310] = -0.0
  jitted = jax.jit(quantization.quantize,
                   static_argnames=("signed", "block_size", "batch_dims", "keep_sign"))
  plain = np.asarray(jitted(jnp.asarray(x), signed=True, batch_dims=1).codes)
  got = np.asarray(jitted(jnp.asarray(x), signed=True, batch_dims=1, keep_sign=True).codes)
  for i in range(2):
    np.testing.assert_array_equal(got[i], oracle_quantize(x[i], True, 256, keep_sign=True)[0])
  moved = got != plain
  assert moved[:, 300:311].all() and np.all(got[moved] == 126) and np.all(plain[moved] == 127)
  assert np.all(np.signbit(x[moved]))
  code = quantization.dynamic_map(True)
  assert code[126] < 0 and code[127] == 0


@pytest.mark.parametrize("signed", [True, False])
def test_a_nan_is_stored_as_zero_and_left_out_of_its_blocks_absmax(signed):
  """A NaN (the moment of a NaN gradient) is stored as 0: XLA's max propagates NaN on a GPU
  and eagerly, and skips it in some CPU fusions, so one NaN made its whole block NaN for
  good, or not, by backend.  The oracle: the same tensor with 0 in its place."""
  x = heavy_tailed((768,), seed=6, signed=signed)
  x[[3, 300, 301, 700]] = np.nan  # a zero block, two in the second, one in the third
  codes, absmax = oracle_quantize(np.nan_to_num(x, nan=0.0), signed, 256)
  for quantize in (_quantize, quantization.quantize):  # jitted and eager
    q = quantize(jnp.asarray(x), signed=signed, block_size=256)
    np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
    np.testing.assert_array_equal(np.asarray(q.codes), codes)
    y = np.asarray(_dequantize(q, signed=signed))
    assert np.all(np.isfinite(y)) and np.all(y[[3, 300, 301, 700]] == 0.0)


@pytest.mark.parametrize("signed", [True, False])
def test_codes_mean_the_same_in_bitsandbytes(signed):
  """bitsandbytes reads our state as we do (same absmax, same dequantized values), and our
  codes are never further from the input than its CPU kernel's (which searches the map
  approximately)."""
  torch = pytest.importorskip("torch")
  functional = pytest.importorskip("bitsandbytes.functional")
  x = heavy_tailed((40, 128), seed=11, signed=signed)
  code = functional.create_dynamic_map(signed)
  try:
    ref_codes, ref_state = functional.quantize_blockwise(
        torch.from_numpy(x), code=code, blocksize=256)
  except Exception as e:  # noqa: BLE001 -- no CPU kernel in this build
    pytest.skip(f"bitsandbytes quantize_blockwise unavailable on CPU: {e}")
  q = _quantize(jnp.asarray(x), signed=signed, block_size=256)
  np.testing.assert_array_equal(np.asarray(q.absmax), ref_state.absmax.numpy())
  ours = functional.dequantize_blockwise(torch.from_numpy(np.array(q.codes)), ref_state).numpy()
  np.testing.assert_array_equal(np.asarray(_dequantize(q, signed=signed)), ours)
  theirs = functional.dequantize_blockwise(ref_codes, ref_state).numpy()
  assert np.all(np.abs(ours - x) <= np.abs(theirs - x))


def test_zeros_and_shardings():
  q = quantization.zeros((8, 1000), block_size=256)
  assert q.codes.shape == (8, 1000) and q.absmax.shape == (32,)
  assert not np.any(np.asarray(quantization.dequantize(q, signed=True)))
  mesh = jax.sharding.AbstractMesh((2, 4), ("fsdp", "tensor"))
  spec = quantization.absmax_spec
  assert tuple(spec(("fsdp", "tensor"), (64, 32), 256, mesh)) == ("fsdp",)
  assert tuple(spec((("fsdp", "tensor"), None), (64, 32), 256, mesh)) == (("fsdp", "tensor"),)
  assert tuple(spec((("fsdp", "tensor"), None), (8, 32), 256, mesh)) == ()  # 32 per device
  assert tuple(spec((None, "tensor"), (64, 32), 256, mesh)) == ()
  assert tuple(spec(("tensor",), (6, 256), 256, mesh)) == ()  # 6 rows over 4 devices
  # Flax logical names (a param's metadata) are not the mesh's: sizes unknown, replicated
  assert tuple(spec(("vocab", "embed"), (256, 64), 256, mesh)) == ()


@pytest.mark.parametrize("shape, batch_dims", [((3, 5, 100), 1), ((2, 3, 300), 2), ((6, 70), 1)])
def test_batch_dims_quantize_each_slice_as_a_tensor(shape, batch_dims):
  """Each slice over the leading ``batch_dims`` axes is blocked alone (padded at its own
  end, never sharing a block with the next slice), as the oracle quantizes it by itself."""
  x = heavy_tailed(shape, seed=3)
  q = quantization.quantize(jnp.asarray(x), signed=True, block_size=64, batch_dims=batch_dims)
  batch = shape[:batch_dims]
  assert q.absmax.shape == batch + (quantization.num_blocks(np.prod(shape[batch_dims:]), 64),)
  assert quantization.block_size_of(q) == 64 and quantization.batch_dims_of(q) == batch_dims
  y = np.asarray(quantization.dequantize(q, signed=True))
  for i in np.ndindex(*batch):
    codes, absmax = oracle_quantize(x[i], True, 64)
    np.testing.assert_array_equal(np.asarray(q.codes)[i], codes)
    np.testing.assert_array_equal(np.asarray(q.absmax)[i], absmax)
    np.testing.assert_array_equal(y[i], oracle_dequantize(codes, absmax, True, 64))
  z = quantization.zeros(shape, block_size=64, batch_dims=batch_dims)
  assert z.absmax.shape == q.absmax.shape and z.codes.shape == shape
  with pytest.raises(ValueError, match=r"batch_dims: expected an int in \[0, "):
    quantization.quantize(jnp.asarray(x), signed=True, batch_dims=len(shape) + 1)


def test_absmax_spec_with_batch_dims():
  mesh = jax.sharding.AbstractMesh((2, 4), ("fsdp", "tensor"))
  spec = quantization.absmax_spec
  assert tuple(spec((None, "fsdp", "tensor"), (3, 64, 32), 256, mesh, 1)) == (None, "fsdp")
  assert tuple(spec(("fsdp", "tensor"), (4, 1024), 256, mesh, 1)) == ("fsdp", "tensor")
  assert tuple(spec(("fsdp", "tensor"), (4, 32), 256, mesh, 1)) == ("fsdp",)  # 8 per device
  assert tuple(spec((None, "tensor"), (3, 6), 256, mesh, 1)) == ()


def test_unsigned_quantization_stores_negatives_as_zero():
  """The unsigned map has no negative codes: a negative entry took code 0 but set its block's
  absmax, so that one -1000 beside values near 1 left them three decades down the map
  ([-1000, 0.5, 0.25, 1] came back as [0, 0.522, 0.241, 0.972], now [0, 0.497, 0.251, 1]).
  Negatives are clamped to 0 before the absmax (no value check is possible under jit)."""
  x = heavy_tailed((4, 64), seed=5, signed=False)
  x[0, :3] = [-1000.0, -1e-3, -0.0]
  x[2, 7] = -np.inf
  q = _quantize(jnp.asarray(x), signed=False, block_size=64)
  codes, absmax = oracle_quantize(np.maximum(x, 0.0), False, 64)
  np.testing.assert_array_equal(np.asarray(q.codes), codes)
  np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
  y = np.asarray(_dequantize(q, signed=False))
  assert y.min() == 0.0 and np.all(y[x <= 0] == 0.0)


@pytest.mark.parametrize("shape, batch_dims", [((0,), 0), ((0, 3), 0), ((0, 300), 1),
                                               ((2, 0), 1)])
def test_an_empty_tensor_round_trips(shape, batch_dims):
  """A tensor without elements (a stack of no layers, a slice of none) quantizes to empty
  codes and back: its reshapes inferred an axis from 0 elements, a ZeroDivisionError."""
  q = quantization.quantize(jnp.zeros(shape), signed=True, batch_dims=batch_dims)
  assert q.codes.shape == shape
  assert q.absmax.shape == quantization.zeros(shape, batch_dims=batch_dims).absmax.shape
  assert quantization.dequantize(q, signed=True).shape == shape


@pytest.mark.parametrize("call, match", [
    # a complex tensor lost its imaginary part without a word
    (lambda: quantization.quantize(jnp.ones(4, jnp.complex64), signed=True),
     r"^quantize: x is complex64: the 8-bit map holds real values; quantize its real and"
     r" imaginary parts apart\.$"),
    (lambda: quantization.dequantize(jnp.zeros(4), signed=True),
     r"^dequantize: q must be a Quantized \(codes, absmax\), as quantize returns; got Array"),
    (lambda: quantization.dequantize(quantization.Quantized(jnp.zeros(4), jnp.zeros(1)),
                                     signed=True),
     r"^dequantize: q\.codes must be uint8 \(the 8-bit codes\), got float32\.$"),
    (lambda: quantization.dequantize(quantization.quantize(jnp.ones(4), signed=True),
                                     signed=True, dtype=jnp.int32),
     r"^dtype must be a real floating dtype or None, got <class 'jax.numpy.int32'>\.$"),
    # an absmax that blocks no such codes: a raw broadcast TypeError, or (the wrong number of
    # blocks) read as another block size; an int absmax was taken
    (lambda: quantization.dequantize(quantization.Quantized(
        jnp.zeros(1000, jnp.uint8), jnp.zeros(3)), signed=True),
     r"^dequantize: q\.absmax of shape \(3,\) blocks no codes of shape \(1000,\): expected"),
    (lambda: quantization.dequantize(quantization.Quantized(
        jnp.zeros((4, 8), jnp.uint8), jnp.zeros((2, 1))), signed=True),
     r"^dequantize: q\.absmax of shape \(2, 1\) blocks no codes of shape \(4, 8\)"),
    (lambda: quantization.dequantize(quantization.Quantized(
        jnp.zeros(4, jnp.uint8), jnp.zeros(1, jnp.int32)), signed=True),
     r"^dequantize: q\.absmax must be float32 \(each block's absolute maximum\), got int32\.$"),
    # "no" read as True: the signed map
    (lambda: quantization.quantize(jnp.ones(4), signed="no"),
     r"^quantize: signed must be True or False, got 'no' \(str\)\.$"),
    (lambda: quantization.dequantize(quantization.zeros((4,)), signed="no"),
     r"^dequantize: signed must be True or False"),
    (lambda: quantization.dynamic_map("x"), r"^dynamic_map: signed must be True or False"),
    # a ZeroDivisionError; batch axes beyond the tensor's taken
    (lambda: quantization.absmax_spec((None,), (8,), 0, None),
     r"^block_size must be an int >= 1, got 0\.$"),
    (lambda: quantization.absmax_spec((None,), (8,), 256, None, batch_dims=5),
     r"^batch_dims: expected an int in \[0, 1\]"),
    (lambda: quantization.num_blocks(10, 0), r"^block_size must be an int >= 1, got 0\.$"),
    (lambda: quantization.num_blocks(-10, 4), r"^num_blocks: size must be an int >= 0, got -10\.$"),
    (lambda: quantization.num_blocks(10.5, 4),
     r"^num_blocks: size must be an int >= 0, got 10\.5\.$"),
])
def test_bad_input_is_one_line(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_array_likes_quantize_as_arrays():
  """A list or NumPy array quantizes as ``jnp.asarray`` of it (a list raised AttributeError)."""
  want = quantization.quantize(jnp.array([0.5, -2.0, 0.0]), signed=True, block_size=2)
  for x in ([0.5, -2.0, 0.0], np.array([0.5, -2.0, 0.0], np.float32)):
    got = quantization.quantize(x, signed=True, block_size=2)
    assert got.codes.tolist() == want.codes.tolist()
    assert got.absmax.tolist() == want.absmax.tolist()

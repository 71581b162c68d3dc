"""An independent NumPy oracle of bitsandbytes' block-wise 8-bit optimizer state: the
dynamic maps from their definition (and bitsandbytes' table as data), block-wise quantize /
dequantize by exact nearest code, and Adam whose moments are stored that way."""

from __future__ import annotations

import numpy as np


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


# bitsandbytes 0.50.2's create_dynamic_map(signed, max_exponent_bits=7, total_bits=8), the
# float32 codes as little-endian bytes: data, not code, so that the oracle does not take the
# library's table (built in float32 arithmetic, within 2 ulp of oracle_map).
BITSANDBYTES_MAP_HEX = {
  True: (
      "33337ebf9a997abf000077bf666673bfcdcc6fbf33336cbf9a9968bf000065bf666661bfcdcc5dbf33335abf"
      "9a9956bf000053bf66664fbfcdcc4bbf333348bf9a9944bf000041bf66663dbfcdcc39bf343336bf9a9932bf"
      "00002fbf66662bbfcdcc27bf343324bf9a9920bf00001dbf666619bfcdcc15bf343312bf9a990ebf00000bbf"
      "666607bfcccc03bf333300bf3233f9be0000f2becccceabe9a99e3be6666dcbe3333d5be0000cebeccccc6be"
      "9a99bfbe6666b8be3333b1be0000aabecccca2be9a999bbe666694be34338dbe000086be99997dbe33336fbe"
      "cdcc60be666652be000044be9a9935be333327becdcc18be66660abe0000f8bd3433dbbd85ebc9bdf728c4bd"
      "6766bebdd7a3b8bd48e1b2bdb81eadbd2a5ca7bd9a99a1bd0ad79bbd7b1496bdeb5190bd5d8f8abdcdcc84bd"
      "7b147ebd5d8f72bd3d0a67bd1f855bbd000050bde17a44bdc3f538bda3702dbd85eb21bd676616bd48e10abd"
      "52b8febc15aee7bcd7a3d0bc9a99b9bc5d8fa2bc1f858bbcc3f568bc48e13abc643b1fbc180416bccdcc0cbc"
      "819503bc6abcf4bbd34de2bb3bdfcfbba470bdbb0d02abbb749398bbdd2486bb8a6c67bb5c8f42bb2db21dbb"
      "fca9f1ba9defa7baff6577ba3ee859ba806a3cbac1ec1eba016f01ba83e2c7b905e78cb90bd723b94b1fbab8"
      "b3ef8ab8348037b80642b2b7ff0502b7941a5ab6b7a313b500000000b7a31335941a5a36ff0502370642b237"
      "34803738b3ef8a384b1fba380bd7233905e78c3983e2c739016f013ac1ec1e3a806a3c3a3ee8593aff65773a"
      "9defa73afca9f13a2db21d3b5c8f423b8a6c673bdd24863b7493983b0d02ab3ba470bd3b3bdfcf3bd34de23b"
      "6abcf43b8195033ccdcc0c3c1804163c643b1f3c48e13a3cc3f5683c1f858b3c5d8fa23c9a99b93cd7a3d03c"
      "15aee73c52b8fe3c48e10a3d6766163d85eb213da3702d3dc3f5383de17a443d0000503d1f855b3d3d0a673d"
      "5d8f723d7b147e3dcdcc843d5d8f8a3deb51903d7b14963d0ad79b3d9a99a13d2a5ca73db81ead3d48e1b23d"
      "d7a3b83d6766be3df728c43d85ebc93d3433db3d0000f83d66660a3ecdcc183e3333273e9a99353e0000443e"
      "6666523ecdcc603e33336f3e99997d3e0000863e34338d3e6666943e9a999b3ecccca23e0000aa3e3333b13e"
      "6666b83e9a99bf3eccccc63e0000ce3e3333d53e6666dc3e9a99e33eccccea3e0000f23e3233f93e3333003f"
      "cccc033f6666073f00000b3f9a990e3f3433123fcdcc153f6666193f00001d3f9a99203f3433243fcdcc273f"
      "66662b3f00002f3f9a99323f3433363fcdcc393f66663d3f0000413f9a99443f3333483fcdcc4b3f66664f3f"
      "0000533f9a99563f33335a3fcdcc5d3f6666613f0000653f9a99683f33336c3fcdcc6f3f6666733f0000773f"
      "9a997a3f33337e3f0000803f"
  ),
  False: (
      "00000000aa7bae3498095035389b0e36f6cc9236514cde36d5e514376e128337a071e13768e81f3800184f38"
      "9a477e3899bb96386453ae3831ebc5384b590639ca54413949507c39e4a59b39a223b93963a1d639221ff439"
      "71ce083a508d173a304c263a100b353aefc9433ad088523aaf47613a8e06703a6ec57e3a0681953a355eba3a"
      "643bdf3a4a0c023be17a143b78e9263b1058393ba7c64b3b40355e3bd7a3703b3789813b82c08a3bcff7933b"
      "1a2f9d3b6666a63bb29daf3bfdd4b83b4a0cc23b9543cb3be17ad43b2eb2dd3b78e9e63bc520f03b0f58f93b"
      "ae47013c54e3053cf97e0a3ca01a0f3c45b6133ceb51183c92ed1c3c3789213c2a5c2f3c6766463ca3705d3c"
      "e27a743c8fc2853caf47913ccdcc9c3ceb51a83c0bd7b33c295cbf3c47e1ca3c6766d63c87ebe13ca370ed3c"
      "c3f5f83c703d023d0000083d8fc20d3d1f85133daf47193d3d0a1f3dcdcc243d5c8f2a3deb51303d7b14363d"
      "0ad73b3d9a99413d285c473db81e4d3d47e1523dd7a3583d67665e3df728643d87eb693d15ae6f3da370753d"
      "33337b3de27a803d2a5c833d713d863db81e893d00008c3d48e18e3d90c2913dd7a3943d1f85973d67669a3d"
      "af479d3df628a03d3e0aa33d85eba53dcdcca83d15aeab3d5c8fae3da470b13deb51b43d3333b73d7b14ba3d"
      "c3f5bc3d0bd7bf3d52b8c23d9a99c53de27ac83d295ccb3d0000d43d6666e23dcdccf03d3333ff3dcccc063e"
      "00000e3e3433153e66661c3e9a99233ecccc2a3e0000323e3433393e6666403e9a99473ecccc4e3e0000563e"
      "34335d3e6666643e9a996b3ecccc723e00007a3e9999803e3333843ecdcc873e66668b3e00008f3e9a99923e"
      "3333963ecccc993e66669d3e0000a13e9a99a43e3333a83eccccab3e6666af3e0000b33e9a99b63e3333ba3e"
      "ccccbd3e6666c13e0000c53e9a99c83e3333cc3ecccccf3e6666d33e0000d73e9a99da3e3333de3ecccce13e"
      "6666e53e0000e93e9a99ec3e3333f03eccccf33e6666f73e0000fb3e9999fe3e9a19013f66e6023f33b3043f"
      "0080063fcc4c083f9a190a3f66e60b3f34b30d3f00800f3fcd4c113f9a19133f66e6143f34b3163f0080183f"
      "cd4c1a3f9a191c3f66e61d3f34b31f3f0080213fcd4c233f9a19253f66e6263f34b3283f00802a3fcd4c2c3f"
      "9a192e3f66e62f3f34b3313f0080333fcd4c353f9a19373f66e6383f34b33a3f00803c3fcd4c3e3f9a19403f"
      "66e6413f34b3433f0080453fcc4c473f9a19493f66e64a3f34b34c3f00804e3fcc4c503f9a19523f66e6533f"
      "34b3553f0080573fcc4c593f9a195b3f66e65c3f34b35e3f0080603fcc4c623f9a19643f66e6653f34b3673f"
      "0080693fcc4c6b3f9a196d3f66e66e3f34b3703f0080723fcc4c743f9a19763f66e6773f34b3793f00807b3f"
      "cc4c7d3f9a197f3f0000803f"
  ),
}


def bitsandbytes_map(signed):
  """bitsandbytes' 256 float32 codes, sorted ascending (``BITSANDBYTES_MAP_HEX``)."""
  return np.frombuffer(bytes.fromhex("".join(BITSANDBYTES_MAP_HEX[signed])), "<f4").copy()


def oracle_quantize(x, signed, block_size, keep_sign=False):
  """Per row-major block: absmax, and per element the first index of the code nearest to
  x / absmax (float64 distances; the division in float32, as stored values are); with
  ``keep_sign`` a negative x whose nearest code is 0.0 takes the nearest negative code."""
  code = bitsandbytes_map(signed).astype(np.float64)
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
  code = bitsandbytes_map(signed)
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

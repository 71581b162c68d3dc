"""What a checkpoint must hold, so that a damaged one is caught instead of trained on.

``fingerprint(state)`` records each leaf's shape, dtype and a 64-bit checksum of its bytes
(computed on the devices, where the state lives, sharded or not); ``layout`` is the same
without the checksums (for an abstract state). A checkpoint stores the fingerprint of what
it saved; a resume compares the layouts before restoring (``layout_differences``) and the
checksums after (``checksum_differences``). ``seal`` / ``is_sealed`` guard the JSON that
carries them.

Orbax checks the shard index of each data file (crc32c) but not the data itself: two
flipped bytes in a data file restore without an error, as other numbers.
"""

from __future__ import annotations

import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np

# Two odd 32-bit multipliers (golden ratio, murmur3): a changed word always changes a sum.
_K1, _K2 = 0x9E3779B9, 0x85EBCA6B


def leaf_name(path) -> str:
  """``['opt']['opt_state'][0]['mu']`` for a tree path (without nnx's ``.value``)."""
  return jax.tree_util.keystr(path).removesuffix(".value")


def words(x: jax.Array) -> jax.Array:
  """The bits of ``x`` as uint32 words (one per element, two per 8-byte element)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if jnp.iscomplexobj(x):
    x = jnp.stack([x.real, x.imag], axis=-1)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def checksum(x: jax.Array) -> jax.Array:
  """Two uint32 sums of the words of ``x``, each word mixed with its position (so moved
  values count too). Integer sums wrap exactly: the result does not depend on the order
  of the reduction, hence not on the sharding. Positions come from iotas per axis rather
  than a flattened array, which would gather a sharded leaf."""
  w = words(x)
  index = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(w.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride)
    stride = stride * w.shape[axis] % 2**32
  first = jnp.sum(w * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  second = jnp.sum((w ^ (index * jnp.uint32(_K1))) * jnp.uint32(_K2), dtype=jnp.uint32)
  return jnp.stack([first, second])


_checksums = jax.jit(lambda leaves: [checksum(x) for x in leaves])


def layout(state) -> dict[str, dict]:
  """``{leaf name: {"shape", "dtype"}}`` of a state tree (arrays or ShapeDtypeStructs)."""
  return {leaf_name(path): {"shape": list(x.shape), "dtype": str(x.dtype)}
          for path, x in jax.tree_util.tree_leaves_with_path(state)}


def fingerprint(state) -> dict[str, dict]:
  """``layout(state)`` with each leaf's checksum (16 hex digits) added."""
  leaves = jax.tree.leaves(state)
  sums = [np.asarray(s) for s in _checksums(leaves)]
  return {name: {**entry, "sum": f"{int(s[0]):08x}{int(s[1]):08x}"}
          for (name, entry), s in zip(layout(state).items(), sums)}


def layout_differences(saved: dict, now: dict) -> list[str]:
  """What keeps a state of layout ``saved`` from loading into one of layout ``now``."""
  missing, extra = sorted(set(now) - set(saved)), sorted(set(saved) - set(now))
  diffs = [f"{name}: not in the checkpoint" for name in missing]
  diffs += [f"{name}: not in this run's state" for name in extra]
  for name in sorted(set(saved) & set(now)):
    (s, n) = (saved[name], now[name])
    if (s["shape"], s["dtype"]) != (n["shape"], n["dtype"]):
      diffs.append(f"{name}: {s['dtype']}{s['shape']} saved, {n['dtype']}{n['shape']} here")
  return diffs


def checksum_differences(saved: dict, restored: dict) -> list[str]:
  """The leaves whose restored bytes differ from the ones saved."""
  return [name for name, entry in saved.items()
          if name in restored and entry.get("sum") != restored[name]["sum"]]


def _crc(meta: dict) -> int:
  body = {k: v for k, v in meta.items() if k != "seal"}
  return zlib.crc32(json.dumps(body, sort_keys=True).encode())


def seal(meta: dict) -> dict:
  """``meta`` with a checksum of itself, so that a damaged one is not taken for another."""
  return {**meta, "seal": _crc(meta)}


def is_sealed(meta: dict) -> bool:
  """Whether ``meta`` carries its seal and still matches it."""
  return isinstance(meta, dict) and meta.get("seal") == _crc(meta)

"""Shared helper of the NNX tests."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def fast_init(make, seed=0):
  """Builds an NNX module abstractly and fills its params from NumPy (eager jax.random init
  compiles one program per shape: seconds on CPU).  Kernels ~ N(0, 1/fan_in) (fan_in = first
  axis, or the product of all but the last for N-D kernels), embeddings ~ N(0, 1), norm
  scales 1, biases 0."""
  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    assert jnp.issubdtype(x.dtype, jnp.floating), (path, x)
    name = [getattr(k, "key", None) for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
    if name == "kernel":
      fan_in = x.shape[0] if len(x.shape) == 2 else int(np.prod(x.shape[:-1]))
      return jnp.asarray(rng.standard_normal(x.shape) / np.sqrt(fan_in), x.dtype)
    if name == "embedding":
      return jnp.asarray(rng.standard_normal(x.shape), x.dtype)
    return (jnp.ones if name == "scale" else jnp.zeros)(x.shape, x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, abstract))

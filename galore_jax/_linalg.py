"""Float32 building blocks of the basis methods and LDAdam: batched matmuls on the trailing
two axes, always accumulated in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def mT(x: jax.Array) -> jax.Array:  # pylint: disable=invalid-name
  """The transpose of each matrix of a stack.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _linalg
    >>> _linalg.mT(jnp.zeros((3, 4, 2))).shape
    (3, 2, 4)
  """
  return jnp.swapaxes(x, -1, -2)


#: ``precision`` of :func:`mm` that rounds both operands to bfloat16 (products exact in
#: float32, float32 accumulation: a tensor core's bf16 matmul, emulated exactly on a CPU).
BF16 = "bfloat16"


def mm(a: jax.Array, b: jax.Array, precision=HIGHEST) -> jax.Array:
  """Batched matmul with float32 accumulation; full float32 products by default.

  ``precision`` is a ``jax.lax.Precision`` (or its name) for float32 operands, or
  :data:`BF16`: the operands rounded to bfloat16 first.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _linalg
    >>> _linalg.mm(jnp.ones((2, 3)), jnp.ones((3, 1))).tolist()
    [[3.0], [3.0]]
    >>> _linalg.mm(jnp.array([[1.001]]), jnp.array([[1.0]]), _linalg.BF16).tolist()
    [[1.0]]
  """
  if isinstance(precision, str) and precision == BF16:
    # XLA:CPU cannot run every bf16 x bf16 -> f32 dot (DotThunk refuses some, e.g. per device
    # on a mesh): there the rounded operands go back to float32, which gives the same
    # products (a bf16 product is exact in float32) and float32 sums.
    a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    return jax.lax.platform_dependent(
        a, b, cpu=lambda a, b: mm(a.astype(jnp.float32), b.astype(jnp.float32)),
        default=lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  return jnp.matmul(a, b, precision=precision, preferred_element_type=jnp.float32)


def gram(y: jax.Array) -> jax.Array:
  """``Y^T Y`` of each matrix, full float32 (a Cholesky needs it).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _linalg
    >>> _linalg.gram(jnp.eye(3)[:, :2]).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
  """
  return mm(mT(y), y)


def safe_div(x: jax.Array, s: jax.Array) -> jax.Array:
  """``x / s`` where ``s > 0``, ``x`` where ``s`` is zero.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _linalg
    >>> _linalg.safe_div(jnp.array([2.0, 3.0]), jnp.array([2.0, 0.0])).tolist()
    [1.0, 3.0]
  """
  return x / jnp.where(s > 0, s, 1.0)


def max_normalize(g: jax.Array) -> jax.Array:
  """Each matrix divided by its largest magnitude (a zero matrix stays zero): the basis
  methods are scale invariant, and this keeps Gram matrices and power steps of tiny or
  huge gradients inside float32's range.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _linalg
    >>> _linalg.max_normalize(jnp.array([[2.0, -4.0]])).tolist()
    [[0.5, -1.0]]
  """
  return safe_div(g, jnp.max(jnp.abs(g), axis=(-2, -1), keepdims=True))

"""Which leaves to project: ready masks for Flax models (see :mod:`galore_jax.plans` for how
a mask, ranks and dimension numbers are resolved leaf by leaf)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


# A key containing one of these marks a leaf that GaLore leaves to the inner
# optimizer at full shape, as the paper does for embeddings, the untied output
# head and the norms; convolutions are not attention or MLP matrices (and would
# need dimension_numbers).
_EXCLUDED = ("embed", "lm_head", "norm", "logit", "conv")
# A module of one of these names that holds the kernel itself is an output head
# (Meta's LLaMA ``output``, BERT's and ViT's ``classifier``; a key ``head`` anywhere is
# one too). Only the owner: BERT's ``output`` module holds a ``dense`` MLP matrix.
_HEADS = ("output", "classifier")


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def linear_kernels(params: Any) -> Any:
  """Mask selecting the attention and MLP kernels of a Flax model.

  A leaf is selected when its path has a key named ``kernel`` (Flax ``Linear``,
  ``LinearGeneral``, ``Einsum`` and Linen ``Dense`` weights), it has at least two
  axes, no key of its path names an embedding, a norm, the output head or a
  convolution (contains ``embed``, ``lm_head``, ``norm``, ``logit`` or ``conv``, or
  equals ``head``), and the module that holds the kernel is not a head named
  ``output`` or ``classifier``.  Embeddings, heads, norm scales, convolutions and biases are
  left to the inner optimizer at full shape, as in the paper.  Kernels with more
  than two axes also need ``dimension_numbers``.

  Args:
    params: a pytree of parameters (or updates; only paths and shapes are read).

  Returns:
    A pytree of bools with the structure of ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> import galore_jax as gj
    >>> params = {"embed": {"embedding": jnp.zeros((10, 4))},
    ...           "mlp": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)},
    ...           "lm_head": {"kernel": jnp.zeros((4, 10))}}
    >>> gj.linear_kernels(params)  # doctest: +NORMALIZE_WHITESPACE
    {'embed': {'embedding': False}, 'lm_head': {'kernel': False},
     'mlp': {'bias': False, 'kernel': True}}
  """

  def select(path, leaf) -> bool:
    names = [_key_name(k).lower() for k in path]
    if "kernel" not in names or len(np.shape(leaf)) < 2:
      return False
    owner = names[:names.index("kernel")][-1:]
    if owner and owner[0] in _HEADS:
      return False
    return not any(name == "head" or any(word in name for word in _EXCLUDED) for name in names)

  return jax.tree_util.tree_map_with_path(select, params)

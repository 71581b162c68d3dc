"""Flax NNX ``Variable`` metadata on optimizer state.

``nnx.Optimizer`` builds its state from the params' variables and copies each param's
metadata (its partition spec among it) onto the state made from it.  A low-rank state leaf
has another shape than its param, so it must carry the low-rank spec instead; this module
gives it that.  The core library never imports Flax: variables are recognised by duck
typing."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

# Flax variable metadata entries that hold a partition spec.
_SPEC_METADATA = ("out_sharding", "sharding", "sharding_names", "optimizer_sharding")


def is_variable(x: Any) -> bool:
  """Whether ``x`` is a Flax NNX ``Variable`` (duck-typed: the core library does not
  import Flax).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import flax_metadata
    >>> flax_metadata.is_variable(jnp.zeros(2))
    False
  """
  return hasattr(x, "get_metadata") and hasattr(type(x), "from_metadata")


def variable_leaf(x: Any) -> bool:
  """Whether ``x`` is a Flax ``Variable`` holding an array: a leaf of the params, kept whole
  (``is_leaf`` of a flatten that keeps variables).  Under ``nnx.Optimizer``, ``optax.masked``
  and ``multi_transform`` hand an inner transform a variable around ``optax.MaskedNode()``
  for each leaf it does not own: it holds none, so it is no leaf, as a bare ``MaskedNode``
  is not.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> from galore_jax import flax_metadata
    >>> flax_metadata.variable_leaf(nnx.Param(jnp.zeros(2)))
    True
    >>> flax_metadata.variable_leaf(nnx.Param(optax.MaskedNode()))
    False
  """
  return is_variable(x) and bool(jax.tree.leaves(x))


def variable_with_spec(variable: Any, value: Any, spec_fn) -> Any:
  """A copy of a Flax ``Variable`` holding ``value``, each spec in its metadata
  (``out_sharding``, ``optimizer_sharding``, ...) replaced by ``spec_fn(spec)``.
  ``nnx.Optimizer`` copies a param's metadata onto the optimizer state built from
  it; for a low-rank leaf the metadata must describe the low-rank shape.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from galore_jax import flax_metadata
    >>> with jax.set_mesh(jax.make_mesh((1,), ("fsdp",))):
    ...   w = nnx.Param(jnp.zeros((8, 4)), out_sharding=("fsdp", None))
    >>> low = flax_metadata.variable_with_spec(w, jnp.zeros((8, 2)), lambda s: (s[0], None))
    >>> low.get_metadata()["out_sharding"], low.get_value().shape
    (('fsdp', None), (8, 2))
  """
  meta = dict(variable.get_metadata())
  for k in _SPEC_METADATA:
    if meta.get(k) is not None and not isinstance(meta[k], (NamedSharding, str)):
      meta[k] = tuple(spec_fn(tuple(meta[k])))
    elif isinstance(meta.get(k), NamedSharding):
      meta[k] = NamedSharding(meta[k].mesh, PartitionSpec(*spec_fn(tuple(meta[k].spec))))
  return type(variable).from_metadata(value, meta)


def actual_spec_or(actual: NamedSharding | None, rule):
  """A metadata spec function for a state leaf: the spec the leaf has (``actual``, its
  ``NamedSharding``, in mesh axes) when it has one, else ``rule(param spec)``.  Why: the
  param's spec may hold logical names, and a rule that needs mesh axes and their sizes (a
  low-rank leaf that took over a mesh axis, an absmax's blocks) cannot read them.

  Example:
    >>> import jax
    >>> from galore_jax import flax_metadata
    >>> fn = flax_metadata.actual_spec_or(None, lambda spec: (spec[0], None))
    >>> fn(("embed", "heads"))
    ('embed', None)
  """
  if actual is None:
    return rule
  return lambda spec: tuple(actual.spec)


def param_items(params: Any, num_leaves: int) -> list:
  """The params' leaves with Flax ``Variable`` s kept whole (their metadata holds the
  partition spec), or ``None`` s when the params hold no variables.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import flax_metadata
    >>> flax_metadata.param_items({"w": jnp.zeros(2)}, 1)
    [None]
  """
  items = jax.tree.leaves(params, is_leaf=variable_leaf)
  if len(items) != num_leaves or not any(is_variable(x) for x in items):
    return [None] * num_leaves
  return items


def in_variable(item: Any, value: Any, spec_fn) -> Any:
  """``value`` in a copy of the param variable ``item`` whose spec metadata is
  ``spec_fn(param spec)``, so that ``nnx.Optimizer`` (and the Flax recipe of sharding
  state by its metadata) gives it its own sharding; ``value`` itself otherwise.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import flax_metadata
    >>> flax_metadata.in_variable(None, jnp.zeros(2), lambda s: s).shape   # no variable
    (2,)
  """
  if value is None or not is_variable(item):
    return value
  return variable_with_spec(item, value, spec_fn)


def with_leaf_specs(tree: Any, spec_fns: list) -> Any:
  """``tree`` (leaves or Flax variables) with each variable whose ``spec_fns`` entry is
  not ``None`` given the spec ``spec_fn(param spec)`` in its metadata, instead of the
  param's: ``nnx.Optimizer`` copies it onto the optimizer state, whose shape differs.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import flax_metadata
    >>> flax_metadata.with_leaf_specs({"w": jnp.zeros(2)}, [None])["w"].shape
    (2,)
  """
  items, treedef = jax.tree.flatten(tree, is_leaf=variable_leaf)
  if not any(is_variable(x) for x in items):
    return tree
  out = [
      variable_with_spec(item, jax.tree.leaves(item)[0], fn)
      if fn is not None and is_variable(item) else item
      for item, fn in zip(items, spec_fns)
  ]
  return jax.tree.unflatten(treedef, out)


def on_values(update_fn):
  """``update_fn`` (an optax ``update``) made to take Flax variables as ``optax``'s own
  transforms do (``tx.update(grads, state, params)`` on ``nnx.state(model, nnx.Param)``,
  the functional pattern; ``nnx.Optimizer`` hands it arrays): the variables' values go in,
  and the new updates and state come back in the variables of the gradients and of the
  state that came in (``init`` on such params puts each state leaf in a variable).  Without
  variables it is ``update_fn`` itself.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from galore_jax import flax_metadata
    >>> double = flax_metadata.on_values(lambda u, s, p=None: ({"w": 2 * u["w"]}, s))
    >>> updates, _ = double({"w": nnx.Param(jnp.ones(2))}, None)
    >>> type(updates["w"]).__name__, updates["w"][...].tolist()
    ('Param', [2.0, 2.0])
  """
  def update(updates, state, params=None, **extra_args):
    trees = (updates, state, params)
    if not any(variable_leaf(x) for x in jax.tree.leaves(trees, is_leaf=variable_leaf)):
      return update_fn(updates, state, params, **extra_args)
    new_updates, new_state = update_fn(*map(_values, trees), **extra_args)
    return _rewrapped(updates, new_updates), _rewrapped(state, new_state)

  return update


def _values(tree: Any) -> Any:
  return jax.tree.map(lambda x: x.get_value() if variable_leaf(x) else x, tree,
                      is_leaf=variable_leaf)


def _rewrapped(like: Any, tree: Any) -> Any:
  """``tree`` with each value where ``like`` holds a variable in a copy of that variable."""
  return jax.tree.map(
      lambda old, new: type(old).from_metadata(new, old.get_metadata())
      if variable_leaf(old) else new, like, tree, is_leaf=variable_leaf)

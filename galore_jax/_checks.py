"""Argument checks shared by the transforms: each failure is one ``ValueError`` line that
names the argument and what was expected."""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


INT32_MAX = 2**31 - 1


def is_int(value: Any) -> bool:
  """Whether ``value`` is a Python or NumPy integer and not a bool (``True`` would pass as
  1: an axis, a size or a count).

  Example:
    >>> import numpy as np
    >>> from galore_jax import _checks
    >>> _checks.is_int(3), _checks.is_int(np.int32(3)), _checks.is_int(True), _checks.is_int(3.0)
    (True, True, False, False)
  """
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_bool(value: Any) -> bool:
  """Whether ``value`` is a Python or NumPy bool, or a 0-d bool array: a mask's leaf
  (``optax.masked`` reads anything else by truthiness: ``"no"`` would select).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _checks
    >>> _checks.is_bool(True), _checks.is_bool(jnp.bool_(False)), _checks.is_bool("no")
    (True, True, False)
  """
  return isinstance(value, (bool, np.bool_)) or (
      is_array(value) and value.shape == () and value.dtype == bool)


def int_at_least(value: Any, low: int, name: str, suffix: str = "") -> int:
  """``value`` as an int, or a ``ValueError`` unless it is an int ``>= low`` (bools are
  not ints here) and at most :data:`INT32_MAX` (these counts meet int32 step counters:
  a gap of ``2**32 + 3`` wrapped to 3).  ``suffix`` is appended to the message (a hint).

  Example:
    >>> from galore_jax import _checks
    >>> _checks.int_at_least(3, 1, "rank")
    3
    >>> _checks.int_at_least(0, 1, "rank")
    Traceback (most recent call last):
    ...
    ValueError: rank must be an int >= 1, got 0.
  """
  if not is_int(value) or value < low:
    raise ValueError(f"{name} must be an int >= {low}, got {value!r}.{suffix}")
  if value > INT32_MAX:
    raise ValueError(f"{name} must be an int <= {INT32_MAX} (int32), got {value!r}.{suffix}")
  return int(value)


# Static arguments of a transform under optax.inject_hyperparams: say so in the error.
# Every int that shapes a state, named at once: a user met them one run at a time.
STATIC_HINT = (" (Under optax.inject_hyperparams, pass it, and whichever of rank,"
               " update_proj_gap, block_size, min_8bit_size and batch_dims the transform"
               " takes, in static_args.)")


def rank(value: Any, where: str = "") -> int:
  """A rank: an int >= 1 (``where`` names the leaf in the message).

  Example:
    >>> from galore_jax import _checks
    >>> _checks.rank(8, " for ['w']")
    8
  """
  return int_at_least(value, 1, f"rank{where}", STATIC_HINT)


def block_size(value: Any, hint: str = "") -> int:
  """An 8-bit block size: an int >= 1 and a power of two (so that it can be read back from
  a quantized tensor's shapes); ``hint`` ends the message of a value that is no int.

  Example:
    >>> from galore_jax import _checks
    >>> _checks.block_size(256)
    256
  """
  value = int_at_least(value, 1, "block_size", hint)
  if value & (value - 1):
    raise ValueError(f"block_size must be a power of two, got {value}.")
  return value


def is_single(value: Any) -> bool:
  """Whether a per-leaf argument (rank, ...) is one value for every leaf rather than a
  pytree or a callable, so that it can be checked when the transform is built.

  Example:
    >>> from galore_jax import _checks
    >>> _checks.is_single(8), _checks.is_single({"w": 8}), _checks.is_single(len)
    (True, False, False)
  """
  return not callable(value) and jax.tree.structure(value) == jax.tree.structure(0)


def is_array(value: Any) -> bool:
  """Whether a hyperparameter is an array: ``optax.inject_hyperparams`` makes them 0-d arrays,
  traced under ``jit``, so that their values cannot be checked here (they are the caller's).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _checks
    >>> _checks.is_array(jnp.float32(0.9)), _checks.is_array(0.9)
    (True, False)
  """
  return isinstance(value, (jax.Array, np.ndarray))


def finite_real(value: Any) -> bool:
  """Whether ``value`` is a finite real number: a Python or NumPy int or float, not a bool.

  Example:
    >>> from galore_jax import _checks
    >>> _checks.finite_real(3), _checks.finite_real(float("nan")), _checks.finite_real("1")
    (True, False, False)
  """
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


def got(value: Any) -> str:
  """``value`` as an error message shows it: its repr, and its type unless it is a number
  (``'0.25' (str)``: a string of a number reads as that number otherwise).

  Example:
    >>> from galore_jax import _checks
    >>> _checks.got(0.25), _checks.got("0.25")
    ('0.25', "'0.25' (str)")
  """
  if isinstance(value, numbers.Real) and not isinstance(value, bool):
    return repr(value)
  return f"{value!r:.100} ({type(value).__name__})"


def positive(value: Any, name: str) -> Any:
  """``value``, or a one-line ``ValueError`` unless it is a finite number > 0 (an array, as
  under ``optax.inject_hyperparams``, is the caller's).

  Example:
    >>> from galore_jax import _checks
    >>> _checks.positive(-1.0, "scale")
    Traceback (most recent call last):
    ...
    ValueError: scale must be a finite number > 0, got -1.0.
  """
  if not is_array(value) and not (finite_real(value) and value > 0):
    raise ValueError(f"{name} must be a finite number > 0, got {got(value)}.")
  return value


def nonnegative(value: Any, name: str) -> Any:
  """``value``, or a one-line ``ValueError`` unless it is a finite number >= 0 (an ``eps``,
  ``eps_root`` or weight decay: a negative eps can cancel the root it is added to and blow
  the step up, a nan poisons every step).  An array (``optax.inject_hyperparams``) is the
  caller's.

  Example:
    >>> from galore_jax import _checks
    >>> _checks.nonnegative(0, "eps_root")
    0
    >>> _checks.nonnegative(float("nan"), "eps")
    Traceback (most recent call last):
    ...
    ValueError: eps must be a finite number >= 0, got nan.
  """
  if not is_array(value) and not (finite_real(value) and value >= 0):
    raise ValueError(f"{name} must be a finite number >= 0, got {got(value)}.")
  return value


def unit_interval(value: Any, name: str) -> Any:
  """``value`` unchanged, or a ``ValueError`` when it is a real number outside
  ``[0, 1)`` (a beta, LDAdam's rho) or no number.  Arrays (``optax.inject_hyperparams``)
  pass: they are the caller's to check.

  Example:
    >>> from galore_jax import _checks
    >>> _checks.unit_interval(0.9, "b1")
    0.9
    >>> _checks.unit_interval(1.0, "b2")
    Traceback (most recent call last):
    ...
    ValueError: b2=1.0 is not in [0, 1).
  """
  if is_array(value):
    return value
  if not isinstance(value, numbers.Real) or isinstance(value, bool):
    raise ValueError(f"{name} must be a number in [0, 1), got {got(value)}.")
  if not 0.0 <= float(value) < 1.0:
    raise ValueError(f"{name}={value!r} is not in [0, 1).")
  return value


def float_dtype(value: Any, name: str) -> Any:
  """``value`` as a real floating dtype (a state's storage: bases, moments), or ``None``
  for the default; a ``ValueError`` for anything else (an integer dtype would truncate an
  orthonormal basis to zeros).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _checks
    >>> _checks.float_dtype(jnp.bfloat16, "basis_dtype"), _checks.float_dtype(None, "x")
    (dtype(bfloat16), None)
    >>> _checks.float_dtype("int32", "basis_dtype")
    Traceback (most recent call last):
    ...
    ValueError: basis_dtype must be a real floating dtype or None, got 'int32'.
  """
  if value is None:
    return None
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} must be a real floating dtype or None, got {value!r}.")
  return dtype


def learning_rate(value: Any) -> Any:
  """``value`` (a float or a schedule) checked not to be ``None``: an alias hands it to
  ``optax.scale_by_learning_rate``, which takes ``None`` as "no scaling" and then skips the
  sign flip too, so the alias would step up the gradient at a learning rate of 1.

  Example:
    >>> from galore_jax import _checks
    >>> _checks.learning_rate(1e-3)
    0.001
    >>> _checks.learning_rate(None)
    Traceback (most recent call last):
    ...
    ValueError: learning_rate is None: pass a float or a schedule.
  """
  if value is None:
    raise ValueError("learning_rate is None: pass a float or a schedule.")
  if callable(value) or is_array(value):  # a schedule, or an array (inject_hyperparams)
    return value
  if not (finite_real(value) and value >= 0):
    raise ValueError(
        f"learning_rate must be a finite number >= 0 or a schedule, got {got(value)}.")
  return value


def flag(value: Any, name: str) -> bool:
  """``value`` checked to be a bool (a string such as ``"no"`` would read as True).

  Example:
    >>> from galore_jax import _checks
    >>> _checks.flag(False, "warm_start")
    False
    >>> _checks.flag("no", "warm_start")
    Traceback (most recent call last):
    ...
    ValueError: warm_start must be True or False, got 'no' (str).
  """
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be True or False, got {got(value)}.")
  return bool(value)


def real_leaves(tree: Any, name: str, why: str) -> None:
  """A one-line ``ValueError`` naming ``name`` and the first complex leaf of ``tree``, for a
  transform whose state is real (``why`` says so): cast to it, a complex gradient would lose
  its imaginary part without a word.  Structures and dtypes only (fine under ``jit``).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _checks
    >>> _checks.real_leaves({"w": jnp.ones(2, jnp.complex64)}, "adam", "its moments are real.")
    Traceback (most recent call last):
    ...
    ValueError: adam: ['w'] is complex64: its moments are real.
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    real_array(leaf, f"{name}: {jax.tree_util.keystr(path)}", why)


def real_array(x: Any, where: str, why: str) -> None:
  """A one-line ``ValueError`` ``"{where} is complex64: {why}"`` for a complex ``x`` (an
  array, or a number), which a real computation would cast, dropping its imaginary part
  without a word.  Its dtype only (fine under ``jit``).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _checks
    >>> _checks.real_array(jnp.ones(2, jnp.complex64), "norm_ratio: num", "expected real.")
    Traceback (most recent call last):
    ...
    ValueError: norm_ratio: num is complex64: expected real.
  """
  dtype = jnp.result_type(x)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    raise ValueError(f"{where} is {dtype}: {why}")


def floating_leaves(updates: Any, name: str) -> None:
  """A one-line ``ValueError`` naming ``name`` and the first leaf of ``updates`` that is not
  floating, for a transform that casts its step back to the update's dtype: an integer one
  truncated it (to zeros, without a word).  Dtypes only (fine under ``jit``).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _checks
    >>> _checks.floating_leaves({"w": jnp.ones(2, jnp.int32)}, "adam")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: adam: ['w'] is int32: the updates must be floating (the step, cast back ...
  """
  for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
    dtype = jnp.result_type(u)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise ValueError(f"{name}: {jax.tree_util.keystr(path)} is {dtype}: the updates must be"
                       f" floating (the step, cast back to {dtype}, would truncate).")


def initialized(state: Any, name: str) -> None:
  """A one-line ``ValueError`` for an ``update`` called with no state (before ``init``).

  Example:
    >>> from galore_jax import _checks
    >>> _checks.initialized(None, "galore_projection")
    Traceback (most recent call last):
    ...
    ValueError: galore_projection: the state is None: call init(params) first and pass its result.
  """
  if state is None:
    raise ValueError(f"{name}: the state is None: call init(params) first and pass its result.")


def betas(value: Any, name: str) -> tuple[Any, Any]:
  """A pair ``(b1, b2)`` of betas in ``[0, 1)``.

  Example:
    >>> from galore_jax import _checks
    >>> _checks.betas((0.9, 0.999), "transport_betas")
    (0.9, 0.999)
  """
  try:
    b1, b2 = value
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a pair (b1, b2), got {value!r}.") from None
  return unit_interval(b1, f"{name}: b1"), unit_interval(b2, f"{name}: b2")


def number_leaves_as_arrays(tree: Any) -> Any:
  """``tree`` with its Python number leaves (a float beside the arrays:
  ``{"w": w, "s": 1.0}``) as 0-d arrays, as optax's own transforms take them; a tree
  without any is returned as it is.

  Example:
    >>> from galore_jax import _checks
    >>> _checks.number_leaves_as_arrays({"s": 1.0})["s"].dtype
    dtype('float32')
  """
  leaves, treedef = jax.tree.flatten(tree)
  if not any(isinstance(x, numbers.Number) for x in leaves):
    return tree
  return treedef.unflatten(
      [jnp.asarray(x) if isinstance(x, numbers.Number) else x for x in leaves])


def prng_key(key: jax.Array | int) -> jax.Array:
  """An int seed or a PRNG key (typed, or legacy ``uint32[2]``) -> a typed PRNG key.

  Example:
    >>> import jax
    >>> from galore_jax import _checks
    >>> bool(_checks.prng_key(3) == jax.random.key(3))
    True
  """
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  if is_int(key):
    if not -2**63 <= key < 2**64:  # jax.random.key's range (an OverflowError beyond)
      raise ValueError(f"key: an int seed must fit in 64 bits, got {key!r}.")
    return jax.random.key(int(key))
  if isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,):
    return jax.random.wrap_key_data(key)  # legacy jax.random.PRNGKey
  # optax.inject_hyperparams turns an int seed into an int array: name the cure.
  hint = STATIC_HINT if isinstance(key, jax.Array) and key.ndim == 0 else ""
  raise ValueError(f"key must be an int seed or a jax.random.key, got {key!r}.{hint}")


def batch_dims(spec: Any, tree: Any, is_leaf=None, name: str = "batch_dims") -> list[int]:
  """Per leaf of ``tree`` (``jax.tree.leaves`` order, ``is_leaf`` as there), how many of its
  leading axes are batch axes: ``spec`` is an int for every leaf, a tree of ints with
  ``tree``'s structure (its leaves where ``tree`` has them), or a function of ``tree``
  giving one.  Each count must lie in ``[0, ndim]`` of its leaf.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _checks
    >>> tree = {"layers": jnp.zeros((4, 8)), "head": jnp.zeros((8, 2))}
    >>> _checks.batch_dims(lambda t: {"layers": 1, "head": 0}, tree)   # leaves: head, layers
    [0, 1]
  """
  leaves, treedef = jax.tree.flatten(tree, is_leaf=is_leaf)
  if callable(spec):
    spec = spec(tree)
  if is_int(spec):
    counts = [int(spec)] * len(leaves)
  else:
    try:
      counts = treedef.flatten_up_to(spec)
    except (ValueError, TypeError) as e:
      hint = STATIC_HINT if isinstance(spec, jax.Array) else f" ({e})"
      raise ValueError(f"{name} must be an int, a tree of ints with the params' structure or"
                       f" a function giving one; got {spec!r:.200}.{hint}") from None
  if is_leaf:  # a function that mapped over Flax variables may give variables of ints
    counts = [jax.tree.leaves(c)[0] if is_leaf(c) else c for c in counts]
  return [batch_count(count, len(jnp.shape(
      jax.tree.leaves(leaf)[0] if is_leaf and is_leaf(leaf) else leaf)), name)
          for count, leaf in zip(counts, leaves)]


def batch_count(count: Any, ndim: int, name: str = "batch_dims") -> int:
  """``count``, the leading batch axes of a tensor of ``ndim`` axes: an int in ``[0, ndim]``
  (a ``ValueError`` naming ``name`` otherwise).

  Example:
    >>> from galore_jax import _checks
    >>> _checks.batch_count(1, 3)
    1
  """
  if not is_int(count) or not 0 <= count <= ndim:
    raise ValueError(f"{name}: expected an int in [0, {ndim}] (the tensor's axes), got"
                     f" {count!r}.")
  return int(count)


def state_fits(init: Any, state: Any, like: Any, name: str, structure: bool = True) -> None:
  """A one-line ``ValueError`` where ``state``'s arrays are not shaped as ``init(like)``
  would shape them (computed abstractly, ``jax.eval_shape``: nothing is allocated): a state
  made for other params fails here, naming the first leaf, not in a broadcast deep inside
  the step.  So does a state holding a subtree where ``init`` makes an array, or the reverse
  (8-bit moments, ``Quantized`` tuples, for float32 ones), and, with ``structure``, one
  whose trees hold a key path more or less than the updates' would (``False``: left to the
  step, for a wrapper whose inner transform's own checks know its configuration).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from galore_jax import _checks
    >>> adam = optax.scale_by_adam()
    >>> state = adam.init({"w": jnp.zeros((8, 2))})
    >>> _checks.state_fits(adam.init, state, {"w": jnp.zeros((6, 2))}, "galore_projection")
    Traceback (most recent call last):
    ...
    ValueError: galore_projection: the state does not fit the updates at .mu['w'] (state (8, 2), the updates need (6, 2)): was it made for other params?
  """
  abstract = jax.eval_shape(init, like)
  want, want_def = jax.tree.flatten(abstract)
  got, got_def = jax.tree_util.tree_flatten_with_path(state)
  if got_def != want_def:
    _same_representation(abstract, state, name)
    if not structure:
      return
    difference = tree_difference(abstract, state, ("init(updates)", "the state"))
    raise ValueError(f"{name}: the state does not fit the updates: {difference}: was it made"
                     " for other params?")
  for (path, leaf), w in zip(got, want):
    if tuple(jnp.shape(leaf)) != tuple(w.shape):
      raise ValueError(
          f"{name}: the state does not fit the updates at {jax.tree_util.keystr(path)} (state"
          f" {tuple(jnp.shape(leaf))}, the updates need {tuple(w.shape)}): was it made for"
          " other params?")


def tree_difference(tree: Any, other: Any, names: tuple[str, str], is_leaf=None) -> str:
  """Where ``other``'s tree structure departs from ``tree``'s, in words for a one-line
  error (``""`` where they have one structure): the first key path that one has and the
  other lacks, or where one holds a leaf and the other a subtree.  ``names`` name the two
  trees in the words; ``is_leaf`` as in ``jax.tree.structure``.

  Example:
    >>> from galore_jax import _checks
    >>> names = ("the params", "param_shardings")
    >>> _checks.tree_difference({"w": 0, "b": 0}, {"w": None}, names, lambda x: x is None)
    "['b'] is in the params, not in param_shardings"
    >>> _checks.tree_difference({"w": 0}, {"w": {"k": 0}}, names)
    "at ['w'] a leaf in the params, a subtree in param_shardings"
  """
  if jax.tree.structure(tree, is_leaf=is_leaf) == jax.tree.structure(other, is_leaf=is_leaf):
    return ""
  at = lambda p: jax.tree_util.keystr(p) or "the root"
  mine, theirs = _key_paths(tree, is_leaf), _key_paths(other, is_leaf)
  for (a, pa), (b, pb) in [((names[0], mine), (names[1], theirs)),
                           ((names[1], theirs), (names[0], mine))]:
    known = set(pb)
    for p in pa:
      if p in known:
        continue
      leaf = _leaf_above(p, pb)
      if leaf is not None:
        return f"at {at(leaf)} a leaf in {b}, a subtree in {a}"
      if any(q[:len(p)] == p for q in pb):
        return f"at {at(p)} a leaf in {a}, a subtree in {b}"
      return f"{at(p)} is in {a}, not in {b}"
  return (f"{names[0]} and {names[1]} hold the same key paths in other containers"
          f" ({jax.tree.structure(tree, is_leaf=is_leaf)!s:.60} and"
          f" {jax.tree.structure(other, is_leaf=is_leaf)!s:.60})")


def _key_paths(tree: Any, is_leaf=None) -> list[tuple]:
  return [p for p, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]


def _leaf_above(path: tuple, leaf_paths: list[tuple]) -> tuple | None:
  """The first of ``leaf_paths`` (one tree's) that is a proper prefix of ``path`` (the
  other's): there the first tree holds a leaf and the other a subtree; ``None`` if none."""
  return next((q for q in leaf_paths if len(q) < len(path) and path[:len(q)] == q), None)


def check_config(held: Any, want: Any, field: str, name: str,
                 question: str = "was it made by a differently configured transform?") -> None:
  """A one-line ``ValueError`` unless a state's ``field`` (``held``) is what this transform's
  configuration keeps there, ``want``: ``None`` (nothing), ``True`` (something, whose shapes
  other checks read) or a value, perhaps abstract (``jax.eval_shape``), whose tree structure
  ``held`` must have.  A state made by a differently configured transform (``galore_adamw``'s
  for ``fira_adamw``, a staggered policy's for a lazy one, LDAdam's without error feedback
  for one with) fails here, naming the field, not with a ``NoneType`` or attribute error
  inside the step; ``question`` ends the message (the configuration that would explain
  it).  Structures only: nothing runs on the device.

  Example:
    >>> from galore_jax import _checks
    >>> _checks.check_config(None, True, "error", "scale_by_ldadam")
    Traceback (most recent call last):
    ...
    ValueError: scale_by_ldadam: the state does not match this transform's configuration at .error (the state holds None, this transform keeps a value there): was it made by a differently configured transform?
  """
  if want is True:
    fits = held is not None
  else:
    fits = jax.tree.structure(held) == jax.tree.structure(want)
  if not fits:
    raise ValueError(
        f"{name}: the state does not match this transform's configuration at .{field} (the"
        f" state holds {_kind(held)}, this transform keeps {_kind(want)} there): {question}")


def _kind(value: Any) -> str:
  if value is None:
    return "None"
  if value is True:
    return "a value"
  if isinstance(value, (jax.Array, jax.ShapeDtypeStruct)):
    return "an array"
  kind = type(value).__name__
  return f"{'an' if kind[:1] in 'AEIOU' else 'a'} {kind}"


def _same_representation(want: Any, state: Any, name: str) -> None:
  """:func:`state_fits`'s one line where, at a key path, ``state`` holds a subtree and
  ``want`` an array, or the reverse."""
  mine, theirs = _key_paths(want), _key_paths(state)
  for deeper, leaves in [(theirs, mine), (mine, theirs)]:
    known = set(leaves)
    for p in deeper:
      leaf = None if p in known else _leaf_above(p, leaves)
      if leaf is not None:
        raise ValueError(
            f"{name}: the state holds {_kind(_node(state, leaf))} at"
            f" {jax.tree_util.keystr(leaf)} where this transform keeps"
            f" {_kind(_node(want, leaf))} (8-bit moments for float ones, or the reverse): was"
            " it made by another transform?")


def _node(tree: Any, path: tuple) -> Any:
  """The subtree of ``tree`` at ``path`` (dict, sequence and attribute keys)."""
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      tree = tree[key.key]
    elif isinstance(key, jax.tree_util.SequenceKey):
      tree = tree[key.idx]
    else:
      tree = getattr(tree, key.name)
  return tree


def mask_fits(mask: Any, params: Any, name: str) -> None:
  """A one-line ``ValueError`` naming ``name`` unless ``mask`` (or a callable's result on
  ``params``) is ``None`` or a pytree prefix of ``params`` whose leaves are bools, as
  ``optax.masked`` needs: its own error spans lines and names no argument, and it reads any
  other leaf by truthiness (``"no"`` would select the leaf).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _checks
    >>> _checks.mask_fits({"w": True}, {"w": jnp.ones(2), "b": jnp.ones(2)}, "mask")
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: mask: its structure does not match the params tree (...): ...
  """
  given = mask(params) if callable(mask) else mask
  if given is None:
    return
  try:
    jax.tree.map(lambda *_: None, given, params)
  except (ValueError, TypeError) as e:
    details = " ".join(str(e).split())
    raise ValueError(
        f"{name}: its structure does not match the params tree (it must be a pytree prefix of"
        f" the params, or a callable of them returning one): {details}") from None
  for path, leaf in jax.tree_util.tree_leaves_with_path(given):
    if not is_bool(leaf):
      where = jax.tree_util.keystr(path) or "the root"
      raise ValueError(f"{name} must hold bools; at {where} it holds {got(leaf)}.")


def decayed_weights(weight_decay: Any, mask: Any, name: str = "weight_decay_mask") -> Any:
  """``optax.add_decayed_weights(weight_decay, mask)`` whose ``init`` checks the mask
  (:func:`mask_fits`, naming ``name``); ``weight_decay`` is checked now (:func:`nonnegative`,
  a schedule is optax's).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _checks
    >>> tx = _checks.decayed_weights(0.1, {"w": True, "b": False})
    >>> p = {"w": jnp.ones(2), "b": jnp.ones(2)}
    >>> u, _ = tx.update(p, tx.init(p), p)
    >>> u["w"].tolist(), u["b"].tolist()
    ([1.100000023841858, 1.100000023841858], [1.0, 1.0])
  """
  if not callable(weight_decay):  # (optax takes a schedule too)
    nonnegative(weight_decay, "weight_decay")
  tx = optax.add_decayed_weights(weight_decay, mask)

  def init_fn(params):
    mask_fits(mask, params, name)
    return tx.init(params)

  return optax.GradientTransformation(init_fn, tx.update)

"""Per-layer updates: each decoder layer's optimizer step runs inside the backward pass.

The GaLore paper's trick for fitting LLaMA-7B in 24 GB: the gradient of the whole model
never exists at once.  Here the backward pass is a reverse ``lax.scan`` over the stacked
layers that, for layer ``l``, recomputes the layer from its saved input (as ``--remat``
does), takes the layer's gradient and at once applies the optimizer to that layer's
params and state; only one layer's gradient is alive at a time, and the new params and
state are written into the donated buffers in place (one copy of each in the step).  The
embedding, the final norm and ``lm_head`` are updated around it.

The optimizer state has to be sliceable by layer, so in this mode the optimizer is
:func:`layerwise`: one state per layer, stacked on a leading axis (the per-layer optimizer
sees a layer's ``(in, out)`` kernels), plus one for the other params.  Its ``update`` (a
``lax.map`` over the layers) is the same step taken the ordinary way, with the whole
gradient: the reference the per-layer step is tested against.

Exact, also with ``--grad-clip``: the clip needs the global gradient norm before any
update, so a first backward pass computes it (one more backward pass per step) and the
second scales each layer's gradient as ``clipping.clip_by_global_norm`` (``optax``'s, with
a float32 norm; the ordinary step's clip too) would.  One schedule clock: every layer's state
counts one step per step.  ``--grad-accum`` > 1 is refused (the step would have to keep
every micro-batch's gradients: the memory per-layer updates save).
Random draws (``--basis-method random`` / ``randomized``, ``power``'s first basis, APOLLO's
projection) are the whole-model optimizer's: each layer's update is told which slice of the
stacked layers it sees (``gj.StackSlice``), so it draws the sketch the stacked update draws
for that layer (every layer's state holds the same key).

On a mesh (``--mesh``, Auto or Explicit axes) the same step runs sharded.  The layer axis
is not sharded, so taking a layer is local and its update sees its kernels as the whole
model's step does (a refresh is spread over the devices as there).  The layers' state is
created with the layout galore_jax's rules give the whole model's state (:func:`stacked_init`:
the layer axis whole, the rest as the layer's param, bases and low-rank moments by their
rules), and the backward loop keeps each layer's new values and the stacks it carries in the
donated buffers' layout (:func:`stack_specs`): left alone, the partitioner carried a stack in
another layout and gathered it whole to write it back.  Under Explicit axes the step runs
with Auto axes, as the ordinary step's model does.  The result equals the run on one device
(``tests/llama/test_per_layer_mesh.py``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import galore_jax as gj
from examples.llama import clipping
from examples.llama import model as model_lib
from examples.llama.model import LAYERS


class LayerwiseState(NamedTuple):
  """State of :func:`layerwise`: ``layers`` is the per-layer optimizer's state of each
  layer, stacked on a leading axis; ``rest`` the other params' optimizer state."""

  layers: Any
  rest: Any


class Layerwise(NamedTuple):
  """An optax-style transform (``init``, ``update``) that also names its two parts, which
  the per-layer step applies itself."""

  init: Callable
  update: Callable
  layer: optax.GradientTransformation
  rest: optax.GradientTransformation


def _plain(tree):
  """``tree`` with every mapping (an ``nnx.State``, a dict) as a plain dict: the per-layer
  step and the ordinary update then hand the optimizer trees of one structure."""
  if isinstance(tree, Mapping):
    return {k: _plain(v) for k, v in tree.items()}
  return tree


def _split(tree):
  """(the stacked layers' subtree, the other params), as plain dicts."""
  tree = _plain(tree)
  return tree[LAYERS], {k: v for k, v in tree.items() if k != LAYERS}


def layerwise(tx_layer: optax.GradientTransformation,
              tx_rest: optax.GradientTransformation) -> Layerwise:
  """An optimizer whose state is sliceable by layer: ``tx_layer`` for each stacked decoder
  layer (initialised and updated layer by layer on the ``(in, out)`` slices), ``tx_rest``
  for the other params.  With element-wise or per-matrix optimizers (Adam, GaLore with a
  basis per layer) this is the optimizer applied to the whole model; its ``update`` takes
  the whole gradient (the ordinary step)."""

  def init(params):
    layers, rest = _split(params)
    with warnings.catch_warnings():  # the rest holds no layer kernel: it projects none, meant
      warnings.filterwarnings("ignore", message=r".*: no leaf is projected")
      rest_state = tx_rest.init(rest)
    return LayerwiseState(layers=stacked_init(tx_layer, layers), rest=rest_state)

  def update(grads, state, params=None):
    g_layers, g_rest = _split(grads)
    p_layers, p_rest = _split(params)
    offset = layers_offset(grads)

    def one_layer(xs):  # layer i, told its place in the stack (its random draws)
      g, s, p, i = xs
      return tx_layer.update(g, s, p, galore_stack_slice=gj.StackSlice(i, offset))

    num = jax.tree.leaves(g_layers)[0].shape[0]
    u_layers, s_layers = jax.lax.map(
        one_layer, (g_layers, state.layers, p_layers, jnp.arange(num)))
    u_rest, s_rest = tx_rest.update(g_rest, state.rest, p_rest)
    updates = jax.tree.leaves({**u_rest, LAYERS: u_layers})  # (both sort their keys)
    return jax.tree.unflatten(jax.tree.structure(grads), updates), LayerwiseState(
        s_layers, s_rest)

  return Layerwise(init, update, tx_layer, tx_rest)


def stacked_init(tx_layer: optax.GradientTransformation, layers):
  """``tx_layer``'s state of each layer of the stacked ``layers``, stacked on a leading axis.
  Sharded arrays (a run on a mesh) get a state laid out by galore_jax's rules
  (``gj.sharding.state_shardings``, as the whole model's step lays out its state: the layer
  axis whole, the rest as the layer's param, bases and low-rank moments as their rules say),
  created in place: a ``vmap``'s eager state would follow no param (replicated under Auto
  axes).  The params' nnx metadata is dropped: it describes a stacked param, not a layer's
  state (a layer's low-rank spec read off it would shard the wrong axes).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> state = stacked_init(optax.adam(1e-3), {"w": jnp.zeros((3, 4, 2))})
    >>> state[0].mu["w"].shape
    (3, 4, 2)
  """
  layers = jax.tree.map(lambda x: x, nnx.as_pure(layers))  # (plain arrays, no Variable)
  init = jax.vmap(tx_layer.init)
  leaves = jax.tree.leaves(layers)
  concrete = leaves and not any(isinstance(x, jax.core.Tracer) for x in leaves)
  if not concrete or not any(isinstance(getattr(x, "sharding", None), NamedSharding)
                             and x.sharding.num_devices > 1 for x in leaves):
    return init(layers)
  # (state_shardings traces this init again, on tracers typed by an Explicit twin of the mesh)
  shardings = gj.sharding.state_shardings(optax.GradientTransformation(init, None), layers)
  return jax.jit(init, out_shardings=shardings)(layers)


def layers_offset(tree) -> int:
  """How many leaves of the whole model's ``tree`` come before the stacked layers' (in
  ``jax.tree`` order): where a layer's tree starts in it, as ``gj.StackSlice`` says."""
  flat, _ = jax.tree_util.tree_flatten_with_path(_plain(tree))
  return next(k for k, (path, _) in enumerate(flat) if path[0] == jax.tree_util.DictKey(LAYERS))


def refresh_counts(opt_state, num_layers: int) -> int:
  """``gj.refresh_counts`` as the whole-model step counts it, where a refresh of a stacked
  kernel counts once: a :class:`LayerwiseState` keeps a basis counter per layer, so its
  layers' count is divided by ``num_layers`` (their mean; the layers' counts are equal: a
  lazy policy, whose gaps would differ by layer, is refused with ``--per-layer``).  Any other
  state is counted as it is."""
  if not isinstance(opt_state, LayerwiseState):
    return int(gj.refresh_counts(opt_state))
  layers = int(gj.refresh_counts(opt_state.layers))
  return round(layers / num_layers) + int(gj.refresh_counts(opt_state.rest))


def _pieces(model):
  """The model as pure functions of its parts' params (embedding, one layer, final norm
  + head), and those params as the optimizer's tree names them."""
  parts = {"embed": model.embed, LAYERS: model.layers, "norm": model.norm,
           "lm_head": model.lm_head}
  graphs, params, fixed = {}, {}, {}
  for name, module in parts.items():  # fixed: what is not a param (SLTrain's supports)
    graphs[name], state, fixed[name] = nnx.split(module, nnx.Param, ...)
    params[name], fixed[name] = _plain(nnx.as_pure(state)), _plain(nnx.as_pure(fixed[name]))

  def embed(p, tokens_BxT):
    return model_lib.embedding_lookup(nnx.merge(graphs["embed"], p, fixed["embed"]), tokens_BxT)

  def layer(p, x_BxTxD, f):  # f: the layer's slice of fixed[LAYERS]
    return nnx.merge(graphs[LAYERS], p, f)(x_BxTxD)

  def head(p, x_BxTxD):
    h = nnx.merge(graphs["norm"], p["norm"], fixed["norm"])(x_BxTxD)
    logits = nnx.merge(graphs["lm_head"], p["lm_head"], fixed["lm_head"])(
        h, out_sharding=model_lib.logical_spec("batch", None, "vocab"))
    return model_lib.constrained(logits, "batch", None, "vocab").astype(jnp.float32)

  return (embed, layer, head), params, fixed[LAYERS]


def mean_loss(logits_BxTxV, targets_BxT, pad_id):
  """Mean next-token cross-entropy over non-pad targets (as ``train.step_fn``'s)."""
  total, count = model_lib.cross_entropy_terms(logits_BxTxV, targets_BxT, pad_id)
  return total / jnp.maximum(count, 1)


def _take(stacks, i):
  """Layer ``i`` of stacked trees."""
  return jax.tree.map(lambda s: jax.lax.dynamic_index_in_dim(s, i, keepdims=False), stacks)


def _put(stacks, new, i):
  """``stacks`` with layer ``i`` replaced by ``new`` (in place where ``stacks`` is a loop's
  carry or a donated buffer)."""
  return jax.tree.map(lambda s, n: jax.lax.dynamic_update_index_in_dim(s, n, i, 0), stacks, new)


def _backward(fns, params, fixed, tokens_BxT, pad_id, on_layer, carry, extras, *, write,
              unroll=1, stack_specs=None):
  """The forward pass, then a backward pass that hands each layer's gradient to
  ``on_layer(carry, grad, layer params, layer extras, layer index) -> (carry, new)`` as soon
  as it exists (last layer first; ``extras`` are stacked with the layers, as ``fixed``, the
  layers' variables that are not params).  Returns the loss, the gradients of the other
  params, the final carry and the ``(layer params, extras)`` stacks: with ``write``, each layer's
  ``new`` (params, extras) written into them; without (``new`` is ``None``), as they were.

  The writes update the donated buffers in place, so the step holds one copy of the layers'
  params and state (stacked outputs of the loop were whole new copies: at 7b, 12 GiB of bf16
  weights).  The stacks ride in the loop's carry, and each layer's new values are written
  one iteration later, before the next layer is read: written in the same iteration, XLA
  fuses an update's elementwise math into several writes (Adam's new moment into both the
  moment's and the weight's), so one write reads a stack that another overwrites, and XLA
  copies that whole stack in every iteration.  ``unroll`` is the model's (``--unroll``) for
  the forward loop; the backward loop stays a loop, one layer's gradient at a time being
  the point."""
  embed, layer, head = fns
  head_p = {"norm": params["norm"], "lm_head": params["lm_head"]}
  x0 = embed(params["embed"], tokens_BxT[:, :-1])
  xL, inputs = jax.lax.scan(lambda x, pf: (layer(pf[0], x, pf[1]), x), x0,
                            (params[LAYERS], fixed), unroll=unroll)
  loss, head_vjp = jax.vjp(
      lambda p, x: mean_loss(head(p, x), tokens_BxT[:, 1:], pad_id), head_p, xL)
  g_head, dx = head_vjp(jnp.ones_like(loss))
  stacks = (params[LAYERS], extras)
  last = jax.tree.leaves(params[LAYERS])[0].shape[0] - 1

  def back(c, xs):
    dx, carry, held = c
    i, x, f = xs
    if write:  # held: the stacks, the previous layer's new values and its index
      written, new, j = held
      written = _pin(_put(written, new, j), stack_specs, False)
    p, extra = _take(written if write else stacks, i)
    _, layer_vjp = jax.vjp(lambda p, x: layer(p, x, f), p, x)  # recomputes the layer
    g, dx = layer_vjp(dx)
    carry, new = on_layer(carry, g, p, extra, i)
    return (dx, carry, (written, new, i) if write else None), None

  held = (stacks, _take(stacks, last), last) if write else None  # first: rewrite the last
  (dx, carry, held), _ = jax.lax.scan(
      back, (dx, carry, held), (jnp.arange(last + 1), inputs, fixed), reverse=True)
  (g_embed,) = jax.vjp(lambda p: embed(p, tokens_BxT[:, :-1]), params["embed"])[1](dx)
  return loss, {"embed": g_embed, **g_head}, carry, (_pin(_put(*held), stack_specs, False)
                                                     if write else stacks)


def step_fn(model, optimizer, tokens_AxBxT, pad_id: int, max_norm: float | None = None,
            galore_refresh: bool | None = None, stack_specs=None):
  """One optimizer step with per-layer updates (the module docstring); returns the loss and
  the gradient's global norm (before clipping), as ``train.step_fn``.  ``optimizer.tx``
  is a :func:`layerwise`; ``max_norm`` is ``--grad-clip`` (``None``: no clipping);
  ``galore_refresh`` a host decision handed to both parts' updates (here a ``lax.cond``
  would sit in the backward loop: a GPU would sync with its host once per layer).

  On a mesh with Auto axes: ``stack_specs`` (:func:`stack_specs`) pins each layer's new
  params and state to their stacks' layout.  Under Explicit axes the layouts are in the types
  (the model's pieces name their splits as ``model.Llama`` does): none are given."""
  fns, params, fixed = _pieces(model)
  state = nnx.as_pure(optimizer.opt_state)
  tx = optimizer.tx
  extra = {} if galore_refresh is None else {"galore_refresh": galore_refresh}
  tokens_BxT = tokens_AxBxT[0]
  norm = None
  if max_norm is not None:  # the norm pass: each layer's gradient summed as squares, dropped
    _, g_rest, sq, _ = _backward(fns, params, fixed, tokens_BxT, pad_id,
                                 lambda c, g, p, e, i: (c + clipping.sum_of_squares(g), None),
                                 0.0, None, write=False, unroll=model.unroll)
    norm = jnp.sqrt(sq + clipping.sum_of_squares(g_rest))

  offset = layers_offset(params)

  def update_layer(sq, g, p, s, i):
    u, s = tx.layer.update(clipping.clip(g, norm, max_norm), s, p, **extra,
                           galore_stack_slice=gj.StackSlice(i, offset))
    new = _pin((optax.apply_updates(p, u), s), stack_specs, True)
    return sq + clipping.sum_of_squares(g), new

  loss, g_rest, sq, (new_layers, new_layer_state) = _backward(
      fns, params, fixed, tokens_BxT, pad_id, update_layer, 0.0, state.layers, write=True,
      unroll=model.unroll, stack_specs=stack_specs)
  if norm is None:
    norm = jnp.sqrt(sq + clipping.sum_of_squares(g_rest))
  rest = {k: v for k, v in params.items() if k != LAYERS}
  u_rest, new_rest_state = tx.rest.update(clipping.clip(g_rest, norm, max_norm), state.rest, rest,
                                          **extra)
  new_params = {**optax.apply_updates(rest, u_rest), LAYERS: new_layers}
  for name, value in new_params.items():
    nnx.update(getattr(model, name), value)
  nnx.update(optimizer.opt_state, nnx.state(LayerwiseState(new_layer_state, new_rest_state)))
  optimizer.step[...] += 1
  return loss, norm


def stack_specs(model, optimizer):
  """The partition specs of ``model``'s stacked layers' params and of ``optimizer``'s
  :class:`LayerwiseState` layers (as :func:`step_fn` takes them), read off the arrays'
  shardings (or of ``jax.ShapeDtypeStruct`` values, a plan's): ``None`` for a model on one
  device.

  Example:
    >>> import optax
    >>> from examples.llama import model as model_lib
    >>> model = model_lib.Llama(model_lib.CONFIGS["tiny"], rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, layerwise(optax.adam(1e-3), optax.adam(1e-3)),
    ...                           wrt=nnx.Param)
    >>> stack_specs(model, optimizer) is None
    True
  """
  _, params, _ = _pieces(model)
  stacks = (params[LAYERS], nnx.as_pure(optimizer.opt_state).layers)
  shardings = [getattr(x, "sharding", None) for x in jax.tree.leaves(stacks)]
  if not any(isinstance(s, NamedSharding) and s.num_devices > 1 for s in shardings):
    return None
  return jax.tree.map(lambda x: x.sharding.spec if isinstance(x.sharding, NamedSharding)
                      else P(), stacks)


def _pin(tree, stack_specs, one_layer: bool):
  """``tree`` (the stacks, or with ``one_layer`` one layer of them) laid out as
  ``stack_specs`` say (a layer without the leading layer axis); as it is without specs.
  Left to the partitioner (Auto axes), the backward loop's carry took layouts of its own: at
  1b on ``fsdp=8``, o_proj's stack of bases (replicated there: they span the heads side) rode
  sharded over fsdp and was gathered whole, 96 MiB of float32 per device, to be written back."""
  if stack_specs is None:
    return tree
  return jax.tree.map(lambda x, s: jax.lax.with_sharding_constraint(
      x, P(*s[1:]) if one_layer else s), tree, stack_specs)


@functools.lru_cache(maxsize=None)
def train_step(max_norm: float | None):
  """:func:`step_fn` jitted for ``--grad-clip`` ``max_norm``, with the model's and the
  optimizer's buffers donated (as ``train.train_step``); one compilation per clip value."""
  return nnx.jit(functools.partial(step_fn, max_norm=max_norm),
                 static_argnames=("pad_id", "galore_refresh"), donate_argnums=(0, 1))

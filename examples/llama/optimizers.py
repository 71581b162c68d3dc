"""The optimizers the LLaMA example trains with, at the papers' settings.

``make_optimizer(args, name, steps)`` is the Optax transform of ``name`` (one of
``OPTIMIZERS``) for the parsed flags, with its learning-rate schedule: linear warmup,
then cosine decay to ``--min-lr-ratio`` of the peak (``DEFAULT_LR`` unless ``--lr``), at
``--rank`` or ``default_rank`` of the model (under a low-rank ``--method``, ``--proj-rank``
or ``default_rank`` of its factors, which the projecting optimizers then project).  With
``--method relora`` the schedule is ReLoRA's jagged one (``galore_jax.nn.relora_schedule``);
``--method sltrain`` defaults to SLTrain's learning rate (``METHOD_LR``).
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import optax

import galore_jax as gj
from galore_jax import nn as gnn
from examples.llama import clipping
from examples.llama import model as model_lib
from examples.llama import per_layer

OPTIMIZERS = ("adamw", "adamw_8bit", "galore_adamw", "galore_adamw_8bit", "galore_adafactor",
              "ldadamw", "fira_adamw", "apollo_adamw", "apollo_mini")
# galore_adamw: the GaLore scripts; adamw: LDAdam's AdamW baseline (GaLore's tuned baseline
# rates are not published; its paper says full rank "usually needs <= 0.001"); ldadamw: the
# LDAdam C4 scripts (reference notes 1.6).  8-bit variants take their float twin's;
# galore_adafactor GaLore's (the paper's Fig. 3 ran GaLore-Adafactor with a first moment; its
# learning rate and b1 are not given).  fira_adamw, apollo_adamw, apollo_mini: 0.01, the
# GaLore protocol's, which the Fira and APOLLO papers pre-train LLaMA on C4 with (frontier.md
# sections 0-3; APOLLO-Mini also reports 0.02, better, in its Table 2).
DEFAULT_LR = {"adamw": 1e-3, "adamw_8bit": 1e-3, "galore_adamw": 1e-2, "galore_adamw_8bit": 1e-2,
              "galore_adafactor": 1e-2, "ldadamw": 1e-3, "fira_adamw": 1e-2,
              "apollo_adamw": 1e-2, "apollo_mini": 1e-2}
# The optimizers that project (a rank, a mask): every one but AdamW and 8-bit AdamW.
PROJECTING = tuple(n for n in OPTIMIZERS if n not in ("adamw", "adamw_8bit"))
# --galore-scale's default, alpha: 0.25 (GaLore's scripts; Fira's paper gives no value, so
# GaLore's), APOLLO's 1 and APOLLO-Mini's sqrt(128) (its paper).  Optimizers that do not
# project ignore it.
APOLLO = ("apollo_adamw", "apollo_mini")
DEFAULT_SCALE = {"apollo_adamw": 1.0, "apollo_mini": gj.apollo.MINI_SCALE}
REFRESH_POLICIES = {"every": gj.every, "staggered": gj.staggered, "lazy": gj.lazy}
# --method sltrain's default learning rate (SLTrain's scripts, every size); the other methods
# take their optimizer's.
METHOD_LR = {"sltrain": 3e-3}
ADAFACTOR_B1 = 0.9  # galore_adafactor's first moment (Fig. 3 ran one; 0.9, Adam's, as not given)
MAX_DEFAULT_RANK = 128  # the default rank's cap on the sizes the papers did not run
# The ranks the papers ran their sizes at: APOLLO's r = d / 4 (its Table 2) and r = 256 in its
# 7B run; the others the GaLore protocol's (model.PAPER_RANKS: GaLore Table 2, reused by Fira).
APOLLO_RANKS = {"60m": 128, "130m": 192, "350m": 256, "1b": 512, "7b": 256}


def saves_memory(rank: int, m: int, n: int, name: str) -> bool:
  """Whether ``name`` at ``rank`` keeps less state for an ``m x n`` matrix than it would
  keep with the matrix unprojected (Adam's two moments for the AdamW family, 8-bit ones for
  8-bit GaLore, a first moment and factored second one for GaLore-Adafactor), whichever side
  it projects: a basis of one side and low-rank moments (LDAdam also keeps its full-size
  error buffer), by ``gj.memory.estimate``.

  Example:
    >>> saves_memory(64, 128, 128, "galore_adamw"), saves_memory(64, 128, 128, "ldadamw")
    (True, False)
  """
  w = {"w": jax.ShapeDtypeStruct((m, n), jnp.float32)}
  b1 = dict(b1=ADAFACTOR_B1) if name == "galore_adafactor" else {}
  state = lambda **kw: gj.memory.estimate(w, name, rank=rank, **b1, **kw).optimizer_state
  unprojected = state(mask=False)
  return all(state(proj_type=side) < unprojected for side in ("left", "right"))


def paper_rank(cfg: model_lib.LlamaConfig, name: str) -> int | None:
  """The rank the papers ran optimizer ``name`` at on ``cfg``'s size (``APOLLO_RANKS`` for
  APOLLO, ``model.PAPER_RANKS`` for the others), ``None`` on the sizes they did not run.

  Example:
    >>> cfg = model_lib.CONFIGS["130m"]
    >>> paper_rank(cfg, "galore_adamw"), paper_rank(cfg, "apollo_adamw")
    (256, 192)
  """
  return (APOLLO_RANKS if name == "apollo_adamw" else model_lib.PAPER_RANKS).get(cfg.name)


def rank_cap(cfg: model_lib.LlamaConfig, name: str) -> int:
  """The highest default rank of optimizer ``name`` on ``cfg``: the papers' rank
  (``paper_rank``), ``MAX_DEFAULT_RANK`` on the sizes they did not run."""
  return paper_rank(cfg, name) or MAX_DEFAULT_RANK


def default_rank(cfg: model_lib.LlamaConfig, name: str, method_rank: int | None = None) -> int:
  """The largest multiple of 8 up to ``rank_cap`` (the papers' rank, or ``MAX_DEFAULT_RANK``
  on other sizes) at which every projected matrix of ``cfg`` (q, k, v, o: D x D; gate, up,
  down: D x F) keeps less state than unprojected; rank 128 on the 9m config would hold more,
  and so would LDAdam's 256 at 130m (its error buffer is full size).  With ``method_rank``,
  the matrices are the factors of a low-rank ``--method`` at that rank (D x r and F x r,
  either way round), from ``MAX_DEFAULT_RANK`` down; 1 where no multiple of 8 saves memory,
  and for APOLLO-Mini (its definition)."""
  if name == "apollo_mini":
    return 1
  r = method_rank
  shapes = ((cfg.D, cfg.D), (cfg.D, cfg.F)) if r is None else ((cfg.D, r), (cfg.F, r))
  top = rank_cap(cfg, name) if r is None else MAX_DEFAULT_RANK
  for rank in range(top, 0, -8):
    if all(saves_memory(rank, m, n, name) for m, n in shapes):
      return rank
  return 1


def method_of(args) -> str:
  """``--method`` (``full`` for namespaces made before it existed)."""
  return getattr(args, "method", "full")


def rank_for(args, name: str) -> int:
  """The projection rank of optimizer ``name``: ``--rank``, or the model's ``default_rank``
  for ``name``; under a low-rank ``--method`` (whose factors ``--rank`` sizes),
  ``--proj-rank``, or ``default_rank`` over the factors.  APOLLO-Mini is rank 1 by definition
  (neither flag applies to it).

  Example:
    >>> import argparse
    >>> args = argparse.Namespace(model="60m", rank=None, method="lowrank", proj_rank=None)
    >>> rank_for(args, "galore_adamw"), method_rank_for(args)  # 128-wide factors
    (112, 128)
  """
  if name == "apollo_mini":
    return 1
  cfg = model_lib.CONFIGS[args.model]
  if method_of(args) == "full":
    return args.rank if args.rank is not None else default_rank(cfg, name)
  proj_rank = getattr(args, "proj_rank", None)
  if proj_rank is not None:
    return proj_rank
  return default_rank(cfg, name, method_rank_for(args))


def method_rank_for(args) -> int:
  """The rank of a low-rank ``--method``'s factors: ``--rank``, or ``model.method_rank``."""
  return args.rank if args.rank is not None else model_lib.method_rank(
      model_lib.CONFIGS[args.model])


def relora_every(args, steps: int) -> int:
  """``--relora-every``, or a quarter of the steps (ReLoRA's 4 restarts), at least 2: each
  merge's first step runs at learning rate 0 (``gnn.relora_schedule``), so a period of 1
  would never train."""
  every = getattr(args, "relora_every", None)
  return every if every is not None else max(2, steps // 4)


def scale_for(args, name: str) -> float:
  """``--galore-scale``, or ``name``'s alpha (``DEFAULT_SCALE``, else 0.25)."""
  return args.galore_scale if args.galore_scale is not None else DEFAULT_SCALE.get(name, 0.25)


def basis_method_for(args, name: str) -> str:
  """``--basis-method``, or ``name``'s: APOLLO's own random projection, else the exact SVD."""
  if args.basis_method is not None:
    return args.basis_method
  return "random" if name in APOLLO else "svd"


def proj_type_for(args, name: str) -> str:
  """``--proj-type``, or ``name``'s side rule: the LDAdam reference's ``ldadam_std`` (square
  kernels projected on the output axis, the left) for ldadamw, else ``std``.  Every value
  passes through unchanged: ``--proj-type std`` gives ldadamw galore_jax's own ``std``
  (square kernels on the right).  (``transform`` refuses ``ldadam_std`` for the other
  projecting optimizers; AdamW ignores the flag.)

  Example:
    >>> import argparse
    >>> given = lambda v: argparse.Namespace(proj_type=v)
    >>> [proj_type_for(given(None), n) for n in ("ldadamw", "galore_adamw")]
    ['ldadam_std', 'std']
    >>> proj_type_for(given("std"), "ldadamw")
    'std'
  """
  if args.proj_type is None:
    return "ldadam_std" if name == "ldadamw" else "std"
  return args.proj_type


def alpha_for(args) -> float:
  """``--lora-alpha``, or the method's on the model (``model.method_alpha``)."""
  alpha = getattr(args, "lora_alpha", None)
  return alpha if alpha is not None else model_lib.method_alpha(
      model_lib.CONFIGS[args.model], method_of(args))


def delta_for(args) -> float:
  """``--delta``, or SLTrain's on the model (``model.method_delta``)."""
  delta = getattr(args, "delta", None)
  return delta if delta is not None else model_lib.method_delta(model_lib.CONFIGS[args.model])


def with_defaults(args, name: str) -> argparse.Namespace:
  """``args`` with the rank, scale, basis method, side rule and method settings ``name``
  trains at, so that config.json and the checkpoints' flags record them: under a low-rank
  ``--method``, ``rank`` is its factors' and ``proj_rank`` the projecting optimizer's."""
  full = method_of(args) == "full"
  proj_rank = rank_for(args, name) if not full and name in PROJECTING else None
  return argparse.Namespace(**{**vars(args),
                               "rank": rank_for(args, name) if full else method_rank_for(args),
                               "proj_rank": proj_rank,
                               "galore_scale": scale_for(args, name),
                               "basis_method": basis_method_for(args, name),
                               "proj_type": proj_type_for(args, name),
                               "lora_alpha": alpha_for(args), "delta": delta_for(args)})


def peak_lr(args, name: str) -> float:
  """``--lr``, or the paper's learning rate for ``name`` (``METHOD_LR`` for ``--method``)."""
  if args.lr is not None:
    return args.lr
  return METHOD_LR.get(method_of(args), DEFAULT_LR[name])


def warmup_steps(args, steps: int) -> int:
  """``--warmup``, or 10% of the steps (the papers')."""
  return args.warmup if args.warmup is not None else steps // 10


# The optimizers whose rank --rank (or --proj-rank) sets: APOLLO-Mini is rank 1.
RANKED = tuple(n for n in PROJECTING if n != "apollo_mini")
# GaLore's family, Fira and APOLLO refresh a basis on a schedule (--update-proj-gap, --refresh,
# --basis-method) and scale their update by alpha (--galore-scale); LDAdam does neither.
SCHEDULED = tuple(n for n in PROJECTING if n != "ldadamw")
# The optimizers whose refresh galore_jax lets the host decide (galore_refresh): GaLore's
# projection under every(T), LDAdam's step-0 SVD, and APOLLO's projection when a method that
# reads the gradient (svd) computes it (its random projection, drawn at every step, has no
# cond to replace: host_refresh).
HOST_REFRESH = ("galore_adamw", "galore_adamw_8bit", "galore_adafactor", "fira_adamw", "ldadamw",
                *APOLLO)
# Which optimizers read each optimizer setting, and the flag's default: a setting that none
# of a run's optimizers reads does nothing, and the run says so.
READERS = {
    "rank": (RANKED, None),  # under --method full
    "proj_rank": (RANKED, None),
    "galore_scale": (SCHEDULED, None),
    "proj_type": (PROJECTING, None),
    "basis_method": (SCHEDULED, None),
    "update_proj_gap": (SCHEDULED, 200),
    "refresh": (SCHEDULED, "every"),
    "rho": (("ldadamw",), 0.908),
    "host_refresh": (HOST_REFRESH, "auto"),
}


def unread_flags(args, names) -> list[str]:
  """The optimizer settings given (other than their defaults) that no optimizer of ``names``
  reads, as ``--flag``s: ``--rho`` without ``ldadamw``, a projection's with only AdamW.
  Under a low-rank ``--method``, ``--rank`` sizes the factors, which every optimizer trains.

  Example:
    >>> import argparse
    >>> args = argparse.Namespace(method="full", rank=64, proj_rank=None, galore_scale=None,
    ...     proj_type=None, basis_method="power", update_proj_gap=200, refresh="every",
    ...     rho=0.5)
    >>> unread_flags(args, ["adamw", "ldadamw"])
    ['--basis-method']
    >>> unread_flags(args, ["adamw"])
    ['--rank', '--basis-method', '--rho']
  """
  unread = []
  for flag, (readers, default) in READERS.items():
    if flag == "rank" and method_of(args) != "full":
      continue
    if flag == "host_refresh":  # not APOLLO's random projection (host_refresh)
      readers = [n for n in readers if not draws_at_every_step(args, n)]
    if getattr(args, flag, default) != default and not set(names) & set(readers):
      unread.append("--" + flag.replace("_", "-"))
  return unread


# benchmarks/first_steps.py: with no warm-up, the first full-lr Adam step on 2-layer models of
# the 350m, 1b and 7b widths raised the validation loss (at 1b from 5.4 to 13); at 60m's it fell.
WARMUP_WIDTH = 1024


def warmup_warning(args, cfg: model_lib.LlamaConfig, steps: int) -> str | None:
  """A warning for a warm-up that outlasts the run (the rate never reaches the peak the
  summary reports), or for a run without warm-up of a model at least ``WARMUP_WIDTH`` wide:
  Adam's first update is about ``-lr * sign(g)`` for every weight, whose size relative to
  the weights grows with the width (BENCHMARKS.md, "The first steps"); None otherwise."""
  warmup = warmup_steps(args, steps)
  if warmup >= steps > 1:
    return (f"--warmup {warmup} is not shorter than the run's {steps} steps: the learning rate"
            " never reaches its peak (--lr, the summary's peak_lr)")
  if warmup or cfg.D < WARMUP_WIDTH:
    return None
  return (f"no warm-up: the first steps move every weight by about the peak lr, which at width"
          f" {cfg.D} raises the loss (BENCHMARKS.md, \"The first steps\"); the papers warm up"
          " over 10% of the steps (--warmup)")


def relora_warning(args, steps: int) -> str | None:
  """A warning for a ReLoRA run that never merges (its period not shorter than the run: it
  is then LoRA); None otherwise."""
  if method_of(args) != "relora" or relora_every(args, steps) < steps:
    return None
  return (f"--relora-every {relora_every(args, steps)} is not shorter than the run's {steps}"
          " steps: the adapters are never merged (this is LoRA)")



def draws_at_every_step(args, name: str) -> bool:
  """Whether ``name`` is APOLLO with its random projection: drawn from the seed at every step,
  its refresh only counts (no ``lax.cond`` for ``--host-refresh`` to remove)."""
  return name in APOLLO and basis_method_for(args, name) == "random"


def host_refresh(args, name: str, backend: str | None = None):
  """``--host-refresh``'s rule for ``name``: a function of the optimizer's step count (the
  updates before this one) giving ``galore_refresh`` (whether this step refreshes, so the
  jitted step holds no ``lax.cond``, which a GPU runs as a host sync), or ``None`` where the
  step keeps its ``cond`` (``off``; ``auto`` off a GPU) or has none (AdamW; APOLLO's random
  projection).  ``on`` with a refresh policy the host cannot follow is a one-line
  ``SystemExit``.

  Example:
    >>> import argparse
    >>> args = argparse.Namespace(host_refresh="on", refresh="every", update_proj_gap=3)
    >>> [host_refresh(args, "galore_adamw")(t) for t in range(4)]
    [True, False, False, True]
    >>> host_refresh(args, "adamw") is None
    True
  """
  mode = getattr(args, "host_refresh", "off")
  backend = backend or jax.default_backend()
  if (mode == "off" or (mode == "auto" and backend != "gpu") or name not in HOST_REFRESH
      or draws_at_every_step(args, name)):
    return None
  if name == "ldadamw":
    return lambda t: t == 0
  if args.refresh != "every":
    if mode == "on":
      raise SystemExit(f"--host-refresh on needs --refresh every (the host cannot follow"
                       f" {args.refresh!r}); use --host-refresh auto or off")
    return None
  gap = args.update_proj_gap
  return lambda t: t % gap == 0


def make_optimizer(args, name: str, steps: int) -> tuple[optax.GradientTransformation, Any]:
  """The papers' optimizer for `name` and its learning-rate schedule.  With ``--per-layer``
  it is ``per_layer.layerwise`` (a state per decoder layer; the step clips itself)."""
  peak = peak_lr(args, name)
  warmup = warmup_steps(args, steps)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, peak, warmup_steps=warmup, decay_steps=max(steps, warmup + 1),
      end_value=peak * args.min_lr_ratio)
  if method_of(args) == "relora":  # the jagged restarts after each merge
    every = relora_every(args, steps)
    schedule = gnn.relora_schedule(schedule, every, max(1, min(100, every // 10)))
  if args.per_layer:  # one layer's kernels are (in, out)
    make = lambda: transform(args, name, schedule, model_lib.KERNEL_DIMS)
    return per_layer.layerwise(make(), make()), schedule
  tx = transform(args, name, schedule, model_lib.LAYER_KERNEL_DIMS)
  if args.grad_clip > 0:
    tx = optax.chain(clipping.clip_by_global_norm(args.grad_clip), tx)  # (float32 norm)
  return tx, schedule


def transform(args, name: str, schedule, dimension_numbers) -> optax.GradientTransformation:
  """Optimizer ``name`` at the flags' settings, its kernels viewed by ``dimension_numbers``."""
  wd = args.weight_decay
  if name == "adamw":
    return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=wd)
  # The 8-bit and Adafactor states see each layer's slice of a stacked weight as a tensor:
  # bitsandbytes' 4096-element floor and Adafactor's factoring and clipping are per layer.
  stacked = dict(batch_dims=model_lib.stacked_axes)
  if name == "adamw_8bit":
    return gj.adamw_8bit(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=wd, **stacked)
  proj_type = proj_type_for(args, name)
  if name == "ldadamw":
    # The reference's settings: betas (0.908, 0.99) for every leaf (embeddings, norms and
    # lm_head get AdamW with them), error feedback on, and by default its side rule,
    # ldadam_std (proj_type_for); std, left, right, reverse_std as given.
    if proj_type not in gj.LDADAM_PROJ_TYPES:
      raise SystemExit(f"--proj-type {proj_type} is not available for ldadamw")
    return gj.ldadamw(
        schedule, rank=rank_for(args, name), b1=0.908, b2=0.99, eps=1e-8, rho=args.rho,
        weight_decay=wd, proj_type=proj_type, mask=model_lib.galore_targets,
        dimension_numbers=dimension_numbers)
  if proj_type == "ldadam_std":
    raise SystemExit(f"--proj-type ldadam_std is LDAdam's rule, for ldadamw only (not {name})")
  common = dict(
      rank=rank_for(args, name), update_proj_gap=args.update_proj_gap,
      scale=scale_for(args, name), proj_type=proj_type, mask=model_lib.galore_targets,
      dimension_numbers=dimension_numbers, key=args.seed,
      refresh=REFRESH_POLICIES[args.refresh](args.update_proj_gap))
  if name in APOLLO:
    return apollo(args, name, schedule, wd, common)
  projection = dict(common, method=basis_method_for(args, name))
  if name == "fira_adamw":
    if proj_type == "full":
      raise SystemExit("--proj-type full is not available for fira_adamw (its residual scales"
                       " the channels of the side that is not projected)")
    return gj.fira_adamw(schedule, weight_decay=wd, **projection)
  if name == "galore_adamw_8bit":
    return gj.galore_adamw_8bit(schedule, weight_decay=wd, **stacked, **projection)
  if name == "galore_adafactor":
    return gj.galore_adafactor(schedule, b1=ADAFACTOR_B1, weight_decay=wd, **stacked,
                               **projection)
  return gj.galore_adamw(schedule, weight_decay=wd, **projection)


def apollo(args, name: str, schedule, wd: float, common: dict) -> optax.GradientTransformation:
  """APOLLO or APOLLO-Mini at the flags' settings: its own random projection by default
  (``--basis-method random``: the paper's Gaussian, regenerated from the seed), ``svd`` (the
  paper's "APOLLO w. SVD") or another method of ``gj.subspace.METHODS``."""
  if common["proj_type"] not in gj.APOLLO_PROJ_TYPES:
    raise SystemExit(f"--proj-type {common['proj_type']} is not available for {name}")
  method = basis_method_for(args, name)
  if args.refresh == "lazy" and method == "random":
    raise SystemExit(f"--refresh lazy compares successive bases; {name}'s random projection has"
                     " no trend to follow: use every or staggered, or --basis-method svd")
  proj = method if method in ("random", "svd") else gj.subspace.METHODS[method]
  make = gj.apollo_mini if name == "apollo_mini" else gj.apollo_adamw
  return make(schedule, proj=proj, weight_decay=wd, **common)


def closed_form(args, name: str, params) -> gj.memory.MemoryEstimate:
  """``gj.memory.estimate`` of optimizer ``name`` at the flags' settings on ``params`` (the
  trainable params, arrays or shapes): the papers' accounting of weights, gradients and
  optimizer state, which the state's arrays equal (scalar counters aside); its weights are
  the trainable ones (a model's frozen weights come on top).  With
  ``--per-layer`` the gradients are those of one decoder layer and of the other params (the
  per-layer step never holds more: the papers' per-layer accounting)."""
  kwargs = dict(batch_dims=model_lib.stacked_axes)
  if name in PROJECTING:
    kwargs.update(rank=rank_for(args, name), proj_type=proj_type_for(args, name),
                  mask=model_lib.galore_targets,
                  dimension_numbers=model_lib.LAYER_KERNEL_DIMS)
  if name == "galore_adafactor":
    kwargs["b1"] = ADAFACTOR_B1
  if name in APOLLO:
    kwargs["proj"] = "random" if basis_method_for(args, name) == "random" else "svd"
  estimate = gj.memory.estimate(params, name, **kwargs)
  if not args.per_layer:
    return estimate
  layers = gj.tree_bytes(params[model_lib.LAYERS])
  num_layers = jax.tree.leaves(params[model_lib.LAYERS])[0].shape[0]
  return estimate._replace(gradients=estimate.gradients - layers + layers // num_layers)

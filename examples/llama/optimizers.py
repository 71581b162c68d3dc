"""The optimizers the LLaMA example trains with, at the papers' settings.

``make_optimizer(args, name, steps)`` is the Optax transform of ``name`` (one of
``OPTIMIZERS``) for the parsed flags, with its learning-rate schedule: linear warmup,
then cosine decay to ``--min-lr-ratio`` of the peak (``DEFAULT_LR`` unless ``--lr``).
"""

from __future__ import annotations

from typing import Any

import optax

import galore_jax as gj
from examples.llama import model as model_lib

OPTIMIZERS = ("adamw", "galore_adamw", "ldadamw")
# adamw / galore_adamw: the GaLore scripts; ldadamw: the LDAdam C4 scripts (reference notes 1.6).
DEFAULT_LR = {"adamw": 1e-3, "galore_adamw": 1e-2, "ldadamw": 1e-3}
REFRESH_POLICIES = {"every": gj.every, "staggered": gj.staggered, "lazy": gj.lazy}


def make_optimizer(args, name: str, steps: int) -> tuple[optax.GradientTransformation, Any]:
  """The papers' optimizer for `name` and its learning-rate schedule."""
  peak = args.lr if args.lr is not None else DEFAULT_LR[name]
  warmup = args.warmup if args.warmup is not None else steps // 10
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, peak, warmup_steps=warmup, decay_steps=max(steps, warmup + 1),
      end_value=peak * args.min_lr_ratio)
  if name == "adamw":
    tx = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=args.weight_decay)
  elif name == "ldadamw":
    # The reference's settings: betas (0.908, 0.99) for every leaf (embeddings, norms and
    # lm_head get AdamW with them), error feedback on, and its side rule: --proj-type std
    # means the reference's "std" here (square kernels projected on the output axis, the
    # left; galore_jax's "std" would take the right); left / right / reverse_std as given.
    proj_type = "ldadam_std" if args.proj_type == "std" else args.proj_type
    if proj_type not in gj.LDADAM_PROJ_TYPES:
      raise SystemExit(f"--proj-type {args.proj_type} is not available for ldadamw")
    tx = gj.ldadamw(
        schedule, rank=args.rank, b1=0.908, b2=0.99, eps=1e-8, rho=args.rho,
        weight_decay=args.weight_decay, proj_type=proj_type,
        mask=model_lib.galore_targets, dimension_numbers=model_lib.LAYER_KERNEL_DIMS)
  else:
    tx = gj.galore_adamw(
        schedule, rank=args.rank, update_proj_gap=args.update_proj_gap, scale=args.galore_scale,
        proj_type=args.proj_type, weight_decay=args.weight_decay,
        mask=model_lib.galore_targets, dimension_numbers=model_lib.LAYER_KERNEL_DIMS,
        refresh=REFRESH_POLICIES[args.refresh](args.update_proj_gap), method=args.basis_method,
        key=args.seed)
  if args.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(args.grad_clip), tx)
  return tx, schedule

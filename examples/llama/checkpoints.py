"""Checkpoints and resume for the LLaMA example.

``Checkpoints`` saves and restores model + optimizer state + data position (Orbax) with
the run's flags; ``resume`` continues from the latest complete one and names the flags
that changed; ``refuse_old_checkpoints`` keeps a fresh run out of an ``--out`` that holds
an earlier run's checkpoints.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import orbax.checkpoint as ocp
from flax import nnx


class Checkpoints:
  """Orbax checkpoints of model + optimizer state + data position.

  Orbax writes each step to a temporary directory and renames it when complete,
  so a run killed mid-save leaves nothing that `latest_step` would pick up.
  """

  def __init__(self, directory: pathlib.Path):
    self.directory = directory
    self.mngr = ocp.CheckpointManager(
        directory.resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))

  def save(self, step: int, model, optimizer, meta: dict):
    state = {"params": nnx.state(model, nnx.Param), "opt": nnx.state(optimizer)}
    self.mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def restore_latest(self, model, optimizer) -> dict | None:
    step = self.mngr.latest_step()
    if step is None:
      return None
    state = {"params": nnx.state(model, nnx.Param), "opt": nnx.state(optimizer)}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = self.mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    nnx.update(model, restored.state["params"])
    nnx.update(optimizer, restored.state["opt"])
    return restored.meta

  def close(self):
    self.mngr.wait_until_finished()
    self.mngr.close()


# The flags that shape a run's trajectory, stored with each checkpoint; a resume
# with other values says which changed (--steps may grow to extend a run).
RUN_FLAGS = ("model", "rank", "rho", "update_proj_gap", "galore_scale", "proj_type",
             "basis_method", "refresh", "lr", "warmup", "min_lr_ratio", "weight_decay",
             "grad_clip", "batch_size", "grad_accum", "seq_len", "seed", "dtype", "pack",
             "tokenizer", "vocab_size")


def run_flags(args, name: str) -> dict:
  return {"optimizer": name, **{k: getattr(args, k) for k in RUN_FLAGS}}


def changed_flags(saved: dict | None, now: dict) -> list[str]:
  """``--flag old -> new`` for every run flag that differs from the checkpoint's."""
  if not saved:  # a checkpoint from before the flags were stored
    return []
  return [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {v!r}"
          for k, v in now.items() if k in saved and saved[k] != v]


def refuse_old_checkpoints(name: str, out: pathlib.Path):
  """Stops a run without ``--resume`` whose ``out`` holds checkpoints: Orbax would skip
  every save at or below the old run's latest step, and a later ``--resume`` would
  restore the old run, so two runs would be mixed."""
  if not (out / "checkpoints").is_dir():
    return
  ckpt = Checkpoints(out / "checkpoints")
  latest = ckpt.mngr.latest_step()
  ckpt.close()
  if latest is not None:
    raise SystemExit(
        f"[{name}] {out / 'checkpoints'} holds checkpoints of an earlier run (latest step"
        f" {latest}): pass --resume to continue it, or choose another --out")


def resume(name: str, ckpt: Checkpoints, model, optimizer, batches, flags: dict) -> int:
  """``--resume``: restores the latest complete checkpoint into ``model``, ``optimizer`` and
  ``batches`` and returns its step, warning about run flags that differ from its own; 0
  (a fresh start) when there is none."""
  meta = ckpt.restore_latest(model, optimizer)
  if meta is None:
    print(f"[{name}] --resume: no complete checkpoint in {ckpt.directory}, starting fresh")
    return 0
  start_step = int(meta["step"])
  batches.restore(meta["data"])
  print(f"[{name}] resumed from step {start_step}")
  changed = changed_flags(meta.get("run"), flags)
  if changed:
    print(f"[{name}] warning: resuming a run saved with other flags: {'; '.join(changed)}",
          file=sys.stderr)
  return start_step

"""Checkpoints and resume for the LLaMA example.

``Checkpoints`` saves and restores model + optimizer state + data position (Orbax) with
the run's flags and a fingerprint of the state (integrity.py: shapes, dtypes, checksums);
``resume`` checks the newest checkpoint against this run before restoring anything (flags
that change the state's shapes are refused, others warned about), verifies what it
restores, and falls back to an earlier checkpoint when one is damaged.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import sys
import warnings

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from examples.llama import data as data_lib
from examples.llama import integrity, outputs


class Unusable(Exception):
  """A checkpoint that cannot be resumed from (damaged, or of another state); the
  message says what is wrong in a few words."""


class SaveFailed(OSError):
  """A checkpoint could not be written (disk full, permissions); one line."""


def reason(e: BaseException) -> str:
  """What went wrong, in a few words: Orbax / TensorStore errors run to dozens of lines
  (the OS error, when there is one, is the useful part)."""
  text = str(e)
  os_error = re.search(r"os_error_code='?(\d+)", text)
  if os_error:
    return os.strerror(int(os_error.group(1)))
  if isinstance(e, OSError) and e.strerror:
    return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
  first = (text.strip().splitlines() or [type(e).__name__])[0]
  first = first.split(". See full TensorStore details")[0]
  return first if len(first) <= 160 else first[:157] + "..."


def state_of(model, optimizer) -> dict:
  """What a checkpoint holds: the params, the optimizer state and, with a low-rank
  ``--method``, the weights that are not params (LoRA's frozen bases, which ReLoRA's merges
  change; SLTrain's supports) and the dropout streams' counts (their keys come from --seed)."""
  state = {"params": nnx.state(model, nnx.Param), "opt": nnx.state(optimizer)}
  fixed = nnx.state(model, nnx.Not(nnx.Any(nnx.Param, nnx.RngKey)))
  if jax.tree.leaves(fixed):  # (absent for --method full: its checkpoints stay as they were)
    state["fixed"] = fixed
  return state


class Checkpoints:
  """Orbax checkpoints of model + optimizer state + data position, each with a
  fingerprint of its state.

  Orbax writes each step to a temporary directory and renames it when complete, so a run
  killed mid-save leaves nothing that ``steps`` would list. It keeps the newest two: one
  to fall back to when the newest turns out damaged.
  """

  def __init__(self, directory: pathlib.Path):
    self.directory = directory
    self.pending: int | None = None  # the step of a save that may still be writing
    self.save_failed = False
    # Said now, not after the first steps have trained and that save failed.
    if directory.exists() and not directory.is_dir():
      raise NotADirectoryError(f"{directory} is not a folder: the run keeps its checkpoints in"
                               " one (move the file, or give another --out)")
    # A step's folders are made in save() itself, not in Orbax's background thread: when
    # that thread failed to make them (a full disk), the threads writing the arrays waited
    # for them for Orbax's fixed 300 s, holding the run's exit after its error.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=2, create=True,
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
    self.mngr = ocp.CheckpointManager(directory.resolve(), options=options)
    if not os.access(directory, os.W_OK | os.X_OK):
      raise PermissionError(f"cannot write checkpoints into {directory}"
                            f" ({outputs.why_unwritable(directory)})")

  def steps(self) -> list[int]:
    """The complete checkpoints' steps, newest first."""
    return sorted(self.mngr.all_steps(), reverse=True)

  def save(self, step: int, model, optimizer, meta: dict):
    """Starts saving ``step`` (Orbax writes in the background; a failure of the previous
    save surfaces here or in ``close``, as ``SaveFailed``)."""
    state = state_of(model, optimizer)
    meta = integrity.seal({**meta, "state": integrity.fingerprint(state)})
    self.wait()  # (Orbax's save waits too): an error here is the previous save's
    try:
      self.mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    except Exception as e:  # pylint: disable=broad-except  # Orbax raises plain Exceptions
      raise self.failed(step, e) from e
    self.pending = step

  def read_meta(self, step: int) -> dict:
    """The flags, data position and fingerprint saved with ``step``; ``Unusable`` when
    they are unreadable, damaged, or were saved without a fingerprint."""
    try:
      meta = self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # pylint: disable=broad-except
      raise Unusable(f"its meta data cannot be read ({reason(e)})") from None
    if not isinstance(meta, dict) or "seal" not in meta or "state" not in meta:
      raise Unusable("it has no checksums (saved by an older version of this example)")
    if not integrity.is_sealed(meta):
      raise Unusable("its meta data does not match its checksum (damaged)")
    if meta.get("step", step) != step:  # a step's folder copied or renamed by hand
      raise Unusable(f"it was saved as step {meta['step']}, not {step} (copied or renamed)")
    return meta

  def restore(self, step: int, model, optimizer, meta: dict):
    """Restores ``step`` into ``model`` and ``optimizer`` once its bytes match the
    checksums of ``meta``; ``Unusable`` (and nothing loaded) otherwise."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_of(model, optimizer))
    try:
      restored = self.mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract))).state
    except Exception as e:  # pylint: disable=broad-except
      raise Unusable(f"its state cannot be read ({reason(e)})") from None
    bad = integrity.checksum_differences(meta["state"], integrity.fingerprint(restored))
    if bad:
      more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
      raise Unusable(f"checksum mismatch in {bad[0]}{more} (a data file changed after saving)")
    nnx.update(model, restored["params"], *([restored["fixed"]] if "fixed" in restored else []))
    nnx.update(optimizer, restored["opt"])

  def set_aside(self, step: int) -> pathlib.Path:
    """Moves a damaged ``step`` out of Orbax's sight, beside the checkpoints (kept for
    a look, not used): a rerun would otherwise find it first again, and Orbax would
    skip saving that step anew."""
    aside = self.directory.parent / "damaged-checkpoints" / str(step)
    if jax.process_index() == 0:
      aside.parent.mkdir(exist_ok=True)
      shutil.rmtree(aside, ignore_errors=True)
      os.replace(self.directory / str(step), aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self.mngr.reload()
    return aside

  def failed(self, step: int | None, e: BaseException) -> SaveFailed:
    """``e`` as one line, with the checkpoint that is kept; the temporary directory the save
    left is removed (best effort; again in ``close``, once Orbax's threads have stopped)."""
    self.pending = None
    self.save_failed = True
    self.remove_temporaries()
    kept = self.steps()  # (Orbax does not list a step whose save failed)
    what = "a checkpoint" if step is None else f"checkpoint step {step}"
    newest = f"checkpoint step {kept[0]} is kept" if kept else "no earlier checkpoint was saved"
    return SaveFailed(f"could not save {what} in {self.directory}: {reason(e)}; {newest}")

  def wait(self):
    """Waits for the pending save; ``SaveFailed`` if it failed."""
    try:
      self.mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self.failed(self.pending, e) from e
    self.pending = None

  def close(self):
    """Waits for the pending save (``SaveFailed`` if it failed) and stops Orbax's threads."""
    try:
      self.wait()
    finally:
      self.mngr.close()
      if self.save_failed:  # its threads may have written on after failed() removed it
        self.remove_temporaries()

  def remove_temporaries(self):
    """Removes the temporary folders of unfinished saves (the main process's job)."""
    if jax.process_index() == 0:
      for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
        shutil.rmtree(tmp, ignore_errors=True)


# The flags that shape a run's trajectory, stored with each checkpoint; a resume
# with other values says which changed (--steps may grow to extend a run).
RUN_FLAGS = ("model", "rank", "proj_rank", "rho", "update_proj_gap", "galore_scale",
             "proj_type", "basis_method", "refresh", "lr", "warmup", "min_lr_ratio", "weight_decay",
             "grad_clip", "batch_size", "grad_accum", "seq_len", "seed", "dtype", "pack",
             "tokenizer", "vocab_size", "data", "max_docs", "per_layer", "method", "delta",
             "lora_alpha", "lora_dropout", "relora_every")
# Flags that can change the shapes or dtypes of the saved state: when the state differs,
# these are what the refusal names.
# (--basis-method: APOLLO's svd keeps a basis that its random projection regenerates.)
SHAPE_FLAGS = ("optimizer", "model", "rank", "proj_rank", "proj_type", "refresh", "basis_method",
               "dtype", "tokenizer", "vocab_size", "grad_clip", "per_layer", "method", "delta")
# Flags whose value, unless given, follows from --optimizer (optimizers.with_defaults).
OPTIMIZER_DEFAULTS = ("rank", "proj_rank", "proj_type", "basis_method", "galore_scale")
# Flags that change what the saved data position means (data.Batches refuses them).
POSITION_FLAGS = ("seed", "pack")
# Flags that change what the model's token ids mean (its embedding rows); with the BPE
# trained on the data (--tokenizer bpe), the data flags too.
TOKEN_FLAGS = ("tokenizer", "vocab_size")
TRAINED_TOKENIZER_FLAGS = ("data", "max_docs")


def always_refused(changed: dict, saved: dict, same_tokenizer: bool = False) -> dict[str, str]:
  """Of ``changed`` (:func:`changed_flags`), the flags no resume can take whatever the state's
  shapes, each with what it changes.  ``same_tokenizer``: the checkpoint's data state records
  this run's tokenizer (``--tokenizer auto`` then ``bpe``, or a trained BPE by its path), so
  the token flags did not change what its ids mean."""
  refused = {k: "what its data position means" for k in changed if k in POSITION_FLAGS}
  if same_tokenizer:
    return refused
  # --vocab-size sizes a BPE trained on the data only: with the same fixed-vocabulary
  # tokenizer it meant nothing (the CLI refuses it now; an older run may have saved one)
  sized = "tokenizer" in changed or saved.get("tokenizer") in data_lib.SIZED_TOKENIZERS
  refused.update({k: "what its token ids mean" for k in changed
                  if k in TOKEN_FLAGS and (k != "vocab_size" or sized)})
  if saved.get("tokenizer") == "bpe":  # the BPE was trained on the saved run's data
    refused.update({k: "the BPE trained on the data, so what its token ids mean"
                    for k in changed if k in TRAINED_TOKENIZER_FLAGS})
  return refused


def run_flags(args, name: str) -> dict:
  """The flags a checkpoint records: ``optimizer`` = ``name`` and each of RUN_FLAGS from
  ``args`` (None where absent)."""
  return {"optimizer": name, **{k: getattr(args, k, None) for k in RUN_FLAGS}}


def changed_flags(saved: dict | None, now: dict) -> dict[str, str]:
  """``{flag: "--flag old -> new"}`` for every run flag that differs from the checkpoint's."""
  if not saved:
    return {}
  return {k: f"--{k.replace('_', '-')} {saved.get(k)!r} -> {v!r}"
          for k, v in now.items() if k in saved and saved[k] != v}


def finished_run_changes(out, flags: dict) -> dict[str, str]:
  """:func:`changed_flags` of a finished run in ``out`` that kept no checkpoint, from its
  ``config.json`` (``vocab_size`` there is the tokenizer's, not the flag; JSON keeps paths as
  strings and tuples as lists): what a command would change in the run it only reports."""
  try:
    saved = json.loads((out / "config.json").read_text())
  except (OSError, json.JSONDecodeError):
    return {}
  now = json.loads(json.dumps(flags, default=str))
  now.pop("vocab_size", None)
  return changed_flags(saved, now)


def check_compatible(name: str, step: int, meta: dict, flags: dict, layout: dict,
                     same_tokenizer: bool = False) -> dict:
  """Refuses (``SystemExit``) a resume whose flags change the saved state's shapes or
  its data position (``same_tokenizer``: see :func:`always_refused`); returns the other
  changed flags (to warn about). ``Unusable`` when the saved state differs from this run's
  without a flag to blame."""
  changed = changed_flags(meta.get("run"), flags)
  diffs = integrity.layout_differences(meta["state"], layout)
  refused = always_refused(changed, meta.get("run") or {}, same_tokenizer)
  if diffs:
    blamed = [k for k in changed if k in SHAPE_FLAGS] or list(changed)
    if "optimizer" in blamed:  # (not the settings it implies: adamw's stand-in rank 1)
      blamed = [k for k in blamed if k not in OPTIMIZER_DEFAULTS]
    refused.update({k: "the saved state's shapes or dtypes" for k in blamed})
  if refused:
    whys = "; ".join(dict.fromkeys(refused.values()))
    raise SystemExit(
        f"[{name}] cannot resume checkpoint step {step} with "
        f"{'; '.join(changed[k] for k in refused)} (they change {whys}): rerun with the saved"
        " values, or start afresh with --overwrite or another --out")
  if diffs:
    more = f" and {len(diffs) - 1} more" if len(diffs) > 1 else ""
    raise Unusable(f"it holds another state than this run builds ({diffs[0]}{more})")
  return changed


def resume(name: str, ckpt: Checkpoints, model, optimizer, batches, flags: dict,
           steps: int) -> tuple[int, int | None, bool]:
  """``--resume``: restores the newest good checkpoint into ``model``, ``optimizer`` and
  ``batches`` and returns its step (0: none, a fresh start, which the caller reports: the
  run may be one that finished without checkpoints), the tokens trained on up to it
  (``None`` where a checkpoint predates that record) and whether it was its run's last step
  (a run extended by a larger ``--steps``). A damaged or unreadable one
  is reported in a line and set aside, and the next older one tried. ``steps``: the
  run's length now (it may grow to extend a run)."""
  layout = integrity.layout(state_of(model, optimizer))
  unusable = []
  for step in ckpt.steps():
    try:
      meta = ckpt.read_meta(step)
      same = batches.same_tokenizer(meta.get("data") or {})
      changed = check_compatible(name, step, meta, flags, layout, same)
      why = batches.refusal(meta.get("data") or {})
      if why is not None:  # flags alike (--tokenizer auto, --data DIR) can mean other data
        raise SystemExit(f"[{name}] cannot resume checkpoint step {step}: {why}; rerun with"
                         " the run's tokenizer and data files, or start afresh with"
                         " --overwrite or another --out")
      ckpt.restore(step, model, optimizer, meta)
    except Unusable as e:
      print(f"[{name}] checkpoint step {step} is unusable: {e}", file=sys.stderr)
      unusable.append(step)
      continue
    with warnings.catch_warnings():  # a changed --data is warned about below, once
      warnings.simplefilter("ignore")
      batches.restore(meta["data"])
    aside = [str(ckpt.set_aside(s)) for s in unusable]
    print(f"[{name}] resumed from step {step}"
          + (f", the newest good checkpoint (set aside: {', '.join(aside)})" if aside else ""))
    if changed:
      print(f"[{name}] warning: resuming a run saved with other flags: "
            f"{'; '.join(changed.values())}", file=sys.stderr)
    if meta.get("steps", steps) != steps:
      print(f"[{name}] --steps {meta['steps']} -> {steps}: the learning-rate schedule now"
            f" spans {steps} steps")
    return step, meta.get("tokens"), meta.get("steps") == step
  if unusable:
    raise SystemExit(f"[{name}] no usable checkpoint in {ckpt.directory} (steps "
                     f"{', '.join(map(str, unusable))}, see above): start afresh with --overwrite")
  return 0, 0, False

"""The files a LLaMA run writes besides its checkpoints, and the final table.

``metrics.jsonl`` (a row per log or eval step), ``config.json``, ``summary.json`` and, for
several optimizers, ``comparison.json``; ``write_atomically`` so that a kill never leaves
one truncated, ``read_metrics`` to take a resumed run's rows back. ``earlier_run`` /
``clear_run`` find and remove what an earlier run left in an ``--out``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import pathlib
import shutil
import socket
import sys
from typing import IO

import jax


def read_metrics(path: pathlib.Path, upto_step: int | None = None) -> list[dict]:
  """The rows of ``metrics.jsonl`` up to ``upto_step``; a line a killed run left
  half-written, or one that is no row (JSON but no object with an int ``step``), is dropped
  with a warning."""
  if not path.exists():
    return []
  rows = []
  for i, line in enumerate(path.read_text().splitlines()):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      print(f"warning: {path}: dropping unreadable line {i + 1} (a run killed mid-write?)",
            file=sys.stderr)
      continue
    if isinstance(row, dict) and type(row.get("step")) is int:
      rows.append(row)
    else:
      print(f"warning: {path}: dropping line {i + 1}: no metrics row (an object with an int"
            " step)", file=sys.stderr)
  return [r for r in rows if upto_step is None or r["step"] <= upto_step]


# What a run leaves in its --out (and, comparing optimizers, in --out/<optimizer>).
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "comparison.json", "curves.png",
             "checkpoints", "damaged-checkpoints")


def write_atomically(path: pathlib.Path, text: str):
  """``path.write_text(text)`` through a temporary file and a rename, so a kill never
  leaves ``path`` truncated; a failed write (disk full) leaves no temporary file and
  raises an ``OSError`` naming ``path``."""
  tmp = path.with_name(path.name + ".tmp")
  try:
    tmp.write_text(text)
    os.replace(tmp, path)
  except OSError as e:
    tmp.unlink(missing_ok=True)
    raise OSError(f"could not write {path}: {e.strerror or e}") from e


def earlier_run(out: pathlib.Path, names) -> list[pathlib.Path]:
  """The files of an earlier run in ``out`` or its subdirectories ``names`` (optimizers)."""
  dirs = [out, *(out / name for name in names)]
  return [d / f for d in dirs if d.is_dir() for f in RUN_FILES if (d / f).exists()]


def clear_run(out: pathlib.Path, names):
  """Removes what ``earlier_run`` finds (nothing else of ``out``)."""
  for path in earlier_run(out, names):
    if path.is_dir():
      shutil.rmtree(path)
    else:
      path.unlink()


def claim_out(root: pathlib.Path, outs: list[pathlib.Path], names, *, resume: bool,
              overwrite: bool, dry_run: bool = False, lock: bool = False) -> IO | None:
  """Makes the ``--out`` directories of a run, before any work. Refuses a path that is a
  file, and an earlier run's files unless ``resume`` (continue it) or ``overwrite`` (cleared
  by :func:`replace_earlier` once the run can start: a command that fails before it, on
  its data say, loses nothing); a dry run writes only dry_run.json, so it neither refuses
  nor clears a run.  With ``lock`` (a run's main process), first :func:`lock_out`: returns
  the lock's file, to hold for the run."""
  for path in (root, *outs):
    if path.exists() and not path.is_dir():
      raise SystemExit(f"--out {root}: {path} exists and is not a directory")
  make_dirs(root, [root])
  if dry_run:
    return None
  held = lock_out(root) if lock else None
  try:
    earlier = earlier_run(root, names)
    if resume and earlier and not overwrite:
      check_layout(root, outs, names)
    if earlier and not (resume or overwrite):
      shown = ", ".join(str(p.relative_to(root)) for p in earlier[:4])
      raise SystemExit(f"--out {root} holds an earlier run ({shown}"
                       f"{', ...' if earlier[4:] else ''}): pass --resume to continue it, or"
                       " --overwrite to replace it")
    make_dirs(root, outs)
  except BaseException:
    if held is not None:  # refused: the lock goes with the command
      held.close()
    raise
  return held


# The file a run holds locked in its --out; a run's files, not its results (earlier_run).
LOCK_FILE = ".run.lock"


def lock_out(root: pathlib.Path) -> IO:
  """Locks ``root/.run.lock`` for a run (``fcntl.lockf``: a POSIX lock, which the kernel
  drops when the process ends, ``kill -9`` included, and which holds across NFS) and writes
  who holds it.  A second run in the same ``--out`` (two runs, or a ``--resume`` of a run
  that is still going) is refused in one line naming the holder: the two would write one
  ``metrics.jsonl`` and one checkpoint directory.  Keep the returned file open for the run
  (closing it drops the lock)."""
  path = root / LOCK_FILE
  try:
    held = open(path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
  except OSError as e:
    raise SystemExit(f"--out {root}: cannot open {path} ({e.strerror or e})") from None
  try:
    fcntl.lockf(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    held.seek(0)
    holder = held.read().strip() or "another process"
    held.close()
    raise SystemExit(f"--out {root} is in use by another run ({holder}): wait for it to"
                     " end, or choose another --out") from None
  held.seek(0)
  held.truncate()
  held.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
  held.flush()
  return held


def replace_earlier(root: pathlib.Path, outs: list[pathlib.Path], names):
  """``--overwrite``: clears an earlier run from ``root`` (:func:`clear_run`) and makes the
  run's directories again, as the run starts (after its arguments, devices and data)."""
  clear_run(root, names)
  make_dirs(root, [root, *outs])


def make_dirs(root: pathlib.Path, paths: list[pathlib.Path]):
  """Makes the folders ``paths`` of ``--out root``, refusing in one line one that cannot be
  made or written into: said before any work, not at the first file a run (or a dry run's
  plan, at its end) writes."""
  for path in paths:
    try:
      path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise SystemExit(f"--out {root}: cannot make {path} ({e.strerror or e})") from None
    if not os.access(path, os.W_OK | os.X_OK):
      raise SystemExit(f"--out {root}: cannot write into {path} ({why_unwritable(path)})")


def why_unwritable(path: pathlib.Path) -> str:
  """Why a directory that exists cannot be written into: its file system mounted read-only,
  or its permissions."""
  read_only = os.statvfs(path).f_flag & os.ST_RDONLY
  return "a read-only file system" if read_only else "its permissions"


def check_layout(root: pathlib.Path, outs: list[pathlib.Path], names):
  """``--resume`` continues the run in ``root`` as it was laid out: one optimizer's files in
  ``root`` itself, or a comparison's in ``root/<optimizer>`` (``outs`` says which this
  command writes).  The other layout would start fresh runs beside the earlier one."""
  alone = [f for f in RUN_FILES if f != "comparison.json" and (root / f).exists()]
  compared = [n for n in names if any((root / n / f).exists() for f in RUN_FILES)]
  if outs == [root] and compared:
    raise SystemExit(f"--out {root} holds a comparison of {', '.join(compared)} (one directory"
                     f" each): resume it with --optimizer {','.join(compared)}")
  if outs != [root] and alone:
    try:
      was = json.loads((root / "config.json").read_text())["optimizer"]
    except (OSError, ValueError, KeyError, TypeError):
      was = "its optimizer"
    raise SystemExit(f"--out {root} holds one optimizer's run ({', '.join(alone[:3])}): resume"
                     f" it with --optimizer {was} alone")


def read_summary(out: pathlib.Path) -> dict | None:
  """``summary.json`` of a finished run, or None (none there, no JSON object, or a ``step``
  that is no int; one without a ``step``, from before summaries had one, is taken)."""
  try:
    summary = json.loads((out / "summary.json").read_text())
  except (OSError, json.JSONDecodeError):
    return None
  if not isinstance(summary, dict) or type(summary.get("step", 0)) is not int:
    return None
  return summary


def restart_metrics(path: pathlib.Path, start_step: int) -> list[dict]:
  """Rewrites ``metrics.jsonl`` with its rows up to ``start_step`` (what the restored state
  has seen: a killed run may have logged past it) and returns them."""
  rows = read_metrics(path, start_step)
  write_atomically(path, "".join(json.dumps(r) + "\n" for r in rows))
  return rows


def write_config(out: pathlib.Path, args, name: str, cfg, steps: int, tokenizer,
                 optimizer_state_bytes: int, mesh):
  """``config.json``: the flags, the model config and the sizes of the run."""
  write_atomically(out / "config.json", json.dumps(
      {**{k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()},
       "optimizer": name, "model_config": dataclasses.asdict(cfg), "steps_total": steps,
       "tokenizer_name": tokenizer.name, "vocab_size": tokenizer.vocab_size,
       "params": cfg.num_params(), "optimizer_state_bytes": optimizer_state_bytes,
       "mesh": None if mesh is None else dict(mesh.shape), "processes": jax.process_count()},
      indent=2) + "\n")


def write_summary(out: pathlib.Path, summary: dict):
  """``summary.json``: one optimizer's final figures."""
  write_atomically(out / "summary.json", json.dumps(summary, indent=2) + "\n")


def write_comparison(out: pathlib.Path, summaries: dict[str, dict]):
  """``comparison.json``: the summaries of the optimizers of one run, by name."""
  write_atomically(out / "comparison.json", json.dumps(summaries, indent=2) + "\n")


def perplexity(loss: float) -> float:
  """exp(loss), ``inf`` past what a float holds."""
  return math.exp(loss) if loss < 709 else math.inf


def format_ppl(ppl: float) -> str:
  """A perplexity for people: 12.34, or 1.234e+08 / inf rather than hundreds of digits."""
  return f"{ppl:.2f}" if ppl < 1e6 else f"{ppl:.3e}"


def print_table(summaries: dict[str, dict]):
  """The summaries side by side: learning rate, memory, tokens/s, model FLOPs per token,
  MFU, validation loss and perplexity."""
  def fmt_bytes(b):
    return "n/a" if b is None else f"{b / 2**20:,.1f} MiB"

  print(f"\n{'optimizer':14s} {'lr':>7s} {'opt state':>12s} {'step mem':>12s} {'peak mem':>12s} "
        f"{'tokens/s':>10s} {'GFLOP/tok':>9s} {'MFU':>6s} {'val loss':>9s} {'val ppl':>9s}")
  for name, s in summaries.items():
    tps = "n/a" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:,.0f}"
    per_token = s.get("model_flops_per_token")
    gflop = "n/a" if per_token is None else f"{per_token / 1e9:.4g}"
    mfu = "n/a" if s.get("mfu") is None else f"{100 * s['mfu']:.1f}%"
    lr = "n/a" if s.get("peak_lr") is None else f"{s['peak_lr']:g}"
    print(f"{name:14s} {lr:>7s} {fmt_bytes(s['optimizer_state_bytes']):>12s} "
          f"{fmt_bytes(s.get('step_memory_bytes')):>12s} "
          f"{fmt_bytes(s['peak_memory_bytes']):>12s} {tps:>10s} {gflop:>9s} {mfu:>6s} "
          f"{s.get('eval_loss', float('nan')):9.4f} "
          f"{format_ppl(s.get('eval_ppl', float('nan'))):>9s}")
  if all(s.get("peak_lr_is_default") for s in summaries.values()):
    print("lr: the peak learning rate, each optimizer's default from its paper (--lr sets one"
          " for all): the rows compare the papers' recipes, not one learning rate")
  print("GFLOP/tok: model FLOPs per token (6N + 12 L D T, examples/llama/flops.py); MFU: that"
        " x tokens/s over the devices' dense bf16 peak (data sheet, or --peak-tflops; n/a where"
        " unknown)")
  print("step mem: XLA's plan for one train step; peak mem: the device allocator's peak since"
        " the process started (a later optimizer reports at least an earlier one's)")

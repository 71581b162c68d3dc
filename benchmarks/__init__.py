"""The benchmarks behind BENCHMARKS.md, run as modules from the repository root.

  python -m benchmarks.refresh --help

so that ``galore_jax`` and ``examples.llama`` import from the checkout.
"""

import argparse
import pathlib


def check_out(path, directory: bool = False):
  """Refuses (``SystemExit``, one line) an --out that cannot be written before any measuring
  starts: a file on the way to it, or (for a result file) a directory of that name. ``path``
  is the result's directory if ``directory``, else its file; ``None`` passes.

  >>> import tempfile
  >>> d = pathlib.Path(tempfile.mkdtemp())
  >>> _ = (d / "f").write_text("x")
  >>> check_out(d / "new" / "r.json")
  >>> try:
  ...   check_out(d / "f" / "r.json")
  ... except SystemExit as e:
  ...   print(str(e).replace(str(d), "D"))
  --out: D/f is not a directory
  """
  if path is None:
    return
  path = pathlib.Path(path)
  if not directory and path.is_dir():
    raise SystemExit(f"--out: {path} is a directory, not a file")
  for p in [path] * directory + [path.parent, *path.parents]:
    if p.exists():
      if not p.is_dir():
        raise SystemExit(f"--out: {p} is not a directory")
      return


def comma_list(parser: argparse.ArgumentParser, flag: str, text: str, *, known=None,
               parse=None) -> list:
  """The items of the comma list ``text`` given as ``flag``, each ``parse`` d where given;
  ``parser.error`` (one line naming ``flag``) for an item not in ``known`` or that ``parse``
  refuses (``argparse.ArgumentTypeError``), before anything runs.

  >>> p = argparse.ArgumentParser(prog="demo")
  >>> comma_list(p, "--sizes", "1b,7b", known=("1b", "7b"))
  ['1b', '7b']
  >>> comma_list(p, "--ranks", "8,16", parse=int)
  [8, 16]
  """
  items = text.split(",")
  unknown = [s for s in items if known is not None and s not in known]
  if unknown:
    parser.error(f"{flag}: unknown {', '.join(map(repr, unknown))} (choose from"
                 f" {', '.join(known)})")
  if parse is None:
    return items
  try:
    return [parse(s) for s in items]
  except argparse.ArgumentTypeError as e:
    parser.error(f"{flag}: {e}")


def check_seq_len(seq_len, max_seq_lens: dict):
  """Refuses (``SystemExit``, one line) a ``--seq-len`` below 2 (inputs and targets are
  shifted) or past the ``max_seq_len`` of a model named in ``max_seq_lens``: before the data
  loads and the step compiles, not in a traceback after; ``None`` (the size's own) passes.

  >>> check_seq_len(64, {"tiny": 256})
  >>> try:
  ...   check_seq_len(1000, {"tiny": 256})
  ... except SystemExit as e:
  ...   print(e)
  --seq-len 1000 exceeds tiny's max_seq_len 256
  """
  if seq_len is None:
    return
  if seq_len < 2:
    raise SystemExit(f"--seq-len {seq_len}: at least 2 (inputs and targets are shifted)")
  for name, most in max_seq_lens.items():
    if seq_len > most:
      raise SystemExit(f"--seq-len {seq_len} exceeds {name}'s max_seq_len {most}")

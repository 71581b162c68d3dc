"""The benchmarks behind BENCHMARKS.md, run as modules from the repository root.

  python -m benchmarks.refresh --help

so that ``galore_jax`` and ``examples.llama`` import from the checkout.
"""

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

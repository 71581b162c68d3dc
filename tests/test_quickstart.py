"""What a user runs first: the README's Python blocks, and examples/quickstart.py's command
line (a bad flag is one line and exit code 2)."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _quickstart(monkeypatch):
  spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
  module = importlib.util.module_from_spec(spec)
  monkeypatch.setitem(sys.modules, "quickstart", module)  # its dataclass looks itself up there
  spec.loader.exec_module(module)
  return module


# --rank 0 ended in galore_adamw's traceback; --steps 0 or -1 trained nothing and printed
# a validation loss and a negative steps/s; --steps 1 runs only the untimed compile step.
@pytest.mark.parametrize("flag, value", [("--rank", "0"), ("--steps", "1"), ("--steps", "-1")])
def test_a_bad_flag_is_one_line_and_exit_code_2(monkeypatch, capsys, flag, value):
  module = _quickstart(monkeypatch)
  monkeypatch.setattr(sys, "argv", ["quickstart.py", flag, value])
  monkeypatch.setattr(module, "load_corpus", lambda: pytest.fail("ran past the flags"))
  with pytest.raises(SystemExit) as exit_info:
    module.main()
  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert flag in lines[-1] and value in lines[-1], lines
  assert not any("Traceback" in line for line in lines), lines


def test_the_readmes_python_blocks_run_or_say_they_are_excerpts(tmp_path):
  """Each Python block of README.md runs as written, in a fresh process, or says on its first
  line that it is an excerpt (the Usage block used nnx and a model it never made)."""
  blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
  runnable = [b for b in blocks if not b.startswith("# An excerpt")]
  assert runnable, "no block of README.md runs as written"
  for block in runnable:
    proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, f"{block[:200]}...\n{proc.stderr[-3000:]}"

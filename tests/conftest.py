"""Shared test setup.

Compiles are most of the suite's time: the example's tests train the same tiny
configurations many times, each in a fresh process or from fresh closures, and XLA:CPU
compiles each again.  So every test process, and every process a test starts, shares one
persistent compilation cache for the session (a user's own ``JAX_COMPILATION_CACHE_DIR``
is kept), and LLVM compiles at its cheapest level: the programs are tiny, and their numbers
move by round-off only (a tiny model's four losses by <= 7e-7 relative), inside
every test's tolerance (the suite passes at both levels).  Where the jaxlib is known to
have it, XLA:CPU also uses its LLVM IR fusion emitters, not the MLIR ones: round-off
differs between two programs that compute one thing (a scan and its unrolled loop), so
tests that compare such programs allow float32 round-off, not equal bits.

Each test process (one per pytest-xdist worker) runs many modules, and JAX keeps every
executable it compiles (and XLA:CPU the JIT-compiled code behind it) for the life of the
process.  Late in a full run that has ended twice in XLA:CPU's compiler (a segfault, then
"LLVM compilation error: Cannot allocate memory") in tests that pass alone; each module's
executables are released when it is done."""

import atexit
import gc
import os
import shutil
import tempfile
from importlib.metadata import version

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # set before jax is imported
  _CACHE = tempfile.mkdtemp(prefix="galore-jax-tests-xla-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, True)  # by the process that made it
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def _add_xla_flag(name: str, value: str) -> None:
  """Appends ``--name=value`` to XLA_FLAGS unless the user's flags already set ``name``."""
  if name not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{name}={value}".strip()


_add_xla_flag("xla_backend_optimization_level", "0")
# XLA:CPU's MLIR fusion emitters compile 2.4x slower than the LLVM IR ones at that level
# (18 sharded optimizer updates: 37.6 s against 15.6 s). Only where the flag is known to
# exist: XLA aborts on an unknown one, and a later XLA may drop it.
if tuple(int(p) for p in version("jaxlib").split(".")[:2]) < (0, 11):
  _add_xla_flag("xla_cpu_use_fusion_emitters", "false")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  yield
  jax.clear_caches()
  gc.collect()

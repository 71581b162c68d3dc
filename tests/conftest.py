"""Shared test setup: each test process (one per pytest-xdist worker) runs many modules, and
JAX keeps every executable it compiles (and XLA:CPU the JIT-compiled code behind it) for the
life of the process.  Late in a full run that has ended twice in XLA:CPU's compiler (a
segfault, then "LLVM compilation error: Cannot allocate memory") in tests that pass alone;
each module's executables are released when it is done."""

import gc

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  yield
  jax.clear_caches()
  gc.collect()

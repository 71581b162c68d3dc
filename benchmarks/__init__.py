"""The benchmarks behind BENCHMARKS.md, run as modules from the repository root.

  python -m benchmarks.refresh --help

so that ``galore_jax`` and ``examples.llama`` import from the checkout.
"""

"""--per-layer on a mesh (CPU, 8 devices): the same params and optimizer state as the per-layer
run on one device, the state sharded as the whole model's step shards it, and the step's
params and state written into their donated buffers (no resharded copy).

The device count is fixed when JAX starts: one fresh process runs every case."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, re, jax
jax.config.update("jax_num_cpu_devices", 8)
import numpy as np
from flax import nnx
import galore_jax as gj
from examples.llama import build, cli, optimizers, per_layer, train, model as M
from examples.llama.devices import mesh_context, memory_plan, to_device

# tiny with 5 layers: no refresh groups 5 matrices, so a stack's shape in a collective is
# a layer stack's (2 layers: the refresh's gather of a pair of a layer's bases matched)
CFG = M.LlamaConfig("tiny5", 64, 176, 4, 5, V=260, max_seq_len=64)
STEPS, CLIP = 3, 0.05
AXIS = {"auto": jax.sharding.AxisType.Auto, "explicit": jax.sharding.AxisType.Explicit}
RUNS = {"galore_adamw": ["one", "fsdp=8", "explicit data=2,fsdp=2,tensor=2"],
        "adamw": ["one", "data=2,fsdp=2,tensor=2"]}


def mesh_of(run):
  if run == "one":
    return None, []
  kind, axes = run.split() if " " in run else ("auto", run)
  sizes = dict(a.split("=") for a in axes.split(","))
  shape = tuple(int(sizes.get(a, 1)) for a in M.MESH_AXES)
  return (jax.make_mesh(shape, M.MESH_AXES, axis_types=(AXIS[kind],) * 3),
          ["--mesh", axes, "--mesh-axis-types", kind])


def specs(tree):
  return [list(x.sharding.spec) for x in jax.tree.leaves(tree)]


def run(name, where):
  mesh, flags = mesh_of(where)
  args = cli.build_parser().parse_args([
      "--model", "tiny", "--tokenizer", "bytes", "--rank", "8", "--dtype", "fp32",
      "--optimizer", name, "--per-layer", "--grad-clip", str(CLIP), "--update-proj-gap", "2",
      "--batch-size", "8", "--seq-len", "17", "--lr", "1e-2", "--warmup", "0", *flags])
  cli.check_args(args)  # (it refused --per-layer with --mesh)
  args = optimizers.with_defaults(args, name)
  out = {}
  with mesh_context(mesh):
    model, opt, _ = build.build(args, name, CFG, STEPS, mesh)
    step = train.run_step_of(args, model, opt, mesh)
    rng, norms = np.random.default_rng(0), []
    for _ in range(STEPS):
      tokens = to_device(rng.integers(1, CFG.V, (1, 8, 17)).astype(np.int32), mesh, 1)
      norms.append(float(step(model, opt, tokens, pad_id=0)[1]))
    state = nnx.as_pure(opt.opt_state)
    out["params"] = [np.asarray(x).tolist() for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    out["state"] = [np.asarray(x, np.float64).tolist() for x in jax.tree.leaves(state)
                    if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
    out["norms"] = norms
    if mesh is None:
      return out
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    rules = gj.sharding.state_shardings(opt.tx, params)
    _, planned = build.abstract_build(args, name, CFG, STEPS, mesh)
    out["as_rules"] = [x.sharding.is_equivalent_to(s, x.ndim) for x, s in
                       zip(jax.tree.leaves(state), jax.tree.leaves(rules), strict=True)]
    out["as_planned"] = [x.sharding.is_equivalent_to(s.sharding, x.ndim) for x, s in zip(
        jax.tree.leaves(state), jax.tree.leaves(nnx.as_pure(planned.opt_state)), strict=True)]
    out["layer_specs"] = specs(state.layers)
    out["sharded_leaves"] = sum(any(e is not None for e in s) for s in out["layer_specs"])
    compiled = step.lower(model, opt, tokens, pad_id=0).compile()
    plan = memory_plan(compiled)
    out["not_aliased"] = plan["arguments"] - plan["aliased"]
    stacks = {tuple(x.shape) for x in jax.tree.leaves((params["layers"], state.layers))
              if x.ndim > 1}
    out["stack_collectives"] = [
        line.strip()[:400] for line in compiled.as_text().splitlines()
        if (m := re.search(r"= \w+\[([\d,]+)\]\S* (?:all-gather|all-to-all|collective-permute)\(",
                           line)) and tuple(map(int, m.group(1).split(","))) in stacks]
    out["tokens_per_device"] = tokens.addressable_shards[0].data.nbytes
  return out


print("RUNS" + json.dumps({name: {where: run(name, where) for where in runs}
                           for name, runs in RUNS.items()}))
"""


def _close(a, b):
  """Equal to round-off, as tests/llama/test_per_layer.py's ``_assert_close``: the sharded
  step sums in another order, and Adam turns the round-off of a gradient entry near zero
  into a different step of at most the learning rate."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  off = np.abs(a - b) > 2e-6 + 2e-3 * np.abs(b).max()
  assert off.mean() <= 1e-3 and np.abs(a - b).max() <= 1e-2 * max(np.abs(b).max(), 1.0), (
      f"{off.sum()} of {off.size} entries differ; max {np.abs(a - b).max():.3g}")


def test_per_layer_on_a_mesh_equals_one_device():
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  runs = json.loads(proc.stdout.split("RUNS", 1)[1])
  for name, by_mesh in runs.items():
    one = by_mesh.pop("one")
    assert min(one["norms"]) > 0.05  # the clip acted on every step
    for where, got in by_mesh.items():
      np.testing.assert_allclose(got["norms"], one["norms"], rtol=1e-4, err_msg=where)
      for kind in ("params", "state"):
        assert len(got[kind]) == len(one[kind])
        for a, b in zip(got[kind], one[kind]):
          _close(a, b)
      # the state as the rules lay out the whole model's (and as the dry run plans it)
      assert all(got["as_rules"]) and all(got["as_planned"]), (name, where)
      assert got["sharded_leaves"] > 0, (name, where)  # (not every leaf replicated)
      assert all(s[0] is None for s in got["layer_specs"] if s), got["layer_specs"]
      # every param and state buffer donated and written in place: only the tokens are not
      assert got["not_aliased"] == got["tokens_per_device"], (name, where)
      # and no stack is gathered or moved whole (the loop's carry kept the buffers' layout)
      assert not got["stack_collectives"], (name, where, got["stack_collectives"])

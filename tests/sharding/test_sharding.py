"""galore_jax.sharding (and the private Explicit-axes shims and spread): spec rules here;
everything that needs 8 devices runs once in a fresh process (tests/sharding/cases.py) and is
reported case by case."""

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import galore_jax as gj
from galore_jax import _explicit
from galore_jax import _spread
from galore_jax import flax_metadata
from galore_jax import projection
from galore_jax import sharding

CASES_PY = pathlib.Path(__file__).with_name("cases.py")
CASES_TIMEOUT_S = 900  # per process; the cases a process did not reach get one more


# ------------------------------------------------------------------ spec rules (no devices)


@pytest.mark.parametrize(
    "shape, dims, spec, want",
    [
        # plain matrix taken as given: (m, n)
        ((64, 32), None, ("data", "model"), ("data", "model")),
        # scanned (L, in, out): (L, out, in)
        ((4, 16, 32), gj.DimensionNumbers(1, 2), (None, "fsdp", "tensor"),
         (None, "tensor", "fsdp")),
        # attention (d, heads, head_dim), heads sharded: the merged output axis keeps it
        ((16, 4, 8), gj.DimensionNumbers(0, (1, 2)), ("fsdp", "tensor", None),
         ("tensor", "fsdp")),
        # both merged axes sharded, major first: one axis over both mesh axes in order
        ((16, 4, 8), gj.DimensionNumbers(0, (1, 2)), (None, "a", "b"), (("a", "b"), None)),
        # only the minor axis sharded: not expressible after the reshape -> replicated
        ((16, 4, 8), gj.DimensionNumbers(0, (1, 2)), (None, None, "b"), (None, None)),
        # short spec = trailing None
        ((64, 32), None, ("data",), ("data", None)),
        ((64, 32), None, None, (None, None)),
    ],
)
def test_matrix_spec(shape, dims, spec, want):
  assert sharding.matrix_spec(spec, projection.matrix_view(shape, dims)) == want


@pytest.mark.parametrize("call, match", [
    # a string's letters were read as the spec's entries: ("f", "s") for a 2-D leaf
    (lambda v: sharding.basis_spec("fsdp", v, "right"),
     r"^matrix_spec: spec must be None or a sequence of entries \(a PartitionSpec or a tuple\),"
     r" got 'fsdp'\.$"),
    # a spec longer than the leaf was cut to its rank
    (lambda v: projection.matrix_spec(("data", "model", "x"), v),
     r"^matrix_spec: spec \('data', 'model', 'x'\) has 3 entries, more than the leaf's 2 axes\.$"),
    # a mesh axis of size 0 divided by zero
    (lambda v: projection.coefficient_matrix_spec((None, "fsdp"), 64, 32, False, True,
                                                  {"fsdp": 0}),
     r"^coefficient_matrix_spec: axis_sizes must map mesh axes to positive ints, got"
     r" \{'fsdp': 0\}\.$"),
])
def test_spec_helpers_bad_input_is_one_line(call, match):
  with pytest.raises(ValueError, match=match):
    call(projection.matrix_view((64, 32), None))


@pytest.mark.parametrize(
    "proj_type, basis, coef",
    [
        # (64@data, 32@model): std -> right basis (32, r) on model, coefficients (64, r)
        ("std", {"right": ("model", None)}, ("data", None)),
        ("reverse_std", {"left": ("data", None)}, (None, "model")),
        ("full", {"left": ("data", None), "right": ("model", None)}, (None, None)),
    ],
)
def test_basis_and_coefficient_specs(proj_type, basis, coef):
  view = projection.matrix_view((64, 32), None)
  left, right = projection.projection_sides(proj_type, 64, 32)
  got = {side: tuple(sharding.basis_spec(("data", "model"), view, side))
         for side, on in (("left", left), ("right", right)) if on}
  assert got == basis
  assert tuple(sharding.coefficient_spec(("data", "model"), view, left, right)) == coef


@pytest.mark.parametrize("side", ["Left", "top", None])
def test_basis_spec_refuses_a_side_that_is_neither_left_nor_right(side):
  """Any other side read as "right": a typo gave the other side's spec without a word."""
  view = projection.matrix_view((64, 32), None)
  with pytest.raises(ValueError, match=r"^basis_spec: side must be 'left' or 'right', got"):
    sharding.basis_spec(("data", "model"), view, side)


@pytest.mark.parametrize(
    "mat_spec, shape, sides, want",
    [
        # pure FSDP on the projected side: the coefficients take the axis over
        ((None, "fsdp"), (64, 32), (False, True), ("fsdp", None)),
        (("fsdp", None), (16, 64), (True, False), (None, "fsdp")),
        # after the other side's own axes
        (("tensor", "fsdp"), (64, 32), (False, True), (("tensor", "fsdp"), None)),
        # 8 x 4 devices do not divide 48 rows: the side keeps its own axis, the rank takes fsdp
        (("tensor", "fsdp"), (48, 32), (False, True), ("tensor", "fsdp")),
        # batch axes unchanged; nothing to move from an unsharded side
        (("layers", None, "fsdp"), (4, 64, 32), (False, True), ("layers", "fsdp", None)),
        (("layers", "tensor", None), (4, 64, 32), (False, True), ("layers", "tensor", None)),
        # both sides projected: r x r, not sharded
        (("fsdp", "tensor"), (64, 32), (True, True), (None, None)),
        # names that are not the mesh's (logical names): nothing moves
        ((None, "embed"), (64, 32), (False, True), (None, None)),
        # the other side (5461, LLaMA-1B's MLP) does not divide: the rank axis takes them
        ((None, "fsdp"), (5461, 2048), (False, True), (None, "fsdp")),
        (("fsdp", None), (2048, 5461), (True, False), ("fsdp", None)),
        # ... where they divide the rank (16 here), else nowhere
        ((None, ("fsdp", "tensor")), (5461, 2048), (False, True), (None, None)),
    ],
)
def test_coefficients_take_over_the_projected_sides_mesh_axes(mat_spec, shape, sides, want):
  sizes = {"fsdp": 8, "tensor": 4, "layers": 1}
  *_, m, n = shape
  got = projection.coefficient_matrix_spec(mat_spec, m, n, *sides, sizes, rank=16)
  assert got[-2:] == want[-2:] and got[:-2] == want[:-2]
  # without mesh sizes the rule keeps only the unprojected side's own sharding
  kept = projection.coefficient_matrix_spec(mat_spec, m, n, *sides)
  assert kept[-2:] == ((None if sides[0] else mat_spec[-2]), (None if sides[1] else mat_spec[-1]))


def test_coefficient_spec_reads_the_context_mesh():
  view = projection.matrix_view((64, 32), None)  # std: right basis, coefficients (64, r)
  assert tuple(sharding.coefficient_spec((None, "fsdp"), view, False, True)) == (None, None)
  mesh = jax.make_mesh((1,), ("fsdp",))
  assert tuple(sharding.coefficient_spec((None, "fsdp"), view, False, True, mesh)) == (
      "fsdp", None)
  with jax.set_mesh(mesh):
    assert tuple(sharding.coefficient_spec((None, "fsdp"), view, False, True)) == (
        "fsdp", None)


def test_state_shardings_on_an_abstract_mesh():
  """A mesh of devices this host does not have (a plan for 8 GPUs on one CPU): the shardings
  follow the same rules, and shard_shape says what each device would hold."""
  mesh = jax.sharding.AbstractMesh((8,), ("fsdp",))
  # (in@fsdp, out): std projects in (the smaller side), the moments take fsdp over on out
  w = jax.ShapeDtypeStruct((64, 128), jnp.float32,
                           sharding=jax.NamedSharding(mesh, P("fsdp", None)))
  tx = gj.galore_adamw(1e-3, rank=4)
  target = gj.sharding.abstract_state(tx, {"w": w})
  mu, basis = target[0].inner_state.mu["w"], target[0].bases[0].left
  assert mu.shape == (4, 128) and mu.sharding.shard_shape(mu.shape) == (4, 16)
  assert basis.shape == (64, 4) and basis.sharding.shard_shape(basis.shape) == (8, 4)


def test_unsharded_params_give_unsharded_state():
  params = {"w": jnp.ones((8, 4))}
  state = gj.galore_adamw(1e-2, rank=2).init(params)
  assert _explicit.sharding_of(params["w"]) is None
  assert all(not isinstance(x.sharding, jax.sharding.NamedSharding)
             for x in jax.tree.leaves(state))


def test_state_shardings_needs_a_sharding():
  with pytest.raises(ValueError, match="no param carries a NamedSharding"):
    sharding.state_shardings(gj.galore_adamw(1e-2, rank=2), {"w": jnp.ones((8, 4))})


@pytest.mark.parametrize("fn", [sharding.state_shardings, sharding.abstract_state])
def test_state_shardings_needs_a_transform(fn):
  """tx=None was reported as params without a NamedSharding."""
  with pytest.raises(ValueError, match=r"^state_shardings: tx must be an optax\.GradientTransformation,"
                     r" got None \(NoneType\)\.$"):
    fn(None, {"w": jnp.ones((8, 4))})


def test_spread_without_mesh_is_the_function():
  x = jnp.arange(12.0).reshape(3, 2, 2)
  (y,) = _spread.spread(lambda a, s: [a * s], [x], None, (2.0,))
  assert (y == 2 * x).all()


def test_einsum_without_types_is_jnp_einsum():
  a, b = jnp.ones((4, 3)), jnp.ones((3, 2))
  assert (_explicit.einsum("mn,nr->mr", a, b) == jnp.einsum("mn,nr->mr", a, b)).all()


def test_variable_metadata_gets_the_low_rank_spec():
  from flax import nnx

  with jax.set_mesh(jax.make_mesh((1, 1), ("fsdp", "tensor"))):
    v = nnx.Param(jnp.zeros((64, 32)), out_sharding=("fsdp", "tensor"))
  w = flax_metadata.variable_with_spec(v, jnp.zeros((64, 2)), lambda s: (s[0], None))
  assert type(w) is nnx.Param
  assert w.get_metadata()["out_sharding"] == ("fsdp", None)
  assert w.get_value().shape == (64, 2)


ONE_DEVICE = {
    "galore_adamw[svd]": lambda: gj.galore_adamw(1e-2, rank=2),
    "galore_adamw[power]": lambda: gj.galore_adamw(1e-2, rank=2, method="power"),
    "ldadamw": lambda: gj.ldadamw(1e-2, rank=2),
    "apollo_adamw[svd]": lambda: gj.apollo_adamw(1e-2, rank=2, proj="svd"),
    "galore_adamw_8bit": lambda: gj.galore_adamw_8bit(1e-2, rank=2, min_8bit_size=1),
    "adamw_8bit": lambda: gj.adamw_8bit(1e-2, min_8bit_size=1),
}


@pytest.mark.parametrize("name", sorted(ONE_DEVICE))
def test_one_device_explicit_mesh(name):
  """A one-device mesh with Explicit axes types its arrays with a sharding: the refresh's
  factorizations then go through the mesh's path, and each update equals the unsharded one
  (two steps: the first refreshes). Without jax.set_mesh, one line says what to do."""
  mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Explicit,))
  w = jax.random.normal(jax.random.key(0), (8, 6))
  tx = ONE_DEVICE[name]()
  plain_state, plain = tx.init({"w": w}), []
  for _ in range(2):
    u, plain_state = tx.update({"w": w}, plain_state, {"w": w})
    plain.append(u["w"])
  with jax.set_mesh(mesh):
    ws = {"w": jax.device_put(w, jax.NamedSharding(mesh, jax.P("fsdp")))}
    state = tx.init(ws)
    for want in plain:
      u, state = jax.jit(tx.update)(ws, state, ws)
      assert u["w"].sharding.spec == jax.P("fsdp", None)
      np.testing.assert_allclose(np.asarray(u["w"]), np.asarray(want), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"^galore_jax: the arrays are sharded over Explicit mesh"
                     r" axes \('fsdp',\), but no mesh is set: call init and update under"
                     r" jax.set_mesh\(mesh\).$"):
    tx.update(ws, state, ws)


# ------------------------------------------------------------------ 8 CPU devices


def run_cases(names):
  """Run ``cases.py`` on ``names`` (all when empty) in a fresh 8-device process.

  Returns ``({case: result}, how the process ended)``; a process that dies mid-way (a crash,
  a kill, or :data:`CASES_TIMEOUT_S` run out on a slow machine; not a failing case) still
  returns the cases it finished.
  """
  # The 8 virtual devices share CI's 2 cores with another test worker: a device thread kept
  # waiting past XLA:CPU's rendezvous limit (40 s) aborts the whole process, every later case
  # lost. The cases' own timeout (below) still ends a real hang.
  flags = (os.environ.get("XLA_FLAGS", "")
           + " --xla_cpu_collective_call_terminate_timeout_seconds=900")
  with tempfile.NamedTemporaryFile(suffix=".log") as log:
    # cases.py passes a case's stderr on after it ends: a crash mid-case leaves it here.
    env = dict(os.environ, PYTHONPATH=str(CASES_PY.parents[2]), XLA_FLAGS=flags.strip(),
               CASES_LOG=log.name)
    try:
      proc = subprocess.run([sys.executable, str(CASES_PY), *names],
                            capture_output=True, text=True, timeout=CASES_TIMEOUT_S, env=env)
      stdout, stderr, ended = proc.stdout, proc.stderr, f"rc={proc.returncode}"
    except subprocess.TimeoutExpired as e:  # killed: the cases it finished still count
      stdout, stderr = (x.decode(errors="replace") if isinstance(x, bytes) else x or ""
                        for x in (e.stdout, e.stderr))
      ended = f"timed out after {CASES_TIMEOUT_S} s"
    case_log = open(log.name, errors="replace").read()
  out = {}
  for line in stdout.splitlines():
    if line.startswith("{"):
      r = json.loads(line)
      out[r["case"]] = r
  return out, (f"{ended}, stderr tail:\n{stderr[-2000:]}"
               f"\nthe last case's stderr tail:\n{case_log[-2000:]}")


def test_run_cases_keeps_what_a_timed_out_process_finished(monkeypatch):
  """A process killed at its timeout (a slow machine) is a death, not an error: the cases it
  finished count and the fixture reruns the others.  It raised ``TimeoutExpired`` and lost
  them all."""
  def killed(cmd, **kwargs):
    done = json.dumps({"case": "rules", "ok": True, "error": None}) + "\n"
    raise subprocess.TimeoutExpired(cmd, kwargs["timeout"], output=done.encode(), stderr=b"")

  monkeypatch.setattr(subprocess, "run", killed)
  out, ended = run_cases(["rules", "rules_ldadam_and_full"])
  assert list(out) == ["rules"] and out["rules"]["ok"]
  assert ended.startswith(f"timed out after {CASES_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def results():
  """Every case's result. A process that died (not a case that failed) is run once more on
  the cases it did not reach, in a new process, and says so in a warning; a case missing
  after that carries both processes' exit codes and stderr."""
  out, ended = run_cases([])
  missing = [name for name in CASES if name not in out]
  if missing:
    warnings.warn(f"cases.py died before {missing[0]} ({ended.splitlines()[0]}); "
                  f"running the {len(missing)} cases it did not reach once more")
    again, ended_again = run_cases(missing)
    out.update(again)
    for name in missing:
      out.setdefault(name, {"case": name, "ok": False,
                            "error": f"did not run:\n{ended}\nrerun: {ended_again}"})
  return out


CASES = [
    "rules",
    "rules_ldadam_and_full",
    "agree_auto_svd",
    "agree_explicit_svd",
    "agree_auto_randomized",
    "agree_explicit_random",
    "agree_explicit_power_staggered_transport",
    "agree_auto_lazy_reset",
    "per_leaf_policies_share_stacks",
    "ldadam_agrees",
    "adafactor_agrees",
    "refresh_is_spread",
    "refresh_keeps_bases_sharded",
    "update_inside_shard_map",
    "same_shaped_leaves_share_a_stack",
    "several_matrices_per_device",
    "refresh_in_passes",
    "refresh_in_passes_of_any_stack",
    "nnx_optimizer",
    "nd_kernels_under_explicit_axes",
    "unsupported_meshes_are_clear_errors",
    "checkpoint_onto_another_mesh",
    "adam_8bit_on_a_mesh",
    "partly_rejected_stack_on_a_mesh",
    "successors_on_a_mesh",
    "power_warm_starts_on_a_mesh",
    "pure_fsdp_shards_low_rank_state",
    "back_projection_gathers_a_few_layers",
    "projections_in_passes_of_any_layer_count",
    "train_step_plan_below_adamw",
    "refresh_step_plan_below_adamw",
    "relora_merge_on_a_mesh",
    "nn_layers_on_explicit_axes",
    "nn_layers_take_out_sharding",
]


def test_cases_list_is_complete():
  text = CASES_PY.read_text()
  defined = [line.split("def ")[1].split("(")[0]
             for line, prev in zip(text.splitlines()[1:], text.splitlines())
             if prev.strip() == "@case"]
  assert defined == CASES


@pytest.mark.parametrize("name", CASES)
def test_on_8_devices(results, name):
  r = results[name]
  assert r["ok"], r["error"]
  # XLA's "Involuntary full rematerialization": an array replicated whole on every device.
  assert r["remat"] == 0, f"{name}: {r['remat']} involuntary full rematerializations"

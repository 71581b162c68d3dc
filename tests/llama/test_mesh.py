"""Sharded and multi-host training (CPU): losses on a mesh match one device.

The device count is fixed when JAX starts, so every sharded run is a fresh
process (``train.py --cpu-devices 8``); the runs share the session's compilation cache
(tests/conftest.py).
"""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from examples.llama import train

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "llama" / "train.py"
STEPS = 5
RTOL = 2e-3


def run_args(out, *extra):
  # The refresh gap 3 puts a basis refresh (the SVDs spread over the mesh) at step 4.
  return ["--model", "tiny", "--tokenizer", "bytes", "--dtype", "fp32", "--seq-len", "32",
          "--batch-size", "8", "--steps", str(STEPS), "--log-every", "1", "--eval-every", "0",
          "--eval-tokens", "400", "--save-every", "4", "--max-docs", "300", "--rank", "8",
          "--update-proj-gap", "3", "--optimizer", "galore_adamw", "--out", str(out), *extra]


def env():
  return {**os.environ, "PYTHONPATH": str(ROOT)}


def start(out, *extra):
  return subprocess.Popen([sys.executable, str(SCRIPT), *run_args(out, *extra)], env=env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc):
  output, _ = proc.communicate(timeout=400)
  assert proc.returncode == 0, output[-4000:]
  return output


def losses(out):
  rows = [json.loads(l) for l in (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """One device; 2x2x2 with Auto axes; fsdp=8 with Explicit axes (two at a time)."""
  base = tmp_path_factory.mktemp("mesh")
  dirs = {"single": base / "single", "auto": base / "auto", "explicit": base / "explicit"}
  first = [start(dirs["single"]),
           start(dirs["auto"], "--cpu-devices", "8", "--mesh", "data=2,fsdp=2,tensor=2")]
  outputs = [finish(p) for p in first]
  outputs.append(finish(start(dirs["explicit"], "--cpu-devices", "8", "--mesh", "fsdp=8",
                              "--mesh-axis-types", "explicit")))
  return {"dirs": dirs, "outputs": dict(zip(dirs, outputs))}


@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_sharded_run_matches_single_device(runs, kind):
  single, sharded = losses(runs["dirs"]["single"]), losses(runs["dirs"][kind])
  assert sharded == pytest.approx(single, rel=RTOL)
  assert sharded[-1] < sharded[0] - 1  # it trains
  config = json.loads((runs["dirs"][kind] / "config.json").read_text())
  assert config["mesh"] == ({"data": 2, "fsdp": 2, "tensor": 2} if kind == "auto"
                            else {"data": 1, "fsdp": 8, "tensor": 1})
  summary = json.loads((runs["dirs"][kind] / "summary.json").read_text())
  reference = json.loads((runs["dirs"]["single"] / "summary.json").read_text())
  assert summary["eval_loss"] == pytest.approx(reference["eval_loss"], rel=RTOL)
  assert summary["optimizer_state_bytes"] == reference["optimizer_state_bytes"]


def test_resume_on_the_mesh_restores_sharded_state(runs):
  # Drop the last checkpoint: --resume restores step 4 onto the Explicit fsdp=8 mesh
  # and redoes step 5 exactly.
  out = runs["dirs"]["explicit"]
  full = losses(out)
  for path in sorted((out / "checkpoints").iterdir()):
    if path.name == str(STEPS):
      subprocess.run(["rm", "-rf", str(path)], check=True)
  output = finish(start(out, "--cpu-devices", "8", "--mesh", "fsdp=8",
                        "--mesh-axis-types", "explicit", "--resume"))
  assert "resumed from step 4" in output
  assert losses(out) == pytest.approx(full, rel=1e-6)


LAYOUT = """
import json, jax
jax.config.update("jax_num_cpu_devices", 8)
from flax import nnx
import galore_jax as gj
from examples.llama import build, cli, model as M
args = cli.build_parser().parse_args(["--model", "tiny", "--rank", "8", "--dtype", "fp32"])
out = {}
AXIS_TYPES = [("auto", jax.sharding.AxisType.Auto), ("explicit", jax.sharding.AxisType.Explicit)]
for kind, axis in AXIS_TYPES:
  mesh = jax.make_mesh((2, 2, 2), M.MESH_AXES, axis_types=(axis,) * 3)
  model, opt, _ = build.build(args, "galore_adamw", M.CONFIGS["tiny"], 10, mesh)
  spec = lambda x: [e if e is None or isinstance(e, str) else list(e) for e in x.sharding.spec]
  flat = lambda tree: {jax.tree_util.keystr(p): [list(x.shape), spec(x)]
                       for p, x in jax.tree_util.tree_leaves_with_path(tree)}
  params = nnx.state(model, nnx.Param)
  with jax.set_mesh(mesh):
    expect = gj.sharding.state_shardings(opt.tx, nnx.to_pure_dict(params))
  ok = [x.sharding.spec == s.spec for x, s in zip(
      jax.tree.leaves(nnx.as_pure(opt.opt_state)), jax.tree.leaves(expect), strict=True)]
  out[kind] = {"params": flat(nnx.to_pure_dict(params)),
              "opt": flat(nnx.to_pure_dict(nnx.state(opt, nnx.OptState))),
               "as_state_shardings": all(ok)}
  # the dry run's per-device sizes (abstract) = device 0's shards of the built arrays
  on_device_0 = lambda tree: sum(s.data.nbytes for x in jax.tree.leaves(tree)
                                 for s in x.addressable_shards if s.device == jax.devices()[0])
  param_dtype, dtype = build.DTYPES[args.dtype]
  make = lambda: M.Llama(M.CONFIGS["tiny"], dtype=dtype, param_dtype=param_dtype,
                         method=build.method(args), rngs=nnx.Rngs(args.seed))
  out[kind]["per_device"] = [build.per_device_bytes(opt.tx, make, mesh),
                             {"weight_bytes": on_device_0(nnx.state(model)),
                              "optimizer_state_bytes": on_device_0(nnx.as_pure(opt.opt_state))}]
  # 8-bit states under the model's logical names (their absmax metadata once read the
  # logical names as mesh axes and failed)
  for name in ["adamw_8bit", "galore_adamw_8bit"]:
    model, opt, _ = build.build(args, name, M.CONFIGS["tiny"], 10, mesh)
    with jax.set_mesh(mesh):
      expect = gj.sharding.state_shardings(opt.tx, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    out[kind][name] = all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(
        jax.tree.leaves(nnx.as_pure(opt.opt_state)), jax.tree.leaves(expect), strict=True))
  # low-rank factors split their rank axis as the kernel splits the axis it stands in for
  lowrank = cli.build_parser().parse_args([
      "--model", "tiny", "--rank", "8", "--dtype", "fp32", "--method", "lowrank", "--mesh",
      "data=2,fsdp=2,tensor=2"])
  model, opt, _ = build.build(lowrank, "galore_adamw", M.CONFIGS["tiny"], 10, mesh)
  out[kind]["lowrank"] = flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  with jax.set_mesh(mesh):
    expect = gj.sharding.state_shardings(opt.tx, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  out[kind]["lowrank_state"] = all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(
      jax.tree.leaves(nnx.as_pure(opt.opt_state)), jax.tree.leaves(expect), strict=True))
print("LAYOUT" + json.dumps(out))
"""


def test_params_and_optimizer_state_are_sharded_by_the_rules():
  proc = subprocess.run([sys.executable, "-c", LAYOUT], env=env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  layout = json.loads(proc.stdout.split("LAYOUT", 1)[1])
  for kind in ["auto", "explicit"]:
    params, opt = layout[kind]["params"], layout[kind]["opt"]
    assert params["['layers']['q_proj']['kernel']"] == [[2, 64, 64], [None, "fsdp", "tensor"]]
    assert params["['layers']['down_proj']['kernel']"] == [[2, 176, 64], [None, "tensor", "fsdp"]]
    assert params["['embed']['embedding']"] == [[260, 64], ["tensor", "fsdp"]]
    assert params["['lm_head']['kernel']"] == [[64, 260], ["fsdp", "tensor"]]
    assert params["['norm']['scale']"][1] in ([], [None])
    assert layout[kind]["as_state_shardings"]
    assert layout[kind]["adamw_8bit"] and layout[kind]["galore_adamw_8bit"]
    planned, built = layout[kind]["per_device"]
    assert planned == built and built["optimizer_state_bytes"] > 0, (planned, built)
    low_rank = {k: v for k, v in opt.items() if 8 in v[0]}
    assert low_rank, opt
    for key, (shape, spec) in low_rank.items():  # the rank axis is never sharded
      spec = spec + [None] * (len(shape) - len(spec))
      assert all(e is None for n, e in zip(shape, spec) if n == 8), (key, shape, spec)
    # gate (L, D, F): the right basis spans D (fsdp), the moments keep F's sharding (tensor)
    # and take over D's fsdp (176 divides over 2 x 2).
    mu = "['opt_state'][0]['inner_state']['mu']['layers']['gate_proj']['kernel']"
    assert opt[mu] == [[2, 176, 8], [None, ["tensor", "fsdp"], None]]
    assert opt["['opt_state'][0]['inner_state']['mu']['embed']['embedding']"][1] == [
        "tensor", "fsdp"]
    # --method lowrank: A (in, r) and B (r, out) are each split over both mesh axes (the
    # rank axis was replicated, and under pure FSDP half the factors were whole on each device)
    factors = layout[kind]["lowrank"]
    assert factors["['layers']['q_proj']['a']"] == [[2, 64, 8], [None, "fsdp", "tensor"]]
    assert factors["['layers']['q_proj']['b']"] == [[2, 8, 64], [None, "fsdp", "tensor"]]
    assert factors["['layers']['down_proj']['a']"] == [[2, 176, 8], [None, "tensor", "fsdp"]]
    assert factors["['layers']['down_proj']['b']"] == [[2, 8, 64], [None, "tensor", "fsdp"]]
    assert layout[kind]["lowrank_state"]


DRY_RUNS = """
import json, sys, jax
jax.config.update("jax_num_cpu_devices", 8)
from examples.llama import train
argvs = json.loads(sys.argv[1])
print("DRY" + json.dumps({kind: train.main(argv) for kind, argv in argvs.items()}))
"""


@pytest.fixture(scope="module")
def dry_runs(runs, tmp_path_factory):
  """The dry runs of the sharded runs' flags (in one process of 8 CPU devices, as theirs), and
  of the single-device run's (here)."""
  base = tmp_path_factory.mktemp("dry")
  argv = {"auto": run_args(base / "auto", "--mesh", "data=2,fsdp=2,tensor=2", "--dry-run"),
          "explicit": run_args(base / "explicit", "--mesh", "fsdp=8", "--mesh-axis-types",
                               "explicit", "--dry-run")}
  for kind in ("auto", "explicit"):  # FSDP at a batch whose activations outweigh the weights
    argv[f"{kind}_b64"] = run_args(base / f"{kind}_b64", "--mesh", "fsdp=8", "--mesh-axis-types",
                                   kind, "--batch-size", "64", "--eval-tokens", "2000", "--dry-run")
  proc = subprocess.run([sys.executable, "-c", DRY_RUNS, json.dumps(argv)],
                        env=env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  plans = json.loads(proc.stdout.split("DRY", 1)[1])
  return {**plans, "single": train.main(run_args(base / "single", "--dry-run")),
          "output": proc.stdout}


@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_dry_run_on_a_mesh_of_devices_plans_the_sharded_step(dry_runs, kind):
  """With the mesh's devices present (--cpu-devices 8), XLA's plan is of the sharded step, per
  device: its arguments are one device's shards of the weights, the optimizer state and the
  batch (it was the whole of them, one device's unsharded plan)."""
  dry, single = dry_runs[kind], dry_runs["single"]
  assert dry["planned_devices"] == 8 and single["planned_devices"] == 1
  held = dry["per_device"]
  split = 4 if kind == "auto" else 8  # the batch over data x fsdp
  shards = held["weight_bytes"] + held["optimizer_state_bytes"] + 8 * 32 * 4 // split
  arguments = dry["step_memory"]["arguments"]
  assert shards <= arguments <= shards + 64, (arguments, held)  # + nnx.Optimizer's step
  assert arguments < single["step_memory"]["arguments"] / 2
  assert "per device on this mesh of 8 cpu devices" in dry_runs["output"]


@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_sharded_dry_run_plan_matches_the_sharded_run(runs, dry_runs, kind):
  """The sharded dry run's plan is the one the sharded run of the same flags reports."""
  summary = json.loads((runs["dirs"][kind] / "summary.json").read_text())
  assert dry_runs[kind]["step_memory"]["total"] == summary["step_memory_bytes"]


def test_fsdp_under_auto_axes_splits_the_activations_as_explicit_axes_do(dry_runs):
  """Under Auto axes the partitioner followed the FSDP-split weights and split the
  activations along D, each device holding the whole batch's attention scores and logits:
  the tiny step at batch 64 planned 5.8x the Explicit-axes step, whose types split the batch.
  The model now lays out its activations at the layers' boundaries (model.constrained)."""
  auto, explicit = (dry_runs[f"{kind}_b64"]["step_memory"]["total"]
                    for kind in ("auto", "explicit"))
  assert auto <= 1.1 * explicit, (auto, explicit)


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(runs, tmp_path):
  # Two processes x 4 CPU devices on localhost (gloo collectives), one data=2,fsdp=4 mesh,
  # one shared output directory (process 0 writes the metrics, both the checkpoints).
  port = free_port()
  procs = [start(tmp_path / "two", "--cpu-devices", "4", "--mesh", "data=2,fsdp=4",
                 "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                 "--process-id", str(k)) for k in range(2)]
  outputs = [finish(p) for p in procs]
  reported = []
  for k, output in enumerate(outputs):
    line = next(l for l in output.splitlines() if f"process {k}/2: losses" in l)
    reported.append(json.loads(line.split("losses ", 1)[1]))
  assert reported[0] == reported[1]  # the processes agree
  assert reported[0] == pytest.approx(losses(tmp_path / "two"))
  # 8 devices, 1 process
  assert reported[0] == pytest.approx(losses(runs["dirs"]["explicit"]), rel=RTOL)
  assert reported[0] == pytest.approx(losses(runs["dirs"]["single"]), rel=RTOL)
  assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["4", "5"]
  assert json.loads((tmp_path / "two" / "config.json").read_text())["processes"] == 2


def test_processes_that_read_other_data_are_refused(tmp_path):
  """Each process reads the whole batch and keeps its shard: two hosts whose --data path
  holds other files trained on a mix of both without an error. Both now refuse, in a line."""
  for k in range(2):  # the same path on each "host", other contents
    corpus = tmp_path / f"host{k}"
    corpus.mkdir()
    for split, n in (("train", 40), ("validation", 20)):
      (corpus / f"{split}.jsonl").write_text("".join(
          json.dumps({"text": f"host {k} {split} document {i} " * (k + 1)}) + "\n"
          for i in range(n)))
  port = free_port()
  procs = [start(tmp_path / "out", "--cpu-devices", "1", "--mesh", "data=2", "--data",
                 str(tmp_path / f"host{k}"), "--coordinator", f"127.0.0.1:{port}",
                 "--num-processes", "2", "--process-id", str(k)) for k in range(2)]
  for proc in procs:
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 2, output[-3000:]
    assert ("error: --data (its files and sizes) differs between processes: process(es) 1 read"
            " other than process 0") in output, output[-3000:]


@pytest.mark.parametrize("argv, match", [
    (["--mesh", "data=2,model=4"], "bad mesh"),
    (["--mesh", "data=two"], "not an int"),
    (["--mesh", "data=2,fsdp=2"], r"has 4 devices, but jax.device_count\(\) is"),
    (["--process-id", "1"], "need --coordinator"),
])
def test_bad_mesh_flags_are_argparse_errors(tmp_path, capsys, argv, match):
  with pytest.raises(SystemExit) as exit_info:
    train.main(run_args(tmp_path, *argv))
  assert exit_info.value.code == 2
  assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize("shape, match", [
    ((1, 1, 8), r"^--mesh: \['embed'\]\['embedding'\] \(260, 64\) has 260 along axis 0, which"
                r" tensor = 8 devices do not divide: choose a tensor size that divides 260$"),
    ((1, 3, 1), r"^--mesh: .* has 64 along axis \d, which fsdp = 3 devices do not divide"),
    ((1, 2, 4), None),
])
def test_a_mesh_axis_that_does_not_divide_a_param_is_named(shape, match):
  """Before any param exists (abstract shapes): the param, its axis and the mesh axes, not
  JAX's NamedSharding error; the tiny model's vocabulary (260) and width (64)."""
  import jax
  from flax import nnx
  from examples.llama import model as model_lib
  cfg = model_lib.CONFIGS["tiny"]
  mesh = jax.sharding.AbstractMesh(shape, model_lib.MESH_AXES)
  make = lambda: model_lib.Llama(cfg, rngs=nnx.Rngs(0))
  if match is None:
    model_lib.check_divisible(make, mesh)
    return
  with pytest.raises(ValueError, match=match):
    model_lib.check_divisible(make, mesh)


def test_dry_run_checks_the_mesh_and_says_its_plan_is_one_devices(tmp_path, capsys):
  """--dry-run --mesh: the params are checked against the mesh, the summary records it and
  the output says the plan is unsharded (it was silently one device's) and how to get the
  sharded one; what one device holds is planned from the shard shapes, on a mesh of devices
  that do not exist."""
  import jax
  from examples.llama import build, cli
  from examples.llama import model as model_lib
  args = cli.build_parser().parse_args(["--model", "tiny", "--tokenizer", "bytes",
                                        "--optimizer", "adamw", "--out", str(tmp_path)])
  good = jax.sharding.AbstractMesh((1, 2, 1), model_lib.MESH_AXES)
  summary = build.dry_run(args, ["adamw"], mesh=good)
  assert summary["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
  assert summary["planned_devices"] == 1
  said = capsys.readouterr().out
  assert "except the lines 'per device on the mesh', and XLA's plan of the step is one" \
         " device's, unsharded" in said
  assert "devices exist: on a CPU host, add --cpu-devices 2)" in said
  # every kernel and the embedding halve over fsdp=2; the norms ((2 L + 1) D values) do not
  cfg = model_lib.CONFIGS["tiny"]
  held, weights = summary["per_device"], summary["weight_bytes"]
  norms = (2 * cfg.L + 1) * cfg.D * weights // summary["params"]
  assert held["weight_bytes"] == (weights + norms) // 2, (held, weights)
  # AdamW's moments follow the weights; its counters are whole on every device
  counters = summary["optimizer_state_bytes"] - 2 * weights
  assert held["optimizer_state_bytes"] == 2 * held["weight_bytes"] + counters
  # from the command line, on this one-device process: an AbstractMesh, not a refusal
  out = train.main(run_args(tmp_path / "cli", "--mesh", "fsdp=8", "--dry-run"))
  assert out["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and out["per_device"]
  assert out["planned_devices"] == 1 and out["step_memory"]["total"] > 0
  said = capsys.readouterr().out
  assert "add --cpu-devices 8)" in said and "XLA's plan, one cpu device" in said
  assert re.search(r"peak per device: total [\d.]+ GiB \(arguments \+ outputs - aliased \+"
                   r" temporaries\), the figure to hold against one device's memory", said)
  with pytest.raises(ValueError, match="tensor = 8 devices do not divide"):
    build.dry_run(args, ["adamw"], mesh=jax.sharding.AbstractMesh((1, 1, 8),
                                                                  model_lib.MESH_AXES))


def test_relora_on_a_mesh_compiles_the_step_once_and_the_speed_leaves_the_compile_out(tmp_path):
  """ReLoRA's merge on an Auto mesh keeps the shardings the train step was compiled for (it
  handed the params back laid out anew, and the step compiled again after the first merge);
  a log row's speed is the median of the steps after the first, whose time holds the compile
  (one slow step among few had pulled ldadamw's row to 1/30 of its speed)."""
  args = ["--model", "tiny", "--tokenizer", "bytes", "--seq-len", "32", "--batch-size", "8",
          "--steps", "8", "--log-every", "8", "--eval-every", "0", "--eval-tokens", "400",
          "--max-docs", "200", "--method", "relora", "--relora-every", "3",
          "--optimizer", "adamw", "--mesh", "fsdp=2", "--cpu-devices", "2",
          "--out", str(tmp_path / "relora")]
  proc = subprocess.run([sys.executable, str(ROOT / "examples/llama/train.py"), *args],
                        env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_LOG_COMPILES": "1"},
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  log = proc.stdout + proc.stderr
  assert len(re.findall(r"Finished XLA compilation of jit\(step\)", log)) == 1, log[-3000:]
  assert len(re.findall(r"Finished XLA compilation of jit\(merge\)", log)) == 1
  (row,) = [json.loads(l) for l in (tmp_path / "relora" / "metrics.jsonl").read_text().splitlines()
            if '"tokens_per_s"' in l]
  assert row["step_time_s"] < 1.0, row  # the compile takes seconds, a tiny step milliseconds


EXPLICIT_VS_AUTO = """
import json, sys, jax, numpy as np
jax.config.update("jax_num_cpu_devices", 8)
from flax import nnx
from examples.llama import build, cli, devices, model as M, train
seen = []  # (mesh axis types, the logits' typed spec) each time the loss is traced
plain = M.cross_entropy_terms
def spy(logits, targets, pad_id):
  types = jax.sharding.get_abstract_mesh().axis_types
  seen.append([[t.name for t in types], str(jax.typeof(logits).sharding.spec)])
  return plain(logits, targets, pad_id)
M.cross_entropy_terms = spy
mesh_shape, name, accum, method = json.loads(sys.argv[1])
flags = ["--model", "tiny", "--rank", "8", "--dtype", "fp32", "--update-proj-gap", "2",
         "--method", method, "--mesh", ",".join(f"{k}={v}" for k, v in mesh_shape.items())]
args = cli.build_parser().parse_args(flags)
shape = tuple(mesh_shape.get(a, 1) for a in M.MESH_AXES)
# one batch, three steps (the first at learning rate 0: warmup): its loss falls
tokens = np.random.RandomState(0).randint(1, 260, (3, accum, 8 // accum, 33)).astype(np.int32)
tokens[1:] = tokens[0]
def save(name, model):
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  np.savez(sys.argv[2] + name, **{"/".join(map(str, k)): np.asarray(v[...]) for k, v in params})
out = {}
for kind in ("auto", "explicit"):
  axis = getattr(jax.sharding.AxisType, kind.capitalize())
  mesh = jax.make_mesh(shape, M.MESH_AXES, axis_types=(axis,) * 3)
  del seen[:]
  with devices.mesh_context(mesh):
    model, opt, _ = build.build(args, name, M.CONFIGS["tiny"], 10, mesh)
    step = train.sharded_train_step(model, opt)
    save("init_" + kind, model)
    losses = [float(step(model, opt, devices.to_device(t, mesh, 1), pad_id=0)[0])
              for t in tokens]
    total, _ = train.eval_step(model, devices.to_device(tokens[0, 0], mesh, 0), pad_id=0)
  save(kind, model)
  out[kind] = {"losses": losses, "eval": float(total), "seen": seen[:]}
print("CMP" + json.dumps(out))
"""


@pytest.mark.parametrize("mesh, name, accum, method", [
    ({"fsdp": 8}, "adamw", 1, "full"),
    ({"fsdp": 8}, "galore_adamw", 1, "full"),
    ({"data": 2, "fsdp": 2, "tensor": 2}, "adamw", 2, "full"),
    ({"data": 2, "fsdp": 2, "tensor": 2}, "galore_adamw", 2, "full"),
    ({"data": 2, "fsdp": 2, "tensor": 2}, "adamw", 1, "lora"),
    ({"data": 2, "fsdp": 2, "tensor": 2}, "galore_adamw", 1, "sltrain"),
])
def test_explicit_axes_run_the_model_typed_and_match_auto(tmp_path, mesh, name, accum, method):
  """Under an Explicit mesh the train and eval steps run the model itself with its shardings
  typed (it ran inside ``jax.sharding.auto_axes``: Auto axes, the logits' layout unknown), the
  logits split over the batch (data, fsdp) and the vocabulary (tensor); three steps on one batch
  (a GaLore refresh among them; grad-accum 2 on 2x2x2 for the dense model, LoRA's dropout and
  SLTrain's sparse kernel) leave the same losses and params as Auto axes."""
  proc = subprocess.run([sys.executable, "-c", EXPLICIT_VS_AUTO,
                         json.dumps([mesh, name, accum, method]), str(tmp_path / "params_")],
                        env=env(), capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.split("CMP", 1)[1])
  explicit, auto = out["explicit"], out["auto"]
  assert len(explicit["seen"]) >= 2  # the train step's trace and the eval step's
  for types, spec in explicit["seen"]:
    assert types == ["Explicit"] * 3, explicit["seen"]
    assert spec == "P(('data', 'fsdp'), None, 'tensor')", explicit["seen"]
  assert explicit["losses"] == pytest.approx(auto["losses"], rel=1e-5)
  assert explicit["losses"][-1] < explicit["losses"][0] - 0.05  # it trains
  assert explicit["eval"] == pytest.approx(auto["eval"], rel=1e-5)
  load = lambda name: np.load(tmp_path / f"params_{name}.npz")
  init, want, got = load("init_auto"), load("auto"), load("explicit")
  assert sorted(got.files) == sorted(want.files) == sorted(load("init_explicit").files)
  for key in want.files:
    # (the two builds draw the same weights, to float32 rounding)
    np.testing.assert_allclose(load("init_explicit")[key], init[key], rtol=1e-6, err_msg=key)
    # Compared with the steps' change: Adam normalises each gradient, so one near 0 shows the
    # float noise between the two layouts' sums at the size of a whole update.
    moved = np.linalg.norm(want[key] - init[key])
    assert moved > 0, key
    assert np.linalg.norm(got[key] - want[key]) <= 1e-3 * moved, key


def test_dry_run_refuses_a_batch_the_mesh_does_not_split(tmp_path, capsys):
  """A dry run on a mesh this host does not have (an ``AbstractMesh``) refuses the batch the
  run itself refuses: it planned a batch of 12 over fsdp=8 without a word."""
  argv = run_args(tmp_path, "--mesh", "data=2,fsdp=4", "--batch-size", "12", "--dry-run")
  with pytest.raises(SystemExit) as e:
    train.main(argv)
  assert e.value.code == 2
  assert capsys.readouterr().err.splitlines()[-1].endswith(
      "--batch-size / --grad-accum = 12 is not divisible by the data x fsdp mesh size 8"
      " (see --help)")


def test_a_mesh_that_does_not_divide_a_param_is_refused_before_the_data_loads(tmp_path,
                                                                              monkeypatch):
  """The model's shapes follow from the flags (the config's vocabulary, or the byte
  tokenizer's): a run checks them against --mesh before it reads its data (it refused
  ``--mesh tensor=3`` only once the data had loaded, C4 streams included)."""
  import jax
  from examples.llama import model as model_lib

  def no_data(*_):
    raise AssertionError("the data loaded before the mesh was checked")

  mesh = jax.sharding.AbstractMesh((1, 1, 3), model_lib.MESH_AXES)  # (no 3 devices here)
  monkeypatch.setattr(train, "setup_devices", lambda args, parser: mesh)
  monkeypatch.setattr(train, "load_data", no_data)
  with pytest.raises(ValueError, match=r"^--mesh: \['embed'\]\['embedding'\] \(260, 64\) has"
                     r" 260 along axis 0, which tensor = 3 devices do not divide"):
    train.main(run_args(tmp_path, "--mesh", "tensor=3"))

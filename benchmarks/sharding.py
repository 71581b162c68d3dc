r"""GaLore under FSDP sharding: per-device optimizer-state bytes and refresh time vs devices.

A LLaMA-shaped set of params (the sizes of ``examples/llama/model.py`` ``CONFIGS``: q, k, v,
o, gate, up, down kernels, embedding, ``lm_head``, norms; random values, random gradients) is
sharded FSDP-style on an Auto mesh ``jax.make_mesh((N,), ("fsdp",))``: each leaf along its
largest axis that N divides, never the layer axis.  For every device count N (each in a fresh
subprocess of this script: the CPU device count must be set before JAX starts) and each
optimizer it measures

* **state bytes per device**: the bytes of device 0's shards of every state leaf after
  ``jax.jit(tx.init, out_shardings=...)`` (galore_jax: ``gj.sharding.state_shardings``;
  ``optax.contrib.galore``: plain ``jax.jit(tx.init)``, whatever shardings it gets), next to
  the global state bytes and the bytes of the leaves that stay fully replicated;
* **refresh and normal step time**: one ``jax.jit(tx.update)`` under ``jax.set_mesh(mesh)``
  with the state's shardings as ``out_shardings``, at count 0 (every basis recomputed) and at
  count 1 (no refresh; ``update_proj_gap`` is huge), median of ``--repeats`` calls after a
  warm-up call;
* **who factorises what**: the SVD / QR / eigh custom calls of the compiled (SPMD-partitioned)
  update and their per-device operand shapes, read from ``compile().as_text()``.  galore_jax
  shards each stack of B matrices along the stack (a stacked leaf with at least N matrices
  alone, smaller leaves stacked by shape), so each device factorises ``ceil(B / N)`` of them;
  ``optax.contrib.galore`` factorises every full matrix on every device.

Two layouts of the same weights (``--layouts``):

* ``stacked``: the LLaMA example's layout, each kernel ``(L, in, out)`` with the layer axis a
  batch axis (``dimension_numbers=gj.DimensionNumbers(1, 2)``).  galore_jax only:
  ``optax.contrib.galore`` has no batch axes ("All axes must be specified").
* ``unstacked``: one 2-D ``(in, out)`` kernel per layer; both libraries, same mask (layer
  kernels only), galore_jax with ``gj.DimensionNumbers(0, 1)``, contrib with
  ``GaLoreDimensionNumbers(0, 1)`` on the kernels and ``None`` elsewhere.  contrib keeps its
  basis on the larger side (galore_jax's ``proj_type="reverse_std"``), so a
  ``galore_jax[svd,reverse_std]`` row (state bytes only) gives the like-for-like state size.

CPU devices made with ``jax_num_cpu_devices`` share the machine's cores, so wall time does
not fall with N: read the per-device work (local SVD batch) and bytes, and the times as
ratios to ``optax.contrib.galore`` measured in the same process.

CPU scaling (committed as ``benchmarks/results/sharding_cpu.json``):
  XLA_FLAGS=--xla_backend_optimization_level=0 OPENBLAS_NUM_THREADS=1 \
      python -m benchmarks.sharding --model 9m --device-counts 1,2,4,8 \
      --optimizers 'galore_jax[svd],optax.contrib.galore' --repeats 3 --timeout 120 \
      --out benchmarks/results
(the cheapest XLA optimization level keeps the compiles of a loaded 2-core machine inside the
timeout; add ``galore_jax[randomized]`` to ``--optimizers`` where there is time for it)

A device count whose run passes ``--timeout`` is killed and keeps the state bytes and HLO
figures of the layouts it finished (its ``error`` names the others), and its untimed rows say
so.  (jaxlib's batched CPU LAPACK kernels deadlock when
several virtual CPU devices run batches at once; galore_jax avoids it by running one matrix
per device per call on CPU.)
GPU, absolute single-device numbers (pending; writes ``sharding_gpu.json``):
  python -m benchmarks.sharding --platform gpu --model 60m --device-counts 1 \
      --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time

import benchmarks

ROOT = pathlib.Path(__file__).resolve().parents[1]  # children run here: -m benchmarks.sharding

OPTIMIZERS = ("galore_jax[svd]", "galore_jax[randomized]", "optax.contrib.galore")
BYTES_ONLY = ("galore_jax[svd,reverse_std]",)
LAYOUTS = ("stacked", "unstacked")
KERNELS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Custom-call targets of the factorisations, by kind (CPU LAPACK, GPU cuSOLVER names).
FACTORISATIONS = {"svd": ("gesdd", "gesvd", "svd"), "qr": ("geqrf", "orgqr", "householder"),
                  "eigh": ("syevd", "heevd", "eigh")}


def parse_args(argv=None):
  """The command line, parsed and checked: device counts, layouts and optimizers as lists."""
  # jax imports with them, but no backend starts in the parent
  from examples.llama import cli  # pylint: disable=import-outside-toplevel
  from examples.llama import model as model_lib  # pylint: disable=import-outside-toplevel
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="9m", help="a name of examples/llama/model.py CONFIGS")
  p.add_argument("--rank", type=cli.POSITIVE, default=None, help="GaLore rank (default hidden / 4)")
  p.add_argument("--device-counts", default="1,2,4,8")
  p.add_argument("--layouts", default=",".join(LAYOUTS))
  p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
  p.add_argument("--repeats", type=cli.POSITIVE, default=5, help="timed calls per step kind")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  p.add_argument("--platform", choices=["cpu", "gpu"], default="cpu",
                 help="cpu: N virtual CPU devices per run; gpu: the real devices (N <= count)")
  p.add_argument("--timing", action=argparse.BooleanOptionalAction, default=True,
                 help="time the update steps (--no-timing: bytes and HLO only)")
  p.add_argument("--timeout", type=cli.POSITIVE_FLOAT, default=600,
                 help="seconds per device count; a slower run is killed, keeping what it measured")
  p.add_argument("--out", type=pathlib.Path, default=None, help="directory for the JSON file")
  p.add_argument("--devices", type=int, default=None, help=argparse.SUPPRESS)  # child mode
  args = p.parse_args(argv)
  try:
    args.device_counts = [int(x) for x in args.device_counts.split(",")]
  except ValueError:
    p.error(f"--device-counts: expected a comma list of ints, got {args.device_counts!r}")
  if args.model not in model_lib.CONFIGS:
    p.error(f"--model: unknown {args.model!r} (choose from {', '.join(model_lib.CONFIGS)})")
  args.layouts = args.layouts.split(",")
  args.optimizers = args.optimizers.split(",")
  for x in args.layouts:
    if x not in LAYOUTS:
      p.error(f"unknown layout {x!r}; choose from {LAYOUTS}")
  for x in args.optimizers:
    if x not in OPTIMIZERS:
      p.error(f"unknown optimizer {x!r}; choose from {OPTIMIZERS}")
  if any(n < 1 for n in args.device_counts):
    p.error("device counts must be >= 1")
  benchmarks.check_out(args.out, directory=True)
  return args


# ------------------------------------------------------------------------------------------
# Child: one device count
# ------------------------------------------------------------------------------------------


def shapes_of(cfg, layout: str) -> dict:
  """The param shapes of the LLaMA of ``cfg`` (Flax layout: kernels ``(in, out)``)."""
  D, F, L, V = cfg.D, cfg.F, cfg.L, cfg.V
  kernels = {"q_proj": (D, D), "k_proj": (D, D), "v_proj": (D, D), "o_proj": (D, D),
             "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}

  def layer(prefix):
    out = {k: {"kernel": (*prefix, *s)} for k, s in kernels.items()}
    out["attn_norm"] = {"scale": (*prefix, D)}
    out["mlp_norm"] = {"scale": (*prefix, D)}
    return out

  tree = {"embed": {"embedding": (V, D)}, "norm": {"scale": (D,)},
          "lm_head": {"kernel": (D, V)}}
  if layout == "stacked":
    tree["layers"] = layer((L,))
  else:
    tree["layers"] = {str(i): layer(()) for i in range(L)}
  return tree


def fsdp_spec(shape, n: int, skip: int):
  """Shard the largest axis (first on ties) that ``n`` divides, skipping the first ``skip``
  axes (the layer axis); replicated when none fits."""
  from jax.sharding import PartitionSpec as P
  axes = [a for a in range(skip, len(shape)) if shape[a] % n == 0]
  if not axes:
    return P()
  a = max(axes, key=lambda i: (shape[i], -i))
  return P(*([None] * a), "fsdp")


def leaf_bytes(x) -> tuple[int, int]:
  """(bytes of device 0's shard, global bytes) of an array."""
  shard = x.addressable_shards[0].data
  return shard.size * shard.dtype.itemsize, x.size * x.dtype.itemsize


def state_report(state) -> dict:
  """Device 0's bytes of ``state``, its global and fully replicated bytes, and example specs."""
  import jax
  per_device = total = replicated = 0
  specs = {}
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    if not hasattr(x, "addressable_shards"):
      continue
    local, glob = leaf_bytes(x)
    per_device += local
    total += glob
    if x.sharding.is_fully_replicated:
      replicated += glob
    where = jax.tree_util.keystr(path)
    # Specs of layer 0's q and gate kernels and of the embedding, as examples.
    if re.search(r"(q_proj|gate_proj|embed)", where) and not re.search(r"\['[1-9]\d*'\]", where):
      spec = getattr(x.sharding, "spec", None)
      specs[where] = f"{tuple(x.shape)} {tuple(spec) if spec is not None else x.sharding}"
  return {"state_bytes_per_device": per_device, "state_bytes_total": total,
          "replicated_state_bytes": replicated, "example_specs": specs}


def factorisations(hlo: str) -> dict:
  """Factorisation custom calls of compiled HLO: kind -> list of {target, operands}."""
  found = {k: [] for k in FACTORISATIONS}
  for line in hlo.splitlines():
    if "custom-call(" not in line:
      continue
    m = re.search(r'custom_call_target="([^"]+)"', line)
    if not m:
      continue
    target = m.group(1)
    # Compiled HLO names operands without shapes: the first result of a LAPACK / cuSOLVER
    # factorisation has the (local) operand's shape.
    result = line.split("custom-call(", 1)[0].split("=", 1)[-1]
    shapes = re.findall(r"[a-z]+\d*\[[\d,]*\]", result)[:1]
    for kind, keys in FACTORISATIONS.items():
      if any(k in target.lower() for k in keys):
        found[kind].append({"target": target, "operands": shapes})
        break
  return found


def make_optimizer(name: str, layout: str, rank: int, params):
  """The optimizer ``name`` (one of OPTIMIZERS or BYTES_ONLY) for ``layout``'s params;
  ``ValueError`` on another name."""
  import optax
  import galore_jax as gj
  from optax.contrib import _galore as contrib
  dims = gj.DimensionNumbers(1, 2) if layout == "stacked" else gj.DimensionNumbers(0, 1)
  common = dict(rank=rank, update_proj_gap=10**6, scale=0.25, mask=gj.linear_kernels,
                dimension_numbers=dims)
  if name == "galore_jax[svd]":
    return gj.galore_adamw(1e-3, method="svd", **common)
  if name == "galore_jax[svd,reverse_std]":
    return gj.galore_adamw(1e-3, method="svd", proj_type="reverse_std", **common)
  if name == "galore_jax[randomized]":
    return gj.galore_adamw(1e-3, method="randomized", key=0, **common)
  if name == "optax.contrib.galore":
    mask = gj.linear_kernels(params)
    wdn = __import__("jax").tree.map(
        lambda sel: contrib.GaLoreDimensionNumbers(0, 1) if sel else None, mask)
    return optax.contrib.galore(1e-3, rank=rank, update_proj_gap=10**6, scale=0.25,
                                weight_dimension_numbers=wdn)
  raise ValueError(name)


def emit(tag: str, obj) -> None:
  """Prints ``obj`` as one ``<tag> <json>`` line for the parent."""
  print(f"{tag} {json.dumps(obj)}", flush=True)


def child(args) -> None:
  """Measures one device count; streams a ``STATIC`` line (bytes, HLO) after each layout,
  each holding the layouts so far, then ``TIME`` lines, so that a run killed at the
  parent's timeout still reports what it measured."""
  import jax
  if args.platform == "cpu":
    jax.config.update("jax_num_cpu_devices", args.devices)
  from examples.llama import model as model_lib

  n = args.devices
  if len(jax.devices()) < n:
    raise SystemExit(f"{n} devices asked, {len(jax.devices())} available")
  cfg = model_lib.CONFIGS[args.model]
  rank = args.rank or cfg.D // 4
  mesh = jax.make_mesh((n,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])
  out = {"devices": n, "rank": rank, "layouts": {}}
  jobs = []  # (layout, name, compiled, grads, state0, params) to time
  for layout in args.layouts:
    out["layouts"][layout] = measure_layout(args, cfg, rank, mesh, layout, jobs)
    emit("STATIC", out)

  # Timing: contrib first (its unbatched SVDs never hit the CPU thread-pool deadlock).
  jobs.sort(key=lambda j: "contrib" not in j[1])
  if not args.timing:
    jobs = []
  for layout, name, compiled, grads, state0, params in jobs:
    row = time_job(mesh, compiled, grads, state0, params, args.repeats)
    emit("TIME", {"layout": layout, "name": name, **row})
    print(name, layout, n, row, file=sys.stderr, flush=True)


def random_trees(cfg, layout: str, mesh, dtype):
  """(params, grads): random trees of ``layout``'s shapes, each leaf FSDP-sharded on
  ``mesh`` (the layer axis of the stacked kernels and norms never)."""
  import jax
  from jax.sharding import NamedSharding

  n = mesh.size
  shapes = shapes_of(cfg, layout)
  is_shape = lambda s: isinstance(s, tuple)
  # The layer axis of the stacked kernels and norms is never sharded.
  shardings = jax.tree_util.tree_map_with_path(
      lambda path, s: NamedSharding(mesh, fsdp_spec(
          s, n, 1 if layout == "stacked" and path[0].key == "layers" else 0)),
      shapes, is_leaf=is_shape)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=is_shape)
  sh_leaves = jax.tree.leaves(shardings)

  def random_tree(seed):
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [
        jax.jit(lambda k, s=s: (0.02 * jax.random.normal(k, s)).astype(dtype),
                out_shardings=sh)(k)
        for k, s, sh in zip(keys, leaves, sh_leaves)])

  return random_tree(0), random_tree(1)


def measure_layout(args, cfg, rank: int, mesh, layout: str, jobs: list) -> dict:
  """One layout's ``{"param_bytes_per_device", "results"}``: each optimizer's state report
  and, unless it is bytes-only, its compiled update's figures; appends that update to
  ``jobs`` (``(layout, name, compiled, grads, state0, params)``) for timing."""
  import jax
  import jax.numpy as jnp

  params, grads = random_trees(cfg, layout, mesh, jnp.dtype(args.dtype))
  param_bytes = sum(leaf_bytes(x)[0] for x in jax.tree.leaves(params))
  rows = {}
  names = [o for o in args.optimizers if not (layout == "stacked" and "contrib" in o)]
  if layout == "unstacked" and "galore_jax[svd]" in names:
    names += list(BYTES_ONLY)
  for name in names:
    tx = make_optimizer(name, layout, rank, params)
    state0, rows[name] = init_state(name, tx, mesh, params)
    if name in BYTES_ONLY:
      continue
    row = rows[name]
    state_sh = jax.tree.map(lambda x: x.sharding, state0)
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    with jax.set_mesh(mesh):
      update = jax.jit(tx.update, out_shardings=(param_sh, state_sh))
      t0 = time.perf_counter()
      compiled = update.lower(grads, state0, params).compile()
    row["compile_s"] = time.perf_counter() - t0
    row["factorisations"] = factorisations(compiled.as_text())
    jobs.append((layout, name, compiled, grads, state0, params))
    print(name, layout, mesh.size, "static done", file=sys.stderr, flush=True)
  return {"param_bytes_per_device": param_bytes, "results": rows}


def init_state(name: str, tx, mesh, params) -> tuple:
  """(state, row): ``tx``'s initial state on ``mesh`` (leaves left on one device replicated
  over it) and its :func:`state_report` row, with how many leaves were on one device and,
  for ``optax.contrib.galore``, its bytes under galore_jax's state shardings."""
  import jax
  from jax.sharding import NamedSharding
  import galore_jax as gj

  if name.startswith("galore_jax"):
    init = jax.jit(tx.init, out_shardings=gj.sharding.state_shardings(tx, params))
  else:
    init = jax.jit(tx.init)
  state0 = init(params)
  row = state_report(state0)
  # Plain jit gives contrib's freshly made zeros (bases, low-rank moments) no mesh
  # sharding: they land whole on one device.  Replicate them over the mesh to run.
  single = [x for x in jax.tree.leaves(state0) if not isinstance(x.sharding, NamedSharding)]
  row["leaves_on_one_device_after_init"] = len(single)
  state0 = jax.tree.map(
      lambda x: x if isinstance(x.sharding, NamedSharding)
      else jax.device_put(x, NamedSharding(mesh, jax.sharding.PartitionSpec())), state0)
  if name == "optax.contrib.galore":  # what galore_jax's rules would give contrib
    try:
      ruled = jax.jit(tx.init, out_shardings=gj.sharding.state_shardings(tx, params))(params)
      row["state_bytes_per_device_with_gj_state_shardings"] = state_report(
          ruled)["state_bytes_per_device"]
    except Exception as e:  # noqa: BLE001 -- reported, not fatal
      row["state_bytes_per_device_with_gj_state_shardings"] = f"{type(e).__name__}: {e}"[:300]
  return state0, row


def time_job(mesh, compiled, grads, state0, params, repeats: int) -> dict:
  """``{"refresh_step_s", "normal_step_s"}``: median seconds of ``repeats`` calls of the
  compiled update from ``state0`` (count 0, a refresh) and from its successor (normal),
  after a warm-up call of each."""
  import jax

  with jax.set_mesh(mesh):
    _, state1 = jax.block_until_ready(compiled(grads, state0, params))  # warm-up, refresh
    jax.block_until_ready(compiled(grads, state1, params))  # warm-up, normal

    def timed(state):
      times = []
      for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(grads, state, params))
        times.append(time.perf_counter() - t)
      return statistics.median(times)

    return {"refresh_step_s": timed(state0), "normal_step_s": timed(state1)}


def run_child(args, n: int, env, passthrough) -> dict:
  """One device count in a subprocess; a run that exceeds ``--timeout`` is killed and
  keeps what it reported."""
  t0 = time.perf_counter()
  proc = subprocess.Popen(
      [sys.executable, "-m", "benchmarks.sharding", "--devices", str(n), *passthrough],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
  try:
    stdout, stderr = proc.communicate(timeout=args.timeout)
    timed_out = False
  except subprocess.TimeoutExpired:
    proc.kill()
    stdout, stderr = proc.communicate()
    timed_out = True
  sys.stderr.write(stderr[-4000:])
  lines = stdout.splitlines()
  static = [json.loads(l[7:]) for l in lines if l.startswith("STATIC ")]
  if not static:  # recorded, so that the other device counts still report
    return {"devices": n, "layouts": {}, "timed_out": timed_out, "wall_s":
            time.perf_counter() - t0, "error": f"no result (rc {proc.returncode})"}
  run = static[-1]  # the layouts measured before any timeout
  missing = [layout for layout in args.layouts if layout not in run["layouts"]]
  if missing:
    run["error"] = (f"layouts {', '.join(missing)} not measured: the run passed --timeout "
                    f"{args.timeout} s")
  for l in lines:
    if l.startswith("TIME "):
      t = json.loads(l[5:])
      row = run["layouts"][t["layout"]]["results"][t["name"]]
      row.update(refresh_step_s=t["refresh_step_s"], normal_step_s=t["normal_step_s"],
                 refresh_vs_normal=t["refresh_step_s"] / t["normal_step_s"])
  run["timed_out"] = timed_out
  run["wall_s"] = time.perf_counter() - t0
  for res in run["layouts"].values():
    rows = res["results"]
    base = rows.get("optax.contrib.galore")
    for name, row in rows.items():
      if args.timing and timed_out and name not in BYTES_ONLY and "refresh_step_s" not in row:
        row["timing"] = f"not measured: the run passed --timeout {args.timeout} s (hung)"
      if base is None:
        continue
      row["state_bytes_per_device_vs_contrib"] = (
          row["state_bytes_per_device"] / base["state_bytes_per_device"])
      if "refresh_step_s" in row and "refresh_step_s" in base:
        row["refresh_vs_contrib"] = row["refresh_step_s"] / base["refresh_step_s"]
        row["normal_vs_contrib"] = row["normal_step_s"] / base["normal_step_s"]
  return run


# ------------------------------------------------------------------------------------------
# Parent: one subprocess per device count
# ------------------------------------------------------------------------------------------


def summarise(runs: list[dict]) -> dict:
  """layout -> optimizer -> N -> the headline numbers."""
  table = {}
  for run in runs:
    for layout, res in run["layouts"].items():
      for name, row in res["results"].items():
        entry = {k: row[k] for k in ("state_bytes_per_device", "refresh_step_s",
                                     "normal_step_s", "refresh_vs_contrib") if k in row}
        svd = row.get("factorisations", {}).get("svd")
        if svd is not None:
          entry["svd_calls"] = len(svd)
          entry["svd_local_operands"] = sorted({s for c in svd for s in c["operands"]})
        table.setdefault(layout, {}).setdefault(name, {})[str(run["devices"])] = entry
  for layout in table.values():
    for per_n in layout.values():
      one = per_n.get("1")
      for entry in per_n.values():
        if one:
          entry["state_bytes_vs_1_device"] = (
              entry["state_bytes_per_device"] / one["state_bytes_per_device"])
  return table


def main(argv=None):
  """Child mode (--devices) measures one device count; else runs a child per count, prints the
  summary and writes the JSON to --out if given."""
  args = parse_args(argv)
  if args.devices is not None:
    child(args)
    return
  import jax  # only for the environment record: the parent never starts a backend
  import optax

  runs, started = [], time.perf_counter()
  env = dict(os.environ)
  env.setdefault("OPENBLAS_NUM_THREADS", "1")
  if args.platform == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
  passthrough = ["--model", args.model, "--layouts", ",".join(args.layouts),
                 "--optimizers", ",".join(args.optimizers), "--repeats", str(args.repeats),
                 "--dtype", args.dtype, "--platform", args.platform,
                 "--timeout", str(args.timeout),
                 "--timing" if args.timing else "--no-timing"]
  if args.rank:
    passthrough += ["--rank", str(args.rank)]
  device_kind = None
  for n in args.device_counts:
    run = run_child(args, n, env, passthrough)
    runs.append(run)
    print(f"N={n}: {run['wall_s']:.1f} s{' (timed out)' if run['timed_out'] else ''}",
          flush=True)
  code = "import jax; d = jax.devices()[0]; print(d.platform, '|', d.device_kind)"
  probe = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  plat, device_kind = [s.strip() for s in probe.stdout.strip().split("|", 1)]
  result = {
      "benchmark": "sharding",
      "model": args.model,
      "rank": next((r["rank"] for r in runs if "rank" in r), None),
      "dtype": args.dtype,
      "mesh": "jax.make_mesh((N,), ('fsdp',), axis_types=(Auto,)); each leaf sharded along"
              " its largest axis that N divides, never the layer axis",
      "update_proj_gap": 10**6,
      "device_counts": args.device_counts,
      "layouts": args.layouts,
      "environment": {
          "jax": jax.__version__, "optax": optax.__version__,
          "python": platform.python_version(), "platform": plat, "device_kind": device_kind,
          "cpu_count": os.cpu_count(), "OPENBLAS_NUM_THREADS": env.get("OPENBLAS_NUM_THREADS"),
          "XLA_FLAGS": env.get("XLA_FLAGS", ""),
      },
      "notes": (
          ("CPU devices share the machine's cores: wall time does not scale with N; read the"
           " per-device SVD batch, the bytes, and times as ratios to optax.contrib.galore in the"
           " same process. " if plat == "cpu" else "")
          + "contrib cannot batch the layer axis, so the stacked layout has no contrib row."),
      "total_wall_s": time.perf_counter() - started,
      "summary": summarise(runs),
      "runs": runs,
  }
  print(json.dumps(result["summary"], indent=1))
  if args.out:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"sharding_{plat}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
  main()

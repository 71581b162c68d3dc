"""The benchmark scripts run at the tiny size on CPU and write well-formed JSON.

Each script runs in a subprocess (its own JAX, one OpenBLAS thread: LAPACK can spin-wait on a
busy CPU) with the fewest repeats, the exact-SVD method only and one baseline besides
optax.adamw, so that the file stays under about a minute on 2 cores.
"""

from __future__ import annotations

import doctest
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Structure, not speed, is tested here (XLA's cheapest optimization level, which halves
# compile time, comes with the environment: tests/conftest.py).
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu"}
HAS_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "galore_torch", "transformers"))


def run_script(name: str, *args: str) -> str:
  """Runs benchmarks/<name> as a module from the repository root: python -m benchmarks.<stem>."""
  module = f"benchmarks.{pathlib.Path(name).stem}"
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def numbers(tree):
  if isinstance(tree, dict):
    return [x for v in tree.values() for x in numbers(v)]
  return [tree] if isinstance(tree, float) else []


def assert_positive_finite(rows, skip=("refresh_only_s", "refresh_steps_s")):
  for name, row in rows.items():
    for key, value in row.items():
      if key not in skip:
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, key, value)


def test_refresh_benchmark_tiny(tmp_path):
  extra = ["--torch"] if HAS_TORCH else []
  run_script("refresh.py", "--model", "tiny", "--methods", "svd", "--repeats", "1",
             "--train-steps", "1", "--refresh-repeats", "1", "--batch-size", "2",
             "--seq-len", "16", "--baselines", "contrib,ldadamw,adamw_other_loop,ldadamw_host",
             "--staggered", "svd", "--host-refresh", "svd",
             "--peak-tflops", "0.5", "--tag", "t", "--out", str(tmp_path), *extra)
  result = json.loads((tmp_path / "refresh_tiny_cpu_svd_b2x16_t.json").read_text())
  assert {"benchmark", "model", "rank", "dtype", "update_proj_gap", "device", "platform", "jax",
          "optax", "matrix", "update", "train", "notes", "skipped"} <= set(result)
  assert (result["benchmark"], result["model"], result["rank"]) == ("refresh", "tiny", 32)
  assert result["platform"] == "cpu" and result["methods"] == ["svd"]

  matrices = result["matrix"]["results"]
  assert set(matrices) == {"jnp.linalg.svd", "svd"}
  assert set(matrices["svd"]) == {"qkvo", "gate_up", "down", "model_looped_s", "vs_jnp_svd"}
  assert_positive_finite(matrices)

  model = result["update"]["results"]
  assert set(model) == {"optax.adamw", "galore_adamw[svd]", "optax.contrib.galore"}
  assert result["update"]["num_matrices"] == 7 * 2
  for name in ("galore_adamw[svd]", "optax.contrib.galore"):
    assert {"normal_step_s", "refresh_step_s", "refresh_vs_normal", "normal_vs_adamw"} <= set(
        model[name])
  assert_positive_finite(model)

  train = result["train"]["results"]
  want = {"optax.adamw", "optax.contrib.galore (unrolled)", "galore_adamw[svd]",
          "galore_adamw[svd,staggered]", "ldadamw", "optax.adamw (unrolled loop)",
          "galore_adamw[svd,host]", "ldadamw[host]"}
  if HAS_TORCH:
    want |= {"torch.optim.AdamW", "galore_torch.GaLoreAdamW"}
  assert set(train) == want, (set(train), result["skipped"])
  assert result["train"]["tokens_per_step"] == 2 * 16
  for row in train.values():
    assert {"normal_step_s", "refresh_step_s", "refresh_vs_normal", "effective_tokens_per_s",
            "vs_optax_adamw"} <= set(row)
    if HAS_TORCH:
      assert {"vs_torch_adamw", "vs_galore_torch"} <= set(row)
  assert_positive_finite(train)
  assert train["optax.adamw"]["vs_optax_adamw"] == 1.0
  # MFU of the effective tokens/s: 6N + 12 L D T FLOPs per position (T = 16) over the peak.
  cfg = {k: result["shape"][k] for k in "DFLV"}
  per_token = (6 * (cfg["L"] * (4 * cfg["D"] ** 2 + 3 * cfg["D"] * cfg["F"]) + cfg["D"] * cfg["V"])
               + 12 * cfg["L"] * cfg["D"] * 16)
  for row in train.values():
    assert row["model_flops_per_token"] == per_token
    assert math.isclose(row["mfu"], per_token * row["effective_tokens_per_s"] / 0.5e12)
  assert train["ldadamw"]["refresh_steps_s"] == [train["ldadamw"]["normal_step_s"]]
  # every(T) refreshes all leaves on one step of the period; staggered(T) one leaf on each of
  # 7 steps (q, k, v, o, gate, up, down), its worst step reported as the refresh step.
  assert len(train["galore_adamw[svd]"]["refresh_steps_s"]) == 1
  assert len(train["galore_adamw[svd,host]"]["refresh_steps_s"]) == 1
  assert result["host_refresh"] == ["svd"]
  staggered = train["galore_adamw[svd,staggered]"]
  assert len(staggered["refresh_steps_s"]) == 7
  assert staggered["refresh_step_s"] == max(staggered["refresh_steps_s"])
  T, normal_s = result["update_proj_gap"], staggered["normal_step_s"]
  period_s = (T - 7) * normal_s + sum(staggered["refresh_steps_s"])
  assert math.isclose(staggered["effective_tokens_per_s"], 2 * 16 * T / period_s)
  assert "All axes must be specified" in result["notes"]["optax.contrib.galore"]


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch, galore_torch and transformers")
def test_galore_torch_loads_without_bitsandbytes():
  """The GPU image has no bitsandbytes: refresh.py still gets galore-torch's AdamW, and it is
  the package's own (same update as `galore_torch.GaLoreAdamW` where the package imports)."""
  code = """
import sys
import torch
import galore_torch
reference = galore_torch.GaLoreAdamW
for name in [m for m in sys.modules if m.split(".")[0] in ("galore_torch", "bitsandbytes")]:
  del sys.modules[name]
sys.modules["bitsandbytes"] = None  # as if not installed
from benchmarks import train_steps
loaded = train_steps.galore_torch_adamw()
assert loaded is not reference and loaded.__module__ == "galore_torch.adamw", loaded
finals = []
for cls in (reference, loaded):
  torch.manual_seed(0)
  p = torch.nn.Parameter(torch.randn(12, 8))
  opt = cls([{"params": [p], "rank": 3, "update_proj_gap": 2, "scale": 0.25,
              "proj_type": "std"}], lr=1e-2, no_deprecation_warning=True)
  for _ in range(3):
    p.grad = torch.randn(12, 8)
    opt.step()
  finals.append(p.detach().clone())
assert torch.equal(*finals)
print("same")
"""
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0 and "same" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_refresh_benchmark_rejects_bad_arguments(tmp_path):
  from benchmarks import refresh as module  # pylint: disable=import-outside-toplevel
  for argv in (["--parts", "nope"], ["--methods", "nope"], ["--update-proj-gap", "1"],
               ["--baselines", "nope"]):
    with pytest.raises((SystemExit, ValueError)):
      module.main([*argv, "--out", str(tmp_path)])
  assert not list(tmp_path.iterdir())


def test_optimizer_step_benchmark_tiny(tmp_path):
  run_script("optimizer_step.py", "--model", "tiny", "--steps", "1", "--out", str(tmp_path))
  result = json.loads((tmp_path / "optimizer_step_tiny_cpu.json").read_text())
  assert result["benchmark"] == "optimizer_step" and result["num_matrices"] == 14
  rows = result["results"]
  assert set(rows) == {"optax.adamw", "optax.contrib.galore", "galore_jax.galore_adamw",
                       "galore_jax.ldadamw"}
  assert "refresh_step_s" not in rows["galore_jax.ldadamw"]  # it has no refresh
  assert {"refresh_step_s", "refresh_vs_own_normal"} <= set(rows["galore_jax.galore_adamw"])
  assert all(x > 0 and math.isfinite(x) for x in numbers(rows))


def test_sharding_benchmark_tiny(tmp_path):
  # Bytes and compiled-HLO figures only: on a 2-core CPU jaxlib's batched LAPACK SVD can deadlock
  # across virtual devices (see benchmarks/sharding.py), so the timed steps are not run here.
  run_script("sharding.py", "--model", "tiny", "--device-counts", "1,2", "--layouts",
             "unstacked", "--optimizers", "galore_jax[svd],optax.contrib.galore",
             "--no-timing", "--timeout", "200", "--out", str(tmp_path))
  result = json.loads((tmp_path / "sharding_cpu.json").read_text())
  assert {"benchmark", "model", "rank", "device_counts", "environment", "summary",
          "runs"} <= set(result)
  assert (result["benchmark"], result["model"], result["device_counts"]) == ("sharding", "tiny",
                                                                           [1, 2])
  assert {"jax", "device_kind", "cpu_count"} <= set(result["environment"])
  by_n = {run["devices"]: run["layouts"]["unstacked"]["results"] for run in result["runs"]}
  assert set(by_n[2]) == {"galore_jax[svd]", "galore_jax[svd,reverse_std]",
                          "optax.contrib.galore"}
  gj1, gj2 = by_n[1]["galore_jax[svd]"], by_n[2]["galore_jax[svd]"]
  assert gj2["state_bytes_per_device"] < gj1["state_bytes_per_device"]
  assert gj2["state_bytes_total"] == gj1["state_bytes_total"]
  # Each device factorises its share of the stacked matrices (galore_jax), every whole matrix
  # (optax.contrib.galore).
  assert gj2["factorisations"]["svd"] and by_n[2]["optax.contrib.galore"]["factorisations"]["svd"]


def test_sharding_keeps_the_layouts_measured_before_a_timeout(monkeypatch, capsys):
  """A device count killed at --timeout while it measures its second layout keeps the first
  layout's bytes and HLO figures (each layout streams them as it ends), and says which
  layout it did not measure."""
  from benchmarks import sharding  # pylint: disable=import-outside-toplevel

  def measure_layout(args, cfg, rank, mesh, layout, jobs):  # the first layout, then a hang
    if layout == "unstacked":
      raise KeyboardInterrupt  # where the parent's kill lands
    return {"param_bytes_per_device": 8, "results": {"galore_jax[svd]": {"svd_calls": 1}}}

  monkeypatch.setattr(sharding, "measure_layout", measure_layout)
  argv = ["--model", "tiny", "--layouts", "stacked,unstacked", "--no-timing", "--timeout", "9"]
  with pytest.raises(KeyboardInterrupt):  # the gpu platform: the devices this process has
    sharding.child(sharding.parse_args([*argv, "--devices", "1", "--platform", "gpu"]))
  streamed = capsys.readouterr().out

  class Killed:  # the child's process as run_child sees it: past its timeout, then killed
    returncode = -9

    def __init__(self, *args, **kwargs):
      self.calls = 0

    def communicate(self, timeout=None):
      self.calls += 1
      if self.calls == 1:
        raise sharding.subprocess.TimeoutExpired("child", timeout)
      return streamed, ""

    def kill(self):
      pass

  monkeypatch.setattr(sharding.subprocess, "Popen", Killed)
  run = sharding.run_child(sharding.parse_args(argv), 1, {}, [])
  assert run["timed_out"] and run["layouts"] == {
      "stacked": {"param_bytes_per_device": 8, "results": {"galore_jax[svd]": {"svd_calls": 1}}}}
  assert run["error"] == "layouts unstacked not measured: the run passed --timeout 9.0 s"


def dry_run_gpu_script(name: str, out: pathlib.Path) -> str:
  proc = subprocess.run(["bash", str(ROOT / "benchmarks" / name), "--dry-run"],
                        env={**os.environ, "OUT": str(out)}, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout


def test_llama_gpu_script_flags_are_valid(tmp_path):
  """Both of the GPU script's commands parse and build their optimizers (abstractly)."""
  dry_run_gpu_script("llama_gpu.sh", tmp_path)
  for run, params in (("llama_60m", 58.1e6), ("llama_350m", 368.0e6)):
    summary = json.loads((tmp_path / run / "dry_run.json").read_text())
    assert set(summary) == {"adamw", "galore_adamw"}, summary
    assert abs(summary["adamw"]["params"] - params) < 0.05e6, (run, summary["adamw"]["params"])
    assert (summary["galore_adamw"]["optimizer_state_bytes"]
            < summary["adamw"]["optimizer_state_bytes"])


def test_ldadam_gpu_script_flags_are_valid(tmp_path):
  """The GPU script's command parses and builds all three optimizers (abstractly)."""
  stdout = dry_run_gpu_script("ldadam_gpu.sh", tmp_path)
  for name, rank in (("adamw", ""), ("galore_adamw", " (projection rank 128)"),
                     ("ldadamw", " (projection rank 128)")):
    assert f"; {name}{rank} optimizer state" in stdout
  summary = json.loads((tmp_path / "ldadam_60m" / "paper_lr" / "dry_run.json").read_text())
  state = {name: summary[name]["optimizer_state_bytes"] for name in summary}
  # LDAdam's error buffer puts it between GaLore and AdamW (bf16, rank 128)
  assert state["galore_adamw"] < state["ldadamw"] < state["adamw"], state
  # The second LDAdamW run (GaLore's projected step) builds too, in a directory plot.py reads.
  again = tmp_path / "ldadam_60m" / "lr_2.5e-3" / "ldadamw" / "dry_run.json"
  assert json.loads(again.read_text())["optimizer_state_bytes"] == state["ldadamw"]
  # in the layout of the committed results, which a new run's folder replaces as it is
  committed = ROOT / "benchmarks" / "results" / "ldadam_60m_gpu"
  for run in ("paper_lr/adamw", "paper_lr/galore_adamw", "paper_lr/ldadamw", "lr_2.5e-3/ldadamw"):
    assert (committed / run / "summary.json").exists(), run
    assert (tmp_path / "ldadam_60m" / run.split("/")[0]).is_dir(), run


def test_perf_gpu_script_commands_are_valid(tmp_path):
  """benchmarks/perf_gpu.sh's three refresh.py commands, recorded by a stand-in python and
  checked by refresh.parse (nothing runs; the script ran once on the CPU at tiny size, see
  BENCHMARKS.md): the 60m run at 4K-token batches, LDAdam beside adamw and galore_adamw at 60m
  and 350m, distinct output files."""
  from benchmarks import refresh  # pylint: disable=import-outside-toplevel
  log = tmp_path / "argv"
  stub = tmp_path / "python"
  stub.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
  stub.chmod(0o755)
  proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "perf_gpu.sh")], capture_output=True,
                        env={**os.environ, "PYTHON": str(stub), "OUT": str(tmp_path)}, text=True)
  assert proc.returncode == 0, proc.stderr
  commands = [line.split()[2:] for line in log.read_text().splitlines()]  # after -m module
  runs = [refresh.parse(argv) for argv in commands]
  got = [(a.model, a.batch_size * a.seq_len, "ldadamw" in a.baselines, a.torch, a.methods,
          a.unroll, "adamw_other_loop" in a.baselines, a.host_refresh) for a in runs]
  assert got == [("60m", 4096, True, False, ["power"], True, False, ["power"]),
                 ("350m", 64 * 256, True, True, ["power"], True, True, ["power"]),
                 ("1b", 32 * 256, False, False, ["power"], 1, False, [])]
  assert all(a.parts == ["train"] and a.attention == "cudnn" and a.tag for a in runs)
  # RUNS picks runs (one device call each, if one call cannot hold them); a bad name exits
  env = {**os.environ, "PYTHON": str(stub), "OUT": str(tmp_path)}
  log.unlink()
  subprocess.run(["bash", str(ROOT / "benchmarks" / "perf_gpu.sh")], check=True,
                 env={**env, "RUNS": "350m"})
  assert [refresh.parse(line.split()[2:]).model for line in log.read_text().splitlines()] == [
      "350m"]
  bad = subprocess.run(["bash", str(ROOT / "benchmarks" / "perf_gpu.sh")], capture_output=True,
                       text=True, env={**env, "RUNS": "7b"})
  assert bad.returncode == 2 and "RUNS: 7b is not one of" in bad.stderr


def refresh_result(model="1b", update=None, train=None):
  result = {"benchmark": "refresh", "model": model, "platform": "gpu", "rank": 512,
            "device": "H100", "jax": "0.11.2", "update_proj_gap": 200}
  if update is not None:
    result["update"] = {"results": update}
  if train is not None:
    result["train"] = {"results": train}
  return result


def train_row(normal_s, effective, refresh_s=None):
  return {"normal_step_s": normal_s, "refresh_step_s": refresh_s or normal_s,
          "effective_tokens_per_s": effective}


def test_plot_refresh_draws_ratios_within_each_file(tmp_path):
  pytest.importorskip("matplotlib")
  from benchmarks import plot_refresh  # pylint: disable=import-outside-toplevel
  first = refresh_result(update={
      "optax.adamw": {"normal_step_s": 0.02},  # no refresh: no bar
      "galore_adamw[svd]": {"normal_step_s": 0.03, "refresh_step_s": 60.03},
      "galore_adamw[power]": {"normal_step_s": 0.03, "refresh_step_s": 0.53}},
      train={"optax.adamw": train_row(1.0, 100.0), "galore_adamw[svd]": train_row(1.0, 97.0)})
  # A second run (another device call): its ratios use its own optax.adamw, not the first's.
  second = refresh_result(train={
      "optax.adamw": train_row(0.5, 200.0),
      "galore_adamw[power,staggered]": train_row(0.5, 210.0, refresh_s=0.8)})
  fig = plot_refresh.plot([first, second], tmp_path / "r.png")
  assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
  update_ax, train_ax = fig.axes
  labels = lambda ax: [t.get_text() for t in ax.get_yticklabels()]
  widths = lambda ax: [round(p.get_width(), 6) for p in ax.patches]
  assert labels(update_ax) == ["galore_adamw[svd]", "galore_adamw[power]"]
  assert widths(update_ax) == [60.0, 0.5]
  assert labels(train_ax) == ["optax.adamw", "galore_adamw[svd]", "galore_adamw[power,staggered]"]
  assert widths(train_ax) == [1.0, 0.97, 1.05]
  assert any("worst step 1.60x" in t.get_text() for t in train_ax.texts)
  assert doctest.testmod(plot_refresh).failed == 0


def test_plot_refresh_on_the_committed_cpu_result_and_bad_input(tmp_path):
  pytest.importorskip("matplotlib")
  from benchmarks import plot_refresh  # pylint: disable=import-outside-toplevel
  committed = ROOT / "benchmarks" / "results" / "refresh_60m_cpu_matrix_update.json"
  fig = plot_refresh.plot(plot_refresh.load([committed]), tmp_path / "cpu.png")
  rows = json.loads(committed.read_text())["update"]["results"]
  assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [
      k for k, row in rows.items() if "refresh_step_s" in row]
  other = tmp_path / "other.json"
  other.write_text(json.dumps(refresh_result(model="350m", update={})))
  with pytest.raises(SystemExit, match="several models"):
    plot_refresh.load([committed, other])
  # (merged without a word: the title, rank and T from the first file, bars from the other)
  base = json.loads(committed.read_text())
  for key, value in (("device", "another"), ("rank", 8), ("update_proj_gap", 10),
                     ("dtype", "other")):
    (tmp_path / "run2.json").write_text(json.dumps({**base, key: value}))
    with pytest.raises(SystemExit, match=rf"several runs .*{key}"):
      plot_refresh.load([committed, tmp_path / "run2.json"])
  (tmp_path / "x.json").write_text(json.dumps({"benchmark": "sharding"}))
  with pytest.raises(SystemExit, match="not a benchmarks/refresh.py result"):
    plot_refresh.load([tmp_path / "x.json"])
  with pytest.raises(SystemExit, match="no update or train results"):
    plot_refresh.plot(plot_refresh.load([other]), tmp_path / "none.png")


def test_plot_sharding_draws_the_committed_result(tmp_path):
  pytest.importorskip("matplotlib")
  from benchmarks import plot_sharding  # pylint: disable=import-outside-toplevel
  committed = ROOT / "benchmarks" / "results" / "sharding_cpu.json"
  out = plot_sharding.main([str(committed), "--out", str(tmp_path / "s.png")])
  assert out.read_bytes()[:4] == b"\x89PNG"
  result = json.loads(committed.read_text())
  fig = plot_sharding.plot(result, tmp_path / "s2.png")
  state = {line.get_label(): line for line in fig.axes[0].get_lines()}
  contrib = state["unstacked / optax.contrib.galore"]
  np.testing.assert_allclose(contrib.get_xdata(), [1, 2, 4, 8])
  mib = result["summary"]["stacked"]["galore_jax[svd]"]["8"]["state_bytes_per_device"] / 2**20
  np.testing.assert_allclose(state["stacked / galore_jax[svd]"].get_ydata()[-1], mib)
  # Rows without a timing (the reverse_std state-only row) draw no refresh line.
  assert "unstacked / galore_jax[svd,reverse_std]" not in [
      line.get_label() for line in fig.axes[1].get_lines()]
  assert doctest.testmod(plot_sharding).failed == 0
  with pytest.raises(SystemExit, match="not a benchmarks/sharding.py result"):
    plot_sharding.main([str(ROOT / "benchmarks" / "results" / "optimizer_step_60m_cpu.json"),
                        "--out", str(tmp_path / "x.png")])


def test_memory_benchmark_runs_each_configuration_in_its_own_process(tmp_path):
  """benchmarks/memory.py at CPU size: one row per optimizer and per-layer mode, each with
  XLA's step plan and the state's bytes, and the JSON (rewritten after each row, so a timeout
  keeps the finished rows) and table written."""
  from benchmarks import memory  # pylint: disable=import-outside-toplevel

  out = tmp_path / "memory.json"
  result = memory.main(["--models", "tiny", "--optimizers", "galore_adamw_8bit", "--dtype",
                        "fp32", "--tokenizer", "bytes", "--steps", "2", "--out", str(out)])
  assert json.loads(out.read_text()) == result
  assert result["complete"] and result["device"] == "cpu"  # the partial file said neither
  rows = result["rows"]
  assert [(r["optimizer"], r["per_layer"]) for r in rows] == [
      ("galore_adamw_8bit", False), ("galore_adamw_8bit", True)]
  # the headline row (per-layer 8-bit GaLore) ran first; the JSON keeps the table's order
  assert [r["run_index"] for r in rows] == [1, 0]
  for r in rows:
    assert "error" not in r, r
    assert r["step_memory_bytes"] > r["optimizer_state_bytes"] > 0 and r["tokens_per_s"] > 0
    assert r["model_flops_per_token"] > 0 and r["mfu"] is None  # a CPU has no known peak
  assert "| tiny | full | galore_adamw_8bit | True |" in memory.table(rows)
  # no exact SVD in the GPU rows: it would outlast a 7b row's timeout
  cmd = memory.train_command(memory.parse_args(["--out", "x"]), "7b", "galore_adamw", True,
                             tmp_path)
  assert cmd[cmd.index("--basis-method") + 1] == "power" and "--per-layer" in cmd
  assert "--method" not in cmd  # the full model: train.py's default
  # --methods full,sltrain (issue 17): the example's --method sltrain, paper ranks, no paper GB
  args = memory.parse_args(["--models", "60m,350m", "--optimizers", "adamw", "--methods",
                            "full,sltrain", "--per-layer", "off", "--out", "x"])
  configs = memory.configurations(args)
  assert configs == [(m, method, "adamw", False) for m in ("60m", "350m")
                     for method in ("full", "sltrain")]
  assert memory.run_order(configs) == configs  # no headline row among them
  cmd = memory.train_command(args, "350m", "adamw", False, tmp_path, "sltrain")
  assert cmd[-2:] == ["--method", "sltrain"] and cmd[cmd.index("--rank") + 1] == "256"
  with pytest.raises(SystemExit):
    memory.parse_args(["--methods", "full,lora", "--out", "x"])
  # the 7b table's headline rows first: per-layer 8-bit GaLore, per-layer 8-bit Adam, the rest
  seven = memory.configurations(memory.parse_args(["--models", "7b", "--out", "x"]))
  assert [c[2:] for c in memory.run_order(seven)] == [
      ("galore_adamw_8bit", True), ("adamw_8bit", True), ("adamw", False), ("adamw", True),
      ("adamw_8bit", False), ("galore_adamw", False), ("galore_adamw", True),
      ("galore_adamw_8bit", False)]
  assert memory.run_order(seven, "table") == seven
  assert doctest.testmod(memory).failed == 0
  from galore_jax import subspace  # pylint: disable=import-outside-toplevel
  assert subspace.METHODS["power"].cold == "randomized"  # its first basis: no SVD either


def _gpu_session(tmp_path, **env):
  return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], cwd=ROOT,
                        env={**ENV, "OUT": str(tmp_path), **env}, capture_output=True,
                        text=True, timeout=120)


def _session_files(out):
  """The files of gpu_session.tgz by name, and its manifest's rows."""
  import tarfile  # pylint: disable=import-outside-toplevel
  with tarfile.open(out / "gpu_session.tgz") as tar:
    files = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}
  return files, [json.loads(line) for line in files["session/session.jsonl"].splitlines()]


def test_gpu_session_runs_jobs_in_order_within_the_budget_and_packs_one_file(tmp_path):
  """benchmarks/gpu_session.sh with a stand-in interpreter that records its arguments: each
  job runs in its own folder with its log, a job whose floor no longer fits the budget is
  skipped, everything comes back as one tarball; a plan (DRY) counts each job at its cap."""
  fake = tmp_path / "fake-python"
  fake.write_text("#!/bin/sh\necho \"fake $*\"\n")
  fake.chmod(0o755)
  out = tmp_path / "out"
  done = _gpu_session(out, JOBS="memory_1b first_7b profile memory_sltrain memory_sltrain_8bit",
                      PYTHON=str(fake), BUDGET="400")
  assert done.returncode == 0, done.stderr
  files, rows = _session_files(out)
  assert [(r["job"], r["rc"]) for r in rows] == [
      ("memory_1b", 0), ("first_7b", 0), ("profile", 0), ("memory_sltrain", 0),
      ("memory_sltrain_8bit", 0)]
  # issue 17's memory target: AdamW at 60m and 350m, full-rank and SLTrain
  assert files["session/memory_sltrain/memory_sltrain.log"].startswith(
      "fake -m benchmarks.memory --models 60m,350m --optimizers adamw --methods full,sltrain ")
  # SLTrain Fig. 3's 8-bit SLTrain row (per-layer), and with 8-bit GaLore on its factors
  assert files["session/memory_sltrain_8bit/memory_sltrain_8bit.log"].startswith(
      "fake -m benchmarks.memory --models 1b,7b --optimizers adamw_8bit,galore_adamw_8bit"
      " --methods sltrain --per-layer on ")
  log = files["session/memory_1b/memory_1b.log"]
  assert log.startswith("fake -m benchmarks.memory --models 1b --out ") and log.endswith(
      "/session/memory_1b/memory_1b_gpu.json\n")
  # issue 18 profiles 350m (unrolled, scanned) and 1b (scanned, perf_gpu.sh's batch)
  profiled = [line.split()[3:7] for line in files["session/profile/profile.log"].splitlines()]
  assert profiled == [["--model", "350m", "--unroll", "all"], ["--model", "350m", "--unroll", "1"],
                      ["--model", "1b", "--unroll", "1"]]
  assert sorted(os.listdir(out)) == ["gpu_session.tgz"]  # one file comes back

  # 620 s: successors at its cap (540), memory_1b at what is left (80 s, less the seconds
  # the plan itself takes; over its floor of 60), compare (floor 540) skipped
  plan = _gpu_session(tmp_path / "plan", JOBS="successors memory_1b compare", DRY="1",
                      BUDGET="620")
  assert plan.returncode == 0, plan.stderr
  _, rows = _session_files(tmp_path / "plan")
  assert [(r["job"], "skipped" in r) for r in rows] == [
      ("successors", False), ("memory_1b", False), ("compare", True)]
  assert rows[0]["cap_s"] == 540 and 60 <= rows[1]["cap_s"] <= 80

  # issue 17's 130m convergence: the 60m calls' commands at --sizes 130m
  conv = _gpu_session(tmp_path / "conv", JOBS="conv_base_130m", DRY="1")
  _, rows = _session_files(tmp_path / "conv")
  assert " --sizes 130m " in rows[0]["command"] and rows[0]["command"].endswith(
      "--methods lora,relora,lowrank,sltrain --out $D/convergence_130m_baselines")

  # the LLaMA section's rows again (the validation split changed since they were measured)
  again = _gpu_session(tmp_path / "again", JOBS="llama ldadam", DRY="1")
  _, rows = _session_files(tmp_path / "again")
  assert [r["command"] for r in rows] == ["OUT=$D bash benchmarks/llama_gpu.sh",
                                          "OUT=$D bash benchmarks/ldadam_gpu.sh"]

  bad = _gpu_session(tmp_path / "bad", JOBS="successors memroy_7b")
  assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
      "JOBS: memroy_7b is not a job of benchmarks/gpu_session.sh"]


def test_convergence_methods_share_processes_and_carry_the_papers_settings():
  """Flags only: full, GaLore, 8-bit GaLore and LDAdam differ in --optimizer alone (one
  train.py process, identical batches); each baseline is a --method of its own at its lr."""
  from benchmarks import convergence as c  # pylint: disable=import-outside-toplevel
  assert c.groups(list(c.METHODS), "60m", {}) == [
      (["full", "galore", "galore8bit", "ldadam", "fira"], []),
      (["lora"], ["--method", "lora", "--lora-alpha", "32"]),
      (["relora"], ["--method", "relora", "--lora-alpha", "32"]),
      (["lowrank"], ["--method", "lowrank"]),
      (["sltrain"], ["--method", "sltrain", "--delta", "0.03", "--lora-alpha", "32", "--lr",
                     "0.003"]),
      # APOLLO's alpha 1 and APOLLO-Mini's sqrt(128), after the shared --galore-scale 0.25.
      (["apollo"], ["--galore-scale", "1"]),
      (["apollo_mini"], ["--galore-scale", "11.313708498984761"])]
  assert c.groups(["sltrain", "full", "galore"], "130m", {"sltrain": 1e-3, "galore": 5e-3}) == [
      (["sltrain"], ["--method", "sltrain", "--delta", "0.03", "--lora-alpha", "16"]),
      (["full"], []), (["galore"], ["--lr", "0.005"])]
  assert c.shared_flags("60m")[:2] == ["--rank", "128"] and c.rank_of("1b") == 512
  # A failed process is reported by its own error line, not by the noise after it.
  out = "step 3\ntrain.py: error: unrecognized arguments: --method lora (see --help)\nexit\n"
  assert c.failure(out, 2) == "train.py: error: unrecognized arguments: --method lora (see --help)"
  assert c.failure("Killed\n", 137) == "Killed" and c.failure("", 1) == "exit code 1"
  assert c.failure("ok", 0) is None


@pytest.mark.parametrize("argv, says", [
    (["--methods", ""], "--methods: none given"), (["--sizes", ","], "--sizes: none given"),
    (["--lr", "full=nan"], "--lr: 'nan' is not a finite number > 0"),
    (["--lr", "full=-1"], "--lr: '-1' is not a finite number > 0")])
def test_convergence_refuses_an_empty_list_and_a_learning_rate_that_is_none(
    tmp_path, capsys, argv, says):
  """An empty --methods or --sizes wrote a result with no row (over a committed one, given
  its --out); a NaN or negative --lr passed, to fail in every train.py run."""
  from benchmarks import convergence  # pylint: disable=import-outside-toplevel
  with pytest.raises(SystemExit):
    convergence.parse_args([*argv, "--out", str(tmp_path)])
  assert says in capsys.readouterr().err


def test_compare_labels_are_the_optimizers_it_builds():
  """--optimizers is checked against compare.LABELS before any job: it must name what
  jax_optimizers builds (a rank sweep adds name@r<rank> labels)."""
  from benchmarks import compare, refresh  # pylint: disable=import-outside-toplevel
  cfg = refresh.SIZES["tiny"][0]
  assert tuple(compare.jax_optimizers(cfg, 8, 200, {})) == compare.LABELS


def test_convergence_reads_no_summary_an_earlier_process_left(tmp_path, monkeypatch):
  """train.py --overwrite now clears an earlier run only once the new one can start: a
  process refused before (its data, say) leaves the earlier summary.json, which is no result
  of this run."""
  from benchmarks import convergence  # pylint: disable=import-outside-toplevel
  args = convergence.parse_args(["--sizes", "tiny", "--methods", "full", "--out",
                                 str(tmp_path)])
  stale = tmp_path / "runs" / "tiny" / "full"
  stale.mkdir(parents=True)
  (stale / "summary.json").write_text(json.dumps({"eval_loss": 1.0, "step": 4}))
  os.utime(stale / "summary.json", (0, 0))  # written long before this process
  refused = subprocess.CompletedProcess([], 2, "", "train.py: error: --data: no such file\n")
  monkeypatch.setattr(convergence.subprocess, "run", lambda *a, **k: refused)
  result = convergence.run_group(args, "tiny", ["full"], [], 4)
  assert result["full"]["error"] == "train.py: error: --data: no such file"


def test_convergence_benchmark_tiny(tmp_path):
  """full / GaLore / LDAdam at the tiny size: one train.py process, the same batches (the
  first step's loss is the same for all), curves to the token budget, sizes that add up."""
  data = tmp_path / "data"
  data.mkdir()
  for name, n in (("train.jsonl", 60), ("valid.jsonl", 8)):
    (data / name).write_text("".join(json.dumps(
        {"text": f"document {i}: " + " ".join(f"w{(i * 7 + j) % 23}" for j in range(40))}) + "\n"
        for i in range(n)))
  out = tmp_path / "out"
  run_script("convergence.py", "--sizes", "tiny", "--methods", "full,galore,ldadam",
             "--tokens", "512", "--batch-size", "4", "--seq-len", "32", "--evals", "2",
             "--eval-tokens", "124", "--data", str(data), "--tokenizer", "bytes",
             "--dtype", "fp32", "--extra", "--peak-tflops 0.5", "--out", str(out))
  result = json.loads((out / "convergence_tiny_cpu.json").read_text())
  assert (result["benchmark"], result["tokens"], result["steps"]) == ("convergence", 512, 4)
  runs = result["runs"]["tiny"]
  assert list(runs) == ["full", "galore", "ldadam"]
  from examples.llama import flops, model  # pylint: disable=import-outside-toplevel
  per_token = flops.train_flops_per_token(model.CONFIGS["tiny"], 32)
  assert {r["optimizer"] for r in runs.values()} == {"adamw", "galore_adamw", "ldadamw"}
  assert len({r["command"] for r in runs.values()}) == 1  # one process, identical batches
  first_losses = set()
  for name, r in runs.items():
    assert "error" not in r, r
    assert [p["tokens"] for p in r["curve"]] == [256, 512]
    assert r["final_ppl"] == r["curve"][-1]["eval_ppl"] == pytest.approx(
        math.exp(r["final_eval_loss"]))
    assert r["trainable_params"] == r["params"] and r["weight_bytes"] == 4 * r["params"]
    assert r["weight_plus_state_bytes"] == r["weight_bytes"] + r["optimizer_state_bytes"]
    assert r["tokens_per_s"] > 0 and r["step_memory_bytes"] > 0
    # train.py's MFU carried over: model FLOPs per token x tokens/s over the peak given
    assert r["model_flops_per_token"] == per_token
    assert r["mfu"] == pytest.approx(per_token * r["tokens_per_s"] / 0.5e12)
    assert r["lr"] == {"full": 1e-3, "galore": 1e-2, "ldadam": 1e-3}[name] == r["peak_lr"]
    metrics = out / "runs" / "tiny" / "full+galore+ldadam" / r["optimizer"] / "metrics.jsonl"
    first_losses.add(json.loads(metrics.read_text().splitlines()[0])["loss"])
  assert len(first_losses) == 1
  # AdamW keeps two moments of every parameter (float32 here) and a count.
  full, galore = runs["full"], runs["galore"]
  assert 8 * full["params"] <= full["optimizer_state_bytes"] < 8 * full["params"] + 64
  assert galore["optimizer_state_bytes"] < full["optimizer_state_bytes"]
  md = (out / "convergence_tiny_cpu.md").read_text().splitlines()
  assert len(md) == 2 + 3 and md[2].startswith("| tiny | Full-Rank (AdamW) | adamw | 0.001 |")
  assert md[0].endswith("| tokens/s | MFU |")
  assert md[2].endswith(f" | {100 * runs['full']['mfu']:.1f}% |")
  assert (out / "convergence_tiny_cpu.png").stat().st_size > 0
  # Runs of several calls merge into one figure and table.
  from benchmarks import convergence  # pylint: disable=import-outside-toplevel
  merged = convergence.main(["--merge", str(out / "convergence_tiny_cpu.json"),
                             "--out", str(tmp_path / "merged")])
  stamped = {k: result[k] for k in ("data", "tokenizer", "tokens")}  # what each trained on
  assert merged["runs"] == {size: {name: {**r, **stamped} for name, r in rows.items()}
                            for size, rows in result["runs"].items()}
  assert merged["title"] == result["title"] and (tmp_path / "merged" / "convergence.png").is_file()


def test_convergence_merge_keeps_what_the_runs_were_trained_on(tmp_path):
  """--merge keeps the data, tokenizer and title its inputs share (the notebook labels the
  curves with them, and a perplexity per byte is not one per BPE token) and stamps each run
  with its own file's, so runs of different tokenizers stay told apart."""
  from benchmarks import convergence  # pylint: disable=import-outside-toplevel
  run = {"method": "GaLore", "optimizer": "galore_adamw", "lr": 0.01, "final_ppl": 20.0,
         "trainable_params": 1, "params": 1, "tokens_per_s": None, "curve": [],
         "weight_plus_state_bytes": None, "step_memory_bytes": None}
  paths = []
  for size, tokenizer in (("60m", "bpe"), ("130m", "bpe"), ("9m", "bytes")):
    paths.append(tmp_path / f"{size}.json")
    paths[-1].write_text(json.dumps({
        "benchmark": "convergence", "data": "debian-docs", "tokenizer": tokenizer,
        "title": f"debian-docs, {tokenizer} tokenizer", "runs": {size: {"galore": run}}}))
  same = json.loads(convergence.merge(paths[:2], tmp_path / "same").read_text())
  assert (same["data"], same["tokenizer"], same["title"]) == (
      "debian-docs", "bpe", "debian-docs, bpe tokenizer")
  mixed = json.loads(convergence.merge(paths, tmp_path / "mixed").read_text())
  assert "tokenizer" not in mixed and mixed["data"] == "debian-docs"
  assert {size: rows["galore"]["tokenizer"] for size, rows in mixed["runs"].items()} == {
      "60m": "bpe", "130m": "bpe", "9m": "bytes"}


def test_convergence_merge_compares_only_runs_on_the_same_tokens(tmp_path, capsys):
  """Merged runs of one size from files of other data, tokenizer or token budget were put
  side by side with a "vs full" ratio across them (-90% for a GaLore run on other data):
  now the ratio is left out there, and the merge says why."""
  from benchmarks import convergence  # pylint: disable=import-outside-toplevel
  row = {"optimizer": "x", "lr": 0.01, "trainable_params": 1, "params": 1,
         "tokens_per_s": None, "curve": [], "weight_plus_state_bytes": None,
         "step_memory_bytes": None}
  paths = []
  for name, ppl, tokens in (("full", 30.0, 1000), ("galore", 3.0, 10**9), ("lora", 33.0, 1000)):
    paths.append(tmp_path / f"{name}.json")
    paths[-1].write_text(json.dumps({
        "benchmark": "convergence", "data": "debian-docs", "tokenizer": "bytes",
        "tokens": tokens, "runs": {"9m": {name: {**row, "method": name, "final_ppl": ppl}}}}))
  merged = json.loads(convergence.merge(paths, tmp_path / "merged").read_text())
  rows = {line.split(" | ")[1]: line.split(" | ")[5] for line in merged["table"].splitlines()[2:]}
  assert rows == {"full": "", "galore": "other tokens", "lora": "+10.0%"}
  assert "9m: runs trained on other data, tokenizer or tokens" in capsys.readouterr().err


# The papers' tables, restated from shared/reference (galore.md 2.5-2.8, frontier.md 2-3,
# ldadam-sltrain.md 2): per source, (model, method[, per_layer]) -> the published number.
SIZES4 = ("60m", "130m", "350m", "1b")
PAPERS = {
    ("perplexity", "ppl"): {
        "galore_t2": {(m, k): v for k, vals in {
            "adamw": (34.06, 25.08, 18.80, 15.56), "galore_adamw": (34.88, 25.36, 18.95, 15.64),
            "lowrank": (78.18, 45.51, 37.41, 142.53), "lora": (34.99, 33.92, 25.58, 19.21),
            "relora": (37.04, 29.37, 29.08, 18.33)}.items() for m, v in zip(SIZES4, vals)},
        "apollo_t2": {(m, k): v for k, vals in {
            "apollo_adamw": (31.55, 22.94, 16.85, 14.20),
            "apollo_mini": (31.93, 23.53, 17.18, 14.17)}.items() for m, v in zip(SIZES4, vals)},
        "fira_t3": dict(zip([(m, "fira_adamw") for m in SIZES4], (31.06, 22.73, 16.85, 14.31))),
        "sltrain_t2": dict(zip([(m, "sltrain") for m in SIZES4], (34.15, 26.04, 19.42, 16.14))),
        "galore_t3": {("7b", k, t): v for k, vals in {
            "galore_adamw_8bit": (17.94, 15.39, 14.95, 14.65),
            "adamw_8bit": (18.09, 15.47, 14.83, 14.61)}.items()
                      for t, v in zip((5.2e9, 10.5e9, 15.7e9, 19.7e9), vals)}},
    ("memory_gb", "gb"): {
        "sltrain_fig3": {(m, k, k != "adamw"): v for k, vals in {
            "adamw": (4.5, 16.3, 67.4), "adamw_8bit": (3.5, 11.8, 29.4),
            "galore_adamw_8bit": (3.1, 10.3, 22.0), "sltrain_8bit": (2.2, 6.8, 18.3)}.items()
                         for m, v in zip(("350m", "1b", "7b"), vals)},
        "galore_t11": {("1b", k, pl): v for k, vals in {
            "adamw": (13.60, 9.63), "adafactor": (13.15, 10.32), "adamw_8bit": (9.54, 6.93),
            "galore_adamw_8bit": (7.95, 5.63)}.items() for pl, v in zip((False, True), vals)},
        "galore_fig1": {("7b", "adamw", False): 58.0, ("7b", "galore_adamw_8bit", True): 22.0}},
    ("tokens_per_s", "tokens_per_s"): {"galore_t11": {("1b", k, pl): v for k, vals in {
        "adamw": (1256.98, 1354.37), "adafactor": (581.02, 613.90),
        "adamw_8bit": (1569.89, 1205.31), "galore_adamw_8bit": (1109.38, 1019.63)}.items()
                                                      for pl, v in zip((False, True), vals)}},
    ("memory_estimate_gb", "optimizer_state_gb"): {"galore_t6": {(m, k): v for k, vals in {
        "adamw": (0.23, 0.51, 1.37, 5.20), "galore_adamw": (0.13, 0.28, 0.54, 1.78)}.items()
                                                                 for m, v in zip(SIZES4, vals)}},
    ("optimizer_step_s", "optimizer_step_s"): {"apollo_step": {("1b", k): v for k, v in {
        "adamw": 0.036, "galore_adamw": 0.371, "fira_adamw": 0.421, "apollo_adamw": 0.051,
        "apollo_mini": 0.048}.items()}},
}


def test_paper_numbers_are_the_papers():
  """Regression guard: every number of benchmarks/paper_numbers.json that the notebook draws
  is the paper's own, at its model size, method, per-layer setting and token count."""
  data = json.loads((ROOT / "benchmarks" / "paper_numbers.json").read_text())
  for (table, field), sources in PAPERS.items():
    got = {}
    for p in data[table]:
      assert p["source"] in data["sources"], p
      key = (p["model"], p["method"]) + ((p["per_layer"],) if "per_layer" in p else ()) + (
          (p["tokens"],) if p["source"] == "galore_t3" else ())
      if p.get(field) is not None:
        got.setdefault(p["source"], {})[key] = p[field]
    assert got == sources, table
  assert {p["tokens"] for p in data["perplexity"] if p["source"] != "galore_t3"} == {
      1.1e9, 2.2e9, 6.4e9, 13.1e9}  # Table 2's labels (galore.md 2.4)


def test_compare_runs_jobs_and_regenerates_the_headline_table(tmp_path):
  """benchmarks/compare.py at CPU size: a job per framework in its own process, the rows'
  amortized tokens/s, refresh time, step memory and MFU in one JSON, and BENCHMARKS.md's
  block between the markers rewritten from it (or "GPU run pending" without a result)."""
  from benchmarks import compare  # pylint: disable=import-outside-toplevel
  from examples.llama import flops  # pylint: disable=import-outside-toplevel
  from examples.llama import model  # pylint: disable=import-outside-toplevel

  out = tmp_path / "compare.json"
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.compare", "--models", "tiny", "--optimizers",
       "optax.adamw,galore_adamw", "--train-steps", "1", "--batch-size", "2",
       "--seq-len", "16", "--dtype", "fp32", "--unroll", "all", "--out", str(out)],
      cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert not (tmp_path / "compare_rows").exists()  # the jobs' rows: kept only until then
  tiny = result["models"]["tiny"]
  assert set(tiny["rows"]) == {"optax.adamw", "galore_adamw"}, tiny
  B, S, T = 2, 16, result["update_proj_gap"]
  for row in tiny["rows"].values():
    period_s = (T - 1) * row["normal_step_s"] + row["refresh_step_s"]
    assert math.isclose(row["effective_tokens_per_s"], B * S * T / period_s)
    assert math.isclose(row["refresh_s"], row["refresh_step_s"] - row["normal_step_s"])
    assert row["step_memory_bytes"] > 0 and row["mfu"] is None  # no peak known for a CPU
  assert tiny["rows"]["optax.adamw"]["vs_optax_adamw"] == 1.0
  # FLOPs per token by hand for the 1b config at 256 tokens: 6 N + 12 L D S.
  c = model.CONFIGS["1b"]
  n = 24 * (4 * 2048**2 + 3 * 2048 * 5461) + 2048 * 32000
  assert flops.flops_per_token(c, 256) == 6 * n + 12 * 24 * 2048 * 256

  md = tmp_path / "B.md"
  md.write_text(f"# x\n{compare.BEGIN}\nold\n{compare.END}\ntail\n")
  with pytest.raises(SystemExit, match=r"missing.json: cannot read"):  # a mistyped path
    compare.main(["--table", str(tmp_path / "missing.json"), "--markdown", str(md)])
  assert "old" in md.read_text()  # was replaced by "GPU run pending"
  compare.main(["--table", "pending", "--markdown", str(md)])
  assert "GPU run pending" in md.read_text() and "old" not in md.read_text()
  compare.main(["--table", str(out), "--markdown", str(md)])
  text = md.read_text()
  assert text.startswith("# x\n") and text.endswith(f"{compare.END}\ntail\n")
  eff = tiny["rows"]["galore_adamw"]["effective_tokens_per_s"]
  assert f"| galore_adamw | {eff:,.0f} |" in text
  assert "GPU run pending" not in text and result["device"] in text
  assert result["unroll"] is True and "layer loop unrolled" in text
  assert doctest.testmod(compare).failed == 0


def test_headline_table_says_which_memory_each_row_measured():
  """The headline table's memory column is XLA's plan of the step for the JAX rows; torch's rows
  have only the allocator's peak, a different measure: the cell says so."""
  from benchmarks import compare  # pylint: disable=import-outside-toplevel
  row = {"effective_tokens_per_s": 1000.0, "vs_optax_adamw": 1.0, "refresh_s": 0.0, "mfu": None}
  result = {"date": "d", "device": "dev", "platform": "gpu", "update_proj_gap": 200,
            "dtype": "bf16", "basis_method": "power", "command": "c",
            "versions": dict.fromkeys(["jax", "optax", "flax", "galore_jax", "torch",
                                       "galore-torch"], "1"),
            "models": {"1b": {"rank": 512, "batch_size": 32, "seq_len": 256,
                              "flops_per_token": 1e9, "notes": {}, "rows": {
                                  "optax.adamw": {**row, "step_memory_bytes": 2 * 2**30},
                                  "torch.optim.AdamW": {**row, "peak_memory_bytes": 3 * 2**30}},
                              "skipped": {"apollo_mini": "not in this galore_jax / optax"}}}}
  lines = compare.headline_table(result).splitlines()
  assert "| apollo_mini | not measured: not in this galore_jax / optax |" in lines[-1]
  jax_row = next(line for line in lines if line.startswith("| optax.adamw |"))
  torch_row = next(line for line in lines if line.startswith("| torch.optim.AdamW |"))
  assert jax_row.split(" | ")[4] == "2.00"
  assert torch_row.split(" | ")[4] == "3.00 (allocator peak)"


def test_other_loop_baseline_times_the_other_layout():
  from benchmarks import train_steps  # pylint: disable=import-outside-toplevel
  assert train_steps.other_loop(1) == ("optax.adamw (unrolled loop)", True)
  assert train_steps.other_loop(True) == ("optax.adamw (scan loop)", 1)  # True == 1 in Python
  assert train_steps.other_loop(4) == ("optax.adamw (scan loop)", 1)


def test_time_jax_optimizers_reports_a_failing_optimizer_and_goes_on():
  """compare.py's jobs keep the rows after an optimizer that fails (an out-of-memory at 1b, a
  successor built with arguments it does not take): on_error sees it, the next one runs."""
  import argparse  # pylint: disable=import-outside-toplevel
  from benchmarks import refresh, train_steps  # pylint: disable=import-outside-toplevel

  def broken():
    raise MemoryError("RESOURCE_EXHAUSTED")

  cfg = refresh.SIZES["tiny"][0]
  args = argparse.Namespace(dtype="fp32", attention="xla", unroll=1)
  errors = {}
  rows = train_steps.time_jax_optimizers(cfg, {"broken": (broken, False)}, args, None,
                                         on_error=lambda label, e: errors.setdefault(label, e))
  assert rows == {} and isinstance(errors["broken"], MemoryError)
  with pytest.raises(MemoryError):
    train_steps.time_jax_optimizers(cfg, {"broken": (broken, False)}, args, None)


def test_compare_keeps_an_optimizers_own_failure_when_its_job_times_out(tmp_path,
                                                                         monkeypatch):
  """A job that recorded an optimizer's failure (an out-of-memory) and then ran past its
  timeout: that optimizer keeps its own reason, and only the ones not reached say so."""
  import argparse  # pylint: disable=import-outside-toplevel
  from benchmarks import compare  # pylint: disable=import-outside-toplevel

  job = (
      "import json, sys, time\n"
      "def w(label, row):\n"
      "  with open(sys.argv[1], 'a') as f:\n"
      "    f.write(json.dumps({'label': label, 'row': row}) + '\\n')\n"
      f"w({compare.PLANNED!r}, {{'planned': ['optax.adamw', 'galore_adamw', 'ldadamw']}})\n"
      "w('optax.adamw', {'normal_step_s': 0.1})\n"
      "w('galore_adamw', {'skipped': 'RESOURCE_EXHAUSTED: out of memory'})\n"
      "time.sleep(60)\n")
  monkeypatch.setattr(compare, "job_command",
                      lambda args, model, framework, rows: [sys.executable, "-c", job, str(rows)])
  args = argparse.Namespace(torch=False, models="1b", timeouts={"jax": 5})
  out = compare.run_jobs(args, tmp_path)["1b"]
  assert out["rows"] == {"optax.adamw": {"normal_step_s": 0.1}}
  assert out["skipped"] == {"galore_adamw": "RESOURCE_EXHAUSTED: out of memory",
                            "ldadamw": "not reached: the jax job timed out after 5 s"}


def test_a_host_refresh_is_timed_after_its_executable_compiles():
  """With the refresh decided on the host, the refresh is an executable of its own: its
  compile (seconds for a GPU's unrolled 350m) must not be the refresh's time, which a run
  slower than the budget becomes."""
  import argparse  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import galore_jax as gj  # pylint: disable=import-outside-toplevel
  from benchmarks import train_steps  # pylint: disable=import-outside-toplevel

  params = {"w": jnp.ones((8, 4))}
  opt_state = gj.galore_adamw(1e-2, rank=2, update_proj_gap=4).init(params)

  class Step:  # a jitted step whose refresh executable takes 0.5 s to compile
    compiled = False

    def __call__(self, params, opt_state, tokens, refresh=None):
      if refresh and not self.compiled:
        time.sleep(0.5)
        self.compiled = True
      return params, opt_state, jnp.float32(0)

    def lower(self, *args, refresh=None):
      return types.SimpleNamespace(compile=lambda: setattr(self, "compiled", bool(refresh)))

  args = argparse.Namespace(train_steps=2, refresh_repeats=2, budget_s=0.2, update_proj_gap=4)
  _, (refresh_s,) = train_steps.time_jax_train(Step(), params, opt_state, None, args, host=True)
  assert refresh_s < 0.2, refresh_s


def test_first_steps_evaluates_a_model_on_the_device_and_writes_each_row(tmp_path,
                                                                        monkeypatch):
  """The per-part losses evaluate a model whose params are device arrays (host copies put
  back into it were sent to the device at every evaluation batch: about 2.8 TB per 7b row),
  and the JSON is written after each row (a row cut by a timeout keeps the ones before)."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from benchmarks import first_steps  # pylint: disable=import-outside-toplevel

  on_device, real_eval, real_row = [], first_steps.eval_loss, first_steps.no_warmup_row
  params = lambda model: jax.tree.leaves(nnx.state(model, nnx.Param))

  def eval_loss(model, eval_set, pad_id):
    on_device.append(all(isinstance(x, jax.Array) for x in params(model)))
    return real_eval(model, eval_set, pad_id)

  rows = []

  def no_warmup_row(*args):
    rows.append(1)
    if len(rows) == 2:
      raise MemoryError("RESOURCE_EXHAUSTED")
    return real_row(*args)

  monkeypatch.setattr(first_steps, "eval_loss", eval_loss)
  monkeypatch.setattr(first_steps, "no_warmup_row", no_warmup_row)
  out = tmp_path / "f.json"
  with pytest.raises(MemoryError):
    first_steps.main(["--models", "tiny", "--optimizers", "galore_adamw", "--lrs", "0.05,0.01",
                      "--steps", "2", "--warmup-steps", "10", "--out", str(out)])
  assert on_device and all(on_device), on_device
  written = json.loads(out.read_text())
  assert [r["lr"] for r in written["rows"]] == [0.05] and written["complete"] is False


def test_first_steps_tiny(tmp_path):
  run_script("first_steps.py", "--models", "tiny", "--optimizers", "galore_adamw", "--lrs",
             "0.05", "--steps", "2", "--warmup-steps", "10", "--out", str(tmp_path / "f.json"))
  (row,) = json.loads((tmp_path / "f.json").read_text())["rows"]
  assert (row["model"], row["optimizer"], row["lr"], row["warmup"]) == ("tiny", "galore_adamw",
                                                                       0.05, 10)
  # lm_head's first Adam step moves a logit by at most lr * ||h||_1 <= lr * D (unit-RMS h)
  assert 0 < row["lm_head_logit_shift_over_lr_D"] <= 1
  # the final norm's update alone hardly moves the loss; every other part's does
  assert abs(row["loss_after_norm"] - row["loss_before"]) < 0.05
  for part in ("embed", "layers", "lm_head", "all"):
    assert row[f"loss_after_{part}"] != row["loss_before"], part
  # the example's warm-up starts at lr 0: its first step changes nothing
  assert row["losses_warmup"][0] == row["loss_before"]
  assert row["losses_no_warmup"][0] == row["loss_after_all"]
  assert len(row["losses_no_warmup"]) == len(row["losses_warmup"]) == 2
  ratios = row["update_over_weight_spectral"]
  assert set(ratios) == {"embed", "layers", "lm_head"} and all(r > 0 for r in ratios.values())


def test_first_steps_spectral_norm_is_numpys():
  from benchmarks.first_steps import spectral_norm
  w = np.random.default_rng(0).normal(size=(3, 40, 70)).astype(np.float32)
  np.testing.assert_allclose(spectral_norm(w, iters=100), np.linalg.norm(w, ord=2, axis=(1, 2)),
                             rtol=1e-4)


def test_profile_step_tiny(tmp_path):
  """benchmarks/profile_step.py at CPU size: per optimizer the traced steps' wall, busy and
  span seconds, the kinds' shares and the top XLA ops of the train step; with --hlo the
  optimized HLO beside the JSON (GaLore's, with the refresh decided on the host, holds no
  conditional)."""
  from benchmarks import profile_step, refresh  # pylint: disable=import-outside-toplevel
  out = tmp_path / "profile.json"
  run_script("profile_step.py", "--model", "tiny", "--batch-size", "2", "--seq-len", "16",
             "--attention", "xla", "--dtype", "fp32", "--optimizers", "optax.adamw,galore_adamw",
             "--steps", "3", "--top", "5", "--host-refresh", "--hlo", "--peak-tflops", "0.5",
             "--out", str(out))
  result = json.loads(out.read_text())
  assert (result["benchmark"], result["model"], result["host_refresh"]) == (
      "profile_step", "tiny", True)
  assert set(result["results"]) == {"optax.adamw", "galore_adamw"}
  from examples.llama import flops  # pylint: disable=import-outside-toplevel
  per_token = flops.flops_per_token(refresh.SIZES["tiny"][0], 16)
  for row in result["results"].values():
    assert 0 < row["busy_s_per_step"] <= row["span_s_per_step"]
    assert 0 <= row["idle_fraction"] < 1 and row["wall_s_per_step"] > 0
    assert row["events_from"] == "host"  # a CPU's ops run on host threads; a GPU's: device
    # tokens/s of the 2 x 16 batch and its MFU, as refresh.py's train rows count them
    assert row["tokens_per_s"] == pytest.approx(2 * 16 / row["wall_s_per_step"])
    assert row["model_flops_per_token"] == per_token
    assert row["mfu"] == pytest.approx(per_token * row["tokens_per_s"] / 0.5e12)
    assert math.isclose(sum(row["kinds"].values()), 1.0)
    assert len(row["top_ops"]) == 5 and all(op["s_per_step"] > 0 for op in row["top_ops"])
    shares = [op["share"] for op in row["top_ops"]]
    assert shares == sorted(shares, reverse=True)
  hlo = (tmp_path / "profile.galore_adamw.hlo.txt").read_text()
  assert "ENTRY" in hlo and " conditional(" not in hlo
  assert doctest.testmod(profile_step).failed == 0
  with pytest.raises(SystemExit, match="--optimizers"):
    profile_step.parse(["--optimizers", "sgd"])


TINY_MATRIX = ["--model", "tiny", "--parts", "matrix", "--methods", "svd", "--repeats", "1"]
TINY_JOB = ["--models", "tiny", "--optimizers", "optax.adamw", "--batch-size", "2", "--seq-len",
            "16", "--dtype", "fp32"]


@pytest.mark.parametrize("module, argv, expected", [
    ("refresh", [*TINY_MATRIX, "--repeats", "0"], "--repeats"),
    ("refresh", [*TINY_MATRIX, "--rank", "0"], "--rank"),  # was the size's rank, silently
    ("refresh", ["--methods", "nope"], "--methods"),
    ("refresh", [*TINY_MATRIX, "--out", "{file}"], "afile is not a directory"),
    ("optimizer_step", ["--steps", "0"], "--steps"),
    ("optimizer_step", ["--steps", "1", "--out", "{file}"], "afile is not a directory"),
    ("first_steps", ["--models", "nope"], "--models"),
    ("first_steps", ["--optimizers", "nope"], "--optimizers"),
    ("first_steps", ["--lrs", "abc"], "--lrs"),
    ("first_steps", ["--steps", "0"], "--steps"),
    ("first_steps", ["--models", "tiny", "--layers", "99"], "more than tiny's"),  # built 99
    ("compare", ["--models", "nope", "--out", "{dir}/c.json"], "--models"),
    ("compare", [*TINY_JOB, "--train-steps", "0", "--out", "{dir}/c.json"], "--train-steps"),
    ("compare", ["--table", "{file}", "--markdown", "{dir}/B.md"], "afile: not JSON"),
    ("compare", ["--timeouts", "jax190", "--out", "{dir}/c.json"], "--timeouts"),
    # (a typo ran the whole job, to a 'not measured' row)
    ("compare", ["--optimizers", "bogus,optax.adamw", "--out", "{dir}/c.json"],
     "--optimizers: unknown 'bogus'"),
    ("compare", [*TINY_JOB, "--ranks", "8,x", "--out", "{dir}/c.json"], "--ranks"),
    ("sharding", ["--model", "nope", "--device-counts", "1"], "--model"),  # wrote {} and exit 0
    ("sharding", ["--device-counts", "1,a"], "--device-counts"),
    ("sharding", ["--repeats", "0"], "--repeats"),
    ("memory", ["--models", "nope", "--out", "{dir}/m.json"], "--models"),
    ("memory", ["--models", "tiny", "--out", "{file}/m.json"], "afile is not a directory"),
    ("memory", ["--models", "tiny", "--dtype", "bfloat16", "--tokenizer", "bytes", "--steps", "1",
                "--optimizers", "adamw", "--per-layer", "off", "--out", "{dir}/m.json"],
     "--dtype"),  # every row failed on it in train.py, the JSON written and exit 0
    ("convergence", [*"--sizes tiny --methods full --tokens 64 --batch-size 2 --seq-len 16"
                     " --tokenizer bytes --dtype bfloat16".split(), "--out", "{dir}/c"],
     "--dtype"),
    ("memory", ["--models", "tiny", "--optimizers", "adam", "--tokenizer", "bytes", "--steps",
                "1", "--dtype", "fp32", "--per-layer", "off", "--out", "{dir}/m.json"],
     "--optimizers"),
    ("convergence", [*"--sizes tiny --methods full --tokens 64 --batch-size 2 --seq-len 99999"
                     " --tokenizer bytes".split(), "--out", "{dir}/c"], "--seq-len"),
    ("convergence", ["--batch-size", "0"], "--batch-size"),
    ("convergence", ["--tokens", "2X"], "--tokens"),
    ("convergence", [*"--sizes tiny --methods full --tokens 64 --batch-size 2 --seq-len 16"
                     " --tokenizer bytes --eval-tokens 1e".split(), "--out", "{dir}/c"],
     "--eval-tokens"),  # each run failed on it, the result written and exit 0
    ("convergence", ["--merge", "{file}", "--out", "{file}"], "afile is not a directory"),
    ("profile_step", ["--batch-size", "0"], "--batch-size"),  # was the size's batch, silently
    ("profile_step", ["--warmup", "0"], "--warmup"),  # the first step compiles
    # (a traceback after the data loaded and the model compiled, or measured a model past
    # its max_seq_len, or ran 0 s and wrote a timed-out result)
    ("first_steps", ["--seq-len", "1"], "--seq-len 1: at least 2"),
    ("first_steps", ["--seq-len", "5000"], "--seq-len 5000 exceeds tiny's max_seq_len 256"),
    ("profile_step", ["--seq-len", "5000"], "--seq-len 5000 exceeds tiny's max_seq_len 1024"),
    ("sharding", ["--timeout", "0"], "--timeout"),
    ("plot_sharding", [str(ROOT / "benchmarks" / "results" / "sharding_cpu.json"), "--out",
                       "{file}/s.png"], "afile/s.png: cannot write"),
    # (wrote s.png for s, said it wrote s; failed in matplotlib for s.txt)
    ("plot_sharding", [str(ROOT / "benchmarks" / "results" / "sharding_cpu.json"), "--out",
                       "{dir}/s"], "/s: not a .png path"),
    ("plot_refresh", [str(ROOT / "benchmarks" / "results" / "refresh_60m_cpu_matrix_update.json"),
                      "--out", "{dir}/r.txt"], "/r.txt: not a .png path"),
])
def test_scripts_refuse_bad_command_lines_in_one_line(module, argv, expected, tmp_path, capsys):
  """A bad flag (unknown name, a count or size below 1, --out under a file) stops the script
  before it runs, with one line naming it, and writes nothing."""
  (tmp_path / "afile").write_text("not a directory, not JSON\n")
  if module.startswith("plot"):
    pytest.importorskip("matplotlib")
  argv = [a.format(file=tmp_path / "afile", dir=tmp_path) for a in argv]
  main = getattr(importlib.import_module(f"benchmarks.{module}"), "main")
  with pytest.raises(SystemExit) as e:
    main(argv)
  if isinstance(e.value.code, str):
    message = e.value.code
  else:  # argparse: the usage, then one error line; exit code 2
    assert e.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in message, message
  assert len(message.strip().splitlines()) == 1 and expected in message, message
  assert [p.name for p in tmp_path.iterdir()] == ["afile"]


def test_plot_sharding_refuses_a_result_without_figures(tmp_path):
  """A sharding result whose summary is empty drew an empty figure and exited 0."""
  pytest.importorskip("matplotlib")
  from benchmarks import plot_sharding
  path = tmp_path / "s.json"
  # (and one whose summary measured nothing plotted: empty panels too)
  for summary in ({}, {"a": {"b": {"1": {"other": 1}}}}):
    path.write_text(json.dumps({"benchmark": "sharding", "summary": summary}))
    with pytest.raises(SystemExit, match=r"s\.json: not a benchmarks/sharding\.py result with"
                       r" figures \(no summary, or one with nothing to draw\)$"):
      plot_sharding.main([str(path), "--out", str(tmp_path / "s.png")])
    assert not (tmp_path / "s.png").exists()

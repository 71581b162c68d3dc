"""The training script: dry run, outputs, comparison, resume (also after SIGKILL)."""

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from examples.llama import data as data_lib
from examples.llama import model as model_lib
from examples.llama import plot
from examples.llama import train

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "llama" / "train.py"


def tiny_args(out, *extra, steps=8):
  return ["--model", "tiny", "--tokenizer", "bytes", "--dtype", "fp32", "--seq-len", "32",
          "--batch-size", "4", "--steps", str(steps), "--log-every", "1", "--eval-every", "4",
          "--eval-tokens", "400", "--save-every", "2", "--max-docs", "300", "--rank", "8",
          "--update-proj-gap", "3", "--out", str(out), *extra]


def losses(out):
  rows = [json.loads(l) for l in (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()]
  return [(r["step"], r["loss"]) for r in rows]


def test_dry_run_7b_is_abstract_and_writes_its_sizes(tmp_path):
  summary = train.main(["--model", "7b", "--optimizer", "galore_adamw", "--rank", "1024",
                        "--dry-run", "--out", str(tmp_path)])
  written = json.loads((tmp_path / "dry_run.json").read_text())
  assert written == summary
  assert {"params", "trainable_params", "optimizer_state_bytes"} <= set(written)
  assert round(written["params"] / 1e9, 2) == 6.74
  adamw = train.main(["--model", "7b", "--optimizer", "adamw", "--dry-run", "--out",
                      str(tmp_path / "adamw")])
  # bf16 AdamW keeps two full moments (2 x 2 bytes x 6.74B); GaLore far fewer.
  assert adamw["optimizer_state_bytes"] >= 4 * adamw["params"]
  assert written["optimizer_state_bytes"] < 0.5 * adamw["optimizer_state_bytes"]


def test_help_documents_the_flags(capsys):
  with pytest.raises(SystemExit):
    train.main(["--help"])
  text = capsys.readouterr().out
  for flag in ["--model", "--optimizer", "--rank", "--update-proj-gap", "--galore-scale", "--lr",
               "--warmup", "--weight-decay", "--grad-clip", "--batch-size", "--grad-accum",
               "--seq-len", "--steps", "--tokens", "--log-every", "--eval-every", "--eval-tokens",
               "--save-every", "--data", "--tokenizer", "--out", "--resume", "--seed", "--dtype",
               "--remat", "--unroll", "--host-refresh", "--dry-run"]:
    assert flag in text


@pytest.mark.parametrize("argv, match", [
    (["--optimizer", "sgd"], "--optimizer"),
    (["--batch-size", "6", "--grad-accum", "4"], "--grad-accum"),
    (["--seq-len", "4096"], "--seq-len"),
])
def test_bad_flags_exit_with_a_message(tmp_path, argv, match):
  with pytest.raises(SystemExit, match=match):
    train.main(tiny_args(tmp_path, *argv))


@pytest.mark.parametrize("flag, value, low", [
    ("--grad-accum", "0", 1), ("--log-every", "0", 1), ("--warmup", "-1", 0),
    ("--eval-every", "-2", 0), ("--save-every", "-1", 0), ("--steps", "0", 1),
    ("--rank", "0", 1), ("--batch-size", "x", None),
])
def test_bad_int_flags_are_argparse_errors(tmp_path, capsys, flag, value, low):
  with pytest.raises(SystemExit):
    train.main(tiny_args(tmp_path, flag, value))
  err = capsys.readouterr().err
  assert flag in err and (f"must be >= {low}" if low is not None else "not an int") in err


@pytest.mark.parametrize("value", ["foo", ":", "127.0.0.1:notaport", "host:0", "host:70000",
                                   ":1234"])
def test_a_coordinator_that_is_no_host_and_port_is_an_argparse_error(tmp_path, capsys, value):
  """JAX met these with an IndexError, a C++ log line and a misleading message, or hung."""
  with pytest.raises(SystemExit):
    train.main(tiny_args(tmp_path, "--coordinator", value, "--num-processes", "1",
                         "--process-id", "0", "--dry-run"))
  err = capsys.readouterr().err
  assert "--coordinator" in err and "expected host:port" in err


def test_a_token_count_past_a_float_is_one_line(tmp_path):
  """--tokens 1e400: an OverflowError dividing it by the batch's tokens as floats."""
  with pytest.raises(SystemExit, match=r"^--tokens 1(0)+: .* at most 2147483647 \(int32\)$"):
    train.main(tiny_args(tmp_path, "--tokens", "1e400"))


@pytest.mark.parametrize("value", ["0", "x", "-2"])
def test_bad_unroll_is_an_argparse_error(tmp_path, capsys, value):
  with pytest.raises(SystemExit):
    train.main(tiny_args(tmp_path, "--unroll", value))
  err = capsys.readouterr().err
  assert "--unroll" in err and "expected an int >= 1 or 'all'" in err


def test_token_ids_past_the_model_vocab_are_an_error(tmp_path):
  # A 400-token BPE for the 260-row tiny model: caught on the validation set, before training
  # (an id without an embedding row would make eval_loss NaN).
  from examples.llama import data as data_lib  # pylint: disable=import-outside-toplevel
  bpe = data_lib.load_tokenizer("bpe", source=data_lib.resolve_source("default"),
                                vocab_size=400, cache_dir=tmp_path / "cache")
  bpe.hf.save(str(tmp_path / "bpe400.json"))
  with pytest.raises(SystemExit, match="validation data has token id .* >= model vocab 260"):
    train.main(tiny_args(tmp_path, "--tokenizer", str(tmp_path / "bpe400.json")))
  # A BPE to train at a size the model has no rows for (or below its 259 fixed ids): refused
  # before it trains.
  for size in ("400", "258"):
    with pytest.raises(SystemExit, match=rf"^--vocab-size: expected 259 \(256 bytes \+ 3 "
                       rf"specials\) to 260 \(--model tiny's vocabulary\), got {size}$"):
      train.main(tiny_args(tmp_path, "--tokenizer", "bpe", "--vocab-size", size))


def test_missing_data_path_names_it(tmp_path):
  with pytest.raises((FileNotFoundError, ValueError), match="nowhere"):
    train.main(tiny_args(tmp_path, "--data", str(tmp_path / "nowhere")))


def test_a_run_counts_the_corrupt_parts_of_its_data_it_skipped(tmp_path, capsys):
  """Bad lines of a local file are skipped with one warning per file; the run's summary and
  its last line count both the files and the parts."""
  d = tmp_path / "data"
  d.mkdir()
  docs = [json.dumps({"text": f"document {i}: " + "words of text " * 20}) for i in range(60)]
  docs[10], docs[30] = "{not json", json.dumps({"txt": "no text field"})
  (d / "train.jsonl").write_text("\n".join(docs) + "\n")
  (d / "val.jsonl").write_text("\n".join(docs[:4]) + "\n")
  with pytest.warns(UserWarning, match="train.jsonl: line 11: "):
    summary = train.main(tiny_args(tmp_path / "out", "--data", str(d), "--eval-every", "0",
                                   "--save-every", "0", "--eval-tokens", "124",
                                   "--optimizer", "adamw", steps=2))["adamw"]
  assert (summary["data_corrupt_files"], summary["data_corrupt_parts"]) == (1, 2)
  assert "2 corrupt part(s) of 1 data file(s) were skipped" in capsys.readouterr().err


def test_compare_run_writes_metrics_config_summary(tmp_path, capsys):
  summaries = train.main(tiny_args(tmp_path, "--optimizer", "adamw,galore_adamw",
                                   "--peak-tflops", "0.5", steps=6))
  table = capsys.readouterr().out.splitlines()
  header = next(line.split() for line in table if line.startswith("optimizer "))
  assert set(summaries) == {"adamw", "galore_adamw"}
  for name in summaries:
    out = tmp_path / name
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ["tokens", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s",
                "data_wait_s", "peak_memory_bytes"]:
      assert key in rows[0]
    assert all(r["data_wait_s"] >= 0 for r in rows)
    assert "eval_ppl" in rows[3] and "eval_loss" in rows[5] and "eval_loss" not in rows[0]
    config = json.loads((out / "config.json").read_text())
    assert config["optimizer"] == name and config["model"] == "tiny"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_ppl"] > 1 and summary["data_corrupt_files"] == 0
    assert summary["data_corrupt_parts"] == 0
    # MFU: 6N + 12 L D T per position, T = 31 inputs of a 32-token row, over --peak-tflops.
    cfg = model_lib.CONFIGS["tiny"]
    per_token = (6 * (cfg.L * (4 * cfg.D**2 + 3 * cfg.D * cfg.F) + cfg.D * cfg.V)
                 + 12 * cfg.L * cfg.D * 31) * 31 / 32
    assert rows[0]["model_flops_per_token"] == pytest.approx(per_token)
    assert summary["mfu"] == pytest.approx(per_token * summary["tokens_per_s"] / 0.5e12)
    assert summary["model_flops_per_token"] == pytest.approx(per_token)
    # The summary table prints both next to tokens/s (then val loss, val ppl: a cell each).
    cells = next(line.split() for line in table if line.startswith(f"{name} "))
    assert header[-7:-4] == ["tokens/s", "GFLOP/tok", "MFU"]
    assert cells[-4:-2] == [f"{per_token / 1e9:.4g}", f"{100 * summary['mfu']:.1f}%"]
    # One step's plan holds at least its arguments: fp32 params and the optimizer state.
    assert summary["step_memory_bytes"] >= 4 * summary["params"] + summary["optimizer_state_bytes"]
    assert (out / "checkpoints").is_dir()
  assert (summaries["galore_adamw"]["optimizer_state_bytes"]
          < summaries["adamw"]["optimizer_state_bytes"])
  assert json.loads((tmp_path / "comparison.json").read_text()).keys() == summaries.keys()
  if importlib.util.find_spec("matplotlib"):  # plot.py reads what train.py wrote
    assert list(plot.find_runs([tmp_path])) == ["adamw", "galore_adamw"]
    assert plot.main([str(tmp_path)]).is_file()


def test_grad_accum_matches_one_big_batch(tmp_path):
  # Packed rows have no padding, so the mean of micro-batch means is the batch mean.
  one = train.main(tiny_args(tmp_path / "one", "--optimizer", "adamw", "--pack", steps=3))
  acc = train.main(tiny_args(tmp_path / "acc", "--optimizer", "adamw", "--pack",
                             "--grad-accum", "2", steps=3))
  for (s1, a), (s2, b) in zip(losses(tmp_path / "one"), losses(tmp_path / "acc")):
    assert s1 == s2 and a == pytest.approx(b, rel=1e-5)
  assert one["adamw"]["eval_loss"] == pytest.approx(acc["adamw"]["eval_loss"], rel=1e-5)


def final_checkpoint(out):
  """The newest checkpoint's step, state fingerprint (every leaf's checksum) and data
  position."""
  steps = [int(p.name) for p in (pathlib.Path(out) / "checkpoints").iterdir() if p.name.isdigit()]
  meta = json.loads((pathlib.Path(out) / "checkpoints" / str(max(steps)) / "meta" / "metadata")
                    .read_text())
  return max(steps), meta["state"], meta["data"]


# galore_adamw: its refreshes (--update-proj-gap 3: steps 1, 4, 7) before and after the
# interruption.  --per-layer keeps a state per layer (per_layer.LayerwiseState), and sltrain
# the supports beside the params (here with a warm-up over steps 1 to 3); relora's merges
# (steps 2, 4, 6) change the frozen bases the checkpoint holds and reset the optimizer state
# (those at steps 2 and 4 restored, the one at step 6 redone on resume), with LoRA dropout's
# streams advanced per micro-batch.
@pytest.mark.parametrize("flags", [
    ["--optimizer", "galore_adamw"],
    ["--optimizer", "galore_adamw", "--per-layer", "--method", "sltrain", "--rank", "4",
     "--warmup", "3"],
    ["--optimizer", "adamw", "--method", "relora", "--rank", "4", "--relora-every", "2",
     "--grad-accum", "2"],
], ids=["full", "per-layer-sltrain", "relora-grad-accum"])
def test_resume_after_interruption_gives_the_same_run(tmp_path, monkeypatch, flags):
  train.main(tiny_args(tmp_path / "full", *flags))
  reference = losses(tmp_path / "full")

  calls = {"n": 0}
  original = data_lib.Batches.__next__

  def dying_next(self):
    calls["n"] += 1
    if calls["n"] == 6:  # after the checkpoint at step 4 and a logged step 5
      raise KeyboardInterrupt
    return original(self)

  monkeypatch.setattr(data_lib.Batches, "__next__", dying_next)
  with pytest.raises(KeyboardInterrupt):
    train.main(tiny_args(tmp_path / "cut", *flags))
  monkeypatch.setattr(data_lib.Batches, "__next__", original)
  assert [s for s, _ in losses(tmp_path / "cut")] == [1, 2, 3, 4, 5]

  train.main(tiny_args(tmp_path / "cut", *flags, "--resume"))
  assert losses(tmp_path / "cut") == reference
  # the same params, optimizer state, frozen weights and data position, bit for bit
  assert final_checkpoint(tmp_path / "cut") == final_checkpoint(tmp_path / "full")


def test_half_written_checkpoint_is_never_picked_up(tmp_path):
  train.main(tiny_args(tmp_path, "--optimizer", "adamw", steps=4))
  ckpts = tmp_path / "checkpoints"
  # What a save killed mid-write leaves behind: an uncommitted temporary step directory.
  junk = ckpts / "6.orbax-checkpoint-tmp-1234567890"
  junk.mkdir()
  (junk / "garbage").write_text("not a checkpoint")
  # ... and a metrics line a killed run left half-written.
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 5, "lo')
  summaries = train.main(tiny_args(tmp_path, "--optimizer", "adamw", "--resume", steps=8))
  assert [s for s, _ in losses(tmp_path)] == list(range(1, 9))
  assert summaries["adamw"]["eval_loss"] > 0


def test_a_fresh_run_refuses_an_out_with_checkpoints_and_resume_names_changed_flags(
    tmp_path, capsys):
  train.main(tiny_args(tmp_path, "--optimizer", "adamw", steps=2))
  before = (tmp_path / "metrics.jsonl").read_text()
  # Orbax would silently skip saving steps <= 2, and a later --resume would restore this run.
  with pytest.raises(SystemExit, match="earlier run .* pass --resume"):
    train.main(tiny_args(tmp_path, "--optimizer", "adamw", "--lr", "3e-3", steps=4))
  assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing of the old run lost
  capsys.readouterr()
  train.main(tiny_args(tmp_path, "--optimizer", "adamw", "--lr", "3e-3", "--resume", steps=4))
  err = capsys.readouterr().err
  assert "--lr None -> 0.003" in err and "--steps" not in err


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  args = tiny_args(tmp_path / "killed", "--optimizer", "galore_adamw", steps=12)
  subprocess.run([sys.executable, str(SCRIPT), *tiny_args(tmp_path / "full", "--optimizer",
                  "galore_adamw", steps=12)], check=True, env=env, capture_output=True)
  proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics = tmp_path / "killed" / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
      break
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  subprocess.run([sys.executable, str(SCRIPT), *args, "--resume"], check=True, env=env,
                 capture_output=True)
  assert losses(tmp_path / "killed") == losses(tmp_path / "full")


def test_dry_run_memory_plan_matches_a_real_run(tmp_path):
  """--dry-run's plan of the train step, compiled on abstract shapes, is the plan the real
  run reports for the same flags (arguments, outputs, temporaries)."""
  real = train.main(tiny_args(tmp_path / "real", "--optimizer", "galore_adamw", steps=2,
                              ) + ["--eval-every", "0", "--save-every", "0"])
  dry = train.main(tiny_args(tmp_path / "dry", "--optimizer", "galore_adamw", "--dry-run"))
  plan = dry["step_memory"]
  assert set(plan) == {"arguments", "outputs", "aliased", "temporaries", "total"}
  assert plan["total"] == real["galore_adamw"]["step_memory_bytes"]
  assert plan["arguments"] > dry["optimizer_state_bytes"] > 0


def test_no_float32_gradient_accumulator_without_accumulation(tmp_path):
  """With --grad-accum 1 the gradient goes to the optimizer as autodiff returns it: XLA's
  plan of the bf16 step holds no float32 buffer of the params' shapes, which --grad-accum 2
  adds (its accumulator, 4 bytes per param) for the same micro-batch of 2 x 32 tokens."""
  plans = {}
  for accum in (1, 2):
    dry = train.main(tiny_args(tmp_path / str(accum), "--optimizer", "adamw", "--dtype", "bf16",
                               "--grad-accum", str(accum), "--batch-size", str(2 * accum),
                               "--dry-run"))
    plans[accum] = dry["step_memory"]["temporaries"]
  accumulator = 4 * model_lib.CONFIGS["tiny"].num_params()
  assert plans[2] - plans[1] >= 0.9 * accumulator, (plans, accumulator)

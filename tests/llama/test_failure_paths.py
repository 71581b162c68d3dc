"""The training script's failure paths: damaged and incompatible checkpoints, flags out of
range, an --out holding an earlier run, signals, a full disk, an overflowing perplexity.

Most tests work on one small run (``trained``: tiny model, 4 steps, checkpoints at steps 2
and 4) and restore it without training (``train.start_run``); the signal and disk tests
run the script, since they need a process of their own.
"""

import dataclasses
import gc
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import types
import warnings

import jax
import jax.numpy as jnp
import pytest

from examples.llama import checkpoints, cli, flops, integrity, optimizers, outputs, stopping
from examples.llama import build as build_lib
from examples.llama import data as data_lib
from examples.llama import train
from examples.llama import model as model_lib
from test_train import losses, tiny_args  # pylint: disable=wrong-import-order

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "llama" / "train.py"


def run_args(out, *extra, steps=4):
  return tiny_args(out, "--eval-every", "0", "--optimizer", "galore_adamw", *extra, steps=steps)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished 4-step run with checkpoints at steps 2 and 4, and its data."""
  out = tmp_path_factory.mktemp("trained") / "run"
  train.main(run_args(out))
  args = cli.build_parser().parse_args(run_args(out))
  return {"out": out, "data": train.load_data(args, None)}


def copy_of(trained, tmp_path) -> pathlib.Path:
  out = tmp_path / "run"
  shutil.copytree(trained["out"], out)
  return out


def start(trained, out, *extra, data=None) -> train.Run:
  """``--resume`` up to the restore (no training): the Run it starts from (on ``data``,
  default the trained run's source, tokenizer and eval set)."""
  args = cli.build_parser().parse_args(run_args(out, "--resume", *extra))
  cli.check_args(args)
  args = optimizers.with_defaults(args, args.optimizer)
  run = train.start_run(args, args.optimizer, out, *(data or trained["data"]), None,
                        stopping.StopRequest())
  run.ckpt.close()
  return run


def data_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The largest array data file of a checkpoint step."""
  return max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)


def truncate(step_dir):
  path = data_file(step_dir)
  path.write_bytes(path.read_bytes()[:1000])


def flip_two_bytes(step_dir):
  path = data_file(step_dir)
  data = bytearray(path.read_bytes())
  data[len(data) // 3] ^= 0x10
  data[len(data) // 3 + 7] ^= 0x01
  path.write_bytes(bytes(data))


def delete_metadata(step_dir):
  (step_dir / "state" / "_METADATA").unlink()


def garbage_meta(step_dir):
  (step_dir / "meta" / "metadata").write_text("{garbage")


# Orbax leaves the reads of a restore that fails on a damaged checkpoint as coroutines never
# awaited, which Python reports when they are collected, in whichever test that happens.  The
# tests that damage checkpoints collect them themselves and expect that report.
abandoned_reads = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <coroutine object _read_array_index_and_device_put"
    ":pytest.PytestUnraisableExceptionWarning",
    # or such a read's callback, let go after its event loop closed
    r"ignore:Exception ignored in. None\s+Traceback[\s\S]*Event loop is closed"
    ":pytest.PytestUnraisableExceptionWarning")


def test_two_checkpoints_are_kept(trained):
  # The newest two: one to fall back to when the newest is damaged.
  assert sorted(p.name for p in (trained["out"] / "checkpoints").iterdir()) == ["2", "4"]


@abandoned_reads
@pytest.mark.parametrize("damage, what", [
    (truncate, "its state cannot be read"), (flip_two_bytes, "checksum mismatch in"),
    (delete_metadata, "its state cannot be read"), (garbage_meta, "meta data cannot be read"),
])
def test_a_damaged_latest_checkpoint_is_one_line_and_the_previous_one_is_used(
    trained, tmp_path, capsys, damage, what):
  out = copy_of(trained, tmp_path)
  damage(out / "checkpoints" / "4")
  capsys.readouterr()
  run = start(trained, out)
  err = capsys.readouterr()
  [line] = [l for l in err.err.splitlines() if "unusable" in l]
  assert line.startswith("[galore_adamw] checkpoint step 4 is unusable: ") and what in line
  assert "resumed from step 2, the newest good checkpoint" in err.out
  assert run.start_step == 2
  # Set aside: a rerun does not meet it again, and Orbax saves step 4 anew.
  assert (out / "damaged-checkpoints" / "4").is_dir()
  assert not (out / "checkpoints" / "4").exists()
  gc.collect()  # abandoned_reads


@abandoned_reads
def test_flipped_bytes_never_load_and_the_run_redoes_the_steps_exactly(trained, tmp_path):
  out = copy_of(trained, tmp_path)
  flip_two_bytes(out / "checkpoints" / "4")
  train.main(run_args(out, "--resume"))
  assert losses(out) == losses(trained["out"])
  gc.collect()  # abandoned_reads


@abandoned_reads
def test_no_usable_checkpoint_is_one_error_line(trained, tmp_path, capsys):
  out = copy_of(trained, tmp_path)
  garbage_meta(out / "checkpoints" / "4")
  flip_two_bytes(out / "checkpoints" / "2")
  with pytest.raises(SystemExit, match=r"no usable checkpoint .* \(steps 4, 2, see above\)"):
    start(trained, out)
  assert capsys.readouterr().err.count("is unusable") == 2
  gc.collect()  # abandoned_reads


@pytest.mark.parametrize("extra, named", [
    (["--rank", "16"], "--rank 8 -> 16"),
    (["--optimizer", "adamw"], "--optimizer 'galore_adamw' -> 'adamw'"),
    (["--model", "9m"], "--model 'tiny' -> '9m'"),
    (["--refresh", "lazy"], "--refresh 'every' -> 'lazy'"),
    (["--seed", "1"], "--seed 0 -> 1"),
])
def test_a_resume_that_changes_the_state_is_refused_before_restoring(
    trained, tmp_path, monkeypatch, extra, named):
  out = copy_of(trained, tmp_path)

  def no_restore(*args, **kwargs):
    raise AssertionError("restored before checking the flags")

  monkeypatch.setattr(checkpoints.Checkpoints, "restore", no_restore)
  with pytest.raises(SystemExit, match="cannot resume checkpoint step 4 with ") as e:
    start(trained, out, *extra)
  assert named in str(e.value) and "\n" not in str(e.value)
  if extra[0] == "--optimizer":  # (not the settings it implies: "--rank 8 -> 1", never given)
    assert "--rank" not in str(e.value)


def saved_as(*argv, rank: bool = True) -> tuple[dict, dict]:
  """The run flags and the state layout a checkpoint of ``run_args(..., *argv)`` records
  (without its ``--rank 8`` unless ``rank``), from the example's own build, abstractly
  (nothing trained or allocated)."""
  argv = run_args("out", *argv)
  if not rank:
    at = argv.index("--rank")
    argv = argv[:at] + argv[at + 2:]
  args = cli.build_parser().parse_args(argv)
  name = cli.check_args(args)[0]
  args = optimizers.with_defaults(args, name)
  cfg = build_lib.model_config(args, data_lib.load_tokenizer("bytes"))
  state = jax.eval_shape(lambda: checkpoints.state_of(*build_lib.build(args, name, cfg, 4)[:2]))
  return checkpoints.run_flags(args, name), integrity.layout(state)


def test_a_refusal_names_only_the_flags_that_change_the_state():
  """APOLLO's --basis-method svd keeps a basis that its random projection regenerates
  instead: the layouts differ, and a resume that also changes --lr named --lr too as
  changing the state's shapes (--basis-method was not among the flags that can)."""
  saved, layout = saved_as("--optimizer", "apollo_mini")
  flags, now = saved_as("--optimizer", "apollo_mini", "--basis-method", "svd", "--lr", "3e-3")
  assert integrity.layout_differences(layout, now)
  with pytest.raises(SystemExit) as e:
    checkpoints.check_compatible("apollo_mini", 4, {"run": saved, "state": layout}, flags, now)
  assert "with --basis-method 'random' -> 'svd' (they change the saved state's" in str(e.value)


def test_a_refusal_for_another_optimizer_names_it_not_the_settings_it_implies():
  """A galore_adamw run (its default rank) resumed with --optimizer adamw and no --rank was
  refused with "--rank 40 -> 1" too: a rank neither command gave, adamw's stand-in."""
  saved, layout = saved_as(rank=False)
  flags, now = saved_as("--optimizer", "adamw", rank=False)
  assert saved["rank"] != flags["rank"]
  with pytest.raises(SystemExit) as e:
    checkpoints.check_compatible("adamw", 4, {"run": saved, "state": layout}, flags, now)
  assert "with --optimizer 'galore_adamw' -> 'adamw' (they change" in str(e.value)


def test_a_resume_on_another_tokenizer_or_other_files_is_refused_before_restoring(
    trained, tmp_path, monkeypatch):
  """The flags may be alike while the data differ (``--tokenizer auto`` found another
  tokenizer; ``--data DIR`` gained a file): the checkpoint's data state names its
  tokenizer (what its ids mean) and its files, and a resume that differs is one line."""
  out = copy_of(trained, tmp_path)

  def no_restore(*args, **kwargs):
    raise AssertionError("restored before checking the data")

  monkeypatch.setattr(checkpoints.Checkpoints, "restore", no_restore)
  source, tokenizer, eval_set = trained["data"]
  other = dataclasses.replace(tokenizer, eos_id=tokenizer.bos_id)  # the same name
  with pytest.raises(SystemExit, match="step 4: the tokenizer .* is not the one") as e:
    start(trained, out, data=(source, other, eval_set))
  assert "\n" not in str(e.value)
  monkeypatch.setattr(source, "listing", "another listing")
  with pytest.raises(SystemExit, match="step 4: the files of data source .* differ") as e:
    start(trained, out)
  assert "\n" not in str(e.value)


def test_a_resume_that_names_the_same_tokenizer_otherwise_goes_on(trained, tmp_path, capsys):
  """``--tokenizer auto`` that trained a BPE, resumed as ``--tokenizer bpe`` (or a BPE by its
  path): the checkpoint's data state records what the ids mean, and they are the same, so
  the renamed flag is warned about, not refused."""
  out = copy_of(trained, tmp_path)
  run = start(trained, out, "--tokenizer", "bpe")  # the data's tokenizer is still the run's
  assert run.start_step == 4
  assert "--tokenizer 'bytes' -> 'bpe'" in capsys.readouterr().err
  source, tokenizer, eval_set = trained["data"]
  other = dataclasses.replace(tokenizer, eos_id=tokenizer.bos_id)  # other ids: refused
  with pytest.raises(SystemExit, match="'bytes' -> 'bpe' .they change what its token ids"):
    start(trained, out, "--tokenizer", "bpe", data=(source, other, eval_set))
  changed = {"tokenizer": "--tokenizer 'auto' -> 'bpe'", "max_docs": "--max-docs 300 -> 200",
             "seed": "--seed 0 -> 1"}
  assert list(checkpoints.always_refused(changed, {"tokenizer": "auto"})) == [
      "seed", "tokenizer"]
  assert list(checkpoints.always_refused(changed, {"tokenizer": "bpe"}, True)) == ["seed"]


def test_tokens_count_on_across_a_resume_with_another_batch(trained, tmp_path):
  """The tokens column counts what was trained on: the checkpoint records the tokens up to
  its step, and a resume with another --batch-size goes on from there."""
  run = start(trained, copy_of(trained, tmp_path), "--batch-size", "8", "--steps", "6")
  assert run.start_step == 4 and run.tokens_at(4) == 4 * 4 * 32
  assert run.tokens_at(6) == 4 * 4 * 32 + 2 * 8 * 32


def test_relora_records_its_resolved_period(tmp_path, capsys):
  """ReLoRA's default period is a quarter of --steps: the checkpoints record the period it
  ran with, so a resume that extends the run says that the period changed."""
  out = tmp_path / "relora"
  flags = ["--method", "relora", "--optimizer", "adamw", "--save-every", "4"]
  train.main(tiny_args(out, *flags, "--eval-every", "0", steps=8))
  assert json.loads((out / "config.json").read_text())["relora_every"] == 2
  train.main(tiny_args(out, *flags, "--eval-every", "0", "--resume", steps=12))
  assert "--relora-every 2 -> 3" in capsys.readouterr().err


def test_an_extended_relora_run_does_the_merge_its_last_step_skipped(tmp_path, monkeypatch):
  """A run's last step does not merge (nothing trains after it); extended by a larger
  --steps from that step, the run owes the merge, as a longer run does it there: the next
  step is the restart's, at learning rate 0, with the adapters merged and reset."""
  out = tmp_path / "relora"
  flags = ["--method", "relora", "--relora-every", "2", "--optimizer", "adamw",
           "--save-every", "4", "--eval-every", "0"]
  merged = []
  step = train.relora_step
  monkeypatch.setattr(train, "relora_step", lambda *a: merged.append(1) or step(*a))
  train.main(tiny_args(out, *flags, steps=8))
  assert len(merged) == 3  # after steps 2, 4, 6
  train.main(tiny_args(out, *flags, "--resume", steps=12))
  assert len(merged) == 3 + 2  # after steps 8 (owed) and 10


@pytest.mark.parametrize("extra", [["--vocab-size", "260"], ["--tokenizer", "bpe", "--vocab-size",
                                                                "259"]])
def test_vocab_size_is_taken_where_it_means_what_it_says(extra):
  """--vocab-size with bytes' own size, or with a BPE to train at most the model's size (the
  refusals: above and test_train.py)."""
  cli.check_args(cli.build_parser().parse_args(run_args("out", *extra)))


def test_a_vocab_size_saved_with_bytes_does_not_block_a_resume():
  """--vocab-size meant nothing with --tokenizer bytes, and is refused now: a run that saved
  one resumes without it (a warning), where a BPE's size still may not change."""
  changed = {"vocab_size": "--vocab-size 512 -> None"}
  assert checkpoints.always_refused(changed, {"tokenizer": "bytes", "vocab_size": 512}) == {}
  for saved in ({"tokenizer": "bpe"}, {"tokenizer": "auto"}):
    assert list(checkpoints.always_refused(changed, saved)) == ["vocab_size"]
  changed["tokenizer"] = "--tokenizer 'bytes' -> 'bpe'"
  assert list(checkpoints.always_refused(changed, {"tokenizer": "bytes"})) == [
      "vocab_size", "tokenizer"]


def test_the_data_of_a_trained_bpe_is_refused_on_resume():
  """--tokenizer bpe trains its BPE on the run's data: other data, another vocabulary."""
  changed = {"max_docs": "--max-docs 300 -> 200", "lr": "--lr None -> 0.003"}
  assert checkpoints.always_refused(changed, {"tokenizer": "bytes"}) == {}
  assert list(checkpoints.always_refused(changed, {"tokenizer": "bpe"})) == ["max_docs"]


def test_trajectory_changes_warn_and_continue(trained, tmp_path, capsys):
  out = copy_of(trained, tmp_path)
  run = start(trained, out, "--lr", "0.003", "--max-docs", "200", "--steps", "6")
  captured = capsys.readouterr()
  assert run.start_step == 4
  assert "--lr None -> 0.003; --max-docs 300 -> 200" in captured.err
  assert "--steps 4 -> 6: the learning-rate schedule now spans 6 steps" in captured.out
  changed = checkpoints.changed_flags({"data": "default"}, {"data": "/data/c4"})
  assert changed == {"data": "--data 'default' -> '/data/c4'"}


def test_a_finished_run_says_it_is_finished(trained, tmp_path, capsys):
  out = copy_of(trained, tmp_path)
  before = (out / "metrics.jsonl").read_text()
  summaries = train.main(run_args(out, "--resume", steps=2))
  assert "is finished: its checkpoint is at step 4, --steps 2; nothing to train" in (
      capsys.readouterr().out)
  assert summaries["galore_adamw"] == json.loads((out / "summary.json").read_text())
  assert (out / "metrics.jsonl").read_text() == before
  # Finished with --save-every 0 (a quickstart): finished too, not restarted.
  shutil.rmtree(out / "checkpoints")
  assert train.main(run_args(out, "--resume")) == summaries
  assert "is finished and kept no checkpoint to extend it from" in capsys.readouterr().out
  assert (out / "metrics.jsonl").read_text() == before
  # ... and a command that differs from it is refused: it reported the old run's summary
  # under the new optimizer's name (a helper's find)
  with pytest.raises(SystemExit, match=r"finished and kept no checkpoint, and this command"
                     r" differs from it: --lr None -> 0\.05: rerun with its flags"):
    train.main(run_args(out, "--resume", "--lr", "0.05"))


def test_a_finished_run_whose_checkpoint_predates_its_end_is_not_trained_again(
    trained, tmp_path, capsys):
  """Stopped by a signal at step 2 (its checkpoint), resumed to the end with --save-every 0:
  the run is finished, its newest checkpoint step 2. A --resume retrained steps 3 and 4,
  rewriting the finished run's metrics and summary (a helper's find)."""
  out = copy_of(trained, tmp_path)
  shutil.rmtree(out / "checkpoints" / "4")
  before = (out / "metrics.jsonl").read_text()
  summary = json.loads((out / "summary.json").read_text())
  capsys.readouterr()
  assert train.main(run_args(out, "--resume", "--save-every", "0")) == {"galore_adamw": summary}
  assert ("is finished: its newest checkpoint, step 2, is older than its end, step 4;"
          " nothing to train") in capsys.readouterr().out
  assert (out / "metrics.jsonl").read_text() == before
  # A larger --steps extends it from that checkpoint, the only state it kept.
  run = start(trained, out, "--steps", "6")
  assert run.start_step == 2 and train.finished_summary(run) is None


def test_a_summary_older_than_the_runs_end_is_not_taken_as_its_result(trained, tmp_path,
                                                                       capsys):
  """An extended run killed after it logged (or checkpointed) its new end but before it wrote
  its new summary: the summary left is the shorter run's.  A --resume returned that summary
  as the extended run's result; now the summary records its step, and an older one is not
  the run's: the run trains from its checkpoint (killed after logging the end, its
  checkpoint older), or evaluates its end's checkpoint and writes the summary."""
  out = copy_of(trained, tmp_path)
  old = json.loads((out / "summary.json").read_text())
  assert old["step"] == 4
  # logged to step 6 with --save-every 0, killed before the summary: checkpoint 4, summary 4
  rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
  more = [{**rows[-1], "step": s} for s in (5, 6)]
  (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + more))
  assert train.finished_summary(start(trained, out, "--steps", "6")) is None
  # checkpointed its end, step 6, killed before the summary
  train.main(run_args(out, "--resume", "--save-every", "2", steps=6))
  assert json.loads((out / "summary.json").read_text())["step"] == 6
  (out / "summary.json").write_text(json.dumps(old))
  capsys.readouterr()
  summary = train.main(run_args(out, "--resume", steps=6))["galore_adamw"]
  assert summary["step"] == 6 and summary != old
  assert json.loads((out / "summary.json").read_text()) == summary


def test_a_step_folder_copied_under_another_step_is_not_loaded(trained, tmp_path, capsys):
  """Step 2's checkpoint copied over step 4's folder is step 2's state and data position:
  it is set aside, not loaded as step 4 (it was, and the run skipped two steps' batches)."""
  out = copy_of(trained, tmp_path)
  shutil.rmtree(out / "checkpoints" / "4")
  shutil.copytree(out / "checkpoints" / "2", out / "checkpoints" / "4")
  capsys.readouterr()
  run = start(trained, out)
  err = capsys.readouterr()
  assert ("checkpoint step 4 is unusable: it was saved as step 2, not 4 (copied or renamed)"
          in err.err)
  assert run.start_step == 2


def test_checksums_see_every_changed_word_and_keep_out_of_the_layout():
  x = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
  state = {"a": x, "b": jnp.ones(3, jnp.bfloat16), "k": jax.random.key(0)}
  saved = integrity.fingerprint(state)
  assert integrity.checksum_differences(saved, integrity.fingerprint(state)) == []
  for changed in (x.at[1, 2].add(1e-6), x.T.reshape(3, 4), x.at[0, 0].set(-0.0)):
    now = integrity.fingerprint({**state, "a": changed})
    assert integrity.checksum_differences(saved, now) == ["['a']"]
  assert integrity.layout_differences(saved, integrity.layout({**state, "a": x[:2]})) == [
      "['a']: float32[3, 4] saved, float32[2, 4] here"]
  meta = integrity.seal({"step": 4, "state": saved})
  assert integrity.is_sealed(json.loads(json.dumps(meta)))
  assert not integrity.is_sealed({**meta, "step": 5})


@pytest.mark.parametrize("flag, value", [
    ("--lr", "nan"), ("--lr", "-1"), ("--lr", "inf"), ("--lr", "0"), ("--galore-scale", "nan"),
    ("--galore-scale", "0"), ("--weight-decay", "-0.1"), ("--weight-decay", "nan"),
    ("--rho", "1"), ("--rho", "-0.5"), ("--min-lr-ratio", "2"), ("--grad-clip", "inf"),
])
def test_float_flags_must_be_finite_and_in_range(tmp_path, capsys, flag, value):
  with pytest.raises(SystemExit) as e:
    train.main(run_args(tmp_path, flag, value))
  assert e.value.code == 2
  [line] = capsys.readouterr().err.splitlines()
  assert f"argument {flag}: must be a finite number" in line and line.endswith("(see --help)")


def test_eval_tokens_must_cover_one_batch(tmp_path):
  with pytest.raises(SystemExit, match=r"--eval-tokens 100 is less than one validation batch"
                     r" \(4 x 31 = 124 target tokens\)"):
    train.main(run_args(tmp_path, "--eval-tokens", "100"))


def command(argv, capsys) -> tuple[int, list[str]]:
  """The script's exit code and stderr lines for ``argv`` (``cli.run_command`` in-process)."""
  with pytest.raises(SystemExit) as e:
    cli.run_command(train.main, argv)
  return e.value.code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("extra, says", [
    (["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (["--optimizer", "sgd"], "--optimizer: unknown 'sgd'"),
    (["--resume", "--overwrite"], "give one"),
    (["--data", "/nowhere"], "no such file or directory"),
    (["--tokens", "inf"], "argument --tokens: not a count: 'inf' (a whole number at least 1"),
    (["--eval-tokens=-5K"], "argument --eval-tokens: not a count: '-5K'"),
    (["--tokens", "0"], "argument --tokens: not a count: '0'"),
    (["--tokens", "1000.5"], "argument --tokens: not a count: '1000.5'"),  # was 1000
    (["--data", ""], "--data: an empty value; give a path or a name"),  # read the cwd
    (["--tokenizer", " "], "--tokenizer: an empty value"),
    (["--out", ""], "argument --out: an empty path"),  # wrote the run into the cwd
    (["--optimizer", "adamw,"], "--optimizer 'adamw,': an empty name in the list"),
    (["--optimizer", "adamw,adamw"], "--optimizer adamw,adamw: an optimizer appears twice"),
    (["--update-proj-gap", "3000000000"], "argument --update-proj-gap: must be <= 2147483647"),
    (["--seed", "99999999999999999999"], "argument --seed: must be <= 2147483647"),
    (["--tokens", "1e15"], "--tokens 1000000000000000: 7812500000000 steps"),
    (["--vocab-size", "512"], "--vocab-size sizes a BPE trained on the data (--tokenizer bpe, or"
     " auto without t5-base); --tokenizer bytes has a fixed vocabulary of 260: leave"
     " --vocab-size out"),
    (["--tokenizer", "t5-base", "--vocab-size", "32100"], "--tokenizer t5-base has a fixed"
     " vocabulary: leave --vocab-size out"),
    (["--mesh-axis-types", "explicit"], "--mesh-axis-types explicit types a --mesh's axes; this"
     " run has no mesh (one device): give --mesh or leave it out"),
])
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys, extra, says):
  code, err = command(run_args(tmp_path / "out", *extra), capsys)
  assert code == 2 and len(err) == 1 and err[0].startswith("train.py: error: ") and says in err[0]


def test_a_warning_is_one_line(capsys, monkeypatch):
  """Python's default printed the warning's file, line and source line, deep in a library."""
  monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after
  cli.run_command(lambda argv: warnings.warn("words from deep inside", UserWarning), [])
  assert capsys.readouterr().err == "warning: words from deep inside\n"


def test_counts_are_read_exactly():
  assert [cli.parse_count(t) for t in ("1.3B", "20M", "2.5K", "1e3", "7")] == [
      1_300_000_000, 20_000_000, 2500, 1000, 7]


def test_vocab_size_is_refused_where_auto_finds_t5_base(tmp_path, capsys, monkeypatch):
  """``--tokenizer auto`` loads t5-base where the local Hugging Face cache holds it, and
  ``--vocab-size`` would then size nothing (it was taken and ignored)."""
  snapshot = tmp_path / "hf" / "hub" / "models--google-t5--t5-base" / "snapshots" / "abc"
  snapshot.mkdir(parents=True)
  (snapshot / "tokenizer.json").write_text("{}")  # found, not read: the refusal comes first
  for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  code, err = command(run_args(tmp_path / "out", "--tokenizer", "auto", "--vocab-size", "512"),
                      capsys)
  assert code == 2 and len(err) == 1 and err[0].endswith(
      "--tokenizer auto, here t5-base (in the local Hugging Face cache), has a fixed"
      " vocabulary: leave --vocab-size out")


@pytest.mark.parametrize("extra, says", [
    (["--optimizer", "adamw,fira_adamw", "--proj-type", "full"],
     "--proj-type full is not available for fira_adamw"),
    (["--optimizer", "adamw,apollo_adamw", "--refresh", "lazy"],
     "--refresh lazy compares successive bases; apollo_adamw's"),
])
def test_a_later_optimizer_refusing_a_flag_stops_the_command_first(tmp_path, capsys,
                                                                   monkeypatch, extra, says):
  """Every optimizer of the list is built (transforms only) before any data is read or any
  optimizer trains: adamw used to train in full before fira_adamw refused."""
  monkeypatch.setattr(train, "load_data", lambda *a: pytest.fail("loaded the data"))
  code, err = command(run_args(tmp_path / "out", *extra), capsys)
  assert code == 2 and len(err) == 1 and says in err[0]
  assert not (tmp_path / "out").exists()


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN attention runs on a GPU")
def test_cudnn_attention_off_a_gpu_is_one_line(tmp_path, capsys, monkeypatch):
  """Refused before any work (a dry run plans it with XLA's attention instead)."""
  monkeypatch.setattr(train, "load_data", lambda *a: pytest.fail("loaded the data"))
  code, err = command(run_args(tmp_path / "out", "--attention", "cudnn"), capsys)
  assert code == 2 and err == [
      "train.py: error: --attention cudnn needs a GPU with cuDNN; this machine's backend is"
      f" {jax.default_backend()}: use --attention auto or xla"]


def test_debug_shows_the_traceback(tmp_path, capsys):
  code, err = command(run_args(tmp_path / "out", "--data", "/nowhere", "--debug"), capsys)
  assert code == 2 and err[0] == "Traceback (most recent call last):"
  assert "no such file or directory" in err[-1]


def test_orbax_noise_is_recognised():
  # What a damaged checkpoint or a full disk leaves behind, besides the line the run prints.
  namespace = {}
  exec(compile("def read():\n  raise Exception('bad chunk')\n",
               "site-packages/orbax/checkpoint/_src/serialization/serialization.py", "exec"),
       namespace)
  with pytest.raises(Exception) as e:
    namespace["read"]()
  unraisable = types.SimpleNamespace(exc_value=e.value, exc_traceback=e.value.__traceback__)
  assert cli.from_orbax(unraisable)
  assert cli.from_orbax(types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"),
                                              exc_traceback=None))
  assert not cli.from_orbax(types.SimpleNamespace(exc_value=ValueError("mine"),
                                                  exc_traceback=None))
  log = lambda msg, path: logging.LogRecord("x", logging.ERROR, path, 1, msg, None, None)
  noise = cli.OrbaxNoiseFilter()
  assert not noise.filter(log("_GatheringFuture exception was never retrieved", "asyncio.py"))
  assert not noise.filter(log("Save Finalize thread failed", "orbax/checkpoint/x.py"))
  assert noise.filter(log("something else", "mine.py"))


def test_an_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(train, "load_data", lambda *a: pytest.fail("loaded the data"))
  (tmp_path / "file").write_text("not a directory")
  code, err = command(run_args(tmp_path / "file"), capsys)
  assert code == 2 and err == [f"train.py: error: --out {tmp_path / 'file'}: "
                               f"{tmp_path / 'file'} exists and is not a directory"]


@pytest.mark.parametrize("dry", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_an_out_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch,
                                                                  dry):
  """An --out under a file, or a folder the user may not write into: the run said so only
  once its data was loaded (at its checkpoints' folder), the dry run once its plan was made
  (at dry_run.json), and neither named --out."""
  monkeypatch.setattr(train, "load_data", lambda *a: pytest.fail("loaded the data"))
  monkeypatch.setattr(build_lib, "dry_run", lambda *a: pytest.fail("planned the step"))
  (tmp_path / "file").write_text("not a directory")
  under_file = tmp_path / "file" / "run"
  code, err = command(run_args(under_file, *dry), capsys)
  assert code == 2 and err == [f"train.py: error: --out {under_file}: cannot make {under_file}"
                               " (Not a directory)"]
  read_only = tmp_path / "read-only"
  read_only.mkdir()
  access = os.access  # as a read-only folder is to a user who is not root (the tests may be)
  monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
      pathlib.Path(path) != read_only and access(path, mode, **kw)))
  code, err = command(run_args(read_only, *dry), capsys)
  assert code == 2 and err == [f"train.py: error: --out {read_only}: cannot write into"
                               f" {read_only} (its permissions)"]


def test_a_checkpoints_path_that_is_a_file_is_refused_before_training(tmp_path, capsys,
                                                                      monkeypatch):
  """--resume said "starting fresh", trained, failed at the first save, and Orbax's threads,
  stuck creating the step folder there, held the exit for five minutes."""
  monkeypatch.setattr(train, "loop", lambda *a: pytest.fail("trained"))
  out = tmp_path / "run"
  out.mkdir()
  (out / "checkpoints").write_text("not a folder")
  code, err = command(run_args(out, "--resume"), capsys)
  assert code == 2 and len(err) == 1 and "checkpoints is not a folder" in err[0], err


def test_resume_keeps_the_runs_layout(trained, tmp_path, monkeypatch):
  """One optimizer's run lives in --out, a comparison's in --out/<optimizer>: --resume with
  the other layout would start fresh runs beside the earlier one, so it is refused."""
  monkeypatch.setattr(train, "load_data", lambda *a: pytest.fail("loaded the data"))
  out = copy_of(trained, tmp_path)
  with pytest.raises(SystemExit, match=r"holds one optimizer's run \(config.json, .*\): resume"
                     r" it with --optimizer galore_adamw alone"):
    train.main(run_args(out, "--optimizer", "galore_adamw,adamw", "--resume"))
  both = tmp_path / "both"
  for name in ("adamw", "galore_adamw"):
    shutil.copytree(out, both / name)
  with pytest.raises(SystemExit, match=r"holds a comparison of adamw, galore_adamw \(one"
                     r" directory each\): resume it with --optimizer adamw,galore_adamw"):
    train.main(run_args(both, "--optimizer", "adamw", "--resume"))


def test_a_summary_that_is_no_json_object_is_written_again(trained, tmp_path):
  """A finished run's summary.json that is JSON but no object (a list, a number): --resume
  failed in ``summary.get`` (AttributeError).  It is no summary now: the finished run
  evaluates its last checkpoint and writes the summary again."""
  out = copy_of(trained, tmp_path)
  want = json.loads((out / "summary.json").read_text())
  # (and one whose step is no number: a TypeError comparing it with the checkpoint's)
  for text in ("[1]", "4", '{"step": "abc"}', '{"step": 2.5}'):
    (out / "summary.json").write_text(text)
    summary = train.main(run_args(out, "--resume"))["galore_adamw"]
    assert summary["step"] == 4 and summary["eval_loss"] == pytest.approx(want["eval_loss"])
    assert json.loads((out / "summary.json").read_text()) == summary


def test_a_metrics_line_that_is_json_but_no_row_is_dropped(trained, tmp_path, capsys):
  """A line of metrics.jsonl that is JSON but no row (null, a list, an object without a step)
  failed --resume with a TypeError or KeyError; a half-written line was already dropped
  with a warning, and so are these now."""
  out = copy_of(trained, tmp_path)
  rows = (out / "metrics.jsonl").read_text()
  for line in ("null", "[1, 2]", '{"loss": 1.0}', '{"step": "x"}'):
    (out / "metrics.jsonl").write_text(rows + line + "\n")
    train.main(run_args(out, "--resume"))
    assert "dropping line" in capsys.readouterr().err
  assert outputs.read_metrics(out / "metrics.jsonl", 4) == [
      json.loads(r) for r in rows.splitlines()]


def test_a_dry_run_is_no_run(tmp_path, monkeypatch):
  """A dry run writes only dry_run.json: it blocks no later run in its --out, and in an --out
  holding a run (even with --overwrite or --resume) it neither refuses nor touches it."""
  monkeypatch.setattr(train, "load_data", lambda *a: pytest.fail("loaded the data"))
  out = tmp_path / "run"
  train.main(run_args(out, "--dry-run"))
  assert sorted(p.name for p in out.iterdir()) == ["dry_run.json"]
  outputs.claim_out(out, [out], optimizers.OPTIMIZERS, resume=False, overwrite=False)  # free
  (out / "summary.json").write_text('{"tokens_per_s": 1.0}')  # as a finished run leaves it
  for flag in ("--overwrite", "--resume"):
    sizes = train.main(run_args(out, "--dry-run", flag))
    assert json.loads((out / "dry_run.json").read_text()) == sizes
  assert json.loads((out / "summary.json").read_text()) == {"tokens_per_s": 1.0}


def test_an_earlier_run_is_refused_unless_resume_or_overwrite(tmp_path, monkeypatch):
  monkeypatch.setattr(train, "load_data", lambda *a: pytest.fail("loaded the data"))
  out = tmp_path / "quickstart"
  for name in ("config.json", "metrics.jsonl", "summary.json", "curves.png", "notes.txt"):
    (out / "adamw").mkdir(parents=True, exist_ok=True)
    (out / "adamw" / name).write_text("{}")
  (out / "comparison.json").write_text("{}")
  with pytest.raises(SystemExit, match=r"holds an earlier run \(comparison.json, adamw/config"
                     r".* pass --resume to continue it, or --overwrite to replace it"):
    train.main(run_args(out, "--optimizer", "adamw,galore_adamw"))
  outs = [out / "adamw", out / "galore_adamw"]
  before = sorted(p.name for p in out.rglob("*"))
  outputs.claim_out(out, outs, optimizers.OPTIMIZERS, resume=False, overwrite=True)
  assert sorted(p.name for p in out.rglob("*")) == sorted({*before, "galore_adamw"})  # kept
  outputs.replace_earlier(out, outs, optimizers.OPTIMIZERS)  # (as training starts)
  assert sorted(p.name for p in out.rglob("*")) == [
      outputs.LOCK_FILE, "adamw", "galore_adamw", "notes.txt"]


def test_a_second_run_in_an_out_in_use_is_refused(tmp_path, monkeypatch):
  """Two runs in one --out (or a --resume of a run still going) both wrote metrics.jsonl and
  checkpoints: the second replaced the first's metrics, and each kept the other's
  checkpoint.  The lock refuses the second in one line, and a run killed (-9) leaves no
  lock behind."""
  monkeypatch.setattr(train, "load_data", lambda *a: pytest.fail("loaded the data"))
  out = tmp_path / "run"
  out.mkdir()
  holder = subprocess.Popen(  # the first run, as far as the lock goes
      [sys.executable, "-c", "import pathlib, sys, time; from examples.llama import outputs;"
       " held = outputs.lock_out(pathlib.Path(sys.argv[1])); print('locked', flush=True);"
       " time.sleep(120)", str(out)], stdout=subprocess.PIPE, text=True,
      cwd=ROOT)
  try:
    assert holder.stdout.readline().strip() == "locked"
    for extra in ((), ("--resume",), ("--overwrite",)):
      with pytest.raises(SystemExit, match=rf"--out {out} is in use by another run \(pid"
                         rf" {holder.pid} on .+\): wait for it to end, or choose another --out"):
        train.main(run_args(out, *extra))
    assert sorted(p.name for p in out.iterdir()) == [outputs.LOCK_FILE]  # nothing written
  finally:
    holder.kill()
    holder.wait()
  outputs.lock_out(out).close()  # free again after kill -9


def test_an_out_on_a_read_only_file_system_says_so(tmp_path, monkeypatch):
  monkeypatch.setattr(os, "access", lambda *a: False)
  read_only = types.SimpleNamespace(f_flag=os.ST_RDONLY)
  monkeypatch.setattr(os, "statvfs", lambda path: read_only)
  with pytest.raises(SystemExit, match=r"cannot write into .* \(a read-only file system\)$"):
    outputs.make_dirs(tmp_path, [tmp_path])
  monkeypatch.setattr(os, "statvfs", lambda path: types.SimpleNamespace(f_flag=0))
  with pytest.raises(SystemExit, match=r"cannot write into .* \(its permissions\)$"):
    outputs.make_dirs(tmp_path, [tmp_path])


def test_overwrite_clears_the_earlier_run_only_once_the_run_can_start(trained, tmp_path):
  """--overwrite cleared the earlier run before the data loaded: a command that then failed
  (a missing --data, an unknown --tokenizer) left the --out empty, config, metrics and
  checkpoints gone."""
  out = copy_of(trained, tmp_path)
  before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  for bad in (["--data", str(tmp_path / "missing.txt")], ["--tokenizer", "no-such-tokenizer"]):
    with pytest.raises((FileNotFoundError, ValueError)):  # (one line each from the CLI)
      train.main(run_args(out, "--overwrite", *bad))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_flag_the_second_optimizer_refuses_stops_the_command_before_any_trains(
    tmp_path, monkeypatch):
  """--host-refresh on with a policy the host cannot follow was checked as each optimizer
  started: adamw trained, then galore_adamw refused."""
  monkeypatch.setattr(train, "load_data", lambda *a: pytest.fail("loaded the data"))
  with pytest.raises(SystemExit, match="^--host-refresh on needs --refresh every"):
    train.main(tiny_args(tmp_path / "run", "--optimizer", "adamw,galore_adamw", "--host-refresh",
                         "on", "--refresh", "staggered"))
  assert not (tmp_path / "run" / "adamw" / "summary.json").exists()


def sizes_of(argv: list[str]) -> dict:
  """The dry run's sizes (state bytes per optimizer) without XLA's plan of the step, whose
  compile (a 7b step included) would cost minutes here."""
  args = cli.build_parser().parse_args([*argv, "--dry-run"])
  return build_lib.dry_run(args, cli.check_args(args))


def test_default_rank_saves_memory_on_every_config(tmp_path, capsys):
  for name, cfg in model_lib.CONFIGS.items():
    sizes = sizes_of(["--model", name, "--optimizer", "adamw,galore_adamw,ldadamw",
                      "--out", str(tmp_path / name)])
    adamw = sizes["adamw"]["optimizer_state_bytes"]
    for opt in ("galore_adamw", "ldadamw"):
      rank = optimizers.default_rank(cfg, opt)
      assert sizes[opt]["optimizer_state_bytes"] < adamw, (name, opt, rank)
      for m, n in ((cfg.D, cfg.D), (cfg.D, cfg.F)):  # each matrix, not only the total
        assert optimizers.saves_memory(rank, m, n, opt), (name, opt, m, n)
  # The paper's 128 did not save on 9m: its q/k/v/o are 128 x 128.
  nine = sizes_of(["--model", "9m", "--optimizer", "adamw,galore_adamw", "--rank", "128",
                   "--out", str(tmp_path / "9m-128")])
  assert nine["galore_adamw"]["optimizer_state_bytes"] > nine["adamw"]["optimizer_state_bytes"]
  capsys.readouterr()
  with pytest.raises(SystemExit):
    train.main(["--help"])
  assert "galore_adamw / fira_adamw 9m 80, tiny 40;" in " ".join(capsys.readouterr().out.split())


def test_the_table_shows_learning_rates_and_perplexity_never_overflows(capsys):
  row = {"optimizer_state_bytes": 2**20, "step_memory_bytes": None, "peak_memory_bytes": None,
         "tokens_per_s": 1000.0, "eval_loss": 800.0, "peak_lr_is_default": True}
  outputs.print_table({"adamw": {**row, "peak_lr": 1e-3, "eval_ppl": outputs.perplexity(800.0)},
                       "galore_adamw": {**row, "peak_lr": 1e-2, "eval_ppl": 2.0 ** 60}})
  text = capsys.readouterr().out
  lines = text.splitlines()
  assert lines[1].split()[:2] == ["optimizer", "lr"]
  assert lines[2].split()[:2] == ["adamw", "0.001"] and lines[2].split()[-1] == "inf"
  assert lines[3].split()[:2] == ["galore_adamw", "0.01"] and lines[3].split()[-1] == "1.153e+18"
  assert "default from its paper" in text
  assert outputs.format_ppl(35.18) == "35.18"


def test_sigterm_saves_a_checkpoint_and_prints_the_resume_command(tmp_path):
  # stdout is a pipe, as under nohup or a batch scheduler: a plain log line per step.
  out = tmp_path / "out"
  proc = subprocess.Popen(
      [sys.executable, str(SCRIPT), *run_args(out, "--save-every", "0", steps=100000)],
      env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(losses(out)) >= 2):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
  last = losses(out)[-1][0]
  assert [p.name for p in (out / "checkpoints").iterdir()] == [str(last)]  # --save-every 0
  line = stderr.splitlines()[-1]
  assert line.startswith(f"[galore_adamw] stopped at step {last} by SIGTERM; its checkpoint is"
                         " saved; resume with: python ")
  assert f"--out {out} " in line and line.endswith("--save-every 0 --resume")
  assert "[galore_adamw] step 2/100000: loss " in stdout
  # tokens/s, next to the model FLOPs per token (31 inputs of a 32-token row) and MFU
  per_token = flops.train_flops_per_token(model_lib.CONFIGS["tiny"], 32)
  assert f" tokens/s x {per_token / 1e9:.4g} GFLOP/token (MFU n/a " in stdout


def test_a_signal_is_recorded_and_a_second_one_stops_at_once():
  stop, before = stopping.StopRequest(), signal.getsignal(signal.SIGINT)
  with stop.catching():
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.agreed() == signal.SIGINT  # recorded, the step goes on
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGTERM)
  assert signal.getsignal(signal.SIGINT) is before


# Run as a script under a file size limit: writing the checkpoint's data file fails as on a
# full disk (Python ignores SIGXFSZ, so the write fails with EFBIG); config and metrics fit.
LIMITED = """import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_full_disk_is_one_line_and_leaves_no_temporary_checkpoint(tmp_path):
  # --save-every 1: the failed save of step 1 surfaces when step 2 saves.  Without the
  # session's compilation cache: under the limit, writing an executable there fails (a
  # warning line) and leaves it truncated for the next test to read (another warning).
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  proc = subprocess.run([sys.executable, "-c", LIMITED, str(SCRIPT),
                         *run_args(tmp_path / "out", "--save-every", "1")],
                        env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert proc.stderr.splitlines() == [
      f"train.py: error: could not save checkpoint step 1 in {tmp_path / 'out' / 'checkpoints'}:"
      " File too large; no earlier checkpoint was saved (--debug shows the traceback)"]
  assert list((tmp_path / "out" / "checkpoints").iterdir()) == []


def test_a_failed_save_leaves_no_temporary_folder_its_threads_wrote_after_the_error(tmp_path):
  """On a full disk the failed save's folder was removed while Orbax's threads still wrote
  into it, so it came back and stayed (the next resume warned of it); ``close`` removes it
  again once the threads have stopped."""
  ckpts = checkpoints.Checkpoints(tmp_path / "checkpoints")
  late = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp"

  def fail():
    raise OSError(28, "No space left on device")

  def stop(close=ckpts.mngr.close, wait=ckpts.mngr.wait_until_finished):
    late.mkdir(parents=True)  # a writer thread, after failed() swept
    (late / "d").write_bytes(b"x")
    ckpts.mngr.wait_until_finished = wait  # (Orbax's close waits too)
    close()

  ckpts.pending = 3
  ckpts.mngr.wait_until_finished, ckpts.mngr.close = fail, stop
  with pytest.raises(checkpoints.SaveFailed, match="could not save checkpoint step 3 in .*"
                     "No space left on device; no earlier checkpoint was saved"):
    ckpts.close()
  assert list((tmp_path / "checkpoints").iterdir()) == []


# Run as a script on a disk that fills up after the checkpoint of step 2: making the folder of
# step 4 fails.  Orbax made it in a background thread, whose failure left the threads that
# write the arrays waiting for it for 300 s after the run's error, holding the exit.
FULL_AFTER_STEP_2 = """import errno, os, runpy, sys
mkdir = os.mkdir
def full(path, *args, **kwargs):
  if os.path.basename(path).startswith("4.orbax-checkpoint-tmp"):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
  return mkdir(path, *args, **kwargs)
os.mkdir = full
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_disk_full_at_a_step_folder_ends_the_run_at_once_and_keeps_the_last_checkpoint(
    tmp_path):
  ckpts = tmp_path / "out" / "checkpoints"
  proc = subprocess.run([sys.executable, "-c", FULL_AFTER_STEP_2, str(SCRIPT),
                         *run_args(tmp_path / "out")],
                        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                        text=True, timeout=60)  # the run takes seconds; it took 300 s more
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert proc.stderr.splitlines() == [
      f"train.py: error: could not save checkpoint step 4 in {ckpts}: No space left on device:"
      f" {ckpts / '4.orbax-checkpoint-tmp'}; checkpoint step 2 is kept (--debug shows the"
      " traceback)"]
  assert [p.name for p in ckpts.iterdir()] == ["2"]
  kept = checkpoints.Checkpoints(ckpts)
  assert kept.steps() == [2] and kept.read_meta(2)["step"] == 2  # whole, and resumable
  kept.close()

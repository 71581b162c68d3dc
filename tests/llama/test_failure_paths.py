"""The training script's failure paths: flags out of range, a default rank that saves no
memory, an overflowing perplexity.
"""

import pytest

from examples.llama import optimizers, outputs, train
from examples.llama import model as model_lib
from test_train import tiny_args  # pylint: disable=wrong-import-order


def run_args(out, *extra, steps=4):
  return tiny_args(out, "--eval-every", "0", "--optimizer", "galore_adamw", *extra, steps=steps)


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
  with pytest.raises(SystemExit, match=r"--eval-tokens 0 is less than one validation batch"
                     r" \(4 x 31 = 124 target tokens\)"):
    train.main(run_args(tmp_path, "--eval-tokens", "0"))


def test_default_rank_saves_memory_on_every_config(tmp_path, capsys):
  for name, cfg in model_lib.CONFIGS.items():
    sizes = train.main(["--model", name, "--optimizer", "adamw,galore_adamw,ldadamw",
                        "--dry-run", "--out", str(tmp_path / name)])
    adamw = sizes["adamw"]["optimizer_state_bytes"]
    for opt in ("galore_adamw", "ldadamw"):
      rank = optimizers.default_rank(cfg, opt)
      assert sizes[opt]["optimizer_state_bytes"] < adamw, (name, opt, rank)
      for m, n in ((cfg.D, cfg.D), (cfg.D, cfg.F)):  # each matrix, not only the total
        assert optimizers.saves_memory(rank, m, n, opt), (name, opt, m, n)
  # The paper's 128 did not save on 9m: its q/k/v/o are 128 x 128.
  nine = train.main(["--model", "9m", "--optimizer", "adamw,galore_adamw", "--rank", "128",
                     "--dry-run", "--out", str(tmp_path / "9m-128")])
  assert nine["galore_adamw"]["optimizer_state_bytes"] > nine["adamw"]["optimizer_state_bytes"]
  capsys.readouterr()
  with pytest.raises(SystemExit):
    train.main(["--help"])
  assert "galore_adamw 9m 80, tiny 40;" in " ".join(capsys.readouterr().out.split())


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



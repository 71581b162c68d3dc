"""examples/llama/plot.py: which runs it finds, what it draws, how it fails."""

import doctest
import json
import pathlib

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from examples.llama import plot  # pylint: disable=wrong-import-position


def write_run(d: pathlib.Path, optimizer: str | None, rows: list[dict]) -> pathlib.Path:
  d.mkdir(parents=True)
  (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  if optimizer:
    (d / "config.json").write_text(json.dumps({"optimizer": optimizer}))
  return d


def rows_(scale: float) -> list[dict]:
  rows = [{"step": s, "tokens": 64 * s, "loss": scale / s, "tokens_per_s": 100.0 * s}
          for s in range(1, 5)]
  rows[1]["eval_ppl"], rows[3]["eval_ppl"] = 40.0 * scale, 20.0 * scale
  rows.append({"step": 4, "tokens": 256, "loss": scale / 4, "eval_ppl": 19.0 * scale})
  return rows


def test_draws_each_runs_metrics(tmp_path):
  write_run(tmp_path / "cmp" / "adamw", "adamw", rows_(1.0))
  write_run(tmp_path / "cmp" / "galore_adamw", "galore_adamw", rows_(2.0))
  runs = plot.find_runs([tmp_path / "cmp"])
  assert list(runs) == ["adamw", "galore_adamw"]
  fig = plot.plot(runs, tmp_path / "out" / "curves.png", title="t")
  assert (tmp_path / "out" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  ax_loss, ax_ppl, ax_speed = fig.axes
  for ax in fig.axes:
    assert [line.get_label() for line in ax.get_lines()] == ["adamw", "galore_adamw"]
  loss = ax_loss.get_lines()[1]  # galore_adamw: loss 2/s at tokens 64 s, then the eval row
  np.testing.assert_allclose(loss.get_xdata(), [64, 128, 192, 256, 256])
  np.testing.assert_allclose(loss.get_ydata(), [2.0, 1.0, 2 / 3, 0.5, 0.5])
  ppl = ax_ppl.get_lines()[0]
  np.testing.assert_allclose(ppl.get_xdata(), [128, 256, 256])
  np.testing.assert_allclose(ppl.get_ydata(), [40.0, 20.0, 19.0])
  speed = ax_speed.get_lines()[0]
  np.testing.assert_allclose(speed.get_xdata(), [1, 2, 3, 4])
  np.testing.assert_allclose(speed.get_ydata(), [100, 200, 300, 400])


def test_labels_and_cli(tmp_path, capsys):
  # Two comparisons with the same optimizers: the directory tells them apart.
  for cmp in ("a", "b"):
    write_run(tmp_path / cmp / "x", "adamw", rows_(1.0))
  single = write_run(tmp_path / "solo", None, rows_(1.0))  # no config.json: the dir's name
  out = plot.main([str(tmp_path / "a"), str(tmp_path / "b"), str(single)])
  assert out == tmp_path / "a" / "curves.png" and out.is_file()
  assert "a/adamw, b/adamw, solo" in capsys.readouterr().out


def test_clear_errors(tmp_path):
  with pytest.raises(SystemExit, match="nowhere: no such run directory"):
    plot.main([str(tmp_path / "nowhere")])
  (tmp_path / "empty").mkdir()
  with pytest.raises(SystemExit, match="empty: no metrics.jsonl"):
    plot.main([str(tmp_path / "empty")])
  bad = write_run(tmp_path / "bad", "adamw", rows_(1.0))
  (bad / "metrics.jsonl").write_text('{"step": 1}\n{oops\n')
  with pytest.raises(SystemExit, match=r"metrics.jsonl:2: not a JSON line"):
    plot.main([str(bad)])
  (bad / "metrics.jsonl").write_text('{"step": 1}\n3\n')  # JSON, but not a row
  with pytest.raises(SystemExit, match=r"metrics.jsonl:2: not a JSON object"):
    plot.main([str(bad)])
  (bad / "metrics.jsonl").write_text('{"step": 1, "tokens": 4, "loss": 2.0}\n')
  (tmp_path / "afile").write_text("")
  with pytest.raises(SystemExit, match=r"afile/c.png: cannot write \("):
    plot.main([str(bad), "--out", str(tmp_path / "afile" / "c.png")])


def test_docstring_example():
  assert doctest.testmod(plot).failed == 0


def test_read_result_names_the_file_and_the_problem(tmp_path):
  with pytest.raises(SystemExit, match=r"missing.json: cannot read \(No such file"):
    plot.read_result(tmp_path / "missing.json", "refresh")
  (tmp_path / "bad.json").write_text("{oops")
  with pytest.raises(SystemExit, match="bad.json: not JSON"):
    plot.read_result(tmp_path / "bad.json", "refresh")
  (tmp_path / "other.json").write_text(json.dumps({"benchmark": "sharding"}))
  with pytest.raises(SystemExit, match="other.json: not a benchmarks/refresh.py result"):
    plot.read_result(tmp_path / "other.json", "refresh")
  assert plot.read_result(tmp_path / "other.json", "sharding") == {"benchmark": "sharding"}

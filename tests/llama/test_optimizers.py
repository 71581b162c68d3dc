"""The example's optimizer list (examples/llama/optimizers.py): every name builds from the
command line at its paper's defaults, and the successors (Fira, APOLLO, APOLLO-Mini) keep the
state their papers count.  Abstract only (``jax.eval_shape``): nothing is compiled here; the
dry run of the README and BENCHMARKS commands compiles their steps."""

from __future__ import annotations

import doctest
import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import galore_jax as gj
from examples.llama import build
from examples.llama import cli
from examples.llama import model as model_lib
from examples.llama import optimizers

CFG = model_lib.CONFIGS["tiny"]


def parse(*flags):
  args = cli.build_parser().parse_args(["--model", "tiny", *flags])
  cli.check_args(args)
  return args


def abstract_params():
  model = nnx.eval_shape(lambda: model_lib.Llama(CFG, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_every_name_has_a_learning_rate_and_builds():
  params = abstract_params()
  args = parse("--rank", "8")
  state_bytes = {}
  for name in optimizers.OPTIMIZERS:
    assert name in optimizers.DEFAULT_LR
    tx, schedule = optimizers.make_optimizer(optimizers.with_defaults(args, name), name, 10)
    state_bytes[name] = gj.tree_bytes(jax.eval_shape(tx.init, params))
    assert float(schedule(1)) > 0
  # The successors' learning rates: the GaLore protocol's 0.01 (frontier.md, sections 0-3).
  assert {optimizers.DEFAULT_LR[n] for n in ("fira_adamw", "apollo_adamw", "apollo_mini")} == {
      1e-2}
  # Fira is GaLore plus one float32 norm per matrix: 7 kernels in each of the L layers.
  assert state_bytes["fira_adamw"] - state_bytes["galore_adamw"] == 4 * 7 * CFG.L
  assert state_bytes["apollo_mini"] < state_bytes["apollo_adamw"] < state_bytes["galore_adamw"]
  assert state_bytes["apollo_adamw"] < state_bytes["adamw"]


def test_the_successors_defaults():
  args = parse("--rank", "32")
  mini = optimizers.with_defaults(args, "apollo_mini")
  assert (mini.rank, mini.galore_scale, mini.basis_method) == (1, math.sqrt(128), "random")
  apollo = optimizers.with_defaults(args, "apollo_adamw")
  assert (apollo.rank, apollo.galore_scale, apollo.basis_method) == (32, 1.0, "random")
  fira = optimizers.with_defaults(args, "fira_adamw")
  assert (fira.rank, fira.galore_scale, fira.basis_method) == (32, 0.25, "svd")
  given = optimizers.with_defaults(
      parse("--galore-scale", "2", "--basis-method", "svd"), "apollo_adamw")
  assert (given.galore_scale, given.basis_method) == (2.0, "svd")
  # A default rank that saves memory on every config, as GaLore's.
  for cfg in model_lib.CONFIGS.values():
    for name in ("fira_adamw", "apollo_adamw"):
      rank = optimizers.default_rank(cfg, name)
      assert all(optimizers.saves_memory(rank, m, n, name)
                 for m, n in ((cfg.D, cfg.D), (cfg.D, cfg.F))), (cfg.name, name)


@pytest.mark.parametrize("name, flags, match", [
    ("fira_adamw", ["--proj-type", "full"], "not available for fira_adamw"),
    ("apollo_adamw", ["--proj-type", "full"], "not available for apollo_adamw"),
    ("apollo_mini", ["--refresh", "lazy"], "--refresh lazy compares successive bases"),
])
def test_what_the_successors_refuse(name, flags, match):
  args = optimizers.with_defaults(parse(*flags), name)
  with pytest.raises(SystemExit, match=match):
    optimizers.make_optimizer(args, name, 10)


def test_apollo_with_svd_stores_its_basis():
  params = abstract_params()
  args = parse("--rank", "8", "--basis-method", "svd")
  tx, _ = optimizers.make_optimizer(optimizers.with_defaults(args, "apollo_adamw"),
                                    "apollo_adamw", 10)
  state = jax.eval_shape(tx.init, params)
  stored = [b for b in state[0].bases if isinstance(b, gj.Bases)]
  assert stored and all(b.left is not None or b.right is not None for b in stored)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state[0].norms))


def _left_bases(args, name):
  """How many of ``name``'s kernel bases project on the left (the output axis)."""
  tx, _ = optimizers.make_optimizer(optimizers.with_defaults(args, name), name, 10)
  state = jax.eval_shape(tx.init, abstract_params())
  bases = [b for b in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, gj.Bases))
           if isinstance(b, gj.Bases)]
  assert len(bases) == 7  # q, k, v, o, gate, up, down (stacked over the layers)
  return sum(b.left is not None for b in bases)


def test_ldadamw_side_rule_default_and_the_librarys_std():
  """--proj-type for ldadamw: by default the LDAdam reference's ldadam_std (square kernels on
  the left); std is galore_jax's own rule (square on the right), passed through unchanged;
  ldadam_std is refused for the other projecting optimizers and ignored by AdamW."""
  assert optimizers.with_defaults(parse(), "ldadamw").proj_type == "ldadam_std"
  assert optimizers.with_defaults(parse(), "galore_adamw").proj_type == "std"
  for flag in ("std", "ldadam_std", "left"):
    assert optimizers.with_defaults(parse("--proj-type", flag), "ldadamw").proj_type == flag
  default = _left_bases(parse("--rank", "8"), "ldadamw")
  assert default == _left_bases(parse("--rank", "8", "--proj-type", "ldadam_std"), "ldadamw")
  # the four square kernels (q, k, v, o: D x D) move to the right under the library's std
  assert _left_bases(parse("--rank", "8", "--proj-type", "std"), "ldadamw") == default - 4
  assert _left_bases(parse("--rank", "8", "--proj-type", "std"), "galore_adamw") == default - 4
  with pytest.raises(SystemExit, match="ldadam_std is LDAdam's rule, for ldadamw only"):
    optimizers.make_optimizer(parse("--proj-type", "ldadam_std"), "galore_adamw", 10)
  optimizers.make_optimizer(parse("--proj-type", "ldadam_std"), "adamw", 10)
  assert "ldadam_std" in cli.build_parser().format_help()


@pytest.mark.parametrize("model, steps, warmup, warns", [
    ("1b", 3, None, True),  # 10% of 3 steps is no warm-up
    ("1b", 3, "0", True),
    ("1b", 3, "1", False),
    ("1b", 100, None, False),
    ("350m", 3, None, True),
    ("60m", 3, "0", False),  # narrow: the first full-lr step lowered the loss
])
def test_warmup_warning_for_wide_models_only(model, steps, warmup, warns):
  flags = ["--model", model, *(["--warmup", warmup] if warmup else [])]
  args = cli.build_parser().parse_args(flags)
  got = optimizers.warmup_warning(args, model_lib.CONFIGS[model], steps)
  assert (got is not None) == warns
  if warns:
    assert f"width {model_lib.CONFIGS[model].D}" in got and "--warmup" in got


def test_host_refresh_rule_follows_each_optimizers_cond():
  """--host-refresh: every(T)'s steps for GaLore's projections, step 0 for LDAdam, nothing
  for the optimizers without a refresh cond or off a GPU under auto; on with a policy the
  host cannot follow is refused."""
  args = parse("--host-refresh", "on", "--update-proj-gap", "4")
  assert [optimizers.host_refresh(args, "galore_adamw_8bit")(t) for t in range(6)] == [
      True, False, False, False, True, False]
  assert [optimizers.host_refresh(args, "ldadamw")(t) for t in range(3)] == [True, False, False]
  # APOLLO: its random projection is drawn at every step (no cond); its svd one has a cond
  assert optimizers.host_refresh(args, "apollo_adamw") is None
  svd = parse("--host-refresh", "on", "--update-proj-gap", "4", "--basis-method", "svd")
  assert [optimizers.host_refresh(svd, "apollo_mini")(t) for t in range(5)] == [
      True, False, False, False, True]
  auto = parse("--update-proj-gap", "4")
  assert auto.host_refresh == "auto"
  assert optimizers.host_refresh(auto, "galore_adamw", backend="cpu") is None
  assert optimizers.host_refresh(auto, "galore_adamw", backend="gpu")(4)
  assert optimizers.host_refresh(parse("--refresh", "lazy"), "fira_adamw", backend="gpu") is None
  with pytest.raises(SystemExit, match="--host-refresh on needs --refresh every"):
    optimizers.host_refresh(parse("--host-refresh", "on", "--refresh", "staggered"),
                            "galore_adamw")
  # read by none of a run's optimizers (AdamW, APOLLO's random projection keep no refresh
  # cond): said, and ignored
  assert optimizers.unread_flags(parse("--host-refresh", "on"), ["adamw", "apollo_mini"]) == [
      "--host-refresh"]
  assert optimizers.unread_flags(parse("--host-refresh", "on", "--basis-method", "svd"),
                                 ["adamw", "apollo_mini"]) == []
  assert optimizers.unread_flags(parse("--host-refresh", "on"), ["adamw", "ldadamw"]) == []
  assert doctest.testmod(optimizers).failed == 0


def params_for(args):
  """The trainable params of the example's model for ``args`` (its --model, --method), as
  shapes."""
  model = nnx.eval_shape(lambda: model_lib.Llama(
      model_lib.CONFIGS[args.model], method=build.method(args), rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def state_arrays(args, name, params):
  """The float and uint8 arrays of ``name``'s state on ``params`` (counters and keys aside)."""
  tx, _ = optimizers.make_optimizer(args, name, 10)
  return [x for x in jax.tree.leaves(jax.eval_shape(tx.init, params))
          if jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == jnp.uint8]


@pytest.mark.parametrize("flags", [[], ["--per-layer"], ["--method", "sltrain"]],
                         ids=["ordinary", "per-layer", "sltrain"])
@pytest.mark.parametrize("name", optimizers.OPTIMIZERS)
def test_closed_form_equals_the_examples_state(name, flags):
  """``optimizers.closed_form`` (the dry run's ``gj.memory.estimate``) equals the bytes of
  the state the example builds, on the 60m config, whose stacked norms (8 layers of 512)
  hold 4096 entries: the 8-bit optimizers' floor, met by the stack but not by a layer's
  norm.  Counters (one per transform, per layer under --per-layer) and keys aside.  Under
  ``--method sltrain`` a projecting optimizer projects the rank-128 factors (at its default
  rank over them; the next test checks the mask)."""
  args = optimizers.with_defaults(cli.build_parser().parse_args(
      ["--model", "60m", "--rank", "128", *flags]), name)
  params = params_for(args)
  arrays = state_arrays(args, name, params)
  projected = sum(jax.tree.leaves(model_lib.galore_targets(params)))
  counters = 4 * projected if name in optimizers.APOLLO else 0  # an int32 counter per leaf
  closed = optimizers.closed_form(args, name, params)
  assert closed.optimizer_state == gj.tree_bytes(arrays) + counters
  if "--method" in flags:
    return
  weights = gj.tree_bytes(params)  # float32 60m: 4 bytes per param
  one_layer = gj.tree_bytes(params["layers"]) // 8  # 8 layers
  rest = weights - 8 * one_layer
  assert closed.weights == weights
  assert closed.gradients == (rest + one_layer if flags else weights)


@pytest.mark.parametrize("method, names", [
    ("full", {"kernel"}), ("lora", {"lora_a", "lora_b"}), ("relora", {"lora_a", "lora_b"}),
    ("lowrank", {"a", "b"}), ("sltrain", {"a", "b"})])
def test_projecting_optimizers_project_each_methods_matrices(method, names):
  """``galore_targets`` selects the 7 attention and MLP maps' matrices of every layer: the
  dense kernels, or under a low-rank ``--method`` its two factors each (not SLTrain's sparse
  values, LoRA's frozen bases or the norms, embeddings and head); at 60m the factors' default
  projection rank is ``default_rank``'s over 512 x 128 and 1376 x 128: galore_adamw 112,
  ldadamw (with its full-size error buffer) 56, APOLLO-Mini 1."""
  args = cli.build_parser().parse_args(["--model", "60m", "--method", method])
  params = params_for(args)
  chosen = [jax.tree_util.keystr(p) for p, on in jax.tree_util.tree_leaves_with_path(
      model_lib.galore_targets(params)) if on]
  assert len(chosen) == 7 * len(names), chosen
  assert {p.split("'")[-2] for p in chosen} == names and all("layers" in p for p in chosen)
  if method != "full":
    assert [optimizers.rank_for(args, n) for n in ("galore_adamw", "ldadamw", "apollo_mini")
            ] == [112, 56, 1]



def test_the_default_rank_is_the_papers_at_their_sizes():
  """Without ``--rank`` the paper sizes run at the papers' ranks: GaLore's protocol (60m 128,
  130m / 350m 256, 1b 512, 7b 1024) for GaLore, its 8-bit form, GaLore-Adafactor, Fira and
  LDAdam; APOLLO's r = d / 4 (256 at 7b, its 7B run); lower where that would not save memory.
  Other sizes keep the rule of at most 128 that saves memory (9m: 80)."""
  rank = lambda model, name: optimizers.rank_for(
      cli.build_parser().parse_args(["--model", model]), name)
  galore = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}
  for name in ("galore_adamw", "galore_adamw_8bit", "galore_adafactor", "fira_adamw"):
    assert {m: rank(m, name) for m in galore} == galore, name
  # LDAdam's full-size error buffer: at 130m rank 256 would keep as much as Adam (768^2 + 3 x
  # 768 x 256 = 2 x 768^2 on q, k, v, o), so the next multiple of 8 below.
  assert {m: rank(m, "ldadamw") for m in galore} == {**galore, "130m": 248}
  apollo = {"60m": 128, "130m": 192, "350m": 256, "1b": 512, "7b": 256}
  assert {m: rank(m, "apollo_adamw") for m in apollo} == apollo
  assert (rank("9m", "galore_adamw"), rank("100m", "galore_adamw"), rank("3b", "ldadamw")
          ) == (80, 128, 128)


@pytest.mark.parametrize("model, method", [("9m", "full"), ("60m", "lowrank")])
@pytest.mark.parametrize("name", [n for n in optimizers.PROJECTING if n != "apollo_mini"])
def test_default_rank_keeps_less_state_than_the_same_optimizer_unprojected(
    name, model, method, monkeypatch):
  """The default rank (``default_rank``: of the dense kernels at 9m, of 60m's 128-wide
  low-rank factors) is one at which the example's optimizer, as built, keeps less state than
  itself with nothing projected (the mask off): 8-bit GaLore against 8-bit moments,
  GaLore-Adafactor against its factored ones, the others against Adam's."""
  args = optimizers.with_defaults(cli.build_parser().parse_args(
      ["--model", model, "--method", method]), name)
  params = params_for(args)
  projected = gj.tree_bytes(state_arrays(args, name, params))
  monkeypatch.setattr(model_lib, "galore_targets", lambda p: jax.tree.map(lambda _: False, p))
  assert projected < gj.tree_bytes(state_arrays(args, name, params)), args.rank


@pytest.mark.parametrize("steps, warmup, warns", [(4, "100", True), (4, "4", True),
                                                  (4, "3", False), (1, "1", False)])
def test_warmup_that_outlasts_the_run_warns(steps, warmup, warns):
  """The rate would never reach the peak lr the summary reports (a 1-step run has no ramp)."""
  args = cli.build_parser().parse_args(["--model", "tiny", "--warmup", warmup])
  got = optimizers.warmup_warning(args, model_lib.CONFIGS["tiny"], steps)
  assert (got == f"--warmup {warmup} is not shorter than the run's {steps} steps: the learning"
          " rate never reaches its peak (--lr, the summary's peak_lr)") == warns


@pytest.mark.parametrize("flags, steps, warns", [
    (["--relora-every", "100"], 2, True), (["--relora-every", "2"], 2, True),
    (["--relora-every", "2"], 3, False), ([], 12, False), ([], 2, True)])
def test_relora_that_never_merges_warns(flags, steps, warns):
  args = cli.build_parser().parse_args(["--model", "tiny", "--method", "relora", *flags])
  got = optimizers.relora_warning(args, steps)
  assert (got is not None and "the adapters are never merged" in got) == warns
  args = cli.build_parser().parse_args(["--model", "tiny", *flags])  # --method full
  assert optimizers.relora_warning(args, steps) is None


class Recording:
  """A namespace that records which of ``watched`` its readers ask for."""

  def __init__(self, args, watched):
    object.__setattr__(self, "_args", args)
    object.__setattr__(self, "_watched", watched)
    object.__setattr__(self, "read", set())

  def __getattr__(self, name):
    if name in self._watched:
      self.read.add(name)
    return getattr(self._args, name)


@pytest.mark.parametrize("method", ["full", "lowrank"])
@pytest.mark.parametrize("name", optimizers.OPTIMIZERS)
def test_unread_flags_table_is_what_each_optimizer_reads(name, method):
  """``optimizers.READERS`` (the settings each optimizer reads, behind the warning for a
  setting no optimizer of the run reads) equals what building the optimizer asks of the
  flags: ``--rank`` under ``--method full``, ``--proj-rank`` under a low-rank one;
  ``--host-refresh`` is read by the step (``optimizers.host_refresh``), not the transform."""
  args = parse("--method", method)
  skip = "proj_rank" if method == "full" else "rank"  # the other method's
  watched = set(optimizers.READERS) - {skip, "host_refresh"}
  recording = Recording(args, watched)
  optimizers.transform(recording, name, 1e-3, model_lib.LAYER_KERNEL_DIMS)
  want = {flag for flag in watched if name in optimizers.READERS[flag][0]}
  assert recording.read == want
  for basis in (), ("--basis-method", "svd"):  # (APOLLO's random projection has no cond)
    on = parse("--method", method, "--host-refresh", "on", *basis)
    rule = optimizers.host_refresh(on, name)
    assert (rule is not None) == ("--host-refresh" not in optimizers.unread_flags(on, [name]))


def test_a_setting_no_optimizer_reads_is_named(tmp_path, capsys):
  """--rho without ldadamw, --basis-method with only AdamW / LDAdam: one warning line."""
  args = parse("--rho", "0.5", "--basis-method", "power", "--update-proj-gap", "100")
  assert optimizers.unread_flags(args, ["adamw", "ldadamw"]) == ["--basis-method",
                                                                 "--update-proj-gap"]
  assert optimizers.unread_flags(args, ["galore_adamw", "ldadamw"]) == []
  assert optimizers.unread_flags(parse("--rank", "8"), ["adamw"]) == ["--rank"]
  lowrank = parse("--rank", "8", "--method", "lowrank")
  assert optimizers.unread_flags(lowrank, ["adamw"]) == []  # the factors' rank
  from examples.llama import train
  train.main(["--model", "tiny", "--optimizer", "adamw", "--rho", "0.5", "--dry-run",
              "--out", str(tmp_path)])
  assert ("warning: --rho: no optimizer of this run (adamw) reads it; ignored"
          in capsys.readouterr().out)

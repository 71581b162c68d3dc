"""Pretrain a LLaMA with galore_jax or a baseline, the way the GaLore papers did.

The papers' setup (reference/galore.md section 2): sequence length 256, each
document truncated / padded with pad masked out of the loss, linear warmup over
10% of the steps then cosine decay to 10% of the peak, gradient clipping and
weight decay optional, evaluation perplexity on a fixed validation token budget.
Data: C4 when you have it, any local text, a Hugging Face dataset, or by default
the Python standard library's source shipped with the interpreter.

Examples:
  python examples/llama/train.py --model 60m --optimizer galore_adamw --rank 128 \\
      --lr 0.01 --batch-size 512 --grad-accum 2 --steps 10000 --data /data/c4 --tokenizer t5-base
  python examples/llama/train.py --model tiny --tokenizer bytes --optimizer adamw,galore_adamw \\
      --steps 200 --batch-size 8      # compare two optimizers on the same batches
  python examples/llama/train.py --model 7b --optimizer galore_adamw --rank 1024 --dry-run
  python examples/llama/train.py --model 350m --optimizer ldadamw --rank 256 --data /data/c4 \\
      --tokenizer t5-base    # LDAdam: betas (0.908, 0.99), rho 0.908, lr 1e-3, no clipping
  python examples/llama/train.py --model tiny --tokenizer bytes --cpu-devices 8 \\
      --mesh data=2,fsdp=2,tensor=2     # sharded (here over 8 CPU devices)
  python examples/llama/train.py --model 1b --mesh fsdp=8 --coordinator host0:1234 \\
      --num-processes 2 --process-id 0 # multi-host: the same command on every host
"""
# The docstring above is the --help text: its first paragraph the description, the rest from
# "Examples:" on the epilog (build_parser).

from __future__ import annotations

import argparse
import decimal
import logging
import math
import pathlib
import sys
import traceback
import warnings

import jax.numpy as jnp

import galore_jax as gj
from examples.llama import data as data_lib
from examples.llama import model as model_lib
from examples.llama.optimizers import (OPTIMIZERS, RANKED, REFRESH_POLICIES, default_rank,
                                       rank_cap)
from examples.llama.optimizers import method_rank_for

DTYPES = {  # name -> (param dtype, compute dtype)
    "bf16": (jnp.bfloat16, jnp.bfloat16),  # pure bf16, as the papers
    "mixed": (jnp.float32, jnp.bfloat16),  # fp32 master weights, bf16 compute
    "fp32": (jnp.float32, jnp.float32),
}


def parse_count(text: str) -> int:
  """'20M' -> 20_000_000; accepts K / M / B suffixes; a count is a whole number >= 1
  (decimal arithmetic: '1.3B' is 1_300_000_000 exactly, '1000.5' is no count)."""
  scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(text[-1:].upper(), 1)
  try:
    value = decimal.Decimal(text[:-1] if scale > 1 else text) * scale
    count = int(value) if value.is_finite() and value == int(value) else 0
  except (decimal.InvalidOperation, ValueError):
    count = 0
  if count < 1:
    raise argparse.ArgumentTypeError(
        f"not a count: {text!r} (a whole number at least 1, e.g. 1000, 20M, 1.3B)")
  return count


def parse_path(text: str) -> pathlib.Path:
  """A path that is not empty ('' would be the working directory; '.' says it)."""
  if not text.strip():
    raise argparse.ArgumentTypeError("an empty path (give '.' for the working directory)")
  return pathlib.Path(text)


def parse_address(text: str) -> str:
  """'host:port' (a port 1..65535; an IPv6 host in brackets, '[::1]:1234'), as
  ``jax.distributed.initialize`` takes it: it met other text with an IndexError, or hung."""
  host, colon, port = text.strip().rpartition(":")
  if not (colon and host.strip("[]") and port.isdigit() and 1 <= int(port) <= 65535):
    raise argparse.ArgumentTypeError(
        f"expected host:port (e.g. host0:1234, a port 1..65535), got {text!r}")
  return text.strip()


def parse_mesh(text: str) -> dict[str, int]:
  """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4}; axes among data, fsdp, tensor."""
  sizes = {}
  for item in text.split(","):
    name, eq, size = item.strip().partition("=")
    if not eq or name not in model_lib.MESH_AXES or name in sizes:
      raise argparse.ArgumentTypeError(
          f"bad mesh {text!r}: give axis=size pairs, each axis once, among"
          f" {', '.join(model_lib.MESH_AXES)} (e.g. data=2,fsdp=4)")
    try:
      sizes[name] = int(size)
    except ValueError:
      raise argparse.ArgumentTypeError(f"bad mesh {text!r}: size {size!r} is not an int") from None
    if sizes[name] < 1:
      raise argparse.ArgumentTypeError(f"bad mesh {text!r}: sizes must be >= 1")
  return sizes


def parse_unroll(text: str) -> int | bool:
  """``--unroll``: decoder layers per iteration of the layer loop (an int >= 1), or ``all``
  (the loop fully unrolled: ``True``)."""
  if text == "all":
    return True
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected an int >= 1 or 'all', got {text!r}")
  return value


INT32_MAX = 2**31 - 1  # steps, gaps and seeds meet int32 counters and keys


def _int_at_least(low: int):
  """An argparse type: an int >= ``low`` and at most ``INT32_MAX``."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
    if value < low:
      raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    if value > INT32_MAX:
      raise argparse.ArgumentTypeError(f"must be <= {INT32_MAX} (int32), got {value}")
    return value
  parse.__name__ = f"int >= {low}"
  return parse


POSITIVE, NONNEGATIVE = _int_at_least(1), _int_at_least(0)


def _float_in(low: float, high: float = math.inf, *, low_open=False, high_open=False):
  """An argparse type: a finite float in the interval from ``low`` to ``high`` (``nan`` and
  ``inf`` would reach the optimizer and turn every weight into NaN)."""
  interval = (f"{'>' if low_open else '>='} {low:g}" if high == math.inf else
              f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")

  def parse(text: str) -> float:
    try:
      value = float(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    inside = ((value > low if low_open else value >= low)
              and (value < high if high_open else value <= high))
    if not (math.isfinite(value) and inside):
      raise argparse.ArgumentTypeError(f"must be a finite number {interval}, got {text}")
    return value
  parse.__name__ = f"float {interval}"
  return parse


POSITIVE_FLOAT, NONNEGATIVE_FLOAT = _float_in(0, low_open=True), _float_in(0)
FRACTION = _float_in(0, 1)


class OneLineParser(argparse.ArgumentParser):
  """Usage errors as one line on stderr, exit code 2 (argparse prints the whole usage)."""

  def error(self, message: str):
    """Exits with code 2 and the message in one line."""
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def rank_help() -> str:
  """--rank's help: the default rule, and per projecting optimizer (those with equal
  defaults together) the configs where it is below the papers' rank or 128."""
  below = {}
  for name in RANKED:
    ranks = {c: default_rank(cfg, name) for c, cfg in model_lib.CONFIGS.items()}
    capped = ", ".join(f"{c} {r}" for c, r in ranks.items()
                       if r < rank_cap(model_lib.CONFIGS[c], name))
    below.setdefault(capped, []).append(name)
  listed = "; ".join(f"{' / '.join(names)} {ranks}" for ranks, names in below.items())
  return ("GaLore / LDAdam / Fira / APOLLO rank (default: the papers' at their sizes, GaLore's"
          " 60m 128, 130m / 350m 256, 1b 512, 7b 1024 and APOLLO's d / 4, 256 at 7b; 128"
          " elsewhere; or the largest multiple of 8 below it at which every projected matrix"
          " keeps less optimizer state than the same optimizer would unprojected:"
          f" {listed}; apollo_mini is rank 1); with another --method than full the rank of"
          " its factors (default: the papers' 60m 128, 130m / 350m 256, 1b 512, 7b 1024; else"
          " hidden / 4, at most 128), and --proj-rank the projecting optimizer's")


def build_parser() -> argparse.ArgumentParser:
  """train.py's parser: the flags of every group, in --help's order; the module docstring
  gives the description and the examples (epilog)."""
  p = OneLineParser(
      prog="train.py",
      description=__doc__.split("\n\n")[0],
      epilog=__doc__.split("\n\n", 2)[2],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_flags(p)
  add_optimizer_flags(p)
  add_data_flags(p)
  add_run_flags(p)
  add_sharding_flags(p.add_argument_group("sharding and multi-host"))
  return p


def add_model_flags(p: argparse.ArgumentParser):
  """The model and its training method: --model, --optimizer, --rank, --method and the
  low-rank methods' flags."""
  a = p.add_argument
  a("--model", default="60m", choices=sorted(model_lib.CONFIGS),
    help="model size (reference configs)")
  a("--optimizer", default="galore_adamw",
    help=f"one of {', '.join(OPTIMIZERS)}, or a comma list to compare them on the same data")
  a("--rank", type=POSITIVE, default=None, help=rank_help())
  a("--method", default="full", choices=model_lib.METHODS,
    help="how the decoder layers' attention and MLP linear maps are trained: full (dense),"
         " lora (frozen random base + rank --rank adapter), relora (lora merged every"
         " --relora-every steps), lowrank (W = BA), sltrain (W = (alpha/r) BA + sparse S);"
         " embeddings, norms and lm_head stay dense. The projecting optimizers (GaLore,"
         " LDAdam, Fira, APOLLO) then project the factors, at --proj-rank")
  a("--proj-rank", type=POSITIVE, default=None,
    help="with a low-rank --method, the rank at which a projecting optimizer projects its"
         " factors (default: as --rank's rule, over the factors: the largest multiple of 8 up"
         " to 128 at which every factor keeps less state than it would unprojected, e.g. 112 for"
         " galore_adamw on 60m's 128-wide factors; 1 if none); APOLLO-Mini is rank 1")
  a("--delta", type=_float_in(0, 1, low_open=True), default=None,
    help="sltrain: density of the sparse part S (default: SLTrain's scripts', 0.03; 0.05 at"
         " 7b)")
  a("--lora-alpha", type=POSITIVE_FLOAT, default=None,
    help="lora / relora / sltrain scale alpha (the update is alpha / rank x BA; default: 32"
         " for lora / relora, SLTrain's scripts' for sltrain: 32 at 60m, 16 at 130m / 350m, 8"
         " at 1b / 7b, 32 at other sizes)")
  a("--lora-dropout", type=_float_in(0, 1, high_open=True), default=0.05,
    help="lora / relora dropout on the adapter's input (off in evaluation)")
  a("--relora-every", type=_int_at_least(2), default=None,
    help="relora: merge the adapters into the base and restart them (state reset, a"
         " learning-rate warm-up of a tenth of this, at least 1 and at most 100 steps, from 0)"
         " every this many steps, at least 2 (default: a quarter of the steps, at least 2). A"
         " projecting optimizer's reset keeps its bases (and LDAdam its error buffer) until"
         " its next refresh: a multiple of"
         " --update-proj-gap refreshes them at each restart")


def add_optimizer_flags(p: argparse.ArgumentParser):
  """The optimizer's flags: the projection (GaLore / LDAdam / APOLLO), the learning-rate
  schedule, weight decay and clipping."""
  a = p.add_argument
  a("--rho", type=_float_in(0, 1, high_open=True), default=0.908,
    help="LDAdam rho in [0, 1): weight of the momentum in the matrix the subspace tracks")
  a("--update-proj-gap", type=POSITIVE, default=200, help="GaLore refresh gap T")
  a("--galore-scale", type=POSITIVE_FLOAT, default=None,
    help="scale alpha (> 0) of the projecting optimizers (default: 0.25 for GaLore and Fira,"
         " 1 for apollo_adamw, sqrt(128) for apollo_mini: their papers')")
  a("--proj-type", default=None, choices=(*gj.PROJ_TYPES, "ldadam_std"),
    help="projection side rule (galore_jax's PROJ_TYPES; default std; ldadamw: default"
         " ldadam_std, the LDAdam reference's rule, square kernels projected on the left,"
         " and std is galore_jax's own, square on the right; ldadam_std is for ldadamw only,"
         " full is not for ldadamw, fira_adamw, apollo_adamw, apollo_mini)")
  a("--basis-method", default=None, choices=sorted(gj.subspace.METHODS),
    help="how GaLore computes bases at a refresh (default svd: exact, as the paper; for"
         " apollo_adamw / apollo_mini random, the APOLLO paper's Gaussian projection)")
  a("--refresh", default="every", choices=sorted(REFRESH_POLICIES),
    help="GaLore refresh policy: every (paper), staggered (spread over the gap), lazy (Q-GaLore)")
  a("--host-refresh", default="auto", choices=["auto", "on", "off"],
    help="decide GaLore's refresh (--refresh every; APOLLO's with --basis-method svd) and"
         " LDAdam's step-0 SVD on the host: the step holds no lax.cond, which a GPU runs as a"
         " host sync each step, at the cost of compiling a normal and a refresh step; auto: on"
         " a GPU")
  a("--lr", type=POSITIVE_FLOAT, default=None,
    help="peak learning rate (default: adamw 1e-3, galore_adamw 1e-2, ldadamw 1e-3,"
         " fira_adamw / apollo_adamw / apollo_mini 1e-2; --method sltrain 3e-3, SLTrain's)")
  a("--warmup", type=NONNEGATIVE, default=None, help="warmup steps (default: 10%% of the steps)")
  a("--min-lr-ratio", type=FRACTION, default=0.1, help="cosine floor as a fraction of the peak")
  a("--weight-decay", type=NONNEGATIVE_FLOAT, default=0.0)
  a("--grad-clip", type=NONNEGATIVE_FLOAT, default=0.0, help="global-norm clipping (0: off)")


def add_data_flags(p: argparse.ArgumentParser):
  """Batch, length, evaluation and checkpoint periods, and the data and tokenizer."""
  a = p.add_argument
  a("--batch-size", type=POSITIVE, default=64, help="sequences per optimizer step")
  a("--grad-accum", type=POSITIVE, default=1,
    help="micro-batches per step (batch-size must divide)")
  a("--seq-len", type=int, default=256)
  a("--steps", type=POSITIVE, default=1000, help="optimizer steps")
  a("--tokens", type=parse_count, default=None, help="train tokens (overrides --steps; 1.3B ok)")
  a("--log-every", type=POSITIVE, default=10)
  a("--eval-every", type=NONNEGATIVE, default=1000, help="0: only at the end")
  a("--eval-tokens", type=parse_count, default=10_000_000,
    help="validation token budget (at least one batch: batch-size / grad-accum x (seq-len - 1))")
  a("--save-every", type=NONNEGATIVE, default=1000, help="checkpoint period in steps (0: off)")
  a("--data", default="default", help=data_lib.SOURCE_HELP)
  a("--max-docs", type=POSITIVE, default=None, help="cap documents per split (quick runs)")
  a("--tokenizer", default="auto", help=data_lib.TOKENIZER_HELP)
  a("--vocab-size", type=POSITIVE, default=None,
    help="BPE vocab size, --tokenizer bpe or auto (default: the model's)")
  a("--pack", action="store_true", help="pack documents instead of truncate/pad")


def add_run_flags(p: argparse.ArgumentParser):
  """Output, resume, seed, precision, the compiled step's shape and the command's modes."""
  a = p.add_argument
  a("--out", type=parse_path, default=pathlib.Path("runs/llama"), help="output directory")
  a("--resume", action="store_true",
    help="continue from the newest good checkpoint in --out (a damaged one is set aside)")
  a("--overwrite", action="store_true",
    help="clear an earlier run's files from --out (checkpoints, metrics, config, summary, curves)"
         " and start afresh; without it (or --resume) an --out holding a run is refused")
  a("--seed", type=NONNEGATIVE, default=0)
  a("--dtype", default="bf16", choices=sorted(DTYPES), help="bf16: pure bf16; mixed: fp32 master")
  a("--remat", action="store_true",
    help="rematerialise layers in the backward pass (--per-layer's backward pass always does)")
  a("--unroll", type=parse_unroll, default=1,
    help="decoder layers per iteration of the loop over layers, or 'all': an unrolled loop"
         " compiles slower and runs faster on a GPU; parameters, optimizer state and"
         " checkpoints are the same either way (--per-layer: its forward pass only)")
  a("--per-layer", action="store_true",
    help="per-layer updates: each layer's optimizer step runs inside the backward pass, so"
         " the whole gradient never exists at once (the GaLore paper's 7B-on-24GB trick; one"
         " device or a --mesh, --grad-accum 1; --grad-clip costs a second backward pass)")
  a("--attention", default="auto", choices=["auto", "xla", "cudnn"],
    help="attention kernel: auto = cuDNN's flash kernel on a GPU for bf16 (head dim <= 128),"
         " else XLA")
  a("--peak-tflops", type=POSITIVE_FLOAT, default=None,
    help="a device's dense bf16 peak in TFLOP/s for MFU (default: the data sheet's for known"
         " GPUs / TPUs, examples/llama/flops.py; unknown devices such as a CPU print n/a)")
  a("--dry-run", action="store_true",
    help="build abstractly, print sizes and XLA's memory plan of the train step, write"
         " dry_run.json (beside any run in --out, which it leaves alone), exit; with --mesh the"
         " plan is per device of the sharded step where the mesh's devices exist (on a CPU"
         " host: --cpu-devices N), else one device's, unsharded")
  a("--debug", action="store_true", help="show the traceback of an error, not only its line")


def add_sharding_flags(g):
  """The flags of a sharded or multi-host run."""
  g.add_argument("--mesh", type=parse_mesh, default=None,
                 help="device mesh, e.g. data=2,fsdp=4 (axes data, fsdp, tensor; the sizes"
                 " multiply to the device count); params follow model.LOGICAL_RULES, the batch"
                 " is split over data x fsdp. Default: one device, no sharding")
  g.add_argument("--mesh-axis-types", default="auto", choices=["auto", "explicit"],
                 help="jax.sharding.AxisType of the --mesh axes")
  g.add_argument("--coordinator", type=parse_address, default=None,
                 help="host:port of process 0: calls jax.distributed.initialize (multi-host)")
  g.add_argument("--num-processes", type=POSITIVE, default=None, help="with --coordinator")
  g.add_argument("--process-id", type=NONNEGATIVE, default=None, help="with --coordinator")
  g.add_argument("--cpu-devices", type=POSITIVE, default=None,
                 help="number of CPU devices per process (jax_num_cpu_devices; for testing)")


def check_args(args: argparse.Namespace) -> list[str]:
  """The optimizer names of ``--optimizer``, after the checks argparse cannot make alone."""
  for flag in ("data", "tokenizer"):  # "" would read the working directory
    if not getattr(args, flag).strip():
      raise SystemExit(f"--{flag}: an empty value; give a path or a name")
  names = [n.strip() for n in args.optimizer.split(",")]
  if "" in names and len(names) > 1:
    raise SystemExit(f"--optimizer {args.optimizer!r}: an empty name in the list")
  names = [n for n in names if n]
  for name in names:
    if name not in OPTIMIZERS:
      raise SystemExit(f"--optimizer: unknown {name!r}; choose from {', '.join(OPTIMIZERS)}")
  if not names:
    raise SystemExit("--optimizer: give at least one optimizer")
  if len(set(names)) < len(names):
    raise SystemExit(f"--optimizer {args.optimizer}: an optimizer appears twice (each name runs"
                     " once, into its own directory)")
  if args.batch_size % args.grad_accum:
    raise SystemExit(f"--batch-size {args.batch_size} is not divisible by --grad-accum"
                     f" {args.grad_accum}")
  cfg = model_lib.CONFIGS[args.model]
  if args.seq_len > cfg.max_seq_len:
    raise SystemExit(f"--seq-len {args.seq_len} exceeds --model {args.model}'s max_seq_len"
                     f" {cfg.max_seq_len}")
  if args.seq_len < 2:
    raise SystemExit("--seq-len must be at least 2")
  if num_steps(args) > INT32_MAX:
    raise SystemExit(f"--tokens {args.tokens}: {num_steps(args)} steps of --batch-size x"
                     f" --seq-len tokens; at most {INT32_MAX} (int32)")
  one_batch = args.batch_size // args.grad_accum * (args.seq_len - 1)
  if args.eval_tokens < one_batch:
    raise SystemExit(f"--eval-tokens {args.eval_tokens} is less than one validation batch"
                     f" ({args.batch_size // args.grad_accum} x {args.seq_len - 1} = {one_batch}"
                     " target tokens): give at least that")
  if args.per_layer and args.refresh == "lazy":
    raise SystemExit("--per-layer with --refresh lazy: the whole-model step keeps one lazy gap"
                     " per stacked kernel (its layers' similarities averaged), the per-layer"
                     " step one per layer, so the two would train differently: choose one")
  if args.per_layer and args.grad_accum > 1:
    raise SystemExit("--per-layer needs --grad-accum 1: the step would have to keep every"
                     " micro-batch's gradient, the memory per-layer updates save")
  check_method(args)
  check_applicable(args)
  if args.resume and args.overwrite:
    raise SystemExit("--resume continues the run in --out and --overwrite clears it: give one")
  return names


# Flags that only some methods use, with their defaults: given (other than the default) with
# another, they would do nothing.  (The optimizers' settings are shared by a comparison's
# list and read by those they concern, as benchmarks/convergence.py relies on: one that no
# optimizer of the run reads only warns, optimizers.unread_flags.)
METHOD_FLAGS = {"delta": (("sltrain",), None), "lora_alpha": (("lora", "relora", "sltrain"), None),
                "lora_dropout": (("lora", "relora"), 0.05), "relora_every": (("relora",), None)}


def check_applicable(args):
  """A flag that this run would silently ignore is refused: a method's flag given with
  another ``--method``, ``--vocab-size`` with a tokenizer of fixed vocabulary (bytes at its
  own 260 aside; ``auto`` where it finds t5-base), ``--mesh-axis-types explicit`` or
  ``--cpu-devices`` without a ``--mesh``."""
  for flag, (methods, default) in METHOD_FLAGS.items():
    if getattr(args, flag) != default and args.method not in methods:
      raise SystemExit(f"--{flag.replace('_', '-')} applies to --method {' | '.join(methods)};"
                       f" this run's is {args.method}")
  auto = args.tokenizer == "auto"
  spec = data_lib.auto_spec() if auto else args.tokenizer
  fixed = data_lib.load_tokenizer("bytes").vocab_size if spec == "bytes" else None
  if args.vocab_size not in (None, fixed) and spec != "bpe":
    named = "auto, here t5-base (in the local Hugging Face cache)," if auto else args.tokenizer
    raise SystemExit(f"--vocab-size sizes a BPE trained on the data (--tokenizer bpe, or"
                     f" auto without t5-base); --tokenizer {named} has a fixed"
                     f" vocabulary{f' of {fixed}' if fixed else ''}: leave --vocab-size out")
  vocab = model_lib.CONFIGS[args.model].V
  least = data_lib.MIN_BPE_VOCAB
  if args.vocab_size is not None and not least <= args.vocab_size <= vocab:
    raise SystemExit(f"--vocab-size: expected {least} (256 bytes + 3 specials) to {vocab}"
                     f" (--model {args.model}'s vocabulary), got {args.vocab_size}")
  if args.mesh is None and args.mesh_axis_types != "auto":
    raise SystemExit(f"--mesh-axis-types {args.mesh_axis_types} types a --mesh's axes; this"
                     " run has no mesh (one device): give --mesh or leave it out")
  if args.mesh is None and args.cpu_devices is not None:
    raise SystemExit("--cpu-devices makes CPU devices for a --mesh; this run has no mesh (one"
                     " device): give --mesh or leave it out")


def check_backend(args, backend: str):
  """What the devices (``backend``: ``jax.default_backend()``, asked only once they are set
  up, as multi-host runs need) cannot run: cuDNN attention off a GPU, outside a dry run
  (which plans it with XLA's)."""
  if args.attention == "cudnn" and not args.dry_run and backend != "gpu":
    raise SystemExit(f"--attention cudnn needs a GPU with cuDNN; this machine's backend is"
                     f" {backend}: use --attention auto or xla")


def check_method(args):
  """What ``--method`` cannot run with, each refused in one line."""
  if args.method == "full":
    if args.proj_rank is not None:
      raise SystemExit("--proj-rank is a projecting optimizer's rank under a low-rank --method;"
                       " with --method full, --rank is: give that")
    return
  factors = method_rank_for(args)
  if args.proj_rank is not None and args.proj_rank >= factors:
    raise SystemExit(f"--proj-rank {args.proj_rank} must be below the factors' rank {factors}"
                     " (--rank): at or above it a projection saves no optimizer state")
  if args.per_layer and args.method in ("lora", "relora"):
    raise SystemExit(f"--per-layer does not run --method {args.method} (its dropout streams"
                     " and ReLoRA's state reset need the whole-model step): leave it out")


def num_steps(args) -> int:
  """Optimizer steps: ``--steps``, or enough for ``--tokens``."""
  if args.tokens is not None:
    return max(1, -(-args.tokens // (args.batch_size * args.seq_len)))  # (ints: 1e400 too)
  return args.steps


# Errors in the command as given (a path, the data, a value no flag check could see):
# exit code 2, as argparse's. Other OSErrors (disk full) are failures while running: 1.
COMMAND_ERRORS = (ValueError, ImportError, FileNotFoundError, NotADirectoryError,
                  IsADirectoryError, PermissionError)


def run_command(main, argv: list[str] | None = None):
  """The command line around ``main(argv)``: an error is one line on stderr, not a
  traceback (``--debug`` prints that too), with exit code 2 for errors in the command, 1
  for a failure while running, 130 for Ctrl-C; ``main``'s own exit codes pass through."""
  argv = sys.argv[1:] if argv is None else argv
  if "--debug" not in argv:
    quiet_background_errors()
    warnings.showwarning = one_line_warning
  try:
    main(argv)
  except SystemExit as e:
    if not isinstance(e.code, str):
      raise
    fail("--debug" in argv, e.code, 2)
  except KeyboardInterrupt:
    fail("--debug" in argv, "interrupted", 130)
  except COMMAND_ERRORS as e:
    fail("--debug" in argv, f"{first_line(e)} (--debug shows the traceback)", 2)
  except OSError as e:
    fail("--debug" in argv, f"{first_line(e)} (--debug shows the traceback)", 1)


def one_line_warning(message, category, filename, lineno, file=None, line=None):
  """A warning as ``warning: <message>`` on stderr (Python's default adds the file, line and
  source of its origin, deep in a library; ``--debug`` keeps that)."""
  del category, filename, lineno, line
  print(f"warning: {message}", file=sys.stderr if file is None else file)


def first_line(e: BaseException) -> str:
  """The first line of ``e``'s message, or its type's name if it has none."""
  lines = str(e).strip().splitlines()
  return lines[0] if lines else type(e).__name__


def fail(debug: bool, message: str, code: int):
  """Prints ``message`` as train.py's error (the traceback too with ``debug``) and exits with
  ``code``."""
  if debug:
    traceback.print_exc()
  print(f"train.py: error: {message}", file=sys.stderr)
  raise SystemExit(code)


class OrbaxNoiseFilter(logging.Filter):
  """Orbax's error logs (a failed save logs four tracebacks from its threads, and asyncio
  its unretrieved tasks): the error also reaches the run, which reports it in one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    """False for Orbax's error records and asyncio's unretrieved-task ones."""
    orbax = record.levelno >= logging.ERROR and "orbax" in record.pathname
    return not (orbax or "exception was never retrieved" in record.getMessage())


def from_orbax(unraisable) -> bool:
  """Whether an exception Python could not raise comes from Orbax: the reads of a damaged
  checkpoint it never awaited, TensorStore's callbacks into the event loop it closed after
  a failed save."""
  if (isinstance(unraisable.exc_value, RuntimeError)
      and str(unraisable.exc_value) == "Event loop is closed"):
    return True
  tb = unraisable.exc_traceback
  while tb is not None:
    if "orbax" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


def quiet_background_errors():
  """Keeps the noise of a failed Orbax save or restore (hundreds of lines from its threads
  and coroutines, before and after the error that the run reports in one line) off stderr;
  ``--debug`` keeps it."""
  for name in ("absl", "asyncio"):
    logging.getLogger(name).addFilter(OrbaxNoiseFilter())
  # A save or restore that failed leaves Orbax's serialization coroutines unawaited; Python
  # says so at exit ("coroutine 'async_serialize_from_host.<locals>.write_fragment' was
  # never awaited", "coroutine '_read_array_index_and_device_put' ...").
  warnings.filterwarnings(
      "ignore", message=r"coroutine '(async_(de)?serializ|_read_array_index_and_device_put)",
      category=RuntimeWarning)
  default = sys.unraisablehook

  def hook(unraisable):
    if not from_orbax(unraisable):
      default(unraisable)
  sys.unraisablehook = hook

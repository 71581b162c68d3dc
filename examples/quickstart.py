"""GaLore vs AdamW on a small byte-level language model, on any laptop CPU.

The corpus is the Python standard library's source, which ships with every
interpreter: a real text corpus with no download.  The model is a small Flax NNX
MLP language model (embed a window of bytes, two hidden layers, predict the next
byte).  Both optimizers see the same batches; the script prints validation loss,
optimizer-state bytes and speed side by side.

Run:  python examples/quickstart.py [--steps 400]
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import galore_jax as gj


@dataclasses.dataclass
class Config:
  T: int = 32  # context bytes
  D: int = 64  # byte embedding
  H: int = 512  # hidden width
  V: int = 256  # bytes
  B: int = 64  # batch
  rank: int = 128
  steps: int = 400
  seed: int = 0


def load_corpus(max_bytes: int = 4_000_000) -> np.ndarray:
  """Bytes of the interpreter's own standard library, in a fixed file order."""
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  chunks, total = [], 0
  for path in sorted(stdlib.glob("*.py")):
    data = path.read_bytes()
    chunks.append(data)
    total += len(data)
    if total >= max_bytes:
      break
  if not chunks:
    raise FileNotFoundError(f"no .py files under {stdlib}")
  return np.frombuffer(b"\n".join(chunks), dtype=np.uint8)


class MlpLM(nnx.Module):
  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.embed = nnx.Embed(cfg.V, cfg.D, rngs=rngs)
    self.hidden1 = nnx.Linear(cfg.T * cfg.D, cfg.H, rngs=rngs)
    self.hidden2 = nnx.Linear(cfg.H, cfg.H, rngs=rngs)
    self.lm_head = nnx.Linear(cfg.H, cfg.V, rngs=rngs)

  def __call__(self, x_BxT):
    h_BxTxD = self.embed(x_BxT)
    h_BxH = jax.nn.gelu(self.hidden1(h_BxTxD.reshape(x_BxT.shape[0], -1)))
    h_BxH = jax.nn.gelu(self.hidden2(h_BxH))
    return self.lm_head(h_BxH)


def batches(data: np.ndarray, cfg: Config, seed: int):
  """Endless random batches of ``data``: (B x T windows, the byte after each)."""
  rng = np.random.default_rng(seed)
  while True:
    starts = rng.integers(0, len(data) - cfg.T - 1, cfg.B)
    window = np.stack([data[s : s + cfg.T + 1] for s in starts]).astype(np.int32)
    yield window[:, :-1], window[:, -1]


def loss_fn(model, x_BxT, y_B):
  """Mean cross-entropy of the next byte."""
  logits_BxV = model(x_BxT)
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxV, y_B).mean()


def train(name, tx, cfg: Config, train_data, val_batch):
  """Trains a fresh model with ``tx`` for ``cfg.steps`` steps; returns its validation loss,
  optimizer-state bytes and steps/s."""
  model = MlpLM(cfg, nnx.Rngs(cfg.seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss

  eval_loss = nnx.jit(loss_fn)
  stream = batches(train_data, cfg, cfg.seed)
  step(model, optimizer, *next(stream))  # compile outside the timed loop
  start = time.perf_counter()
  for i in range(1, cfg.steps):
    loss = step(model, optimizer, *next(stream))
    if i % 100 == 0 or i == cfg.steps - 1:
      print(f"  {name:13s} step {i:4d}  train loss {float(loss):.3f}")
  seconds = time.perf_counter() - start
  return {
      "val_loss": float(eval_loss(model, *val_batch)),
      "state_bytes": gj.tree_bytes(nnx.state(optimizer, nnx.OptState)),
      "steps_per_s": (cfg.steps - 1) / seconds,
  }


def int_at_least(low: int):
  """An argparse type: an int >= ``low``, else argparse's one-line error."""
  def parse(value: str) -> int:
    try:
      n = int(value)
    except ValueError:
      n = None
    if n is None or n < low:
      raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {value!r}")
    return n
  return parse


def main():
  """Trains AdamW and GaLore on the stdlib corpus and prints their loss, state and speed."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  # the first step compiles, untimed: at least one more is needed for steps/s
  parser.add_argument("--steps", type=int_at_least(2), default=Config.steps)
  parser.add_argument("--rank", type=int_at_least(1), default=Config.rank)
  args = parser.parse_args()
  cfg = Config(steps=args.steps, rank=args.rank)

  data = load_corpus()
  split = int(0.95 * len(data))
  val_x, val_y = next(batches(data[split:], dataclasses.replace(cfg, B=1024), 1))
  print(f"corpus: {len(data):,} bytes of Python stdlib source; jax on {jax.devices()[0].platform}")

  runs = {
      "adamw": optax.adamw(1e-3),
      "galore_adamw": gj.galore_adamw(
          1e-2, rank=cfg.rank, update_proj_gap=100, scale=0.25, mask=gj.linear_kernels
      ),
  }
  results = {name: train(name, tx, cfg, data[:split], (val_x, val_y)) for name, tx in runs.items()}

  print(f"\n{'optimizer':13s} {'val loss':>9s} {'opt state':>12s} {'steps/s':>8s}")
  for name, r in results.items():
    mib = r["state_bytes"] / 2**20
    print(f"{name:13s} {r['val_loss']:9.3f} {mib:9.2f} MiB {r['steps_per_s']:8.1f}")
  ratio = results["galore_adamw"]["state_bytes"] / results["adamw"]["state_bytes"]
  print(f"\nGaLore keeps {ratio:.0%} of AdamW's optimizer state (rank {cfg.rank}).")


if __name__ == "__main__":
  main()

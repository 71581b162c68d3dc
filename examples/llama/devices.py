"""Devices for the LLaMA example: the distributed runtime, the mesh, batches on devices.

``setup_devices`` runs before anything touches the devices (``--cpu-devices``,
``--coordinator``, ``--mesh``); ``check_same_everywhere`` checks that every process read
the same data; ``mesh_context`` sets the mesh and the model's logical axis rules;
``to_device`` places a host batch, split over the data and fsdp axes
(``batch_sharding``); ``explicit_mesh`` says whether the mesh's axes are Explicit (the model
then runs with its shardings typed: model.py says where they need a decision); and
``peak_memory_bytes`` / ``step_memory_bytes`` / ``memory_plan`` read the device's memory
figures.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from examples.llama import model as model_lib


def setup_devices(args, parser: argparse.ArgumentParser) -> jax.sharding.Mesh | None:
  """Device count, distributed runtime and mesh, before anything else touches devices.  A
  dry run's mesh may name more devices than there are: it is then an ``AbstractMesh``."""
  try:
    if args.cpu_devices is not None:
      jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.coordinator is not None:
      if args.num_processes is None or args.process_id is None:
        parser.error("--coordinator needs --num-processes and --process-id")
      # CPU devices talk through gloo across processes (no effect on GPU / TPU).
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      jax.distributed.initialize(coordinator_address=args.coordinator,
                                 num_processes=args.num_processes, process_id=args.process_id)
    elif args.num_processes is not None or args.process_id is not None:
      parser.error("--num-processes / --process-id need --coordinator")
  except RuntimeError as e:  # the backend was initialised already (e.g. in-process calls)
    parser.error(f"--cpu-devices / --coordinator must come before JAX starts: {e}")
  if args.mesh is None:
    return None
  shape = tuple(args.mesh.get(name, 1) for name in model_lib.MESH_AXES)
  kind = {"auto": jax.sharding.AxisType.Auto, "explicit": jax.sharding.AxisType.Explicit}
  axis_types = (kind[args.mesh_axis_types],) * len(shape)
  split = shape[0] * shape[1]  # (a dry run refuses what the run it plans would)
  if (args.batch_size // args.grad_accum) % split:
    parser.error(f"--batch-size / --grad-accum = {args.batch_size // args.grad_accum} is not"
                 f" divisible by the data x fsdp mesh size {split}")
  if args.dry_run and math.prod(shape) != jax.device_count():
    # A dry run plans the shardings only: a mesh of devices this host does not have.
    return jax.sharding.AbstractMesh(shape, model_lib.MESH_AXES, axis_types=axis_types)
  if math.prod(shape) != jax.device_count():
    parser.error(f"--mesh {','.join(f'{k}={v}' for k, v in args.mesh.items())} has"
                 f" {math.prod(shape)} devices, but jax.device_count() is {jax.device_count()}")
  return jax.make_mesh(shape, model_lib.MESH_AXES, axis_types=axis_types)


def mesh_context(mesh):
  """The mesh and the model's logical rules, set for everything under it (an
  ``AbstractMesh``, a dry run's plan without the devices, as the abstract mesh)."""
  if mesh is None:
    return contextlib.nullcontext()
  stack = contextlib.ExitStack()
  if isinstance(mesh, jax.sharding.AbstractMesh):
    stack.enter_context(jax.sharding.use_abstract_mesh(mesh))
  else:
    stack.enter_context(jax.set_mesh(mesh))
  stack.enter_context(nnx.logical_axis_rules(model_lib.LOGICAL_RULES))
  return stack


def is_main_process() -> bool:
  """Whether this is JAX process 0."""
  return jax.process_index() == 0


def check_same_everywhere(values: dict[str, str]) -> None:
  """Every process holds the same ``values`` (what -> a string, such as a digest of the data
  it read): else a one-line ``ValueError``, on every process alike, naming the first that
  differs and the processes whose value is not process 0's.  One process: nothing to do.

  Each process reads the whole batch and puts its own shard of it on its devices, so
  processes that read other files (a path whose contents differ by host) or encode them
  otherwise (another tokenizer found) would train on a mix of batches without an error.
  """
  if jax.process_count() == 1:
    return
  mine = np.array([zlib.crc32(v.encode("utf-8")) for v in values.values()], np.uint32)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, len(values))
  for what, column in zip(values, every.T):
    if (differ := np.flatnonzero(column != column[0])).size:
      raise ValueError(f"{what} differs between processes: process(es) "
                       f"{', '.join(map(str, differ))} read other than process 0 (every process"
                       " must read the same batches)")


def to_device(tokens: np.ndarray, mesh, batch_axis: int) -> jax.Array:
  """A host batch (the same on every process) as a device array; with a mesh, split
  along ``batch_axis`` over the data and fsdp axes (each process places its share)."""
  if mesh is None:
    return jnp.asarray(tokens)
  sharding = batch_sharding(mesh, tokens.ndim, batch_axis)
  return jax.make_array_from_callback(tokens.shape, sharding, lambda index: tokens[index])


def batch_sharding(mesh, ndim: int, batch_axis: int) -> NamedSharding:
  """How ``to_device`` lays out a batch of ``ndim`` axes on ``mesh``: ``batch_axis`` split
  over the data and fsdp axes, the others whole."""
  spec = [None] * ndim
  spec[batch_axis] = ("data", "fsdp")
  return NamedSharding(mesh, P(*spec))


def explicit_mesh():
  """The mesh set with ``jax.set_mesh`` when its axes are Explicit, else ``None``."""
  return jax.sharding.get_abstract_mesh() if model_lib.explicit_axes() else None


def peak_memory_bytes() -> int | None:
  """The allocator's peak on the first local device since the process started (None where the
  backend keeps no statistics). It cannot be reset: with several optimizers in one process a
  later one reports at least the earlier ones' peak; see :func:`step_memory_bytes`."""
  stats = jax.local_devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def step_memory_bytes(step, *args, **kwargs) -> int | None:
  """XLA's memory plan for one call of the jitted ``step`` on these arguments: arguments +
  outputs that do not reuse an argument's buffer + temporaries, per device.

  It belongs to this optimizer's step alone (unlike the process-wide allocator peak), and is
  what decides whether a step fits. Called after the step has run, lowering and compiling hit
  jit's caches. None where the backend gives no memory analysis.
  """
  plan = memory_plan(step.lower(*args, **kwargs).compile())
  return None if plan is None else plan["total"]


def memory_plan(compiled) -> dict[str, int] | None:
  """XLA's memory plan of a compiled step, per device, in bytes: ``arguments``, ``outputs``,
  ``aliased`` (outputs written into an argument's buffer), ``temporaries`` and their
  ``total`` (arguments + outputs - aliased + temporaries); None where the backend gives no
  memory analysis."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  plan = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
          "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes}
  plan["total"] = plan["arguments"] + plan["outputs"] - plan["aliased"] + plan["temporaries"]
  return {k: int(v) for k, v in plan.items()}

"""LLaMA in Flax NNX, as the GaLore / LDAdam / SLTrain papers pretrain it.

RMSNorm (eps 1e-6), rotary position embeddings, SwiGLU MLP, untied ``lm_head``,
no biases, every weight initialised N(0, 0.02).  The decoder layers are stacked:
each kernel carries a leading layer axis ``L`` and the forward pass scans over
it (optionally rematerialised), so a kernel is ``(L, in, out)`` and GaLore gives
each layer its own basis through ``DimensionNumbers(reduction_axis=1,
output_axis=2)``.  Shapes are suffixed to names: B batch, T time, D hidden,
N heads, K head dim, F intermediate, V vocab.

Every param carries logical axis names in its ``out_sharding`` metadata (the
layer axis is named ``"layers"`` by the ``nnx.vmap`` that stacks the layers);
:data:`LOGICAL_RULES` maps them onto a ``("data", "fsdp", "tensor")`` mesh.
Without a mesh nothing is sharded: the names are metadata only.  Built under
``jax.set_mesh(mesh)`` and ``nnx.logical_axis_rules(LOGICAL_RULES)`` (best inside
``nnx.jit``), the params are created sharded (see :func:`create_sharded`).  Under a
mesh with Explicit axes the forward pass runs with its shardings typed: the projections and
the lookups name their outputs' splits (:func:`logical_spec`, None under Auto axes); under
Auto axes the activations are constrained to the same layout at the layers' boundaries
(:func:`constrained`).
"""

from __future__ import annotations

import dataclasses
import math
import operator

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec as P

import galore_jax as gj
from galore_jax import nn as gnn


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Model size.  Field names follow the reference JSON configs."""

  name: str
  D: int  # hidden_size
  F: int  # intermediate_size
  N: int  # num_attention_heads
  L: int  # num_hidden_layers
  V: int = 32000  # vocab_size
  max_seq_len: int = 1024
  norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  init_std: float = 0.02

  @property
  def K(self) -> int:  # head dim
    """The head dimension, D // N."""
    return self.D // self.N

  def initializer(self):
    """The weights' initialiser: N(0, init_std^2) drawn in float32 and rounded once to the
    params' dtype, as the reference builds its model in float32 and casts it."""
    return gnn.drawn_in_float32(nnx.initializers.normal(self.init_std))

  def num_params(self) -> int:
    """Parameter count: embeddings + head + layers + final norm."""
    per_layer = 4 * self.D * self.D + 3 * self.D * self.F + 2 * self.D
    return 2 * self.V * self.D + self.L * per_layer + self.D


# The reference's configs (GaLore repo `configs/llama_*.json`; galore.md 2.3).
CONFIGS = {
    c.name: c
    for c in [
        LlamaConfig("9m", 128, 352, 4, 4),
        LlamaConfig("20m", 256, 688, 4, 4),
        LlamaConfig("35m", 384, 1024, 8, 6),
        LlamaConfig("40m", 416, 1024, 8, 8),
        LlamaConfig("60m", 512, 1376, 8, 8),
        LlamaConfig("71m", 512, 1368, 8, 12),
        LlamaConfig("100m", 640, 1708, 10, 12, V=32100),
        LlamaConfig("130m", 768, 2048, 12, 12),
        LlamaConfig("250m", 768, 2560, 16, 24),
        LlamaConfig("350m", 1024, 2736, 16, 24),
        LlamaConfig("1b", 2048, 5461, 32, 24),
        LlamaConfig("3b", 2560, 6848, 32, 32),
        LlamaConfig("7b", 4096, 11008, 32, 32, max_seq_len=2048),
        # For tests and CPU smoke runs; vocab fits the bytes tokenizer.
        LlamaConfig("tiny", 64, 176, 4, 2, V=260, max_seq_len=256),
    ]
}

# --method: how each attention and MLP linear map of the decoder layers is parameterised (the
# GaLore paper's Table 2 and SLTrain's baselines); embeddings, norms and lm_head stay dense.
METHODS = ("full", "lora", "relora", "lowrank", "sltrain")
# The rank the papers ran each size at (GaLore Table 2, SLTrain's scripts); others: D / 4.
PAPER_RANKS = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}


@dataclasses.dataclass(frozen=True)
class Method:
  """One ``--method`` and its settings: ``full`` (``nnx.Linear``), ``lora`` / ``relora``
  (``gnn.LoRALinear``: a frozen base + a rank-``rank`` adapter, ``alpha``, ``dropout``),
  ``lowrank`` (``gnn.LowRankLinear``: ``W = A B``), ``sltrain``
  (``gnn.SparsePlusLowRankLinear``: ``W = (alpha / rank) A B + S``, density ``delta``).
  ``shard_rank``: the factors split their rank axis over the mesh axes of the kernel axis it
  stands in for (``gnn``'s layers; :func:`shards_rank` says when the mesh allows it)."""

  name: str = "full"
  rank: int = 128
  alpha: float = 32.0
  dropout: float = 0.05
  delta: float = 0.03
  shard_rank: bool = True

  def linear(self, d_in: int, d_out: int, axes, init, **kw) -> nnx.Module:
    """One decoder-layer linear map ``d_in -> d_out`` (``kw``: dtype, param_dtype, rngs)."""
    if self.name == "full":
      return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=init,
                        kernel_metadata={"out_sharding": axes}, **kw)
    if self.name in ("lora", "relora"):
      return gnn.LoRALinear(d_in, d_out, rank=self.rank, alpha=self.alpha,
                            dropout=self.dropout, kernel_init=init, kernel_axes=axes,
                            shard_rank=self.shard_rank, **kw)
    if self.name == "lowrank":
      return gnn.LowRankLinear(d_in, d_out, rank=self.rank, kernel_axes=axes,
                                shard_rank=self.shard_rank, **kw)
    if self.name == "sltrain":
      return gnn.SparsePlusLowRankLinear(d_in, d_out, rank=self.rank, delta=self.delta,
                                         alpha=self.alpha, kernel_axes=axes,
                                         shard_rank=self.shard_rank, **kw)
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.name!r}.")


# SLTrain's scripts per size (ldadam-sltrain.md 2.6): its scale alpha (update alpha / r x BA)
# and the sparse part's density delta; LoRA and ReLoRA take alpha 32 (galore.md 2.5).
SLTRAIN_ALPHA = {"60m": 32, "130m": 16, "350m": 16, "1b": 8, "7b": 8}
SLTRAIN_DELTA = {"7b": 0.05}
LORA_ALPHA = 32.0


def method_alpha(cfg: LlamaConfig, method: str) -> float:
  """The default ``--lora-alpha`` of ``method`` on ``cfg``: SLTrain's scripts' per size
  (32 at 60m, 16 at 130m / 350m, 8 at 1b / 7b; 32 elsewhere), LoRA's 32."""
  return float(SLTRAIN_ALPHA.get(cfg.name, LORA_ALPHA)) if method == "sltrain" else LORA_ALPHA


def method_delta(cfg: LlamaConfig) -> float:
  """The default ``--delta`` (SLTrain's density of S) on ``cfg``: 0.03, 0.05 at 7b."""
  return SLTRAIN_DELTA.get(cfg.name, 0.03)


def method_rank(cfg: LlamaConfig) -> int:
  """The default ``--rank`` of a low-rank ``--method``: the papers' for their sizes (60m
  128 ... 1b 512), ``D / 4`` capped at 128 otherwise (tiny: 16)."""
  return PAPER_RANKS.get(cfg.name, min(128, cfg.D // 4))


# Every decoder-layer kernel is (L, in, out): the layer axis is a batch axis.
LAYER_KERNEL_DIMS = gj.DimensionNumbers(reduction_axis=1, output_axis=2)
# One layer's kernel (in, out), as per-layer updates see it.
KERNEL_DIMS = gj.DimensionNumbers(reduction_axis=0, output_axis=1)


# Logical axis name -> mesh axes, for a mesh with axes ("data", "fsdp", "tensor").
# FSDP shards the hidden dimension of every weight, tensor parallelism the heads, the
# MLP intermediate and the vocabulary; the batch is split over data and fsdp.
MESH_AXES = ("data", "fsdp", "tensor")
LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
)
# The logical names of each param (without the leading "layers" of the stacked ones).
AXES = {
    "embedding": ("vocab", "embed"),
    "q_proj": ("embed", "heads"), "k_proj": ("embed", "heads"), "v_proj": ("embed", "heads"),
    "o_proj": ("heads", "embed"),
    "gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"), "down_proj": ("mlp", "embed"),
    "lm_head": ("embed", "vocab"),
    "norm": ("norm",),
}


def shards_rank(rank: int, mesh_shape: dict[str, int]) -> bool:
  """Whether a low-rank ``--method``'s factors can split their rank axis on a mesh of
  ``mesh_shape`` (axis name -> size): every mesh axis that a decoder kernel's logical axes
  map to divides ``rank``.  (Otherwise the rank axis stays replicated.)"""
  rules = dict(LOGICAL_RULES)
  dense = ("embedding", "lm_head", "norm")  # never low-rank
  axes = {rules[name] for key, names in AXES.items() if key not in dense for name in names}
  return all(rank % mesh_shape.get(axis, 1) == 0 for axis in axes)


def _sharding_context():
  """Shard params as they are created only when a mesh and logical rules are set
  (Flax would otherwise need a mesh for every annotated param)."""
  mesh = jax.sharding.get_abstract_mesh()
  active = not mesh.empty and bool(flax_spmd.get_logical_axis_rules())
  return nnx.use_eager_sharding(True) if active else nnx.use_eager_sharding(False)


def create_sharded(make, mesh, rules=LOGICAL_RULES):
  """``make()`` (a function building a module) run under ``nnx.jit`` on ``mesh``
  with the logical ``rules``: every param is created directly with its sharding
  (no full copy on one device; works multi-host: all processes run the same
  computation).  Returns the module; its params carry their ``NamedSharding``."""
  check_divisible(make, mesh, rules)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    return nnx.jit(make)()


def check_divisible(make, mesh, rules=LOGICAL_RULES):
  """A one-line ``ValueError`` naming the first param of ``make()`` (built abstractly) with
  an axis that its mesh axes (its spec's, or those ``rules`` map its logical name to) do
  not divide: JAX's own error names neither the param nor the flag to change."""
  with nnx.logical_axis_rules(()):  # no rules: created unsharded, the metadata kept
    state = jax.eval_shape(lambda: nnx.state(make(), nnx.Param))
  to_mesh = dict(rules)

  def mesh_axes(entry):
    found = []
    for name in () if entry is None else entry if isinstance(entry, tuple) else (entry,):
      axes = name if name in mesh.axis_names else to_mesh.get(name)
      found += [] if axes is None else [axes] if isinstance(axes, str) else list(axes)
    return found

  flat = jax.tree_util.tree_leaves_with_path(state)
  for (path, leaf), spec in zip(flat, jax.tree.leaves(nnx.get_partition_spec(state))):
    for axis, (size, entry) in enumerate(zip(leaf.shape, tuple(spec))):
      axes = mesh_axes(entry)
      shards = math.prod(mesh.shape[a] for a in axes)
      if size % shards:
        where = jax.tree_util.keystr(path).removesuffix(".value")
        raise ValueError(
            f"--mesh: {where} {leaf.shape} has {size} along axis {axis}, which"
            f" {' x '.join(axes)} = {shards} devices do not divide: choose a"
            f" {' / '.join(axes)} size that divides {size}")


def galore_targets(params):
  """The projecting optimizers' mask for this model: the attention and MLP kernels of the
  layers, or under a low-rank ``--method`` the factors that replace them
  (``gnn.factor_kernels``); embeddings, ``lm_head``, norms and SLTrain's sparse values get
  plain Adam, as in the paper."""
  return jax.tree.map(operator.or_, gj.linear_kernels(params), gnn.factor_kernels(params))


LAYERS = "layers"  # the params' key of the stacked decoder layers


def stacked_axes(tree):
  """Per leaf of a params (or updates) tree: 1 for the decoder layers' stacked weights (their
  leading layer axis), 0 elsewhere.  The ``batch_dims`` of the 8-bit and Adafactor
  optimizers, so that each layer's weight is a tensor of its own, as in the per-layer step
  and the references (a stacked ``(L, D)`` norm is L vectors, not one L x D matrix)."""

  def axes(path, _):
    return int(any(getattr(k, "key", getattr(k, "name", None)) == LAYERS for k in path))

  is_variable = lambda x: isinstance(x, nnx.Variable)
  return jax.tree_util.tree_map_with_path(axes, tree, is_leaf=is_variable)


def explicit_axes() -> bool:
  """Whether the mesh set now (``jax.set_mesh``) has Explicit axes: shardings are then part of
  the types, and the model says where the typing needs a decision (:func:`logical_spec`).

  Example:
    >>> explicit_axes()  # no mesh
    False
  """
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and mesh.are_all_axes_explicit


def logical_spec(*names):
  """The ``PartitionSpec`` of logical axis ``names`` (through the logical rules set now) under
  an Explicit mesh, else ``None``: Auto axes (the partitioner places the value, and the Auto
  path's program stays as it was) or no mesh.

  Example:
    >>> explicit = (jax.sharding.AxisType.Explicit,) * 3
    >>> mesh = jax.sharding.AbstractMesh((1, 2, 1), MESH_AXES, axis_types=explicit)
    >>> with jax.sharding.use_abstract_mesh(mesh), nnx.logical_axis_rules(LOGICAL_RULES):
    ...   logical_spec("batch", None, "heads")
    P(('data', 'fsdp'), None, 'tensor')
    >>> logical_spec("batch") is None  # no mesh
    True
  """
  return flax_spmd.get_pspec(P(*names)) if explicit_axes() else None


def constrained(x: jax.Array, *names) -> jax.Array:
  """``x`` laid out as its logical axis ``names`` say (through the logical rules set now)
  under a mesh with Auto axes: activations at the layers' boundaries.  Left to itself, the
  partitioner followed the FSDP-split weights and split the activations along D, each device
  holding the whole batch; FSDP splits the batch.  As it is with no mesh or rules, and
  under Explicit axes (the types say it: :func:`logical_spec`).

  Example:
    >>> constrained(jnp.ones((2, 3)), "batch", None).shape  # no mesh: as it is
    (2, 3)
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or explicit_axes() or not flax_spmd.get_logical_axis_rules():
    return x
  return jax.lax.with_sharding_constraint(x, flax_spmd.get_pspec(P(*names)))


def _mesh_axes(entry) -> tuple:
  return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


def embedding_lookup(embed: nnx.Embed, tokens_BxT):
  """``embed(tokens_BxT)``; under an Explicit mesh its rows gathered with the shardings typed.

  The table is split over ``("vocab", "embed")`` and the tokens over ``"batch"``: a gather
  along a split axis has no typed result, and one whose rows keep their ``embed`` split while
  the batch uses the same mesh axes needs collectives JAX will not choose. So the table's vocab
  axis is gathered (a ``1 / embed`` share of it per device, as FSDP gathers a kernel), the
  tokens leave the ``embed`` axes (ints), each device looks up its columns, and one all-to-all
  hands the activations back split over the batch and whole along D, as the layers take them.
  (Gathering the whole table instead holds ``V x D`` per device; XLA's own choice for the
  direct gather replicated the gathered rows on every device.)

  Example:
    >>> embed = nnx.Embed(5, 3, rngs=nnx.Rngs(0))
    >>> embedding_lookup(embed, jnp.array([[1, 4]])).shape
    (1, 2, 3)
  """
  if not explicit_axes():
    return constrained(embed(tokens_BxT), "batch", None, None)
  batch, cols = (_mesh_axes(e) for e in logical_spec("batch", "embed"))
  rows = tuple(a for a in batch if a not in cols) or None
  table = embed.embedding[...].astype(embed.dtype)  # (as nnx.Embed: cast, then look up)
  table = jax.sharding.reshard(table, P(None, cols or None))
  tokens = jax.sharding.reshard(tokens_BxT, P(rows, None))
  x_BxTxD = table.at[tokens].get(out_sharding=P(rows, None, cols or None))
  return jax.sharding.reshard(x_BxTxD, logical_spec("batch", None, None))


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in float32."""

  def __init__(self, D: int, eps: float, param_dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((D,), param_dtype), out_sharding=AXES["norm"])

  def __call__(self, x_BxTxD):
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...].astype(jnp.float32)).astype(x_BxTxD.dtype)


def rope(x_BxTxNxK, positions_T, theta: float):
  """Rotary embeddings, rotate-half convention (as HF LLaMA)."""
  K = x_BxTxNxK.shape[-1]
  inv_freq_H = 1.0 / theta ** (jnp.arange(0, K, 2, dtype=jnp.float32) / K)
  angles_TxH = positions_T[:, None].astype(jnp.float32) * inv_freq_H[None, :]
  angles_TxK = jnp.concatenate([angles_TxH, angles_TxH], axis=-1)
  cos, sin = jnp.cos(angles_TxK)[:, None, :], jnp.sin(angles_TxK)[:, None, :]
  x = x_BxTxNxK.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos + rotated * sin).astype(x_BxTxNxK.dtype)


def attention_implementation(implementation: str, dtype, head_dim: int,
                             backend: str | None = None) -> str | None:
  """The ``jax.nn.dot_product_attention`` implementation to ask for.

  "xla" and "cudnn" are taken as given. "auto" picks cuDNN's flash kernel (about 7x XLA's
  attention on an H100, reference/anchors-h100.md) on a GPU for bf16 / fp16 inputs with a head
  dim it takes (a multiple of 8, at most 128), and XLA (None) otherwise: ``jax``'s own default
  is XLA everywhere.

  Example:
    >>> attention_implementation("auto", jnp.bfloat16, 64, backend="gpu")
    'cudnn'
    >>> attention_implementation("auto", jnp.float32, 64, backend="gpu") is None
    True
  """
  if implementation != "auto":
    return implementation
  backend = backend or jax.default_backend()
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  fits = head_dim % 8 == 0 and head_dim <= 128
  return "cudnn" if backend == "gpu" and half and fits else None


def causal_attention(q_BxTxNxK, k_BxTxNxK, v_BxTxNxK, implementation: str = "auto",
                     multiple: int | None = None):
  """Causal ``jax.nn.dot_product_attention``; pads T for cuDNN's flash kernel.

  ``implementation`` is resolved by :func:`attention_implementation`. cuDNN refuses an odd T
  in training, and a model trained on ``seq_len`` tokens sees ``seq_len - 1`` inputs, so on
  the cuDNN path T is zero-padded at the end to a multiple of 64 (``multiple`` overrides, on
  any path) and the output cut back to T. Under the causal mask the padded keys come after
  every real query, so values and gradients are exactly the unpadded ones.

  Example:
    >>> q = k = v = jnp.ones((1, 5, 2, 8))
    >>> causal_attention(q, k, v, "xla", multiple=4).shape
    (1, 5, 2, 8)
  """
  q, k, v = q_BxTxNxK, k_BxTxNxK, v_BxTxNxK
  impl = attention_implementation(implementation, q.dtype, q.shape[-1])
  T = q.shape[1]
  pad = -T % (multiple or (64 if impl == "cudnn" else 1))
  if pad:
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
  attend = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                        implementation=impl)
  if impl == "cudnn" and explicit_axes():
    # jax 0.10.2's cuDNN attention types its outputs and gradients replicated outside shard_map
    # (cudnn/fused_attention_stablehlo.py, _attention_out_aval), which would gather every head
    # of the whole batch onto each device. Under Auto axes inside, its custom partitioning
    # splits it as its inputs are, and the output comes back typed as q is (XLA's path types
    # its einsums and needs no such wrapper).
    attend = jax.sharding.auto_axes(attend, out_sharding=jax.typeof(q).sharding.spec)
  return attend(q, k, v)[:, :T]


class Block(nnx.Module):
  """One pre-norm decoder layer: attention + SwiGLU MLP."""

  def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, attention: str, rngs,
               method: Method = Method()):
    init = cfg.initializer()

    def linear(name, d_in, d_out):
      return method.linear(d_in, d_out, AXES[name], init, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)

    self.cfg, self.attention = cfg, attention
    self.attn_norm = RMSNorm(cfg.D, cfg.norm_eps, param_dtype)
    self.q_proj = linear("q_proj", cfg.D, cfg.D)
    self.k_proj = linear("k_proj", cfg.D, cfg.D)
    self.v_proj = linear("v_proj", cfg.D, cfg.D)
    self.o_proj = linear("o_proj", cfg.D, cfg.D)
    self.mlp_norm = RMSNorm(cfg.D, cfg.norm_eps, param_dtype)
    self.gate_proj = linear("gate_proj", cfg.D, cfg.F)
    self.up_proj = linear("up_proj", cfg.D, cfg.F)
    self.down_proj = linear("down_proj", cfg.F, cfg.D)

  def __call__(self, x_BxTxD):
    cfg = self.cfg
    B, T, _ = x_BxTxD.shape
    # Under Explicit axes each projection says how its output splits (JAX will not pick one
    # where a contraction's dims are split); None under Auto axes, as before.
    heads, mlp, whole = (logical_spec("batch", None, name) for name in ("heads", "mlp", None))
    h = self.attn_norm(x_BxTxD)
    positions_T = jnp.arange(T)
    split = lambda y: y.reshape(B, T, cfg.N, cfg.K)
    q = rope(split(self.q_proj(h, out_sharding=heads)), positions_T, cfg.rope_theta)
    k = rope(split(self.k_proj(h, out_sharding=heads)), positions_T, cfg.rope_theta)
    v = split(self.v_proj(h, out_sharding=heads))
    a_BxTxNxK = causal_attention(q, k, v, self.attention)
    x_BxTxD = x_BxTxD + self.o_proj(a_BxTxNxK.reshape(B, T, cfg.D), out_sharding=whole)
    h = self.mlp_norm(x_BxTxD)
    gated = jax.nn.silu(self.gate_proj(h, out_sharding=mlp)) * self.up_proj(h, out_sharding=mlp)
    return constrained(x_BxTxD + self.down_proj(gated, out_sharding=whole), "batch", None, None)


class Llama(nnx.Module):
  """Decoder-only LLaMA with scanned layers.

  Args:
    cfg: the size.
    dtype: compute dtype (activations, matmuls).
    param_dtype: storage dtype of the weights (bfloat16 for the papers' pure-bf16
      runs, float32 for fp32 master weights).
    attention: ``jax.nn.dot_product_attention`` implementation: "xla", "cudnn" (the
      flash path on GPU; bf16/fp16 only) or "auto" (cudnn where it applies, see
      :func:`attention_implementation`).
    remat: rematerialise each layer in the backward pass.
    unroll: decoder layers per iteration of the loop over layers (``nnx.scan``'s
      ``unroll``); ``True`` unrolls the whole loop. The parameters keep their stacked
      ``(L, ...)`` layout either way, so the optimizer, its state and checkpoints do not
      change; only the compiled program does. A scan compiles faster; an unrolled loop
      has no loop-carried buffers and lets XLA schedule across layers (on an H100 a plain
      LLaMA-350M under a scan over layers ran 22% slower than unrolled:
      ``shared/reference/anchors-h100.md``).
    method: the parameterisation of the layers' attention and MLP linear maps
      (:class:`Method`; default: dense ``nnx.Linear``).
  """

  def __init__(self, cfg: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               attention: str = "auto", remat: bool = False, unroll: int | bool = 1,
               method: Method = Method(), rngs: nnx.Rngs):
    if not (unroll is True or (type(unroll) is int and unroll >= 1)):
      raise ValueError(f"unroll: expected a positive int or True, got {unroll!r}")
    self.cfg, self.remat, self.unroll = cfg, remat, unroll
    with _sharding_context():
      self._build(cfg, dtype, param_dtype, attention, rngs, method)

  def _build(self, cfg, dtype, param_dtype, attention, rngs, method):
    init = cfg.initializer()
    self.embed = nnx.Embed(cfg.V, cfg.D, embedding_init=init, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs,
                           embedding_metadata={"out_sharding": AXES["embedding"]})

    @nnx.split_rngs(splits=cfg.L)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_layers(rngs):
      return Block(cfg, dtype=dtype, param_dtype=param_dtype, attention=attention, rngs=rngs,
                   method=method)

    self.layers = make_layers(rngs)
    self.norm = RMSNorm(cfg.D, cfg.norm_eps, param_dtype)
    self.lm_head = nnx.Linear(cfg.D, cfg.V, use_bias=False, kernel_init=init, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs,
                              kernel_metadata={"out_sharding": AXES["lm_head"]})

  def __call__(self, tokens_BxT):
    """Logits (float32) for every position."""
    if tokens_BxT.shape[1] > self.cfg.max_seq_len:
      raise ValueError(
          f"sequence length {tokens_BxT.shape[1]} exceeds the model's max_seq_len"
          f" {self.cfg.max_seq_len} (config {self.cfg.name!r}).")
    x_BxTxD = embedding_lookup(self.embed, tokens_BxT)

    def layer(x, block):
      return block(x)

    if self.remat:
      layer = nnx.remat(layer)
    x_BxTxD = nnx.scan(layer, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, unroll=self.unroll,
                       transform_metadata={nnx.PARTITION_NAME: "layers"})(x_BxTxD, self.layers)
    logits = self.lm_head(self.norm(x_BxTxD), out_sharding=logical_spec("batch", None, "vocab"))
    return constrained(logits, "batch", None, "vocab").astype(jnp.float32)


def cross_entropy_terms(logits_BxTxV, targets_BxT, pad_id: int):
  """Summed next-token cross-entropy over the targets that are not ``pad_id``, and their
  count (a step's loss is their ratio)."""
  mask_BxT = targets_BxT != pad_id
  if explicit_axes():
    # The target's logit picked by a mask over V, not optax's gather: the logits split V over
    # "vocab", and a gather along a split axis has no typed result (gathering V whole first
    # would hold a device's logits for the whole vocabulary). The other terms are exact 0s.
    ids_BxTxV = jax.lax.broadcasted_iota(jnp.int32, logits_BxTxV.shape, 2,
                                         out_sharding=jax.typeof(logits_BxTxV).sharding)
    picked_BxT = jnp.sum(jnp.where(ids_BxTxV == targets_BxT[..., None], logits_BxTxV, 0.0), -1)
    ce_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1) - picked_BxT
  else:
    ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
  return jnp.sum(ce_BxT * mask_BxT), jnp.sum(mask_BxT)

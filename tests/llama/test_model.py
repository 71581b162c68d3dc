"""The Flax NNX LLaMA of the example: sizes, shapes, causality, RoPE, remat."""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import galore_jax as gj
from examples.llama import model as M

TINY = M.CONFIGS["tiny"]


@pytest.mark.parametrize(
    "name, millions", [("60m", 58.1), ("130m", 134.1), ("350m", 368.0), ("1b", 1339.1)])
def test_parameter_counts_match_reference(name, millions):
  cfg = M.CONFIGS[name]
  abstract = nnx.eval_shape(lambda: M.Llama(cfg, rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert count == cfg.num_params()
  assert round(count / 1e6, 1) == millions


def test_reference_config_sizes():
  expect = {"60m": (512, 1376, 8, 8), "130m": (768, 2048, 12, 12), "350m": (1024, 2736, 16, 24),
            "1b": (2048, 5461, 32, 24), "7b": (4096, 11008, 32, 32), "9m": (128, 352, 4, 4),
            "20m": (256, 688, 4, 4), "35m": (384, 1024, 8, 6), "71m": (512, 1368, 8, 12),
            "250m": (768, 2560, 16, 24), "3b": (2560, 6848, 32, 32)}
  for name, dims in expect.items():
    c = M.CONFIGS[name]
    assert (c.D, c.F, c.N, c.L) == dims and c.V == 32000


def test_shapes_dtypes_and_layer_axis():
  model = M.Llama(TINY, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  assert params["layers"]["gate_proj"]["kernel"][...].shape == (TINY.L, TINY.D, TINY.F)
  assert params["layers"]["down_proj"]["kernel"][...].shape == (TINY.L, TINY.F, TINY.D)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  logits = model(jnp.zeros((2, 9), jnp.int32))
  assert logits.shape == (2, 9, TINY.V) and logits.dtype == jnp.float32


def test_init_std_and_no_biases():
  cfg = M.CONFIGS["9m"]
  model = M.Llama(cfg, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(params)}
  assert not any("bias" in k for k in flat)
  for k, v in flat.items():
    if "kernel" in k or "embedding" in k:
      assert abs(float(jnp.std(v)) - 0.02) < 0.002, k
    else:  # norm scales
      np.testing.assert_array_equal(v, 1.0)


@pytest.mark.parametrize("method", ["full", "lora", "lowrank", "sltrain"])
def test_bf16_params_are_float32_draws_rounded_once(method):
  """As the reference builds the model in float32 and casts it: normal(0.02) drawn directly
  in bf16 had 128 distinct values, tails cut at 2.9 sigma and a mean 0.01 sigma below 0 in
  every kernel (a rank-1 same-sign part); fan-in uniforms alike."""
  kw = {} if method == "full" else {"method": M.Method(method, rank=8)}
  wide = dataclasses.replace(TINY, D=256, F=512, V=512)
  f32 = nnx.state(M.Llama(wide, rngs=nnx.Rngs(0), **kw))
  bf16 = nnx.state(M.Llama(wide, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0), **kw))
  for a, b in zip(jax.tree.leaves(f32), jax.tree.leaves(bf16)):
    if jnp.issubdtype(a.dtype, jnp.floating):
      np.testing.assert_array_equal(np.asarray(b), np.asarray(a.astype(jnp.bfloat16)))
  embed = np.asarray(bf16["embed"]["embedding"][...], np.float32) / wide.init_std
  assert len(np.unique(embed)) > 1000 and np.abs(embed).max() > 4


def test_causal():
  model = M.Llama(TINY, rngs=nnx.Rngs(0))
  x = jax.random.randint(jax.random.key(1), (1, 12), 0, TINY.V)
  y = x.at[0, 8].set((x[0, 8] + 1) % TINY.V)
  a, b = model(x), model(y)
  np.testing.assert_allclose(a[:, :8], b[:, :8], atol=1e-6)
  assert not np.allclose(a[:, 8:], b[:, 8:])


def causal_attention_oracle(q, k, v):
  """NumPy causal softmax attention, (B, T, N, K) layout."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("btnk,bsnk->bnts", q, k) / np.sqrt(q.shape[-1])
  T = q.shape[1]
  s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bnts,bsnk->btnk", w / w.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("multiple", [1, 4, 64])
def test_causal_attention_padding_for_cudnn_is_exact(multiple):
  # A model trained on seq_len tokens sees seq_len - 1 (odd) inputs, which cuDNN's flash
  # kernel refuses in training; the padded path must give the unpadded values and gradients.
  q, k, v = (jax.random.normal(key, (2, 7, 3, 8)) for key in jax.random.split(jax.random.key(0), 3))
  out = M.causal_attention(q, k, v, "xla", multiple=multiple)
  assert out.shape == q.shape
  np.testing.assert_allclose(out, causal_attention_oracle(q, k, v), rtol=1e-5, atol=1e-5)
  loss = lambda m: lambda q, k, v: jnp.sum(jnp.sin(M.causal_attention(q, k, v, "xla", multiple=m)))
  for g_padded, g_plain in zip(jax.grad(loss(multiple), (0, 1, 2))(q, k, v),
                               jax.grad(loss(1), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g_padded, g_plain, rtol=1e-5, atol=1e-6)


def test_cudnn_attention_under_explicit_axes_keeps_its_inputs_split(monkeypatch):
  """jax 0.10.2's cuDNN attention types its output replicated under an Explicit mesh (its
  abstract eval gives outputs no sharding outside shard_map; there is no cuDNN here, so a
  stand-in computes XLA's attention and types it so): causal_attention runs it under Auto axes
  and hands the output back split as q is, its values unchanged (it came back replicated)."""
  from jax.sharding import PartitionSpec as P
  xla = jax.nn.dot_product_attention

  def cudnn(q, k, v, *, implementation=None, **kw):
    out = xla(q, k, v, implementation="xla", **kw)
    if implementation == "cudnn" and not jax.sharding.get_abstract_mesh().are_all_axes_auto:
      out = jax.sharding.reshard(out, P())  # as jax 0.10.2's cuDNN attention types it
    return out

  monkeypatch.setattr(jax.nn, "dot_product_attention", cudnn)
  explicit = (jax.sharding.AxisType.Explicit,) * 3
  mesh = jax.make_mesh((1, 1, 1), M.MESH_AXES, axis_types=explicit)
  spec = P(("data", "fsdp"), None, "tensor", None)
  q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 5, 2, 8))
  with jax.set_mesh(mesh):
    q, k, v = (jax.device_put(x, spec) for x in (q, k, v))
    out = jax.jit(lambda q, k, v: M.causal_attention(q, k, v, "cudnn"))(q, k, v)
  assert out.sharding.spec == spec, out.sharding.spec
  np.testing.assert_allclose(out, causal_attention_oracle(q, k, v), rtol=1e-5, atol=1e-5)


def test_auto_attention_picks_cudnn_only_where_it_applies():
  pick = M.attention_implementation
  assert pick("auto", jnp.bfloat16, 64, backend="gpu") == "cudnn"
  assert pick("auto", jnp.float16, 128, backend="gpu") == "cudnn"
  assert pick("auto", jnp.float32, 64, backend="gpu") is None  # cuDNN takes half precision
  assert pick("auto", jnp.bfloat16, 160, backend="gpu") is None
  assert pick("auto", jnp.bfloat16, 60, backend="gpu") is None
  assert pick("auto", jnp.bfloat16, 64, backend="cpu") is None
  assert pick("xla", jnp.bfloat16, 64, backend="gpu") == "xla"
  assert pick("cudnn", jnp.float32, 64, backend="cpu") == "cudnn"  # asked for: JAX decides


def test_rope_depends_on_relative_position_only():
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))

  def score(i, j):
    return float(jnp.sum(M.rope(q, jnp.array([i]), 1e4) * M.rope(k, jnp.array([j]), 1e4)))

  assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-5)
  assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)


def test_remat_gives_same_logits_and_grads():
  x = jax.random.randint(jax.random.key(1), (2, 10), 0, TINY.V)

  def loss(model):
    return jnp.mean(model(x) ** 2)

  plain = M.Llama(TINY, rngs=nnx.Rngs(0))
  remat = M.Llama(TINY, remat=True, rngs=nnx.Rngs(0))
  g1, g2 = nnx.grad(loss)(plain), nnx.grad(loss)(remat)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("unroll", [True, 3])
def test_unrolled_layer_loop_gives_same_logits_and_grads(unroll):
  """``unroll`` changes the compiled loop only: same params, logits and gradients (with and
  without remat), and ``True`` leaves no loop in the program."""
  x = jax.random.randint(jax.random.key(1), (2, 10), 0, TINY.V)

  def loss(model):
    return jnp.mean(model(x) ** 2)

  for remat in (False, True):
    scanned = M.Llama(TINY, remat=remat, rngs=nnx.Rngs(0))
    unrolled = M.Llama(TINY, remat=remat, unroll=unroll, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(scanned(x), unrolled(x))
    g1, g2 = nnx.grad(loss)(scanned), nnx.grad(loss)(unrolled)
    assert jax.tree.structure(g1) == jax.tree.structure(g2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)

  def hlo(model):
    return nnx.jit(nnx.grad(loss)).lower(model).as_text()

  assert "stablehlo.while" in hlo(M.Llama(TINY, rngs=nnx.Rngs(0)))
  assert ("stablehlo.while" in hlo(M.Llama(TINY, unroll=unroll, rngs=nnx.Rngs(0)))) == (
      unroll is not True and unroll < TINY.L)


@pytest.mark.parametrize("unroll", [0, -1, 1.5, False, "all"])
def test_bad_unroll_raises(unroll):
  with pytest.raises(ValueError, match="unroll: expected a positive int or True"):
    M.Llama(TINY, unroll=unroll, rngs=nnx.Rngs(0))


def test_sequence_longer_than_model_raises():
  model = M.Llama(TINY, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="max_seq_len"):
    model(jnp.zeros((1, TINY.max_seq_len + 1), jnp.int32))


def test_galore_targets_and_dims_project_each_layer_kernel():
  model = M.Llama(TINY, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  mask = M.galore_targets(params)
  assert mask["layers"]["q_proj"]["kernel"] and mask["layers"]["down_proj"]["kernel"]
  assert not mask["lm_head"]["kernel"] and not mask["embed"]["embedding"]
  assert not mask["layers"]["attn_norm"]["scale"] and not mask["norm"]["scale"]
  tx = gj.galore_projection(rank=8, mask=M.galore_targets, dimension_numbers=M.LAYER_KERNEL_DIMS)
  state = tx.init(params)
  mu = state.inner_state.mu
  # gate (L, D, F) is the torch-layout (F x D) matrix per layer: right basis on D, moments F x r.
  assert mu["layers"]["gate_proj"]["kernel"].shape == (TINY.L, TINY.F, 8)
  assert mu["layers"]["down_proj"]["kernel"].shape == (TINY.L, 8, TINY.F)
  assert mu["lm_head"]["kernel"].shape == (TINY.D, TINY.V)


def _dot_flops(jaxpr) -> int:
  """2 * (output elements) * (contracted size) of every dot_general in a jaxpr, nested jaxprs
  included (a scan's body counted ``length`` times): the program's matmul FLOPs, counted
  from the program itself, independently of any formula."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(
          np.prod([lhs[d] for d in contract]))
    times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      total += times * _dot_flops(sub)
  return total


def test_flops_formula_counts_the_programs_matmuls():
  """flops.flops_per_token (6N + 12 L D T) equals the dot_general FLOPs of the tiny model's
  forward + backward, counted from its jaxpr: exactly, since the model's only matmuls are
  the 7 kernels per layer, lm_head and attention's two (XLA attention computes the full
  T x T scores), and the embedding is a gather."""
  from examples.llama import flops
  B, T = 2, 16
  model = nnx.eval_shape(lambda: M.Llama(TINY, attention="xla", rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # shapes only: nothing runs
  tokens = jnp.zeros((B, T), jnp.int32)

  def loss(p):
    return nnx.merge(graphdef, p, rest)(tokens).sum()

  counted = _dot_flops(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
  assert counted == B * T * flops.flops_per_token(TINY, T)
  norms = (2 * TINY.L + 1) * TINY.D
  assert flops.matmul_params(TINY) == TINY.num_params() - TINY.V * TINY.D - norms


def test_each_device_kind_finds_its_own_peaks():
  """The first table entry that a device kind contains wins: the L40S is not an L4, an H100
  PCIe not an SXM; a measured matmul peak only where one was measured (H100 SXM, H200)."""
  from examples.llama import flops
  peaks = {kind: (flops.peak_tflops(kind), flops.mfu(1.0, 1e12, kind)["matmul_peak_fraction"])
           for kind in ("NVIDIA L40S", "NVIDIA L4", "NVIDIA H100 PCIe", "NVIDIA H100 80GB HBM3",
                        "NVIDIA H200")}
  assert peaks == {"NVIDIA L40S": (362.0, None), "NVIDIA L4": (121.0, None),
                   "NVIDIA H100 PCIe": (756.0, None),
                   "NVIDIA H100 80GB HBM3": (989.0, 1 / 798.0), "NVIDIA H200": (989.0, 1 / 788.0)}

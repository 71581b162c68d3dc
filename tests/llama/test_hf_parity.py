"""The example's LLaMA against Hugging Face's ``LlamaForCausalLM``, an independent reference.

``examples/llama/model.py`` claims the architecture the GaLore paper pretrains: RMSNorm (eps
1e-6), SwiGLU MLP, rotary embeddings in the rotate-half convention, an untied ``lm_head``,
no biases, i.e. the same function as transformers' ``LlamaForCausalLM``.  The tests build a
tiny model of each (float32, CPU; HF with eager attention), copy OUR initialised weights into
HF's (our kernels are ``(in, out)`` and stacked over the layers, HF's ``(out, in)`` per layer;
the heads split D the same way), and compare the logits and the next-token cross-entropy on
one token batch, with the layer loop scanned and unrolled.  A control shows the comparison
would see a rotary convention of interleaved pairs: agreeing on tiny attention scores alone
would prove little.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from examples.llama import model as model_lib  # noqa: E402
from examples.llama import train  # noqa: E402

# Small enough to compile in a second; 4 heads of 16, F not a multiple of D, T = max_seq_len so
# that every rotary position the model allows is compared.
CFG = model_lib.LlamaConfig("hf-parity", D=64, F=172, N=4, L=3, V=96, max_seq_len=32)
PAD = 0
# float32 round-off of two programs summing in other orders (seen: 1.8e-7 on logits of |x| <=
# 0.53); an interleaved rotary convention moves them by 6e-3.
RTOL, ATOL = 1e-5, 1e-6


def hf_config(cfg: model_lib.LlamaConfig):
  """Hugging Face's config of the same sizes; no grouped-query attention, as the paper's."""
  return transformers.LlamaConfig(
      vocab_size=cfg.V, hidden_size=cfg.D, intermediate_size=cfg.F,
      num_hidden_layers=cfg.L, num_attention_heads=cfg.N, num_key_value_heads=cfg.N,
      max_position_embeddings=cfg.max_seq_len + 1, rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta, hidden_act="silu", tie_word_embeddings=False,
      attention_bias=False, mlp_bias=False, attn_implementation="eager")


def our_model(unroll=1, attention="xla"):
  """Our model, its norm scales moved off their init of ones: a scale copied to the wrong
  norm (or not applied) must change the logits."""
  model = model_lib.Llama(CFG, attention=attention, unroll=unroll, rngs=nnx.Rngs(0))
  keys = iter(jax.random.split(jax.random.key(1), 8))
  for norm in (model.layers.attn_norm, model.layers.mlp_norm, model.norm):
    scale = norm.scale[...]
    norm.scale[...] = scale + 0.1 * jax.random.normal(next(keys), scale.shape)
  return model


def to_torch(x, transpose=False):
  x = np.asarray(x, np.float32)
  return torch.from_numpy(np.array(x.T if transpose else x))  # a writable copy


def hf_state_dict(model: model_lib.Llama):
  """Our params under HF's names and layouts: a kernel (in, out) is HF's weight (out, in),
  and each layer's slice of our stacked (L, ...) params is one HF layer."""
  layers = model.layers
  sd = {"model.embed_tokens.weight": to_torch(model.embed.embedding[...]),
        "model.norm.weight": to_torch(model.norm.scale[...]),
        "lm_head.weight": to_torch(model.lm_head.kernel[...], transpose=True)}
  for i in range(CFG.L):
    pre = f"model.layers.{i}."
    sd[pre + "input_layernorm.weight"] = to_torch(layers.attn_norm.scale[...][i])
    sd[pre + "post_attention_layernorm.weight"] = to_torch(layers.mlp_norm.scale[...][i])
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      kernel = getattr(layers, name).kernel[...][i]
      sd[pre + f"self_attn.{name}.weight"] = to_torch(kernel, transpose=True)
    for name in ("gate_proj", "up_proj", "down_proj"):
      kernel = getattr(layers, name).kernel[...][i]
      sd[pre + f"mlp.{name}.weight"] = to_torch(kernel, transpose=True)
  return sd


def hf_model(state_dict):
  """HF's model with ``state_dict`` loaded strictly: every HF weight comes from ours."""
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(hf_config(CFG)).to(torch.float32).eval()
  assert hf.config._attn_implementation == "eager"  # the plain softmax(q k^T / sqrt(K)) v
  hf.load_state_dict(state_dict, strict=True)
  return hf


def tokens_and_labels():
  """B = 2 rows of T + 1 tokens (the loss's inputs and targets); the second row ends in pad,
  which our loss skips by ``PAD`` and HF's by the label -100."""
  tokens = np.random.default_rng(2).integers(1, CFG.V, (2, CFG.max_seq_len + 1))
  tokens[1, -7:] = PAD
  labels = np.where(tokens == PAD, -100, tokens)
  return tokens, labels


def hf_logits_and_loss(hf, tokens, labels):
  with torch.no_grad():
    out = hf(input_ids=torch.from_numpy(tokens).long(), labels=torch.from_numpy(labels).long())
  return out.logits.numpy(), float(out.loss)


@pytest.fixture(scope="module")
def reference():
  """HF's logits and mean loss for the weights of ``our_model()`` (the same init whatever
  the loop's unroll), on ``tokens_and_labels()``."""
  tokens, labels = tokens_and_labels()
  return hf_logits_and_loss(hf_model(hf_state_dict(our_model())), tokens, labels)


def test_hf_config_is_the_papers():
  # The defaults the claim rests on: no biases, untied head, SwiGLU, eps 1e-6.
  cfg = hf_config(CFG)
  assert cfg.rms_norm_eps == CFG.norm_eps == 1e-6 and cfg.hidden_act == "silu"
  assert not cfg.tie_word_embeddings and not cfg.attention_bias and not cfg.mlp_bias
  assert cfg.head_dim == CFG.K


@pytest.mark.parametrize("unroll", [1, True], ids=["scan", "unrolled"])
def test_logits_and_loss_match_hf(reference, unroll):
  ref_logits, ref_loss = reference
  tokens, _ = tokens_and_labels()
  model = our_model(unroll=unroll)
  # Full float32 matmuls where the default is lower (TF32 on a GPU); a no-op on a CPU.
  with jax.default_matmul_precision("highest"):
    # HF saw all T + 1 tokens; under the causal mask its first T positions are ours exactly.
    logits = np.asarray(model(jnp.asarray(tokens[:, :-1])))
    total, count = train.loss_terms(model, jnp.asarray(tokens), PAD)
  np.testing.assert_allclose(logits, ref_logits[:, :-1], rtol=RTOL, atol=ATOL)
  assert int(count) == (tokens[:, 1:] != PAD).sum()
  np.testing.assert_allclose(float(total / count), ref_loss, rtol=RTOL)


def interleaved_rotary(state_dict):
  """HF's weights for the function of a model that rotates interleaved pairs (x0, x1), (x2,
  x3), ... of each head (the original LLaMA code's convention) with our weights: each head's
  q and k rows de-interleaved (evens, then odds), as HF's own weight converter does, so that
  rotate-half's pair (i, i + K/2) is that model's pair (2i, 2i + 1)."""
  order = np.concatenate([np.arange(0, CFG.K, 2), np.arange(1, CFG.K, 2)])
  rows = np.concatenate([n * CFG.K + order for n in range(CFG.N)])
  return {key: w[rows] if key.endswith(("q_proj.weight", "k_proj.weight")) else w
          for key, w in state_dict.items()}


def test_the_comparison_sees_the_rotary_convention(reference):
  # Each head's q.k is the same sum over the permuted dims, so only the rotation differs: at
  # init the scores are small, and this checks they still move the logits past the tolerance.
  ref_logits, _ = reference
  tokens, labels = tokens_and_labels()
  hf = hf_model(interleaved_rotary(hf_state_dict(our_model())))
  logits, _ = hf_logits_and_loss(hf, tokens, labels)
  gap = np.abs(logits - ref_logits).max()
  assert gap > 100 * ATOL, gap

r"""Model FLOPs of the LLaMA example and its model FLOPs utilisation (MFU).

Model FLOPs per token, the PaLM formula (Chowdhery et al. 2022, "PaLM", appendix B; the same
6N + attention accounting as Kaplan et al. 2020, section 2.1, and Chinchilla's appendix F
without its small non-matmul terms):

.. math::
  \text{flops/token} = 6N + 12\,L\,D\,T

* :math:`N` = the matmul parameters: the decoder layers' kernels
  :math:`L(4D^2 + 3DF)` (q, k, v, o; gate, up, down) plus ``lm_head`` :math:`DV`.  Not in
  :math:`N`: the input embedding (a gather, no FLOPs) and the RMSNorm scales (element-wise).
  Each matmul parameter costs 2 FLOPs per token forward and 4 backward (the gradients of the
  input and of the weight): :math:`6N`.
* :math:`12 L D T`: attention's two matmuls, :math:`QK^\top` and :math:`PV`, each
  :math:`2TD` FLOPs per token and layer forward (:math:`N_{heads} K = D`), times 3 for forward
  plus backward, over the full :math:`T \times T` score matrix: the causal mask is not
  discounted (PaLM's convention; an implementation that skips the masked half does less work
  than counted).  :math:`T` is the context length the model runs on.

Element-wise work (norms, RoPE, softmax, SwiGLU's gate, cross-entropy) and rematerialisation
are not model FLOPs.  :func:`mfu` divides the achieved model FLOP/s by the device's dense bf16
peak of :data:`PEAK_TFLOPS`.
"""

from __future__ import annotations

#: Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets, by a
#: substring of ``jax.Device.device_kind``; the first match wins (PCIe / NVL before SXM).
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),   # NVIDIA H100 PCIe
    ("H100 NVL", 835.0),    # NVIDIA H100 NVL
    ("H100", 989.0),        # NVIDIA H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),        # NVIDIA H200 SXM (same tensor cores as the H100 SXM)
    ("GH200", 989.0),
    ("B200", 2250.0),       # NVIDIA B200 (HGX), dense
    ("A100", 312.0),        # NVIDIA A100 (SXM and PCIe)
    ("L40S", 362.0),       # NVIDIA L40S (before "L4", which its name contains)
  ("L4", 121.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5", 459.0),       # v5p
    ("TPU v6 lite", 918.0),  # v6e (Trillium)
)

#: A bf16 matmul's measured peak, TFLOP/s, where one was measured on these machines (an
#: 8192^3 bf16 product on random data: 788 TFLOP/s on an H200, issue 18; 798 on an H100
#: 80GB HBM3, the device notes of 2026-11-13; both about 80% of the 989 spec).  Reported next
#: to MFU.  The H100 PCIe / NVL parts were not measured: no entry matches them.
MEASURED_MATMUL_TFLOPS = (("H100 PCIe", None), ("H100 NVL", None), ("H100", 798.0),
                          ("H200", 788.0))


def matmul_params(cfg) -> int:
  """:math:`N` of the formula: the layers' kernels and ``lm_head`` (not the embedding, not
  the norms).

  Example:
    >>> from examples.llama.model import CONFIGS
    >>> matmul_params(CONFIGS["350m"])   # of 367.97M parameters in all
    335151104
  """
  return cfg.L * (4 * cfg.D * cfg.D + 3 * cfg.D * cfg.F) + cfg.D * cfg.V


def flops_per_token(cfg, seq_len: int) -> int:
  """Model FLOPs (forward + backward) per position of a ``seq_len``-long context:
  ``6 * matmul_params(cfg) + 12 * L * D * seq_len`` (see the module docstring).

  Example:
    >>> from examples.llama.model import CONFIGS
    >>> flops_per_token(CONFIGS["350m"], 256) / 1e9
    2.086404096
  """
  return 6 * matmul_params(cfg) + 12 * cfg.L * cfg.D * seq_len


def train_flops_per_token(cfg, seq_len: int) -> float:
  """Model FLOPs per *counted* token of ``train.py``: a row of ``seq_len`` tokens is
  ``seq_len - 1`` inputs (next-token targets), so a step of ``B x seq_len`` tokens runs
  ``B (seq_len - 1)`` positions of a ``seq_len - 1`` context.

  Example:
    >>> from examples.llama.model import CONFIGS
    >>> round(train_flops_per_token(CONFIGS["350m"], 256) / 1e9, 4)
    2.078
  """
  return flops_per_token(cfg, seq_len - 1) * (seq_len - 1) / seq_len


def _lookup(table, device_kind: str) -> float | None:
  return next((tflops for key, tflops in table if key in device_kind), None)


def peak_tflops(device_kind: str, override: float | None = None) -> float | None:
  """The dense bf16 peak of a device kind (TFLOP/s), ``override`` if given; ``None`` for a
  device not in :data:`PEAK_TFLOPS` (a CPU).

  Example:
    >>> peak_tflops("NVIDIA H100 80GB HBM3"), peak_tflops("cpu"), peak_tflops("cpu", 1.5)
    (989.0, None, 1.5)
  """
  return override if override is not None else _lookup(PEAK_TFLOPS, device_kind)


def mfu(flops_per_token_: float, tokens_per_s: float, device_kind: str,
        override: float | None = None, num_devices: int = 1) -> dict:
  """Model FLOPs utilisation: ``flops_per_token * tokens_per_s / (num_devices * peak)``
  (``tokens_per_s`` over all ``num_devices`` devices of the kind).

  Returns ``{"model_flops_per_token", "model_tflops_per_s"`` (per device) ``,
  "peak_tflops", "mfu",
  "matmul_peak_fraction"}``: ``mfu`` against :func:`peak_tflops` (``None`` without a known
  peak), ``matmul_peak_fraction`` against :data:`MEASURED_MATMUL_TFLOPS` (``None`` where none
  was measured; an ``override`` peak is taken as both).

  Example:
    >>> row = mfu(2e9, 1.5e5, "NVIDIA H200")
    >>> round(row["mfu"], 4), round(row["matmul_peak_fraction"], 4)
    (0.3033, 0.3807)
    >>> mfu(2e9, 1.5e5, "cpu")["mfu"] is None
    True
  """
  achieved = flops_per_token_ * tokens_per_s / 1e12 / num_devices  # per device
  peak = peak_tflops(device_kind, override)
  measured = override if override is not None else _lookup(MEASURED_MATMUL_TFLOPS, device_kind)
  return {"model_flops_per_token": float(flops_per_token_), "model_tflops_per_s": achieved,
          "peak_tflops": peak, "mfu": None if peak is None else achieved / peak,
          "matmul_peak_fraction": None if measured is None else achieved / measured}


def format_per_token(row: dict) -> str:
  """A row's model FLOPs per token for people (``"n/a"`` without one).

  Example:
    >>> format_per_token(mfu(2.078e9, 1.5e5, "cpu")), format_per_token({"mfu": None})
    ('2.078 GFLOP/token', 'n/a GFLOP/token')
  """
  per_token = row.get("model_flops_per_token")
  return f"{'n/a' if per_token is None else f'{per_token / 1e9:.4g}'} GFLOP/token"


def format_mfu(row: dict) -> str:
  """``"MFU 34.5%"`` (and the measured-matmul fraction where known), or ``"MFU n/a"``.

  Example:
    >>> format_mfu(mfu(2e9, 1.5e5, "NVIDIA H200"))
    'MFU 30.3% of 989 TFLOP/s (38.1% of the measured bf16 matmul peak)'
    >>> format_mfu(mfu(2e9, 1.5e5, "cpu"))
    'MFU n/a (unknown peak: --peak-tflops)'
  """
  if row.get("mfu") is None:
    return "MFU n/a (unknown peak: --peak-tflops)"
  text = f"MFU {100 * row['mfu']:.1f}% of {row['peak_tflops']:g} TFLOP/s"
  if row.get("matmul_peak_fraction") is not None and row["matmul_peak_fraction"] != row["mfu"]:
    text += f" ({100 * row['matmul_peak_fraction']:.1f}% of the measured bf16 matmul peak)"
  return text

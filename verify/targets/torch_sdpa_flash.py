"""torch-sdpa-flash: ``scaled_dot_product_attention`` restricted to its CPU flash kernel.

``F.scaled_dot_product_attention`` under ``sdpa_kernel(SDPBackend.FLASH_ATTENTION)`` on CPU runs
``aten::_scaled_dot_product_flash_attention_for_cpu`` (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp,
``cpu_flash_attention``): no fallback to the math backend -- a call the kernel cannot take raises
``RuntimeError: No available kernel``. The tests prove the kernel is the one that runs: the output is bitwise
equal to calling ``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` directly (every dtype, with and
without masks, Lq across 192 / 768 and Lk across 512) and differs from the math backend's.

The kernel picks its own tiles (``flash_attention_kernel_impl``): query tiles of 32 rows for Lq < 192, 64 for
192 <= Lq < 768 and 256 for Lq >= 768; key tiles of 512 (``min(512, Lk)``). Per row it runs the online softmax
over the key tiles (running max and sum in the accumulation dtype, the output accumulator rescaled by
``exp(m_old - m_new)``). A query tile changes no row's arithmetic (the tiles divide 512, so none straddles a key
tile); the key tile does, and the tests see it: with two visible keys per row, the larger logit second, the
first key's weight is ``exp(s_a - s_b)`` rounded to bf16 before ``P @ V`` when both keys share a tile, and an
fp32 rescale factor when a tile boundary separates them. Of the rows where the two pictures give different
bf16 outputs, the kernel matches the second on 96-100% when the pair straddles 512 or 1024, and the first on
95-100% at 128, 256, 384, 640, 768 and 896.

Mapping from the canonical signature (``[B, L, H, D]`` transposed to SDPA's ``[B, H, L, D]``):

- ``mask`` (bool, True = attend) -> ``attn_mask`` bool; SDPA turns it into a ``-inf`` float mask (bitwise the
  same result as passing that float mask to the aten op); ``bias`` -> a float ``attn_mask`` (float32, float64
  for fp64 queries, converted exactly), ``-inf`` where the mask hides a key; masks are viewed as 4-d;
- ``causal`` top-left alone -> ``is_causal=True`` (the kernel's own triangle, ``j <= i``, and its key-tile
  skipping); bottom-right alone -> ``attn_mask=causal_lower_right(Lq, Lk)`` (torch's own API: ``is_causal`` when
  Lq == Lk, else its materialised bool mask ``tril(diagonal=Lk - Lq)``, because the lower-right variant is native
  only to the CUDA kernels); causal with a mask or bias -> the triangle of either alignment folded into it;
- GQA -> ``enable_gqa=True``; ``scale`` passed through (None = 1/sqrt(Dk)).

What it takes (measured with torch 2.13.0, CPU; tests/test_targets_sdpa_flex.py):

- dtypes fp32, bf16, fp16 and fp64 (``AT_DISPATCH_FLOATING_TYPES_AND2(kBFloat16, kHalf)``);
- ``attn_mask`` bool or float in the forward pass; a float mask that requires grad has no kernel ("No available
  kernel": the flash backward returns dq, dk, dv only), so the gradient pass of a case with a bias declines
  (``Unsupported``) while its forward pass is still checked; the gradient of q, k, v with a mask that does not
  require grad runs the flash backward;
- GQA (``enable_gqa``), any ``scale``, Lq != Lk both ways;
- no Dk != Dv (constraint ``dk=dv``: "Q/K/V should have the same head size" -- SDPA finds no kernel).

Masked rows (no visible key): zeros. The kernel fills a tile's probabilities with 0 while a row's running max is
``-inf`` ("to avoid nan = exp2f(-inf - (-inf))"), then sets such a row's max to 0 and sum to 1, so out 0 and
its internal lse 0; the backward's ``exp(s - lse)`` is 0 there, so dq, dk, dv get nothing from the row. The
situation of pytorch/pytorch#127055 (n = 640 tokens, a mask hiding the future and tokens more than 9 back, so
the rows past 521 see nothing in the first key tile; NaN rows when it was reported in 2024) gives finite, correct
rows in torch 2.13 (pinned in the tests, fp32 and bf16, forward and gradients).

Precision contract: accumulation fp32 for bf16/fp16 (``opmath_type``; fp64 in fp64), logits ``scale * q.k +
mask`` never rounded to the input dtype, probabilities ``exp(s - m_tile)`` rounded to bf16/fp16 before ``P @ V``
(``qk_reduced_data``) while the row sum adds the unrounded fp32 values; one rounding of the output. Measured at
L = 1024, q, k ~ 3 N(0, 1), D = 32: the bf16/fp16 error reaches 1.2-1.5 u*A (one output rounding alone stays
below 1 u*A: the math backend's 0.98), while rounding the logits too would cost 65-70 u*A.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from verify.targets.base import Contract, TargetInfo, Unsupported
from verify.targets.torch_sdpa import sdpa_attn_mask

INFO = TargetInfo(
    name="torch-sdpa-flash",
    framework="torch",
    dtypes=("bf16", "fp16", "fp32", "fp64"),
    features=frozenset({"mask", "bias", "causal", "bottom-right", "gqa", "grad"}),
    masked_rows="zeros",
    contract=Contract(accumulate="fp32", round_logits=False, round_probs=True),
    constraints=frozenset({"dk=dv"}),
    tiles=(32, 64, 256, 512),
    description="scaled_dot_product_attention with SDPBackend.FLASH_ATTENTION on CPU "
                "(aten::_scaled_dot_product_flash_attention_for_cpu; query tiles 32/64/256, key tiles 512)",
    notes=(
        "Kernel proven by bitwise equality with aten::_scaled_dot_product_flash_attention_for_cpu. Masked rows: "
        "zeros (probabilities 0 while the running max is -inf, then max 0 and sum 1: out 0, zero grads). "
        "Contract: fp32 statistics and accumulation, logits unrounded, exp(s - m_tile) rounded to bf16/fp16 "
        "before P @ V. Bias: forward only (a float attn_mask that requires grad has no flash kernel; the "
        "gradient pass of a bias case declines). Dk must equal Dv."
    ),
)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    align: str = "top-left",
) -> torch.Tensor:
    """SDPA's CPU flash kernel on ``[B, L, H, D]`` tensors; out ``[B, Lq, Hq, Dv]``."""
    if align not in ("top-left", "bottom-right"):
        raise ValueError(f"align must be 'top-left' or 'bottom-right', got {align!r}")
    if q.shape[-1] != v.shape[-1]:
        raise Unsupported(f"the CPU flash kernel needs Dk == Dv (Dk={q.shape[-1]}, Dv={v.shape[-1]})")
    if bias is not None and bias.requires_grad and torch.is_grad_enabled():
        raise Unsupported("SDPA's CPU flash kernel has no gradient for a float attn_mask (bias): 'No available kernel'")
    lq, lk = q.shape[1], k.shape[1]
    attn_mask = sdpa_attn_mask(mask, bias, causal, lq, lk, q.dtype, align)
    is_causal = causal and attn_mask is None
    if is_causal and align == "bottom-right" and lq != lk:
        with warnings.catch_warnings():  # "will produce NaNs when seq_len_q > seq_len_kv": rows with no key are 0
            warnings.simplefilter("ignore", UserWarning)
            attn_mask = causal_lower_right(lq, lk)
        is_causal = False
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=attn_mask,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=q.shape[2] != k.shape[2],
        )
    return out.transpose(1, 2)

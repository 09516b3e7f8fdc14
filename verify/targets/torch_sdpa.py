"""torch-sdpa: ``torch.nn.functional.scaled_dot_product_attention`` behind the canonical signature.

Mapping: ``[B, L, H, D]`` is transposed to SDPA's ``[B, H, L, D]`` (views) and back. SDPA takes a
single ``attn_mask`` (bool, True = attend, or a float added to the logits) and refuses
``attn_mask`` together with ``is_causal=True``, so:

- mask only -> the bool mask; bias (with or without mask) -> a float mask, the bias with ``-inf``
  where the mask is False (``torch.where``, so ``dbias`` still flows to the bias);
- causal alone -> ``is_causal=True``; causal with a mask or bias -> the top-left triangle
  (``j <= i``) folded into that mask;
- ``align="bottom-right"`` (feature ``bottom-right``): causal alone -> ``attn_mask=causal_lower_right(Lq, Lk)``
  (``torch.nn.attention.bias``; its ``__torch_function__`` runs ``is_causal=True`` when Lq == Lk, and the
  materialised lower-right bool mask ``tril(diagonal=Lk - Lq)`` on the math backend and on CPU; on CUDA the
  flash / efficient kernels take the variant natively); causal with a mask or bias -> that lower-right
  triangle (``j <= i + Lk - Lq``) folded into the mask as for top-left. When Lq > Lk the first ``Lq - Lk``
  rows see no key: the math backend gives them zeros (``_safe_softmax``) and zero gradients, although
  ``causal_lower_right`` warns that such rows "will produce NaNs" (measured in
  tests/test_targets_sdpa_flex.py);
- a float mask must be float32 or the query's dtype: the bias is converted exactly to float32
  (float64 for fp64 queries); an fp64 bias that float32 cannot hold exactly is ``Unsupported``;
- GQA -> ``enable_gqa=True``; ``scale`` is passed through (None = SDPA's own 1/sqrt(Dk)).

Backend: ``ATTNVERIFY_SDPA_BACKEND`` = ``math`` (default), ``flash``, ``efficient`` or ``cudnn``,
forced with ``torch.nn.attention.sdpa_kernel`` (no silent fallback: an unusable backend raises);
``ATTNVERIFY_SDPA_DEVICE`` (default ``cuda`` for efficient/cudnn, else ``cpu``) picks the device.
Policy and contract below were established for the math backend on CPU (torch 2.13.0); for the
fused backends they are the usual flash-kernel contract (fp32 statistics, probabilities rounded to
the input dtype) and are not verified here.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from verify.targets.base import Contract, TargetInfo, Unsupported

_BACKENDS = {
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
BACKEND = os.environ.get("ATTNVERIFY_SDPA_BACKEND", "math")
if BACKEND not in _BACKENDS:
    raise ImportError(f"ATTNVERIFY_SDPA_BACKEND={BACKEND!r}: choose one of {', '.join(_BACKENDS)}")
DEVICE = os.environ.get("ATTNVERIFY_SDPA_DEVICE", "cuda" if BACKEND in ("efficient", "cudnn") else "cpu")

_MATH_NOTES = (
    "Masked rows (math backend, CPU, torch 2.13.0): zeros. The math backend turns a bool mask into a "
    "-inf float mask and applies aten::_safe_softmax (torch/_decomp/decompositions.py: softmax, then 0 "
    "where the whole row is -inf); measured on a fully masked row with a bool mask and with a -inf float "
    "mask: output 0 and dq, dk, dv, dbias all 0 and finite (tests/test_targets_torch.py). A finfo.min "
    "float mask is not -inf, so such a row gives the mean of v instead. "
    "Precision: bf16/fp16 inputs are upcast to float32 for every intermediate and the output is rounded "
    "once (SDPA docstring: 'For math backend, all intermediates are kept in torch.float if inputs are in "
    "torch.half or torch.bfloat16'; torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed() is False). "
    "Measured: the bf16/fp16 output is bitwise equal to the fp32 run rounded to bf16/fp16 (asserted in the "
    "tests, with error <= 1 u*A against mpmath); at B=1, L=64, H=2, D=32, q,k ~ 3*N(0,1) the error is "
    "<= 0.98 u*A, where a same-dtype implementation reaches 23-25 u*A. fp32 and fp64 compute in their own dtype."
)

INFO = TargetInfo(
    name="torch-sdpa",
    framework="torch",
    dtypes=("bf16", "fp16", "fp32", "fp64") if BACKEND == "math" else ("bf16", "fp16"),
    features=frozenset({"mask", "bias", "causal", "gqa", "grad", "bottom-right"}),
    masked_rows="zeros",
    contract=Contract(accumulate="fp32", round_logits=False, round_probs=BACKEND != "math"),
    device=DEVICE,
    description=f"torch.nn.functional.scaled_dot_product_attention, backend {BACKEND} on {DEVICE}",
    notes=_MATH_NOTES if BACKEND == "math" else f"backend {BACKEND}: policy and contract assumed, unverified",
)


def _float_mask(bias: torch.Tensor, query_dtype: torch.dtype) -> torch.Tensor:
    """The bias in a dtype SDPA accepts for a float mask (float32; float64 for fp64 queries), converted exactly."""
    want = torch.float64 if query_dtype == torch.float64 else torch.float32
    out = bias.to(want)
    if bias.dtype == torch.float64 and want != torch.float64 and not torch.equal(out.double(), bias):
        raise Unsupported("SDPA takes a float32 mask here and this fp64 bias does not convert to float32 exactly")
    return out


def _four_d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape((1,) * (4 - x.dim()) + tuple(x.shape))


def sdpa_attn_mask(
    mask: torch.Tensor | None, bias: torch.Tensor | None, causal: bool, lq: int, lk: int, query_dtype: torch.dtype,
    align: str = "top-left",
) -> torch.Tensor | None:
    """SDPA's single 4-D attn_mask for our mask and bias, with the causal triangle (aligned as ``align`` says)
    folded in when either is given; None when neither is (causal alone goes to SDPA's own flags)."""
    if mask is None and bias is None:
        return None
    visible = None if mask is None else _four_d(mask)
    if causal:
        device = (mask if mask is not None else bias).device
        tri = torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq if align == "bottom-right" else 0)
        visible = tri if visible is None else visible & tri
    if bias is None:
        return visible
    fmask = _four_d(_float_mask(bias, query_dtype))
    if visible is None:
        return fmask
    return torch.where(visible, fmask, torch.tensor(float("-inf"), dtype=fmask.dtype, device=fmask.device))


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
    """SDPA on ``[B, L, H, D]`` tensors with the selected backend; out ``[B, Lq, Hq, Dv]``."""
    if align not in ("top-left", "bottom-right"):
        raise ValueError(f"align must be 'top-left' or 'bottom-right', got {align!r}")
    lq, lk = q.shape[1], k.shape[1]
    attn_mask = sdpa_attn_mask(mask, bias, causal, lq, lk, q.dtype, align)
    if causal and attn_mask is None and align == "bottom-right" and lq != lk:
        with warnings.catch_warnings():  # "will produce NaNs ... when seq_len_q > seq_len_kv": not on this path
            warnings.simplefilter("ignore", UserWarning)
            attn_mask = causal_lower_right(lq, lk)
    with sdpa_kernel(_BACKENDS[BACKEND]):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=attn_mask,
            is_causal=causal and attn_mask is None,  # top-left, or bottom-right with Lq == Lk (the same triangle)
            scale=scale,
            enable_gqa=q.shape[2] != k.shape[2],
        )
    return out.transpose(1, 2)

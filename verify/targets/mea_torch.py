"""mea-torch: ``efficient_dot_product_attention_pt`` of memory-efficient-attention 0.1.3 (PyPI).

The package's signature is ``(query, key, value, mask=None, bias=None, query_chunk_size=1024,
key_chunk_size=4096, bias_calc_fn=None, mask_calc_fn=None, weights_calc_fn=None,
calc_fn_data=None)`` on ``[batch..., L, H, D]`` tensors -- our layout, passed unchanged.

Mapping of the canonical arguments:

- ``mask`` (True = attend, as in the package) and ``bias`` go through, left-padded to 4 dims
  (the package's ``'...hqk'`` einsum needs at least ``[H, Lq, Lk]``);
- ``causal`` uses the package's documented hook, ``mask_calc_fn(q_offset, k_offset, mask_chunk,
  ...)``, returning the chunk's top-left triangle (combined with the mask chunk);
- chunk sizes go through; ``None`` keeps the package defaults (1024 queries, 4096 keys);
- ``scale``: the package always divides q by ``sqrt(Dk)``; ``None`` or exactly ``1/sqrt(Dk)`` is
  accepted, any other scale is ``Unsupported``. No GQA (the package needs equal head counts).

Behaviour found by reading ``attention_torch.py`` and running it (see tests/test_targets_torch.py):

- masked rows: the mask fills ``torch.finfo(dtype).min``, so a fully masked row averages all
  values: policy ``uniform`` (dq, dk, dbias 0; dv gets g/Lk). Defects, reported by the harness:
  (1) in fp64 the fill is built as a float32 tensor, ``finfo(float64).min`` becomes ``-inf`` and
  ``exp(-inf - -inf)`` makes every row with a fully masked *key chunk* NaN; (2) a ``-inf`` bias
  has no such fill: a fully ``-inf`` key chunk makes its row NaN, in every dtype;
- chunking: ``dynamic_slice`` clamps start indices, so a chunk size that does not divide the
  length re-reads the last chunk: keys overlapping two chunks are counted twice (wrong values)
  and queries come out ``ceil(Lq/c)*c`` rows long (wrong shape);
- precision: everything stays in the input dtype -- ``q / sqrt(Dk)``, logits, ``exp`` weights,
  chunk sums and the final division are rounded to bf16/fp16 (torch's matmul and sum accumulate
  in fp32 internally, but every result is stored in the input dtype);
- gradient: each key chunk is wrapped in ``torch.utils.checkpoint`` with the default
  ``use_reentrant=True``, which refuses ``torch.autograd.grad`` (the torch adapter uses
  ``.backward()``). The package's own warnings (checkpoint's ``use_reentrant``, numpy's
  ``__array_wrap__`` from ``np.clip`` on tensors) are silenced around the call.
"""

from __future__ import annotations

import warnings

import torch
from memory_efficient_attention import efficient_dot_product_attention_pt

from verify.targets.base import Contract, TargetInfo, require_default_scale

INFO = TargetInfo(
    name="mea-torch",
    framework="torch",
    dtypes=("bf16", "fp16", "fp32", "fp64"),
    features=frozenset({"mask", "bias", "causal", "chunks", "grad"}),
    masked_rows="uniform",
    contract=Contract(accumulate="input", round_logits=True, round_probs=True),
    description="memory-efficient-attention 0.1.3, efficient_dot_product_attention_pt",
    notes=(
        "Masked rows: finfo(dtype).min fill -> mean of v ('uniform'), but NaN in fp64 and NaN for -inf bias "
        "(a fully -inf key chunk NaNs its row). Non-divisor chunk sizes are wrong (clamped dynamic_slice: "
        "double-counted keys, too many query rows). Precision: all in the input dtype (logits and exp "
        "weights rounded): causal, B=1, L=64, H=2, D=32, q,k ~ 3*N(0,1), chunks 16: max error 21.5 u*A (bf16), "
        "17.2 u*A (fp16) against mpmath, vs 0.98 u*A for chunked-torch. Gradient via reentrant checkpoint: "
        ".backward() only."
    ),
)


def _pad4(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.reshape((1,) * (4 - x.dim()) + tuple(x.shape))


def _causal_chunk(q_offset, k_offset, mask_chunk, attn_weights, _data):
    """mask_calc_fn: the chunk's top-left causal triangle ('hqk' layout), and-ed with its mask."""
    rows = int(q_offset) + torch.arange(attn_weights.shape[-3], device=attn_weights.device)
    cols = int(k_offset) + torch.arange(attn_weights.shape[-1], device=attn_weights.device)
    tri = (cols[None, :] <= rows[:, None])[None]
    return tri if mask_chunk is None else mask_chunk & tri


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
) -> torch.Tensor:
    """The package's attention on ``[B, L, H, D]`` tensors; out ``[B, Lq, H, Dv]``."""
    dk = q.shape[-1]
    require_default_scale("mea-torch", scale, dk)
    chunks = {}
    if query_chunk_size is not None:
        chunks["query_chunk_size"] = query_chunk_size
    if key_chunk_size is not None:
        chunks["key_chunk_size"] = key_chunk_size
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*use_reentrant", category=UserWarning)
        warnings.filterwarnings("ignore", message=r".*__array_wrap__", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"None of the inputs have requires_grad", category=UserWarning)
        return efficient_dot_product_attention_pt(
            q,
            k,
            v,
            mask=_pad4(mask),
            bias=_pad4(bias),
            mask_calc_fn=_causal_chunk if causal else None,
            **chunks,
        )

"""An example user target: plain PyTorch attention, chunked over queries, with no attnverify imports.

Name it to attnverify (CLI or ``verify.targets.load``) as::

    examples.my_attention:attention --framework torch --features mask,bias,causal,chunks

It has the canonical signature, takes ``[batch, seq, heads, dim]`` tensors, and computes in
float32 (float64 for fp64 inputs), returning the input dtype. Queries are processed
``query_chunk_size`` rows at a time (all at once when None), each chunk against all keys;
``key_chunk_size`` is accepted and ignored. A query row with no visible key returns zeros.
"""

from __future__ import annotations

import math

import torch


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
    """Softmax(scale * q k^T + bias, masked) v, one query chunk at a time."""
    work = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qh, kh, vh = (x.transpose(1, 2).to(work) for x in (q, k, v))  # [B, H, L, D]
    lq, lk = qh.shape[2], kh.shape[2]
    step = query_chunk_size or lq
    outs = []
    for start in range(0, lq, step):
        rows = slice(start, min(start + step, lq))
        s = (qh[:, :, rows] @ kh.transpose(-1, -2)) * scale
        if bias is not None:
            s = s + _rows(bias, rows).to(work)
        if mask is not None:
            s = s.masked_fill(~_rows(mask, rows), float("-inf"))
        if causal:
            i = torch.arange(lq, device=s.device)[rows, None]
            s = s.masked_fill(torch.arange(lk, device=s.device) > i, float("-inf"))
        top = s.amax(dim=-1, keepdim=True)
        e = torch.exp(s - torch.where(torch.isinf(top), 0.0, top))
        total = e.sum(dim=-1, keepdim=True)
        outs.append((e / torch.where(total > 0, total, 1.0)) @ vh)
    return torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)


def _rows(x: torch.Tensor, rows: slice) -> torch.Tensor:
    """The query rows of a mask or bias broadcastable to [B, H, Lq, Lk]."""
    return x if x.dim() < 2 or x.shape[-2] == 1 else x[..., rows, :]

"""PyTorch targets for the harness's tests whose gradients come from autograd: masked-row mechanisms.

``fill_mask`` is what many real kernels do: masked logits are filled with ``finfo.min``, a bias is
added as is. So a row the mask empties averages all values (the ``uniform`` policy), and a row a
``-inf`` bias empties is NaN (``exp(-inf - -inf)``): policy ``mask:uniform,bias:nan``.
``additive_fill`` adds ``finfo.min`` to the masked logits instead of selecting it: the uniform
softmax then passes gradient to q and k of the masked rows.
"""

from __future__ import annotations

import math

import torch


def _attention(q, k, v, mask, bias, scale, causal, additive):
    dt = q.dtype
    q, k, v = (x.float() if dt != torch.float64 else x for x in (q, k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if bias is not None:
        s = s + bias.to(s.dtype)
    keep = torch.ones(s.shape[-2:], dtype=torch.bool)
    if causal:
        keep = torch.ones(s.shape[-2:], dtype=torch.bool).tril()
    if mask is not None:
        keep = keep & mask
    fill = torch.finfo(s.dtype).min
    s = s + torch.where(keep, 0.0, fill) if additive else torch.where(keep, s, fill)
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v).to(dt)


def fill_mask(q, k, v, *, mask=None, bias=None, scale=None, causal=False):
    return _attention(q, k, v, mask, bias, scale, causal, additive=False)


def additive_fill(q, k, v, *, mask=None, bias=None, scale=None, causal=False):
    return _attention(q, k, v, mask, bias, scale, causal, additive=True)


for _fn in (fill_mask, additive_fill):
    _fn.attnverify = {"framework": "torch", "features": ["mask", "bias", "causal", "grad"],
                      "contract": {"accumulate": "fp32", "round_logits": False, "round_probs": False},
                      "dtypes": ["fp32", "bf16"]}
fill_mask.attnverify["masked_rows"] = "mask:uniform,bias:nan"
additive_fill.attnverify["masked_rows"] = "uniform"


def causal_strict(q, k, v, *, mask=None, bias=None, scale=None, causal=False):
    """A seeded bug: causal masking that also hides the diagonal (``j < i`` instead of ``j <= i``)."""
    if causal:
        strict = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril(-1)
        mask = strict if mask is None else mask & strict
    return _attention(q, k, v, mask, bias, scale, False, additive=False)

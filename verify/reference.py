"""The exact answer for a case: forward values, probabilities and gradients, and which reference decided.

One function, ``exact``, gives every consumer (fuzz checks, accuracy sweeps, ``repro``) the same
truth and says which reference decided it (``Exact.reference``): the mp oracle (``"mp"``), or for
long sequences the float64 naive reference where it vouches for every row (``"naive64"``). The
probabilities ``p`` feed the tolerance model's absolute-value scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from oracles import mp, naive, spec
from verify.case import Case


@dataclass
class Exact:
    """The exact values of one case (float64): output, lse, probabilities and, when asked, gradients."""

    out: np.ndarray
    lse: np.ndarray
    p: np.ndarray  # [B, Hq, Lq, Lk], 0 for invisible keys
    grads: dict[str, np.ndarray] | None = None
    reference: str = "mp"  # which reference decided: "mp" or "naive64"
    p_sink: np.ndarray | None = None  # [B, Hq, Lq]: the sink's probability, with sinks


def _probs64(case: Case, masked_rows: str) -> np.ndarray:
    """Float64 softmax probabilities [B, Hq, Lq, Lk] (0 on masked rows), for cases without softcap, ALiBi, sinks."""
    att = spec.normalize(case.q, case.k, case.v, masked_rows=masked_rows, **case.semantics())
    q = spec.to_heads_first(att.q.astype(np.float64))
    k = spec.to_heads_first(att.k.astype(np.float64))[:, att.kv_head]
    s = att.scale_float() * (q @ np.swapaxes(k, -1, -2))
    if att.bias is not None:
        s = s + np.where(att.visible, att.bias.astype(np.float64), 0.0)
    s = np.where(att.visible, s, -np.inf)
    m = s.max(-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(m), m, 0.0))
    total = e.sum(-1, keepdims=True)
    return np.where(total > 0, e / np.where(total > 0, total, 1.0), 0.0)


def _grads(res: object) -> dict[str, np.ndarray]:
    return {n: getattr(res, n) for n in ("dq", "dk", "dv", "dbias", "dsinks") if getattr(res, n) is not None}


def exact(case: Case, masked_rows: str, grad: bool, mp_max_len: int | None = None) -> Exact:
    """Oracle values for ``case`` (and its VJP for ``case.g`` when ``grad``).

    With ``mp_max_len``, a case longer than that is decided by the float64 naive reference when it
    flags every row reliable; otherwise (and always without ``mp_max_len``) by the mp oracle.
    """
    grad = grad and case.g is not None
    kw = dict(case.semantics(), masked_rows=masked_rows)
    vjp_kw = dict(kw, g_lse=case.g_lse)
    simple = all(kw[k] is None for k in ("softcap", "alibi_slopes", "sinks")) and case.g_lse is None
    if simple and mp_max_len is not None and max(case.dims["Lq"], case.dims["Lk"]) > mp_max_len:
        args = (case.q, case.k, case.v, case.g) if grad else (case.q, case.k, case.v)
        r64 = naive.attention_vjp(*args, **vjp_kw) if grad else naive.attention(*args, **kw)
        if r64.reliable.all():
            return Exact(r64.out, r64.lse, _probs64(case, masked_rows), _grads(r64) if grad else None, "naive64")
    if grad:
        res = mp.attention_vjp(case.q, case.k, case.v, case.g, probs=True, **vjp_kw)
        return Exact(res.out, res.lse, res.p, _grads(res), p_sink=res.p_sink)
    res = mp.attention(case.q, case.k, case.v, probs=True, **kw)
    return Exact(res.out, res.lse, res.p, p_sink=res.p_sink)

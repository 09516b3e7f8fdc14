"""chunked-torch: the paper's chunked attention (Rabe & Staats) in PyTorch, corrected and general.

What it computes is exactly ``oracles.spec``: any chunk sizes (1, non-divisors, ``>= L``), a bool
mask (True = attend) and a float bias (``-inf`` masks), both broadcastable to ``[B, Hq, Lq, Lk]``,
causal masking aligned top-left or bottom-right, sliding windows, softcap, ALiBi, attention sinks,
packed sequences (segment ids), grouped-query attention, ``Dk != Dv``, and lse on request; a row
with no visible key (and no sink) gives output 0, lse -inf and zero gradients.

How:

- Queries are processed ``query_chunk_size`` rows at a time, keys ``key_chunk_size`` at a time,
  with the online softmax: a running row max ``m``, running sum ``l`` and running output, each
  rescaled by ``exp(m_old - m_new)`` when the max grows. A max that is still ``-inf`` (nothing
  visible yet) is replaced by 0 before subtracting, so ``exp(-inf - (-inf))`` never happens. Key
  chunks that no query of the chunk can see (causal, window) are skipped.
- Logits per block: ``t = (scale q) k^T`` in the accumulation dtype, ``c tanh(t / c)`` with a
  softcap, plus the bias, minus ``slope * |i + off - j|``; invisible keys (mask, -inf bias,
  causal, window, segments) are ``-inf``. A sink joins after the last key chunk as one more term
  of the max and the sum, with no value (a ``-inf`` sink changes nothing, bit for bit).
- Statistics, logits, probabilities and the output accumulator are float32 for bf16/fp16
  inputs (the input dtype for fp32/fp64): each chunk is upcast before its matmuls, nothing is
  rounded to the input dtype before ``p @ v``, and the output is rounded once at the end; lse is
  returned in that dtype.
- The gradient is a custom ``torch.autograd.Function``: the forward saves only the inputs, the
  output (accumulation dtype) and ``lse``; the backward recomputes each (query chunk, key chunk)
  block of probabilities as ``exp(s - lse)`` and accumulates ``dq, dk, dv, dbias`` from
  ``ds = p (g v^T - delta + g_lse)`` (``ds * (1 - tanh^2)`` for ``dq, dk`` with a softcap) and
  ``dsinks = sum p_sink (g_lse - delta)``. No ``[Lq, Lk]``-sized tensor exists in either pass (only
  ``dbias``, when the bias itself has that shape). Grouped-query heads are folded into the query
  rows of a chunk, so one batched matmul serves all query heads of a kv head without copying keys.

Default chunk sizes (``None``) are the paper listing's: 1024 queries and 4096 keys per chunk.
"""

from __future__ import annotations

import math

import torch

from verify.targets.base import Contract, TargetInfo

DEFAULT_QUERY_CHUNK = 1024
DEFAULT_KEY_CHUNK = 4096

INFO = TargetInfo(
    name="chunked-torch",
    framework="torch",
    dtypes=("bf16", "fp16", "fp32", "fp64"),
    features=frozenset({"mask", "bias", "causal", "gqa", "chunks", "grad", "lse", "bottom-right", "window",
                        "softcap", "alibi", "sinks", "segments"}),
    masked_rows="zeros",
    contract=Contract(accumulate="fp32", round_logits=False, round_probs=False),
    description="the paper's chunked attention in PyTorch, corrected and extended (custom autograd.Function)",
    notes=(
        "Online softmax over key chunks with fp32 statistics, logits, probabilities and output "
        "accumulator for bf16/fp16 (input dtype for fp32/fp64); output rounded once, lse in the accumulation "
        "dtype. Masked rows: max replaced by 0 while -inf, output 0 where the row sum is 0, so out 0, lse -inf, "
        "zero grads."
    ),
)

_NEG_INF = float("-inf")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _as5(x: torch.Tensor | None, name: str, hq: int, hkv: int) -> torch.Tensor | None:
    """A mask/bias broadcastable to [B, Hq, Lq, Lk] as a [b, hkv|1, group|1, lq, lk] view."""
    if x is None:
        return None
    if x.dim() > 4:
        raise ValueError(f"{name} has {x.dim()} dims; it must broadcast to [B, Hq, Lq, Lk]")
    b, h, lq, lk = (1,) * (4 - x.dim()) + tuple(x.shape)
    if h not in (1, hq):
        raise ValueError(f"{name} has {h} heads; it must broadcast to Hq={hq}")
    return x.reshape(b, 1, 1, lq, lk) if h == 1 else x.reshape(b, hkv, hq // hkv, lq, lk)


def _block_index(x: torch.Tensor, i0: int, i1: int, j0: int, j1: int) -> tuple:
    """Index of the (rows i0:i1, cols j0:j1) block of a 5-d mask/bias, keeping broadcast dims."""
    rows = slice(i0, i1) if x.shape[-2] > 1 else slice(None)
    cols = slice(j0, j1) if x.shape[-1] > 1 else slice(None)
    return (Ellipsis, rows, cols)


class _Problem:
    """The inputs of one call in the internal layout, and the per-block logits."""

    def __init__(self, q, k, v, mask, bias, slopes, sinks, q_seg, kv_seg, opts) -> None:
        scale, causal, align, window, softcap, query_chunk, key_chunk = opts
        b, self.lq, hq, dk = q.shape
        _, self.lk, hkv, self.dv = v.shape
        if k.shape[:3] != v.shape[:3] or k.shape[0] != b or k.shape[3] != dk or hq % hkv:
            raise ValueError(
                f"shapes q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} do not form an attention call"
            )
        if mask is not None and mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool (True = attend), got {mask.dtype}")
        if align not in ("top-left", "bottom-right"):
            raise ValueError(f"align must be 'top-left' or 'bottom-right', got {align!r}")
        self.g = hq // hkv
        self.b, self.hkv, self.dk = b, hkv, dk
        self.acc = _acc_dtype(q.dtype)
        self.scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
        self.causal, self.window, self.softcap = causal, window, softcap
        self.off = self.lk - self.lq if align == "bottom-right" else 0
        self.qc = _chunk(query_chunk, DEFAULT_QUERY_CHUNK, "query_chunk_size")
        self.kc = _chunk(key_chunk, DEFAULT_KEY_CHUNK, "key_chunk_size")
        self.q5 = q.reshape(b, self.lq, hkv, self.g, dk).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, Lq, Dk]
        self.k4 = k.transpose(1, 2)  # [B, Hkv, Lk, Dk]
        self.v4 = v.transpose(1, 2)  # [B, Hkv, Lk, Dv]
        self.mask5 = _as5(mask, "mask", hq, hkv)
        self.bias5 = _as5(bias, "bias", hq, hkv)
        self.slopes5 = None  # [B|1, Hkv, G, 1, 1]
        if slopes is not None:
            s = slopes.to(self.acc)
            s = s.reshape(1, hq) if s.dim() == 1 else s
            self.slopes5 = s.reshape(s.shape[0], hkv, self.g, 1, 1)
        self.sinks5 = None if sinks is None else sinks.to(self.acc).reshape(1, hkv, self.g, 1)  # [1, Hkv, G, 1]
        self.q_seg, self.kv_seg = q_seg, kv_seg

    def query_chunks(self):
        for i0 in range(0, self.lq, self.qc):
            yield i0, min(i0 + self.qc, self.lq)

    def key_chunks(self, i0: int, i1: int):
        """Key chunks that can hold a visible key for queries i0..i1-1 (causal and window bounds)."""
        lo, hi = 0, self.lk  # keys [lo, hi) some row of the chunk may see
        left, right = self.window if self.window is not None else (None, None)
        if self.causal:
            hi = min(hi, i1 - 1 + self.off + 1)
        if right is not None:
            hi = min(hi, i1 - 1 + self.off + right + 1)
        if left is not None:
            lo = max(lo, i0 + self.off - left)
        for j0 in range((max(lo, 0) // self.kc) * self.kc, hi, self.kc):
            yield j0, min(j0 + self.kc, self.lk)

    def scaled_queries(self, i0: int, i1: int) -> torch.Tensor:
        """scale * q for rows i0:i1 in the accumulation dtype, as [B, Hkv, G*n, Dk]."""
        q = self.q5[..., i0:i1, :].to(self.acc) * self.scale
        return q.reshape(self.b, self.hkv, self.g * (i1 - i0), self.dk)

    def keys(self, j0: int, j1: int) -> torch.Tensor:
        return self.k4[:, :, j0:j1].to(self.acc)

    def values(self, j0: int, j1: int) -> torch.Tensor:
        return self.v4[:, :, j0:j1].to(self.acc)

    def logits(self, qs: torch.Tensor, kj: torch.Tensor, i0: int, i1: int, j0: int, j1: int
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of one block as [B, Hkv, G, n, w], -inf where a key is not visible, and tanh(t/c) with a softcap."""
        s = (qs @ kj.transpose(-1, -2)).view(self.b, self.hkv, self.g, i1 - i0, j1 - j0)
        th = None
        if self.softcap is not None:
            th = torch.tanh(s / self.softcap)
            s = self.softcap * th
        if self.bias5 is not None:
            s = s + self.bias5[_block_index(self.bias5, i0, i1, j0, j1)].to(self.acc)
        rows = torch.arange(i0, i1, device=s.device)[:, None] + self.off
        cols = torch.arange(j0, j1, device=s.device)[None, :]
        if self.slopes5 is not None:
            s = s - self.slopes5 * (rows - cols).abs().to(self.acc)
        visible = None if self.mask5 is None else self.mask5[_block_index(self.mask5, i0, i1, j0, j1)]

        def both(extra: torch.Tensor) -> torch.Tensor:
            return extra if visible is None else visible & extra

        if self.causal:
            visible = both(cols <= rows)
        if self.window is not None:
            left, right = self.window
            if left is not None:
                visible = both(cols >= rows - left)
            if right is not None:
                visible = both(cols <= rows + right)
        if self.q_seg is not None:
            same = self.q_seg[:, i0:i1, None] == self.kv_seg[:, None, j0:j1]  # [B, n, w]
            visible = both(same[:, None, None])
        return (s if visible is None else s.masked_fill(~visible, _NEG_INF)), th


def _chunk(size: int | None, default: int, name: str) -> int:
    if size is None:
        return default
    if int(size) != size or size < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {size!r}")
    return int(size)


def _without_neg_inf(x: torch.Tensor) -> torch.Tensor:
    """x with -inf replaced by 0: the shift used for rows that have no visible key (yet)."""
    return x.masked_fill(x == _NEG_INF, 0.0)


def _forward(pb: _Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """Output [B, Hkv, G, Lq, Dv] and lse [B, Hkv, G, Lq], both in the accumulation dtype."""
    shape = (pb.b, pb.hkv, pb.g)
    device = pb.q5.device
    out = torch.empty(*shape, pb.lq, pb.dv, dtype=pb.acc, device=device)
    lse = torch.empty(*shape, pb.lq, dtype=pb.acc, device=device)
    for i0, i1 in pb.query_chunks():
        n = i1 - i0
        qs = pb.scaled_queries(i0, i1)
        m = torch.full((*shape, n), _NEG_INF, dtype=pb.acc, device=device)
        l_sum = torch.zeros_like(m)
        acc = torch.zeros(*shape, n, pb.dv, dtype=pb.acc, device=device)
        for j0, j1 in pb.key_chunks(i0, i1):
            s, _ = pb.logits(qs, pb.keys(j0, j1), i0, i1, j0, j1)
            m_new = torch.maximum(m, s.amax(dim=-1))
            shift = _without_neg_inf(m_new)
            p = (s - shift[..., None]).exp_()
            alpha = torch.exp(m - shift)
            l_sum = l_sum * alpha + p.sum(dim=-1)
            pv = p.reshape(pb.b, pb.hkv, pb.g * n, j1 - j0) @ pb.values(j0, j1)
            acc = acc * alpha[..., None] + pv.view(*shape, n, pb.dv)
            m = m_new
        if pb.sinks5 is not None:  # the sink: one more logit of the max and the sum, with no value
            sink = pb.sinks5.expand(*shape, n)
            m_new = torch.maximum(m, sink)
            shift = _without_neg_inf(m_new)
            alpha = torch.exp(m - shift)
            l_sum = l_sum * alpha + torch.exp(sink - shift)
            acc = acc * alpha[..., None]
            m = m_new
        seen = l_sum > 0
        out[..., i0:i1, :] = torch.where(seen[..., None], acc / torch.where(seen, l_sum, 1.0)[..., None], 0.0)
        lse[..., i0:i1] = _without_neg_inf(m) + torch.log(l_sum)
    return out, lse


def _backward(pb: _Problem, out: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, g_lse: torch.Tensor | None,
              want_bias: bool):
    """dq [B, Hkv, G, Lq, Dk], dk, dv [B, Hkv, Lk, D], dbias (5-d) and dsinks [Hkv, G] in the accumulation dtype."""
    shape = (pb.b, pb.hkv, pb.g)
    g5 = g.reshape(pb.b, pb.lq, pb.hkv, pb.g, pb.dv).permute(0, 2, 3, 1, 4).to(pb.acc)
    delta = (g5 * out).sum(dim=-1)  # [B, Hkv, G, Lq]
    extra = -delta if g_lse is None else g_lse.reshape(pb.b, pb.hkv, pb.g, pb.lq).to(pb.acc) - delta
    shift = _without_neg_inf(lse)
    dq = torch.zeros(*shape, pb.lq, pb.dk, dtype=pb.acc, device=g.device)
    dk = torch.zeros(pb.b, pb.hkv, pb.lk, pb.dk, dtype=pb.acc, device=g.device)
    dv = torch.zeros(pb.b, pb.hkv, pb.lk, pb.dv, dtype=pb.acc, device=g.device)
    dbias = torch.zeros(pb.bias5.shape, dtype=pb.acc, device=g.device) if want_bias else None
    dsinks = None
    if pb.sinks5 is not None:  # p_sink = exp(sigma - lse); an lse of -inf (empty, no sink) gives 0
        p_sink = torch.where(lse == _NEG_INF, 0.0, torch.exp(pb.sinks5 - shift))
        dsinks = (p_sink * extra).sum(dim=(0, 3))
    for i0, i1 in pb.query_chunks():
        n = i1 - i0
        rows = pb.g * n
        qs = pb.scaled_queries(i0, i1)
        gi = g5[..., i0:i1, :].reshape(pb.b, pb.hkv, rows, pb.dv)
        extra_i = extra[..., i0:i1].reshape(pb.b, pb.hkv, rows, 1)
        shift_i = shift[..., i0:i1, None]
        dq_i = torch.zeros(pb.b, pb.hkv, rows, pb.dk, dtype=pb.acc, device=g.device)
        for j0, j1 in pb.key_chunks(i0, i1):
            kj = pb.keys(j0, j1)
            s, th = pb.logits(qs, kj, i0, i1, j0, j1)
            p = (s - shift_i).exp_().view(pb.b, pb.hkv, rows, j1 - j0)
            dv[:, :, j0:j1] += p.transpose(-1, -2) @ gi
            ds = (gi @ pb.values(j0, j1).transpose(-1, -2)).add_(extra_i).mul_(p)
            dt = ds if th is None else ds * (1 - th * th).view(pb.b, pb.hkv, rows, j1 - j0)
            dq_i += dt @ kj
            dk[:, :, j0:j1] += dt.transpose(-1, -2) @ qs  # qs carries the scale
            if dbias is not None:
                ds5 = ds.view(*shape, n, j1 - j0)
                dims = [d for d in range(5) if dbias.shape[d] == 1 and ds5.shape[d] != 1]
                dbias[_block_index(dbias, i0, i1, j0, j1)] += ds5.sum(dim=dims, keepdim=True) if dims else ds5
        dq[..., i0:i1, :] = dq_i.view(*shape, n, pb.dk) * pb.scale
    return dq, dk, dv, dbias, dsinks


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, sinks, mask, slopes, q_seg, kv_seg, opts):
        pb = _Problem(q, k, v, mask, bias, slopes, sinks, q_seg, kv_seg, opts)
        out, lse = _forward(pb)
        ctx.save_for_backward(q, k, v, bias, sinks, mask, slopes, q_seg, kv_seg, out, lse)
        ctx.opts = opts
        b, hq = q.shape[0], q.shape[2]
        lse_out = lse.reshape(b, hq, pb.lq)
        return out.permute(0, 3, 1, 2, 4).reshape(b, pb.lq, hq, pb.dv).to(q.dtype), lse_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, g_lse):
        q, k, v, bias, sinks, mask, slopes, q_seg, kv_seg, out, lse = ctx.saved_tensors
        pb = _Problem(q, k, v, mask, bias, slopes, sinks, q_seg, kv_seg, ctx.opts)
        want_bias = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias, dsinks = _backward(pb, out, lse, g, g_lse, want_bias)
        dq = dq.permute(0, 3, 1, 2, 4).reshape(q.shape).to(q.dtype)
        dk = dk.transpose(1, 2).to(k.dtype)
        dv = dv.transpose(1, 2).to(v.dtype)
        if dbias is not None:
            dbias = dbias.reshape(bias.shape).to(bias.dtype)
        if dsinks is not None:
            dsinks = dsinks.reshape(sinks.shape).to(sinks.dtype)
        return dq, dk, dv, dbias, dsinks, None, None, None, None, None


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
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    q_segment_ids: torch.Tensor | None = None,
    kv_segment_ids: torch.Tensor | None = None,
    return_lse: bool = False,
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked attention, ``[B, L, H, D]`` layout; out ``[B, Lq, Hq, Dv]`` in q's dtype (and lse) -- see the module."""
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
    opts = (scale, bool(causal), align, None if window is None else tuple(window), softcap, query_chunk_size,
            key_chunk_size)
    out, lse = _ChunkedAttention.apply(q, k, v, bias, sinks, mask, alibi_slopes, q_segment_ids, kv_segment_ids,
                                       opts)
    return (out, lse) if return_lse else out

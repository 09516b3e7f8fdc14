"""A chunked PyTorch attention taking every modern option, with a switch that seeds exactly one bug.

The clean algorithm (``bug="none"``) computes exactly ``oracles.spec``: the extended canonical
signature (``align``, ``window``, ``softcap``, ``alibi_slopes``, ``sinks``, segment ids,
``return_lse``) in the chunked softmax of Rabe & Staats:

- keys are cut into chunks of ``key_chunk_size`` (``None``: ``DEFAULT_KEY_CHUNK``; a shorter last
  chunk when the size does not divide Lk); each chunk is summarised by its own max ``m_c`` and sum
  ``l_c = sum exp(s - m_c)`` (a max of -inf, a chunk with nothing visible, is shifted by 0), and the
  summaries are combined with the row max ``m = max(max_c m_c, sigma)``: weights ``exp(m_c - m)``,
  ``l = sum_c exp(m_c - m) l_c (+ exp(sigma - m))``, ``out = sum_j exp(m_c - m) exp(s_j - m_c) v_j / l``.
  The chunks are summarised side by side (one batched tensor, not a Python loop), so a campaign's
  chunk size 1 at Lk ~ 2000 costs what one chunk does; ``query_chunk_size`` is validated and
  accepted, but rows are independent and computed together (no bug of this module lives in query
  chunks: ``tests.mutants.chunked`` covers those);
- logits: ``t = scale * q.k`` in the accumulation dtype, ``c * tanh(t / c)`` with a softcap,
  ``+ bias``, ``- slope_h * |i + off - j|`` (``off = Lk - Lq`` bottom-right, else 0); keys hidden by
  the mask, a ``-inf`` bias, causal (``j <= i + off``), the window
  (``i + off - left <= j <= i + off + right``, ``None`` unbounded) or segment ids are ``-inf``;
- a sink ``sigma_h`` is one more term of the max and of the sum, with no value (``-inf``: exactly no
  sink, bit for bit; ``+inf``: out 0, lse ``+inf``);
- statistics, logits, probabilities and the accumulator are float32 for bf16/fp16/fp32 inputs
  (float64 for float64), the output is rounded once to the input dtype, lse is returned in the
  accumulation dtype; a row with no visible key and no sink gives out 0, lse ``-inf``, zero gradients.

The backward pass (``torch.autograd.Function``, hand-written) recomputes the probabilities from the
saved lse (``+inf`` internally for empty rows, so that ``exp(s - lse) = 0`` there) and applies
``ds = p (g.v - delta + g_lse)``, ``delta = g.o``; with a softcap the cotangent of ``t`` is
``ds (1 - tanh^2(t / c))``; ``dq = scale dt k``, ``dk = scale dt^T q``, ``dv = p^T g``, ``dbias = ds``
reduced to bias's shape, ``dsinks_h = sum p_sink (g_lse - delta)``; kv-head gradients sum over their
query heads. Forward bugs get the gradient of their own (buggy) logits.

Each name in ``BUGS`` other than ``"none"`` changes one step (marked ``BUG``); ``make`` returns the
canonical callable for one of them.
"""

from __future__ import annotations

import math

import torch

from tests.mutants.calls import check_call

BUGS = (
    "none",
    "softcap_s_tanh",
    "softcap_no_grad",
    "window_right_clip",
    "window_none_literal",
    "causal_ignores_align",
    "alibi_no_offset",
    "alibi_sign",
    "sink_not_in_sum",
    "sink_not_in_max",
    "lse_no_sink",
    "dsinks_sign",
    "segments_last_chunk",
    "empty_lse_posinf",
)
DEFAULT_KEY_CHUNK = 16
_NEG_INF = -math.inf
_POS_INF = math.inf


def _chunk(size: int | None, name: str) -> int | None:
    if size is None:
        return None
    if isinstance(size, bool) or int(size) != size or size < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {size!r}")
    return int(size)


def _reduce_to(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a ``[B, Hq, Lq, Lk]`` tensor over the axes that ``shape`` broadcasts."""
    padded = (1,) * (x.dim() - len(shape)) + tuple(shape)
    axes = [i for i, (have, n) in enumerate(zip(padded, x.shape, strict=True)) if have == 1 and n != 1]
    return (x.sum(dim=axes, keepdim=True) if axes else x).reshape(shape)


def _shifted(m: torch.Tensor) -> torch.Tensor:
    """The shift of a running max: 0 while it is still -inf (nothing visible yet)."""
    return m.masked_fill(m == _NEG_INF, 0.0)


class _Problem:
    """One call's inputs in compute layout and dtype (heads first, kv heads expanded), its chunks and logits."""

    def __init__(self, q, k, v, mask, bias, slopes, sinks, q_seg, kv_seg, opts, bug) -> None:
        scale, causal, align, window, softcap, key_chunk = opts
        check_call(q, k, v, mask, align)
        b, lq, hq, dk = q.shape
        _, lk, hkv, dv = v.shape
        self.bug = bug
        self.cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.b, self.lq, self.lk, self.hq, self.hkv, self.dk, self.dv = b, lq, lk, hq, hkv, dk, dv
        self.kv_head = torch.arange(hq, device=q.device) // (hq // hkv)
        self.q = q.transpose(1, 2).to(self.cdt)  # [B, Hq, Lq, Dk]
        self.k = k.transpose(1, 2).to(self.cdt)[:, self.kv_head]  # [B, Hq, Lk, Dk]
        self.v = v.transpose(1, 2).to(self.cdt)[:, self.kv_head]  # [B, Hq, Lk, Dv]
        shape4 = (b, hq, lq, lk)
        self.mask = None if mask is None else torch.broadcast_to(mask, shape4)
        self.bias = None if bias is None else torch.broadcast_to(bias, shape4)
        self.scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
        self.causal, self.softcap = bool(causal), softcap
        self.off = lk - lq if align == "bottom-right" else 0
        self.causal_off = 0 if bug == "causal_ignores_align" else self.off  # BUG causal_ignores_align: top-left
        self.left, self.right = (None, None) if window is None else window
        if window is not None and bug == "window_none_literal":
            # BUG window_none_literal: "unbounded" becomes FlashAttention's -1 sentinel, then used as a size
            self.left, self.right = (-1 if w is None else w for w in window)
        if self.right is not None and self.right >= lk and bug == "window_right_clip":
            self.right = max(lk - lq, 0)  # BUG window_right_clip: a right window >= Lk clipped to Lk - Lq
        self.has_window = window is not None
        self.slopes = None  # [B|1, Hq, 1, 1]
        if slopes is not None:
            s = slopes.to(self.cdt)
            self.slopes = (s.reshape(1, hq) if s.dim() == 1 else s)[:, :, None, None]
        self.sinks = None if sinks is None else sinks.to(self.cdt).reshape(1, hq, 1)
        self.q_seg, self.kv_seg = q_seg, kv_seg
        self.kc = min(_chunk(key_chunk, "key_chunk_size") or DEFAULT_KEY_CHUNK, lk)  # > Lk: one chunk

    def chunk_starts(self) -> list[int]:
        """Where each key chunk starts (the last one is shorter when ``kc`` does not divide Lk)."""
        return list(range(0, self.lk, self.kc))

    def logits(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``[B, Hq, Lq, Lk]`` (-inf where hidden) and, with a softcap, ``ds/dt`` of the cap."""
        bug = self.bug
        t = (self.q @ self.k.transpose(-1, -2)) * self.scale
        s, dcap = t, None
        if self.softcap is not None:
            c = self.softcap
            if bug == "softcap_s_tanh":
                th = torch.tanh(t)
                s, dcap = t * th, th + t * (1 - th * th)  # BUG softcap_s_tanh: t * tanh(t), not c * tanh(t / c)
            else:
                th = torch.tanh(t / c)
                s, dcap = c * th, 1 - th * th
        if self.bias is not None:
            s = s + self.bias.to(self.cdt)
        rows = torch.arange(self.lq, device=s.device)[:, None]
        cols = torch.arange(self.lk, device=s.device)[None, :]
        aligned = rows + self.off
        if self.slopes is not None:
            dist = ((rows if bug == "alibi_no_offset" else aligned) - cols).abs().to(self.cdt)  # BUG alibi_no_offset
            s = s + self.slopes * dist if bug == "alibi_sign" else s - self.slopes * dist  # BUG alibi_sign
        visible = torch.ones(s.shape, dtype=torch.bool, device=s.device)
        if self.mask is not None:
            visible = visible & self.mask
        if self.bias is not None:
            visible = visible & (self.bias != _NEG_INF)
        if self.causal:
            visible = visible & (cols <= rows + self.causal_off)
        if self.has_window and self.left is not None:
            visible = visible & (cols >= aligned - self.left)
        if self.has_window and self.right is not None:
            visible = visible & (cols <= aligned + self.right)
        if self.q_seg is not None:
            same = self.q_seg[:, :, None] == self.kv_seg[:, None, :]  # [B, Lq, Lk]
            if bug == "segments_last_chunk":
                same = same | (cols >= self.chunk_starts()[-1])  # BUG segments_last_chunk: not checked there
            visible = visible & same[:, None]
        return s.masked_fill(~visible, _NEG_INF), dcap

    def to_kv_heads(self, grad: torch.Tensor) -> torch.Tensor:
        """A ``[B, Hq, Lk, D]`` gradient summed into its kv heads, as ``[B, Lk, Hkv, D]``."""
        b, _, lk, d = grad.shape
        return grad.new_zeros(b, self.hkv, lk, d).index_add_(1, self.kv_head, grad).transpose(1, 2)


def _forward(pb: _Problem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output ``[B, Hq, Lq, Dv]``, the lse returned and the lse the backward uses (+inf for empty rows)."""
    bug = pb.bug
    s, _ = pb.logits()
    nc = len(pb.chunk_starts())
    pad = nc * pb.kc - pb.lk
    chunks = torch.nn.functional.pad(s, (0, pad), value=_NEG_INF).view(pb.b, pb.hq, pb.lq, nc, pb.kc)
    m_c = chunks.amax(dim=-1)  # each chunk's own max ...
    e = torch.exp(chunks - _shifted(m_c)[..., None])
    l_c = e.sum(dim=-1)  # ... and sum relative to it
    m = m_c.amax(dim=-1)  # the row max over the chunks' maxima
    if pb.sinks is not None:
        sink = pb.sinks.expand(pb.b, pb.hq, pb.lq)
        m_all = m if bug == "sink_not_in_max" else torch.maximum(m, sink)  # BUG sink_not_in_max
    else:
        m_all = m
    shift = _shifted(m_all)
    w_c = torch.exp(m_c - shift[..., None])  # each chunk rescaled from its max to the row's
    if pb.sinks is not None:
        w_c = torch.where((sink == _POS_INF)[..., None], 0.0, w_c)  # a +inf sink takes all the weight
    l_keys = (w_c * l_c).sum(dim=-1)
    p = (e * w_c[..., None]).view(pb.b, pb.hq, pb.lq, nc * pb.kc)[..., :pb.lk]
    acc = p @ pb.v
    l_sum = l_keys
    if pb.sinks is not None:
        e_sink = torch.where(sink == _POS_INF, 1.0, torch.exp(sink - shift))
        l_sum = l_keys + (0.0 if bug == "sink_not_in_sum" else e_sink)  # BUG sink_not_in_sum
    seen = l_sum > 0
    out = torch.where(seen[..., None], acc / torch.where(seen, l_sum, 1.0)[..., None], 0.0)
    lse = torch.where(seen, shift + torch.log(torch.where(seen, l_sum, 1.0)), _NEG_INF)
    if pb.sinks is not None:
        lse = torch.where(sink == _POS_INF, _POS_INF, lse)
    lse_bwd = torch.where(seen, lse, _POS_INF)  # exp(s - lse_bwd) = 0 on rows without any weight
    returned = lse
    if bug == "lse_no_sink":
        # BUG lse_no_sink: lse of the keys alone
        returned = torch.where(l_keys > 0, shift + torch.log(torch.where(l_keys > 0, l_keys, 1.0)), _NEG_INF)
    elif bug == "empty_lse_posinf":
        returned = lse_bwd  # BUG empty_lse_posinf: the backward's +inf leaks out for empty rows
    return out, returned, lse_bwd


def _backward(pb: _Problem, out, lse_bwd, g, g_lse, want_bias: bool):
    """dq, dk, dv (``[B, Hq, L, D]``), dbias ``[B, Hq, Lq, Lk]`` (or None) and dsinks ``[Hq]`` (or None)."""
    gh = g.transpose(1, 2).to(pb.cdt)  # [B, Hq, Lq, Dv]
    delta = (gh * out).sum(dim=-1)
    extra = -delta if g_lse is None else g_lse.to(pb.cdt) - delta  # [B, Hq, Lq]
    s, dcap = pb.logits()
    p = torch.exp(s - lse_bwd[..., None])
    dv = p.transpose(-1, -2) @ gh
    ds = p * (gh @ pb.v.transpose(-1, -2) + extra[..., None])
    dbias = ds if want_bias else None
    dt = ds if dcap is None or pb.bug == "softcap_no_grad" else ds * dcap  # BUG softcap_no_grad: no 1 - tanh^2
    dq = (dt @ pb.k) * pb.scale
    dk = (dt.transpose(-1, -2) @ pb.q) * pb.scale
    dsinks = None
    if pb.sinks is not None:
        sink = pb.sinks.expand(pb.b, pb.hq, pb.lq)
        p_sink = torch.where(sink == _POS_INF, 1.0, torch.exp(sink - lse_bwd))
        dsinks = (p_sink * extra).sum(dim=(0, 2))
        if pb.bug == "dsinks_sign":
            dsinks = -dsinks  # BUG dsinks_sign
    return dq, dk, dv, dbias, dsinks


class _ModernAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, sinks, mask, slopes, q_seg, kv_seg, opts, bug):
        pb = _Problem(q, k, v, mask, bias, slopes, sinks, q_seg, kv_seg, opts, bug)
        out, lse, lse_bwd = _forward(pb)
        ctx.save_for_backward(q, k, v, bias, sinks, mask, slopes, q_seg, kv_seg, out, lse_bwd)
        ctx.opts, ctx.bug = opts, bug
        return out.transpose(1, 2).to(q.dtype), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, g_lse):
        q, k, v, bias, sinks, mask, slopes, q_seg, kv_seg, out, lse_bwd = ctx.saved_tensors
        pb = _Problem(q, k, v, mask, bias, slopes, sinks, q_seg, kv_seg, ctx.opts, ctx.bug)
        want_bias = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias, dsinks = _backward(pb, out, lse_bwd, g, g_lse, want_bias)
        dq = dq.transpose(1, 2).to(q.dtype)
        dk = pb.to_kv_heads(dk).to(k.dtype)
        dv = pb.to_kv_heads(dv).to(v.dtype)
        if dbias is not None:
            dbias = _reduce_to(dbias, bias.shape).to(bias.dtype)
        if dsinks is not None:
            dsinks = dsinks.reshape(sinks.shape).to(sinks.dtype)
        return dq, dk, dv, dbias, dsinks, None, None, None, None, None, None


def make(bug: str = "none"):
    """The canonical attention callable (extended signature) with ``bug`` seeded (``"none"``: clean)."""
    if bug not in BUGS:
        raise ValueError(f"unknown bug {bug!r}; known: {', '.join(BUGS)}")

    def attention(q, k, v, *, mask=None, bias=None, scale=None, causal=False, align="top-left", window=None,
                  softcap=None, alibi_slopes=None, sinks=None, q_segment_ids=None, kv_segment_ids=None,
                  return_lse=False, query_chunk_size=None, key_chunk_size=None):
        if (q_segment_ids is None) != (kv_segment_ids is None):
            raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
        _chunk(query_chunk_size, "query_chunk_size")
        opts = (scale, causal, align, None if window is None else tuple(window), softcap, key_chunk_size)
        out, lse = _ModernAttention.apply(q, k, v, bias, sinks, mask, alibi_slopes, q_segment_ids, kv_segment_ids,
                                          opts, bug)
        return (out, lse) if return_lse else out

    attention.__name__ = attention.__qualname__ = f"modern_attention_{bug}"
    return attention

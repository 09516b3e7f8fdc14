"""One chunked attention implementation in PyTorch, with a switch that seeds exactly one bug.

The clean algorithm (``bug="none"``) is the memory-efficient attention of Rabe & Staats in the
normalised online-softmax form of FlashAttention-1:

- queries are processed in chunks of ``query_chunk_size`` rows and keys in chunks of
  ``key_chunk_size`` (``None``: one chunk); non-dividing sizes give a shorter last chunk;
- per query row it keeps the running max ``m``, the running sum ``z = sum exp(s - m)`` and the
  running *normalised* output ``o``; a new key chunk with logits ``s`` updates them as
  ``m' = max(m, max s)``, ``a = exp(m - m')``, ``p = exp(s - m')``, ``z' = a z + sum p``,
  ``o' = (a z / z') o + (p / z') @ v``. Keeping ``o`` normalised bounds it by ``max |v|`` (values
  within a factor 2 of the dtype's maximum are halved while accumulating, and the output is kept
  within ``max |v|``), so values near the maximum never overflow;
- everything (logits, statistics, accumulator) is computed in float32 for bf16/fp16/fp32 inputs
  (float64 for float64 inputs) and the output is rounded once to the input dtype;
- masked logits (mask False, causal ``j > i``, bias ``-inf``) are ``-inf``; a row with no
  visible key keeps ``z = 0`` and returns 0 with zero gradients;
- grouped-query attention expands kv heads by ``h // (Hq // Hkv)``.

The backward pass (``torch.autograd.Function``) recomputes the logits chunk by chunk from the
saved ``m`` and ``z`` (``p = exp(s - m) / z``) and applies ``ds = p * (g.v - g.o)``;
``dq = scale ds k``, ``dk = scale ds^T q``, ``dv = p^T g``, ``dbias = ds`` reduced to the bias's
shape, kv-head gradients summed over their query heads. Chunk layout, visibility and statistics
are shared with the forward pass, so a forward bug gets the gradient of its own forward (except
the two rescaling bugs: their output is no longer a softmax average, which the backward assumes).

Each name in ``BUGS`` other than ``"none"`` changes one step of this algorithm; ``make`` returns
the canonical attention callable for one of them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch

BUGS = (
    "none",
    "key_chunk_end",
    "query_chunk_clamp",
    "no_acc_rescale",
    "no_sum_rescale",
    "mask_last_chunk",
    "causal_local_index",
    "causal_strict",
    "no_max_subtraction",
    "stats_input_dtype",
    "acc_input_dtype",
    "grad_no_delta",
    "grad_dk_no_scale",
    "dbias_scaled",
    "masked_rows_uniform",
    "gqa_modulo",
    "bias_first_chunk",
    "scale_dv",
)

_NEG_INF = -math.inf


def _key_chunks(lk: int, size: int | None, bug: str) -> list[tuple[int, int]]:
    """Key chunks as ``(start, end)``; the last one is shorter when ``size`` does not divide ``lk``."""
    size = lk if size is None else size
    chunks = []
    for start in range(0, lk, size):
        end = min(start + size, lk)
        if bug == "key_chunk_end" and lk % size and end == lk:
            end -= 1  # BUG: off-by-one end of a partial last chunk drops the final key
        if end > start:
            chunks.append((start, end))
    return chunks


def _query_chunks(lq: int, size: int | None, bug: str) -> list[tuple[int, int, int]]:
    """Query chunks as ``(source, destination, rows)``: computed from ``q[source:]``, written at ``destination``."""
    size = lq if size is None else size
    chunks = []
    for start in range(0, lq, size):
        rows = min(size, lq - start)
        source = start
        if bug == "query_chunk_clamp":
            source = max(0, min(start, lq - size))  # BUG: dynamic_slice-style clamped start, overlapped rows
        chunks.append((source, start, rows))
    return chunks


def _reduce_to(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a ``[B, Hq, Lq, Lk]`` tensor over the axes that ``shape`` broadcasts."""
    padded = (1,) * (x.dim() - len(shape)) + tuple(shape)
    axes = [i for i, (have, n) in enumerate(zip(padded, x.shape, strict=True)) if have == 1 and n != 1]
    return (x.sum(dim=axes, keepdim=True) if axes else x).reshape(shape)


class _Setup:
    """The inputs in compute layout and dtype: heads first, kv heads expanded to query heads."""

    def __init__(self, q, k, v, mask, bias, scale, causal, bug) -> None:
        self.bug = bug
        self.dtype = q.dtype
        self.cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        b, lq, hq, dk = q.shape
        _, lk, hkv, dv = v.shape
        heads = torch.arange(hq, device=q.device)
        # BUG gqa_modulo: query head h reads kv head h % Hkv
        self.kv_head = heads % hkv if bug == "gqa_modulo" else heads // (hq // hkv)
        self.hkv, self.lk = hkv, lk
        self.q = q.transpose(1, 2).to(self.cdt)
        self.k = k.transpose(1, 2).to(self.cdt)[:, self.kv_head]
        self.v = v.transpose(1, 2).to(self.cdt)[:, self.kv_head]
        shape4 = (b, hq, lq, lk)
        self.mask = None if mask is None else torch.broadcast_to(mask, shape4)
        self.bias = None if bias is None else torch.broadcast_to(bias, shape4)
        if scale is None:
            scale = 1.0 / math.sqrt(dv if bug == "scale_dv" else dk)  # BUG scale_dv: 1/sqrt(Dv)
        self.scale = float(scale)
        self.causal = causal
        # BUG masked_rows_uniform: a finfo.min fill instead of -inf (fully masked rows average v)
        self.fill = torch.finfo(self.cdt).min if bug == "masked_rows_uniform" else _NEG_INF

    def to_kv_heads(self, grad: torch.Tensor) -> torch.Tensor:
        """A ``[B, Hq, Lk, D]`` gradient summed into its kv heads, as ``[B, Lk, Hkv, D]``."""
        b, _, lk, d = grad.shape
        return grad.new_zeros(b, self.hkv, lk, d).index_add_(1, self.kv_head, grad).transpose(1, 2)

    def lowp(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` rounded to the input dtype (identity for fp32/fp64 inputs)."""
        return x.to(self.dtype).to(self.cdt)

    def has_bias(self, ks: int) -> bool:
        """Whether the bias enters the logits of the key chunk starting at ``ks``."""
        # BUG bias_first_chunk: only the first key chunk gets the bias
        return self.bias is not None and not (self.bug == "bias_first_chunk" and ks > 0)

    def logits(self, r0: int, r1: int, ks: int, ke: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked logits ``[B, Hq, r1-r0, ke-ks]`` of query rows r0:r1 and keys ks:ke, and visibility."""
        bug = self.bug
        s = (self.q[:, :, r0:r1] @ self.k[:, :, ks:ke].transpose(-1, -2)) * self.scale
        visible = torch.ones_like(s, dtype=torch.bool)
        if self.mask is not None and not (bug == "mask_last_chunk" and ke == self.lk):
            visible = visible & self.mask[:, :, r0:r1, ks:ke]  # BUG mask_last_chunk: skipped for the last chunk
        if self.causal:
            rows = torch.arange(r0, r1, device=s.device)[:, None]
            offset = 0 if bug == "causal_local_index" else ks  # BUG causal_local_index: key index local to its chunk
            cols = torch.arange(ke - ks, device=s.device) + offset
            visible = visible & ((cols < rows) if bug == "causal_strict" else (cols <= rows))  # BUG causal_strict
        if self.has_bias(ks):
            bias = self.bias[:, :, r0:r1, ks:ke].to(self.cdt)
            s = s + bias
            visible = visible & (bias != _NEG_INF)
        return s.masked_fill(~visible, self.fill), visible

    def update(self, o, m, z, s, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One online-softmax step: fold the logits ``s`` of a key chunk with values ``v`` into ``(o, m, z)``."""
        bug = self.bug
        if bug == "no_max_subtraction":
            m_new = torch.zeros_like(m)  # BUG: exp of raw logits
        else:
            m_new = torch.maximum(m, s.amax(dim=-1))
        if bug == "stats_input_dtype":
            m_new = self.lowp(m_new)  # BUG: running max kept in the input dtype
        shift = torch.where(m_new == _NEG_INF, 0.0, m_new)
        alpha = torch.exp(m - shift)
        p = torch.exp(s - shift[..., None])
        z_new = (z if bug == "no_sum_rescale" else alpha * z) + p.sum(dim=-1)  # BUG no_sum_rescale
        if bug == "stats_input_dtype":
            z_new = self.lowp(z_new)  # BUG: running sum kept in the input dtype
        denom = torch.where(z_new == 0, 1.0, z_new)
        carry = (z if bug == "no_acc_rescale" else alpha * z) / denom  # BUG no_acc_rescale
        o_new = o * carry[..., None] + (p / denom[..., None]) @ v
        if bug == "acc_input_dtype":
            o_new = self.lowp(o_new)  # BUG: output accumulator kept in the input dtype
        return o_new, m_new, z_new


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, bias, scale, causal, query_chunk_size, key_chunk_size, bug):
        st = _Setup(q, k, v, mask, bias, scale, causal, bug)
        b, hq, lq, _ = st.q.shape
        dv = st.v.shape[-1]
        o = st.q.new_zeros(b, hq, lq, dv)
        m = st.q.new_full((b, hq, lq), _NEG_INF)
        z = st.q.new_zeros(b, hq, lq)
        # Values within a factor 2 of the dtype's maximum are halved (exactly) while accumulating and the
        # output doubled back, then kept within max |v| (it is a convex combination of v): rounded weights
        # may sum a few ulps past 1, which must not overflow a running average or the output.
        vmax = st.v.abs().max()
        headroom = 2.0 if vmax >= torch.finfo(st.cdt).max / 2 else 1.0
        for src, dst, n in _query_chunks(lq, query_chunk_size, bug):
            o_c, m_c, z_c = o.new_zeros(b, hq, n, dv), m.new_full((b, hq, n), _NEG_INF), z.new_zeros(b, hq, n)
            for ks, ke in _key_chunks(st.lk, key_chunk_size, bug):
                s, _ = st.logits(src, src + n, ks, ke)
                o_c, m_c, z_c = st.update(o_c, m_c, z_c, s, st.v[:, :, ks:ke] / headroom)
            if headroom > 1:
                o_c = (o_c * headroom).clamp(-vmax, vmax)
            o[:, :, dst : dst + n], m[:, :, dst : dst + n], z[:, :, dst : dst + n] = o_c, m_c, z_c
        ctx.save_for_backward(q, k, v, mask, bias, o, m, z)
        ctx.args = (scale, causal, query_chunk_size, key_chunk_size, bug)
        return o.transpose(1, 2).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask, bias, o, m, z = ctx.saved_tensors
        scale, causal, query_chunk_size, key_chunk_size, bug = ctx.args
        st = _Setup(q, k, v, mask, bias, scale, causal, bug)
        g = grad_out.transpose(1, 2).to(st.cdt)
        dq, dk, dv = torch.zeros_like(st.q), torch.zeros_like(st.k), torch.zeros_like(st.v)
        want_dbias = bias is not None and ctx.needs_input_grad[4]
        dbias = st.q.new_zeros(o.shape[:3] + (st.lk,)) if want_dbias else None
        shift = torch.where(m == _NEG_INF, 0.0, m)
        denom = torch.where(z == 0, 1.0, z)
        for src, dst, n in _query_chunks(o.shape[2], query_chunk_size, bug):
            rows, qrows = slice(dst, dst + n), slice(src, src + n)
            g_c = g[:, :, rows]
            delta = (g_c * o[:, :, rows]).sum(dim=-1, keepdim=True)
            for ks, ke in _key_chunks(st.lk, key_chunk_size, bug):
                s, visible = st.logits(src, src + n, ks, ke)
                p = torch.exp(s - shift[:, :, rows, None]) / denom[:, :, rows, None]
                dv[:, :, ks:ke] += p.transpose(-1, -2) @ g_c
                dp = g_c @ st.v[:, :, ks:ke].transpose(-1, -2)
                ds = p * dp if bug == "grad_no_delta" else p * (dp - delta)  # BUG grad_no_delta: no -delta
                ds = ds.masked_fill(~visible, 0.0)
                dq[:, :, qrows] += (ds @ st.k[:, :, ks:ke]) * st.scale
                dk_scale = 1.0 if bug == "grad_dk_no_scale" else st.scale  # BUG grad_dk_no_scale
                dk[:, :, ks:ke] += (ds.transpose(-1, -2) @ st.q[:, :, qrows]) * dk_scale
                if dbias is not None and st.has_bias(ks):
                    dbias[:, :, qrows, ks:ke] += ds * st.scale if bug == "dbias_scaled" else ds  # BUG dbias_scaled
        need = ctx.needs_input_grad
        dbias_out = _reduce_to(dbias, bias.shape).to(bias.dtype) if dbias is not None else None
        return (
            dq.transpose(1, 2).to(q.dtype) if need[0] else None,
            st.to_kv_heads(dk).to(k.dtype) if need[1] else None,
            st.to_kv_heads(dv).to(v.dtype) if need[2] else None,
            None,
            dbias_out,
            None,
            None,
            None,
            None,
            None,
        )


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: tuple[int | None, int | None]) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        shapes = f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}"
        raise ValueError(f"q, k, v must be [batch, seq, heads, dim]; got {shapes}")
    if k.shape[:3] != v.shape[:3] or k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"incompatible shapes q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"Hq={q.shape[2]} is not a multiple of Hkv={k.shape[2]}")
    for size in chunks:
        if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1):
            raise ValueError(f"chunk sizes must be positive integers or None, got {size!r}")


def make(bug: str = "none") -> Callable[..., torch.Tensor]:
    """The canonical attention callable of the chunked implementation with ``bug`` seeded (``"none"``: clean)."""
    if bug not in BUGS:
        raise ValueError(f"unknown bug {bug!r}; known: {', '.join(BUGS)}")

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
        """Chunked attention; ``[B, L, H, D]`` layout, returns ``out [B, Lq, Hq, Dv]`` in q's dtype."""
        _check(q, k, v, (query_chunk_size, key_chunk_size))
        return _ChunkedAttention.apply(q, k, v, mask, bias, scale, causal, query_chunk_size, key_chunk_size, bug)

    attention.__name__ = attention.__qualname__ = "attention" if bug == "none" else f"attention_{bug}"
    return attention

"""triton-flash's ``@triton.jit`` kernels: the forward, and FA2's backward (delta, dK/dV, dQ).

The launcher, the autograd Function, the tiles and the contract are ``verify.targets.triton_flash``;
these are the kernels it launches, written the way a real FA2 kernel is:

- Head dims arrive padded to a power of two (``BLOCK_DK``, ``BLOCK_DV``) and are read with masked loads
  (padding reads 0) and written with masked stores. Lengths are arbitrary: out-of-range keys of a partial
  tile get a ``-inf`` logit (and probability 0 in the backward), out-of-range query rows are never stored.
- Visibility is one test per (row, key): ``i + off - left <= j <= i + off + right`` and ``j < Lk``, with
  ``off = 0`` (top-left) or ``Lk - Lq`` (bottom-right); ``causal`` sets ``right = 0`` (the intersection
  with a window's right edge, which is >= 0, is 0) and an unbounded side is clamped to ``Lq + Lk``, which
  no ``|i + off - j|`` reaches, so ``right >= Lk`` keeps every key. Tile skipping: a query tile visits only
  the key tiles between ``first_row + off - left`` and ``last_row + off + right``; the dK/dV kernel visits
  only the query tiles that can see its key tile. Skipped tiles are not loaded at all.
- Forward: grid (query tiles, B * Hq); online softmax with an fp32 running max, sum and output
  accumulator. Logits are fp32 (``tl.dot`` accumulates in fp32; ``input_precision="ieee"`` so fp32 inputs
  are not rounded to tf32 on a GPU), scaled in fp32, then softcap ``c * tanh(t / c)``, then the ALiBi
  term ``-slope * |i + off - j|`` (an fp32 product). While a row's max is still ``-inf`` (nothing visible
  yet) it is shifted by 0, so ``exp(-inf - -inf)`` never happens. The probabilities ``exp(s - m)`` are
  summed in fp32 and cast to the input dtype before ``P @ V`` (as FA2: that is the precision contract);
  the output is ``acc / l`` rounded once, 0 where ``l == 0``; ``lse = m + log(l)`` in fp32, ``-inf`` there.
- tanh is ours (Triton's interpreter has no extern/libdevice functions): ``x * P(x^2)`` with the Taylor
  series to x^17 for ``|x| < 0.5`` (truncation < 1e-9 relative), ``(1 - e) / (1 + e)`` with
  ``e = exp(-2|x|)`` beyond (no cancellation there); the backward's ``1 - tanh^2`` is computed as
  ``4e / (1 + e)^2``, accurate where tanh saturates.
- Backward (FA2's recipe, no atomics, so bitwise deterministic run to run):
  a preprocessing kernel computes ``delta_i = rowsum(dO * O) - g_lse_i`` in fp32 from the stored output;
  the dK/dV kernel runs over (key tiles, B * Hkv), loops over the G query heads of its kv head and
  their visible query tiles, recomputes ``p = exp(s - lse)`` (0 for rows whose lse is -inf), and
  accumulates ``dV += P^T dO`` and ``dK += dS^T Q`` with ``dS = P * (dP - delta)`` (times ``1 - tanh^2``
  under softcap); the dQ kernel runs over (query tiles, B * Hq) and accumulates ``dQ += dS K`` over the
  visible key tiles. As in FA2, P and dS are cast to the input dtype before their matmuls; every
  accumulation is fp32, each gradient is rounded once. One departure, fp16 only: dS = P (dP - delta)
  can exceed fp16's 65504 while dq and dk are ordinary (values near fp16's max with small q, k: FA2
  returns inf there), so each fp16 dS tile is multiplied by a power of two ``2^-e`` (e >= 0, the
  smallest with max|dS| 2^-e <= 2^14) before the cast and its product by ``2^e`` after: exact scalings,
  e = 0 (bitwise FA2) unless the tile would overflow. The lse cotangent enters through delta:
  ``d lse_i / d s_ij = p_ij`` gives ``ds_ij = p_ij (dp_ij - delta_i + g_lse_i)``. Gradients for q, k, v
  only (slopes get none).
- Inputs may have any strides (transposed views, slices, stride-0 broadcasts): the kernels take strides;
  nothing is copied. Offsets are int64.

Where they run — decided once, at import: if ``torch.cuda.is_available()`` is False this module sets
``TRITON_INTERPRET=1`` (``os.environ.setdefault``, so an explicit setting wins, for the whole process)
before importing triton, and the kernels run in Triton's interpreter on torch CPU tensors; otherwise they
are compiled for CUDA tensors. ``INTERPRETED`` / ``COMPILED`` say which. The interpreter only runs kernels
decorated after ``TRITON_INTERPRET`` is set, and triton's own ``tl.sum``, ``tl.max`` and ``tl.zeros`` are
decorated when triton is imported (torch's ``has_triton()`` imports it, for one), so the kernels avoid
them: ``tl.full`` and ``tl.reduce`` with the standard library's own combine functions (which the
interpreter evaluates with numpy). The module therefore works whatever imported triton first.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

try:  # the combine functions of tl.sum / tl.max, which the interpreter recognises and runs with numpy
    from triton.language.standard import _elementwise_max as _max_combine
    from triton.language.standard import _sum_combine
except ImportError:  # a triton without these private names: same results, slower interpretation

    @triton.jit
    def _max_combine(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _sum_combine(a, b):
        return a + b

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
COMPILED = not INTERPRETED


@triton.jit
def _row_sum(x):
    return tl.reduce(x, 1, _sum_combine)


@triton.jit
def _row_max(x):
    return tl.reduce(x, 1, _max_combine)


@triton.jit
def _pow2_scale(ds):
    """Powers of two ``down = 2^-e``, ``up = 2^e`` (e >= 0) with ``max|ds| * down <= 2^14``: fp16 holds dS."""
    amax = tl.reduce(tl.reduce(tl.abs(ds), 1, _max_combine), 0, _max_combine)
    e = tl.ceil(tl.log2(tl.maximum(amax, 1.0))) - 14.0  # 2^14 target leaves room for an approximate log2
    e = tl.minimum(tl.maximum(e, 0.0), 100.0).to(tl.int32)
    down = ((127 - e) << 23).to(tl.float32, bitcast=True)
    up = ((127 + e) << 23).to(tl.float32, bitcast=True)
    return down, up


@triton.jit
def _tanh_parts(x):
    """tanh(x) and 1 - tanh(x)^2 in fp32, both accurate to a few ulps (see module docstring)."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    xs = tl.minimum(ax, 0.5)  # the series is only used below 0.5: no overflow of x^2 for huge logits
    y = xs * xs
    # Taylor coefficients of tanh(x) / x in x^2: 1, -1/3, 2/15, -17/315, ... 6404582/10854718875.
    p = 0.000590027440945586
    p = p * y - 0.0014558343870513183
    p = p * y + 0.003592128036572481
    p = p * y - 0.008863235529902197
    p = p * y + 0.021869488536155203
    p = p * y - 0.05396825396825397
    p = p * y + 0.13333333333333333
    p = p * y - 0.3333333333333333
    p = p * y + 1.0
    small = xs * p
    th = tl.where(ax < 0.5, small, big)
    th = tl.where(x < 0, -th, th)
    one_e = 1.0 + e
    sech2 = 4.0 * e / (one_e * one_e)
    return th, sech2


@triton.jit
def _scores(qk, offs_m, offs_n, Lq, Lk, off, left, right, scale, softcap, slope,
            SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """Logits of a [rows, keys] tile from the raw fp32 dot product, their visibility, and 1 - tanh^2."""
    t = qk * scale
    if SOFTCAP:
        th, sech2 = _tanh_parts(t / softcap)
        s = softcap * th
    else:
        s = t
        sech2 = t  # unused
    rel = offs_m[:, None] + off - offs_n[None, :]  # i + off - j
    if ALIBI:
        s = s - slope * tl.abs(rel).to(tl.float32)
    vis = (offs_n[None, :] < Lk) & (offs_m[:, None] < Lq) & (rel <= left) & (rel >= -right)
    return s, vis, sech2


@triton.jit
def fwd_kernel(
    Q, K, V, OUT, LSE, SLOPES,
    sqb, sqm, sqh, sqd,
    skb, skn, skh, skd,
    svb, svn, svh, svd,
    sob, som, soh, sod,
    Lq, Lk, Hq, G, off, left, right, scale, softcap, Dk, Dv,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hk = (h // G).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows64 = offs_m.to(tl.int64)[:, None]

    q = tl.load(Q + b * sqb + h.to(tl.int64) * sqh + rows64 * sqm + offs_dk[None, :] * sqd,
                mask=(offs_m[:, None] < Lq) & (offs_dk[None, :] < Dk), other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    slope = 0.0
    if ALIBI:
        slope = tl.load(SLOPES + b * Hq + h)

    # Key tiles that can hold a visible key for some row of this tile (tile skipping).
    last = tl.minimum(m0 + BLOCK_M, Lq) - 1
    lo = tl.maximum(m0 + off - left, 0)
    hi = tl.minimum(last + off + right + 1, Lk)
    lo = (lo // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + offs_n0
        cols64 = offs_n.to(tl.int64)[:, None]
        kt = tl.load(k_base + cols64 * skn + offs_dk[None, :] * skd,
                     mask=(offs_n[:, None] < Lk) & (offs_dk[None, :] < Dk), other=0.0)
        qk = tl.dot(q, tl.trans(kt), input_precision="ieee")
        s, vis, _ = _scores(qk, offs_m, offs_n, Lq, Lk, off, left, right, scale, softcap, slope, SOFTCAP, ALIBI)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, _row_max(s))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - shift[:, None])
        alpha = tl.exp(m_i - shift)
        l_i = l_i * alpha + _row_sum(p)
        vt = tl.load(v_base + cols64 * svn + offs_dv[None, :] * svd,
                     mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < Dv), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    out = tl.where(seen[:, None], out, 0.0)
    tl.store(OUT + b * sob + h.to(tl.int64) * soh + rows64 * som + offs_dv[None, :] * sod,
             out.to(OUT.dtype.element_ty), mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < Dv))
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=offs_m < Lq)


@triton.jit
def bwd_delta_kernel(
    OUT, DO, GLSE, DELTA,
    sob, som, soh, sod,
    sgb, sgm, sgh, sgd,
    Lq, Hq, Dv,
    HAS_GLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta_i = rowsum(dO_i * O_i) - g_lse_i in fp32 (O: the stored, rounded output, as FA2)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows64 = offs_m.to(tl.int64)[:, None]
    mask = (offs_m[:, None] < Lq) & (offs_dv[None, :] < Dv)
    o = tl.load(OUT + b * sob + h * soh + rows64 * som + offs_dv[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DO + b * sgb + h * sgh + rows64 * sgm + offs_dv[None, :] * sgd, mask=mask, other=0.0)
    delta = _row_sum(o.to(tl.float32) * do.to(tl.float32))
    row = pid_bh.to(tl.int64) * Lq + offs_m
    if HAS_GLSE:
        delta = delta - tl.load(GLSE + row, mask=offs_m < Lq, other=0.0)
    tl.store(DELTA + row, delta, mask=offs_m < Lq)


@triton.jit
def bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, SLOPES,
    sqb, sqm, sqh, sqd,
    skb, skn, skh, skd,
    svb, svn, svh, svd,
    sgb, sgm, sgh, sgd,
    sdkb, sdkn, sdkh, sdkd,
    sdvb, sdvn, sdvh, sdvd,
    Lq, Lk, Hq, Hkv, G, off, left, right, scale, softcap, Dk, Dv,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, SCALE_DS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dK, dV of one key tile of one kv head: all G query heads of the group, their visible query tiles."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = pid_bh % Hkv
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    cols64 = offs_n.to(tl.int64)[:, None]
    kmask = offs_n[:, None] < Lk

    kt = tl.load(K + b * skb + hk.to(tl.int64) * skh + cols64 * skn + offs_dk[None, :] * skd,
                 mask=kmask & (offs_dk[None, :] < Dk), other=0.0)
    vt = tl.load(V + b * svb + hk.to(tl.int64) * svh + cols64 * svn + offs_dv[None, :] * svd,
                 mask=kmask & (offs_dv[None, :] < Dv), other=0.0)
    dk_acc = tl.full([BLOCK_N, BLOCK_DK], 0.0, tl.float32)
    dv_acc = tl.full([BLOCK_N, BLOCK_DV], 0.0, tl.float32)

    # Query rows that can see a key of this tile: j - off - right <= i <= j - off + left.
    last = tl.minimum(n0 + BLOCK_N, Lk) - 1
    lo = tl.maximum(n0 - off - right, 0)
    hi = tl.minimum(last - off + left + 1, Lq)
    lo = (lo // BLOCK_M) * BLOCK_M

    for g in range(0, G):
        h = hk * G + g
        bh = b * Hq + h
        slope = 0.0
        if ALIBI:
            slope = tl.load(SLOPES + bh)
        q_base = Q + b * sqb + h.to(tl.int64) * sqh
        do_base = DO + b * sgb + h.to(tl.int64) * sgh
        for m0 in range(lo, hi, BLOCK_M):
            offs_m = m0 + offs_m0
            rows64 = offs_m.to(tl.int64)[:, None]
            qmask = offs_m[:, None] < Lq
            qt = tl.load(q_base + rows64 * sqm + offs_dk[None, :] * sqd,
                         mask=qmask & (offs_dk[None, :] < Dk), other=0.0)
            dot = tl.load(do_base + rows64 * sgm + offs_dv[None, :] * sgd,
                          mask=qmask & (offs_dv[None, :] < Dv), other=0.0)
            lse = tl.load(LSE + bh * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: p = 0
            delta = tl.load(DELTA + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
            qk = tl.dot(qt, tl.trans(kt), input_precision="ieee")  # [BLOCK_M, BLOCK_N]
            s, vis, sech2 = _scores(qk, offs_m, offs_n, Lq, Lk, off, left, right, scale, softcap, slope,
                                    SOFTCAP, ALIBI)
            p = tl.exp(tl.where(vis, s, float("-inf")) - lse[:, None])  # masked lanes: exp(-inf) = 0, no inf
            dv_acc += tl.dot(tl.trans(p.to(dot.dtype)), dot, input_precision="ieee")
            dp = tl.dot(dot, tl.trans(vt), input_precision="ieee")
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * sech2
            if SCALE_DS:
                down, up = _pow2_scale(ds)
                dk_acc += tl.dot(tl.trans((ds * down).to(qt.dtype)), qt, input_precision="ieee") * up
            else:
                dk_acc += tl.dot(tl.trans(ds.to(qt.dtype)), qt, input_precision="ieee")

    dk_acc = dk_acc * scale
    tl.store(DK + b * sdkb + hk.to(tl.int64) * sdkh + cols64 * sdkn + offs_dk[None, :] * sdkd,
             dk_acc.to(DK.dtype.element_ty), mask=kmask & (offs_dk[None, :] < Dk))
    tl.store(DV + b * sdvb + hk.to(tl.int64) * sdvh + cols64 * sdvn + offs_dv[None, :] * sdvd,
             dv_acc.to(DV.dtype.element_ty), mask=kmask & (offs_dv[None, :] < Dv))


@triton.jit
def bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, SLOPES,
    sqb, sqm, sqh, sqd,
    skb, skn, skh, skd,
    svb, svn, svh, svd,
    sgb, sgm, sgh, sgd,
    sdqb, sdqm, sdqh, sdqd,
    Lq, Lk, Hq, G, off, left, right, scale, softcap, Dk, Dv,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, SCALE_DS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dQ of one query tile of one query head, over the key tiles it can see."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hk = (h // G).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows64 = offs_m.to(tl.int64)[:, None]
    qmask = offs_m[:, None] < Lq

    qt = tl.load(Q + b * sqb + h.to(tl.int64) * sqh + rows64 * sqm + offs_dk[None, :] * sqd,
                 mask=qmask & (offs_dk[None, :] < Dk), other=0.0)
    dot = tl.load(DO + b * sgb + h.to(tl.int64) * sgh + rows64 * sgm + offs_dv[None, :] * sgd,
                  mask=qmask & (offs_dv[None, :] < Dv), other=0.0)
    row = pid_bh.to(tl.int64) * Lq + offs_m
    lse = tl.load(LSE + row, mask=offs_m < Lq, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: p = 0
    delta = tl.load(DELTA + row, mask=offs_m < Lq, other=0.0)
    slope = 0.0
    if ALIBI:
        slope = tl.load(SLOPES + b * Hq + h)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh

    last = tl.minimum(m0 + BLOCK_M, Lq) - 1
    lo = tl.maximum(m0 + off - left, 0)
    hi = tl.minimum(last + off + right + 1, Lk)
    lo = (lo // BLOCK_N) * BLOCK_N

    dq_acc = tl.full([BLOCK_M, BLOCK_DK], 0.0, tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + offs_n0
        cols64 = offs_n.to(tl.int64)[:, None]
        kmask = offs_n[:, None] < Lk
        kt = tl.load(k_base + cols64 * skn + offs_dk[None, :] * skd, mask=kmask & (offs_dk[None, :] < Dk),
                     other=0.0)
        vt = tl.load(v_base + cols64 * svn + offs_dv[None, :] * svd, mask=kmask & (offs_dv[None, :] < Dv),
                     other=0.0)
        qk = tl.dot(qt, tl.trans(kt), input_precision="ieee")
        s, vis, sech2 = _scores(qk, offs_m, offs_n, Lq, Lk, off, left, right, scale, softcap, slope,
                                SOFTCAP, ALIBI)
        p = tl.exp(tl.where(vis, s, float("-inf")) - lse[:, None])  # masked lanes: exp(-inf) = 0, no inf
        dp = tl.dot(dot, tl.trans(vt), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * sech2
        if SCALE_DS:
            down, up = _pow2_scale(ds)
            dq_acc += tl.dot((ds * down).to(kt.dtype), kt, input_precision="ieee") * up
        else:
            dq_acc += tl.dot(ds.to(kt.dtype), kt, input_precision="ieee")

    dq_acc = dq_acc * scale
    tl.store(DQ + b * sdqb + h.to(tl.int64) * sdqh + rows64 * sdqm + offs_dk[None, :] * sdqd,
             dq_acc.to(DQ.dtype.element_ty), mask=qmask & (offs_dk[None, :] < Dk))


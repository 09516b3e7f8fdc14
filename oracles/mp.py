"""Arbitrary-precision attention oracle: forward, log-sum-exp and the analytic VJP.

How it stays exact where it can and accurate where it cannot:

- Every input element is a float of at most 53 significand bits, hence exactly ``n * 2**e``
  with integer ``n``; a whole array becomes Python integers over one common exponent.
- Sums of products of such values (``q.k``, ``p.v``, ``g.v``, ``ds.k`` ...) are computed exactly
  in integer arithmetic (numpy object arrays), so no float64 operation touches a value.
- Only the transcendental steps are rounded, by mpmath at ``prec`` bits: ``1/sqrt(Dk)``, the
  logits ``scale*q.k + bias`` (at ``prec`` bits *absolute*: the working precision grows with
  the logits' magnitude, so logits of 1e30 or a bias of -1e300 lose nothing), ``exp`` and the
  division by the row sum. The probabilities ``p~`` are thus ``p * (1 + d)``, ``|d| <~ 2**-prec``,
  and every later quantity is computed exactly from ``p~``: each output and gradient element is
  within about ``2**-prec`` of the exact value *relative to the same formula on absolute values*
  (``sum p |v|`` for an output), a componentwise bound.
- Keys whose weight is below ``2**-(prec + 5300)`` of the row's largest are given weight 0: no
  float64 input, however large, makes their contribution reach float64's smallest subnormal, in
  the output or in any gradient (a weight enters a gradient multiplied by at most
  ``scale * |q or k| * |g| * |v| < 2**4096`` times dimension and length factors).
- Results are rounded once, correctly (integer true division), to float64.

``DEFAULT_PREC = 160`` bits: the float64 results are the correctly rounded exact values unless an
element cancels to below ``2**-100`` of its absolute-value scale, and within 1 ulp well beyond that.
mpmath uses gmpy2 for its integers when gmpy2 is installed (``mpmath.libmp.BACKEND``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mpmath
import numpy as np
from mpmath import libmp

from oracles import spec

DEFAULT_PREC = 160
_CUT_BITS = 5300
_LN2 = math.log(2.0)
_RND = libmp.round_nearest


@dataclass(frozen=True)
class Result:
    """Forward oracle values: ``out [B, Lq, Hq, Dv]`` and ``lse [B, Hq, Lq]`` as float64."""

    out: np.ndarray
    lse: np.ndarray
    mp_out: np.ndarray | None = None  # object arrays of mpmath.mpf, when asked for
    mp_lse: np.ndarray | None = None
    p: np.ndarray | None = None  # float64 probabilities [B, Hq, Lq, Lk], when asked for


@dataclass(frozen=True)
class Grads:
    """VJP oracle values as float64, in the shapes of q, k, v and bias (None without bias)."""

    dq: np.ndarray
    dk: np.ndarray
    dv: np.ndarray
    dbias: np.ndarray | None
    out: np.ndarray
    lse: np.ndarray
    p: np.ndarray | None = None


def _to_float(n: int, e: int, den: int = 1) -> float:
    """``n * 2**e / den`` correctly rounded to float64 (inf past the range)."""
    if n == 0:
        return 0.0
    num, d = (n << e, den) if e >= 0 else (n, den << -e)
    try:
        return num / d
    except OverflowError:
        return math.copysign(math.inf, n)


def _floats(n: np.ndarray, e: int | np.ndarray, den: int = 1) -> np.ndarray:
    """Elementwise ``_to_float`` of an integer object array with exponent(s) ``e``."""
    conv = np.frompyfunc(lambda ni, ei: _to_float(int(ni), int(ei), den), 2, 1)
    return conv(n, np.broadcast_to(np.asarray(e, dtype=object), n.shape)).astype(np.float64)


def _mpf_float(x: tuple) -> float:
    """A raw mpf correctly rounded to float64."""
    if x == libmp.fzero:
        return 0.0
    if x in (libmp.finf, libmp.fninf, libmp.fnan):
        return libmp.to_float(x)
    sign, man, exp, _ = x
    return _to_float(-man if sign else man, exp)


def _mpf_int_exp(x: tuple) -> tuple[int, int]:
    """A finite raw mpf as (signed integer mantissa, exponent)."""
    if x == libmp.fzero:
        return 0, 0
    sign, man, exp, _ = x
    return (-man if sign else man), exp


def _dyadic(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Exact integers ``n`` (object array) and one exponent ``E`` with ``x == n * 2**E``."""
    x64 = np.asarray(x).astype(np.float64)
    frac, ex = np.frexp(x64)
    n = (frac * 2.0**53).astype(np.int64)
    ex = ex.astype(np.int64) - 53
    nz = n != 0
    if not nz.any():
        return np.zeros(x64.shape, dtype=object), 0
    tz = np.zeros_like(n)
    tz[nz] = np.log2((n[nz] & -n[nz]).astype(np.float64)).astype(np.int64)
    n, ex = n >> tz, ex + tz
    base = int(ex[nz].min())
    shift = np.where(nz, ex - base, 0)
    return n.astype(object) << shift.astype(object), base


def _align_rows(n: np.ndarray, row_exp: np.ndarray) -> tuple[np.ndarray, int]:
    """Bring rows with exponents ``row_exp`` to the smallest one; returns (ints, exponent)."""
    base = int(min(row_exp))
    factor = np.array([1 << (int(e) - base) for e in row_exp], dtype=object)
    return n * factor[:, None], base


class _Exact:
    """Accumulates exact values ``n * 2**e / den`` into an array of one shape."""

    def __init__(self, shape: tuple[int, ...], den: int = 1) -> None:
        self.n = np.zeros(shape, dtype=object)
        self.e: int | None = None
        self.den = den

    def add(self, index: tuple, n: np.ndarray, e: int, divided: bool = False) -> None:
        """Add ``n * 2**e`` (or ``n * 2**e / den`` when ``divided``) at ``index``."""
        if self.e is None:
            self.e = e
        if e < self.e:
            self.n = self.n * (1 << (self.e - e))
            self.e = e
        scaled = n * (1 << (e - self.e))
        self.n[index] += scaled if divided else scaled * self.den

    def floats(self) -> np.ndarray:
        return _floats(self.n, self.e or 0, self.den)


@dataclass
class _Block:
    """One (batch, query head): exact probabilities and outputs of its rows."""

    p: np.ndarray  # object ints [Lq, Lk]; row i is p~ * 2**-p_exp[i]
    p_exp: np.ndarray  # int per row
    o: np.ndarray  # object ints [Lq, Dv]; row i is out * 2**-(p_exp[i] + v_exp)
    lse: list  # raw mpf per row (fninf for masked rows)


class _Problem:
    """The validated inputs as exact integers plus the working constants."""

    def __init__(self, att: spec.Attention, prec: int) -> None:
        if int(prec) < 53:
            raise ValueError(f"prec must be at least 53 bits, got {prec}")
        self.att, self.prec = att, int(prec)
        self.q, self.q_exp = _dyadic(att.q)
        self.k, self.k_exp = _dyadic(att.k)
        self.v, self.v_exp = _dyadic(att.v)
        self.bias = None if att.bias is None else att.bias.astype(np.float64)
        dk = att.q.shape[-1]
        wp = self.prec + 64
        if att.scale is None:
            self.scale = libmp.mpf_div(libmp.fone, libmp.mpf_sqrt(libmp.from_int(dk), wp), wp, _RND)
        else:
            self.scale = libmp.from_float(att.scale)

    def block(self, b: int, h: int) -> _Block:
        att, prec = self.att, self.prec
        kvh = int(att.kv_head[h])
        qk = self.q[b, :, h, :].dot(self.k[b, :, kvh, :].T)
        vis = att.visible[b, h]
        lq, lk = vis.shape
        bias = None if self.bias is None else self.bias[b, h]
        # Working precision: prec bits below the largest logit's magnitude.
        mag = max((abs(int(x)).bit_length() for x in qk[vis]), default=0) + self.q_exp + self.k_exp
        mag += max(0, self.scale[2] + self.scale[3]) + 2
        if bias is not None and vis.any():
            mag = max(mag, int(np.frexp(np.abs(bias[vis]).max())[1]) + 1)
        wp = prec + 32 + max(0, mag)
        cut = libmp.from_float(-(prec + _CUT_BITS) * _LN2)
        qk_exp = self.q_exp + self.k_exp
        p = np.zeros((lq, lk), dtype=object)
        p_exp = np.zeros(lq, dtype=np.int64)
        lse = []
        for i in range(lq):
            cols = np.flatnonzero(vis[i])
            if cols.size == 0:
                lse.append(libmp.fninf)
                continue
            s = []
            for j in cols:
                x = libmp.mpf_mul(self.scale, libmp.from_man_exp(int(qk[i, j]), qk_exp), wp, _RND)
                if bias is not None:
                    x = libmp.mpf_add(x, libmp.from_float(float(bias[i, j])), wp, _RND)
                s.append(x)
            m = _mpf_max(s)
            e = []
            for x in s:
                t = libmp.mpf_sub(x, m, wp, _RND)
                e.append(libmp.fzero if libmp.mpf_lt(t, cut) else libmp.mpf_exp(t, prec + 20, _RND))
            total = libmp.mpf_sum(e, prec + 20, _RND)
            lse.append(libmp.mpf_add(m, libmp.mpf_log(total, wp, _RND), wp, _RND))
            pairs = [_mpf_int_exp(libmp.mpf_div(x, total, prec, _RND)) for x in e]
            base = min(ex for n, ex in pairs if n)
            p_exp[i] = base
            for j, (n, ex) in zip(cols, pairs, strict=True):
                p[i, j] = n << (ex - base) if n else 0
        o = p.dot(self.v[b, :, kvh, :])
        return _Block(p, p_exp, o, lse)


def _mpf_max(xs: list) -> tuple:
    best = xs[0]
    for x in xs[1:]:
        if libmp.mpf_gt(x, best):
            best = x
    return best


def _forward(pb: _Problem, want_mp: bool, want_p: bool = False) -> tuple[Result, dict]:
    att = pb.att
    d = att.dims
    p = np.zeros((d["B"], d["Hq"], d["Lq"], d["Lk"])) if want_p else None
    out = np.zeros((d["B"], d["Lq"], d["Hq"], d["Dv"]))
    lse = np.full((d["B"], d["Hq"], d["Lq"]), -np.inf)
    mp_out = np.zeros(out.shape, dtype=object) if want_mp else None
    mp_lse = np.zeros(lse.shape, dtype=object) if want_mp else None
    blocks = {}
    masked = att.masked_row
    for b in range(d["B"]):
        for h in range(d["Hq"]):
            blk = pb.block(b, h)
            blocks[b, h] = blk
            if want_p:
                p[b, h] = _floats(blk.p, blk.p_exp[:, None])
            exps = blk.p_exp + pb.v_exp
            out[b, :, h, :] = _floats(blk.o, exps[:, None])
            lse[b, h] = [_mpf_float(x) for x in blk.lse]
            if want_mp:
                for i in range(d["Lq"]):
                    mp_lse[b, h, i] = mpmath.mp.make_mpf(blk.lse[i])
                    for c in range(d["Dv"]):
                        raw = libmp.from_man_exp(int(blk.o[i, c]), int(exps[i]))
                        mp_out[b, i, h, c] = mpmath.mp.make_mpf(raw)
            rows = np.flatnonzero(masked[b, h])
            if rows.size:
                out[b, rows, h, :] = _masked_rows_out(pb, b, h, att.masked_rows)
                if att.masked_rows == "nan":
                    lse[b, h, rows] = np.nan
                if want_mp:
                    mp_out[b, rows, h, :] = _masked_rows_mp(pb, b, h, att.masked_rows)
                    if att.masked_rows == "nan":
                        mp_lse[b, h, rows] = mpmath.mp.make_mpf(libmp.fnan)
    return Result(out, lse, mp_out, mp_lse, p), blocks


def _masked_rows_out(pb: _Problem, b: int, h: int, policy: str) -> np.ndarray | float:
    if policy == "zeros":
        return 0.0
    if policy == "nan":
        return np.nan
    lk = pb.att.k.shape[1]
    total = pb.v[b, :, int(pb.att.kv_head[h]), :].sum(axis=0)
    return _floats(total, pb.v_exp, lk)


def _masked_rows_mp(pb: _Problem, b: int, h: int, policy: str) -> np.ndarray:
    """``_masked_rows_out`` as mpf values (the uniform mean to ``prec + 20`` bits)."""
    dv = pb.att.v.shape[-1]
    if policy != "uniform":
        raw = [libmp.fzero if policy == "zeros" else libmp.fnan] * dv
    else:
        lk = libmp.from_int(pb.att.k.shape[1])
        total = pb.v[b, :, int(pb.att.kv_head[h]), :].sum(axis=0)
        raw = [libmp.mpf_div(libmp.from_man_exp(int(t), pb.v_exp), lk, pb.prec + 20, _RND) for t in total]
    res = np.empty(dv, dtype=object)
    res[:] = [mpmath.mp.make_mpf(x) for x in raw]
    return res


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    scale: float | None = None,
    causal: bool = False,
    masked_rows: str = "zeros",
    prec: int = DEFAULT_PREC,
    mp_values: bool = False,
    probs: bool = False,
) -> Result:
    """Exact attention output and lse, rounded once to float64.

    ``mp_values`` adds the outputs and lse as mpf; ``probs`` adds the probabilities (float64),
    which the tolerance model needs for its absolute-value scales.
    """
    att = spec.normalize(q, k, v, mask=mask, bias=bias, scale=scale, causal=causal, masked_rows=masked_rows)
    return _forward(_Problem(att, prec), mp_values, probs)[0]


def attention_vjp(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    g: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    scale: float | None = None,
    causal: bool = False,
    masked_rows: str = "zeros",
    prec: int = DEFAULT_PREC,
    probs: bool = False,
) -> Grads:
    """Exact ``dq, dk, dv, dbias`` for the cotangent ``g`` of ``out`` (and the forward values)."""
    att = spec.normalize(q, k, v, mask=mask, bias=bias, scale=scale, causal=causal, masked_rows=masked_rows)
    g = spec.check_cotangent(att, g)
    pb = _Problem(att, prec)
    fwd, blocks = _forward(pb, False, probs)
    gi, g_exp = _dyadic(g)
    d = att.dims
    uniform = att.masked_rows == "uniform"
    dq = np.zeros(att.q.shape)
    dk = _Exact(att.k.shape)
    dv = _Exact(att.v.shape, den=d["Lk"] if uniform else 1)
    bias4 = None if att.bias_shape is None else (1,) * (4 - len(att.bias_shape)) + tuple(att.bias_shape)
    dbias = None if bias4 is None else _Exact(bias4)
    masked = att.masked_row
    nan_kv, nan_bias = [], []
    wp = pb.prec + 20
    for (b, h), blk in blocks.items():
        kvh = int(att.kv_head[h])
        g_bh = gi[b, :, h, :]
        v_bh = pb.v[b, :, kvh, :]
        # dp[i, j] = g_i . v_j, exact at exponent g_exp + v_exp.
        dp = g_bh.dot(v_bh.T)
        # delta_i = g_i . o_i, exact at exponent g_exp + v_exp + p_exp[i].
        delta = (g_bh * blk.o).sum(axis=1)
        # ds_ij = p_ij (dp_ij - delta_i) assumes sum_k p_ik = 1; the rounded p~ sum to
        # S_i = 1 + O(2**-prec), so use dp_ij S_i - delta_i = sum_k p~_ik (dp_ij - dp_ik): then
        # sum_j ds_ij = 0 exactly, and ds cancels no more than the exact formula does (a dominant
        # key's ds = p_0 sum_k p_k (dp_0 - dp_k) keeps its relative accuracy).
        psum = blk.p.sum(axis=1)  # S_i at exponent p_exp[i]
        diff = dp * psum[:, None] - delta[:, None]
        ds = blk.p * diff  # row i at exponent 2 p_exp[i] + g_exp + v_exp
        ds_al, ds_exp = _align_rows(ds, 2 * blk.p_exp)
        ds_exp += g_exp + pb.v_exp
        # dq_i = scale * ds_i . K (row exponents differ: convert row by row).
        dq_int = ds.dot(pb.k[b, :, kvh, :])
        for i in range(d["Lq"]):
            e_i = int(2 * blk.p_exp[i]) + g_exp + pb.v_exp + pb.k_exp
            dq[b, i, h, :] = [
                _mpf_float(libmp.mpf_mul(pb.scale, libmp.from_man_exp(int(x), e_i), wp, _RND))
                for x in dq_int[i]
            ]
        # dk_j = scale * sum_i ds_ij q_i: scale applied at the end.
        dk.add((b, slice(None), kvh, slice(None)), ds_al.T.dot(pb.q[b, :, h, :]), ds_exp + pb.q_exp)
        p_al, p_exp = _align_rows(blk.p, blk.p_exp)
        dv.add((b, slice(None), kvh, slice(None)), p_al.T.dot(g_bh), p_exp + g_exp)
        rows = np.flatnonzero(masked[b, h])
        if uniform and rows.size:
            gsum = g_bh[rows].sum(axis=0)
            dv.add((b, slice(None), kvh, slice(None)), np.broadcast_to(gsum, (d["Lk"], d["Dv"])), g_exp, True)
        if att.masked_rows == "nan" and rows.size:
            dq[b, rows, h, :] = np.nan
            nan_kv.append((b, kvh))
            nan_bias.append((b, h, rows))
        if dbias is not None:
            idx = (0 if bias4[0] == 1 else b, 0 if bias4[1] == 1 else h)
            dbias.add(idx, spec.reduce_to_shape(ds_al, bias4[2:]), ds_exp)
    dk_f = dk.floats()
    if dk.e is not None:
        for idx in np.ndindex(*dk.n.shape):
            x = libmp.from_man_exp(int(dk.n[idx]), dk.e)
            dk_f[idx] = _mpf_float(libmp.mpf_mul(pb.scale, x, wp, _RND))
    dv_f = dv.floats()
    dbias_f = None if dbias is None else dbias.floats()
    for b, kvh in nan_kv:
        dk_f[b, :, kvh, :] = np.nan
        dv_f[b, :, kvh, :] = np.nan
    for b, h, rows in nan_bias:
        if dbias_f is not None:
            rr = rows if bias4[2] > 1 else 0
            dbias_f[0 if bias4[0] == 1 else b, 0 if bias4[1] == 1 else h, rr, :] = np.nan
    if dbias_f is not None:
        dbias_f = dbias_f.reshape(att.bias_shape)
    return Grads(dq, dk_f, dv_f, dbias_f, fwd.out, fwd.lse, fwd.p)

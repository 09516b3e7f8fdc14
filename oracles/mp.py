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

The modern options (``spec``'s module docstring) keep that shape:

- ALiBi: ``slope * |i + off - j|`` is an exact dyadic (an exact slope times an integer), subtracted
  from the logit at the working precision; a zero slope is skipped (bitwise equal to no ALiBi).
- softcap: ``c * tanh(t / c)`` with ``t = scale q.k``, each step at the working precision. Since
  ``|x sech^2 x| < 1/2``, a relative error ``2**-wp`` in ``t`` or ``t / c`` moves the capped logit by less
  than ``c 2**-wp``: the working precision follows the bound ``c + |bias| + slope * L`` of the capped
  logits, not ``|t|`` (which may be 1e38). The VJP multiplies the logit cotangent by ``sech^2(t / c)``,
  computed as ``1 / cosh^2`` (``1 - tanh^2`` would cancel); a factor below ``2**-(prec + 5300)`` is 0,
  by the same argument as the weight cut-off above.
- sinks: the sink logit ``sigma_h`` (exact) takes part in the row max and the row sum and gets its own
  probability ``p_sink``; an empty row with a sink has ``p_sink = 1``, out 0 and lse ``sigma``; a head
  with ``sigma = +inf`` has out 0, lse ``+inf``, ``p_sink = 1``. In the VJP the sink enters the
  normaliser ``S_i = p_sink,i + sum_k p~_ik`` (see ``attention_vjp``) and ``dsinks_h = sum p~_sink (g_lse - delta)``,
  summed exactly and rounded once.
- ``g_lse``: added exactly to ``dp_ij S_i - delta_i``, so ``ds_ij = p~_ij (dp_ij S_i - delta_i
  + g_lse_i)``; rows with lse ``-inf`` have no weights and take nothing from it.

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
    p_sink: np.ndarray | None = None  # float64 sink probabilities [B, Hq, Lq], when asked for with sinks


@dataclass(frozen=True)
class Grads:
    """VJP oracle values as float64, in the shapes of q, k, v, bias and sinks (None when not given)."""

    dq: np.ndarray
    dk: np.ndarray
    dv: np.ndarray
    dbias: np.ndarray | None
    out: np.ndarray
    lse: np.ndarray
    p: np.ndarray | None = None
    dsinks: np.ndarray | None = None  # float64 [Hq]
    p_sink: np.ndarray | None = None


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
    p_sink: np.ndarray | None = None  # object ints [Lq] at p_exp: the sink's probability
    cap_arg: np.ndarray | None = None  # raw mpf [Lq, Lk] (None where invisible): t / c, with softcap


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
        self.cap = None if att.softcap is None else libmp.from_float(att.softcap)
        self.dist = att.distance if att.alibi_slopes is not None else None

    def _inf_sink_block(self, lq: int, lk: int, dv: int) -> _Block:
        """A head whose sink is +inf: every weight 0, p_sink 1, lse +inf."""
        zeros = np.zeros((lq, lk), dtype=object)
        return _Block(zeros, np.zeros(lq, dtype=np.int64), np.zeros((lq, dv), dtype=object), [libmp.finf] * lq,
                      np.ones(lq, dtype=object))

    def block(self, b: int, h: int) -> _Block:
        att, prec = self.att, self.prec
        kvh = int(att.kv_head[h])
        vis = att.visible[b, h]
        lq, lk = vis.shape
        sink = None
        if att.sinks is not None:
            if att.sinks[h] == np.inf:
                return self._inf_sink_block(lq, lk, att.v.shape[-1])
            if att.sinks[h] > -np.inf:
                sink = libmp.from_float(float(att.sinks[h]))
        qk = self.q[b, :, h, :].dot(self.k[b, :, kvh, :].T)
        bias = None if self.bias is None else self.bias[b, h]
        cap = self.cap
        slope = None
        if self.dist is not None and att.alibi_slopes[b, h] != 0:
            slope = libmp.from_float(float(att.alibi_slopes[b, h]))
        # Working precision: prec bits below the largest logit's magnitude (capped logits: below c).
        if cap is None:
            mag = max((abs(int(x)).bit_length() for x in qk[vis]), default=0) + self.q_exp + self.k_exp
            mag += max(0, self.scale[2] + self.scale[3]) + 2
        else:
            mag = cap[2] + cap[3] + 2
        if bias is not None and vis.any():
            mag = max(mag, int(np.frexp(np.abs(bias[vis]).max())[1]) + 1)
        if slope is not None and vis.any():
            amax = abs(float(att.alibi_slopes[b, h])) * float(self.dist[vis].max())
            if amax > 0:
                mag = max(mag, int(np.frexp(amax)[1]) + 1) + 1
        wp = prec + 32 + max(0, mag)
        cut = libmp.from_float(-(prec + _CUT_BITS) * _LN2)
        qk_exp = self.q_exp + self.k_exp
        p = np.zeros((lq, lk), dtype=object)
        p_exp = np.zeros(lq, dtype=np.int64)
        p_sink = None if sink is None else np.zeros(lq, dtype=object)
        cap_arg = None if cap is None else np.full((lq, lk), None, dtype=object)
        lse = []
        for i in range(lq):
            cols = np.flatnonzero(vis[i])
            if cols.size == 0 and sink is None:
                lse.append(libmp.fninf)
                continue
            s = []
            for j in cols:
                x = libmp.mpf_mul(self.scale, libmp.from_man_exp(int(qk[i, j]), qk_exp), wp, _RND)
                if cap is not None:
                    a = libmp.mpf_div(x, cap, wp, _RND)
                    cap_arg[i, j] = a
                    x = libmp.mpf_mul(libmp.mpf_tanh(a, wp, _RND), cap, wp, _RND)
                if bias is not None:
                    x = libmp.mpf_add(x, libmp.from_float(float(bias[i, j])), wp, _RND)
                if slope is not None:
                    x = libmp.mpf_sub(x, libmp.mpf_mul(slope, libmp.from_int(int(self.dist[i, j]))), wp, _RND)
                s.append(x)
            if sink is not None:
                s.append(sink)  # the sink is one more logit of the row, with no value
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
            if sink is not None:
                n, ex = pairs.pop()
                p_sink[i] = n << (ex - base) if n else 0
            for j, (n, ex) in zip(cols, pairs, strict=True):
                p[i, j] = n << (ex - base) if n else 0
        o = p.dot(self.v[b, :, kvh, :])
        return _Block(p, p_exp, o, lse, p_sink, cap_arg)


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
    p_sink = np.zeros((d["B"], d["Hq"], d["Lq"])) if want_p and att.sinks is not None else None
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
                if p_sink is not None and blk.p_sink is not None:
                    p_sink[b, h] = _floats(blk.p_sink, blk.p_exp)
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
    return Result(out, lse, mp_out, mp_lse, p, p_sink), blocks


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
    align: str = "top-left",
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    alibi_slopes: np.ndarray | None = None,
    sinks: np.ndarray | None = None,
    q_segment_ids: np.ndarray | None = None,
    kv_segment_ids: np.ndarray | None = None,
    prec: int = DEFAULT_PREC,
    mp_values: bool = False,
    probs: bool = False,
) -> Result:
    """Exact attention output and lse, rounded once to float64 (semantics: ``oracles.spec``).

    ``mp_values`` adds the outputs and lse as mpf; ``probs`` adds the probabilities (float64, and the
    sink's with ``sinks``), which the tolerance model needs for its absolute-value scales.
    """
    att = spec.normalize(
        q, k, v, mask=mask, bias=bias, scale=scale, causal=causal, masked_rows=masked_rows, align=align,
        window=window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
    )
    return _forward(_Problem(att, prec), mp_values, probs)[0]


def _sech2_rows(ds: np.ndarray, row_exp: np.ndarray, cap_arg: np.ndarray, prec: int) -> tuple[np.ndarray, np.ndarray]:
    """``ds * sech^2(cap_arg)`` as exact integers per row: each factor to ``prec + 20`` bits, 0 past the cut."""
    lq, lk = ds.shape
    wp = prec + 20
    far = libmp.from_float((prec + _CUT_BITS) * _LN2 / 2 + 1)
    out = np.zeros((lq, lk), dtype=object)
    out_exp = np.array(row_exp, dtype=np.int64)
    for i in range(lq):
        terms = []
        for j in range(lk):
            a = cap_arg[i, j]
            if a is None or ds[i, j] == 0 or libmp.mpf_gt(libmp.mpf_abs(a), far):
                continue
            co = libmp.mpf_cosh(a, wp, _RND)
            n, e = _mpf_int_exp(libmp.mpf_div(libmp.fone, libmp.mpf_mul(co, co, wp, _RND), wp, _RND))
            terms.append((j, int(ds[i, j]) * n, e))
        if not terms:
            continue
        base = min(e for _, _, e in terms)
        for j, n, e in terms:
            out[i, j] = n << (e - base)
        out_exp[i] += base
    return out, out_exp


def attention_vjp(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    g: np.ndarray,
    *,
    g_lse: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    scale: float | None = None,
    causal: bool = False,
    masked_rows: str = "zeros",
    align: str = "top-left",
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    alibi_slopes: np.ndarray | None = None,
    sinks: np.ndarray | None = None,
    q_segment_ids: np.ndarray | None = None,
    kv_segment_ids: np.ndarray | None = None,
    prec: int = DEFAULT_PREC,
    probs: bool = False,
) -> Grads:
    """Exact ``dq, dk, dv, dbias, dsinks`` for the cotangents ``g`` of ``out`` and ``g_lse`` of ``lse``."""
    att = spec.normalize(
        q, k, v, mask=mask, bias=bias, scale=scale, causal=causal, masked_rows=masked_rows, align=align,
        window=window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
    )
    g = spec.check_cotangent(att, g)
    g_lse = spec.check_lse_cotangent(att, g_lse)
    pb = _Problem(att, prec)
    fwd, blocks = _forward(pb, False, probs)
    gi, g_exp = _dyadic(g)
    gl, gl_exp = (None, 0) if g_lse is None else _dyadic(g_lse)
    d = att.dims
    uniform = att.masked_rows == "uniform"
    dq = np.zeros(att.q.shape)
    dk = _Exact(att.k.shape)
    dv = _Exact(att.v.shape, den=d["Lk"] if uniform else 1)
    bias4 = None if att.bias_shape is None else (1,) * (4 - len(att.bias_shape)) + tuple(att.bias_shape)
    dbias = None if bias4 is None else _Exact(bias4)
    dsinks = None if att.sinks is None else _Exact((d["Hq"],))
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
        # key's ds = p_0 sum_k p_k (dp_0 - dp_k) keeps its relative accuracy). A sink is one more
        # weight of S_i with dp = 0 (its ds is -p~_sink delta_i), so sum_j ds_ij + ds_sink = 0.
        psum = blk.p.sum(axis=1)  # S_i at exponent p_exp[i]
        if blk.p_sink is not None:
            psum = psum + blk.p_sink
        diff = dp * psum[:, None] - delta[:, None]
        row_exp = blk.p_exp + g_exp + pb.v_exp  # of diff's row i and of delta_i
        minus_delta = -delta
        if gl is not None:
            # + g_lse_i, brought to a common exponent with row i of diff.
            g_row = gl[b, h]
            low = np.minimum(row_exp, gl_exp)
            f_diff = np.array([1 << int(x) for x in row_exp - low], dtype=object)
            f_gl = np.array([1 << int(x) for x in gl_exp - low], dtype=object)
            diff = diff * f_diff[:, None] + (g_row * f_gl)[:, None]
            minus_delta = minus_delta * f_diff + g_row * f_gl
            row_exp = low
        ds = blk.p * diff
        ds_exp = blk.p_exp + row_exp  # row exponents of ds
        if dsinks is not None and blk.p_sink is not None:
            col, col_exp = _align_rows((blk.p_sink * minus_delta)[:, None], ds_exp)
            dsinks.add((h,), col.sum(), col_exp)
        # The cotangent of t = scale q.k: ds itself, or ds sech^2(t / c) with softcap.
        dt, dt_exp = ds, ds_exp
        if blk.cap_arg is not None:
            dt, dt_exp = _sech2_rows(ds, ds_exp, blk.cap_arg, pb.prec)
        dt_al, dt_al_exp = _align_rows(dt, dt_exp)
        # dq_i = scale * dt_i . K (row exponents differ: convert row by row).
        dq_int = dt.dot(pb.k[b, :, kvh, :])
        for i in range(d["Lq"]):
            e_i = int(dt_exp[i]) + pb.k_exp
            dq[b, i, h, :] = [
                _mpf_float(libmp.mpf_mul(pb.scale, libmp.from_man_exp(int(x), e_i), wp, _RND))
                for x in dq_int[i]
            ]
        # dk_j = scale * sum_i dt_ij q_i: scale applied at the end.
        dk.add((b, slice(None), kvh, slice(None)), dt_al.T.dot(pb.q[b, :, h, :]), dt_al_exp + pb.q_exp)
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
            ds_al, ds_al_exp = (dt_al, dt_al_exp) if dt is ds else _align_rows(ds, ds_exp)
            idx = (0 if bias4[0] == 1 else b, 0 if bias4[1] == 1 else h)
            dbias.add(idx, spec.reduce_to_shape(ds_al, bias4[2:]), ds_al_exp)
    dk_f = dk.floats()
    if dk.e is not None:
        for idx in np.ndindex(*dk.n.shape):
            x = libmp.from_man_exp(int(dk.n[idx]), dk.e)
            dk_f[idx] = _mpf_float(libmp.mpf_mul(pb.scale, x, wp, _RND))
    dv_f = dv.floats()
    dbias_f = None if dbias is None else dbias.floats()
    dsinks_f = None if dsinks is None else dsinks.floats()
    for b, kvh in nan_kv:
        dk_f[b, :, kvh, :] = np.nan
        dv_f[b, :, kvh, :] = np.nan
    for b, h, rows in nan_bias:
        if dbias_f is not None:
            rr = rows if bias4[2] > 1 else 0
            dbias_f[0 if bias4[0] == 1 else b, 0 if bias4[1] == 1 else h, rr, :] = np.nan
        if dsinks_f is not None:
            dsinks_f[h] = np.nan
    if dbias_f is not None:
        dbias_f = dbias_f.reshape(att.bias_shape)
    return Grads(dq, dk_f, dv_f, dbias_f, fwd.out, fwd.lse, fwd.p, dsinks_f, fwd.p_sink)

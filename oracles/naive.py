"""O(n^2) materialising attention reference: float64, and a same-dtype emulation.

Two uses, one code path (numpy + ml_dtypes only):

- ``dtype=None`` (or ``"fp64"``): float64 throughout, inputs converted exactly, max-shifted
  softmax, analytic backward (``dv = P^T g``, ``dP = g V^T``, ``dS = P * (dP - rowsum(dP * P))``,
  ``dq = scale dS K``, ``dk = scale dS^T Q``, ``dbias`` = ``dS`` reduced to bias's shape; kv-head
  gradients sum over the query heads of their group). A fast proxy for ``oracles.mp``;
  ``accumulate``, ``round_logits`` and ``round_probs`` do not apply.
- ``dtype="bf16" | "fp16" | "fp32"`` (or the numpy dtype): what a plain framework implementation
  computes in that dtype, the reference of the FlashAttention test rule ("kernel error <= 2 x
  error of a same-precision reference"). Inputs are rounded to the dtype; matmuls accumulate in
  ``accumulate`` (``"fp32"``: real float32 BLAS products and sums, result rounded to the dtype;
  ``"input"``: a sequential sum rounded to the dtype after every fused multiply-add); logits
  (``(q @ k^T) * scale + bias``, each step rounded) are in the dtype when ``round_logits``, else in
  the accumulate dtype; softmax statistics (max, ``x - max``, exp, sum, division, lse) in the
  accumulate dtype; probabilities rounded to the dtype before ``P @ V`` when ``round_probs``;
  outputs rounded to the dtype. The backward is the same framework's autodiff of that graph:
  ``dP`` in the probabilities' dtype, the softmax backward in the accumulate dtype, ``dS`` in the
  logits' dtype, ``dq, dk, dv`` rounded to the dtype, GQA group sums in the accumulate dtype;
  ``dbias`` is reduced in float32 (``"fp32"``) or float64 (``"input"``) and rounded to the dtype.
  Results are float64 arrays whose values are exactly those of the dtype (``lse``: of the
  accumulate dtype). Rounding to bf16 is correctly rounded from float64 (``round_to_dtype``;
  ml_dtypes' own float64 -> bf16 cast rounds twice, through float32). With the defaults this is
  plain PyTorch on CPU (``(q @ k.T) * scale + bias`` in the dtype, ``softmax(s.float()).to(dtype)
  @ v``) and its autograd, bit for bit up to reduction order (tests/test_naive.py checks it).

The modern options (``spec``) in both modes: the logits are ``t = scale * (q @ k^T)``, then with
``softcap=c`` ``c^ = (tanh(t / c)) * c`` (in emulation ``t / c``, ``tanh`` and ``* c`` each rounded to
the logits' dtype; ``c`` itself is used as the float64 it is, like a Python scalar), then ``+ bias``,
then ``+ alibi`` with ``alibi = -(slope~ * |i + off - j|)`` computed in the accumulate dtype (slopes and
distances rounded to it, the product rounded) and added in the logits' dtype. A sink ``sigma_h``
is rounded to the accumulate dtype and takes part in the row max; its ``exp(sigma - max)`` is added
to the row sum after the keys' sum (so a ``-inf`` sink adds an exact 0 and equals no sink bit for
bit), and ``p_sink = exp(sigma - max) / sum``. Backward: ``dS = P * (dP - delta) + P * g_lse`` (the
two branches summed), ``dsinks_h = sum_{b,i} p_sink (g_lse - delta)`` summed in the accumulate
dtype and rounded to the dtype; with softcap the cotangent of ``t`` is ``dS * sech^2(t / c)`` in
float64 (``1 / cosh^2``, accurate where tanh saturates) and, in emulation, autodiff's
``((dS * c) * (1 - tanh^2)) / c`` rounded to the logits' dtype at each step; ``dbias`` is ``dS``.

Masked rows follow ``spec`` exactly as ``oracles.mp`` does: ``zeros`` (out 0, lse -inf, zero
gradients), ``nan`` (out and lse NaN; dq of the row, dk/dv of its whole kv head, the dbias
entries it reaches and ``dsinks`` of its head NaN), ``uniform`` (out = mean of all Lk values,
lse -inf, only dv receives ``g / Lk``). A row with no visible key but a sink gives out 0 and lse
``sigma``; a ``+inf`` sink gives out 0, lse ``+inf``, ``p_sink = 1``.

Accuracy, stated rather than hoped for. ``Result.logit_error [B, Hq, Lq]`` is an a-priori bound
on the absolute error of the row's computed logits ``s^_j`` against the exact
``c tanh(scale q.k_j / c) + b_j - slope |i + off - j|`` (max over visible keys j, and the sink)::

    E_ij = (1 + 4 u_l) * [ scale * gamma_Dk(u_mm) * sum_d |q~_d| |k~_jd|
                           + (2 u_l + 2 u_64) |t^_ij| + u_l |s^b_ij|
                           + u_l |t^_ij| + (2 u_l + u_tanh) |c^_ij|                  (softcap)
                           + u_l |s^_ij| + u_a |a^_ij| + |dslope| d_ij + |slope~| |dd_ij|  (ALiBi)
                           + scale * sum_d (|dq_d| |k~_jd| + |q_d| |dk_jd|) + |db_ij| ]
    E_i = max(max_j E_ij, |sigma~ - sigma|)                                          (sink)

with ``gamma_n(u) = n u / (1 - n u)``; ``u_mm`` the unit roundoff of the matmul accumulation,
``u_l`` that of the logits' dtype and ``u_a`` that of the accumulate dtype (all 2^-53 in float64);
``t^ = scale * (q @ k^T)``, ``c^`` the capped logit, ``s^b`` the logit after the bias (``c^`` or ``t^``
without bias) and ``s^`` the final one, ``a^`` the computed ALiBi term, ``d_ij = |i + off - j|``;
``q~, k~, slope~, sigma~`` the values as rounded to the dtype used and ``dq, dk, db, dslope, dd`` those
roundings (zero in float64). The terms are: the dot product (any summation order), the rounding
of its result to the logits' dtype and of the scale (itself rounded once) and its product, the
bias addition, the input rounding; ``1 + 4 u_l`` absorbs the second-order terms. Softcap: ``c
tanh(t / c)`` is 1-Lipschitz in ``t``, so the error of ``t^`` passes through undiminished but not
amplified, and its evaluation adds ``u_l |t^|`` (``t / c``) and ``(2 u_l + u_tanh) |c^|`` (tanh
rounded to the dtype, numpy's float64 tanh itself, ``* c``), with ``u_tanh = 8 u_64``: numpy's
tanh is not correctly rounded, 4 ulps are allowed (measured <= 1.15). ALiBi: the product rounded
in the accumulate dtype, the slope's and distance's roundings to it, and the addition. The sink
is one more logit of the row, whose only error is its rounding to the accumulate dtype. It is
``inf`` where a computed logit overflowed, 0 for masked rows and rows of a ``+inf`` sink. A logit
error ``E`` moves every probability (the sink's included) by a factor within ``exp(+-2E)``, so the
float64 output's error is at most about ``(2E + gamma_{Lk+4}) * A`` with ``A = sum_j p_j |v_j|``
(plus ``u`` times the row's logit range, from ``s - max``).

Decision: **flag by default, raise on request.** ``Result.reliable`` (bool ``[B, Hq, Lq]``) is
``logit_error <= reliable_tol`` (default ``RELIABLE_LOGIT_ERROR = 1e-11``, i.e. outputs within
~1e-10 of A); fully masked rows and rows of a ``+inf`` sink are reliable. ``strict=True`` raises ``InaccurateReference``
naming the worst row and its bound instead of returning. Flagging is the default because a
checker comparing thousands of cases wants to fall back to ``oracles.mp`` for the few unreliable
rows, not to handle an exception per case. In emulation mode the same bound and threshold apply,
so bf16/fp16 rows are essentially never "reliable": an emulation is not an accurate reference
and does not claim to be (pass ``reliable_tol`` to use another threshold).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from oracles import spec

RELIABLE_LOGIT_ERROR = 1e-11
ACCUMULATE = ("fp32", "input")
_F64 = np.dtype(np.float64)
_F32 = np.dtype(np.float32)
_BF16 = np.dtype(ml_dtypes.bfloat16)
_U64 = 2.0**-53
U_TANH = 8 * _U64  # numpy's float64 tanh: within 4 ulps (measured <= 1.15)


class InaccurateReference(ArithmeticError):
    """The naive reference cannot vouch for some rows: their logit error bound exceeds the threshold."""

    def __init__(self, message: str, row: tuple[int, int, int], logit_error: float, tol: float) -> None:
        super().__init__(message)
        self.row = row
        self.logit_error = logit_error
        self.tol = tol


@dataclass(frozen=True)
class Result:
    """Forward values as float64: ``out [B, Lq, Hq, Dv]``, ``lse [B, Hq, Lq]``, ``logit_error [B, Hq, Lq]``."""

    out: np.ndarray
    lse: np.ndarray
    logit_error: np.ndarray
    reliable_tol: float = RELIABLE_LOGIT_ERROR
    dtype: str = "fp64"
    p: np.ndarray | None = None  # [B, Hq, Lq, Lk] the probabilities (in the accumulate dtype's values)
    p_sink: np.ndarray | None = None  # [B, Hq, Lq] the sink's probability, with sinks

    @property
    def reliable(self) -> np.ndarray:
        """bool [B, Hq, Lq]: the row's logit error bound is within ``reliable_tol``."""
        return self.logit_error <= self.reliable_tol


@dataclass(frozen=True)
class Grads:
    """VJP values as float64 in the shapes of q, k, v, bias and sinks (None when not given), plus the forward."""

    dq: np.ndarray
    dk: np.ndarray
    dv: np.ndarray
    dbias: np.ndarray | None
    out: np.ndarray
    lse: np.ndarray
    logit_error: np.ndarray
    reliable_tol: float = RELIABLE_LOGIT_ERROR
    dtype: str = "fp64"
    dsinks: np.ndarray | None = None  # [Hq], with sinks
    p: np.ndarray | None = None  # [B, Hq, Lq, Lk] the probabilities (in the accumulate dtype's values)
    p_sink: np.ndarray | None = None  # [B, Hq, Lq] the sink's probability, with sinks

    @property
    def reliable(self) -> np.ndarray:
        """bool [B, Hq, Lq]: the row's logit error bound is within ``reliable_tol``."""
        return self.logit_error <= self.reliable_tol


def round_to_dtype(x: np.ndarray, dtype: object) -> np.ndarray:
    """``x`` rounded to nearest-even in ``dtype`` (bf16/fp16/fp32/fp64), returned as float64.

    Correct single rounding from float64 for every dtype: bf16 goes through float32 with
    round-to-odd, which makes the second rounding exact (ml_dtypes' direct cast double-rounds).
    """
    dt = spec.as_dtype(dtype)
    x = np.asarray(x, dtype=np.float64)
    if dt == _F64:
        return x
    with np.errstate(over="ignore", invalid="ignore"):
        if dt != _BF16:
            return x.astype(dt).astype(np.float64)
        f = x.astype(np.float32)
        away = np.abs(f.astype(np.float64)) > np.abs(x)
        f = np.where(away, np.nextafter(f, np.float32(0)), f)
        inexact = (f.astype(np.float64) != x) & ~np.isnan(x)
        f = (f.view(np.uint32) | inexact.astype(np.uint32)).view(np.float32)
        return f.astype(_BF16).astype(np.float64)


@dataclass(frozen=True)
class _Arith:
    """How one call computes: storage dtype, accumulate dtype, logits' and probabilities' dtypes."""

    dt: np.dtype
    acc: np.dtype
    log: np.dtype
    pdt: np.dtype
    mode: str  # "f64" (float64 BLAS), "f32" (float32 BLAS / pairwise sums), "seq" (rounded sequential)

    @property
    def name(self) -> str:
        return spec.dtype_name(self.dt)

    def rnd(self, x: np.ndarray, dt: np.dtype) -> np.ndarray:
        return x if dt == _F64 else round_to_dtype(x, dt)

    def mm(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``a @ b`` accumulated per ``mode`` (not yet rounded to an output dtype)."""
        if self.mode == "f64":
            return a @ b
        if self.mode == "f32":
            return (a.astype(np.float32) @ b.astype(np.float32)).astype(np.float64)
        out = np.zeros(a.shape[:-1] + b.shape[-1:])
        for t in range(a.shape[-1]):
            out = self.rnd(out + a[..., :, t, None] * b[..., None, t, :], self.acc)
        return out

    def sum(self, x: np.ndarray, axis: int = -1) -> np.ndarray:
        """Sum over ``axis`` in the accumulate dtype (keepdims)."""
        if self.mode == "f64":
            return x.sum(axis=axis, keepdims=True)
        if self.mode == "f32":
            return x.astype(np.float32).sum(axis=axis, keepdims=True, dtype=np.float32).astype(np.float64)
        x = np.moveaxis(x, axis, -1)
        out = np.zeros(x.shape[:-1])
        for t in range(x.shape[-1]):
            out = self.rnd(out + x[..., t], self.acc)
        return np.expand_dims(out, axis)


def _arith(dtype: object, accumulate: str, round_logits: bool, round_probs: bool) -> _Arith:
    if accumulate not in ACCUMULATE:
        raise ValueError(f"unknown accumulate {accumulate!r}; known: {', '.join(ACCUMULATE)}")
    dt = _F64 if dtype is None else spec.as_dtype(dtype)
    if dt == _F64:
        return _Arith(_F64, _F64, _F64, _F64, "f64")
    acc = _F32 if accumulate == "fp32" else dt
    log = dt if round_logits else acc
    pdt = dt if round_probs else acc
    return _Arith(dt, acc, log, pdt, "f32" if accumulate == "fp32" else "seq")


def _gamma(n: int, u: float) -> float:
    return n * u / (1.0 - n * u) if n * u < 1 else np.inf


def _heads_first(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(spec.to_heads_first(np.asarray(x).astype(np.float64)))


def _swap(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, -1, -2)


@dataclass
class _Fwd:
    """Forward intermediates (heads first, float64 values of their dtypes)."""

    q: np.ndarray  # [B, Hq, Lq, Dk] rounded inputs
    k: np.ndarray  # [B, Hq, Lk, Dk] (kv heads expanded to query heads)
    v: np.ndarray  # [B, Hq, Lk, Dv]
    p: np.ndarray  # [B, Hq, Lq, Lk] softmax in the accumulate dtype, 0 on masked rows
    p_mm: np.ndarray  # p as it enters P @ V
    out: np.ndarray  # [B, Lq, Hq, Dv]
    lse: np.ndarray  # [B, Hq, Lq]
    logit_error: np.ndarray  # [B, Hq, Lq]
    scale: float
    p_sink: np.ndarray | None = None  # [B, Hq, Lq, 1] the sink's probability (accumulate dtype)
    cap_arg: np.ndarray | None = None  # [B, Hq, Lq, Lk] t / c as computed (softcap)
    cap_tanh: np.ndarray | None = None  # [B, Hq, Lq, Lk] tanh(t / c) as computed (softcap)


@dataclass
class _Logits:
    """The computed logits and their stages, for the error bound."""

    t: np.ndarray  # scale * (q @ k^T), computed
    capped: np.ndarray | None  # c * tanh(t / c), computed (softcap)
    after_bias: np.ndarray  # capped (or t) + bias, computed
    s: np.ndarray  # the final logits, -inf where invisible
    bias: np.ndarray | None  # the bias as rounded to the logits' dtype (0 where invisible)
    alibi: np.ndarray | None  # the ALiBi term as computed
    slopes: np.ndarray | None  # [B, Hq] slopes as rounded for the ALiBi product
    dist: np.ndarray | None  # [Lq, Lk] distances as rounded for the ALiBi product


def _logit_error(att: spec.Attention, ar: _Arith, q: np.ndarray, k: np.ndarray, lg: _Logits,
                 scale: float) -> np.ndarray:
    """The a-priori bound of the module docstring, maxed over each row's visible keys (and its sink)."""
    q0 = _heads_first(att.q)
    k0 = _heads_first(att.k)[:, att.kv_head]
    u_mm = {"f64": _U64, "f32": spec.unit_roundoff("fp32")}.get(ar.mode, spec.unit_roundoff(ar.dt))
    u_l = spec.unit_roundoff(ar.log)
    u_a = spec.unit_roundoff(ar.acc)
    vis = att.visible
    with np.errstate(over="ignore", invalid="ignore"):
        ka = np.abs(k)
        e = abs(scale) * _gamma(q.shape[-1], u_mm) * (np.abs(q) @ _swap(ka))
        e = e + (2 * u_l + 2 * _U64) * np.abs(lg.t)
        if lg.capped is not None:
            e = e + u_l * np.abs(lg.t) + (2 * u_l + U_TANH) * np.abs(lg.capped)
        e = e + u_l * np.abs(np.where(vis, lg.after_bias, 0.0))
        if lg.alibi is not None:
            e = e + u_l * np.abs(np.where(vis, lg.s, 0.0)) + u_a * np.abs(lg.alibi)
            d_slope = np.abs(lg.slopes - att.alibi_slopes)[:, :, None, None]
            d_dist = np.abs(lg.dist - att.distance)
            e = e + d_slope * att.distance + np.abs(lg.slopes)[:, :, None, None] * d_dist
        dq, dk = np.abs(q - q0), np.abs(k - k0)
        if dq.any() or dk.any():
            e = e + abs(scale) * (dq @ _swap(ka) + np.abs(q0) @ _swap(dk))
        if lg.bias is not None:
            b0 = att.bias.astype(np.float64)
            e = e + np.where(np.isfinite(b0), np.abs(lg.bias - b0), 0.0)
        e = (1 + 4 * u_l) * e
        e = np.where(np.isfinite(lg.s) | ~vis, e, np.inf)
        e = np.where(np.isnan(e), np.inf, e)
    row = np.where(vis, e, 0.0).max(axis=-1)
    if att.sinks is not None:
        # The sink is one more logit of the row: its rounding to the accumulate dtype.
        sig = att.sinks
        with np.errstate(invalid="ignore"):
            e_sink = np.where(np.isfinite(sig), np.abs(ar.rnd(sig, ar.acc) - sig), 0.0)
        row = np.maximum(row, np.where(att.sink_row, e_sink[None, :, None], 0.0))
        row = np.where(att.infinite_sink_row, 0.0, row)
    return row


def _logits(att: spec.Attention, ar: _Arith, q: np.ndarray, k: np.ndarray, scale: float) -> tuple[_Logits, tuple]:
    """``c tanh(t / c) + bias - alibi`` as the emulated dtype computes it; also softcap's t / c and tanh."""
    vis = att.visible
    t = ar.rnd(ar.rnd(ar.mm(q, _swap(k)), ar.log) * scale, ar.log)
    s = t
    capped, cap = None, (None, None)
    if att.softcap is not None:
        c = att.softcap
        x = ar.rnd(t / c, ar.log)
        th = ar.rnd(np.tanh(x), ar.log)
        capped = s = ar.rnd(th * c, ar.log)
        cap = (x, th)
    bias = None
    if att.bias is not None:
        bias = ar.rnd(np.where(vis, att.bias.astype(np.float64), 0.0), ar.log)
        s = ar.rnd(s + bias, ar.log)
    after_bias = s
    alibi, slopes, dist = None, None, None
    if att.alibi_slopes is not None:
        slopes = ar.rnd(att.alibi_slopes, ar.acc)
        dist = ar.rnd(att.distance.astype(np.float64), ar.acc)
        alibi = ar.rnd(-(slopes[:, :, None, None] * dist), ar.acc)
        s = ar.rnd(s + alibi, ar.log)
    s = np.where(vis, s, -np.inf)
    return _Logits(t, capped, after_bias, s, bias, alibi, slopes, dist), cap


def _forward(att: spec.Attention, ar: _Arith) -> _Fwd:
    kvh = att.kv_head
    scale = att.scale_float()
    q = ar.rnd(_heads_first(att.q), ar.dt)
    k = ar.rnd(_heads_first(att.k), ar.dt)[:, kvh]
    v = ar.rnd(_heads_first(att.v), ar.dt)[:, kvh]
    vis = att.visible
    masked = att.masked_row
    inf_sink = att.infinite_sink_row
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        lg, (cap_arg, cap_tanh) = _logits(att, ar, q, k, scale)
        s = lg.s
        logit_error = _logit_error(att, ar, q, k, lg, scale)
        m = s.max(axis=-1, keepdims=True)
        sig = None
        if att.sinks is not None:
            sig = ar.rnd(att.sinks, ar.acc)[None, :, None, None]
            m = np.maximum(m, sig)
        m = np.where((masked | inf_sink)[..., None], 0.0, m)
        x = ar.rnd(s - m, ar.acc)
        e = ar.rnd(np.exp(x), ar.acc)
        total = ar.sum(e)
        if sig is not None:
            # The sink joins the row sum after the keys (an exact +0 for a -inf sink).
            e_sink = ar.rnd(np.exp(ar.rnd(sig - m, ar.acc)), ar.acc)
            total = ar.rnd(total + e_sink, ar.acc)
        div = np.where(total > 0, total, 1.0)
        p = ar.rnd(e / div, ar.acc)
        p = np.where(vis & ~inf_sink[..., None], p, 0.0)
        p_sink = None
        if sig is not None:
            p_sink = np.where(inf_sink[..., None], 1.0, ar.rnd(e_sink / div, ar.acc))
        p_mm = ar.rnd(p, ar.pdt)
        o = ar.rnd(ar.mm(p_mm, v), ar.dt)
        lse = ar.rnd(m[..., 0] + ar.rnd(np.log(total[..., 0]), ar.acc), ar.acc)
    lse = np.where(masked, -np.inf, lse)
    lse = np.where(inf_sink, np.inf, lse)
    if masked.any():
        if att.masked_rows == "nan":
            o = np.where(masked[..., None], np.nan, o)
            lse = np.where(masked, np.nan, lse)
        elif att.masked_rows == "uniform":
            mean = ar.rnd(v.sum(axis=-2, keepdims=True) / v.shape[-2], ar.dt)
            o = np.where(masked[..., None], mean, o)
    out = np.ascontiguousarray(spec.to_seq_first(o))
    return _Fwd(q, k, v, p, p_mm, out, lse, logit_error, scale, p_sink, cap_arg, cap_tanh)


def _group_sum(x: np.ndarray, hkv: int, ar: _Arith) -> np.ndarray:
    """[B, Hq, L, D] -> [B, Hkv, L, D]: sum over the query heads of each kv head's group."""
    b, hq = x.shape[:2]
    if hq == hkv:
        return x
    g = x.reshape((b, hkv, hq // hkv) + x.shape[2:])
    return ar.rnd(ar.sum(g, axis=2)[:, :, 0], ar.dt)


def _check(res: Result | Grads, strict: bool, what: str) -> None:
    if not strict or res.reliable.all():
        return
    bad = ~res.reliable
    worst = np.unravel_index(np.argmax(np.where(bad, res.logit_error, -1.0)), bad.shape)
    row = tuple(int(i) for i in worst)
    err = float(res.logit_error[worst])
    raise InaccurateReference(
        f"naive {what} ({res.dtype}) is not a reliable reference for {int(bad.sum())} of {bad.size} rows: "
        f"logit error bound > {res.reliable_tol:g}; worst row [b={row[0]}, h={row[1]}, i={row[2]}] "
        f"has logit error bound {err:.3g}; use oracles.mp for these rows",
        row, err, res.reliable_tol,
    )


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
    dtype: object = None,
    accumulate: str = "fp32",
    round_logits: bool = True,
    round_probs: bool = True,
    reliable_tol: float = RELIABLE_LOGIT_ERROR,
    strict: bool = False,
) -> Result:
    """Attention output and lse in float64 (``dtype=None``) or emulating ``dtype``; see the module doc.

    ``strict=True`` raises ``InaccurateReference`` where ``reliable`` would be False.
    """
    att = spec.normalize(
        q, k, v, mask=mask, bias=bias, scale=scale, causal=causal, masked_rows=masked_rows, align=align,
        window=window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
    )
    ar = _arith(dtype, accumulate, round_logits, round_probs)
    f = _forward(att, ar)
    res = Result(f.out, f.lse, f.logit_error, float(reliable_tol), ar.name, f.p, _sink_probs(f))
    _check(res, strict, "attention")
    return res


def _sink_probs(f: _Fwd) -> np.ndarray | None:
    return None if f.p_sink is None else f.p_sink[..., 0]


def _softcap_backward(att: spec.Attention, ar: _Arith, f: _Fwd, ds: np.ndarray) -> np.ndarray:
    """The cotangent of ``t`` from that of ``c tanh(t / c)``.

    Float64: ``ds * sech^2(t / c)`` with ``sech^2 = 1 / cosh^2`` (accurate where tanh saturates).
    Emulation, as autodiff of ``(tanh(t / c)) * c`` computes it: ``* c``, ``* (1 - tanh^2)``, ``/ c``,
    each rounded to the logits' dtype.
    """
    c = att.softcap
    with np.errstate(over="ignore", invalid="ignore"):
        if ar.mode == "f64":
            return ds * (1.0 / np.cosh(f.cap_arg)) ** 2
        g1 = ar.rnd(ds * c, ar.log)
        g2 = ar.rnd(g1 * (1.0 - f.cap_tanh * f.cap_tanh), ar.log)
        return ar.rnd(g2 / c, ar.log)


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
    dtype: object = None,
    accumulate: str = "fp32",
    round_logits: bool = True,
    round_probs: bool = True,
    reliable_tol: float = RELIABLE_LOGIT_ERROR,
    strict: bool = False,
) -> Grads:
    """Analytic ``dq, dk, dv, dbias, dsinks`` for the cotangents ``g`` of ``out`` and ``g_lse`` of ``lse``."""
    att = spec.normalize(
        q, k, v, mask=mask, bias=bias, scale=scale, causal=causal, masked_rows=masked_rows, align=align,
        window=window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
    )
    g = spec.check_cotangent(att, g)
    g_lse = spec.check_lse_cotangent(att, g_lse)
    ar = _arith(dtype, accumulate, round_logits, round_probs)
    f = _forward(att, ar)
    hkv = att.k.shape[2]
    masked = att.masked_row
    gh = ar.rnd(_heads_first(g), ar.dt)
    gl = None if g_lse is None else ar.rnd(g_lse.astype(np.float64), ar.acc)[..., None]
    with np.errstate(over="ignore", invalid="ignore"):
        dv = _group_sum(ar.rnd(ar.mm(_swap(f.p_mm), gh), ar.dt), hkv, ar)
        dp = ar.rnd(ar.mm(gh, _swap(f.v)), ar.pdt)
        delta = ar.sum(ar.rnd(dp * f.p, ar.acc))
        ds = ar.rnd(f.p * ar.rnd(dp - delta, ar.acc), ar.acc)
        if gl is not None:
            # d lse / d s_ij = p_ij: the lse branch of the graph, summed into ds.
            ds = ar.rnd(ds + ar.rnd(f.p * gl, ar.acc), ar.acc)
        ds = ar.rnd(ds, ar.log)
        dt = ds if att.softcap is None else _softcap_backward(att, ar, f, ds)
        dqk = ar.rnd(dt * f.scale, ar.log)
        dq = ar.rnd(ar.mm(dqk, f.k), ar.dt)
        dk = _group_sum(ar.rnd(ar.mm(_swap(dqk), f.q), ar.dt), hkv, ar)
        dbias = None
        if att.bias_shape is not None:
            red = spec.reduce_to_shape(ds.astype(np.float32) if ar.mode == "f32" else ds, att.bias_shape)
            dbias = ar.rnd(red.astype(np.float64), ar.dt)
        dsinks = None
        if f.p_sink is not None:
            # d out / d sigma = -p_sink o, d lse / d sigma = p_sink: p_sink (g_lse - delta) per row.
            inner = -delta if gl is None else ar.rnd(gl - delta, ar.acc)
            per_row = ar.rnd(f.p_sink * inner, ar.acc)[..., 0]  # [B, Hq, Lq]
            dsinks = ar.rnd(ar.sum(ar.sum(per_row, axis=2), axis=0).reshape(-1), ar.dt)
    if masked.any() and att.masked_rows == "uniform":
        # Each masked row spreads g / Lk over all Lk keys of its kv head (float64, rounded once).
        b, hq, lk = gh.shape[0], gh.shape[1], att.k.shape[1]
        gsum = np.where(masked[..., None], gh, 0.0).sum(axis=2)  # [B, Hq, Dv]
        gsum = gsum.reshape(b, hkv, hq // hkv, -1).sum(axis=2)[:, :, None, :]  # [B, Hkv, 1, Dv]
        dv = ar.rnd(dv + gsum / lk, ar.dt)
    if masked.any() and att.masked_rows == "nan":
        dq = np.where(masked[..., None], np.nan, dq)
        kv_nan = np.zeros(dk.shape[:2], dtype=bool)  # [B, Hkv]
        np.logical_or.at(kv_nan, (slice(None), att.kv_head), masked.any(axis=-1))
        dk = np.where(kv_nan[:, :, None, None], np.nan, dk)
        dv = np.where(kv_nan[:, :, None, None], np.nan, dv)
        if dbias is not None:
            hit = spec.reduce_to_shape(np.broadcast_to(masked[..., None], ds.shape).astype(np.float64),
                                       att.bias_shape)
            dbias = np.where(hit > 0, np.nan, dbias)
        if dsinks is not None:
            dsinks = np.where(masked.any(axis=(0, 2)), np.nan, dsinks)
    res = Grads(
        np.ascontiguousarray(spec.to_seq_first(dq)),
        np.ascontiguousarray(spec.to_seq_first(dk)),
        np.ascontiguousarray(spec.to_seq_first(dv)),
        dbias,
        f.out,
        f.lse,
        f.logit_error,
        float(reliable_tol),
        ar.name,
        dsinks,
        f.p,
        _sink_probs(f),
    )
    _check(res, strict, "attention_vjp")
    return res

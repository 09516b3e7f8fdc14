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

Masked rows follow ``spec`` exactly as ``oracles.mp`` does: ``zeros`` (out 0, lse -inf, zero
gradients), ``nan`` (out and lse NaN; dq of the row, dk/dv of its whole kv head and the dbias
entries it reaches NaN), ``uniform`` (out = mean of all Lk values, lse -inf, only dv receives
``g / Lk``).

Accuracy, stated rather than hoped for. ``Result.logit_error [B, Hq, Lq]`` is an a-priori bound
on the absolute error of the row's computed logits ``s^_j`` against the exact ``scale q.k_j + b_j``
(max over visible keys j)::

    E_ij = (1 + 4 u_l) * [ scale * gamma_Dk(u_mm) * sum_d |q~_d| |k~_jd|
                           + (2 u_l + 2 u_64) |t^_ij| + u_l |s^_ij|
                           + scale * sum_d (|dq_d| |k~_jd| + |q_d| |dk_jd|) + |db_ij| ]

with ``gamma_n(u) = n u / (1 - n u)``; ``u_mm`` the unit roundoff of the matmul accumulation and
``u_l`` that of the logits' dtype (both 2^-53 in float64); ``t^ = scale * (q @ k^T)`` and ``s^``
the computed logits before and after the bias; ``q~, k~`` the inputs as rounded to the dtype and
``dq, dk, db`` the input roundings (zero in float64). The terms are: the dot product (any
summation order), the rounding of its result to the logits' dtype and of the scale (itself
rounded once) and its product, the bias addition, the input rounding; ``1 + 4 u_l`` absorbs the
second-order terms. It is ``inf`` where a computed logit overflowed. A logit error ``E`` moves
every probability by a factor within ``exp(+-2E)``, so the float64 output's error is at most
about ``(2E + gamma_{Lk+4}) * A`` with ``A = sum_j p_j |v_j|`` (plus ``u`` times the row's logit
range, from ``s - max``).

Decision: **flag by default, raise on request.** ``Result.reliable`` (bool ``[B, Hq, Lq]``) is
``logit_error <= reliable_tol`` (default ``RELIABLE_LOGIT_ERROR = 1e-11``, i.e. outputs within
~1e-10 of A); fully masked rows are reliable. ``strict=True`` raises ``InaccurateReference``
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

    @property
    def reliable(self) -> np.ndarray:
        """bool [B, Hq, Lq]: the row's logit error bound is within ``reliable_tol``."""
        return self.logit_error <= self.reliable_tol


@dataclass(frozen=True)
class Grads:
    """VJP values as float64 in the shapes of q, k, v and bias (None without bias), plus the forward."""

    dq: np.ndarray
    dk: np.ndarray
    dv: np.ndarray
    dbias: np.ndarray | None
    out: np.ndarray
    lse: np.ndarray
    logit_error: np.ndarray
    reliable_tol: float = RELIABLE_LOGIT_ERROR
    dtype: str = "fp64"

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


def _logit_error(att: spec.Attention, ar: _Arith, q: np.ndarray, k: np.ndarray, t: np.ndarray, s: np.ndarray,
                 bias: np.ndarray | None, scale: float) -> np.ndarray:
    """The a-priori bound of the module docstring, maxed over each row's visible keys."""
    q0 = _heads_first(att.q)
    k0 = _heads_first(att.k)[:, att.kv_head]
    u_mm = {"f64": _U64, "f32": spec.unit_roundoff("fp32")}.get(ar.mode, spec.unit_roundoff(ar.dt))
    u_l = spec.unit_roundoff(ar.log)
    with np.errstate(over="ignore", invalid="ignore"):
        ka = np.abs(k)
        e = abs(scale) * _gamma(q.shape[-1], u_mm) * (np.abs(q) @ _swap(ka))
        e = e + (2 * u_l + 2 * _U64) * np.abs(t) + u_l * np.abs(np.where(att.visible, s, 0.0))
        dq, dk = np.abs(q - q0), np.abs(k - k0)
        if dq.any() or dk.any():
            e = e + abs(scale) * (dq @ _swap(ka) + np.abs(q0) @ _swap(dk))
        if bias is not None:
            b0 = att.bias.astype(np.float64)
            e = e + np.where(np.isfinite(b0), np.abs(bias - b0), 0.0)
        e = (1 + 4 * u_l) * e
        e = np.where(np.isfinite(s) | ~att.visible, e, np.inf)
        e = np.where(np.isnan(e), np.inf, e)
    return np.where(att.visible, e, 0.0).max(axis=-1)


def _forward(att: spec.Attention, ar: _Arith) -> _Fwd:
    kvh = att.kv_head
    scale = att.scale_float()
    q = ar.rnd(_heads_first(att.q), ar.dt)
    k = ar.rnd(_heads_first(att.k), ar.dt)[:, kvh]
    v = ar.rnd(_heads_first(att.v), ar.dt)[:, kvh]
    vis = att.visible
    masked = att.masked_row
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        t = ar.rnd(ar.rnd(ar.mm(q, _swap(k)), ar.log) * scale, ar.log)
        s = t
        bias = None
        if att.bias is not None:
            bias = ar.rnd(np.where(vis, att.bias.astype(np.float64), 0.0), ar.log)
            s = ar.rnd(s + bias, ar.log)
        s = np.where(vis, s, -np.inf)
        logit_error = _logit_error(att, ar, q, k, t, s, bias, scale)
        m = s.max(axis=-1, keepdims=True)
        m = np.where(masked[..., None], 0.0, m)
        x = ar.rnd(s - m, ar.acc)
        e = ar.rnd(np.exp(x), ar.acc)
        total = ar.sum(e)
        p = ar.rnd(e / np.where(total > 0, total, 1.0), ar.acc)
        p = np.where(vis, p, 0.0)
        p_mm = ar.rnd(p, ar.pdt)
        o = ar.rnd(ar.mm(p_mm, v), ar.dt)
        lse = ar.rnd(m[..., 0] + ar.rnd(np.log(total[..., 0]), ar.acc), ar.acc)
    lse = np.where(masked, -np.inf, lse)
    if masked.any():
        if att.masked_rows == "nan":
            o = np.where(masked[..., None], np.nan, o)
            lse = np.where(masked, np.nan, lse)
        elif att.masked_rows == "uniform":
            mean = ar.rnd(v.sum(axis=-2, keepdims=True) / v.shape[-2], ar.dt)
            o = np.where(masked[..., None], mean, o)
    out = np.ascontiguousarray(spec.to_seq_first(o))
    return _Fwd(q, k, v, p, p_mm, out, lse, logit_error, scale)


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
    att = spec.normalize(q, k, v, mask=mask, bias=bias, scale=scale, causal=causal, masked_rows=masked_rows)
    ar = _arith(dtype, accumulate, round_logits, round_probs)
    f = _forward(att, ar)
    res = Result(f.out, f.lse, f.logit_error, float(reliable_tol), ar.name)
    _check(res, strict, "attention")
    return res


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
    dtype: object = None,
    accumulate: str = "fp32",
    round_logits: bool = True,
    round_probs: bool = True,
    reliable_tol: float = RELIABLE_LOGIT_ERROR,
    strict: bool = False,
) -> Grads:
    """Analytic ``dq, dk, dv, dbias`` for the cotangent ``g`` of ``out`` (and the forward values)."""
    att = spec.normalize(q, k, v, mask=mask, bias=bias, scale=scale, causal=causal, masked_rows=masked_rows)
    g = spec.check_cotangent(att, g)
    ar = _arith(dtype, accumulate, round_logits, round_probs)
    f = _forward(att, ar)
    hkv = att.k.shape[2]
    masked = att.masked_row
    gh = ar.rnd(_heads_first(g), ar.dt)
    with np.errstate(over="ignore", invalid="ignore"):
        dv = _group_sum(ar.rnd(ar.mm(_swap(f.p_mm), gh), ar.dt), hkv, ar)
        dp = ar.rnd(ar.mm(gh, _swap(f.v)), ar.pdt)
        delta = ar.sum(ar.rnd(dp * f.p, ar.acc))
        ds = ar.rnd(f.p * ar.rnd(dp - delta, ar.acc), ar.acc)
        ds = ar.rnd(ds, ar.log)
        dqk = ar.rnd(ds * f.scale, ar.log)
        dq = ar.rnd(ar.mm(dqk, f.k), ar.dt)
        dk = _group_sum(ar.rnd(ar.mm(_swap(dqk), f.q), ar.dt), hkv, ar)
        dbias = None
        if att.bias_shape is not None:
            red = spec.reduce_to_shape(ds.astype(np.float32) if ar.mode == "f32" else ds, att.bias_shape)
            dbias = ar.rnd(red.astype(np.float64), ar.dt)
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
    )
    _check(res, strict, "attention_vjp")
    return res

"""The attention semantics: one definition shared by every oracle, target adapter and check.

Layout ``[batch, seq, heads, dim]``::

    q [B, Lq, Hq, Dk]   k [B, Lk, Hkv, Dk]   v [B, Lk, Hkv, Dv]   out [B, Lq, Hq, Dv]
    lse [B, Hq, Lq]     mask / bias broadcastable to [B, Hq, Lq, Lk]

- grouped-query attention: query head ``h`` reads kv head ``h // (Hq // Hkv)``;
- logits ``s = scale * q.k + bias``; ``scale=None`` means exactly ``1/sqrt(Dk)``;
- ``mask`` is boolean, True = attend; a ``-inf`` bias entry also masks; ``+inf`` and NaN are errors;
- ``causal=True``: key ``j`` is visible to query ``i`` iff ``j <= i + off``, where the offset is
  ``off = 0`` for ``align="top-left"`` (the default; SDPA's ``is_causal``, JAX) and ``Lk - Lq`` for
  ``"bottom-right"`` (FlashAttention >= 2.1, ``causal_lower_right``; negative when Lq > Lk);
- ``window=(left, right)`` (ints >= 0, or None for unbounded): visible iff
  ``i + off - left <= j <= i + off + right``;
- ``q_segment_ids [B, Lq]``, ``kv_segment_ids [B, Lk]`` (integers, both or neither): visible iff equal;
- the visible set is the intersection of mask, ``-inf`` bias, causal, window and segments;
- ``softcap=c > 0`` and ``alibi_slopes [Hq] | [B, Hq]`` change the logits to
  ``s = c * tanh(scale * q.k / c) + bias - slope_h * |i + off - j|`` (softcap first, then bias, then ALiBi);
- ``sinks [Hq]``: a per-query-head logit ``sigma_h`` in every row's softmax with no value (gpt-oss):
  ``out_i = sum_j e^s_ij v_j / (e^sigma_h + sum_j e^s_ij)``, ``lse_i = log(e^sigma_h + sum_j e^s_ij)``.
  A sink of ``-inf`` is exactly no sink; a sink of ``+inf`` gives out 0 and lse ``+inf`` for every row of
  its head (and zero gradients but ``dsinks``, whose limit ``sum g_lse`` is kept); a row with no visible
  key but a sink ``> -inf`` gives out 0 and lse ``sigma_h`` and is *not* a masked row;
- a row with no visible key and no sink (``sinks`` None or ``-inf``) follows the masked-row policy:
  ``zeros`` (out 0, lse -inf, zero gradients), ``nan`` (out, lse and that row's gradients NaN, ``dsinks``
  of its head included) or
  ``uniform`` (out = mean of all Lk values of the kv head, lse -inf, only ``dv`` receives ``g / Lk``:
  what a ``finfo.min`` fill computes);
- gradients: for a cotangent ``g`` of out and optionally ``g_lse`` of lse,
  ``ds_ij = p_ij (g_i.v_j - delta_i + g_lse_i)`` with ``delta_i = g_i.o_i``,
  ``dsinks_h = sum_{b,i} p_sink_bhi (g_lse_bhi - delta_bhi)``; with softcap the cotangent of
  ``t = scale q.k`` is ``ds * (1 - tanh^2(t / c))``, while ``dbias`` is ``ds`` itself; ALiBi slopes and
  segment ids get no gradient. Rows whose lse is ``-inf`` take nothing from ``g_lse``.

Every float input (q, k, v, bias, slopes, sinks, cotangents) must be an array of a supported dtype
(bf16 via ml_dtypes, fp16, fp32, fp64); such values are exact dyadic rationals, so an oracle can start
from exact values. Segment ids are integer arrays. ``Attention`` carries everything derived (the
visible pattern, the offset, the ALiBi term, the sinks as float64, the empty and the masked rows) so
that no consumer re-derives the semantics.
Framework-free by design: numpy and ml_dtypes only.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "fp16": np.dtype(np.float16),
    "fp32": np.dtype(np.float32),
    "fp64": np.dtype(np.float64),
}
MASKED_ROW_POLICIES = ("zeros", "nan", "uniform")
ALIGNS = ("top-left", "bottom-right")
_MANTISSA_BITS = {"bf16": 8, "fp16": 11, "fp32": 24, "fp64": 53}


def dtype_name(dtype: object) -> str:
    """Short name (``bf16`` ...) of a dtype given as a name, numpy dtype or array dtype."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return dtype
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}") from exc
    for name, known in DTYPES.items():
        if dt == known:
            return name
    raise ValueError(f"unsupported dtype {dt}; supported: {', '.join(DTYPES)}")


def as_dtype(dtype: object) -> np.dtype:
    """The numpy dtype for a name such as ``bf16`` or any supported dtype."""
    return DTYPES[dtype_name(dtype)]


def unit_roundoff(dtype: object) -> float:
    """u = 2^-p for a dtype with p significand bits (bf16 2^-8, fp16 2^-11, fp32 2^-24, fp64 2^-53)."""
    return 2.0 ** -_MANTISSA_BITS[dtype_name(dtype)]


def finfo(dtype: object) -> ml_dtypes.finfo:
    """Machine limits (max, tiny, smallest_subnormal, ...) of a supported dtype, bf16 included."""
    return ml_dtypes.finfo(as_dtype(dtype))


def ulp(x: np.ndarray | float, dtype: object) -> np.ndarray:
    """Spacing of ``dtype``'s numbers at |x| (the subnormal spacing below the normal range)."""
    info = finfo(dtype)
    ax = np.abs(np.asarray(x, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        e = np.floor(np.log2(np.maximum(ax, float(info.tiny))))
    return np.exp2(e - (_MANTISSA_BITS[dtype_name(dtype)] - 1))


def _shape(x: np.ndarray) -> str:
    return "[" + ", ".join(str(n) for n in x.shape) + "]"


def _float_array(name: str, x: object, ndim: int | None = None) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype not in DTYPES.values():
        raise ValueError(
            f"{name} has unsupported dtype {arr.dtype}; supported: {', '.join(DTYPES)}"
        )
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims [batch, seq, heads, dim], got {_shape(arr)}")
    if np.isnan(arr.astype(np.float64)).any():
        raise ValueError(f"{name} {_shape(arr)} contains NaN")
    return arr


def _finite(name: str, arr: np.ndarray) -> None:
    if not np.isfinite(arr.astype(np.float64)).all():
        raise ValueError(f"{name} {_shape(arr)} contains inf; only finite values are allowed")


def _broadcast_shape(name: str, arr: np.ndarray, target: tuple[int, ...]) -> tuple[int, ...]:
    """The 4-d shape ``arr`` has once left-padded, after checking it broadcasts to ``target``."""
    if arr.ndim > 4:
        raise ValueError(f"{name} {_shape(arr)} has more than 4 dims; target [B, Hq, Lq, Lk] = {list(target)}")
    padded = (1,) * (4 - arr.ndim) + arr.shape
    for have, want in zip(padded, target, strict=True):
        if have not in (1, want):
            raise ValueError(
                f"{name} {_shape(arr)} is not broadcastable to [B, Hq, Lq, Lk] = {list(target)}"
            )
    return padded


def offset(lq: int, lk: int, align: str = "top-left") -> int:
    """The diagonal's offset: query ``i`` is aligned with key ``i + off`` (0 top-left, ``Lk - Lq`` bottom-right)."""
    if align not in ALIGNS:
        raise ValueError(f"unknown align {align!r}; known: {', '.join(ALIGNS)}")
    return 0 if align == "top-left" else lk - lq


def relative_position(lq: int, lk: int, off: int = 0) -> np.ndarray:
    """int64 [Lq, Lk]: ``i + off - j``, how far key ``j`` lies behind query ``i``'s aligned key."""
    return np.arange(lq, dtype=np.int64)[:, None] + off - np.arange(lk, dtype=np.int64)[None, :]


def position_visible(
    lq: int, lk: int, off: int = 0, causal: bool = False, window: tuple[int | None, int | None] | None = None
) -> np.ndarray:
    """bool [Lq, Lk]: the keys that causal and window leave visible (``d = i + off - j``:
    causal needs ``d >= 0``, window ``-right <= d <= left``)."""
    d = relative_position(lq, lk, off)
    vis = np.ones((lq, lk), dtype=bool)
    if causal:
        vis &= d >= 0
    if window is not None:
        left, right = window
        if left is not None:
            vis &= d <= left
        if right is not None:
            vis &= d >= -right
    return vis


def alibi_term(slopes: np.ndarray, lq: int, lk: int, off: int = 0) -> np.ndarray:
    """float64 [B, Hq, Lq, Lk]: ``-slope * |i + off - j|`` for slopes [B, Hq] (each product rounded once)."""
    dist = np.abs(relative_position(lq, lk, off)).astype(np.float64)
    return -(np.asarray(slopes, dtype=np.float64)[:, :, None, None] * dist)


@dataclass(frozen=True)
class Attention:
    """A validated attention problem: inputs as given plus everything derived from the semantics."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    visible: np.ndarray  # bool [B, Hq, Lq, Lk]: mask & (bias != -inf) & causal & window & segments
    bias: np.ndarray | None  # [B, Hq, Lq, Lk] view, -inf where masked by bias
    bias_shape: tuple[int, ...] | None  # bias's own shape, for reducing dbias
    scale: float | None  # None = exactly 1/sqrt(Dk)
    masked_rows: str
    align: str = "top-left"
    offset: int = 0  # i + offset is the key aligned with query i (0 top-left, Lk - Lq bottom-right)
    causal: bool = False
    window: tuple[int | None, int | None] | None = None
    softcap: float | None = None
    alibi_slopes: np.ndarray | None = None  # float64 [B, Hq] (an [Hq] input broadcast over B), exact
    alibi: np.ndarray | None = None  # float64 [B, Hq, Lq, Lk]: -slope * |i + off - j|, rounded once
    sinks: np.ndarray | None = None  # float64 [Hq], exact; may hold -inf (no sink) and +inf
    q_segment_ids: np.ndarray | None = None  # [B, Lq] as given
    kv_segment_ids: np.ndarray | None = None  # [B, Lk] as given

    @property
    def dims(self) -> dict[str, int]:
        b, lq, hq, dk = self.q.shape
        _, lk, hkv, dv = self.v.shape
        return {"B": b, "Lq": lq, "Lk": lk, "Hq": hq, "Hkv": hkv, "Dk": dk, "Dv": dv}

    @property
    def kv_head(self) -> np.ndarray:
        """For each query head, the kv head it reads."""
        hq, hkv = self.q.shape[2], self.k.shape[2]
        return np.arange(hq) // (hq // hkv)

    @property
    def empty_row(self) -> np.ndarray:
        """bool [B, Hq, Lq]: rows with no visible key (with or without a sink)."""
        return ~self.visible.any(axis=-1)

    @property
    def sink_row(self) -> np.ndarray:
        """bool [B, Hq, Lq]: rows whose softmax has a sink (``sinks`` given and ``> -inf``)."""
        b, hq, lq = self.visible.shape[:3]
        has = np.zeros(hq, dtype=bool) if self.sinks is None else self.sinks > -np.inf
        return np.broadcast_to(has[None, :, None], (b, hq, lq))

    @property
    def infinite_sink_row(self) -> np.ndarray:
        """bool [B, Hq, Lq]: rows of heads whose sink is ``+inf`` (out 0, lse +inf, zero gradients)."""
        b, hq, lq = self.visible.shape[:3]
        inf = np.zeros(hq, dtype=bool) if self.sinks is None else self.sinks == np.inf
        return np.broadcast_to(inf[None, :, None], (b, hq, lq))

    @property
    def masked_row(self) -> np.ndarray:
        """bool [B, Hq, Lq]: rows governed by the masked-row policy (no visible key and no sink)."""
        return self.empty_row & ~self.sink_row

    @property
    def distance(self) -> np.ndarray:
        """int64 [Lq, Lk]: ALiBi's ``|i + off - j|``."""
        lq, lk = self.visible.shape[2:]
        return np.abs(relative_position(lq, lk, self.offset))

    def scale_float(self) -> float:
        """The scale as a float64 (the exact value rounded once)."""
        return float(1.0 / np.sqrt(self.q.shape[-1])) if self.scale is None else self.scale


def _is_int(x: object) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)


def check_window(window: object) -> tuple[int | None, int | None] | None:
    """``window`` as a pair of ints >= 0 or None (unbounded sides); ValueError naming what is wrong."""
    if window is None:
        return None
    if not isinstance(window, tuple | list) or len(window) != 2:
        raise ValueError(f"window must be None or a pair (left, right) of ints >= 0 or None, got {window!r}")
    out = []
    for side, x in zip(("left", "right"), window, strict=True):
        if x is not None and not _is_int(x):
            raise ValueError(f"window {side} must be an int >= 0 or None (unbounded), got {x!r} in window={window!r}")
        if x is not None and x < 0:
            raise ValueError(f"window {side} must be >= 0 (None = unbounded), got {x} in window={window!r}")
        out.append(None if x is None else int(x))
    return out[0], out[1]


def _check_softcap(softcap: object) -> float | None:
    if softcap is None:
        return None
    if isinstance(softcap, bool | np.bool_) or not isinstance(softcap, int | float | np.integer | np.floating):
        raise ValueError(f"softcap must be a number > 0 or None, got {softcap!r}")
    c = float(softcap)
    if not np.isfinite(c) or c <= 0:
        raise ValueError(f"softcap must be finite and > 0, got {c}")
    return c


def _head_vector(name: str, x: object, shapes: list[tuple[int, ...]], what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype not in DTYPES.values():
        raise ValueError(f"{name} has unsupported dtype {arr.dtype}; supported: {', '.join(DTYPES)}")
    if arr.shape not in shapes:
        raise ValueError(f"{name} {_shape(arr)} must have shape {what}")
    a64 = arr.astype(np.float64)
    if np.isnan(a64).any():
        raise ValueError(f"{name} {_shape(arr)} contains NaN")
    return a64


def _segment_ids(name: str, x: object, shape: tuple[int, int], what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{name} {_shape(arr)} must have shape {what} = {list(shape)}")
    return arr


def normalize(
    q: object,
    k: object,
    v: object,
    *,
    mask: object = None,
    bias: object = None,
    scale: float | None = None,
    causal: bool = False,
    masked_rows: str = "zeros",
    align: str = "top-left",
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    alibi_slopes: object = None,
    sinks: object = None,
    q_segment_ids: object = None,
    kv_segment_ids: object = None,
) -> Attention:
    """Validate an attention call and derive its visibility; raise ``ValueError`` naming the problem."""
    q = _float_array("q", q, 4)
    k = _float_array("k", k, 4)
    v = _float_array("v", v, 4)
    for name, arr in (("q", q), ("k", k), ("v", v)):
        _finite(name, arr)
    (b, lq, hq, dk), (bk, lk, hkv, dkk), (bv, lv, hv, _) = q.shape, k.shape, v.shape
    if (bk, lk, hkv) != (bv, lv, hv) or bk != b:
        raise ValueError(
            f"k {_shape(k)} and v {_shape(v)} must share batch, seq and heads with each other, "
            f"and batch with q {_shape(q)}"
        )
    if dkk != dk:
        raise ValueError(f"head dim of q {_shape(q)} and k {_shape(k)} differ: Dk {dk} != {dkk}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"Hq={hq} (q {_shape(q)}) is not a multiple of Hkv={hkv} (k {_shape(k)})")
    if min(q.shape + k.shape + v.shape) == 0:
        raise ValueError(f"empty dimension in q {_shape(q)}, k {_shape(k)} or v {_shape(v)}")
    if masked_rows not in MASKED_ROW_POLICIES:
        raise ValueError(f"unknown masked_rows policy {masked_rows!r}; known: {', '.join(MASKED_ROW_POLICIES)}")
    if scale is not None:
        scale = float(scale)
        if not np.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    off = offset(lq, lk, align)
    window = check_window(window)
    softcap = _check_softcap(softcap)

    target = (b, hq, lq, lk)
    visible = np.ones(target, dtype=bool)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise ValueError(f"mask must be boolean (True = attend), got dtype {mask.dtype}")
        _broadcast_shape("mask", mask, target)
        visible &= mask
    if causal or window is not None:
        visible &= position_visible(lq, lk, off, bool(causal), window)
    bias_full, bias_shape = None, None
    if bias is not None:
        bias = np.asarray(bias)
        if bias.dtype not in DTYPES.values():
            raise ValueError(f"bias has unsupported dtype {bias.dtype}; supported: {', '.join(DTYPES)}")
        b64 = bias.astype(np.float64)
        if np.isnan(b64).any():
            raise ValueError(f"bias {_shape(bias)} contains NaN")
        if (b64 == np.inf).any():
            raise ValueError(f"bias {_shape(bias)} contains +inf; use -inf (or mask) to hide a key")
        bias_shape = bias.shape
        _broadcast_shape("bias", bias, target)
        bias_full = np.broadcast_to(bias, target)
        visible &= bias_full.astype(np.float64) != -np.inf
    if (q_segment_ids is None) != (kv_segment_ids is None):
        given = "q_segment_ids" if kv_segment_ids is None else "kv_segment_ids"
        raise ValueError(f"q_segment_ids and kv_segment_ids must be given together (got only {given})")
    if q_segment_ids is not None:
        q_segment_ids = _segment_ids("q_segment_ids", q_segment_ids, (b, lq), "[B, Lq]")
        kv_segment_ids = _segment_ids("kv_segment_ids", kv_segment_ids, (b, lk), "[B, Lk]")
        visible &= (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
    slopes, alibi = None, None
    if alibi_slopes is not None:
        slopes = _head_vector("alibi_slopes", alibi_slopes, [(hq,), (b, hq)], f"[Hq] = [{hq}] or [B, Hq] = [{b}, {hq}]")
        if not np.isfinite(slopes).all():
            raise ValueError(f"alibi_slopes {_shape(slopes)} contains inf; only finite values are allowed")
        slopes = np.ascontiguousarray(np.broadcast_to(slopes, (b, hq)))
        alibi = alibi_term(slopes, lq, lk, off)
    if sinks is not None:
        sinks = _head_vector("sinks", sinks, [(hq,)], f"[Hq] = [{hq}]")
    return Attention(
        q, k, v, visible, bias_full, bias_shape, scale, masked_rows, align, off, bool(causal), window, softcap,
        slopes, alibi, sinks, q_segment_ids, kv_segment_ids,
    )


def check_cotangent(att: Attention, g: object) -> np.ndarray:
    """Validate a cotangent for ``out``: shape [B, Lq, Hq, Dv], supported dtype, finite."""
    b, lq, hq = att.q.shape[:3]
    want = (b, lq, hq, att.v.shape[-1])
    g = _float_array("g", g, 4)
    if g.shape != want:
        raise ValueError(f"cotangent g {_shape(g)} must have the output's shape {list(want)}")
    _finite("g", g)
    return g


def check_lse_cotangent(att: Attention, g_lse: object) -> np.ndarray | None:
    """Validate an optional cotangent for ``lse``: shape [B, Hq, Lq], supported dtype, finite."""
    if g_lse is None:
        return None
    b, lq, hq = att.q.shape[:3]
    want = (b, hq, lq)
    g_lse = _float_array("g_lse", g_lse)
    if g_lse.shape != want:
        raise ValueError(f"cotangent g_lse {_shape(g_lse)} must have lse's shape [B, Hq, Lq] = {list(want)}")
    _finite("g_lse", g_lse)
    return g_lse


def reduce_to_shape(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum a [B, Hq, Lq, Lk] array over the axes that ``shape`` broadcasts (for dbias)."""
    padded = (1,) * (x.ndim - len(shape)) + tuple(shape)
    axes = tuple(i for i, (have, n) in enumerate(zip(padded, x.shape, strict=True)) if have == 1 and n != 1)
    return x.sum(axis=axes, keepdims=True).reshape(shape)


def to_heads_first(x: np.ndarray) -> np.ndarray:
    """[B, L, H, D] -> [B, H, L, D]."""
    return np.swapaxes(x, 1, 2)


def to_seq_first(x: np.ndarray) -> np.ndarray:
    """[B, H, L, D] -> [B, L, H, D]."""
    return np.swapaxes(x, 1, 2)

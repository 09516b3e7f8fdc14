"""The attention semantics: one definition shared by every oracle, target adapter and check.

Layout ``[batch, seq, heads, dim]``::

    q [B, Lq, Hq, Dk]   k [B, Lk, Hkv, Dk]   v [B, Lk, Hkv, Dv]   out [B, Lq, Hq, Dv]
    lse [B, Hq, Lq]     mask / bias broadcastable to [B, Hq, Lq, Lk]

- grouped-query attention: query head ``h`` reads kv head ``h // (Hq // Hkv)``;
- logits ``s = scale * q.k + bias``; ``scale=None`` means exactly ``1/sqrt(Dk)``;
- ``mask`` is boolean, True = attend; a ``-inf`` bias entry also masks; ``+inf`` and NaN are errors;
- ``causal=True``: key ``j`` is visible to query ``i`` iff ``j <= i`` (top-left aligned);
- a row with no visible key follows the masked-row policy: ``zeros`` (out 0, lse -inf, zero
  gradients), ``nan`` (out, lse and that row's gradients NaN) or ``uniform`` (out = mean of all
  Lk values of the kv head, lse -inf, only ``dv`` receives ``g / Lk``: what a ``finfo.min`` fill
  computes).

Every input must be a floating array of a supported dtype (bf16 via ml_dtypes, fp16, fp32,
fp64); such values are exact dyadic rationals, so an oracle can start from exact values.
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


@dataclass(frozen=True)
class Attention:
    """A validated attention problem: inputs as given plus the derived visibility pattern."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    visible: np.ndarray  # bool [B, Hq, Lq, Lk]: mask & causal & (bias != -inf)
    bias: np.ndarray | None  # [B, Hq, Lq, Lk] view, -inf where masked by bias
    bias_shape: tuple[int, ...] | None  # bias's own shape, for reducing dbias
    scale: float | None  # None = exactly 1/sqrt(Dk)
    masked_rows: str

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
    def masked_row(self) -> np.ndarray:
        """bool [B, Hq, Lq]: rows with no visible key."""
        return ~self.visible.any(axis=-1)

    def scale_float(self) -> float:
        """The scale as a float64 (the exact value rounded once)."""
        return float(1.0 / np.sqrt(self.q.shape[-1])) if self.scale is None else self.scale


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

    target = (b, hq, lq, lk)
    visible = np.ones(target, dtype=bool)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise ValueError(f"mask must be boolean (True = attend), got dtype {mask.dtype}")
        _broadcast_shape("mask", mask, target)
        visible &= mask
    if causal:
        visible &= np.tri(lq, lk, dtype=bool)
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
    return Attention(q, k, v, visible, bias_full, bias_shape, scale, masked_rows)


def check_cotangent(att: Attention, g: object) -> np.ndarray:
    """Validate a cotangent for ``out``: shape [B, Lq, Hq, Dv], supported dtype, finite."""
    b, lq, hq = att.q.shape[:3]
    want = (b, lq, hq, att.v.shape[-1])
    g = _float_array("g", g, 4)
    if g.shape != want:
        raise ValueError(f"cotangent g {_shape(g)} must have the output's shape {list(want)}")
    _finite("g", g)
    return g


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

"""Value families: named ways to push q, k, v to the numerical edges of a dtype.

Each family is one idea, named so that findings and reports can say which one broke a kernel:

- ``normal``, ``uniform``: ordinary inputs;
- ``large-logits``: row maxima near and past ``log(max)`` of the dtype (fp16 ~11.1, bf16/fp32 ~88.7);
- ``row-offset``: a huge common offset on every logit of a row (tests the max-rescaling);
- ``dominant-key``: one key far above the rest, at a chunk boundary;
- ``equal-logits``: all logits of a row equal (identical keys or q = 0);
- ``spread``: logits spread so most ``exp`` underflow, in descending, ascending or shuffled key order;
- ``big-values`` / ``tiny-values``: values near the dtype's max / down in its subnormals;
- ``cancel``: paired keys whose values cancel (outputs much smaller than their scale A);
- ``rising`` / ``falling``: logits strictly ordered along the keys (before rounding to the dtype),
  rising by a drawn total of 4..40 from the first key to the last, with noise below half a step:
  every key chunk (or tile) raises the running max, so every chunk rescales the accumulator -- the
  most rescalings a kernel can do -- or, falling, none after the first.

Decisions worth knowing:

- Constructed families put their signal in the last head dim (a "channel") and bound the other
  dims' logit contribution to |.| <= 1, so the intended property holds exactly before rounding to
  the dtype. Channel magnitudes are split evenly between q and k so both stay representable.
- ``big-values``: |v| in [0.25, 1] x cap, cap = min(finfo(dtype).max, finfo(acc).max / (16 max(Lk, Dv))),
  acc = fp32 (fp64 for fp64 inputs): about 1e37..6e35 for bf16/fp32. A correct kernel accumulates
  ``sum exp(s - m) v`` (up to Lk |v|) and ``g.v`` (Dv terms, |g| up to ~5) in fp32, so larger values
  (bf16's range is fp32's) would make correct kernels overflow. For fp16 the cap is fp16's max: fp32
  accumulators hold it; a kernel accumulating in fp16 overflows (a real finding).
- Arrays are built in float64 and cast once to the case dtype (clipped to the finite range), so every
  input is exact and finite.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

from oracles import spec
from verify.strategies.menus import SEED, Pick, composite, floats, hypothesis_pick, ints, known, one_of

FAMILIES: tuple[str, ...] = (
    "normal",
    "uniform",
    "large-logits",
    "row-offset",
    "dominant-key",
    "equal-logits",
    "spread",
    "big-values",
    "tiny-values",
    "cancel",
    "rising",
    "falling",
)
NEEDS_KEY_BLOCK = frozenset({"dominant-key"})  # families that align to a key chunk


def finfo(dtype: str) -> Any:
    return ml_dtypes.finfo(spec.as_dtype(dtype))


def cast(x: np.ndarray, dtype: str) -> np.ndarray:
    """Clip to the dtype's finite range and round once."""
    big = float(finfo(dtype).max)
    out = np.clip(x, -big, big).astype(spec.as_dtype(dtype))
    assert np.isfinite(out.astype(np.float64)).all()
    return out


def key_edges(lk: int, block: int) -> tuple[int, ...]:
    """Key indices at a chunk boundary of size ``block``: multiples of it and their neighbours, inside Lk."""
    return tuple(sorted({m + d for m in range(0, lk + 1, block) for d in (0, -1, 1) if 0 <= m + d < lk}))


class Values(NamedTuple):
    """q, k, v in the case dtype, and the family's drawn parameters (JSON-ready, for ``Case.meta``)."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    params: dict


def _eff_scale(scale: float | None, dk: int) -> float:
    return float(1.0 / np.sqrt(dk)) if scale is None else float(scale)


def _logits(q: np.ndarray, k: np.ndarray, s: float) -> np.ndarray:
    """float64 ``s * q.k`` as [B, Hq, Lq, Lk], kv heads shared by groups of query heads."""
    kx = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
    return s * np.einsum("bqhd,bkhd->bhqk", q, kx)


def _bounded(rng: np.random.Generator, dims: dict[str, int], s: float) -> tuple[np.ndarray, np.ndarray]:
    """q, k whose last dim is 0 and whose other dims give logits with |s q.k| <= 1."""
    b, lq, lk, hq, hkv, dk = (dims[n] for n in ("B", "Lq", "Lk", "Hq", "Hkv", "Dk"))
    t = 1.0 / np.sqrt(s * max(dk - 1, 1))
    q = rng.uniform(-t, t, (b, lq, hq, dk))
    k = rng.uniform(-t, t, (b, lk, hkv, dk))
    q[..., -1] = 0.0
    k[..., -1] = 0.0
    return q, k


def pick_values(
    pick: Pick, family: str, dtype: str, dims: dict[str, int], scale: float | None, key_block: int | None
) -> Values:
    """q, k, v of ``family``; ``key_block`` is the chunk ``dominant-key`` aligns to (None: all of Lk)."""
    b, lq, lk, hq, hkv, dk, dv = (dims[n] for n in ("B", "Lq", "Lk", "Hq", "Hkv", "Dk", "Dv"))
    s = _eff_scale(scale, dk)
    fi = finfo(dtype)
    params: dict[str, Any] = {}
    if family == "dominant-key":  # structural choices before the seed, so they shrink independently
        block = key_block or lk
        params["dominant_key"] = pick(one_of(key_edges(lk, block)))
        params["gap"] = pick(floats(4.0, 64.0))
    rng = np.random.default_rng(pick(SEED))
    q = rng.standard_normal((b, lq, hq, dk))
    k = rng.standard_normal((b, lk, hkv, dk))
    v = rng.standard_normal((b, lk, hkv, dv))
    if family == "uniform":
        q, k, v = rng.uniform(-1, 1, q.shape), rng.uniform(-1, 1, k.shape), rng.uniform(-1, 1, v.shape)
    elif family == "large-logits":
        params["fraction"] = frac = pick(floats(0.85, 1.5))
        target = frac * float(np.log(float(fi.max)))
        direction = rng.standard_normal(dk)  # q, k near one shared direction: many logits near the peak
        direction /= np.linalg.norm(direction)
        q = direction + 0.3 / np.sqrt(dk) * rng.standard_normal(q.shape)
        k = direction + 0.3 / np.sqrt(dk) * rng.standard_normal(k.shape)
        k *= np.where(rng.random((b, lk, hkv, 1)) < 0.25, -1.0, 1.0)
        q *= np.sqrt(target / s) / np.linalg.norm(q, axis=-1, keepdims=True)
        k *= np.sqrt(target / s) / np.linalg.norm(k, axis=-1, keepdims=True)
        logits = _logits(q, k, s)  # [B, Hq, Lq, Lk]
        peak = np.take_along_axis(logits, np.abs(logits).argmax(-1)[..., None], -1)[..., 0]
        q *= np.swapaxes(target / np.where(peak == 0, target, peak), 1, 2)[..., None]  # row max = target
    elif family == "row-offset":
        if dk < 2:
            raise ValueError("row-offset needs Dk >= 2 (one dim carries the offset)")
        lo, hi = (1e3, 1e4) if dtype in ("fp32", "fp64") else (1e2, 1e3)
        params["offset"] = offset = pick(floats(lo, hi))
        channel = np.sqrt(offset / s)
        row = offset * rng.uniform(0.5, 1.0, (b, lq, hq)) * rng.choice([-1.0, 1.0], (b, lq, hq))
        q[..., -1] = row / (s * channel)
        k[..., -1] = channel
    elif family == "dominant-key":
        q, k = _bounded(rng, dims, s)
        channel = np.sqrt(params["gap"] / s)
        q[..., -1] = channel
        k[:, params["dominant_key"]] = 0.0
        k[:, params["dominant_key"], :, -1] = channel
    elif family == "equal-logits":
        params["how"] = how = pick(one_of(("identical-keys", "zero-q")))
        if how == "zero-q":
            q = np.zeros_like(q)
        else:
            k = np.broadcast_to(k[:, :1], k.shape).copy()
    elif family == "spread":
        params["step"] = step = pick(floats(10.0, 100.0))
        params["order"] = order = pick(one_of(("descending", "ascending", "shuffled")))
        rank = {"descending": np.arange(lk), "ascending": np.arange(lk)[::-1], "shuffled": rng.permutation(lk)}[order]
        q, k = _bounded(rng, dims, s)
        channel = np.sqrt(max(lk - 1, 1) * step / s)
        q[..., -1] = channel
        k[..., -1] = (-rank * step / (s * channel))[None, :, None]
    elif family in ("rising", "falling"):
        params["rise"] = rise = pick(floats(4.0, 40.0))
        pos = np.arange(lk) if family == "rising" else np.arange(lk)[::-1]
        q, k = _bounded(rng, dims, s)
        q *= min(1.0, 0.45 * rise / max(lk - 1, 1))  # noise below half a step: strictly ordered logits
        channel = np.sqrt(rise / s)
        q[..., -1] = channel
        k[..., -1] = (pos * rise / max(lk - 1, 1) / (s * channel))[None, :, None]
    elif family == "big-values":
        acc = np.finfo(np.float64 if dtype == "fp64" else np.float32).max
        cap = min(float(fi.max), float(acc) / (16 * max(lk, dv)))
        params["fraction"] = frac = pick(floats(0.25, 1.0))
        v = cap * rng.uniform(frac, 1.0, v.shape) * rng.choice([-1.0, 1.0], v.shape)
    elif family == "tiny-values":
        params["span"] = span = pick(ints(0, int(fi.nmant)))
        v = float(fi.smallest_normal) * 2.0 ** rng.uniform(-span, 1.0, v.shape) * rng.choice([-1.0, 1.0], v.shape)
    elif family == "cancel":
        params["eps"] = eps = pick(one_of((0.0, 1e-3, 1e-1)))
        pairs = lk // 2 * 2
        k[:, 1:pairs:2] = k[:, 0:pairs:2]
        v[:, 1:pairs:2] = -v[:, 0:pairs:2] + eps * rng.standard_normal(v[:, 1:pairs:2].shape)
        v[:, pairs:] *= eps
    elif family != "normal":
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return Values(cast(q, dtype), cast(k, dtype), cast(v, dtype), params)


def _draw_values(draw, family: str, dtype: str, dims: dict[str, int], scale: float | None,
                 key_block: int | None) -> Values:
    return pick_values(hypothesis_pick(draw), family, dtype, dims, scale, key_block)


_values = composite("values", _draw_values)


def values(family: str, dtype: str, dims: dict[str, int], *, scale: float | None = None,
           key_block: int | None = None) -> st.SearchStrategy[Values]:
    """q, k, v of one named family for ``dims`` (as ``Case.dims``) in ``dtype`` ("bf16", "fp16", ...).

    ``key_block`` is the key chunk size ``dominant-key`` aligns to (default: one chunk of Lk).
    """
    known("family", (family,), FAMILIES)
    return _values(family, spec.dtype_name(dtype), dims, scale, key_block)


def families(names: tuple[str, ...] = FAMILIES) -> st.SearchStrategy[str]:
    """A value-family name."""
    return st.sampled_from(known("family", names, FAMILIES))

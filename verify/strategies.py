"""Hypothesis strategies that generate attention cases (``verify.case.Case``) at the numerical edges.

The building blocks are small and named so a test can compose its own: ``shapes``,
``chunk_sizes``, ``families``, ``values``, ``masks``; ``cases`` ties them together for a target's
declared features, and ``example_case`` builds the same cases from a plain numpy seed.

Decisions worth knowing:

- Every choice a case makes (shape, family, mask kind, magnitudes, positions) is a ``_Menu``: Hypothesis
  draws it, so shrinking walks it toward the menu's first (simplest) entry or a range's low end; bulk
  numbers come from ``np.random.default_rng(seed)`` with a drawn seed, so shrinking never works on
  thousands of floats. ``example_case`` samples the same menus with numpy: one code path.
- Lengths come from a fixed menu (1, 2, primes, 2^k and 2^k+-1), extended by 2^k and 2^k+-1 for
  ``max_len`` > 33, so a jitted target recompiles a bounded number of times. Chunk sizes come from
  ``chunk_menu(L)``: None (the target's default) first, then 1, the largest proper divisor, the smallest
  non-divisor, L-1, L, L+1, 2L.
- One mask kind per case (no causal + padding combinations). A mask kind whose feature the target did
  not declare is dropped from the menu; if none is left the case uses ``"none"``. Kinds that need chunk
  positions (``masked-key-chunk``, ``single-key-edge``, the ``dominant-key`` family) use the case's key
  chunk size, or, when that is None, a block drawn from the chunk menu, recorded as ``meta["key_block"]``.
- Constructed families put their signal in the last head dim (a "channel") and bound the other dims'
  logit contribution to |.| <= 1, so the intended property holds exactly before rounding to the dtype.
  Channel magnitudes are split evenly between q and k so both stay representable.
- ``big-values``: |v| in [0.25, 1] x cap, cap = min(finfo(dtype).max, finfo(acc).max / (16 max(Lk, Dv))),
  acc = fp32 (fp64 for fp64 inputs): about 1e37..6e35 for bf16/fp32. A correct kernel accumulates
  ``sum exp(s - m) v`` (up to Lk |v|) and ``g.v`` (Dv terms, |g| up to ~5) in fp32, so larger values
  (bf16's range is fp32's) would make correct kernels overflow. For fp16 the cap is fp16's max: fp32
  accumulators hold it; a kernel accumulating in fp16 overflows (a real finding), and gradients whose
  exact value exceeds fp16's max are the checks' business.
- Bias-expressed masks keep the dtype's own rounding: ``-1e9`` is -inf in fp16 (a real masking bug
  source); ``finfo.min`` is finite, so "masked" keys keep a tiny weight and a fully "masked" row is a
  uniform row -- what the oracle computes from the semantics.
- Arrays are built in float64 and cast once to the case dtype (clipped to the finite range), so every
  input is exact and finite.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

from oracles import spec
from verify.case import Case
from verify.targets.base import FEATURES

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
)
MASK_KINDS: tuple[str, ...] = (
    "none",
    "random",
    "causal",
    "key-padding",
    "masked-rows",
    "masked-key-chunk",
    "single-key-edge",
    "bias-inf",
    "bias-finfo-min",
    "bias-1e9",
    "bias",
)
MASK_NEEDS: dict[str, str | None] = {
    "none": None,
    "random": "mask",
    "causal": "causal",
    "key-padding": "mask",
    "masked-rows": "mask",
    "masked-key-chunk": "mask",
    "single-key-edge": "mask",
    "bias-inf": "bias",
    "bias-finfo-min": "bias",
    "bias-1e9": "bias",
    "bias": "bias",
}
LENGTHS: tuple[int, ...] = (1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 31, 32, 33)
KV_HEADS: tuple[int, ...] = (1, 2)
GROUPS: tuple[int, ...] = (1, 2)
HEAD_DIMS: tuple[int, ...] = (1, 2, 3, 4, 8, 16)
SCALES: tuple[float, ...] = (1.0, 0.125, 0.3)
_BIAS_FILLS = {"bias-inf": -np.inf, "bias-1e9": -1e9}  # bias-finfo-min: the dtype's own finfo.min
_NEED_BLOCK = frozenset({"masked-key-chunk", "single-key-edge"})


# --- choices: drawn by Hypothesis (shrinkable) or sampled by numpy (example_case) -------------------


@dataclass(frozen=True)
class _Menu:
    """One choice: an option from ``options`` (simplest first), or a number in [lo, hi] (simplest = lo)."""

    options: tuple = ()
    lo: float = 0.0
    hi: float = 0.0
    integer: bool = False

    def strategy(self) -> st.SearchStrategy:
        if self.options:
            return st.sampled_from(self.options)
        if self.integer:
            return st.integers(int(self.lo), int(self.hi))
        return st.floats(self.lo, self.hi)

    def sample(self, rng: np.random.Generator) -> Any:
        if self.options:
            return self.options[int(rng.integers(len(self.options)))]
        if self.integer:
            return int(rng.integers(int(self.lo), int(self.hi), endpoint=True))
        return float(rng.uniform(self.lo, self.hi))


def _one_of(options: Iterable) -> _Menu:
    return _Menu(options=tuple(dict.fromkeys(options)))


def _floats(lo: float, hi: float) -> _Menu:
    return _Menu(lo=lo, hi=hi)


def _ints(lo: int, hi: int) -> _Menu:
    return _Menu(lo=lo, hi=hi, integer=True)


_SEED = _ints(0, 2**32 - 1)
Pick = Callable[[_Menu], Any]


def _hypothesis_pick(draw: Callable) -> Pick:
    return lambda menu: draw(menu.strategy())


def _numpy_pick(rng: np.random.Generator) -> Pick:
    return lambda menu: menu.sample(rng)


# --- shapes and chunk sizes ----------------------------------------------------------------------------


def length_menu(max_len: int = 33) -> tuple[int, ...]:
    """Sequence lengths up to ``max_len``: 1, 2, primes, 2^k and 2^k+-1 (beyond 33: 2^k and 2^k+-1)."""
    extra, p = [], 64
    while p - 1 <= max_len:
        extra += [p - 1, p, p + 1]
        p *= 2
    menu = tuple(n for n in (*LENGTHS, *extra) if n <= max_len)
    if not menu:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    return menu


def chunk_menu(length: int) -> tuple[int | None, ...]:
    """Chunk sizes for a length L: None (target default), 1, a divisor, a non-divisor, L-1, L, L+1, 2L."""
    divisor = max((d for d in range(2, length) if length % d == 0), default=1)
    non_divisor = min((d for d in range(2, length) if length % d), default=1)
    sizes = sorted({c for c in (1, divisor, non_divisor, length - 1, length, length + 1, 2 * length) if c > 0})
    return (None, *sizes)


# Shape buckets for compiled targets (``compact=True``): each jitted (shape, chunks, scale, mask
# layout) is one XLA compilation of ~1 s on this machine, so a campaign over the full menus compiles
# nearly every case. These buckets keep the edges (length 1, primes, 2^k+-1, Lq != Lk, GQA, Dk != Dv,
# chunks of 1, non-divisors, equal to and larger than L) with a bounded number of programs.
# (B, Lq, Lk, Hq, Hkv, Dk, Dv), then (query chunk, key chunk) pairs.
COMPACT_SHAPES: tuple[tuple[tuple[int, ...], tuple[tuple[int | None, int | None], ...]], ...] = (
    ((1, 1, 1, 1, 1, 1, 1), ((None, None), (1, 1))),
    ((1, 3, 5, 1, 1, 2, 2), ((1, 2), (3, 6))),
    ((1, 8, 8, 2, 2, 4, 4), ((None, None), (3, 3), (8, 8))),
    ((2, 5, 17, 2, 1, 4, 3), ((2, 4), (5, 17))),
    ((1, 17, 9, 4, 2, 8, 8), ((4, 2), (17, 10))),
    ((1, 33, 33, 1, 1, 8, 8), ((16, 8), (33, 34))),
    ((2, 16, 33, 2, 2, 3, 5), ((5, 1), (16, 32))),
    ((1, 65, 64, 2, 1, 4, 4), ((64, 16), (1, 63))),
)


def _pick_compact(pick: Pick, *, max_len: int, max_heads: int, max_dim: int, gqa: bool, min_dk: int,
                  chunked: bool) -> tuple[dict[str, int], int | None, int | None]:
    """A bucket of ``COMPACT_SHAPES`` that fits the limits, and one of its chunk pairs."""
    fits = []
    for (b, lq, lk, hq, hkv, dk, dv), chunks in COMPACT_SHAPES:
        hq = hq if gqa else hkv
        if max(lq, lk) <= max_len and hq <= max_heads and max(dk, dv) <= max_dim and dk >= min_dk:
            fits.append(({"B": b, "Lq": lq, "Lk": lk, "Hq": hq, "Hkv": hkv, "Dk": dk, "Dv": dv}, chunks))
    if not fits:
        raise ValueError(f"no compact shape fits max_len={max_len}, max_heads={max_heads}, max_dim={max_dim}")
    dims, chunks = fits[pick(_one_of(range(len(fits))))]
    qchunk, kchunk = pick(_one_of(chunks)) if chunked else (None, None)
    return dims, qchunk, kchunk


def _pick_shape(pick: Pick, *, max_len: int, max_heads: int, max_dim: int, gqa: bool, min_dk: int) -> dict[str, int]:
    lengths = length_menu(max_len)
    kv_heads = tuple(h for h in KV_HEADS if h <= max_heads)
    dims = tuple(d for d in HEAD_DIMS if d <= max_dim)
    if not kv_heads or not dims or max(dims) < min_dk:
        raise ValueError(f"no shape fits max_heads={max_heads}, max_dim={max_dim}, min_dk={min_dk}")
    b = pick(_ints(1, 2))
    lq, lk = pick(_one_of(lengths)), pick(_one_of(lengths))
    hkv = pick(_one_of(kv_heads))
    group = pick(_one_of(g for g in GROUPS if hkv * g <= max_heads)) if gqa else 1
    dk = pick(_one_of(d for d in dims if d >= min_dk))
    dv = pick(_one_of(dims))
    return {"B": b, "Lq": lq, "Lk": lk, "Hq": hkv * group, "Hkv": hkv, "Dk": dk, "Dv": dv}


def shapes(
    *, max_len: int = 33, max_heads: int = 4, max_dim: int = 16, gqa: bool = True, min_dk: int = 1
) -> st.SearchStrategy[dict[str, int]]:
    """Dims ``{B, Lq, Lk, Hq, Hkv, Dk, Dv}`` (``Case.dims``): Lq, Lk drawn independently, Hq = Hkv * group."""
    return st.composite(
        lambda draw: _pick_shape(
            _hypothesis_pick(draw), max_len=max_len, max_heads=max_heads, max_dim=max_dim, gqa=gqa, min_dk=min_dk
        )
    )()


def chunk_sizes(length: int) -> st.SearchStrategy[int | None]:
    """A chunk size for a sequence of ``length`` from ``chunk_menu`` (None = the target's default)."""
    return st.sampled_from(chunk_menu(length))


def families(names: Sequence[str] = FAMILIES) -> st.SearchStrategy[str]:
    """A value-family name."""
    return st.sampled_from(_known("family", names, FAMILIES))


# --- values ---------------------------------------------------------------------------------------


class Values(NamedTuple):
    """q, k, v in the case dtype, and the family's drawn parameters (JSON-ready, for ``Case.meta``)."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    params: dict


def _finfo(dtype: str) -> Any:
    return ml_dtypes.finfo(spec.as_dtype(dtype))


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    """Clip to the dtype's finite range and round once."""
    big = float(_finfo(dtype).max)
    out = np.clip(x, -big, big).astype(spec.as_dtype(dtype))
    assert np.isfinite(out.astype(np.float64)).all()
    return out


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


def _key_edges(lk: int, block: int) -> tuple[int, ...]:
    """Key indices at a chunk boundary of size ``block``: multiples of it and their neighbours, inside Lk."""
    return tuple(sorted({m + d for m in range(0, lk + 1, block) for d in (0, -1, 1) if 0 <= m + d < lk}))


def _pick_values(
    pick: Pick, family: str, dtype: str, dims: dict[str, int], scale: float | None, key_block: int | None
) -> Values:
    b, lq, lk, hq, hkv, dk, dv = (dims[n] for n in ("B", "Lq", "Lk", "Hq", "Hkv", "Dk", "Dv"))
    s = _eff_scale(scale, dk)
    fi = _finfo(dtype)
    params: dict[str, Any] = {}
    if family == "dominant-key":  # structural choices before the seed, so they shrink independently
        block = key_block or pick(_one_of(c for c in chunk_menu(lk) if c))
        params["dominant_key"] = pick(_one_of(_key_edges(lk, block)))
        params["gap"] = pick(_floats(4.0, 64.0))
    rng = np.random.default_rng(pick(_SEED))
    q = rng.standard_normal((b, lq, hq, dk))
    k = rng.standard_normal((b, lk, hkv, dk))
    v = rng.standard_normal((b, lk, hkv, dv))
    if family == "uniform":
        q, k, v = rng.uniform(-1, 1, q.shape), rng.uniform(-1, 1, k.shape), rng.uniform(-1, 1, v.shape)
    elif family == "large-logits":
        params["fraction"] = frac = pick(_floats(0.85, 1.5))
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
        params["offset"] = offset = pick(_floats(lo, hi))
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
        params["how"] = how = pick(_one_of(("identical-keys", "zero-q")))
        if how == "zero-q":
            q = np.zeros_like(q)
        else:
            k = np.broadcast_to(k[:, :1], k.shape).copy()
    elif family == "spread":
        params["step"] = step = pick(_floats(10.0, 100.0))
        params["order"] = order = pick(_one_of(("descending", "ascending", "shuffled")))
        rank = {"descending": np.arange(lk), "ascending": np.arange(lk)[::-1], "shuffled": rng.permutation(lk)}[order]
        q, k = _bounded(rng, dims, s)
        channel = np.sqrt(max(lk - 1, 1) * step / s)
        q[..., -1] = channel
        k[..., -1] = (-rank * step / (s * channel))[None, :, None]
    elif family == "big-values":
        acc = np.finfo(np.float64 if dtype == "fp64" else np.float32).max
        cap = min(float(fi.max), float(acc) / (16 * max(lk, dv)))
        params["fraction"] = frac = pick(_floats(0.25, 1.0))
        v = cap * rng.uniform(frac, 1.0, v.shape) * rng.choice([-1.0, 1.0], v.shape)
    elif family == "tiny-values":
        params["span"] = span = pick(_ints(0, int(fi.nmant)))
        v = float(fi.smallest_normal) * 2.0 ** rng.uniform(-span, 1.0, v.shape) * rng.choice([-1.0, 1.0], v.shape)
    elif family == "cancel":
        params["eps"] = eps = pick(_one_of((0.0, 1e-3, 1e-1)))
        pairs = lk // 2 * 2
        k[:, 1:pairs:2] = k[:, 0:pairs:2]
        v[:, 1:pairs:2] = -v[:, 0:pairs:2] + eps * rng.standard_normal(v[:, 1:pairs:2].shape)
        v[:, pairs:] *= eps
    elif family != "normal":
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return Values(_cast(q, dtype), _cast(k, dtype), _cast(v, dtype), params)


def values(
    family: str, dtype: str, dims: dict[str, int], *, scale: float | None = None, key_block: int | None = None
) -> st.SearchStrategy[Values]:
    """q, k, v of one named family for ``dims`` (as ``Case.dims``) in ``dtype`` ("bf16", "fp16", ...).

    ``key_block`` is the key chunk size the ``dominant-key`` family aligns to (drawn when None).
    """
    return st.composite(
        lambda draw: _pick_values(_hypothesis_pick(draw), family, spec.dtype_name(dtype), dims, scale, key_block)
    )()


# --- masks ----------------------------------------------------------------------------------------


class Masking(NamedTuple):
    """mask (bool, True = attend), bias (case dtype), causal flag, and the kind's drawn parameters."""

    mask: np.ndarray | None
    bias: np.ndarray | None
    causal: bool
    params: dict


def _random_mask(
    pick: Pick, rng: np.random.Generator, dims: dict[str, int], params: dict, masked_rows: bool
) -> np.ndarray:
    """bool [B, 1|Hq, Lq, Lk] of a drawn density; with ``masked_rows`` some rows (at least one) all False."""
    params["density"] = density = pick(_one_of((0.9, 0.5, 0.1)))
    params["mask_heads"] = heads = pick(_one_of((1, dims["Hq"])))
    mask = rng.random((dims["B"], heads, dims["Lq"], dims["Lk"])) < density
    if masked_rows:
        rows = rng.random(mask.shape[:3]) < 0.3
        rows.flat[rng.integers(rows.size)] = True
        mask &= ~rows[..., None]
    return mask


def _pick_masking(pick: Pick, kind: str, dtype: str, dims: dict[str, int], key_block: int | None) -> Masking:
    b, lq, lk, hq = dims["B"], dims["Lq"], dims["Lk"], dims["Hq"]
    params: dict[str, Any] = {}
    if kind in _NEED_BLOCK:
        key_block = key_block or pick(_one_of(c for c in chunk_menu(lk) if c))
    mask = bias = None
    if kind == "none":
        pass
    elif kind == "causal":
        return Masking(None, None, True, params)
    elif kind == "key-padding":
        params["valid"] = valid = [pick(_ints(1, lk)) for _ in range(b)]
        mask = (np.arange(lk) < np.array(valid)[:, None])[:, None, None, :]
    elif kind == "masked-key-chunk":  # with Lk = 1 no key can be hidden from a row that still sees one
        block = key_block if key_block < lk else -(-lk // 2)  # one chunk covers all keys: mask half of them
        start = pick(_one_of(range(0, lk, block))) if lk > 1 else 0
        params["masked_keys"] = [start, min(start + block, lk) if lk > 1 else 0]
        mask = np.ones((1, 1, 1, lk), dtype=bool)
        mask[..., slice(*params["masked_keys"])] = False
    elif kind == "single-key-edge":
        edges = sorted({e for m in range(0, lk, key_block) for e in (m, min(m + key_block, lk) - 1)})
        rng = np.random.default_rng(pick(_SEED))
        mask = np.arange(lk) == rng.choice(edges, (b, hq, lq, 1))
    elif kind in ("random", "masked-rows") or kind.startswith("bias-"):
        masked_rows = kind == "masked-rows"
        if kind.startswith("bias-"):  # fully masked rows are where the three fills differ
            masked_rows = pick(_one_of((False, True)))
        params["masked_rows"] = masked_rows
        mask = _random_mask(pick, np.random.default_rng(pick(_SEED)), dims, params, masked_rows)
        if kind.startswith("bias-"):
            fill = float(_finfo(dtype).min) if kind == "bias-finfo-min" else _BIAS_FILLS[kind]
            with np.errstate(over="ignore"):  # -1e9 is -inf in fp16, on purpose
                bias = np.where(mask, 0.0, fill).astype(spec.as_dtype(dtype))
            mask = None
    elif kind == "bias":
        shape_menu = ((b, 1, 1, lk), (1, hq, lq, lk), (b, hq, lq, lk), (lq, lk))
        params["bias_shape"] = shape = list(pick(_one_of(shape_menu)))
        params["bias_std"] = std = pick(_one_of((1.0, 4.0, 0.25)))
        bias = _cast(std * np.random.default_rng(pick(_SEED)).standard_normal(shape), dtype)
    else:
        raise ValueError(f"unknown mask kind {kind!r}; known: {', '.join(MASK_KINDS)}")
    if kind in _NEED_BLOCK:
        params["key_block"] = key_block
    return Masking(mask, bias, False, params)


def masks(kind: str, dtype: str, dims: dict[str, int], *, key_block: int | None = None) -> st.SearchStrategy[Masking]:
    """Masking of one named kind for ``dims`` in ``dtype``; ``key_block`` aligns chunk kinds (drawn when None)."""
    return st.composite(
        lambda draw: _pick_masking(_hypothesis_pick(draw), kind, spec.dtype_name(dtype), dims, key_block)
    )()


# --- cases ----------------------------------------------------------------------------------------


def _known(what: str, names: Iterable[str], known: Sequence[str]) -> tuple[str, ...]:
    names = tuple(names)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown or empty {what} names {unknown or names}; known: {', '.join(known)}")
    return names


def _pick_case(
    pick: Pick,
    *,
    dtypes: Sequence[str],
    features: frozenset[str],
    family_names: Sequence[str],
    mask_kinds: Sequence[str],
    max_len: int,
    max_heads: int,
    max_dim: int,
    grad: bool,
    compact: bool = False,
) -> Case:
    dtypes = tuple(spec.dtype_name(d) for d in dtypes)
    unknown = set(features) - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown features {sorted(unknown)}; known: {', '.join(FEATURES)}")
    names = tuple(f for f in _known("family", family_names, FAMILIES) if f != "row-offset" or max_dim >= 2)
    if not names:
        raise ValueError("row-offset needs max_dim >= 2")
    kinds = tuple(m for m in _known("mask kind", mask_kinds, MASK_KINDS) if MASK_NEEDS[m] in features | {None})
    dtype = pick(_one_of(dtypes))
    family = pick(_one_of(names))
    kind = pick(_one_of(kinds or ("none",)))
    limits = {"max_len": max_len, "max_heads": max_heads, "max_dim": max_dim, "gqa": "gqa" in features,
              "min_dk": 2 if family == "row-offset" else 1}
    chunked = "chunks" in features
    if compact:
        dims, qchunk, kchunk = _pick_compact(pick, chunked=chunked, **limits)
    else:
        dims = _pick_shape(pick, **limits)
        qchunk = pick(_one_of(chunk_menu(dims["Lq"]))) if chunked else None
        kchunk = pick(_one_of(chunk_menu(dims["Lk"]))) if chunked else None
    scale = pick(_one_of((None, "explicit")))
    scale = pick(_one_of(SCALES[:1] if compact else SCALES)) if scale else None
    key_block = kchunk
    if key_block is None and (family == "dominant-key" or kind in _NEED_BLOCK):
        key_block = pick(_one_of(c for c in chunk_menu(dims["Lk"]) if c))
    vals = _pick_values(pick, family, dtype, dims, scale, key_block)
    masking = _pick_masking(pick, kind, dtype, dims, key_block)
    g = None
    if grad and "grad" in features:
        rng = np.random.default_rng(pick(_SEED))
        g = _cast(rng.standard_normal((dims["B"], dims["Lq"], dims["Hq"], dims["Dv"])), dtype)
    meta = {"family_params": vals.params, "mask_params": masking.params}
    if key_block is not None and key_block != kchunk:
        meta["key_block"] = key_block
    return Case(
        vals.q,
        vals.k,
        vals.v,
        g=g,
        mask=masking.mask,
        bias=masking.bias,
        scale=scale,
        causal=masking.causal,
        query_chunk_size=qchunk,
        key_chunk_size=kchunk,
        family=family,
        mask_kind=kind,
        meta=meta,
    )


def cases(
    *,
    dtypes: Sequence[str] = ("bf16", "fp16", "fp32"),
    features: Iterable[str] = frozenset(FEATURES),
    families: Sequence[str] = FAMILIES,
    mask_kinds: Sequence[str] = MASK_KINDS,
    max_len: int = 33,
    max_heads: int = 4,
    max_dim: int = 16,
    grad: bool = True,
    compact: bool = False,
) -> st.SearchStrategy[Case]:
    """Cases for a target declaring ``features``: nothing undeclared is generated (no mask without "mask",
    no bias masks without "bias", Hq == Hkv without "gqa", chunk sizes None without "chunks", g only with
    ``grad`` and "grad"). ``compact`` draws shapes and chunks from ``COMPACT_SHAPES`` (jitted targets)."""
    options = dict(
        dtypes=dtypes,
        features=frozenset(features),
        family_names=families,
        mask_kinds=mask_kinds,
        max_len=max_len,
        max_heads=max_heads,
        max_dim=max_dim,
        grad=grad,
        compact=compact,
    )
    _pick_case(_numpy_pick(np.random.default_rng(0)), **options)  # fail on bad options now, not mid-test
    return st.composite(lambda draw: _pick_case(_hypothesis_pick(draw), **options))()


def example_case(
    seed: int,
    dtype: str = "fp32",
    *,
    family: str | None = None,
    mask_kind: str | None = None,
    features: Iterable[str] = frozenset(FEATURES),
    max_len: int = 33,
    max_heads: int = 4,
    max_dim: int = 16,
    grad: bool = True,
) -> Case:
    """A case like ``cases`` would draw, from a numpy seed alone (no Hypothesis): for demos and tests."""
    return _pick_case(
        _numpy_pick(np.random.default_rng(seed)),
        dtypes=(dtype,),
        features=frozenset(features),
        family_names=(family,) if family else FAMILIES,
        mask_kinds=(mask_kind,) if mask_kind else MASK_KINDS,
        max_len=max_len,
        max_heads=max_heads,
        max_dim=max_dim,
        grad=grad,
    )


def make_case(
    seed: int,
    dtype: str,
    *,
    dims: dict[str, int],
    family: str,
    mask_kind: str = "none",
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
    features: Iterable[str] = frozenset(FEATURES),
    grad: bool = True,
) -> Case:
    """A deterministic case of an explicit shape, family, mask kind and chunk sizes (numpy only, for sweeps).

    ``dims`` as ``Case.dims``. The same ``seed`` gives the same q, k, v, masking and g for any chunk sizes,
    except where the family or mask kind aligns to the key chunk (``dominant-key``, ``masked-key-chunk``,
    ``single-key-edge``). ``ValueError`` when the mask kind needs a feature not in ``features``.
    """
    dtype = spec.dtype_name(dtype)
    family = _known("family", (family,), FAMILIES)[0]
    kind = _known("mask kind", (mask_kind,), MASK_KINDS)[0]
    features = frozenset(features)
    if MASK_NEEDS[kind] not in features | {None}:
        raise ValueError(f"mask kind {kind!r} needs feature {MASK_NEEDS[kind]!r}, not in {sorted(features)}")
    pick = _numpy_pick(np.random.default_rng(seed))
    key_block = key_chunk_size
    if key_block is None and (family == "dominant-key" or kind in _NEED_BLOCK):
        key_block = pick(_one_of(c for c in chunk_menu(dims["Lk"]) if c))
    vals = _pick_values(pick, family, dtype, dims, None, key_block)
    masking = _pick_masking(pick, kind, dtype, dims, key_block)
    g = None
    if grad and "grad" in features:
        g = _cast(np.random.default_rng(pick(_SEED)).standard_normal((dims["B"], dims["Lq"], dims["Hq"], dims["Dv"])),
                  dtype)
    meta = {"seed": seed, "family_params": vals.params, "mask_params": masking.params}
    if key_block is not None and key_block != key_chunk_size:
        meta["key_block"] = key_block
    return Case(
        vals.q, vals.k, vals.v, g=g, mask=masking.mask, bias=masking.bias, causal=masking.causal,
        query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size, family=family, mask_kind=kind, meta=meta,
    )

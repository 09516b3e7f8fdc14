"""Mask kinds: which keys each query may see, given as a bool mask, as causal, or as a bias.

- ``none``; ``random`` (a drawn density, per head or shared); ``causal`` (top-left);
- ``key-padding`` (a valid length per batch); ``padding-random`` (key padding AND a random mask);
  ``masked-rows`` (some rows see no key at all);
- ``masked-key-chunk`` (a whole key chunk hidden inside visible rows); ``single-key-edge`` (each row
  sees exactly one key, at a chunk edge);
- ``bias-inf``, ``bias-finfo-min``, ``bias-1e9``: a random mask expressed as an additive bias of
  ``-inf``, the dtype's ``finfo.min`` or ``-1e9``, with or without fully masked rows; ``bias``: a
  plain finite bias of a drawn broadcast shape and size.

Bias-expressed masks keep the dtype's own rounding: ``-1e9`` is -inf in fp16 (a real masking bug
source); ``finfo.min`` is finite, so "masked" keys keep a tiny weight and a fully "masked" row is a
uniform row -- what the oracle computes from the semantics. A kind whose feature the target did not
declare is never drawn (``MASK_NEEDS``); ``cases`` also combines any kind with causal masking.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from hypothesis import strategies as st

from oracles import spec
from verify.strategies.menus import SEED, Pick, composite, hypothesis_pick, ints, known, one_of
from verify.strategies.value_families import cast, finfo

MASK_KINDS: tuple[str, ...] = (
    "none",
    "random",
    "causal",
    "key-padding",
    "padding-random",
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
    "padding-random": "mask",
    "masked-rows": "mask",
    "masked-key-chunk": "mask",
    "single-key-edge": "mask",
    "bias-inf": "bias",
    "bias-finfo-min": "bias",
    "bias-1e9": "bias",
    "bias": "bias",
}
NEEDS_KEY_BLOCK = frozenset({"masked-key-chunk", "single-key-edge"})  # kinds that align to a key chunk
_BIAS_FILLS = {"bias-inf": -np.inf, "bias-1e9": -1e9}  # bias-finfo-min: the dtype's own finfo.min


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
    params["density"] = density = pick(one_of((0.9, 0.5, 0.1)))
    params["mask_heads"] = heads = pick(one_of((1, dims["Hq"])))
    mask = rng.random((dims["B"], heads, dims["Lq"], dims["Lk"])) < density
    if masked_rows:
        rows = rng.random(mask.shape[:3]) < 0.3
        rows.flat[rng.integers(rows.size)] = True
        mask &= ~rows[..., None]
    return mask


def pick_masking(pick: Pick, kind: str, dtype: str, dims: dict[str, int], key_block: int | None) -> Masking:
    """Masking of ``kind``; ``key_block`` is the chunk the chunk-aligned kinds align to (None: all of Lk)."""
    b, lq, lk, hq = dims["B"], dims["Lq"], dims["Lk"], dims["Hq"]
    params: dict[str, Any] = {}
    if kind in NEEDS_KEY_BLOCK:
        key_block = key_block or lk
    mask = bias = None
    if kind == "none":
        pass
    elif kind == "causal":
        return Masking(None, None, True, params)
    elif kind in ("key-padding", "padding-random"):
        params["valid"] = valid = [pick(ints(1, lk)) for _ in range(b)]
        mask = (np.arange(lk) < np.array(valid)[:, None])[:, None, None, :]
        if kind == "padding-random":
            mask = mask & _random_mask(pick, np.random.default_rng(pick(SEED)), dims, params, False)
    elif kind == "masked-key-chunk":  # with Lk = 1 no key can be hidden from a row that still sees one
        block = key_block if key_block < lk else -(-lk // 2)  # one chunk covers all keys: mask half of them
        start = pick(one_of(range(0, lk, block))) if lk > 1 else 0
        params["masked_keys"] = [start, min(start + block, lk) if lk > 1 else 0]
        mask = np.ones((1, 1, 1, lk), dtype=bool)
        mask[..., slice(*params["masked_keys"])] = False
    elif kind == "single-key-edge":
        edges = sorted({e for m in range(0, lk, key_block) for e in (m, min(m + key_block, lk) - 1)})
        rng = np.random.default_rng(pick(SEED))
        mask = np.arange(lk) == rng.choice(edges, (b, hq, lq, 1))
    elif kind in ("random", "masked-rows") or kind.startswith("bias-"):
        masked_rows = kind == "masked-rows"
        if kind.startswith("bias-"):  # fully masked rows are where the three fills differ
            masked_rows = pick(one_of((False, True)))
        params["masked_rows"] = masked_rows
        mask = _random_mask(pick, np.random.default_rng(pick(SEED)), dims, params, masked_rows)
        if kind.startswith("bias-"):
            fill = float(finfo(dtype).min) if kind == "bias-finfo-min" else _BIAS_FILLS[kind]
            with np.errstate(over="ignore"):  # -1e9 is -inf in fp16, on purpose
                bias = np.where(mask, 0.0, fill).astype(spec.as_dtype(dtype))
            mask = None
    elif kind == "bias":
        shape_menu = ((b, 1, 1, lk), (1, hq, lq, lk), (b, hq, lq, lk), (lq, lk))
        params["bias_shape"] = shape = list(pick(one_of(shape_menu)))
        params["bias_std"] = std = pick(one_of((1.0, 4.0, 0.25)))
        bias = cast(std * np.random.default_rng(pick(SEED)).standard_normal(shape), dtype)
    else:
        raise ValueError(f"unknown mask kind {kind!r}; known: {', '.join(MASK_KINDS)}")
    if kind in NEEDS_KEY_BLOCK:
        params["key_block"] = key_block
    return Masking(mask, bias, False, params)


def _draw_masking(draw, kind: str, dtype: str, dims: dict[str, int], key_block: int | None) -> Masking:
    return pick_masking(hypothesis_pick(draw), kind, dtype, dims, key_block)


_masks = composite("masks", _draw_masking)


def masks(kind: str, dtype: str, dims: dict[str, int], *, key_block: int | None = None) -> st.SearchStrategy[Masking]:
    """Masking of one named kind for ``dims`` in ``dtype``; ``key_block`` aligns chunk kinds (default: all of Lk)."""
    known("mask kind", (kind,), MASK_KINDS)
    return _masks(kind, spec.dtype_name(dtype), dims, key_block)

"""The modern options of a case, each drawn only when the target declares its feature.

Each option's first menu entry is "off", so shrinking turns options off one by one and a minimal
reproducer keeps only what the bug needs. The menus go where real kernels broke:

- ``align``: top-left or bottom-right (FlashAttention >= 2.1, ``causal_lower_right``); decode-style
  ``Lq < Lk`` and ``Lq > Lk`` (rows with no visible key) both come from the shapes;
- ``window=(left, right)``: each side None, 0, 1, Lk - 1, beyond Lk, or a drawn size (a right window
  larger than Lk dropped keys in one kernel; window ``(-1, 0)`` is our ``(None, 0)``);
- ``softcap``: 50 (Gemma 2), 1 (tiny: most logits capped), 1e4 (nearly no cap), 5, 20;
- ``alibi_slopes``: FlashAttention's tests' ``rand * 0.3`` or the standard geometric ``2^(-8 (h+1) / H)``,
  per head or per batch and head, float32 (what kernels take);
- ``sinks``: one per query head in the case dtype, mild (``N(0, 4)``), dominant (far above every
  logit: out ~ 0), negligible (``-1e4``), or spread over ``[-1e4, 1e4]``;
- segments (``q_segment_ids``, ``kv_segment_ids``, int32): sorted blocks, one token per segment, a
  boundary at a key-chunk edge, or query ids some keys lack (rows with no visible key);
- ``g_lse``: a cotangent for lse when the target returns it and has gradients (float32; float64 for fp64).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from verify.strategies.menus import SEED, Pick, ints, one_of
from verify.strategies.value_families import cast

SOFTCAPS = (50.0, 1.0, 1e4, 5.0, 20.0)


def _side(pick: Pick, lk: int) -> int | None:
    choice = pick(one_of((None, 0, 1, "L-1", "beyond", "drawn")))
    if choice == "L-1":
        return max(lk - 1, 0)
    if choice == "beyond":
        return lk + 3
    if choice == "drawn":
        return pick(ints(0, max(lk, 1)))
    return choice


def _segments(pick: Pick, rng: np.random.Generator, b: int, lq: int, lk: int, key_block: int | None,
              params: dict) -> tuple[np.ndarray, np.ndarray]:
    params["segments"] = how = pick(one_of(("blocks", "one-per-token", "chunk-edge", "missing")))

    def blocks(n: int, count: int) -> np.ndarray:
        cuts = np.sort(rng.choice(np.arange(1, n), size=min(count, n - 1), replace=False)) if n > 1 else []
        ids = np.zeros(n, np.int32)
        for c in cuts:
            ids[c:] += 1
        return ids

    if how == "one-per-token":
        q, kv = np.arange(lq, dtype=np.int32), np.arange(lk, dtype=np.int32)
        q, kv = np.broadcast_to(q, (b, lq)), np.broadcast_to(kv, (b, lk))
    elif how == "chunk-edge":  # a boundary right at, before or after a key-chunk edge
        edge = min(key_block or max(lk // 2, 1), lk) + pick(one_of((0, -1, 1)))
        kv = (np.arange(lk) >= edge).astype(np.int32)
        q = (np.arange(lq) >= min(edge, lq)).astype(np.int32)
        q, kv = np.broadcast_to(q, (b, lq)), np.broadcast_to(kv, (b, lk))
    else:
        count = pick(ints(1, 4))
        q = np.stack([blocks(lq, count) for _ in range(b)])
        kv = np.stack([blocks(lk, count) for _ in range(b)]) if lq != lk else q.copy()
        if how == "missing":  # segment ids some keys lack: those query rows see no key
            q = q + (rng.random((b, lq)) < 0.3).astype(np.int32) * 100
    return np.ascontiguousarray(q, np.int32), np.ascontiguousarray(kv, np.int32)


def pick_options(pick: Pick, features: frozenset[str], dtype: str, dims: dict[str, int], key_block: int | None,
                 grad: bool) -> tuple[dict[str, Any], dict]:
    """Case fields for the declared modern features (``align``, ``window``, ...) and their drawn parameters."""
    b, lq, lk, hq = dims["B"], dims["Lq"], dims["Lk"], dims["Hq"]
    fields: dict[str, Any] = {}
    params: dict = {}
    if "bottom-right" in features:
        fields["align"] = pick(one_of(("top-left", "bottom-right")))
    if "window" in features and pick(one_of((None, "window"))):
        fields["window"] = (_side(pick, lk), _side(pick, lk))
    if "softcap" in features:
        fields["softcap"] = pick(one_of((None, *SOFTCAPS)))
    rng = None
    if "alibi" in features and pick(one_of((None, "alibi"))):
        params["alibi"] = how = pick(one_of(("rand", "geometric")))
        per_batch = pick(one_of((False, True)))
        rng = rng or np.random.default_rng(pick(SEED))
        shape = (b, hq) if per_batch else (hq,)
        slopes = (rng.random(shape) * 0.3 if how == "rand"
                  else np.broadcast_to(2.0 ** (-8.0 * np.arange(1, hq + 1) / hq), shape))
        fields["alibi_slopes"] = np.ascontiguousarray(slopes, np.float32)
    if "sinks" in features and pick(one_of((None, "sinks"))):
        params["sinks"] = how = pick(one_of(("mild", "dominant", "negligible", "spread")))
        rng = rng or np.random.default_rng(pick(SEED))
        sinks = {"mild": lambda: 2.0 * rng.standard_normal(hq),
                 "dominant": lambda: 60.0 + rng.random(hq) * 40.0,
                 "negligible": lambda: np.full(hq, -1e4),
                 "spread": lambda: rng.uniform(-1e4, 1e4, hq)}[how]()
        fields["sinks"] = cast(sinks, dtype)
    if "segments" in features and pick(one_of((None, "segments"))):
        rng = rng or np.random.default_rng(pick(SEED))
        fields["q_segment_ids"], fields["kv_segment_ids"] = _segments(pick, rng, b, lq, lk, key_block, params)
    if grad and "lse" in features:
        rng = rng or np.random.default_rng(pick(SEED))
        fields["g_lse"] = rng.standard_normal((b, hq, lq)).astype(np.float64 if dtype == "fp64" else np.float32)
    return fields, params

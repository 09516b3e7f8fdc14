"""Memory layouts of a call's inputs: a kernel that assumes contiguous inputs breaks on the others.

The values are the case's; only how they sit in memory changes (xformers' and FlashAttention's
tests pass transposed, sliced and expanded tensors for the same reason):

- ``contiguous``: as built;
- ``transposed``: q, k, v (and g) stored heads-first ``[B, H, L, D]`` and passed as a transposed view;
- ``sliced``: each a slice of a larger buffer (one extra row before and after the sequence, a wider
  last dim), so its storage offset is not 0 and its strides are not the natural ones;
- ``broadcast-kv``: for one kv head (Hkv = 1) and several query heads, k and v passed as a stride-0
  expansion to Hq heads, so the target sees plain multi-head attention (its gradient flows back to
  the single head);
- ``strided-g``: only the cotangent is a non-contiguous (transposed) view.

Torch and numpy adapters apply them (``view``); JAX arrays have no strides, so JAX targets always get
``contiguous``. Framework-free: ``view`` takes the framework's own swap/slice/expand operations.
"""

from __future__ import annotations

from collections.abc import Callable

LAYOUTS = ("contiguous", "transposed", "sliced", "broadcast-kv", "strided-g")
INPUTS = ("q", "k", "v")


def applies(layout: str, dims: dict[str, int]) -> bool:
    """Whether ``layout`` can lay out a case of ``dims`` (broadcast-kv needs Hkv = 1 < Hq)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return layout != "broadcast-kv" or (dims["Hkv"] == 1 and dims["Hq"] > 1)


def view(layout: str, name: str, x: object, *, heads_first: Callable, pad: Callable, expand: Callable,
         hq: int) -> object:
    """``x`` (input ``name``: q, k, v or g) laid out as ``layout`` says, from framework callbacks.

    ``heads_first(x)`` returns a copy of ``x`` stored ``[B, H, L, D]`` seen as ``[B, L, H, D]``;
    ``pad(x)`` a view of ``x`` inside a larger buffer; ``expand(x, hq)`` a stride-0 view of a
    one-head ``x`` with ``hq`` heads.
    """
    if layout == "transposed" and name in (*INPUTS, "g"):
        return heads_first(x)
    if layout == "sliced" and name in (*INPUTS, "g"):
        return pad(x)
    if layout == "broadcast-kv" and name in ("k", "v"):
        return expand(x, hq)
    if layout == "strided-g" and name == "g":
        return heads_first(x)
    return x

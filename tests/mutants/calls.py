"""What every kernel of the zoos checks before computing: a well-formed attention call."""

from __future__ import annotations

import torch


def check_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, align: str) -> None:
    """ValueError / TypeError naming what is wrong with the call's shapes, mask dtype or alignment."""
    if align not in ("top-left", "bottom-right"):
        raise ValueError(f"align must be 'top-left' or 'bottom-right', got {align!r}")
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool (True = attend), got {mask.dtype}")
    b, _, hq, dk = q.shape
    hkv = v.shape[2]
    if k.shape[:3] != v.shape[:3] or k.shape[0] != b or k.shape[3] != dk or hq % hkv:
        raise ValueError(f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} do not form an attention call")

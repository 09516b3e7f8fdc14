"""triton-flash: our FlashAttention-2-style Triton kernel, forward and backward.

What it computes is exactly ``oracles.spec`` restricted to these options: ``scale``, ``causal`` with
``align`` "top-left" or "bottom-right", ``window=(left, right)``, ``softcap``, ``alibi_slopes`` ([Hq] or
[B, Hq]), grouped-query attention, ``Dk != Dv`` and ``return_lse``. No boolean mask, no bias, no sinks,
no segment ids and no chunk-size arguments: the kernel picks its own tiles. A row with no visible key
(a window, or bottom-right alignment with Lq > Lk) gives output 0, lse -inf and zero gradients
(masked-row policy ``zeros``).

This module is the target: its ``INFO``, the checks of a call, the launches and the
``torch.autograd.Function`` that ties the forward to FA2's backward. The kernels themselves, and how
they compute (visibility and tile skipping, the online softmax, tanh, the backward's recipe and its fp16
dS scaling, strides), are ``verify.targets.triton_flash_kernels``.

- Fixed tiles ``BLOCK_M = 64`` query rows by ``BLOCK_N = 64`` keys, in the forward and in both backward
  kernels. Square 64 x 64 rather than FA2's usual 128 x 64 forward tile: one tile size for all three
  kernels, and the backward, which holds a K and a V tile, their two fp32 gradient accumulators and
  [64, 64] fp32 score tiles at once, keeps half the working set of a 128-key tile at head dims up to
  256 (the compiled launch uses 8 warps and one pipeline stage there; not yet measured on a GPU); in
  the interpreter a smaller tile also wastes less work on masked partial tiles. Tile boundaries then sit
  at 64, 128, ..., where the tests' lengths (63, 64, 65, 127, 129) are.
- Head dims are padded to the next power of two >= 16 inside the kernel (``tl.dot`` needs >= 16) with
  masked loads (padding reads 0) and masked stores, so 59, 72, 104, 111, 203 and 256 all work.
  Lengths are arbitrary (partial tiles are masked).
- Contract (FA2's): fp32 logits, softmax statistics and accumulators; the probabilities, and in the
  backward dS, are cast to the input dtype before their matmuls; each output and gradient is rounded
  once. Evidence: ``INFO.notes`` and tests/test_triton_flash.py.

Where it runs is decided once, at import, by the kernels module (``TRITON_INTERPRET=1``, Triton's
interpreter on torch CPU tensors, when ``torch.cuda.is_available()`` is False; compiled for CUDA tensors
otherwise; an explicit ``TRITON_INTERPRET`` wins). ``INFO.device`` says which ("cpu" interpreted, "cuda"
compiled).

bf16: only compiled. Under the interpreter bf16 values are held as raw uint16 and arithmetic on them is
integer arithmetic (measured: ``x * 2`` of a loaded bf16 vector comes back wrong by up to 6.4 for inputs
in [-3, 3]; the bf16 <-> fp32 casts themselves are correct), so ``tl.dot`` of bf16 tiles is garbage.
``INFO.dtypes`` is therefore ("fp16", "fp32") interpreted and ("bf16", "fp16", "fp32") compiled; bf16
inputs are still accepted, so a user who forces bf16 sees the finding. fp64 is refused (the kernel's
statistics are fp32, which would not be an fp64 kernel).

Without triton installed, importing this module raises ImportError (the harness reports the target
as unavailable).
"""

from __future__ import annotations

import math

import torch

# First: the kernels module decides TRITON_INTERPRET before it imports triton.
from verify.targets.triton_flash_kernels import (
    COMPILED,
    INTERPRETED,
    bwd_delta_kernel,
    bwd_dkdv_kernel,
    bwd_dq_kernel,
    fwd_kernel,
)

# isort: split
import triton

from oracles import spec
from verify.targets.base import Contract, TargetInfo

BLOCK_M = 64  # query rows per tile
BLOCK_N = 64  # keys per tile
MIN_HEAD_BLOCK = 16  # tl.dot's smallest K and N

_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

INFO = TargetInfo(
    name="triton-flash",
    framework="torch",
    dtypes=("bf16", "fp16", "fp32") if COMPILED else ("fp16", "fp32"),
    features=frozenset({"causal", "bottom-right", "window", "softcap", "alibi", "gqa", "lse", "grad"}),
    masked_rows="zeros",
    contract=Contract(accumulate="fp32", round_logits=False, round_probs=True),
    device="cuda" if COMPILED else "cpu",
    tiles=(64,),
    description=(
        "our FlashAttention-2-style Triton kernel (64x64 tiles, online softmax, FA2 backward); "
        + ("compiled for CUDA" if COMPILED else "Triton interpreter on CPU")
    ),
    notes=(
        "Masked rows 'zeros': the running max is shifted by 0 while it is -inf, the output is 0 where the "
        "row sum is 0 and lse -inf, and the backward gives p = 0 to rows whose lse is -inf, so those rows get "
        "exactly 0 output and zero gradients (tested bit-exact with bottom-right Lq > Lk and windows). "
        "Contract: logits are the fp32 result of tl.dot with fp32 accumulation (ieee, no tf32), scaled, "
        "soft-capped and ALiBi-shifted in fp32, never rounded to the input dtype; softmax statistics and "
        "the output accumulator are fp32; the probabilities (and in the backward dS) are cast to the input "
        "dtype before their matmuls, as FA2 does (fp16 dS tiles first scaled by an exact power of two when "
        "they would pass 65504). Evidence: tests/test_triton_flash.py stays below half of a 4 u A + fp32 "
        "logit-error allowance over lengths 1-200, head dims 16-72 and every option, forward and gradients. "
        "bf16 is declared only when compiled: Triton's interpreter does bf16 arithmetic on raw uint16 (x*2 "
        "of a loaded bf16 vector measured wrong by up to 6.4)."
    ),
)


def _head_block(d: int) -> int:
    return max(MIN_HEAD_BLOCK, triton.next_power_of_2(d))


def _launch_options(block_d: int) -> dict:
    """num_warps / num_stages for the compiled kernels (ignored by the interpreter)."""
    if INTERPRETED:
        return {}
    return {"num_warps": 4 if block_d <= 64 else 8, "num_stages": 2 if block_d <= 128 else 1}


class _Config:
    """The scalar parameters of one call, as the kernels take them."""

    def __init__(self, q, k, v, scale, causal, align, window, softcap, slopes):
        b, lq, hq, dk = q.shape
        _, lk, hkv, dv = v.shape
        self.b, self.lq, self.lk, self.hq, self.hkv, self.dk, self.dv = b, lq, lk, hq, hkv, dk, dv
        self.g = hq // hkv
        self.scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
        self.off = 0 if align == "top-left" else lk - lq
        far = lq + lk  # no |i + off - j| reaches this: an unbounded side
        left, right = (None, None) if window is None else window
        self.left = far if left is None else min(int(left), far)
        self.right = far if right is None else min(int(right), far)
        if causal:
            self.right = 0
        self.softcap = 1.0 if softcap is None else float(softcap)
        self.has_softcap = softcap is not None
        self.has_alibi = slopes is not None
        self.block_dk = _head_block(dk)
        self.block_dv = _head_block(dv)
        self.opts = _launch_options(max(self.block_dk, self.block_dv))

    def common(self) -> tuple:
        return (self.off, self.left, self.right, self.scale, self.softcap, self.dk, self.dv)

    def constexprs(self) -> dict:
        return {"SOFTCAP": self.has_softcap, "ALIBI": self.has_alibi, "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N,
                "BLOCK_DK": self.block_dk, "BLOCK_DV": self.block_dv}


def _forward(q, k, v, slopes, cfg: _Config):
    out = torch.empty((cfg.b, cfg.lq, cfg.hq, cfg.dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((cfg.b, cfg.hq, cfg.lq), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(cfg.lq, BLOCK_M), cfg.b * cfg.hq)
    fwd_kernel[grid](
        q, k, v, out, lse, slopes if slopes is not None else lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        cfg.lq, cfg.lk, cfg.hq, cfg.g, *cfg.common(),
        **cfg.constexprs(), **cfg.opts,
    )
    return out, lse


def _backward(q, k, v, out, lse, slopes, g, g_lse, cfg: _Config):
    delta = torch.empty((cfg.b, cfg.hq, cfg.lq), dtype=torch.float32, device=q.device)
    grid_q = (triton.cdiv(cfg.lq, BLOCK_M), cfg.b * cfg.hq)
    bwd_delta_kernel[grid_q](
        out, g, g_lse if g_lse is not None else delta, delta,
        *out.stride(), *g.stride(), cfg.lq, cfg.hq, cfg.dv,
        HAS_GLSE=g_lse is not None, BLOCK_M=BLOCK_M, BLOCK_DV=cfg.block_dv,
    )
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    sl = slopes if slopes is not None else lse
    bwd_dkdv_kernel[(triton.cdiv(cfg.lk, BLOCK_N), cfg.b * cfg.hkv)](
        q, k, v, g, lse, delta, dk, dv, sl,
        *q.stride(), *k.stride(), *v.stride(), *g.stride(), *dk.stride(), *dv.stride(),
        cfg.lq, cfg.lk, cfg.hq, cfg.hkv, cfg.g, *cfg.common(),
        **cfg.constexprs(), SCALE_DS=q.dtype == torch.float16, **cfg.opts,
    )
    bwd_dq_kernel[grid_q](
        q, k, v, g, lse, delta, dq, sl,
        *q.stride(), *k.stride(), *v.stride(), *g.stride(), *dq.stride(),
        cfg.lq, cfg.lk, cfg.hq, cfg.g, *cfg.common(),
        **cfg.constexprs(), SCALE_DS=q.dtype == torch.float16, **cfg.opts,
    )
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, cfg):
        out, lse = _forward(q, k, v, slopes, cfg)
        ctx.save_for_backward(q, k, v, out, lse, slopes)
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, g_lse):
        q, k, v, out, lse, slopes = ctx.saved_tensors
        cfg = ctx.cfg
        if g is None and g_lse is None:
            return None, None, None, None, None
        if g is None:
            g = torch.zeros_like(out)
        elif g.dtype != out.dtype:
            g = g.to(out.dtype)
        if g_lse is not None:
            g_lse = g_lse.to(torch.float32).contiguous()
        dq, dk, dv = _backward(q, k, v, out, lse, slopes, g, g_lse, cfg)
        return dq, dk, dv, None, None


def _check_inputs(q, k, v, align, softcap, alibi_slopes) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-d torch tensor [batch, seq, heads, dim]")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"triton-flash computes bf16, fp16 and fp32, not {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if COMPILED and q.device.type != "cuda":
        raise ValueError(f"triton-flash is compiled for CUDA here; got tensors on {q.device}")
    (b, _, hq, dk), (bk, lk, hkv, dkk), (bv, lv, hv, _) = q.shape, k.shape, v.shape
    if (bk, lk, hkv) != (bv, lv, hv) or bk != b or dkk != dk:
        raise ValueError(f"shapes q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} do not form an "
                         "attention call (batch, keys, kv heads and Dk must agree)")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}")
    if min(q.shape + k.shape + v.shape) == 0:
        raise ValueError(f"empty dimension in q {list(q.shape)}, k {list(k.shape)} or v {list(v.shape)}")
    if align not in ("top-left", "bottom-right"):
        raise ValueError(f"align must be 'top-left' or 'bottom-right', got {align!r}")
    if softcap is not None and not (math.isfinite(float(softcap)) and float(softcap) > 0):
        raise ValueError(f"softcap must be finite and > 0, got {softcap!r}")
    if alibi_slopes is not None and tuple(alibi_slopes.shape) not in ((hq,), (b, hq)):
        raise ValueError(f"alibi_slopes {list(alibi_slopes.shape)} must have shape [Hq] or [B, Hq] = [{b}, {hq}]")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    align: str = "top-left",
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2-style attention, ``[B, L, H, D]`` layout (see the module docstring).

    Returns out ``[B, Lq, Hq, Dv]`` in q's dtype, or ``(out, lse)`` with lse ``[B, Hq, Lq]`` float32 when
    ``return_lse``; differentiable in q, k, v (and through lse).
    """
    _check_inputs(q, k, v, align, softcap, alibi_slopes)
    window = spec.check_window(window)
    slopes = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.detach().to(device=q.device, dtype=torch.float32)
        slopes = slopes.expand(q.shape[0], q.shape[2]).contiguous()
    cfg = _Config(q, k, v, scale, bool(causal), align, window, softcap, slopes)
    out, lse = _FlashAttention.apply(q, k, v, slopes, cfg)
    return (out, lse) if return_lse else out

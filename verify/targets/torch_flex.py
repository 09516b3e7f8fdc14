"""torch-flex: ``torch.nn.attention.flex_attention.flex_attention`` on CPU, every option as a mask_mod or score_mod.

Mapping from the canonical signature (``[B, L, H, D]`` transposed to flex's ``[B, H, L, D]``, ``d = i + off - j``
with ``off`` 0 top-left and ``Lk - Lq`` bottom-right):

- ``mask_mod(b, h, i, j)`` (through ``create_block_mask(mask_mod, B, Hq, Lq, Lk)``) = causal ``d >= 0``, window
  ``-right <= d <= left``, the bool ``mask[b, h, i, j]`` (broadcast views), segments ``q_seg[b, i] ==
  kv_seg[b, j]``: the intersection spec asks for;
- ``score_mod(score, b, h, i, j)`` on ``score = scale * q.k``: ``softcap * tanh(score / softcap)`` first, then
  ``+ bias[b, h, i, j]``, then ``- slope[b, h] * |d|`` (spec's order); a ``-inf`` bias entry masks the key;
- ``scale`` passed through; GQA -> ``enable_gqa=True``; Dk != Dv works; lse through
  ``return_aux=AuxRequest(lse=True)`` (``return_lse=True`` is deprecated in 2.13 and warns).
- Sinks: flex cannot express them. ``score_mod`` rewrites the logits of existing keys and ``mask_mod`` removes
  keys; a sink is an extra logit with no value, which would need an extra key (Lk + 1, a zero value row) or a
  correction of out by ``exp(lse) / (exp(lse) + exp(sink))`` outside flex -- our arithmetic, not flex's.
  Not declared.

Every mod reads its parameters from tensors (the bool mask, bias, slopes, segment ids and one int64 vector
``[off, causal, left, right, softcap on]``; an absent option is a neutral value: a True mask, a 0 bias, 0 slopes,
equal segments), so the mods are the same two functions on every call and a traced or compiled graph is reused
across cases; adding 0.0 and subtracting ``0 * |d|`` are exact, so this changes no bit. The buffers are
materialised at full size (``[B, Hq, Lq, Lk]`` for mask and bias): inductor's CPU flex kernel fails to lower a
mod that reads a stride-0 (expanded) buffer.

How it runs on CPU in torch 2.13.0 (measured, tests/test_targets_sdpa_flex.py):

- ``flex_attention(...)`` called directly runs flex's eager implementation: it warns that it "will use an
  unfused implementation that materializes the full scores matrix", traces the mods with dynamo (an eager
  backend, ``fullgraph=True``) and runs ``torch._higher_order_ops.flex_attention.math_attention``: scores and
  mods in float32 (float64 for fp64 queries), ``torch._safe_softmax`` in float32, probabilities rounded to the
  input dtype (``post_mod_scores.to(query.dtype)``) and ``P @ V`` in the input dtype. Dynamo specialises on
  sizes 0/1 and on strides, so a campaign's varied shapes retrace on most calls: 0.3-0.4 s a call.
- This target (``ATTNVERIFY_FLEX_MODE=eager``, the default) runs the same ``math_attention`` without the dynamo
  trace, by setting flex's own switch ``_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG`` for the duration of the call
  (restored after it): 10-60 ms a call. The tests pin that out and lse are bitwise equal to the plain
  ``flex_attention`` call on cases that use every option and dtype. The kernel under test in this mode is that
  reference implementation, not a fused kernel.
- lse: float32 (float64 for fp64), natural log. Flex keeps it in base 2 internally (``math_attention`` returns
  ``logsumexp / ln 2``) and multiplies by ``ln 2`` before returning it (``_finalize_outputs``,
  ``stats_are_log2``), so nothing is converted here; the tests compare it with ``torch.logsumexp``.
- Rows with no visible key: output 0 (``_safe_softmax``), lse ``-inf`` (``torch.where(masked_rows, -inf, ...)``):
  policy ``zeros``.
- No backward on CPU: ``out.backward()`` raises ``NotImplementedError: FlexAttention does not support backward
  on CPU`` (eager and compiled), so no ``grad``.
- ``torch.compile(flex_attention)`` (``ATTNVERIFY_FLEX_MODE=compiled``): inductor's fused CPU kernel (C++
  template). Forward only and no lse ("torch.compile on CPU only supports inference and `return_lse` is not
  supported yet"), so that mode does not declare ``lse``. Static shapes: with dynamic shapes (``dynamic=True``,
  or dynamo's automatic dynamic after a recompile) the lowering of these mods failed in our trials
  (``unbacked_bindings``), so every new shape, dtype or scale compiles, 4-8 s a call (0.2 s when inductor's
  disk cache has it). Past dynamo's ``recompile_limit`` (8) later calls would silently run the eager path
  instead, so that mode compiles with a limit of its own.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch.nn.attention import flex_attention as _flex_module
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

from verify.targets.base import Contract, TargetInfo, Unsupported

MODE = os.environ.get("ATTNVERIFY_FLEX_MODE", "eager")
if MODE not in ("eager", "compiled"):
    raise ImportError(f"ATTNVERIFY_FLEX_MODE={MODE!r}: choose 'eager' (the default) or 'compiled'")

_FEATURES = frozenset({"mask", "bias", "causal", "bottom-right", "window", "softcap", "alibi", "segments", "gqa"})
_NONE = 2**40  # an unbounded window side: no |d| reaches it

INFO = TargetInfo(
    name="torch-flex",
    framework="torch",
    dtypes=("bf16", "fp16", "fp32", "fp64"),
    features=_FEATURES | {"lse"} if MODE == "eager" else _FEATURES,
    masked_rows="zeros",
    contract=Contract(accumulate="fp32", round_logits=False, round_probs=True),
    description=f"flex_attention on CPU ({MODE}): mask_mod / block_mask and score_mod from the canonical arguments",
    notes=(
        "eager: flex's math_attention, run without the dynamo trace (bitwise equal to the plain call): scores and "
        "softmax in fp32, probabilities rounded to the input dtype before P @ V in that dtype; lse natural log in "
        "fp32 (base 2 inside flex, rescaled by ln 2); rows with no visible key out 0, lse -inf. Forward only: no "
        "CPU backward. No sinks. compiled: inductor's CPU kernel, inference only, no lse, a compile per shape."
    ),
)

_COMPILED = None


def _compiled():
    """``torch.compile(flex_attention)``, built once: static shapes, and a recompile limit of its own so that new
    shapes keep compiling instead of falling back to the eager path after 8 (dynamo's
    ``accumulated_recompile_limit``, 256 over the process, still applies)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(flex_attention, dynamic=False, recompile_limit=10**6)
    return _COMPILED


@contextmanager
def _untraced():
    """flex's eager implementation without the dynamo trace of the mods (flex's own switch, restored after)."""
    before = _flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG
    _flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True
    try:
        yield
    finally:
        _flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = before


def _call(*args, **kw):
    if MODE == "compiled":
        return _compiled()(*args, **kw)
    with _untraced():
        return flex_attention(*args, **kw)


def _full(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``x`` broadcast to ``shape`` and materialised: inductor's CPU flex kernel cannot lower a mod that reads a
    stride-0 (expanded) buffer ("All the buffers in the score and mask subgraph should be in
    kernel_group.args.input_buffers"); the eager path does not mind, and the values are the same."""
    return x.reshape((1,) * (len(shape) - x.dim()) + tuple(x.shape)).expand(shape).contiguous()


def _working(x: torch.Tensor, acc: torch.dtype, what: str) -> torch.Tensor:
    """``x`` in the working dtype, converted exactly or declined."""
    out = x.to(acc)
    if x.dtype == torch.float64 and acc != torch.float64 and not torch.equal(out.double(), x):
        raise Unsupported(f"flex computes scores in {acc} here and this fp64 {what} does not convert exactly")
    return out


def _mask_mod(pos: torch.Tensor, mask: torch.Tensor, q_seg: torch.Tensor, kv_seg: torch.Tensor):
    def mask_mod(b, h, i, j):
        d = i + pos[0] - j
        ok = (d >= 0) | (pos[1] == 0)
        ok = ok & (d <= pos[2]) & (d >= -pos[3])
        return ok & mask[b, h, i, j] & (q_seg[b, i] == kv_seg[b, j])

    return mask_mod


def _score_mod(pos: torch.Tensor, cap: torch.Tensor, bias: torch.Tensor, slopes: torch.Tensor):
    def score_mod(score, b, h, i, j):
        score = torch.where(pos[4] != 0, cap * torch.tanh(score / cap), score)
        dist = (i + pos[0] - j).abs().to(score.dtype)
        return score + bias[b, h, i, j] - slopes[b, h] * dist

    return score_mod


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    align: str = "top-left",
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    q_segment_ids: torch.Tensor | None = None,
    kv_segment_ids: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """flex_attention on ``[B, L, H, D]`` tensors; out ``[B, Lq, Hq, Dv]`` (and lse ``[B, Hq, Lq]``)."""
    if align not in ("top-left", "bottom-right"):
        raise ValueError(f"align must be 'top-left' or 'bottom-right', got {align!r}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
    if return_lse and MODE != "eager":
        raise Unsupported("compiled flex_attention on CPU returns no lse")
    b, lq, hq, _ = q.shape
    lk = k.shape[1]
    dev = q.device
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    left, right = window if window is not None else (None, None)
    pos = torch.tensor([lk - lq if align == "bottom-right" else 0, int(bool(causal)),
                        _NONE if left is None else left, _NONE if right is None else right,
                        int(softcap is not None)], dtype=torch.int64, device=dev)
    full = (b, hq, lq, lk)

    block_mask = None
    if causal or window is not None or mask is not None or q_segment_ids is not None:
        true = torch.ones((), dtype=torch.bool, device=dev)
        zero = torch.zeros((), dtype=torch.int64, device=dev)
        mask_mod = _mask_mod(
            pos,
            _full(true if mask is None else mask, full),
            _full(zero if q_segment_ids is None else q_segment_ids.to(torch.int64), (b, lq)),
            _full(zero if kv_segment_ids is None else kv_segment_ids.to(torch.int64), (b, lk)),
        )
        block_mask = create_block_mask(mask_mod, b, hq, lq, lk, device=dev)

    score_mod = None
    if softcap is not None or bias is not None or alibi_slopes is not None:
        zero = torch.zeros((), dtype=acc, device=dev)
        slopes = _full(zero if alibi_slopes is None else _working(alibi_slopes, acc, "alibi_slopes"), (b, hq))
        score_mod = _score_mod(
            pos,
            torch.tensor(1.0 if softcap is None else float(softcap), dtype=acc, device=dev),
            _full(zero if bias is None else _working(bias, acc, "bias"), full),
            slopes,
        )

    res = _call(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod, block_mask=block_mask,
                scale=scale, enable_gqa=hq != k.shape[2], return_aux=AuxRequest(lse=True) if return_lse else None)
    if return_lse:
        out, aux = res
        return out.transpose(1, 2), aux.lse
    return res.transpose(1, 2)

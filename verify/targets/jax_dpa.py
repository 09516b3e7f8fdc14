"""jax-dpa: ``jax.nn.dot_product_attention``, JAX's materialising reference attention.

Layout BTNH is ours ([B, L, H, D]); mask (bool, True = attend), bias, ``is_causal`` (top-left,
``tril``), ``scale`` and grouped-query attention (N a multiple of K) map one to one. The function
requires ``value`` to have ``key``'s shape, so ``Dk != Dv`` is handled here by zero-padding the
narrower side to the wider head dim (zeros add exactly 0 to every dot product; the scale is
passed explicitly) and slicing the output back: exact, forward and gradient.

Options of ``jax.nn.dot_product_attention`` (jax 0.10.2) against ours, checked in
``tests/test_targets_jax_modern.py`` against ``oracles.mp``:

- ``window`` -> ``local_window_size=(left, right)``: ``_get_window_mask`` keeps
  ``query_pos <= key_pos + left`` and ``query_pos >= key_pos - right``, i.e. ``i - left <= j <= i + right``:
  spec's window with ``off = 0`` exactly. It takes ints only; a ``None`` (unbounded) side is passed as
  ``max(Lq, Lk)``, which no ``|i - j|`` reaches, so it is exact too. It is intersected with mask and
  ``is_causal`` like spec's rules and filled with the same ``-0.7 * finfo.max`` as the mask, so a row
  emptied by the window follows the same ``uniform`` policy. Declared: ``window``.
- ``return_residual=True`` returns ``logsumexp(padded_logits)`` -- but ``.astype(key.dtype)`` (bf16 /
  fp16 lse for bf16 / fp16 inputs, where the harness wants float32), under ``lax.stop_gradient`` (an lse
  cotangent reaches nothing: dq, dk, dv lose the ``g_lse`` term), and of the filled logits for an empty
  row (``log(Lk) - 0.7 finfo.max``, finite). In fp32 its value matches mp's lse; it is still not a
  differentiable lse output, so ``lse`` is *not* declared.
- ``query_seq_lengths`` / ``key_value_seq_lengths`` (int32 ``[B]``): keys ``j >= kv_len[b]`` are masked
  (a key-padding mask, which ``mask`` already expresses), and rows ``i >= q_len[b]`` are masked *and*
  their output is multiplied by 0 afterwards: those rows follow the ``zeros`` policy while other empty
  rows follow ``uniform``. Neither is spec's ``segments`` (arbitrary equal-id visibility; prefix lengths
  express only one segment plus padding), so nothing maps onto them and they are not used.
- no ``align`` option: ``is_causal`` is ``tril`` (top-left) and the window is centred on ``i``. A
  bottom-right diagonal could be imitated by shifting ``local_window_size`` by ``Lk - Lq`` (negative
  sizes when ``Lq > Lk`` or ``left < Lk - Lq``: outside its documented domain, and cuDNN reads the window
  differently), which would test our shift, not a jax option: ``bottom-right`` is not declared.
- no softcap, ALiBi, sinks or segment-id parameters (ALiBi could be folded into ``bias`` and sinks
  imitated by an extra key, again our arithmetic rather than jax's): not declared.

``implementation="xla"`` (the reference path, any device); ``"cudnn"`` exists only on NVIDIA
GPUs and is not used by this target (it runs on the CPU device).

Masked-row policy ``uniform``, from jax/_src/nn/functions.py (jax 0.10.2) and a run: mask and
causal are applied with ``jnp.where(mask, logits, -0.7 * finfo(logits dtype).max)`` (logits
dtype = float32 for bf16/fp16/fp32 inputs), so a row with every key masked has equal logits and
softmax gives the mean of all values; the ``where`` passes no gradient to masked logits, so
dq = dk = 0 and dv receives g / Lk, as the ``uniform`` policy says. A ``-inf`` bias is added to the
logits as is: a row masked *only* by ``-inf`` bias is NaN (softmax of all ``-inf``), and a row masked
partly by ``mask`` (or causal, or the window) and partly by ``-inf`` bias averages just the keys
the fill masked; both are masked-row findings.

Contract: logits ``einsum(..., preferred_element_type=float32)`` (``BF16_BF16_F32`` /
``F16_F16_F32`` dot algorithms), scale and bias applied in float32, softmax "always carried out in
fp32", then ``probs.astype(key.dtype)`` before ``probs @ value`` in the input dtype:
``accumulate="fp32"``, logits not rounded, probabilities rounded.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from verify.targets.base import Contract, TargetInfo

IMPLEMENTATION = "xla"

INFO = TargetInfo(
    name="jax-dpa",
    framework="jax",
    dtypes=("bf16", "fp16", "fp32"),
    features=frozenset({"mask", "bias", "causal", "gqa", "grad", "window"}),
    masked_rows="uniform",
    contract=Contract(accumulate="fp32", round_logits=False, round_probs=True),
    description="jax.nn.dot_product_attention, implementation='xla'",
    notes=(
        "uniform: mask/causal fill logits with -0.7*finfo(float32).max, so a fully masked row averages all values "
        "(a row masked only by -inf bias is NaN instead). "
        "Contract: float32 logits (preferred_element_type), float32 softmax, probabilities cast to the input "
        "dtype before probs @ value. Dk != Dv handled by exact zero-padding. "
        "window -> local_window_size (same convention, top-left; None -> max(Lq, Lk)). Not mapped: return_residual "
        "(lse rounded to the input dtype and stop_gradient-ed), query/key_value_seq_lengths (padding, not segments; "
        "padded query rows are zeroed, not uniform), bottom-right, softcap, ALiBi, sinks, segments (no such options)."
    ),
)


def _pad_last(x: jax.Array, width: int) -> jax.Array:
    extra = width - x.shape[-1]
    return x if extra == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
) -> jax.Array:
    """Canonical call -> ``jax.nn.dot_product_attention`` (Dk != Dv zero-padded; window -> local_window_size)."""
    dk, dv = q.shape[-1], v.shape[-1]
    scale = 1.0 / math.sqrt(dk) if scale is None else scale
    local_window_size = None
    if window is not None:
        unbounded = max(q.shape[1], k.shape[1])  # no |i - j| reaches it: an unbounded side, exactly
        local_window_size = tuple(unbounded if side is None else int(side) for side in window)
    width = max(dk, dv)
    out = jax.nn.dot_product_attention(
        _pad_last(q, width),
        _pad_last(k, width),
        _pad_last(v, width),
        bias=bias,
        mask=mask,
        scale=scale,
        is_causal=causal,
        local_window_size=local_window_size,
        implementation=IMPLEMENTATION,
    )
    return out[..., :dv]

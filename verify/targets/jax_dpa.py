"""jax-dpa: ``jax.nn.dot_product_attention``, JAX's materialising reference attention.

Layout BTNH is ours ([B, L, H, D]); mask (bool, True = attend), bias, ``is_causal`` (top-left,
``tril``), ``scale`` and grouped-query attention (N a multiple of K) map one to one. The function
requires ``value`` to have ``key``'s shape, so ``Dk != Dv`` is handled here by zero-padding the
narrower side to the wider head dim (zeros add exactly 0 to every dot product; the scale is
passed explicitly) and slicing the output back: exact, forward and gradient.

``implementation="xla"`` (the reference path, any device); ``"cudnn"`` exists only on NVIDIA
GPUs and is not used by this target (it runs on the CPU device).

Masked-row policy ``uniform``, from jax/_src/nn/functions.py (jax 0.10.2) and a run: mask and
causal are applied with ``jnp.where(mask, logits, -0.7 * finfo(logits dtype).max)`` (logits
dtype = float32 for bf16/fp16/fp32 inputs), so a row with every key masked has equal logits and
softmax gives the mean of all values; the ``where`` passes no gradient to masked logits, so
dq = dk = 0 and dv receives g / Lk, as the ``uniform`` policy says. A ``-inf`` bias is added to the
logits as is: a row masked *only* by ``-inf`` bias is NaN (softmax of all ``-inf``), and a row masked
partly by ``mask`` and partly by ``-inf`` bias averages just the mask-masked keys; both are
masked-row findings.

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
    features=frozenset({"mask", "bias", "causal", "gqa", "grad"}),
    masked_rows="uniform",
    contract=Contract(accumulate="fp32", round_logits=False, round_probs=True),
    description="jax.nn.dot_product_attention, implementation='xla'",
    notes=(
        "uniform: mask/causal fill logits with -0.7*finfo(float32).max, so a fully masked row averages all values "
        "(a row masked only by -inf bias is NaN instead). "
        "Contract: float32 logits (preferred_element_type), float32 softmax, probabilities cast to the input "
        "dtype before probs @ value. Dk != Dv handled by exact zero-padding."
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
) -> jax.Array:
    """Canonical call -> ``jax.nn.dot_product_attention`` (Dk != Dv by exact zero-padding)."""
    dk, dv = q.shape[-1], v.shape[-1]
    scale = 1.0 / math.sqrt(dk) if scale is None else scale
    width = max(dk, dv)
    out = jax.nn.dot_product_attention(
        _pad_last(q, width),
        _pad_last(k, width),
        _pad_last(v, width),
        bias=bias,
        mask=mask,
        scale=scale,
        is_causal=causal,
        implementation=IMPLEMENTATION,
    )
    return out[..., :dv]

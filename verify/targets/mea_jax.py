"""mea-jax: ``memory_efficient_attention.efficient_dot_product_attention_jax`` (PyPI 0.1.3).

The package is the public JAX version of the paper's listing, extended with ``mask`` / ``bias``
(layout ``[batch..., heads, q, k]``, like ours) and per-chunk callbacks. This module maps the
canonical call onto it:

- q, k, v pass unchanged (``[B, L, H, D]`` is the package's layout); chunk sizes pass through,
  ``None`` meaning the package's defaults (1024 queries, 4096 keys);
- ``causal`` is expressed through the package's documented ``mask_calc_fn`` callback, which
  receives the query and key chunk offsets and returns the chunk's mask;
- ``scale``: the package always divides the query by ``sqrt(Dk)``; any other scale raises
  ``Unsupported``. It has no grouped-query attention (the heads of q and k must match), so
  ``gqa`` is not declared.

Two input bugs of 0.1.3 are worked around here, exactly (they change no value):

- ``mask`` without ``bias`` and ``bias`` without ``mask`` both raise ``AttributeError:
  'NoneType' object has no attribute 'shape'`` (each branch tests the *other* array's shape);
  we pass a zero bias / an all-True mask alongside;
- for the same reason mask and bias must agree on which of the q and k axes broadcast
  (mask ``[1,1,L,L]`` with bias ``[1,1,1,L]`` raises ``TypeError``); we broadcast both to one shape.

Masked-row policy ``uniform`` (measured): a masked logit becomes ``finfo(dtype).min``, so a row
whose keys are all masked by ``mask`` (or ``causal``) gives the mean of all values, like any
``finfo.min`` fill. A ``-inf`` bias is *not* handled: a key chunk whose logits are all ``-inf``
has max ``-inf`` and ``exp(-inf - -inf)`` makes that whole row NaN, even when other chunks of the
row are visible; a row masked only by ``-inf`` bias is NaN too. The harness reports these.

Contract: like the listing, everything (the pre-scaled query, logits, max, exp, sums, the final
division) is in the input dtype: ``accumulate="input"``, logits and probabilities rounded.
Non-dividing chunk sizes inherit the listing's ``dynamic_slice`` clamping: keys in the overlap
are counted twice, and a non-dividing query chunk returns ``ceil(Lq / c) * c`` rows instead of Lq
(the package concatenates where the listing reshapes); the clamped last chunk also shifts the
offsets ``mask_calc_fn`` sees, so the causal mask there is wrong.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from memory_efficient_attention import efficient_dot_product_attention_jax

from verify.targets.base import Contract, TargetInfo, require_default_scale, require_equal_heads

DEFAULT_QUERY_CHUNK = 1024
DEFAULT_KEY_CHUNK = 4096

INFO = TargetInfo(
    name="mea-jax",
    framework="jax",
    dtypes=("bf16", "fp16", "fp32"),
    features=frozenset({"mask", "bias", "causal", "chunks", "grad"}),
    masked_rows="uniform",
    contract=Contract(accumulate="input", round_logits=True, round_probs=True),
    description="memory-efficient-attention 0.1.3, efficient_dot_product_attention_jax",
    notes=(
        "uniform: masked logits are set to finfo(input dtype).min, so a fully masked row averages all values; "
        "-inf bias is unhandled (a fully -inf key chunk or row gives NaN). "
        "accumulate=input: the query is divided by sqrt(Dk) and logits, max, exp and sums are computed in the "
        "input dtype, einsums at Precision.HIGHEST."
    ),
)


def _four_d(x: jax.Array) -> jax.Array:
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _causal_chunk(query_offset: jax.Array, key_offset: jax.Array, mask: jax.Array | None,
                  logits: jax.Array, _: object) -> jax.Array:
    """``mask_calc_fn``: the causal mask of one chunk (logits are [..., q, h, k]), and-ed with ``mask``."""
    rows = query_offset + jnp.arange(logits.shape[-3])
    cols = key_offset + jnp.arange(logits.shape[-1])
    causal = (cols[None, :] <= rows[:, None])[None]  # [1, q, k]: the package wants [..., h, q, k]
    return causal if mask is None else jnp.logical_and(mask, causal)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
    causal: bool = False,
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
) -> jax.Array:
    """Canonical call -> the package's call (see the module docstring for the mapping)."""
    dk = q.shape[-1]
    require_default_scale("mea-jax", scale, dk)
    require_equal_heads("mea-jax", q.shape[2], k.shape[2])
    if mask is not None or bias is not None:
        mask = None if mask is None else _four_d(mask)
        bias = None if bias is None else _four_d(bias)
        shape = jnp.broadcast_shapes(*(x.shape for x in (mask, bias) if x is not None))
        mask = jnp.ones(shape, bool) if mask is None else jnp.broadcast_to(mask, shape)
        bias = jnp.zeros(shape, q.dtype) if bias is None else jnp.broadcast_to(bias, shape)
    return efficient_dot_product_attention_jax(
        q,
        k,
        v,
        mask=mask,
        bias=bias,
        query_chunk_size=DEFAULT_QUERY_CHUNK if query_chunk_size is None else int(query_chunk_size),
        key_chunk_size=DEFAULT_KEY_CHUNK if key_chunk_size is None else int(key_chunk_size),
        mask_calc_fn=_causal_chunk if causal else None,
    )

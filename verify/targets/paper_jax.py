"""paper-jax: the published listing of Rabe & Staats (arXiv 2112.05682, Fig. 1), behaviour for behaviour.

Kept on purpose *uncorrected*, to show what the harness finds in the published code. Written
from the listing in ``shared/seed.md`` plus the reconstruction of its lost lines in
``shared/design.md``: the per-chunk max is detached (``stop_gradient``) and returned reshaped to
``[q, heads]``; key/value chunks are ``lax.dynamic_slice`` s of ``min(key_chunk_size, num_kv)``
rows at starts ``0, c, 2c, ...`` (``lax.map``); query chunks are ``dynamic_slice`` s of
``min(query_chunk_size, num_q)`` rows inside a ``lax.scan`` of ``ceil(num_q / query_chunk_size)``
steps whose stacked result is reshaped to ``[num_q, heads, v_features]``. Everything is computed
in the input dtype, einsums at ``Precision.HIGHEST``; the query is divided by ``sqrt(Dk)`` first.

The listing has no batch dimension: we ``vmap`` it over B. It has no mask, bias, causal flag or
grouped-query attention, and it always scales by ``1/sqrt(Dk)``: a ``scale`` other than that
raises ``Unsupported``. Chunk sizes ``None`` mean the listing's defaults, 1024 queries and 4096
keys.

What it does when a chunk size does not divide the length (measured with jax 0.10.2, CPU;
``tests/test_targets_jax.py`` asserts both):

- keys (``num_kv % key_chunk_size != 0``): ``dynamic_slice`` clamps the last start
  ``c * floor(num_kv / c)`` down to ``num_kv - c`` so that the slice fits, so the last chunk
  re-reads keys the previous chunk already summarised. Those keys are counted twice, in both the
  numerator and the denominator: the output is a *silently wrong* convex combination that
  over-weights keys ``num_kv - c .. c * floor(num_kv / c) - 1``. E.g. Lk=10, c=4: starts 0, 4, 6;
  keys 6 and 7 get weight 2. No error, finite output, differs from the exact value by O(1).
- queries (``num_q % query_chunk_size != 0``): the scan stacks ``ceil(num_q / c)`` chunks of
  ``c`` rows, ``c * ceil(num_q / c) > num_q`` rows in all, and the final reshape to
  ``[num_q, heads, v_features]`` fails at trace time: ``TypeError: cannot reshape array of shape
  (3, 4, 2, 8) (size 192) into shape (10, 2, 8) (size 160)`` for num_q=10, c=4.
  (Had it concatenated instead, the clamped last chunk would have repeated rows.)
- a chunk size equal to or larger than the length is clipped to the length (``min``) and is exact.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from verify.targets.base import Contract, TargetInfo, require_default_scale, require_equal_heads

DEFAULT_QUERY_CHUNK = 1024
DEFAULT_KEY_CHUNK = 4096

INFO = TargetInfo(
    name="paper-jax",
    framework="jax",
    dtypes=("bf16", "fp16", "fp32"),
    features=frozenset({"chunks", "grad"}),
    masked_rows="zeros",  # irrelevant: no mask, bias or causal, so no row is ever fully masked
    contract=Contract(accumulate="input", round_logits=True, round_probs=True),
    description="the paper's published JAX listing, uncorrected (no mask/bias/causal/GQA; 1/sqrt(Dk) scale)",
    notes=(
        "Everything (logits, max, exp, sums, the final division) is in the input dtype, as in the listing; "
        "non-dividing key chunks double-count keys, non-dividing query chunks fail to reshape."
    ),
)


def _query_chunk(query: jax.Array, key: jax.Array, value: jax.Array, key_chunk_size: int) -> jax.Array:
    """Attention of one query chunk [q, h, d] over all keys, key chunk by key chunk (listing lines 4-40)."""
    num_kv, num_heads, k_features = key.shape
    v_features = value.shape[-1]
    chunk = min(key_chunk_size, num_kv)
    query = query / jnp.sqrt(k_features)  # weakly typed: stays in the input dtype

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def summarize(query: jax.Array, key: jax.Array, value: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        logits = jnp.einsum("qhd,khd->qhk", query, key, precision=lax.Precision.HIGHEST)
        peak = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
        weights = jnp.exp(logits - peak)
        values = jnp.einsum("vhf,qhv->qhf", value, weights, precision=lax.Precision.HIGHEST)
        return values, weights.sum(axis=-1), peak.reshape(peak.shape[:2])

    def one_chunk(start: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        key_chunk = lax.dynamic_slice(key, (start, 0, 0), (chunk, num_heads, k_features))
        value_chunk = lax.dynamic_slice(value, (start, 0, 0), (chunk, num_heads, v_features))
        return summarize(query, key_chunk, value_chunk)

    values, weights, peaks = lax.map(one_chunk, jnp.arange(0, num_kv, chunk))
    top = jnp.max(peaks, axis=0, keepdims=True)
    rescale = jnp.exp(peaks - top)
    values = values * rescale[..., None]
    weights = weights * rescale
    return values.sum(axis=0) / weights[..., None].sum(axis=0)


def _one_sequence(
    query: jax.Array, key: jax.Array, value: jax.Array, query_chunk_size: int, key_chunk_size: int
) -> jax.Array:
    """The listing's ``mefficient_attention_jax`` on unbatched [L, H, D] arrays (lines 42-55)."""
    num_q, num_heads, q_features = query.shape
    rows = min(query_chunk_size, num_q)

    def step(start: jax.Array, _: None) -> tuple[jax.Array, jax.Array]:
        query_chunk = lax.dynamic_slice(query, (start, 0, 0), (rows, num_heads, q_features))
        return start + query_chunk_size, _query_chunk(query_chunk, key, value, key_chunk_size)

    _, stacked = lax.scan(step, 0, None, length=math.ceil(num_q / query_chunk_size))
    return stacked.reshape(num_q, num_heads, value.shape[-1])


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
) -> jax.Array:
    """The published listing vmapped over the batch: q [B, Lq, H, Dk], k [B, Lk, H, Dk], v [B, Lk, H, Dv]."""
    dk = q.shape[-1]
    require_default_scale("paper-jax", scale, dk)
    require_equal_heads("paper-jax", q.shape[2], k.shape[2])
    qc = DEFAULT_QUERY_CHUNK if query_chunk_size is None else int(query_chunk_size)
    kc = DEFAULT_KEY_CHUNK if key_chunk_size is None else int(key_chunk_size)
    if qc < 1 or kc < 1:
        raise ValueError(f"chunk sizes must be positive, got query {qc}, key {kc}")
    return jax.vmap(lambda a, b, c: _one_sequence(a, b, c, qc, kc))(q, k, v)

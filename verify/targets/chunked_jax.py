"""chunked-jax: the paper's chunked attention in JAX, corrected and general.

Same two-level chunking as the listing (a ``lax.scan`` over query chunks, an inner loop over key
chunks), but exact for the full semantics of ``oracles/spec.py``:

- **any chunk sizes**: a chunk size larger than the length is clipped to it; a size that does not
  divide the length is handled with the same clamped ``dynamic_slice`` starts as the listing, but
  a key of the clamped last chunk whose global index lies in an earlier chunk is masked out (no
  double counting), and of the clamped last query chunk only the rows not produced before are
  kept. ``None`` means the listing's defaults, 1024 queries and 4096 keys (clipped to the length).
- **mask / bias / causal / GQA / Dk != Dv**: mask and bias are sliced per chunk (axes of size 1
  broadcast), ``-inf`` bias masks, causal compares global indices, and query heads are grouped
  as ``[Hkv, Hq // Hkv]`` so each group reads its kv head without copying k or v.
- **statistics in float32** (the promotion of the input dtype with float32): inputs are cast per
  chunk; the query chunk is multiplied by ``scale`` once, in float32 (exact when the scale is a
  power of two, else one float32 rounding per element, inside the float32 logits error; scaling
  the logits instead costs a pass over every logits block: 1.3x the forward time on CPU); logits
  are a float32 ``einsum`` at ``Precision.HIGHEST``; the running max, running sum and output
  accumulator are float32; probabilities are *not* rounded to the input dtype before ``p @ v``
  (both operands float32). Only the final output is rounded to the input dtype.
- **online softmax** over key chunks (running max ``m``, sum ``total``, accumulator ``o``), so the
  forward pass holds one ``[query chunk, key chunk]`` logits block per head and no
  ``[Lq, Lk]``-sized intermediate.
- **fully masked rows** give exactly 0 and zero gradients: the running max starts at ``-inf`` and
  is replaced by 0 wherever it is still ``-inf`` before any subtraction, so ``exp`` sees
  ``-inf - 0`` (= weight 0), never ``-inf - -inf``; the final ``o / total`` divides by 1 where
  ``total == 0`` and selects 0 there. The max is ``stop_gradient``-ed (the output does not depend on it).
- **output written in place**: each query chunk's rows are scatter-added into an output that starts
  as ``-0.0`` (``-0.0 + x == x`` exactly, signed zeros included; rows of the clamped last chunk that
  an earlier chunk produced add ``-0.0``). XLA updates it in place in the loop, so no stacked
  ``[chunks, ...]`` result and no copy of it into the output layout exist (``lax.map`` + reshape
  held an O(Lq * Dv) temporary), and the transpose of an add passes the output cotangent through
  unchanged (that of ``dynamic_update_slice`` zeroes it in an O(Lq * Dv) copy).
- **memory-efficient gradient**: both loop bodies are ``jax.checkpoint``-ed, so reverse mode keeps
  only the per-key-chunk carries of one query chunk at a time and recomputes the logits blocks.
  Autodiff of the key loop still builds, per query chunk, dk and dv cotangents of full length Lk
  before adding them to the totals: two O(Lk * Dk) temporaries that only a hand-written backward
  would avoid (measured by ``attnverify memory``).

jit-compatible (shapes, scale, causal and chunk sizes are static).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from verify.targets.base import Contract, TargetInfo

DEFAULT_QUERY_CHUNK = 1024
DEFAULT_KEY_CHUNK = 4096
_HIGHEST = lax.Precision.HIGHEST

INFO = TargetInfo(
    name="chunked-jax",
    framework="jax",
    dtypes=("bf16", "fp16", "fp32"),
    features=frozenset({"mask", "bias", "causal", "gqa", "chunks", "grad"}),
    masked_rows="zeros",
    contract=Contract(accumulate="fp32", round_logits=False, round_probs=False),
    description="the paper's algorithm in JAX, corrected: any chunks, mask, bias, causal, GQA, fp32 statistics",
    notes=(
        "zeros: a row with no visible key has a zero row sum and is set to 0 (max shift guarded against -inf). "
        "Contract: float32 logits, max, sums and accumulator; probabilities stay float32 for p @ v."
    ),
)


def _chunk_size(size: int | None, default: int, length: int) -> int:
    size = default if size is None else int(size)
    if size < 1:
        raise ValueError(f"chunk sizes must be positive, got {size}")
    return min(size, length)


def _grouped(x: jax.Array | None, hq: int, hkv: int) -> jax.Array | None:
    """A mask/bias broadcastable to [B, Hq, Lq, Lk] as [B|1, Hkv|1, G|1, Lq|1, Lk|1]."""
    if x is None:
        return None
    if x.ndim > 4:
        raise ValueError(f"mask/bias has {x.ndim} dims; it must broadcast to [B, Hq, Lq, Lk]")
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    b, h, lq, lk = x.shape
    if h == 1:
        return x[:, :, None]
    return x.reshape(b, hkv, hq // hkv, lq, lk)


def _take(x: jax.Array | None, start: jax.Array, size: int, axis: int) -> jax.Array | None:
    """``size`` entries of ``axis`` from ``start``, unless that axis broadcasts (size 1)."""
    if x is None or x.shape[axis] == 1:
        return x
    return lax.dynamic_slice_in_dim(x, start, size, axis)


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
    """Chunked attention: q [B, Lq, Hq, Dk], k [B, Lk, Hkv, Dk], v [B, Lk, Hkv, Dv] -> [B, Lq, Hq, Dv]."""
    b, lq, hq, dk = q.shape
    _, lk, hkv, dv = v.shape
    if hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}")
    cq = _chunk_size(query_chunk_size, DEFAULT_QUERY_CHUNK, lq)
    ck = _chunk_size(key_chunk_size, DEFAULT_KEY_CHUNK, lk)
    nq, nk = math.ceil(lq / cq), math.ceil(lk / ck)
    scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
    acc = jnp.promote_types(q.dtype, jnp.float32)
    out_dtype = q.dtype
    # Cast once, outside the scans: the scans' transposes then accumulate dq/dk/dv/dbias across
    # chunks in float32. Cast per chunk, they summed in the input dtype, and fp16 dk overflowed
    # (attnverify fuzz: big-values, exact dk -61464, got -inf).
    q, k, v = q.astype(acc), k.astype(acc), v.astype(acc)
    bias = None if bias is None else bias.astype(acc)
    groups = hq // hkv
    mask5, bias5 = _grouped(mask, hq, hkv), _grouped(bias, hq, hkv)

    def key_step(qi: jax.Array, q_chunk: jax.Array, mask_rows: jax.Array | None, bias_rows: jax.Array | None,
                 carry: tuple, j: jax.Array) -> tuple[tuple, None]:
        """Fold key chunk ``j`` into the running (max, sum, accumulator) of one query chunk."""
        m, total, o = carry
        start = jnp.minimum(j * ck, lk - ck)  # the clamped start dynamic_slice would use anyway
        kj = lax.dynamic_slice_in_dim(k, start, ck, axis=1)
        vj = lax.dynamic_slice_in_dim(v, start, ck, axis=1)
        s = jnp.einsum("bqhgd,bkhd->bhgqk", q_chunk, kj, precision=_HIGHEST)
        cols = start + jnp.arange(ck)
        visible = cols >= j * ck  # keys of the clamped last chunk already counted by the previous one
        if causal:
            visible = visible & (cols[None, :] <= qi[:, None])
        if mask_rows is not None:
            visible = visible & _take(mask_rows, start, ck, axis=4)
        if bias_rows is not None:
            bj = _take(bias_rows, start, ck, axis=4)
            visible = visible & (bj != -jnp.inf)
            s = s + bj
        s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, lax.stop_gradient(s).max(axis=-1))
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # never subtract -inf from -inf
        p = jnp.exp(s - shift[..., None])
        alpha = jnp.exp(m - shift)
        total = total * alpha + p.sum(axis=-1)
        o = o * alpha[..., None] + jnp.einsum("bhgqk,bkhd->bhgqd", p, vj, precision=_HIGHEST)
        return (m_new, total, o), None

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def query_chunk(i: jax.Array) -> jax.Array:
        """Output rows [start, start + cq) for query chunk ``i`` (start clamped like dynamic_slice)."""
        start = jnp.minimum(i * cq, lq - cq)
        qi = start + jnp.arange(cq)
        q_chunk = lax.dynamic_slice_in_dim(q, start, cq, axis=1) * jnp.asarray(scale, acc)
        q_chunk = q_chunk.reshape(b, cq, hkv, groups, dk)
        mask_rows, bias_rows = _take(mask5, start, cq, axis=3), _take(bias5, start, cq, axis=3)
        step = jax.checkpoint(functools.partial(key_step, qi, q_chunk, mask_rows, bias_rows), prevent_cse=False)
        init = (
            jnp.full((b, hkv, groups, cq), -jnp.inf, acc),
            jnp.zeros((b, hkv, groups, cq), acc),
            jnp.zeros((b, hkv, groups, cq, dv), acc),
        )
        (_, total, o), _ = lax.scan(step, init, jnp.arange(nk))
        seen = total > 0
        out = jnp.where(seen[..., None], o / jnp.where(seen, total, 1.0)[..., None], 0.0)
        out = jnp.moveaxis(out, 3, 1).reshape(b, cq, hq, dv).astype(out_dtype)
        if nq * cq == lq:
            return out
        # rows of the clamped last chunk that an earlier chunk produced contribute -0.0 (no change)
        return jnp.where((qi >= i * cq)[None, :, None, None], out, jnp.asarray(-0.0, out_dtype))

    def add_chunk(out: jax.Array, i: jax.Array) -> tuple[jax.Array, None]:
        rows = jnp.minimum(i * cq, lq - cq) + jnp.arange(cq)
        return out.at[:, rows].add(query_chunk(i), indices_are_sorted=True, unique_indices=True), None

    out, _ = lax.scan(add_chunk, jnp.full((b, lq, hq, dv), -0.0, out_dtype), jnp.arange(nq))
    return out

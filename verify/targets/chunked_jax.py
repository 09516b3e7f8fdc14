"""chunked-jax: the paper's chunked attention in JAX, corrected and general.

Same two-level chunking as the listing (a ``lax.scan`` over query chunks, an inner loop over key
chunks), but exact for the full semantics of ``oracles/spec.py``: mask, bias, causal, bottom-right
alignment, sliding windows, softcap, ALiBi, attention sinks, segment ids, grouped-query attention and
``Dk != Dv``, with the log-sum-exp as a second, differentiable output.

- **any chunk sizes**: a chunk size larger than the length is clipped to it; a size that does not
  divide the length is handled with the same clamped ``dynamic_slice`` starts as the listing, but
  a key of the clamped last chunk whose global index lies in an earlier chunk is masked out (no
  double counting), and of the clamped last query chunk only the rows not produced before are
  kept. ``None`` means the listing's defaults, 1024 queries and 4096 keys (clipped to the length).
- **visibility, per logits block, from global indices**: with ``off = 0`` (``align="top-left"``) or
  ``Lk - Lq`` (``"bottom-right"``) and ``d = i + off - j``, causal keeps ``d >= 0`` and
  ``window=(left, right)`` keeps ``-right <= d <= left`` (a ``None`` side is unbounded); segment ids
  keep ``q_segment_ids[b, i] == kv_segment_ids[b, j]`` (sliced per chunk); mask and bias are sliced
  per chunk (axes of size 1 broadcast) and a ``-inf`` bias masks. Everything is intersected into one
  boolean block, and invisible logits become ``-inf`` before the max.
- **key-chunk skipping** (causal or window only): a key chunk none of whose keys lies in the band of
  the query chunk's rows is skipped with ``lax.cond`` (carry unchanged). The test is exact on the
  rectangle of indices the two chunks read (``d`` takes every integer between
  ``q_lo + off - k_hi`` and ``q_hi + off - k_lo``; ``band_overlaps``) and errs only towards
  computing a chunk (it uses the clamped chunk's full range), so a skipped chunk never holds a
  visible key; ``tests/test_targets_jax_modern.py`` checks it exhaustively against
  ``spec.position_visible``. Skipped or not, the result is the same bit for bit (a chunk with no
  visible key multiplies the carry by ``e^0 = 1`` and adds exact zeros; the tests compare causal/window
  with the same pattern given as a mask); only the work changes (causal square attention computes
  about half the blocks, a narrow window a few per row of chunks). The slices of k, v and bias are
  taken outside the ``cond`` (inside, its transpose built full-length dk/dv cotangents per step); what
  is left is a chunk-sized extra of the backward, independent of L (0.36 MiB at query chunk 1024, D 64).
- **logits** ``s = cap(t) + bias - slope_h |d|`` in float32 (the promotion of the input dtype with
  float32), ``t = scale q.k``: the query chunk is multiplied once, in float32, by ``scale`` (exact
  when the scale is a power of two, else one float32 rounding per element, inside the float32 logits
  error; scaling the logits instead costs a pass over every logits block: 1.3x the forward time on
  CPU); logits are a float32 ``einsum`` at ``Precision.HIGHEST``; the softcap is ``c tanh(t / c)``
  (a true division, then tanh and the product: the three roundings the tolerance model charges) with
  a hand-written derivative ``sech^2(t / c)`` (autodiff of the formula overflowed, see ``_softcap``;
  folding ``1 / c`` into the query scale did too, its cotangent being ``c`` times that of ``t``);
  bias is added, then ALiBi's ``slope * |d|`` (slopes cast to float32, ``|d|`` exact in float32,
  one rounding of the product) is subtracted.
- **online softmax** over key chunks (running max ``m``, sum ``total``, accumulator ``o``, all
  float32), so the forward pass holds one ``[query chunk, key chunk]`` logits block per head and no
  ``[Lq, Lk]``-sized intermediate. Probabilities are *not* rounded to the input dtype before
  ``p @ v`` (both operands float32). Only the final output is rounded to the input dtype.
- **sinks** join after the key loop, once per query chunk: ``m' = max(m, sigma_h)``,
  ``total' = total e^(m - m') + e^(sigma_h - m')``, ``o' = o e^(m - m')``. A ``-inf`` sink gives
  ``e^(m - m') = 1`` and ``e^(sigma - m') = 0`` exactly, so it equals no sink bit for bit; an empty
  row with a finite sink gives out 0 and lse ``sigma_h``; a ``+inf`` sink gives out 0, lse ``+inf``
  and ``dsinks = sum g_lse`` (spec's limit), computed on a finite stand-in so no NaN reaches the
  gradients. ``e^(m - m')`` is applied as two factors ``e^((m - m') / 2)``: a dominant sink makes it
  subnormal, which XLA on CPU flushes to 0, while ``o e^(m - m')`` is still a normal number when the
  values are huge (attnverify fuzz: sink 88.5, softcap 1, values ~1e35: out 0 instead of -3.6e-3).
  The max (and its sink part) is ``stop_gradient``-ed: out and lse do not depend on it,
  so ``dsinks`` comes through ``e^(sigma - m')`` in the normaliser alone.
- **lse** ``[B, Hq, Lq]`` float32 = ``m' + log(total')``, ``-inf`` for a row with no visible key
  and no sink; returned with ``return_lse=True`` and differentiable (its cotangent reaches q, k, v,
  bias and sinks through ``log(total')``).
- **fully masked rows** give exactly 0 and zero gradients: the running max starts at ``-inf`` and
  is replaced by 0 wherever it is still ``-inf`` before any subtraction, so ``exp`` sees
  ``-inf - 0`` (= weight 0), never ``-inf - -inf``; the final ``o / total`` divides by 1 where
  ``total == 0`` and selects 0 there.
- **outputs written in place**: each query chunk's rows (and lse entries) are scatter-added into
  outputs that start as ``-0.0`` (``-0.0 + x == x`` exactly, signed zeros and infinities included;
  rows of the clamped last chunk that an earlier chunk produced add ``-0.0``). XLA updates them in
  place in the loop, so no stacked ``[chunks, ...]`` result and no copy of it into the output layout
  exist (``lax.map`` + reshape held an O(Lq * Dv) temporary), and the transpose of an add passes the
  output cotangent through unchanged (that of ``dynamic_update_slice`` zeroes it in an O(Lq * Dv) copy).
- **memory-efficient gradient**: both loop bodies are ``jax.checkpoint``-ed, so reverse mode keeps
  only the per-key-chunk carries of one query chunk at a time and recomputes the logits blocks.
  Autodiff of the key loop still builds, per query chunk, dk and dv cotangents of full length Lk
  before adding them to the totals: two O(Lk * Dk) temporaries that only a hand-written backward
  would avoid (measured by ``attnverify memory``). The new options add no ``[Lq, Lk]`` array: every
  position-dependent term is built per block from index vectors.

jit-compatible: shapes, scale, causal, align, window, softcap, return_lse and the chunk sizes are
static; mask, bias, ALiBi slopes, sinks and segment ids may be traced. Gradients flow to q, k, v,
bias and sinks (none to slopes or segment ids, as in the spec).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from verify.targets.base import Contract, TargetInfo

DEFAULT_QUERY_CHUNK = 1024
DEFAULT_KEY_CHUNK = 4096
ALIGNS = ("top-left", "bottom-right")
_HIGHEST = lax.Precision.HIGHEST

INFO = TargetInfo(
    name="chunked-jax",
    framework="jax",
    dtypes=("bf16", "fp16", "fp32"),
    features=frozenset({"mask", "bias", "causal", "gqa", "chunks", "grad", "lse", "bottom-right", "window",
                        "softcap", "alibi", "sinks", "segments"}),
    masked_rows="zeros",
    contract=Contract(accumulate="fp32", round_logits=False, round_probs=False),
    description="the paper's algorithm in JAX, corrected: any chunks, every modern option, lse, fp32 statistics",
    notes=(
        "zeros: a row with no visible key (and no sink) has a zero row sum and is set to 0 (max shift guarded "
        "against -inf), lse -inf. Sinks join the normaliser after the key loop (a -inf sink is exactly no sink). "
        "Contract: float32 logits (softcap, bias and ALiBi applied in float32), max, sums and accumulator; "
        "probabilities stay float32 for p @ v; lse float32. Causal/window key chunks outside the band are skipped."
    ),
)


def _chunk_size(size: int | None, default: int, length: int) -> int:
    size = default if size is None else int(size)
    if size < 1:
        raise ValueError(f"chunk sizes must be positive, got {size}")
    return min(size, length)


def _window(window: object) -> tuple[int | None, int | None] | None:
    if window is None:
        return None
    if not isinstance(window, tuple | list) or len(window) != 2:
        raise ValueError(f"window must be None or (left, right), each an int >= 0 or None; got {window!r}")
    sides = []
    for x in window:
        if x is not None and (isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 0):
            raise ValueError(f"window sides must be ints >= 0 or None (unbounded); got {window!r}")
        sides.append(None if x is None else int(x))
    return sides[0], sides[1]


def band_overlaps(q_lo: object, q_hi: object, k_lo: object, k_hi: object, off: int, causal: bool,
                  window: tuple[int | None, int | None] | None) -> object:
    """Whether a query ``i`` in ``[q_lo, q_hi]`` and a key ``j`` in ``[k_lo, k_hi]`` pass causal and window.

    ``d = i + off - j`` takes every integer in ``[q_lo + off - k_hi, q_hi + off - k_lo]``; the rules
    keep ``d >= 0`` (causal), ``d >= -right`` and ``d <= left``. Works on Python ints and traced scalars.
    """
    d_lo, d_hi = q_lo + off - k_hi, q_hi + off - k_lo
    left, right = (None, None) if window is None else window
    ok = True
    if causal:
        ok = ok & (d_hi >= 0)
    if right is not None:
        ok = ok & (d_hi >= -right)
    if left is not None:
        ok = ok & (d_lo <= left)
    return ok


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


def _softcap(c: float) -> Callable[[jax.Array], jax.Array]:
    """``t -> c tanh(t / c)`` whose derivative is ``sech^2(t / c)`` itself.

    Autodiff of the formula multiplies the cotangent by ``c`` before the ``1 / c`` of the argument:
    ``ds * c`` overflowed float32 (huge values, ``ds ~ 1e36``, softcap 1e4: NaN dq and dk, attnverify fuzz),
    while ``ds * sech^2`` never exceeds ``ds``. ``sech^2 = (1 - y)(1 + y)``, ``y = tanh(t / c)``, as jax's own rule.
    """

    @jax.custom_jvp
    def cap(t: jax.Array) -> jax.Array:
        return c * jnp.tanh(t / c)

    @cap.defjvp
    def _cap_jvp(primals: tuple, tangents: tuple) -> tuple:
        (t,), (dt,) = primals, tangents
        y = jnp.tanh(t / c)
        return c * y, dt * ((1 - y) * (1 + y))

    return cap


def _and(a: jax.Array | None, b: jax.Array) -> jax.Array:
    return b if a is None else a & b


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
    causal: bool = False,
    align: str = "top-left",
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    alibi_slopes: jax.Array | None = None,
    sinks: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    return_lse: bool = False,
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Chunked attention: q [B, Lq, Hq, Dk], k [B, Lk, Hkv, Dk], v [B, Lk, Hkv, Dv] -> out [B, Lq, Hq, Dv].

    With ``return_lse=True`` returns ``(out, lse)``, lse [B, Hq, Lq] in float32 (the promotion of the
    input dtype with float32). Semantics: ``oracles/spec.py``; masked-row policy ``zeros``.
    """
    b, lq, hq, dk = q.shape
    _, lk, hkv, dv = v.shape
    if hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}")
    if align not in ALIGNS:
        raise ValueError(f"unknown align {align!r}; known: {', '.join(ALIGNS)}")
    window = _window(window)
    if softcap is not None:
        softcap = float(softcap)
        if not math.isfinite(softcap) or softcap <= 0:
            raise ValueError(f"softcap must be finite and > 0, got {softcap}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    if q_segment_ids is not None and (q_segment_ids.shape != (b, lq) or kv_segment_ids.shape != (b, lk)):
        raise ValueError(f"segment ids must be [B, Lq] = {[b, lq]} and [B, Lk] = {[b, lk]}, got "
                         f"{list(q_segment_ids.shape)} and {list(kv_segment_ids.shape)}")
    cq = _chunk_size(query_chunk_size, DEFAULT_QUERY_CHUNK, lq)
    ck = _chunk_size(key_chunk_size, DEFAULT_KEY_CHUNK, lk)
    nq, nk = math.ceil(lq / cq), math.ceil(lk / ck)
    off = 0 if align == "top-left" else lk - lq
    scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
    acc = jnp.promote_types(q.dtype, jnp.float32)
    out_dtype = q.dtype
    groups = hq // hkv
    # Cast once, outside the scans: the scans' transposes then accumulate dq/dk/dv/dbias/dsinks across
    # chunks in float32. Cast per chunk, they summed in the input dtype, and fp16 dk overflowed
    # (attnverify fuzz: big-values, exact dk -61464, got -inf).
    q, k, v = q.astype(acc), k.astype(acc), v.astype(acc)
    bias = None if bias is None else bias.astype(acc)
    mask5, bias5 = _grouped(mask, hq, hkv), _grouped(bias, hq, hkv)
    slopes5 = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.astype(acc)
        if slopes.shape not in ((hq,), (b, hq)):
            raise ValueError(f"alibi_slopes must be [Hq] or [B, Hq], got {list(slopes.shape)}")
        slopes = slopes.reshape((-1, hq))
        slopes5 = slopes.reshape(slopes.shape[0], hkv, groups, 1, 1)
    sinks4 = None
    if sinks is not None:
        if sinks.shape != (hq,):
            raise ValueError(f"sinks must be [Hq] = [{hq}], got {list(sinks.shape)}")
        sinks4 = sinks.astype(acc).reshape(1, hkv, groups, 1)
    cap = None if softcap is None else _softcap(softcap)
    band = causal or window is not None
    left, right = (None, None) if window is None else window

    def key_step(qi: jax.Array, q_start: jax.Array, q_chunk: jax.Array, mask_rows: jax.Array | None,
                 bias_rows: jax.Array | None, seg_rows: jax.Array | None, carry: tuple,
                 j: jax.Array) -> tuple[tuple, None]:
        """Fold key chunk ``j`` into the running (max, sum, accumulator) of one query chunk."""
        start = jnp.minimum(j * ck, lk - ck)  # the clamped start dynamic_slice would use anyway
        # Slices taken outside the cond: its transpose then makes chunk-sized cotangents, not full-length
        # ones of k and v per step (3 MiB more for a causal L=4096 backward when the cond sliced them).
        kj = lax.dynamic_slice_in_dim(k, start, ck, axis=1)
        vj = lax.dynamic_slice_in_dim(v, start, ck, axis=1)
        bj = None if bias_rows is None else _take(bias_rows, start, ck, axis=4)

        def fold(carry: tuple, kj: jax.Array, vj: jax.Array, bj: jax.Array | None) -> tuple:
            m, total, o = carry
            s = jnp.einsum("bqhgd,bkhd->bhgqk", q_chunk, kj, precision=_HIGHEST)
            if softcap is not None:
                s = cap(s)
            cols = start + jnp.arange(ck)
            d = qi[:, None] + off - cols[None, :]  # [cq, ck]
            visible = None
            if nk * ck != lk:
                visible = cols >= j * ck  # keys of the clamped last chunk already counted by the previous one
            if causal:
                visible = _and(visible, d >= 0)
            if left is not None:
                visible = _and(visible, d <= left)
            if right is not None:
                visible = _and(visible, d >= -right)
            if seg_rows is not None:
                seg_cols = lax.dynamic_slice_in_dim(kv_segment_ids, start, ck, axis=1)
                visible = _and(visible, (seg_rows[:, :, None] == seg_cols[:, None, :])[:, None, None])
            if mask_rows is not None:
                visible = _and(visible, _take(mask_rows, start, ck, axis=4))
            if bj is not None:
                visible = _and(visible, bj != -jnp.inf)
                s = s + bj
            if slopes5 is not None:
                s = s - slopes5 * jnp.abs(d).astype(acc)
            if visible is not None:
                s = jnp.where(visible, s, -jnp.inf)
            m_new = jnp.maximum(m, lax.stop_gradient(s).max(axis=-1))
            shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # never subtract -inf from -inf
            p = jnp.exp(s - shift[..., None])
            alpha = jnp.exp(m - shift)
            total = total * alpha + p.sum(axis=-1)
            o = o * alpha[..., None] + jnp.einsum("bhgqk,bkhd->bhgqd", p, vj, precision=_HIGHEST)
            return m_new, total, o

        if not band:
            return fold(carry, kj, vj, bj), None
        seen = band_overlaps(q_start, q_start + cq - 1, start, start + ck - 1, off, causal, window)
        return lax.cond(seen, fold, lambda c, *_: c, carry, kj, vj, bj), None

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def query_chunk(i: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """Output rows (and lse) [start, start + cq) for query chunk ``i`` (start clamped like dynamic_slice)."""
        start = jnp.minimum(i * cq, lq - cq)
        qi = start + jnp.arange(cq)
        q_chunk = lax.dynamic_slice_in_dim(q, start, cq, axis=1) * jnp.asarray(scale, acc)
        q_chunk = q_chunk.reshape(b, cq, hkv, groups, dk)
        mask_rows, bias_rows = _take(mask5, start, cq, axis=3), _take(bias5, start, cq, axis=3)
        seg_rows = None if q_segment_ids is None else lax.dynamic_slice_in_dim(q_segment_ids, start, cq, axis=1)
        step = jax.checkpoint(functools.partial(key_step, qi, start, q_chunk, mask_rows, bias_rows, seg_rows),
                              prevent_cse=False)
        init = (
            jnp.full((b, hkv, groups, cq), -jnp.inf, acc),
            jnp.zeros((b, hkv, groups, cq), acc),
            jnp.zeros((b, hkv, groups, cq, dv), acc),
        )
        (m, total, o), _ = lax.scan(step, init, jnp.arange(nk))
        if sinks4 is not None:
            infinite = sinks4 == jnp.inf  # out 0, lse +inf; computed below on a finite stand-in
            sigma = jnp.where(infinite, 0.0, sinks4)
            m_sink = jnp.maximum(m, lax.stop_gradient(sigma))
            shift = jnp.where(m_sink == -jnp.inf, 0.0, m_sink)
            # e^(m - shift) applied as two factors e^((m - shift) / 2): a dominant sink makes it subnormal
            # (flushed to 0 by XLA on CPU) while o * e^(m - shift) is still a normal number (huge values)
            half = jnp.exp((m - shift) * 0.5)
            total = total * (half * half) + jnp.exp(sigma - shift)
            o = (o * half[..., None]) * half[..., None]
        else:
            shift = jnp.where(m == -jnp.inf, 0.0, m)
        seen = total > 0
        safe_total = jnp.where(seen, total, 1.0)
        out = jnp.where(seen[..., None], o / safe_total[..., None], 0.0)
        if sinks4 is not None:
            out = jnp.where(infinite[..., None], 0.0, out)
        out = jnp.moveaxis(out, 3, 1).reshape(b, cq, hq, dv).astype(out_dtype)
        lse = None
        if return_lse:
            lse = jnp.where(seen, shift + jnp.log(safe_total), -jnp.inf)
            if sinks4 is not None:
                lse = jnp.where(infinite, sinks4, lse)  # d lse / d sigma = 1: dsinks = sum g_lse
            lse = lse.reshape(b, hq, cq)
        if nq * cq == lq:
            return out, lse
        # rows of the clamped last chunk that an earlier chunk produced contribute -0.0 (no change)
        fresh = qi >= i * cq
        out = jnp.where(fresh[None, :, None, None], out, jnp.asarray(-0.0, out_dtype))
        if lse is not None:
            lse = jnp.where(fresh[None, None, :], lse, jnp.asarray(-0.0, acc))
        return out, lse

    def add_chunk(carry: tuple, i: jax.Array) -> tuple[tuple, None]:
        out, lse = carry
        rows = jnp.minimum(i * cq, lq - cq) + jnp.arange(cq)
        out_i, lse_i = query_chunk(i)
        out = out.at[:, rows].add(out_i, indices_are_sorted=True, unique_indices=True)
        if lse is not None:
            lse = lse.at[:, :, rows].add(lse_i, indices_are_sorted=True, unique_indices=True)
        return (out, lse), None

    init = (jnp.full((b, lq, hq, dv), -0.0, out_dtype), jnp.full((b, hq, lq), -0.0, acc) if return_lse else None)
    (out, lse), _ = lax.scan(add_chunk, init, jnp.arange(nq))
    return (out, lse) if return_lse else out

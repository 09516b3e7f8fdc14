"""A JAX target with a seeded bug, for tests that need a framework-native finding (export)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def drops_last_key(q, k, v, *, scale=None):
    """Attention that ignores the last key whenever there are more than two: a partial-tile bug."""
    if k.shape[1] > 2:
        k, v = k[:, :-1], v[:, :-1]
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    s = s * (q.shape[-1] ** -0.5 if scale is None else scale)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32)).astype(q.dtype)


def correct(q, k, v, *, scale=None):
    """``drops_last_key`` fixed: what its exported reproducer must pass on."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    s = s * (q.shape[-1] ** -0.5 if scale is None else scale)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v.astype(jnp.float32)).astype(q.dtype)


def python_loops(q, k, v, *, mask=None, causal=False, scale=None, query_chunk_size=None, key_chunk_size=None):
    """A correct chunked kernel written as users write them: Python loops over chunks, unrolled at trace time.

    Each distinct shape and chunk pair compiles a new program with one block per chunk pair, so a long
    campaign compiles thousands of large programs (what once exhausted XLA:CPU's memory mappings).
    Fully masked rows give the mean of the values (the ``uniform`` policy).
    """
    lq, lk = q.shape[1], k.shape[1]
    cq, ck = query_chunk_size or lq, key_chunk_size or lk
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    if mask is not None:  # [.., Lq or 1, Lk or 1]: slice it per chunk pair below
        mask = jnp.broadcast_to(mask, (*mask.shape[:-2], lq, lk))
    rows = []
    for i in range(0, lq, cq):
        qi = q32[:, i:i + cq]
        m = jnp.full((q.shape[0], q.shape[2], qi.shape[1]), -jnp.inf)
        den = jnp.zeros_like(m)
        acc = jnp.zeros((q.shape[0], q.shape[2], qi.shape[1], v.shape[-1]), jnp.float32)
        for j in range(0, lk, ck):
            s = jnp.einsum("bqhd,bkhd->bhqk", qi, k32[:, j:j + ck]) * scale
            keep = jnp.ones(s.shape[-2:], bool)
            if causal:
                keep = (jnp.arange(i, i + qi.shape[1])[:, None] >= jnp.arange(j, j + s.shape[-1])[None, :])
            if mask is not None:
                keep = keep & mask[..., i:i + cq, j:j + ck]
            s = jnp.where(keep, s, jnp.finfo(jnp.float32).min)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            den = den * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + jnp.einsum("bhqk,bkhd->bhqd", p, v32[:, j:j + ck])
            m = m_new
        rows.append(jnp.transpose(acc / den[..., None], (0, 2, 1, 3)))
    return jnp.concatenate(rows, axis=1).astype(q.dtype)


python_loops.attnverify = {"framework": "jax", "features": ["mask", "causal", "chunks", "grad"],
                           "contract": {"accumulate": "fp32"}, "masked_rows": "uniform"}

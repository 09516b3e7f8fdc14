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

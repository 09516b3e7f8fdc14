"""Temporary memory (bytes) of chunked-jax and jax-dpa against sequence length, from XLA's compiler.

``jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes``: compile only, nothing
runs, the figure is deterministic on any machine. Shapes B=1, H=1, D=64, float32, as the
paper's memory table (Rabe & Staats, Table 2: at n = 16384 the overhead shrinks 59x for inference
and 32x for differentiation). "fwd+bwd" is the gradient of sum(out * g) with respect to q, k, v.

Usage: .venv/bin/python scripts/memory_jax.py [LENGTH ...]
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp

from verify.targets import chunked_jax, jax_dpa

LENGTHS = (1024, 2048, 4096, 8192, 16384)
D = 64


def chunk_policies(length: int) -> dict[str, tuple[int | None, int | None]]:
    """Named (query chunk, key chunk) policies; None = chunked-jax's defaults (1024, 4096)."""
    root = math.isqrt(length)
    return {
        "chunked q1024/k4096": (None, None),
        "chunked q1024/k=sqrtL": (1024, root),
        "chunked q1024/k128": (1024, 128),
        "chunked q=k=sqrtL": (root, root),
    }


def temp_bytes(fn: Callable, length: int) -> int:
    """XLA's temporary allocation for ``fn(q, k, v, g)`` at B=1, L=length, H=1, D=64, float32."""
    s = jax.ShapeDtypeStruct((1, length, 1, D), jnp.float32)
    return jax.jit(fn).lower(s, s, s, s).compile().memory_analysis().temp_size_in_bytes


def forward(att: Callable) -> Callable:
    return lambda q, k, v, g: att(q, k, v)


def forward_backward(att: Callable) -> Callable:
    """The gradient of sum(out * g) with respect to q, k and v (forward and backward pass)."""

    def f(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array) -> tuple:
        return jax.grad(lambda q, k, v: (att(q, k, v) * g).sum(), argnums=(0, 1, 2))(q, k, v)

    return f


def chunked(query_chunk: int | None, key_chunk: int | None) -> Callable:
    return lambda q, k, v: chunked_jax.attention(q, k, v, query_chunk_size=query_chunk, key_chunk_size=key_chunk)


def main(lengths: tuple[int, ...] = LENGTHS) -> None:
    """Print one table per pass (rows: implementations, columns: lengths) and the dense/chunked ratios."""
    for label, wrap in (("forward", forward), ("fwd+bwd", forward_backward)):
        rows: dict[str, list[int]] = {}
        for length in lengths:
            fns = {name: chunked(qc, kc) for name, (qc, kc) in chunk_policies(length).items()}
            fns["jax-dpa (xla)"] = jax_dpa.attention
            for name, fn in fns.items():
                rows.setdefault(name, []).append(temp_bytes(wrap(fn), length))
        print(f"\n{label}: temp bytes, B=1 H=1 D={D} float32")
        print(f"{'':24s}" + "".join(f"{n:>14d}" for n in lengths))
        for name, values in rows.items():
            print(f"{name:24s}" + "".join(f"{x:>14d}" for x in values))
        dense = rows["jax-dpa (xla)"][-1]
        for name, values in rows.items():
            if name != "jax-dpa (xla)":
                print(f"  jax-dpa / {name} at L={lengths[-1]}: {dense / values[-1]:.1f}x")


if __name__ == "__main__":
    main(tuple(int(x) for x in sys.argv[1:]) or LENGTHS)

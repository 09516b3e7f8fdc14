"""Forward time of chunked-jax against jax-dpa (the paper: "within a few percent of the runtime").

Both jitted and warm; each repeat times the two back to back in alternating order (interleaved,
so drift in the machine's speed hits both alike), ``block_until_ready`` after each call; the
median of the repeats is reported with the ratio chunked / dense. float32, B=1, H=8, D=64;
chunked-jax at its defaults (query chunk 1024, key chunk 4096, clipped to L) and with key
chunk sqrt(L).

Usage: .venv/bin/python benchmarks/bench_targets_jax.py [--repeats N] [LENGTH ...]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from verify.targets import chunked_jax, jax_dpa

LENGTHS = (1024, 2048, 4096)
B, H, D = 1, 8, 64


def timed(fn: Callable, *args: jax.Array) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def compare(length: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each implementation at one length, measured interleaved."""
    keys = jax.random.split(jax.random.PRNGKey(length), 3)
    q, k, v = (jax.random.normal(key, (B, length, H, D), jnp.float32) for key in keys)
    root = math.isqrt(length)
    fns = {
        "jax-dpa": jax.jit(jax_dpa.attention),
        "chunked (1024/4096)": jax.jit(chunked_jax.attention),
        f"chunked (1024/{root})": jax.jit(lambda q, k, v: chunked_jax.attention(q, k, v, key_chunk_size=root)),
    }
    for fn in fns.values():  # compile and warm up
        timed(fn, q, k, v)
        timed(fn, q, k, v)
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for _ in range(repeats):
        for name in order:
            times[name].append(timed(fns[name], q, k, v))
        order.reverse()
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lengths", nargs="*", type=int, default=list(LENGTHS))
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print(f"forward, float32, B={B} H={H} D={D}, {jax.devices()[0].platform}, median of {args.repeats}")
    for length in args.lengths:
        med = compare(length, args.repeats)
        dense = med["jax-dpa"]
        cells = "  ".join(f"{name} {sec * 1e3:8.2f} ms ({sec / dense:.2f}x)" for name, sec in med.items())
        print(f"L={length:6d}  {cells}")


if __name__ == "__main__":
    main()

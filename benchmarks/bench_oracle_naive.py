"""Timing of the naive float64 reference: forward + backward (``naive.attention_vjp``).

Prints the median of 7 repeats (after one warm-up) at B=1, H=2, Dk=Dv=32 for L = 64 and 1024, and,
for scale, the bf16 same-dtype emulation at the same sizes. Run: ``.venv/bin/python benchmarks/bench_oracle_naive.py``.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oracles import naive  # noqa: E402

REPEATS = 7


def median_seconds(length: int, dtype: str | None, b: int = 1, h: int = 2, d: int = 32) -> float:
    """Median wall time of one ``attention_vjp`` call on random normal inputs."""
    rng = np.random.default_rng(0)
    q, k, v, g = (rng.standard_normal((b, length, h, d)) for _ in range(4))
    naive.attention_vjp(q, k, v, g, dtype=dtype)
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        naive.attention_vjp(q, k, v, g, dtype=dtype)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    print(f"naive.attention_vjp (forward + backward), B=1 H=2 Dk=Dv=32, median of {REPEATS}")
    for dtype in (None, "bf16"):
        for length in (64, 1024):
            label = "float64" if dtype is None else f"{dtype} emulation"
            print(f"  {label:16s} L={length:5d}: {median_seconds(length, dtype):.6f} s")


if __name__ == "__main__":
    main()

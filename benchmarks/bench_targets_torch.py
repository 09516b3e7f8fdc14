"""Time chunked-torch against torch-sdpa (math backend) on CPU: forward and forward+backward.

Run: ``.venv/bin/python benchmarks/bench_targets_torch.py [--lengths 1024 2048 4096] [--repeats 5]``

fp32, B=1, H=8, D=64, eager. Forward runs under ``torch.no_grad``; forward+backward is
``out.backward(g)`` on leaf inputs. Each repeat times every implementation once, in turn
(interleaved, so drifts in machine load hit all alike); the table shows medians and the ratio
chunked / sdpa. chunked-torch runs with its default chunks (1024 queries x 4096 keys) and with
512 x 512 (the key axis chunked too).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from verify.targets import chunked_torch, torch_sdpa


def _impls() -> dict[str, Callable]:
    return {
        "sdpa-math": torch_sdpa.attention,
        "chunked(default)": chunked_torch.attention,
        "chunked(512x512)": lambda q, k, v: chunked_torch.attention(q, k, v, query_chunk_size=512, key_chunk_size=512),
    }


def _runner(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, backward: bool):
    if not backward:

        def run() -> None:
            with torch.no_grad():
                fn(q, k, v)

        return run
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]

    def run_bwd() -> None:
        for x in leaves:
            x.grad = None
        fn(*leaves).backward(g)

    return run_bwd


def bench(length: int, repeats: int, backward: bool, heads: int = 8, dim: int = 64) -> dict[str, float]:
    """Median seconds per call of each implementation at one sequence length."""
    gen = torch.Generator().manual_seed(length)
    q, k, v, g = (torch.randn(1, length, heads, dim, generator=gen) for _ in range(4))
    runs = {name: _runner(fn, q, k, v, g, backward) for name, fn in _impls().items()}
    for run in runs.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, fp32, B=1, H=8, D=64, medians of {args.repeats}")
    print(f"{'L':>5} {'mode':>8} {'impl':>17} {'ms':>9} {'/ sdpa':>7}")
    for length in args.lengths:
        for backward in (False, True):
            med = bench(length, args.repeats, backward)
            base = med["sdpa-math"]
            for name, sec in med.items():
                mode = "fwd+bwd" if backward else "fwd"
                print(f"{length:>5} {mode:>8} {name:>17} {sec * 1e3:>9.1f} {sec / base:>7.2f}", flush=True)


if __name__ == "__main__":
    main()

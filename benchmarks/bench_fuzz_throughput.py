"""Fuzzing throughput at the CI profile: examples per second, forward + grad, and where time goes.

Run: ``ATTNVERIFY_JAX_CACHE=/tmp/empty-dir .venv/bin/python benchmarks/bench_fuzz_throughput.py
[--targets chunked-torch,chunked-jax] [--max-examples 200]`` (a fresh cache directory, so the
first run really compiles).

Each target runs the default campaign (seed 0, bf16/fp16/fp32, forward and grad checks) twice
in one process with one adapter. The second run draws the same cases, so it finds every program
compiled: in the adapter's jit caches while they hold (at most ``MAX_COMPILED`` live programs)
and in JAX's persistent cache (``ATTNVERIFY_JAX_CACHE``, unless set empty). The difference of
target time between the runs estimates compilation. Shares are of the first (cold) run's wall
time; "other" is Hypothesis generation and shrinking, strategies and the tolerance model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from verify import fuzz  # noqa: E402
from verify.targets import Adapter, load  # noqa: E402


def _campaign(adapter: Adapter, n: int, tmp: Path) -> tuple[fuzz.Campaign, float]:
    sett = fuzz.Settings(max_examples=n, database=None, repro_dir=tmp, isolate=False)  # one adapter, both runs
    t0 = time.perf_counter()
    camp = fuzz.run(adapter, sett)
    return camp, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="chunked-torch,chunked-jax")
    ap.add_argument("--max-examples", type=int, default=fuzz.Settings.max_examples)
    args = ap.parse_args()
    print(f"{'target':14s} {'examples':>8s} {'wall s':>7s} {'ex/s':>6s} {'ex/s warm':>9s} "
          f"{'oracle':>7s} {'target':>7s} {'compile':>8s} {'other':>6s}  findings")
    rates: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.targets.split(","):
            adapter = load(name)  # one adapter: its jitted functions (and their caches) serve both runs
            cold, wall = _campaign(adapter, args.max_examples, Path(tmp))
            warm, wall_warm = _campaign(adapter, args.max_examples, Path(tmp))
            n = sum(cold.examples.values())
            compile_s = max(0.0, cold.seconds["target"] - warm.seconds["target"])
            oracle, target = cold.seconds["reference"], cold.seconds["target"] - compile_s
            other = wall - cold.seconds["reference"] - cold.seconds["target"]
            print(f"{name:14s} {n:8d} {wall:7.1f} {n / wall:6.1f} {sum(warm.examples.values()) / wall_warm:9.1f} "
                  f"{oracle / wall:7.0%} {target / wall:7.0%} {compile_s / wall:8.0%} {other / wall:6.0%}  "
                  f"{len(cold.findings)}")
            rates[name] = (n / wall, sum(warm.examples.values()) / wall_warm)
    if {"chunked-torch", "chunked-jax"} <= set(rates):
        (jc, jw), (tc, tw) = rates["chunked-jax"], rates["chunked-torch"]
        print(f"chunked-jax / chunked-torch examples/s: cold {jc / tc:.2f}, warm {jw / tw:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

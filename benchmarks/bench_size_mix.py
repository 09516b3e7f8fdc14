"""Campaign throughput by case size: small only, the default mix, large (and decode) only.

Run: ``.venv/bin/python benchmarks/bench_size_mix.py [--targets chunked-torch,torch-sdpa-flash]
[--max-examples 60] [--repeats 1]``.

Each row is the default campaign (seed 0, bf16/fp16/fp32, forward, grad and determinism checks)
restricted to a size mix (``fuzz.Settings.sizes``; the default draws 80 % small, 15 % large and
5 % decode), run in this process so the split is clean: reference (exact values and allowance),
target (its calls), other (Hypothesis generation and shrinking, strategies, comparisons). The
last columns say which reference decided the cases: ``naive64`` (certified float64), ``mp`` (the
mpmath oracle), ``naive64*`` (float64, certified except on unconstrained rows).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from verify import fuzz  # noqa: E402
from verify.targets import load  # noqa: E402

MIXES = {"small": ("small",), "default": ("small", "large", "decode"), "large": ("large", "decode")}


def campaign(name: str, sizes: tuple[str, ...], n: int) -> tuple[float, fuzz.Campaign]:
    with tempfile.TemporaryDirectory() as tmp:
        sett = fuzz.Settings(max_examples=n, database=None, repro_dir=Path(tmp), isolate=False, sizes=sizes)
        t0 = time.perf_counter()
        camp = fuzz.run(load(name), sett)
        return time.perf_counter() - t0, camp


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="chunked-torch,torch-sdpa-flash")
    ap.add_argument("--max-examples", type=int, default=60, help="per dtype")
    ap.add_argument("--repeats", type=int, default=1, help="median of this many runs per row")
    args = ap.parse_args()
    print(f"{'target':18s} {'mix':8s} {'examples':>8s} {'ex/s':>6s} {'reference':>9s} {'target':>7s} {'other':>6s} "
          f"{'max L':>6s} {'max D':>6s}  references")
    for name in args.targets.split(","):
        for mix, sizes in MIXES.items():
            runs = [campaign(name, sizes, args.max_examples) for _ in range(args.repeats)]
            wall, camp = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
            n = sum(camp.examples.values())
            ref, tgt = camp.seconds["reference"], camp.seconds["target"]
            refs = ", ".join(f"{k} {v / n:.0%}" for k, v in sorted(camp.references.items()))
            stats = camp.stats.to_json()
            print(f"{name:18s} {mix:8s} {n:8d} {statistics.median(n / r[0] for r in runs):6.1f} {ref / wall:9.0%} "
                  f"{tgt / wall:7.0%} {max(0.0, wall - ref - tgt) / wall:6.0%} {stats['max_len']:6d} "
                  f"{stats['max_dim']:6d}  {refs}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

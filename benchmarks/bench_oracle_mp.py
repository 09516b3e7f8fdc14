"""Time the mpmath oracle: forward and VJP, with and without gmpy2.

    .venv/bin/python benchmarks/bench_oracle_mp.py [--repeats N]

Shape B=1, Lq=Lk=64, H=2, Dk=Dv=32, fp32 random normal inputs, default precision. Each backend is
measured in its own subprocess (mpmath picks its integer backend at import; ``MPMATH_NOGMPY=1``
forces plain Python integers). Prints the median and minimum seconds of ``mp.attention`` and of
``mp.attention_vjp`` (which also computes the forward).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"B": 1, "L": 64, "H": 2, "D": 32}


def measure(repeats: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import mpmath.libmp
    import numpy as np

    from oracles import mp

    rng = np.random.default_rng(0)
    b, n, h, d = SHAPE["B"], SHAPE["L"], SHAPE["H"], SHAPE["D"]
    q, k, v, g = (rng.standard_normal((b, n, h, d)).astype(np.float32) for _ in range(4))
    mp.attention_vjp(q[:, :4], k[:, :4], v[:, :4], g[:, :4])  # warm-up (imports, caches)
    times: dict[str, list[float]] = {"forward": [], "vjp": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        mp.attention(q, k, v)
        t1 = time.perf_counter()
        mp.attention_vjp(q, k, v, g)
        t2 = time.perf_counter()
        times["forward"].append(t1 - t0)
        times["vjp"].append(t2 - t1)
    return {
        "backend": mpmath.libmp.BACKEND,
        "prec": mp.DEFAULT_PREC,
        **{f"{name}_median": statistics.median(ts) for name, ts in times.items()},
        **{f"{name}_min": min(ts) for name, ts in times.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.repeats)))
        return
    rows = []
    for label, extra in (("gmpy2", {}), ("no gmpy2", {"MPMATH_NOGMPY": "1"})):
        env = {key: val for key, val in os.environ.items() if key != "MPMATH_NOGMPY"} | extra
        proc = subprocess.run(
            [sys.executable, __file__, "--child", "--repeats", str(args.repeats)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append((label, json.loads(proc.stdout.strip().splitlines()[-1])))
    s = SHAPE
    print(
        f"mp oracle, B={s['B']} Lq=Lk={s['L']} H={s['H']} Dk=Dv={s['D']} fp32, "
        f"prec={rows[0][1]['prec']}, {args.repeats} repeats (seconds)"
    )
    head = f"{'run':<10} {'BACKEND':<8} {'fwd median':>11} {'fwd min':>9} {'vjp median':>11} {'vjp min':>9}"
    print(head)
    print("-" * len(head))
    for label, r in rows:
        print(
            f"{label:<10} {r['backend']:<8} {r['forward_median']:>11.3f} {r['forward_min']:>9.3f} "
            f"{r['vjp_median']:>11.3f} {r['vjp_min']:>9.3f}"
        )
    base, slow = rows[0][1], rows[1][1]
    print(
        f"no-gmpy2 / gmpy2: forward {slow['forward_median'] / base['forward_median']:.2f}x, "
        f"vjp {slow['vjp_median'] / base['vjp_median']:.2f}x"
    )


if __name__ == "__main__":
    main()

"""Cells per second of an accuracy sweep (``verify.report``) with 1 and with 2 local workers.

Run: ``.venv/bin/python benchmarks/bench_report_workers.py [--repeats 3] [--workers 1 2] [--seeds 2]``

The sweep: chunked-torch, bf16 and fp32, L = 64 and 256, query and key chunks 16 and L, families normal
and large-logits, no mask, 2 seeds (``--seeds``: more work per cell, same 32 cells): 32 cells, mp oracle
at L=64, float64 naive reference at 256. Each measurement is a fresh Python process running one sweep
from scratch, as ``attnverify report`` does, so both settings pay for their imports: ``process`` is its
wall time (interpreter, imports, worker start-up and sweep), ``sweep`` the sweep's own ``run.seconds``
(from loading the target to the last cell; with 2 workers that includes spawning them and their torch
import). Repeats alternate the worker counts; the table shows medians and the speed-up against the
first worker count.

BLAS/OpenMP threads are 1 in every process (the sweep sets it for its workers; this script for the
in-process run), so the comparison measures processes, not thread oversubscription.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SWEEP = {"dtypes": ("bf16", "fp32"), "lengths": (64, 256), "query_chunks": ("16", "L"), "key_chunks": ("16", "L"),
         "families": ("normal", "large-logits"), "masks": ("none",)}


def child(workers: int, seeds: int, out: Path) -> None:
    """One sweep in this process (the measured unit)."""
    from verify import accuracy
    from verify.targets import TargetSpec

    sett = accuracy.Settings(**SWEEP, seeds=seeds)
    result = accuracy.sweep(TargetSpec("chunked-torch"), sett, out, workers=workers, fresh=True)
    (out / "run.json").write_text(json.dumps({"cells": len(result["cells"]), "sweep": result["run"]["seconds"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seeds", type=int, default=2, help="cases per cell")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.seeds, Path(args.out))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    rates: dict[int, dict[str, list[float]]] = {w: {"process": [], "sweep": []} for w in args.workers}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for workers in args.workers:
                out = Path(tmp) / f"r{rep}-w{workers}"
                t0 = time.perf_counter()
                subprocess.run([sys.executable, __file__, "--child", str(workers), "--seeds", str(args.seeds),
                                "--out", str(out)], check=True, env=env)
                wall = time.perf_counter() - t0
                run = json.loads((out / "run.json").read_text())
                print(f"repeat {rep + 1}: workers={workers}: {run['cells']} cells, process {wall:.2f} s, "
                      f"sweep {run['sweep']:.2f} s", flush=True)
                rates[workers]["process"].append(run["cells"] / wall)
                rates[workers]["sweep"].append(run["cells"] / run["sweep"])
    med = {w: {k: statistics.median(v) for k, v in r.items()} for w, r in rates.items()}
    base = med[args.workers[0]]
    print(f"\n{'workers':>8} {'process cells/s':>16} {'speed-up':>9} {'sweep cells/s':>14} {'speed-up':>9}")
    for workers, m in med.items():
        print(f"{workers:>8} {m['process']:>16.2f} {m['process'] / base['process']:>9.2f} "
              f"{m['sweep']:>14.2f} {m['sweep'] / base['sweep']:>9.2f}")


if __name__ == "__main__":
    main()

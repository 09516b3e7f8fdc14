"""What running the target in a worker process costs, per example, against running it in this process.

Run: ``.venv/bin/python benchmarks/bench_isolation.py [--targets chunked-torch,tests.fixture_targets:reference]
[--examples 60] [--repeats 3]``.

Two measurements per target, each the median of ``--repeats`` side-by-side repeats:

- *round trip*: the same small case (fp32, L = 16, forward and grad) run many times through
  ``InProcess.run`` and ``Worker.run``: the difference is the pickled round trip of inputs and
  results plus the messages of each pass;
- *campaign*: the default campaign (seed 0, fp32 only, ``--examples`` examples) with
  ``isolate=False`` and with ``isolate=True`` (the default): per-example difference, with the
  worker's one-time start (its imports and target load) reported apart.

The worker overlaps the target with the exact-value computation of the parent (``submit`` /
``collect``), so on a target whose calls cost as much as the reference the campaign can be faster
isolated than in-process; on two cores the child's one BLAS thread is then the price.
This process also runs with one BLAS/OpenMP thread (set below, before numpy and torch load), so both
sides compute alike and the difference is the isolation alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.update(dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"), "1"))

from verify import fuzz  # noqa: E402
from verify.execution import InProcess  # noqa: E402
from verify.isolation import Worker  # noqa: E402
from verify.strategies import make_case  # noqa: E402
from verify.targets import load  # noqa: E402

_DIMS = {"B": 1, "Lq": 16, "Lk": 16, "Hq": 2, "Hkv": 2, "Dk": 16, "Dv": 16}


def round_trip(name: str, calls: int) -> tuple[float, float, float]:
    """(in-process s/call, worker s/call, worker start s) on one small case."""
    adapter = load(name)
    case = make_case(0, "fp32", dims=_DIMS, family="normal", features=adapter.info.features)
    passes = ("forward", "grad") if "grad" in adapter.info.features else ("forward",)
    local, worker = InProcess(adapter), Worker(adapter.target, adapter.info)
    try:
        t0 = time.perf_counter()
        worker.run(case, passes, 300.0)  # the start: imports and target load
        start = time.perf_counter() - t0
        timings = []
        for executor in (local, worker):
            executor.run(case, passes, 300.0)
            t0 = time.perf_counter()
            for _ in range(calls):
                executor.run(case, passes, 300.0)
            timings.append((time.perf_counter() - t0) / calls)
    finally:
        worker.close()
    return timings[0], timings[1], start


def campaign(name: str, examples: int, isolate: bool) -> tuple[float, int, dict]:
    """(wall seconds, examples, worker counts) of the fp32 default campaign."""
    with tempfile.TemporaryDirectory() as tmp:
        sett = fuzz.Settings(dtypes=("fp32",), max_examples=examples, database=None, repro_dir=Path(tmp),
                             isolate=isolate)
        t0 = time.perf_counter()
        camp = fuzz.run(load(name), sett)
        return time.perf_counter() - t0, sum(camp.examples.values()), camp.workers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="chunked-torch,tests.fixture_targets:reference")
    ap.add_argument("--examples", type=int, default=60)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"{'target':34s} {'call in-proc':>12s} {'call worker':>11s} {'round trip':>10s} {'start':>6s} "
          f"{'ex/s in-proc':>12s} {'ex/s worker':>11s} {'worker/in-proc':>14s} {'per example':>11s}")
    for name in args.targets.split(","):
        trips = [round_trip(name, args.calls) for _ in range(args.repeats)]
        local, remote, start = (statistics.median(t[i] for t in trips) for i in range(3))
        runs = [(campaign(name, args.examples, False), campaign(name, args.examples, True))
                for _ in range(args.repeats)]
        wall_local = statistics.median(r[0][0] for r in runs)
        wall_worker = statistics.median(r[1][0] for r in runs)
        n = runs[0][0][1]
        per_example = (wall_worker - wall_local - start) / n
        print(f"{name:34s} {local * 1e3:10.2f}ms {remote * 1e3:9.2f}ms {(remote - local) * 1e3:8.2f}ms "
              f"{start:5.1f}s {n / wall_local:12.1f} {n / wall_worker:11.1f} {wall_worker / wall_local:14.2f} "
              f"{per_example * 1e3:9.1f}ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
